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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long after a poke its probe goes out: long enough for the burst's own packets to have
/// left, so the probe does not ride in (and get lost with) the last of them.
pub const PROBE_DELAY_MS: u64 = 3;

/// The datagram receive buffer of a connection: room for this many probes, at most.
pub const PROBE_BUFFER_BYTES: usize = 64;

/// Sends tail-loss probes on one connection (or nowhere, for streams without one), and tells
/// its round trip. Clones share one pending probe: pokes in a burst send one datagram.
#[derive(Clone, Debug)]
pub struct TailProbe {
    conn: Option<quinn::Connection>,
    pending: Arc<AtomicBool>,
    /// The least smoothed round trip seen, in microseconds (`u64::MAX`: none yet).
    rtt_min_us: Arc<AtomicU64>,
}

impl Default for TailProbe {
    fn default() -> Self {
        Self {
            conn: None,
            pending: Arc::default(),
            rtt_min_us: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }
}

impl TailProbe {
    pub fn new(conn: quinn::Connection) -> Self {
        let p = Self {
            conn: Some(conn),
            ..Self::default()
        };
        p.sample();
        p
    }

    /// Notes the connection's round trip now.
    fn sample(&self) {
        if let Some(c) = &self.conn {
            let us = u64::try_from(c.rtt().as_micros()).unwrap_or(u64::MAX);
            self.rtt_min_us.fetch_min(us, Ordering::Relaxed);
        }
    }

    /// A probe that sends nothing (a stream that is not QUIC, as in unit tests).
    pub fn none() -> Self {
        Self::default()
    }

    /// The connection's smoothed round trip now (`None` without a connection). It grows
    /// with queueing: a busy loopback connection can show tens of milliseconds.
    pub fn rtt(&self) -> Option<Duration> {
        self.conn.as_ref().map(quinn::Connection::rtt)
    }

    /// The least round trip seen since this probe was made (sampled at every poke): how far
    /// away the peer is, without the queueing of a busy moment.
    pub fn base_rtt(&self) -> Option<Duration> {
        self.sample();
        match self.rtt_min_us.load(Ordering::Relaxed) {
            u64::MAX => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The burst just written ends here: probe behind it, unless a probe is already pending.
    /// Needs a tokio runtime.
    pub fn poke(&self) {
        let Some(conn) = &self.conn else { return };
        self.sample();
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
