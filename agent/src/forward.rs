//! The forward actor's workspace side: carries forwarded connections (`StreamOpen::Forward`),
//! reports the workspace's listening TCP ports (`ForwardWatch`), and listens for reverse
//! forwards (`ReverseListen`, `ReverseAccept`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cs_forward::procnet;
use cs_forward::{Counters, End, Sock, Turns};
use cs_protocol::forward::{
    Endpoint, ForwardOpen, ForwardReply, Listening, ReverseAccept, ReverseMsg, ReverseOpen,
    WatchMsg, REVERSE_CLAIM_MS,
};
use cs_transport::write_frame;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// How long connecting to a forward's target in the workspace may take.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// How often a watch looks at the listening ports.
pub const WATCH_POLL_MS: u64 = 500;
/// Accepted reverse connections waiting to be claimed, across all reverse listeners.
pub const REVERSE_PENDING_MAX: usize = 256;
/// Forward streams (connections) served at once.
pub const FORWARD_STREAMS_MAX: usize = 1024;

/// How the agent reaches a forward's target: the OS's sockets ([`os_dialer`]), or the
/// simulation's in-memory servers.
pub type Dialer = Arc<
    dyn Fn(Endpoint) -> futures_util::future::BoxFuture<'static, Result<Sock, String>>
        + Send
        + Sync,
>;

/// Connects with real TCP and Unix sockets.
pub fn os_dialer() -> Dialer {
    Arc::new(|target| Box::pin(async move { connect(&target).await }))
}

/// Connects to `target` in the workspace.
pub async fn connect(target: &Endpoint) -> Result<Sock, String> {
    let attempt = async {
        match target {
            Endpoint::Tcp { host, port } => TcpStream::connect((host.as_str(), *port))
                .await
                .map(Sock::Tcp),
            Endpoint::Unix { path } => UnixStream::connect(path).await.map(Sock::Unix),
        }
    };
    match tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), attempt).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(format!(
            "nothing listens on {target} in the workspace (connection refused)"
        )),
        Ok(Err(e)) => Err(format!("cannot connect to {target} in the workspace: {e}")),
        Err(_) => Err(format!(
            "connecting to {target} in the workspace timed out after {} s",
            CONNECT_TIMEOUT_MS / 1000
        )),
    }
}

/// Serves one forward stream: connect, answer, pump.
pub async fn serve_forward(
    open: ForwardOpen,
    dial: Dialer,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    turns: Arc<Turns>,
) {
    match dial(open.target.clone()).await {
        Ok(sock) => {
            if write_frame(&mut send, &ForwardReply::Connected)
                .await
                .is_err()
            {
                return;
            }
            let end = sock
                .pump(&mut send, &mut recv, &Counters::default(), &turns)
                .await;
            if let End::LocalReset(e) | End::Lost(e) = &end {
                tracing::debug!(target = %open.target, error = %e, "forwarded connection ended abnormally");
            }
        }
        Err(reason) => {
            tracing::info!(target = %open.target, %reason, "forward refused");
            let _ = write_frame(&mut send, &ForwardReply::Refused { reason }).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        }
    }
}

/// Answers a forward stream that would pass [`FORWARD_STREAMS_MAX`].
pub async fn refuse_busy(mut send: quinn::SendStream) {
    let reason = format!(
        "the workspace carries {FORWARD_STREAMS_MAX} forwarded connections, the most it allows"
    );
    let _ = write_frame(&mut send, &ForwardReply::Refused { reason }).await;
    let _ = send.finish();
}

// ---- listening ports ---------------------------------------------------------------------

/// The daemons' process groups (their leaders' pids) by name, from the supervisor.
async fn daemon_groups(
    supervisor: &Option<actix::Addr<crate::supervise::Supervisor>>,
) -> BTreeMap<u32, String> {
    use cs_protocol::supervise::{ProcKind, SuperviseReply, SuperviseRequest};
    let Some(s) = supervisor else {
        return BTreeMap::new();
    };
    match s.send(crate::supervise::Ask(SuperviseRequest::Ps)).await {
        Ok(SuperviseReply::Ps(procs)) => procs
            .into_iter()
            .filter(|p| p.kind != ProcKind::Job)
            .filter_map(|p| Some((p.pid?, p.name)))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// Follows the workspace's listening ports until the laptop goes away.
pub async fn serve_watch(
    supervisor: Option<actix::Addr<crate::supervise::Supervisor>>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let me = std::process::id();
    let mut last_inodes = std::collections::BTreeSet::new();
    let mut owners = procnet::Owners::new();
    let mut last: Option<Vec<Listening>> = None;
    let watch = async {
        loop {
            let sockets = match tokio::task::spawn_blocking(procnet::read_sockets).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = write_frame(&mut send, &WatchMsg::Error(e.to_string())).await;
                    return;
                }
            };
            let inodes: std::collections::BTreeSet<u64> = sockets.iter().map(|s| s.inode).collect();
            let mut groups = BTreeMap::new();
            if inodes != last_inodes {
                // Only a change of sockets costs a walk of /proc/*/fd.
                let want = inodes.clone();
                owners = tokio::task::spawn_blocking(move || procnet::find_owners(&want))
                    .await
                    .unwrap_or_default();
                groups = daemon_groups(&supervisor).await;
                last_inodes = inodes;
            } else if last.is_some() {
                tokio::time::sleep(Duration::from_millis(WATCH_POLL_MS)).await;
                continue;
            }
            let mut now: Vec<Listening> = sockets
                .iter()
                .filter(|s| owners.get(&s.inode).map(|o| o.0) != Some(me))
                .map(|s| {
                    let o = owners.get(&s.inode);
                    Listening {
                        port: s.port,
                        addr: s.addr.to_string(),
                        pid: o.map(|o| o.0),
                        command: o.map(|o| o.1.clone()),
                        daemon: o.and_then(|o| groups.get(&o.2).cloned()),
                    }
                })
                .collect();
            now.sort();
            now.dedup();
            if last.as_ref() != Some(&now) {
                if write_frame(&mut send, &WatchMsg::Listening(now.clone()))
                    .await
                    .is_err()
                {
                    return;
                }
                last = Some(now);
            }
            tokio::time::sleep(Duration::from_millis(WATCH_POLL_MS)).await;
        }
    };
    let mut buf = [0u8; 64];
    tokio::select! {
        _ = watch => {}
        _ = async { while let Ok(Some(_)) = recv.read(&mut buf).await {} } => {}
    }
    let _ = send.finish();
}

// ---- reverse forwards --------------------------------------------------------------------

/// Accepted reverse connections waiting for the laptop to claim them.
#[derive(Default)]
pub struct Pending {
    next_id: u64,
    socks: BTreeMap<u64, Sock>,
}

pub type PendingMap = Arc<Mutex<Pending>>;

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn bind(at: &Endpoint) -> Result<(Listener, Endpoint), String> {
    match at {
        Endpoint::Tcp { host, port } => {
            let l = TcpListener::bind((host.as_str(), *port)).await.map_err(|e| {
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    format!("port {port} is already in use in the workspace ({at})")
                } else if e.kind() == std::io::ErrorKind::PermissionDenied {
                    format!("no permission to listen on {at} in the workspace (a port below 1024 needs root)")
                } else {
                    format!("cannot listen on {at} in the workspace: {e}")
                }
            })?;
            let bound = l.local_addr().map_err(|e| e.to_string())?;
            Ok((
                Listener::Tcp(l),
                Endpoint::Tcp {
                    host: bound.ip().to_string(),
                    port: bound.port(),
                },
            ))
        }
        Endpoint::Unix { path } => {
            let l = UnixListener::bind(path)
                .map_err(|e| format!("cannot listen on {path} in the workspace: {e}"))?;
            Ok((Listener::Unix(l, path.into()), at.clone()))
        }
    }
}

/// Listens for one reverse forward until the laptop's stream ends.
pub async fn serve_reverse(
    open: ReverseOpen,
    pending: PendingMap,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let (listener, bound) = match bind(&open.bind).await {
        Ok(l) => l,
        Err(reason) => {
            let _ = write_frame(&mut send, &ReverseMsg::Refused { reason }).await;
            let _ = send.finish();
            return;
        }
    };
    if write_frame(&mut send, &ReverseMsg::Listening { bound })
        .await
        .is_err()
    {
        return;
    }
    let accept = async {
        loop {
            let (sock, peer) = match &listener {
                Listener::Tcp(l) => match l.accept().await {
                    Ok((s, a)) => (Sock::Tcp(s), a.to_string()),
                    Err(_) => continue,
                },
                Listener::Unix(l, _) => match l.accept().await {
                    Ok((s, _)) => (Sock::Unix(s), "unix".to_string()),
                    Err(_) => continue,
                },
            };
            let id = {
                let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                if p.socks.len() >= REVERSE_PENDING_MAX {
                    drop(p);
                    tracing::warn!(%peer, "reverse connection reset: {REVERSE_PENDING_MAX} already wait to be claimed");
                    sock.reset();
                    continue;
                }
                p.next_id += 1;
                let id = p.next_id;
                p.socks.insert(id, sock);
                id
            };
            // Unclaimed in time: reset it.
            let expire = pending.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(REVERSE_CLAIM_MS)).await;
                let left = expire
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .socks
                    .remove(&id);
                if let Some(s) = left {
                    tracing::info!(id, "reverse connection reset: the laptop did not claim it");
                    s.reset();
                }
            });
            if write_frame(&mut send, &ReverseMsg::Accepted { id, peer })
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let mut buf = [0u8; 64];
    tokio::select! {
        _ = accept => {}
        _ = async { while let Ok(Some(_)) = recv.read(&mut buf).await {} } => {}
    }
    drop(listener);
    let _ = send.finish();
}

/// Serves the laptop's claim of an accepted reverse connection.
pub async fn serve_reverse_accept(
    claim: ReverseAccept,
    pending: PendingMap,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    turns: Arc<Turns>,
) {
    let sock = pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .socks
        .remove(&claim.id);
    let Some(sock) = sock else {
        let reason = format!(
            "reverse connection {} is gone (not claimed within {} s)",
            claim.id,
            REVERSE_CLAIM_MS / 1000
        );
        let _ = write_frame(&mut send, &ForwardReply::Refused { reason }).await;
        let _ = send.finish();
        return;
    };
    if let Some(why) = claim.refused {
        tracing::info!(id = claim.id, %why, "reverse connection reset: the laptop's end refused");
        sock.reset();
        let _ = write_frame(&mut send, &ForwardReply::Refused { reason: why }).await;
        let _ = send.finish();
        return;
    }
    if write_frame(&mut send, &ForwardReply::Connected)
        .await
        .is_err()
    {
        sock.reset();
        return;
    }
    sock.pump(&mut send, &mut recv, &Counters::default(), &turns)
        .await;
}
