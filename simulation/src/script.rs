//! Scripted processes: a [`Spawner`] whose "commands" are tiny scripts, so exec sessions run
//! on virtual time with output the checker can predict.
//!
//! - `emit BYTES EXIT`: writes BYTES bytes of a known pattern to stdout, then exits with EXIT.
//! - `crash BYTES SIGNAL`: writes BYTES bytes, then dies by SIGNAL (a child that crashes).
//! - `hang BYTES`: writes BYTES bytes, then waits until a signal ends it.
//!
//! Every script dies by the first signal sent to it (SIGHUP when its stream is lost, SIGINT
//! when the laptop interrupts it), as a process without handlers does. Anything else fails to
//! start.

use cs_exec::{ChildEvent, ChildHandle, Control, SpawnRequest, Spawner, StdinMsg};
use cs_protocol::exec::ExitStatus;
use tokio::sync::mpsc;

/// The byte at `offset` of a script's output.
pub fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(31).wrapping_add(7) % 251) as u8
}

/// Chunk size a scripted child writes.
const CHUNK_BYTES: u64 = 16 * 1024;

/// What a script does after its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    Exit(i32),
    Crash(i32),
    Hang,
}

/// A parsed script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Script {
    pub bytes: u64,
    pub then: Then,
}

impl Script {
    pub fn parse(cmd: &str) -> Result<Self, String> {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let num = |w: &str| {
            w.parse::<u64>()
                .map_err(|_| format!("bad number '{w}' in script '{cmd}'"))
        };
        let (bytes, then) = match words.as_slice() {
            ["emit", b, e] => (num(b)?, Then::Exit(num(e)? as i32)),
            ["crash", b, s] => (num(b)?, Then::Crash(num(s)? as i32)),
            ["hang", b] => (num(b)?, Then::Hang),
            _ => return Err(format!("unknown script '{cmd}'")),
        };
        Ok(Self { bytes, then })
    }

    pub fn command(&self) -> String {
        match self.then {
            Then::Exit(c) => format!("emit {} {c}", self.bytes),
            Then::Crash(s) => format!("crash {} {s}", self.bytes),
            Then::Hang => format!("hang {}", self.bytes),
        }
    }
}

#[derive(Debug, Default)]
pub struct ScriptSpawner;

impl Spawner for ScriptSpawner {
    fn spawn(&self, req: &SpawnRequest) -> Result<ChildHandle, String> {
        let script = Script::parse(req.command.as_deref().unwrap_or_default())?;
        let (ev_tx, events) = mpsc::channel(cs_exec::spawn::CHILD_CHANNEL_CHUNKS_MAX);
        let (stdin, mut stdin_rx) =
            mpsc::channel::<StdinMsg>(cs_exec::spawn::CHILD_CHANNEL_CHUNKS_MAX);
        let (control, mut control_rx) = mpsc::channel(8);
        tokio::spawn(async move { while stdin_rx.recv().await.is_some() {} });
        tokio::spawn(async move {
            let run = async {
                let mut off = 0u64;
                while off < script.bytes {
                    let n = CHUNK_BYTES.min(script.bytes - off);
                    let chunk: Vec<u8> = (off..off + n).map(pattern).collect();
                    if ev_tx.send(ChildEvent::Stdout(chunk)).await.is_err() {
                        return None;
                    }
                    off += n;
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                match script.then {
                    Then::Exit(c) => Some(ExitStatus::Code(c)),
                    Then::Crash(s) => Some(ExitStatus::Signal(s)),
                    Then::Hang => std::future::pending().await,
                }
            };
            // A signal ends the script wherever it is, as it would a real process.
            tokio::pin!(run);
            let mut control_open = true;
            let status = loop {
                tokio::select! {
                    biased;
                    c = control_rx.recv(), if control_open => match c {
                        Some(Control::Signal(s)) => break Some(ExitStatus::Signal(s)),
                        Some(Control::Resize(_)) => {}
                        None => control_open = false,
                    },
                    s = &mut run => break s,
                }
            };
            let Some(status) = status else { return };
            let _ = ev_tx.send(ChildEvent::StdoutEof).await;
            let _ = ev_tx.send(ChildEvent::StderrEof).await;
            let _ = ev_tx.send(ChildEvent::Exited(status)).await;
        });
        Ok(ChildHandle {
            pid: 1000,
            stdin,
            control,
            events,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_parse_and_print_back() {
        for cmd in ["emit 10 3", "crash 0 9", "hang 5"] {
            assert_eq!(Script::parse(cmd).unwrap().command(), cmd);
        }
        assert!(Script::parse("emit x 3").unwrap_err().contains("'x'"));
        assert!(Script::parse("rm -rf /")
            .unwrap_err()
            .contains("unknown script"));
    }
}
