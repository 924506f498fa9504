//! Laptop state under `$CS_HOME`: the laptop's identity, the sandbox registry, local agents'
//! directories, and the daemon's socket and log.
//!
//! The registry is one JSON file, changed under an exclusive lock and replaced atomically, so
//! concurrent `cs` commands never lose each other's changes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use cs_transport::{Fingerprint, Identity};
use serde::{Deserialize, Serialize};

/// Where all laptop state lives.
#[derive(Debug, Clone)]
pub struct CsHome {
    pub dir: PathBuf,
}

impl CsHome {
    /// `$CS_HOME`, or the user's data directory.
    pub fn locate() -> anyhow::Result<Self> {
        let dir = match std::env::var_os("CS_HOME") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => dirs::data_dir()
                .context("cannot find a data directory; set CS_HOME")?
                .join("cs"),
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", dir.display()))?;
        Ok(Self { dir })
    }

    pub fn identity(&self) -> anyhow::Result<Identity> {
        Ok(Identity::load_or_create(
            &self.dir.join("identity"),
            "cs laptop",
        )?)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("daemon.sock")
    }

    pub fn daemon_log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    pub fn daemon_lock(&self) -> PathBuf {
        self.dir.join("daemon.lock")
    }

    /// Directory of a local sandbox's workspace: its home, root and log.
    pub fn local_dir(&self, sandbox: &str, workspace: &str) -> PathBuf {
        self.dir.join("local").join(sandbox).join(workspace)
    }

    pub fn local_sandbox_dir(&self, sandbox: &str) -> PathBuf {
        self.dir.join("local").join(sandbox)
    }

    fn registry_path(&self) -> PathBuf {
        self.dir.join("sandboxes.json")
    }

    /// Reads the registry (no lock: readers see either the old or the new file).
    pub fn registry(&self) -> anyhow::Result<Registry> {
        let path = self.registry_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: invalid registry", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Changes the registry under an exclusive lock. `f` may fail, and then nothing changes.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut Registry) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let lock_path = self.dir.join("sandboxes.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", lock_path.display()))?;
        let mut reg = self.registry()?;
        let out = f(&mut reg)?;
        let bytes = serde_json::to_vec_pretty(&reg)?;
        cs_transport::identity::write_private(&self.registry_path(), &bytes)
            .with_context(|| format!("cannot write {}", self.registry_path().display()))?;
        Ok(out)
    }
}

/// Every sandbox this laptop knows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Registry {
    /// `SANDBOX/WORKSPACE` used when `-W` is left out.
    pub default: Option<String>,
    pub sandboxes: BTreeMap<String, Sandbox>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sandbox {
    /// Created by `cs sandbox create --local`: its agents run on this machine.
    pub local: bool,
    pub workspaces: BTreeMap<String, Workspace>,
}

/// How to reach one workspace's agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Workspace {
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
    /// Present for a local sandbox: how to (re)start its agent.
    pub local: Option<LocalAgent>,
}

/// A local agent's directories and arguments.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LocalAgent {
    pub home: PathBuf,
    pub root: PathBuf,
    pub log: PathBuf,
    pub definition: Option<PathBuf>,
    /// A failed setup step waits for `cs status --retry` instead of being retried on its own.
    #[serde(default)]
    pub no_auto_retry: bool,
}

impl LocalAgent {
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("var/lib/cs-agent/agent.pid")
    }
}

/// A validated `SANDBOX/WORKSPACE` reference.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct WsRef {
    pub sandbox: String,
    pub workspace: String,
}

impl std::fmt::Display for WsRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.sandbox, self.workspace)
    }
}

/// Checks a sandbox or workspace name: what DNS labels allow, so names work everywhere.
pub fn check_name(kind: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!("invalid {kind} name '{name}': use 1-63 lowercase letters, digits and '-', not at either end");
    }
    Ok(())
}

impl WsRef {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let Some((sb, ws)) = text.split_once('/') else {
            bail!("invalid workspace '{text}': expected SANDBOX/WORKSPACE");
        };
        check_name("sandbox", sb)?;
        check_name("workspace", ws)?;
        Ok(Self {
            sandbox: sb.into(),
            workspace: ws.into(),
        })
    }
}

impl Registry {
    /// All workspaces, in order.
    pub fn all(&self) -> Vec<WsRef> {
        self.sandboxes
            .iter()
            .flat_map(|(sb, s)| {
                s.workspaces.keys().map(|ws| WsRef {
                    sandbox: sb.clone(),
                    workspace: ws.clone(),
                })
            })
            .collect()
    }

    pub fn get(&self, r: &WsRef) -> Option<&Workspace> {
        self.sandboxes.get(&r.sandbox)?.workspaces.get(&r.workspace)
    }

    /// Resolves `-W`: `SB/WS`, `SB` with one workspace, or nothing with a default or a single
    /// workspace. Errors list the choices.
    pub fn resolve(&self, w: Option<&str>) -> anyhow::Result<(WsRef, Workspace)> {
        let list = |refs: &[WsRef]| {
            refs.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let all = self.all();
        let r = match w {
            Some(text) if text.contains('/') => {
                let r = WsRef::parse(text)?;
                if self.get(&r).is_none() {
                    if all.is_empty() {
                        bail!("unknown workspace '{r}': no sandboxes yet; create one with `cs sandbox create NAME --local`");
                    }
                    bail!("unknown workspace '{r}'; known: {}", list(&all));
                }
                r
            }
            Some(sb) => {
                let Some(s) = self.sandboxes.get(sb) else {
                    bail!("unknown sandbox '{sb}'; known: {}", self.sandboxes.keys().cloned().collect::<Vec<_>>().join(", "));
                };
                let names: Vec<&String> = s.workspaces.keys().collect();
                match names.as_slice() {
                    [one] => WsRef { sandbox: sb.into(), workspace: (*one).clone() },
                    _ => bail!(
                        "sandbox '{sb}' has several workspaces; choose one with -W: {}",
                        names.iter().map(|n| format!("{sb}/{n}")).collect::<Vec<_>>().join(", ")
                    ),
                }
            }
            None => match (&self.default, all.as_slice()) {
                (Some(d), _) => WsRef::parse(d)?,
                (None, [one]) => one.clone(),
                (None, []) => bail!("no sandboxes yet; create one with `cs sandbox create NAME --local`"),
                (None, _) => bail!(
                    "several workspaces; choose one with -W SANDBOX/WORKSPACE or set a default with `cs sandbox use`: {}",
                    list(&all)
                ),
            },
        };
        let ws = self.get(&r).cloned().with_context(|| {
            format!("default workspace '{r}' no longer exists; run `cs sandbox use`")
        })?;
        Ok((r, ws))
    }
}

/// True if a process with this pid exists.
pub fn pid_alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Reads a pid file.
pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws() -> Workspace {
        Workspace {
            addr: "127.0.0.1:1".parse().unwrap(),
            fingerprint: Fingerprint::of_spki(b"x"),
            local: None,
        }
    }

    fn reg(names: &[(&str, &[&str])]) -> Registry {
        let mut r = Registry::default();
        for (sb, wss) in names {
            let workspaces = wss.iter().map(|w| (w.to_string(), ws())).collect();
            r.sandboxes.insert(
                sb.to_string(),
                Sandbox {
                    local: true,
                    workspaces,
                },
            );
        }
        r
    }

    #[test]
    fn resolve_rules() {
        let one = reg(&[("demo", &["dev"])]);
        assert_eq!(one.resolve(None).unwrap().0.to_string(), "demo/dev");
        assert_eq!(one.resolve(Some("demo")).unwrap().0.to_string(), "demo/dev");
        let two = reg(&[("a", &["dev"]), ("b", &["api", "web"])]);
        let err = two.resolve(None).unwrap_err().to_string();
        assert!(err.contains("a/dev, b/api, b/web"), "{err}");
        let err = two.resolve(Some("b")).unwrap_err().to_string();
        assert!(err.contains("b/api, b/web"), "{err}");
        let err = two.resolve(Some("a/nope")).unwrap_err().to_string();
        assert!(err.contains("'a/nope'"), "{err}");
        let mut d = two.clone();
        d.default = Some("b/web".into());
        assert_eq!(d.resolve(None).unwrap().0.to_string(), "b/web");
        assert!(Registry::default()
            .resolve(None)
            .unwrap_err()
            .to_string()
            .contains("no sandboxes"));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("sandbox", "demo-1").is_ok());
        for bad in ["", "Demo", "a/b", "-x", "x-", "a b", &"x".repeat(64)] {
            let err = check_name("sandbox", bad).unwrap_err().to_string();
            assert!(err.contains(&format!("'{bad}'")), "{err}");
        }
    }
}
