//! Logs of setup scripts, hooks, daemons and jobs (the seed's "Log View"): the agent owns the
//! pipes, frames what comes out of them into numbered, timestamped lines, rotates the files
//! itself by size, and serves follows that resume after a reconnect with no gap and no
//! duplicate line.
//!
//! The core here does no IO and reads no clock: bytes, times and file contents come in as
//! values.

pub mod line;
pub mod rotate;
