//! Canary bugs: deliberate defects that the simulation switches on to prove it can catch them.
//!
//! A canary is off unless a test sets it on its own thread, so production code, which never
//! calls [`set`], always runs the correct path. Each canary sits at the one line that would be
//! the bug, and `simulation/tests/canaries.rs` shows each is found within 1,000 seeds.

use std::cell::Cell;

/// The defects that can be switched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canary {
    /// The laptop's link keeps handing out a connection after it died, and never reconnects
    /// (a liveness bug: caught when a crash or partition kills the connection).
    ReconnectSkipped = 1,
    /// The laptop's exec client takes the end of a stream as the end of the command, with
    /// whatever output arrived (a safety bug: silent truncation).
    StreamEndTrusted = 2,
    /// The agent keeps a command running after the laptop closed its stream (an orphaned
    /// process, the bug the simulation found in the first `cs ssh`).
    HangupSkipped = 4,
    /// Sync's reconciliation lets a deletion beat a concurrent edit (a lost write).
    DeleteWins = 8,
    /// The agent's sync endpoint reports an entry below a file (a broken or hostile peer):
    /// the laptop must refuse the tree and halt, never act on it.
    BadTree = 16,
    /// The agent reports ops applied before making them durable (a crash then takes back
    /// what the laptop's ancestor already records).
    UnsyncedApply = 32,
    /// A restarted agent leaves running what the agent before it left (a daemon then runs
    /// twice).
    LeftoversKept = 64,
    /// The supervisor does not remember that a once-only step ran (a restart runs it again).
    DoneForgotten = 128,
    /// `cs logs` resuming after a sequence number gets the log from its start again.
    LogResumeIgnored = 256,
    /// A forwarded connection's pump takes a lost QUIC connection for the other side's
    /// finish: the connection ends "clean" with its data cut short (silent truncation).
    ForwardLossAsFinish = 512,
}

thread_local! {
    static ACTIVE: Cell<u32> = const { Cell::new(0) };
}

/// Switches the canaries on this thread to exactly `on`.
pub fn set(on: &[Canary]) {
    ACTIVE.with(|a| a.set(on.iter().fold(0, |m, c| m | *c as u32)));
    cs_sync::canary::set_delete_wins(on.contains(&Canary::DeleteWins));
}

/// Whether `c` is switched on for this thread.
pub fn active(c: Canary) -> bool {
    ACTIVE.with(|a| a.get() & c as u32 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canaries_are_off_by_default_and_per_thread() {
        assert!(!active(Canary::ReconnectSkipped));
        set(&[Canary::StreamEndTrusted]);
        assert!(active(Canary::StreamEndTrusted));
        assert!(!active(Canary::ReconnectSkipped));
        // A test thread, not simulated code: it checks the switch does not leak across threads.
        #[allow(clippy::disallowed_methods)]
        std::thread::spawn(|| assert!(!active(Canary::StreamEndTrusted)))
            .join()
            .unwrap();
        set(&[]);
        assert!(!active(Canary::StreamEndTrusted));
    }
}
