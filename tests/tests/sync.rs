//! Continuous sync end to end: real `cs`, real daemon, real agent on loopback, real files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cs_tests::{text, wait_until, Laptop};

/// A laptop with a local sandbox `demo`, a local tree and a session syncing it to `proj`.
struct Synced {
    l: Laptop,
    alpha: PathBuf,
    beta: PathBuf,
    name: String,
}

impl Synced {
    fn new(setup: impl FnOnce(&Path), extra: &[&str]) -> Self {
        let l = Laptop::new();
        l.sandbox("demo");
        let alpha = l.dir.path().join("alpha");
        std::fs::create_dir_all(&alpha).unwrap();
        setup(&alpha);
        let home = PathBuf::from(l.show("demo")[0]["home"].as_str().unwrap());
        let mut args = vec!["sync", "create", alpha.to_str().unwrap(), "demo/dev:proj"];
        args.extend_from_slice(extra);
        let name = l.ok(&args).trim().to_string();
        assert_eq!(name, "alpha");
        let s = Self {
            l,
            alpha,
            beta: home.join("proj"),
            name,
        };
        s.flush();
        s
    }

    fn flush(&self) {
        self.l.ok(&["sync", "flush", &self.name]);
    }

    fn list(&self) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.l.ok(&["sync", "list", "--json"])).unwrap();
        v.as_array().unwrap()[0].clone()
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn a_tree_syncs_both_ways_with_modes_links_deletes_and_ignores() {
    let s = Synced::new(
        |a| {
            std::fs::create_dir_all(a.join("src/deep")).unwrap();
            std::fs::write(a.join("README"), "hello\n").unwrap();
            std::fs::write(a.join("src/deep/lib.rs"), "fn x() {}\n").unwrap();
            std::fs::write(a.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
            std::fs::set_permissions(a.join("run.sh"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            std::os::unix::fs::symlink("README", a.join("link")).unwrap();
            std::fs::create_dir_all(a.join(".git")).unwrap();
            std::fs::write(a.join(".git/HEAD"), "ref\n").unwrap();
            std::fs::write(a.join("scratch.tmp"), "x").unwrap();
            std::fs::create_dir_all(a.join("empty")).unwrap();
        },
        &["--ignore-vcs", "--ignore", "*.tmp"],
    );
    let b = &s.beta;
    assert_eq!(read(&b.join("README")), "hello\n");
    assert_eq!(read(&b.join("src/deep/lib.rs")), "fn x() {}\n");
    let mode = std::fs::metadata(b.join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "the executable bit syncs");
    assert_eq!(
        std::fs::read_link(b.join("link")).unwrap(),
        PathBuf::from("README")
    );
    assert!(b.join("empty").is_dir(), "empty directories sync");
    assert!(!b.join(".git").exists(), "--ignore-vcs");
    assert!(!b.join("scratch.tmp").exists(), "--ignore");

    // The workspace edits, creates and deletes; the laptop follows.
    std::fs::write(b.join("README"), "changed remotely\n").unwrap();
    std::fs::write(b.join("new.txt"), "from the workspace\n").unwrap();
    std::fs::remove_dir_all(b.join("src")).unwrap();
    s.flush();
    assert!(wait_until(Duration::from_secs(10), || {
        s.flush();
        !s.alpha.join("src").exists()
    }));
    assert_eq!(read(&s.alpha.join("README")), "changed remotely\n");
    assert_eq!(read(&s.alpha.join("new.txt")), "from the workspace\n");
    // Ignored content on the laptop is never deleted, even though the workspace lacks it.
    assert!(s.alpha.join(".git/HEAD").exists());
    assert!(s.alpha.join("scratch.tmp").exists());
    let st = s.list();
    assert_eq!(st["conflicts"], 0);
    assert_eq!(st["mode"], "two-way-safe");
}

#[test]
fn a_change_reaches_the_other_side_without_a_flush() {
    let s = Synced::new(|a| std::fs::write(a.join("f"), "1").unwrap(), &[]);
    // Filesystem events drive sync: no command needed.
    std::fs::write(s.alpha.join("g"), "laptop").unwrap();
    assert!(wait_until(Duration::from_secs(5), || s
        .beta
        .join("g")
        .exists()));
    std::fs::write(s.beta.join("h"), "workspace").unwrap();
    assert!(wait_until(Duration::from_secs(5), || s
        .alpha
        .join("h")
        .exists()));
}

#[test]
fn both_sides_editing_one_file_is_a_conflict_that_keeps_both_versions() {
    let s = Synced::new(|a| std::fs::write(a.join("doc"), "base\n").unwrap(), &[]);
    s.l.ok(&["sync", "pause", &s.name]);
    assert_eq!(s.list()["state"], "paused");
    std::fs::write(s.alpha.join("doc"), "laptop\n").unwrap();
    std::fs::write(s.beta.join("doc"), "workspace\n").unwrap();
    s.l.ok(&["sync", "resume", &s.name]);
    s.flush();
    assert_eq!(read(&s.alpha.join("doc")), "laptop\n");
    assert_eq!(read(&s.beta.join("doc")), "workspace\n");
    assert_eq!(s.list()["conflicts"], 1);
    let c: serde_json::Value =
        serde_json::from_str(&s.l.ok(&["sync", "conflicts", &s.name, "--json"])).unwrap();
    assert_eq!(c[0]["path"], "doc");
    assert!(
        c[0]["alpha"].as_str().unwrap().starts_with("file 7 bytes"),
        "{c}"
    );
    assert!(
        c[0]["beta"].as_str().unwrap().starts_with("file 10 bytes"),
        "{c}"
    );
    // The user keeps the laptop's version by deleting the other: the edit wins.
    std::fs::remove_file(s.beta.join("doc")).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        s.flush();
        s.beta.join("doc").exists()
    }));
    assert_eq!(read(&s.beta.join("doc")), "laptop\n");
    assert_eq!(s.list()["conflicts"], 0);
}

#[test]
fn an_emptied_root_halts_instead_of_wiping_the_other_side() {
    let s = Synced::new(
        |a| {
            for i in 0..5 {
                std::fs::write(a.join(format!("f{i}")), "x").unwrap();
            }
        },
        &[],
    );
    // Paused, so the watcher cannot sync the first deletions one by one before the root is
    // empty (the last one alone would be below ROOT_EMPTIED_TOP_LEVEL_MIN): a wiped volume
    // appears all at once.
    s.l.ok(&["sync", "pause", &s.name]);
    for i in 0..5 {
        std::fs::remove_file(s.beta.join(format!("f{i}"))).unwrap();
    }
    s.l.ok(&["sync", "resume", &s.name]);
    let out = s.l.run(&["sync", "flush", &s.name]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("halted") && err.contains("beta"), "{err}");
    assert!(s.alpha.join("f0").exists(), "the laptop's files survive");
    assert_eq!(s.list()["state"], "halted");
    // The user decides: reset syncs the laptop's content back.
    s.l.ok(&["sync", "reset", &s.name]);
    s.flush();
    assert!(s.beta.join("f4").exists());
}

#[test]
fn limits_report_large_files_and_halt_on_too_many_entries() {
    let s = Synced::new(
        |a| {
            std::fs::write(a.join("small"), vec![b's'; 1000]).unwrap();
            std::fs::write(a.join("big"), vec![b'b'; 2000]).unwrap();
        },
        &["--max-file-size", "1KiB", "--max-entry-count", "4"],
    );
    assert_eq!(read(&s.beta.join("small")).len(), 1000);
    assert!(
        !s.beta.join("big").exists(),
        "a file over the limit is not sent"
    );
    assert_eq!(s.list()["problems"], 1, "{}", s.list());
    // Root, small, big (a problem entry) and one more: at the limit. One more halts.
    std::fs::write(s.alpha.join("c"), "c").unwrap();
    s.flush();
    std::fs::write(s.alpha.join("d"), "d").unwrap();
    let out = s.l.run(&["sync", "flush", &s.name]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("--max-entry-count of 4"), "{err}");
    assert_eq!(s.list()["state"], "halted");
    for (flag, bad) in [("--max-file-size", "12XB"), ("--max-entry-count", "lots")] {
        let out =
            s.l.run(&["sync", "create", "/tmp", "demo/dev:x", flag, bad]);
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(bad), "{err}");
    }
}

#[test]
fn sessions_survive_the_daemon_and_the_agent_restarting() {
    let s = Synced::new(|a| std::fs::write(a.join("a"), "1").unwrap(), &[]);
    s.l.ok(&["daemon", "stop"]);
    std::fs::write(s.alpha.join("b"), "2").unwrap();
    // Any command starts the daemon again, and it resumes the session.
    s.flush();
    assert_eq!(read(&s.beta.join("b")), "2");
    let pid = s.l.agent_pid("demo", "dev");
    // SAFETY: kill(2) on the agent this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::fs::write(s.alpha.join("c"), "3").unwrap();
    assert!(wait_until(Duration::from_secs(20), || {
        let _ = s.l.run(&["sync", "flush", &s.name]);
        s.beta.join("c").exists()
    }));
    assert_eq!(read(&s.beta.join("c")), "3");
}

#[test]
fn bad_input_is_refused_with_the_bad_value() {
    let l = Laptop::new();
    l.sandbox("demo");
    let dir = l.dir.path().join("d");
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["sync", "create", "/nonexistent/x", "demo/dev:p"],
            "/nonexistent/x",
        ),
        (vec!["sync", "create", d, "demo/dev"], "demo/dev"),
        (vec!["sync", "create", d, "demo/nope:p"], "demo/nope"),
        (vec!["sync", "create", d, "demo/dev:/etc"], "/etc"),
        (vec!["sync", "create", d, "demo/dev:../up"], "../up"),
        (
            vec!["sync", "create", d, "demo/dev:p", "--mode", "sideways"],
            "sideways",
        ),
        (vec!["mutagen", d, "demo/dev:p", "--", "--bogus"], "--bogus"),
        (vec!["sync", "flush", "nosuch"], "nosuch"),
    ] {
        let out = l.run(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = text(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    // Nothing was created by the refusals.
    assert_eq!(l.ok(&["sync", "list", "--json"]).trim(), "[]");
    // `cs mutagen` with Mutagen's flags creates a session like `cs sync create`.
    assert_eq!(
        l.ok(&[
            "mutagen",
            d,
            "demo/dev:p",
            "--",
            "--ignore-vcs",
            "--name=m1"
        ])
        .trim(),
        "m1"
    );
    let out = l.run(&["sync", "create", d, "demo/dev:q", "--name", "m1"]);
    assert!(text(&out.stderr).contains("m1"), "{}", text(&out.stderr));
    // Overlapping roots: a local root inside m1's, a workspace root inside m1's.
    let inner = dir.join("inner");
    let other = l.dir.path().join("other");
    std::fs::create_dir_all(&inner).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    let (inner, other) = (inner.to_str().unwrap(), other.to_str().unwrap());
    for (args, needle) in [
        (vec!["sync", "create", inner, "demo/dev:elsewhere"], inner),
        (
            vec!["sync", "create", other, "demo/dev:~/p/sub/"],
            "~/p/sub/",
        ),
    ] {
        let out = l.run(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = text(&out.stderr);
        assert!(
            err.contains(needle) && err.contains("overlaps"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        l.ok(&["sync", "list", "--json"])
            .matches("\"name\"")
            .count(),
        1
    );
}

fn link_bytes(l: &Laptop) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&l.ok(&["daemon", "status", "--json"])).unwrap();
    v["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["udp_tx_bytes"].as_u64().unwrap() + l["udp_rx_bytes"].as_u64().unwrap())
        .sum()
}

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn a_small_edit_in_a_large_file_moves_as_a_delta_both_ways() {
    let big = pattern(16 << 20, 7);
    let s = Synced::new(|a| std::fs::write(a.join("big.bin"), &big).unwrap(), &[]);
    assert_eq!(std::fs::read(s.beta.join("big.bin")).unwrap(), big);
    // 1 KiB changed in the middle, on the laptop.
    let mut edited = big.clone();
    edited[8 << 20..(8 << 20) + 1024].copy_from_slice(&pattern(1024, 9));
    let before = link_bytes(&s.l);
    std::fs::write(s.alpha.join("big.bin"), &edited).unwrap();
    s.flush();
    let wire = link_bytes(&s.l) - before;
    assert_eq!(std::fs::read(s.beta.join("big.bin")).unwrap(), edited);
    assert!(
        wire < 1 << 20,
        "{wire} bytes on the wire for a 1 KiB edit of 16 MiB"
    );
    // And the other way: the workspace edits, the laptop pulls a delta.
    let mut again = edited.clone();
    again[100..1124].copy_from_slice(&pattern(1024, 11));
    let before = link_bytes(&s.l);
    std::fs::write(s.beta.join("big.bin"), &again).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        s.flush();
        std::fs::read(s.alpha.join("big.bin")).unwrap() == again
    }));
    let wire = link_bytes(&s.l) - before;
    assert!(
        wire < 1 << 20,
        "{wire} bytes on the wire for a 1 KiB edit of 16 MiB"
    );
}

#[test]
fn killing_the_agent_mid_transfer_leaves_no_torn_file_and_the_session_resumes() {
    let big = pattern(200 << 20, 3);
    let l = Laptop::new();
    l.sandbox("demo");
    let alpha = l.dir.path().join("alpha");
    std::fs::create_dir_all(&alpha).unwrap();
    std::fs::write(alpha.join("huge.bin"), &big).unwrap();
    let beta = PathBuf::from(l.show("demo")[0]["home"].as_str().unwrap()).join("proj");
    l.ok(&["sync", "create", alpha.to_str().unwrap(), "demo/dev:proj"]);
    // Wait until the transfer is under way (its temporary file exists), then kill -9.
    let staging = || {
        std::fs::read_dir(&beta).ok().is_some_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".cs-sync-tmp."))
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), staging),
        "no transfer started"
    );
    // The session reports the transfer's progress meanwhile (`cs sync monitor` draws it).
    let progress = &serde_json::from_str::<serde_json::Value>(&l.ok(&["sync", "list", "--json"]))
        .unwrap()[0]["progress"];
    // (On a fast machine the transfer may be over already; then there is nothing to see.)
    if !progress.is_null() {
        assert_eq!(progress["files_total"], 1, "{progress}");
        assert_eq!(progress["bytes_total"], big.len() as u64, "{progress}");
    }
    let pid = l.agent_pid("demo", "dev");
    // SAFETY: kill(2) on the agent this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // Never a torn file: the name appears only with its whole content.
    if let Ok(data) = std::fs::read(beta.join("huge.bin")) {
        assert_eq!(data.len(), big.len(), "a torn file is visible");
    }
    assert!(wait_until(Duration::from_secs(60), || {
        let _ = l.run(&["sync", "flush", "alpha"]);
        std::fs::metadata(beta.join("huge.bin")).is_ok_and(|m| m.len() == big.len() as u64)
    }));
    assert!(std::fs::read(beta.join("huge.bin")).unwrap() == big);
}

#[test]
fn a_small_edit_is_not_stuck_behind_a_large_file() {
    let big = pattern(300 << 20, 5);
    let s = Synced::new(|_| {}, &[]);
    std::fs::write(s.alpha.join("huge.bin"), &big).unwrap();
    // Once the large file is under way on its own stream, a small edit follows.
    let staging = || {
        std::fs::read_dir(&s.beta).ok().is_some_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".cs-sync-tmp."))
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), staging),
        "no transfer started"
    );
    std::fs::write(s.alpha.join("small.txt"), "edit\n").unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || s
            .beta
            .join("small.txt")
            .exists()),
        "the small edit did not arrive"
    );
    // It arrived while the large file was still moving (the large file lands whole, by
    // rename, so its name appears only at the end).
    let big_landed = s.beta.join("huge.bin").exists();
    let bulk = s.list()["bulk_in_flight"].as_u64().unwrap();
    assert!(
        !big_landed && bulk == 1,
        "landed {big_landed}, in flight {bulk}"
    );
    s.flush();
    assert!(std::fs::read(s.beta.join("huge.bin")).unwrap() == big);
    assert_eq!(s.list()["files_bulk"], 1);
}

#[test]
fn deleting_a_sandbox_terminates_its_sessions_and_leaves_no_agent() {
    let s = Synced::new(|a| std::fs::write(a.join("a"), "1").unwrap(), &[]);
    let pid = s.l.agent_pid("demo", "dev");
    // A session holds its own link; before the fix it reconnected and restarted the agent
    // while its directory was being removed ("Directory not empty").
    s.l.ok(&["sandbox", "delete", "demo"]);
    assert_eq!(s.l.ok(&["sync", "list", "--json"]).trim(), "[]");
    // SAFETY: kill(pid, 0) only checks for existence.
    let gone = wait_until(
        Duration::from_secs(5),
        || unsafe { libc::kill(pid, 0) } != 0,
    );
    assert!(gone, "agent {pid} outlived its sandbox");
    assert!(s.alpha.join("a").exists(), "the laptop's files stay");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("cs-agent") && c.contains(&*s.l.dir.path().to_string_lossy()))
        .collect();
    assert!(left.is_empty(), "agents left running: {left:?}");
}
