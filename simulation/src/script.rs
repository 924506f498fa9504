//! Scripted processes: a [`Spawner`] whose "commands" are tiny scripts, so exec sessions run
//! on virtual time with output the checker can predict.
//!
//! `emit BYTES EXIT`: writes BYTES bytes of a known pattern to stdout in chunks, then exits
//! with EXIT. Anything else fails to start.

use cs_exec::{ChildEvent, ChildHandle, SpawnRequest, Spawner, StdinMsg};
use cs_protocol::exec::ExitStatus;
use tokio::sync::mpsc;

/// The byte at `offset` of an `emit` script's output.
pub fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(31).wrapping_add(7) % 251) as u8
}

/// Chunk size a scripted child writes.
const CHUNK_BYTES: u64 = 16 * 1024;

#[derive(Debug, Default)]
pub struct ScriptSpawner;

impl Spawner for ScriptSpawner {
    fn spawn(&self, req: &SpawnRequest) -> Result<ChildHandle, String> {
        let cmd = req.command.clone().unwrap_or_default();
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let (bytes, exit) = match words.as_slice() {
            ["emit", b, e] => (
                b.parse::<u64>()
                    .map_err(|_| format!("bad byte count '{b}'"))?,
                e.parse::<i32>()
                    .map_err(|_| format!("bad exit code '{e}'"))?,
            ),
            _ => return Err(format!("unknown script '{cmd}'")),
        };
        let (ev_tx, events) = mpsc::channel(cs_exec::spawn::CHILD_CHANNEL_CHUNKS_MAX);
        let (stdin, mut stdin_rx) =
            mpsc::channel::<StdinMsg>(cs_exec::spawn::CHILD_CHANNEL_CHUNKS_MAX);
        let (control, mut control_rx) = mpsc::channel(8);
        tokio::spawn(async move { while stdin_rx.recv().await.is_some() {} });
        tokio::spawn(async move { while control_rx.recv().await.is_some() {} });
        tokio::spawn(async move {
            let mut off = 0u64;
            while off < bytes {
                let n = CHUNK_BYTES.min(bytes - off);
                let chunk: Vec<u8> = (off..off + n).map(pattern).collect();
                if ev_tx.send(ChildEvent::Stdout(chunk)).await.is_err() {
                    return;
                }
                off += n;
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let _ = ev_tx.send(ChildEvent::StdoutEof).await;
            let _ = ev_tx.send(ChildEvent::StderrEof).await;
            let _ = ev_tx.send(ChildEvent::Exited(ExitStatus::Code(exit))).await;
        });
        Ok(ChildHandle {
            pid: 1000,
            stdin,
            control,
            events,
        })
    }
}
