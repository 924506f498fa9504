//! The scanning shell: walks a real directory into a [`Snapshot`]. Uses `std::fs` and worker
//! threads, so it is never called from simulated code (the simulation builds snapshots
//! directly).
//!
//! - Ignored paths ([`Ignorer`]) are skipped before descending; with `--ignore-gitignored`
//!   each directory's `.gitignore` is read before its listing.
//! - Symlinks are recorded, never followed (the reconciler judges their targets).
//! - Files are hashed with blake3 only on a cache miss: the [`HashCache`] maps each path to
//!   (size, mtime_ns, inode, mode) and the digest; it is a value passed in and returned, and
//!   serializable so it survives restarts.
//! - Cache misses are hashed in parallel on scoped threads (`std::thread::scope`, at most
//!   [`HASH_WORKERS_MAX`]): std only, the threads cannot outlive the scan, and a work-stealing
//!   pool (rayon) buys nothing for a flat list of files pulled from one atomic counter.
//! - Anything unreadable, a socket or device, or a file that changed while being hashed
//!   becomes an [`Entry::Problem`] at its path (so the reconciler never takes it for a
//!   deletion); names that are not UTF-8 or not valid paths are listed in
//!   [`ScanOutput::problems`]. Only a root that cannot be examined at all fails the scan.
//! - [`rescan`] redoes only the subtrees named by a watcher.

use std::collections::BTreeMap;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use crate::apply::TEMP_PREFIX;
use crate::ignore::{Ignorer, GITIGNORE_NAME};
use crate::path::RelPath;
use crate::tree::{ContentHash, Entry, Snapshot};

/// Most hashing threads one scan uses.
pub const HASH_WORKERS_MAX: usize = 4;
/// Read buffer per hashing thread, in bytes.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Largest `.gitignore` read, in bytes; a larger one is reported and not honoured.
pub const GITIGNORE_BYTES_MAX: u64 = 1024 * 1024;

/// The magic line of a saved [`HashCache`] (the shells keep one per root between runs).
pub const CACHE_MAGIC: &[u8] = b"cs-hash-cache/1\n";

/// What identifies an unchanged file without reading it (Mutagen's cache key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub size: u64,
    pub mtime_ns: i128,
    pub inode: u64,
    pub mode: u32,
    pub hash: ContentHash,
}

/// Digests of files as of the last scan, keyed by path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashCache {
    entries: BTreeMap<RelPath, CacheEntry>,
}

impl HashCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache holding these entries.
    pub fn from_entries(entries: impl IntoIterator<Item = (RelPath, CacheEntry)>) -> Self {
        HashCache {
            entries: entries.into_iter().collect(),
        }
    }

    /// The cached digest of `path`, if any.
    pub fn get(&self, path: &RelPath) -> Option<&CacheEntry> {
        self.entries.get(path)
    }

    /// Number of cached files.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Something in the tree the snapshot cannot name at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanProblem {
    /// A name that is not UTF-8; rename it to sync it.
    #[error("{dir}: name {name:?} is not UTF-8 and is not synced")]
    NonUtf8 { dir: RelPath, name: String },
    /// A name that is not a valid path component.
    #[error("{dir}: name {name:?} cannot be synced: {reason}")]
    BadName {
        dir: RelPath,
        name: String,
        reason: String,
    },
    /// A `.gitignore` that could not be read or has invalid lines.
    #[error("{0}")]
    Gitignore(String),
}

/// Why a scan could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The root exists but is not a directory: point the session at a directory.
    #[error("sync root {0} is not a directory")]
    RootNotDir(PathBuf),
    /// The root cannot be examined (permissions, I/O error).
    #[error("cannot examine sync root {path}: {source}")]
    Root { path: PathBuf, source: io::Error },
}

/// The result of a scan.
#[derive(Clone, Debug, Default)]
pub struct ScanOutput {
    pub snapshot: Snapshot,
    /// The cache to pass to the next scan.
    pub cache: HashCache,
    pub problems: Vec<ScanProblem>,
    /// How many files were read and hashed (cache misses).
    pub files_hashed: usize,
    /// What changed against the previous scan's snapshot, in snapshot order, when this
    /// scan was given one ([`rescan`], [`rescan_all`]).
    pub changes: Option<Vec<crate::tree::Change>>,
}

/// Scans the whole tree at `root`. A missing root gives an empty snapshot.
pub fn scan(root: &Path, ignorer: &Ignorer, cache: &HashCache) -> Result<ScanOutput, ScanError> {
    let mut walker = Walker::new(root, ignorer.clone(), cache);
    // The root itself may be a symlink the user chose; nothing below it is followed.
    match fs::metadata(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ScanOutput::default()),
        Err(source) => {
            return Err(ScanError::Root {
                path: root.to_owned(),
                source,
            })
        }
        Ok(m) if !m.is_dir() => return Err(ScanError::RootNotDir(root.to_owned())),
        Ok(_) => {}
    }
    walker.add(RelPath::root(), Entry::Dir);
    walker.walk(RelPath::root());
    Ok(walker.finish())
}

/// Rescans only `changed` paths (and what lies below them) on top of `previous`, the
/// output of the last scan with the same `ignorer`, which it updates in place: the cost is
/// the size of the changed subtrees, not of the tree. Gives the same snapshot as a full scan
/// as long as every change is at or below a listed path, and sets [`ScanOutput::changes`].
pub fn rescan(
    root: &Path,
    ignorer: &Ignorer,
    previous: ScanOutput,
    changed: &[RelPath],
) -> Result<ScanOutput, ScanError> {
    let mut tops: Vec<RelPath> = Vec::new();
    for path in changed {
        let mut top = path.clone();
        // A changed .gitignore changes what its whole directory holds.
        if ignorer.honours_gitignore() && top.name() == Some(GITIGNORE_NAME) {
            top = top.parent().unwrap_or_default();
        }
        // Rescan from the highest ancestor the previous snapshot lacks as a directory.
        for ancestor in path.ancestors().into_iter().rev() {
            if previous.snapshot.get(&ancestor) != Some(&Entry::Dir) {
                top = ancestor;
            }
        }
        tops.push(top);
    }
    tops.sort();
    tops.dedup();
    // Drop paths inside another listed path (sorted: a parent comes right before them).
    let mut kept: Vec<RelPath> = Vec::new();
    for t in tops {
        if !kept.last().is_some_and(|k| t.starts_with(k)) {
            kept.push(t);
        }
    }
    if kept.iter().any(RelPath::is_root) || !previous.snapshot.has_root() {
        return rescan_all(root, ignorer, previous);
    }

    let ScanOutput {
        mut snapshot,
        mut cache,
        ..
    } = previous;
    let mut ignorer = ignorer.clone();
    let mut problems = Vec::new();
    // The .gitignore files of every directory above a rescanned path.
    if ignorer.honours_gitignore() {
        let mut dirs: Vec<RelPath> = kept.iter().flat_map(|k| k.ancestors()).collect();
        dirs.sort();
        dirs.dedup();
        for dir in &dirs {
            load_gitignore(root, dir, &mut ignorer, &mut problems);
        }
    }
    // Take the old subtrees out; their cache entries are all the walk can hit.
    let mut old_subtrees = Vec::with_capacity(kept.len());
    let mut old_cache = HashCache::new();
    for top in &kept {
        old_subtrees.push(snapshot.take_subtree(top));
        old_cache
            .entries
            .extend(take_range(&mut cache.entries, top));
    }
    let mut walker = Walker::new(root, ignorer, &old_cache);
    walker.snapshot = snapshot;
    walker.cache = cache;
    walker.problems = problems;
    for top in &kept {
        // Its parent is in the snapshot as a directory, so it was not inside an ignored one.
        walker.visit(top.clone());
    }
    let mut out = walker.finish();
    let mut changes = Vec::new();
    for (top, old) in kept.iter().zip(old_subtrees) {
        crate::tree::merge_changes(
            old.iter().map(|(p, e)| (p, e)),
            out.snapshot.subtree(top),
            &mut changes,
        );
    }
    out.changes = Some(changes);
    Ok(out)
}

/// A full scan reusing `previous`'s cache, with the changes against its snapshot.
pub fn rescan_all(
    root: &Path,
    ignorer: &Ignorer,
    previous: ScanOutput,
) -> Result<ScanOutput, ScanError> {
    let mut out = scan(root, ignorer, &previous.cache)?;
    out.changes = Some(previous.snapshot.changes_to(&out.snapshot));
    Ok(out)
}

/// Removes `top` and everything below it from a path-keyed map, returning them in order.
fn take_range<V>(map: &mut BTreeMap<RelPath, V>, top: &RelPath) -> Vec<(RelPath, V)> {
    let keys: Vec<RelPath> = map
        .range(top.clone()..)
        .take_while(|(p, _)| p.starts_with(top))
        .map(|(p, _)| p.clone())
        .collect();
    keys.into_iter()
        .filter_map(|k| map.remove_entry(&k))
        .collect()
}

/// A file waiting to be hashed.
struct Job {
    path: RelPath,
    fs_path: PathBuf,
    key: CacheKey,
    exec: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct CacheKey {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    mode: u32,
}

impl CacheKey {
    fn of(m: &Metadata) -> Self {
        CacheKey {
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            inode: m.ino(),
            mode: m.mode(),
        }
    }
}

struct Walker<'a> {
    root: &'a Path,
    ignorer: Ignorer,
    old_cache: &'a HashCache,
    snapshot: Snapshot,
    cache: HashCache,
    problems: Vec<ScanProblem>,
    jobs: Vec<Job>,
}

impl<'a> Walker<'a> {
    fn new(root: &'a Path, ignorer: Ignorer, old_cache: &'a HashCache) -> Self {
        Walker {
            root,
            ignorer,
            old_cache,
            snapshot: Snapshot::new(),
            cache: HashCache::new(),
            problems: Vec::new(),
            jobs: Vec::new(),
        }
    }

    fn add(&mut self, path: RelPath, entry: Entry) {
        // The walk adds parents before children, so this cannot fail; if it did, the entry
        // is left out rather than the scan aborted.
        let _ = self.snapshot.insert(path, entry);
    }

    /// Records `path` (whose parent is already recorded) and, for a directory, its subtree.
    fn visit(&mut self, path: RelPath) {
        // Sync's own staging files are never part of a tree (a rescan may name one).
        if path.name().is_some_and(|n| n.starts_with(TEMP_PREFIX)) {
            return;
        }
        let fs_path = path.to_fs_path(self.root);
        let meta = match fs::symlink_metadata(&fs_path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => return self.add(path, problem(&e)),
        };
        let ft = meta.file_type();
        if self.ignorer.is_ignored(&path, ft.is_dir()) {
            return;
        }
        if ft.is_dir() {
            self.add(path.clone(), Entry::Dir);
            self.walk(path);
        } else if ft.is_symlink() {
            match fs::read_link(&fs_path) {
                Ok(target) => match target.into_os_string().into_string() {
                    Ok(target) => self.add(path, Entry::Symlink { target }),
                    Err(t) => self.add(
                        path,
                        Entry::Problem {
                            reason: format!("symlink target {t:?} is not UTF-8"),
                        },
                    ),
                },
                Err(e) => self.add(path, problem(&e)),
            }
        } else if ft.is_file() {
            let key = CacheKey::of(&meta);
            if key.size > self.ignorer.max_file_size() {
                return self.add(
                    path,
                    Entry::Problem {
                        reason: format!(
                            "{} bytes, over the session's maximum file size of {} bytes",
                            key.size,
                            self.ignorer.max_file_size()
                        ),
                    },
                );
            }
            let exec = key.mode & 0o111 != 0;
            match self.old_cache.get(&path) {
                Some(c)
                    if c.size == key.size
                        && c.mtime_ns == key.mtime_ns
                        && c.inode == key.inode
                        && c.mode == key.mode =>
                {
                    self.cache.entries.insert(path.clone(), *c);
                    self.add(
                        path,
                        Entry::File {
                            size: key.size,
                            exec,
                            hash: c.hash,
                        },
                    );
                }
                _ => self.jobs.push(Job {
                    path,
                    fs_path,
                    key,
                    exec,
                }),
            }
        } else {
            self.add(
                path,
                Entry::Problem {
                    reason: "not a regular file, directory or symlink".into(),
                },
            );
        }
    }

    /// Lists the directory `dir` (already recorded) and visits its children.
    fn walk(&mut self, dir: RelPath) {
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            if self.ignorer.honours_gitignore() {
                load_gitignore(self.root, &dir, &mut self.ignorer, &mut self.problems);
            }
            let listing = match fs::read_dir(dir.to_fs_path(self.root)) {
                Ok(l) => l,
                Err(e) => {
                    // Keep the directory as a problem: its contents are unknown, not gone.
                    self.snapshot.remove(&dir);
                    self.add(dir, problem(&e));
                    continue;
                }
            };
            let mut names = Vec::new();
            for item in listing {
                match item {
                    // The listing's file type (d_type) saves a stat per entry; `None` when the
                    // filesystem does not say.
                    Ok(item) => names.push((item.file_name(), item.file_type().ok())),
                    Err(e) => {
                        self.snapshot.remove(&dir);
                        self.add(dir.clone(), problem(&e));
                        names.clear();
                        break;
                    }
                }
            }
            names.sort_by(|a, b| a.0.cmp(&b.0));
            let mut subdirs = Vec::new();
            for (name, file_type) in names {
                let name = match name.into_string() {
                    Ok(n) => n,
                    Err(n) => {
                        self.problems.push(ScanProblem::NonUtf8 {
                            dir: dir.clone(),
                            name: n.to_string_lossy().into_owned(),
                        });
                        continue;
                    }
                };
                if name.starts_with(TEMP_PREFIX) {
                    continue;
                }
                let child = match dir.join(&name) {
                    Ok(c) => c,
                    Err(e) => {
                        self.problems.push(ScanProblem::BadName {
                            dir: dir.clone(),
                            name,
                            reason: e.to_string(),
                        });
                        continue;
                    }
                };
                let is_dir = match file_type {
                    Some(t) => t.is_dir(),
                    None => {
                        fs::symlink_metadata(child.to_fs_path(self.root)).is_ok_and(|m| m.is_dir())
                    }
                };
                if is_dir {
                    if !self.ignorer.is_ignored(&child, true) {
                        self.add(child.clone(), Entry::Dir);
                        subdirs.push(child);
                    }
                } else {
                    self.visit(child);
                }
            }
            // Reverse so the stack pops them in order (deterministic problem order).
            stack.extend(subdirs.into_iter().rev());
        }
    }

    fn finish(mut self) -> ScanOutput {
        let jobs = std::mem::take(&mut self.jobs);
        let results = hash_all(&jobs);
        let files_hashed = jobs.len();
        for (job, result) in jobs.into_iter().zip(results) {
            match result {
                Ok(hash) => {
                    self.cache.entries.insert(
                        job.path.clone(),
                        CacheEntry {
                            size: job.key.size,
                            mtime_ns: job.key.mtime_ns,
                            inode: job.key.inode,
                            mode: job.key.mode,
                            hash,
                        },
                    );
                    self.add(
                        job.path,
                        Entry::File {
                            size: job.key.size,
                            exec: job.exec,
                            hash,
                        },
                    );
                }
                Err(reason) => self.add(job.path, Entry::Problem { reason }),
            }
        }
        ScanOutput {
            snapshot: self.snapshot,
            cache: self.cache,
            problems: self.problems,
            files_hashed,
            changes: None,
        }
    }
}

fn problem(e: &io::Error) -> Entry {
    Entry::Problem {
        reason: e.to_string(),
    }
}

fn load_gitignore(
    root: &Path,
    dir: &RelPath,
    ignorer: &mut Ignorer,
    problems: &mut Vec<ScanProblem>,
) {
    let Ok(name) = dir.join(GITIGNORE_NAME) else {
        return;
    };
    let fs_path = name.to_fs_path(root);
    match fs::symlink_metadata(&fs_path) {
        Ok(m) if m.is_file() && m.len() <= GITIGNORE_BYTES_MAX => {}
        Ok(m) if m.is_file() => {
            problems.push(ScanProblem::Gitignore(format!(
                "{name} is {} bytes, over the {GITIGNORE_BYTES_MAX} byte limit; not honoured",
                m.len()
            )));
            return;
        }
        _ => {
            ignorer.remove_gitignore(dir);
            return;
        }
    }
    match fs::read(&fs_path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            for e in ignorer.add_gitignore(dir, &text) {
                problems.push(ScanProblem::Gitignore(e.to_string()));
            }
        }
        Err(e) => problems.push(ScanProblem::Gitignore(format!("cannot read {name}: {e}"))),
    }
}

/// Hashes every job on up to [`HASH_WORKERS_MAX`] scoped threads; results in job order.
fn hash_all(jobs: &[Job]) -> Vec<Result<ContentHash, String>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(HASH_WORKERS_MAX)
        .min(jobs.len());
    if workers <= 1 {
        return jobs.iter().map(hash_job).collect();
    }
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<Result<ContentHash, String>>> = vec![None; jobs.len()];
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = jobs.get(i) else { break };
                        done.push((i, hash_job(job)));
                    }
                    done
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(done) => {
                    for (i, r) in done {
                        results[i] = Some(r);
                    }
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("not hashed".to_owned())))
        .collect()
}

/// Reads and hashes one file without following a symlink that replaced it, and checks it did
/// not change while being read.
fn hash_job(job: &Job) -> Result<ContentHash, String> {
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&job.fs_path)
        .map_err(|e| e.to_string())?;
    let before = file.metadata().map_err(|e| e.to_string())?;
    if CacheKey::of(&before) != job.key {
        return Err("changed while being scanned".into());
    }
    let mut hasher = blake3::Hasher::new();
    // No larger than the file and one byte: most files of a source tree are a few KB, and a
    // full-size buffer zeroed per file cost more than hashing them.
    let mut buf =
        vec![0u8; (job.key.size.saturating_add(1)).min(READ_BUFFER_BYTES as u64) as usize];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let after = file.metadata().map_err(|e| e.to_string())?;
    if total != job.key.size || CacheKey::of(&after) != job.key {
        return Err("changed while being scanned".into());
    }
    Ok(*hasher.finalize().as_bytes())
}
