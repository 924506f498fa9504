//! Drives one agent-side exec session over one stream: the async glue around [`ExecSession`].

use cs_protocol::exec::ExecInput;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use cs_transport::{read_frame, write_frame};

use crate::core::ExecSession;
use crate::spawn::{ChildHandle, Control, StdinMsg};

/// SIGHUP: sent to the command's process group when the laptop goes away, as sshd does.
const SIGHUP: i32 = 1;

/// Why a session ended early: the stream to the laptop broke.
#[derive(Debug)]
struct Lost(String);

/// Runs a session to its end. `child` is `Err` when the command could not be started.
pub async fn run_session<W, R>(child: Result<ChildHandle, String>, mut send: W, mut recv: R)
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let epoch = tokio::time::Instant::now();
    let now_ms = move || epoch.elapsed().as_millis() as u64;
    let child = match child {
        Ok(c) => c,
        Err(reason) => {
            let mut core = ExecSession::failed_to_start(reason);
            while let Some(msg) = core.poll_output() {
                if write_frame(&mut send, &msg).await.is_err() {
                    return;
                }
            }
            let _ = send.shutdown().await;
            return;
        }
    };
    let ChildHandle {
        pid,
        stdin,
        control,
        mut events,
    } = child;
    let mut core = ExecSession::started(pid);
    let pump_control = control.clone();
    let pump = pump_input(&mut recv, stdin, pump_control);
    let main = async {
        loop {
            while let Some(msg) = core.poll_output() {
                write_frame(&mut send, &msg)
                    .await
                    .map_err(|e| Lost(format!("write: {e}")))?;
            }
            if core.is_finished() {
                let _ = send.shutdown().await;
                return Ok::<(), Lost>(());
            }
            let deadline = core
                .poll_timeout()
                .map(|d| epoch + std::time::Duration::from_millis(d));
            tokio::select! {
                biased;
                ev = events.recv() => match ev {
                    Some(ev) => core.handle_child(ev, now_ms()),
                    // The spawner dropped its side without an exit: treat as killed.
                    None => core.handle_child(
                        crate::spawn::ChildEvent::Exited(cs_protocol::exec::ExitStatus::Signal(9)),
                        now_ms(),
                    ),
                },
                _ = sleep_until_opt(deadline) => core.handle_timeout(now_ms()),
            }
        }
    };
    let result = tokio::select! {
        biased;
        r = main => r,
        lost = pump => Err(lost),
    };
    if let Err(lost) = result {
        tracing::info!(pid, reason = %lost.0, "exec stream lost; hanging up the command");
        core.handle_stream_lost();
        let _ = control.try_send(Control::Signal(SIGHUP));
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Forwards the laptop's input to the child. Returns only when the stream broke or the laptop
/// closed its side, which it does only when it is gone.
async fn pump_input<R: AsyncRead + Unpin>(
    recv: &mut R,
    stdin: mpsc::Sender<StdinMsg>,
    control: mpsc::Sender<Control>,
) -> Lost {
    let mut stdin = Some(stdin);
    loop {
        match read_frame::<_, ExecInput>(recv).await {
            Ok(Some(ExecInput::Stdin(data))) => {
                if let Some(tx) = &stdin {
                    // A child that stopped reading its stdin is not an error of the session.
                    if tx.send(StdinMsg::Data(data)).await.is_err() {
                        stdin = None;
                    }
                }
            }
            Ok(Some(ExecInput::StdinEof)) => {
                if let Some(tx) = stdin.take() {
                    let _ = tx.send(StdinMsg::Eof).await;
                }
            }
            Ok(None) => {
                // The laptop never ends its side while the command runs (stdin's end is a
                // `StdinEof` frame): a finished stream means `cs` is gone (it exited or was
                // killed and the daemon closed the stream). Hang up, as sshd does when its
                // channel closes; a command that ignores SIGHUP keeps running, also as there.
                if cs_protocol::canary::active(cs_protocol::Canary::HangupSkipped) {
                    return std::future::pending().await;
                }
                return Lost("the laptop closed the stream".into());
            }
            Ok(Some(ExecInput::Resize(size))) => {
                let _ = control.send(Control::Resize(size)).await;
            }
            Ok(Some(ExecInput::Signal(sig))) => {
                let _ = control.send(Control::Signal(sig)).await;
            }
            Err(e) => return Lost(format!("read: {e}")),
        }
    }
}
