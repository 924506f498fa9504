//! Benchmark of `cs portforward` against `ssh -L` and a direct connection, side by side in one
//! run, so that the figures quoted in the README can be reproduced with one command:
//!
//! `cargo run --release -p cs-tests --bin fwdbench [-- --bytes N --conns N --runs N --rtts N --only L --quick]`
//!
//! "The workspace" is this machine: a local sandbox's agent runs here, so a server on
//! 127.0.0.1 is reachable from it. The benchmark runs that server itself (threads of this
//! process): a sink that counts what it received, a source that sends what it is asked for,
//! and an echo. Three paths reach it:
//!
//! - `cs portforward -W fwd/dev -PF -L P:SERVER --detach` (a private `$CS_HOME`, a local
//!   sandbox; `-PF` so that only this rule is active);
//! - `ssh -N -L P2:127.0.0.1:SERVER` to a private `sshd` on 127.0.0.1;
//! - a direct connection to the server.
//!
//! Throughput: one connection, then `--conns` connections in parallel sharing `--bytes`,
//! upload (to the sink, timed until the sink has counted every byte) and download (from the
//! source, timed until the client's EOF); paths interleaved, `--runs` samples each, median.
//! The forwarders' CPU time is read from /proc during each sample (cs daemon and agent; ssh
//! and the sshd processes). How evenly connections are served: when the first of the
//! parallel connections finished, and the longest any download connection went without a
//! byte (a starved connection shows there). Latency: `--rtts` round trips of 64 bytes on one established
//! connection per path, interleaved in blocks of 100, p50 and p99, and what each adds to the
//! direct connection. Targets (printed, never asserted): cs throughput at least ssh -L's,
//! cs's added request latency under 0.5 ms. Figures go to stdout as Markdown, progress to
//! stderr. Every socket operation has a stall limit and every transfer a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _};
use cs_tests::benchkit::{
    cell_error, check_interrupted, cs_binaries, ensure_openssh, first_line,
    install_signal_handlers, interrupted, invocation, machine_line, number_arg, quantile, size,
    to_stderr, uninterrupted, CsHome, Sshd, SHORT,
};

const USAGE: &str =
    "usage: fwdbench [--bytes N] [--conns N] [--runs N] [--rtts N] [--only L] [--quick]
  --bytes N   bytes per throughput sample: through one connection, or shared by the parallel
              ones (default 1073741824 = 1 GiB)
  --conns N   parallel connections (default 16)
  --runs N    throughput samples per cell (default 3)
  --rtts N    64-byte round trips per path (default 2000)
  --only L    only these throughput tests, comma-separated: up1,down1,upN,downN (for a
              profile of one of them; the latency test always runs, --rtts 10 shortens it)
  --quick     --bytes 134217728 --rtts 500 (later options still override)";

/// The sandbox and workspace the forward goes to.
const SANDBOX: &str = "fwd";
const WS: &str = "fwd/dev";
/// The port-forward session's name.
const SESSION: &str = "fwdbench";
/// Bytes per request in the latency test.
const MSG_BYTES: usize = 64;
/// Round trips per path before the latency samples (connection set up, caches warm).
const WARMUP_RTTS: usize = 100;
/// Round trips per path in one block of the interleaved latency test.
const BLOCK_RTTS: usize = 100;
/// A socket read or write that makes no progress for this long fails the sample.
const STALL: Duration = Duration::from_secs(60);
/// The echo server's idle limit: a latency connection waits while the other paths take turns.
const ECHO_IDLE: Duration = Duration::from_secs(300);
/// Bytes per write and per read buffer.
const CHUNK_BYTES: usize = 1 << 20;

struct Opts {
    bytes: u64,
    conns: usize,
    runs: usize,
    rtts: usize,
    /// The throughput tests to run (`up1`, `down1`, `upN`, `downN`); all when empty.
    only: Vec<String>,
}

const TEST_NAMES: [&str; 4] = ["up1", "down1", "upN", "downN"];

fn opts() -> anyhow::Result<Option<Opts>> {
    let mut o = Opts {
        bytes: 1 << 30,
        conns: 16,
        runs: 3,
        rtts: 2000,
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| number_arg(&mut args, name, USAGE);
        match a.as_str() {
            "--bytes" => o.bytes = num("--bytes")?.clamp(1 << 20, 1 << 40),
            "--conns" => o.conns = num("--conns")?.clamp(2, 256) as usize,
            "--runs" => o.runs = num("--runs")?.clamp(1, 100) as usize,
            "--rtts" => o.rtts = num("--rtts")?.clamp(10, 1_000_000) as usize,
            "--only" => {
                let v = args
                    .next()
                    .with_context(|| format!("--only needs a list\n{USAGE}"))?;
                for t in v.split(',') {
                    ensure!(
                        TEST_NAMES.contains(&t),
                        "unknown test '{t}' in --only: expected some of {}",
                        TEST_NAMES.join(",")
                    );
                    o.only.push(t.to_string());
                }
            }
            "--quick" => {
                o.bytes = 128 << 20;
                o.rtts = 500;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown option '{other}'\n{USAGE}"),
        }
    }
    Ok(Some(o))
}

// ---------------------------------------------------------------------------------------------
// The server "in the workspace", and its clients.

/// 1 MiB of pseudo-random bytes: what uploads and downloads carry (not zeros, in case a path
/// ever compresses).
fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..CHUNK_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    })
}

/// A TCP server on 127.0.0.1, one thread per connection. The first byte of a connection
/// picks what it does: `U` counts bytes until EOF and answers the count (8 bytes, big
/// endian); `D` followed by a count (8 bytes) sends that many bytes and closes; `E` echoes.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind the server")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::Builder::new()
            .name("server".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(c) => {
                            let _ = std::thread::Builder::new()
                                .name("server-conn".into())
                                .spawn(move || serve(c));
                        }
                        // Out of descriptors and the like: wait, do not spin.
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
            .context("cannot start the server thread")?;
        Ok(Self { addr, stop })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn serve(mut c: TcpStream) -> std::io::Result<()> {
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(STALL))?;
    c.set_write_timeout(Some(STALL))?;
    let mut mode = [0u8; 1];
    c.read_exact(&mut mode)?;
    match mode[0] {
        b'U' => {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut n = 0u64;
            loop {
                match c.read(&mut buf)? {
                    0 => break,
                    k => n += k as u64,
                }
            }
            c.write_all(&n.to_be_bytes())?;
        }
        b'D' => {
            let mut len = [0u8; 8];
            c.read_exact(&mut len)?;
            let mut left = u64::from_be_bytes(len);
            let p = pattern();
            while left > 0 {
                let k = left.min(p.len() as u64) as usize;
                c.write_all(&p[..k])?;
                left -= k as u64;
            }
            c.shutdown(Shutdown::Write)?;
            // The client closes once it has everything; closing first is fine too.
            let _ = c.read(&mut [0u8; 1]);
        }
        b'E' => {
            c.set_read_timeout(Some(ECHO_IDLE))?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let k = c.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                c.write_all(&buf[..k])?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn connect(port: u16) -> anyhow::Result<TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let c = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("cannot connect to {addr}"))?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(STALL))?;
    c.set_write_timeout(Some(STALL))?;
    Ok(c)
}

fn check_deadline(deadline: Instant) -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    if Instant::now() > deadline {
        bail!("the transfer did not finish in time");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dir {
    Up,
    Down,
}

/// Sends `bytes` to the sink and waits for its count.
fn upload(port: u16, bytes: u64, deadline: Instant) -> anyhow::Result<()> {
    let mut c = connect(port)?;
    c.write_all(b"U")?;
    let p = pattern();
    let mut left = bytes;
    while left > 0 {
        check_deadline(deadline)?;
        let k = left.min(p.len() as u64) as usize;
        c.write_all(&p[..k]).context("sending")?;
        left -= k as u64;
    }
    c.shutdown(Shutdown::Write)?;
    let mut got = [0u8; 8];
    c.read_exact(&mut got)
        .context("waiting for the server's count")?;
    let got = u64::from_be_bytes(got);
    ensure!(got == bytes, "the server received {got} of {bytes} bytes");
    Ok(())
}

/// Asks the source for `bytes` and reads them to its EOF; returns the longest the connection
/// went without a byte (from the request to the first one, or between two reads).
fn download(port: u16, bytes: u64, deadline: Instant) -> anyhow::Result<Duration> {
    let mut c = connect(port)?;
    let mut req = [b'D'; 9];
    req[1..].copy_from_slice(&bytes.to_be_bytes());
    c.write_all(&req)?;
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut n = 0u64;
    let mut last = Instant::now();
    let mut gap = Duration::ZERO;
    loop {
        check_deadline(deadline)?;
        match c.read(&mut buf).context("receiving")? {
            0 => break,
            k => n += k as u64,
        }
        let now = Instant::now();
        gap = gap.max(now - last);
        last = now;
    }
    ensure!(n == bytes, "received {n} of {bytes} bytes");
    Ok(gap)
}

/// How one sample went: the wall time from the first connect to the last connection's end;
/// when each connection ended; and for downloads, the longest any connection went without a
/// byte.
struct Moved {
    took: Duration,
    ends: Vec<Duration>,
    gap_max: Option<Duration>,
}

/// Moves `each` bytes through each of `conns` connections at once.
fn transfer(port: u16, dir: Dir, conns: usize, each: u64) -> anyhow::Result<Moved> {
    check_interrupted()?;
    // At least 5 MB/s overall, or something is broken.
    let limit = SHORT + Duration::from_secs(each * conns as u64 / 5_000_000);
    let start = Instant::now();
    let deadline = start + limit;
    let one = move || -> anyhow::Result<(Duration, Option<Duration>)> {
        let gap = match dir {
            Dir::Up => upload(port, each, deadline).map(|()| None),
            Dir::Down => download(port, each, deadline).map(Some),
        }
        .map_err(stalled)?;
        Ok((start.elapsed(), gap))
    };
    if conns == 1 {
        let (took, gap) = one()?;
        return Ok(Moved {
            took,
            ends: vec![took],
            gap_max: gap,
        });
    }
    let threads: Vec<_> = (0..conns)
        .map(|_| std::thread::Builder::new().spawn(one))
        .collect();
    let mut first_error = None;
    let mut ends = Vec::new();
    let mut gap_max: Option<Duration> = None;
    for t in threads {
        // Each thread ends by its deadline: every socket operation has a stall limit.
        let r = t
            .context("cannot start a client thread")
            .and_then(|t| t.join().map_err(|_| anyhow!("a client thread panicked"))?);
        match r {
            Ok((end, gap)) => {
                ends.push(end);
                if let Some(g) = gap {
                    gap_max = Some(gap_max.map_or(g, |m| m.max(g)));
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let took = start.elapsed();
    match first_error {
        Some(e) => Err(e),
        None => Ok(Moved {
            took,
            ends,
            gap_max,
        }),
    }
}

/// Names a socket timeout for what it is: a connection that moved nothing for [`STALL`].
fn stalled(e: anyhow::Error) -> anyhow::Error {
    let timed_out = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        })
    });
    if timed_out {
        e.context(format!(
            "a connection moved no byte for {} s",
            STALL.as_secs()
        ))
    } else {
        e
    }
}

/// An echo connection, checked with one round trip.
fn echo_conn(port: u16) -> anyhow::Result<TcpStream> {
    let mut c = connect(port)?;
    c.write_all(b"E")?;
    round_trip(&mut c, 0)?;
    Ok(c)
}

/// One request-response of `MSG_BYTES` bytes; returns its time.
fn round_trip(c: &mut TcpStream, i: usize) -> anyhow::Result<Duration> {
    let mut msg = [0u8; MSG_BYTES];
    msg[..8].copy_from_slice(&(i as u64).to_be_bytes());
    let mut back = [0u8; MSG_BYTES];
    let start = Instant::now();
    c.write_all(&msg)?;
    c.read_exact(&mut back).context("waiting for the echo")?;
    let took = start.elapsed();
    ensure!(back == msg, "the echo differs from the request");
    Ok(took)
}

/// Waits until an echo round trip through `port` works (a forward that is still starting
/// refuses or resets); gives up after `limit` or when `gone` says the forwarder exited.
fn wait_for_path(
    port: u16,
    limit: Duration,
    mut gone: impl FnMut() -> Option<String>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        check_interrupted()?;
        let e = match echo_conn(port) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if let Some(why) = gone() {
            bail!("{why}");
        }
        if start.elapsed() > limit {
            return Err(e.context(format!(
                "127.0.0.1:{port} did not carry an echo within {limit:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------------
// CPU time of the forwarders, from /proc.

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The fields of /proc/PID/stat after the command name: index 0 is the state (field 3).
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(String::from).collect())
}

/// User plus system CPU seconds of `pid` (all its threads), or 0 when it is gone.
fn cpu_seconds(pid: i32) -> f64 {
    let Some(f) = stat_fields(pid) else {
        return 0.0;
    };
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / clock_ticks()
}

/// `pid` and every process below it.
fn process_tree(pid: i32) -> Vec<i32> {
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(p).and_then(|f| f.get(1)?.parse::<i32>().ok()) {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        if let Some(c) = children.get(&all[i]) {
            all.extend(c);
        }
        i += 1;
    }
    all
}

/// A forwarder's two halves, whose CPU time is read around each sample.
#[derive(Clone)]
struct Halves {
    names: [&'static str; 2],
    pids: [Vec<i32>; 2],
}

impl Halves {
    fn cpu(&self) -> [f64; 2] {
        [0, 1].map(|i| self.pids[i].iter().map(|&p| cpu_seconds(p)).sum())
    }
}

// ---------------------------------------------------------------------------------------------
// The paths.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Via {
    Cs,
    Ssh,
    Direct,
}

const VIAS: [Via; 3] = [Via::Cs, Via::Ssh, Via::Direct];

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Cs => "cs portforward",
            Via::Ssh => "ssh -L",
            Via::Direct => "direct",
        }
    }
}

/// One way to the server: the port to connect to, or why there is none.
struct Path {
    via: Via,
    port: u16,
    halves: Option<Halves>,
    error: Option<String>,
}

impl Path {
    fn fail(&mut self, e: &anyhow::Error) {
        eprintln!("fwdbench: {}: {e:#}", self.via.label());
        self.error.get_or_insert_with(|| format!("{e:#}"));
    }
}

/// `ssh -N -L`, killed when dropped.
struct SshForward {
    child: Child,
}

impl Drop for SshForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ssh -N -L PORT:127.0.0.1:SERVER` and waits until it carries an echo.
fn ssh_setup(
    sshd: &Sshd,
    server_port: u16,
    slot: &mut Option<SshForward>,
) -> anyhow::Result<(u16, Option<Halves>)> {
    let port = free_port()?;
    let rule = format!("{port}:127.0.0.1:{server_port}");
    let mut cmd = sshd.ssh(
        false,
        &["-N", "-o", "ExitOnForwardFailure=yes", "-L", &rule],
        None,
    );
    cmd.stdin(Stdio::null()).stdout(to_stderr());
    let child = cmd.spawn().context("cannot start ssh -L")?;
    let client = child.id() as i32;
    let fwd = slot.insert(SshForward { child });
    wait_for_path(port, Duration::from_secs(30), || {
        match fwd.child.try_wait() {
            Ok(Some(st)) => Some(format!("ssh -N -L {rule} exited ({st})")),
            _ => None,
        }
    })?;
    eprintln!("fwdbench: ssh -N -L {rule} carries connections");
    // The sshd that serves the forward: its listener (idle) and the session's processes.
    let sshd_pid = std::fs::read_to_string(sshd.dir.join("sshd.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let halves = sshd_pid.map(|p| Halves {
        names: ["ssh", "sshd"],
        pids: [vec![client], process_tree(p)],
    });
    if halves.is_none() {
        eprintln!("fwdbench: no sshd.pid: the ssh rows show no CPU time");
    }
    Ok((port, halves))
}

/// Creates the local sandbox, starts the detached forward `-PF -L PORT:SERVER` and waits
/// until it carries an echo.
fn cs_setup(cs: &mut CsHome, server_port: u16) -> anyhow::Result<(u16, Option<Halves>)> {
    let said = cs.create_local(SANDBOX)?;
    eprint!("fwdbench: cs sandbox create {SANDBOX} --local: {said}");
    if !said.ends_with('\n') {
        eprintln!();
    }
    let port = free_port()?;
    let rule = format!("{port}:{server_port}");
    let args = [
        "portforward",
        "-W",
        WS,
        "-PF",
        "-L",
        &rule,
        "--detach",
        "--name",
        SESSION,
    ];
    let (out, _) = cs.run(&args, SHORT)?;
    eprint!("fwdbench: cs {}: {out}", args.join(" "));
    wait_for_path(port, Duration::from_secs(30), || None)?;
    eprintln!("fwdbench: cs portforward -L {rule} carries connections");
    let (status, _) = cs.run(&["daemon", "status", "--json"], SHORT)?;
    let daemon = serde_json::from_str::<serde_json::Value>(&status)
        .ok()
        .and_then(|v| v["pid"].as_i64())
        .map(|p| p as i32);
    let agent = cs.agent_pid(SANDBOX, "dev").ok();
    let halves = match (daemon, agent) {
        (Some(d), Some(a)) => Some(Halves {
            names: ["daemon", "agent"],
            pids: [vec![d], vec![a]],
        }),
        _ => {
            eprintln!("fwdbench: no pid for the cs daemon or agent: the cs rows show no CPU time");
            None
        }
    };
    Ok((port, halves))
}

// ---------------------------------------------------------------------------------------------
// Figures.

/// One throughput sample.
#[derive(Clone, Copy)]
struct Sample {
    mbs: f64,
    /// CPU seconds of each half of the forwarder over the sample, and the sample's wall time.
    cpu: Option<[f64; 2]>,
    wall: f64,
    /// When the first and the last connection ended, as fractions of the wall time.
    ends: (f64, f64),
    /// Downloads: the longest a connection went without a byte, in seconds.
    gap_max: Option<f64>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Test {
    dir: Dir,
    conns: usize,
}

impl Test {
    /// Its name for `--only`.
    fn name(&self) -> &'static str {
        match (self.dir, self.conns) {
            (Dir::Up, 1) => "up1",
            (Dir::Down, 1) => "down1",
            (Dir::Up, _) => "upN",
            (Dir::Down, _) => "downN",
        }
    }

    fn label(&self, bytes: u64) -> String {
        let what = match self.dir {
            Dir::Up => "upload",
            Dir::Down => "download",
        };
        if self.conns == 1 {
            format!("1 connection, {what} ({})", size(bytes))
        } else {
            format!(
                "{} connections, {what} ({} x {})",
                self.conns,
                self.conns,
                size(bytes / self.conns as u64)
            )
        }
    }
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(quantile(&s, 0.5))
}

fn mbs(v: f64) -> String {
    format!("{v:.0} MB/s")
}

/// Milliseconds with three decimals: loopback round trips are tens of microseconds.
fn msec(v: f64) -> String {
    format!("{v:.3} ms")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

/// Everything the run set up, torn down in field order: the forwards, sshd, cs (its
/// sandbox and daemon), the server, then the directory.
struct Bench {
    ssh_fwd: Option<SshForward>,
    sshd: Option<Sshd>,
    cs: Option<CsHome>,
    server: Option<Server>,
    tmp: tempfile::TempDir,
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(cs) = &self.cs {
            let _ = uninterrupted(|| cs.run(&["portforward", "stop", SESSION], SHORT));
        }
    }
}

fn run(o: &Opts) -> anyhow::Result<bool> {
    let command = invocation();
    let load_before = loadavg();
    ensure_openssh()?;
    let cs_bin = cs_binaries()?;
    let tmp = tempfile::Builder::new()
        .prefix("cs-fwdbench-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    eprintln!("fwdbench: working in {}", tmp.path().display());
    let mut b = Bench {
        ssh_fwd: None,
        sshd: None,
        cs: None,
        server: None,
        tmp,
    };
    let server = b.server.insert(Server::start()?);
    let server_port = server.addr.port();
    eprintln!("fwdbench: the server listens on {}", server.addr);

    let mut paths: Vec<Path> = VIAS
        .iter()
        .map(|&via| Path {
            via,
            port: server_port,
            halves: None,
            error: None,
        })
        .collect();

    // cs first: if it does not work, the other paths are still measured and the error shown.
    let mut cs = CsHome::new(cs_bin, b.tmp.path())?;
    match cs_setup(&mut cs, server_port) {
        Ok((port, halves)) => (paths[0].port, paths[0].halves) = (port, halves),
        Err(e) => {
            check_interrupted()?;
            paths[0].fail(&e.context("cs does not work; measuring the other paths only"));
        }
    }
    b.cs = Some(cs);

    let sshd = b.sshd.insert(Sshd::start(&b.tmp.path().join("sshd"))?);
    eprintln!("fwdbench: sshd listening on 127.0.0.1:{}", sshd.port);
    match ssh_setup(sshd, server_port, &mut b.ssh_fwd) {
        Ok((port, halves)) => (paths[1].port, paths[1].halves) = (port, halves),
        Err(e) => {
            check_interrupted()?;
            paths[1].fail(&e);
        }
    }

    // Throughput, paths interleaved so that drift in machine load touches each alike.
    let tests: Vec<Test> = [1, o.conns]
        .iter()
        .flat_map(|&conns| [Dir::Up, Dir::Down].map(|dir| Test { dir, conns }))
        .filter(|t| o.only.is_empty() || o.only.contains(&t.name().to_string()))
        .collect();
    let mut thr: BTreeMap<(Test, Via), Vec<Sample>> = BTreeMap::new();
    // The cells whose path failed (it is not measured after its first failure).
    let mut failed: BTreeSet<(Test, Via)> = BTreeSet::new();
    for t in &tests {
        let each = o.bytes / t.conns as u64;
        let total = each * t.conns as u64;
        eprintln!(
            "fwdbench: {}, {} runs through each path",
            t.label(o.bytes),
            o.runs
        );
        for run in 0..o.runs {
            for p in paths.iter_mut() {
                if p.error.is_some() {
                    continue;
                }
                let before = p.halves.as_ref().map(Halves::cpu);
                match transfer(p.port, t.dir, t.conns, each) {
                    Ok(Moved {
                        took,
                        ends,
                        gap_max,
                    }) => {
                        let wall = took.as_secs_f64();
                        let frac = |d: Option<&Duration>| d.map_or(1.0, |d| d.as_secs_f64() / wall);
                        let ends = (frac(ends.iter().min()), frac(ends.iter().max()));
                        let cpu = p.halves.as_ref().zip(before).map(|(h, b)| {
                            let a = h.cpu();
                            [a[0] - b[0], a[1] - b[1]]
                        });
                        let s = Sample {
                            mbs: total as f64 / 1e6 / wall,
                            cpu,
                            wall,
                            ends,
                            gap_max: gap_max.map(|d| d.as_secs_f64()),
                        };
                        let cpu_note = cpu
                            .map(|c| format!("  CPU {:.2} + {:.2} s", c[0], c[1]))
                            .unwrap_or_default();
                        let done_note = if t.conns > 1 {
                            format!(
                                "  first connection done at {:.0}% of the time",
                                ends.0 * 100.0
                            )
                        } else {
                            String::new()
                        };
                        let gap_note = s
                            .gap_max
                            .map(|g| format!("  longest pause {:.0} ms", g * 1e3))
                            .unwrap_or_default();
                        eprintln!(
                            "fwdbench:   run {}: {:<14} {:>6.0} MB/s{cpu_note}{done_note}{gap_note}",
                            run + 1,
                            p.via.label(),
                            s.mbs,
                        );
                        thr.entry((*t, p.via)).or_default().push(s);
                    }
                    Err(e) => {
                        check_interrupted()?;
                        p.fail(&e.context(format!("{}, run {}", t.label(o.bytes), run + 1)));
                        failed.insert((*t, p.via));
                    }
                }
            }
        }
    }

    // Latency: one echo connection per path, round trips interleaved in blocks.
    eprintln!(
        "fwdbench: latency, {} round trips of {MSG_BYTES} bytes through each path",
        o.rtts
    );
    let mut conns: Vec<Option<TcpStream>> = Vec::new();
    let mut lat_failed: BTreeSet<Via> = BTreeSet::new();
    for p in paths.iter_mut() {
        let c = if p.error.is_some() {
            None
        } else {
            match echo_conn(p.port).and_then(|mut c| {
                for i in 0..WARMUP_RTTS {
                    round_trip(&mut c, i)?;
                }
                Ok(c)
            }) {
                Ok(c) => Some(c),
                Err(e) => {
                    check_interrupted()?;
                    p.fail(&e.context("the latency connection"));
                    lat_failed.insert(p.via);
                    None
                }
            }
        };
        conns.push(c);
    }
    let mut lat: BTreeMap<Via, Vec<f64>> = BTreeMap::new();
    let mut done = 0;
    while done < o.rtts {
        check_interrupted()?;
        let n = BLOCK_RTTS.min(o.rtts - done);
        for (p, c) in paths.iter_mut().zip(conns.iter_mut()) {
            let Some(conn) = c.as_mut() else { continue };
            let v = lat.entry(p.via).or_default();
            for i in 0..n {
                match round_trip(conn, done + i) {
                    Ok(t) => v.push(t.as_secs_f64() * 1e3),
                    Err(e) => {
                        check_interrupted()?;
                        p.fail(&e.context("a round trip"));
                        lat_failed.insert(p.via);
                        *c = None;
                        break;
                    }
                }
            }
        }
        done += n;
    }
    drop(conns);
    let load_after = loadavg();

    // ---- the table ----
    let ssh_v = first_line(Command::new("ssh").arg("-V"), true);
    let err_of = |via: Via| {
        paths
            .iter()
            .find(|p| p.via == via)
            .and_then(|p| p.error.clone())
    };
    let thr_med = |t: &Test, via: Via| -> Option<f64> {
        if failed.contains(&(*t, via)) {
            return None;
        }
        let v: Vec<f64> = thr.get(&(*t, via))?.iter().map(|s| s.mbs).collect();
        median(&v)
    };
    let lat_q = |via: Via, q: f64| -> Option<f64> {
        if lat_failed.contains(&via) {
            return None;
        }
        let mut v = lat.get(&via)?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(quantile(&v, q))
    };
    let cell = |v: Option<f64>, f: fn(f64) -> String| v.map(f).unwrap_or_else(|| "failed".into());
    let ratio_cell = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    };

    println!();
    println!("# cs portforward vs ssh -L vs a direct connection on 127.0.0.1");
    println!();
    println!("{}", machine_line(&[ssh_v]));
    println!(
        "Command: `{command}`. Throughput: {} per sample (MB = 10^6 bytes), median of {} \
         runs, paths interleaved; latency: {} round trips of {MSG_BYTES} bytes per path on one \
         connection each, in interleaved blocks of {BLOCK_RTTS}. Load average before / after: \
         {load_before} / {load_after}.",
        size(o.bytes),
        o.runs,
        o.rtts
    );
    println!();
    println!("| what | cs portforward | ssh -L | direct | cs vs ssh -L | cs vs direct |");
    println!("|---|--:|--:|--:|--:|--:|");
    let mut thr_met = Vec::new();
    for t in &tests {
        let [c, s, d] = VIAS.map(|v| thr_med(t, v));
        if let (Some(c), Some(s)) = (c, s) {
            thr_met.push((t.label(o.bytes), c >= s, c / s));
        }
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            t.label(o.bytes),
            cell(c, mbs),
            cell(s, mbs),
            cell(d, mbs),
            ratio_cell(c, s),
            ratio_cell(c, d)
        );
    }
    let added = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:+.3} ms", a - b),
        _ => "n/a".into(),
    };
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        let [c, s, d] = VIAS.map(|v| lat_q(v, q));
        println!(
            "| {MSG_BYTES}-byte echo, {name} (N={}) | {} | {} | {} | {} | {} |",
            o.rtts,
            cell(c, msec),
            cell(s, msec),
            cell(d, msec),
            added(c, s),
            added(c, d)
        );
    }
    for via in VIAS {
        if let Some(e) = err_of(via) {
            println!();
            println!("{} failed: {}", via.label(), cell_error(&e));
        }
    }

    // The forwarders' CPU: how busy each half was (cores) and what a GB cost.
    println!();
    println!(
        "| forwarder CPU, busy cores (CPU s per GB) | cs: daemon + agent | ssh -L: ssh + sshd |"
    );
    println!("|---|--:|--:|");
    for t in &tests {
        let cpu_cell = |via: Via| -> String {
            let Some(samples) = thr.get(&(*t, via)).filter(|_| !failed.contains(&(*t, via))) else {
                return "n/a".into();
            };
            let with: Vec<([f64; 2], f64, f64)> = samples
                .iter()
                .filter_map(|s| Some((s.cpu?, s.wall, s.mbs * s.wall / 1e3)))
                .collect();
            if with.is_empty() {
                return "n/a".into();
            }
            let wall: f64 = with.iter().map(|w| w.1).sum();
            let gb: f64 = with.iter().map(|w| w.2).sum();
            let a: f64 = with.iter().map(|w| w.0[0]).sum();
            let b: f64 = with.iter().map(|w| w.0[1]).sum();
            format!(
                "{:.2} + {:.2} ({:.2} s/GB)",
                a / wall,
                b / wall,
                (a + b) / gb
            )
        };
        println!(
            "| {} | {} | {} |",
            t.label(o.bytes),
            cpu_cell(Via::Cs),
            cpu_cell(Via::Ssh)
        );
    }
    // How evenly the connections were served. Sharing fairly, parallel connections all finish
    // together (the first one near 100% of the time); served one after another, the first
    // finishes after 1/N of the time. A download's longest pause is the longest any of its
    // connections went without a byte (the wait for the first one included): a starved
    // connection shows here.
    println!();
    println!(
        "| how evenly connections are served (median of the runs) | cs portforward | ssh -L | direct |"
    );
    println!("|---|--:|--:|--:|");
    for t in &tests {
        let per_via = |f: &dyn Fn(&Sample) -> Option<f64>, fmt: &dyn Fn(f64) -> String| {
            VIAS.map(|via| {
                let v: Vec<f64> = thr
                    .get(&(*t, via))
                    .filter(|_| !failed.contains(&(*t, via)))
                    .map(|ss| ss.iter().filter_map(f).collect())
                    .unwrap_or_default();
                median(&v).map_or_else(|| "n/a".to_string(), fmt)
            })
        };
        if t.conns > 1 {
            let done = per_via(&|s| Some(s.ends.0 * 100.0), &|m| format!("{m:.0}%"));
            println!(
                "| {}: the first connection done, % of the sample's time | {} | {} | {} |",
                t.label(o.bytes),
                done[0],
                done[1],
                done[2]
            );
        }
        if t.dir == Dir::Down {
            let gap = per_via(&|s| s.gap_max, &|m| format!("{:.0} ms", m * 1e3));
            println!(
                "| {}: the longest pause of a connection | {} | {} | {} |",
                t.label(o.bytes),
                gap[0],
                gap[1],
                gap[2]
            );
        }
    }
    let names = |via: Via| {
        paths
            .iter()
            .find(|p| p.via == via)
            .and_then(|p| p.halves.as_ref())
            .map(|h| h.names.join(" + "))
    };
    if let (Some(c), Some(s)) = (names(Via::Cs), names(Via::Ssh)) {
        eprintln!("fwdbench: CPU columns: cs {c}; ssh -L {s}");
    }

    println!();
    println!("Targets (not asserted):");
    if thr_met.is_empty() {
        println!("- cs throughput >= ssh -L's: n/a (a path failed)");
    } else {
        let met = thr_met.iter().filter(|m| m.1).count();
        println!(
            "- cs throughput >= ssh -L's: {} ({met} of {} rows; {})",
            if met == thr_met.len() {
                "met"
            } else {
                "NOT met"
            },
            thr_met.len(),
            thr_met
                .iter()
                .map(|(l, _, r)| format!("{l}: {r:.2}x"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    match (
        lat_q(Via::Cs, 0.5),
        lat_q(Via::Direct, 0.5),
        lat_q(Via::Cs, 0.99),
        lat_q(Via::Direct, 0.99),
    ) {
        (Some(c50), Some(d50), Some(c99), Some(d99)) => println!(
            "- added request latency under 0.5 ms: {} (p50 {:+.3} ms, p99 {:+.3} ms vs direct)",
            if c50 - d50 < 0.5 { "met" } else { "NOT met" },
            c50 - d50,
            c99 - d99
        ),
        _ => println!("- added request latency under 0.5 ms: n/a (a path failed)"),
    }

    let ok = paths.iter().all(|p| p.error.is_none());
    drop(b);
    Ok(ok)
}

fn main() -> ExitCode {
    let o = match opts() {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fwdbench: {e:#}");
            return ExitCode::from(2);
        }
    };
    install_signal_handlers();
    match run(&o) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("fwdbench: some paths failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("fwdbench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
