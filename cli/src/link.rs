//! One workspace's connection, as the laptop daemon holds it: the [`Link`] actor connects on
//! demand, hands the live connection to every request, notices when it dies, and reconnects
//! with capped backoff. [`open_on_link`] opens one acknowledged stream on it, retrying once on
//! a fresh connection when the old one turns out dead.
//!
//! How a connection is made is a [`Connector`]: the daemon's dials a real UDP socket (and
//! restarts a local sandbox's agent first); the simulation's dials over its simulated network.
//! Everything else here is the same code in both.

use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use cs_transport::write_frame;
use futures_util::future::LocalBoxFuture;
use tokio::sync::oneshot;

use crate::connect::{ConnectError, Connected};
use crate::wire::LinkStatus;

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
/// Attempts to open one stream: the first, and one on a fresh connection.
pub const OPEN_ATTEMPTS_MAX: u32 = 2;

/// Makes connections to one workspace.
pub trait Connector {
    /// Connects and says hello.
    fn connect(&self) -> LocalBoxFuture<'static, Result<Connected, ConnectError>>;
    /// Runs before each attempt; an error is recorded as the link's last error and the attempt
    /// goes ahead anyway (the daemon restarts a local sandbox's dead agent here).
    fn prepare(&self) -> Result<(), String> {
        Ok(())
    }
}

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
    name: String,
    addr: String,
    connector: Rc<dyn Connector>,
    state: LinkState,
    waiters: Vec<oneshot::Sender<Result<quinn::Connection, String>>>,
    failures: u32,
    last_error: Option<String>,
    streams_opened: u64,
    connects: u64,
}

/// Asks for the live connection (connecting first if there is none).
#[derive(Message)]
#[rtype(result = "()")]
pub struct GetConn(pub oneshot::Sender<Result<quinn::Connection, String>>);

/// Asks for the link's state.
#[derive(Message)]
#[rtype(result = "LinkStatus")]
pub struct GetStatus;

#[derive(Message)]
#[rtype(result = "()")]
struct Lost(usize);

/// Stops the link now (its sandbox is being deleted): it never reconnects, whoever still
/// holds its address. Streams still open keep the connection until the agent goes (its
/// shutdown ends their commands).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

impl Handler<Stop> for Link {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(format!("{} is being deleted", self.name)));
        }
        self.state = LinkState::Idle;
        ctx.stop();
    }
}

impl Link {
    /// A link to the workspace `name` at `addr` (both only for messages and status).
    pub fn new(name: String, addr: String, connector: Rc<dyn Connector>) -> Self {
        Self {
            name,
            addr,
            connector,
            state: LinkState::Idle,
            waiters: Vec::new(),
            failures: 0,
            last_error: None,
            streams_opened: 0,
            connects: 0,
        }
    }

    fn retry_delay(&self) -> Duration {
        let shift = self.failures.min(16);
        Duration::from_millis((RETRY_DELAY_MS_MIN << shift).min(RETRY_DELAY_MS_MAX))
    }

    fn start_connect(&mut self, ctx: &mut Context<Self>) {
        if let LinkState::Retrying(h) = std::mem::replace(&mut self.state, LinkState::Connecting) {
            ctx.cancel_future(h);
        }
        if let Err(e) = self.connector.prepare() {
            self.last_error = Some(e);
        }
        ctx.spawn(
            self.connector
                .connect()
                .into_actor(self)
                .map(|res, act, ctx| act.on_connect(res, ctx)),
        );
    }

    fn on_connect(&mut self, res: Result<Connected, ConnectError>, ctx: &mut Context<Self>) {
        match res {
            Ok(c) => {
                tracing::info!(workspace = %self.name, addr = %self.addr, "connected");
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
                tracing::warn!(workspace = %self.name, error = %e, "connect failed");
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
            // Canary (simulation only): hand out the connection even when it is dead, so a
            // lost connection is never replaced.
            let reconnect_skipped =
                cs_protocol::canary::active(cs_protocol::Canary::ReconnectSkipped);
            if conn.close_reason().is_none() || reconnect_skipped {
                self.streams_opened += 1;
                let _ = msg.0.send(Ok(conn.clone()));
                return;
            }
        }
        self.waiters.retain(|w| !w.is_closed());
        if self.waiters.len() >= WAITERS_MAX {
            let _ = msg.0.send(Err(format!(
                "{} requests are already waiting for {}",
                WAITERS_MAX, self.name
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
        if cs_protocol::canary::active(cs_protocol::Canary::ReconnectSkipped) {
            return;
        }
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
        let (udp_tx_bytes, udp_rx_bytes) = match &self.state {
            LinkState::Connected { conn, .. } => {
                let st = conn.stats();
                (st.udp_tx.bytes, st.udp_rx.bytes)
            }
            _ => (0, 0),
        };
        MessageResult(LinkStatus {
            workspace: self.name.clone(),
            addr: self.addr.clone(),
            state: state.into(),
            last_error: self.last_error.clone(),
            streams_opened: self.streams_opened,
            connects: self.connects,
            udp_tx_bytes,
            udp_rx_bytes,
        })
    }
}

/// An opened stream, with the agent's first frame (its acknowledgement) already read.
#[derive(Debug)]
pub struct Opened {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    /// The acknowledgement, header included, as it came off the stream.
    pub first_frame: Vec<u8>,
    /// 1, or 2 when the first connection turned out dead and a fresh one was used.
    pub attempts: u32,
    /// Tail-loss probes on the stream's connection.
    pub probe: cs_transport::TailProbe,
    /// The stream's connection.
    pub conn: quinn::Connection,
}

/// Opening a stream failed; `retry` when the connection was lost before the agent answered, so
/// the request certainly did not run on it.
struct OpenFailed {
    message: String,
    retry: bool,
}

/// Opens a stream for `open` on `link` and waits for the agent's acknowledgement. A connection
/// that turns out dead (the agent restarted and answered with a stateless reset, or it timed
/// out) is replaced by a fresh one, once. `name` and `addr` are for messages.
pub async fn open_on_link(
    link: &Addr<Link>,
    name: &str,
    addr: &str,
    open: &cs_protocol::StreamOpen,
) -> Result<Opened, String> {
    let mut last = String::new();
    for attempt in 1..=OPEN_ATTEMPTS_MAX {
        let (tx, rx) = oneshot::channel();
        link.do_send(GetConn(tx));
        let conn = match tokio::time::timeout(Duration::from_millis(CONNECT_WAIT_MS), rx).await {
            Ok(Ok(Ok(conn))) => conn,
            Ok(Ok(Err(e))) => return Err(e),
            Ok(Err(_)) => return Err(format!("the link to {name} stopped")),
            Err(_) => {
                let status = link.send(GetStatus).await.ok();
                let why = status
                    .and_then(|s| s.last_error)
                    .unwrap_or_else(|| "no answer".into());
                return Err(format!(
                    "cannot reach workspace {name} at {addr}: {why}; the daemon keeps retrying in the background"
                ));
            }
        };
        match try_open(&conn, open).await {
            Ok((send, recv, first_frame)) => {
                return Ok(Opened {
                    send,
                    recv,
                    first_frame,
                    attempts: attempt,
                    probe: cs_transport::TailProbe::new(conn.clone()),
                    conn,
                })
            }
            Err(OpenFailed {
                message,
                retry: true,
            }) => {
                tracing::info!(workspace = %name, error = %message, "connection was dead; retrying on a new one");
                last = message;
            }
            Err(OpenFailed { message, .. }) => {
                return Err(format!("cannot open a stream to {name}: {message}"))
            }
        }
    }
    Err(format!("cannot open a stream to {name}: {last}"))
}

async fn try_open(
    conn: &quinn::Connection,
    open: &cs_protocol::StreamOpen,
) -> Result<(quinn::SendStream, quinn::RecvStream, Vec<u8>), OpenFailed> {
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
        Ok(first_frame) => Ok((send, recv, first_frame)),
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => Err(lost(&e)),
        Err(e) => Err(OpenFailed {
            message: e.to_string(),
            retry: false,
        }),
    }
}
