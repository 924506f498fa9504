//! quinn on turmoil's simulated UDP: an `AsyncUdpSocket` over `turmoil::net::UdpSocket`, which
//! injects the seed's datagram faults (loss, duplication, corruption, reordering), drops
//! everything while its node sleeps, and records every datagram sent and received in the trace
//! (sizes, never bytes).

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::trace::Trace;

thread_local! {
    /// Set by the liveness phase: every socket on this thread stops injecting faults.
    static HEALED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Stops datagram faults on every socket of this thread's simulation (the liveness phase).
pub fn heal_all() {
    HEALED.with(|h| h.set(true));
}

/// Lets datagram faults strike again (a new seed starts).
pub fn unheal_all() {
    HEALED.with(|h| h.set(false));
}

type Readable = Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>;

/// Datagram faults a socket injects on send, each drawn from the socket's seeded RNG.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DatagramFaults {
    pub loss: f64,
    pub duplicate: f64,
    pub corrupt: f64,
    /// Probability that a datagram is held back and sent after the next one.
    pub reorder: f64,
}

/// A simulated UDP socket for quinn.
pub struct SimSocket {
    inner: Arc<turmoil::net::UdpSocket>,
    readable: Mutex<Option<Readable>>,
    node: &'static str,
    trace: Trace,
    faults: Mutex<(DatagramFaults, rand::rngs::StdRng)>,
    /// A datagram held back to be sent after the next one (reordering).
    held: Mutex<Option<(Vec<u8>, std::net::SocketAddr)>>,
    sleep: Option<Arc<crate::clock::Sleep>>,
}

impl fmt::Debug for SimSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimSocket")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl SimSocket {
    pub async fn bind(
        addr: std::net::SocketAddr,
        node: &'static str,
        trace: Trace,
        faults: DatagramFaults,
        seed: u64,
        sleep: Option<Arc<crate::clock::Sleep>>,
    ) -> io::Result<Arc<Self>> {
        use rand::SeedableRng;
        let inner = Arc::new(turmoil::net::UdpSocket::bind(addr).await?);
        let rng = rand::rngs::StdRng::seed_from_u64(seed);
        Ok(Arc::new(Self {
            inner,
            readable: Mutex::new(None),
            node,
            trace,
            faults: Mutex::new((faults, rng)),
            held: Mutex::new(None),
            sleep,
        }))
    }

    fn faults_healed(&self) -> bool {
        HEALED.with(|h| h.get())
    }

    fn asleep(&self) -> bool {
        self.sleep.as_ref().is_some_and(|s| s.is_asleep())
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        // turmoil queues datagrams without limit; sends never block.
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        use rand::Rng;
        let len = transmit.contents.len() as u64;
        if self.asleep() {
            self.trace.event(self.node, "udp.asleep", len);
            return Ok(());
        }
        if self.faults_healed() {
            self.trace.event(self.node, "udp.send", len);
            let _ = self
                .inner
                .try_send_to(transmit.contents, transmit.destination);
            return Ok(());
        }
        let (lost, dup, corrupt_at, reorder) = {
            let mut g = self.faults.lock().unwrap_or_else(|p| p.into_inner());
            let (f, rng) = &mut *g;
            let lost = rng.gen_bool(f.loss);
            let dup = rng.gen_bool(f.duplicate);
            let corrupt = rng.gen_bool(f.corrupt);
            let reorder = rng.gen_bool(f.reorder);
            let at = rng.gen_range(0..transmit.contents.len().max(1));
            (lost, dup, corrupt.then_some(at), reorder)
        };
        if lost {
            self.trace.event(self.node, "udp.lost", len);
            self.trace.sometimes("fault: datagram lost");
            return Ok(());
        }
        let mut data = transmit.contents.to_vec();
        if let Some(at) = corrupt_at {
            data[at] ^= 0x5a;
            self.trace.event(self.node, "udp.corrupt", len);
            self.trace.sometimes("fault: datagram corrupted");
        }
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        if reorder && held.is_none() {
            self.trace.event(self.node, "udp.held", len);
            *self.held.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((data, transmit.destination));
            return Ok(());
        }
        self.trace.event(self.node, "udp.send", len);
        // A send to a crashed or unknown host is a lost datagram, as on a real network.
        let _ = self.inner.try_send_to(&data, transmit.destination);
        if dup {
            self.trace.event(self.node, "udp.dup", len);
            self.trace.sometimes("fault: datagram duplicated");
            let _ = self.inner.try_send_to(&data, transmit.destination);
        }
        if let Some((old, to)) = held {
            self.trace
                .event(self.node, "udp.reordered", old.len() as u64);
            self.trace.sometimes("fault: datagrams reordered");
            let _ = self.inner.try_send_to(&old, to);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.inner.try_recv_from(&mut bufs[0]) {
                Ok((len, _)) if self.asleep() => {
                    self.trace.event(self.node, "udp.recv_asleep", len as u64);
                    continue;
                }
                Ok((len, from)) => {
                    self.trace.event(self.node, "udp.recv", len as u64);
                    meta[0] = RecvMeta {
                        addr: from,
                        len,
                        stride: len,
                        ecn: None,
                        dst_ip: self.inner.local_addr().ok().map(|a| a.ip()),
                    };
                    return Poll::Ready(Ok(1));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // quinn's endpoint driver stops on a receive error; a simulated network error is
                // a lost datagram, as ICMP errors are on a real unconnected socket.
                Err(e) => {
                    self.trace
                        .event(self.node, &format!("udp.recv_error {:?}", e.kind()), 0);
                    continue;
                }
            }
            // A poisoned lock means a panic elsewhere on this single thread; the seed fails anyway.
            let mut slot = self.readable.lock().unwrap_or_else(|p| p.into_inner());
            let fut = slot.get_or_insert_with(|| {
                let sock = self.inner.clone();
                Box::pin(async move { sock.readable().await })
            });
            match fut.as_mut().poll(cx) {
                Poll::Ready(_) => *slot = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }

    fn may_fragment(&self) -> bool {
        false
    }
}
