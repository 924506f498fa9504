//! A congestion controller that never lets more into flight than the peer's UDP socket holds,
//! once datagrams are larger than Ethernet's.
//!
//! Large datagrams only get through on loopback and jumbo-frame networks, where the round trip
//! is a fraction of a millisecond; there, what is in flight sits mostly in the receiver's
//! socket buffer, not on a wire. quinn's BBR adds the ACK aggregation it measured to its window
//! (`max_ack_height`), and on a busy loopback ACKs arrive in bursts: its window reached
//! 18-50 MB in a 64 MiB loopback transfer, past the receiver's 16 MiB buffer, so the buffer
//! overflowed and an interactive packet waited behind all of it. TCP never has this problem
//! because its window is the receive buffer's free space.
//!
//! [`Capped`] caps the window at [`LARGE_DATAGRAM_WINDOW_BYTES`] on such paths: once path MTU
//! discovery has grown datagrams past Ethernet's size, or once the smallest round trip seen is
//! under [`SHORT_RTT`] (a path that holds almost nothing itself, also after a black hole took
//! the datagrams back to 1,200 bytes). On any other path the window has to cover the path's
//! bandwidth times its round trip, and it is left alone.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// The largest payload of an Ethernet-sized datagram; beyond it the path is loopback or a
/// jumbo-frame network.
pub const ETHERNET_DATAGRAM_BYTES: u16 = 1_472;

/// The window once datagrams are larger: a quarter of the 16 MiB a receiving socket holds
/// (`UDP_BUFFER_BYTES`, doubled by the kernel), so the buffer cannot fill from one
/// connection, and an interactive packet waits behind at most this much. At a loopback
/// round trip of 1 ms it still allows 4 GB/s.
pub const LARGE_DATAGRAM_WINDOW_BYTES: u64 = 4 * 1024 * 1024;

/// A smallest round trip under this means the path holds almost nothing: a 4 MiB window
/// still allows 4 GB/s on it.
pub const SHORT_RTT: Duration = Duration::from_millis(1);

/// Builds [`Capped`] around another controller.
pub struct CappedFactory<F> {
    inner: Arc<F>,
}

impl<F> CappedFactory<F> {
    pub fn new(inner: F) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }
}

impl<F: ControllerFactory + Send + Sync + 'static> ControllerFactory for CappedFactory<F> {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Capped {
            inner: self.inner.clone().build(now, current_mtu),
            mtu: current_mtu,
            min_rtt: None,
        })
    }
}

/// A controller whose window is capped on paths that hold almost nothing.
pub struct Capped {
    inner: Box<dyn Controller>,
    mtu: u16,
    /// The smallest round trip seen, once one is.
    min_rtt: Option<Duration>,
}

impl Capped {
    fn capped(&self) -> bool {
        self.mtu > ETHERNET_DATAGRAM_BYTES || self.min_rtt.is_some_and(|r| r < SHORT_RTT)
    }

    fn cap(&self, window: u64) -> u64 {
        if self.capped() {
            window.min(LARGE_DATAGRAM_WINDOW_BYTES)
        } else {
            window
        }
    }
}

impl Controller for Capped {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number)
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.min_rtt = Some(rtt.min());
        self.inner.on_ack(now, sent, bytes, app_limited, rtt)
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked)
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes)
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
        self.inner.on_mtu_update(new_mtu)
    }

    fn window(&self) -> u64 {
        self.cap(self.inner.window())
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Capped {
            inner: self.inner.clone_box(),
            mtu: self.mtu,
            min_rtt: self.min_rtt,
        })
    }

    fn initial_window(&self) -> u64 {
        self.cap(self.inner.initial_window())
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller whose window is whatever the test says.
    #[derive(Clone)]
    struct Fixed(u64);
    impl Controller for Fixed {
        fn on_congestion_event(&mut self, _: Instant, _: Instant, _: bool, _: u64) {}
        fn on_mtu_update(&mut self, _: u16) {}
        fn window(&self) -> u64 {
            self.0
        }
        fn clone_box(&self) -> Box<dyn Controller> {
            Box::new(self.clone())
        }
        fn initial_window(&self) -> u64 {
            self.0
        }
        fn into_any(self: Box<Self>) -> Box<dyn Any> {
            self
        }
    }

    fn capped(window: u64, mtu: u16, min_rtt: Option<Duration>) -> Capped {
        Capped {
            inner: Box::new(Fixed(window)),
            mtu,
            min_rtt,
        }
    }

    #[test]
    fn the_window_is_capped_only_past_ethernet_size() {
        let big = 50 << 20;
        let mut c = capped(big, 1_200, Some(Duration::from_millis(20)));
        assert_eq!(c.window(), big, "an Ethernet path keeps its window");
        c.on_mtu_update(ETHERNET_DATAGRAM_BYTES);
        assert_eq!(c.window(), big);
        c.on_mtu_update(65_495);
        assert_eq!(c.window(), LARGE_DATAGRAM_WINDOW_BYTES);
        assert_eq!(c.clone_box().window(), LARGE_DATAGRAM_WINDOW_BYTES);
        // A black hole takes the path back to 1,200 bytes, and the window with it.
        c.on_mtu_update(1_200);
        assert_eq!(c.window(), big);
        // A window already below the cap is left alone.
        let c = capped(64 * 1024, 65_495, None);
        assert_eq!(c.window(), 64 * 1024);
    }

    #[test]
    fn the_window_is_capped_on_a_path_with_a_short_round_trip() {
        let big = 50 << 20;
        let mut c = capped(big, 1_200, None);
        assert_eq!(c.window(), big, "no round trip measured yet");
        c.min_rtt = Some(SHORT_RTT);
        assert_eq!(c.window(), big, "a 1 ms path keeps its window");
        c.min_rtt = Some(Duration::from_micros(80));
        assert_eq!(c.window(), LARGE_DATAGRAM_WINDOW_BYTES, "loopback");
        assert_eq!(c.initial_window(), LARGE_DATAGRAM_WINDOW_BYTES);
    }
}
