//! End-to-end tests of `cs ssh`, local sandboxes, pairing and trust, with the real `cs` and
//! `cs-agent` binaries over loopback QUIC.

use std::io::{BufRead, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use cs_tests::{agent_bin, run_bounded, text, wait_until, Laptop};

fn ssh(l: &Laptop, script: &str) -> std::process::Output {
    l.run(&["ssh", "--", script])
}

#[test]
fn exit_codes_signals_and_separate_streams() {
    let l = Laptop::new();
    l.sandbox("demo");
    let out = ssh(&l, "echo to-out; echo to-err >&2; exit 7");
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(text(&out.stdout), "to-out\n");
    assert_eq!(text(&out.stderr), "to-err\n");

    let out = ssh(&l, "kill -9 $$");
    assert_eq!(out.status.code(), Some(128 + 9), "{}", text(&out.stderr));

    // The command runs through $SHELL -c in the workspace home.
    let home = l.show("demo")[0]["home"].as_str().unwrap().to_string();
    let out = l.run(&["ssh", "-W", "demo/dev", "--", "pwd;", "echo", "$HOME"]);
    assert_eq!(text(&out.stdout), format!("{home}\n{home}\n"));
}

#[test]
fn stdin_is_forwarded_with_eof() {
    let l = Laptop::new();
    l.sandbox("demo");
    let mut child = l
        .cmd(&["ssh", "--", "wc -c; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"twelve bytes")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).split_whitespace().collect::<Vec<_>>(),
        ["12", "done"]
    );
}

#[test]
fn hundred_megabytes_through_cat_unchanged() {
    let l = Laptop::new();
    l.sandbox("demo");
    let total: usize = 100 * 1024 * 1024;
    let mut child = l
        .cmd(&["ssh", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let mut hasher = blake3::Hasher::new();
        let mut state: u64 = 0x9E3779B97F4A7C15;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..total / buf.len() {
            for b in buf.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            hasher.update(&buf);
            stdin.write_all(&buf).unwrap();
        }
        hasher.finalize()
    });
    let mut stdout = child.stdout.take().unwrap();
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n;
        hasher.update(&buf[..n]);
    }
    let sent = writer.join().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
    assert_eq!(got, total);
    assert_eq!(hasher.finalize(), sent);
}

#[test]
fn ctrl_c_reaches_the_remote_process_group() {
    let l = Laptop::new();
    l.sandbox("demo");
    let mut child = l
        .cmd(&[
            "ssh",
            "--",
            "trap 'echo got-INT; exit 3' INT; echo ready; while :; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    // SAFETY: kill(2) on a child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(lines.next().unwrap().unwrap(), "got-INT");
    assert_eq!(child.wait().unwrap().code(), Some(3));
}

#[test]
fn warm_connection_is_reused_for_every_command() {
    let l = Laptop::new();
    l.sandbox("demo");
    for _ in 0..3 {
        assert!(ssh(&l, "true").status.success());
    }
    let st: serde_json::Value =
        serde_json::from_str(&l.ok(&["daemon", "status", "--json"])).unwrap();
    let link = &st["links"][0];
    assert_eq!(link["state"], "connected");
    assert_eq!(link["connects"], 1, "{st}");
    assert_eq!(link["streams_opened"], 3, "{st}");
    // The socket is owner-only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(l.home().join("daemon.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn killed_agent_is_restarted_and_the_next_command_succeeds() {
    let l = Laptop::new();
    l.sandbox("demo");
    assert!(ssh(&l, "true").status.success());
    let pid = l.agent_pid("demo", "dev");
    // SAFETY: kill(2) on the agent this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(5), || unsafe {
        libc::kill(pid, 0)
    } != 0));
    let out = ssh(&l, "echo back");
    assert_eq!(text(&out.stdout), "back\n", "{}", text(&out.stderr));
    assert_ne!(l.agent_pid("demo", "dev"), pid);
}

#[test]
fn workspace_choice_and_bad_input() {
    let l = Laptop::new();
    let out = l.run(&["ssh", "--", "true"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("no sandboxes yet"),
        "{}",
        text(&out.stderr)
    );

    l.sandbox("one");
    l.sandbox("two");
    let out = l.run(&["ssh", "--", "true"]);
    let err = text(&out.stderr);
    assert!(
        err.contains("one/dev, two/dev") && err.lines().count() == 1,
        "{err}"
    );
    let out = l.run(&["ssh", "-W", "three/dev", "--", "true"]);
    assert!(
        text(&out.stderr).contains("unknown workspace 'three/dev'"),
        "{}",
        text(&out.stderr)
    );
    l.ok(&["sandbox", "use", "two/dev"]);
    assert_eq!(
        text(&l.run(&["ssh", "--", "echo $CS_WORKSPACE"]).stdout),
        "dev\n"
    );

    let out = l.run(&["sandbox", "create", "one", "--local"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("sandbox 'one' already exists"),
        "{}",
        text(&out.stderr)
    );
    let out = l.run(&["sandbox", "create", "Bad_Name", "--local"]);
    assert!(
        text(&out.stderr).contains("'Bad_Name'"),
        "{}",
        text(&out.stderr)
    );

    let list = l.ok(&["sandbox", "list"]);
    assert!(
        list.contains("one/dev") && list.contains("two/dev*"),
        "{list}"
    );
    l.ok(&["sandbox", "delete", "one"]);
    assert!(!l.home().join("local/one").exists());
    let out = l.run(&["sandbox", "show", "one"]);
    assert!(
        text(&out.stderr).contains("unknown sandbox 'one'"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn definition_with_several_workspaces() {
    let l = Laptop::new();
    let def = l.dir.path().join("sandbox.yaml");
    std::fs::write(&def, "workspaces:\n  - name: api\n  - name: web\n").unwrap();
    l.ok(&[
        "sandbox",
        "create",
        "multi",
        "--local",
        "-f",
        def.to_str().unwrap(),
    ]);
    let show = l.show("multi");
    assert_eq!(show.as_array().unwrap().len(), 2);
    assert_eq!(
        text(
            &l.run(&["ssh", "-W", "multi/web", "--", "echo $CS_WORKSPACE"])
                .stdout
        ),
        "web\n"
    );
    let out = l.run(&["ssh", "-W", "multi", "--", "true"]);
    assert!(
        text(&out.stderr).contains("multi/api, multi/web"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_bad_definition_is_refused_naming_the_key_and_line_and_creates_nothing() {
    let l = Laptop::new();
    let def = l.dir.path().join("sandbox.yaml");
    for (yaml, needles) in [
        (
            "workspaces:\n  - name: api\n    checkouts:\n      - path: src\n        repo: {git: /r}\n        histroy: {depth: 1}\n",
            vec!["unknown field `histroy`", "line 6"],
        ),
        (
            "workspaces:\n  - name: api\n    checkouts:\n      - path: src\n        repo: {git: /r}\n        manifest:\n          overlays:\n            - inline:\n                jobs:\n                  j: {run: {cmd: x}, schedule: '* * * *'}\n",
            vec!["schedule '* * * *' has 4 fields", "line 10"],
        ),
        (
            "workspaces:\n  - name: api\n    system:\n      files:\n        - {path: etc/x, content: x}\n",
            vec!["invalid path 'etc/x'", "line 5"],
        ),
    ] {
        std::fs::write(&def, yaml).unwrap();
        let out = l.run(&["sandbox", "create", "bad", "--local", "-f", def.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        for n in needles {
            assert!(err.contains(n), "{n}: {err}");
        }
        let out = l.run(&["sandbox", "show", "bad"]);
        assert!(text(&out.stderr).contains("unknown sandbox 'bad'"), "{}", text(&out.stderr));
    }
}

/// A remote-style agent started by hand, as on another machine.
struct ManualAgent {
    child: std::process::Child,
    pairing: String,
    root: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl ManualAgent {
    fn start(listen: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let root = dir.path().join("root");
        let mut child = Command::new(agent_bin())
            .args(["serve", "--listen", listen, "--home"])
            .arg(&home)
            .arg("--root")
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Self {
            child,
            pairing: line.trim().to_string(),
            root,
            _dir: dir,
        }
    }

    fn addr(&self) -> String {
        self.pairing.split('/').nth(2).unwrap().to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("agent.log")).unwrap_or_default()
    }
}

impl Drop for ManualAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn pairing_is_single_use_and_untrusted_keys_are_refused() {
    let agent = ManualAgent::start("127.0.0.1:0");
    assert!(
        agent.pairing.starts_with("cs-pair/1/127.0.0.1:"),
        "{}",
        agent.pairing
    );
    let alice = Laptop::new();
    alice.ok(&["sandbox", "add", "remote/dev", &agent.pairing]);
    assert_eq!(text(&alice.run(&["ssh", "--", "echo hi"]).stdout), "hi\n");

    // The token was used: another laptop cannot reuse it.
    let mallory = Laptop::new();
    let out = mallory.run(&["sandbox", "add", "remote/dev", &agent.pairing]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is unknown, already used, or expired"),
        "{}",
        text(&out.stderr)
    );

    // A laptop that copies the registry but not the key is refused before anything runs.
    std::fs::create_dir_all(mallory.home()).unwrap();
    std::fs::copy(
        alice.home().join("sandboxes.json"),
        mallory.home().join("sandboxes.json"),
    )
    .unwrap();
    let out = mallory.run(&["ssh", "--", "touch ~/pwned"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("not trust"),
        "{}",
        text(&out.stderr)
    );
    assert!(!agent.root.join("../home/pwned").exists());
    assert!(agent.log().contains("refused"), "{}", agent.log());

    // Trust is listed and revocable with cs-agent.
    let list = run_bounded(
        {
            let mut c = Command::new(agent_bin());
            c.args(["trust", "list", "--json", "--root"])
                .arg(&agent.root);
            c
        },
        Duration::from_secs(20),
    );
    let keys: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 1);
    let fp = keys[0]["fingerprint"].as_str().unwrap().to_string();
    let revoke = run_bounded(
        {
            let mut c = Command::new(agent_bin());
            c.args(["trust", "revoke", &fp, "--root"]).arg(&agent.root);
            c
        },
        Duration::from_secs(20),
    );
    assert!(revoke.status.success(), "{}", text(&revoke.stderr));
    let out = alice.run(&["ssh", "--", "true"]);
    assert_eq!(out.status.code(), Some(255), "revoked key still works");
}

#[test]
fn expired_and_malformed_pairings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut child = Command::new(agent_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--token-ttl",
            "0",
            "--home",
        ])
        .arg(&home)
        .arg("--root")
        .arg(dir.path().join("root"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let l = Laptop::new();
    let out = l.run(&["sandbox", "add", "x/dev", line.trim()]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot pair"),
        "{}",
        text(&out.stderr)
    );

    let out = l.run(&["sandbox", "add", "x/dev", "cs-pair/1/nonsense"]);
    assert!(
        text(&out.stderr).contains("invalid pairing 'cs-pair/1/nonsense'"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !l.home().join("sandboxes.json").exists() || !l.ok(&["sandbox", "list"]).contains("x/dev")
    );
}

#[test]
fn agent_down_is_reported_with_its_address_then_recovers() {
    let agent = ManualAgent::start("127.0.0.1:0");
    let addr = agent.addr();
    let l = Laptop::new();
    l.ok(&["sandbox", "add", "remote/dev", &agent.pairing]);
    assert!(l.run(&["ssh", "--", "true"]).status.success());
    drop(agent);
    let out = l.run(&["ssh", "--", "true"]);
    assert_eq!(out.status.code(), Some(255));
    let err = text(&out.stderr);
    assert!(
        err.contains(&addr) && err.contains("keeps retrying"),
        "{err}"
    );

    // Another agent (a new key) takes the address: the laptop refuses it (pinning).
    let restarted = ManualAgent::start(&addr);
    let out = l.run(&["ssh", "--", "true"]);
    assert!(
        text(&out.stderr).contains("different key"),
        "{}",
        text(&out.stderr)
    );
    drop(restarted);
}

#[test]
fn agent_restarted_with_its_state_is_reconnected() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let root = dir.path().join("root");
    let start = |listen: &str| {
        let mut child = Command::new(agent_bin())
            .args(["serve", "--listen", listen, "--home"])
            .arg(&home)
            .arg("--root")
            .arg(&root)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        (child, line.trim().to_string())
    };
    let (mut first, pairing) = start("127.0.0.1:0");
    let addr = pairing.split('/').nth(2).unwrap().to_string();
    let l = Laptop::new();
    l.ok(&["sandbox", "add", "r/dev", &pairing]);
    assert!(l.run(&["ssh", "--", "true"]).status.success());
    let _ = first.kill();
    let _ = first.wait();
    let (mut second, _) = start(&addr);
    let out = l.run(&["ssh", "--", "echo again"]);
    let _ = second.kill();
    let _ = second.wait();
    assert_eq!(text(&out.stdout), "again\n", "{}", text(&out.stderr));
}

#[test]
fn deleting_a_sandbox_ends_the_commands_running_in_it() {
    let l = Laptop::new();
    l.sandbox("demo");
    let home = std::path::PathBuf::from(l.show("demo")[0]["home"].as_str().unwrap());
    // This command even ignores SIGHUP: the agent must follow up with SIGKILL.
    let mut child = l
        .cmd(&[
            "ssh",
            "--",
            "trap '' HUP; echo $$ > pid; while :; do sleep 0.1; done",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = remote_pid(&home.join("pid"));
    l.ok(&["sandbox", "delete", "demo"]);
    let gone = ends_soon(pid);
    let _ = child.kill();
    let _ = child.wait();
    assert!(gone, "command {pid} outlived its sandbox");
}

/// Found by the simulation: a `cs ssh` killed while its command waits silently used to leave
/// the command running forever. The daemon closes the stream when `cs` goes; the agent must
/// hang the command up, as sshd does when its channel closes.
#[test]
fn killing_cs_ssh_hangs_up_its_command() {
    let l = Laptop::new();
    l.sandbox("demo");
    let home = std::path::PathBuf::from(l.show("demo")[0]["home"].as_str().unwrap());
    let mut child = l
        .cmd(&["ssh", "--", "echo $$ > pid; exec sleep 1000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = remote_pid(&home.join("pid"));
    // SIGKILL: cs gets no chance to say anything; only its socket to the daemon closes.
    child.kill().unwrap();
    let _ = child.wait();
    assert!(ends_soon(pid), "command {pid} outlived the killed cs ssh");
}

/// The pid a remote command wrote to `file` (`echo $$ > file`), once it is there.
fn remote_pid(file: &std::path::Path) -> i32 {
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(file).is_ok_and(|s| s.ends_with('\n'))
    }));
    std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Whether process `pid` ended within 5 s; kills it (cleaning up before the test fails) if not.
fn ends_soon(pid: i32) -> bool {
    // SAFETY: kill(pid, 0) only checks for existence.
    let gone = wait_until(
        Duration::from_secs(5),
        || unsafe { libc::kill(pid, 0) } != 0,
    );
    if !gone {
        // SAFETY: clean up the process this test started before failing.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    gone
}
