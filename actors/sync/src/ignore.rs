//! What sync leaves alone: the session's patterns (gitignore syntax), VCS metadata
//! (`--ignore-vcs`) and, optionally, the `.gitignore` files found in the tree
//! (`--ignore-gitignored`, which Mutagen lacks, its #237). Ignored paths are never scanned,
//! propagated or deleted; a scanner asks [`Ignorer::is_ignored`] before descending, so an
//! ignored directory's contents are never even listed.
//!
//! Matching is the `ignore` crate's gitignore implementation (ripgrep's), not hand-written.
//! Precedence, first decisive answer wins:
//! 1. VCS names ([`VCS_NAMES`]), when enabled, at any depth, files or directories (a `.git`
//!    file is a worktree's pointer): always ignored, no pattern re-includes them.
//! 2. The session's patterns; within them, as in git, the last matching line wins, and `!`
//!    re-includes.
//! 3. `.gitignore` files, deepest directory first (git's order), each matched relative to its
//!    own directory.
//!
//! The core stays IO-free: the scanner reads each `.gitignore` and passes its contents in.

use std::collections::BTreeMap;

use ::ignore::gitignore::{Gitignore, GitignoreBuilder};
use ::ignore::Match;

use crate::path::RelPath;

/// Names `--ignore-vcs` ignores: Git, Subversion, Mercurial, Bazaar, Darcs, and Fossil's
/// checkout database files.
pub const VCS_NAMES: &[&str] = &[
    ".git",
    ".svn",
    ".hg",
    ".bzr",
    "_darcs",
    ".fslckout",
    "_FOSSIL_",
];

/// The file `--ignore-gitignored` honours in each directory.
pub const GITIGNORE_NAME: &str = ".gitignore";

/// A pattern the matcher cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IgnoreError {
    /// A session pattern is not valid gitignore syntax; fix or remove it.
    #[error("ignore pattern {pattern:?} is invalid: {reason}")]
    Pattern { pattern: String, reason: String },
    /// A line of a `.gitignore` in the tree is invalid; it is skipped (git skips it too).
    #[error("line {line:?} of {dir}/.gitignore is invalid: {reason}")]
    GitignoreLine {
        dir: RelPath,
        line: String,
        reason: String,
    },
}

/// Decides which paths sync ignores.
#[derive(Clone, Debug)]
pub struct Ignorer {
    patterns: Gitignore,
    ignore_vcs: bool,
    honour_gitignore: bool,
    gitignores: BTreeMap<RelPath, Gitignore>,
    /// Files larger than this are reported as problems, never hashed or sent.
    max_file_size: u64,
}

impl Ignorer {
    /// An ignorer from session `patterns` (gitignore syntax, relative to the root).
    pub fn new(
        patterns: &[String],
        ignore_vcs: bool,
        honour_gitignore: bool,
    ) -> Result<Self, IgnoreError> {
        let mut builder = GitignoreBuilder::new("");
        for pattern in patterns {
            builder
                .add_line(None, pattern)
                .map_err(|e| IgnoreError::Pattern {
                    pattern: pattern.clone(),
                    reason: e.to_string(),
                })?;
        }
        let patterns = builder.build().map_err(|e| IgnoreError::Pattern {
            pattern: patterns.join("\n"),
            reason: e.to_string(),
        })?;
        Ok(Ignorer {
            patterns,
            ignore_vcs,
            honour_gitignore,
            gitignores: BTreeMap::new(),
            max_file_size: u64::MAX,
        })
    }

    /// The same rules, with files over `bytes` reported as problems instead of synced.
    pub fn with_max_file_size(mut self, bytes: u64) -> Self {
        self.max_file_size = bytes;
        self
    }

    /// The largest file a scan hashes and records (see [`Ignorer::with_max_file_size`]).
    pub fn max_file_size(&self) -> u64 {
        self.max_file_size
    }

    /// An ignorer that ignores nothing.
    pub fn none() -> Self {
        Ignorer {
            patterns: Gitignore::empty(),
            ignore_vcs: false,
            honour_gitignore: false,
            gitignores: BTreeMap::new(),
            max_file_size: u64::MAX,
        }
    }

    /// Whether `.gitignore` files in the tree count (the scanner reads them only then).
    pub fn honours_gitignore(&self) -> bool {
        self.honour_gitignore
    }

    /// Adds the `.gitignore` of directory `dir` (replacing an earlier one). Invalid lines
    /// are skipped and returned, to be reported as problems. Does nothing unless
    /// `.gitignore` files are honoured.
    pub fn add_gitignore(&mut self, dir: &RelPath, contents: &str) -> Vec<IgnoreError> {
        let mut bad = Vec::new();
        if !self.honour_gitignore {
            return bad;
        }
        let mut builder = GitignoreBuilder::new("");
        for line in contents.lines() {
            if let Err(e) = builder.add_line(None, line) {
                bad.push(IgnoreError::GitignoreLine {
                    dir: dir.clone(),
                    line: line.to_owned(),
                    reason: e.to_string(),
                });
            }
        }
        match builder.build() {
            Ok(gi) => {
                self.gitignores.insert(dir.clone(), gi);
            }
            Err(e) => bad.push(IgnoreError::GitignoreLine {
                dir: dir.clone(),
                line: String::new(),
                reason: e.to_string(),
            }),
        }
        bad
    }

    /// Forgets the `.gitignore` of `dir` (it was deleted).
    pub fn remove_gitignore(&mut self, dir: &RelPath) {
        self.gitignores.remove(dir);
    }

    /// Whether `path` itself is ignored. The root never is. Does not look at the parents:
    /// a scanner that does not descend into ignored directories never asks about their
    /// children; use [`Ignorer::is_excluded`] for a path from elsewhere (a watcher event).
    pub fn is_ignored(&self, path: &RelPath, is_dir: bool) -> bool {
        let Some(name) = path.name() else {
            return false;
        };
        if self.ignore_vcs && VCS_NAMES.contains(&name) {
            return true;
        }
        match self.patterns.matched(path.as_str(), is_dir) {
            Match::Ignore(_) => return true,
            Match::Whitelist(_) => return false,
            Match::None => {}
        }
        if self.honour_gitignore {
            for dir in path.ancestors().iter().rev() {
                let Some(gi) = self.gitignores.get(dir) else {
                    continue;
                };
                let rel = match path.as_str().strip_prefix(dir.as_str()) {
                    Some(rest) => rest.trim_start_matches('/'),
                    None => continue,
                };
                match gi.matched(rel, is_dir) {
                    Match::Ignore(_) => return true,
                    Match::Whitelist(_) => return false,
                    Match::None => {}
                }
            }
        }
        false
    }

    /// Whether `path` or any of its parent directories is ignored.
    pub fn is_excluded(&self, path: &RelPath, is_dir: bool) -> bool {
        path.ancestors().iter().any(|a| self.is_ignored(a, true)) || self.is_ignored(path, is_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `gitignores` are (dir, contents); `expect` pairs a path (trailing `/` = directory)
    /// with whether it is excluded.
    fn check(patterns: &[&str], vcs: bool, gitignores: &[(&str, &str)], expect: &[(&str, bool)]) {
        let patterns: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        let mut ig = Ignorer::new(&patterns, vcs, !gitignores.is_empty()).unwrap();
        for (dir, contents) in gitignores {
            let bad = ig.add_gitignore(&RelPath::parse(dir).unwrap(), contents);
            assert!(bad.is_empty(), "{bad:?}");
        }
        for (path, want) in expect {
            let is_dir = path.ends_with('/');
            let p = RelPath::parse(path.trim_end_matches('/')).unwrap();
            assert_eq!(
                ig.is_excluded(&p, is_dir),
                *want,
                "{path} with {patterns:?}"
            );
        }
    }

    #[test]
    fn session_patterns() {
        check(
            &["*.o", "/build", "logs/", "!keep.o", "docs/**/*.tmp"],
            false,
            &[],
            &[
                ("", false),
                ("a.o", true),
                ("src/deep/a.o", true),
                ("keep.o", false),
                ("build", true),
                ("build/", true),
                ("src/build", false),
                ("logs/", true),
                ("logs", false),
                ("src/logs/", true),
                ("src/logs/x.txt", true),
                ("docs/a/b/c.tmp", true),
                ("docs/c.tmp", true),
                ("main.rs", false),
            ],
        );
    }

    #[test]
    fn vcs_names() {
        check(
            &["!.git"],
            true,
            &[],
            &[
                (".git/", true),
                (".git", true),
                ("sub/.hg/", true),
                (".svn/entries", true),
                ("_darcs/", true),
                (".bzr/", true),
                (".fslckout", true),
                (".github/", false),
                ("git/", false),
            ],
        );
        check(&[], false, &[], &[(".git/", false)]);
    }

    #[test]
    fn nested_gitignores() {
        check(
            &[],
            false,
            &[
                ("", "target/\n*.log\n"),
                ("sub", "!keep.log\n/local\n"),
                ("sub/deeper", "*.txt\n"),
            ],
            &[
                ("target/", true),
                ("sub/target/", true),
                ("a.log", true),
                ("sub/a.log", true),
                ("sub/keep.log", false),
                ("keep.log", true),
                ("sub/local", true),
                ("local", false),
                ("sub/x/local", false),
                ("sub/deeper/a.txt", true),
                ("sub/a.txt", false),
                ("sub/deeper/keep.log", false),
            ],
        );
    }

    #[test]
    fn session_patterns_win_over_gitignore() {
        check(&["!*.log"], false, &[("", "*.log\n")], &[("a.log", false)]);
    }

    #[test]
    fn bad_patterns_name_the_pattern() {
        let e = Ignorer::new(&["a[z-a]".to_owned()], false, false).unwrap_err();
        assert!(e.to_string().contains("\"a[z-a]\""), "{e}");
        let mut ig = Ignorer::new(&[], false, true).unwrap();
        let bad = ig.add_gitignore(&RelPath::parse("d").unwrap(), "ok.txt\nb{\n");
        assert_eq!(bad.len(), 1);
        assert!(
            bad[0].to_string().contains("\"b{\" of d/.gitignore"),
            "{}",
            bad[0]
        );
        assert!(ig.is_ignored(&RelPath::parse("d/ok.txt").unwrap(), false));
    }
}
