//! The daemon's sync sessions: the [`SyncHub`] actor owns them, persists their specs so they
//! outlive the daemon, and answers `cs sync` commands.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;

use actix::prelude::*;
use tokio::sync::{mpsc, oneshot};

use super::session::{self, Control, Shared};
use super::{mode_name, ConflictView, SyncSpec, SyncStatus, SESSIONS_MAX};
use crate::daemon::{link_for, Hub};
use crate::home::CsHome;
use crate::link::open_on_link;
use crate::wire::{SyncAnswer, SyncCommand};

/// Control messages queued per session.
const CONTROL_QUEUE_MAX: usize = 16;

struct Running {
    spec: SyncSpec,
    shared: Rc<Shared>,
    control: mpsc::Sender<Control>,
    /// The session's task: stopped when the session leaves the hub (terminate, a deleted
    /// sandbox), wherever it is, so that it cannot reconnect (restarting a local agent that
    /// is being deleted) or write into a directory already removed. Its journal makes that
    /// as safe as a crash.
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Owns every sync session of this daemon.
pub struct SyncHub {
    home: CsHome,
    hub: Addr<Hub>,
    sessions: BTreeMap<String, Running>,
}

impl SyncHub {
    /// Starts the hub and the sessions persisted by an earlier daemon.
    pub fn new(home: CsHome, hub: Addr<Hub>) -> Self {
        Self {
            home,
            hub,
            sessions: BTreeMap::new(),
        }
    }

    fn specs_path(&self) -> PathBuf {
        self.home.dir.join("sync").join("sessions.json")
    }

    fn load_specs(&self) -> Vec<SyncSpec> {
        match std::fs::read(self.specs_path()) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::error!(path = %self.specs_path().display(), error = %e, "cannot read sync sessions; starting none");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    fn save_specs(&self) -> Result<(), String> {
        let specs: Vec<&SyncSpec> = self.sessions.values().map(|r| &r.spec).collect();
        let path = self.specs_path();
        let bytes = serde_json::to_vec_pretty(&specs).map_err(|e| e.to_string())?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        cs_transport::identity::write_private(&path, &bytes)
            .map_err(|e| format!("cannot save {}: {e}", path.display()))
    }

    fn launch(&mut self, spec: SyncSpec) {
        let shared = Rc::new(Shared {
            status: RefCell::new(SyncStatus {
                name: spec.name.clone(),
                alpha: spec.local.display().to_string(),
                beta: spec.beta(),
                mode: mode_name(spec.mode).into(),
                state: "starting".into(),
                ..SyncStatus::default()
            }),
            conflicts: RefCell::new(Vec::new()),
            flush_waiters: RefCell::new(Vec::new()),
        });
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE_MAX);
        let dir = session::session_dir(&self.home, &spec.name);
        let (guard, watch) = match cs_sync::fs::os_watch(&spec.local) {
            Ok((w, watch)) => (Some(Box::new(w) as Box<dyn std::any::Any>), Some(watch)),
            Err(e) => {
                shared.status.borrow_mut().last_error =
                    Some(format!("{e}; relying on periodic rescans"));
                (None, None)
            }
        };
        let (hub, home, workspace) = (self.hub.clone(), self.home.clone(), spec.workspace.clone());
        let open: session::Opener = Rc::new(move |open| {
            let (hub, home, workspace) = (hub.clone(), home.clone(), workspace.clone());
            Box::pin(async move {
                let (link, name, addr) = link_for(&hub, &home, &workspace).await?;
                open_on_link(&link, &name, &addr, &open).await
            })
        });
        let env = session::Env {
            fs: std::sync::Arc::new(cs_sync::fs::OsRoot::new(spec.local.clone())),
            watch,
            open,
            store: Rc::new(session::FileStore::new(dir)),
            bulk_bytes_min: session::BULK_BYTES_MIN,
            guard,
            // The end-to-end tests turn the check on; it costs a whole-tree walk per cycle.
            check_dirty: std::env::var_os("CS_SYNC_CHECK_DIRTY").is_some(),
        };
        let task = actix::spawn(session::run(spec.clone(), env, shared.clone(), rx));
        self.sessions.insert(
            spec.name.clone(),
            Running {
                spec,
                shared,
                control: tx,
                task,
            },
        );
    }

    fn get(&self, name: &str) -> Result<&Running, String> {
        self.sessions.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.sessions.keys().map(String::as_str).collect();
            if known.is_empty() {
                format!("unknown sync session '{name}': there are none")
            } else {
                format!("unknown sync session '{name}'; known: {}", known.join(", "))
            }
        })
    }

    fn send(&self, name: &str, c: Control) -> Result<(), String> {
        self.get(name)?
            .control
            .try_send(c)
            .map_err(|e| format!("sync session '{name}' is busy: {e}"))
    }

    fn set_paused(&mut self, name: &str, paused: bool) -> Result<(), String> {
        let r = self
            .sessions
            .get_mut(name)
            .ok_or_else(|| format!("unknown sync session '{name}'"))?;
        r.spec.paused = paused;
        self.save_specs()
    }
}

impl Actor for SyncHub {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        for spec in self.load_specs() {
            tracing::info!(session = %spec.name, "resuming sync session");
            self.launch(spec);
        }
    }
}

/// The sandbox is being deleted: terminate its sessions (their laptop files stay), so that
/// nothing reconnects to (and restarts) its agents. Returns the sessions' names.
#[derive(Message)]
#[rtype(result = "Vec<String>")]
pub struct ForgetSandbox(pub String);

impl Handler<ForgetSandbox> for SyncHub {
    type Result = Vec<String>;

    fn handle(
        &mut self,
        ForgetSandbox(sandbox): ForgetSandbox,
        _: &mut Context<Self>,
    ) -> Vec<String> {
        let prefix = format!("{sandbox}/");
        let names: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, r)| r.spec.workspace.starts_with(&prefix))
            .map(|(n, _)| n.clone())
            .collect();
        for name in &names {
            let _ = self.send(name, Control::Terminate);
            self.sessions.remove(name);
            let _ = std::fs::remove_dir_all(session::session_dir(&self.home, name));
            tracing::info!(session = %name, %sandbox, "sync session terminated: its sandbox is deleted");
        }
        if let Err(e) = self.save_specs() {
            tracing::error!(error = %e, "cannot save the sync sessions");
        }
        names
    }
}

/// A `cs sync` command.
#[derive(Message)]
#[rtype(result = "Result<SyncAnswer, String>")]
pub struct Command(pub SyncCommand);

impl Handler<Command> for SyncHub {
    type Result = ResponseFuture<Result<SyncAnswer, String>>;

    fn handle(&mut self, Command(cmd): Command, _: &mut Context<Self>) -> Self::Result {
        let now = |r: Result<SyncAnswer, String>| -> Self::Result { Box::pin(async move { r }) };
        match cmd {
            SyncCommand::Create(spec) => {
                if let Some(r) = self.sessions.get(&spec.name) {
                    return now(Err(format!(
                        "a sync session named '{}' exists already ({}); pick another with --name",
                        spec.name,
                        super::commands::describe(&r.spec)
                    )));
                }
                if self.sessions.len() >= SESSIONS_MAX {
                    return now(Err(format!(
                        "{SESSIONS_MAX} sync sessions exist, the most one daemon runs; terminate one first"
                    )));
                }
                if let Some(why) = self.sessions.values().find_map(|r| overlap(&r.spec, &spec)) {
                    return now(Err(why));
                }
                let name = spec.name.clone();
                // A fresh session never inherits an ancestor left by a terminated namesake.
                let _ = std::fs::remove_dir_all(session::session_dir(&self.home, &name));
                self.launch(spec);
                if let Err(e) = self.save_specs() {
                    self.sessions.remove(&name);
                    return now(Err(e));
                }
                now(Ok(SyncAnswer::Created(name)))
            }
            SyncCommand::List => now(Ok(SyncAnswer::List(
                self.sessions
                    .values()
                    .map(|r| {
                        let mut s = r.shared.status.borrow().clone();
                        if r.spec.paused {
                            s.state = "paused".into();
                        }
                        s
                    })
                    .collect(),
            ))),
            SyncCommand::Conflicts(name) => now(self.get(&name).map(|r| {
                SyncAnswer::Conflicts(
                    r.shared
                        .conflicts
                        .borrow()
                        .iter()
                        .map(ConflictView::of)
                        .collect(),
                )
            })),
            SyncCommand::Flush(name) => {
                let rx = match self.get(&name) {
                    Ok(r) if r.spec.paused => {
                        return now(Err(format!(
                            "sync session '{name}' is paused; resume it first"
                        )))
                    }
                    Ok(r) => {
                        let (tx, rx) = oneshot::channel();
                        r.shared.flush_waiters.borrow_mut().push(tx);
                        let _ = r.control.try_send(Control::Wake);
                        rx
                    }
                    Err(e) => return now(Err(e)),
                };
                Box::pin(async move {
                    match rx.await {
                        Ok(Ok(())) => Ok(SyncAnswer::Done),
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(format!("sync session '{name}' ended before it flushed")),
                    }
                })
            }
            SyncCommand::Pause(name) => now(self
                .send(&name, Control::Pause)
                .and_then(|()| self.set_paused(&name, true))
                .map(|()| SyncAnswer::Done)),
            SyncCommand::Resume(name) => now(self
                .send(&name, Control::Resume)
                .and_then(|()| self.set_paused(&name, false))
                .map(|()| SyncAnswer::Done)),
            SyncCommand::Reset(name) => {
                now(self.send(&name, Control::Reset).map(|()| SyncAnswer::Done))
            }
            SyncCommand::Terminate(name) => {
                let r = self.send(&name, Control::Terminate);
                if r.is_ok() {
                    self.sessions.remove(&name);
                    let _ = std::fs::remove_dir_all(session::session_dir(&self.home, &name));
                }
                now(r
                    .and_then(|()| self.save_specs())
                    .map(|()| SyncAnswer::Done))
            }
        }
    }
}

/// Why two sessions may not run side by side: a local root inside the other's (or the same),
/// or the same for their workspace roots on one workspace. Two sessions writing one tree
/// would each take the other's writes for user edits.
pub fn overlap(old: &SyncSpec, new: &SyncSpec) -> Option<String> {
    let nested = |a: &std::path::Path, b: &std::path::Path| a.starts_with(b) || b.starts_with(a);
    if nested(&old.local, &new.local) {
        return Some(format!(
            "local path {} overlaps {} of sync session '{}'",
            new.local.display(),
            old.local.display(),
            old.name
        ));
    }
    let remote = |r: &str| {
        let rel = r
            .strip_prefix("~/")
            .unwrap_or(if r == "~" { "" } else { r });
        std::path::PathBuf::from(rel.trim_end_matches('/'))
    };
    if old.workspace == new.workspace && nested(&remote(&old.remote), &remote(&new.remote)) {
        return Some(format!(
            "workspace path {}:{} overlaps {} of sync session '{}'",
            new.workspace, new.remote, old.remote, old.name
        ));
    }
    None
}
