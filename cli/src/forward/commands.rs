//! `cs portforward [-W SB/WS] [-PF] [-L RULE]... [-R RULE]... [--detach] [--name NAME]`,
//! `cs portforward list [--json]` and `cs portforward stop NAME`.

use anyhow::bail;
use cs_transport::read_frame;

use super::{ForwardSpec, SessionView};
use crate::home::CsHome;
use crate::wire::{build_id, ForwardAnswer, ForwardCommand, Reply, Request};

/// What `cs portforward` was given.
#[derive(Debug, Clone)]
pub struct Args {
    pub workspace: Option<String>,
    /// `-PF`: no auto-discovered forwards.
    pub no_auto: bool,
    pub local: Vec<String>,
    pub remote: Vec<String>,
    pub detach: bool,
    pub name: Option<String>,
}

async fn ask(
    home: &CsHome,
    cmd: ForwardCommand,
) -> anyhow::Result<(tokio::net::UnixStream, ForwardAnswer)> {
    let req = Request::Forward {
        build: build_id(),
        cmd,
    };
    match crate::client::request(home, &req).await? {
        (s, Reply::Forward(a)) => Ok((s, a)),
        (_, Reply::Error { message }) => bail!("{message}"),
        (_, other) => bail!("unexpected reply from the cs daemon: {other:?}"),
    }
}

/// Checks the arguments into a session's spec.
pub fn spec(home: &CsHome, a: &Args) -> anyhow::Result<ForwardSpec> {
    let local = a
        .local
        .iter()
        .map(|r| cs_forward::parse_local(r))
        .collect::<Result<Vec<_>, _>>()?;
    let remote = a
        .remote
        .iter()
        .map(|r| cs_forward::parse_remote(r))
        .collect::<Result<Vec<_>, _>>()?;
    if a.no_auto && local.is_empty() && remote.is_empty() {
        bail!("nothing to forward: -PF turns off the auto-discovered ports and no -L or -R rule was given");
    }
    if let Some(n) = &a.name {
        super::check_name(n).map_err(anyhow::Error::msg)?;
    }
    let (key, _) = home.registry()?.resolve(a.workspace.as_deref())?;
    Ok(ForwardSpec {
        name: a.name.clone().unwrap_or_default(),
        workspace: key.to_string(),
        local,
        remote,
        auto: !a.no_auto,
        detached: a.detach,
    })
}

/// `cs portforward ...`: starts the session; in the foreground, prints its notes until
/// Ctrl-C (or SIGTERM), which stops it.
pub async fn run(home: &CsHome, a: Args) -> anyhow::Result<()> {
    let spec = spec(home, &a)?;
    let detached = spec.detached;
    let (mut stream, answer) = ask(home, ForwardCommand::Start(spec)).await?;
    let ForwardAnswer::Started(name) = answer else {
        bail!("unexpected reply from the cs daemon: {answer:?}");
    };
    if detached {
        println!("port-forward session {name} runs in the cs daemon; `cs portforward list` shows it, `cs portforward stop {name}` ends it");
        return Ok(());
    }
    eprintln!("port-forward session {name}: Ctrl-C stops it");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // On a terminal, the forwards' live counters are redrawn under the notes every second.
    let live = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut board = Board::default();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let result = loop {
        let frame = tokio::select! {
            biased;
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = term.recv() => break Ok(()),
            f = read_frame::<_, Reply>(&mut stream) => f,
            _ = tick.tick(), if live => {
                if let Ok(l) = sessions(home).await {
                    if let Some(s) = l.iter().find(|s| s.name == name) {
                        board.draw(&forward_lines(s));
                    }
                }
                continue;
            }
        };
        match frame {
            Ok(Some(Reply::Forward(ForwardAnswer::Note(n)))) => board.note(&n),
            Ok(Some(Reply::Forward(ForwardAnswer::Skipped(k)))) => board.note(&format!(
                "({k} messages skipped: this terminal fell behind)"
            )),
            Ok(Some(other)) => {
                break Err(anyhow::anyhow!(
                    "unexpected message from the cs daemon: {other:?}"
                ))
            }
            Ok(None) | Err(_) => {
                break Err(anyhow::anyhow!(
                    "the cs daemon stopped; the port-forward session {name} ended with it"
                ))
            }
        }
    };
    board.draw(&[]);
    result
}

/// The notes printed as they come, and (on a terminal) the forwards' lines under them,
/// redrawn in place.
#[derive(Default)]
struct Board {
    drawn: usize,
    last: Vec<String>,
}

impl Board {
    fn clear(&mut self) {
        if self.drawn > 0 {
            // Up to the board's first line, and clear to the end of the screen.
            print!("\x1b[{}A\r\x1b[J", self.drawn);
            self.drawn = 0;
        }
    }

    fn note(&mut self, line: &str) {
        self.clear();
        println!("{line}");
        let last = std::mem::take(&mut self.last);
        self.draw(&last);
    }

    fn draw(&mut self, lines: &[String]) {
        use std::io::Write;
        self.clear();
        for l in lines {
            println!("{l}");
        }
        self.drawn = lines.len();
        self.last = lines.to_vec();
        let _ = std::io::stdout().flush();
    }
}

fn forward_lines(s: &SessionView) -> Vec<String> {
    s.forwards.iter().map(forward_line).collect()
}

fn forward_line(f: &super::ForwardView) -> String {
    let owner = match (&f.daemon, &f.process) {
        (Some(d), _) => format!(" daemon {d}"),
        (None, Some(p)) => format!(" {p}"),
        _ => String::new(),
    };
    let err = f
        .last_error
        .as_ref()
        .map(|e| format!(" last error: {e}"))
        .unwrap_or_default();
    format!(
        "  {:<6} {} -> {}{owner}  open {} total {} out {} in {} refused {} lost {}{err}",
        f.kind,
        f.local,
        f.remote,
        f.open,
        f.total,
        bytes(f.bytes_out),
        bytes(f.bytes_in),
        f.refused,
        f.lost
    )
}

async fn sessions(home: &CsHome) -> anyhow::Result<Vec<SessionView>> {
    match ask(home, ForwardCommand::List).await? {
        (_, ForwardAnswer::List(l)) => Ok(l),
        (_, other) => bail!("unexpected reply from the cs daemon: {other:?}"),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// `cs portforward list [--json]`.
pub async fn list(home: &CsHome, json: bool) -> anyhow::Result<()> {
    let l = sessions(home).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&l)?);
        return Ok(());
    }
    if l.is_empty() {
        println!("no port-forward sessions; start one with `cs portforward -L LOCAL:REMOTE`");
        return Ok(());
    }
    for s in &l {
        println!(
            "{} on {}{}{}",
            s.name,
            s.workspace,
            if s.detached { " (detached)" } else { "" },
            if s.auto {
                ""
            } else {
                " (-PF: no auto-discovered ports)"
            }
        );
        for line in forward_lines(s) {
            println!("{line}");
        }
    }
    Ok(())
}

/// `cs portforward stop NAME`.
pub async fn stop(home: &CsHome, name: &str) -> anyhow::Result<()> {
    match ask(home, ForwardCommand::Stop(name.to_string())).await? {
        (_, ForwardAnswer::Done) => {
            println!("stopped port-forward session {name}");
            Ok(())
        }
        (_, other) => bail!("unexpected reply from the cs daemon: {other:?}"),
    }
}
