//! Deterministic simulation of cs: the real agent server, the real exec actor and session
//! core, the laptop daemon's real `Link` actor and connect code, and the real quinn stack with
//! pinned mutual TLS, on turmoil's simulated network, all on one thread and virtual time,
//! driven by one seed.
//!
//! What is real: `cs_agent::serve::accept_loop` (hello, trust, stream dispatch),
//! `cs_exec::ExecActor` and its session core, `cs_exec::ExecClient` (the laptop's check of
//! output), `cs_cli::link` (connect on demand, reconnect with backoff, the stream retry) and
//! `cs_cli::connect::connect_on` (handshake timeout, hello), `cs_transport` (identities,
//! pinned verifiers, quinn configs). What is simulated: the network ([`net`] over turmoil),
//! processes ([`script`]), the laptop's sleeping clock ([`clock`]) and the trust store (in
//! memory). [`faults`] draws each seed's options; [`coverage`] lists the markers a run must
//! reach.

pub mod clock;
pub mod coverage;
pub mod faults;
pub mod forward_scenario;
pub mod memfs;
pub mod net;
pub mod procs;
pub mod scenario;
pub mod script;
pub mod supervise_scenario;
pub mod suspect;
pub mod sync_scenario;
pub mod trace;

pub use faults::Options;
pub use forward_scenario::run_forward_seed;
pub use scenario::{run_seed, Failure, Outcome};
pub use supervise_scenario::run_supervise_seed;
pub use sync_scenario::run_sync_seed;

/// Parses a canary's name as the runner's `--canary` takes it.
pub fn parse_canary(name: &str) -> Result<cs_protocol::Canary, String> {
    match name {
        "reconnect-skipped" => Ok(cs_protocol::Canary::ReconnectSkipped),
        "stream-end-trusted" => Ok(cs_protocol::Canary::StreamEndTrusted),
        "hangup-skipped" => Ok(cs_protocol::Canary::HangupSkipped),
        "delete-wins" => Ok(cs_protocol::Canary::DeleteWins),
        "bad-tree" => Ok(cs_protocol::Canary::BadTree),
        "unsynced-apply" => Ok(cs_protocol::Canary::UnsyncedApply),
        "leftovers-kept" => Ok(cs_protocol::Canary::LeftoversKept),
        "done-forgotten" => Ok(cs_protocol::Canary::DoneForgotten),
        "log-resume-ignored" => Ok(cs_protocol::Canary::LogResumeIgnored),
        "forward-loss-as-finish" => Ok(cs_protocol::Canary::ForwardLossAsFinish),
        other => Err(format!(
            "unknown canary '{other}': expected reconnect-skipped, stream-end-trusted, hangup-skipped, delete-wins, bad-tree, unsynced-apply, leftovers-kept, done-forgotten, log-resume-ignored or forward-loss-as-finish"
        )),
    }
}

/// The seeds of `simulation/regressions.txt`: seeds that once failed, kept forever.
pub fn regression_seeds() -> Vec<u64> {
    include_str!("../regressions.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}
