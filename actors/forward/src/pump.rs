//! One forwarded connection's bytes between a local socket and a QUIC stream, both ways.
//!
//! - Half-close both ways: the local side's EOF finishes the stream; the stream's finish
//!   shuts the local side's write half down. The pump ends when both directions have ended.
//! - Resets both ways: a local read error (a TCP reset) resets the stream with
//!   [`RESET_CODE`]; a reset stream (or one the peer stopped reading) ends the pump with
//!   [`End::RemoteReset`], and the shell resets the local socket.
//! - Backpressure end to end: each direction reads only once its last write has been taken,
//!   so a slow reader on either end slows the writer on the other through QUIC's flow
//!   control, and the pump holds at most one read up (64 KiB) and one batch of arrived
//!   chunks down (at most [`CHUNKS_MAX`], all within one stream window).
//! - Bulk streams take turns on the connection ([`crate::turns`]): the other side gets each
//!   stream's bytes in runs, not one packet of every stream in turn.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::turns::{Bulkness, Change, Ticket, Turns};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use cs_protocol::canary::{self, Canary};
use cs_protocol::forward::RESET_CODE;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes read from the local side per write to the stream.
pub const PUMP_BUFFER_BYTES: usize = 64 * 1024;
/// Most of quinn's chunks (a STREAM frame's data each, about a packet) taken from the stream
/// per local write: about 256 KiB of full packets.
pub const CHUNKS_MAX: usize = 192;

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
            // Each read goes to the stream as it is, without a copy: quinn keeps the chunk
            // until the other side has it.
            let mut buf = BytesMut::new();
            // Whether this stream is bulk, and the turn that earned it (see [`crate::turns`]).
            let mut bulkness = Bulkness::default();
            let mut ticket: Option<Ticket> = None;
            let mut priority = 0i32;
            loop {
                // Reuses the allocation when quinn has let go of every earlier chunk of it.
                buf.reserve(PUMP_BUFFER_BYTES);
                let mut room = (&mut buf).limit(PUMP_BUFFER_BYTES);
                let ready = tokio::select! {
                    biased;
                    r = lr.read_buf(&mut room) => Some(r),
                    () = std::future::ready(()) => None,
                };
                let (read, waited) = match ready {
                    Some(r) => (r, Duration::ZERO),
                    None => {
                        // The local side has nothing ready: a bulk stream passes its turn on
                        // (it holds nobody up).
                        if let Some(t) = &ticket {
                            t.pass();
                        }
                        let waiting = tokio::time::Instant::now();
                        let r = lr.read_buf(&mut room).await;
                        (r, waiting.elapsed())
                    }
                };
                match read {
                    Ok(0) => {
                        let _ = send.finish();
                        return Dir::Done;
                    }
                    Ok(n) => {
                        match bulkness.read(n == PUMP_BUFFER_BYTES, n as u64, waited) {
                            Change::Joins => ticket = Some(turns.join()),
                            Change::Leaves => ticket = None,
                            Change::Stays => {}
                        }
                        let mut chunk = buf.split().freeze();
                        while !chunk.is_empty() {
                            let want = ticket.as_ref().map_or(0, Ticket::priority);
                            if want != priority {
                                let _ = send.set_priority(want);
                                priority = want;
                            }
                            let chunks = std::slice::from_mut(&mut chunk);
                            let wrote = match &ticket {
                                None => send.write_chunks(chunks).await.map(Some),
                                // Waiting for credit, the stream may be handed the turn: it
                                // takes its new priority at once (`write_chunks` is
                                // cancel-safe).
                                Some(t) => tokio::select! {
                                    biased;
                                    w = send.write_chunks(chunks) => w.map(Some),
                                    () = t.turn_may_have_come() => Ok(None),
                                },
                            };
                            match wrote {
                                Ok(Some(w)) => {
                                    if let Some(t) = &ticket {
                                        t.wrote(w.bytes as u64);
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
            // Whatever has arrived, up to CHUNKS_MAX of quinn's chunks, goes out in one local
            // write (not one QUIC frame's worth each: a packet-sized write per frame cost 20
            // times the system calls), straight from quinn's buffers where the local side
            // takes vectored writes, else copied into one buffer first.
            let vectored = lw.is_write_vectored();
            let mut chunks = vec![Bytes::new(); CHUNKS_MAX];
            let mut flat = Vec::new();
            loop {
                match recv.read_chunks(&mut chunks).await {
                    Ok(Some(k)) => {
                        let got = &mut chunks[..k];
                        let n: usize = got.iter().map(Bytes::len).sum();
                        let wrote = if vectored {
                            write_all_vectored(lw, got).await
                        } else {
                            flat.clear();
                            got.iter().for_each(|c| flat.extend_from_slice(c));
                            lw.write_all(&flat).await
                        };
                        // Lets go of quinn's buffers before waiting for more.
                        got.iter_mut().for_each(|c| *c = Bytes::new());
                        if let Err(e) = wrote {
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

/// Writes every byte of `chunks` to `w` in vectored writes, consuming them.
async fn write_all_vectored<W>(w: &mut W, chunks: &mut [Bytes]) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut at = 0;
    while at < chunks.len() {
        if chunks[at].is_empty() {
            at += 1;
            continue;
        }
        let slices: Vec<std::io::IoSlice<'_>> = chunks[at..]
            .iter()
            .filter(|c| !c.is_empty())
            .map(|c| std::io::IoSlice::new(c))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let c = &mut chunks[at];
            let k = n.min(c.len());
            c.advance(k);
            n -= k;
            if c.is_empty() {
                at += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A local side that takes at most `per_call` bytes per write, across at most two slices,
    /// and records the calls.
    struct Trickle {
        got: Vec<u8>,
        per_call: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            self.calls += 1;
            let mut left = self.per_call;
            for b in bufs.iter().take(2) {
                let k = left.min(b.len());
                self.got.extend_from_slice(&b[..k]);
                left -= k;
                if k < b.len() {
                    break;
                }
            }
            Poll::Ready(Ok(self.per_call - left))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn vectored_writes_deliver_every_chunk_in_order_across_partial_writes() {
        let parts: [&[u8]; 5] = [b"ab", b"", b"cdefg", b"h", b"ijklmnopq"];
        let mut chunks: Vec<Bytes> = parts.iter().map(|p| Bytes::copy_from_slice(p)).collect();
        let mut w = Trickle {
            got: Vec::new(),
            per_call: 3,
            calls: 0,
        };
        write_all_vectored(&mut w, &mut chunks).await.unwrap();
        assert_eq!(w.got, b"abcdefghijklmnopq");
        assert!(chunks.iter().all(Bytes::is_empty), "every chunk consumed");
        // 17 bytes at most 3 per call: 6 calls, none wasted on an empty chunk.
        assert_eq!(w.calls, 6);
    }

    #[tokio::test]
    async fn a_local_side_that_takes_nothing_is_an_error_not_a_spin() {
        let mut chunks = vec![Bytes::from_static(b"xyz")];
        let mut w = Trickle {
            got: Vec::new(),
            per_call: 0,
            calls: 0,
        };
        let e = write_all_vectored(&mut w, &mut chunks).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WriteZero);
        assert_eq!(w.calls, 1);
    }
}
