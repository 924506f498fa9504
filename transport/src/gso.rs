//! A UDP socket that never hands the kernel a segmentation-offload batch larger than one IP
//! packet can carry.
//!
//! quinn batches up to ten datagrams of the path MTU into one `sendmsg` with `UDP_SEGMENT`
//! (GSO). Linux refuses a batch whose total exceeds an IP packet's 64 KiB with `EMSGSIZE`, and
//! quinn-udp reads `EMSGSIZE` as a failed MTU probe and drops the batch silently. Ten datagrams
//! of 1,452 bytes fit; once path MTU discovery grows datagrams past 6.5 KB (on loopback or a
//! jumbo-frame network) every full batch was lost, quinn saw a burst of losses of large
//! packets, declared a black hole and fell back to 1,200-byte datagrams for good (a 64 MiB
//! loopback transfer: 32-85 packets lost, one black hole, path MTU 1,200).
//!
//! [`GsoBounded`] passes a batch that fits through unchanged and sends a larger one as
//! consecutive batches that each fit.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// The most UDP payload one IPv4 packet carries (65,535 less 20 bytes of IP header and 8 of
/// UDP). IPv6 allows 20 bytes more; one bound for both keeps an IPv4-mapped destination on a
/// dual-stack socket safe.
pub const GSO_BATCH_BYTES_MAX: usize = 65_507;

/// A UDP socket that splits segmentation-offload batches to fit [`GSO_BATCH_BYTES_MAX`].
pub struct GsoBounded {
    inner: Arc<dyn AsyncUdpSocket>,
}

impl GsoBounded {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>) -> Self {
        Self { inner }
    }
}

impl fmt::Debug for GsoBounded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GsoBounded")
            .field("inner", &self.inner)
            .finish()
    }
}

/// The pieces `contents` goes out as: `(start, end, segment_size)` with each piece at most
/// [`GSO_BATCH_BYTES_MAX`] (or one datagram, when a single one is larger: an MTU probe, which
/// the kernel may refuse as before) and whole segments only.
fn pieces(len: usize, segment: Option<usize>) -> Vec<(usize, usize, Option<usize>)> {
    let Some(seg) = segment.filter(|&s| s > 0 && len > s && len > GSO_BATCH_BYTES_MAX) else {
        return vec![(0, len, segment)];
    };
    let per = (GSO_BATCH_BYTES_MAX / seg).max(1) * seg;
    let mut out = Vec::with_capacity(len.div_ceil(per));
    let mut at = 0;
    while at < len {
        let end = (at + per).min(len);
        let size = (end - at > seg).then_some(seg);
        out.push((at, end, size));
        at = end;
    }
    out
}

impl AsyncUdpSocket for GsoBounded {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    /// A batch that fits goes through as it is. A larger one goes out piece by piece; when the
    /// socket fills part way, the error goes back to quinn, which sends the whole batch again
    /// once the socket is writable: the receiver drops the repeated packets as duplicates, where
    /// giving up the rest would look like loss to QUIC's recovery. (Writable means half the
    /// send buffer, 8 MiB, is free, so the retry does not block again.)
    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        for (start, end, segment_size) in pieces(transmit.contents.len(), transmit.segment_size) {
            self.inner.try_send(&Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: &transmit.contents[start..end],
                segment_size,
                src_ip: transmit.src_ip,
            })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_batch_that_fits_goes_through_whole() {
        assert_eq!(pieces(14_520, Some(1_452)), vec![(0, 14_520, Some(1_452))]);
        assert_eq!(pieces(42, None), vec![(0, 42, None)]);
        // A single datagram past the bound (an MTU probe) is not cut: the kernel judges it.
        assert_eq!(pieces(65_527, None), vec![(0, 65_527, None)]);
        assert_eq!(
            pieces(65_527, Some(65_527)),
            vec![(0, 65_527, Some(65_527))]
        );
    }

    #[test]
    fn a_larger_batch_goes_out_in_whole_segments_that_fit() {
        // Ten 65,000-byte datagrams, the last one short: one per piece, no GSO needed.
        let len = 9 * 65_000 + 100;
        let p = pieces(len, Some(65_000));
        assert_eq!(p.len(), 10);
        assert!(p.iter().all(|&(_, _, s)| s.is_none()));
        assert_eq!(p[9], (9 * 65_000, len, None));
        // Ten 9,000-byte datagrams: seven to a piece (63,000 bytes), then three.
        let p = pieces(90_000, Some(9_000));
        assert_eq!(
            p,
            vec![(0, 63_000, Some(9_000)), (63_000, 90_000, Some(9_000))]
        );
        // Pieces cover the batch exactly, in order, each within the bound.
        for (len, seg) in [(650_000, 65_000), (100_001, 7_000), (65_508, 1_000)] {
            let p = pieces(len, Some(seg));
            assert_eq!(p[0].0, 0);
            assert_eq!(p.last().unwrap().1, len);
            for w in p.windows(2) {
                assert_eq!(w[0].1, w[1].0);
            }
            for &(a, b, _) in &p {
                assert!(b - a <= GSO_BATCH_BYTES_MAX);
                assert!((b - a) % seg == 0 || b == len, "a segment was cut");
            }
        }
    }

    /// Records what reaches the kernel; refuses the send numbered `block_at` as full.
    #[derive(Debug)]
    struct Recorder {
        sent: Mutex<Vec<(usize, Option<usize>)>>,
        block_at: Option<usize>,
    }

    impl AsyncUdpSocket for Recorder {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            unreachable!("not polled in these tests")
        }
        fn try_send(&self, t: &Transmit) -> io::Result<()> {
            let mut sent = self.sent.lock().unwrap();
            if Some(sent.len()) == self.block_at {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            sent.push((t.contents.len(), t.segment_size));
            Ok(())
        }
        fn poll_recv(
            &self,
            _: &mut Context,
            _: &mut [IoSliceMut<'_>],
            _: &mut [RecvMeta],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
        fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
            Ok("127.0.0.1:1".parse().unwrap())
        }
        fn max_transmit_segments(&self) -> usize {
            10
        }
    }

    fn send(block_at: Option<usize>, len: usize, seg: usize) -> (io::Result<()>, Vec<usize>) {
        let rec = Arc::new(Recorder {
            sent: Mutex::new(Vec::new()),
            block_at,
        });
        let sock = GsoBounded::new(rec.clone());
        assert_eq!(sock.max_transmit_segments(), 10);
        let data = vec![0u8; len];
        let r = sock.try_send(&Transmit {
            destination: "127.0.0.1:2".parse().unwrap(),
            ecn: None,
            contents: &data,
            segment_size: Some(seg),
            src_ip: None,
        });
        let sent = rec.sent.lock().unwrap().iter().map(|s| s.0).collect();
        (r, sent)
    }

    #[test]
    fn the_socket_sends_every_piece() {
        let (r, sent) = send(None, 3 * 60_000, 60_000);
        assert!(r.is_ok());
        assert_eq!(sent, vec![60_000; 3]);
    }

    #[test]
    fn a_full_socket_part_way_asks_quinn_to_retry() {
        let (r, sent) = send(Some(1), 3 * 60_000, 60_000);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(sent, vec![60_000]);
    }
}
