//! The agent-side exec actor: admits sessions up to a limit and runs each one.

use std::collections::BTreeMap;
use std::rc::Rc;

use actix::prelude::*;
use cs_protocol::exec::ExecStart;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::session::run_session;
use crate::spawn::{Control, SpawnRequest, Spawner};

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
    next_id: u64,
    /// Control channels of running children, to reach them at shutdown.
    controls: BTreeMap<u64, mpsc::Sender<Control>>,
}

/// Signal every running session's process group (the agent is shutting down: SIGHUP, as
/// sshd's sessions get when it goes, then SIGKILL for what ignored it). Returns how many.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct SignalAll(pub i32);

impl ExecActor {
    pub fn new(spawner: Rc<dyn Spawner>) -> Self {
        Self {
            spawner,
            active: 0,
            sessions_max: SESSIONS_MAX,
            next_id: 0,
            controls: BTreeMap::new(),
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
        let id = self.next_id;
        self.next_id += 1;
        if let Ok(c) = &child {
            self.controls.insert(id, c.control.clone());
        }
        ctx.spawn(run_session(child, msg.send, msg.recv).into_actor(self).map(
            move |(), act, _| {
                act.active -= 1;
                act.controls.remove(&id);
            },
        ));
    }
}

impl Handler<SignalAll> for ExecActor {
    type Result = usize;

    fn handle(&mut self, msg: SignalAll, _: &mut Context<Self>) -> usize {
        self.controls
            .values()
            .filter(|c| c.try_send(Control::Signal(msg.0)).is_ok())
            .count()
    }
}

/// Asks how many sessions are running (the simulation's check that none is orphaned).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct ActiveSessions;

impl Handler<ActiveSessions> for ExecActor {
    type Result = usize;

    fn handle(&mut self, _: ActiveSessions, _: &mut Context<Self>) -> usize {
        self.active
    }
}
