//! What the benchmarks (`bench`, `syncbench`) share: interruption and time limits for child
//! processes, the built `cs` and `cs-agent`, a private `$CS_HOME`, a private OpenSSH server on
//! 127.0.0.1, quantiles and number formats, and the line that describes the machine.
//!
//! Waiting is single-threaded by design: one watchdog thread guards the one child being waited
//! for, so only the benchmark's main thread calls [`wait_bounded`] and [`run_captured`].

use std::ffi::OsStr;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd as _;
use std::os::unix::fs::DirBuilderExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};

/// Limit of one short command: a setup step, or one latency sample.
pub const SHORT: Duration = Duration::from_secs(60);

/// The running benchmark's name (its executable's), which prefixes every progress line.
pub fn tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "bench".into())
    })
}

// ---------------------------------------------------------------------------------------------
// Interruption and time limits.

/// Set by SIGINT, SIGTERM or SIGHUP: the run stops and cleans up instead of dying on the spot.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, handler);
        }
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs a cleanup step as if the run had not been interrupted, so that the interruption that
/// ended the run does not cut it short (a second Ctrl-C during it does); the interruption is
/// restored afterwards.
pub fn uninterrupted<T>(f: impl FnOnce() -> T) -> T {
    let was = INTERRUPTED.swap(false, Ordering::SeqCst);
    let out = f();
    if was {
        INTERRUPTED.store(true, Ordering::SeqCst);
    }
    out
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
                    if now >= a.deadline || interrupted() {
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

/// What a finished child used: its own and its reaped descendants' CPU time, and the largest
/// resident set among them.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub cpu: Duration,
    pub max_rss_bytes: u64,
}

/// Waits for `child`, killing it if it runs longer than `limit` (from now) or the run is
/// interrupted.
pub fn wait_bounded(child: Child, limit: Duration, what: &str) -> anyhow::Result<ExitStatus> {
    Ok(wait_bounded_usage(child, limit, what)?.0)
}

/// [`wait_bounded`], also returning what the child used.
pub fn wait_bounded_usage(
    child: Child,
    limit: Duration,
    what: &str,
) -> anyhow::Result<(ExitStatus, Usage)> {
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
            break; // wait4 below reports the problem
        }
    }
    *w.armed.lock().unwrap_or_else(|e| e.into_inner()) = None;
    // Reap with wait4 for the resource usage. `Child` has no Drop, so it is simply forgotten.
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data; wait4 only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: plain syscall on our own, not yet reaped child with valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).with_context(|| format!("waiting for {what}"));
        }
    }
    drop(child);
    let st = ExitStatus::from_raw(status);
    check_interrupted()?;
    if !st.success() && start.elapsed() >= limit {
        bail!("{what} did not finish within {limit:?} and was killed");
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let usage = Usage {
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        max_rss_bytes: ru.ru_maxrss.max(0) as u64 * 1024,
    };
    Ok((st, usage))
}

/// Our stderr as a child's stdout: tool chatter must not end up in the table on stdout.
pub fn to_stderr() -> Stdio {
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// Runs a setup command to completion with its output in files (a daemon it starts may keep
/// a pipe open forever) and returns stdout and stderr; a failure carries both.
pub fn run_captured(
    cmd: &mut Command,
    scratch: &Path,
    limit: Duration,
    what: &str,
) -> anyhow::Result<(String, String)> {
    let f = run_measured(cmd, scratch, limit, what)?;
    Ok((f.out, f.err))
}

/// A command that ran to completion.
pub struct Finished {
    /// Wall time from spawn to exit.
    pub took: Duration,
    pub usage: Usage,
    pub out: String,
    pub err: String,
}

/// [`run_captured`], also returning the wall time and what the command used. A failure
/// carries the last 40 lines of its output.
pub fn run_measured(
    cmd: &mut Command,
    scratch: &Path,
    limit: Duration,
    what: &str,
) -> anyhow::Result<Finished> {
    check_interrupted()?;
    let out_path = scratch.join("out.txt");
    let err_path = scratch.join("err.txt");
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?);
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let (st, usage) = wait_bounded_usage(child, limit, what)?;
    let took = start.elapsed();
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    if !st.success() {
        let all = format!("{out}{err}");
        let lines: Vec<&str> = all.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        bail!("`{what}` failed ({st}):\n{tail}");
    }
    Ok(Finished {
        took,
        usage,
        out,
        err,
    })
}

// ---------------------------------------------------------------------------------------------
// cs.

/// The built `cs` and `cs-agent` next to this executable (target/<profile>/), building them
/// first when they are missing or when run by cargo (a no-op when they are up to date, and it
/// keeps `cargo run --bin ...` from measuring a stale `cs`).
pub fn cs_binaries() -> anyhow::Result<PathBuf> {
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
    eprintln!("{}: building cs and cs-agent: {}", tag(), show_cmd(&cmd));
    cmd.stdin(Stdio::null()).stdout(to_stderr());
    let built = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", Path::new(&cargo).display()))
        .and_then(|c| wait_bounded(c, Duration::from_secs(3600), "cargo build"));
    match built {
        Ok(st) if st.success() => {}
        Ok(st) if present => eprintln!(
            "{}: warning: cargo build failed ({st}); using the existing binaries",
            tag()
        ),
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

/// A private `$CS_HOME`; the sandboxes made through it are deleted and the daemon stopped
/// when it is dropped.
pub struct CsHome {
    pub bin: PathBuf,
    pub home: PathBuf,
    pub scratch: PathBuf,
    sandboxes: Vec<String>,
}

impl CsHome {
    /// `$CS_HOME` is `dir/cs-home`; command output goes through `dir/cs-scratch`.
    pub fn new(bin: PathBuf, dir: &Path) -> anyhow::Result<Self> {
        let scratch = dir.join("cs-scratch");
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("cannot create {}", scratch.display()))?;
        Ok(Self {
            bin,
            home: dir.join("cs-home"),
            scratch,
            sandboxes: Vec::new(),
        })
    }

    /// A `cs` command with this home.
    pub fn cmd<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).env("CS_HOME", &self.home).env_remove("CS_LOG");
        // The daemon's log level, for a look inside a run (`CS_BENCH_LOG=cs_cli=debug`).
        if let Some(level) = std::env::var_os("CS_BENCH_LOG") {
            c.env("CS_LOG", level);
        }
        c
    }

    /// Runs `cs ARGS` to completion within `limit`; returns stdout and stderr.
    pub fn run(&self, args: &[&str], limit: Duration) -> anyhow::Result<(String, String)> {
        let what = format!("cs {}", args.join(" "));
        run_captured(&mut self.cmd(args), &self.scratch, limit, &what)
    }

    /// `cs sandbox create NAME --local`; returns what it printed.
    pub fn create_local(&mut self, name: &str) -> anyhow::Result<String> {
        let (out, err) = self.run(&["sandbox", "create", name, "--local"], SHORT)?;
        self.sandboxes.push(name.to_string());
        Ok(format!("{out}{err}"))
    }

    /// `cs sandbox add SANDBOX/WS PAIRING`.
    pub fn add(&mut self, target: &str, pairing: &str) -> anyhow::Result<()> {
        self.run(&["sandbox", "add", target, pairing], SHORT)?;
        let sandbox = target.split('/').next().unwrap_or(target);
        self.sandboxes.push(sandbox.to_string());
        Ok(())
    }

    /// Deletes the sandboxes made through this home, then stops the daemon; returns what
    /// failed. Dropping does the same (once), printing the failures.
    pub fn cleanup(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        let sandboxes = std::mem::take(&mut self.sandboxes);
        let worked = !sandboxes.is_empty();
        let deletes = sandboxes.iter().map(|s| vec!["sandbox", "delete", s]);
        for args in deletes.chain([vec!["daemon", "stop"]]) {
            if let Err(e) = uninterrupted(|| self.run(&args, Duration::from_secs(30))) {
                // Without a sandbox, cs never worked: its failure was reported already.
                if worked {
                    failed.push(format!("{e:#}"));
                }
            }
        }
        failed
    }

    /// The pid of a local workspace's agent, from its pid file.
    pub fn agent_pid(&self, sandbox: &str, ws: &str) -> anyhow::Result<i32> {
        let path = self.home.join(format!(
            "local/{sandbox}/{ws}/root/var/lib/cs-agent/agent.pid"
        ));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{}: not a pid: {text:?}", path.display()))
    }
}

impl Drop for CsHome {
    fn drop(&mut self) {
        if self.sandboxes.is_empty() {
            // Cleaned up already, or cs never worked: stopping the daemon is all there is.
            let _ = uninterrupted(|| self.run(&["daemon", "stop"], Duration::from_secs(30)));
            return;
        }
        for e in self.cleanup() {
            eprintln!("{}: cleanup: {e}", tag());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// OpenSSH.

pub fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

pub fn on_path(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(name).is_file())
}

/// Installs OpenSSH with apt-get when `sshd` or the client is missing (root only).
pub fn ensure_openssh() -> anyhow::Result<()> {
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
            "{}: OpenSSH is missing; running: apt-get {}",
            tag(),
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
pub struct Sshd {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    key: PathBuf,
    master: bool,
}

impl Sshd {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
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

    /// The `ssh` command line (program first) that reaches this server with the private key
    /// and no user configuration; `mux` goes through the ControlMaster. For `rsync -e` and
    /// the like; the caller removes `SSH_AUTH_SOCK` from the environment.
    pub fn ssh_argv(&self, mux: bool) -> Vec<String> {
        let mut v: Vec<String> = [
            "ssh",
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "IdentitiesOnly=yes",
            "-i",
        ]
        .map(String::from)
        .to_vec();
        v.push(self.key.display().to_string());
        v.extend(["-p".to_string(), self.port.to_string()]);
        if mux {
            v.extend(["-o".to_string(), self.control_path()]);
        }
        v
    }

    /// `ssh` to this server; `mux` goes through the ControlMaster.
    pub fn ssh(&self, mux: bool, extra: &[&str], remote: Option<&str>) -> Command {
        let argv = self.ssh_argv(mux);
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]).env_remove("SSH_AUTH_SOCK");
        c.args(extra).arg("127.0.0.1").args(remote);
        c
    }

    /// Makes sure a ControlMaster is up: a mux client whose master is gone would silently
    /// open a new connection and spoil the row.
    pub fn ensure_master(&mut self) -> anyhow::Result<()> {
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
            eprintln!(
                "{}: the ssh ControlMaster went away; starting a new one",
                tag()
            );
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
        uninterrupted(|| {
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
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Figures.

/// The value at quantile `q` of sorted, non-empty samples, interpolating between neighbours.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = (sorted.len() - 1) as f64 * q;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Milliseconds, with two decimals below 10.
pub fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.1} ms")
    }
}

/// A byte count in whole GiB or MiB when it is one, else in bytes.
pub fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    }
}

/// A ratio of at least 1, with two decimals while they matter.
pub fn ratio(r: f64) -> String {
    if r < 3.0 {
        format!("{r:.2}")
    } else {
        format!("{r:.1}")
    }
}

/// An error as one table cell: one line, no pipes, at most 300 characters.
pub fn cell_error(e: &str) -> String {
    let mut why = e
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|");
    if why.chars().count() > 300 {
        why = format!("{}...", why.chars().take(300).collect::<String>());
    }
    why
}

pub fn show_cmd(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&shell_quote(&a.to_string_lossy()));
    }
    s
}

pub fn shell_quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// The first line a command prints on stdout (or stderr), or "?".
pub fn first_line(cmd: &mut Command, stderr: bool) -> String {
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

pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".to_string())
}

/// The command that started this run, as the user would type it again.
pub fn invocation() -> String {
    let argv: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
    let release =
        std::env::current_exe().is_ok_and(|e| e.parent().is_some_and(|d| d.ends_with("release")));
    if std::env::var_os("CARGO").is_some() {
        format!(
            "cargo run{} -p cs-tests --bin {}{}{}",
            if release { " --release" } else { "" },
            tag(),
            if argv.is_empty() { "" } else { " -- " },
            argv.join(" ")
        )
    } else {
        std::iter::once(std::env::args().next().unwrap_or_default())
            .chain(argv)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// "N cores (CPU), KERNEL, TOOLS..., as root": the machine the figures come from.
pub fn machine_line(tools: &[String]) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = first_line(Command::new("uname").arg("-sr"), false);
    let mut parts = vec![format!("{cores} cores ({})", cpu_model()), kernel];
    parts.extend(tools.iter().cloned());
    format!(
        "{}, as {}.",
        parts.join(", "),
        if is_root() { "root" } else { "a regular user" }
    )
}

/// The whole number that follows option `name` on a command line; errors name the option
/// and, when the value is missing, show `usage`.
pub fn number_arg(
    args: &mut impl Iterator<Item = String>,
    name: &str,
    usage: &str,
) -> anyhow::Result<u64> {
    use anyhow::Context as _;
    let v = args
        .next()
        .with_context(|| format!("{name} needs a number\n{usage}"))?;
    v.parse()
        .with_context(|| format!("invalid {name} '{v}': expected a whole number"))
}

// ---------------------------------------------------------------------------------------------
// The kernel tree, processes and the machine's CPU.

/// Debian's kernel source (`apt-get install -y linux-source`), the tree the sync benchmarks
/// copy.
pub const KERNEL_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The tarball's top directory, and the tree's name in the cache.
pub const KERNEL_TREE: &str = "linux-source-6.1";

/// Whether [`kernel_tree`] can give the tree without installing anything: it is extracted in
/// `cache` already, or the tarball is there to extract.
pub fn kernel_tree_available(cache: &Path) -> bool {
    (cache.join(format!("{KERNEL_TREE}.complete")).is_file() && cache.join(KERNEL_TREE).is_dir())
        || Path::new(KERNEL_TARBALL).is_file()
}

/// The kernel tree, extracted into `cache` the first time (target/syncbench-cache/, shared by
/// the benchmarks; the same layout as syncbench's own).
pub fn kernel_tree(cache: &Path) -> anyhow::Result<PathBuf> {
    let tree = cache.join(KERNEL_TREE);
    let done = cache.join(format!("{KERNEL_TREE}.complete"));
    if done.is_file() && tree.is_dir() {
        return Ok(tree);
    }
    ensure!(
        Path::new(KERNEL_TARBALL).is_file(),
        "{KERNEL_TARBALL} is missing: install the kernel source with `apt-get install -y \
         linux-source`"
    );
    std::fs::create_dir_all(cache)?;
    let partial = cache.join("extract.partial");
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&partial)?;
    eprintln!(
        "{}: extracting {KERNEL_TARBALL} into {} (once)",
        tag(),
        cache.display()
    );
    run_captured(
        Command::new("tar")
            .arg("-xJf")
            .arg(KERNEL_TARBALL)
            .arg("-C")
            .arg(&partial),
        cache,
        Duration::from_secs(30 * 60),
        "tar -xJf linux-source",
    )?;
    std::fs::rename(partial.join(KERNEL_TREE), &tree)
        .with_context(|| format!("{KERNEL_TARBALL} holds no {KERNEL_TREE}/"))?;
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::write(&done, "")?;
    Ok(tree)
}

/// CPU time (user + system) a process has used so far, from /proc/PID/stat.
pub fn proc_cpu(pid: i32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // The fields after the command name, which is in parentheses and may hold spaces: utime
    // is field 14 of stat(5) and stime 15.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("malformed /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    ensure!(f.len() > 12, "malformed /proc/{pid}/stat");
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / clock_ticks()))
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as u64
}

/// The machine's busy CPU time so far, all cores and all processes (user, nice, system, irq,
/// softirq and steal of /proc/stat): the difference over a run is what everything involved
/// used, both ends of a connection included.
pub fn machine_busy() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    ensure!(v.len() >= 8, "short cpu line in /proc/stat");
    // user nice system idle iowait irq softirq steal
    let ticks = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / clock_ticks()))
}

/// Kills (by pid) and lists the processes still running whose command line names `dir`:
/// what a private `$CS_HOME` left behind after its cleanup.
pub fn reap_leftovers(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if pid != me && cmd.contains(&needle) {
            // SAFETY: plain syscall; the process runs a command on our private directory.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            found.push(format!("pid {pid}: {}", cmd.trim()));
        }
    }
    found
}
