//! Tail-loss probes: a lost packet at the end of a burst is found sooner.
//!
//! QUIC finds a lost packet from the acknowledgements of packets sent after it. When the lost
//! one ends a burst (an edit's content, its answer), nothing is sent after it and the sender
//! waits for its probe timeout: the smoothed round trip, four times its variation, and the
//! peer's ack delay, after which the retransmission still has a one-way trip to make. On a
//! link with 50 ms round trips that put a lost packet's edit about 110 ms late.
//!
//! After the last write of a burst the peer waits for, the writer pokes its [`TailProbe`],
//! which sends one 1-byte unreliable datagram [`PROBE_DELAY_MS`] later, in a packet of its own.
//! Its acknowledgement arrives about one round trip after the burst and exposes a gap before
//! it, so the lost packet is declared lost by QUIC's time threshold (9/8 of a round trip)
//! and sent again at once. The peer never reads the probes: its datagram receive buffer holds
//! [`PROBE_BUFFER_BYTES`], and older datagrams are dropped as new ones come.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long after a poke its probe goes out: long enough for the burst's own packets to have
/// left, so the probe does not ride in (and get lost with) the last of them.
pub const PROBE_DELAY_MS: u64 = 3;

/// The datagram receive buffer of a connection: room for this many probes, at most.
pub const PROBE_BUFFER_BYTES: usize = 64;

/// Sends tail-loss probes on one connection (or nowhere, for streams without one), and tells
/// its round trip. Clones share one pending probe: pokes in a burst send one datagram.
#[derive(Clone, Debug, Default)]
pub struct TailProbe {
    conn: Option<quinn::Connection>,
    pending: Arc<AtomicBool>,
}

impl TailProbe {
    pub fn new(conn: quinn::Connection) -> Self {
        Self {
            conn: Some(conn),
            pending: Arc::default(),
        }
    }

    /// A probe that sends nothing (a stream that is not QUIC, as in unit tests).
    pub fn none() -> Self {
        Self::default()
    }

    /// The connection's smoothed round trip (`None` without a connection).
    pub fn rtt(&self) -> Option<Duration> {
        self.conn.as_ref().map(quinn::Connection::rtt)
    }

    /// The burst just written ends here: probe behind it, unless a probe is already pending.
    /// Needs a tokio runtime.
    pub fn poke(&self) {
        let Some(conn) = &self.conn else { return };
        if self.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let (conn, pending) = (conn.clone(), self.pending.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(PROBE_DELAY_MS)).await;
            pending.store(false, Ordering::Release);
            // A peer that takes no datagrams, or a closed connection: nothing to probe.
            let _ = conn.send_datagram(bytes::Bytes::from_static(&[0]));
        });
    }
}
