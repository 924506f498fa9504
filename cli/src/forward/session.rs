//! One `cs portforward` session in the laptop daemon: its local listeners (`-L` rules and
//! auto-discovered ports), its reverse listeners in the workspace (`-R`), the watch of the
//! workspace's listening ports, and every forwarded connection, each on a QUIC stream of the
//! workspace's one connection.
//!
//! Listeners outlive a reconnect: a connection accepted while the link is down waits for it
//! (up to `CONNECT_WAIT_MS`); connections open when it died are shut down and counted as lost.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Addr;
use cs_forward::{discover, procnet, Counters, End, Rule, Sock, Turns};
use cs_protocol::codec::{decode, FRAME_HEADER_BYTES};
use cs_protocol::forward::{
    Endpoint, ForwardOpen, ForwardReply, Listening, ReverseAccept, ReverseMsg, ReverseOpen,
    WatchMsg, WatchOpen,
};
use cs_protocol::StreamOpen;
use cs_transport::read_frame;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{broadcast, watch};

use super::{ForwardSpec, ForwardView, SessionView};
use crate::link::{open_on_link, Link, Opened};

/// Connections one forward carries at once; more are reset.
pub const CONNECTIONS_PER_FORWARD_MAX: u64 = 1024;
/// Auto-discovered forwards one session holds at most.
pub const AUTO_FORWARDS_MAX: usize = 256;
/// Notes kept for `cs portforward list` (older ones are dropped).
pub const NOTES_KEPT_MAX: usize = 50;
/// Notes queued for an attached `cs portforward` that does not read them.
pub const NOTES_QUEUED_MAX: usize = 256;
/// Delay before a watch or reverse stream that ended is opened again.
const REOPEN_DELAY_MS: u64 = 500;
/// How long connecting to the laptop's end of a reverse forward may take.
const LOCAL_CONNECT_TIMEOUT_MS: u64 = 5_000;

/// The workspace's link, and its name and address for messages.
#[derive(Clone)]
pub struct LinkRef {
    pub link: Addr<Link>,
    pub name: String,
    pub addr: String,
    /// The workspace runs on this machine: ports this daemon listens on are its own.
    pub local: bool,
}

impl LinkRef {
    async fn open(&self, open: StreamOpen) -> Result<Opened, String> {
        open_on_link(&self.link, &self.name, &self.addr, &open).await
    }
}

fn first<T: serde::de::DeserializeOwned>(o: &Opened) -> Result<T, String> {
    decode(&o.first_frame[FRAME_HEADER_BYTES..])
        .map_err(|e| format!("the workspace answered something unreadable: {e}"))
}

/// A forward's counters.
#[derive(Default)]
struct Stats {
    bytes: Counters,
    open: AtomicU64,
    total: AtomicU64,
    refused: AtomicU64,
    lost: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// One forward of a session.
struct Fwd {
    kind: &'static str,
    listen: String,
    target: String,
    owner: Option<Listening>,
    stats: Arc<Stats>,
    /// Its accept loop (auto forwards are removed by aborting it).
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Fwd {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// What a session's tasks share.
pub struct Shared {
    pub spec: ForwardSpec,
    fwds: Mutex<BTreeMap<String, Fwd>>,
    notes: Mutex<VecDeque<String>>,
    pub notes_tx: broadcast::Sender<String>,
    stop: watch::Sender<bool>,
}

impl Shared {
    fn note(&self, line: String) {
        tracing::info!(session = %self.spec.name, "{line}");
        let mut n = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        if n.len() == NOTES_KEPT_MAX {
            n.pop_front();
        }
        n.push_back(line.clone());
        let _ = self.notes_tx.send(line);
    }

    /// Records a failure of forward `key`, noted once until a connection succeeds again.
    fn failed(&self, key: &str, stats: &Stats, why: &str) {
        let mut last = stats.last_error.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref() != Some(why) {
            *last = Some(why.to_string());
            drop(last);
            let what = self
                .fwds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(key)
                .map(|f| format!("{} -> {}", f.listen, f.target))
                .unwrap_or_else(|| key.to_string());
            self.note(format!("{what}: {why}"));
        }
    }

    /// Records how a carried connection of forward `key` ended: a success clears the last
    /// error; a lost link is counted and noted.
    fn ended(&self, key: &str, stats: &Stats, end: End) {
        *stats.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let End::Lost(why) = end {
            stats.lost.fetch_add(1, Ordering::Relaxed);
            self.failed(
                key,
                stats,
                &format!("connection to the workspace lost ({why}); open connections were closed"),
            );
        }
    }

    fn stopped(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// The session as `cs portforward list` shows it.
    pub fn view(&self) -> SessionView {
        let fwds = self.fwds.lock().unwrap_or_else(|e| e.into_inner());
        SessionView {
            name: self.spec.name.clone(),
            workspace: self.spec.workspace.clone(),
            detached: self.spec.detached,
            auto: self.spec.auto,
            forwards: fwds
                .values()
                .map(|f| ForwardView {
                    kind: f.kind.to_string(),
                    local: f.listen.clone(),
                    remote: f.target.clone(),
                    daemon: f.owner.as_ref().and_then(|o| o.daemon.clone()),
                    process: f
                        .owner
                        .as_ref()
                        .and_then(|o| Some(format!("{} (pid {})", o.command.clone()?, o.pid?))),
                    open: f.stats.open.load(Ordering::Relaxed),
                    total: f.stats.total.load(Ordering::Relaxed),
                    bytes_out: f.stats.bytes.up.load(Ordering::Relaxed),
                    bytes_in: f.stats.bytes.down.load(Ordering::Relaxed),
                    refused: f.stats.refused.load(Ordering::Relaxed),
                    lost: f.stats.lost.load(Ordering::Relaxed),
                    last_error: f
                        .stats
                        .last_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                })
                .collect(),
            notes: self
                .notes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect(),
        }
    }
}

/// A running session: its tasks stop (and its listeners close) when it is dropped.
pub struct Session {
    pub shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.shared.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
        self.shared
            .fwds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

// ---- local listeners ---------------------------------------------------------------------

enum LocalListener {
    Tcp(TcpListener),
    Unix(UnixListener, UnixPath),
}

/// A Unix socket this daemon created, removed when its listener goes.
struct UnixPath(std::path::PathBuf);

impl Drop for UnixPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl LocalListener {
    async fn accept(&self) -> std::io::Result<Sock> {
        match self {
            LocalListener::Tcp(l) => l.accept().await.map(|(s, _)| Sock::Tcp(s)),
            LocalListener::Unix(l, _) => l.accept().await.map(|(s, _)| Sock::Unix(s)),
        }
    }

    fn bound(&self) -> String {
        match self {
            LocalListener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            LocalListener::Unix(_, p) => p.0.display().to_string(),
        }
    }
}

/// The lowest port anyone may listen on (`net.ipv4.ip_unprivileged_port_start`, 1024 unless
/// changed).
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// Binds a listening end on the laptop; errors name the address and, for a port in use, who
/// holds it.
async fn bind_local(at: &Endpoint) -> Result<LocalListener, String> {
    match at {
        Endpoint::Tcp { host, port } => match TcpListener::bind((host.as_str(), *port)).await {
            Ok(l) => Ok(LocalListener::Tcp(l)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                let port = *port;
                let who = tokio::task::spawn_blocking(move || procnet::who_listens(port))
                    .await
                    .ok()
                    .flatten();
                Err(match who {
                    Some(w) => format!("local port {port} is already in use (by {w})"),
                    None => format!("local port {port} is already in use"),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(format!(
                "no permission to listen on {at}: ports below {} need root (or CAP_NET_BIND_SERVICE)",
                unprivileged_port_start()
            )),
            Err(e) => Err(format!("cannot listen on {at}: {e}")),
        },
        Endpoint::Unix { path } => {
            let p = std::path::Path::new(path);
            if let Ok(meta) = std::fs::symlink_metadata(p) {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(format!("{path} exists and is not a socket; not replacing it"));
                }
                if UnixStream::connect(p).await.is_ok() {
                    return Err(format!("{path} is already in use (something accepts on it)"));
                }
                // A socket nobody accepts on is left over from a listener that died.
                let _ = std::fs::remove_file(p);
            }
            let l = UnixListener::bind(p).map_err(|e| format!("cannot listen on {path}: {e}"))?;
            Ok(LocalListener::Unix(l, UnixPath(p.into())))
        }
    }
}

async fn connect_local(target: &Endpoint) -> Result<Sock, String> {
    let attempt = async {
        match target {
            Endpoint::Tcp { host, port } => TcpStream::connect((host.as_str(), *port))
                .await
                .map(Sock::Tcp),
            Endpoint::Unix { path } => UnixStream::connect(path).await.map(Sock::Unix),
        }
    };
    match tokio::time::timeout(Duration::from_millis(LOCAL_CONNECT_TIMEOUT_MS), attempt).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(format!(
            "nothing listens on {target} on the laptop (connection refused)"
        )),
        Ok(Err(e)) => Err(format!("cannot connect to {target} on the laptop: {e}")),
        Err(_) => Err(format!("connecting to {target} on the laptop timed out")),
    }
}

async fn until_stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// How carrying one connection went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carried {
    /// The workspace connected; the pump ended so.
    Ended(End),
    /// The workspace could not connect (the client was reset), or could not be reached.
    Refused(String),
}

/// Carries one local connection to `target` in the workspace: opens its stream, waits for
/// the agent to connect, and pumps until both sides are done. A refusal resets `sock`.
pub async fn carry(link: &LinkRef, target: Endpoint, sock: Sock, counters: &Counters) -> Carried {
    let opened = link
        .open(StreamOpen::Forward(ForwardOpen { target }))
        .await
        .and_then(|o| Ok((first::<ForwardReply>(&o)?, o)));
    match opened {
        Ok((ForwardReply::Connected, mut o)) => {
            let turns = Turns::of(&o.conn);
            Carried::Ended(sock.pump(&mut o.send, &mut o.recv, counters, &turns).await)
        }
        Ok((ForwardReply::Refused { reason }, _)) | Err(reason) => {
            sock.reset();
            Carried::Refused(reason)
        }
    }
}

/// Carries one accepted local connection to `target` in the workspace.
async fn forward_conn(
    sock: Sock,
    target: Endpoint,
    key: String,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    link: LinkRef,
) {
    stats.total.fetch_add(1, Ordering::Relaxed);
    let work = async {
        match carry(&link, target, sock, &stats.bytes).await {
            Carried::Ended(end) => shared.ended(&key, &stats, end),
            Carried::Refused(reason) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                shared.failed(&key, &stats, &reason);
            }
        }
    };
    tokio::select! {
        biased;
        _ = until_stopped(shared.stopped()) => {}
        _ = work => {}
    }
}

/// Accepts on `listener` until the forward is removed or the session stops.
async fn accept_loop(
    listener: LocalListener,
    target: Endpoint,
    key: String,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    link: LinkRef,
) {
    loop {
        let sock = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if stats.open.load(Ordering::Relaxed) >= CONNECTIONS_PER_FORWARD_MAX {
            shared.failed(&key, &stats, &format!("{CONNECTIONS_PER_FORWARD_MAX} connections are open, the most one forward carries; resetting new ones"));
            sock.reset();
            continue;
        }
        stats.open.fetch_add(1, Ordering::Relaxed);
        let (target, key, stats2, shared, link) = (
            target.clone(),
            key.clone(),
            stats.clone(),
            shared.clone(),
            link.clone(),
        );
        actix_rt::spawn(async move {
            forward_conn(sock, target, key, stats2.clone(), shared, link).await;
            stats2.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

// ---- starting a session ------------------------------------------------------------------

/// Starts a session: binds its `-L` listeners and its `-R` listeners in the workspace, and
/// starts watching the workspace's ports unless `-PF`. Fails (leaving nothing behind) when a
/// listener cannot be bound or the workspace cannot be reached.
pub async fn start(spec: ForwardSpec, link: LinkRef) -> Result<Session, String> {
    // Bind every local listener first: a bad rule fails before anything runs.
    let mut locals = Vec::new();
    for rule in &spec.local {
        locals.push((rule.clone(), bind_local(&rule.listen).await?));
    }
    // Reverse listeners: the first open says whether the workspace can listen there.
    let mut reverses = Vec::new();
    for rule in &spec.remote {
        let o = link
            .open(StreamOpen::ReverseListen(ReverseOpen {
                bind: rule.listen.clone(),
            }))
            .await?;
        match first::<ReverseMsg>(&o)? {
            ReverseMsg::Listening { bound } => reverses.push((rule.clone(), bound, o)),
            ReverseMsg::Refused { reason } => return Err(reason),
            ReverseMsg::Accepted { .. } => return Err("the workspace answered out of turn".into()),
        }
    }
    let watch_first = if spec.auto {
        let o = link.open(StreamOpen::ForwardWatch(WatchOpen {})).await?;
        Some(o)
    } else {
        None
    };
    let (notes_tx, _) = broadcast::channel(NOTES_QUEUED_MAX);
    let (stop, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        spec: spec.clone(),
        fwds: Mutex::new(BTreeMap::new()),
        notes: Mutex::new(VecDeque::new()),
        notes_tx,
        stop,
    });
    let mut tasks = Vec::new();
    for (i, (rule, listener)) in locals.into_iter().enumerate() {
        let key = format!("L{i}");
        let stats = Arc::new(Stats::default());
        let listen = listener.bound();
        shared.note(format!(
            "forwarding {listen} -> {} in the workspace",
            rule.target
        ));
        let task = actix_rt::spawn(accept_loop(
            listener,
            rule.target.clone(),
            key.clone(),
            stats.clone(),
            shared.clone(),
            link.clone(),
        ));
        shared
            .fwds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key,
                Fwd {
                    kind: "local",
                    listen,
                    target: rule.target.to_string(),
                    owner: None,
                    stats,
                    task: Some(task),
                },
            );
    }
    for (i, (rule, bound, o)) in reverses.into_iter().enumerate() {
        let key = format!("R{i}");
        let stats = Arc::new(Stats::default());
        shared.note(format!(
            "forwarding {bound} in the workspace -> {} on the laptop",
            rule.target
        ));
        shared
            .fwds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key.clone(),
                Fwd {
                    kind: "remote",
                    listen: format!("{bound} (workspace)"),
                    target: rule.target.to_string(),
                    owner: None,
                    stats: stats.clone(),
                    task: None,
                },
            );
        tasks.push(actix_rt::spawn(reverse_loop(
            rule,
            key,
            Some(o),
            stats,
            shared.clone(),
            link.clone(),
        )));
    }
    if let Some(o) = watch_first {
        let declared: BTreeSet<u16> = spec
            .local
            .iter()
            .filter_map(|r| match &r.target {
                Endpoint::Tcp { port, .. } => Some(*port),
                Endpoint::Unix { .. } => None,
            })
            .collect();
        tasks.push(actix_rt::spawn(watch_loop(
            Some(o),
            declared,
            shared.clone(),
            link.clone(),
        )));
    }
    Ok(Session { shared, tasks })
}

// ---- reverse forwards --------------------------------------------------------------------

async fn reverse_loop(
    rule: Rule,
    key: String,
    mut first_open: Option<Opened>,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    link: LinkRef,
) {
    loop {
        let mut o = match first_open.take() {
            Some(o) => o,
            None => {
                let opened = link
                    .open(StreamOpen::ReverseListen(ReverseOpen {
                        bind: rule.listen.clone(),
                    }))
                    .await
                    .and_then(|o| Ok((first::<ReverseMsg>(&o)?, o)));
                match opened {
                    Ok((ReverseMsg::Listening { .. }, o)) => {
                        *stats.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        o
                    }
                    Ok((ReverseMsg::Refused { reason }, _)) => {
                        shared.failed(&key, &stats, &reason);
                        tokio::time::sleep(Duration::from_millis(REOPEN_DELAY_MS * 4)).await;
                        continue;
                    }
                    Ok((ReverseMsg::Accepted { .. }, _)) => continue,
                    Err(why) => {
                        shared.failed(&key, &stats, &why);
                        tokio::time::sleep(Duration::from_millis(REOPEN_DELAY_MS)).await;
                        continue;
                    }
                }
            }
        };
        while let Ok(Some(msg)) = read_frame::<_, ReverseMsg>(&mut o.recv).await {
            if let ReverseMsg::Accepted { id, .. } = msg {
                if stats.open.load(Ordering::Relaxed) >= CONNECTIONS_PER_FORWARD_MAX {
                    // Unclaimed, the workspace resets it after its claim timeout.
                    continue;
                }
                stats.open.fetch_add(1, Ordering::Relaxed);
                let (target, key, stats2, shared, link) = (
                    rule.target.clone(),
                    key.clone(),
                    stats.clone(),
                    shared.clone(),
                    link.clone(),
                );
                actix_rt::spawn(async move {
                    reverse_conn(id, target, key, stats2.clone(), shared, link).await;
                    stats2.open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
        // The stream ended (a reconnect): listen again.
        tokio::time::sleep(Duration::from_millis(REOPEN_DELAY_MS)).await;
    }
}

async fn reverse_conn(
    id: u64,
    target: Endpoint,
    key: String,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    link: LinkRef,
) {
    stats.total.fetch_add(1, Ordering::Relaxed);
    let work = async {
        let local = connect_local(&target).await;
        let claim = ReverseAccept {
            id,
            refused: local.as_ref().err().cloned(),
        };
        let opened = link
            .open(StreamOpen::ReverseAccept(claim))
            .await
            .and_then(|o| Ok((first::<ForwardReply>(&o)?, o)));
        match (local, opened) {
            (Ok(sock), Ok((ForwardReply::Connected, mut o))) => {
                let turns = Turns::of(&o.conn);
                let end = sock
                    .pump(&mut o.send, &mut o.recv, &stats.bytes, &turns)
                    .await;
                shared.ended(&key, &stats, end);
            }
            (Err(why), _) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                shared.failed(&key, &stats, &why);
            }
            (Ok(sock), Ok((ForwardReply::Refused { reason }, _))) => {
                shared.failed(&key, &stats, &reason);
                sock.reset();
            }
            (Ok(sock), Err(why)) => {
                shared.failed(&key, &stats, &why);
                sock.reset();
            }
        }
    };
    tokio::select! {
        biased;
        _ = until_stopped(shared.stopped()) => {}
        _ = work => {}
    }
}

// ---- auto-discovered forwards ------------------------------------------------------------

async fn watch_loop(
    mut first_open: Option<Opened>,
    declared: BTreeSet<u16>,
    shared: Arc<Shared>,
    link: LinkRef,
) {
    let me = std::process::id();
    let mut last_error: Option<String> = None;
    loop {
        let o = match first_open.take() {
            Some(o) => Ok(o),
            None => link.open(StreamOpen::ForwardWatch(WatchOpen {})).await,
        };
        let mut o = match o {
            Ok(o) => o,
            Err(why) => {
                if last_error.as_deref() != Some(why.as_str()) {
                    shared.note(format!("cannot watch the workspace's ports: {why}"));
                    last_error = Some(why);
                }
                tokio::time::sleep(Duration::from_millis(REOPEN_DELAY_MS)).await;
                continue;
            }
        };
        last_error = None;
        let mut msg = first::<WatchMsg>(&o);
        loop {
            match msg {
                Ok(WatchMsg::Listening(mut now)) => {
                    if link.local {
                        // A workspace on this machine sees this daemon's own listeners.
                        now.retain(|l| l.pid != Some(me));
                    }
                    apply_ports(&now, &declared, &shared, &link).await;
                }
                Ok(WatchMsg::Error(e)) => {
                    shared.note(format!("the workspace cannot report its ports: {e}"))
                }
                Err(e) => {
                    shared.note(e);
                    break;
                }
            }
            msg = match read_frame::<_, WatchMsg>(&mut o.recv).await {
                Ok(Some(m)) => Ok(m),
                _ => break,
            };
        }
        tokio::time::sleep(Duration::from_millis(REOPEN_DELAY_MS)).await;
    }
}

fn describe_owner(l: &Listening) -> String {
    match (&l.daemon, &l.command, l.pid) {
        (Some(d), _, _) => format!(" (daemon {d})"),
        (None, Some(c), Some(p)) => format!(" ({c}, pid {p})"),
        _ => String::new(),
    }
}

async fn apply_ports(
    now: &[Listening],
    declared: &BTreeSet<u16>,
    shared: &Arc<Shared>,
    link: &LinkRef,
) {
    let current: BTreeSet<u16> = shared
        .fwds
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .filter_map(|k| k.strip_prefix('A')?.parse().ok())
        .collect();
    let d = discover::diff(now, &current, declared);
    for port in d.remove {
        let gone = shared
            .fwds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&format!("A{port}"));
        if let Some(f) = gone {
            shared.note(format!(
                "workspace port {port} closed; stopped forwarding {}",
                f.listen
            ));
        }
    }
    for l in d.keep {
        if let Some(f) = shared
            .fwds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&format!("A{}", l.port))
        {
            f.owner = Some(l);
        }
    }
    for (target, l) in d.add {
        if shared.fwds.lock().unwrap_or_else(|e| e.into_inner()).len()
            >= AUTO_FORWARDS_MAX + shared.spec.local.len() + shared.spec.remote.len()
        {
            shared.note(format!("workspace port {}: not forwarded, the session forwards {AUTO_FORWARDS_MAX} ports already", l.port));
            continue;
        }
        let same = Endpoint::Tcp {
            host: cs_forward::rule::BIND_DEFAULT.into(),
            port: l.port,
        };
        let listener = match bind_local(&same).await {
            Ok(x) => x,
            Err(why) => {
                let any = Endpoint::Tcp {
                    host: cs_forward::rule::BIND_DEFAULT.into(),
                    port: 0,
                };
                match bind_local(&any).await {
                    Ok(x) => {
                        let port = match &x {
                            LocalListener::Tcp(t) => t.local_addr().map(|a| a.port()).unwrap_or(0),
                            LocalListener::Unix(..) => 0,
                        };
                        shared.note(discover::moved_note(l.port, port, &why));
                        x
                    }
                    Err(e) => {
                        shared.note(format!(
                            "workspace port {}: cannot listen on the laptop: {e}",
                            l.port
                        ));
                        continue;
                    }
                }
            }
        };
        let key = format!("A{}", l.port);
        let stats = Arc::new(Stats::default());
        let listen = listener.bound();
        shared.note(format!(
            "forwarding {listen} -> workspace port {}{}",
            l.port,
            describe_owner(&l)
        ));
        let task = actix_rt::spawn(accept_loop(
            listener,
            target.clone(),
            key.clone(),
            stats.clone(),
            shared.clone(),
            link.clone(),
        ));
        shared
            .fwds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key,
                Fwd {
                    kind: "auto",
                    listen,
                    target: target.to_string(),
                    owner: Some(l),
                    stats,
                    task: Some(task),
                },
            );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drops CAP_NET_BIND_SERVICE from the calling thread's effective set (capabilities are
    /// per thread on Linux, so the rest of the test process keeps it).
    fn drop_bind_service_capability() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Default, Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_NET_BIND_SERVICE: u32 = 10;
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget and capset take a version-3 header and two data structs, as here;
        // pid 0 is the calling thread.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
                0
            );
            data[0].effective &= !(1 << CAP_NET_BIND_SERVICE);
            assert_eq!(
                libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
                0
            );
        }
    }

    /// A port below `net.ipv4.ip_unprivileged_port_start` without the capability to bind it
    /// gets one line naming the address and what it needs (the test runs as root in CI, so
    /// it drops the capability on its own thread).
    #[test]
    fn a_privileged_port_without_permission_is_named() {
        let start = unprivileged_port_start();
        if start <= 1 {
            eprintln!("every port is unprivileged on this machine (ip_unprivileged_port_start = {start}): nothing to check");
            return;
        }
        let port = start - 1;
        let err = std::thread::spawn(move || {
            drop_bind_service_capability();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(bind_local(&Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port,
            }))
            .err()
        })
        .join()
        .unwrap();
        assert_eq!(
            err.as_deref(),
            Some(
                format!(
                    "no permission to listen on 127.0.0.1:{port}: ports below {start} need root (or CAP_NET_BIND_SERVICE)"
                )
                .as_str()
            )
        );
    }
}
