//! A recursive inotify watcher (Linux) feeding a [`Watch`].
//!
//! Every directory under the root gets a watch for the events that mean a change: create,
//! delete, move, attribute change, write and close-after-write. Not `IN_OPEN` or
//! `IN_ACCESS`: reads change nothing, and a build that reads ten thousand files would
//! otherwise queue ten thousand events. A directory that appears (created or moved in) is
//! watched with everything below it, and noted whole, so files made in it before its watch
//! existed are found by the rescan of its subtree. A directory moved away loses its watches.
//! A queue overflow, a watch that cannot be added, or the root itself moving or going away
//! notes everything (a full scan).
//!
//! One thread per root waits in `poll` on the inotify descriptor and an eventfd that
//! [`Guard`]'s drop writes to, so it costs nothing while nothing happens.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::Watch;

const MASK: u32 = libc::IN_ATTRIB
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_CLOSE_WRITE
    | libc::IN_MODIFY
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR
    | libc::IN_DONT_FOLLOW
    | libc::IN_EXCL_UNLINK;

/// Bytes read from the inotify descriptor at once.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Stops the watcher thread when dropped.
pub struct Guard {
    stop: OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let _ = unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn os_error(what: &str, path: &Path) -> String {
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOSPC) {
        format!(
            "cannot watch {}: the inotify watch limit is reached (raise fs.inotify.max_user_watches)",
            path.display()
        )
    } else {
        format!("cannot {what} {}: {e}", path.display())
    }
}

/// The directories watched, both ways.
struct Dirs {
    fd: OwnedFd,
    by_wd: BTreeMap<i32, PathBuf>,
    by_path: BTreeMap<PathBuf, i32>,
}

impl Dirs {
    /// Watches `dir` and every directory below it (symlinks are not followed).
    fn add_tree(&mut self, dir: &Path) -> Result<(), String> {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let c = CString::new(d.as_os_str().as_bytes())
                .map_err(|_| format!("cannot watch {}: a NUL in the path", d.display()))?;
            // SAFETY: a valid descriptor and a NUL-terminated path.
            let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
            if wd < 0 {
                let errno = std::io::Error::last_os_error().raw_os_error();
                // Gone or replaced by a file meanwhile: its parent's events say so.
                if matches!(errno, Some(libc::ENOENT) | Some(libc::ENOTDIR)) && d != dir {
                    continue;
                }
                return Err(os_error("watch", &d));
            }
            if let Some(old) = self.by_wd.insert(wd, d.clone()) {
                self.by_path.remove(&old);
            }
            self.by_path.insert(d.clone(), wd);
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        Ok(())
    }

    /// Stops watching `dir` and everything below it.
    fn remove_tree(&mut self, dir: &Path) {
        // Paths order component by component, so a subtree is one range.
        let gone: Vec<(PathBuf, i32)> = self
            .by_path
            .range(dir.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(dir))
            .map(|(p, wd)| (p.clone(), *wd))
            .collect();
        for (p, wd) in gone {
            // SAFETY: a valid descriptor; a stale wd only fails with EINVAL.
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
            self.by_path.remove(&p);
            self.by_wd.remove(&wd);
        }
    }
}

/// Starts watching `root` into `watch`.
pub fn watch(root: &Path, watch: Watch) -> Result<Guard, String> {
    // SAFETY: plain syscalls; the results are checked before use.
    let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if raw < 0 {
        return Err(os_error("watch", root));
    }
    // SAFETY: `raw` is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: as above.
    let raw_stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw_stop < 0 {
        return Err(os_error("watch", root));
    }
    // SAFETY: `raw_stop` is a new descriptor nobody else owns.
    let stop = unsafe { OwnedFd::from_raw_fd(raw_stop) };
    let mut dirs = Dirs {
        fd,
        by_wd: BTreeMap::new(),
        by_path: BTreeMap::new(),
    };
    dirs.add_tree(root)?;
    let stop_fd = stop.as_raw_fd();
    let root = root.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("cs-inotify".into())
        .spawn(move || run(dirs, stop_fd, &root, &watch))
        .map_err(|e| format!("cannot start the watcher thread: {e}"))?;
    Ok(Guard {
        stop,
        thread: Some(thread),
    })
}

fn run(mut dirs: Dirs, stop_fd: i32, root: &Path, watch: &Watch) {
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: dirs.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd entries.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            watch.note_everything();
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        let mut changed = Vec::new();
        let mut everything = false;
        loop {
            // SAFETY: reads into a buffer we own, at most its length.
            let got =
                unsafe { libc::read(dirs.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if got <= 0 {
                break;
            }
            let got = got as usize;
            let mut at = 0;
            let header = std::mem::size_of::<libc::inotify_event>();
            while at + header <= got {
                // SAFETY: the kernel wrote a whole inotify_event header here; read it
                // unaligned, as the buffer has no alignment guarantee.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let name_len = ev.len as usize;
                let name_bytes = &buf[(at + header).min(got)..(at + header + name_len).min(got)];
                at += header + name_len;
                let name = &name_bytes[..name_bytes
                    .iter()
                    .position(|b| *b == 0)
                    .unwrap_or(name_bytes.len())];
                if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                    everything = true;
                    continue;
                }
                if ev.mask & libc::IN_IGNORED != 0 {
                    if let Some(p) = dirs.by_wd.remove(&ev.wd) {
                        dirs.by_path.remove(&p);
                    }
                    continue;
                }
                let Some(dir) = dirs.by_wd.get(&ev.wd).cloned() else {
                    continue;
                };
                if ev.mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
                    if dir == root {
                        everything = true;
                    }
                    continue;
                }
                let path = if name.is_empty() {
                    dir
                } else {
                    dir.join(OsStr::from_bytes(name))
                };
                if ev.mask & libc::IN_ISDIR != 0 {
                    if ev.mask & libc::IN_MOVED_FROM != 0 {
                        dirs.remove_tree(&path);
                    }
                    if ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0
                        && dirs.add_tree(&path).is_err()
                    {
                        everything = true;
                    }
                }
                changed.push(path);
            }
        }
        if everything {
            watch.note_everything();
        } else if !changed.is_empty() {
            watch.note_fs(root, &changed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::RelPath;
    use std::time::Duration;

    /// Polls of 10 ms before a test gives up (5 s).
    const POLLS_MAX: usize = 500;

    /// Waits until the watch has noted `want` (relative paths), or fails after 5 s.
    fn wait_for(watch: &Watch, want: &[&str]) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        for _ in 0..POLLS_MAX {
            if let Some(paths) = watch.take(false) {
                seen.extend(paths.iter().map(|p: &RelPath| p.as_str().to_string()));
            } else {
                seen.push("<everything>".into());
            }
            if want.iter().all(|w| seen.iter().any(|s| s == w)) {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("noted {seen:?}, want {want:?}");
    }

    #[test]
    fn changes_below_the_root_are_noted_and_reads_are_not() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), "1").unwrap();
        let w = Watch::default();
        let guard = watch(root, w.clone()).unwrap();
        // A new watch asks for a full scan first.
        assert_eq!(w.take(false), None);
        // Reading changes nothing.
        std::fs::read(root.join("a/b/f")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(w.take(false), Some(Vec::new()), "a read was noted");
        // A write deep down.
        std::fs::write(root.join("a/b/f"), "2").unwrap();
        wait_for(&w, &["a/b/f"]);
        // A new directory with a file made at once: the directory is noted (its subtree is
        // rescanned), and later writes in it are seen through its own watch.
        std::fs::create_dir_all(root.join("n/m")).unwrap();
        std::fs::write(root.join("n/m/x"), "x").unwrap();
        wait_for(&w, &["n"]);
        std::thread::sleep(Duration::from_millis(50));
        std::fs::write(root.join("n/m/y"), "y").unwrap();
        wait_for(&w, &["n/m/y"]);
        // A directory renamed: events below it name the new place.
        std::fs::rename(root.join("a"), root.join("z")).unwrap();
        wait_for(&w, &["a", "z"]);
        std::fs::write(root.join("z/b/g"), "g").unwrap();
        wait_for(&w, &["z/b/g"]);
        // Deletions.
        std::fs::remove_file(root.join("z/b/g")).unwrap();
        wait_for(&w, &["z/b/g"]);
        drop(guard);
        // After the guard is gone, nothing more is noted.
        w.take(false);
        std::fs::write(root.join("late"), "l").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(w.take(false), Some(Vec::new()));
    }

    #[test]
    fn the_root_going_away_means_everything() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("r");
        std::fs::create_dir(&root).unwrap();
        let w = Watch::default();
        let _guard = watch(&root, w.clone()).unwrap();
        assert_eq!(w.take(false), None);
        assert_eq!(w.take(false), Some(Vec::new()));
        std::fs::rename(&root, t.path().join("moved")).unwrap();
        let noted = (0..POLLS_MAX).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            w.take(false).is_none()
        });
        assert!(noted, "the move was not noted");
    }

    #[test]
    fn a_missing_root_is_an_error_naming_it() {
        let e = watch(Path::new("/nonexistent/cs-root"), Watch::default())
            .err()
            .unwrap();
        assert!(e.contains("/nonexistent/cs-root"), "{e}");
    }
}
