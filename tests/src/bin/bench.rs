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

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd as _;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};

const USAGE: &str = "usage: bench [--runs N] [--bytes N] [--bytes-runs N] [--quick]
  --runs N        latency samples per row (default 30)
  --bytes N       bytes piped per throughput sample (default 1073741824 = 1 GiB)
  --bytes-runs N  throughput samples per row (default 3)
  --quick         --runs 5 --bytes 104857600 (later options still override)";

/// The workspace every `cs ssh` goes to.
const WS: &str = "bench/dev";
/// Limit of one latency sample or setup command.
const SHORT: Duration = Duration::from_secs(60);

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
        let mut num = |name: &str| -> anyhow::Result<u64> {
            let v = args
                .next()
                .with_context(|| format!("{name} needs a number\n{USAGE}"))?;
            v.parse()
                .with_context(|| format!("invalid {name} '{v}': expected a whole number"))
        };
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
// Interruption and time limits.

/// Set by SIGINT, SIGTERM or SIGHUP: the run stops and cleans up instead of dying on the spot.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, handler);
        }
    }
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// The child being waited for, and when it must be killed.
struct Armed {
    pid: libc::pid_t,
    deadline: Instant,
}

/// A thread that kills the child being waited for when it overruns its limit or the run is
/// interrupted. Waiting itself stays a plain blocking wait, so samples carry no polling delay.
struct Watchdog {
    armed: Mutex<Option<Armed>>,
    wake: Condvar,
}

fn watchdog() -> &'static Watchdog {
    static W: OnceLock<&'static Watchdog> = OnceLock::new();
    W.get_or_init(|| {
        let w: &'static Watchdog = Box::leak(Box::new(Watchdog {
            armed: Mutex::new(None),
            wake: Condvar::new(),
        }));
        std::thread::spawn(move || {
            let mut armed = w.armed.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                let mut nap = Duration::from_millis(100);
                if let Some(a) = armed.as_ref() {
                    let now = Instant::now();
                    if now >= a.deadline || INTERRUPTED.load(Ordering::SeqCst) {
                        // SAFETY: plain syscall. The pid cannot have been reused: the waiter
                        // disarms under this lock before it reaps the child.
                        unsafe {
                            libc::kill(a.pid, libc::SIGKILL);
                        }
                        *armed = None;
                        continue;
                    }
                    nap = nap.min(a.deadline - now);
                }
                armed = w
                    .wake
                    .wait_timeout(armed, nap)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        });
        w
    })
}

/// Waits for `child`, killing it if it runs longer than `limit` (from now) or the run is
/// interrupted.
fn wait_bounded(mut child: Child, limit: Duration, what: &str) -> anyhow::Result<ExitStatus> {
    let w = watchdog();
    let pid = child.id() as libc::pid_t;
    let start = Instant::now();
    *w.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Armed {
        pid,
        deadline: start + limit,
    });
    w.wake.notify_one();
    // Wait for the exit without reaping, so that the pid stays ours until disarmed.
    loop {
        // SAFETY: siginfo_t is plain data; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: plain syscall on our own child with a valid out-pointer.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            break; // child.wait() below reports the problem
        }
    }
    *w.armed.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let st = child
        .wait()
        .with_context(|| format!("waiting for {what}"))?;
    check_interrupted()?;
    if !st.success() && start.elapsed() >= limit {
        bail!("{what} did not finish within {limit:?} and was killed");
    }
    Ok(st)
}

/// Our stderr as a child's stdout: tool chatter must not end up in the table on stdout.
fn to_stderr() -> Stdio {
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// Runs a setup command to completion with its output in files (a daemon it starts may keep
/// a pipe open forever) and returns stdout and stderr; a failure carries both, verbatim.
fn run_captured(
    cmd: &mut Command,
    scratch: &Path,
    limit: Duration,
    what: &str,
) -> anyhow::Result<(String, String)> {
    let out_path = scratch.join("out.txt");
    let err_path = scratch.join("err.txt");
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let st = wait_bounded(child, limit, what)?;
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    if !st.success() {
        bail!("`{what}` failed ({st}):\n{out}{err}");
    }
    Ok((out, err))
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

/// The built `cs` and `cs-agent` next to this executable (target/<profile>/), building them
/// first when they are missing or when run by cargo (a no-op when they are up to date, and it
/// keeps `cargo run --bin bench` from measuring a stale `cs`).
fn cs_binaries() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate this executable")?;
    let dir = exe
        .parent()
        .context("executable without a directory")?
        .to_path_buf();
    let cs = dir.join("cs");
    let present = cs.is_file() && dir.join("cs-agent").is_file();
    let under_cargo = std::env::var_os("CARGO").is_some();
    if present && !under_cargo {
        return Ok(cs);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["-p", "cs-cli", "-p", "cs-agent"]);
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    // `cargo run` hands the package's own variables to us; build scripts that track them
    // (ring's does) would see a change and rebuild half the tree.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let per_run = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_BIN_",
            "CARGO_CRATE_",
            "CARGO_PRIMARY_PACKAGE",
        ];
        if per_run.iter().any(|p| k.starts_with(p)) || k == "CARGO" || k == "OUT_DIR" {
            cmd.env_remove(&k);
        }
    }
    eprintln!("bench: building cs and cs-agent: {}", show_cmd(&cmd));
    cmd.stdin(Stdio::null()).stdout(to_stderr());
    let built = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", Path::new(&cargo).display()))
        .and_then(|c| wait_bounded(c, Duration::from_secs(3600), "cargo build"));
    match built {
        Ok(st) if st.success() => {}
        Ok(st) if present => {
            eprintln!("bench: warning: cargo build failed ({st}); using the existing binaries")
        }
        Ok(st) => bail!("building cs and cs-agent failed: {st}"),
        Err(e) => return Err(e),
    }
    ensure!(
        present || (cs.is_file() && dir.join("cs-agent").is_file()),
        "no cs or cs-agent in {} after building",
        dir.display()
    );
    Ok(cs)
}

/// A private `$CS_HOME` with the local sandbox `bench`; deleted with it.
struct Cs {
    bin: PathBuf,
    home: PathBuf,
    scratch: PathBuf,
    created: bool,
}

impl Cs {
    fn cmd<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).env("CS_HOME", &self.home).env_remove("CS_LOG");
        c
    }

    fn ssh(&self, remote: &str) -> Command {
        self.cmd(&["ssh", "-W", WS, "--", remote])
    }

    fn setup(&mut self) -> anyhow::Result<()> {
        let (out, err) = run_captured(
            &mut self.cmd(&["sandbox", "create", "bench", "--local"]),
            &self.scratch,
            SHORT,
            "cs sandbox create bench --local",
        )?;
        self.created = true;
        eprint!("bench: cs sandbox create bench --local: {out}{err}");
        if !out.ends_with('\n') && !err.ends_with('\n') {
            eprintln!();
        }
        let start = Instant::now();
        run_captured(
            &mut self.ssh("true"),
            &self.scratch,
            SHORT,
            "cs ssh -W bench/dev -- true",
        )?;
        eprintln!(
            "bench: warmed the daemon's connection ({:.0} ms)",
            start.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    }
}

impl Drop for Cs {
    fn drop(&mut self) {
        let mut steps: Vec<&[&str]> = vec![&["daemon", "stop"]];
        if self.created {
            steps.insert(0, &["sandbox", "delete", "bench"]);
        }
        for args in steps {
            let what = format!("cs {}", args.join(" "));
            if let Err(e) = run_captured(
                &mut self.cmd(args),
                &self.scratch,
                Duration::from_secs(30),
                &what,
            ) {
                // Without a sandbox, cs never worked: its failure was reported already.
                if self.created {
                    eprintln!("bench: cleanup: {e:#}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// OpenSSH.

fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

fn on_path(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(name).is_file())
}

/// Installs OpenSSH with apt-get when `sshd` or the client is missing (root only).
fn ensure_openssh() -> anyhow::Result<()> {
    if Path::new("/usr/sbin/sshd").is_file() && on_path("ssh") && on_path("ssh-keygen") {
        return Ok(());
    }
    if !is_root() || !on_path("apt-get") {
        bail!(
            "OpenSSH is missing (/usr/sbin/sshd, ssh, ssh-keygen): install it, e.g. \
             `sudo apt-get install -y openssh-server openssh-client`"
        );
    }
    for args in [
        &["update"][..],
        &["install", "-y", "openssh-server", "openssh-client"],
    ] {
        eprintln!(
            "bench: OpenSSH is missing; running: apt-get {}",
            args.join(" ")
        );
        let mut cmd = Command::new("apt-get");
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(to_stderr());
        let st = wait_bounded(
            cmd.spawn().context("cannot run apt-get")?,
            Duration::from_secs(1800),
            "apt-get",
        )?;
        ensure!(st.success(), "apt-get {} failed: {st}", args.join(" "));
    }
    ensure!(
        Path::new("/usr/sbin/sshd").is_file() && on_path("ssh") && on_path("ssh-keygen"),
        "apt-get installed OpenSSH, but /usr/sbin/sshd, or ssh or ssh-keygen on PATH, is missing"
    );
    Ok(())
}

/// A private `sshd -D` on 127.0.0.1 with key authentication, and an optional ControlMaster.
struct Sshd {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    key: PathBuf,
    master: bool,
}

impl Sshd {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let host_key = dir.join("host_key");
        let key = dir.join("user_key");
        for k in [&host_key, &key] {
            let mut cmd = Command::new("ssh-keygen");
            cmd.args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(k);
            run_captured(&mut cmd, dir, SHORT, "ssh-keygen")?;
        }
        std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys"))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.join("sshd_config");
        let root = is_root();
        // Sessions get an empty HOME, as cs workspaces do: the shell that runs the command
        // (bash sources ~/.bashrc under sshd) must not time the user's dotfiles.
        let home = dir.join("home");
        std::fs::create_dir_all(&home)?;
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey \"{hk}\"\nPidFile \"{d}/sshd.pid\"\n\
                 AuthorizedKeysFile \"{d}/authorized_keys\"\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n{prl}LogLevel ERROR\n\
                 PermitUserRC no\nSetEnv \"HOME={home}\"\nMaxStartups 100\nMaxSessions 100\n",
                hk = host_key.display(),
                d = dir.display(),
                home = home.display(),
                prl = if root { "PermitRootLogin yes\n" } else { "" },
            ),
        )?;
        if root && !Path::new("/run/sshd").is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create("/run/sshd")
                .context("cannot create /run/sshd")?;
        }
        let sshd = "/usr/sbin/sshd";
        run_captured(
            Command::new(sshd).arg("-t").arg("-f").arg(&config),
            dir,
            SHORT,
            "sshd -t (config check)",
        )?;
        let log = dir.join("sshd.log");
        let child = Command::new(sshd)
            .arg("-D")
            .arg("-f")
            .arg(&config)
            .arg("-E")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(to_stderr())
            .spawn()
            .context("cannot start sshd")?;
        let mut s = Self {
            child: Some(child),
            port,
            dir: dir.to_path_buf(),
            key,
            master: false,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let start = Instant::now();
        loop {
            check_interrupted()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            let exited = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || start.elapsed() > Duration::from_secs(10) {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!(
                    "sshd did not listen on 127.0.0.1:{port} ({exited:?}); {}:\n{text}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }

    fn control_path(&self) -> String {
        format!("ControlPath={}/cm", self.dir.display())
    }

    /// `ssh` to this server; `mux` goes through the ControlMaster.
    fn ssh(&self, mux: bool, extra: &[&str], remote: Option<&str>) -> Command {
        let mut c = Command::new("ssh");
        c.args([
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "IdentitiesOnly=yes",
            "-i",
        ])
        .arg(&self.key)
        .args(["-p", &self.port.to_string()])
        .env_remove("SSH_AUTH_SOCK");
        if mux {
            c.args(["-o", &self.control_path()]);
        }
        c.args(extra).arg("127.0.0.1").args(remote);
        c
    }

    /// Makes sure a ControlMaster is up: a mux client whose master is gone would silently
    /// open a new connection and spoil the row.
    fn ensure_master(&mut self) -> anyhow::Result<()> {
        if self.master
            && run_captured(
                &mut self.ssh(true, &["-O", "check"], None),
                &self.dir,
                SHORT,
                "ssh -O check",
            )
            .is_ok()
        {
            return Ok(());
        }
        if self.master {
            eprintln!("bench: the ssh ControlMaster went away; starting a new one");
        }
        let args = ["-o", "ControlMaster=yes", "-o", "ControlPersist=60", "-fN"];
        let what = "ssh -o ControlMaster=yes -o ControlPersist=60 -fN";
        run_captured(&mut self.ssh(true, &args, None), &self.dir, SHORT, what)?;
        self.master = true;
        run_captured(
            &mut self.ssh(true, &["-O", "check"], None),
            &self.dir,
            SHORT,
            "ssh -O check",
        )?;
        Ok(())
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if self.master {
            let _ = run_captured(
                &mut self.ssh(true, &["-O", "exit"], None),
                &self.dir,
                Duration::from_secs(10),
                "ssh -O exit",
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Figures.

/// The value at quantile `q` of sorted samples, interpolating between neighbours.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = (sorted.len() - 1) as f64 * q;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

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

fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.1} ms")
    }
}

fn mbs(v: f64) -> String {
    format!("{v:.0} MB/s")
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    }
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
            let why = r.error.as_deref().unwrap_or("no samples");
            let mut why = why
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .replace('|', "\\|");
            if why.len() > 300 {
                why = format!("{}...", why.chars().take(300).collect::<String>());
            }
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

/// A ratio of at least 1, with two decimals while they matter.
fn ratio(r: f64) -> String {
    if r < 3.0 {
        format!("{r:.2}")
    } else {
        format!("{r:.1}")
    }
}

fn show_cmd(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&shell_quote(&a.to_string_lossy()));
    }
    s
}

fn shell_quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

fn first_line(cmd: &mut Command, stderr: bool) -> String {
    match cmd.stdin(Stdio::null()).output() {
        Ok(o) => String::from_utf8_lossy(if stderr { &o.stderr } else { &o.stdout })
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        Err(_) => "?".to_string(),
    }
}

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".to_string())
}

// ---------------------------------------------------------------------------------------------

/// Everything the run set up, torn down in field order: sshd, then cs, then the directory.
struct Bench {
    sshd: Option<Sshd>,
    cs: Option<Cs>,
    tmp: tempfile::TempDir,
}

impl Drop for Bench {
    fn drop(&mut self) {
        // Runs before the fields are torn down: cleanup commands must not be cut short by the
        // interruption that ended the run (a second Ctrl-C does cut them short).
        INTERRUPTED.store(false, Ordering::SeqCst);
    }
}

fn run(o: &Opts) -> anyhow::Result<bool> {
    let argv: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
    let release =
        std::env::current_exe().is_ok_and(|e| e.parent().is_some_and(|d| d.ends_with("release")));
    let command = if std::env::var_os("CARGO").is_some() {
        format!(
            "cargo run{} -p cs-tests --bin bench{}{}",
            if release { " --release" } else { "" },
            if argv.is_empty() { "" } else { " -- " },
            argv.join(" ")
        )
    } else {
        std::iter::once(std::env::args().next().unwrap_or_default())
            .chain(argv)
            .collect::<Vec<_>>()
            .join(" ")
    };

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
    let scratch = b.tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let mut cs = Cs {
        bin: cs_bin,
        home: b.tmp.path().join("cs-home"),
        scratch,
        created: false,
    };
    let cs_error = cs.setup().err();
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
                    Kind::Cs => cs.ssh("true"),
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
                    Kind::Cs => cs.ssh(cat),
                    Kind::Fresh => sshd.ssh(false, &[], Some(cat)),
                    Kind::Master => sshd.ssh(true, &[], Some(cat)),
                };
                Ok(mb / time_pipe(cmd, o.bytes, "the command")?.as_secs_f64())
            })?;
        }
        eprintln!("bench:   {}/{}", i + 1, o.bytes_runs);
    }

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = first_line(Command::new("uname").arg("-sr"), false);
    let ssh_v = first_line(Command::new("ssh").arg("-V"), true);
    println!();
    println!("# cs ssh vs OpenSSH on 127.0.0.1");
    println!();
    println!(
        "{cores} cores ({}), {kernel}, {ssh_v}, as {}.",
        cpu_model(),
        if is_root() { "root" } else { "a regular user" }
    );
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
