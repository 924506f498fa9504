//! Real processes for exec sessions: pipes or a PTY, process groups, signals and resizes.
//!
//! Implements [`cs_exec::Spawner`] with the operating system. Each child gets bounded channels
//! (see `cs_exec::spawn`); the pump tasks here block on them, so a child that writes faster than
//! the network drains blocks on its own pipe instead of filling memory.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use cs_exec::spawn::CHILD_CHANNEL_CHUNKS_MAX;
use cs_exec::{ChildEvent, ChildHandle, Control, SpawnRequest, Spawner, StdinMsg};
use cs_protocol::exec::{ExitStatus, WindowSize};
use cs_protocol::DATA_CHUNK_BYTES_MAX;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Control requests buffered per child.
const CONTROL_CHANNEL_MAX: usize = 8;

/// Runs commands as the agent's user, in the workspace home, with a clean environment.
#[derive(Debug, Clone)]
pub struct OsSpawner {
    pub shell: PathBuf,
    pub home: PathBuf,
    /// The whole environment of a command (HOME, USER, PATH, SHELL, ...); TERM is added for a PTY.
    pub env: Vec<(String, String)>,
}

/// `$SHELL` if it is an absolute path that exists, else the user's login shell, else /bin/sh.
pub fn default_shell() -> PathBuf {
    if let Some(s) = std::env::var_os("SHELL").map(PathBuf::from) {
        if s.is_absolute() && s.exists() {
            return s;
        }
    }
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.shell)
        .filter(|s| s.is_absolute() && s.exists())
        .unwrap_or_else(|| PathBuf::from("/bin/sh"))
}

impl Spawner for OsSpawner {
    fn spawn(&self, req: &SpawnRequest) -> Result<ChildHandle, String> {
        let mut cmd = std::process::Command::new(&self.shell);
        match &req.command {
            Some(c) => {
                cmd.arg("-c").arg(c);
            }
            None => {
                // A login shell, as sshd starts it: argv[0] is "-" and the shell's name.
                let name = self
                    .shell
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                cmd.arg0(format!("-{name}"));
            }
        }
        cmd.current_dir(&self.home)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let fail = |e: io::Error| format!("cannot run {}: {e}", self.shell.display());
        if !self.home.is_dir() {
            return Err(format!(
                "cannot run {}: home {} does not exist",
                self.shell.display(),
                self.home.display()
            ));
        }
        match &req.pty {
            None => spawn_piped(cmd).map_err(fail),
            Some(pty) => {
                cmd.env("TERM", &pty.term);
                spawn_pty(cmd, pty.size).map_err(fail)
            }
        }
    }
}

fn exit_status(st: std::process::ExitStatus) -> ExitStatus {
    match (st.code(), st.signal()) {
        (Some(c), _) => ExitStatus::Code(c),
        (None, Some(s)) => ExitStatus::Signal(s),
        // Neither a code nor a signal cannot happen for an exited child on Unix.
        (None, None) => ExitStatus::Code(255),
    }
}

fn killpg(pid: u32, sig: i32) {
    let Ok(sig) = nix::sys::signal::Signal::try_from(sig) else {
        tracing::warn!(sig, "ignoring an unknown signal number");
        return;
    };
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), sig);
}

fn spawn_piped(cmd: std::process::Command) -> io::Result<ChildHandle> {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    let (ev_tx, events) = mpsc::channel(CHILD_CHANNEL_CHUNKS_MAX);
    let (stdin_tx, mut stdin_rx) = mpsc::channel::<StdinMsg>(CHILD_CHANNEL_CHUNKS_MAX);
    let (control, mut control_rx) = mpsc::channel::<Control>(CONTROL_CHANNEL_MAX);

    let stdout = child
        .stdout
        .take()
        .expect("stdout was configured as a pipe");
    let stderr = child
        .stderr
        .take()
        .expect("stderr was configured as a pipe");
    let mut stdin = child.stdin.take();
    tokio::spawn(pump_output(
        stdout,
        ev_tx.clone(),
        ChildEvent::Stdout,
        ChildEvent::StdoutEof,
    ));
    tokio::spawn(pump_output(
        stderr,
        ev_tx.clone(),
        ChildEvent::Stderr,
        ChildEvent::StderrEof,
    ));
    tokio::spawn(async move {
        while let Some(msg) = stdin_rx.recv().await {
            match msg {
                StdinMsg::Data(d) => {
                    if let Some(s) = stdin.as_mut() {
                        // A child that closed its stdin is fine: keep draining, drop the bytes.
                        if s.write_all(&d).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                StdinMsg::Eof => stdin = None,
            }
        }
    });
    tokio::spawn(async move {
        while let Some(c) = control_rx.recv().await {
            if let Control::Signal(sig) = c {
                killpg(pid, sig);
            }
        }
    });
    tokio::spawn(async move {
        let st = match child.wait().await {
            Ok(st) => exit_status(st),
            Err(_) => ExitStatus::Code(255),
        };
        let _ = ev_tx.send(ChildEvent::Exited(st)).await;
    });
    Ok(ChildHandle {
        pid,
        stdin: stdin_tx,
        control,
        events,
    })
}

async fn pump_output<R: AsyncRead + Unpin>(
    mut r: R,
    tx: mpsc::Sender<ChildEvent>,
    data: fn(Vec<u8>) -> ChildEvent,
    eof: ChildEvent,
) {
    let mut buf = vec![0u8; DATA_CHUNK_BYTES_MAX];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send(data(buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(eof).await;
}

fn winsize(size: WindowSize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

fn spawn_pty(mut cmd: std::process::Command, size: WindowSize) -> io::Result<ChildHandle> {
    let ws = winsize(size);
    let pty = nix::pty::openpty(Some(&ws), None)?;
    cmd.stdin(Stdio::from(pty.slave.try_clone()?))
        .stdout(Stdio::from(pty.slave.try_clone()?))
        .stderr(Stdio::from(pty.slave.try_clone()?));
    // SAFETY: only async-signal-safe calls between fork and exec: a new session, then the
    // PTY (already on fd 0) becomes its controlling terminal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = tokio::process::Command::from(cmd).spawn()?;
    // Close our copies of the slave so that EOF (EIO) arrives when the child side is gone.
    drop(pty.slave);
    let pid = child.id().unwrap_or(0);
    set_nonblocking(&pty.master)?;
    // SAFETY: the AsyncFd takes ownership of the master descriptor; nothing else closes it
    // while it is registered (the tasks below only borrow it through the Arc).
    let master = Arc::new(unsafe { AsyncFd::register(pty.master) }.map_err(|e| e.into_parts().1)?);

    let (ev_tx, events) = mpsc::channel(CHILD_CHANNEL_CHUNKS_MAX);
    let (stdin_tx, mut stdin_rx) = mpsc::channel::<StdinMsg>(CHILD_CHANNEL_CHUNKS_MAX);
    let (control, mut control_rx) = mpsc::channel::<Control>(CONTROL_CHANNEL_MAX);

    let reader = master.clone();
    let tx = ev_tx.clone();
    tokio::spawn(async move {
        // A PTY has one output stream.
        let _ = tx.send(ChildEvent::StderrEof).await;
        let mut buf = vec![0u8; DATA_CHUNK_BYTES_MAX];
        loop {
            let Ok(mut guard) = reader.readable().await else {
                break;
            };
            match guard
                .try_io(|fd| nix::unistd::read(fd.as_raw_fd(), &mut buf).map_err(io::Error::from))
            {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => {
                    if tx
                        .send(ChildEvent::Stdout(buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                // EIO: every slave descriptor is closed (Linux reports this, not EOF).
                Ok(Err(_)) => break,
                Err(_would_block) => continue,
            }
        }
        let _ = tx.send(ChildEvent::StdoutEof).await;
    });
    let writer = master.clone();
    tokio::spawn(async move {
        while let Some(msg) = stdin_rx.recv().await {
            // End of the laptop's input does nothing to a terminal (the user types exit).
            let StdinMsg::Data(data) = msg else { continue };
            if write_all_fd(&writer, &data).await.is_err() {
                // The terminal is gone; keep draining so the session never blocks on us.
                continue;
            }
        }
    });
    let ctl = master.clone();
    tokio::spawn(async move {
        while let Some(c) = control_rx.recv().await {
            match c {
                Control::Signal(sig) => killpg(pid, sig),
                Control::Resize(size) => {
                    let ws = winsize(size);
                    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives here.
                    unsafe { libc::ioctl(ctl.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
                }
            }
        }
    });
    tokio::spawn(async move {
        let st = match child.wait().await {
            Ok(st) => exit_status(st),
            Err(_) => ExitStatus::Code(255),
        };
        let _ = ev_tx.send(ChildEvent::Exited(st)).await;
    });
    Ok(ChildHandle {
        pid,
        stdin: stdin_tx,
        control,
        events,
    })
}

async fn write_all_fd(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}
