//! Workspace automation end to end: real `cs` and `cs-agent` binaries, real git repositories
//! made in the test (bare, served by path), real processes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cs_tests::{text, wait_until, Laptop};

/// Runs git in `dir`, demanding success; returns stdout.
fn git(dir: &Path, args: &[&str]) -> String {
    git_env(dir, args, &[])
}

fn git_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new("git")
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// A work tree at `dir/NAME` with `files` committed on `main`, and its bare clone
/// `dir/NAME.git`, which checkouts use.
fn repo(dir: &Path, name: &str, files: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let work = dir.join(name);
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    commit(&work, files, "first");
    let bare = dir.join(format!("{name}.git"));
    git(
        dir,
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
    git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
    (work, bare)
}

fn commit(work: &Path, files: &[(&str, &str)], msg: &str) -> String {
    commit_at(work, files, msg, None)
}

fn commit_at(work: &Path, files: &[(&str, &str)], msg: &str, date: Option<&str>) -> String {
    for (path, content) in files {
        let p = work.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        if path.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    git(work, &["add", "-A"]);
    let env: Vec<(&str, &str)> = date
        .map(|d| ("GIT_COMMITTER_DATE", d))
        .into_iter()
        .collect();
    git_env(work, &["commit", "-q", "--allow-empty", "-m", msg], &env);
    git(work, &["rev-parse", "HEAD"])
}

/// A local sandbox from a definition; returns the workspace's home and system root.
fn create(l: &Laptop, name: &str, definition: &str) -> (PathBuf, PathBuf) {
    let def = l.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&def, definition).unwrap();
    l.ok(&[
        "sandbox",
        "create",
        name,
        "--local",
        "-f",
        def.to_str().unwrap(),
    ]);
    let base = l.home().join(format!("local/{name}/dev"));
    (base.join("home"), base.join("root"))
}

fn status(l: &Laptop, ws: &str) -> serde_json::Value {
    let out = l.run(&["status", "-W", ws, "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

fn wait_state(l: &Laptop, ws: &str, state: &str, limit: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = status(l, ws);
        if s["state"] == state {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "{ws} not {state} after {limit:?}: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ps(l: &Laptop, ws: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&l.ok(&["ps", "-W", ws, "--json"])).expect("ps --json");
    v.as_array().unwrap().clone()
}

fn proc<'a>(procs: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    procs
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {procs:#?}"))
}

/// A log's records as (seq, unix_ms, text).
fn log(l: &Laptop, ws: &str, name: &str) -> Vec<(u64, u64, String)> {
    l.ok(&["logs", "-W", ws, name, "-n", "100000", "--stamps"])
        .lines()
        .map(|line| {
            let mut it = line.splitn(3, ' ');
            let seq = it.next().unwrap().parse().unwrap();
            let ms = it.next().unwrap().parse().unwrap();
            (seq, ms, it.next().unwrap_or("").to_string())
        })
        .collect()
}

/// When the agent noted a program's first start and its first end in its log.
fn started_ended(l: &Laptop, ws: &str, name: &str) -> (u64, Option<u64>) {
    let recs = log(l, ws, name);
    let start = recs
        .iter()
        .find(|r| r.2.starts_with("[cs-agent] started pid"))
        .unwrap_or_else(|| panic!("{name} never started: {recs:?}"))
        .1;
    let end = recs
        .iter()
        .find(|r| r.2.starts_with("[cs-agent] pid") && r.2.contains("ended"))
        .map(|r| r.1);
    (start, end)
}

fn manifest(daemon_cmd: &str) -> String {
    format!(
        "env:\n- GREETING=hello\n- GREETING=${{GREETING}}-world\nhooks:\n  post-checkout:\n    cmd: echo post-checkout in $PWD\n  build:\n    cmd: echo building $GREETING; echo built > built.txt\n    dir: sub\n    env:\n    - GREETING=$GREETING!\ndaemons:\n  web:\n    run:\n      cmd: {daemon_cmd}\njobs:\n  tick:\n    run:\n      cmd: date\n    schedule: '*/5 * * * 0,7'\n"
    )
}

#[test]
fn the_start_sequence_runs_in_the_pages_order_and_the_workspace_becomes_ready() {
    let l = Laptop::new();
    let (_, bare) = repo(
        l.dir.path(),
        "app",
        &[
            (
                ".sandbox/manifest.yaml",
                &manifest("echo web up; exec sleep 1000"),
            ),
            ("sub/.keep", ""),
        ],
    );
    let def = format!(
        r#"workspaces:
- name: dev
  system:
    files:
    - path: /etc/sandbox.d/setup
      mode: '0755'
      content: |
        #!/bin/sh
        echo system setup
    - path: /etc/sandbox.d/post-setup
      mode: '0755'
      content: |
        #!/bin/sh
        echo post setup
    - path: ~/.sandbox/setup
      mode: '0700'
      template: |
        #!/bin/sh
        echo "user setup for {{{{env "$USER"}}}} in {{{{env "${{HOME}}"}}}}"
    - path: /etc/sandbox.d/daemons/metrics.yaml
      content: |
        name: metrics
        run:
          cmd: echo metrics up; exec sleep 1000
    daemons:
    - name: proxy
      run:
        cmd: echo proxy up; exec sleep 1000
  checkouts:
  - path: src/app
    repo:
      git: {bare}
    version_spec: main
"#,
        bare = bare.display()
    );
    let (home, root) = create(&l, "seq", &def);
    let s = wait_state(&l, "seq/dev", "Ready", Duration::from_secs(60));
    assert_eq!(s["mode"], "MANUAL");

    // The page's order, from the agent's own start and end notes in each log.
    let order = [
        "inject-files",
        "setup",
        "user-setup",
        "proxy",
        "metrics",
        "checkout:src/app",
        "post-checkout:src/app",
        "build:src/app",
        "web",
        "post-setup",
    ];
    let (mut last_end, mut last_start) = (0u64, 0u64);
    for name in order {
        if name == "inject-files" {
            let recs = log(&l, "seq/dev", name);
            assert!(
                recs.iter()
                    .any(|r| r.2.contains("wrote") && r.2.contains("setup")),
                "{recs:?}"
            );
            last_end = recs.last().unwrap().1;
            continue;
        }
        let (start, end) = started_ended(&l, "seq/dev", name);
        assert!(
            start >= last_end,
            "{name} started at {start}, before the step before it ended at {last_end}"
        );
        assert!(
            start >= last_start,
            "{name} started at {start}, before the one before it at {last_start}"
        );
        last_start = start;
        // Daemons do not end; every step before them does.
        if let Some(end) = end {
            last_end = end;
        }
    }
    // Each program's output is in its log; env expansion and the command's own env applied.
    let text_of = |name| {
        log(&l, "seq/dev", name)
            .into_iter()
            .map(|r| r.2)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(text_of("setup").contains("system setup"));
    assert!(text_of("post-setup").contains("post setup"));
    assert!(
        text_of("user-setup").contains(&format!("in {}", home.display())),
        "{}",
        text_of("user-setup")
    );
    assert!(
        text_of("build:src/app").contains("building hello-world!"),
        "{}",
        text_of("build:src/app")
    );
    assert!(text_of("web").contains("web up"));
    assert_eq!(
        std::fs::read_to_string(home.join("src/app/sub/built.txt")).unwrap(),
        "built\n"
    );
    // The injected files under the relocatable root, with their modes.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root.join("etc/sandbox.d/setup")), 0o755);
    assert_eq!(mode(&home.join(".sandbox/setup")), 0o700);
    assert_eq!(
        mode(&root.join("etc/sandbox.d/daemons/metrics.yaml")),
        0o644
    );
    // Logs live under ROOT/var/log/sandbox.
    assert!(root.join("var/log/sandbox/web.log").exists());
    assert!(root.join("var/log/sandbox/checkout:src%2Fapp.log").exists());

    // `cs ps`: every daemon running, the job idle with its next run (a Sunday).
    let procs = ps(&l, "seq/dev");
    for (name, kind) in [
        ("web", "Daemon"),
        ("proxy", "GlobalDaemon"),
        ("metrics", "GlobalDaemon"),
    ] {
        let p = proc(&procs, name);
        assert_eq!(p["state"], "running", "{p}");
        assert_eq!(p["kind"], kind, "{p}");
        assert!(p["pid"].as_u64().is_some(), "{p}");
    }
    let tick = proc(&procs, "tick");
    assert_eq!(tick["state"], "idle");
    let next = tick["next_run_unix"].as_u64().expect("next run");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(next > now && next <= now + 8 * 86_400, "{next} vs {now}");
    let out = Command::new("date")
        .args(["-d", &format!("@{next}"), "+%u %M"])
        .output()
        .unwrap();
    let (dow, minute) = text(&out.stdout)
        .trim()
        .split_once(' ')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap();
    assert_eq!(dow, "7", "next run must be a Sunday");
    assert_eq!(minute.parse::<u32>().unwrap() % 5, 0);
    let human = l.ok(&["ps", "-W", "seq/dev"]);
    assert!(human.lines().next().unwrap().starts_with("NAME"), "{human}");

    // A restart of the agent runs the checkout and its hooks no more, but file injection and
    // the setup scripts again; no daemon runs twice.
    let web_pid = proc(&procs, "web")["pid"].as_u64().unwrap();
    let agent = l.agent_pid("seq", "dev");
    unsafe { libc::kill(agent, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(10), || {
        (unsafe { libc::kill(agent, 0) }) != 0
    }));
    let s = wait_state(&l, "seq/dev", "Ready", Duration::from_secs(60));
    let steps: Vec<String> = s["steps_done"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(
        !steps.iter().any(|s| s.starts_with("checkout:")
            || s.starts_with("post-checkout:")
            || s.starts_with("build:")),
        "{steps:?}"
    );
    assert!(
        steps.iter().any(|s| s.starts_with("setup: ok")),
        "{steps:?}"
    );
    assert!(
        steps.iter().any(|s| s.starts_with("inject-files: ok")),
        "{steps:?}"
    );
    assert_eq!(
        log(&l, "seq/dev", "checkout:src/app")
            .iter()
            .filter(|r| r.2.starts_with("[cs-agent] started"))
            .count(),
        1
    );
    // The old web was ended when the agent came back; one web runs.
    assert!(
        wait_until(Duration::from_secs(5), || unsafe {
            libc::kill(web_pid as i32, 0)
        } != 0),
        "the crashed agent's web still runs"
    );
    let procs = ps(&l, "seq/dev");
    assert_eq!(proc(&procs, "web")["state"], "running");
    assert!(proc(&procs, "web")["pid"].as_u64().unwrap() != web_pid);
}

#[test]
fn a_crashing_daemon_is_restarted_with_backoff_and_flags_the_workspace_until_stopped() {
    let l = Laptop::new();
    let def = "workspaces:\n- name: dev\n  system:\n    daemons:\n    - name: crashy\n      run:\n        cmd: echo crashing; exit 3\n";
    create(&l, "crash", def);
    let s = wait_state(&l, "crash/dev", "Problematic", Duration::from_secs(40));
    assert!(s["why"].as_str().unwrap().contains("crashy"), "{s}");
    assert_eq!(s["crashing"][0], "crashy");
    let p = ps(&l, "crash/dev");
    let crashy = proc(&p, "crashy");
    assert_eq!(crashy["last_exit"], "exit 3");
    assert!(crashy["restarts"].as_u64().unwrap() >= 4, "{crashy}");
    // The delays between starts grow: 1 s, 2 s, 4 s, 8 s.
    let starts: Vec<u64> = log(&l, "crash/dev", "crashy")
        .into_iter()
        .filter(|r| r.2.starts_with("[cs-agent] started"))
        .map(|r| r.1)
        .collect();
    let gaps: Vec<u64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 4, "{gaps:?}");
    for (i, want) in [1_000u64, 2_000, 4_000, 8_000].iter().enumerate() {
        assert!(
            gaps[i] >= *want && gaps[i] < want + 1_500,
            "gap {i} is {} ms, want about {want}: {gaps:?}",
            gaps[i]
        );
    }
    // Stopped by the user, it no longer flags the workspace.
    l.ok(&["stop", "-W", "crash/dev", "crashy"]);
    wait_state(&l, "crash/dev", "Ready", Duration::from_secs(10));
    assert_eq!(proc(&ps(&l, "crash/dev"), "crashy")["state"], "stopped");
}

#[test]
fn a_hung_hook_stalls_visibly_and_a_background_child_holding_the_pipe_does_not() {
    let l = Laptop::new();
    let (_, bare) = repo(
        l.dir.path(),
        "app",
        &[(
            ".sandbox/manifest.yaml",
            "hooks:\n  post-checkout:\n    cmd: (sleep 1; echo late from the background) & echo hook done\n  build:\n    cmd: echo building forever; sleep 1000\n",
        )],
    );
    let def = format!(
        "workspaces:\n- name: dev\n  checkouts:\n  - path: app\n    repo:\n      git: {}\n",
        bare.display()
    );
    create(&l, "hang", &def);
    let s = wait_state(&l, "hang/dev", "Progressing", Duration::from_secs(30));
    // Past the post-checkout hook (its background child still holds the pipe), stuck in build.
    let start = Instant::now();
    let mut s = s;
    while s["step"] != "build:app" {
        assert!(start.elapsed() < Duration::from_secs(30), "{s}");
        std::thread::sleep(Duration::from_millis(100));
        s = status(&l, "hang/dev");
    }
    std::thread::sleep(Duration::from_millis(1_500));
    let s = status(&l, "hang/dev");
    assert_eq!(s["step"], "build:app");
    assert!(s["step_ms"].as_u64().unwrap() >= 1_000, "{s}");
    let out = l.run(&["status", "-W", "hang/dev"]);
    assert_eq!(out.status.code(), Some(3), "Progressing exits 3");
    let line = text(&out.stdout);
    assert!(
        line.starts_with("Progressing: build:app running for "),
        "{line}"
    );
    // The background child's late line still reached the hook's log.
    assert!(wait_until(Duration::from_secs(10), || {
        log(&l, "hang/dev", "post-checkout:app")
            .iter()
            .any(|r| r.2 == "late from the background")
    }));
    let steps = s["steps_done"].to_string();
    assert!(steps.contains("post-checkout:app: ok"), "{steps}");
}

#[test]
fn a_failing_setup_blocks_the_sequence_shows_why_and_is_retried() {
    let l = Laptop::new();
    // Fails on its first run, succeeds on the next.
    let def = r#"workspaces:
- name: dev
  system:
    files:
    - path: ~/.sandbox/setup
      mode: '0755'
      content: |
        #!/bin/sh
        echo "trying"
        if [ ! -e "$HOME/tried" ]; then touch "$HOME/tried"; echo "no database yet" >&2; exit 7; fi
        echo fine
    daemons:
    - name: after
      run:
        cmd: exec sleep 1000
"#;
    create(&l, "fail", def);
    let s = wait_state(&l, "fail/dev", "Problematic", Duration::from_secs(30));
    assert_eq!(s["step"], "user-setup");
    assert_eq!(s["why"], "exit 7");
    assert_eq!(s["failures"], 1);
    assert!(s["retry_in_ms"].as_u64().unwrap() <= 2_000, "{s}");
    let tail: Vec<&str> = s["log_tail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(tail.contains(&"no database yet"), "{tail:?}");
    // Blocked: the global daemon after it has not started.
    assert_eq!(ps(&l, "fail/dev").len(), 0);
    let human = text(&l.run(&["status", "-W", "fail/dev"]).stdout);
    assert!(
        human.contains("user-setup failed (exit 7) after "),
        "{human}"
    );
    assert!(s["step_ms"].as_u64().is_some(), "{s}");
    // Retried after its backoff, it passes and the rest runs.
    wait_state(&l, "fail/dev", "Ready", Duration::from_secs(20));
    assert_eq!(proc(&ps(&l, "fail/dev"), "after")["state"], "running");
}

#[test]
fn checkouts_by_tag_commit_depth_since_and_submodules() {
    let l = Laptop::new();
    let d = l.dir.path();
    let (lib_work, lib_bare) = repo(d, "lib", &[("lib.txt", "lib v1\n")]);
    let _ = lib_work;
    let (work, bare) = repo(d, "app", &[("a.txt", "one\n")]);
    // An old commit and two recent ones; a tag on the first recent one.
    git(
        &work,
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            lib_bare.to_str().unwrap(),
            "lib",
        ],
    );
    let old = commit_at(
        &work,
        &[("a.txt", "old\n")],
        "old",
        Some("2020-01-01T00:00:00Z"),
    );
    let tagged = commit(&work, &[("a.txt", "tagged\n")], "tagged");
    git(&work, &["tag", "v1"]);
    let head = commit(&work, &[("a.txt", "head\n")], "head");
    git(&work, &["push", "-q", "origin", "main", "v1"]);
    let _ = old;
    let url = bare.display();
    let def = format!(
        r#"workspaces:
- name: dev
  checkouts:
  - path: by-tag
    repo: {{git: "{url}"}}
    version_spec: v1
    history: {{depth: 1}}
  - path: by-commit
    repo: {{git: "file://{url}"}}
    version_spec: {tagged}
  - path: by-branch
    repo: {{git: "{url}"}}
    version_spec: main
    disable_recursive_checkout: true
  - path: since
    repo: {{git: "{url}"}}
    history: {{since: "2024-01-01"}}
"#
    );
    let (home, _) = create(&l, "co", &def);
    wait_state(&l, "co/dev", "Ready", Duration::from_secs(60));
    let rev = |p: &str| git(&home.join(p), &["rev-parse", "HEAD"]);
    let count = |p: &str| git(&home.join(p), &["rev-list", "--count", "HEAD"]);
    assert_eq!(rev("by-tag"), tagged);
    assert_eq!(count("by-tag"), "1", "depth 1");
    assert_eq!(rev("by-commit"), tagged);
    assert_eq!(rev("by-branch"), head);
    assert_eq!(rev("since"), head);
    // Only the commits after the date (the submodule's and the old one are before it).
    let since_count: u32 = count("since").parse().unwrap();
    let full: u32 = count("by-branch").parse().unwrap();
    assert_eq!(
        since_count, 2,
        "head and tagged are after the date ({full} in all)"
    );
    // Submodules: recursive by default, not when disabled.
    assert_eq!(
        std::fs::read_to_string(home.join("by-tag/lib/lib.txt")).unwrap(),
        "lib v1\n"
    );
    assert_eq!(
        std::fs::read_to_string(home.join("by-commit/lib/lib.txt")).unwrap(),
        "lib v1\n"
    );
    assert!(!home.join("by-branch/lib/lib.txt").exists());
    // No temporary clone is left behind.
    assert!(std::fs::read_dir(&home).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".cs-tmp")));
}

#[test]
fn stop_ends_the_whole_group_start_and_restart_bring_it_back_and_jobs_toggle() {
    let l = Laptop::new();
    let sleep = format!("sleep 7{}", std::process::id());
    let marker = format!("^{sleep}$");
    let def = format!(
        "workspaces:\n- name: dev\n  system:\n    daemons:\n    - name: stubborn\n      run:\n        cmd: trap '' TERM; {sleep} & wait\n"
    );
    create(&l, "stop", &def);
    wait_state(&l, "stop/dev", "Ready", Duration::from_secs(30));
    let count = || {
        let out = Command::new("pgrep")
            .args(["-c", "-f", &marker])
            .output()
            .unwrap();
        text(&out.stdout).trim().parse::<u32>().unwrap_or(0)
    };
    assert!(wait_until(Duration::from_secs(5), || count() == 1));
    // It ignores SIGTERM: the grace runs out and SIGKILL ends it and its child.
    let t = Instant::now();
    l.ok(&["stop", "-W", "stop/dev", "stubborn"]);
    assert!(
        t.elapsed() >= Duration::from_secs(9),
        "stop returned before the grace: {:?}",
        t.elapsed()
    );
    assert_eq!(count(), 0, "a child of the stopped daemon survived");
    let p = ps(&l, "stop/dev");
    assert_eq!(proc(&p, "stubborn")["state"], "stopped");
    assert_eq!(proc(&p, "stubborn")["last_exit"], "signal 9 (SIGKILL)");
    let out = l.ok(&["start", "-W", "stop/dev", "stubborn"]);
    assert!(out.starts_with("started stubborn (pid "), "{out}");
    assert!(wait_until(Duration::from_secs(5), || count() == 1));
    // Bad names are refused naming the name and what there is.
    let out = l.run(&["restart", "-W", "stop/dev", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("no daemon or job named 'nope'") && err.contains("stubborn"),
        "{err}"
    );
    let out = l.run(&["sandbox", "job", "disable", "-W", "stop/dev", "stubborn"]);
    assert!(
        text(&out.stderr).contains("stubborn is a daemon, not a job"),
        "{}",
        text(&out.stderr)
    );
    let out = l.run(&["logs", "-W", "stop/dev", "nope"]);
    assert!(
        text(&out.stderr).contains("no log named 'nope'"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_log_follow_survives_a_reconnect_with_no_gap_and_no_repeat() {
    let l = Laptop::new();
    let def = "workspaces:\n- name: dev\n  system:\n    daemons:\n    - name: counter\n      run:\n        cmd: i=0; while [ $i -lt 100000 ]; do i=$((i+1)); echo $i; sleep 0.005; done; sleep 1000\n";
    create(&l, "follow", def);
    wait_state(&l, "follow/dev", "Ready", Duration::from_secs(30));
    let out_path = l.dir.path().join("follow.out");
    let mut follow = l
        .cmd(&["logs", "-W", "follow/dev", "counter", "-f", "-n", "5"])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let numbers = || -> Vec<u64> {
        std::fs::read_to_string(&out_path)
            .unwrap()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    };
    assert!(wait_until(Duration::from_secs(10), || numbers().len() > 50));
    // The laptop daemon goes away (its connection with it); the follow reopens and resumes.
    l.ok(&["daemon", "stop"]);
    let before = numbers().len();
    assert!(wait_until(Duration::from_secs(20), || numbers().len() > before + 200));
    follow.kill().unwrap();
    follow.wait().unwrap();
    let n = numbers();
    for w in n.windows(2) {
        assert_eq!(w[1], w[0] + 1, "gap or repeat around {}", w[0]);
    }
}

#[test]
fn auto_mode_follows_the_branch_discards_local_changes_rebuilds_and_relaunches() {
    let l = Laptop::new();
    let (work, bare) = repo(
        l.dir.path(),
        "app",
        &[
            (
                ".sandbox/manifest.yaml",
                "hooks:\n  post-checkout:\n    cmd: echo post-checkout >> $HOME/hooks.log\n  build:\n    cmd: git rev-parse HEAD > $HOME/built\ndaemons:\n  web:\n    run:\n      cmd: echo serving $(cat $HOME/built); exec sleep 1000\n",
            ),
            ("tracked.txt", "original\n"),
        ],
    );
    let def = l.dir.path().join("auto.yaml");
    std::fs::write(
        &def,
        format!(
            "workspaces:\n- name: dev\n  checkouts:\n  - path: app\n    repo:\n      git: {}\n    version_spec: main\n",
            bare.display()
        ),
    )
    .unwrap();
    // Poll every 300 ms instead of 30 s.
    let out = cs_tests::run_bounded(
        {
            let mut c = l.cmd(&[
                "sandbox",
                "create",
                "auto",
                "--local",
                "-f",
                def.to_str().unwrap(),
            ]);
            c.env("CS_AUTO_POLL_MS", "300");
            c
        },
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let home = l.home().join("local/auto/dev/home");
    wait_state(&l, "auto/dev", "Ready", Duration::from_secs(60));
    let first = git(&work, &["rev-parse", "HEAD"]);
    assert_eq!(
        std::fs::read_to_string(home.join("built")).unwrap().trim(),
        first
    );
    let web_pid = proc(&ps(&l, "auto/dev"), "web")["pid"].as_u64().unwrap();

    // Bad modes are refused naming the value; nothing changes.
    let out = l.run(&["sandbox", "update", "auto", "-m", "dev=FAST"]);
    assert!(
        text(&out.stderr).contains("'FAST' is not AUTO or MANUAL"),
        "{}",
        text(&out.stderr)
    );
    let out = l.run(&["sandbox", "update", "auto", "-m", "nope=AUTO"]);
    assert!(
        text(&out.stderr).contains("unknown workspace 'auto/nope'"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(status(&l, "auto/dev")["mode"], "MANUAL");

    assert_eq!(
        l.ok(&["sandbox", "update", "auto", "-m", "dev=AUTO"])
            .trim(),
        "auto/dev: AUTO"
    );
    let out = l.run(&["ssh", "-W", "auto/dev", "--", "true"]);
    let err = text(&out.stderr);
    assert!(
        err.starts_with("warning: auto/dev: this workspace is in Auto Mode")
            && err.contains("cs sandbox update auto -m dev=MANUAL"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(0));

    // Local changes, then a new commit on the remote branch.
    std::fs::write(home.join("app/tracked.txt"), "edited in the workspace\n").unwrap();
    std::fs::write(home.join("app/untracked.txt"), "scratch\n").unwrap();
    let second = commit(&work, &[("feature.txt", "new\n")], "second");
    git(&work, &["push", "-q", "origin", "main"]);
    assert!(
        wait_until(Duration::from_secs(30), || {
            std::fs::read_to_string(home.join("built")).is_ok_and(|b| b.trim() == second)
        }),
        "the build hook never saw {second}"
    );
    assert!(wait_until(Duration::from_secs(10), || {
        log(&l, "auto/dev", "web")
            .iter()
            .any(|r| r.2 == format!("serving {second}"))
    }));
    let p = ps(&l, "auto/dev");
    assert_eq!(proc(&p, "web")["state"], "running");
    assert_ne!(
        proc(&p, "web")["pid"].as_u64().unwrap(),
        web_pid,
        "web was not relaunched"
    );
    assert_eq!(
        std::fs::read_to_string(home.join("app/tracked.txt")).unwrap(),
        "original\n"
    );
    assert!(!home.join("app/untracked.txt").exists());
    assert!(home.join("app/feature.txt").exists());
    let hooks = std::fs::read_to_string(home.join("hooks.log")).unwrap();
    assert_eq!(
        hooks.lines().count(),
        2,
        "post-checkout ran at the start and after the update"
    );
    wait_state(&l, "auto/dev", "Ready", Duration::from_secs(10));

    // Back in Manual, a new commit is not followed.
    assert_eq!(
        l.ok(&["sandbox", "update", "auto", "-m", "dev=manual"])
            .trim(),
        "auto/dev: MANUAL"
    );
    let third = commit(&work, &[("feature.txt", "newer\n")], "third");
    git(&work, &["push", "-q", "origin", "main"]);
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(
        std::fs::read_to_string(home.join("built")).unwrap().trim(),
        second
    );
    assert_ne!(second, third);
    let out = l.run(&["ssh", "-W", "auto/dev", "--", "true"]);
    assert!(
        !text(&out.stderr).contains("Auto Mode"),
        "{}",
        text(&out.stderr)
    );
}

/// A user made for one test, removed after it.
struct TestUser(String);

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).output();
    }
}

#[test]
fn as_root_system_steps_run_as_root_and_everything_else_as_the_owner() {
    if unsafe { libc::geteuid() } != 0 {
        // CI runs as root; an ordinary user cannot make users or switch to them.
        eprintln!("skipped: needs root to create the owner user");
        return;
    }
    let l = Laptop::new();
    let d = l.dir.path();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let name = format!("csown{}", std::process::id() % 100_000);
    let out = Command::new("useradd")
        .args(["--no-create-home", "--shell", "/bin/sh", &name])
        .output()
        .unwrap();
    assert!(out.status.success(), "useradd: {}", text(&out.stderr));
    let user = TestUser(name.clone());
    let id = |flag: &str| -> u32 {
        text(
            &Command::new("id")
                .args([flag, &user.0])
                .output()
                .unwrap()
                .stdout,
        )
        .trim()
        .parse()
        .unwrap()
    };
    let (uid, gid) = (id("-u"), id("-g"));
    let home = d.join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(uid), Some(gid)).unwrap();
    let (_, bare) = repo(
        d,
        "app",
        &[(
            ".sandbox/manifest.yaml",
            "hooks:\n  build:\n    cmd: id -un > $HOME/build-user\ndaemons:\n  web:\n    run:\n      cmd: id -un > $HOME/daemon-user; exec sleep 1000\n",
        )],
    );
    let out = Command::new("chown")
        .args(["-R", &format!("{uid}:{gid}")])
        .arg(&bare)
        .output()
        .unwrap();
    assert!(out.status.success());
    let def = d.join("own.yaml");
    std::fs::write(
        &def,
        format!(
            r#"workspaces:
- name: dev
  system:
    files:
    - path: /etc/sandbox.d/setup
      mode: '0755'
      content: |
        #!/bin/sh
        id -un > {d}/setup-user
    - path: ~/.sandbox/setup
      mode: '0755'
      content: |
        #!/bin/sh
        id -un > $HOME/user-setup-user
    - path: ~/.config/cs-test/settings
      content: x
    daemons:
    - name: proxy
      run:
        cmd: id -un > {d}/global-user; exec sleep 1000
  checkouts:
  - path: app
    repo:
      git: {bare}
"#,
            d = d.display(),
            bare = bare.display()
        ),
    )
    .unwrap();
    let root = d.join("root");
    let owner = ["--owner", name.as_str()];
    let (child, pairing) = start_agent(d, &home, &root, &def, &owner, "127.0.0.1:0");
    let _agent = KillOnDrop(child);
    l.ok(&["sandbox", "add", "own/dev", &pairing]);
    wait_state(&l, "own/dev", "Ready", Duration::from_secs(60));
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_string()
    };
    assert_eq!(read(d.join("setup-user")), "root");
    assert_eq!(read(d.join("global-user")), "root");
    assert!(wait_until(Duration::from_secs(5), || home
        .join("daemon-user")
        .exists()));
    for f in ["user-setup-user", "build-user", "daemon-user"] {
        assert_eq!(read(home.join(f)), name, "{f}");
    }
    // Checkout and injected files belong to the owner, the directories made for them too;
    // files outside the home to root.
    for p in [
        home.join("app/.git"),
        home.join(".config"),
        home.join(".config/cs-test/settings"),
        home.join(".sandbox/setup"),
    ] {
        assert_eq!(std::fs::metadata(&p).unwrap().uid(), uid, "{}", p.display());
    }
    assert_eq!(
        std::fs::metadata(root.join("etc/sandbox.d/setup"))
            .unwrap()
            .uid(),
        0
    );
    // `cs ssh` sessions are the owner's, with the owner's home.
    let out = l.ok(&["ssh", "-W", "own/dev", "--", "id -un; echo $HOME"]);
    assert_eq!(out, format!("{name}\n{}\n", home.display()));
}

#[test]
fn with_auto_retry_off_a_failed_step_waits_for_a_retry_by_hand() {
    let l = Laptop::new();
    let def = r#"workspaces:
- name: dev
  system:
    files:
    - path: /etc/sandbox.d/setup
      mode: '0755'
      content: |
        #!/bin/sh
        if [ ! -e "$HOME/tried" ]; then touch "$HOME/tried"; kill -TERM $$; fi
        echo fine
"#;
    let path = l.dir.path().join("noretry.yaml");
    std::fs::write(&path, def).unwrap();
    l.ok(&[
        "sandbox",
        "create",
        "noretry",
        "--local",
        "--no-auto-retry",
        "-f",
        path.to_str().unwrap(),
    ]);
    let s = wait_state(&l, "noretry/dev", "Problematic", Duration::from_secs(30));
    assert_eq!(s["step"], "setup");
    assert_eq!(s["why"], "signal 15 (SIGTERM)");
    assert!(s["retry_in_ms"].is_null(), "{s}");
    let human = text(&l.run(&["status", "-W", "noretry/dev"]).stdout);
    assert!(human.contains("automatic retry is off"), "{human}");
    // Still blocked well after the first automatic retry would have come (2 s).
    std::thread::sleep(Duration::from_millis(3_000));
    assert_eq!(status(&l, "noretry/dev")["state"], "Problematic");
    assert_eq!(
        l.ok(&["status", "-W", "noretry/dev", "--retry"]).trim(),
        "retrying setup"
    );
    wait_state(&l, "noretry/dev", "Ready", Duration::from_secs(20));
    let out = l.run(&["status", "-W", "noretry/dev", "--retry"]);
    assert!(
        text(&out.stderr).contains("nothing to retry"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_job_fires_on_its_minute_runs_on_demand_and_can_be_disabled() {
    let l = Laptop::new();
    let (_, bare) = repo(
        l.dir.path(),
        "app",
        &[(
            ".sandbox/manifest.yaml",
            "jobs:\n  every-minute:\n    run:\n      cmd: echo fired at $(date +%S)\n    schedule: '* * * * *'\n  sundays:\n    run:\n      cmd: echo sunday\n    schedule: '0 3 * * SUN'\n    disable_on_start: true\n",
        )],
    );
    let def = format!(
        "workspaces:\n- name: dev\n  checkouts:\n  - path: app\n    repo:\n      git: {}\n",
        bare.display()
    );
    create(&l, "jobs", &def);
    wait_state(&l, "jobs/dev", "Ready", Duration::from_secs(30));
    let p = ps(&l, "jobs/dev");
    assert_eq!(proc(&p, "sundays")["state"], "disabled");
    assert!(proc(&p, "sundays")["next_run_unix"].is_null());
    assert_eq!(proc(&p, "every-minute")["state"], "idle");
    // On demand.
    let out = l.ok(&["start", "-W", "jobs/dev", "sundays"]);
    assert!(out.starts_with("started sundays (pid "), "{out}");
    assert!(wait_until(Duration::from_secs(10), || log(
        &l, "jobs/dev", "sundays"
    )
    .iter()
    .any(|r| r.2 == "sunday")));
    // Enabled, it gets a next run; disabled again, none.
    l.ok(&["sandbox", "job", "enable", "-W", "jobs/dev", "sundays"]);
    assert!(proc(&ps(&l, "jobs/dev"), "sundays")["next_run_unix"]
        .as_u64()
        .is_some());
    l.ok(&["sandbox", "job", "disable", "-W", "jobs/dev", "sundays"]);
    assert_eq!(proc(&ps(&l, "jobs/dev"), "sundays")["state"], "disabled");
    // On its schedule: within the next minute, at second 0 (give or take the start-up).
    assert!(
        wait_until(Duration::from_secs(70), || log(
            &l,
            "jobs/dev",
            "every-minute"
        )
        .iter()
        .any(|r| r.2.starts_with("fired at"))),
        "the every-minute job never fired"
    );
    let fired: Vec<String> = log(&l, "jobs/dev", "every-minute")
        .into_iter()
        .filter(|r| r.2.starts_with("fired at"))
        .map(|r| r.2)
        .collect();
    assert_eq!(fired.len(), 1, "{fired:?}");
    let second: u32 = fired[0].trim_start_matches("fired at ").parse().unwrap();
    assert!(second <= 5, "fired at second {second}");
}

#[test]
fn the_readme_demo_shows_a_checkout_a_build_hook_a_daemon_and_a_job() {
    let l = Laptop::new();
    let out = l.ok(&["demo"]);
    for needle in [
        "creating the local sandbox 'demo'",
        "\nReady\n",
        "heartbeat            job     idle",
        "web                  daemon  running",
        "built at ",
        "hello from the demo: serving, built at",
        "hello from workspace dev as",
        "more commands on the warm connection",
    ] {
        assert!(out.contains(needle), "{needle:?} missing from:\n{out}");
    }
    // A second run uses the sandbox it made.
    let out = l.ok(&["demo"]);
    assert!(
        out.starts_with("using the existing local sandbox 'demo'"),
        "{out}"
    );
}

/// Starts `cs-agent serve` by hand (as on another machine); returns it and its pairing line.
/// A free UDP port on 127.0.0.1, for an agent that must come back on the same address.
fn free_port() -> String {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().to_string()
}

fn start_agent(
    d: &Path,
    home: &Path,
    root: &Path,
    def: &Path,
    extra: &[&str],
    listen: &str,
) -> (std::process::Child, String) {
    let mut child = Command::new(cs_tests::agent_bin())
        .args(["serve", "--listen", listen, "--home"])
        .arg(home)
        .arg("--root")
        .arg(root)
        .arg("--definition")
        .arg(def)
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(d.join("agent.log"))
                .unwrap(),
        )
        .spawn()
        .unwrap();
    let mut pairing = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut pairing)
        .unwrap();
    (child, pairing.trim().to_string())
}

#[test]
fn injected_files_templates_secrets_and_a_home_snapshot_applied_once() {
    let l = Laptop::new();
    let d = l.dir.path();
    let (home, root, secrets) = (d.join("home"), d.join("root"), d.join("secrets"));
    for dir in [&home, &secrets, &root.join("etc")] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(secrets.join("api-token"), "s3cr3t").unwrap();
    std::fs::write(root.join("etc/kept"), "old\n").unwrap();
    std::fs::write(root.join("etc/replaced"), "old\n").unwrap();
    let snap_src = d.join("snap");
    std::fs::create_dir_all(snap_src.join("dot")).unwrap();
    std::fs::write(snap_src.join("dot/snap.txt"), "from the snapshot\n").unwrap();
    let tar = d.join("home.tar");
    let out = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&snap_src)
        .arg("dot")
        .output()
        .unwrap();
    assert!(out.status.success());
    let def = d.join("files.yaml");
    std::fs::write(
        &def,
        format!(
            r#"workspaces:
- name: dev
  home_snapshot: {tar}
  system:
    files:
    - path: ~/.config/app/app.conf
      mode: '0600'
      template: |
        home={{{{env "$HOME"}}}} token={{{{secret "api-token"}}}}
    - path: /etc/kept
      content: new
    - path: /etc/replaced
      content: new
      overwrite: true
"#,
            tar = tar.display()
        ),
    )
    .unwrap();
    let secrets_arg = secrets.display().to_string();
    let listen = free_port();
    let start = || start_agent(d, &home, &root, &def, &["--secrets", &secrets_arg], &listen);
    let (child, pairing) = start();
    let mut agent = KillOnDrop(child);
    l.ok(&["sandbox", "add", "files/dev", &pairing]);
    wait_state(&l, "files/dev", "Ready", Duration::from_secs(30));
    use std::os::unix::fs::PermissionsExt;
    let conf = home.join(".config/app/app.conf");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        format!("home={} token=s3cr3t\n", home.display())
    );
    assert_eq!(
        std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/kept")).unwrap(),
        "old\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/replaced")).unwrap(),
        "new"
    );
    assert_eq!(
        std::fs::read_to_string(home.join("dot/snap.txt")).unwrap(),
        "from the snapshot\n"
    );

    // Another start: injection runs again (overwrite decides), the snapshot does not.
    std::fs::write(home.join("dot/snap.txt"), "edited\n").unwrap();
    std::fs::write(root.join("etc/replaced"), "edited\n").unwrap();
    drop(agent);
    let (child, _) = start();
    agent = KillOnDrop(child);
    let s = wait_state(&l, "files/dev", "Ready", Duration::from_secs(30));
    let steps = s["steps_done"].to_string();
    assert!(
        steps.contains("inject-files: ok") && !steps.contains("home-snapshot"),
        "{steps}"
    );
    assert_eq!(
        std::fs::read_to_string(home.join("dot/snap.txt")).unwrap(),
        "edited\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/replaced")).unwrap(),
        "new"
    );
    drop(agent);

    // A template naming a secret that does not exist fails the step, naming it.
    std::fs::remove_file(secrets.join("api-token")).unwrap();
    std::fs::remove_file(&conf).unwrap();
    let (child, _) = start();
    let _agent = KillOnDrop(child);
    let s = wait_state(&l, "files/dev", "Problematic", Duration::from_secs(30));
    assert_eq!(s["step"], "inject-files");
    assert!(
        s["why"]
            .as_str()
            .unwrap()
            .contains("{{secret \"api-token\"}}: no such secret"),
        "{s}"
    );
}

/// Ends a child (SIGTERM, as a service manager would) and reaps it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}
