//! `cs rsync`: one-shot sync with rsync's semantics (rsync(1) is the contract). The core:
//!
//! - [`filter`]: rsync's filter rules (`--exclude`, `--include`, `--exclude-from`, `--filter`
//!   with `-`/`+` rules): first match wins, a leading `/` anchors at the transfer root, a
//!   trailing `/` matches directories only, `*` stops at `/`, `**` does not, `?`, `[...]`; a
//!   pattern with a `/` (other than a trailing one) matches the whole path, else the last
//!   component.
//! - [`plan`]: from the source's and the destination's listings and the options, the ops that
//!   make the destination what rsync would make it, and rsync's `--itemize-changes` lines, in
//!   rsync's order.
//!
//! No IO: the CLI and the agent list trees and carry the ops out (the shells).
//!
//! # Building the listings (checked against rsync 3.x, `tests/rsync_core.rs`)
//!
//! Every path is relative to the DESTINATION root, `/`-separated, listed with `lstat`
//! (symlinks are entries, never followed); order does not matter.
//!
//! - `rsync src/foo/ dst/` (trailing slash: the contents): the source listing holds `.` (foo
//!   itself) and `a`, `b/c`... The destination listing holds `.` (dst itself, when it
//!   exists) and everything under it. rsync itemizes the root as `./` (`.d..t...... ./` when
//!   its mtime differs with `-t`; `cd+++++++++ ./` when dst does not exist: pass a listing
//!   without `.` and do not create dst beforehand, the plan's `Mkdir { "." }` does; rsync
//!   then also prints `created directory dst` first, which is the caller's line). `--delete`
//!   deletes in dst itself.
//! - `rsync src/foo dst/` (no slash: the directory itself): the source listing holds `foo`,
//!   `foo/a`, ... and NO `.`; the destination listing holds `.` and everything under dst (or
//!   at least `foo` and everything under it). `foo/` is itemized like any directory
//!   (`cd+++++++++ foo/`), dst itself never is, and `--delete` deletes only inside `foo`. The
//!   caller creates dst itself when it is missing (rsync prints `created directory dst`).
//! - A single file (`rsync src/f dst/`): the source listing holds `f` only (no `.`); for
//!   `rsync src/f dst/g` the caller renames the entry to `g` and lists what dst/g is (its
//!   parent as `.`).
//! - Without `-r`: list the top level only (`.` or `foo`; for `-d` with a trailing slash,
//!   also `.`'s direct entries). The planner still never descends further than rsync does.
//! - With `-c`, fill `hash` for regular files on both sides (blake3 of the content).
//! - `mtime` is compared in whole seconds (rsync's default `--modify-window=0` ignores
//!   nanoseconds); `mode` is `st_mode & 0o7777`.
//! - `owner`: set it only when the receiver can chown (rsync honours `-o` only as root);
//!   `group` likewise when the receiver may set the group.
//!
//! # What the plan leaves to the caller
//!
//! - A new file without `-p` gets the source's mode masked by the receiver's umask (rsync);
//!   its `Attrs` then has `mode: None`. An updated file without `-p` keeps its mode (`Attrs`
//!   carries the old mode).
//! - Specials (`-D`) are itemized (`cS+++++++++`) but have no op (no `Op` makes one); a
//!   device would be itemized `D` by rsync, which `Kind::Special` cannot tell apart.
//! - `Plan::warnings` are rsync's stdout notices (`skipping non-regular file "x"`, `skipping
//!   directory .`, `cannot delete non-empty directory: x`); `Plan::errors` its stderr lines
//!   that make it exit 23 (`could not make way for new regular file: x`).
//! - rsync prints deletions from one process and the other lines from another, so in its
//!   real output the two interleave by timing; `itemized` has the generator's order.

pub mod filter;
pub mod plan;

use serde::{Deserialize, Serialize};

/// What a listed path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A device, FIFO or socket (`-D`).
    Special,
}

/// One path of a listing, relative to its side's root (`/`-separated, never empty: the root
/// itself is the entry with path `.`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    /// Bytes of a regular file (0 otherwise).
    pub size: u64,
    /// Modification time: seconds and nanoseconds since the epoch.
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// A symlink's target.
    pub target: Option<String>,
    /// A regular file's blake3 hash, listed only when `--checksum` asks for it.
    pub hash: Option<[u8; 32]>,
}

/// The flags that change what the plan does (rsync's meanings).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Options {
    /// `-r`
    pub recursive: bool,
    /// `-l`: copy symlinks as symlinks (without it they are skipped, as rsync says
    /// "skipping non-regular file").
    pub links: bool,
    /// `-p`
    pub perms: bool,
    /// `-t`
    pub times: bool,
    /// `-g`, `-o` (as far as the receiver's permissions allow).
    pub group: bool,
    pub owner: bool,
    /// `-D`
    pub devices: bool,
    /// `--delete`
    pub delete: bool,
    /// `--delete-excluded`
    pub delete_excluded: bool,
    /// `-c`: compare by content hash instead of size and mtime.
    pub checksum: bool,
    /// `-n`
    pub dry_run: bool,
    /// `-d`/`--dirs` without `-r`: directories named in the source are created, not recursed.
    pub dirs: bool,
}

/// What the receiver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Remove a path (a directory with everything under it), before anything is created at it.
    Delete { path: String, kind: Kind },
    /// Create a directory (its attributes are set by a later `Attrs`).
    Mkdir { path: String },
    /// Send the source's file content to `path`: as a delta against the receiver's current
    /// file when `basis` (the receiver has a file there), else whole.
    Send { path: String, basis: bool },
    /// Create a symlink (replacing what is there).
    Symlink { path: String, target: String },
    /// Set attributes: permission bits, mtime, owner/group when asked. Directories' come after
    /// their contents, so writing into them does not undo their mtime.
    Attrs {
        path: String,
        mode: Option<u32>,
        mtime: Option<(i64, u32)>,
        uid: Option<u32>,
        gid: Option<u32>,
    },
}

/// The attributes an `Op::Attrs` sets, without its path: what a file's content carries along
/// when its `Send` is followed by its own `Attrs` (the usual case), so that they are set on
/// the new file before it is renamed into place, with one message instead of two.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileAttrs {
    pub mode: Option<u32>,
    pub mtime: Option<(i64, u32)>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Op {
    /// The attributes of the op at `ops[i + 1]` if it is the `Attrs` of the file `ops[i]`
    /// sends.
    pub fn attrs_after(ops: &[Op], i: usize) -> Option<FileAttrs> {
        match (ops.get(i), ops.get(i + 1)) {
            (
                Some(Op::Send { path, .. }),
                Some(Op::Attrs {
                    path: p,
                    mode,
                    mtime,
                    uid,
                    gid,
                }),
            ) if p == path => Some(FileAttrs {
                mode: *mode,
                mtime: *mtime,
                uid: *uid,
                gid: *gid,
            }),
            _ => None,
        }
    }
}

/// A plan: the ops, rsync's itemized lines (`-i`), and counts for `--stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub ops: Vec<Op>,
    /// One line per changed path, as `rsync -i` prints them (`>f+++++++++ a/b`,
    /// `*deleting   x`, `cd+++++++++ dir/`, `.d..t...... dir/`); the caller adapts the first
    /// column to the direction (`<` when sending to a remote receiver).
    pub itemized: Vec<String>,
    /// Files (regular) in the source listing that the transfer considered.
    pub files_considered: u64,
    /// Regular files to be sent, and their bytes.
    pub files_sent: u64,
    pub bytes_to_send: u64,
    pub deleted: u64,
    /// Lines for stderr (skipped non-regular files and the like), as rsync words them.
    /// (rsync itself prints these on stdout, among the itemized lines.)
    pub warnings: Vec<String>,
    /// Errors rsync prints on stderr and that make it exit with code 23 ("some files/attrs
    /// were not transferred"), e.g. `could not make way for new regular file: a` when a
    /// non-empty directory is in the way without `--delete`.
    pub errors: Vec<String>,
}
