//! `cs sandbox ...`: local sandboxes (agents on this machine), remote agents added by pairing,
//! and the registry that records them.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use cs_transport::Pairing;
use serde::Serialize;

use crate::connect::connect;
use crate::home::{check_name, pid_alive, read_pid, CsHome, LocalAgent, Sandbox, Workspace, WsRef};
use crate::wire::{LinkStatus, Reply, Request};

/// How long a starting agent has to print its pairing line.
const AGENT_START_WAIT_MS: u64 = 10_000;
/// How long a stopping agent has after SIGTERM before SIGKILL.
const AGENT_STOP_WAIT_MS: u64 = 3_000;

/// Finds the cs-agent binary: `$CS_AGENT_BIN`, next to this executable, or on `PATH`.
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CS_AGENT_BIN") {
        return PathBuf::from(p);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let p = dir.join("cs-agent");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("cs-agent")
}

/// Starts a local agent and returns its pairing line.
fn start_local_agent(
    ws: &WsRef,
    listen: SocketAddr,
    local: &LocalAgent,
) -> anyhow::Result<Pairing> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&local.log)
        .with_context(|| format!("cannot open {}", local.log.display()))?;
    let bin = agent_binary();
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("serve")
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--home")
        .arg(&local.home)
        .arg("--root")
        .arg(&local.root)
        .arg("--workspace")
        .arg(&ws.workspace);
    if let Some(def) = &local.definition {
        cmd.arg("--definition").arg(def);
    }
    if local.no_auto_retry {
        cmd.arg("--no-auto-retry");
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
    // SAFETY: setsid is async-signal-safe; the agent outlives this command and must not get
    // the terminal's signals.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stdout = child.stdout.take().context("agent stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(Duration::from_millis(AGENT_START_WAIT_MS)) {
        Ok(line) if !line.trim().is_empty() => line,
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "agent for {ws} did not start: {}",
                last_lines(&local.log, 3)
            );
        }
    };
    // Reap the agent when it exits, so it does not linger as a zombie while cs runs.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(line.trim().parse()?)
}

fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    if lines.is_empty() {
        format!("no output in {}", path.display())
    } else {
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

/// Restarts a local agent that is no longer running, on its recorded address.
pub fn ensure_local_agent(ws: &WsRef, addr: &SocketAddr, local: &LocalAgent) -> anyhow::Result<()> {
    if read_pid(&local.pid_file()).is_some_and(pid_alive) {
        return Ok(());
    }
    if deleting_marker(local).exists() {
        anyhow::bail!("sandbox {} is being deleted", ws.sandbox);
    }
    tracing::info!(workspace = %ws, %addr, "local agent is not running; starting it");
    start_local_agent(ws, *addr, local).map(|_| ())
}

/// Present while `cs sandbox delete` removes a local workspace: nothing may restart its agent.
fn deleting_marker(local: &LocalAgent) -> PathBuf {
    local.root.join("deleting")
}

fn stop_local_agent(local: &LocalAgent) {
    let Some(pid) = read_pid(&local.pid_file()) else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + Duration::from_millis(AGENT_STOP_WAIT_MS);
    while std::time::Instant::now() < deadline {
        if !pid_alive(pid.as_raw()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

/// Workspace names of a definition file (`workspaces: [{name: ...}, ...]`).
fn definition_workspaces(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // The whole definition is checked here, so a bad key or value is named (with its line)
    // before anything is created.
    let def = cs_supervisor::definition::Definition::parse(&text)
        .with_context(|| format!("invalid sandbox definition {}", path.display()))?;
    for w in &def.workspaces {
        check_name("workspace", w.name.as_str())?;
    }
    Ok(def
        .workspaces
        .into_iter()
        .map(|w| w.name.as_str().to_string())
        .collect())
}

/// `cs sandbox create NAME --local [-f FILE]`.
pub async fn create(
    home: &CsHome,
    name: &str,
    definition: Option<&Path>,
    no_auto_retry: bool,
) -> anyhow::Result<()> {
    check_name("sandbox", name)?;
    let definition = match definition {
        Some(p) => Some(
            p.canonicalize()
                .with_context(|| format!("cannot read sandbox definition {}", p.display()))?,
        ),
        None => None,
    };
    let names = match &definition {
        Some(p) => definition_workspaces(p)?,
        None => vec!["dev".to_string()],
    };
    // Reserve the name first, so two concurrent creates cannot both proceed.
    home.update(|reg| {
        if reg.sandboxes.contains_key(name) {
            bail!(
                "sandbox '{name}' already exists; delete it first with `cs sandbox delete {name}`"
            );
        }
        reg.sandboxes.insert(
            name.into(),
            Sandbox {
                local: true,
                workspaces: BTreeMap::new(),
            },
        );
        Ok(())
    })?;
    match create_agents(home, name, &names, definition.as_deref(), no_auto_retry).await {
        Ok(created) => {
            home.update(|reg| {
                let sb = reg
                    .sandboxes
                    .get_mut(name)
                    .context("sandbox vanished while being created")?;
                sb.workspaces = created.clone();
                Ok(())
            })?;
            for (ws, w) in &created {
                let local = w
                    .local
                    .as_ref()
                    .map(|l| l.home.display().to_string())
                    .unwrap_or_default();
                println!(
                    "created {name}/{ws}: agent at {} key {} home {local}",
                    w.addr, w.fingerprint
                );
            }
            Ok(())
        }
        Err(e) => {
            // Nothing half-done: stop what was started and forget the name.
            let _ = std::fs::remove_dir_all(home.local_sandbox_dir(name));
            let _ = home.update(|reg| {
                reg.sandboxes.remove(name);
                Ok(())
            });
            Err(e)
        }
    }
}

async fn create_agents(
    home: &CsHome,
    name: &str,
    names: &[String],
    definition: Option<&Path>,
    no_auto_retry: bool,
) -> anyhow::Result<BTreeMap<String, Workspace>> {
    let identity = home.identity()?;
    let mut created: BTreeMap<String, Workspace> = BTreeMap::new();
    let result = async {
        for ws in names {
            let dir = home.local_dir(name, ws);
            let local = LocalAgent {
                home: dir.join("home"),
                root: dir.join("root"),
                log: dir.join("agent.log"),
                definition: definition.map(Path::to_path_buf),
                no_auto_retry,
            };
            std::fs::create_dir_all(&local.home)
                .with_context(|| format!("cannot create {}", local.home.display()))?;
            std::fs::create_dir_all(&local.root)
                .with_context(|| format!("cannot create {}", local.root.display()))?;
            let r = WsRef {
                sandbox: name.into(),
                workspace: ws.clone(),
            };
            let pairing = start_local_agent(&r, "127.0.0.1:0".parse().expect("literal"), &local)?;
            // Record before enrolling so a failure below still stops this agent.
            created.insert(
                ws.clone(),
                Workspace {
                    addr: pairing.addr,
                    fingerprint: pairing.fingerprint,
                    local: Some(local),
                },
            );
            connect(
                &identity,
                pairing.addr,
                pairing.fingerprint,
                Some(&pairing.token),
            )
            .await
            .with_context(|| format!("cannot pair with the agent of {r}"))?;
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    match result {
        Ok(()) => Ok(created),
        Err(e) => {
            for w in created.values() {
                if let Some(l) = &w.local {
                    stop_local_agent(l);
                }
            }
            Err(e)
        }
    }
}

/// `cs sandbox add SANDBOX/WORKSPACE PAIRING`.
pub async fn add(home: &CsHome, target: &str, pairing: &str) -> anyhow::Result<()> {
    let r = WsRef::parse(target)?;
    let pairing: Pairing = pairing.parse()?;
    let reg = home.registry()?;
    if reg.get(&r).is_some() {
        bail!("workspace '{r}' already exists; delete its sandbox first");
    }
    if reg.sandboxes.get(&r.sandbox).is_some_and(|s| s.local) {
        bail!(
            "sandbox '{}' is a local sandbox; add remote workspaces to another sandbox",
            r.sandbox
        );
    }
    let identity = home.identity()?;
    let c = connect(
        &identity,
        pairing.addr,
        pairing.fingerprint,
        Some(&pairing.token),
    )
    .await
    .with_context(|| format!("cannot pair with the agent at {}", pairing.addr))?;
    c.conn.close(0u32.into(), b"paired");
    home.update(|reg| {
        let sb = reg.sandboxes.entry(r.sandbox.clone()).or_insert(Sandbox {
            local: false,
            workspaces: BTreeMap::new(),
        });
        if sb.workspaces.contains_key(&r.workspace) {
            bail!("workspace '{r}' already exists");
        }
        sb.workspaces.insert(
            r.workspace.clone(),
            Workspace {
                addr: pairing.addr,
                fingerprint: pairing.fingerprint,
                local: None,
            },
        );
        Ok(())
    })?;
    println!(
        "added {r}: agent at {} key {} (it serves workspace '{}')",
        pairing.addr, pairing.fingerprint, c.workspace
    );
    Ok(())
}

#[derive(Debug, Serialize)]
struct WsView {
    sandbox: String,
    workspace: String,
    address: String,
    fingerprint: String,
    state: String,
    last_error: Option<String>,
    home: Option<PathBuf>,
    default: bool,
}

async fn link_states(home: &CsHome) -> Option<Vec<LinkStatus>> {
    let mut s = crate::client::connect_existing(home).await?;
    cs_transport::write_frame(
        &mut s,
        &Request::Status {
            build: crate::wire::build_id(),
        },
    )
    .await
    .ok()?;
    match cs_transport::read_frame::<_, Reply>(&mut s).await.ok()?? {
        Reply::Status(st) => Some(st.links),
        _ => None,
    }
}

async fn views(home: &CsHome, only: Option<&str>) -> anyhow::Result<Vec<WsView>> {
    let reg = home.registry()?;
    if let Some(name) = only {
        if !reg.sandboxes.contains_key(name) {
            bail!(
                "unknown sandbox '{name}'; known: {}",
                reg.sandboxes.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    let links = link_states(home).await;
    let mut out = Vec::new();
    for r in reg.all() {
        if only.is_some_and(|n| n != r.sandbox) {
            continue;
        }
        let w = reg.get(&r).expect("listed by the registry");
        let link = links
            .as_ref()
            .and_then(|ls| ls.iter().find(|l| l.workspace == r.to_string()));
        let state = match (&links, link) {
            (None, _) => "disconnected (daemon not running)".to_string(),
            (Some(_), None) => "disconnected (not used yet)".to_string(),
            (Some(_), Some(l)) => l.state.clone(),
        };
        out.push(WsView {
            sandbox: r.sandbox.clone(),
            workspace: r.workspace.clone(),
            address: w.addr.to_string(),
            fingerprint: w.fingerprint.to_string(),
            state,
            last_error: link.and_then(|l| l.last_error.clone()),
            home: w.local.as_ref().map(|l| l.home.clone()),
            default: reg.default.as_deref() == Some(&r.to_string()),
        });
    }
    Ok(out)
}

/// `cs sandbox list [--json]` and `cs sandbox show NAME [--json]`.
pub async fn list(home: &CsHome, only: Option<&str>, json: bool) -> anyhow::Result<()> {
    let views = views(home, only).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    if views.is_empty() {
        println!("no sandboxes; create one with `cs sandbox create NAME --local`");
        return Ok(());
    }
    if only.is_some() {
        for v in &views {
            println!(
                "{}/{}{}",
                v.sandbox,
                v.workspace,
                if v.default { " (default)" } else { "" }
            );
            println!("  address:     {}", v.address);
            println!("  key:         {}", v.fingerprint);
            println!("  connection:  {}", v.state);
            if let Some(e) = &v.last_error {
                println!("  last error:  {e}");
            }
            if let Some(h) = &v.home {
                println!("  home:        {}", h.display());
            }
        }
    } else {
        println!("{:<28} {:<22} {:<18} STATE", "WORKSPACE", "ADDRESS", "KEY");
        for v in &views {
            let name = format!(
                "{}/{}{}",
                v.sandbox,
                v.workspace,
                if v.default { "*" } else { "" }
            );
            let key = v
                .fingerprint
                .trim_start_matches("SHA256:")
                .chars()
                .take(16)
                .collect::<String>();
            println!("{name:<28} {:<22} {key:<18} {}", v.address, v.state);
        }
    }
    Ok(())
}

/// `cs sandbox delete NAME`.
pub async fn delete(home: &CsHome, name: &str) -> anyhow::Result<()> {
    let reg = home.registry()?;
    let Some(sb) = reg.sandboxes.get(name).cloned() else {
        bail!("unknown sandbox '{name}'");
    };
    for w in sb.workspaces.values() {
        if let Some(l) = &w.local {
            let _ = std::fs::write(deleting_marker(l), b"");
        }
    }
    if let Some(mut s) = crate::client::connect_existing(home).await {
        let _ = cs_transport::write_frame(
            &mut s,
            &Request::Forget {
                sandbox: name.into(),
            },
        )
        .await;
        let _ = cs_transport::read_frame::<_, Reply>(&mut s).await;
    }
    for w in sb.workspaces.values() {
        if let Some(l) = &w.local {
            stop_local_agent(l);
        }
    }
    if sb.local {
        let dir = home.local_sandbox_dir(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
    }
    home.update(|reg| {
        reg.sandboxes.remove(name);
        if reg
            .default
            .as_deref()
            .is_some_and(|d| d.starts_with(&format!("{name}/")))
        {
            reg.default = None;
        }
        Ok(())
    })?;
    println!("deleted sandbox {name}");
    Ok(())
}

/// `cs sandbox use SANDBOX/WORKSPACE`.
pub fn use_default(home: &CsHome, target: &str) -> anyhow::Result<()> {
    home.update(|reg| {
        let (r, _) = reg.resolve(Some(target))?;
        reg.default = Some(r.to_string());
        println!("default workspace is now {r}");
        Ok(())
    })
}
