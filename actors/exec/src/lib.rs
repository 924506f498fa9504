//! Remote command execution.
//!
//! - [`core`]: the agent-side session state machine. It turns child-process events into
//!   protocol messages (offsets, chunking, the exit message only after all output) and reads
//!   no clock, socket or process itself: `now` comes in as a value.
//! - [`client`]: the laptop-side state machine, which checks that output arrived complete, in
//!   order and exactly once, and reports the exit status, or a failure, never a silent cut.
//! - [`spawn`]: the seam to the operating system. The agent plugs in real processes and PTYs;
//!   the simulation plugs in scripted ones.
//! - [`actor`]: the actix shell on the agent side, which owns sessions and their limits, and
//!   [`session`], the async glue that drives one session over one stream.

pub mod actor;
pub mod client;
pub mod core;
pub mod session;
pub mod spawn;

pub use actor::{ActiveSessions, ExecActor, OpenSession, SignalAll};
pub use client::{ClientEvent, ExecClient};
pub use spawn::{ChildEvent, ChildHandle, Control, SpawnRequest, Spawner, StdinMsg};
