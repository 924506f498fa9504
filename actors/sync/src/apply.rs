//! The applying shell: carries out one [`Op`] on a real directory, safely. Uses `std::fs`, so
//! it is never called from simulated code (the simulation uses
//! [`crate::reconcile::apply_to_snapshot`]).
//!
//! - **Never outside the root.** Every parent directory of the op's path is checked with
//!   `symlink_metadata` and must be a real directory, not a symlink; files are opened with
//!   `O_NOFOLLOW`. Symlinks are only created with portable targets.
//! - **Never over unseen content.** Before replacing or deleting, what is on disk is
//!   re-read (a file is re-hashed) and must equal the op's `expected` entry; a create refuses
//!   if anything exists. As in Mutagen, a window remains between this check and the final
//!   rename or unlink; it is as short as we can make it (the check runs after staging).
//! - **Never half-written.** New content goes to a temporary file in the same directory
//!   (named with [`TEMP_PREFIX`], which scans skip), is checked against the expected size
//!   and hash, and then linked (create: fails if the name appeared meanwhile) or renamed
//!   (replace) into place. A failure removes the temporary file. Nothing is fsynced while
//!   applying (two flushes per file made a first sync of the kernel tree disk-bound): a
//!   crashed process cannot tear a file, and the shells make a whole batch durable
//!   ([`sync_paths`]: a few files and their directories one by one, a large batch with one
//!   `syncfs`) before they report it applied, so no ancestor ever records content that a
//!   power loss could take back.
//! - Permissions: only the executable bit syncs: files get [`FILE_MODE`] or [`EXEC_MODE`],
//!   directories [`DIR_MODE`].

use std::fs::{self, File, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::delta::short_hex;
use crate::path::RelPath;
use crate::reconcile::Op;
use crate::symlink::{check_portable, SymlinkError};
use crate::tree::{ContentHash, Entry};

/// Prefix of temporary files; scans skip names starting with it.
pub const TEMP_PREFIX: &str = ".cs-sync-tmp.";
/// Mode of synced files without the executable bit.
pub const FILE_MODE: u32 = 0o644;
/// Mode of synced files with the executable bit.
pub const EXEC_MODE: u32 = 0o755;
/// Mode of created directories.
pub const DIR_MODE: u32 = 0o755;
const COPY_BUFFER_BYTES: usize = 64 * 1024;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Why an op was not applied. The target is left as it was (no partial file, no temporary).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A parent of the path is a symlink: writing through it could leave the root.
    #[error("refusing {path}: parent {parent} is a symlink")]
    ParentSymlink { path: RelPath, parent: RelPath },
    /// A parent of the path is a file or other non-directory.
    #[error("refusing {path}: parent {parent} is not a directory")]
    ParentNotDir { path: RelPath, parent: RelPath },
    /// A parent of the path does not exist (its own create failed or it was deleted).
    #[error("refusing {path}: parent {parent} does not exist")]
    ParentMissing { path: RelPath, parent: RelPath },
    /// Something exists where the op would create: content sync has not seen.
    #[error("refusing to create {path}: a {found} is already there")]
    Exists { path: RelPath, found: String },
    /// What is on disk is not what the scan saw; the next cycle will rescan and decide.
    #[error("refusing {path}: it changed since the scan (expected {expected}, found {found})")]
    Changed {
        path: RelPath,
        expected: String,
        found: String,
    },
    /// The directory to delete still holds entries (ones sync ignores or cannot read).
    #[error("refusing to delete directory {path}: it is not empty")]
    NotEmpty { path: RelPath },
    /// The content supplied does not match the entry (wrong size or hash): the source
    /// changed or the transfer was corrupt. Retry with fresh content.
    #[error("content for {path} does not match: {reason}")]
    Content { path: RelPath, reason: String },
    /// A file op came without content.
    #[error("no content supplied for file {0}")]
    NoContent(RelPath),
    /// An op no plan produces (replace of a directory, writing a problem entry).
    #[error("invalid op on {path}: {reason}")]
    Invalid { path: RelPath, reason: &'static str },
    #[error(transparent)]
    Symlink(#[from] SymlinkError),
    /// The filesystem refused.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ApplyError + '_ {
    move |source| ApplyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Applies `op` under `root`. File creates and replaces (except an executable-bit-only
/// change) read their content from `content`, which must yield exactly the entry's bytes.
pub fn apply(root: &Path, op: &Op, content: Option<&mut dyn Read>) -> Result<(), ApplyError> {
    let path = op.path();
    check_parents(root, path)?;
    let target = path.to_fs_path(root);
    match op {
        Op::Create { entry, .. } => {
            if let Some(found) = current(&target, path, None)? {
                return Err(ApplyError::Exists {
                    path: path.clone(),
                    found: found.kind().to_owned(),
                });
            }
            match entry {
                Entry::Dir => fs::DirBuilder::new()
                    .mode(DIR_MODE)
                    .create(&target)
                    .map_err(io_err(&target))?,
                Entry::File { .. } => {
                    let temp = stage_file(root, path, entry, content)?;
                    // link(2) refuses an existing name: no overwrite even in a race.
                    let linked = fs::hard_link(&temp, &target).map_err(io_err(&target));
                    let _ = fs::remove_file(&temp);
                    linked?;
                }
                Entry::Symlink { target: link } => {
                    check_portable(path, link)?;
                    std::os::unix::fs::symlink(link, &target).map_err(io_err(&target))?;
                }
                Entry::Problem { .. } => return Err(invalid(path, "writes a problem entry")),
            }
        }
        Op::Replace {
            expected, entry, ..
        } => {
            if expected.is_dir() || entry.is_dir() {
                return Err(invalid(path, "a replace never involves a directory"));
            }
            recheck(&target, path, expected)?;
            match (expected, entry) {
                // Same content: only the executable bit changes.
                (
                    Entry::File { hash: old, .. },
                    Entry::File {
                        hash: new, exec, ..
                    },
                ) if old == new => {
                    fs::set_permissions(&target, file_permissions(*exec))
                        .map_err(io_err(&target))?;
                }
                _ => {
                    let temp = match entry {
                        Entry::File { .. } => stage_file(root, path, entry, content)?,
                        Entry::Symlink { target: link } => {
                            check_portable(path, link)?;
                            let temp = temp_path(root, path);
                            std::os::unix::fs::symlink(link, &temp).map_err(io_err(&temp))?;
                            temp
                        }
                        Entry::Dir | Entry::Problem { .. } => {
                            return Err(invalid(path, "writes a directory or problem entry"))
                        }
                    };
                    // Re-check right before the rename, after the (possibly long) staging.
                    let renamed = recheck(&target, path, expected)
                        .and_then(|()| fs::rename(&temp, &target).map_err(io_err(&target)));
                    if renamed.is_err() {
                        let _ = fs::remove_file(&temp);
                    }
                    renamed?;
                }
            }
        }
        Op::Delete { expected, .. } => {
            if let Entry::Problem { .. } = expected {
                return Err(invalid(path, "deletes a problem entry"));
            }
            recheck(&target, path, expected)?;
            if expected.is_dir() {
                fs::remove_dir(&target).map_err(|e| {
                    if e.kind() == io::ErrorKind::DirectoryNotEmpty {
                        ApplyError::NotEmpty { path: path.clone() }
                    } else {
                        io_err(&target)(e)
                    }
                })?;
            } else {
                fs::remove_file(&target).map_err(io_err(&target))?;
            }
        }
    }
    Ok(())
}

fn invalid(path: &RelPath, reason: &'static str) -> ApplyError {
    ApplyError::Invalid {
        path: path.clone(),
        reason,
    }
}

fn file_permissions(exec: bool) -> Permissions {
    Permissions::from_mode(if exec { EXEC_MODE } else { FILE_MODE })
}

/// Every parent of `path` below the root must be a real directory.
pub fn check_parents(root: &Path, path: &RelPath) -> Result<(), ApplyError> {
    for parent in path.ancestors().into_iter().filter(|p| !p.is_root()) {
        let fs_path = parent.to_fs_path(root);
        match fs::symlink_metadata(&fs_path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ApplyError::ParentSymlink {
                    path: path.clone(),
                    parent,
                })
            }
            Ok(m) if !m.is_dir() => {
                return Err(ApplyError::ParentNotDir {
                    path: path.clone(),
                    parent,
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ApplyError::ParentMissing {
                    path: path.clone(),
                    parent,
                })
            }
            Err(e) => return Err(io_err(&fs_path)(e)),
        }
    }
    Ok(())
}

/// What is at `target` now, as an entry (`None` if nothing). A file is hashed only if
/// `compare_to` is a file of the same size and executable bit (otherwise it differs anyway).
fn current(
    target: &Path,
    path: &RelPath,
    compare_to: Option<&Entry>,
) -> Result<Option<Entry>, ApplyError> {
    let meta = match fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(target)(e)),
    };
    let ft = meta.file_type();
    let entry = if ft.is_dir() {
        Entry::Dir
    } else if ft.is_symlink() {
        let link = fs::read_link(target).map_err(io_err(target))?;
        Entry::Symlink {
            target: link.to_string_lossy().into_owned(),
        }
    } else if ft.is_file() {
        let size = meta.len();
        let exec = meta.permissions().mode() & 0o111 != 0;
        let hash = match compare_to {
            Some(Entry::File {
                size: s, exec: x, ..
            }) if *s == size && *x == exec => hash_file(target)?,
            _ => [0; 32],
        };
        Entry::File { size, exec, hash }
    } else {
        Entry::Problem {
            reason: format!("{path} is a special file"),
        }
    };
    Ok(Some(entry))
}

fn recheck(target: &Path, path: &RelPath, expected: &Entry) -> Result<(), ApplyError> {
    let found = current(target, path, Some(expected))?;
    if found.as_ref() == Some(expected) {
        return Ok(());
    }
    Err(ApplyError::Changed {
        path: path.clone(),
        expected: describe(Some(expected)),
        found: describe(found.as_ref()),
    })
}

fn describe(e: Option<&Entry>) -> String {
    match e {
        None => "nothing".into(),
        Some(Entry::File { size, exec, hash }) => format!(
            "file of {size} bytes{} hash {}",
            if *exec { ", executable," } else { "," },
            short_hex(hash)
        ),
        Some(Entry::Symlink { target }) => format!("symlink to {target:?}"),
        Some(other) => other.kind().into(),
    }
}

fn hash_file(target: &Path) -> Result<ContentHash, ApplyError> {
    let mut f = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)
        .map_err(io_err(target))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(target)(e)),
        }
    }
    Ok(*hasher.finalize().as_bytes())
}

fn temp_path(root: &Path, path: &RelPath) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{TEMP_PREFIX}{}.{n}", std::process::id());
    match path.parent() {
        Some(parent) => parent.to_fs_path(root).join(name),
        None => root.join(name),
    }
}

/// Writes `content` to a new temporary file beside `path`, checks it against `entry`'s
/// size and hash, sets its mode and fsyncs it. Returns the temporary path.
fn stage_file(
    root: &Path,
    path: &RelPath,
    entry: &Entry,
    content: Option<&mut dyn Read>,
) -> Result<PathBuf, ApplyError> {
    let Entry::File { size, exec, hash } = entry else {
        return Err(invalid(path, "stages a non-file"));
    };
    let content = content.ok_or_else(|| ApplyError::NoContent(path.clone()))?;
    let temp = temp_path(root, path);
    let written = write_checked(&temp, path, content, *size, hash, *exec);
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written.map(|()| temp)
}

fn write_checked(
    temp: &Path,
    path: &RelPath,
    content: &mut dyn Read,
    size: u64,
    hash: &ContentHash,
    exec: bool,
) -> Result<(), ApplyError> {
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(FILE_MODE)
        .open(temp)
        .map_err(io_err(temp))?;
    let mut hasher = blake3::Hasher::new();
    // No larger than the announced size and one byte (most files are a few KB).
    let mut buf = vec![0u8; (size.saturating_add(1)).min(COPY_BUFFER_BYTES as u64) as usize];
    let mut total = 0u64;
    // Read at most one byte more than announced, so an endless source cannot fill the disk.
    let mut limited = content.take(size.saturating_add(1));
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(temp)(e)),
        };
        total += n as u64;
        if total > size {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(io_err(temp))?;
    }
    if total != size {
        return Err(ApplyError::Content {
            path: path.clone(),
            reason: format!(
                "expected {size} bytes, got {}",
                if total > size {
                    format!("more than {size}")
                } else {
                    total.to_string()
                }
            ),
        });
    }
    let got = *hasher.finalize().as_bytes();
    if got != *hash {
        return Err(ApplyError::Content {
            path: path.clone(),
            reason: format!("hash {} instead of {}", short_hex(&got), short_hex(hash)),
        });
    }
    file.set_permissions(file_permissions(exec))
        .map_err(io_err(temp))?;
    Ok(())
}

/// Makes everything written under `root` durable: one `syncfs(2)` of its filesystem, after
/// a batch of ops and before they are reported applied.
/// Up to this many applied paths are synced one by one ([`sync_paths`]); more, and the
/// whole filesystem is (one `syncfs`).
pub const SYNC_PATHS_MAX: usize = 16;

/// Makes the applies at `paths` under `root` durable: for a few, each file (or directory)
/// that is there and every directory holding one of them, so that its creation, rename or
/// removal is on disk too; for more, [`sync_root`]. A small edit then costs two `fsync`s,
/// not a flush of everything the machine has written lately.
pub fn sync_paths(root: &Path, paths: &[RelPath]) -> io::Result<()> {
    if paths.is_empty() {
        return Ok(());
    }
    if paths.len() > SYNC_PATHS_MAX {
        return sync_root(root);
    }
    use std::os::unix::fs::OpenOptionsExt;
    let mut dirs: Vec<RelPath> = Vec::new();
    for path in paths {
        let target = path.to_fs_path(root);
        // Never through a symlink: the applies checked their parents, and a symlink itself
        // is made durable by its directory's sync.
        match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&target)
        {
            Ok(f) => f.sync_all()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {}
            Err(e) => return Err(e),
        }
        dirs.push(path.parent().unwrap_or_default());
    }
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        match File::open(dir.to_fs_path(root)) {
            Ok(d) => d.sync_all()?,
            // Removed since (a later op of the batch): nothing to keep.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes everything written on `root`'s filesystem durable (one `syncfs`).
pub fn sync_root(root: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = File::open(root)?;
    // SAFETY: syncfs only reads the descriptor, which `dir` keeps open for the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
