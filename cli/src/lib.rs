//! The laptop side of cs as a library: the modules of the `cs` binary, and the pieces the
//! simulation runs unchanged (the daemon's [`link::Link`] actor and [`connect::connect_on`]).

pub mod automation;
pub mod client;
pub mod connect;
pub mod daemon;
pub mod demo;
pub mod forward;
pub mod home;
pub mod link;
pub mod rsync;
pub mod sandbox;
pub mod ssh;
pub mod sync;
pub mod wire;
