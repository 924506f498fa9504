//! The daemon's forward sessions: the [`ForwardHub`] actor owns them, keeps the detached
//! ones' specs in `$CS_HOME/forward/sessions.json` (started again by the next daemon), and
//! answers `cs portforward` commands.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use actix::prelude::*;
use tokio::sync::broadcast;

use super::session::{self, LinkRef, Session};
use super::{check_name, ForwardSpec, SessionView, SESSIONS_MAX};
use crate::daemon::{link_for, Hub};
use crate::home::CsHome;

/// Owns every forward session of this daemon.
pub struct ForwardHub {
    home: CsHome,
    hub: Addr<Hub>,
    sessions: BTreeMap<String, Session>,
    /// Names of sessions being started (their listeners are being bound).
    starting: BTreeSet<String>,
}

impl ForwardHub {
    pub fn new(home: CsHome, hub: Addr<Hub>) -> Self {
        Self {
            home,
            hub,
            sessions: BTreeMap::new(),
            starting: BTreeSet::new(),
        }
    }

    fn specs_path(&self) -> PathBuf {
        self.home.dir.join("forward").join("sessions.json")
    }

    fn save(&self) {
        let specs: Vec<&ForwardSpec> = self
            .sessions
            .values()
            .map(|s| &s.shared.spec)
            .filter(|s| s.detached)
            .collect();
        let path = self.specs_path();
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().unwrap_or(&path))?;
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&specs)?)?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            tracing::error!(error = %e, path = %path.display(), "cannot save the forward sessions");
        }
    }

    fn load(&self) -> Vec<ForwardSpec> {
        std::fs::read(self.specs_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The first free name `pf-N`.
    fn free_name(&self) -> String {
        (1..)
            .map(|n| format!("pf-{n}"))
            .find(|n| !self.sessions.contains_key(n) && !self.starting.contains(n))
            .unwrap_or_default()
    }
}

impl Actor for ForwardHub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        for spec in self.load() {
            tracing::info!(session = %spec.name, "resuming forward session");
            let (addr, name) = (ctx.address(), spec.name.clone());
            actix_rt::spawn(async move {
                if let Ok(Err(e)) = addr.send(Create(spec)).await {
                    tracing::warn!(session = %name, error = %e, "cannot resume the forward session; it is dropped");
                }
            });
        }
        // Specs that failed to resume are dropped from the file by the next save.
    }
}

/// A started session: its name, its notes so far, and a receiver of the notes to come.
pub type Started = (String, Vec<String>, broadcast::Receiver<String>);

/// Start a session.
#[derive(Message)]
#[rtype(result = "Result<Started, String>")]
pub struct Create(pub ForwardSpec);

impl Handler<Create> for ForwardHub {
    type Result = ResponseActFuture<Self, Result<Started, String>>;

    fn handle(&mut self, Create(mut spec): Create, _: &mut Context<Self>) -> Self::Result {
        let refuse = |e: String| -> Self::Result { Box::pin(fut::ready(Err(e))) };
        if spec.name.is_empty() {
            spec.name = self.free_name();
        }
        if let Err(e) = check_name(&spec.name) {
            return refuse(e);
        }
        if self.sessions.contains_key(&spec.name) || self.starting.contains(&spec.name) {
            return refuse(format!(
                "a port-forward session named '{}' exists already; pick another with --name",
                spec.name
            ));
        }
        if self.sessions.len() + self.starting.len() >= SESSIONS_MAX {
            return refuse(format!(
                "{SESSIONS_MAX} port-forward sessions run already, the most one daemon runs; stop one first"
            ));
        }
        self.starting.insert(spec.name.clone());
        let (hub, home) = (self.hub.clone(), self.home.clone());
        let name = spec.name.clone();
        let start = async move {
            let (link, ws, addr) = link_for(&hub, &home, &spec.workspace).await?;
            let local = home
                .registry()
                .ok()
                .and_then(|r| r.resolve(Some(&spec.workspace)).ok())
                .map(|(_, t)| t.local.is_some())
                .unwrap_or(false);
            session::start(
                spec,
                LinkRef {
                    link,
                    name: ws,
                    addr,
                    local,
                },
            )
            .await
        };
        Box::pin(start.into_actor(self).map(move |res, act, _| {
            act.starting.remove(&name);
            let s = res?;
            let rx = s.shared.notes_tx.subscribe();
            let notes = s.shared.view().notes;
            let detached = s.shared.spec.detached;
            act.sessions.insert(name.clone(), s);
            if detached {
                act.save();
            }
            Ok((name, notes, rx))
        }))
    }
}

/// Every session.
#[derive(Message)]
#[rtype(result = "Vec<SessionView>")]
pub struct List;

impl Handler<List> for ForwardHub {
    type Result = MessageResult<List>;
    fn handle(&mut self, _: List, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.sessions.values().map(|s| s.shared.view()).collect())
    }
}

/// Stop a session: its listeners close and its connections end.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Stop(pub String);

impl Handler<Stop> for ForwardHub {
    type Result = Result<(), String>;
    fn handle(&mut self, Stop(name): Stop, _: &mut Context<Self>) -> Self::Result {
        match self.sessions.remove(&name) {
            Some(s) => {
                if s.shared.spec.detached {
                    self.save();
                }
                Ok(())
            }
            None => Err(format!(
                "no port-forward session named '{name}' (see `cs portforward list`)"
            )),
        }
    }
}

/// The sandbox is being deleted: stop its sessions.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ForgetSandbox(pub String);

impl Handler<ForgetSandbox> for ForwardHub {
    type Result = ();
    fn handle(&mut self, ForgetSandbox(sandbox): ForgetSandbox, _: &mut Context<Self>) {
        let prefix = format!("{sandbox}/");
        let before = self.sessions.len();
        self.sessions
            .retain(|_, s| !s.shared.spec.workspace.starts_with(&prefix));
        if self.sessions.len() != before {
            self.save();
        }
    }
}
