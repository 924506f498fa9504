//! Benchmark of workspace automation: the agent's own overhead on a start sequence, and the
//! latency from a daemon writing a line to `cs logs -f` printing it, against `tail -F` of the
//! same log file over OpenSSH (and locally, the floor), in one run:
//!
//! `cargo run --release -p cs-tests --bin autobench [-- --runs N --lines N]`
//!
//! Start sequence: a local sandbox from a definition with injected setup scripts, a global
//! daemon, one checkout (a bare repository on this machine) with post-checkout and build hooks,
//! five daemons and a job. From spawning `cs sandbox create` to the last daemon's start (the
//! agent's own note in its log, stamped to the millisecond), minus the time the user's programs
//! took (each step's start and end notes): that rest is the agent's overhead, agent start-up
//! included. The same programs run one after another by `sh` are shown for scale. Targets:
//! overhead under 100 ms, log latency under 20 ms. Nothing is asserted; figures go to stdout
//! as Markdown, progress to stderr. Everything runs on 127.0.0.1 under time limits.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};
use cs_tests::benchkit::{
    check_interrupted, cs_binaries, ensure_openssh, first_line, install_signal_handlers,
    invocation, machine_line, ms, number_arg, quantile, run_captured, CsHome, Sshd, SHORT,
};

const USAGE: &str = "usage: autobench [--runs N] [--lines N]
  --runs N   start sequences timed (default 10)
  --lines N  log lines timed per follower (default 300)";

struct Opts {
    runs: usize,
    lines: usize,
}

fn opts() -> anyhow::Result<Option<Opts>> {
    let mut o = Opts {
        runs: 10,
        lines: 300,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| number_arg(&mut args, name, USAGE);
        match a.as_str() {
            "--runs" => o.runs = num("--runs")?.clamp(1, 1_000) as usize,
            "--lines" => o.lines = num("--lines")?.clamp(20, 100_000) as usize,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown option '{other}'\n{USAGE}"),
        }
    }
    Ok(Some(o))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("git")
        .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"])
        .args(args)
        .current_dir(dir)
        .output()
        .context("git")?;
    ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

const MANIFEST: &str = "hooks:
  post-checkout:
    cmd: 'true'
  build:
    cmd: 'true'
daemons:
  d1: {run: {cmd: exec sleep 1000}}
  d2: {run: {cmd: exec sleep 1000}}
  d3: {run: {cmd: exec sleep 1000}}
  d4: {run: {cmd: exec sleep 1000}}
  d5: {run: {cmd: exec sleep 1000}}
  ticker: {run: {cmd: 'while :; do date +%s%N; sleep 0.02; done'}}
jobs:
  nightly: {run: {cmd: 'true'}, schedule: '0 3 * * *'}
";

/// The bench's repository and definition.
fn prepare(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let work = dir.join("app");
    std::fs::create_dir_all(work.join(".sandbox"))?;
    std::fs::write(work.join(".sandbox/manifest.yaml"), MANIFEST)?;
    git(&work, &["init", "-q", "-b", "main"])?;
    git(&work, &["add", "-A"])?;
    git(&work, &["commit", "-q", "-m", "bench"])?;
    let bare = dir.join("app.git");
    git(
        dir,
        &[
            "clone",
            "-q",
            "--bare",
            "app",
            bare.to_str().context("path")?,
        ],
    )?;
    let def = dir.join("bench.yaml");
    std::fs::write(
        &def,
        format!(
            r##"workspaces:
- name: dev
  system:
    files:
    - {{path: /etc/sandbox.d/setup, mode: '0755', content: "#!/bin/sh\ntrue\n"}}
    - {{path: /etc/sandbox.d/post-setup, mode: '0755', content: "#!/bin/sh\ntrue\n"}}
    - {{path: ~/.sandbox/setup, mode: '0755', content: "#!/bin/sh\ntrue\n"}}
    daemons:
    - name: global
      run: {{cmd: exec sleep 1000}}
  checkouts:
  - path: app
    repo: {{git: "{}"}}
    version_spec: main
"##,
            bare.display()
        ),
    )?;
    Ok(def)
}

/// A log's records as (unix_ms, text).
fn log(cs: &CsHome, ws: &str, name: &str) -> anyhow::Result<Vec<(u64, String)>> {
    let (out, _) = cs.run(&["logs", "-W", ws, name, "-n", "1000", "--stamps"], SHORT)?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            let _seq = it.next()?;
            let ms = it.next()?.parse().ok()?;
            Some((ms, it.next().unwrap_or("").to_string()))
        })
        .collect())
}

/// (first start note, first end note) of a program's log.
fn span(recs: &[(u64, String)]) -> (Option<u64>, Option<u64>) {
    let start = recs
        .iter()
        .find(|r| r.1.starts_with("[cs-agent] started pid"))
        .map(|r| r.0);
    let end = recs
        .iter()
        .find(|r| r.1.starts_with("[cs-agent] pid") && r.1.contains("ended"))
        .map(|r| r.0);
    (start, end)
}

struct Sample {
    total_ms: f64,
    user_ms: f64,
}

/// One start sequence: create the sandbox, wait for Ready, read the logs, delete it.
fn start_sequence(cs: &mut CsHome, def: &Path, i: usize) -> anyhow::Result<Sample> {
    check_interrupted()?;
    let name = format!("seq{i}");
    let ws = format!("{name}/dev");
    let t0 = unix_ms();
    cs.run(
        &[
            "sandbox",
            "create",
            &name,
            "--local",
            "-f",
            def.to_str().context("path")?,
        ],
        SHORT,
    )?;
    let deadline = Instant::now() + SHORT;
    loop {
        // Progressing exits 3 and Problematic 1; only stdout matters here.
        let out = cs
            .cmd(&["status", "-W", &ws])
            .stderr(Stdio::null())
            .output()?;
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.starts_with("Ready") {
            break;
        }
        ensure!(Instant::now() < deadline, "{ws} not Ready: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let steps = [
        "setup",
        "user-setup",
        "checkout:app",
        "post-checkout:app",
        "build:app",
    ];
    let mut user = 0u64;
    for s in steps {
        let recs = log(cs, &ws, s)?;
        match span(&recs) {
            (Some(a), Some(b)) => user += b - a,
            _ => bail!("{s}: no start and end in its log: {recs:?}"),
        }
    }
    let mut last_daemon = 0u64;
    for d in ["global", "d1", "d2", "d3", "d4", "d5", "ticker"] {
        let recs = log(cs, &ws, d)?;
        let (Some(start), _) = span(&recs) else {
            bail!("{d} never started: {recs:?}");
        };
        last_daemon = last_daemon.max(start);
    }
    cs.run(&["sandbox", "delete", &name], SHORT)?;
    Ok(Sample {
        total_ms: last_daemon.saturating_sub(t0) as f64,
        user_ms: user as f64,
    })
}

/// The same programs, one after another, by `sh`: the floor for comparison.
fn sh_sequence(dir: &Path, bare: &Path) -> anyhow::Result<f64> {
    let dest = dir.join("sh-clone");
    let _ = std::fs::remove_dir_all(&dest);
    let script = format!(
        "true; true; git clone -q --branch main {} {}; cd {}; true; true; \
         p=; for i in 1 2 3 4 5 6 7; do sleep 1000 & p=\"$p $!\"; done; kill $p",
        bare.display(),
        dest.display(),
        dest.display()
    );
    let start = Instant::now();
    run_captured(
        Command::new("sh").arg("-c").arg(&script),
        dir,
        SHORT,
        "sh sequence",
    )?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// Latencies (ms) of lines `date +%s%N` wrote, as a follower printed them.
fn follow_latency(mut cmd: Command, lines: usize, what: &str) -> anyhow::Result<Vec<f64>> {
    check_interrupted()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let out = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let now = unix_ns();
            if tx.send((now, line)).is_err() {
                break;
            }
        }
    });
    let mut lat = Vec::new();
    let deadline = Instant::now() + SHORT;
    let mut seen = 0usize;
    while lat.len() < lines {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((now, line)) = rx.recv_timeout(left) else {
            let _ = child.kill();
            bail!("{what}: only {} lines in {:?}", lat.len(), SHORT);
        };
        // The written time is the last word (the log file's lines carry SEQ and MILLIS first).
        let Some(written) = line
            .split_whitespace()
            .last()
            .and_then(|w| w.parse::<u128>().ok())
        else {
            continue;
        };
        seen += 1;
        // The first lines may be old (a backlog); skip the warm-up.
        if seen > 10 {
            lat.push(now.saturating_sub(written) as f64 / 1e6);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    Ok(lat)
}

fn row(what: &str, mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "| {what} | {} | {} | {} | {} |",
        ms(quantile(&v, 0.5)),
        ms(quantile(&v, 0.95)),
        ms(quantile(&v, 0.99)),
        ms(*v.last().unwrap_or(&0.0))
    )
}

fn run(o: Opts) -> anyhow::Result<()> {
    let bins = cs_binaries()?;
    let tmp = tempfile::Builder::new().prefix("cs-autobench-").tempdir()?;
    let def = prepare(tmp.path())?;
    let mut cs = CsHome::new(bins, tmp.path())?;

    eprintln!("autobench: {} start sequences", o.runs);
    let mut seqs = Vec::new();
    let mut shs = Vec::new();
    for i in 0..o.runs {
        let s = start_sequence(&mut cs, &def, i)?;
        eprintln!(
            "autobench:   run {}: {:.0} ms to all daemons, {:.0} ms in the user's programs",
            i + 1,
            s.total_ms,
            s.user_ms
        );
        seqs.push(s);
        shs.push(sh_sequence(tmp.path(), &tmp.path().join("app.git"))?);
    }

    eprintln!("autobench: log latency, {} lines per follower", o.lines);
    cs.run(
        &[
            "sandbox",
            "create",
            "logs",
            "--local",
            "-f",
            def.to_str().context("path")?,
        ],
        SHORT,
    )?;
    let ws = "logs/dev";
    let deadline = Instant::now() + SHORT;
    while !cs
        .run(&["status", "-W", ws], SHORT)
        .is_ok_and(|(o, _)| o.starts_with("Ready"))
    {
        check_interrupted()?;
        ensure!(Instant::now() < deadline, "{ws} not Ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let logfile = cs
        .home
        .join("local/logs/dev/root/var/log/sandbox/ticker.log");
    let cs_lat = follow_latency(
        cs.cmd(&["logs", "-W", ws, "ticker", "-f", "-n", "0"]),
        o.lines,
        "cs logs -f",
    )?;
    let mut tail = Command::new("tail");
    tail.args(["-n", "0", "-F"]).arg(&logfile);
    let tail_lat = follow_latency(tail, o.lines, "tail -F")?;
    ensure_openssh()?;
    let sshd = Sshd::start(&tmp.path().join("sshd"))?;
    let remote = format!("tail -n 0 -F {}", logfile.display());
    let ssh_lat = follow_latency(sshd.ssh(false, &[], Some(&remote)), o.lines, "ssh tail -F")?;

    let total: Vec<f64> = seqs.iter().map(|s| s.total_ms).collect();
    let user: Vec<f64> = seqs.iter().map(|s| s.user_ms).collect();
    let over: Vec<f64> = seqs.iter().map(|s| s.total_ms - s.user_ms).collect();
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        quantile(&v, 0.5)
    };
    let ssh_v = first_line(Command::new("ssh").arg("-V"), true);
    println!();
    println!("# Workspace automation");
    println!();
    println!("{}", machine_line(&[ssh_v]));
    println!("Command: `{}`.", invocation());
    println!();
    println!(
        "Start sequence (3 setup scripts, a global daemon, a checkout of a local repository, 2 \
         hooks, 6 daemons, a job), N={}: medians.",
        o.runs
    );
    println!();
    println!("| what | median | min | max |");
    println!("|---|---|---|---|");
    let mm = |v: &[f64]| {
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        )
    };
    for (what, v) in [
        ("`cs sandbox create` to the last daemon started", &total),
        (
            "of which the user's programs (setup scripts, git clone, hooks)",
            &user,
        ),
        ("**the agent's overhead** (target < 100 ms)", &over),
        ("the same programs run one after another by `sh`", &shs),
    ] {
        let (lo, hi) = mm(v);
        println!("| {what} | {} | {} | {} |", ms(med(v)), ms(lo), ms(hi));
    }
    println!();
    println!(
        "Log latency: a daemon writes `date +%s%N` every 20 ms; the time from that stamp to a \
         follower printing the line, N={} per row.",
        o.lines - 10
    );
    println!();
    println!("| follower | p50 | p95 | p99 | max |");
    println!("|---|---|---|---|---|");
    println!("{}", row("`cs logs -f` (target p50 < 20 ms)", cs_lat));
    println!(
        "{}",
        row("`ssh 127.0.0.1 tail -F` of the same log file", ssh_lat)
    );
    println!(
        "{}",
        row("`tail -F` of the log file, locally (the floor)", tail_lat)
    );
    drop(sshd);
    for e in cs.cleanup() {
        eprintln!("autobench: cleanup: {e}");
    }
    Ok(())
}

fn main() -> ExitCode {
    install_signal_handlers();
    let o = match opts() {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("autobench: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("autobench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
