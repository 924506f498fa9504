//! `cs ssh`: a command, or an interactive shell on a PTY, in a workspace.
//!
//! The daemon opens the stream; this process speaks the exec protocol end to end with the
//! agent through the spliced socket, using the exec client core to prove the output whole.

use std::io::{IsTerminal, Write};
use std::os::fd::AsRawFd;

use anyhow::bail;
use cs_exec::{ClientEvent, ExecClient};
use cs_protocol::exec::{ExecInput, ExecOutput, ExecStart, PtySpec, WindowSize};
use cs_protocol::{StreamOpen, DATA_CHUNK_BYTES_MAX};
use cs_transport::{read_frame, write_frame};
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::home::CsHome;
use crate::wire::{build_id, Reply, Request};

/// Exit code of `cs ssh` when cs itself fails (as ssh uses 255).
pub const EXIT_CS_ERROR: i32 = 255;

/// The warning printed before a session in a workspace in Auto Mode (the agent's notice,
/// with how to turn it off).
pub fn auto_mode_warning(workspace: &str, notice: &str) -> String {
    let sandbox = workspace.split('/').next().unwrap_or(workspace);
    let ws = workspace.split('/').nth(1).unwrap_or(workspace);
    format!(
        "warning: {workspace}: {notice}; `cs sandbox update {sandbox} -m {ws}=MANUAL` turns it off"
    )
}

/// Whether to allocate a PTY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtyMode {
    /// A PTY for an interactive shell when stdin is a terminal (ssh's default).
    Auto,
    Force,
    Never,
}

/// Runs the session and returns the exit code for cs.
/// `forward_stdin: false` sends an immediate EOF instead of reading the laptop's stdin.
pub async fn run(
    home: &CsHome,
    workspace: &str,
    command: Option<String>,
    mode: PtyMode,
    forward_stdin: bool,
) -> anyhow::Result<i32> {
    let tty = std::io::stdin().is_terminal();
    let pty = match mode {
        PtyMode::Force => true,
        PtyMode::Never => false,
        PtyMode::Auto => command.is_none() && tty,
    };
    let pty_spec = pty.then(|| PtySpec {
        term: std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
        size: window_size().unwrap_or(WindowSize { rows: 24, cols: 80 }),
    });
    // Register signal handlers before the command can run, so that an early Ctrl-C is
    // forwarded rather than killing cs.
    let kinds = [
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::hangup(), libc::SIGHUP),
        (SignalKind::quit(), libc::SIGQUIT),
        (SignalKind::window_change(), libc::SIGWINCH),
    ];
    let mut signals = Vec::new();
    for (kind, num) in kinds {
        signals.push((signal(kind)?, num));
    }
    let open = StreamOpen::Exec(ExecStart {
        command,
        pty: pty_spec,
    });
    let req = Request::Open {
        build: build_id(),
        workspace: workspace.to_string(),
        open,
    };
    let (stream, reply) = crate::client::request(home, &req).await?;
    match reply {
        Reply::Opened => {}
        Reply::Error { message } => bail!("{message}"),
        other => bail!("unexpected reply from the cs daemon: {other:?}"),
    }
    let (mut rd, mut wr) = stream.into_split();

    let raw = if pty && tty {
        Some(RawMode::enter()?)
    } else {
        None
    };
    let (tx, mut rx) = mpsc::channel::<ExecInput>(16);

    // Writer: the only task that writes to the stream.
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if write_frame(&mut wr, &msg).await.is_err() {
                break;
            }
        }
    });
    // Stdin, forwarded in chunks; EOF included.
    let stdin_tx = tx.clone();
    if !forward_stdin {
        let _ = stdin_tx.send(ExecInput::StdinEof).await;
    }
    tokio::spawn(async move {
        if !forward_stdin {
            return;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; DATA_CHUNK_BYTES_MAX];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = stdin_tx.send(ExecInput::StdinEof).await;
                    break;
                }
                Ok(n) => {
                    if stdin_tx
                        .send(ExecInput::Stdin(buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    // Signals: without a PTY, Ctrl-C and friends go to the remote process group; with one,
    // Ctrl-C is a byte on stdin and only window changes need sending.
    let sig_tx = tx.clone();
    tokio::spawn(async move {
        let (stx, mut srx) = mpsc::channel::<i32>(8);
        for (mut s, num) in signals {
            let stx = stx.clone();
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    if stx.send(num).await.is_err() {
                        break;
                    }
                }
            });
        }
        while let Some(num) = srx.recv().await {
            let msg = if num == libc::SIGWINCH {
                if !pty {
                    continue;
                }
                match window_size() {
                    Some(size) => ExecInput::Resize(size),
                    None => continue,
                }
            } else {
                ExecInput::Signal(num)
            };
            if sig_tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    drop(tx);

    let mut client = ExecClient::new();
    let outcome = loop {
        let ev = match read_frame::<_, ExecOutput>(&mut rd).await {
            Ok(Some(msg)) => client.handle_output(msg),
            Ok(None) => client.handle_stream_end("the stream ended"),
            Err(e) => client.handle_stream_end(&e.to_string()),
        };
        match ev {
            Some(ClientEvent::Stdout(data)) => write_out(&mut std::io::stdout().lock(), &data),
            Some(ClientEvent::Stderr(data)) => write_out(&mut std::io::stderr().lock(), &data),
            Some(ClientEvent::Started { .. }) | None => {}
            Some(ClientEvent::Notice(text)) => {
                // "\r\n": the terminal may be in raw mode already.
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "{}\r\n", auto_mode_warning(workspace, &text));
                let _ = err.flush();
            }
            Some(ClientEvent::Exited(status)) => break Ok(status.shell_code()),
            Some(ClientEvent::Failed(reason)) => break Err(reason),
        }
    };
    writer.abort();
    drop(raw);
    match outcome {
        Ok(code) => Ok(code),
        Err(reason) => bail!("{reason}"),
    }
}

fn write_out(w: &mut impl Write, data: &[u8]) {
    // A closed stdout (`cs ssh ... | head`) is not an error of the session.
    let _ = w.write_all(data).and_then(|()| w.flush());
}

fn window_size() -> Option<WindowSize> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let fd = std::io::stdout().as_raw_fd();
    // SAFETY: TIOCGWINSZ writes one winsize into the pointed-to struct, which lives here.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// The laptop terminal in raw mode; restored on drop, and by [`restore_terminal`] on paths
/// that exit without dropping (a panic, `process::exit`).
pub struct RawMode;

static SAVED_TERMIOS: std::sync::Mutex<Option<nix::sys::termios::Termios>> =
    std::sync::Mutex::new(None);

impl RawMode {
    fn enter() -> anyhow::Result<Self> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        *SAVED_TERMIOS.lock().unwrap_or_else(|p| p.into_inner()) = Some(saved);
        tcsetattr(&stdin, SetArg::TCSADRAIN, &raw)?;
        Ok(Self)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Puts the terminal back as it was before raw mode, if it was changed.
pub fn restore_terminal() {
    if let Some(saved) = SAVED_TERMIOS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSADRAIN,
            &saved,
        );
    }
}
