//! Benchmark of continuous sync (`cs sync`) against rsync, unison and syncthing on the Linux
//! kernel tree, side by side in one run, so that the figures in the sync issue can be
//! reproduced by anyone with one command:
//!
//! `cargo run --release -p cs-tests --bin syncbench [-- --quick]`
//!
//! It measures, on 127.0.0.1 only: the initial sync of the tree (wall time, peak memory of the
//! cs daemon and agent, CPU), the save-to-remote latency of single-file edits (a temp file
//! renamed over the original, as editors save, and a plain in-place write), the bytes on the
//! wire and the time for a 1 KiB edit in the middle of a 100 MiB file, the convergence of a
//! `git checkout` that changes 5,000 files, the CPU an idle session uses, and the latency
//! through a relay that drops 5% of datagrams and adds 25 ms each way. The peers run in the
//! same run: rsync (local, and over a private sshd), unison (two local roots, one-shot and
//! `-repeat`), syncthing (two private instances). A peer that is not installed or cannot run
//! here is reported as such, with the reason; every figure printed was measured in this run.
//! Nothing is asserted: the table goes to stdout, progress to stderr.
//!
//! The kernel tree comes from /usr/src/linux-source-6.1.tar.xz (`apt-get install -y
//! linux-source`), extracted once into target/syncbench-cache/. Everything else lives in a
//! temporary directory removed at the end; every child process runs under a time limit or is
//! stopped on exit, on error and on Ctrl-C.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use cs_tests::benchkit::{
    cell_error, check_interrupted, cs_binaries, ensure_openssh, first_line,
    install_signal_handlers, interrupted, invocation, machine_line, ms, number_arg, on_path,
    quantile, ratio, run_captured, run_measured, shell_quote, uninterrupted, CsHome, Finished,
    Sshd, Usage, SHORT,
};

const USAGE: &str = "usage: syncbench [--quick] [--edits N] [--peer-edits N] [--lossy-edits N]
                 [--idle-secs N] [--seed N] [--keep] [--only-lossy] [--loss PCT]
  --quick          part of the kernel tree (drivers/net fs kernel net), a smaller git
                   repository and lossy tree, fewer edits, 10 s idle
  --edits N        cs edits per save kind (default 100; --quick 20)
  --peer-edits N   unison and syncthing edits per save kind (default 25; --quick 5)
  --lossy-edits N  cs edits per save kind through the lossy relay (default 50; --quick 10)
  --idle-secs N    the idle window (default 60; --quick 10)
  --seed N         seed of the edited files, the edits and the relay's losses (default 1)
  --keep           keep the temporary directory (trees, logs of cs, agents and peers)
  --only-lossy     measure only cs through the lossy relay (no peers, no other phase)
  --loss PCT       the relay's loss, in percent (default 5)
With SYNCBENCH_TRACE set, every edit's size and latency is printed as it is measured.";

const TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
const TREE: &str = "linux-source-6.1";
/// The part of the tree `--quick` syncs.
const QUICK_DIRS: &[&str] = &["drivers/net", "fs", "kernel", "net"];

/// How much of the tree the git and lossy measurements use.
struct Scale {
    /// The part of the tree the git repository holds.
    git_dirs: &'static [&'static str],
    /// How branch `other` differs from `main`: files modified, deleted and added.
    git_modified: usize,
    git_deleted: usize,
    git_added: usize,
    /// The tree synced through the lossy relay.
    lossy_dir: &'static str,
}

const FULL: Scale = Scale {
    git_dirs: &["drivers/net", "fs", "net"],
    git_modified: 3_000,
    git_deleted: 1_000,
    git_added: 1_000,
    lossy_dir: "kernel",
};

const QUICK: Scale = Scale {
    git_dirs: &["drivers/net"],
    git_modified: 600,
    git_deleted: 200,
    git_added: 200,
    lossy_dir: "kernel/time",
};
const BIG_BYTES: u64 = 100 << 20;
const BIG_EDIT_OFFSET: u64 = 50 << 20;
const BIG_EDIT_BYTES: usize = 1024;
const LOSS: f64 = 0.05;
const ONE_WAY_DELAY: Duration = Duration::from_millis(25);
/// How long one edit may take to arrive before it counts as timed out.
const EDIT_LIMIT_CS: Duration = Duration::from_secs(10);
const EDIT_LIMIT_PEER: Duration = Duration::from_secs(60);
/// Limit of a whole-tree step (a copy, an initial sync, a convergence).
const LONG: Duration = Duration::from_secs(30 * 60);

/// Progress on stderr, stamped with the seconds since the run started.
macro_rules! say {
    ($($t:tt)*) => {
        eprintln!("syncbench: [{:8.3} s] {}", started().elapsed().as_secs_f64(), format_args!($($t)*))
    };
}

fn started() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

struct Opts {
    quick: bool,
    keep: bool,
    edits: usize,
    peer_edits: usize,
    lossy_edits: usize,
    idle: Duration,
    seed: u64,
    only_lossy: bool,
    /// The relay's loss, a fraction.
    loss: f64,
}

impl Opts {
    fn scale(&self) -> &'static Scale {
        if self.quick {
            &QUICK
        } else {
            &FULL
        }
    }
}

fn opts() -> anyhow::Result<Option<Opts>> {
    let mut o = Opts {
        quick: false,
        keep: false,
        edits: 100,
        peer_edits: 25,
        lossy_edits: 50,
        idle: Duration::from_secs(60),
        seed: 1,
        only_lossy: false,
        loss: LOSS,
    };
    let (mut edits, mut peer, mut lossy, mut idle) = (None, None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| number_arg(&mut args, name, USAGE);
        match a.as_str() {
            "--quick" => o.quick = true,
            "--keep" => o.keep = true,
            "--edits" => edits = Some(num("--edits")?.clamp(1, 10_000) as usize),
            "--peer-edits" => peer = Some(num("--peer-edits")?.clamp(1, 10_000) as usize),
            "--lossy-edits" => lossy = Some(num("--lossy-edits")?.clamp(1, 10_000) as usize),
            "--idle-secs" => idle = Some(num("--idle-secs")?.clamp(1, 3_600)),
            "--seed" => o.seed = num("--seed")?,
            "--only-lossy" => o.only_lossy = true,
            "--loss" => {
                let pct = num("--loss")?;
                ensure!(
                    pct <= 50,
                    "invalid --loss '{pct}': expected a percentage up to 50"
                );
                o.loss = pct as f64 / 100.0;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown option '{other}'\n{USAGE}"),
        }
    }
    if o.quick {
        (o.edits, o.peer_edits, o.lossy_edits) = (20, 5, 10);
        o.idle = Duration::from_secs(10);
    }
    o.edits = edits.unwrap_or(o.edits);
    o.peer_edits = peer.unwrap_or(o.peer_edits);
    o.lossy_edits = lossy.unwrap_or(o.lossy_edits);
    o.idle = idle.map(Duration::from_secs).unwrap_or(o.idle);
    Ok(Some(o))
}

// ---------------------------------------------------------------------------------------------
// Small tools.

/// splitmix64: seeded, so that a run's file choices, edits and losses repeat with its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `cp -a FROM TO` (TO must not exist).
fn copy_tree(from: &Path, to: &Path, scratch: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let what = format!("cp -a {} {}", from.display(), to.display());
    run_captured(
        Command::new("cp").arg("-a").arg(from).arg(to),
        scratch,
        LONG,
        &what,
    )?;
    Ok(())
}

fn remove_tree(p: &Path) {
    if let Err(e) = std::fs::remove_dir_all(p) {
        if e.kind() != std::io::ErrorKind::NotFound {
            say!("cannot remove {}: {e}", p.display());
        }
    }
}

/// A long-running child (syncthing, unison -repeat, an agent), stopped with SIGTERM, then
/// SIGKILL, when dropped.
struct Bg {
    child: Child,
    log: PathBuf,
}

impl Bg {
    fn spawn(cmd: &mut Command, log: &Path, what: &str) -> anyhow::Result<Self> {
        let out = File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Fails with the end of its log when the process has exited.
    fn check_alive(&mut self, what: &str) -> anyhow::Result<()> {
        if let Ok(Some(st)) = self.child.try_wait() {
            bail!("{what} exited ({st}): {}", self.log_tail(10));
        }
        Ok(())
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let v: Vec<&str> = text.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        uninterrupted(|| {
            if let Ok(None) = self.child.try_wait() {
                // SAFETY: plain syscall on our own child, not yet reaped.
                unsafe {
                    libc::kill(self.pid(), libc::SIGTERM);
                }
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(5) {
                    if let Ok(Some(_)) = self.child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        });
    }
}

/// CPU time (user + system) a process has used so far, from /proc/PID/stat.
fn proc_cpu(pid: i32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // The fields after the command name, which is in parentheses and may hold spaces: state
    // is field 3 of stat(5), utime 14 and stime 15.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("malformed /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    ensure!(f.len() > 12, "malformed /proc/{pid}/stat");
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// The peak resident set of a process so far (VmHWM), in bytes.
fn proc_hwm(pid: i32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(kb * 1024)
}

/// The 1-minute load average, from /proc/loadavg.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".into())
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn mb(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.1} s")
    }
}

/// Prints a comparison table's rows: per tool its four cells, the first being the compared
/// figure, with `compare(cs's figure, this tool's)` after it (cs itself is the baseline);
/// a tool that failed gets a row saying why.
fn print_compared<T>(
    rows: &[(String, Fig<T>)],
    figure: impl Fn(&T) -> f64,
    compare: impl Fn(Option<f64>, f64) -> String,
    cells: impl Fn(&T) -> [String; 4],
) {
    let is_cs = |tool: &str| tool.contains("cs sync");
    let base = rows
        .iter()
        .find(|(t, _)| is_cs(t))
        .and_then(|(_, f)| f.as_ref().ok())
        .map(&figure);
    for (tool, f) in rows {
        match f {
            Ok(f) => {
                let v = if is_cs(tool) {
                    "1.0x (baseline)".to_string()
                } else {
                    compare(base, figure(f))
                };
                let [first, a, b, c] = cells(f);
                println!("| {tool} | {first} | {v} | {a} | {b} | {c} |");
            }
            Err(e) => println!("| {tool} | failed: {} | | | | |", cell_error(e)),
        }
    }
}

/// "2.1x slower" / "1.3x faster" than `base`, for figures where less is better.
fn vs(base: Option<f64>, v: f64) -> String {
    match base {
        None => "n/a".into(),
        Some(b) if b <= 0.0 || v <= 0.0 => "n/a".into(),
        Some(b) if v >= b => format!("{}x slower", ratio(v / b)),
        Some(b) => format!("{}x faster", ratio(b / v)),
    }
}

// ---------------------------------------------------------------------------------------------
// Trees.

#[derive(Clone, PartialEq, Eq)]
enum Node {
    Dir,
    File {
        size: u64,
        hash: Option<blake3::Hash>,
    },
    Link(PathBuf),
    Other,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Dir => write!(f, "directory"),
            Node::File { size, hash: None } => write!(f, "file of {size} bytes"),
            Node::File {
                size,
                hash: Some(h),
            } => write!(f, "file of {size} bytes {}", &h.to_hex()[..12]),
            Node::Link(t) => write!(f, "symlink to {}", t.display()),
            Node::Other => write!(f, "special file"),
        }
    }
}

/// Relative path to what is there.
type Manifest = BTreeMap<String, Node>;

/// Walks `root` without following symlinks, leaving out the top-level names in `skip`;
/// `hashes` hashes regular files. Entries that vanish during the walk are left out.
fn manifest(root: &Path, hashes: bool, skip: &[&str]) -> anyhow::Result<Manifest> {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let mut out = Manifest::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Err(e) if gone(&e) && !rel.is_empty() => continue,
            r => r.with_context(|| format!("cannot read {}", dir.display()))?,
        };
        for e in entries {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if rel.is_empty() && skip.contains(&name.as_str()) {
                continue;
            }
            let path = e.path();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ft = match e.file_type() {
                Err(e) if gone(&e) => continue,
                r => r?,
            };
            let node = if ft.is_dir() {
                stack.push((path, r.clone()));
                Node::Dir
            } else if ft.is_file() {
                let read = if hashes {
                    std::fs::read(&path).map(|b| (b.len() as u64, Some(blake3::hash(&b))))
                } else {
                    e.metadata().map(|m| (m.len(), None))
                };
                match read {
                    Ok((size, hash)) => Node::File { size, hash },
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
                }
            } else if ft.is_symlink() {
                match std::fs::read_link(&path) {
                    Ok(t) => Node::Link(t),
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
                }
            } else {
                Node::Other
            };
            out.insert(r, node);
        }
    }
    Ok(out)
}

/// The same tree without file hashes.
fn cheap(m: &Manifest) -> Manifest {
    m.iter()
        .map(|(k, v)| {
            let v = match v {
                Node::File { size, .. } => Node::File {
                    size: *size,
                    hash: None,
                },
                other => other.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// None when `got` is `want`, else how many paths differ and the first of them.
fn differences(want: &Manifest, got: &Manifest) -> Option<String> {
    let mut n = 0;
    let mut first = None;
    for (k, v) in want {
        match got.get(k) {
            Some(g) if g == v => {}
            g => {
                n += 1;
                first.get_or_insert_with(|| match g {
                    Some(g) => format!("{k}: {g:?} instead of {v:?}"),
                    None => format!("{k} ({v:?}) missing"),
                });
            }
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            n += 1;
            first.get_or_insert_with(|| format!("{k} ({g:?}) should not be there"));
        }
    }
    first.map(|f| format!("{n} paths differ, e.g. {f}"))
}

fn file_count(m: &Manifest) -> usize {
    m.values()
        .filter(|n| matches!(n, Node::File { .. }))
        .count()
}

/// "identical (N files)" or what differs.
fn verify(want: &Manifest, root: &Path, hashes: bool, skip: &[&str]) -> String {
    match manifest(root, hashes, skip) {
        Ok(got) => differences(want, &got)
            .unwrap_or_else(|| format!("identical ({} files)", file_count(want))),
        Err(e) => format!("cannot walk the copy: {e:#}"),
    }
}

/// The kernel tree, extracted into `cache` the first time.
fn kernel_tree(cache: &Path) -> anyhow::Result<PathBuf> {
    let tree = cache.join(TREE);
    let done = cache.join(format!("{TREE}.complete"));
    if done.is_file() && tree.is_dir() {
        return Ok(tree);
    }
    ensure!(
        Path::new(TARBALL).is_file(),
        "{TARBALL} is missing: install the kernel source with `apt-get install -y linux-source`"
    );
    std::fs::create_dir_all(cache)?;
    let partial = cache.join("extract.partial");
    remove_tree(&partial);
    remove_tree(&tree);
    std::fs::create_dir_all(&partial)?;
    say!("extracting {TARBALL} into {} (once)", cache.display());
    run_captured(
        Command::new("tar")
            .arg("-xJf")
            .arg(TARBALL)
            .arg("-C")
            .arg(&partial),
        cache,
        LONG,
        "tar -xJf linux-source",
    )?;
    std::fs::rename(partial.join(TREE), &tree)
        .with_context(|| format!("{TARBALL} holds no {TREE}/"))?;
    remove_tree(&partial);
    std::fs::write(&done, "")?;
    Ok(tree)
}

// ---------------------------------------------------------------------------------------------
// Edits and their latency.

#[derive(Clone, Copy, PartialEq)]
enum Save {
    /// Write a temporary file and rename it over the original, as most editors do.
    Rename,
    /// Truncate and write the file in place.
    InPlace,
}

const SAVES: [Save; 2] = [Save::Rename, Save::InPlace];

impl Save {
    fn label(self) -> &'static str {
        match self {
            Save::Rename => "temp + rename",
            Save::InPlace => "in place",
        }
    }

    fn write(self, path: &Path, content: &[u8]) -> std::io::Result<()> {
        match self {
            Save::Rename => {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                let tmp = path.with_file_name(format!(".{name}.syncbench~"));
                std::fs::write(&tmp, content)?;
                std::fs::rename(&tmp, path)
            }
            Save::InPlace => std::fs::write(path, content),
        }
    }
}

/// Latency samples of one tool and save kind.
#[derive(Default)]
struct Lat {
    ms: Vec<f64>,
    timeouts: usize,
}

impl Lat {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.ms.clone();
        s.sort_by(f64::total_cmp);
        s
    }

    fn q(&self, q: f64) -> Option<f64> {
        let s = self.sorted();
        (!s.is_empty()).then(|| quantile(&s, q))
    }
}

/// Polls `path` every millisecond until it holds `want`; the time it took, or None after
/// `limit`.
fn wait_content(path: &Path, want: &[u8], limit: Duration) -> anyhow::Result<Option<Duration>> {
    let start = Instant::now();
    loop {
        if std::fs::read(path).is_ok_and(|got| got == want) {
            return Ok(Some(start.elapsed()));
        }
        if start.elapsed() > limit {
            return Ok(None);
        }
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `per_kind` edits of each save kind, interleaved, each to a random file of `files`: append a
/// line on the `local` side, then wait until the `remote` side has exactly that content.
/// Edits are spaced 50-100 ms apart. Three timeouts in a row end the row.
fn edit_latencies(
    local: &Path,
    remote: &Path,
    files: &[String],
    per_kind: usize,
    seed: u64,
    limit: Duration,
    who: &str,
) -> anyhow::Result<[Lat; 2]> {
    ensure!(!files.is_empty(), "no .c files to edit");
    let mut rng = Rng(seed);
    let mut lat = [Lat::default(), Lat::default()];
    let mut missed_in_a_row = 0;
    for i in 0..2 * per_kind {
        check_interrupted()?;
        let k = i % 2;
        let rel = &files[rng.below(files.len())];
        let path = local.join(rel);
        let mut content =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let line = format!("/* syncbench edit {i} {:016x} */\n", rng.next());
        content.extend_from_slice(line.as_bytes());
        if std::env::var_os("SYNCBENCH_TRACE").is_some() {
            say!("{who}: edit {i} saving");
        }
        SAVES[k]
            .write(&path, &content)
            .with_context(|| format!("cannot save {}", path.display()))?;
        match wait_content(&remote.join(rel), &content, limit)? {
            Some(d) => {
                if std::env::var_os("SYNCBENCH_TRACE").is_some() {
                    say!(
                        "{who}: edit {i} kind {k} {} bytes {:.1} ms",
                        content.len(),
                        d.as_secs_f64() * 1e3
                    );
                }
                lat[k].ms.push(d.as_secs_f64() * 1e3);
                missed_in_a_row = 0;
            }
            None => {
                lat[k].timeouts += 1;
                missed_in_a_row += 1;
                say!("{who}: edit {i} of {rel} did not arrive within {limit:?}");
                ensure!(
                    missed_in_a_row < 3,
                    "3 edits in a row did not arrive within {limit:?}"
                );
            }
        }
        if (i + 1) % 40 == 0 {
            say!("{who}:   {}/{} edits", i + 1, 2 * per_kind);
        }
        std::thread::sleep(Duration::from_millis(50 + rng.below(51) as u64));
    }
    Ok(lat)
}

/// Creates a file on `a` and waits until it is on `b`: the sync between them is running.
fn probe(
    a: &Path,
    b: &Path,
    limit: Duration,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let name = format!(".syncbench-probe-{}", std::process::id());
    let content = format!("probe {:?}\n", Instant::now());
    std::fs::write(a.join(&name), &content)?;
    let start = Instant::now();
    loop {
        if std::fs::read(b.join(&name)).is_ok_and(|got| got == content.as_bytes()) {
            break;
        }
        ensure!(
            start.elapsed() < limit,
            "a new file did not reach the other side within {limit:?}"
        );
        check_interrupted()?;
        alive()?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = start.elapsed();
    std::fs::remove_file(a.join(&name))?;
    // Let the deletion go through too, so that it does not disturb the first edit.
    let start = Instant::now();
    while b.join(&name).exists() && start.elapsed() < limit {
        check_interrupted()?;
        alive()?;
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(took)
}

/// The 100 MiB file, the same in every run of a seed.
fn write_big(path: &Path, seed: u64) -> anyhow::Result<()> {
    let mut rng = Rng(seed ^ 0xB16);
    let mut f = File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..BIG_BYTES / buf.len() as u64 {
        rng.fill(&mut buf);
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Overwrites 1 KiB in the middle of the big file in place; returns the new bytes.
fn edit_big(path: &Path, seed: u64) -> anyhow::Result<Vec<u8>> {
    let mut rng = Rng(seed ^ 0xED17);
    let mut patch = vec![0u8; BIG_EDIT_BYTES];
    rng.fill(&mut patch);
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(&patch, BIG_EDIT_OFFSET)?;
    Ok(patch)
}

/// Polls the edited region of the far copy until it holds `patch`.
fn wait_big(path: &Path, patch: &[u8], limit: Duration) -> anyhow::Result<Option<Duration>> {
    let start = Instant::now();
    let mut buf = vec![0u8; patch.len()];
    loop {
        let same = File::open(path)
            .and_then(|f| f.read_exact_at(&mut buf, BIG_EDIT_OFFSET))
            .is_ok()
            && buf == patch;
        if same {
            return Ok(Some(start.elapsed()));
        }
        if start.elapsed() > limit {
            return Ok(None);
        }
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn hash_file(path: &Path) -> anyhow::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize())
}

// ---------------------------------------------------------------------------------------------
// The git repository.

struct GitRepo {
    /// The repository on branch `main`; copied for each tool.
    template: PathBuf,
    /// The tree of branch `other` (without .git), with hashes.
    other: Manifest,
    /// Paths that differ between the branches.
    changes: usize,
}

fn git(repo: &Path, home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(repo)
        .args([
            "-c",
            "user.name=syncbench",
            "-c",
            "user.email=syncbench@localhost",
            "-c",
            "gc.auto=0",
            "-c",
            "core.autocrlf=false",
        ])
        .args(args)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1");
    c
}

fn run_git(repo: &Path, home: &Path, scratch: &Path, args: &[&str]) -> anyhow::Result<()> {
    let what = format!("git {}", args.join(" "));
    run_captured(&mut git(repo, home, args), scratch, LONG, &what)?;
    Ok(())
}

/// A repository of part of the kernel tree on `main`, and a branch `other` that modifies
/// 3,000 of its files, deletes 1,000 and adds 1,000.
fn git_repo(
    kernel: &Path,
    tmp: &Path,
    scratch: &Path,
    seed: u64,
    sc: &Scale,
) -> anyhow::Result<GitRepo> {
    let repo = tmp.join("git-template");
    let home = tmp.join("git-home");
    std::fs::create_dir_all(&home)?;
    for d in sc.git_dirs {
        copy_tree(&kernel.join(d), &repo.join(d), scratch)?;
    }
    let g = |args: &[&str]| run_git(&repo, &home, scratch, args);
    g(&["init", "-q", "-b", "main"])?;
    g(&["add", "-A"])?;
    g(&["commit", "-q", "-m", "base"])?;
    g(&["checkout", "-q", "-b", "other"])?;
    let files: Vec<String> = manifest(&repo, false, &[".git"])?
        .into_iter()
        .filter(|(_, n)| matches!(n, Node::File { .. }))
        .map(|(k, _)| k)
        .collect();
    ensure!(
        files.len() > sc.git_modified + sc.git_deleted,
        "the repository has only {} files",
        files.len()
    );
    let mut rng = Rng(seed ^ 0x617);
    let mut order: Vec<usize> = (0..files.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    for (n, &i) in order.iter().take(sc.git_modified).enumerate() {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(repo.join(&files[i]))?;
        writeln!(f, "/* syncbench: changed on branch other ({n}) */")?;
    }
    for &i in order.iter().skip(sc.git_modified).take(sc.git_deleted) {
        std::fs::remove_file(repo.join(&files[i]))?;
    }
    for (n, &i) in order
        .iter()
        .skip(sc.git_modified + sc.git_deleted)
        .take(sc.git_added)
        .enumerate()
    {
        let dir = Path::new(&files[i]).parent().unwrap_or(Path::new(""));
        let mut content = std::fs::read(repo.join(&files[i]))?;
        content.extend_from_slice(
            format!("/* syncbench: added on branch other ({n}) */\n").as_bytes(),
        );
        std::fs::write(
            repo.join(dir).join(format!("syncbench_added_{n}.c")),
            content,
        )?;
    }
    g(&["add", "-A"])?;
    g(&["commit", "-q", "-m", "other"])?;
    let other = manifest(&repo, true, &[".git"])?;
    g(&["checkout", "-q", "main"])?;
    let main = manifest(&repo, false, &[".git"])?;
    let changes = {
        let c = cheap(&other);
        c.iter().filter(|(k, v)| main.get(*k) != Some(v)).count()
            + main.keys().filter(|k| !c.contains_key(*k)).count()
    };
    Ok(GitRepo {
        template: repo,
        other,
        changes,
    })
}

// ---------------------------------------------------------------------------------------------
// The lossy relay.

/// A UDP relay between cs and an agent that drops a share of the datagrams (seeded) and
/// delays the others by a fixed time, in both directions.
struct Relay {
    port: u16,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    forwarded: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

impl Relay {
    fn start(agent: SocketAddr, loss: f64, delay: Duration, seed: u64) -> anyhow::Result<Self> {
        let front = UdpSocket::bind("127.0.0.1:0")?;
        let back = UdpSocket::bind("127.0.0.1:0")?;
        back.connect(agent)?;
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
        }
        let port = front.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let mut threads = Vec::new();
        // Each direction: a reader that drops or stamps each datagram with its due time, and a
        // sender that sends them in order when due (the delay is fixed, so FIFO order holds).
        for up in [true, false] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let (recv_sock, send_sock) = if up {
                (front.try_clone()?, back.try_clone()?)
            } else {
                (back.try_clone()?, front.try_clone()?)
            };
            let (stop_r, stop_s) = (stop.clone(), stop.clone());
            let (client_r, client_s) = (client.clone(), client.clone());
            let (dropped, forwarded) = (dropped.clone(), forwarded.clone());
            let mut rng = Rng(seed ^ if up { 0x0F } else { 0xF0 });
            let trace = std::env::var_os("SYNCBENCH_TRACE").is_some();
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop_r.load(Ordering::SeqCst) {
                    let n = if up {
                        match recv_sock.recv_from(&mut buf) {
                            Ok((n, from)) => {
                                *client_r.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                                n
                            }
                            Err(_) => continue,
                        }
                    } else {
                        match recv_sock.recv(&mut buf) {
                            Ok(n) => n,
                            Err(_) => continue,
                        }
                    };
                    if rng.chance(loss) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        if trace {
                            say!(
                                "relay: dropped {} bytes {}",
                                n,
                                if up { "up" } else { "down" }
                            );
                        }
                        continue;
                    }
                    if trace {
                        say!(
                            "relay: passed {} bytes {}",
                            n,
                            if up { "up" } else { "down" }
                        );
                    }
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }));
            threads.push(std::thread::spawn(move || loop {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok((due, data)) => {
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        let sent = if up {
                            send_sock.send(&data)
                        } else {
                            let to = *client_s.lock().unwrap_or_else(|e| e.into_inner());
                            match to {
                                Some(to) => send_sock.send_to(&data, to),
                                None => continue,
                            }
                        };
                        if sent.is_ok() {
                            forwarded.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) if !stop_s.load(Ordering::SeqCst) => {}
                    Err(_) => break,
                }
            }));
        }
        Ok(Self {
            port,
            stop,
            threads,
            forwarded,
            dropped,
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the run found.

/// One tool's figure, or why there is none.
type Fig<T> = Result<T, String>;

struct InitFig {
    wall: Duration,
    rss: String,
    cpu: String,
    check: String,
}

struct BigFig {
    wire_bytes: u64,
    wire: String,
    time: Duration,
    check: String,
}

struct GitFig {
    converge: Duration,
    checkout: Duration,
    conflicts: String,
    check: String,
}

struct IdleFig {
    cpu: Duration,
    wire: String,
}

#[derive(Default)]
struct Report {
    tree: String,
    init: Vec<(String, Fig<InitFig>)>,
    /// Tool, save kind, samples.
    lat: Vec<(String, Save, Fig<Lat>)>,
    big: Vec<(String, Fig<BigFig>)>,
    git: Vec<(String, Fig<GitFig>)>,
    git_changes: usize,
    idle: Vec<(String, Fig<IdleFig>)>,
    lossy: Vec<(String, Save, Fig<Lat>)>,
    lossy_note: String,
    /// Facts about the cs side worth reading next to the figures.
    cs_notes: Vec<String>,
    /// Peers or rows that could not be measured, and why.
    missing: Vec<String>,
    /// Peak memory of the cs daemon and agent after the initial sync, in bytes.
    cs_peak: Option<u64>,
    /// How busy the machine was.
    load: String,
    /// The idle window.
    idle_secs: u64,
}

/// Runs one measurement; its failure becomes the row's text, except an interruption, which
/// ends the run.
fn attempt<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<Fig<T>> {
    match f() {
        Ok(v) => Ok(Ok(v)),
        Err(e) => {
            check_interrupted()?;
            say!("{what}: failed: {e:#}");
            Ok(Err(format!("{e:#}")))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// cs.

struct CsRun<'a> {
    cs: CsHome,
    tmp: &'a Path,
    ws_home: PathBuf,
    daemon: i32,
    agent: i32,
}

impl CsRun<'_> {
    fn run(&self, args: &[&str], limit: Duration) -> anyhow::Result<String> {
        Ok(self.cs.run(args, limit)?.0)
    }

    fn status(&self) -> anyhow::Result<serde_json::Value> {
        let out = self.run(&["daemon", "status", "--json"], SHORT)?;
        serde_json::from_str(&out).context("cs daemon status --json: not JSON")
    }

    /// UDP bytes sent plus received on the link to `ws`.
    fn wire_bytes(&self, ws: &str) -> anyhow::Result<u64> {
        let st = self.status()?;
        let links = st["links"]
            .as_array()
            .context("no links in daemon status")?;
        let l = links
            .iter()
            .find(|l| l["workspace"] == ws)
            .with_context(|| format!("no link to {ws} in the daemon status"))?;
        Ok(l["udp_tx_bytes"].as_u64().unwrap_or(0) + l["udp_rx_bytes"].as_u64().unwrap_or(0))
    }

    fn session(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        let out = self.run(&["sync", "list", "--json"], SHORT)?;
        let v: serde_json::Value = serde_json::from_str(&out).context("sync list: not JSON")?;
        v.as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .cloned()
            .with_context(|| format!("no session {name} in `cs sync list`"))
    }

    fn create(&self, local: &Path, target: &str, name: &str, extra: &[&str]) -> anyhow::Result<()> {
        let local = local.to_str().context("non-UTF-8 path")?;
        let mut args = vec!["sync", "create", local, target, "--name", name];
        args.extend_from_slice(extra);
        let out = self.run(&args, SHORT)?;
        ensure!(
            out.trim() == name,
            "cs sync create printed {out:?}, not {name}"
        );
        Ok(())
    }

    fn flush(&self, name: &str, limit: Duration) -> anyhow::Result<()> {
        self.run(&["sync", "flush", name], limit)?;
        Ok(())
    }

    fn terminate(&self, name: &str) {
        if let Err(e) = self.run(&["sync", "terminate", name], SHORT) {
            say!("cs sync terminate {name}: {e:#}");
        }
    }

    /// Notes a restart of the daemon or the local agent since the last look (their CPU and
    /// memory figures then cover only the new process), with the end of the agent's log.
    fn check_restarts(&mut self, phase: &str, r: &mut Report) {
        let agent = self.cs.agent_pid("bench", "dev").unwrap_or(0);
        if agent != self.agent {
            let log = self.cs.home.join("local/bench/dev/agent.log");
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(4).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            r.cs_notes.push(format!(
                "cs: the local agent was restarted during {phase} (pid {} before, {agent} \
                 after); its log ends: {}",
                self.agent,
                tail.join(" / ")
            ));
            self.agent = agent;
        }
        let daemon = self
            .status()
            .ok()
            .and_then(|s| s["pid"].as_i64())
            .unwrap_or(0) as i32;
        if daemon != self.daemon {
            r.cs_notes.push(format!(
                "cs: the daemon was restarted during {phase} (pid {} before, {daemon} after)",
                self.daemon
            ));
            self.daemon = daemon;
        }
    }

    fn cpu(&self) -> anyhow::Result<Duration> {
        Ok(proc_cpu(self.daemon)? + proc_cpu(self.agent)?)
    }

    /// "conflicts C, problems P" of a session, and whether both are zero.
    fn counts(&self, name: &str) -> anyhow::Result<(u64, String)> {
        let s = self.session(name)?;
        let c = s["conflicts"].as_u64().unwrap_or(0);
        let p = s["problems"].as_u64().unwrap_or(0);
        Ok((c, format!("{c} conflicts, {p} problems")))
    }
}

/// What every tool syncs, made once.
struct Ctx<'a> {
    o: &'a Opts,
    tmp: &'a Path,
    scratch: PathBuf,
    kernel: &'a Path,
    src: &'a Path,
    src_m: &'a Manifest,
    c_files: &'a [String],
    big_orig: &'a Path,
    repo: Option<&'a GitRepo>,
}

fn measure_cs(cs_bin: PathBuf, x: &Ctx<'_>, r: &mut Report) -> anyhow::Result<()> {
    let (o, tmp, scratch, src, src_m) = (x.o, x.tmp, &x.scratch, x.src, x.src_m);
    let mut cs = CsHome::new(cs_bin.clone(), &tmp.join("cs"))?;
    let said = cs.create_local("bench")?;
    say!("cs sandbox create bench --local: {}", said.trim());
    let show: serde_json::Value =
        serde_json::from_str(&cs.run(&["sandbox", "show", "bench", "--json"], SHORT)?.0)?;
    let ws_home = PathBuf::from(
        show[0]["home"]
            .as_str()
            .context("`cs sandbox show --json` gives no home")?,
    );
    let agent = cs.agent_pid("bench", "dev")?;
    let status: serde_json::Value =
        serde_json::from_str(&cs.run(&["daemon", "status", "--json"], SHORT)?.0)?;
    let daemon = status["pid"].as_i64().context("no daemon pid")? as i32;
    let mut c = CsRun {
        cs,
        tmp,
        ws_home,
        daemon,
        agent,
    };

    if o.only_lossy {
        return measure_lossy(&mut c, x, &cs_bin, r);
    }

    // 1. Initial sync.
    let alpha = tmp.join("cs-alpha");
    say!("cs: copying the tree for the laptop side");
    copy_tree(src, &alpha, scratch)?;
    let beta = c.ws_home.join("kernel");
    say!("cs: initial sync");
    let init = attempt("cs initial sync", || {
        let cpu0 = c.cpu()?;
        let start = Instant::now();
        c.create(&alpha, "bench/dev:kernel", "kernel", &[])?;
        c.flush("kernel", LONG)?;
        let wall = start.elapsed();
        let cpu = c.cpu()? - cpu0;
        let (d, a) = (proc_hwm(c.daemon)?, proc_hwm(c.agent)?);
        r.cs_peak = Some(d + a);
        let (_, counts) = c.counts("kernel")?;
        Ok(InitFig {
            wall,
            rss: format!("{} (daemon {} + agent {})", mb(d + a), mb(d), mb(a)),
            cpu: format!("{} (daemon + agent)", secs(cpu)),
            check: format!("{}; {counts}", verify(src_m, &beta, false, &[])),
        })
    })?;
    r.init
        .push(("`cs sync` (daemon + local agent, QUIC)".into(), init));
    c.check_restarts("the initial sync", r);

    // 2. Save-to-remote latency.
    let ok = r.init.last().is_some_and(|(_, f)| f.is_ok());
    if ok {
        say!("cs: {} edits of each kind", o.edits);
        let lat = attempt("cs edits", || {
            edit_latencies(
                &alpha,
                &beta,
                x.c_files,
                o.edits,
                o.seed,
                EDIT_LIMIT_CS,
                "cs",
            )
        })?;
        push_lat(&mut r.lat, "`cs sync`", lat);
        c.check_restarts("the edits", r);

        // 5. An idle session.
        say!("cs: idle for {:?}", o.idle);
        let idle = attempt("cs idle", || {
            c.flush("kernel", SHORT)?;
            std::thread::sleep(Duration::from_secs(2));
            let (cpu0, wire0) = (c.cpu()?, c.wire_bytes("bench/dev")?);
            sleep_checked(o.idle)?;
            let (cpu1, wire1) = (c.cpu()?, c.wire_bytes("bench/dev")?);
            Ok(IdleFig {
                cpu: cpu1 - cpu0,
                wire: format!("{} bytes", wire1.saturating_sub(wire0)),
            })
        })?;
        r.idle.push((
            format!("`cs sync` (daemon + agent, {} files)", file_count(src_m)),
            idle,
        ));
        c.check_restarts("the idle window", r);
    }
    c.terminate("kernel");

    // 3. A 1 KiB edit in a 100 MiB file.
    say!("cs: 1 KiB edit in the middle of a 100 MiB file");
    let big = attempt("cs big file", || {
        let dir = tmp.join("cs-big");
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(x.big_orig, dir.join("big.bin"))?;
        c.create(&dir, "bench/dev:big", "big", &[])?;
        c.flush("big", LONG)?;
        let remote = c.ws_home.join("big/big.bin");
        ensure!(
            std::fs::metadata(&remote).map(|m| m.len()).ok() == Some(BIG_BYTES),
            "the big file did not arrive whole"
        );
        std::thread::sleep(Duration::from_secs(1));
        let wire0 = c.wire_bytes("bench/dev")?;
        let patch = edit_big(&dir.join("big.bin"), o.seed)?;
        let time = wait_big(&remote, &patch, Duration::from_secs(120))?
            .context("the edit did not arrive within 120 s")?;
        c.flush("big", SHORT)?;
        let wire_bytes = c.wire_bytes("bench/dev")? - wire0;
        let same = hash_file(&remote)? == hash_file(&dir.join("big.bin"))?;
        c.terminate("big");
        Ok(BigFig {
            wire_bytes,
            wire: "UDP payload, both ways (daemon status)".into(),
            time,
            check: if same { "identical" } else { "DIFFERENT" }.into(),
        })
    })?;
    r.big.push(("`cs sync`".into(), big));
    c.check_restarts("the big-file edit", r);

    // 4. git checkout.
    if let Some(repo) = x.repo {
        say!("cs: git checkout of {} changes", repo.changes);
        let git = attempt("cs git checkout", || {
            let dir = tmp.join("cs-git");
            copy_tree(&repo.template, &dir, scratch)?;
            let start = Instant::now();
            c.create(&dir, "bench/dev:git", "git", &["--ignore-vcs"])?;
            c.flush("git", LONG)?;
            say!(
                "cs: the repository's first sync took {}",
                secs(start.elapsed())
            );
            let remote = c.ws_home.join("git");
            let want_cheap = cheap(&repo.other);
            let home = tmp.join("git-home");
            let start = Instant::now();
            run_git(&dir, &home, scratch, &["checkout", "-q", "other"])?;
            let checkout = start.elapsed();
            let converge = loop {
                check_interrupted()?;
                ensure!(
                    start.elapsed() < LONG,
                    "the workspace did not converge within {LONG:?}"
                );
                if manifest(&remote, false, &[])? == want_cheap
                    && manifest(&remote, true, &[])? == repo.other
                {
                    break start.elapsed();
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            say!("cs: converged after {}", secs(converge));
            let flushed = Instant::now();
            c.flush("git", SHORT)?;
            say!(
                "cs: `cs sync flush git` then took {}",
                secs(flushed.elapsed())
            );
            let (conflicts, counts) = c.counts("git")?;
            let check = verify(&repo.other, &remote, true, &[]);
            c.terminate("git");
            Ok(GitFig {
                converge,
                checkout,
                conflicts: format!("{conflicts}"),
                check: format!("{check}; {counts}"),
            })
        })?;
        r.git.push(("`cs sync --ignore-vcs`".into(), git));
        c.check_restarts("the git checkout", r);
    }

    measure_lossy(&mut c, x, &cs_bin, r)
}

/// 6. Through a lossy relay.
fn measure_lossy(
    c: &mut CsRun<'_>,
    x: &Ctx<'_>,
    cs_bin: &Path,
    r: &mut Report,
) -> anyhow::Result<()> {
    let o = x.o;
    say!(
        "cs: through a relay dropping {:.0}% and adding {:?} each way",
        o.loss * 100.0,
        ONE_WAY_DELAY
    );
    let lossy = attempt("cs lossy", || {
        lossy_run(c, o, x.kernel, &cs_bin.with_file_name("cs-agent"), r)
    })?;
    match lossy {
        Ok(lat) => push_lat(&mut r.lossy, "`cs sync` through the relay", Ok(lat)),
        Err(e) => push_lat(&mut r.lossy, "`cs sync` through the relay", Err(e)),
    }
    c.check_restarts("the lossy-link edits", r);
    for e in c.cs.cleanup() {
        r.cs_notes
            .push(format!("cs: cleanup failed: {}", cell_error(&e)));
    }
    Ok(())
}

/// Kills (by pid) and lists the processes still running whose command line names `dir`:
/// what was left behind after cleanup.
fn reap_leftovers(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if pid != me && cmd.contains(&needle) {
            // SAFETY: plain syscall; the process runs a command on our private directory.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            found.push(format!("pid {pid}: {}", cmd.trim()));
        }
    }
    found
}

fn push_lat(rows: &mut Vec<(String, Save, Fig<Lat>)>, tool: &str, lat: Fig<[Lat; 2]>) {
    match lat {
        Ok(l) => {
            for (s, l) in SAVES.into_iter().zip(l) {
                rows.push((tool.into(), s, Ok(l)));
            }
        }
        Err(e) => {
            for s in SAVES {
                rows.push((tool.into(), s, Err(e.clone())));
            }
        }
    }
}

fn sleep_checked(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(100)));
    }
    Ok(())
}

/// An agent of our own behind the relay, paired through it, and a session to it.
fn lossy_run(
    c: &mut CsRun<'_>,
    o: &Opts,
    kernel: &Path,
    agent_bin: &Path,
    r: &mut Report,
) -> anyhow::Result<[Lat; 2]> {
    let dir = c.tmp.join("lossy");
    let (home, root) = (dir.join("home"), dir.join("root"));
    std::fs::create_dir_all(&home)?;
    std::fs::create_dir_all(&root)?;
    let agent_port = free_udp_port()?;
    let relay = Relay::start(
        SocketAddr::from(([127, 0, 0, 1], agent_port)),
        o.loss,
        ONE_WAY_DELAY,
        o.seed,
    )?;
    let log = dir.join("agent.log");
    let mut agent = Bg::spawn(
        Command::new(agent_bin)
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{agent_port}"))
            .arg("--home")
            .arg(&home)
            .arg("--root")
            .arg(&root)
            .arg("--advertise")
            .arg(format!("127.0.0.1:{}", relay.port))
            .env_remove("CS_LOG"),
        &log,
        "cs-agent serve",
    )?;
    let start = Instant::now();
    let pairing = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.starts_with("cs-pair/")) {
            break l.trim().to_string();
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "cs-agent printed no pairing line within 30 s: {}",
            agent.log_tail(10)
        );
        check_interrupted()?;
        agent.check_alive("cs-agent serve")?;
        std::thread::sleep(Duration::from_millis(20));
    };
    c.cs.add("lossy/dev", &pairing)?;
    let alpha = dir.join("alpha");
    copy_tree(
        &kernel.join(o.scale().lossy_dir),
        &alpha,
        &c.tmp.join("scratch"),
    )?;
    let start = Instant::now();
    c.create(&alpha, "lossy/dev:proj", "lossy", &[])?;
    c.flush("lossy", LONG)?;
    let init = start.elapsed();
    say!("cs: initial sync through the relay took {}", secs(init));
    let files: Vec<String> = manifest(&alpha, false, &[])?
        .into_keys()
        .filter(|k| k.ends_with(".c"))
        .collect();
    let beta = home.join("proj");
    let lat = edit_latencies(
        &alpha,
        &beta,
        &files,
        o.lossy_edits,
        o.seed,
        EDIT_LIMIT_CS,
        "cs lossy",
    );
    c.terminate("lossy");
    let (fwd, dropped) = (
        relay.forwarded.load(Ordering::Relaxed),
        relay.dropped.load(Ordering::Relaxed),
    );
    r.lossy_note = format!(
        "Relay: {:.0}% loss and {} ms each way (RTT {} ms), seed {}; {fwd} datagrams forwarded, \
         {dropped} dropped ({:.1}%). Tree: {}/ ({} files), initial sync through the relay \
         {}.",
        o.loss * 100.0,
        ONE_WAY_DELAY.as_millis(),
        2 * ONE_WAY_DELAY.as_millis(),
        o.seed,
        100.0 * dropped as f64 / (fwd + dropped).max(1) as f64,
        o.scale().lossy_dir,
        file_count(&manifest(&alpha, false, &[])?),
        secs(init),
    );
    drop(agent);
    drop(relay);
    lat
}

// ---------------------------------------------------------------------------------------------
// Peers.

/// Environment for unison: its archives under `dir`, never in the user's ~/.unison.
fn unison(dir: &Path, a: &Path, b: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new("unison");
    c.arg(a)
        .arg(b)
        .args(["-batch", "-ui", "text", "-confirmbigdel=false"])
        .args(extra)
        .env("UNISON", dir);
    c
}

/// "(N items transferred, M skipped, K failed)" from unison's summary: the skipped ones
/// are its conflicts.
fn unison_skipped(out: &str) -> String {
    out.lines()
        .rev()
        .find_map(|l| {
            let i = l.find(" skipped")?;
            let head = &l[..i];
            let n = head.rsplit([' ', '(']).next()?;
            n.parse::<u64>().ok().map(|n| n.to_string())
        })
        .unwrap_or_else(|| "0".into())
}

struct Peers<'a> {
    x: &'a Ctx<'a>,
    sshd: Option<&'a Sshd>,
    rsync: bool,
    unison: bool,
}

impl Peers<'_> {
    fn ssh_e(&self, sshd: &Sshd, verbose: bool) -> String {
        let mut argv = sshd.ssh_argv(false);
        if verbose {
            for a in argv.iter_mut() {
                if a == "LogLevel=ERROR" {
                    *a = "LogLevel=VERBOSE".into();
                }
            }
        }
        argv.iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn rsync_ssh(
        &self,
        sshd: &Sshd,
        args: &[&str],
        from: &Path,
        to: &Path,
        verbose: bool,
    ) -> Command {
        let mut c = Command::new("rsync");
        c.args(args)
            .arg("-e")
            .arg(self.ssh_e(sshd, verbose))
            .arg(format!("{}/", from.display()))
            .arg(format!("127.0.0.1:{}/", to.display()))
            .env_remove("SSH_AUTH_SOCK");
        c
    }

    fn initial(&self, r: &mut Report) -> anyhow::Result<()> {
        let usage_cells = |u: &Usage, local_only: bool| {
            let suffix = if local_only { ", local side only" } else { "" };
            (
                format!("{} (largest process{suffix})", mb(u.max_rss_bytes)),
                format!(
                    "{}{}",
                    secs(u.cpu),
                    if local_only { " (local side only)" } else { "" }
                ),
            )
        };
        if self.rsync {
            say!("rsync -a, local");
            let dst = self.x.tmp.join("rsync-local");
            let f = attempt("rsync local", || {
                let Finished {
                    took: wall,
                    usage: u,
                    ..
                } = run_measured(
                    Command::new("rsync")
                        .arg("-a")
                        .arg(format!("{}/", self.x.src.display()))
                        .arg(&dst),
                    &self.x.scratch,
                    LONG,
                    "rsync -a (local)",
                )?;
                let (rss, cpu) = usage_cells(&u, false);
                Ok(InitFig {
                    wall,
                    rss,
                    cpu,
                    check: verify(self.x.src_m, &dst, false, &[]),
                })
            })?;
            r.init.push(("`rsync -a` local to local".into(), f));
            if let Some(sshd) = self.sshd {
                say!("rsync -a over ssh");
                let dst = self.x.tmp.join("rsync-ssh");
                let f = attempt("rsync ssh", || {
                    let Finished {
                        took: wall,
                        usage: u,
                        ..
                    } = run_measured(
                        &mut self.rsync_ssh(sshd, &["-a"], self.x.src, &dst, false),
                        &self.x.scratch,
                        LONG,
                        "rsync -a over ssh",
                    )?;
                    let (rss, cpu) = usage_cells(&u, true);
                    Ok(InitFig {
                        wall,
                        rss,
                        cpu,
                        check: verify(self.x.src_m, &dst, false, &[]),
                    })
                })?;
                r.init.push(("`rsync -a` over ssh to 127.0.0.1".into(), f));
            }
        }
        if self.unison {
            say!("unison, two local roots");
            let (a, b) = (self.x.tmp.join("unison-a"), self.x.tmp.join("unison-b"));
            let f = attempt("unison initial", || {
                copy_tree(self.x.src, &a, &self.x.scratch)?;
                std::fs::create_dir_all(&b)?;
                let home = self.x.tmp.join("unison-home");
                std::fs::create_dir_all(&home)?;
                let Finished {
                    took: wall,
                    usage: u,
                    ..
                } = run_measured(
                    &mut unison(&home, &a, &b, &[]),
                    &self.x.scratch,
                    LONG,
                    "unison (initial)",
                )?;
                let (rss, cpu) = usage_cells(&u, false);
                Ok(InitFig {
                    wall,
                    rss,
                    cpu,
                    check: verify(self.x.src_m, &b, false, &[]),
                })
            })?;
            r.init.push(("`unison -batch` two local roots".into(), f));
        }
        Ok(())
    }

    fn big(&self, r: &mut Report) -> anyhow::Result<()> {
        let Some(sshd) = self.sshd.filter(|_| self.rsync) else {
            return Ok(());
        };
        say!("rsync over ssh: 1 KiB edit in a 100 MiB file");
        let (src, dst) = (
            self.x.tmp.join("rsync-big"),
            self.x.tmp.join("rsync-big-dst"),
        );
        let f = attempt("rsync big file", || {
            std::fs::create_dir_all(&src)?;
            std::fs::copy(self.x.big_orig, src.join("big.bin"))?;
            run_measured(
                &mut self.rsync_ssh(sshd, &["-a"], &src, &dst, false),
                &self.x.scratch,
                LONG,
                "rsync (first copy)",
            )?;
            // What opening a connection costs, to read the time below with.
            let Finished { took: ssh_true, .. } = run_measured(
                &mut sshd.ssh(false, &[], Some("true")),
                &self.x.scratch,
                SHORT,
                "ssh true",
            )?;
            edit_big(&src.join("big.bin"), self.x.o.seed)?;
            let Finished {
                took: time,
                out,
                err,
                ..
            } = run_measured(
                &mut self.rsync_ssh(sshd, &["-a", "--stats"], &src, &dst, true),
                &self.x.scratch,
                LONG,
                "rsync --stats over ssh",
            )?;
            let stat = |key: &str| -> Option<u64> {
                let l = out.lines().find(|l| l.starts_with(key))?;
                let v: String = l[key.len()..]
                    .chars()
                    .filter(|c| c.is_ascii_digit())
                    .collect();
                v.parse().ok()
            };
            let proto =
                stat("Total bytes sent:").unwrap_or(0) + stat("Total bytes received:").unwrap_or(0);
            // OpenSSH's client says at VERBOSE: "Transferred: sent N, received M bytes".
            let ssh_bytes = err.lines().find_map(|l| {
                let rest = &l[l.find("Transferred: sent ")? + "Transferred: sent ".len()..];
                let (sent, rest) = rest.split_once(", received ")?;
                let recv = rest.split_whitespace().next()?;
                Some(sent.trim().parse::<u64>().ok()? + recv.parse::<u64>().ok()?)
            });
            let same = hash_file(&dst.join("big.bin"))? == hash_file(&src.join("big.bin"))?;
            let (wire_bytes, wire) = match ssh_bytes {
                Some(b) => (
                    b,
                    format!(
                        "ssh packets both ways, incl. its handshake (ssh -v); rsync's own \
                         --stats: {proto} bytes"
                    ),
                ),
                None => (
                    proto,
                    "rsync --stats (sent + received; ssh overhead not counted)".into(),
                ),
            };
            Ok(BigFig {
                wire_bytes,
                wire,
                time,
                check: format!(
                    "{}; the time includes a new ssh connection (`ssh true`: {})",
                    if same { "identical" } else { "DIFFERENT" },
                    ms(ssh_true.as_secs_f64() * 1e3)
                ),
            })
        })?;
        r.big.push(("`rsync -a --stats` over ssh".into(), f));
        Ok(())
    }

    fn git(&self, r: &mut Report) -> anyhow::Result<()> {
        let Some(repo) = self.x.repo else {
            return Ok(());
        };
        let home = self.x.tmp.join("git-home");
        if let Some(sshd) = self.sshd.filter(|_| self.rsync) {
            say!("rsync over ssh after git checkout");
            let (dir, dst) = (
                self.x.tmp.join("git-rsync"),
                self.x.tmp.join("git-rsync-dst"),
            );
            let f = attempt("rsync git", || {
                copy_tree(&repo.template, &dir, &self.x.scratch)?;
                let args = ["-a", "--delete", "--exclude=/.git"];
                run_measured(
                    &mut self.rsync_ssh(sshd, &args, &dir, &dst, false),
                    &self.x.scratch,
                    LONG,
                    "rsync (first copy)",
                )?;
                let start = Instant::now();
                run_git(&dir, &home, &self.x.scratch, &["checkout", "-q", "other"])?;
                let checkout = start.elapsed();
                run_measured(
                    &mut self.rsync_ssh(sshd, &args, &dir, &dst, false),
                    &self.x.scratch,
                    LONG,
                    "rsync after checkout",
                )?;
                Ok(GitFig {
                    converge: start.elapsed(),
                    checkout,
                    conflicts: "n/a (one-way)".into(),
                    check: verify(&repo.other, &dst, true, &[]),
                })
            })?;
            r.git
                .push(("`git checkout` + `rsync -a --delete` over ssh".into(), f));
        }
        if self.unison {
            say!("unison after git checkout");
            let (a, b) = (
                self.x.tmp.join("git-unison-a"),
                self.x.tmp.join("git-unison-b"),
            );
            let f = attempt("unison git", || {
                copy_tree(&repo.template, &a, &self.x.scratch)?;
                std::fs::create_dir_all(&b)?;
                let uhome = self.x.tmp.join("unison-git-home");
                std::fs::create_dir_all(&uhome)?;
                let ignore = ["-ignore", "Name .git"];
                run_measured(
                    &mut unison(&uhome, &a, &b, &ignore),
                    &self.x.scratch,
                    LONG,
                    "unison (first sync)",
                )?;
                let start = Instant::now();
                run_git(&a, &home, &self.x.scratch, &["checkout", "-q", "other"])?;
                let checkout = start.elapsed();
                let Finished { out, err, .. } = run_measured(
                    &mut unison(&uhome, &a, &b, &ignore),
                    &self.x.scratch,
                    LONG,
                    "unison after checkout",
                )?;
                Ok(GitFig {
                    converge: start.elapsed(),
                    checkout,
                    conflicts: unison_skipped(&format!("{out}{err}")),
                    check: verify(&repo.other, &b, true, &[]),
                })
            })?;
            r.git.push(("`git checkout` + `unison -batch`".into(), f));
        }
        Ok(())
    }

    /// unison's continuous mode on the roots of its initial sync.
    fn unison_repeat(&self, r: &mut Report) -> anyhow::Result<()> {
        let (a, b) = (self.x.tmp.join("unison-a"), self.x.tmp.join("unison-b"));
        let ok = r
            .init
            .iter()
            .any(|(t, f)| t.contains("unison") && f.is_ok());
        if !self.unison || !ok {
            return Ok(());
        }
        let watch = on_path("unison-fsmonitor");
        let (tool, repeat) = if watch {
            ("`unison -repeat watch`", "watch")
        } else {
            r.missing.push(
                "`unison -repeat watch`: not measured: unison-fsmonitor is not installed (this \
                 unison package does not ship it); `unison -repeat 1` (a full scan every second) \
                 is measured instead"
                    .into(),
            );
            ("`unison -repeat 1` (polling)", "1")
        };
        say!(
            "unison -repeat {repeat}: {} edits of each kind",
            self.x.o.peer_edits
        );
        let home = self.x.tmp.join("unison-home");
        let mut bg = Bg::spawn(
            &mut unison(&home, &a, &b, &["-repeat", repeat]),
            &self.x.tmp.join("unison-repeat.log"),
            "unison -repeat",
        )?;
        let lat = attempt("unison edits", || {
            probe(&a, &b, Duration::from_secs(600), || {
                bg.check_alive("unison -repeat")
            })?;
            edit_latencies(
                &a,
                &b,
                self.x.c_files,
                self.x.o.peer_edits,
                self.x.o.seed,
                EDIT_LIMIT_PEER,
                "unison",
            )
        })?;
        let ok = lat.is_ok();
        push_lat(&mut r.lat, tool, lat);
        if ok {
            let pid = bg.pid();
            let idle = attempt("unison idle", || idle_cpu(&[pid], self.x.o.idle))?;
            r.idle.push((tool.into(), idle));
        }
        drop(bg);
        Ok(())
    }

    fn syncthing(&self, r: &mut Report) -> anyhow::Result<()> {
        say!("syncthing: two instances on 127.0.0.1");
        let (a, b) = (
            self.x.tmp.join("syncthing-a"),
            self.x.tmp.join("syncthing-b"),
        );
        let st = attempt("syncthing setup", || {
            copy_tree(self.x.src, &a, &self.x.scratch)?;
            copy_tree(self.x.src, &b, &self.x.scratch)?;
            Syncthing::start(&self.x.tmp.join("syncthing"), [&a, &b], &self.x.scratch)
        })?;
        let tool = "syncthing (fsWatcher, 1 s delay)";
        let mut st = match st {
            Ok(st) => st,
            Err(e) => {
                r.missing
                    .push(format!("syncthing: not measured: {}", cell_error(&e)));
                return Ok(());
            }
        };
        let lat = attempt("syncthing edits", || {
            st.wait_ready(LONG)?;
            probe(&a, &b, Duration::from_secs(300), || st.check_alive())?;
            say!("syncthing: {} edits of each kind", self.x.o.peer_edits);
            edit_latencies(
                &a,
                &b,
                self.x.c_files,
                self.x.o.peer_edits,
                self.x.o.seed,
                EDIT_LIMIT_PEER,
                "syncthing",
            )
        })?;
        let ok = lat.is_ok();
        push_lat(&mut r.lat, tool, lat);
        if ok {
            let pids: Vec<i32> = st.procs.iter().map(Bg::pid).collect();
            let idle = attempt("syncthing idle", || idle_cpu(&pids, self.x.o.idle))?;
            r.idle.push(("syncthing (both instances)".into(), idle));
        }
        drop(st);
        Ok(())
    }
}

fn idle_cpu(pids: &[i32], window: Duration) -> anyhow::Result<IdleFig> {
    let cpu =
        |pids: &[i32]| -> anyhow::Result<Duration> { pids.iter().map(|p| proc_cpu(*p)).sum() };
    std::thread::sleep(Duration::from_secs(2));
    let c0 = cpu(pids)?;
    sleep_checked(window)?;
    Ok(IdleFig {
        cpu: cpu(pids)? - c0,
        wire: "n/a".into(),
    })
}

/// Two syncthing instances on 127.0.0.1 sharing one folder, without discovery, relays, NAT
/// traversal, usage reports or upgrades.
struct Syncthing {
    procs: Vec<Bg>,
    guis: [u16; 2],
    ids: [String; 2],
    key: String,
}

impl Syncthing {
    fn start(dir: &Path, roots: [&Path; 2], scratch: &Path) -> anyhow::Result<Self> {
        ensure!(on_path("syncthing"), "syncthing is not installed");
        let homes = [dir.join("a"), dir.join("b")];
        let mut ids = [String::new(), String::new()];
        for (i, h) in homes.iter().enumerate() {
            std::fs::create_dir_all(h)?;
            run_captured(
                Command::new("syncthing")
                    .args(["generate", "--no-default-folder", "--home"])
                    .arg(h),
                scratch,
                SHORT,
                "syncthing generate",
            )?;
            let (out, _) = run_captured(
                Command::new("syncthing")
                    .args(["serve", "--device-id", "--home"])
                    .arg(h),
                scratch,
                SHORT,
                "syncthing serve --device-id",
            )?;
            ids[i] = out.trim().to_string();
            ensure!(ids[i].len() > 50, "unexpected device id {out:?}");
        }
        let listen = [free_tcp_port()?, free_tcp_port()?];
        let guis = [free_tcp_port()?, free_tcp_port()?];
        let key = format!("syncbench{:016x}", Rng(std::process::id() as u64).next());
        let devices: String = (0..2)
            .map(|j| {
                format!(
                    "<device id=\"{}\" name=\"{}\" compression=\"never\"><address>tcp://127.0.0.1:{}</address></device>\n",
                    ids[j],
                    ["a", "b"][j],
                    listen[j]
                )
            })
            .collect();
        let mut procs = Vec::new();
        for i in 0..2 {
            std::fs::create_dir_all(roots[i].join(".stfolder"))?;
            let config = format!(
                "<configuration version=\"36\">\n\
                 <folder id=\"bench\" label=\"bench\" path=\"{path}\" type=\"sendreceive\" \
                 rescanIntervalS=\"3600\" fsWatcherEnabled=\"true\" fsWatcherDelayS=\"1\" \
                 ignorePerms=\"false\" autoNormalize=\"true\">\n\
                 <filesystemType>basic</filesystemType>\n\
                 <device id=\"{a}\"></device>\n<device id=\"{b}\"></device>\n\
                 <minDiskFree unit=\"%\">0</minDiskFree>\n<markerName>.stfolder</markerName>\n\
                 </folder>\n{devices}\
                 <gui enabled=\"true\" tls=\"false\"><address>127.0.0.1:{gui}</address>\
                 <apikey>{key}</apikey></gui>\n\
                 <options>\n<listenAddress>tcp://127.0.0.1:{port}</listenAddress>\n\
                 <globalAnnounceEnabled>false</globalAnnounceEnabled>\n\
                 <localAnnounceEnabled>false</localAnnounceEnabled>\n\
                 <relaysEnabled>false</relaysEnabled>\n<natEnabled>false</natEnabled>\n\
                 <urAccepted>-1</urAccepted>\n<autoUpgradeIntervalH>0</autoUpgradeIntervalH>\n\
                 <startBrowser>false</startBrowser>\n\
                 <crashReportingEnabled>false</crashReportingEnabled>\n\
                 <setLowPriority>false</setLowPriority>\n\
                 </options>\n</configuration>\n",
                path = roots[i].display(),
                a = ids[0],
                b = ids[1],
                gui = guis[i],
                port = listen[i],
            );
            std::fs::write(homes[i].join("config.xml"), config)?;
            procs.push(Bg::spawn(
                Command::new("syncthing")
                    .args([
                        "serve",
                        "--no-browser",
                        "--no-restart",
                        "--no-upgrade",
                        "--home",
                    ])
                    .arg(&homes[i])
                    .env("STNODEFAULTFOLDER", "1")
                    .env("STNOUPGRADE", "1")
                    .env("HOME", &homes[i]),
                &homes[i].join("log.txt"),
                "syncthing serve",
            )?);
        }
        Ok(Self {
            procs,
            guis,
            ids,
            key,
        })
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            p.check_alive("syncthing")?;
        }
        Ok(())
    }

    fn get(&self, i: usize, path: &str) -> anyhow::Result<serde_json::Value> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.guis[i]));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nX-API-Key: {}\r\n\r\n",
            self.key
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
        ensure!(
            head.split_whitespace().nth(1) == Some("200"),
            "GET {path}: {}",
            head.lines().next().unwrap_or("")
        );
        serde_json::from_str(body).with_context(|| format!("GET {path}: not JSON"))
    }

    /// Both instances connected, idle, needing nothing, and seeing the other complete.
    fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        loop {
            check_interrupted()?;
            self.check_alive()?;
            let mut ready = true;
            for i in 0..2 {
                let other = &self.ids[1 - i];
                let state = (|| -> anyhow::Result<(bool, String)> {
                    let conn = self.get(i, "/rest/system/connections")?;
                    let status = self.get(i, "/rest/db/status?folder=bench")?;
                    let done = self.get(
                        i,
                        &format!("/rest/db/completion?folder=bench&device={other}"),
                    )?;
                    let connected = conn["connections"][other]["connected"] == true;
                    let idle = status["state"] == "idle";
                    let need = status["needTotalItems"].as_u64().unwrap_or(1);
                    let completion = done["completion"].as_f64().unwrap_or(0.0);
                    Ok((
                        connected && idle && need == 0 && completion >= 100.0,
                        format!(
                            "connected {connected}, state {}, need {need}, other at {completion:.1}%",
                            status["state"]
                        ),
                    ))
                })();
                match state {
                    Ok((r, text)) => {
                        ready &= r;
                        last = format!("instance {}: {text}", ["a", "b"][i]);
                    }
                    Err(e) => {
                        ready = false;
                        last = format!("{e:#}");
                    }
                }
            }
            if ready {
                say!(
                    "syncthing: ready after {:.0} s",
                    start.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            ensure!(
                start.elapsed() < limit,
                "syncthing did not settle within {limit:?}; last: {last}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The table.

fn print_report(r: &Report, o: &Opts, command: &str, versions: &[String]) {
    println!();
    println!("# Continuous sync: cs against rsync, unison and syncthing on 127.0.0.1");
    println!();
    println!("{}", machine_line(versions));
    println!(
        "Command: `{command}`. Tree: {}. Seed {}; {}. Every figure below was measured in this \
         run.",
        r.tree, o.seed, r.load
    );

    println!();
    println!("## 1. Initial sync of the tree (one run each)");
    println!();
    println!("| tool | wall time | vs cs | peak memory | CPU | check |");
    println!("|---|--:|---|--:|--:|---|");
    print_compared(
        &r.init,
        |f| f.wall.as_secs_f64(),
        vs,
        |f| {
            [
                secs(f.wall),
                f.rss.clone(),
                f.cpu.clone(),
                cell_error(&f.check),
            ]
        },
    );

    println!();
    println!(
        "## 2. Save-to-remote latency of single-file edits (random .c files; from the save to \
         identical content on the far side, polled every 1 ms; edits 50-100 ms apart)"
    );
    println!();
    print_lat(&r.lat, false);

    println!();
    println!("## 3. A 1 KiB edit in the middle of a 100 MiB file");
    println!();
    println!(
        "| tool | bytes on the wire | vs cs | time to the far side | what was counted | check |"
    );
    println!("|---|--:|---|--:|---|---|");
    print_compared(
        &r.big,
        |f| f.wire_bytes as f64,
        |base, v| match base {
            Some(b) if b > 0.0 && v >= b => format!("{}x more", ratio(v / b)),
            Some(b) if v > 0.0 => format!("{}x fewer", ratio(b / v)),
            _ => "n/a".into(),
        },
        |f| {
            [
                f.wire_bytes.to_string(),
                ms(f.time.as_secs_f64() * 1e3),
                f.wire.clone(),
                cell_error(&f.check),
            ]
        },
    );

    println!();
    println!(
        "## 4. `git checkout` changing {} paths ({} modified, {} deleted, {} added, in {}; \
         .git not synced): from the checkout's start until the far side \
         is identical (paths, sizes, blake3)",
        r.git_changes,
        o.scale().git_modified,
        o.scale().git_deleted,
        o.scale().git_added,
        o.scale().git_dirs.join(" "),
    );
    println!();
    println!("| tool | converged after | vs cs | of which `git checkout` | conflicts | check |");
    println!("|---|--:|---|--:|--:|---|");
    print_compared(
        &r.git,
        |f| f.converge.as_secs_f64(),
        vs,
        |f| {
            [
                secs(f.converge),
                secs(f.checkout),
                f.conflicts.to_string(),
                cell_error(&f.check),
            ]
        },
    );

    println!();
    println!(
        "## 5. CPU of an idle session over {} s (utime + stime from /proc)",
        o.idle.as_secs()
    );
    println!();
    println!("| tool | CPU used | share of one core | bytes on the wire |");
    println!("|---|--:|--:|--:|");
    for (tool, f) in &r.idle {
        match f {
            Ok(f) => println!(
                "| {tool} | {} | {:.2}% | {} |",
                ms(f.cpu.as_secs_f64() * 1e3),
                100.0 * f.cpu.as_secs_f64() / o.idle.as_secs_f64(),
                f.wire
            ),
            Err(e) => println!("| {tool} | failed: {} | | |", cell_error(e)),
        }
    }

    println!();
    println!("## 6. Save-to-remote latency through a lossy relay");
    println!();
    if !r.lossy_note.is_empty() {
        println!("{}", r.lossy_note);
        println!();
    }
    print_lat(&r.lossy, true);

    println!();
    println!("## Against the issue's targets");
    println!();
    for t in targets(r) {
        println!("- {t}");
    }
    if !r.cs_notes.is_empty() || !r.missing.is_empty() {
        println!();
        println!("## Not measured, and notes");
        println!();
        for m in r.missing.iter().chain(&r.cs_notes) {
            println!("- {m}");
        }
    }
}

fn print_lat(rows: &[(String, Save, Fig<Lat>)], p95: bool) {
    println!(
        "| tool | save | N | p50 (median) | {} | max | timed out | vs cs (p50) |",
        if p95 { "p95 | p99" } else { "p99" }
    );
    println!(
        "|---|---|--:|--:|--:|{}--:|--:|---|",
        if p95 { "--:|" } else { "" }
    );
    for (tool, save, f) in rows {
        let base = rows
            .iter()
            .find(|(t, s, _)| t.contains("cs sync") && s == save)
            .and_then(|(_, _, f)| f.as_ref().ok())
            .and_then(|l| l.q(0.5));
        match f {
            Ok(l) if !l.ms.is_empty() => {
                let p50 = l.q(0.5).unwrap_or(0.0);
                let v = if tool.contains("cs sync") {
                    "1.0x (baseline)".into()
                } else {
                    vs(base, p50)
                };
                let mid = if p95 {
                    format!(
                        "{} | {}",
                        ms(l.q(0.95).unwrap_or(0.0)),
                        ms(l.q(0.99).unwrap_or(0.0))
                    )
                } else {
                    ms(l.q(0.99).unwrap_or(0.0))
                };
                println!(
                    "| {tool} | {} | {} | {} | {mid} | {} | {} | {v} |",
                    save.label(),
                    l.ms.len(),
                    ms(p50),
                    ms(l.q(1.0).unwrap_or(0.0)),
                    l.timeouts
                );
            }
            Ok(l) => println!(
                "| {tool} | {} | 0 | every edit timed out ({}) | | |{} | |",
                save.label(),
                l.timeouts,
                if p95 { " |" } else { "" }
            ),
            Err(e) => println!(
                "| {tool} | {} | failed: {} | | | |{} | |",
                save.label(),
                cell_error(e),
                if p95 { " |" } else { "" }
            ),
        }
    }
}

/// The targets, each with what this run measured.
fn targets(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    let mark = |ok: bool| if ok { "met" } else { "NOT met" };
    let init = |needle: &str| {
        r.init
            .iter()
            .find(|(t, _)| t.contains(needle))
            .and_then(|(_, f)| f.as_ref().ok())
            .map(|f| f.wall)
    };
    match (init("cs sync"), init("over ssh")) {
        (Some(c), Some(s)) => out.push(format!(
            "Initial sync faster than rsync over ssh: {} (cs {}, rsync over ssh {}).",
            mark(c < s),
            secs(c),
            secs(s)
        )),
        _ => out.push("Initial sync faster than rsync over ssh: not measured (see above).".into()),
    }
    match r.cs_peak {
        Some(p) => out.push(format!(
            "Peak memory under 300 MB (daemon + agent, initial sync): {} ({}).",
            mark(p < 300_000_000),
            mb(p)
        )),
        None => out.push("Peak memory under 300 MB: not measured.".into()),
    }
    for (tool, save, f) in &r.lat {
        if let (true, Ok(l)) = (tool.contains("cs sync"), f) {
            match l.q(0.99) {
                Some(p99) => out.push(format!(
                    "Save-to-remote p99 under 50 ms ({}): {} (p99 {}, {} timed out).",
                    save.label(),
                    mark(p99 < 50.0 && l.timeouts == 0),
                    ms(p99),
                    l.timeouts
                )),
                None => out.push(format!(
                    "Save-to-remote p99 under 50 ms ({}): NOT met (no edit arrived).",
                    save.label()
                )),
            }
        }
    }
    let big = |needle: &str| {
        r.big
            .iter()
            .find(|(t, _)| t.contains(needle))
            .and_then(|(_, f)| f.as_ref().ok())
            .map(|f| f.wire_bytes)
    };
    match (big("cs sync"), big("rsync")) {
        (Some(c), Some(s)) => out.push(format!(
            "1 KiB edit of a 100 MiB file: no more bytes than rsync: {} (cs {c}, rsync {s}).",
            mark(c <= s)
        )),
        _ => out.push("1 KiB edit of a 100 MiB file: not compared (see above).".into()),
    }
    match r.git.iter().find(|(t, _)| t.contains("cs sync")) {
        Some((_, Ok(g))) => out.push(format!(
            "git checkout: 0 conflicts: {} ({} conflicts; converged in {}).",
            mark(g.conflicts == "0"),
            g.conflicts,
            secs(g.converge)
        )),
        _ => out.push("git checkout: not measured for cs (see above).".into()),
    }
    if let Some((_, Ok(i))) = r.idle.iter().find(|(t, _)| t.contains("cs sync")) {
        out.push(format!(
            "Idle CPU close to zero: {} of CPU in {} s ({:.2}% of one core), {} on the wire \
             (see 5).",
            ms(i.cpu.as_secs_f64() * 1e3),
            r.idle_secs,
            100.0 * i.cpu.as_secs_f64() / r.idle_secs.max(1) as f64,
            i.wire
        ));
    }
    for (_, save, f) in &r.lossy {
        if let Ok(l) = f {
            match l.q(0.95) {
                Some(p95) => out.push(format!(
                    "Lossy link p95 under 150 ms ({}): {} (p95 {}, {} timed out).",
                    save.label(),
                    mark(p95 < 150.0 && l.timeouts * 20 <= l.ms.len() + l.timeouts),
                    ms(p95),
                    l.timeouts
                )),
                None => out.push(format!(
                    "Lossy link p95 under 150 ms ({}): NOT met (no edit arrived).",
                    save.label()
                )),
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------

fn run(o: &Opts) -> anyhow::Result<bool> {
    let command = invocation();
    let exe = std::env::current_exe().context("cannot locate this executable")?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("executable without a target directory")?;
    let kernel = kernel_tree(&target.join("syncbench-cache"))?;
    ensure_openssh()?;
    let cs_bin = cs_binaries()?;
    let has = |t: &str| on_path(t);
    let (rsync, unison_ok, syncthing, git_ok) =
        (has("rsync"), has("unison"), has("syncthing"), has("git"));
    let tmp = tempfile::Builder::new()
        .prefix("cs-syncbench-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let tmp_path = tmp.path().to_path_buf();
    let tmp_guard = if o.keep {
        say!("--keep: {} stays after the run", tmp_path.display());
        std::mem::forget(tmp);
        None
    } else {
        Some(tmp)
    };
    let t = tmp_path.as_path();
    say!("working in {}", t.display());
    let load_start = loadavg();
    let scratch = t.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let mut r = Report {
        idle_secs: o.idle.as_secs(),
        ..Report::default()
    };
    for (ok, name) in [
        (rsync, "rsync"),
        (unison_ok, "unison"),
        (syncthing, "syncthing"),
        (git_ok, "git"),
    ] {
        if !ok {
            r.missing.push(format!(
                "{name}: not installed (`apt-get install -y {name}`); its rows are left out"
            ));
        }
    }

    // The tree every tool syncs.
    let src = if o.quick {
        let src = t.join("src");
        for d in QUICK_DIRS {
            copy_tree(&kernel.join(d), &src.join(d), &scratch)?;
        }
        src
    } else {
        kernel.clone()
    };
    let src_m = manifest(&src, false, &[])?;
    let bytes: u64 = src_m
        .values()
        .map(|n| match n {
            Node::File { size, .. } => *size,
            _ => 0,
        })
        .sum();
    r.tree = format!(
        "{} ({} files, {} directories, {} symlinks, {})",
        if o.quick {
            format!("{TREE}, only {}", QUICK_DIRS.join(" "))
        } else {
            format!("{TREE}, whole")
        },
        file_count(&src_m),
        src_m.values().filter(|n| matches!(n, Node::Dir)).count(),
        src_m
            .values()
            .filter(|n| matches!(n, Node::Link(_)))
            .count(),
        mb(bytes)
    );
    say!("tree: {}", r.tree);
    let c_files: Vec<String> = src_m
        .iter()
        .filter(|(k, n)| k.ends_with(".c") && matches!(n, Node::File { .. }))
        .map(|(k, _)| k.clone())
        .collect();
    let big_orig = t.join("big-orig.bin");
    write_big(&big_orig, o.seed)?;
    let repo = if git_ok && !o.only_lossy {
        say!("making the git repository");
        match attempt("git repository", || {
            git_repo(&kernel, t, &scratch, o.seed, o.scale())
        })? {
            Ok(g) => {
                r.git_changes = g.changes;
                Some(g)
            }
            Err(e) => {
                r.missing
                    .push(format!("git checkout rows: {}", cell_error(&e)));
                None
            }
        }
    } else {
        None
    };

    let x = Ctx {
        o,
        tmp: t,
        scratch: scratch.clone(),
        kernel: &kernel,
        src: &src,
        src_m: &src_m,
        c_files: &c_files,
        big_orig: &big_orig,
        repo: repo.as_ref(),
    };

    // cs first, alone on the machine; then the peers, one at a time.
    let cs_result = measure_cs(cs_bin, &x, &mut r);
    let left = reap_leftovers(&t.join("cs/cs-home"));
    if !left.is_empty() {
        say!("cs left processes behind: {}", left.join("; "));
        r.cs_notes.push(format!(
            "cs: {} process(es) still running after `cs sandbox delete` and `cs daemon stop`, \
             killed by the benchmark: {}",
            left.len(),
            cell_error(&left.join("; "))
        ));
    }
    cs_result.or_else(|e| {
        check_interrupted()?;
        say!("cs: {e:#}");
        r.missing
            .push(format!("cs: {}", cell_error(&format!("{e:#}"))));
        anyhow::Ok(())
    })?;

    let measure_peers = !o.only_lossy;
    let sshd = if rsync && measure_peers {
        let s = Sshd::start(&t.join("sshd"))?;
        say!("sshd listening on 127.0.0.1:{}", s.port);
        Some(s)
    } else {
        None
    };
    let p = Peers {
        x: &x,
        sshd: sshd.as_ref(),
        rsync,
        unison: unison_ok,
    };
    if !measure_peers {
        r.missing
            .push("--only-lossy: only cs through the lossy relay was measured".into());
    } else {
        p.initial(&mut r)?;
        p.big(&mut r)?;
        p.git(&mut r)?;
        p.unison_repeat(&mut r)?;
        if syncthing {
            p.syncthing(&mut r)?;
        } else {
            r.missing.push(
                "syncthing: not measured: not installed (`apt-get install -y syncthing`)".into(),
            );
        }
    }
    drop(sshd);

    let mut versions = vec![first_line(Command::new("ssh").arg("-V"), true)];
    for (ok, tool, args) in [
        (rsync, "rsync", "--version"),
        (unison_ok, "unison", "-version"),
        (syncthing, "syncthing", "--version"),
        (git_ok, "git", "--version"),
    ] {
        if ok {
            let v = first_line(Command::new(tool).arg(args), false);
            versions.push(v.split(" (").next().unwrap_or(&v).replace("  ", " "));
        }
    }
    r.load = format!(
        "load average (1 min) {load_start} at the start, {} at the end",
        loadavg()
    );
    print_report(&r, o, &command, &versions);
    if let Some(tmp) = tmp_guard {
        // Trees are removed only now, so that no phase waits for the previous one's deletion.
        say!("removing {}", tmp.path().display());
        drop(tmp);
    }
    let failed = r.init.iter().any(|(_, f)| f.is_err())
        || r.lat.iter().any(|(_, _, f)| f.is_err())
        || r.big.iter().any(|(_, f)| f.is_err())
        || r.git.iter().any(|(_, f)| f.is_err())
        || r.idle.iter().any(|(_, f)| f.is_err())
        || r.lossy.iter().any(|(_, _, f)| f.is_err());
    if interrupted() {
        bail!("interrupted");
    }
    Ok(!failed)
}

fn main() -> ExitCode {
    let o = match opts() {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("syncbench: {e:#}");
            return ExitCode::from(2);
        }
    };
    install_signal_handlers();
    match run(&o) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("syncbench: some rows failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("syncbench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
