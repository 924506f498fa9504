//! Delays before running something again: a daemon that stopped, a setup step that failed.
//!
//! Exponential from [`Backoff::first_ms`], doubled per failure in a row, capped at
//! [`Backoff::max_ms`]. A daemon that ran for [`Backoff::stable_ms`] before it stopped counts
//! as having worked: its next restart starts from the first delay again (supervisord's
//! `startsecs`, systemd's restart steps). No jitter: a workspace's daemons restart on their
//! own schedules, there is no herd to spread.

/// A backoff policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first_ms: u64,
    pub max_ms: u64,
    /// A run at least this long resets the count of failures in a row.
    pub stable_ms: u64,
    /// This many failures in a row, each shorter than `stable_ms`, make it "crashing" (the
    /// workspace shows Problematic).
    pub crashing_after: u32,
}

impl Backoff {
    /// For daemons: 1 s, 2 s, 4 s ... up to a minute; a run of 30 s resets; 5 quick exits in a
    /// row is crashing.
    pub const DAEMON: Self = Self {
        first_ms: 1_000,
        max_ms: 60_000,
        stable_ms: 30_000,
        crashing_after: 5,
    };

    /// For setup scripts and hooks that failed: 2 s, 4 s ... up to 5 minutes.
    pub const STEP: Self = Self {
        first_ms: 2_000,
        max_ms: 300_000,
        stable_ms: u64::MAX,
        crashing_after: 1,
    };

    /// The delay before attempt number `failures + 1`, after `failures` in a row (at least 1).
    pub fn delay_ms(&self, failures: u32) -> u64 {
        let doublings = failures.saturating_sub(1).min(63);
        self.first_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_ms)
    }
}

/// The failures in a row of one daemon or step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Failures {
    in_row: u32,
}

impl Failures {
    /// It stopped after running `ran_ms`: the delay before it starts again.
    pub fn stopped(&mut self, policy: &Backoff, ran_ms: u64) -> u64 {
        if ran_ms >= policy.stable_ms {
            self.in_row = 0;
        }
        self.in_row = self.in_row.saturating_add(1);
        policy.delay_ms(self.in_row)
    }

    /// It worked (a step succeeded, or someone restarted it by hand).
    pub fn reset(&mut self) {
        self.in_row = 0;
    }

    pub fn in_row(&self) -> u32 {
        self.in_row
    }

    /// Whether it has failed often enough in a row to flag the workspace.
    pub fn crashing(&self, policy: &Backoff) -> bool {
        self.in_row >= policy.crashing_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn delays_double_up_to_the_cap_and_a_stable_run_resets_them() {
        let p = Backoff::DAEMON;
        let mut f = Failures::default();
        let delays: Vec<u64> = (0..9).map(|_| f.stopped(&p, 100)).collect();
        assert_eq!(
            delays,
            [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000]
        );
        assert!(f.crashing(&p));
        // It ran for 30 s before stopping: a fresh start.
        assert_eq!(f.stopped(&p, 30_000), 1_000);
        assert!(!f.crashing(&p));
        assert_eq!(f.stopped(&p, 29_999), 2_000);
        f.reset();
        assert_eq!(f.in_row(), 0);
        assert_eq!(Backoff::STEP.delay_ms(1), 2_000);
        assert_eq!(Backoff::STEP.delay_ms(100), 300_000);
        assert_eq!(Backoff::STEP.delay_ms(0), 2_000);
    }

    proptest! {
        /// Delays never shrink while failures continue, never exceed the cap, and never fall
        /// below the first delay, whatever the policy.
        #[test]
        fn delays_are_monotone_and_bounded(first in 1..10_000u64, max in 1..10_000_000u64,
                                           n in 1..200u32) {
            let p = Backoff { first_ms: first, max_ms: max.max(first), stable_ms: u64::MAX, crashing_after: 3 };
            let mut last = 0;
            for i in 1..=n {
                let d = p.delay_ms(i);
                prop_assert!(d >= last && d <= p.max_ms && d >= first.min(p.max_ms));
                last = d;
            }
        }
    }
}
