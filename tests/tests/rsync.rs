//! `cs rsync` against real rsync: each scenario (a source tree, a destination tree, flags and
//! the path forms) runs rsync local to local and `cs rsync` into (or out of) a local
//! sandbox, and demands the same resulting tree (content, type, mode, mtime, symlink
//! targets, empty directories) and, where the scenario asks, the same itemized lines.
//!
//! rsync prints `>` for a file it received; pushing to a remote receiver it prints `<`, and
//! so does `cs rsync` when it pushes: the comparison reads both as "transferred".

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use cs_tests::{text, Laptop};

/// One path of a tree: `f PATH CONTENT [MODE] [MTIME]`, `d PATH [MODE]`, `l PATH TARGET`.
fn build(root: &Path, spec: &str) {
    std::fs::create_dir_all(root).unwrap();
    let mut dirs = Vec::new();
    for line in spec.split(';').map(str::trim).filter(|l| !l.is_empty()) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let p = root.join(w[1]);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        match w[0] {
            "f" => {
                std::fs::write(&p, w.get(2).copied().unwrap_or("").replace('_', " ")).unwrap();
                let mode = w
                    .get(3)
                    .map(|m| u32::from_str_radix(m, 8).unwrap())
                    .unwrap_or(0o644);
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
                let mtime: i64 = w
                    .get(4)
                    .map(|t| t.parse().unwrap())
                    .unwrap_or(1_600_000_000);
                set_mtime(&p, mtime);
            }
            "d" => {
                std::fs::create_dir_all(&p).unwrap();
                let mode = w
                    .get(2)
                    .map(|m| u32::from_str_radix(m, 8).unwrap())
                    .unwrap_or(0o755);
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
                dirs.push(p);
            }
            "l" => std::os::unix::fs::symlink(w[2], &p).unwrap(),
            other => panic!("bad spec {other}"),
        }
    }
    // Every directory's time last (writing into them moved their mtimes), deepest first,
    // so that two builds of one spec are identical.
    let _ = dirs;
    let mut all = vec![root.to_path_buf()];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                all.push(p.clone());
                stack.push(p);
            }
        }
    }
    all.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in all {
        set_mtime(&d, 1_500_000_000);
    }
}

fn set_mtime(p: &Path, secs: i64) {
    let f = std::fs::File::options().write(false).read(true).open(p);
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64);
    match f {
        Ok(f) => f
            .set_times(std::fs::FileTimes::new().set_modified(t))
            .unwrap(),
        Err(e) => panic!("{}: {e}", p.display()),
    }
}

/// Every fixture time is before 2021; a time after this one was set by the copy itself (the
/// time of the write, as without `-t`), and rsync's and cs's writes may lie a second apart.
const WRITTEN_DURING_THE_RUN: i64 = 1_700_000_000;

/// An mtime as the comparison sees it: a fixture time exactly, the time of a write as `now`.
fn when(mtime: i64) -> String {
    if mtime >= WRITTEN_DURING_THE_RUN {
        "now".to_string()
    } else {
        mtime.to_string()
    }
}

/// A tree as the comparison sees it: path → (kind, mode, mtime, content or target).
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if !root.exists() {
        return out;
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let v = if m.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p.clone());
                format!("dir {:o} {}", m.mode() & 0o7777, when(m.mtime()))
            } else {
                format!(
                    "file {:o} {} {:?}",
                    m.mode() & 0o7777,
                    when(m.mtime()),
                    text(&std::fs::read(&p).unwrap())
                )
            };
            out.insert(rel, v);
        }
    }
    out
}

/// The itemized lines of an output, `<` read as `>`; `*deleting` lines apart (rsync prints
/// them from another process, so their place among the others is a matter of timing).
fn items(out: &str) -> (Vec<String>, Vec<String>) {
    let mut changes = Vec::new();
    let mut deletes = Vec::new();
    for l in out.lines() {
        if l.starts_with("*deleting") {
            deletes.push(l.to_string());
        } else if l.len() > 12 && l.as_bytes()[11] == b' ' && "<>ch.*".contains(&l[..1]) {
            let mut l = l.to_string();
            if l.starts_with('<') {
                l.replace_range(0..1, ">");
            }
            changes.push(l);
        }
    }
    (changes, deletes)
}

struct Scenario {
    name: &'static str,
    src: &'static str,
    dst: Option<&'static str>,
    flags: &'static str,
    /// The source argument's form: `src`, `src/`, or a path under it (`src/file`).
    from: &'static str,
    /// The destination argument's form: `dst`, `dst/`, `dst/new`.
    to: &'static str,
    itemize: bool,
}

const TREE: &str = "f top.txt hello; f a/one.c int_main; f a/one.o obj; d a/empty; f a/b/deep.txt deep 600; l a/link one.c; f cache/x.bin x; f a/cache/y.bin y; f log/app.log l";

fn scenarios() -> Vec<Scenario> {
    let s = |name, src, dst, flags, from, to, itemize| Scenario {
        name,
        src,
        dst,
        flags,
        from,
        to,
        itemize,
    };
    vec![
        s(
            "contents into a new dir",
            TREE,
            None,
            "-a",
            "src/",
            "dst",
            true,
        ),
        s(
            "the dir itself into a new dir",
            TREE,
            None,
            "-a",
            "src",
            "dst",
            true,
        ),
        s(
            "the dir itself into an existing dir",
            TREE,
            Some("f keep hi"),
            "-a",
            "src",
            "dst/",
            true,
        ),
        s(
            "contents over an existing tree, no delete",
            TREE,
            Some("f top.txt old 644 1600000100; f extra x; d a; f a/more m"),
            "-a",
            "src/",
            "dst/",
            true,
        ),
        s(
            "nested deletes",
            TREE,
            Some("f extra x; d gone/deeper; f gone/deeper/z z; f a/stale s; d a/b/old"),
            "-a --delete",
            "src/",
            "dst",
            true,
        ),
        s(
            "exclude by name",
            TREE,
            None,
            "-a --exclude=*.o",
            "src/",
            "dst",
            true,
        ),
        s(
            "anchored exclude",
            TREE,
            None,
            "-a --exclude=/top.txt --exclude=/a/b",
            "src/",
            "dst",
            true,
        ),
        s(
            "include then exclude everything",
            TREE,
            None,
            "-a --include=*/ --include=*.c --exclude=*",
            "src/",
            "dst",
            true,
        ),
        s(
            "double star",
            TREE,
            None,
            "-a --exclude=**/cache/",
            "src/",
            "dst",
            true,
        ),
        s(
            "single star stops at a slash",
            TREE,
            None,
            "-a --exclude=a/*",
            "src/",
            "dst",
            true,
        ),
        s(
            "delete keeps excluded files",
            TREE,
            Some("f debug.log d; f log/old.log o; f stale s"),
            "-a --delete --exclude=*.log",
            "src/",
            "dst",
            true,
        ),
        s(
            "delete-excluded removes them",
            TREE,
            Some("f debug.log d; f log/old.log o; f stale s"),
            "-a --delete --delete-excluded --exclude=*.log",
            "src/",
            "dst",
            true,
        ),
        s(
            "filter rules",
            TREE,
            None,
            "-a --filter=-_*.bin --filter=+_a/ --filter=-_/log",
            "src/",
            "dst",
            true,
        ),
        s(
            "symlinks as symlinks",
            "f t target; l l1 t; l l2 ../outside; l dangling nowhere",
            None,
            "-a",
            "src/",
            "dst",
            true,
        ),
        s(
            "symlinks skipped without -l",
            "f t target; l l1 t",
            None,
            "-rt",
            "src/",
            "dst",
            true,
        ),
        s(
            "permissions",
            "f x exec 755; f r ro 400; f w rw 600; d sub 700; f sub/f f 640",
            None,
            "-rpt",
            "src/",
            "dst",
            true,
        ),
        s(
            "permissions of existing files without -p",
            "f x exec 755 1600000300",
            Some("f x old 600 1600000000"),
            "-rt",
            "src/",
            "dst/",
            true,
        ),
        s(
            "mtimes with -t",
            "f a same 644 1600000200; f b changed 644 1600000300",
            Some("f a same 644 1600000200; f b differ! 644 1600000000"),
            "-rt",
            "src/",
            "dst/",
            true,
        ),
        s(
            "mtimes without -t",
            "f a same 644 1600000200; f b changed 644 1600000300",
            Some("f a same 644 1600000200; f b differ! 644 1600000000"),
            "-r",
            "src/",
            "dst/",
            true,
        ),
        s(
            "empty directories",
            "d e1; d e2/e3; f f x",
            None,
            "-a",
            "src/",
            "dst",
            true,
        ),
        s(
            "a file replaced by a directory",
            "d x; f x/inner i",
            Some("f x was_a_file"),
            "-a",
            "src/",
            "dst/",
            true,
        ),
        s(
            "a directory replaced by a file",
            "f y now_a_file",
            Some("d y; f y/inner i"),
            "-a --delete",
            "src/",
            "dst/",
            true,
        ),
        s(
            "quick check skips same size and time",
            "f a new 644 1600000000",
            Some("f a old 644 1600000000"),
            "-a",
            "src/",
            "dst/",
            true,
        ),
        s(
            "checksum sees the difference",
            "f a new 644 1600000000",
            Some("f a old 644 1600000000"),
            "-ac",
            "src/",
            "dst/",
            true,
        ),
        s(
            "a single file into a directory",
            "f one.txt hello",
            Some("f other x"),
            "-a",
            "src/one.txt",
            "dst/",
            true,
        ),
        s(
            "a single file renamed",
            "f one.txt hello",
            Some("f other x"),
            "-a",
            "src/one.txt",
            "dst/renamed.txt",
            true,
        ),
        s(
            "dry run changes nothing",
            TREE,
            Some("f extra x"),
            "-a --delete -n",
            "src/",
            "dst/",
            true,
        ),
    ]
}

fn args(flags: &str, from: String, to: String) -> Vec<String> {
    let mut v: Vec<String> = flags.split_whitespace().map(String::from).collect();
    v.push("-i".into());
    v.push(from);
    v.push(to);
    v
}

fn rsync(args: &[String]) -> (i32, String, String) {
    let out = Command::new("rsync")
        .args(args)
        .output()
        .expect("rsync (apt-get install -y rsync)");
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

/// Runs every scenario both ways; returns the failures' descriptions.
fn compare(l: &Laptop, home: &Path, pull: bool) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, sc) in scenarios().iter().enumerate() {
        let base = l
            .dir
            .path()
            .join(format!("{}{i}", if pull { "pull" } else { "push" }));
        let src = base.join("src");
        build(&src, sc.src);
        let theirs = base.join("theirs");
        std::fs::create_dir_all(&theirs).unwrap();
        let ours_rel = format!("t{}{i}", if pull { "pull" } else { "push" });
        let ours_parent = if pull {
            base.join("ours")
        } else {
            home.join(&ours_rel)
        };
        std::fs::create_dir_all(&ours_parent).unwrap();
        if let Some(d) = sc.dst {
            build(&theirs.join("dst"), d);
            build(&ours_parent.join("dst"), d);
        }
        let from_theirs = sc.from.replacen("src", src.to_str().unwrap(), 1);
        let (their_code, their_out, their_err) = rsync(&args(
            sc.flags,
            from_theirs,
            sc.to
                .replacen("dst", theirs.join("dst").to_str().unwrap(), 1),
        ));
        let (from_ours, to_ours) = if pull {
            // The source lives in the workspace's home: copy it there.
            let remote_src = home.join(&ours_rel).join("src");
            build(&remote_src, sc.src);
            (
                format!(
                    "pf/dev:{}",
                    sc.from.replacen("src", &format!("{ours_rel}/src"), 1)
                ),
                sc.to
                    .replacen("dst", ours_parent.join("dst").to_str().unwrap(), 1),
            )
        } else {
            (
                sc.from.replacen("src", src.to_str().unwrap(), 1),
                format!(
                    "pf/dev:{}",
                    sc.to.replacen("dst", &format!("{ours_rel}/dst"), 1)
                ),
            )
        };
        let mut cmd = vec!["rsync".to_string()];
        cmd.extend(args(sc.flags, from_ours, to_ours));
        let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let out = l.run(&refs);
        let (our_code, our_out, our_err) = (
            out.status.code().unwrap_or(-1),
            text(&out.stdout),
            text(&out.stderr),
        );
        let mut why = Vec::new();
        if our_code != their_code {
            why.push(format!(
                "exit {our_code} vs rsync's {their_code}: {our_err} | rsync: {their_err}"
            ));
        }
        let (a, b) = (
            snapshot(&theirs.join("dst")),
            snapshot(&ours_parent.join("dst")),
        );
        if a != b {
            let only: Vec<_> = a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(v))
                .map(|(k, v)| format!("{k}: rsync {v} / cs {:?}", b.get(k)))
                .collect();
            let extra: Vec<_> = b.keys().filter(|k| !a.contains_key(*k)).collect();
            why.push(format!("trees differ: {only:?}; only in cs: {extra:?}"));
        }
        if sc.itemize && items(&our_out) != items(&their_out) {
            why.push(format!(
                "itemized:\n--- rsync\n{their_out}--- cs\n{our_out}"
            ));
        }
        if !why.is_empty() {
            failures.push(format!(
                "[{}] {} ({} {} {}): {}",
                if pull { "pull" } else { "push" },
                sc.name,
                sc.flags,
                sc.from,
                sc.to,
                why.join("; ")
            ));
        }
    }
    failures
}

fn sandbox() -> (Laptop, PathBuf) {
    let l = Laptop::new();
    l.sandbox("pf");
    let home = l.home().join("local/pf/dev/home");
    (l, home)
}

#[test]
fn push_matches_rsync_in_every_scenario() {
    let (l, home) = sandbox();
    let failures = compare(&l, &home, false);
    assert!(
        failures.is_empty(),
        "{} of {} scenarios differ:\n{}",
        failures.len(),
        scenarios().len(),
        failures.join("\n\n")
    );
}

#[test]
fn pull_matches_rsync_in_every_scenario() {
    let (l, home) = sandbox();
    let failures = compare(&l, &home, true);
    assert!(
        failures.is_empty(),
        "{} of {} scenarios differ:\n{}",
        failures.len(),
        scenarios().len(),
        failures.join("\n\n")
    );
}

#[test]
fn bad_input_is_refused_as_rsync_refuses_it() {
    let (l, _home) = sandbox();
    let missing = l.dir.path().join("nosuch");
    let out = l.run(&["rsync", "-a", missing.to_str().unwrap(), "pf/dev:x"]);
    assert_eq!(out.status.code(), Some(23), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("link_stat"),
        "{}",
        text(&out.stderr)
    );
    let src = l.dir.path().join("s");
    std::fs::create_dir_all(&src).unwrap();
    for (to, says, code) in [
        ("pf/dev:/etc/x", "outside the workspace home", 3),
        ("pf/dev:../x", "outside the workspace home", 3),
        ("nosuch/dev:x", "nosuch", 5),
    ] {
        let out = l.run(&["rsync", "-a", src.to_str().unwrap(), to]);
        assert_eq!(out.status.code(), Some(code), "{to}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(says),
            "{to}: {}",
            text(&out.stderr)
        );
    }
    let out = l.run(&["rsync", "-aH", src.to_str().unwrap(), "pf/dev:x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("-H is not supported"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn partial_keeps_what_arrived_and_progress_reports_each_file() {
    let (l, home) = sandbox();
    let src = l.dir.path().join("big");
    std::fs::create_dir_all(&src).unwrap();
    let mut data = vec![0u8; 32 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(17) as u8;
    }
    std::fs::write(src.join("blob"), &data).unwrap();
    std::fs::write(src.join("small"), b"small").unwrap();
    let from = format!("{}/", src.display());
    for partial in [false, true] {
        let to = format!("pf/dev:cut{partial}");
        let mut args = vec!["rsync", "-a", &from, &to];
        if partial {
            args.insert(1, "--partial");
        }
        // Cut the transfer off once some of the large file has arrived.
        let mut child = l.cmd(&args).spawn().unwrap();
        let dir = home.join(format!("cut{partial}"));
        let arrived = cs_tests::wait_until(std::time::Duration::from_secs(60), || {
            std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    e.file_name().to_string_lossy().contains("cs-rsync")
                        && e.metadata().map(|m| m.len() > 0).unwrap_or(false)
                })
        });
        assert!(arrived, "the transfer started");
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        let blob = dir.join("blob");
        let kept = cs_tests::wait_until(std::time::Duration::from_secs(20), || {
            let tmp_left = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().contains("cs-rsync"));
            !tmp_left
        });
        assert!(kept, "no temporary file is left behind");
        if partial {
            // What arrived before the cut, in place of the file: usually a part, all of it
            // when the kill came after the last chunk but before the end.
            let kept = std::fs::read(&blob).expect("--partial keeps the part");
            assert!(!kept.is_empty(), "an empty part was kept");
            assert!(kept.len() <= data.len(), "{} bytes", kept.len());
            assert!(
                kept == data[..kept.len()],
                "the part is not the file's start"
            );
        } else {
            assert!(
                !blob.exists(),
                "without --partial nothing half-done is kept"
            );
        }
        // Run again: the whole file, checked by its hash.
        let mut again = vec!["rsync", "-a", "--progress", &from, &to];
        if partial {
            again.insert(1, "--partial");
        }
        let out = l.ok(&again);
        assert!(
            out.contains("blob\n") && out.contains("100%") && out.contains("to-chk=0/"),
            "{out}"
        );
        assert!(std::fs::read(&blob).unwrap() == data);
    }
}
