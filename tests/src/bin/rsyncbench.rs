//! Benchmark of one-shot `cs rsync` against `rsync -a` over ssh to a private sshd on
//! 127.0.0.1, side by side in one run, so that the figures in the README can be reproduced by
//! anyone with one command:
//!
//! `cargo run --release -p cs-tests --bin rsyncbench [-- --quick]`
//!
//! On the Linux kernel tree (Debian's linux-source, extracted once into
//! target/syncbench-cache/, the cache syncbench uses), or on a generated tree of its shape
//! where the kernel tree is not available (and always with `--quick`, which generates a small
//! one), it times a push from a local directory into a local sandbox's workspace, three
//! steps: the first copy into an empty destination, a no-op re-run, and a re-run after 1% of
//! the regular files changed in place. Then the same three steps the other way (a pull), from
//! the workspace's copy into empty local directories. Each step runs rsync and cs from the
//! same source, one after the other, and counts the bytes on the wire: ssh's own count of
//! its packets both ways (`ssh -o LogLevel=VERBOSE` prints it when it closes), and for cs the
//! UDP payload bytes of the QUIC connection, read from `cs daemon status --json` before and
//! after. After every step each destination is compared with its source: a listing with
//! kinds, sizes, modes, owners and mtimes, and a hash of every file's content.
//!
//! Nothing is asserted: the table goes to stdout, progress to stderr. Everything lives in a
//! temporary directory removed at the end; every child process runs under a time limit or is
//! stopped on exit, on error and on Ctrl-C.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Seek as _, SeekFrom, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use cs_tests::benchkit::{
    cell_error, check_interrupted, cs_binaries, ensure_openssh, first_line,
    install_signal_handlers, interrupted, invocation, kernel_tree, kernel_tree_available,
    machine_busy, machine_line, ms, number_arg, on_path, proc_cpu, quantile, ratio, reap_leftovers,
    run_captured, run_measured, shell_quote, CsHome, Finished, Sshd, KERNEL_TREE, SHORT,
};

const USAGE: &str = "usage: rsyncbench [--quick] [--generated] [--no-pull] [--rounds N] [--seed N]
                  [--dir DIR] [--keep]
  --quick      a small generated tree (4,000 files, about 60 MB) instead of the kernel tree
  --generated  a generated tree of the kernel tree's shape (78,000 files, about 1.2 GB), even
               where the kernel tree is available
  --no-pull    measure only the push (local to the workspace), not the pull back
  --rounds N   runs of each step per tool, the tools taking turns to go first; the tables
               give the median and the range (default 3)
  --seed N     seed of the generated tree and of the changed files (default 1)
  --dir DIR    where the temporary directory goes (default: the system's, usually /tmp); on
               a tmpfs such as /dev/shm the disk's speed and other work's writes leave the
               figures (the trees need about 6.5 GB there)
  --keep       keep the temporary directory (trees, logs of cs and sshd)";

/// Limit of one whole-tree step (a copy, a transfer, a verification).
const LONG: Duration = Duration::from_secs(30 * 60);
/// The share of regular files step 3 changes.
const CHANGED_SHARE: f64 = 0.01;
/// Files of the generated trees.
const QUICK_FILES: usize = 4_000;
const FULL_FILES: usize = 78_000;
/// The workspace directory cs pushes into, relative to the workspace's home.
const CS_DEST: &str = "tree";

/// Progress on stderr, stamped with the seconds since the run started.
macro_rules! say {
    ($($t:tt)*) => {
        eprintln!("rsyncbench: [{:8.3} s] {}", started().elapsed().as_secs_f64(), format_args!($($t)*))
    };
}

fn started() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

struct Opts {
    quick: bool,
    generated: bool,
    pull: bool,
    rounds: usize,
    seed: u64,
    dir: Option<PathBuf>,
    keep: bool,
}

fn opts() -> anyhow::Result<Option<Opts>> {
    let mut o = Opts {
        quick: false,
        generated: false,
        pull: true,
        rounds: 3,
        seed: 1,
        dir: None,
        keep: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--generated" => o.generated = true,
            "--no-pull" => o.pull = false,
            "--keep" => o.keep = true,
            "--dir" => {
                o.dir =
                    Some(PathBuf::from(args.next().with_context(|| {
                        format!("--dir needs a directory\n{USAGE}")
                    })?))
            }
            "--seed" => o.seed = number_arg(&mut args, "--seed", USAGE)?,
            "--rounds" => {
                o.rounds = number_arg(&mut args, "--rounds", USAGE)?.clamp(1, 100) as usize
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
// Small tools.

/// splitmix64: seeded, so that a run's tree and changes repeat with its seed.
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

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.1} s")
    }
}

/// A byte count with thousands separators.
fn commas(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mb(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

/// Datagrams the kernel dropped so far on the UDP sockets `pid` holds (the `drops` column of
/// /proc/net/udp and udp6: a full receive buffer, mostly). With GRO, one dropped datagram may
/// be many coalesced packets.
fn udp_drops(pid: i32) -> u64 {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let l = std::fs::read_link(e.path()).ok()?;
            let l = l.to_string_lossy();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut drops = 0;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 13 && inodes.iter().any(|i| i == f[9]) {
                drops += f[f.len() - 1].parse::<u64>().unwrap_or(0);
            }
        }
    }
    drops
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".into())
}

/// Flushes dirty pages, so that one tool's writes are not written back during the next
/// tool's run.
fn flush_disks() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

/// Sets a path's mtime (and atime) without following a symlink.
fn set_mtime(path: &Path, secs: i64, nsec: i64) -> anyhow::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nsec as _,
    };
    let times = [t, t];
    // SAFETY: a valid C string and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot set the mtime of {}", path.display()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Trees and their comparison.

#[derive(Clone, PartialEq, Eq, Debug)]
enum Kind {
    Dir,
    File { size: u64, hash: [u8; 32] },
    Link(PathBuf),
    Other,
}

/// What `rsync -a` carries of one path.
#[derive(Clone, PartialEq, Eq, Debug)]
struct Node {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: i64,
}

/// Relative path (the root is ".") to what is there.
type Manifest = BTreeMap<String, Node>;

/// Walks `root` without following symlinks and hashes every regular file (on two threads).
fn manifest(root: &Path) -> anyhow::Result<Manifest> {
    let node = |m: &std::fs::Metadata, kind: Kind| Node {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    };
    let top = std::fs::symlink_metadata(root)
        .with_context(|| format!("cannot stat {}", root.display()))?;
    ensure!(top.is_dir(), "{} is not a directory", root.display());
    let mut out = Manifest::new();
    out.insert(".".into(), node(&top, Kind::Dir));
    let mut files: Vec<(String, std::fs::Metadata)> = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        for e in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let m = std::fs::symlink_metadata(e.path())
                .with_context(|| format!("cannot stat {}", e.path().display()))?;
            let ft = m.file_type();
            if ft.is_dir() {
                stack.push(r.clone());
                out.insert(r, node(&m, Kind::Dir));
            } else if ft.is_file() {
                files.push((r, m));
            } else if ft.is_symlink() {
                let t = std::fs::read_link(e.path())?;
                out.insert(r, node(&m, Kind::Link(t)));
            } else {
                out.insert(r, node(&m, Kind::Other));
            }
        }
    }
    let hashed: Vec<anyhow::Result<Vec<(String, Node)>>> = std::thread::scope(|s| {
        let half = files.len().div_ceil(2);
        let handles: Vec<_> = files
            .chunks(half.max(1))
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(r, m)| {
                            let p = root.join(r);
                            let bytes = std::fs::read(&p)
                                .with_context(|| format!("cannot read {}", p.display()))?;
                            let kind = Kind::File {
                                size: bytes.len() as u64,
                                hash: *blake3::hash(&bytes).as_bytes(),
                            };
                            Ok((r.clone(), node(m, kind)))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a hash thread panicked")))
            })
            .collect()
    });
    for part in hashed {
        out.extend(part?);
    }
    Ok(out)
}

/// One digest of the whole manifest: every path, kind, size, content hash, mode, owner and
/// mtime (whole seconds).
fn digest(m: &Manifest) -> String {
    let mut h = blake3::Hasher::new();
    for (k, n) in m {
        h.update(k.as_bytes());
        h.update(&[0]);
        match &n.kind {
            Kind::Dir => h.update(b"d"),
            Kind::File { size, hash } => h.update(b"f").update(&size.to_le_bytes()).update(hash),
            Kind::Link(t) => h.update(b"l").update(t.as_os_str().as_bytes()),
            Kind::Other => h.update(b"o"),
        };
        h.update(&n.mode.to_le_bytes())
            .update(&n.uid.to_le_bytes())
            .update(&n.gid.to_le_bytes())
            .update(&n.mtime.to_le_bytes());
    }
    h.finalize().to_hex()[..16].to_string()
}

struct TreeStats {
    files: usize,
    dirs: usize,
    links: usize,
    bytes: u64,
}

fn stats(m: &Manifest) -> TreeStats {
    let mut s = TreeStats {
        files: 0,
        dirs: 0,
        links: 0,
        bytes: 0,
    };
    for n in m.values() {
        match &n.kind {
            Kind::Dir => s.dirs += 1,
            Kind::File { size, .. } => {
                s.files += 1;
                s.bytes += size;
            }
            Kind::Link(_) => s.links += 1,
            Kind::Other => {}
        }
    }
    s
}

/// What differs in one path (whole-second mtimes; the mode of a symlink is not compared).
fn node_diff(want: &Node, got: &Node) -> Option<String> {
    let mut d = Vec::new();
    if want.kind != got.kind {
        let show = |k: &Kind| match k {
            Kind::Dir => "directory".to_string(),
            Kind::File { size, hash } => {
                format!(
                    "file of {size} bytes {}",
                    &blake3::Hash::from(*hash).to_hex()[..12]
                )
            }
            Kind::Link(t) => format!("symlink to {}", t.display()),
            Kind::Other => "special file".to_string(),
        };
        d.push(format!(
            "{} instead of {}",
            show(&got.kind),
            show(&want.kind)
        ));
    }
    let link = matches!(want.kind, Kind::Link(_));
    if !link && want.mode != got.mode {
        d.push(format!("mode {:o} instead of {:o}", got.mode, want.mode));
    }
    if (want.uid, want.gid) != (got.uid, got.gid) {
        d.push(format!(
            "owner {}:{} instead of {}:{}",
            got.uid, got.gid, want.uid, want.gid
        ));
    }
    if want.mtime != got.mtime {
        d.push(format!("mtime {} instead of {}", got.mtime, want.mtime));
    }
    (!d.is_empty()).then(|| d.join(", "))
}

/// The comparison of a destination with its source.
struct Check {
    /// None when identical, else how many paths differ and the first few.
    mismatch: Option<String>,
    /// Paths whose mtimes agree in whole seconds but not in nanoseconds.
    nsec_differ: usize,
    digest: String,
}

impl Check {
    fn cell(&self) -> String {
        let mut s = match &self.mismatch {
            None => format!("identical (digest {})", self.digest),
            Some(m) => format!("**MISMATCH**: {m}"),
        };
        if self.nsec_differ > 0 {
            s.push_str(&format!(
                "; mtime nanoseconds differ on {} paths",
                commas(self.nsec_differ as u64)
            ));
        }
        s
    }
}

fn compare(want: &Manifest, root: &Path) -> Check {
    let got = match manifest(root) {
        Ok(g) => g,
        Err(e) => {
            return Check {
                mismatch: Some(format!("cannot walk the copy: {e:#}")),
                nsec_differ: 0,
                digest: "-".into(),
            }
        }
    };
    let mut n = 0usize;
    let mut examples = Vec::new();
    let mut nsec = 0;
    for (k, v) in want {
        let d = match got.get(k) {
            Some(g) => {
                if g.mtime == v.mtime && g.mtime_nsec != v.mtime_nsec {
                    nsec += 1;
                }
                node_diff(v, g)
            }
            None => Some("missing".into()),
        };
        if let Some(d) = d {
            n += 1;
            if examples.len() < 3 {
                examples.push(format!("{k}: {d}"));
            }
        }
    }
    for k in got.keys() {
        if !want.contains_key(k) {
            n += 1;
            if examples.len() < 3 {
                examples.push(format!("{k}: should not be there"));
            }
        }
    }
    Check {
        mismatch: (n > 0).then(|| format!("{n} paths differ, e.g. {}", examples.join("; "))),
        nsec_differ: nsec,
        digest: digest(&got),
    }
}

/// A generated tree of the kernel tree's shape: `files` regular files of log-normal sizes
/// (median 6 KB, mean about 16 KB, text), one directory per 16 files in a random tree, 1%
/// executable, 0.5% empty, a symlink per 4,000 files, whole-second mtimes in the past.
fn generate_tree(root: &Path, files: usize, seed: u64) -> anyhow::Result<()> {
    let mut rng = Rng(seed ^ 0x7265_6e65_7261_7465);
    // A pool of text that files take slices of.
    let words: Vec<String> = (0..2_000)
        .map(|_| {
            let len = 2 + rng.below(9);
            (0..len)
                .map(|_| (b'a' + rng.below(26) as u8) as char)
                .collect()
        })
        .collect();
    let mut pool = Vec::with_capacity(1 << 20);
    while pool.len() < 1 << 20 {
        let mut line = String::new();
        for _ in 0..(3 + rng.below(10)) {
            line.push_str(&words[rng.below(words.len())]);
            line.push(' ');
        }
        line.push('\n');
        pool.extend_from_slice(line.as_bytes());
    }
    std::fs::create_dir_all(root)?;
    let mut dirs: Vec<(PathBuf, usize)> = vec![(root.to_path_buf(), 0)];
    for i in 1..(files / 16).max(1) {
        let (parent, depth) = loop {
            let (p, d) = &dirs[rng.below(dirs.len())];
            if *d < 7 {
                break (p.clone(), *d);
            }
        };
        let dir = parent.join(format!("dir{i:04}"));
        std::fs::create_dir(&dir)?;
        dirs.push((dir, depth + 1));
    }
    let base_mtime = 1_672_531_200i64; // 2023-01-01
    let mut made = Vec::new();
    for i in 0..files {
        check_interrupted()?;
        let dir = &dirs[rng.below(dirs.len())].0;
        let path = dir.join(format!("file{i:05}.{}", ["c", "h", "txt", "S"][i % 4]));
        let size = if rng.below(200) == 0 {
            0
        } else {
            ((8.7 + 1.4 * rng.normal()).exp() as usize).clamp(16, 4 << 20)
        };
        let mut content = format!("/* file {i} of seed {seed} */\n").into_bytes();
        let mut at = rng.below(pool.len());
        while content.len() < size {
            let take = (size - content.len()).min(pool.len() - at);
            content.extend_from_slice(&pool[at..at + take]);
            at = 0;
        }
        content.truncate(size);
        std::fs::write(&path, &content)?;
        let mode = if rng.below(100) == 0 { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        set_mtime(&path, base_mtime + rng.below(30_000_000) as i64, 0)?;
        made.push(path);
    }
    for i in 0..(files / 4_000).max(1) {
        let target = &made[rng.below(made.len())];
        let link = target.with_file_name(format!("link{i:03}"));
        if let Some(name) = target.file_name() {
            if !link.exists() {
                std::os::unix::fs::symlink(name, &link)?;
                set_mtime(&link, base_mtime, 0)?;
            }
        }
    }
    // Directories last, deepest first, so that making their entries does not move them.
    for (d, _) in dirs.iter().rev() {
        set_mtime(d, base_mtime + rng.below(30_000_000) as i64, 0)?;
    }
    Ok(())
}

/// `count` distinct regular files of `m`, chosen by `seed`.
fn choose_files(m: &Manifest, share: f64, seed: u64) -> Vec<String> {
    let mut all: Vec<&String> = m
        .iter()
        .filter(|(_, n)| matches!(n.kind, Kind::File { .. }))
        .map(|(k, _)| k)
        .collect();
    let count = ((all.len() as f64 * share).ceil() as usize).min(all.len());
    let mut rng = Rng(seed ^ 0x6368_616e_6765);
    for i in 0..count {
        let j = i + rng.below(all.len() - i);
        all.swap(i, j);
    }
    let mut chosen: Vec<String> = all[..count].iter().map(|s| s.to_string()).collect();
    chosen.sort();
    chosen
}

/// Gives each of `paths` under `root` an inode of its own (same content, mode and mtime), so
/// that a tree made with `cp -al` can be changed in place without touching what it links to.
fn unshare(root: &Path, paths: &[String]) -> anyhow::Result<()> {
    for rel in paths {
        let p = root.join(rel);
        let m = std::fs::symlink_metadata(&p)?;
        let bytes = std::fs::read(&p)?;
        let tmp = p.with_file_name(".rsyncbench-unshare");
        std::fs::write(&tmp, &bytes)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
        set_mtime(&tmp, m.mtime(), m.mtime_nsec())?;
        std::fs::rename(&tmp, &p)?;
    }
    Ok(())
}

/// Changes each file in place: 32 bytes overwritten at a seeded offset (appended to a file
/// smaller than 64 bytes); its mtime becomes now. Returns the bytes written.
fn change_files(root: &Path, paths: &[String], seed: u64) -> anyhow::Result<u64> {
    let mut rng = Rng(seed ^ 0x6564_6974);
    let mut written = 0;
    for rel in paths {
        let p = root.join(rel);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .with_context(|| format!("cannot open {}", p.display()))?;
        let size = f.metadata()?.len();
        let patch: Vec<u8> = (0..32).map(|_| b'A' + rng.below(26) as u8).collect();
        if size >= 64 {
            f.seek(SeekFrom::Start(rng.below((size - 32) as usize) as u64))?;
        } else {
            f.seek(SeekFrom::End(0))?;
        }
        f.write_all(&patch)?;
        written += patch.len() as u64;
    }
    Ok(written)
}

// ---------------------------------------------------------------------------------------------
// The runs.

/// One tool's run of one step.
struct RunFig {
    wall: Duration,
    /// Bytes on the wire both ways, and how they were counted.
    wire: Option<u64>,
    wire_note: String,
    /// Content bytes the tool itself reports (`--stats`).
    content: String,
    /// The machine's busy CPU during the run, and who used it.
    machine_cpu: Duration,
    split: String,
    check: Check,
}

type Fig = Result<RunFig, String>;

/// A `--stats` figure ("Total bytes sent: 1,234").
fn stat_line(out: &str, key: &str) -> Option<u64> {
    let l = out.lines().find(|l| l.starts_with(key))?;
    let v: String = l[key.len()..]
        .chars()
        .take_while(|c| !c.is_alphabetic() || *c == ',')
        .filter(|c| c.is_ascii_digit())
        .collect();
    v.parse().ok()
}

/// OpenSSH's client says at VERBOSE: "Transferred: sent N, received M bytes".
fn ssh_transferred(err: &str) -> Option<u64> {
    err.lines().find_map(|l| {
        let rest = &l[l.find("Transferred: sent ")? + "Transferred: sent ".len()..];
        let (sent, rest) = rest.split_once(", received ")?;
        let recv = rest.split_whitespace().next()?;
        Some(sent.trim().parse::<u64>().ok()? + recv.parse::<u64>().ok()?)
    })
}

struct Rsync<'a> {
    sshd: &'a Sshd,
    scratch: PathBuf,
}

impl Rsync<'_> {
    /// `rsync -a --stats -e 'ssh ...' FROM TO`, with ssh at LogLevel=VERBOSE so that it
    /// counts its bytes.
    fn cmd(&self, from: &str, to: &str, dry: bool) -> Command {
        let argv: Vec<String> = self
            .sshd
            .ssh_argv(false)
            .into_iter()
            .map(|a| {
                if a == "LogLevel=ERROR" {
                    "LogLevel=VERBOSE".into()
                } else {
                    a
                }
            })
            .collect();
        let e = argv
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        let mut c = Command::new("rsync");
        c.args(["-a", "--stats"]);
        if dry {
            c.arg("-n");
        }
        c.arg("-e")
            .arg(e)
            .arg(from)
            .arg(to)
            .env_remove("SSH_AUTH_SOCK");
        c
    }

    fn run(&self, from: &str, to: &str, want: &Manifest, dest: &Path) -> anyhow::Result<RunFig> {
        flush_disks();
        let busy0 = machine_busy()?;
        let Finished {
            took,
            usage,
            out,
            err,
        } = run_measured(
            &mut self.cmd(from, to, false),
            &self.scratch,
            LONG,
            "rsync -a over ssh",
        )?;
        let busy = machine_busy()? - busy0;
        let sent = stat_line(&out, "Total bytes sent:").unwrap_or(0);
        let recv = stat_line(&out, "Total bytes received:").unwrap_or(0);
        let literal = stat_line(&out, "Literal data:").unwrap_or(0);
        let wire = ssh_transferred(&err);
        Ok(RunFig {
            wall: took,
            wire,
            wire_note: match wire {
                Some(_) => "ssh's packets both ways, its handshake included".into(),
                None => "ssh did not say (no \"Transferred:\" line)".into(),
            },
            content: format!(
                "rsync's own count {} (sent {} + received {}), literal data {}",
                commas(sent + recv),
                commas(sent),
                commas(recv),
                commas(literal)
            ),
            machine_cpu: busy,
            split: format!(
                "local rsync + ssh {}; the rest (sshd, the far rsync, the kernel) {}",
                secs(usage.cpu),
                secs(busy.saturating_sub(usage.cpu))
            ),
            check: compare(want, dest),
        })
    }

    /// The time of a dry run (`-n`): the file lists and the comparison, no content.
    fn dry(&self, from: &str, to: &str) -> anyhow::Result<Duration> {
        let f = run_measured(
            &mut self.cmd(from, to, true),
            &self.scratch,
            LONG,
            "rsync -a -n over ssh",
        )?;
        Ok(f.took)
    }
}

struct Cs {
    home: CsHome,
    ws_home: PathBuf,
    daemon: i32,
    agent: i32,
}

/// The link's UDP bytes and connection count.
struct LinkCount {
    tx: u64,
    rx: u64,
    connects: u64,
}

impl Cs {
    fn status(&self) -> anyhow::Result<serde_json::Value> {
        let out = self.home.run(&["daemon", "status", "--json"], SHORT)?.0;
        serde_json::from_str(&out).context("cs daemon status --json: not JSON")
    }

    fn link(&self) -> anyhow::Result<LinkCount> {
        let st = self.status()?;
        let l = st["links"]
            .as_array()
            .context("no links in the daemon status")?
            .iter()
            .find(|l| l["workspace"] == "bench/dev")
            .cloned()
            .context("no link to bench/dev in the daemon status")?;
        Ok(LinkCount {
            tx: l["udp_tx_bytes"].as_u64().unwrap_or(0),
            rx: l["udp_rx_bytes"].as_u64().unwrap_or(0),
            connects: l["connects"].as_u64().unwrap_or(0),
        })
    }

    /// Notes a restart of the daemon or the agent (their CPU then covers the new process).
    fn check_restarts(&mut self, notes: &mut Vec<String>, what: &str) {
        let agent = self.home.agent_pid("bench", "dev").unwrap_or(0);
        if agent != self.agent {
            notes.push(format!(
                "the local agent was restarted during {what} (pid {} before, {agent} after)",
                self.agent
            ));
            self.agent = agent;
        }
        let daemon = self
            .status()
            .ok()
            .and_then(|s| s["pid"].as_i64())
            .unwrap_or(0) as i32;
        if daemon != self.daemon {
            notes.push(format!(
                "the daemon was restarted during {what} (pid {} before, {daemon} after)",
                self.daemon
            ));
            self.daemon = daemon;
        }
    }

    fn cmd(&self, from: &str, to: &str, dry: bool) -> Command {
        let mut args = vec!["rsync", "-a", "--stats"];
        if dry {
            args.push("-n");
        }
        args.extend([from, to]);
        self.home.cmd(&args)
    }

    fn run(
        &mut self,
        from: &str,
        to: &str,
        want: &Manifest,
        dest: &Path,
        notes: &mut Vec<String>,
    ) -> anyhow::Result<RunFig> {
        flush_disks();
        let l0 = self.link()?;
        let (d0, a0) = (proc_cpu(self.daemon)?, proc_cpu(self.agent)?);
        let drops0 = (udp_drops(self.daemon), udp_drops(self.agent));
        let busy0 = machine_busy()?;
        let what = format!("cs rsync -a --stats {from} {to}");
        let f = run_measured(
            &mut self.cmd(from, to, false),
            &self.home.scratch,
            LONG,
            &what,
        );
        let busy = machine_busy()? - busy0;
        let drops = (
            udp_drops(self.daemon).saturating_sub(drops0.0),
            udp_drops(self.agent).saturating_sub(drops0.1),
        );
        let (d1, a1) = (
            proc_cpu(self.daemon).unwrap_or_default(),
            proc_cpu(self.agent).unwrap_or_default(),
        );
        let l1 = self.link()?;
        self.check_restarts(notes, &what);
        let f = f?;
        let (tx, rx) = (l1.tx.saturating_sub(l0.tx), l1.rx.saturating_sub(l0.rx));
        let reconnected = l1.connects != l0.connects;
        let sent = stat_line(&f.out, "Total bytes sent:").unwrap_or(0);
        let recv = stat_line(&f.out, "Total bytes received:").unwrap_or(0);
        Ok(RunFig {
            wall: f.took,
            wire: (!reconnected).then_some(tx + rx),
            wire_note: if reconnected {
                format!(
                    "the link reconnected during the run ({} connects before, {} after): the \
                     count restarted",
                    l0.connects, l1.connects
                )
            } else {
                format!(
                    "UDP payload of the QUIC connection: laptop sent {}, received {}; \
                     datagrams dropped by the kernel (receive buffer full) at the agent's \
                     socket {}, at the daemon's {}",
                    commas(tx),
                    commas(rx),
                    commas(drops.1),
                    commas(drops.0)
                )
            },
            content: format!(
                "cs's own count {} (sent {} + received {})",
                commas(sent + recv),
                commas(sent),
                commas(recv)
            ),
            machine_cpu: busy,
            split: format!(
                "cs CLI {}, daemon {}, agent {}; the rest {}",
                secs(f.usage.cpu),
                secs(d1.saturating_sub(d0)),
                secs(a1.saturating_sub(a0)),
                secs(busy.saturating_sub(f.usage.cpu + (d1 - d0) + (a1 - a0)))
            ),
            check: compare(want, dest),
        })
    }

    fn dry(&self, from: &str, to: &str) -> anyhow::Result<Duration> {
        let what = format!("cs rsync -a -n {from} {to}");
        let f = run_measured(
            &mut self.cmd(from, to, true),
            &self.home.scratch,
            LONG,
            &what,
        )?;
        Ok(f.took)
    }
}

/// Runs one measurement; its failure becomes the row's text, except an interruption, which
/// ends the run.
fn attempt(what: &str, f: impl FnOnce() -> anyhow::Result<RunFig>) -> anyhow::Result<Fig> {
    match f() {
        Ok(v) => {
            say!(
                "{what}: {} , wire {}; {}",
                secs(v.wall),
                v.wire.map(commas).unwrap_or_else(|| "?".into()),
                v.check.cell()
            );
            if v.check.mismatch.is_some() {
                say!("!!! MISMATCH after {what}: {}", v.check.cell());
            }
            Ok(Ok(v))
        }
        Err(e) => {
            check_interrupted()?;
            say!("{what}: FAILED: {e:#}");
            Ok(Err(format!("{e:#}")))
        }
    }
}

/// One step of one direction: both tools' runs, one per round.
struct Step {
    name: String,
    rsync: Vec<Fig>,
    cs: Vec<Fig>,
    /// Dry-run times (list and compare only), where measured.
    dry: Option<(Fig2, Fig2)>,
}

type Fig2 = Result<Duration, String>;

fn dry_fig(what: &str, r: anyhow::Result<Duration>) -> anyhow::Result<Fig2> {
    match r {
        Ok(d) => {
            say!("{what}: {}", secs(d));
            Ok(Ok(d))
        }
        Err(e) => {
            check_interrupted()?;
            say!("{what}: FAILED: {e:#}");
            Ok(Err(format!("{e:#}")))
        }
    }
}

/// A tool's runs of one step, summed up: the run of median wall time stands for them.
struct Summary<'a> {
    median: &'a RunFig,
    walls: Vec<f64>,
    wires: Vec<u64>,
    /// The first mismatch among the runs.
    mismatch: Option<&'a Check>,
    failed: Vec<&'a str>,
}

fn summary(runs: &[Fig]) -> Result<Summary<'_>, String> {
    let ok: Vec<&RunFig> = runs.iter().filter_map(|f| f.as_ref().ok()).collect();
    let failed: Vec<&str> = runs
        .iter()
        .filter_map(|f| f.as_ref().err().map(String::as_str))
        .collect();
    let mut by_wall = ok.clone();
    by_wall.sort_by_key(|a| a.wall);
    let Some(median) = by_wall.get(by_wall.len() / 2).copied() else {
        return Err(failed.first().map(|e| e.to_string()).unwrap_or_default());
    };
    let mut wires: Vec<u64> = ok.iter().filter_map(|f| f.wire).collect();
    wires.sort_unstable();
    Ok(Summary {
        median,
        walls: ok.iter().map(|f| f.wall.as_secs_f64()).collect(),
        wires,
        mismatch: ok.iter().map(|f| &f.check).find(|c| c.mismatch.is_some()),
        failed,
    })
}

impl Summary<'_> {
    fn wall(&self) -> f64 {
        self.median.wall.as_secs_f64()
    }

    fn wire(&self) -> Option<u64> {
        self.wires.get(self.wires.len() / 2).copied()
    }

    /// "15.2 s (14.8-16.0)" with more than one run.
    fn wall_range(&self) -> String {
        let m = secs(self.median.wall);
        let lo = self.walls.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = self.walls.iter().copied().fold(0.0, f64::max);
        if self.walls.len() > 1 {
            format!(
                "{m} ({}-{})",
                secs(Duration::from_secs_f64(lo)),
                secs(Duration::from_secs_f64(hi))
            )
        } else {
            m
        }
    }

    fn wire_range(&self) -> String {
        match (self.wires.first(), self.wire(), self.wires.last()) {
            (Some(lo), Some(m), Some(hi)) if lo != hi => {
                format!("{} ({}-{})", commas(m), commas(*lo), commas(*hi))
            }
            (_, Some(m), _) => commas(m),
            _ => "?".into(),
        }
    }
}

#[derive(Default)]
struct Report {
    tree: String,
    changed: String,
    ssh_true: String,
    rounds: usize,
    push: Vec<Step>,
    pull: Vec<Step>,
    notes: Vec<String>,
    load: String,
}

/// Paths of one direction: where each tool reads and writes.
struct Leg<'a> {
    /// The source, as each tool names it.
    rsync_from: String,
    cs_from: String,
    rsync_to: String,
    cs_to: String,
    /// The source and the destinations on this machine.
    src: &'a Path,
    rsync_dest: &'a Path,
    cs_dest: &'a Path,
}

/// The files step 3 changes in `round`: 1% of the regular files, a new choice each round.
fn round_choice(m: &Manifest, seed: u64, round: usize) -> Vec<String> {
    choose_files(
        m,
        CHANGED_SHARE,
        seed.wrapping_add(round as u64 * 1_000_003),
    )
}

/// Empties a destination between rounds of the first copy (not timed).
fn empty_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    Ok(())
}

/// The three steps of one direction, each `rounds` times; the tools take turns going first.
fn three_steps(
    leg: &Leg<'_>,
    rsync: &Rsync<'_>,
    cs: &mut Cs,
    (seed, rounds): (u64, usize),
    label: &str,
    r: &mut Report,
) -> anyhow::Result<Vec<Step>> {
    let mut steps = Vec::new();
    let first = manifest(leg.src)?;
    let st = stats(&first);
    let mut want = first.clone();
    for step in 1..=3 {
        let name = match step {
            1 => format!(
                "1. first copy into an empty directory ({} files, {})",
                commas(st.files as u64),
                mb(st.bytes)
            ),
            2 => "2. no-op re-run".to_string(),
            _ => format!(
                "3. re-run after changing 1% of the files ({} files)",
                commas(round_choice(&first, seed, 0).len() as u64)
            ),
        };
        say!("{label}: {name}");
        let mut s = Step {
            name,
            rsync: Vec::new(),
            cs: Vec::new(),
            dry: None,
        };
        for round in 0..rounds {
            check_interrupted()?;
            if step == 1 {
                for dir in [leg.rsync_dest, leg.cs_dest] {
                    empty_dir(dir)?;
                }
                flush_disks();
            }
            if step == 1 && round == 0 {
                // A dry run (both file lists and the comparison, no content), so that the
                // transfer's share of the time shows.
                let a = dry_fig(
                    &format!("{label} rsync -n"),
                    rsync.dry(&leg.rsync_from, &leg.rsync_to),
                )?;
                let b = dry_fig(
                    &format!("{label} cs rsync -n"),
                    cs.dry(&leg.cs_from, &leg.cs_to),
                )?;
                s.dry = Some((a, b));
            }
            if step == 3 {
                let chosen = round_choice(&first, seed, round);
                let n = change_files(leg.src, &chosen, seed.wrapping_add(round as u64))?;
                want = manifest(leg.src)?;
                let c = format!(
                    "{} files ({}% of {}), 32 bytes each overwritten in place ({} bytes), a new \
                     choice each round",
                    commas(chosen.len() as u64),
                    CHANGED_SHARE * 100.0,
                    commas(st.files as u64),
                    commas(n)
                );
                say!("{label} round {}: changed {c}", round + 1);
                if r.changed.is_empty() {
                    r.changed = c;
                }
            }
            let tag = format!("{label} step {step} round {}", round + 1);
            let mut notes = Vec::new();
            let rsync_first = round % 2 == 0;
            for turn in 0..2 {
                if (turn == 0) == rsync_first {
                    let f = attempt(&format!("{tag} rsync"), || {
                        rsync.run(&leg.rsync_from, &leg.rsync_to, &want, leg.rsync_dest)
                    })?;
                    s.rsync.push(f);
                } else {
                    let f = attempt(&format!("{tag} cs"), || {
                        cs.run(&leg.cs_from, &leg.cs_to, &want, leg.cs_dest, &mut notes)
                    })?;
                    s.cs.push(f);
                }
            }
            r.notes
                .extend(notes.into_iter().map(|n| format!("{tag}: {n}")));
        }
        steps.push(s);
    }
    Ok(steps)
}

// ---------------------------------------------------------------------------------------------
// The report.

fn time_target(s: &Step) -> (String, bool) {
    match (summary(&s.rsync), summary(&s.cs)) {
        (Ok(a), Ok(b)) => {
            let (ra, rb) = (a.wall(), b.wall());
            let met = rb < ra && b.mismatch.is_none() && b.failed.is_empty();
            let how = if rb < ra {
                format!("cs {}x faster", ratio(ra / rb))
            } else {
                format!("cs {}x slower", ratio(rb / ra))
            };
            (
                format!("{how}: {}", if met { "met" } else { "**not met**" }),
                met,
            )
        }
        _ => ("not measured: **not met**".into(), false),
    }
}

fn bytes_target(s: &Step) -> (String, bool) {
    match (summary(&s.rsync), summary(&s.cs)) {
        (Ok(a), Ok(b)) => match (a.wire(), b.wire()) {
            (Some(x), Some(y)) => {
                let met = y <= x;
                (
                    format!(
                        "cs {:.2}x rsync's: {}",
                        y as f64 / x.max(1) as f64,
                        if met { "met" } else { "**not met**" }
                    ),
                    met,
                )
            }
            _ => ("not counted: **not met**".into(), false),
        },
        _ => ("not measured: **not met**".into(), false),
    }
}

fn print_direction(title: &str, steps: &[Step], targets: bool) -> Vec<bool> {
    let mut met = Vec::new();
    println!();
    println!("## {title}");
    println!();
    println!(
        "| step | `rsync -a` over ssh | `cs rsync -a` | time{} | bytes on the wire: rsync | cs | bytes{} |",
        if targets { " (target: cs faster)" } else { "" },
        if targets { " (target: cs no more)" } else { "" }
    );
    println!("|---|--:|--:|---|--:|--:|---|");
    let wall = |r: &Result<Summary<'_>, String>| match r {
        Ok(s) => secs(s.median.wall),
        Err(_) => "failed".into(),
    };
    let wire = |r: &Result<Summary<'_>, String>| match r {
        Ok(s) => s.wire().map(commas).unwrap_or_else(|| "?".into()),
        Err(_) => "failed".into(),
    };
    for s in steps {
        let (t, tm) = time_target(s);
        let (b, bm) = bytes_target(s);
        met.extend([tm, bm]);
        let strip = |x: String| {
            if targets {
                x
            } else {
                x.split(':').next().unwrap_or("").to_string()
            }
        };
        let (a, c) = (summary(&s.rsync), summary(&s.cs));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            s.name,
            wall(&a),
            wall(&c),
            strip(t),
            wire(&a),
            wire(&c),
            strip(b)
        );
    }
    println!();
    println!(
        "| step | tool | wall: median (min-max) | bytes on the wire: median (min-max) | of the \
         median run: how counted | content (`--stats`) | machine CPU (every process) | CPU by \
         process | check |"
    );
    println!("|---|---|--:|--:|---|---|--:|---|---|");
    for s in steps {
        let short = s.name.split(' ').next().unwrap_or("");
        for (tool, runs) in [("rsync over ssh", &s.rsync), ("cs rsync", &s.cs)] {
            match summary(runs) {
                Ok(m) => {
                    let f = m.median;
                    let mut check = match m.mismatch {
                        Some(c) => c.cell(),
                        None => format!(
                            "identical after each of {} runs; last: {}",
                            m.walls.len(),
                            f.check.cell()
                        ),
                    };
                    if !m.failed.is_empty() {
                        check.push_str(&format!(
                            "; {} runs failed: {}",
                            m.failed.len(),
                            cell_error(m.failed[0])
                        ));
                    }
                    println!(
                        "| {short} | {tool} | {} | {} | {} | {} | {} | {} | {} |",
                        m.wall_range(),
                        m.wire_range(),
                        f.wire_note,
                        f.content,
                        secs(f.machine_cpu),
                        f.split,
                        check
                    )
                }
                Err(e) => println!(
                    "| {short} | {tool} | failed: {} | | | | | | |",
                    cell_error(&e)
                ),
            }
        }
        if let Some((a, b)) = &s.dry {
            let cell = |f: &Fig2| match f {
                Ok(d) => secs(*d),
                Err(e) => format!("failed: {}", cell_error(e)),
            };
            println!(
                "| {short} | dry runs (`-n`: lists and comparison only), once | rsync {} / cs {} | | | | | | |",
                cell(a),
                cell(b)
            );
        }
    }
    met
}

fn print_report(r: &Report, command: &str, versions: &[String]) -> bool {
    println!();
    println!("# `cs rsync` against `rsync -a` over ssh on 127.0.0.1");
    println!();
    println!("{}", machine_line(versions));
    println!(
        "Command: `{command}`. Tree: {}. Step 3 changes {}. Each rsync run opens a new ssh \
         connection ({}); cs uses the daemon's warm QUIC connection. Every figure below was \
         measured in this run: {} rounds of each step, the tools taking turns to go first; \
         medians, with the range in the second table; {}.",
        r.tree, r.changed, r.ssh_true, r.rounds, r.load
    );
    let met = print_direction(
        "Push: local directory to the workspace (`rsync -a SRC/ 127.0.0.1:DEST/` against `cs rsync -a SRC/ bench/dev:DEST`)",
        &r.push,
        true,
    );
    if !r.pull.is_empty() {
        print_direction(
            "Pull: the workspace's copy back into empty local directories (`rsync -a 127.0.0.1:SRC/ DEST/` against `cs rsync -a bench/dev:SRC/ DEST/`), for information",
            &r.pull,
            false,
        );
    }
    println!();
    let all = !met.is_empty() && met.iter().all(|m| *m);
    println!(
        "Targets (push: cs faster than rsync over ssh in all three steps, and no more bytes on \
         the wire): {}.",
        if all { "met" } else { "**not met**" }
    );
    for n in &r.notes {
        println!("- {n}");
    }
    all
}

// ---------------------------------------------------------------------------------------------

fn run(o: &Opts) -> anyhow::Result<bool> {
    let command = invocation();
    let exe = std::env::current_exe().context("cannot locate this executable")?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("executable without a target directory")?;
    ensure!(
        on_path("rsync"),
        "rsync is not installed: `apt-get install -y rsync`"
    );
    ensure_openssh()?;
    let cs_bin = cs_binaries()?;
    let mut builder = tempfile::Builder::new();
    builder.prefix("cs-rsyncbench-");
    let tmp = match &o.dir {
        Some(d) => builder.tempdir_in(d),
        None => builder.tempdir(),
    }
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
    let scratch = t.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let mut r = Report {
        rounds: o.rounds,
        ..Report::default()
    };
    let load_start = loadavg();

    // The source tree.
    let src = t.join("src");
    let cache = target.join("syncbench-cache");
    let what = if o.quick || o.generated || !kernel_tree_available(&cache) {
        let files = if o.quick { QUICK_FILES } else { FULL_FILES };
        if !o.quick && !o.generated {
            r.notes.push(format!(
                "the kernel tree is not available (no {}/{KERNEL_TREE} and no tarball; \
                 `apt-get install -y linux-source`): a generated tree of its shape was used \
                 instead",
                cache.display()
            ));
            say!("the kernel tree is not available: generating a tree of its shape");
        }
        say!("generating {files} files into {}", src.display());
        generate_tree(&src, files, o.seed)?;
        format!("generated, seed {} (kernel-like shape)", o.seed)
    } else {
        let kernel = kernel_tree(&cache)?;
        say!(
            "linking {} into {} (cp -al)",
            kernel.display(),
            src.display()
        );
        let linked = run_captured(
            Command::new("cp").arg("-al").arg(&kernel).arg(&src),
            &scratch,
            LONG,
            "cp -al",
        );
        if let Err(e) = linked {
            // Another filesystem than the cache's: a copy.
            say!("cp -al failed ({e:#}); copying instead (cp -a)");
            if src.exists() {
                std::fs::remove_dir_all(&src)?;
            }
            run_captured(
                Command::new("cp").arg("-a").arg(&kernel).arg(&src),
                &scratch,
                LONG,
                "cp -a",
            )?;
        }
        format!("{KERNEL_TREE}, whole (Debian's linux-source)")
    };
    say!("listing and hashing the source");
    let src_m = manifest(&src)?;
    // The files step 3 changes get inodes of their own first (a linked tree shares them with
    // the cache).
    let mut changed: Vec<String> = (0..o.rounds)
        .flat_map(|round| round_choice(&src_m, o.seed, round))
        .collect();
    changed.sort();
    changed.dedup();
    unshare(&src, &changed)?;
    let st = stats(&src_m);
    r.tree = format!(
        "{what}: {} files, {} directories, {} symlinks, {}",
        commas(st.files as u64),
        commas(st.dirs as u64),
        st.links,
        mb(st.bytes)
    );
    say!("tree: {}", r.tree);

    let sshd = Sshd::start(&t.join("sshd"))?;
    say!("sshd listening on 127.0.0.1:{}", sshd.port);
    let mut conn = Vec::new();
    for _ in 0..5 {
        let f = run_measured(
            &mut sshd.ssh(false, &[], Some("true")),
            &scratch,
            SHORT,
            "ssh true",
        )?;
        conn.push(f.took.as_secs_f64() * 1e3);
    }
    conn.sort_by(f64::total_cmp);
    r.ssh_true = format!(
        "`ssh 127.0.0.1 true` takes {}, median of 5",
        ms(quantile(&conn, 0.5))
    );

    let mut home = CsHome::new(cs_bin, &t.join("cs"))?;
    let said = home.create_local("bench")?;
    say!("cs sandbox create bench --local: {}", said.trim());
    let show: serde_json::Value =
        serde_json::from_str(&home.run(&["sandbox", "show", "bench", "--json"], SHORT)?.0)?;
    let ws_home = PathBuf::from(
        show[0]["home"]
            .as_str()
            .context("`cs sandbox show --json` gives no home")?,
    );
    let agent = home.agent_pid("bench", "dev")?;
    let status: serde_json::Value =
        serde_json::from_str(&home.run(&["daemon", "status", "--json"], SHORT)?.0)?;
    let daemon = status["pid"].as_i64().context("no daemon pid")? as i32;
    let mut cs = Cs {
        home,
        ws_home,
        daemon,
        agent,
    };
    let rsync = Rsync {
        sshd: &sshd,
        scratch: scratch.clone(),
    };

    let measured = (|| -> anyhow::Result<()> {
        let rsync_push = t.join("rsync-push");
        let cs_push = cs.ws_home.join(CS_DEST);
        let push = Leg {
            rsync_from: format!("{}/", src.display()),
            cs_from: format!("{}/", src.display()),
            rsync_to: format!("127.0.0.1:{}/", rsync_push.display()),
            cs_to: format!("bench/dev:{CS_DEST}"),
            src: &src,
            rsync_dest: &rsync_push,
            cs_dest: &cs_push,
        };
        r.push = three_steps(&push, &rsync, &mut cs, (o.seed, o.rounds), "push", &mut r)?;
        if o.pull {
            // The pull reads the workspace's copy: both tools from the same directory.
            let (rsync_pull, cs_pull) = (t.join("rsync-pull"), t.join("cs-pull"));
            let pull = Leg {
                rsync_from: format!("127.0.0.1:{}/", cs_push.display()),
                cs_from: format!("bench/dev:{CS_DEST}/"),
                rsync_to: format!("{}/", rsync_pull.display()),
                cs_to: format!("{}/", cs_pull.display()),
                src: &cs_push,
                rsync_dest: &rsync_pull,
                cs_dest: &cs_pull,
            };
            r.pull = three_steps(
                &pull,
                &rsync,
                &mut cs,
                (o.seed + 1, o.rounds),
                "pull",
                &mut r,
            )?;
        }
        Ok(())
    })();

    // Cleanup before the report: the sandbox, the daemon, anything they left. The copy in
    // the workspace goes first, so that `cs sandbox delete` is not timed on removing it.
    let ws_tree = cs.ws_home.join(CS_DEST);
    if let Err(e) = std::fs::remove_dir_all(&ws_tree) {
        say!("cannot remove {}: {e}", ws_tree.display());
    }
    flush_disks();
    let failed = cs.home.cleanup();
    for e in &failed {
        r.notes.push(format!("cs cleanup: {}", cell_error(e)));
    }
    let left = reap_leftovers(&cs.home.home);
    if !left.is_empty() {
        r.notes.push(format!(
            "cs: {} process(es) still running after `cs sandbox delete` and `cs daemon stop`, \
             killed by the benchmark: {}",
            left.len(),
            cell_error(&left.join("; "))
        ));
    }
    drop(sshd);
    measured?;

    let mut versions = vec![first_line(Command::new("ssh").arg("-V"), true)];
    let v = first_line(Command::new("rsync").arg("--version"), false);
    versions.push(v.split("  ").next().unwrap_or(&v).to_string());
    r.load = format!(
        "load average (1 min) {load_start} at the start, {} at the end",
        loadavg()
    );
    let met = print_report(&r, &command, &versions);
    let _ = std::io::stdout().flush();
    if let Some(tmp) = tmp_guard {
        say!("removing {}", tmp.path().display());
        drop(tmp);
    }
    if interrupted() {
        bail!("interrupted");
    }
    let broken = r.push.iter().chain(&r.pull).any(|s| {
        s.rsync
            .iter()
            .chain(&s.cs)
            .any(|f| f.as_ref().map_or(true, |f| f.check.mismatch.is_some()))
    });
    if !met {
        say!("targets not met (see the table)");
    }
    Ok(!broken)
}

fn main() -> ExitCode {
    let o = match opts() {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rsyncbench: {e:#}");
            return ExitCode::from(2);
        }
    };
    install_signal_handlers();
    started();
    match run(&o) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!(
                "rsyncbench: some runs failed or left a destination unlike its source (see above)"
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("rsyncbench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
