//! Benchmark of `cs ssh` against OpenSSH on this machine, side by side in one run, so that the
//! figures quoted in the README can be reproduced by anyone with one command:
//!
//! `cargo run --release -p cs-tests --bin bench [-- --runs N --bytes N --bytes-runs N --quick]`
//!
//! It times a warm `cs ssh -- true` against `ssh 127.0.0.1 true` over a new connection and over
//! a ControlMaster, and the throughput of `cat > /dev/null` fed zeros through each. It prints
//! medians, 10th/90th percentiles and ratios as a Markdown table on stdout (progress goes to
//! stderr). Nothing is asserted. Everything runs on 127.0.0.1 against a private `sshd` and a
//! private `$CS_HOME` in a temporary directory that is removed at the end; every child process
//! runs under a time limit, so every loop is bounded.

use std::io::Write as _;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use cs_tests::benchkit::{
    cell_error, check_interrupted, cs_binaries, ensure_openssh, first_line,
    install_signal_handlers, invocation, machine_line, ms, number_arg, quantile, ratio,
    run_captured, size, wait_bounded, CsHome, Sshd, SHORT,
};

const USAGE: &str = "usage: bench [--runs N] [--bytes N] [--bytes-runs N] [--quick]
  --runs N        latency samples per row (default 30)
  --bytes N       bytes piped per throughput sample (default 1073741824 = 1 GiB)
  --bytes-runs N  throughput samples per row (default 3)
  --quick         --runs 5 --bytes 104857600 (later options still override)";

/// The workspace every `cs ssh` goes to.
const WS: &str = "bench/dev";
struct Opts {
    runs: usize,
    bytes_runs: usize,
    bytes: u64,
}

fn opts() -> anyhow::Result<Option<Opts>> {
    let mut o = Opts {
        runs: 30,
        bytes_runs: 3,
        bytes: 1 << 30,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| number_arg(&mut args, name, USAGE);
        match a.as_str() {
            "--runs" => o.runs = num("--runs")?.clamp(1, 10_000) as usize,
            "--bytes" => o.bytes = num("--bytes")?.clamp(1, 1 << 40),
            "--bytes-runs" => o.bytes_runs = num("--bytes-runs")?.clamp(1, 100) as usize,
            "--quick" => {
                o.runs = 5;
                o.bytes = 100 << 20;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown option '{other}'\n{USAGE}"),
        }
    }
    Ok(Some(o))
}

// ---------------------------------------------------------------------------------------------
// What is measured.

/// Wall time of `cmd` from spawn to exit, stdin and stdout discarded, stderr shown.
fn time_run(mut cmd: Command, what: &str) -> anyhow::Result<Duration> {
    check_interrupted()?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let st = wait_bounded(child, SHORT, what)?;
    let took = start.elapsed();
    ensure!(st.success(), "{what} failed: {st}");
    Ok(took)
}

static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// Wall time of `cmd` from spawn to exit while a thread writes `bytes` zeros into its stdin.
fn time_pipe(mut cmd: Command, bytes: u64, what: &str) -> anyhow::Result<Duration> {
    check_interrupted()?;
    // At least 5 MB/s, or something is broken.
    let limit = SHORT + Duration::from_secs(bytes / 5_000_000);
    cmd.stdin(Stdio::piped()).stdout(Stdio::null());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let mut stdin = child.stdin.take().context("child stdin")?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(ZEROS.len() as u64) as usize;
            stdin.write_all(&ZEROS[..n])?;
            left -= n as u64;
        }
        Ok(()) // dropping stdin closes it: EOF for cat
    });
    let st = wait_bounded(child, limit, what)?;
    let took = start.elapsed();
    let wrote = writer
        .join()
        .map_err(|_| anyhow::anyhow!("stdin writer panicked"))?;
    ensure!(st.success(), "{what} failed: {st}");
    wrote.with_context(|| format!("writing stdin of {what}"))?;
    Ok(took)
}

// ---------------------------------------------------------------------------------------------
// cs.

fn cs_ssh(cs: &CsHome, remote: &str) -> Command {
    cs.cmd(&["ssh", "-W", WS, "--", remote])
}

/// Creates the local sandbox `bench` and warms the daemon's connection to it.
fn cs_setup(cs: &mut CsHome) -> anyhow::Result<()> {
    let said = cs.create_local("bench")?;
    eprint!("bench: cs sandbox create bench --local: {said}");
    if !said.ends_with('\n') {
        eprintln!();
    }
    let start = Instant::now();
    run_captured(
        &mut cs_ssh(cs, "true"),
        &cs.scratch,
        SHORT,
        "cs ssh -W bench/dev -- true",
    )?;
    eprintln!(
        "bench: warmed the daemon's connection ({:.0} ms)",
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Figures.

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Cs,
    Fresh,
    Master,
}

/// One table row: a command and its samples (ms for latency, MB/s for throughput).
struct Row {
    name: String,
    kind: Kind,
    samples: Vec<f64>,
    error: Option<String>,
}

impl Row {
    fn new(name: String, kind: Kind) -> Self {
        Self {
            name,
            kind,
            samples: Vec::new(),
            error: None,
        }
    }

    /// Adds a sample; after the first failure the row is reported as failed and skipped.
    fn sample(&mut self, f: impl FnOnce() -> anyhow::Result<f64>) -> anyhow::Result<()> {
        if self.error.is_some() {
            return Ok(());
        }
        match f() {
            Ok(v) => self.samples.push(v),
            Err(e) => {
                check_interrupted()?;
                eprintln!("bench: {}: {e:#}", self.name);
                self.error = Some(format!("{e:#}"));
            }
        }
        Ok(())
    }

    /// Median, p10 and p90.
    fn stats(&self) -> Option<(f64, f64, f64)> {
        if self.error.is_some() || self.samples.is_empty() {
            return None;
        }
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        Some((quantile(&s, 0.5), quantile(&s, 0.1), quantile(&s, 0.9)))
    }
}

fn mbs(v: f64) -> String {
    format!("{v:.0} MB/s")
}

/// Prints rows as Markdown table lines; `latency` words the ratio as slower/faster, else as a
/// fraction of cs's throughput.
fn print_rows(rows: &[Row], fmt: fn(f64) -> String, latency: bool) {
    let base = rows
        .iter()
        .find(|r| r.kind == Kind::Cs)
        .and_then(Row::stats)
        .map(|s| s.0);
    for r in rows {
        let Some((med, p10, p90)) = r.stats() else {
            let why = cell_error(r.error.as_deref().unwrap_or("no samples"));
            println!("| {} | failed: {why} | | | |", r.name);
            continue;
        };
        let vs = match (r.kind, base) {
            (Kind::Cs, _) => "1.0x (baseline)".to_string(),
            (_, None) => "n/a".to_string(),
            (_, Some(b)) if latency && med >= b => format!("{}x slower", ratio(med / b)),
            (_, Some(b)) if latency => format!("{}x faster", ratio(b / med)),
            (_, Some(b)) => format!("{:.2}x of cs", med / b),
        };
        println!(
            "| {} | {} | {} | {} | {vs} |",
            r.name,
            fmt(med),
            fmt(p10),
            fmt(p90)
        );
    }
}

// ---------------------------------------------------------------------------------------------

/// Everything the run set up, torn down in field order: sshd, then cs, then the directory.
struct Bench {
    sshd: Option<Sshd>,
    cs: Option<CsHome>,
    tmp: tempfile::TempDir,
}

fn run(o: &Opts) -> anyhow::Result<bool> {
    let command = invocation();

    ensure_openssh()?;
    let cs_bin = cs_binaries()?;
    let tmp = tempfile::Builder::new()
        .prefix("cs-bench-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    eprintln!("bench: working in {}", tmp.path().display());
    let mut b = Bench {
        sshd: None,
        cs: None,
        tmp,
    };

    // cs first: if it does not work, the OpenSSH rows are still measured and the error shown.
    let mut cs = CsHome::new(cs_bin, b.tmp.path())?;
    let cs_error = cs_setup(&mut cs).err();
    b.cs = Some(cs);
    if let Some(e) = &cs_error {
        check_interrupted()?;
        eprintln!("bench: cs does not work; measuring OpenSSH only. The error:\n{e:#}");
    }

    let mut sshd = Sshd::start(&b.tmp.path().join("sshd"))?;
    eprintln!("bench: sshd listening on 127.0.0.1:{}", sshd.port);
    run_captured(
        &mut sshd.ssh(false, &[], Some("true")),
        &sshd.dir,
        SHORT,
        "ssh 127.0.0.1 true",
    )
    .context("ssh to the private sshd failed")?;
    sshd.ensure_master()?;
    run_captured(
        &mut sshd.ssh(true, &[], Some("true")),
        &sshd.dir,
        SHORT,
        "ssh (ControlMaster) true",
    )?;
    b.sshd = Some(sshd);
    let (Some(sshd), Some(cs)) = (b.sshd.as_mut(), b.cs.as_ref()) else {
        unreachable!("both set above")
    };

    let mut lat = [
        Row::new(
            format!("`cs ssh -W {WS} -- true` (warm connection)"),
            Kind::Cs,
        ),
        Row::new(
            "`ssh 127.0.0.1 true` (new connection each time)".into(),
            Kind::Fresh,
        ),
        Row::new("`ssh 127.0.0.1 true` (ControlMaster)".into(), Kind::Master),
    ];
    let cat = "cat > /dev/null";
    let mut thr = [
        Row::new(
            format!("`cs ssh -W {WS} -- '{cat}'` ({})", size(o.bytes)),
            Kind::Cs,
        ),
        Row::new(
            format!(
                "`ssh 127.0.0.1 '{cat}'` ({}, new connection)",
                size(o.bytes)
            ),
            Kind::Fresh,
        ),
        Row::new(
            format!("`ssh 127.0.0.1 '{cat}'` ({}, ControlMaster)", size(o.bytes)),
            Kind::Master,
        ),
    ];
    if let Some(e) = &cs_error {
        lat[0].error = Some(format!("{e:#}"));
        thr[0].error = Some(format!("{e:#}"));
    }

    // Rows interleaved, so that drift in machine load touches every row alike.
    eprintln!("bench: latency, {} runs of each", o.runs);
    for i in 0..o.runs {
        for r in lat.iter_mut() {
            let kind = r.kind;
            if kind == Kind::Master {
                sshd.ensure_master()?;
            }
            r.sample(|| {
                let cmd = match kind {
                    Kind::Cs => cs_ssh(cs, "true"),
                    Kind::Fresh => sshd.ssh(false, &[], Some("true")),
                    Kind::Master => sshd.ssh(true, &[], Some("true")),
                };
                Ok(time_run(cmd, "the command")?.as_secs_f64() * 1e3)
            })?;
        }
        if (i + 1) % 10 == 0 {
            eprintln!("bench:   {}/{}", i + 1, o.runs);
        }
    }
    eprintln!(
        "bench: throughput, {} runs of {} through each",
        o.bytes_runs,
        size(o.bytes)
    );
    let mb = o.bytes as f64 / 1e6;
    for i in 0..o.bytes_runs {
        for r in thr.iter_mut() {
            let kind = r.kind;
            if kind == Kind::Master {
                sshd.ensure_master()?;
            }
            r.sample(|| {
                let cmd = match kind {
                    Kind::Cs => cs_ssh(cs, cat),
                    Kind::Fresh => sshd.ssh(false, &[], Some(cat)),
                    Kind::Master => sshd.ssh(true, &[], Some(cat)),
                };
                Ok(mb / time_pipe(cmd, o.bytes, "the command")?.as_secs_f64())
            })?;
        }
        eprintln!("bench:   {}/{}", i + 1, o.bytes_runs);
    }

    let ssh_v = first_line(Command::new("ssh").arg("-V"), true);
    println!();
    println!("# cs ssh vs OpenSSH on 127.0.0.1");
    println!();
    println!("{}", machine_line(&[ssh_v]));
    println!(
        "Command: `{command}`. Latency: N={} per row; throughput: {} of zeros, N={} per row \
         (MB = 10^6 bytes); rows interleaved.",
        o.runs,
        size(o.bytes),
        o.bytes_runs
    );
    println!("Both sides run the command with the user's shell in an empty HOME (no dotfiles).");
    println!();
    println!("| what | median | p10 | p90 | vs cs |");
    println!("|---|--:|--:|--:|---|");
    print_rows(&lat, ms, true);
    print_rows(&thr, mbs, false);
    let ok = lat.iter().chain(&thr).all(|r| r.error.is_none());
    drop(b);
    Ok(ok)
}

fn main() -> ExitCode {
    let o = match opts() {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    install_signal_handlers();
    match run(&o) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("bench: some rows failed (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
