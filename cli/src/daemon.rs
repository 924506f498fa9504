//! The laptop daemon: holds ONE QUIC connection per workspace and multiplexes every stream
//! over it. `cs` commands reach it over a Unix socket; it opens a stream on the right link and
//! splices the socket to it.
//!
//! Actors: one [`Hub`] that maps workspaces to links, and one [`Link`] per workspace (in
//! `link`) that owns the connection. The daemon's [`DaemonConnector`] dials a real UDP socket
//! and restarts a local sandbox's agent when it is gone.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use actix::prelude::*;
use anyhow::Context as _;
use cs_transport::{read_frame, write_frame, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::connect::{connect, ConnectError, Connected};
use crate::home::{CsHome, Workspace, WsRef};
use crate::link::{open_on_link, Connector, GetStatus, Link, Opened};
use crate::wire::{build_id, DaemonStatus, Reply, Request};

/// Unix-socket clients served at once.
pub const CLIENTS_MAX: usize = 1024;
/// Bytes moved per read when splicing a stream.
const SPLICE_BUFFER_BYTES: usize = 256 * 1024;

/// Connects to a recorded workspace over a real UDP socket.
struct DaemonConnector {
    key: WsRef,
    target: Workspace,
    identity: Identity,
}

impl Connector for DaemonConnector {
    fn connect(
        &self,
    ) -> futures_util::future::LocalBoxFuture<'static, Result<Connected, ConnectError>> {
        let identity = self.identity.clone();
        let (addr, fp) = (self.target.addr, self.target.fingerprint);
        Box::pin(async move { connect(&identity, addr, fp, None).await })
    }

    fn prepare(&self) -> Result<(), String> {
        match &self.target.local {
            Some(local) => crate::sandbox::ensure_local_agent(&self.key, &self.target.addr, local)
                .map_err(|e| format!("{e:#}")),
            None => Ok(()),
        }
    }
}

// ---- Hub -------------------------------------------------------------------------------------

/// Maps workspaces to their links.
pub struct Hub {
    identity: Identity,
    links: BTreeMap<WsRef, (Workspace, Addr<Link>)>,
}

impl Actor for Hub {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "Result<Addr<Link>, String>")]
struct Route(WsRef, Workspace);

#[derive(Message)]
#[rtype(result = "Vec<Addr<Link>>")]
struct AllLinks;

#[derive(Message)]
#[rtype(result = "()")]
struct Forget(String);

impl Handler<Route> for Hub {
    type Result = Result<Addr<Link>, String>;
    fn handle(&mut self, Route(key, target): Route, _: &mut Context<Self>) -> Self::Result {
        if let Some((known, addr)) = self.links.get(&key) {
            if *known == target && addr.connected() {
                return Ok(addr.clone());
            }
        }
        // New workspace, or re-created with another address or key: a fresh link.
        let connector = DaemonConnector {
            key: key.clone(),
            target: target.clone(),
            identity: self.identity.clone(),
        };
        let link = Link::new(
            key.to_string(),
            target.addr.to_string(),
            std::rc::Rc::new(connector),
        )
        .start();
        self.links.insert(key, (target, link.clone()));
        Ok(link)
    }
}

impl Handler<AllLinks> for Hub {
    type Result = MessageResult<AllLinks>;
    fn handle(&mut self, _: AllLinks, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.links.values().map(|(_, a)| a.clone()).collect())
    }
}

impl Handler<Forget> for Hub {
    type Result = ();
    fn handle(&mut self, Forget(sandbox): Forget, _: &mut Context<Self>) {
        // Stopped outright: a session's task that still holds a link's address (it is being
        // aborted) must not make it reconnect, which would restart a local agent mid-delete.
        self.links.retain(|k, (_, link)| {
            let keep = k.sandbox != sandbox;
            if !keep {
                link.do_send(crate::link::Stop);
            }
            keep
        });
    }
}

// ---- Unix socket server ----------------------------------------------------------------------

/// Runs the daemon in the foreground until `cs daemon stop`.
/// How long a starting daemon waits for the lock of one that is exiting.
const LOCK_WAIT_MS: u64 = 2_000;

pub fn run(home: CsHome) -> anyhow::Result<()> {
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(home.daemon_lock())
        .with_context(|| format!("cannot open {}", home.daemon_lock().display()))?;
    // Another daemon may hold the lock: one that serves (then this one has nothing to do),
    // or one that was just told to stop and is exiting (then this one takes over).
    let mut lock_file = lock_file;
    let mut waited_ms = 0;
    let _lock = loop {
        match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => break l,
            Err((f, _)) if waited_ms < LOCK_WAIT_MS => {
                lock_file = f;
                std::thread::sleep(Duration::from_millis(20));
                waited_ms += 20;
            }
            Err(_) => return Ok(()),
        }
    };
    let identity = home.identity()?;
    // One thread: the actors, quinn and the pumps share it. On this workload a multi-thread
    // runtime spent more CPU handing buffers between threads than it gained (see ARCHITECTURE.md).
    let system = actix_rt::System::new();
    system.block_on(async move {
        let sock = home.socket();
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).with_context(|| format!("cannot listen on {}", sock.display()))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
        let hub = Hub { identity, links: BTreeMap::new() }.start();
        let sync = crate::sync::hub::SyncHub::new(home.clone(), hub.clone()).start();
        let forward = crate::forward::hub::ForwardHub::new(home.clone(), hub.clone()).start();
        let build = build_id();
        tracing::info!(pid = std::process::id(), %build, socket = %sock.display(), "daemon serving");
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(CLIENTS_MAX));
        let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel::<()>(1);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop_rx.recv() => break,
                a = listener.accept() => a,
            };
            let (stream, _) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().acquire_owned().await else { break };
            let (hub, sync, forward, home, build, stop_tx) = (hub.clone(), sync.clone(), forward.clone(), home.clone(), build.clone(), stop_tx.clone());
            tokio::spawn(async move {
                let hubs = Hubs { hub, sync, forward };
                if let Err(e) = serve_client(stream, hubs, home, build, stop_tx).await {
                    tracing::debug!(error = %e, "client ended");
                }
                drop(permit);
            });
        }
        let _ = std::fs::remove_file(&sock);
        tracing::info!("daemon stopped");
        // Exit now, releasing the lock for a successor: dropping the runtime would wait for
        // blocking work in flight (a scan hashing a large tree) for seconds. Nothing is lost:
        // sessions save their ancestor at the end of every cycle, and a cycle cut short is
        // redone by the next daemon (paths that already agree move nothing).
        std::process::exit(0)
    })
}

/// The daemon's actors a client's request goes to.
struct Hubs {
    hub: Addr<Hub>,
    sync: Addr<crate::sync::hub::SyncHub>,
    forward: Addr<crate::forward::hub::ForwardHub>,
}

async fn serve_client(
    mut stream: UnixStream,
    hubs: Hubs,
    home: CsHome,
    build: String,
    stop: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let Hubs { hub, sync, forward } = hubs;
    let Some(req) = read_frame::<_, Request>(&mut stream).await? else {
        return Ok(());
    };
    match req {
        Request::Stop => {
            write_frame(&mut stream, &Reply::Done).await?;
            let _ = stop.send(()).await;
        }
        Request::Status { build: client } if client != build => {
            write_frame(
                &mut stream,
                &Reply::WrongBuild {
                    daemon_build: build,
                },
            )
            .await?;
        }
        Request::Status { .. } => {
            let links = hub.send(AllLinks).await?;
            let mut out = Vec::new();
            for l in links {
                if let Ok(s) = l.send(GetStatus).await {
                    out.push(s);
                }
            }
            let status = DaemonStatus {
                pid: std::process::id(),
                build,
                links: out,
            };
            write_frame(&mut stream, &Reply::Status(status)).await?;
        }
        Request::Sync { build: client, .. } if client != build => {
            write_frame(
                &mut stream,
                &Reply::WrongBuild {
                    daemon_build: build,
                },
            )
            .await?;
        }
        Request::Sync { cmd, .. } => {
            let reply = match sync.send(crate::sync::hub::Command(cmd)).await {
                Ok(Ok(a)) => Reply::Sync(a),
                Ok(Err(message)) => Reply::Error { message },
                Err(e) => Reply::Error {
                    message: format!("the sync sessions stopped: {e}"),
                },
            };
            write_frame(&mut stream, &reply).await?;
        }
        Request::Forward { build: client, .. } if client != build => {
            write_frame(
                &mut stream,
                &Reply::WrongBuild {
                    daemon_build: build,
                },
            )
            .await?;
        }
        Request::Forward { cmd, .. } => serve_forward(stream, &forward, cmd).await?,
        Request::Forget { sandbox } => {
            // Sessions first: each holds its own link, which would reconnect.
            sync.send(crate::sync::hub::ForgetSandbox(sandbox.clone()))
                .await?;
            forward
                .send(crate::forward::hub::ForgetSandbox(sandbox.clone()))
                .await?;
            hub.send(Forget(sandbox)).await?;
            write_frame(&mut stream, &Reply::Done).await?;
        }
        Request::Open { build: client, .. } if client != build => {
            write_frame(
                &mut stream,
                &Reply::WrongBuild {
                    daemon_build: build,
                },
            )
            .await?;
        }
        Request::Open {
            workspace, open, ..
        } => match open_stream(&hub, &home, &workspace, &open).await {
            Ok(o) => {
                write_frame(&mut stream, &Reply::Opened).await?;
                stream.write_all(&o.first_frame).await?;
                splice(stream, o.send, o.recv).await;
            }
            Err(message) => write_frame(&mut stream, &Reply::Error { message }).await?,
        },
    }
    Ok(())
}

async fn serve_forward(
    mut stream: UnixStream,
    forward: &Addr<crate::forward::hub::ForwardHub>,
    cmd: crate::wire::ForwardCommand,
) -> anyhow::Result<()> {
    use crate::forward::hub;
    use crate::wire::{ForwardAnswer as A, ForwardCommand as C};
    let err = |message: String| Reply::Error { message };
    match cmd {
        C::List => {
            let list = forward.send(hub::List).await?;
            write_frame(&mut stream, &Reply::Forward(A::List(list))).await?;
        }
        C::Stop(name) => {
            let reply = match forward.send(hub::Stop(name)).await? {
                Ok(()) => Reply::Forward(A::Done),
                Err(e) => err(e),
            };
            write_frame(&mut stream, &reply).await?;
        }
        C::Start(spec) => {
            let detached = spec.detached;
            let (name, notes, mut rx) = match forward.send(hub::Create(spec)).await? {
                Ok(s) => s,
                Err(e) => return Ok(write_frame(&mut stream, &err(e)).await?),
            };
            write_frame(&mut stream, &Reply::Forward(A::Started(name.clone()))).await?;
            if detached {
                return Ok(());
            }
            // Attached: the notes go to the client until it goes, which ends the session.
            let (mut r, mut w) = stream.into_split();
            let relay = async {
                for n in notes {
                    write_frame(&mut w, &Reply::Forward(A::Note(n))).await?;
                }
                loop {
                    let a = match rx.recv().await {
                        Ok(n) => A::Note(n),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => A::Skipped(k),
                        Err(_) => break,
                    };
                    write_frame(&mut w, &Reply::Forward(a)).await?;
                }
                anyhow::Ok(())
            };
            let mut buf = [0u8; 64];
            tokio::select! {
                _ = relay => {}
                _ = async { while let Ok(n) = r.read(&mut buf).await { if n == 0 { break } } } => {}
            }
            let _ = forward.send(hub::Stop(name)).await;
        }
    }
    Ok(())
}

async fn open_stream(
    hub: &Addr<Hub>,
    home: &CsHome,
    workspace: &str,
    open: &cs_protocol::StreamOpen,
) -> Result<Opened, String> {
    let (link, name, addr) = link_for(hub, home, workspace).await?;
    open_on_link(&link, &name, &addr, open).await
}

/// The link of `workspace` (`SANDBOX/WORKSPACE`), with its name and address for messages.
pub async fn link_for(
    hub: &Addr<Hub>,
    home: &CsHome,
    workspace: &str,
) -> Result<(Addr<Link>, String, String), String> {
    let reg = home.registry().map_err(|e| format!("{e:#}"))?;
    let (key, target) = reg.resolve(Some(workspace)).map_err(|e| format!("{e:#}"))?;
    let addr = target.addr.to_string();
    let link = hub
        .send(Route(key.clone(), target))
        .await
        .map_err(|e| e.to_string())??;
    Ok((link, key.to_string(), addr))
}

/// Copies bytes both ways until both directions are done.
async fn splice(stream: UnixStream, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let (mut ur, mut uw) = stream.into_split();
    let up = async {
        let mut buf = vec![0u8; SPLICE_BUFFER_BYTES];
        loop {
            match ur.read(&mut buf).await {
                Ok(0) => {
                    let _ = send.finish();
                    break;
                }
                Ok(n) => {
                    if send.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                Err(_) => {
                    let _ = send.reset(0u32.into());
                    break;
                }
            }
        }
    };
    let down = async {
        // As much as has arrived per write (a chunk at a time was one packet's worth, about
        // 1.4 KB, per system call: 900,000 writes for a 1.3 GB `cs rsync` pull).
        let mut buf = vec![0u8; SPLICE_BUFFER_BYTES];
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(n)) => {
                    if uw.write_all(&buf[..n]).await.is_err() {
                        let _ = recv.stop(0u32.into());
                        break;
                    }
                }
                Ok(None) => {
                    let _ = uw.shutdown().await;
                    break;
                }
                Err(_) => break,
            }
        }
    };
    // When the agent side ends, the session is over even if the laptop side still has input.
    tokio::select! {
        biased;
        _ = down => {},
        _ = async { up.await; std::future::pending::<()>().await } => {},
    }
}
