//! One forwarded connection's bytes between a local socket and a QUIC stream, both ways.
//!
//! - Half-close both ways: the local side's EOF finishes the stream; the stream's finish
//!   shuts the local side's write half down. The pump ends when both directions have ended.
//! - Resets both ways: a local read error (a TCP reset) resets the stream with
//!   [`RESET_CODE`]; a reset stream (or one the peer stopped reading) ends the pump with
//!   [`End::RemoteReset`], and the shell resets the local socket.
//! - Backpressure end to end: each direction reads only once its last write has been taken,
//!   so a slow reader on either end slows the writer on the other through QUIC's flow
//!   control, and the pump holds at most one buffer per direction.
//! - Bulk streams take turns on the connection ([`crate::turns`]): the other side gets each
//!   stream's bytes in runs, not one packet of every stream in turn.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::turns::{Ticket, Turns, BULK_AFTER_BYTES};
use cs_protocol::canary::{self, Canary};
use cs_protocol::forward::RESET_CODE;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes read from the local side per write to the stream.
pub const PUMP_BUFFER_BYTES: usize = 64 * 1024;
/// Most bytes taken from the stream per local write.
pub const CHUNK_BYTES_MAX: usize = 256 * 1024;

/// Bytes carried by a forward's connections.
#[derive(Debug, Default)]
pub struct Counters {
    /// From the local side to the stream.
    pub up: AtomicU64,
    /// From the stream to the local side.
    pub down: AtomicU64,
}

/// How a pumped connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Both directions finished.
    Clean,
    /// The local side reset (or failed); the stream was reset.
    LocalReset(String),
    /// The other side reset its connection, or stopped reading: reset the local one.
    RemoteReset(String),
    /// The QUIC connection was lost; the local side was shut down.
    Lost(String),
}

enum Dir {
    Done,
    Abnormal(End),
}

fn from_write(e: quinn::WriteError) -> End {
    match e {
        quinn::WriteError::ConnectionLost(c) => End::Lost(c.to_string()),
        quinn::WriteError::Stopped(code) => {
            End::RemoteReset(format!("the other side stopped reading (code {code})"))
        }
        other => End::RemoteReset(other.to_string()),
    }
}

fn from_read(e: quinn::ReadError) -> End {
    match e {
        quinn::ReadError::ConnectionLost(c) => End::Lost(c.to_string()),
        quinn::ReadError::Reset(code) => {
            End::RemoteReset(format!("the other side reset the connection (code {code})"))
        }
        other => End::RemoteReset(other.to_string()),
    }
}

/// Carries bytes between `(lr, lw)` (the local socket's halves) and `(send, recv)` until both
/// directions are done or one fails; counts bytes in `counters`. `turns` is the queue of bulk
/// streams of `send`'s connection ([`Turns::of`]).
pub async fn pump<R, W>(
    lr: &mut R,
    lw: &mut W,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    counters: &Counters,
    turns: &Arc<Turns>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let end = {
        let up = async {
            let mut buf = vec![0u8; PUMP_BUFFER_BYTES];
            // Bytes of full reads in a row, and the turn they earned (see [`crate::turns`]).
            let mut full_run = 0u64;
            let mut ticket: Option<Ticket> = None;
            let mut priority = 0i32;
            loop {
                // A bulk stream whose local side has nothing ready holds nobody up: it leaves
                // the queue before waiting.
                let ready = if ticket.is_some() {
                    tokio::select! {
                        biased;
                        r = lr.read(&mut buf) => Some(r),
                        () = std::future::ready(()) => None,
                    }
                } else {
                    None
                };
                let read = match ready {
                    Some(r) => r,
                    None => {
                        if ticket.take().is_some() {
                            full_run = 0;
                        }
                        lr.read(&mut buf).await
                    }
                };
                match read {
                    Ok(0) => {
                        let _ = send.finish();
                        return Dir::Done;
                    }
                    Ok(n) => {
                        if n == buf.len() {
                            full_run += n as u64;
                        } else {
                            full_run = 0;
                            ticket = None;
                        }
                        if ticket.is_none() && full_run >= BULK_AFTER_BYTES {
                            ticket = Some(turns.join());
                        }
                        let mut at = 0;
                        while at < n {
                            let want = ticket.as_ref().map_or(0, Ticket::priority);
                            if want != priority {
                                let _ = send.set_priority(want);
                                priority = want;
                            }
                            let wrote = match &ticket {
                                None => send.write(&buf[at..n]).await.map(Some),
                                // Waiting for credit, the stream may be handed the turn: it
                                // takes its new priority at once (`write` is cancel-safe).
                                Some(t) => tokio::select! {
                                    biased;
                                    w = send.write(&buf[at..n]) => w.map(Some),
                                    () = t.turn_may_have_come() => Ok(None),
                                },
                            };
                            match wrote {
                                Ok(Some(k)) => {
                                    at += k;
                                    if let Some(t) = &ticket {
                                        t.wrote(k as u64);
                                    }
                                }
                                Ok(None) => {}
                                Err(e) => return Dir::Abnormal(from_write(e)),
                            }
                        }
                        counters.up.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => return Dir::Abnormal(End::LocalReset(e.to_string())),
                }
            }
        };
        let down = async {
            // As much as has arrived per local write (not one QUIC frame's worth each: a
            // packet-sized write per frame cost 20 times the system calls).
            let mut buf = vec![0u8; CHUNK_BYTES_MAX];
            loop {
                match recv.read(&mut buf).await {
                    Ok(Some(n)) => {
                        if let Err(e) = lw.write_all(&buf[..n]).await {
                            return Dir::Abnormal(End::LocalReset(e.to_string()));
                        }
                        counters.down.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Ok(None) => {
                        let _ = lw.flush().await;
                        // The write half may already be gone (the local peer closed): the
                        // other direction says how the connection ends.
                        let _ = lw.shutdown().await;
                        return Dir::Done;
                    }
                    Err(quinn::ReadError::ConnectionLost(_))
                        if canary::active(Canary::ForwardLossAsFinish) =>
                    {
                        let _ = lw.shutdown().await;
                        return Dir::Done;
                    }
                    Err(e) => return Dir::Abnormal(from_read(e)),
                }
            }
        };
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let r = tokio::select! {
                biased;
                r = &mut down, if !down_done => { down_done = true; r }
                r = &mut up, if !up_done => { up_done = true; r }
            };
            if let Dir::Abnormal(end) = r {
                break end;
            }
            if up_done && down_done {
                break End::Clean;
            }
        }
    };
    match &end {
        End::Clean => {}
        End::LocalReset(_) | End::RemoteReset(_) => {
            let _ = send.reset(RESET_CODE.into());
            let _ = recv.stop(RESET_CODE.into());
        }
        End::Lost(_) => {
            let _ = lw.shutdown().await;
        }
    }
    end
}
