//! `cs`: the laptop side of cs. Commands either act on local state (`cs sandbox`) or go
//! through the laptop daemon, which holds one QUIC connection per workspace (`cs ssh`).
//!
//! Exit codes: `cs ssh` exits with the remote command's code (128+N for a death by signal N)
//! and 255 when cs itself fails, as ssh does; other commands exit 0 on success, 1 on failure
//! and 2 on a usage error.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Parser, Subcommand};
use cs_cli::home::CsHome;
use cs_cli::{automation, client, daemon, sandbox, ssh, sync, wire};
use cs_protocol::supervise::{SuperviseReply, SuperviseRequest};

/// Edit on your laptop, build and run in a cloud workspace.
#[derive(Debug, Parser)]
#[command(name = "cs", version, about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create, pair, list and remove sandboxes.
    Sandbox {
        #[command(subcommand)]
        cmd: SandboxCmd,
    },
    /// Run a command in a workspace, or an interactive shell without one.
    Ssh {
        /// The workspace, as SANDBOX/WORKSPACE (or SANDBOX when it has one workspace).
        #[arg(short = 'W', long = "workspace")]
        workspace: Option<String>,
        /// Allocate a PTY even for a command.
        #[arg(short = 't', conflicts_with = "no_pty")]
        pty: bool,
        /// Never allocate a PTY.
        #[arg(short = 'T')]
        no_pty: bool,
        /// The command; its words are joined with spaces and run by the workspace's shell.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Continuous two-way sync between a local directory and a workspace (Mutagen's flags
    /// after `--`), e.g. `cs mutagen ~/backend jack/backend:backend -- --ignore-vcs`.
    Mutagen {
        /// The local directory (alpha).
        local: String,
        /// SANDBOX/WORKSPACE:PATH (beta); PATH is relative to the workspace home, or ~/PATH.
        target: String,
        /// Mutagen-style flags: --name, --sync-mode, --ignore, --ignore-vcs, --ignore-gitignored.
        #[arg(last = true, allow_hyphen_values = true)]
        flags: Vec<String>,
    },
    /// Continuous sync sessions: create, list, monitor, flush, pause, resume, reset, terminate.
    Sync {
        #[command(subcommand)]
        cmd: SyncCmd,
    },
    /// Every daemon and job of a workspace: state, pid, restarts, last exit, next run.
    Ps {
        #[arg(short = 'W', long = "workspace")]
        workspace: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The workspace's start sequence: Progressing, Ready or Problematic, and what blocks it.
    Status {
        #[arg(short = 'W', long = "workspace")]
        workspace: Option<String>,
        #[arg(long)]
        json: bool,
        /// Retry the failed step now (when automatic retry is off, or to not wait for it).
        #[arg(long)]
        retry: bool,
    },
    /// Start a daemon (or run a job now).
    Start {
        #[arg(short = 'W', long = "workspace")]
        workspace: Option<String>,
        name: String,
    },
    /// Stop a daemon (SIGTERM to its process group, then SIGKILL); it stays stopped.
    Stop {
        #[arg(short = 'W', long = "workspace")]
        workspace: Option<String>,
        name: String,
    },
    /// Restart a daemon, or every daemon without a name.
    Restart {
        #[arg(short = 'W', long = "workspace")]
        workspace: Option<String>,
        name: Option<String>,
    },
    /// Run the build hooks of every checkout again (then `cs restart` restarts the daemons).
    Build {
        #[arg(short = 'W', long = "workspace")]
        workspace: Option<String>,
    },
    /// Show a daemon's, job's or setup step's log (`setup`, `checkout:PATH`, `build:PATH`).
    Logs {
        #[arg(short = 'W', long = "workspace")]
        workspace: Option<String>,
        name: String,
        /// Keep printing new lines (survives a reconnect with no gap and no repeat).
        #[arg(short = 'f', long)]
        follow: bool,
        /// Lines to show first.
        #[arg(short = 'n', long = "lines", default_value_t = 100)]
        lines: u32,
        /// Prefix each line with its sequence number and Unix time in milliseconds.
        #[arg(long)]
        stamps: bool,
    },
    /// One transfer with rsync's semantics (`man rsync`), either way:
    /// `cs rsync [FLAGS] LOCAL SANDBOX/WORKSPACE:PATH` or `cs rsync [FLAGS] SB/WS:PATH LOCAL`.
    /// Flags: -a -r -l -p -t -g -o -D -d -v -n -c -i -P --delete --delete-excluded --exclude
    /// --include --exclude-from --filter --partial --stats --progress, and -z (content always
    /// travels packed); any other is refused.
    #[command(disable_help_flag = true)]
    Rsync {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Forward ports between the laptop and a workspace: the workspace's listening ports as
    /// they appear (unless -PF), -L rules (laptop to workspace) and -R rules (workspace to
    /// laptop). Runs until Ctrl-C, or in the cs daemon with --detach.
    #[command(args_conflicts_with_subcommands = true)]
    Portforward {
        #[command(subcommand)]
        cmd: Option<PortforwardCmd>,
        #[arg(short = 'W', long = "workspace")]
        workspace: Option<String>,
        /// (-PF) Do not forward the workspace's listening ports on their own.
        #[arg(long = "no-auto")]
        no_auto: bool,
        /// [BIND:]LOCAL:[HOST:]REMOTE: listen on the laptop (127.0.0.1 unless BIND), connect
        /// in the workspace; either end may be a Unix socket's path.
        #[arg(short = 'L', value_name = "RULE")]
        local: Vec<String>,
        /// [BIND:]REMOTE:[HOST:]LOCAL: listen in the workspace, connect on the laptop.
        #[arg(short = 'R', value_name = "RULE")]
        remote: Vec<String>,
        /// Leave the session to the cs daemon and return (`cs portforward list|stop`).
        #[arg(long)]
        detach: bool,
        /// The session's name (default pf-N).
        #[arg(long)]
        name: Option<String>,
    },
    /// Create (once) the local sandbox `demo`: a checkout built by its hook, a daemon and a cron
    /// job; then run commands in it.
    Demo,
    /// The laptop daemon that holds the connections.
    Daemon {
        #[command(subcommand)]
        cmd: DaemonCmd,
    },
}

#[derive(Debug, Subcommand)]
enum PortforwardCmd {
    /// Every port-forward session of the cs daemon, with each forward's connections and bytes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop a port-forward session: its listeners close and its connections end.
    Stop { name: String },
}

#[derive(Debug, Subcommand)]
enum SandboxCmd {
    /// Create a sandbox. With --local, its workspaces run on this machine.
    Create {
        name: String,
        /// Run the workspaces as local agents on this machine (the embedded default).
        #[arg(long)]
        local: bool,
        /// Sandbox definition (YAML, `workspaces:` form); default: one workspace `dev`.
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// Do not retry a failed setup step on its own; `cs status --retry` retries it.
        #[arg(long)]
        no_auto_retry: bool,
    },
    /// Record a remote agent from the pairing line `cs-agent serve` printed.
    Add {
        /// SANDBOX/WORKSPACE to record it as.
        target: String,
        pairing: String,
    },
    /// List all workspaces.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox's workspaces.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop a sandbox's local agents and forget it.
    Delete { name: String },
    /// Make SANDBOX/WORKSPACE the default for -W.
    Use { target: String },
    /// Put workspaces in Auto Mode or back in Manual: `-m WS=AUTO -m WS2=MANUAL`.
    Update {
        name: String,
        /// WORKSPACE=AUTO or WORKSPACE=MANUAL (repeatable).
        #[arg(short = 'm', long = "mode", required = true)]
        modes: Vec<String>,
    },
    /// Enable or disable a cron job.
    Job {
        #[command(subcommand)]
        cmd: JobCmd,
    },
}

#[derive(Debug, Subcommand)]
enum JobCmd {
    /// Let the job run on its schedule.
    Enable {
        #[arg(short = 'W', long = "workspace")]
        workspace: Option<String>,
        name: String,
    },
    /// Keep the job from running on its schedule.
    Disable {
        #[arg(short = 'W', long = "workspace")]
        workspace: Option<String>,
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum SyncCmd {
    /// Start syncing LOCAL with SANDBOX/WORKSPACE:PATH; prints the session's name.
    Create {
        local: String,
        target: String,
        /// Session name (default: from the local directory's name).
        #[arg(long)]
        name: Option<String>,
        /// two-way-safe (default), two-way-resolved, one-way-safe or one-way-replica.
        #[arg(long, alias = "sync-mode")]
        mode: Option<String>,
        /// Gitignore-syntax pattern to ignore (repeatable).
        #[arg(long)]
        ignore: Vec<String>,
        /// Ignore version-control directories (.git, .hg, ...).
        #[arg(long)]
        ignore_vcs: bool,
        /// Honour the tree's own .gitignore files.
        #[arg(long)]
        ignore_gitignored: bool,
        /// Halt when a side holds more entries than this (default 1M; e.g. 2M).
        #[arg(long)]
        max_entry_count: Option<String>,
        /// Report larger files as problems instead of syncing them (default 16GiB).
        #[arg(long, alias = "max-staging-file-size")]
        max_file_size: Option<String>,
    },
    /// Every session: endpoints, mode, state, conflicts, problems, last error.
    List {
        #[arg(long)]
        json: bool,
    },
    /// A session's live status until Ctrl-C.
    Monitor {
        name: String,
    },
    /// Return once both sides of the session agree.
    Flush {
        name: String,
    },
    Pause {
        name: String,
    },
    /// Resume a paused or halted session.
    Resume {
        name: String,
    },
    /// Forget what the session last agreed on; the next cycle starts from scratch.
    Reset {
        name: String,
    },
    /// Stop the session and forget it (files stay as they are).
    Terminate {
        name: String,
    },
    /// Each conflict with both sides' size, hash and type.
    Conflicts {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DaemonCmd {
    /// Show the daemon's connections.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Stop the daemon (it starts again when needed).
    Stop,
    /// Run the daemon in the foreground (cs starts it by itself).
    #[command(hide = true)]
    Run,
}

fn init_tracing(daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime only fails when the OS refuses threads")
}

/// `-PF` (the page's spelling) is `--no-auto` to clap, whose short flags are one letter.
fn argv() -> Vec<std::ffi::OsString> {
    let mut seen_portforward = false;
    std::env::args_os()
        .map(|a| {
            if a == "portforward" {
                seen_portforward = true;
            }
            if seen_portforward && a == "-PF" {
                "--no-auto".into()
            } else {
                a
            }
        })
        .collect()
}

fn main() {
    let args = Args::parse_from(argv());
    let is_daemon = matches!(
        args.cmd,
        Cmd::Daemon {
            cmd: DaemonCmd::Run
        }
    );
    let is_ssh = matches!(args.cmd, Cmd::Ssh { .. });
    init_tracing(is_daemon);
    std::panic::set_hook(Box::new(|info| {
        ssh::restore_terminal();
        eprintln!("cs: internal error: {info}");
    }));
    let code = match run(args) {
        Ok(code) => code,
        Err(e) => {
            ssh::restore_terminal();
            eprintln!("cs: {e:#}");
            if is_ssh {
                ssh::EXIT_CS_ERROR
            } else {
                1
            }
        }
    };
    std::process::exit(code);
}

fn run(args: Args) -> anyhow::Result<i32> {
    let home = CsHome::locate()?;
    match args.cmd {
        Cmd::Daemon {
            cmd: DaemonCmd::Run,
        } => {
            daemon::run(home)?;
            Ok(0)
        }
        cmd => {
            let rt = runtime();
            let result = rt.block_on(run_async(home, cmd));
            // Do not wait for the blocking stdin reader of `cs ssh`: it may sit in read(2) on a
            // terminal until the user types.
            rt.shutdown_background();
            result
        }
    }
}

async fn run_async(home: CsHome, cmd: Cmd) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Sandbox { cmd } => {
            match cmd {
                SandboxCmd::Create {
                    name,
                    local,
                    file,
                    no_auto_retry,
                } => {
                    if !local {
                        bail!("only local sandboxes can be created here: pass --local, or pair a remote agent with `cs sandbox add`");
                    }
                    sandbox::create(&home, &name, file.as_deref(), no_auto_retry).await?
                }
                SandboxCmd::Add { target, pairing } => {
                    sandbox::add(&home, &target, &pairing).await?
                }
                SandboxCmd::List { json } => sandbox::list(&home, None, json).await?,
                SandboxCmd::Show { name, json } => sandbox::list(&home, Some(&name), json).await?,
                SandboxCmd::Delete { name } => sandbox::delete(&home, &name).await?,
                SandboxCmd::Use { target } => sandbox::use_default(&home, &target)?,
                SandboxCmd::Update { name, modes } => {
                    let reg = home.registry()?;
                    let mut asks = Vec::new();
                    for m in &modes {
                        let Some((ws, mode)) = m.split_once('=') else {
                            bail!("-m {m}: expected WORKSPACE=AUTO or WORKSPACE=MANUAL");
                        };
                        let auto = match mode.to_ascii_uppercase().as_str() {
                            "AUTO" => true,
                            "MANUAL" => false,
                            _ => bail!("-m {m}: the mode '{mode}' is not AUTO or MANUAL"),
                        };
                        let (r, _) = reg.resolve(Some(&format!("{name}/{ws}")))?;
                        asks.push((r.to_string(), auto));
                    }
                    for (ws, auto) in asks {
                        match automation::ask(&home, &ws, SuperviseRequest::Mode(auto)).await? {
                            SuperviseReply::Done(msg) => println!("{ws}: {msg}"),
                            other => automation::done(other)?,
                        }
                    }
                }
                SandboxCmd::Job { cmd } => {
                    let (ws, name, on) = match cmd {
                        JobCmd::Enable { workspace, name } => (workspace, name, true),
                        JobCmd::Disable { workspace, name } => (workspace, name, false),
                    };
                    let ws = resolve(&home, ws.as_deref())?;
                    let req = SuperviseRequest::JobEnabled(name, on);
                    automation::done(automation::ask(&home, &ws, req).await?)?;
                }
            }
            Ok(0)
        }
        Cmd::Ps { workspace, json } => {
            let ws = resolve(&home, workspace.as_deref())?;
            match automation::ask(&home, &ws, SuperviseRequest::Ps).await? {
                SuperviseReply::Ps(procs) => automation::print_ps(&procs, json)?,
                other => automation::done(other)?,
            }
            Ok(0)
        }
        Cmd::Status {
            workspace,
            json,
            retry,
        } => {
            let ws = resolve(&home, workspace.as_deref())?;
            if retry {
                automation::done(automation::ask(&home, &ws, SuperviseRequest::Retry).await?)?;
                return Ok(0);
            }
            match automation::ask(&home, &ws, SuperviseRequest::Status).await? {
                SuperviseReply::Status(s) => {
                    automation::print_status(&s, json)?;
                    // Scripts can wait for Ready: Problematic exits 1, Progressing 3.
                    Ok(match s.state.as_str() {
                        "Ready" => 0,
                        "Problematic" => 1,
                        _ => 3,
                    })
                }
                other => automation::done(other).map(|_| 0),
            }
        }
        Cmd::Start { workspace, name } => {
            let ws = resolve(&home, workspace.as_deref())?;
            automation::done(automation::ask(&home, &ws, SuperviseRequest::Start(name)).await?)?;
            Ok(0)
        }
        Cmd::Stop { workspace, name } => {
            let ws = resolve(&home, workspace.as_deref())?;
            automation::done(automation::ask(&home, &ws, SuperviseRequest::Stop(name)).await?)?;
            Ok(0)
        }
        Cmd::Restart { workspace, name } => {
            let ws = resolve(&home, workspace.as_deref())?;
            let req = match name {
                Some(n) => SuperviseRequest::Restart(n),
                None => SuperviseRequest::RestartAll,
            };
            automation::done(automation::ask(&home, &ws, req).await?)?;
            Ok(0)
        }
        Cmd::Build { workspace } => {
            let ws = resolve(&home, workspace.as_deref())?;
            automation::done(automation::ask(&home, &ws, SuperviseRequest::Build).await?)?;
            Ok(0)
        }
        Cmd::Logs {
            workspace,
            name,
            follow,
            lines,
            stamps,
        } => {
            let ws = resolve(&home, workspace.as_deref())?;
            automation::logs(&home, &ws, &name, follow, lines, stamps).await?;
            Ok(0)
        }
        Cmd::Rsync { args } => Ok(cs_cli::rsync::run(&home, &args).await),
        Cmd::Portforward {
            cmd: Some(PortforwardCmd::List { json }),
            ..
        } => {
            cs_cli::forward::commands::list(&home, json).await?;
            Ok(0)
        }
        Cmd::Portforward {
            cmd: Some(PortforwardCmd::Stop { name }),
            ..
        } => {
            cs_cli::forward::commands::stop(&home, &name).await?;
            Ok(0)
        }
        Cmd::Portforward {
            cmd: None,
            workspace,
            no_auto,
            local,
            remote,
            detach,
            name,
        } => {
            let a = cs_cli::forward::commands::Args {
                workspace,
                no_auto,
                local,
                remote,
                detach,
                name,
            };
            cs_cli::forward::commands::run(&home, a).await?;
            Ok(0)
        }
        Cmd::Ssh {
            workspace,
            pty,
            no_pty,
            command,
        } => {
            let reg = home.registry()?;
            let (r, _) = reg.resolve(workspace.as_deref())?;
            let command = (!command.is_empty()).then(|| command.join(" "));
            let mode = if pty {
                ssh::PtyMode::Force
            } else if no_pty {
                ssh::PtyMode::Never
            } else {
                ssh::PtyMode::Auto
            };
            ssh::run(&home, &r.to_string(), command, mode, true).await
        }
        Cmd::Mutagen {
            local,
            target,
            flags,
        } => {
            let mut args = sync::commands::CreateArgs {
                local,
                target,
                ..Default::default()
            };
            args.add_flags(&flags)?;
            sync::commands::create(&home, args).await?;
            Ok(0)
        }
        Cmd::Sync { cmd } => {
            use cs_cli::wire::SyncCommand as C;
            use sync::commands as c;
            match cmd {
                SyncCmd::Create {
                    local,
                    target,
                    name,
                    mode,
                    ignore,
                    ignore_vcs,
                    ignore_gitignored,
                    max_entry_count,
                    max_file_size,
                } => {
                    let args = c::CreateArgs {
                        local,
                        target,
                        name,
                        mode,
                        ignore,
                        ignore_vcs,
                        ignore_gitignored,
                        max_entry_count,
                        max_file_size,
                    };
                    c::create(&home, args).await?
                }
                SyncCmd::List { json } => c::list(&home, json).await?,
                SyncCmd::Monitor { name } => c::monitor(&home, &name).await?,
                SyncCmd::Flush { name } => c::flush(&home, &name).await?,
                SyncCmd::Pause { name } => c::control(&home, C::Pause(name)).await?,
                SyncCmd::Resume { name } => c::control(&home, C::Resume(name)).await?,
                SyncCmd::Reset { name } => c::control(&home, C::Reset(name)).await?,
                SyncCmd::Terminate { name } => c::control(&home, C::Terminate(name)).await?,
                SyncCmd::Conflicts { name, json } => c::conflicts(&home, &name, json).await?,
            }
            Ok(0)
        }
        Cmd::Demo => cs_cli::demo::run(&home).await,
        Cmd::Daemon {
            cmd: DaemonCmd::Stop,
        } => {
            if client::stop(&home).await? {
                println!("daemon stopped");
            } else {
                println!("daemon was not running");
            }
            Ok(0)
        }
        Cmd::Daemon {
            cmd: DaemonCmd::Status { json },
        } => {
            let (_, reply) = client::request(
                &home,
                &wire::Request::Status {
                    build: wire::build_id(),
                },
            )
            .await?;
            let wire::Reply::Status(st) = reply else {
                bail!("unexpected reply from the cs daemon: {reply:?}")
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!(
                    "daemon pid {} ({}), socket {}",
                    st.pid,
                    st.build,
                    home.socket().display()
                );
                if st.links.is_empty() {
                    println!("no connections yet");
                }
                for l in &st.links {
                    let err = l
                        .last_error
                        .as_deref()
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default();
                    println!(
                        "{:<24} {:<22} {:<11} connects {} streams {}{err}",
                        l.workspace, l.addr, l.state, l.connects, l.streams_opened
                    );
                }
            }
            Ok(0)
        }
        Cmd::Daemon {
            cmd: DaemonCmd::Run,
        } => unreachable!("handled before the runtime starts"),
    }
}

/// `cs demo`: the first thing a newcomer runs.
/// The workspace `-W` names (or the default), as SANDBOX/WORKSPACE.
fn resolve(home: &CsHome, workspace: Option<&str>) -> anyhow::Result<String> {
    let reg = home.registry()?;
    let (r, _) = reg.resolve(workspace)?;
    Ok(r.to_string())
}
