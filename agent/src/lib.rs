//! The workspace agent as a library: the binary (`main.rs`) is its command line, and the
//! simulation runs the same server ([`serve`]) on a simulated network.

pub mod app;
pub mod forward;
pub mod logs;
pub mod rsync;
pub mod serve;
pub mod spawn;
pub mod state;
pub mod supervise;
pub mod sync;
