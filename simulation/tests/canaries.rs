//! The simulation can fail: each canary bug (see `cs_protocol::canary`), switched on, is caught
//! within 1,000 seeds, by the invariant it breaks.

use cs_protocol::Canary;
use cs_simulation::run_seed;
use cs_simulation::trace::Trace;

const SEEDS_MAX: u64 = 1_000;

/// The first seed of the sync scenario that fails with `canary` on, and its message; that
/// seed must pass without the canary (the failure is the canary's).
fn first_sync_failure(canary: Canary) -> (u64, String) {
    let (seed, message) = (0..SEEDS_MAX)
        .find_map(|seed| {
            cs_simulation::run_sync_seed(seed, Trace::default(), &[canary])
                .err()
                .map(|f| (seed, f.message))
        })
        .unwrap_or_else(|| panic!("{canary:?} went unnoticed for 1,000 seeds"));
    cs_simulation::run_sync_seed(seed, Trace::default(), &[])
        .unwrap_or_else(|f| panic!("seed {seed} ({message}): {f}"));
    (seed, message)
}

/// The first seed that fails with `canary` on, and its message.
fn first_failure(canary: Canary) -> Option<(u64, String)> {
    (0..SEEDS_MAX).find_map(|seed| {
        run_seed(seed, Trace::default(), &[canary])
            .err()
            .map(|f| (seed, f.message))
    })
}

#[test]
fn a_link_that_never_reconnects_is_caught_by_liveness() {
    let (seed, message) = first_failure(Canary::ReconnectSkipped)
        .expect("ReconnectSkipped went unnoticed for 1,000 seeds");
    assert!(message.starts_with("liveness:"), "seed {seed}: {message}");
    // The same seed passes without the bug: the failure is the canary's.
    run_seed(seed, Trace::default(), &[]).unwrap_or_else(|f| panic!("{f}"));
}

#[test]
fn trusting_a_stream_end_as_an_exit_is_caught_as_truncation() {
    let (seed, message) = first_failure(Canary::StreamEndTrusted)
        .expect("StreamEndTrusted went unnoticed for 1,000 seeds");
    assert!(message.starts_with("invariant:"), "seed {seed}: {message}");
    run_seed(seed, Trace::default(), &[]).unwrap_or_else(|f| panic!("{f}"));
}

#[test]
fn a_command_left_running_after_its_laptop_went_is_caught_as_an_orphan() {
    let (seed, message) =
        first_failure(Canary::HangupSkipped).expect("HangupSkipped went unnoticed for 1,000 seeds");
    assert!(
        message.starts_with("invariant: sessions"),
        "seed {seed}: {message}"
    );
    run_seed(seed, Trace::default(), &[]).unwrap_or_else(|f| panic!("{f}"));
}

#[test]
fn sync_letting_a_deletion_beat_an_edit_is_caught_as_a_lost_write() {
    let (seed, message) = first_sync_failure(Canary::DeleteWins);
    assert!(message.contains("last write"), "seed {seed}: {message}");
}

#[test]
fn sync_acting_on_a_broken_tree_from_the_workspace_is_caught_as_a_halt() {
    let (seed, message) = first_sync_failure(Canary::BadTree);
    // The laptop refused the tree and halted; it did not write the planted entry.
    assert!(
        message.contains("the session halted: the workspace sent an invalid"),
        "seed {seed}: {message}"
    );
}

#[test]
fn sync_reporting_applies_before_they_are_durable_is_caught() {
    let (seed, message) = first_sync_failure(Canary::UnsyncedApply);
    // A crash took back what the ancestor recorded: a write lost, or a wipe halted.
    assert!(
        message.contains("last write") || message.contains("halted"),
        "seed {seed}: {message}"
    );
}

/// The first seed of the supervise scenario that fails with `canary` on, and its message;
/// that seed passes without it.
fn first_supervise_failure(canary: Canary) -> (u64, String) {
    let (seed, message) = (0..SEEDS_MAX)
        .find_map(|seed| {
            cs_simulation::run_supervise_seed(seed, Trace::default(), &[canary])
                .err()
                .map(|f| (seed, f.message))
        })
        .unwrap_or_else(|| panic!("{canary:?} went unnoticed for 1,000 seeds"));
    cs_simulation::run_supervise_seed(seed, Trace::default(), &[])
        .unwrap_or_else(|f| panic!("seed {seed} ({message}): {f}"));
    (seed, message)
}

#[test]
fn a_restarted_agent_that_keeps_what_the_last_one_left_runs_a_daemon_twice() {
    let (seed, message) = first_supervise_failure(Canary::LeftoversKept);
    assert!(
        message.starts_with("invariant: two instances of daemon"),
        "seed {seed}: {message}"
    );
}

#[test]
fn forgetting_that_a_once_only_step_ran_is_caught_when_it_runs_again() {
    let (seed, message) = first_supervise_failure(Canary::DoneForgotten);
    assert!(
        message.starts_with("invariant:") && message.contains("started again"),
        "seed {seed}: {message}"
    );
}

#[test]
fn a_log_follow_that_does_not_resume_where_it_was_is_caught_as_a_repeat() {
    let (seed, message) = first_supervise_failure(Canary::LogResumeIgnored);
    assert!(
        message.starts_with("invariant: the follow got line"),
        "seed {seed}: {message}"
    );
}

#[test]
fn a_forward_pump_that_takes_a_lost_connection_for_a_finish_is_caught() {
    let (seed, message) = (0..SEEDS_MAX)
        .find_map(|seed| {
            cs_simulation::run_forward_seed(seed, Trace::default(), &[Canary::ForwardLossAsFinish])
                .err()
                .map(|f| (seed, f.message))
        })
        .expect("ForwardLossAsFinish went unnoticed for 1,000 seeds");
    // A connection that "ended cleanly" short of its echo, or one that never ended.
    assert!(
        message.contains("ended cleanly with") || message.starts_with("liveness:"),
        "seed {seed}: {message}"
    );
    cs_simulation::run_forward_seed(seed, Trace::default(), &[])
        .unwrap_or_else(|f| panic!("seed {seed} ({message}): {f}"));
}
