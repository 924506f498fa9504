//! Tests of the filesystem shells (`scan`, `apply`) on real temporary directories, and one
//! end-to-end cycle: scan both roots, reconcile, apply, rescan.

use std::fs;
use std::io::Cursor;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use cs_sync::apply::{apply, ApplyError, TEMP_PREFIX};
use cs_sync::ignore::Ignorer;
use cs_sync::scan::{rescan, scan, HashCache, ScanOutput};
use cs_sync::{
    ancestor_after, content_hash, reconcile, Applied, Entry, Mode, Op, RelPath, Snapshot,
};

fn p(s: &str) -> RelPath {
    RelPath::parse(s).unwrap()
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

fn file_entry(data: &[u8], exec: bool) -> Entry {
    Entry::File {
        size: data.len() as u64,
        exec,
        hash: content_hash(data),
    }
}

/// Renders a snapshot as `path kind` lines (files with their content length and `x`).
fn render(s: &Snapshot) -> Vec<String> {
    s.iter()
        .map(|(path, e)| match e {
            Entry::Dir => format!("{path}/"),
            Entry::File { size, exec, .. } => {
                format!("{path} {size}{}", if *exec { "x" } else { "" })
            }
            Entry::Symlink { target } => format!("{path} -> {target}"),
            Entry::Problem { .. } => format!("{path} !"),
        })
        .collect()
}

fn check(out: &ScanOutput, expect: &[&str]) {
    assert_eq!(render(&out.snapshot), expect);
}

fn no_temp_files(root: &Path) {
    for entry in walk(root) {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.starts_with(TEMP_PREFIX),
            "leftover {}",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if fs::symlink_metadata(&path).unwrap().is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

#[test]
fn scan_records_the_tree_and_honours_ignores() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "src/main.rs", b"fn main() {}");
    write(root, "run.sh", b"#!/bin/sh\n");
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    write(root, "a.o", b"obj");
    write(root, ".git/HEAD", b"ref");
    write(root, "target/debug/x", b"big");
    write(root, ".gitignore", b"target/\n");
    write(root, "sub/.gitignore", b"*.tmp\n");
    write(root, "sub/t.tmp", b"t");
    write(root, "sub/keep", b"k");
    write(root, &format!("{TEMP_PREFIX}1.2"), b"half");
    symlink("src/main.rs", root.join("link")).unwrap();
    symlink("/etc/passwd", root.join("abs")).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    fs::create_dir(root.join("empty")).unwrap();

    let ignorer = Ignorer::new(&["*.o".to_owned()], true, true).unwrap();
    let out = scan(root, &ignorer, &HashCache::new()).unwrap();
    check(
        &out,
        &[
            "<root>/",
            ".gitignore 8",
            "abs -> /etc/passwd",
            "empty/",
            "link -> src/main.rs",
            "run.sh 10x",
            "sock !",
            "src/",
            "src/main.rs 12",
            "sub/",
            "sub/.gitignore 6",
            "sub/keep 1",
        ],
    );
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    assert_eq!(out.files_hashed, 5);
    assert_eq!(
        out.snapshot.get(&p("src/main.rs")),
        Some(&file_entry(b"fn main() {}", false))
    );

    // Without --ignore-vcs and gitignores, those come back.
    let plain = Ignorer::new(&[], false, false).unwrap();
    let all = scan(root, &plain, &HashCache::new()).unwrap();
    for path in [".git/HEAD", "target/debug/x", "sub/t.tmp", "a.o"] {
        assert!(all.snapshot.get(&p(path)).is_some(), "{path}");
    }

    // A missing root is an empty snapshot; a file root is an error.
    let gone = scan(&root.join("nope"), &plain, &HashCache::new()).unwrap();
    assert!(gone.snapshot.is_empty());
    let err = scan(&root.join("run.sh"), &plain, &HashCache::new()).unwrap_err();
    assert!(err.to_string().contains("is not a directory"), "{err}");
}

#[test]
fn cache_avoids_rehashing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for i in 0..20 {
        write(
            root,
            &format!("d{}/f{i}", i % 3),
            format!("content {i}").as_bytes(),
        );
    }
    let ig = Ignorer::none();
    let first = scan(root, &ig, &HashCache::new()).unwrap();
    assert_eq!(first.files_hashed, 20);
    assert_eq!(first.cache.len(), 20);
    let second = scan(root, &ig, &first.cache).unwrap();
    assert_eq!(second.files_hashed, 0);
    assert_eq!(second.snapshot, first.snapshot);

    write(root, "d1/f1", b"changed, and longer");
    let third = scan(root, &ig, &second.cache).unwrap();
    assert_eq!(third.files_hashed, 1);
    assert_eq!(
        third.snapshot.get(&p("d1/f1")),
        Some(&file_entry(b"changed, and longer", false))
    );
    // The cache survives serialization.
    let json = serde_json::to_string(&third.cache).unwrap();
    let back: HashCache = serde_json::from_str(&json).unwrap();
    assert_eq!(scan(root, &ig, &back).unwrap().files_hashed, 0);
}

#[test]
fn rescan_of_changed_paths_matches_a_full_scan() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "a/x", b"1");
    write(root, "a/y", b"2");
    write(root, "b/z", b"3");
    let ig = Ignorer::new(&[], false, true).unwrap();
    let before = scan(root, &ig, &HashCache::new()).unwrap();

    write(root, "a/x", b"11");
    fs::remove_file(root.join("a/y")).unwrap();
    write(root, "new/deep/file", b"4");
    write(root, "b/.gitignore", b"z\n");
    let changed = [p("a/x"), p("a/y"), p("new/deep/file"), p("b/.gitignore")];
    let old = before.snapshot.clone();
    let partial = rescan(root, &ig, before, &changed).unwrap();
    let full = scan(root, &ig, &HashCache::new()).unwrap();
    assert_eq!(render(&partial.snapshot), render(&full.snapshot));
    assert_eq!(partial.snapshot, full.snapshot);
    // The changes it reports are exactly what turns the old tree into the new one.
    assert_eq!(partial.changes, Some(old.changes_to(&full.snapshot)));
    let mut rebuilt = old.clone();
    rebuilt
        .apply_changes(partial.changes.clone().unwrap())
        .unwrap();
    assert_eq!(rebuilt, full.snapshot);
    assert!(
        partial.snapshot.get(&p("b/z")).is_none(),
        "b/.gitignore now ignores z"
    );
    // Only the changed files were hashed: a/x, new/deep/file, b/.gitignore.
    assert_eq!(partial.files_hashed, 3);

    // A staging file of an apply in progress, named by a watcher, is not part of the tree
    // (it once was, and a large file's staging copy was synced back as a file of its own).
    let staging = format!("{}123", cs_sync::apply::TEMP_PREFIX);
    write(root, &format!("a/{staging}"), b"partial");
    let again = rescan(root, &ig, partial, &[p(&format!("a/{staging}"))]).unwrap();
    assert_eq!(again.snapshot, full.snapshot);
    assert_eq!(again.changes, Some(Vec::new()));
}

#[test]
fn apply_creates_replaces_and_deletes_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ops_and_content: Vec<(Op, Option<&[u8]>)> = vec![
        (
            Op::Create {
                path: p("d"),
                entry: Entry::Dir,
            },
            None,
        ),
        (
            Op::Create {
                path: p("d/f"),
                entry: file_entry(b"hello", true),
            },
            Some(b"hello"),
        ),
        (
            Op::Create {
                path: p("d/l"),
                entry: Entry::Symlink { target: "f".into() },
            },
            None,
        ),
        (
            Op::Replace {
                path: p("d/f"),
                expected: file_entry(b"hello", true),
                entry: file_entry(b"bye", false),
            },
            Some(b"bye"),
        ),
        (
            Op::Replace {
                path: p("d/f"),
                expected: file_entry(b"bye", false),
                entry: file_entry(b"bye", true),
            },
            None,
        ),
        (
            Op::Replace {
                path: p("d/l"),
                expected: Entry::Symlink { target: "f".into() },
                entry: file_entry(b"now a file", false),
            },
            Some(b"now a file"),
        ),
    ];
    for (op, content) in &ops_and_content {
        let mut reader = content.map(Cursor::new);
        apply(
            root,
            op,
            reader.as_mut().map(|r| r as &mut dyn std::io::Read),
        )
        .unwrap_or_else(|e| panic!("{op:?}: {e}"));
    }
    assert_eq!(fs::read(root.join("d/f")).unwrap(), b"bye");
    let mode = fs::metadata(root.join("d/f")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!(fs::read(root.join("d/l")).unwrap(), b"now a file");
    no_temp_files(root);

    for op in [
        Op::Delete {
            path: p("d/l"),
            expected: file_entry(b"now a file", false),
        },
        Op::Delete {
            path: p("d/f"),
            expected: file_entry(b"bye", true),
        },
        Op::Delete {
            path: p("d"),
            expected: Entry::Dir,
        },
    ] {
        apply(root, &op, None).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    }
    assert!(fs::read_dir(root).unwrap().next().is_none());
}

#[test]
fn apply_refuses_what_it_has_not_seen() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "f", b"edited after the scan");
    write(root, "d/x", b"x");

    let stale = file_entry(b"what the scan saw", false);
    let replace = Op::Replace {
        path: p("f"),
        expected: stale.clone(),
        entry: file_entry(b"new", false),
    };
    let err = apply(root, &replace, Some(&mut Cursor::new(b"new"))).unwrap_err();
    assert!(matches!(err, ApplyError::Changed { .. }), "{err}");
    assert!(err.to_string().contains("changed since the scan"), "{err}");
    let delete = Op::Delete {
        path: p("f"),
        expected: stale,
    };
    assert!(matches!(
        apply(root, &delete, None),
        Err(ApplyError::Changed { .. })
    ));
    // Same size, different content: caught by the re-hash.
    let same_size = file_entry(b"edited after the sca_", false);
    let delete = Op::Delete {
        path: p("f"),
        expected: same_size,
    };
    assert!(matches!(
        apply(root, &delete, None),
        Err(ApplyError::Changed { .. })
    ));
    assert_eq!(fs::read(root.join("f")).unwrap(), b"edited after the scan");

    let create = Op::Create {
        path: p("f"),
        entry: file_entry(b"new", false),
    };
    let err = apply(root, &create, Some(&mut Cursor::new(b"new"))).unwrap_err();
    assert!(matches!(err, ApplyError::Exists { .. }), "{err}");

    let rmdir = Op::Delete {
        path: p("d"),
        expected: Entry::Dir,
    };
    assert!(matches!(
        apply(root, &rmdir, None),
        Err(ApplyError::NotEmpty { .. })
    ));

    // Wrong content never lands, and leaves no temporary behind.
    let create = Op::Create {
        path: p("g"),
        entry: file_entry(b"right", false),
    };
    let err = apply(root, &create, Some(&mut Cursor::new(b"wrong"))).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    let err = apply(root, &create, Some(&mut Cursor::new(b"right, and more"))).unwrap_err();
    assert!(err.to_string().contains("more than 5"), "{err}");
    assert!(!root.join("g").exists());
    no_temp_files(root);

    // Non-portable symlinks are never created.
    let bad = Op::Create {
        path: p("l"),
        entry: Entry::Symlink {
            target: "../../etc".into(),
        },
    };
    assert!(matches!(
        apply(root, &bad, None),
        Err(ApplyError::Symlink(_))
    ));
}

#[test]
fn apply_never_writes_through_a_symlinked_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(&outside).unwrap();
    write(&outside, "victim", b"keep me");
    symlink(&outside, root.join("link")).unwrap();

    let create = Op::Create {
        path: p("link/new"),
        entry: file_entry(b"x", false),
    };
    let err = apply(&root, &create, Some(&mut Cursor::new(b"x"))).unwrap_err();
    assert!(matches!(err, ApplyError::ParentSymlink { .. }), "{err}");
    let delete = Op::Delete {
        path: p("link/victim"),
        expected: file_entry(b"keep me", false),
    };
    let err = apply(&root, &delete, None).unwrap_err();
    assert!(
        err.to_string().contains("parent link is a symlink"),
        "{err}"
    );
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"keep me");
    assert!(!outside.join("new").exists());
    no_temp_files(&outside);
}

/// Scans both roots, reconciles, applies every op with content read from the other root,
/// and returns the new ancestor.
fn sync_once(alpha: &Path, beta: &Path, ancestor: &Snapshot, mode: Mode) -> (Snapshot, usize) {
    let ig = Ignorer::none();
    let a = scan(alpha, &ig, &HashCache::new()).unwrap().snapshot;
    let b = scan(beta, &ig, &HashCache::new()).unwrap().snapshot;
    let plan = reconcile(ancestor, &a, &b, mode).unwrap();
    let mut applied = Applied::default();
    for (ops, target, source, ok) in [
        (&plan.to_alpha, alpha, beta, &mut applied.to_alpha),
        (&plan.to_beta, beta, alpha, &mut applied.to_beta),
    ] {
        for op in ops {
            let data = match op.result() {
                Some(Entry::File { .. }) => fs::read(op.path().to_fs_path(source)).ok(),
                _ => None,
            };
            let mut reader = data.map(Cursor::new);
            let r = apply(
                target,
                op,
                reader.as_mut().map(|r| r as &mut dyn std::io::Read),
            );
            ok.push(r.is_ok());
        }
    }
    (
        ancestor_after(ancestor, &plan, &applied),
        plan.conflicts.len(),
    )
}

#[test]
fn end_to_end_two_way_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let alpha = dir.path().join("alpha");
    let beta = dir.path().join("beta");
    write(&alpha, "src/lib.rs", b"v1");
    write(&alpha, "README", b"readme");
    fs::create_dir_all(&beta).unwrap();

    let (ancestor, conflicts) = sync_once(&alpha, &beta, &Snapshot::new(), Mode::TwoWaySafe);
    assert_eq!(conflicts, 0);
    assert_eq!(fs::read(beta.join("src/lib.rs")).unwrap(), b"v1");

    // Edits on both sides, one conflicting.
    write(&alpha, "src/lib.rs", b"v2 from alpha");
    write(&beta, "README", b"readme from beta");
    write(&beta, "notes/todo", b"todo");
    write(&alpha, "both", b"alpha's");
    write(&beta, "both", b"beta's");
    let (ancestor, conflicts) = sync_once(&alpha, &beta, &ancestor, Mode::TwoWaySafe);
    assert_eq!(conflicts, 1);
    for root in [&alpha, &beta] {
        assert_eq!(fs::read(root.join("src/lib.rs")).unwrap(), b"v2 from alpha");
        assert_eq!(fs::read(root.join("README")).unwrap(), b"readme from beta");
        assert_eq!(fs::read(root.join("notes/todo")).unwrap(), b"todo");
        no_temp_files(root);
    }
    assert_eq!(fs::read(alpha.join("both")).unwrap(), b"alpha's");
    assert_eq!(fs::read(beta.join("both")).unwrap(), b"beta's");

    // Resolve by deleting the losing version: the other one then wins.
    fs::remove_file(beta.join("both")).unwrap();
    let (ancestor, conflicts) = sync_once(&alpha, &beta, &ancestor, Mode::TwoWaySafe);
    assert_eq!(conflicts, 0);
    assert_eq!(fs::read(beta.join("both")).unwrap(), b"alpha's");

    // Nothing left to do.
    let ig = Ignorer::none();
    let a = scan(&alpha, &ig, &HashCache::new()).unwrap().snapshot;
    let b = scan(&beta, &ig, &HashCache::new()).unwrap().snapshot;
    assert_eq!(a, b);
    assert!(reconcile(&ancestor, &a, &b, Mode::TwoWaySafe)
        .unwrap()
        .is_empty());
}

/// Syncing what a batch applied works for what is there, what was removed and what is
/// below a removed directory, one by one and (past the limit) as a whole filesystem; a
/// symlink is never followed out of the root.
#[test]
fn sync_paths_covers_files_removals_and_large_batches() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "d/a.c", b"x");
    std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
    let few = [p("d/a.c"), p("d"), p("gone"), p("gone/below"), p("link")];
    cs_sync::apply::sync_paths(root, &few).unwrap();
    let many: Vec<RelPath> = (0..=cs_sync::apply::SYNC_PATHS_MAX)
        .map(|i| p(&format!("f{i}")))
        .collect();
    cs_sync::apply::sync_paths(root, &many).unwrap();
    cs_sync::apply::sync_paths(root, &[]).unwrap();
}
