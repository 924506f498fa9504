//! Benchmark of `cs ssh` against OpenSSH on this machine, side by side in one run.
//!
//! `cargo run --release -p cs-tests --bin bench [-- --runs N --bytes N --quick]`
//!
//! Measures warm `cs ssh -- true` against a fresh `ssh localhost true` and against ssh with a
//! ControlMaster, and the throughput of `cat > /dev/null` fed through each. Prints medians,
//! 10th/90th percentiles and ratios as a Markdown table. Nothing is asserted: the figures go in
//! the README. Everything runs on 127.0.0.1 and every loop is bounded.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use cs_tests::Laptop;

struct Opts {
    runs: usize,
    bytes_runs: usize,
    bytes: u64,
}

fn opts() -> anyhow::Result<Opts> {
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
                .with_context(|| format!("{name} needs a number"))?;
            v.parse()
                .with_context(|| format!("invalid {name} '{v}': expected a whole number"))
        };
        match a.as_str() {
            "--runs" => o.runs = num("--runs")?.clamp(1, 1000) as usize,
            "--bytes" => o.bytes = num("--bytes")?.clamp(1, 1 << 36),
            "--bytes-runs" => o.bytes_runs = num("--bytes-runs")?.clamp(1, 20) as usize,
            "--quick" => {
                o.runs = 5;
                o.bytes = 100 << 20;
                o.bytes_runs = 1;
            }
            other => bail!(
                "unknown option '{other}': expected --runs N, --bytes N, --bytes-runs N or --quick"
            ),
        }
    }
    Ok(o)
}

/// A private OpenSSH server on 127.0.0.1 with key authentication.
struct Sshd {
    child: Child,
    port: u16,
    key: PathBuf,
    dir: PathBuf,
}

impl Sshd {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let sshd = Path::new("/usr/sbin/sshd");
        if !sshd.exists() {
            bail!("/usr/sbin/sshd is missing: apt-get install -y openssh-server");
        }
        let keygen = |path: &Path| -> anyhow::Result<()> {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path)
                .status()?;
            anyhow::ensure!(st.success(), "ssh-keygen failed");
            Ok(())
        };
        let host_key = dir.join("host_key");
        let key = dir.join("user_key");
        keygen(&host_key)?;
        keygen(&key)?;
        std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys"))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.join("sshd_config");
        let root = nix_is_root();
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {dir}/sshd.pid\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin {prl}\n\
                 LogLevel ERROR\nMaxStartups 100\nMaxSessions 100\n",
                hk = host_key.display(),
                dir = dir.display(),
                prl = if root { "yes" } else { "no" },
            ),
        )?;
        if root {
            std::fs::create_dir_all("/run/sshd")?;
        }
        let child = Command::new(sshd)
            .arg("-D")
            .arg("-f")
            .arg(&config)
            .arg("-E")
            .arg(dir.join("sshd.log"))
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start sshd")?;
        let up = cs_tests::wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        anyhow::ensure!(
            up,
            "sshd did not listen on port {port}; see {}",
            dir.join("sshd.log").display()
        );
        Ok(Self {
            child,
            port,
            key,
            dir: dir.to_path_buf(),
        })
    }

    fn ssh(&self, extra: &[&str], command: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
        ])
        .args(["-o", "LogLevel=ERROR", "-i"])
        .arg(&self.key)
        .args(["-p", &self.port.to_string()])
        .args(extra)
        .arg("127.0.0.1")
        .arg(command);
        c
    }

    fn control_path(&self) -> String {
        format!("ControlPath={}/cm", self.dir.display())
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self
            .ssh(&["-o", &self.control_path(), "-O", "exit"], "")
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nix_is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

/// Runs `cmd` to completion with stdin/stdout discarded and returns its wall time.
fn time_run(mut cmd: Command) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let st = cmd.stdin(Stdio::null()).stdout(Stdio::null()).status()?;
    let took = start.elapsed();
    anyhow::ensure!(st.success(), "{cmd:?} failed: {st}");
    Ok(took)
}

/// Feeds `bytes` zero bytes into `cmd`'s stdin and returns the wall time until it exits.
fn time_pipe(mut cmd: Command, bytes: u64) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stdin.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    drop(stdin);
    let st = child.wait()?;
    let took = start.elapsed();
    anyhow::ensure!(st.success(), "{cmd:?} failed: {st}");
    Ok(took)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

struct Row {
    name: String,
    samples: Vec<f64>,
}

impl Row {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples.clone();
        s.sort_by(|a, b| a.partial_cmp(b).expect("no NaN durations"));
        s
    }
    fn median(&self) -> f64 {
        percentile(&self.sorted(), 0.5)
    }
}

fn main() -> anyhow::Result<()> {
    let o = opts()?;
    let laptop = Laptop::new();
    let tmp = laptop.dir.path().to_path_buf();
    laptop.sandbox("bench");
    let cs = |cmd: &str| laptop.cmd(&["ssh", "-W", "bench/dev", "--", cmd]);
    time_run(cs("true"))?; // warm the daemon's connection

    let sshd_dir = tmp.join("sshd");
    std::fs::create_dir_all(&sshd_dir)?;
    let sshd = Sshd::start(&sshd_dir)?;
    time_run(sshd.ssh(&[], "true")).context("ssh to the private sshd failed")?;
    let cp = sshd.control_path();
    let st = sshd
        .ssh(
            &[
                "-o",
                "ControlMaster=yes",
                "-o",
                &cp,
                "-o",
                "ControlPersist=120",
                "-fN",
            ],
            "",
        )
        .status()?;
    anyhow::ensure!(st.success(), "cannot start an ssh ControlMaster");
    time_run(sshd.ssh(&["-o", &cp], "true"))?;

    let mut lat = [
        Row {
            name: "`cs ssh -- true` (warm connection)".into(),
            samples: vec![],
        },
        Row {
            name: "`ssh 127.0.0.1 true` (new connection)".into(),
            samples: vec![],
        },
        Row {
            name: "`ssh 127.0.0.1 true` (ControlMaster)".into(),
            samples: vec![],
        },
    ];
    // Interleaved, so that drift in machine load affects every row alike.
    for _ in 0..o.runs {
        lat[0]
            .samples
            .push(time_run(cs("true"))?.as_secs_f64() * 1e3);
        lat[1]
            .samples
            .push(time_run(sshd.ssh(&[], "true"))?.as_secs_f64() * 1e3);
        lat[2]
            .samples
            .push(time_run(sshd.ssh(&["-o", &cp], "true"))?.as_secs_f64() * 1e3);
    }
    let mut thr = [
        Row {
            name: "`cs ssh -- 'cat > /dev/null'`".into(),
            samples: vec![],
        },
        Row {
            name: "`ssh 127.0.0.1 'cat > /dev/null'` (new connection)".into(),
            samples: vec![],
        },
        Row {
            name: "`ssh 127.0.0.1 'cat > /dev/null'` (ControlMaster)".into(),
            samples: vec![],
        },
    ];
    let mb = o.bytes as f64 / 1e6;
    for _ in 0..o.bytes_runs {
        thr[0]
            .samples
            .push(mb / time_pipe(cs("cat > /dev/null"), o.bytes)?.as_secs_f64());
        thr[1]
            .samples
            .push(mb / time_pipe(sshd.ssh(&[], "cat > /dev/null"), o.bytes)?.as_secs_f64());
        thr[2].samples.push(
            mb / time_pipe(sshd.ssh(&["-o", &cp], "cat > /dev/null"), o.bytes)?.as_secs_f64(),
        );
    }

    let uname = Command::new("uname")
        .arg("-sr")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let ssh_v = Command::new("ssh")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())?;
    println!("# cs ssh vs OpenSSH on 127.0.0.1 ({cores} cores, {uname}, {ssh_v})");
    println!(
        "command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!();
    println!(
        "| latency, {} runs each | median | p10 | p90 | vs cs |",
        o.runs
    );
    println!("|---|---|---|---|---|");
    let base = lat[0].median();
    for r in &lat {
        let s = r.sorted();
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.1}x |",
            r.name,
            r.median(),
            percentile(&s, 0.1),
            percentile(&s, 0.9),
            r.median() / base
        );
    }
    println!();
    println!(
        "| throughput, {:.0} MB, {} runs each | median | min | max | vs cs |",
        mb, o.bytes_runs
    );
    println!("|---|---|---|---|---|");
    let base = thr[0].median();
    for r in &thr {
        let s = r.sorted();
        println!(
            "| {} | {:.0} MB/s | {:.0} MB/s | {:.0} MB/s | {:.2}x |",
            r.name,
            r.median(),
            s[0],
            s[s.len() - 1],
            r.median() / base
        );
    }
    drop(sshd);
    Ok(())
}
