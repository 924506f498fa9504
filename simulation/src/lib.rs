//! Deterministic simulation of cs: the real agent server, the real exec actor and session
//! core, and the real quinn stack with pinned mutual TLS, on turmoil's simulated network, all
//! on one thread and virtual time, driven by one seed.
//!
//! What is real: `cs_agent::serve::accept_loop` (hello, trust, stream dispatch),
//! `cs_exec::ExecActor` and its session core, `cs_exec::ExecClient` (the laptop's check of
//! output), `cs_transport` (identities, pinned verifiers, quinn configs). What is simulated:
//! the network (turmoil, seeded loss, latency and partitions), processes ([`script`]) and the
//! trust store (in memory).
//!
//! Not yet covered (see ARCHITECTURE.md): the laptop daemon's link actor, node crashes, clock
//! jumps, corruption and duplication of datagrams.

pub mod net;
pub mod scenario;
pub mod script;
pub mod trace;

pub use scenario::{run_seed, Faults, Outcome};
