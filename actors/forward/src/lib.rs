//! Port forwarding (`cs portforward`): what both ends share.
//!
//! - [`rule`]: `-L [BIND:]LOCAL:[HOST:]REMOTE` and `-R [BIND:]REMOTE:[HOST:]LOCAL`, TCP ports or
//!   Unix-socket paths on either end, parsed once with errors that show the expected form.
//! - [`procnet`]: the listening sockets in `/proc/net/tcp` and `tcp6` text.
//! - [`discover`]: which auto-discovered forwards to add and remove when the workspace's
//!   listening ports change.
//! - [`pump`]: one connection's bytes between a local socket and a QUIC stream, both ways,
//!   with half-close, resets and backpressure carried end to end.
//! - [`turns`]: the order in which a connection's bulk streams send, so that the other side
//!   receives each in runs.
//!
//! Cores read no clock, socket or file: the agent and the laptop daemon (the shells) open the
//! sockets and read `/proc`; the simulation hands [`pump`] in-memory pipes.

pub mod discover;
pub mod procnet;
pub mod pump;
pub mod rule;
pub mod sock;
pub mod turns;

pub use pump::{pump, Counters, End};
pub use rule::{parse_local, parse_remote, Rule, RuleError};
pub use sock::Sock;
pub use turns::Turns;
