//! The start sequence as a state machine: which step runs next, what a failure does, what
//! runs only once.
//!
//! The seed's order: home snapshot (first start only), file injection, `/etc/sandbox.d/setup`,
//! `~/.sandbox/setup`, global daemons, checkouts, post-checkout hooks, build hooks, daemons
//! and jobs, `/etc/sandbox.d/post-setup`. Checkouts and their hooks run once, unless the
//! workspace is in Auto Mode; what ran once is remembered by the caller across restarts
//! ([`Sequence::done_once`], given back to [`Sequence::new`]).
//!
//! A failing setup script, checkout or post-checkout hook blocks the sequence: the workspace
//! is Problematic, and the step is retried after a backoff ([`crate::backoff::Backoff::STEP`]),
//! unless automatic retry is off (then [`Sequence::retry`] retries by hand). A failing build
//! hook does not stop daemons and jobs from launching (they are supervised and restart on
//! their own): they launch, and the build is retried as above; the rest of the sequence
//! (`post-setup`) waits for it.
//!
//! No clock is read: times come in as milliseconds.

use std::collections::BTreeSet;

use crate::backoff::{Backoff, Failures};

/// One step of the sequence. Checkout steps carry the checkout's index and path (the path
/// is what "ran once" is remembered by).
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Step {
    HomeSnapshot,
    InjectFiles,
    SystemSetup,
    UserSetup,
    GlobalDaemons,
    Checkout(String),
    PostCheckout(String),
    Build(String),
    LaunchDaemons,
    PostSetup,
}

impl Step {
    /// The name logs and `cs status` use.
    pub fn name(&self) -> String {
        match self {
            Self::HomeSnapshot => "home-snapshot".into(),
            Self::InjectFiles => "inject-files".into(),
            Self::SystemSetup => "setup".into(),
            Self::UserSetup => "user-setup".into(),
            Self::GlobalDaemons => "global-daemons".into(),
            Self::Checkout(p) => format!("checkout:{p}"),
            Self::PostCheckout(p) => format!("post-checkout:{p}"),
            Self::Build(p) => format!("build:{p}"),
            Self::LaunchDaemons => "daemons".into(),
            Self::PostSetup => "post-setup".into(),
        }
    }

    /// Runs on the first start only (or, for checkout steps, once unless in Auto Mode).
    fn once(&self, auto: bool) -> bool {
        match self {
            Self::HomeSnapshot => true,
            Self::Checkout(_) | Self::PostCheckout(_) | Self::Build(_) => !auto,
            _ => false,
        }
    }
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Failed: the exit code or signal, and whatever the caller shows of it.
    Failed {
        why: String,
    },
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Run this step now and report with [`Sequence::finished`].
    Run(Step),
    /// Call [`Sequence::tick`] at this time: a retry is due.
    WakeAt(u64),
    /// Remember across restarts that this step ran (a once-only step succeeded).
    RememberDone(Step),
    /// A build that had failed now succeeded after the daemons launched: restart them so
    /// they run what it built.
    RelaunchDaemons,
}

/// The sequence's state as `cs status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// A step is running since the given time.
    Progressing { step: Step, since_ms: u64 },
    /// A step failed: it blocks the sequence (a build blocks only `post-setup`).
    Problematic {
        step: Step,
        why: String,
        /// Failures in a row of the step blocking the sequence.
        failures: u32,
        /// When the next automatic retry is due; `None` when automatic retry is off.
        retry_at_ms: Option<u64>,
    },
    /// Every step is done.
    Done,
}

/// A failed step waiting to be retried.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failed {
    step: Step,
    why: String,
    retry_at_ms: Option<u64>,
}

/// The start sequence of one start of a workspace.
#[derive(Debug, Clone)]
pub struct Sequence {
    steps: Vec<Step>,
    /// Index of the step running or next to run.
    pos: usize,
    running: Option<(Step, u64)>,
    /// The failure the sequence waits on.
    blocked: Option<Failed>,
    /// Builds that failed and were passed over so daemons and jobs could launch; each is
    /// retried before `post-setup`.
    builds_failed: Vec<Failed>,
    failures: Failures,
    policy: Backoff,
    auto_retry: bool,
    done_once: BTreeSet<Step>,
}

impl Sequence {
    /// The steps of a start for these checkouts (their paths, in definition order).
    /// `done_once` is what earlier starts remembered; `auto` puts checkouts in Auto Mode;
    /// `auto_retry` retries failed steps after a backoff.
    pub fn new(
        checkouts: &[String],
        has_home_snapshot: bool,
        auto: bool,
        done_once: BTreeSet<Step>,
        auto_retry: bool,
    ) -> Self {
        let mut all = Vec::new();
        if has_home_snapshot {
            all.push(Step::HomeSnapshot);
        }
        all.extend([
            Step::InjectFiles,
            Step::SystemSetup,
            Step::UserSetup,
            Step::GlobalDaemons,
        ]);
        all.extend(checkouts.iter().map(|p| Step::Checkout(p.clone())));
        all.extend(checkouts.iter().map(|p| Step::PostCheckout(p.clone())));
        all.extend(checkouts.iter().map(|p| Step::Build(p.clone())));
        all.extend([Step::LaunchDaemons, Step::PostSetup]);
        let steps = all
            .into_iter()
            .filter(|s| !(s.once(auto) && done_once.contains(s)))
            .collect();
        Self {
            steps,
            pos: 0,
            running: None,
            blocked: None,
            builds_failed: Vec::new(),
            failures: Failures::default(),
            policy: Backoff::STEP,
            auto_retry,
            done_once,
        }
    }

    /// The steps this start runs, in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// What ran once so far (to persist).
    pub fn done_once(&self) -> &BTreeSet<Step> {
        &self.done_once
    }

    pub fn state(&self) -> State {
        if let Some(f) = self.blocked.as_ref().or(self.builds_failed.first()) {
            return State::Problematic {
                step: f.step.clone(),
                why: f.why.clone(),
                failures: self.failures.in_row().max(1),
                retry_at_ms: f.retry_at_ms,
            };
        }
        match &self.running {
            Some((step, since)) => State::Progressing {
                step: step.clone(),
                since_ms: *since,
            },
            None => State::Done,
        }
    }

    /// The step running now and since when (it may run while the state is Problematic: a
    /// build runs after another one failed).
    pub fn running(&self) -> Option<(Step, u64)> {
        self.running.clone()
    }

    /// Starts the sequence at `now_ms`.
    pub fn start(&mut self, now_ms: u64) -> Vec<Effect> {
        self.next(now_ms)
    }

    fn launched(&self) -> bool {
        self.steps[..self.pos.min(self.steps.len())].contains(&Step::LaunchDaemons)
    }

    /// Runs the next step, unless one runs or a failure blocks.
    fn next(&mut self, now_ms: u64) -> Vec<Effect> {
        if self.running.is_some() || self.blocked.is_some() {
            return Vec::new();
        }
        let at_end = matches!(self.steps.get(self.pos), Some(Step::PostSetup) | None);
        if at_end && !self.builds_failed.is_empty() {
            // Post-setup waits for the failed builds.
            let f = self.builds_failed.remove(0);
            let wake = f.retry_at_ms;
            self.blocked = Some(f);
            return wake.map(Effect::WakeAt).into_iter().collect();
        }
        match self.steps.get(self.pos) {
            Some(step) => {
                self.running = Some((step.clone(), now_ms));
                vec![Effect::Run(step.clone())]
            }
            None => Vec::new(),
        }
    }

    /// The running step ended at `now_ms`. A report for a step that is not running is
    /// ignored (it is stale).
    pub fn finished(&mut self, step: &Step, outcome: Outcome, now_ms: u64) -> Vec<Effect> {
        let retried = match &self.running {
            Some((s, _)) if s == step => self.steps.get(self.pos) != Some(step),
            _ => return Vec::new(),
        };
        self.running = None;
        let mut out = Vec::new();
        match outcome {
            Outcome::Ok => {
                self.failures.reset();
                if step.once(false) && self.done_once.insert(step.clone()) {
                    out.push(Effect::RememberDone(step.clone()));
                }
                if !retried {
                    self.pos += 1;
                } else if matches!(step, Step::Build(_)) && self.launched() {
                    out.push(Effect::RelaunchDaemons);
                }
            }
            Outcome::Failed { why } => {
                let delay = self.failures.stopped(&self.policy, 0);
                let f = Failed {
                    step: step.clone(),
                    why,
                    retry_at_ms: self.auto_retry.then(|| now_ms.saturating_add(delay)),
                };
                if matches!(step, Step::Build(_)) && !retried {
                    // Daemons and jobs launch whether or not the build succeeded.
                    self.failures.reset();
                    self.builds_failed.push(f);
                    self.pos += 1;
                } else {
                    out.extend(f.retry_at_ms.map(Effect::WakeAt));
                    self.blocked = Some(f);
                    return out;
                }
            }
        }
        out.extend(self.next(now_ms));
        out
    }

    /// Time passed: retries what is due at `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        match &self.blocked {
            Some(Failed {
                retry_at_ms: Some(at),
                ..
            }) if *at <= now_ms => self.retry(now_ms),
            _ => Vec::new(),
        }
    }

    /// Retries the failed step now (by hand, or when automatic retry is off).
    pub fn retry(&mut self, now_ms: u64) -> Vec<Effect> {
        let Some(f) = self.blocked.take() else {
            return Vec::new();
        };
        self.running = Some((f.step.clone(), now_ms));
        vec![Effect::Run(f.step)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs a sequence to its end (or to a block with automatic retry off, or `steps_max`
    /// runs), answering each run with `outcome(step, attempt)`. Returns the runs in order,
    /// the effects, and the sequence.
    fn drive(
        mut seq: Sequence,
        steps_max: usize,
        mut outcome: impl FnMut(&Step, u32) -> Outcome,
    ) -> (Vec<Step>, Vec<Effect>, Sequence) {
        let mut now = 0u64;
        let mut runs = Vec::new();
        let mut effects = Vec::new();
        let mut attempts: std::collections::BTreeMap<Step, u32> = Default::default();
        let mut pending = seq.start(now);
        for _ in 0..steps_max {
            effects.extend(pending.iter().cloned());
            let run = pending.iter().find_map(|e| match e {
                Effect::Run(s) => Some(s.clone()),
                _ => None,
            });
            let wake = pending.iter().find_map(|e| match e {
                Effect::WakeAt(t) => Some(*t),
                _ => None,
            });
            pending = match (run, wake) {
                (Some(step), _) => {
                    runs.push(step.clone());
                    let n = attempts.entry(step.clone()).or_default();
                    *n += 1;
                    now += 10;
                    let o = outcome(&step, *n);
                    seq.finished(&step, o, now)
                }
                (None, Some(t)) => {
                    assert!(seq.tick(t - 1).is_empty(), "a retry ran before it was due");
                    now = t;
                    seq.tick(t)
                }
                (None, None) => break,
            };
        }
        (runs, effects, seq)
    }

    fn co(paths: &[&str]) -> Vec<String> {
        paths.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn a_first_start_runs_the_pages_order_and_remembers_the_once_steps() {
        let seq = Sequence::new(&co(&["a", "b"]), true, false, BTreeSet::new(), true);
        let (runs, effects, seq) = drive(seq, 100, |_, _| Outcome::Ok);
        let names: Vec<String> = runs.iter().map(Step::name).collect();
        assert_eq!(
            names,
            [
                "home-snapshot",
                "inject-files",
                "setup",
                "user-setup",
                "global-daemons",
                "checkout:a",
                "checkout:b",
                "post-checkout:a",
                "post-checkout:b",
                "build:a",
                "build:b",
                "daemons",
                "post-setup"
            ]
        );
        assert_eq!(seq.state(), State::Done);
        let remembered: Vec<&Effect> = effects
            .iter()
            .filter(|e| matches!(e, Effect::RememberDone(_)))
            .collect();
        assert_eq!(remembered.len(), 7, "{remembered:?}");
        // The next start skips what ran once; in Auto Mode the checkouts run again.
        let again = Sequence::new(&co(&["a", "b"]), true, false, seq.done_once().clone(), true);
        let names: Vec<String> = again.steps().iter().map(Step::name).collect();
        assert_eq!(
            names,
            [
                "inject-files",
                "setup",
                "user-setup",
                "global-daemons",
                "daemons",
                "post-setup"
            ]
        );
        let auto = Sequence::new(&co(&["a"]), true, true, seq.done_once().clone(), true);
        assert!(auto.steps().contains(&Step::Checkout("a".into())));
        assert!(!auto.steps().contains(&Step::HomeSnapshot));
    }

    #[test]
    fn a_failing_setup_blocks_and_is_retried_with_backoff() {
        let seq = Sequence::new(&co(&["a"]), false, false, BTreeSet::new(), true);
        let (runs, effects, seq) = drive(seq, 100, |s, n| match s {
            Step::SystemSetup if n < 4 => Outcome::Failed {
                why: "exit code 1".into(),
            },
            _ => Outcome::Ok,
        });
        let setups = runs.iter().filter(|s| **s == Step::SystemSetup).count();
        assert_eq!(setups, 4);
        // Nothing after setup ran before it succeeded.
        let first_ok = runs.iter().position(|s| *s == Step::UserSetup).unwrap();
        assert!(runs[..first_ok]
            .iter()
            .all(|s| matches!(s, Step::InjectFiles | Step::SystemSetup)));
        let wakes: Vec<u64> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::WakeAt(t) => Some(*t),
                _ => None,
            })
            .collect();
        // 2 s, 4 s, 8 s after each failure.
        let gaps: Vec<u64> = wakes.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps, [4_000 + 10, 8_000 + 10]);
        assert_eq!(seq.state(), State::Done);
    }

    #[test]
    fn without_auto_retry_a_failure_waits_for_a_hand_retry() {
        let mut seq = Sequence::new(&co(&["a"]), false, false, BTreeSet::new(), false);
        let run = |fx: &[Effect]| {
            fx.iter().find_map(|e| match e {
                Effect::Run(s) => Some(s.clone()),
                _ => None,
            })
        };
        let mut fx = seq.start(0);
        while let Some(s) = run(&fx) {
            let o = if matches!(s, Step::PostCheckout(_)) {
                Outcome::Failed {
                    why: "exit code 2".into(),
                }
            } else {
                Outcome::Ok
            };
            fx = seq.finished(&s, o, 5);
        }
        assert!(
            run(&fx).is_none() && !fx.iter().any(|e| matches!(e, Effect::WakeAt(_))),
            "{fx:?}"
        );
        assert_eq!(
            seq.state(),
            State::Problematic {
                step: Step::PostCheckout("a".into()),
                why: "exit code 2".into(),
                failures: 1,
                retry_at_ms: None
            }
        );
        assert!(seq.tick(u64::MAX).is_empty());
        assert_eq!(
            seq.retry(9),
            vec![Effect::Run(Step::PostCheckout("a".into()))]
        );
        assert_eq!(
            seq.state(),
            State::Progressing {
                step: Step::PostCheckout("a".into()),
                since_ms: 9
            }
        );
    }

    #[test]
    fn a_failed_build_lets_daemons_launch_and_holds_back_post_setup() {
        let seq = Sequence::new(&co(&["a", "b"]), false, false, BTreeSet::new(), true);
        let (runs, effects, seq) = drive(seq, 100, |s, n| match s {
            Step::Build(p) if p == "a" && n < 3 => Outcome::Failed {
                why: "exit code 1".into(),
            },
            _ => Outcome::Ok,
        });
        let names: Vec<String> = runs.iter().map(Step::name).collect();
        let at = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(at("build:b") > at("build:a"));
        assert!(at("daemons") > at("build:b"));
        let last_build_a = names.iter().rposition(|x| x == "build:a").unwrap();
        assert!(at("post-setup") > last_build_a);
        assert!(last_build_a > at("daemons"));
        assert!(effects.contains(&Effect::RelaunchDaemons));
        assert_eq!(seq.state(), State::Done);
    }

    #[test]
    fn stale_reports_are_ignored() {
        let mut seq = Sequence::new(&[], false, false, BTreeSet::new(), true);
        assert_eq!(seq.start(0), vec![Effect::Run(Step::InjectFiles)]);
        assert!(seq.finished(&Step::PostSetup, Outcome::Ok, 1).is_empty());
        assert_eq!(
            seq.finished(&Step::InjectFiles, Outcome::Ok, 2),
            vec![Effect::Run(Step::SystemSetup)]
        );
    }

    proptest! {
        /// Whatever fails: steps run in the page's order (a step runs only once every step
        /// before it succeeded, except that daemons launch past failed builds), post-setup
        /// runs only after every build succeeded, each once-only step is remembered at most
        /// once, and the sequence ends Done once failures stop.
        #[test]
        fn the_order_is_never_violated(fails in proptest::collection::vec((0..12usize, 1..4u32), 0..6),
                                       n in 0..3usize, snapshot: bool) {
            let paths: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
            let seq = Sequence::new(&paths, snapshot, false, BTreeSet::new(), true);
            let order: Vec<Step> = seq.steps().to_vec();
            let failing: std::collections::BTreeMap<usize, u32> = fails.into_iter().collect();
            let (runs, effects, seq) = drive(seq, 1000, |s, attempt| {
                let i = order.iter().position(|x| x == s).unwrap();
                match failing.get(&i) {
                    Some(k) if attempt <= *k => Outcome::Failed { why: format!("step {i}") },
                    _ => Outcome::Ok,
                }
            });
            prop_assert_eq!(seq.state(), State::Done);
            // Simulate success bookkeeping from the runs: a step's successful run is its
            // (failures + 1)-th.
            let mut attempts: std::collections::BTreeMap<&Step, u32> = Default::default();
            let mut ok: BTreeSet<usize> = BTreeSet::new();
            for r in &runs {
                let i = order.iter().position(|x| x == r).unwrap();
                for j in 0..i {
                    let passable = matches!(order[j], Step::Build(_)) && order[i] != Step::PostSetup;
                    prop_assert!(ok.contains(&j) || passable || attempts.contains_key(&order[j]),
                        "{} ran before {} was tried", r.name(), order[j].name());
                    if order[i] == Step::PostSetup || !matches!(order[j], Step::Build(_)) {
                        prop_assert!(ok.contains(&j), "{} ran before {} succeeded", r.name(), order[j].name());
                    }
                }
                let a = attempts.entry(r).or_default();
                *a += 1;
                if *a > failing.get(&i).copied().unwrap_or(0) {
                    ok.insert(i);
                }
            }
            prop_assert_eq!(ok.len(), order.len());
            let remembered = effects.iter().filter(|e| matches!(e, Effect::RememberDone(_))).count();
            prop_assert_eq!(remembered, order.iter().filter(|s| s.once(false)).count());
        }
    }
}
