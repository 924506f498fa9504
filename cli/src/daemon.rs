//! The laptop daemon: holds ONE QUIC connection per workspace and multiplexes every stream
//! over it. `cs` commands reach it over a Unix socket; it opens a stream on the right link and
//! splices the socket to it.
//!
//! Actors: one [`Hub`] that maps workspaces to links, and one [`Link`] per workspace that
//! owns the connection: connects on demand, reconnects with capped backoff, and restarts a
//! local sandbox's agent when it is gone.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use actix::prelude::*;
use anyhow::Context as _;
use cs_transport::{read_frame, write_frame, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

use crate::connect::{connect, ConnectError};
use crate::home::{CsHome, Workspace, WsRef};
use crate::wire::{build_id, DaemonStatus, LinkStatus, Reply, Request};

/// Longest a request waits for its workspace's connection before it fails (the link keeps
/// retrying in the background).
pub const CONNECT_WAIT_MS: u64 = 8_000;
/// Reconnect delays double from the first to the cap.
pub const RETRY_DELAY_MS_MIN: u64 = 100;
pub const RETRY_DELAY_MS_MAX: u64 = 5_000;
/// Failed attempts in a row with nobody waiting, after which a link rests until next asked.
pub const RETRIES_IDLE_MAX: u32 = 60;
/// Requests waiting on one link at once.
pub const WAITERS_MAX: usize = 1024;
/// Unix-socket clients served at once.
pub const CLIENTS_MAX: usize = 1024;
/// Bytes moved per read when splicing a stream.
const SPLICE_BUFFER_BYTES: usize = 256 * 1024;

// ---- Link ------------------------------------------------------------------------------------

enum LinkState {
    Idle,
    Connecting,
    Connected {
        conn: quinn::Connection,
        _endpoint: quinn::Endpoint,
    },
    Retrying(SpawnHandle),
}

/// One workspace's connection.
pub struct Link {
    key: WsRef,
    target: Workspace,
    identity: Identity,
    state: LinkState,
    waiters: Vec<oneshot::Sender<Result<quinn::Connection, String>>>,
    failures: u32,
    last_error: Option<String>,
    streams_opened: u64,
    connects: u64,
}

#[derive(Message)]
#[rtype(result = "()")]
struct GetConn(oneshot::Sender<Result<quinn::Connection, String>>);

#[derive(Message)]
#[rtype(result = "LinkStatus")]
struct GetStatus;

#[derive(Message)]
#[rtype(result = "()")]
struct Lost(usize);

impl Link {
    fn retry_delay(&self) -> Duration {
        let shift = self.failures.min(16);
        Duration::from_millis((RETRY_DELAY_MS_MIN << shift).min(RETRY_DELAY_MS_MAX))
    }

    fn start_connect(&mut self, ctx: &mut Context<Self>) {
        if let LinkState::Retrying(h) = std::mem::replace(&mut self.state, LinkState::Connecting) {
            ctx.cancel_future(h);
        }
        if let Some(local) = &self.target.local {
            if let Err(e) = crate::sandbox::ensure_local_agent(&self.key, &self.target.addr, local)
            {
                self.last_error = Some(format!("{e:#}"));
            }
        }
        let identity = self.identity.clone();
        let (addr, fp) = (self.target.addr, self.target.fingerprint);
        let fut = async move { connect(&identity, addr, fp, None).await };
        ctx.spawn(
            fut.into_actor(self)
                .map(|res, act, ctx| act.on_connect(res, ctx)),
        );
    }

    fn on_connect(
        &mut self,
        res: Result<crate::connect::Connected, ConnectError>,
        ctx: &mut Context<Self>,
    ) {
        match res {
            Ok(c) => {
                tracing::info!(workspace = %self.key, addr = %self.target.addr, "connected");
                self.failures = 0;
                self.last_error = None;
                self.connects += 1;
                for w in self.waiters.drain(..) {
                    let _ = w.send(Ok(c.conn.clone()));
                }
                let watch = c.conn.clone();
                let id = watch.stable_id();
                ctx.spawn(
                    async move {
                        let why = watch.closed().await;
                        tracing::info!(reason = %why, "connection lost");
                    }
                    .into_actor(self)
                    .map(move |(), _, ctx| ctx.notify(Lost(id))),
                );
                self.state = LinkState::Connected {
                    conn: c.conn,
                    _endpoint: c.endpoint,
                };
            }
            Err(e) => {
                tracing::warn!(workspace = %self.key, error = %e, "connect failed");
                self.last_error = Some(e.to_string());
                self.failures += 1;
                if matches!(
                    e,
                    ConnectError::Untrusted { .. }
                        | ConnectError::WrongKey { .. }
                        | ConnectError::Refused { .. }
                ) {
                    // Retrying cannot fix these: tell the waiters now.
                    for w in self.waiters.drain(..) {
                        let _ = w.send(Err(e.to_string()));
                    }
                }
                self.schedule_retry(ctx);
            }
        }
    }

    fn schedule_retry(&mut self, ctx: &mut Context<Self>) {
        self.waiters.retain(|w| !w.is_closed());
        if self.waiters.is_empty() && self.failures >= RETRIES_IDLE_MAX {
            self.state = LinkState::Idle;
            return;
        }
        let delay = self.retry_delay();
        let h = ctx.run_later(delay, |act, ctx| act.start_connect(ctx));
        self.state = LinkState::Retrying(h);
    }
}

impl Actor for Link {
    type Context = Context<Self>;
}

impl Handler<GetConn> for Link {
    type Result = ();
    fn handle(&mut self, msg: GetConn, ctx: &mut Context<Self>) {
        if let LinkState::Connected { conn, .. } = &self.state {
            if conn.close_reason().is_none() {
                self.streams_opened += 1;
                let _ = msg.0.send(Ok(conn.clone()));
                return;
            }
        }
        self.waiters.retain(|w| !w.is_closed());
        if self.waiters.len() >= WAITERS_MAX {
            let _ = msg.0.send(Err(format!(
                "{} requests are already waiting for {}",
                WAITERS_MAX, self.key
            )));
            return;
        }
        self.waiters.push(msg.0);
        self.streams_opened += 1;
        // Someone is waiting: try now rather than at the end of a backoff delay.
        if matches!(
            self.state,
            LinkState::Idle | LinkState::Retrying(_) | LinkState::Connected { .. }
        ) {
            self.start_connect(ctx);
        }
    }
}

impl Handler<Lost> for Link {
    type Result = ();
    fn handle(&mut self, msg: Lost, ctx: &mut Context<Self>) {
        if let LinkState::Connected { conn, .. } = &self.state {
            if conn.stable_id() == msg.0 {
                self.last_error = conn.close_reason().map(|r| r.to_string());
                self.failures = 0;
                self.schedule_retry(ctx);
            }
        }
    }
}

impl Handler<GetStatus> for Link {
    type Result = MessageResult<GetStatus>;
    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        let state = match self.state {
            LinkState::Idle => "idle",
            LinkState::Connecting => "connecting",
            LinkState::Connected { .. } => "connected",
            LinkState::Retrying(_) => "retrying",
        };
        MessageResult(LinkStatus {
            workspace: self.key.to_string(),
            addr: self.target.addr.to_string(),
            state: state.into(),
            last_error: self.last_error.clone(),
            streams_opened: self.streams_opened,
            connects: self.connects,
        })
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
        let link = Link {
            key: key.clone(),
            target: target.clone(),
            identity: self.identity.clone(),
            state: LinkState::Idle,
            waiters: Vec::new(),
            failures: 0,
            last_error: None,
            streams_opened: 0,
            connects: 0,
        }
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
        // Dropping the last Addr stops the link actor, which drops its connection.
        self.links.retain(|k, _| k.sandbox != sandbox);
    }
}

// ---- Unix socket server ----------------------------------------------------------------------

/// Runs the daemon in the foreground until `cs daemon stop`.
pub fn run(home: CsHome) -> anyhow::Result<()> {
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(home.daemon_lock())
        .with_context(|| format!("cannot open {}", home.daemon_lock().display()))?;
    let _lock =
        match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            // Another daemon holds the lock: it serves; this one has nothing to do.
            Err(_) => return Ok(()),
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
            let (hub, home, build, stop_tx) = (hub.clone(), home.clone(), build.clone(), stop_tx.clone());
            tokio::spawn(async move {
                if let Err(e) = serve_client(stream, hub, home, build, stop_tx).await {
                    tracing::debug!(error = %e, "client ended");
                }
                drop(permit);
            });
        }
        let _ = std::fs::remove_file(&sock);
        tracing::info!("daemon stopped");
        Ok(())
    })
}

async fn serve_client(
    mut stream: UnixStream,
    hub: Addr<Hub>,
    home: CsHome,
    build: String,
    stop: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<()> {
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
        Request::Forget { sandbox } => {
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

/// An opened stream, with the agent's first frame (its acknowledgement) already read.
struct Opened {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    first_frame: Vec<u8>,
}

/// Opening a stream failed; `retry` when the connection was lost before the agent answered, so
/// the request certainly did not run on it.
struct OpenFailed {
    message: String,
    retry: bool,
}

async fn open_stream(
    hub: &Addr<Hub>,
    home: &CsHome,
    workspace: &str,
    open: &cs_protocol::StreamOpen,
) -> Result<Opened, String> {
    let reg = home.registry().map_err(|e| format!("{e:#}"))?;
    let (key, target) = reg.resolve(Some(workspace)).map_err(|e| format!("{e:#}"))?;
    let addr = target.addr;
    let link = hub
        .send(Route(key.clone(), target))
        .await
        .map_err(|e| e.to_string())??;
    // One retry: a connection that turns out dead (the agent restarted and answered with a
    // stateless reset) is replaced by a fresh one.
    let mut last = String::new();
    for _attempt in 0..2 {
        let (tx, rx) = oneshot::channel();
        link.do_send(GetConn(tx));
        let conn = match tokio::time::timeout(Duration::from_millis(CONNECT_WAIT_MS), rx).await {
            Ok(Ok(Ok(conn))) => conn,
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(_)) => return Err(format!("the link to {key} stopped")),
            Err(_) => {
                let status = link.send(GetStatus).await.ok();
                let why = status
                    .and_then(|s| s.last_error)
                    .unwrap_or_else(|| "no answer".into());
                return Err(format!(
                    "cannot reach workspace {key} at {addr}: {why}; the daemon keeps retrying in the background"
                ));
            }
        };
        match try_open(&conn, open).await {
            Ok(o) => return Ok(o),
            Err(OpenFailed {
                message,
                retry: true,
            }) => {
                tracing::info!(workspace = %key, error = %message, "connection was dead; retrying on a new one");
                last = message;
            }
            Err(OpenFailed { message, .. }) => {
                return Err(format!("cannot open a stream to {key}: {message}"))
            }
        }
    }
    Err(format!("cannot open a stream to {key}: {last}"))
}

async fn try_open(
    conn: &quinn::Connection,
    open: &cs_protocol::StreamOpen,
) -> Result<Opened, OpenFailed> {
    let lost = |e: &quinn::ConnectionError| OpenFailed {
        message: e.to_string(),
        retry: matches!(
            e,
            quinn::ConnectionError::Reset | quinn::ConnectionError::TimedOut
        ),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    if let Err(e) = write_frame(&mut send, open).await {
        return Err(match conn.close_reason() {
            Some(c) => lost(&c),
            None => OpenFailed {
                message: e.to_string(),
                retry: false,
            },
        });
    }
    // The agent acknowledges every stream with a first frame before anything else happens.
    let mut header = [0u8; cs_protocol::codec::FRAME_HEADER_BYTES];
    let read = async {
        recv.read_exact(&mut header).await?;
        let len = cs_protocol::codec::frame_len(header)
            .map_err(|_| quinn::ReadExactError::FinishedEarly(0))?;
        let mut frame = vec![0u8; header.len() + len];
        frame[..header.len()].copy_from_slice(&header);
        recv.read_exact(&mut frame[header.len()..]).await?;
        Ok::<_, quinn::ReadExactError>(frame)
    };
    match read.await {
        Ok(first_frame) => Ok(Opened {
            send,
            recv,
            first_frame,
        }),
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => Err(lost(&e)),
        Err(e) => Err(OpenFailed {
            message: e.to_string(),
            retry: false,
        }),
    }
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
        loop {
            match recv.read_chunk(SPLICE_BUFFER_BYTES, true).await {
                Ok(Some(chunk)) => {
                    if uw.write_all(&chunk.bytes).await.is_err() {
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
