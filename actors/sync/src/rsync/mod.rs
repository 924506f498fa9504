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
    pub warnings: Vec<String>,
}
