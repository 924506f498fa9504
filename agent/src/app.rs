//! The `cs-agent` command line: `serve`, `pair`, and `trust list|revoke`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use actix::Actor;
use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use cs_exec::ExecActor;
use cs_transport::{Fingerprint, Identity, Pairing, Token, TransportLimits};

use crate::serve::{accept_loop, close, Served};
use crate::spawn::{default_shell, OsSpawner};
use crate::state::{AgentPaths, TrustStore};

/// The cs workspace agent: serves a laptop's `cs` over QUIC.
#[derive(Debug, Parser)]
#[command(name = "cs-agent", version, about)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Serve the workspace; prints one pairing line for `cs sandbox add`.
    Serve(ServeArgs),
    /// Print a fresh pairing line for an agent that is already serving.
    Pair {
        /// The address laptops should connect to, as HOST:PORT.
        #[arg(long)]
        address: SocketAddr,
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Seconds the token stays valid.
        #[arg(long, default_value_t = 600)]
        token_ttl: u64,
    },
    /// Manage the laptop keys this agent trusts.
    Trust {
        #[command(subcommand)]
        cmd: TrustCmd,
    },
}

#[derive(Debug, Subcommand)]
pub enum TrustCmd {
    /// List trusted keys.
    List {
        #[arg(long, default_value = "/")]
        root: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Stop trusting a key; its open connections are closed at their next stream.
    Revoke {
        /// SHA256:... as shown by `trust list` or `cs sandbox show`.
        fingerprint: String,
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// UDP address to listen on, as HOST:PORT (port 0 picks a free one).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The workspace home directory; commands run here.
    #[arg(long)]
    pub home: PathBuf,
    /// System root holding etc/sandbox.d, var/log/sandbox and the agent's state.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Sandbox definition (YAML, `workspaces:` form).
    #[arg(long)]
    pub definition: Option<PathBuf>,
    /// Which workspace of the definition this agent serves (default: the only one, or `dev`).
    #[arg(long)]
    pub workspace: Option<String>,
    /// Address put in the pairing line (default: the listening address).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Seconds the printed enrollment token stays valid.
    #[arg(long, default_value_t = 600)]
    pub token_ttl: u64,
    /// Shell for commands (default: $SHELL, the user's login shell, or /bin/sh).
    #[arg(long)]
    pub shell: Option<PathBuf>,
    /// The workspace owner: when the agent runs as root, checkouts, hooks, daemons, jobs and
    /// `~/.sandbox/setup` run as this user (system-level steps stay root).
    #[arg(long)]
    pub owner: Option<String>,
    /// Directory of secrets, one file per secret, for `{{secret "NAME"}}` in templates
    /// (default: ROOT/var/lib/cs-agent/secrets).
    #[arg(long)]
    pub secrets: Option<PathBuf>,
    /// Do not retry a failed setup step on its own (retry with `cs status --retry`).
    #[arg(long)]
    pub no_auto_retry: bool,
    /// How often Auto Mode polls the checkouts' remote branches, in milliseconds
    /// (default 30000, or $CS_AUTO_POLL_MS).
    #[arg(long, default_value_t = auto_poll_default())]
    pub auto_poll_ms: u64,
}

fn auto_poll_default() -> u64 {
    std::env::var("CS_AUTO_POLL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v >= 100)
        .unwrap_or(30_000)
}

/// Time sessions get between SIGHUP and SIGKILL when the agent shuts down.
const SHUTDOWN_GRACE_MS: u64 = 500;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::Serve(a) => serve(a),
        Cmd::Pair {
            address,
            root,
            token_ttl,
        } => {
            let paths = AgentPaths::new(&root);
            let id_dir = paths.state.join("identity");
            if !id_dir.join("cert.der").exists() {
                bail!(
                    "no agent identity under {}: run `cs-agent serve --root {}` first",
                    id_dir.display(),
                    root.display()
                );
            }
            let identity = Identity::load_or_create(&id_dir, "cs-agent")?;
            let trust = TrustStore::open(&paths.state)?;
            println!("{}", new_pairing(&trust, &identity, address, token_ttl)?);
            Ok(())
        }
        Cmd::Trust {
            cmd: TrustCmd::List { root, json },
        } => {
            let trust = TrustStore::open(&AgentPaths::new(&root).state)?;
            let keys = trust.trusted()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else if keys.is_empty() {
                println!("no trusted keys");
            } else {
                for k in keys {
                    println!("{}  enrolled at unix time {}", k.fingerprint, k.added_unix);
                }
            }
            Ok(())
        }
        Cmd::Trust {
            cmd: TrustCmd::Revoke { fingerprint, root },
        } => {
            let fp: Fingerprint = fingerprint.parse().map_err(anyhow::Error::msg)?;
            let trust = TrustStore::open(&AgentPaths::new(&root).state)?;
            if !trust.revoke(&fp)? {
                bail!(
                    "key {fp} is not trusted by the agent under {}",
                    root.display()
                );
            }
            println!("revoked {fp}");
            Ok(())
        }
    }
}

fn new_pairing(
    trust: &TrustStore,
    identity: &Identity,
    addr: SocketAddr,
    ttl: u64,
) -> anyhow::Result<Pairing> {
    let token = Token::generate(&mut rand::thread_rng());
    let now = unix_now();
    trust.add_token(&token, now + ttl, now)?;
    Ok(Pairing {
        addr,
        fingerprint: identity.fingerprint(),
        token,
    })
}

/// A definition, after checking all of it (a bad key or value is an error naming it and its
/// line).
fn load_definition(path: &Path) -> anyhow::Result<cs_supervisor::definition::Definition> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read definition {}", path.display()))?;
    cs_supervisor::definition::Definition::parse(&text)
        .with_context(|| format!("invalid definition {}", path.display()))
}

fn command_env(
    home: &Path,
    shell: &Path,
    workspace: &str,
    user: Option<&str>,
) -> Vec<(String, String)> {
    let user = user.map(str::to_string).or_else(|| {
        nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.name)
    });
    let user = user
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "owner".into());
    let mut env = vec![
        ("HOME".to_string(), home.display().to_string()),
        ("USER".to_string(), user.clone()),
        ("LOGNAME".to_string(), user),
        ("SHELL".to_string(), shell.display().to_string()),
        (
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        ),
        ("CS_WORKSPACE".to_string(), workspace.to_string()),
    ];
    for var in ["LANG", "LC_ALL", "LC_CTYPE", "TZ"] {
        if let Ok(v) = std::env::var(var) {
            env.push((var.to_string(), v));
        }
    }
    env
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    if !a.home.is_dir() {
        bail!("home directory {} does not exist", a.home.display());
    }
    let home = a
        .home
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", a.home.display()))?;
    let mut definition = None;
    let workspace = match (&a.definition, &a.workspace) {
        (Some(def), ws) => {
            let loaded = load_definition(def)?;
            let names: Vec<String> = loaded
                .workspaces
                .iter()
                .map(|w| w.name.as_str().to_string())
                .collect();
            definition = Some(loaded);
            match ws {
                Some(w) if names.contains(w) => w.clone(),
                Some(w) => bail!(
                    "workspace '{w}' is not in {} (it has: {})",
                    def.display(),
                    names.join(", ")
                ),
                None if names.len() == 1 => names[0].clone(),
                None => bail!(
                    "{} has {} workspaces; choose one with --workspace",
                    def.display(),
                    names.len()
                ),
            }
        }
        (None, ws) => ws.clone().unwrap_or_else(|| "dev".into()),
    };
    let paths = AgentPaths::new(&a.root);
    paths.create()?;
    let identity = Identity::load_or_create(
        &paths.state.join("identity"),
        &format!("cs-agent {workspace}"),
    )?;
    let trust = Arc::new(TrustStore::open(&paths.state)?);
    let owner = match &a.owner {
        Some(name) if nix::unistd::geteuid().is_root() => {
            Some(crate::supervise::identity::User::lookup(name)?)
        }
        Some(name) => {
            let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten();
            if me.as_ref().is_some_and(|u| &u.name == name) {
                None
            } else {
                bail!("--owner {name}: the agent runs as an ordinary user and can run programs only as itself; run it as root to use --owner");
            }
        }
        None => None,
    };
    if let Some(dir) = &a.secrets {
        if !dir.is_dir() {
            bail!("--secrets {}: not a directory", dir.display());
        }
    }
    let shell = a
        .shell
        .clone()
        .or_else(|| {
            owner
                .as_ref()
                .map(|u| u.shell.clone())
                .filter(|s| s.is_file())
        })
        .unwrap_or_else(default_shell);
    let env = command_env(
        &home,
        &shell,
        &workspace,
        owner.as_ref().map(|u| u.name.as_str()),
    );
    let root_env = if owner.is_some() {
        command_env(Path::new("/root"), &shell, &workspace, Some("root"))
    } else {
        env.clone()
    };
    let ws_def = definition
        .map(|d| {
            d.workspaces
                .into_iter()
                .find(|w| w.name.as_str() == workspace)
        })
        .unwrap_or_default();
    let spawn_user = owner.clone();
    let auto_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sup_cfg = crate::supervise::Config {
        workspace: ws_def,
        home: home.clone(),
        root: a.root.clone(),
        etc: paths.etc.clone(),
        state: paths.state.clone(),
        shell: shell.clone(),
        env: env.clone(),
        root_env,
        owner,
        // Default: ROOT/var/lib/cs-agent/secrets, owner-only like the rest of the state.
        secrets: a
            .secrets
            .clone()
            .or_else(|| Some(paths.state.join("secrets"))),
        auto_retry: !a.no_auto_retry,
        auto_poll_ms: a.auto_poll_ms,
        auto_flag: auto_flag.clone(),
    };

    // One thread: the actors, quinn and the pumps share it. On this workload a multi-thread
    // runtime spent more CPU handing buffers between threads than it gained (see ARCHITECTURE.md).
    let system = actix_rt::System::new();
    system.block_on(async move {
        let server_cfg = cs_transport::server_config(&identity, trust.clone(), &TransportLimits::default())?;
        let endpoint = cs_transport::endpoint::agent_endpoint(&identity, server_cfg, a.listen)
            .with_context(|| format!("cannot listen on {}", a.listen))?;
        let local = endpoint.local_addr()?;
        let advertise = a.advertise.unwrap_or(if local.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), local.port())
        } else {
            local
        });
        let pairing = new_pairing(&trust, &identity, advertise, a.token_ttl)?;
        std::fs::write(paths.state.join("agent.pid"), std::process::id().to_string())?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{pairing}")?;
            out.flush()?;
        }
        tracing::info!(%local, %workspace, home = %home.display(), key = %identity.fingerprint(), "serving");
        let spawner = OsSpawner { shell, home: home.clone(), env, user: spawn_user };
        let exec = ExecActor::new(Rc::new(spawner)).start();
        let logs = crate::logs::LogHub::new(paths.log.clone(), cs_log::rotate::Policy::DEFAULT);
        let supervisor = crate::supervise::Supervisor::new(
            sup_cfg,
            logs.clone(),
            Rc::new(crate::supervise::host::OsHost),
        )
        .start();
        let served = Served {
            workspace,
            trust: trust.clone(),
            exec: exec.clone(),
            rsync_home: Some(home.clone()),
            rsync_permits: Arc::new(tokio::sync::Semaphore::new(crate::rsync::RSYNC_STREAMS_MAX)),
            roots: Arc::new(crate::sync::HomeRoots {
                home,
                caches: Some(paths.state.join("sync-cache")),
            }),
            sync_permits: Arc::new(tokio::sync::Semaphore::new(crate::sync::SYNC_STREAMS_MAX)),
            supervisor: Some(supervisor.clone()),
            logs: Some(logs),
            log_permits: Arc::new(tokio::sync::Semaphore::new(crate::serve::LOG_STREAMS_MAX)),
            reverse: Default::default(),
            dial: crate::forward::os_dialer(),
            forward_permits: Arc::new(tokio::sync::Semaphore::new(crate::forward::FORWARD_STREAMS_MAX)),
            auto_mode: auto_flag,
        };
        let accept = tokio::spawn(accept_loop(endpoint.clone(), served));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            biased;
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        // Daemons, jobs and a running step get SIGTERM, a grace, then SIGKILL.
        let _ = supervisor.send(crate::supervise::Shutdown).await;
        // Hang up every session, as sshd's sessions are when it goes; then kill what stayed.
        let hung_up = exec.send(cs_exec::SignalAll(libc::SIGHUP)).await.unwrap_or(0);
        if hung_up > 0 {
            tracing::info!(sessions = hung_up, "hung up running sessions");
            tokio::time::sleep(std::time::Duration::from_millis(SHUTDOWN_GRACE_MS)).await;
            let _ = exec.send(cs_exec::SignalAll(libc::SIGKILL)).await;
        }
        endpoint.close(close::SHUTDOWN.into(), b"agent shutting down");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
        accept.abort();
        Ok(())
    })
}
