//! `cs rsync [FLAGS] SRC DEST`: one transfer with rsync's semantics, either way between the
//! laptop and a workspace (`SANDBOX/WORKSPACE:PATH` names the workspace side). The laptop
//! lists both sides, plans with the core (`cs_sync::rsync::plan`), and carries the plan out:
//! a push sends ops and content (deltas against files the workspace has) on one stream; a
//! pull fetches content (deltas against the laptop's files) and applies it here. Every file
//! lands through a temporary file checked against the sender's whole-file hash.
//!
//! Exit codes are rsync's: 0 done, 1 usage, 3 bad source or destination, 5 cannot reach the
//! workspace, 12 stream error, 23 partial transfer.

use std::io::Read;
use std::path::{Path, PathBuf};

use cs_protocol::rsync::{
    unpack_listing, Packing, RsyncOpen, RsyncReply, RsyncRequest, DELTA_CHUNK_OPS,
};
use cs_protocol::{StreamOpen, DATA_CHUNK_BYTES_MAX};
use cs_sync::delta::{self, Delta};
use cs_sync::rsync::filter::Rules;
use cs_sync::rsync::{plan::plan, Entry, FileAttrs, Kind, Op, Options, Plan};
use cs_sync::rsync_fs::{self, Receiver, DELTA_FILE_BYTES_MAX};
use cs_transport::{read_frame, write_frame};
use tokio::net::UnixStream;

use crate::home::CsHome;

/// rsync's exit codes that cs uses.
pub mod exit {
    pub const USAGE: i32 = 1;
    pub const FILE_SELECT: i32 = 3;
    pub const START: i32 = 5;
    pub const STREAM: i32 = 12;
    pub const PARTIAL: i32 = 23;
}

/// A failure with its exit code and a line for the user.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

/// Files a pull asks for before the first of them has arrived.
const PULL_AHEAD: usize = 512;
/// Bytes of requests a push gathers per write to the daemon.
const PUSH_BUFFER_BYTES: usize = 256 * 1024;
/// Buffer of a pull's requests and of its replies.
const PULL_BUFFER_BYTES: usize = 256 * 1024;

fn fail<T>(code: i32, message: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        code,
        message: message.into(),
    })
}

/// The flags, as rsync means them.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub opts: Options,
    pub rules: Rules,
    pub verbose: bool,
    pub itemize: bool,
    pub stats: bool,
    pub progress: bool,
    pub partial: bool,
}

/// rsync's `--progress` line for a file transferred: its name, then its size, 100%, the
/// rate, the time, and how many files are done and left.
fn progress(path: &str, size: u64, took: std::time::Duration, done: u64, total: u64) {
    let secs = took.as_secs_f64().max(1e-6);
    let rate = size as f64 / secs;
    let rate = if rate >= 1e6 {
        format!("{:.2}MB/s", rate / 1e6)
    } else {
        format!("{:.2}kB/s", rate / 1e3)
    };
    let t = took.as_secs();
    println!("{path}");
    println!(
        "{size:>15} 100% {rate:>11} {}:{:02}:{:02} (xfr#{done}, to-chk={}/{total})",
        t / 3600,
        t / 60 % 60,
        t % 60,
        total.saturating_sub(done)
    );
}

/// Parses rsync's command line (after `rsync`): flags, then SRC and DEST.
pub fn parse(args: &[String]) -> Result<(Flags, String, String), Failure> {
    let mut f = Flags::default();
    let mut paths = Vec::new();
    let mut i = 0;
    let value = |i: &mut usize, name: &str, inline: Option<&str>| -> Result<String, Failure> {
        if let Some(v) = inline {
            return Ok(v.to_string());
        }
        *i += 1;
        match args.get(*i) {
            Some(v) => Ok(v.clone()),
            None => fail(exit::USAGE, format!("rsync option {name} needs a value")),
        }
    };
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            paths.extend(args[i + 1..].iter().cloned());
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            match name {
                "archive" => set_archive(&mut f.opts),
                "recursive" => f.opts.recursive = true,
                "links" => f.opts.links = true,
                "perms" => f.opts.perms = true,
                "times" => f.opts.times = true,
                "group" => f.opts.group = true,
                "owner" => f.opts.owner = true,
                "devices" | "specials" => f.opts.devices = true,
                "dirs" => f.opts.dirs = true,
                "verbose" => f.verbose = true,
                "dry-run" => f.opts.dry_run = true,
                "delete" => f.opts.delete = true,
                "delete-excluded" => {
                    f.opts.delete = true;
                    f.opts.delete_excluded = true
                }
                "checksum" => f.opts.checksum = true,
                "itemize-changes" => f.itemize = true,
                "stats" => f.stats = true,
                "progress" => f.progress = true,
                "partial" => f.partial = true,
                // cs always packs content (LZ4 on a near link, zstd on a distant one): rsync's
                // habitual -z asks for what happens anyway.
                "compress" => {}
                "exclude" => f.rules.exclude(&value(&mut i, "--exclude", inline)?),
                "include" => f.rules.include(&value(&mut i, "--include", inline)?),
                "filter" => {
                    let r = value(&mut i, "--filter", inline)?;
                    f.rules.filter(&r).map_err(|e| Failure {
                        code: exit::USAGE,
                        message: e.to_string(),
                    })?;
                }
                "exclude-from" => {
                    let p = value(&mut i, "--exclude-from", inline)?;
                    let text = std::fs::read_to_string(&p).map_err(|e| Failure {
                        code: exit::FILE_SELECT,
                        message: format!("failed to open exclude file {p}: {e}"),
                    })?;
                    f.rules.exclude_from(&text);
                }
                _ => {
                    return fail(
                        exit::USAGE,
                        format!("rsync option --{name} is not supported by cs rsync"),
                    )
                }
            }
        } else if a.len() > 1 && a.starts_with('-') {
            let chars: Vec<char> = a[1..].chars().collect();
            let mut k = 0;
            while k < chars.len() {
                match chars[k] {
                    'a' => set_archive(&mut f.opts),
                    'r' => f.opts.recursive = true,
                    'l' => f.opts.links = true,
                    'p' => f.opts.perms = true,
                    't' => f.opts.times = true,
                    'g' => f.opts.group = true,
                    'o' => f.opts.owner = true,
                    'D' => f.opts.devices = true,
                    'd' => f.opts.dirs = true,
                    'v' => f.verbose = true,
                    'n' => f.opts.dry_run = true,
                    'c' => f.opts.checksum = true,
                    'i' => f.itemize = true,
                    'z' => {}
                    'P' => {
                        f.partial = true;
                        f.progress = true
                    }
                    'f' => {
                        let rest: String = chars[k + 1..].iter().collect();
                        let r = value(&mut i, "-f", (!rest.is_empty()).then_some(rest.as_str()))?;
                        f.rules.filter(&r).map_err(|e| Failure {
                            code: exit::USAGE,
                            message: e.to_string(),
                        })?;
                        break;
                    }
                    c => {
                        return fail(
                            exit::USAGE,
                            format!("rsync option -{c} is not supported by cs rsync"),
                        )
                    }
                }
                k += 1;
            }
        } else {
            paths.push(a.clone());
        }
        i += 1;
    }
    match paths.len() {
        2 => {
            let dest = paths.pop().unwrap_or_default();
            let src = paths.pop().unwrap_or_default();
            Ok((f, src, dest))
        }
        n => fail(
            exit::USAGE,
            format!("cs rsync takes one SRC and one DEST (got {n} paths): cs rsync [FLAGS] LOCAL SANDBOX/WORKSPACE:PATH, or the other way round"),
        ),
    }
}

fn set_archive(o: &mut Options) {
    o.recursive = true;
    o.links = true;
    o.perms = true;
    o.times = true;
    o.group = true;
    o.owner = true;
    o.devices = true;
}

/// `SANDBOX/WORKSPACE:PATH` → (workspace, path); a local path otherwise.
fn remote_of(p: &str) -> Option<(&str, &str)> {
    let (ws, path) = p.split_once(':')?;
    let names_a_workspace = !ws.is_empty()
        && !ws.starts_with('/')
        && !ws.starts_with('.')
        && ws.matches('/').count() <= 1;
    names_a_workspace.then_some((ws, path))
}

fn basename(p: &str) -> &str {
    p.trim_end_matches('/').rsplit('/').next().unwrap_or(p)
}

/// The workspace's end of the transfer: one stream, requests answered in order.
struct Remote {
    stream: UnixStream,
    /// How content goes (the agent's choice, by the link's round trip).
    pack: Packing,
}

impl Remote {
    async fn open(home: &CsHome, ws: &str, root: &str) -> Result<Remote, Failure> {
        let stream = crate::automation::open(
            home,
            ws,
            StreamOpen::Rsync(RsyncOpen {
                root: root.to_string(),
            }),
        )
        .await
        .map_err(|e| Failure {
            code: exit::START,
            message: format!("{e:#}"),
        })?;
        let mut r = Remote {
            stream,
            pack: Packing::Raw,
        };
        match r.recv().await? {
            RsyncReply::Opened { pack } => {
                r.pack = pack;
                Ok(r)
            }
            other => fail(exit::STREAM, format!("unexpected answer {other:?}")),
        }
    }

    async fn send(&mut self, r: &RsyncRequest) -> Result<(), Failure> {
        write_frame(&mut self.stream, r).await.map_err(|e| Failure {
            code: exit::STREAM,
            message: format!("the workspace's stream broke: {e}"),
        })
    }

    async fn recv(&mut self) -> Result<RsyncReply, Failure> {
        recv_reply(&mut self.stream).await
    }

    async fn list(&mut self, recursive: bool, hash: bool) -> Result<Vec<Entry>, Failure> {
        self.send(&RsyncRequest::List { recursive, hash }).await?;
        let mut out = Vec::new();
        loop {
            match self.recv().await? {
                RsyncReply::Listing(packed) => {
                    out.extend(unpack_listing(&packed).map_err(|e| Failure {
                        code: exit::STREAM,
                        message: e,
                    })?)
                }
                RsyncReply::ListingEnd => return Ok(out),
                other => return fail(exit::STREAM, format!("unexpected answer {other:?}")),
            }
        }
    }
}

/// The workspace's next answer; its `Error` ends the transfer.
async fn recv_reply<R: tokio::io::AsyncRead + Unpin>(rd: &mut R) -> Result<RsyncReply, Failure> {
    match read_frame::<_, RsyncReply>(rd).await {
        Ok(Some(RsyncReply::Error(e))) => fail(exit::FILE_SELECT, e),
        Ok(Some(r)) => Ok(r),
        Ok(None) => fail(exit::STREAM, "the workspace closed the stream"),
        Err(e) => fail(exit::STREAM, format!("the workspace's stream broke: {e}")),
    }
}

/// Re-roots a listing of the source at the destination's names: `.` becomes `name` and
/// `x` becomes `name/x` (a source without a trailing slash).
fn under(name: &str, entries: Vec<Entry>) -> Vec<Entry> {
    entries
        .into_iter()
        .map(|mut e| {
            e.path = if e.path == "." {
                name.to_string()
            } else {
                format!("{name}/{}", e.path)
            };
            e
        })
        .collect()
}

/// Keeps the destination entries at or under `name` (and the root).
fn only(name: &str, entries: Vec<Entry>) -> Vec<Entry> {
    let prefix = format!("{name}/");
    entries
        .into_iter()
        .filter(|e| e.path == name || e.path.starts_with(&prefix))
        .collect()
}

/// How the source maps onto the destination (rsync's trailing-slash rule).
struct Shape {
    /// The destination root the ops are relative to.
    dest_root: String,
    /// The source listing, re-rooted at the destination's names.
    src: Vec<Entry>,
    /// Only destination paths under this name count (None: the whole root).
    only: Option<String>,
    /// A single file renamed: (its name at the destination, its own name), for the lines
    /// rsync prints (which name the source).
    renamed: Option<(String, String)>,
}

/// Applies rsync's rules: `src/` copies the contents; `src` makes `dest/src`; a single file
/// goes into an existing directory, or becomes `dest` itself.
fn shape(
    src_arg: &str,
    src: Vec<Entry>,
    dest_arg: &str,
    dest_root: Option<&Entry>,
) -> Result<Shape, Failure> {
    let Some(top) = src.first() else {
        return fail(
            exit::PARTIAL,
            format!("link_stat \"{src_arg}\" failed: No such file or directory (2)"),
        );
    };
    let dest_is_dir = dest_root.map(|e| e.kind == Kind::Dir).unwrap_or(false);
    if top.kind == Kind::Dir {
        if src_arg.ends_with('/') {
            Ok(Shape {
                dest_root: dest_arg.to_string(),
                src,
                only: None,
                renamed: None,
            })
        } else {
            let name = basename(src_arg).to_string();
            Ok(Shape {
                dest_root: dest_arg.to_string(),
                src: under(&name, src),
                only: Some(name),
                renamed: None,
            })
        }
    } else if dest_is_dir || dest_arg.ends_with('/') {
        let name = basename(src_arg).to_string();
        Ok(Shape {
            dest_root: dest_arg.to_string(),
            src: under(&name, src),
            only: Some(name),
            renamed: None,
        })
    } else {
        // The single-item rename: the file becomes DEST.
        let parent = match dest_arg.rfind('/') {
            Some(0) => "/".to_string(),
            Some(i) => dest_arg[..i].to_string(),
            None => ".".to_string(),
        };
        let name = basename(dest_arg).to_string();
        Ok(Shape {
            dest_root: parent,
            src: under(&name, src),
            only: Some(name.clone()),
            renamed: Some((name, basename(src_arg).to_string())),
        })
    }
}

/// Runs `cs rsync`; returns the exit code.
pub async fn run(home: &CsHome, args: &[String]) -> i32 {
    match transfer(home, args).await {
        Ok(code) => code,
        Err(f) => {
            eprintln!("rsync: {}", f.message);
            let word = match f.code {
                exit::USAGE => "syntax or usage error",
                exit::FILE_SELECT => "errors selecting input/output files, dirs",
                exit::START => "error starting client-server protocol",
                exit::STREAM => "error in rsync protocol data stream",
                _ => "some files/attrs were not transferred (see previous errors)",
            };
            eprintln!("rsync error: {word} (code {})", f.code);
            f.code
        }
    }
}

async fn transfer(home: &CsHome, args: &[String]) -> Result<i32, Failure> {
    let (flags, src_arg, dest_arg) = parse(args)?;
    match (remote_of(&src_arg), remote_of(&dest_arg)) {
        (None, Some((ws, path))) => push(home, &flags, &src_arg, ws, path).await,
        (Some((ws, path)), None) => pull(home, &flags, ws, path, &dest_arg).await,
        (Some(_), Some(_)) => fail(exit::USAGE, "The source and destination cannot both be remote."),
        (None, None) => fail(
            exit::USAGE,
            "one of SRC and DEST must be in a workspace (SANDBOX/WORKSPACE:PATH); for two local paths use rsync itself",
        ),
    }
}

fn local_list(path: &str, opts: &Options) -> Result<Vec<Entry>, Failure> {
    rsync_fs::list(Path::new(path), opts.recursive, opts.checksum).map_err(|e| Failure {
        code: exit::PARTIAL,
        message: e,
    })
}

fn the_plan(shape: &Shape, dest: Vec<Entry>, flags: &Flags) -> Plan {
    let dest = match &shape.only {
        Some(n) => only(n, dest),
        None => dest,
    };
    plan(&shape.src, &dest, &flags.opts, &flags.rules)
}

fn report(flags: &Flags, shape: &Shape, p: &Plan, first: char, sent: u64, received: u64) {
    if flags.verbose {
        println!("sending incremental file list");
    }
    // rsync prints its notices (skipped files, undeletable directories) on stdout.
    for w in &p.warnings {
        println!("{w}");
    }
    for e in &p.errors {
        eprintln!("rsync: {e}");
    }
    let itemized: Vec<String> = p
        .itemized
        .iter()
        .map(|l| match &shape.renamed {
            Some((to, from)) if l.len() > 12 && &l[12..] == to => format!("{}{from}", &l[..12]),
            _ => l.clone(),
        })
        .collect();
    if flags.itemize {
        for line in &itemized {
            let mut l = line.clone();
            if l.starts_with('>') {
                l.replace_range(0..1, &first.to_string());
            }
            println!("{l}");
        }
    } else if flags.verbose {
        for line in &itemized {
            if let Some(name) = line.get(12..) {
                if line.starts_with('*') {
                    println!("deleting {}", line[12..].trim_start());
                } else if !line.starts_with('.') || line.as_bytes().get(1) != Some(&b'd') {
                    println!("{name}");
                }
            }
        }
    }
    if flags.stats {
        println!();
        println!("Number of files: {}", p.files_considered);
        println!("Number of deleted files: {}", p.deleted);
        println!("Number of regular files transferred: {}", p.files_sent);
        println!("Total transferred file size: {} bytes", p.bytes_to_send);
        println!("Total bytes sent: {sent}");
        println!("Total bytes received: {received}");
    }
    if flags.verbose || flags.stats {
        println!();
        println!(
            "sent {sent} bytes  received {received} bytes{}",
            if flags.opts.dry_run { " (DRY RUN)" } else { "" }
        );
    }
}

async fn push(
    home: &CsHome,
    flags: &Flags,
    src_arg: &str,
    ws: &str,
    dest_path: &str,
) -> Result<i32, Failure> {
    // What SRC and DEST are decides the shape (an existing directory, or a name for a single
    // file): their tops are enough to know where the destination root is.
    let src_top = rsync_fs::stat_root(Path::new(src_arg)).map_err(|e| Failure {
        code: exit::PARTIAL,
        message: e,
    })?;
    let mut probe = Remote::open(home, ws, dest_path).await?;
    let dest_top = probe.list(false, false).await?;
    let root = shape(
        src_arg,
        src_top.into_iter().collect(),
        dest_path,
        dest_top.first(),
    )?;
    let mut remote = if root.dest_root == dest_path {
        probe
    } else {
        Remote::open(home, ws, &root.dest_root).await?
    };
    // Both listings at once, as rsync's two ends scan at once: this side's on a thread of
    // its own, the workspace's over the link.
    let local = {
        let (src_arg, opts) = (src_arg.to_string(), flags.opts.clone());
        tokio::task::spawn_blocking(move || local_list(&src_arg, &opts))
    };
    let dest = remote
        .list(flags.opts.recursive || flags.opts.dirs, flags.opts.checksum)
        .await?;
    let src = local.await.map_err(|e| Failure {
        code: exit::PARTIAL,
        message: format!("listing {src_arg} failed: {e}"),
    })??;
    let shape = shape(src_arg, src, dest_path, dest_top.first())?;
    if shape.dest_root != root.dest_root {
        return fail(
            exit::PARTIAL,
            format!("{src_arg} changed from a file to a directory or back while it was listed"),
        );
    }
    let missing_root = !dest.iter().any(|e| e.path == ".");
    let p = the_plan(&shape, dest, flags);
    let src_root = local_source_root(src_arg, &shape);
    let (mut sent, mut failed) = (0u64, Vec::new());
    if !flags.opts.dry_run {
        if missing_root && shape.only.is_some() {
            // `src` into a DEST that does not exist: rsync creates DEST first.
            remote
                .send(&RsyncRequest::Apply(Op::Mkdir { path: ".".into() }))
                .await?;
        }
        // Signatures of the files that have a basis there, in batches.
        let mut sigs = std::collections::BTreeMap::new();
        let basis: Vec<&str> = p
            .ops
            .iter()
            .filter_map(|o| match o {
                Op::Send { path, basis: true } => Some(path.as_str()),
                _ => None,
            })
            .filter(|path| {
                let rel = path_in_source(path, &shape);
                let local = if rel.is_empty() {
                    src_root.clone()
                } else {
                    src_root.join(rel)
                };
                std::fs::metadata(local)
                    .map(|m| m.len() <= DELTA_FILE_BYTES_MAX)
                    .unwrap_or(false)
            })
            .collect();
        for batch in basis.chunks(32) {
            for path in batch {
                remote
                    .send(&RsyncRequest::Signature {
                        path: path.to_string(),
                    })
                    .await?;
            }
            for path in batch {
                match remote.recv().await? {
                    RsyncReply::Sig(s) => {
                        sigs.insert(path.to_string(), s);
                    }
                    RsyncReply::Failed { .. } => {}
                    other => return fail(exit::STREAM, format!("unexpected answer {other:?}")),
                }
            }
        }
        let pack = remote.pack;
        let (rd, wr) = remote.stream.into_split();
        // Small requests (a file's `Put` and `PutEnd`) go out several to a system call; the
        // writer flushes at the end (the replies never wait on a request still buffered: a
        // push's only answers are failures and `Finished`).
        let mut wr = tokio::io::BufWriter::with_capacity(PUSH_BUFFER_BYTES, wr);
        let mut done = 0u64;
        let writer = async {
            let mut folded = false;
            for (i, op) in p.ops.iter().enumerate() {
                if std::mem::take(&mut folded) {
                    // This file's `Attrs`, sent along with its content.
                    continue;
                }
                match op {
                    Op::Send { path, .. } => {
                        let attrs = Op::attrs_after(&p.ops, i);
                        folded = attrs.is_some();
                        let rel = path_in_source(path, &shape);
                        let local = if rel.is_empty() {
                            src_root.clone()
                        } else {
                            src_root.join(rel)
                        };
                        let started = std::time::Instant::now();
                        let n = send_content(
                            &mut wr,
                            path,
                            &local,
                            sigs.get(path),
                            Sending {
                                partial: flags.partial,
                                pack,
                                attrs,
                            },
                        )
                        .await?;
                        sent += n;
                        done += 1;
                        if flags.progress {
                            let size = std::fs::metadata(&local).map(|m| m.len()).unwrap_or(n);
                            progress(path, size, started.elapsed(), done, p.files_sent);
                        }
                    }
                    other => {
                        write_frame(&mut wr, &RsyncRequest::Apply(other.clone()))
                            .await
                            .map_err(stream_broke)?;
                    }
                }
            }
            write_frame(&mut wr, &RsyncRequest::Finish)
                .await
                .map_err(stream_broke)?;
            tokio::io::AsyncWriteExt::flush(&mut wr)
                .await
                .map_err(|e| stream_broke(e.into()))?;
            Ok::<_, Failure>(())
        };
        let reader = async {
            let mut rd = rd;
            loop {
                match read_frame::<_, RsyncReply>(&mut rd).await {
                    Ok(Some(RsyncReply::Failed { path, reason })) => failed.push((path, reason)),
                    Ok(Some(RsyncReply::Finished { .. })) => return Ok(()),
                    Ok(Some(RsyncReply::Error(e))) => return fail(exit::STREAM, e),
                    Ok(Some(other)) => {
                        return fail(exit::STREAM, format!("unexpected answer {other:?}"))
                    }
                    Ok(None) | Err(_) => {
                        return fail(exit::STREAM, "the workspace closed the stream")
                    }
                }
            }
        };
        let (w, r) = tokio::join!(writer, reader);
        w?;
        r?;
    }
    report(flags, &shape, &p, '<', sent, 0);
    finish(failed, !p.errors.is_empty())
}

fn stream_broke(e: cs_transport::FrameError) -> Failure {
    Failure {
        code: exit::STREAM,
        message: format!("the workspace's stream broke: {e}"),
    }
}

fn finish(failed: Vec<(String, String)>, planned_errors: bool) -> Result<i32, Failure> {
    for (path, reason) in &failed {
        eprintln!("rsync: {path}: {reason}");
    }
    if failed.is_empty() && !planned_errors {
        Ok(0)
    } else {
        fail(
            exit::PARTIAL,
            format!(
                "{} files or attributes were not transferred",
                failed.len() + usize::from(planned_errors)
            ),
        )
    }
}

/// The local directory the source listing was taken from, for reading content.
fn local_source_root(src_arg: &str, shape: &Shape) -> PathBuf {
    match &shape.only {
        // `src` (no slash) or a single file: paths start with the name, which is the
        // source's own basename (or DEST's for a rename, mapped back by `path_in_source`).
        Some(_) => Path::new(src_arg.trim_end_matches('/')).to_path_buf(),
        None => Path::new(src_arg).to_path_buf(),
    }
}

/// Where a destination path's content is in the source, relative to `local_source_root`.
fn path_in_source(path: &str, shape: &Shape) -> String {
    match &shape.only {
        Some(name) => path
            .strip_prefix(name.as_str())
            .map(|r| r.trim_start_matches('/').to_string())
            .unwrap_or_default(),
        None => path.to_string(),
    }
}

/// How a file's content goes.
struct Sending {
    /// `--partial`.
    partial: bool,
    /// How chunks are packed (the agent's choice).
    pack: Packing,
    /// The file's attributes, set before it goes in place.
    attrs: Option<FileAttrs>,
}

/// Sends one file's content (a delta when the workspace's signature is there); the bytes
/// sent.
async fn send_content<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    path: &str,
    local: &Path,
    sig: Option<&delta::Signature>,
    how: Sending,
) -> Result<u64, Failure> {
    let Sending {
        partial,
        pack,
        attrs,
    } = how;
    if let Some(sig) = sig {
        if let Ok(bytes) = std::fs::read(local) {
            let d = delta::delta(sig, &bytes);
            let put = RsyncRequest::PutDelta {
                path: path.to_string(),
                size: d.target_bytes,
                hash: d.target_hash,
            };
            write_frame(wr, &put).await.map_err(stream_broke)?;
            for c in d.ops.chunks(DELTA_CHUNK_OPS) {
                write_frame(wr, &RsyncRequest::DeltaPart(c.to_vec()))
                    .await
                    .map_err(stream_broke)?;
            }
            write_frame(wr, &RsyncRequest::DeltaEnd(attrs))
                .await
                .map_err(stream_broke)?;
            return Ok(d.literal_bytes());
        }
    }
    write_frame(
        wr,
        &RsyncRequest::Put {
            path: path.to_string(),
            partial,
        },
    )
    .await
    .map_err(stream_broke)?;
    let mut h = blake3::Hasher::new();
    let mut size = 0u64;
    match std::fs::File::open(local) {
        Ok(mut f) => {
            let mut buf = vec![0u8; DATA_CHUNK_BYTES_MAX];
            // A read error ends the content early: the hash check at the other end fails the
            // file, which is reported.
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                size += n as u64;
                write_frame(wr, &RsyncRequest::data(buf[..n].to_vec(), pack))
                    .await
                    .map_err(stream_broke)?;
            }
        }
        Err(e) => eprintln!(
            "rsync: send_files failed to open \"{}\": {e}",
            local.display()
        ),
    }
    let end = RsyncRequest::PutEnd {
        size,
        hash: *h.finalize().as_bytes(),
        attrs,
    };
    write_frame(wr, &end).await.map_err(stream_broke)?;
    Ok(size)
}

async fn pull(
    home: &CsHome,
    flags: &Flags,
    ws: &str,
    src_path: &str,
    dest_arg: &str,
) -> Result<i32, Failure> {
    let mut remote = Remote::open(home, ws, src_path).await?;
    let dest_top = rsync_fs::stat_root(Path::new(dest_arg)).map_err(|e| Failure {
        code: exit::FILE_SELECT,
        message: e,
    })?;
    let dest_opts = Options {
        checksum: flags.opts.checksum,
        recursive: flags.opts.recursive || flags.opts.dirs,
        ..Options::default()
    };
    // An existing directory DEST is the destination root whatever the source is: list it
    // on a thread of its own while the workspace lists the source.
    let early = dest_top.as_ref().filter(|t| t.kind == Kind::Dir).map(|_| {
        let (dest_arg, opts) = (dest_arg.to_string(), dest_opts.clone());
        tokio::task::spawn_blocking(move || local_list(&dest_arg, &opts))
    });
    let src = remote
        .list(flags.opts.recursive || flags.opts.dirs, flags.opts.checksum)
        .await?;
    let shape = shape(src_path, src, dest_arg, dest_top.as_ref())?;
    let dest = match early {
        Some(listing) if shape.dest_root == dest_arg => listing.await.map_err(|e| Failure {
            code: exit::FILE_SELECT,
            message: format!("listing {dest_arg} failed: {e}"),
        })??,
        _ if Path::new(&shape.dest_root).exists() => local_list(&shape.dest_root, &dest_opts)?,
        _ => Vec::new(),
    };
    let p = the_plan(&shape, dest, flags);
    let mut received = 0u64;
    let mut failed = Vec::new();
    if !flags.opts.dry_run {
        if !Path::new(&shape.dest_root).exists() {
            std::fs::create_dir_all(&shape.dest_root).map_err(|e| Failure {
                code: exit::FILE_SELECT,
                message: format!("mkdir \"{}\" failed: {e}", shape.dest_root),
            })?;
        }
        let (rd, wr) = remote.stream.into_split();
        // Requests go out several to a system call: the writer flushes before it waits for
        // the replies to catch up, and at the end.
        let mut wr = tokio::io::BufWriter::with_capacity(PULL_BUFFER_BYTES, wr);
        // The requests run ahead of the replies by up to PULL_AHEAD files (in plan order, as
        // the workspace answers them), so its reading, the link and the writing here overlap
        // instead of taking turns once per file.
        let (ahead_tx, mut ahead_rx) = tokio::sync::mpsc::channel::<()>(PULL_AHEAD);
        let writer = async {
            let mut basis_of = Receiver::new(PathBuf::from(&shape.dest_root));
            for op in &p.ops {
                let Op::Send { path, basis } = op else {
                    continue;
                };
                let src_rel = path_in_source(path, &shape);
                let src_rel = if src_rel.is_empty() { "." } else { &src_rel };
                let request = match basis.then(|| basis_bytes(&mut basis_of, path)).flatten() {
                    Some(b) => RsyncRequest::GetDelta {
                        path: src_rel.to_string(),
                        sig: delta::signature(&b),
                    },
                    None => RsyncRequest::Get {
                        path: src_rel.to_string(),
                    },
                };
                write_frame(&mut wr, &request).await.map_err(stream_broke)?;
                match ahead_tx.try_send(()) {
                    Ok(()) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Full(())) => {
                        tokio::io::AsyncWriteExt::flush(&mut wr)
                            .await
                            .map_err(|e| stream_broke(e.into()))?;
                        if ahead_tx.send(()).await.is_err() {
                            break;
                        }
                    }
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => break,
                }
            }
            write_frame(&mut wr, &RsyncRequest::Finish)
                .await
                .map_err(stream_broke)?;
            tokio::io::AsyncWriteExt::flush(&mut wr)
                .await
                .map_err(|e| stream_broke(e.into()))?;
            Ok::<_, Failure>(())
        };
        let reader = async {
            // Replies are read a buffer at a time, not two system calls a frame.
            let mut rd = tokio::io::BufReader::with_capacity(PULL_BUFFER_BYTES, rd);
            let mut local = Receiver::new(PathBuf::from(&shape.dest_root));
            let mut done = 0u64;
            let mut folded = false;
            for (i, op) in p.ops.iter().enumerate() {
                if std::mem::take(&mut folded) {
                    continue;
                }
                let r = match op {
                    Op::Delete { path, .. } => local.delete(path).map(|()| 0),
                    Op::Mkdir { path } => local.mkdir(path).map(|()| 0),
                    Op::Symlink { path, target } => local.symlink(path, target).map(|()| 0),
                    Op::Attrs {
                        path,
                        mode,
                        mtime,
                        uid,
                        gid,
                    } => local.attrs(path, *mode, *mtime, *uid, *gid).map(|()| 0),
                    Op::Send { path, .. } => {
                        if ahead_rx.recv().await.is_none() {
                            return fail(exit::STREAM, "the request writer stopped");
                        }
                        let started = std::time::Instant::now();
                        let attrs = Op::attrs_after(&p.ops, i);
                        folded = attrs.is_some();
                        let r = fetch(&mut rd, &mut local, path, flags.partial, attrs).await?;
                        done += 1;
                        if flags.progress && r.is_ok() {
                            let size = local
                                .path(path)
                                .ok()
                                .and_then(|p| std::fs::metadata(p).ok())
                                .map(|m| m.len())
                                .unwrap_or(0);
                            progress(path, size, started.elapsed(), done, p.files_sent);
                        }
                        r
                    }
                };
                match r {
                    Ok(n) => received += n,
                    Err(e) => failed.push((op_path(op).to_string(), e)),
                }
            }
            match recv_reply(&mut rd).await? {
                RsyncReply::Finished { .. } => Ok(()),
                other => fail(exit::STREAM, format!("unexpected answer {other:?}")),
            }
        };
        // The first to fail ends both: a writer blocked on a stream nobody reads any more
        // must not outlive the reader.
        tokio::try_join!(writer, reader)?;
    }
    report(flags, &shape, &p, '>', 0, received);
    finish(failed, !p.errors.is_empty())
}

fn op_path(op: &Op) -> &str {
    match op {
        Op::Delete { path, .. }
        | Op::Mkdir { path }
        | Op::Send { path, .. }
        | Op::Symlink { path, .. }
        | Op::Attrs { path, .. } => path,
    }
}

/// The basis a pulled file's delta is taken against: the regular file at `path` here, if it
/// is at most [`DELTA_FILE_BYTES_MAX`] bytes.
fn basis_bytes(local: &mut Receiver, path: &str) -> Option<Vec<u8>> {
    let p = local.path(path).ok()?;
    let m = std::fs::symlink_metadata(&p).ok()?;
    (m.is_file() && m.len() <= DELTA_FILE_BYTES_MAX)
        .then(|| std::fs::read(&p).ok())
        .flatten()
}

/// Receives the answer to one file's `Get` or `GetDelta` into `local` (a delta is applied to
/// the file here, read again: if it changed since its signature went, the result's hash
/// does not match and the file fails); Ok(Err) is a failure of this file only.
async fn fetch<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    local: &mut Receiver,
    path: &str,
    partial: bool,
    attrs: Option<FileAttrs>,
) -> Result<Result<u64, String>, Failure> {
    let can_chown = local.can_chown;
    let first = recv_reply(rd).await?;
    if matches!(first, RsyncReply::DeltaPart(_) | RsyncReply::DeltaEnd(_)) {
        let mut ops = Vec::new();
        let mut reply = first;
        let end = loop {
            match reply {
                RsyncReply::DeltaPart(mut o) => ops.append(&mut o),
                RsyncReply::DeltaEnd(r) => break r,
                other => return fail(exit::STREAM, format!("unexpected answer {other:?}")),
            }
            reply = recv_reply(rd).await?;
        };
        let (size, hash) = match end {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        let d = Delta {
            ops,
            target_bytes: size,
            target_hash: hash,
        };
        let literal = d.literal_bytes();
        let r = basis_bytes(local, path)
            .ok_or_else(|| format!("{path}: the basis file went away"))
            .and_then(|basis| delta::patch(&basis, &d, size).map_err(|e| format!("{path}: {e}")))
            .and_then(|out| {
                let mut f = local.begin_file(path)?;
                f.write(&out)?;
                f.finish_with(size, &hash, attrs.as_ref(), can_chown)
            });
        return Ok(r.map(|()| literal));
    }
    let mut file = local.begin_file(path).map(|mut f| {
        if partial {
            f.keep_partial();
        }
        f
    });
    let mut n = 0u64;
    let mut reply = first;
    loop {
        let chunk = match reply {
            RsyncReply::Data(b) if b.is_empty() => break,
            RsyncReply::Data(b) => b,
            r @ (RsyncReply::Packed(_) | RsyncReply::Lz4(_)) => match r.unpacked() {
                Ok(RsyncReply::Data(b)) => b,
                Ok(other) => return fail(exit::STREAM, format!("unexpected answer {other:?}")),
                Err(e) => {
                    return fail(exit::STREAM, format!("the workspace sent a bad chunk: {e}"))
                }
            },
            other => return fail(exit::STREAM, format!("unexpected answer {other:?}")),
        };
        n += chunk.len() as u64;
        if let Ok(f) = file.as_mut() {
            if let Err(e) = f.write(&chunk) {
                file = Err(e);
            }
        }
        reply = recv_reply(rd).await?;
    }
    let end = match recv_reply(rd).await? {
        RsyncReply::DataEnd(r) => r,
        other => return fail(exit::STREAM, format!("unexpected answer {other:?}")),
    };
    Ok(match (file, end) {
        (Ok(f), Ok((size, hash))) => f
            .finish_with(size, &hash, attrs.as_ref(), can_chown)
            .map(|()| n),
        (Err(e), _) | (_, Err(e)) => Err(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_as_rsync_reads_them() {
        let (f, s, d) = parse(&args(
            "-avzn --delete --exclude=*.o --include x -c --compress src/ sb/ws:dst",
        ))
        .unwrap();
        assert!(f.opts.recursive && f.opts.links && f.opts.perms && f.opts.times && f.opts.owner);
        assert!(f.verbose && f.opts.dry_run && f.opts.delete && f.opts.checksum);
        assert_eq!((s.as_str(), d.as_str()), ("src/", "sb/ws:dst"));
        for (bad, says) in [
            ("-aH a b:c", "rsync option -H is not supported by cs rsync"),
            (
                "--bwlimit=10 a b:c",
                "rsync option --bwlimit is not supported",
            ),
            ("a", "one SRC and one DEST (got 1 paths)"),
            ("--exclude", "--exclude needs a value"),
        ] {
            let e = parse(&args(bad)).unwrap_err();
            assert_eq!(e.code, exit::USAGE);
            assert!(e.message.contains(says), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn which_side_is_remote() {
        assert_eq!(remote_of("sb/ws:src"), Some(("sb/ws", "src")));
        assert_eq!(remote_of("sb:src"), Some(("sb", "src")));
        assert_eq!(remote_of("./a:b"), None);
        assert_eq!(remote_of("/tmp/a:b"), None);
        assert_eq!(remote_of("plain"), None);
    }
}
