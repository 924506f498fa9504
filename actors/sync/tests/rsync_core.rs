//! `cs rsync`'s core against real rsync: each scenario builds trees in a tempdir, lists them
//! (a small lister here), plans, and compares `Plan::itemized` (and the warnings and errors)
//! with `rsync -n -i` run on the same trees with the same flags.
//!
//! rsync prints deletions and skip notices from its generator and the other lines from its
//! sender, so the two streams interleave by timing: each stream is compared in order.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use cs_sync::rsync::filter::Rules;
use cs_sync::rsync::plan::plan;
use cs_sync::rsync::{Entry, Kind, Options};

const T0: i64 = 1_600_000_000;

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, content).unwrap();
    stamp(root, rel, T0);
}
fn mkdir(root: &Path, rel: &str) {
    std::fs::create_dir_all(root.join(rel)).unwrap();
}
fn link(root: &Path, rel: &str, target: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, &p).unwrap();
    stamp(root, rel, T0);
}
/// Sets the mtime (of a symlink itself, not its target).
fn stamp(root: &Path, rel: &str, secs: i64) {
    let c = CString::new(root.join(rel).as_os_str().as_bytes()).unwrap();
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let ts = [t, t];
    // SAFETY: a valid C string and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {rel}");
}
fn chmod(root: &Path, rel: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join(rel), std::fs::Permissions::from_mode(mode)).unwrap();
}
fn chown(root: &Path, rel: &str, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(root.join(rel), Some(uid), Some(gid)).unwrap();
}
/// Stamps every directory under `root` (deepest first) and `root` itself with T0.
fn stamp_dirs(root: &Path) {
    let mut dirs = Vec::new();
    fn walk(p: &Path, rel: &str, out: &mut Vec<String>) {
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                let r = if rel.is_empty() {
                    e.file_name().to_string_lossy().into_owned()
                } else {
                    format!("{rel}/{}", e.file_name().to_string_lossy())
                };
                walk(&e.path(), &r, out);
                out.push(r);
            }
        }
    }
    if root.is_dir() {
        walk(root, "", &mut dirs);
        for d in dirs {
            stamp(root, &d, T0);
        }
        stamp(root, ".", T0);
    }
}
/// Makes `dst` a copy of `src` (rsync -a), so a scenario starts from an unchanged pair.
fn mirror(src: &Path, dst: &Path) {
    let ok = Command::new("rsync")
        .arg("-a")
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Lists `root`: the root as `.` (when `with_root`) and everything under it, paths prefixed
/// with `prefix`.
fn list(root: &Path, prefix: &str, with_root: bool, hash: bool) -> Vec<Entry> {
    let mut out = Vec::new();
    if std::fs::symlink_metadata(root).is_err() {
        return out;
    }
    fn entry(p: &Path, path: String, hash: bool) -> Entry {
        let m = std::fs::symlink_metadata(p).unwrap();
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_symlink() {
            Kind::Symlink
        } else {
            Kind::Special
        };
        Entry {
            path,
            kind,
            size: if kind == Kind::File { m.len() } else { 0 },
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec() as u32,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            target: (kind == Kind::Symlink).then(|| {
                std::fs::read_link(p)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            }),
            hash: (hash && kind == Kind::File)
                .then(|| *blake3::hash(&std::fs::read(p).unwrap()).as_bytes()),
        }
    }
    fn walk(p: &Path, rel: &str, hash: bool, out: &mut Vec<Entry>) {
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let en = entry(&e.path(), r.clone(), hash);
            let is_dir = en.kind == Kind::Dir;
            out.push(en);
            if is_dir {
                walk(&e.path(), &r, hash, out);
            }
        }
    }
    if with_root {
        out.push(entry(root, ".".into(), hash));
    } else {
        out.push(entry(root, prefix.into(), hash));
    }
    if std::fs::symlink_metadata(root).unwrap().is_dir() {
        walk(root, prefix, hash, &mut out);
    }
    out
}

/// rsync's flags → our options and rules (the test's own small parser).
fn options(args: &[&str], dir: &Path) -> (Options, Rules) {
    let mut o = Options::default();
    let mut r = Rules::default();
    for a in args {
        if let Some(p) = a.strip_prefix("--exclude=") {
            r.exclude(p);
        } else if let Some(p) = a.strip_prefix("--include=") {
            r.include(p);
        } else if let Some(p) = a.strip_prefix("--filter=") {
            r.filter(p).unwrap();
        } else if let Some(p) = a.strip_prefix("--exclude-from=") {
            r.exclude_from(&std::fs::read_to_string(dir.join(p)).unwrap());
        } else if *a == "--delete" {
            o.delete = true;
        } else if *a == "--delete-excluded" {
            o.delete = true;
            o.delete_excluded = true;
        } else if let Some(flags) = a.strip_prefix('-').filter(|f| !f.starts_with('-')) {
            for c in flags.chars() {
                match c {
                    'a' => {
                        o.recursive = true;
                        o.links = true;
                        o.perms = true;
                        o.times = true;
                        o.group = true;
                        o.owner = true;
                        o.devices = true;
                    }
                    'r' => o.recursive = true,
                    'l' => o.links = true,
                    'p' => o.perms = true,
                    't' => o.times = true,
                    'g' => o.group = true,
                    'o' => o.owner = true,
                    'D' => o.devices = true,
                    'c' => o.checksum = true,
                    'd' => o.dirs = true,
                    _ => panic!("flag {c}"),
                }
            }
        } else {
            panic!("arg {a}");
        }
    }
    (o, r)
}

struct Scenario {
    name: &'static str,
    args: &'static [&'static str],
    /// `src/` (contents) or `src` (the directory itself).
    slash: bool,
    /// Whether the destination directory exists before the setup runs.
    dst_exists: bool,
    /// Needs root (owner changes).
    root_only: bool,
    setup: fn(&Path, &Path, &Path),
}

const fn sc(
    name: &'static str,
    args: &'static [&'static str],
    setup: fn(&Path, &Path, &Path),
) -> Scenario {
    Scenario {
        name,
        args,
        slash: true,
        dst_exists: true,
        root_only: false,
        setup,
    }
}

fn tree(s: &Path) {
    write(s, "a", "hello");
    write(s, "Z", "upper");
    write(s, "z.txt", "zz");
    write(s, "b/x", "x");
    write(s, "b/d/y", "yy");
    write(s, "c/w", "www");
    mkdir(s, "empty");
    mkdir(s, "b/empty2");
    link(s, "lnk", "a");
    link(s, "b/dangling", "../nowhere");
    stamp_dirs(s);
}

fn scenarios() -> Vec<Scenario> {
    vec![
        sc("new tree", &["-rlptD"], |s, _, _| tree(s)),
        Scenario {
            slash: false,
            ..sc("new tree, no slash", &["-rlptD"], |s, _, _| tree(s))
        },
        Scenario {
            dst_exists: false,
            ..sc("missing destination", &["-rlptD"], |s, _, _| tree(s))
        },
        sc("unchanged", &["-rlptD", "--delete"], |s, d, _| {
            tree(s);
            mirror(s, d);
        }),
        sc("mtime and size changes", &["-rlptD"], |s, d, _| {
            tree(s);
            mirror(s, d);
            stamp(d, "a", T0 - 100);
            write(d, "b/x", "longer");
            write(d, "c/w", "wwW");
            stamp(d, "c/w", T0 + 5);
            stamp_dirs(d);
        }),
        sc("without -t", &["-rlpD"], |s, d, _| {
            tree(s);
            mirror(s, d);
            stamp(d, "a", T0 - 100);
            write(d, "b/x", "longer");
            stamp(d, "b", T0 - 7);
        }),
        sc("only -r", &["-r"], |s, d, _| {
            tree(s);
            mirror(s, d);
            stamp(d, "a", T0 - 100);
            write(d, "c/w", "wwW");
            stamp_dirs(d);
        }),
        sc("checksum, same content", &["-rlptDc"], |s, d, _| {
            tree(s);
            mirror(s, d);
            stamp(d, "a", T0 - 100);
            write(d, "b/x", "q");
            stamp_dirs(d);
        }),
        sc("checksum without -t", &["-rlc"], |s, d, _| {
            tree(s);
            mirror(s, d);
            stamp(d, "a", T0 - 100);
            write(d, "b/x", "q");
            write(d, "c/w", "wwwwwwww");
        }),
        sc("nanoseconds differ", &["-rlptD"], |s, d, _| {
            write(s, "f", "same");
            write(d, "f", "same");
            let c = CString::new(d.join("f").as_os_str().as_bytes()).unwrap();
            let t = libc::timespec {
                tv_sec: T0 as libc::time_t,
                tv_nsec: 999_000_000,
            };
            // SAFETY: valid path and times.
            unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), 0) };
            stamp_dirs(s);
            stamp_dirs(d);
        }),
        sc("permissions", &["-rlptD"], |s, d, _| {
            tree(s);
            mirror(s, d);
            chmod(d, "a", 0o600);
            chmod(d, "b", 0o700);
            chmod(s, "c/w", 0o755);
            write(d, "z.txt", "zzz");
            chmod(d, "z.txt", 0o640);
            stamp_dirs(d);
        }),
        sc("permissions without -p", &["-rltD"], |s, d, _| {
            tree(s);
            mirror(s, d);
            chmod(d, "a", 0o600);
            chmod(d, "b", 0o700);
        }),
        Scenario {
            root_only: true,
            ..sc("owner and group", &["-a"], |s, d, _| {
                tree(s);
                mirror(s, d);
                chown(d, "a", 1234, 5678);
                chown(d, "b", 0, 5678);
                chown(d, "lnk", 1234, 0);
            })
        },
        sc("symlinks changed", &["-rlptD"], |s, d, _| {
            tree(s);
            mirror(s, d);
            std::fs::remove_file(d.join("lnk")).unwrap();
            link(d, "lnk", "elsewhere");
            stamp(d, "b/dangling", T0 - 50);
            stamp_dirs(d);
        }),
        sc("symlink target changed, no -t", &["-rlpD"], |s, d, _| {
            tree(s);
            mirror(s, d);
            std::fs::remove_file(d.join("lnk")).unwrap();
            link(d, "lnk", "elsewhere");
        }),
        sc("no -l", &["-rpt"], |s, _, _| tree(s)),
        sc(
            "no -l keeps the receiver's name",
            &["-rpt", "--delete"],
            |s, d, _| {
                tree(s);
                write(d, "lnk", "a file where the source has a symlink");
                write(d, "gone", "x");
                stamp_dirs(d);
            },
        ),
        sc("kinds replaced", &["-rlptD", "--delete"], |s, d, _| {
            write(s, "f2d/inner", "i");
            write(d, "f2d", "file");
            write(s, "d2f", "file");
            write(d, "d2f/in/deep", "x");
            write(d, "d2f/in2", "x");
            write(s, "f2l", "file");
            link(d, "f2l", "x");
            link(s, "l2f", "x");
            write(d, "l2f", "file");
            link(s, "l2d", "x");
            write(d, "l2d/q", "q");
            stamp_dirs(s);
            stamp_dirs(d);
        }),
        sc(
            "directory in the way, no --delete",
            &["-rlptD"],
            |s, d, _| {
                write(s, "full", "file");
                write(d, "full/in", "x");
                write(s, "hollow", "file");
                mkdir(d, "hollow");
                stamp_dirs(s);
                stamp_dirs(d);
            },
        ),
        sc("nested deletes", &["-rlptD", "--delete"], |s, d, _| {
            tree(s);
            mirror(s, d);
            write(d, "q", "q");
            write(d, "A", "q");
            write(d, "b/extra/e", "e");
            write(d, "b/extra/f/g", "g");
            write(d, "b/zz", "z");
            mkdir(d, "b/d/emptyx");
            link(d, "c/l", "x");
            write(d, "old/1", "1");
            write(d, "old/2/3", "3");
            stamp_dirs(d);
        }),
        sc(
            "root and dir mtimes with deletes",
            &["-rlptD", "--delete"],
            |s, d, _| {
                tree(s);
                mirror(s, d);
                write(d, "q", "q");
                write(d, "b/q", "q");
                stamp(d, ".", T0 + 3600);
                stamp(d, "b", T0 + 3600);
                stamp(d, "c", T0 - 3600);
            },
        ),
        sc(
            "deletes spare excluded",
            &["-rlptD", "--delete", "--exclude=*.o", "--exclude=keep/"],
            |s, d, _| {
                tree(s);
                write(s, "src.o", "o");
                mirror(s, d);
                write(d, "top.o", "o");
                write(d, "b/deep.o", "o");
                write(d, "keep/z", "z");
                write(d, "gone/f", "f");
                write(d, "gone/k.o", "o");
                write(d, "gone2/f", "f");
                write(d, "x", "x");
                stamp_dirs(d);
            },
        ),
        sc(
            "delete-excluded",
            &[
                "-rlptD",
                "--delete-excluded",
                "--exclude=*.o",
                "--exclude=keep/",
            ],
            |s, d, _| {
                tree(s);
                write(s, "src.o", "o");
                mirror(s, d);
                write(d, "top.o", "o");
                write(d, "keep/z", "z");
                write(d, "gone/k.o", "o");
                stamp_dirs(d);
            },
        ),
        sc("no -r", &["-lpt"], |s, _, _| tree(s)),
        sc("-d", &["-dlpt"], |s, _, _| tree(s)),
        Scenario {
            slash: false,
            ..sc("-d, no slash", &["-dlpt"], |s, _, _| tree(s))
        },
        Scenario {
            slash: false,
            ..sc("no -r, no slash", &["-lpt"], |s, _, _| tree(s))
        },
        Scenario {
            slash: false,
            ..sc(
                "no slash with deletes",
                &["-rlptD", "--delete"],
                |s, d, t| {
                    tree(s);
                    mkdir(d, "src");
                    mirror(s, &d.join("src"));
                    write(d, "outside", "stays");
                    write(d, "src/inside", "goes");
                    write(d, "src/b/inside", "goes");
                    stamp(&t.join("dst"), "src", T0 - 1);
                },
            )
        },
        sc(
            "exclude directories and patterns",
            &[
                "-rlptD",
                "--exclude=b/",
                "--exclude=/z.txt",
                "--exclude=d/y",
                "--exclude=*.log",
            ],
            |s, _, _| {
                tree(s);
                write(s, "c/b/in", "b as a dir below c");
                write(s, "c/z.txt", "not anchored here");
                write(s, "b2/d/y", "d/y matches at any depth");
                write(s, "x.log", "l");
                write(s, "c/deep/x.log", "l");
                stamp_dirs(s);
            },
        ),
        sc(
            "include before exclude",
            &["-rlptD", "--include=*/", "--include=*.c", "--exclude=*"],
            |s, _, _| {
                write(s, "a.c", "c");
                write(s, "a.h", "h");
                write(s, "sub/b.c", "c");
                write(s, "sub/b.o", "o");
                write(s, "sub/deeper/c.c", "c");
                stamp_dirs(s);
            },
        ),
        sc(
            "filter rules, ***, **",
            &[
                "-rlptD",
                "--filter=+ /keep/***",
                "--filter=- /other/**/x",
                "--filter=+ /other/***",
                "--filter=- *",
            ],
            |s, _, _| {
                write(s, "keep/a", "a");
                write(s, "keep/sub/b", "b");
                write(s, "other/x", "top x kept: ** needs a directory");
                write(s, "other/s/x", "excluded");
                write(s, "other/s/y", "y");
                write(s, "drop", "d");
                stamp_dirs(s);
            },
        ),
        sc("negated rule", &["-rlptD", "--filter=-! */"], |s, _, _| {
            tree(s)
        }),
        sc(
            "exclude-from file",
            &["-rlptD", "--delete", "--exclude-from=rules.txt"],
            |s, d, t| {
                std::fs::write(
                    t.join("rules.txt"),
                    "# comment\n; other\n\n+ keep.o\n*.o\n- /c/\n",
                )
                .unwrap();
                tree(s);
                write(s, "keep.o", "k");
                write(s, "drop.o", "d");
                write(d, "c/protected", "p");
                write(d, "x.o", "protected");
                stamp_dirs(s);
                stamp_dirs(d);
            },
        ),
        sc("sort order", &["-rlptD"], |s, _, _| {
            for f in [
                "B", "a", "a.b", "a-b", "a_b", "ab", "Ab", ".hidden", "a1/x", "a.d/x", "a0/x",
                "A/x", "b-/x",
            ] {
                write(s, f, "x");
            }
            stamp_dirs(s);
        }),
        sc("empty directories", &["-rlptD", "--delete"], |s, d, _| {
            mkdir(s, "e1/e2/e3");
            mkdir(s, "e4");
            mkdir(d, "e4/old");
            mkdir(d, "e5");
            stamp_dirs(s);
            stamp_dirs(d);
        }),
    ]
}

fn split(lines: &[String]) -> (Vec<String>, Vec<String>) {
    lines
        .iter()
        .cloned()
        .partition(|l| l.starts_with("*deleting"))
}

fn run(sc: &Scenario) -> Result<(), String> {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdir(t.path(), "src");
    if sc.dst_exists {
        mkdir(t.path(), "dst");
    }
    (sc.setup)(&src, &dst, t.path());

    let (opts, rules) = options(sc.args, t.path());
    let src_list = if sc.slash {
        list(&src, "", true, opts.checksum)
    } else {
        list(&src, "src", false, opts.checksum)
    };
    let dst_list = list(&dst, "", true, opts.checksum);
    let p = plan(&src_list, &dst_list, &opts, &rules);

    let mut cmd = Command::new("rsync");
    cmd.current_dir(t.path()).args(["-n", "-i"]).args(sc.args);
    cmd.arg(if sc.slash { "src/" } else { "src" }).arg("dst/");
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (mut items, mut notes) = (Vec::new(), Vec::new());
    for l in stdout.lines() {
        if l.starts_with("skipping ") || l.starts_with("cannot delete ") {
            notes.push(l.to_string());
        } else if !l.starts_with("created directory ") {
            items.push(l.to_string());
        }
    }
    let errors: Vec<String> = stderr
        .lines()
        .filter(|l| !l.starts_with("rsync error:"))
        .map(String::from)
        .collect();

    if std::env::var_os("RSYNC_CORE_SHOW").is_some() {
        eprintln!(
            "== {} {:?}\n{stdout}{stderr}-- plan:\n{}\n",
            sc.name,
            sc.args,
            p.itemized.join("\n")
        );
    }
    let (want_del, want_rest) = split(&items);
    let (got_del, got_rest) = split(&p.itemized);
    let mut problems = Vec::new();
    if want_rest != got_rest {
        problems.push(format!(
            "itemized lines:\n  rsync: {want_rest:#?}\n  plan:  {got_rest:#?}"
        ));
    }
    if want_del != got_del {
        problems.push(format!(
            "deletions:\n  rsync: {want_del:#?}\n  plan:  {got_del:#?}"
        ));
    }
    if notes != p.warnings {
        problems.push(format!(
            "notes:\n  rsync: {notes:#?}\n  plan:  {:#?}",
            p.warnings
        ));
    }
    if errors != p.errors {
        problems.push(format!(
            "errors:\n  rsync: {errors:#?}\n  plan:  {:#?}",
            p.errors
        ));
    }
    let deleted = want_del.len() as u64;
    if p.deleted != deleted {
        problems.push(format!("deleted: rsync {deleted}, plan {}", p.deleted));
    }
    let sent = want_rest.iter().filter(|l| l.starts_with(">f")).count() as u64;
    if p.files_sent != sent {
        problems.push(format!("files sent: rsync {sent}, plan {}", p.files_sent));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "scenario '{}' ({:?}):\n{}\nrsync stdout:\n{stdout}",
            sc.name,
            sc.args,
            problems.join("\n")
        ))
    }
}

fn have_rsync() -> bool {
    Command::new("rsync")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn rsync_plans_match_real_rsync() {
    if !have_rsync() {
        eprintln!("rsync is not installed: skipping the comparison with real rsync");
        return;
    }
    // SAFETY: no arguments, no side effects.
    let root = unsafe { libc::geteuid() } == 0;
    let mut failures = Vec::new();
    let all = scenarios();
    assert!(all.len() >= 25);
    for sc in &all {
        if sc.root_only && !root {
            eprintln!("skipping '{}': needs root", sc.name);
            continue;
        }
        if let Err(e) = run(sc) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} scenarios differ:\n\n{}",
        failures.len(),
        all.len(),
        failures.join("\n\n")
    );
}

#[test]
fn rsync_plan_ops_follow_the_receivers_order() {
    if !have_rsync() {
        eprintln!("rsync is not installed: skipping");
        return;
    }
    // The ops of every scenario: a path's parent exists (made earlier or listed) before
    // anything is made in it, a delete never follows a create at the same path, and a
    // directory's attributes come after every op below it.
    for sc in scenarios() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        mkdir(t.path(), "src");
        if sc.dst_exists {
            mkdir(t.path(), "dst");
        }
        (sc.setup)(&src, &dst, t.path());
        let (opts, rules) = options(sc.args, t.path());
        let src_list = if sc.slash {
            list(&src, "", true, false)
        } else {
            list(&src, "src", false, false)
        };
        let dst_list = list(&dst, "", true, false);
        let p = plan(&src_list, &dst_list, &opts, &rules);
        let path_of = |op: &cs_sync::rsync::Op| match op {
            cs_sync::rsync::Op::Delete { path, .. }
            | cs_sync::rsync::Op::Mkdir { path }
            | cs_sync::rsync::Op::Send { path, .. }
            | cs_sync::rsync::Op::Symlink { path, .. }
            | cs_sync::rsync::Op::Attrs { path, .. } => path.clone(),
        };
        let under = |p: &str, d: &str| d == "." && p != "." || p.starts_with(&format!("{d}/"));
        for (i, op) in p.ops.iter().enumerate() {
            let path = path_of(op);
            if let cs_sync::rsync::Op::Delete { .. } = op {
                for earlier in &p.ops[..i] {
                    let created = matches!(
                        earlier,
                        cs_sync::rsync::Op::Mkdir { .. }
                            | cs_sync::rsync::Op::Send { .. }
                            | cs_sync::rsync::Op::Symlink { .. }
                    );
                    assert!(
                        !(created && path_of(earlier) == path),
                        "{}: delete after create of {path}",
                        sc.name
                    );
                }
            }
            if let cs_sync::rsync::Op::Attrs { .. } = op {
                if dst_list
                    .iter()
                    .chain(src_list.iter())
                    .any(|e| e.path == path && e.kind == Kind::Dir)
                {
                    for later in &p.ops[i + 1..] {
                        let lp = path_of(later);
                        assert!(
                            !under(&lp, &path),
                            "{}: {lp} after the attributes of {path}",
                            sc.name
                        );
                    }
                }
            }
        }
    }
}
