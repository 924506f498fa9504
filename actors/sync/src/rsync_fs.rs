//! `cs rsync`'s filesystem shell (std::fs; never on a simulated path): listing a tree into
//! [`rsync::Entry`]s and carrying out the plan's ops inside a root. Both ends use it: the
//! agent as the receiver of a push and the sender of a pull, the laptop the other way round.
//!
//! Every path is checked before use: relative, no `..`, no NUL, and no symlink among its
//! parents, so an op never reaches outside the root. New file content lands through a
//! temporary file that is size- and hash-checked before it is renamed into place.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::rsync::{Entry, FileAttrs, Kind};

/// Files hashed for `--checksum`, and deltas, read whole up to this size; larger files move
/// whole and are hashed in a stream.
pub const DELTA_FILE_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// Checks `rel` (from the network or the command line) and joins it to `root`.
pub fn join(root: &Path, rel: &str) -> Result<PathBuf, String> {
    if rel == "." || rel.is_empty() {
        return Ok(root.to_path_buf());
    }
    if rel.starts_with('/')
        || rel.contains('\0')
        || rel.split('/').any(|c| c == ".." || c.is_empty())
    {
        return Err(format!(
            "refusing path '{rel}': it must stay inside the transfer's root"
        ));
    }
    Ok(root.join(rel))
}

/// Checks that no parent of `rel` under `root` is a symlink (or anything but a directory);
/// `known` remembers parents already checked.
pub fn check_parents(root: &Path, rel: &str, known: &mut BTreeSet<String>) -> Result<(), String> {
    let mut at = String::new();
    let parts: Vec<&str> = rel.split('/').collect();
    for c in &parts[..parts.len().saturating_sub(1)] {
        if !at.is_empty() {
            at.push('/');
        }
        at.push_str(c);
        if known.contains(&at) {
            continue;
        }
        match fs::symlink_metadata(root.join(&at)) {
            Ok(m) if m.file_type().is_dir() => {
                known.insert(at.clone());
            }
            Ok(_) => {
                return Err(format!(
                    "refusing '{rel}': its parent '{at}' is not a directory"
                ))
            }
            Err(e) => return Err(format!("cannot reach '{rel}': {at}: {e}")),
        }
    }
    Ok(())
}

fn kind_of(ft: &fs::FileType) -> Kind {
    if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_file() {
        Kind::File
    } else {
        Kind::Special
    }
}

/// The blake3 hash of a file's content, streamed.
pub fn hash_file(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut f = fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(*h.finalize().as_bytes())
}

fn entry(path: String, full: &Path, m: &fs::Metadata, hash: bool) -> std::io::Result<Entry> {
    let kind = kind_of(&m.file_type());
    Ok(Entry {
        target: if kind == Kind::Symlink {
            Some(fs::read_link(full)?.to_string_lossy().into_owned())
        } else {
            None
        },
        hash: if hash && kind == Kind::File {
            Some(hash_file(full)?)
        } else {
            None
        },
        path,
        kind,
        size: if kind == Kind::File { m.len() } else { 0 },
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec() as u32,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
    })
}

/// What `root` is: `None` when nothing is there.
pub fn stat_root(root: &Path) -> Result<Option<Entry>, String> {
    match fs::symlink_metadata(root) {
        Ok(m) => entry(".".into(), root, &m, false)
            .map(Some)
            .map_err(|e| format!("{}: {e}", root.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", root.display())),
    }
}

/// Lists `root` (a directory: itself as `.`, then what is under it, recursively when asked;
/// a file or symlink: itself as `.`). `hash` adds regular files' hashes (`--checksum`).
/// Entries that vanish while listed are left out; other errors fail the listing.
pub fn list(root: &Path, recursive: bool, hash: bool) -> Result<Vec<Entry>, String> {
    let Some(top) = stat_root(root)? else {
        return Ok(Vec::new());
    };
    let mut out = vec![top.clone()];
    if top.kind != Kind::Dir {
        if hash && top.kind == Kind::File {
            out[0].hash = Some(hash_file(root).map_err(|e| format!("{}: {e}", root.display()))?);
        }
        return Ok(out);
    }
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let full = if dir.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&dir)
        };
        let rd = match fs::read_dir(&full) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot list {}: {e}", full.display())),
        };
        for d in rd {
            let d = d.map_err(|e| format!("cannot list {}: {e}", full.display()))?;
            let name = d.file_name();
            let Some(name) = name.to_str() else {
                return Err(format!(
                    "{}: a name that is not UTF-8 is not supported",
                    full.join(&name).display()
                ));
            };
            let rel = if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            };
            let p = root.join(&rel);
            let m = match fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{}: {e}", p.display())),
            };
            let e =
                entry(rel.clone(), &p, &m, hash).map_err(|e| format!("{}: {e}", p.display()))?;
            if e.kind == Kind::Dir && recursive {
                stack.push(rel);
            }
            out.push(e);
        }
    }
    Ok(out)
}

/// Carries out ops inside one root, remembering checked parents.
#[derive(Debug)]
pub struct Receiver {
    pub root: PathBuf,
    known: BTreeSet<String>,
    /// Whether ownership can be changed (only root can give files away).
    pub can_chown: bool,
}

impl Receiver {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            known: BTreeSet::new(),
            can_chown: unsafe { libc::geteuid() } == 0,
        }
    }

    /// The checked full path of `rel`.
    pub fn path(&mut self, rel: &str) -> Result<PathBuf, String> {
        let p = join(&self.root, rel)?;
        if rel != "." {
            check_parents(&self.root, rel, &mut self.known)?;
        }
        Ok(p)
    }

    /// Removes `rel` (a directory with everything under it).
    pub fn delete(&mut self, rel: &str) -> Result<(), String> {
        let p = self.path(rel)?;
        self.known
            .retain(|k| k != rel && !k.starts_with(&format!("{rel}/")));
        let r = match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_dir() => fs::remove_dir_all(&p),
            Ok(_) => fs::remove_file(&p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        r.map_err(|e| format!("cannot delete {rel}: {e}"))
    }

    /// Creates directory `rel` (a directory already there is kept).
    pub fn mkdir(&mut self, rel: &str) -> Result<(), String> {
        let p = self.path(rel)?;
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_dir() => return Ok(()),
            Ok(_) => fs::remove_file(&p).map_err(|e| format!("cannot replace {rel}: {e}"))?,
            Err(_) => {}
        }
        fs::create_dir(&p).map_err(|e| format!("cannot create directory {rel}: {e}"))
    }

    /// Makes `rel` a symlink to `target` (through a temporary name, renamed into place).
    pub fn symlink(&mut self, rel: &str, target: &str) -> Result<(), String> {
        let p = self.path(rel)?;
        if let Ok(m) = fs::symlink_metadata(&p) {
            if m.file_type().is_dir() {
                fs::remove_dir_all(&p).map_err(|e| format!("cannot replace {rel}: {e}"))?;
            }
        }
        let tmp = temp_name(&p);
        std::os::unix::fs::symlink(target, &tmp)
            .map_err(|e| format!("cannot create symlink {rel}: {e}"))?;
        fs::rename(&tmp, &p).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            format!("cannot create symlink {rel}: {e}")
        })
    }

    /// Sets what is asked of `rel`'s attributes (a symlink's mode is left alone; its mtime
    /// is set without following it).
    pub fn attrs(
        &mut self,
        rel: &str,
        mode: Option<u32>,
        mtime: Option<(i64, u32)>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(), String> {
        let p = self.path(rel)?;
        let m = fs::symlink_metadata(&p).map_err(|e| format!("{rel}: {e}"))?;
        let is_link = m.file_type().is_symlink();
        if (uid.is_some() || gid.is_some()) && self.can_chown {
            std::os::unix::fs::lchown(&p, uid, gid)
                .map_err(|e| format!("cannot chown {rel}: {e}"))?;
        }
        if let Some(mode) = mode {
            if !is_link && m.mode() & 0o7777 != mode {
                fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("cannot chmod {rel}: {e}"))?;
            }
        }
        if let Some((s, ns)) = mtime {
            set_mtime(&p, s, ns).map_err(|e| format!("cannot set the time of {rel}: {e}"))?;
        }
        Ok(())
    }

    /// Starts writing new content for `rel`: a temporary file beside it.
    pub fn begin_file(&mut self, rel: &str) -> Result<NewFile, String> {
        let dest = self.path(rel)?;
        let tmp = temp_name(&dest);
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| format!("cannot write {rel}: {e}"))?;
        Ok(NewFile {
            rel: rel.to_string(),
            dest,
            tmp,
            file: Some(file),
            hasher: blake3::Hasher::new(),
            written: 0,
            keep_partial: false,
        })
    }
}

fn temp_name(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.cs-rsync.{}", std::process::id()))
}

/// The `times` of utimensat/futimens that set the mtime and leave the atime alone.
fn mtime_only(secs: i64, nsecs: u32) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: secs as libc::time_t,
            tv_nsec: nsecs as libc::c_long,
        },
    ]
}

/// Sets an open file's mtime (its atime untouched).
fn set_fd_mtime(f: &fs::File, secs: i64, nsecs: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let times = mtime_only(secs, nsecs);
    // SAFETY: the descriptor is open for the life of `f`; `times` is two timespecs.
    if unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets a path's mtime without following a symlink.
pub fn set_mtime(p: &Path, secs: i64, nsecs: u32) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())?;
    let times = mtime_only(secs, nsecs);
    // SAFETY: `c` is a valid NUL-terminated path and `times` two timespecs, as utimensat wants.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// New content being written for one path; [`NewFile::finish`] checks it and renames it
/// into place, dropping it unfinished removes the temporary file.
#[derive(Debug)]
pub struct NewFile {
    rel: String,
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<fs::File>,
    hasher: blake3::Hasher,
    written: u64,
    keep_partial: bool,
}

impl NewFile {
    /// `--partial`: cut off before [`NewFile::finish`], what arrived replaces the file (rsync
    /// keeps it so the next run can use it as a basis) instead of being discarded.
    pub fn keep_partial(&mut self) {
        self.keep_partial = true;
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let f = self.file.as_mut().ok_or("file already finished")?;
        f.write_all(bytes)
            .map_err(|e| format!("cannot write {}: {e}", self.rel))?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Checks the content against `size` and `hash`, and renames it into place (replacing a
    /// directory there).
    pub fn finish(self, size: u64, hash: &[u8; 32]) -> Result<(), String> {
        self.finish_with(size, hash, None, false)
    }

    /// [`NewFile::finish`], with `attrs` set on the new file first, through its open
    /// descriptor (no path lookups; owner only if `can_chown`, before the mode, since a chown
    /// clears set-id bits; the mtime last, after every write).
    pub fn finish_with(
        mut self,
        size: u64,
        hash: &[u8; 32],
        attrs: Option<&FileAttrs>,
        can_chown: bool,
    ) -> Result<(), String> {
        let f = self.file.take().ok_or("file already finished")?;
        if self.written != size || self.hasher.finalize().as_bytes() != hash {
            return Err(format!(
                "{}: the content received ({} bytes) does not match what was sent ({size} bytes); not applied",
                self.rel, self.written
            ));
        }
        // An attribute that cannot be set is reported, and the content still goes in place
        // (as rsync does: the file is there, its attributes are not).
        let attrs_set = attrs.map_or(Ok(()), |a| {
            let rel = &self.rel;
            if can_chown && (a.uid.is_some() || a.gid.is_some()) {
                std::os::unix::fs::fchown(&f, a.uid, a.gid)
                    .map_err(|e| format!("cannot chown {rel}: {e}"))?;
            }
            if let Some(mode) = a.mode {
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("cannot chmod {rel}: {e}"))?;
            }
            if let Some((s, ns)) = a.mtime {
                set_fd_mtime(&f, s, ns)
                    .map_err(|e| format!("cannot set the time of {rel}: {e}"))?;
            }
            Ok(())
        });
        drop(f);
        let placed = match fs::rename(&self.tmp, &self.dest) {
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                // A directory is in the way (the plan deleted what was in it, or refused).
                fs::remove_dir_all(&self.dest)
                    .map_err(|e| format!("cannot replace {}: {e}", self.rel))?;
                fs::rename(&self.tmp, &self.dest)
            }
            r => r,
        };
        placed.map_err(|e| format!("cannot write {}: {e}", self.rel))?;
        attrs_set
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if self.file.is_some()
            && self.keep_partial
            && self.written > 0
            && fs::rename(&self.tmp, &self.dest).is_ok()
        {
            return;
        }
        if self.file.is_some() || self.tmp.exists() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_and_never_through_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        fs::create_dir(&root).unwrap();
        fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink(d.path(), root.join("link")).unwrap();
        let mut r = Receiver::new(root.clone());
        for bad in ["../x", "/etc/passwd", "a/../../x", "a//b"] {
            assert!(r.path(bad).is_err(), "{bad}");
        }
        assert!(r.path("real/file").is_ok());
        let e = r.path("link/file").unwrap_err();
        assert!(e.contains("is not a directory"), "{e}");
        let mut f = r.begin_file("real/file").unwrap();
        f.write(b"hello").unwrap();
        let h = *blake3::hash(b"hello").as_bytes();
        f.finish(5, &h).unwrap();
        assert_eq!(fs::read(root.join("real/file")).unwrap(), b"hello");
        let mut f = r.begin_file("real/file").unwrap();
        f.write(b"hellx").unwrap();
        assert!(f.finish(5, &h).is_err());
        assert_eq!(
            fs::read(root.join("real/file")).unwrap(),
            b"hello",
            "a bad transfer leaves the old file"
        );
        let names: Vec<_> = fs::read_dir(root.join("real"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }

    #[test]
    fn listing_and_attributes() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/f"), b"xyz").unwrap();
        std::os::unix::fs::symlink("b/f", root.join("a/l")).unwrap();
        let mut r = Receiver::new(root.to_path_buf());
        r.attrs("a/b/f", Some(0o600), Some((1_000_000_000, 5)), None, None)
            .unwrap();
        r.attrs("a/l", Some(0o600), Some((1_000_000_001, 0)), None, None)
            .unwrap();
        let l = list(root, true, true).unwrap();
        let f = l.iter().find(|e| e.path == "a/b/f").unwrap();
        assert_eq!(
            (f.kind, f.size, f.mode, f.mtime, f.mtime_nsec),
            (Kind::File, 3, 0o600, 1_000_000_000, 5)
        );
        assert_eq!(f.hash, Some(*blake3::hash(b"xyz").as_bytes()));
        let s = l.iter().find(|e| e.path == "a/l").unwrap();
        assert_eq!(
            (s.kind, s.target.as_deref(), s.mtime),
            (Kind::Symlink, Some("b/f"), 1_000_000_001)
        );
        assert_eq!(l[0].path, ".");
        assert_eq!(
            list(&root.join("a"), false, false).unwrap().len(),
            3,
            ". b l"
        );
    }
}
