//! Harness for end-to-end tests and benchmarks: finds (building if needed) the real `cs` and
//! `cs-agent` binaries, and gives each test its own `$CS_HOME` that is torn down afterwards,
//! stopping every agent and daemon the test started.

pub mod benchkit;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Directory holding the built `cs` and `cs-agent`.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Test executables live in target/<profile>/deps; binaries in target/<profile>.
        let exe = std::env::current_exe().expect("test executable path");
        let mut dir = exe.parent().expect("exe dir").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let release = dir.ends_with("release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--workspace", "--bins"]);
        // `cargo test` gives test processes the package's CARGO_PKG_* variables; build scripts
        // that track them (ring's does) would see a change and rebuild half the tree.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            let keep = ["CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_BUILD_JOBS"].contains(&k.as_str());
            if k.starts_with("CARGO_") && !keep {
                cmd.env_remove(&k);
            }
        }
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building cs and cs-agent failed");
        assert!(
            dir.join("cs").is_file(),
            "no cs binary in {}",
            dir.display()
        );
        dir
    })
}

pub fn cs_bin() -> PathBuf {
    bin_dir().join("cs")
}

pub fn agent_bin() -> PathBuf {
    bin_dir().join("cs-agent")
}

/// One test's laptop: a private `$CS_HOME`.
pub struct Laptop {
    pub dir: tempfile::TempDir,
}

impl Default for Laptop {
    fn default() -> Self {
        Self::new()
    }
}

impl Laptop {
    pub fn new() -> Self {
        bin_dir();
        Self {
            dir: tempfile::Builder::new()
                .prefix("cs-e2e-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("cs-home")
    }

    /// A `cs` command with this laptop's environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(cs_bin());
        c.args(args)
            .env("CS_HOME", self.home())
            .env_remove("CS_LOG")
            // Sessions check each reconciliation around the changed paths against one of the
            // whole trees, and halt if they differ.
            .env("CS_SYNC_CHECK_DIRTY", "1")
            .stdin(Stdio::null());
        c
    }

    /// Runs `cs` to completion (bounded by 120 s) and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        run_bounded(self.cmd(args), Duration::from_secs(120))
    }

    /// Runs `cs` and demands success, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "cs {args:?} failed: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Creates a local sandbox with the default single workspace.
    pub fn sandbox(&self, name: &str) -> String {
        self.ok(&["sandbox", "create", name, "--local"])
    }

    /// `cs sandbox show NAME --json`, parsed.
    pub fn show(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["sandbox", "show", name, "--json"])).expect("show --json")
    }

    /// The pid of a local workspace's agent.
    pub fn agent_pid(&self, sandbox: &str, ws: &str) -> i32 {
        let path = self.home().join(format!(
            "local/{sandbox}/{ws}/root/var/lib/cs-agent/agent.pid"
        ));
        std::fs::read_to_string(&path)
            .expect("agent pid file")
            .trim()
            .parse()
            .expect("pid")
    }
}

impl Drop for Laptop {
    fn drop(&mut self) {
        // Stop agents of every local sandbox, then the daemon.
        if let Ok(bytes) = std::fs::read(self.home().join("sandboxes.json")) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                if let Some(map) = v.get("sandboxes").and_then(|s| s.as_object()) {
                    for name in map.keys() {
                        let _ = run_bounded(
                            self.cmd(&["sandbox", "delete", name]),
                            Duration::from_secs(20),
                        );
                    }
                }
            }
        }
        let _ = run_bounded(self.cmd(&["daemon", "stop"]), Duration::from_secs(20));
    }
}

/// Runs a command with a time bound; a command that overruns is killed and reported.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let start = Instant::now();
    let out_h = child.stdout.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut v);
            v
        })
    });
    let err_h = child.stderr.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut v);
            v
        })
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("command {cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out_h
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default(),
        stderr: err_h
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default(),
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Polls `f` every 20 ms until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
