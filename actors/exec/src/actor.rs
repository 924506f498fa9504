//! The agent-side exec actor: admits sessions up to a limit and runs each one.

use std::rc::Rc;

use actix::prelude::*;
use cs_protocol::exec::ExecStart;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::session::run_session;
use crate::spawn::{SpawnRequest, Spawner};

/// Concurrent exec sessions one agent runs; more are refused with a message.
pub const SESSIONS_MAX: usize = 512;

/// A boxed write half of a stream.
pub type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;
/// A boxed read half of a stream.
pub type BoxRead = Box<dyn AsyncRead + Unpin + Send>;

/// Start a session on an exec stream whose [`ExecStart`] has been read.
#[derive(Message)]
#[rtype(result = "()")]
pub struct OpenSession {
    pub start: ExecStart,
    pub send: BoxWrite,
    pub recv: BoxRead,
}

/// Owns the exec sessions of one agent.
pub struct ExecActor {
    spawner: Rc<dyn Spawner>,
    active: usize,
    sessions_max: usize,
}

impl ExecActor {
    pub fn new(spawner: Rc<dyn Spawner>) -> Self {
        Self {
            spawner,
            active: 0,
            sessions_max: SESSIONS_MAX,
        }
    }

    /// Number of sessions running now.
    pub fn active(&self) -> usize {
        self.active
    }
}

impl Actor for ExecActor {
    type Context = Context<Self>;
}

impl Handler<OpenSession> for ExecActor {
    type Result = ();

    fn handle(&mut self, msg: OpenSession, ctx: &mut Context<Self>) {
        let child = if self.active >= self.sessions_max {
            Err(format!(
                "the workspace is running {} sessions, the most it allows",
                self.sessions_max
            ))
        } else {
            let req = SpawnRequest {
                command: msg.start.command.clone(),
                pty: msg.start.pty.clone(),
            };
            self.spawner.spawn(&req)
        };
        if let Err(e) = &child {
            tracing::warn!(error = %e, "exec refused");
        }
        self.active += 1;
        ctx.spawn(
            run_session(child, msg.send, msg.recv)
                .into_actor(self)
                .map(|(), act, _| {
                    act.active -= 1;
                }),
        );
    }
}
