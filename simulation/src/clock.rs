//! A laptop that sleeps: quinn on the laptop node reads time through [`SleepyRuntime`], whose
//! clock stands still while the laptop is asleep, as `CLOCK_MONOTONIC` does on a suspended
//! Linux laptop, while the agent's clock runs on. On resume the laptop's connection still looks
//! alive to it, but the agent gave up on it long ago: the next packet draws a stateless reset,
//! the path a real laptop takes after closing its lid.
//!
//! What it does not model: tokio and actix timers on the laptop (the daemon's backoff, the
//! command timeouts) keep running during the sleep, because turmoil gives all nodes one clock.
//! The laptop's sockets drop every datagram both ways while asleep.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use quinn::{AsyncTimer, AsyncUdpSocket, Runtime};

/// How often a timer that is due while the laptop sleeps looks again.
const ASLEEP_POLL_MS: u64 = 20;

/// Whether the laptop sleeps, and how much of its life it has slept.
#[derive(Debug, Default)]
pub struct Sleep {
    inner: Mutex<SleepInner>,
}

#[derive(Debug, Default)]
struct SleepInner {
    /// Virtual time (since the simulation started) at which the current sleep began.
    asleep_since: Option<Duration>,
    /// Total length of the sleeps that ended.
    slept: Duration,
}

impl Sleep {
    fn lock(&self) -> std::sync::MutexGuard<'_, SleepInner> {
        // Poisoned only by a panic on this single thread; the seed fails anyway.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a sleep at virtual time `now` (since the start of the simulation).
    pub fn begin(&self, now: Duration) {
        let mut g = self.lock();
        if g.asleep_since.is_none() {
            g.asleep_since = Some(now);
        }
    }

    /// Ends the sleep at virtual time `now`.
    pub fn end(&self, now: Duration) {
        let mut g = self.lock();
        if let Some(since) = g.asleep_since.take() {
            g.slept += now.saturating_sub(since);
        }
    }

    pub fn is_asleep(&self) -> bool {
        self.lock().asleep_since.is_some()
    }

    /// How far the laptop's monotonic clock lags the simulation's.
    fn lag(&self) -> Duration {
        let g = self.lock();
        let now = turmoil::sim_elapsed().unwrap_or_default();
        g.slept
            + g.asleep_since
                .map_or(Duration::ZERO, |s| now.saturating_sub(s))
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std() - self.lag()
    }
}

/// quinn's runtime for the laptop node: tokio's, read through the laptop's sleeping clock.
#[derive(Clone)]
pub struct SleepyRuntime(pub Arc<Sleep>);

impl fmt::Debug for SleepyRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SleepyRuntime")
    }
}

impl Runtime for SleepyRuntime {
    fn new_timer(&self, deadline: Instant) -> Pin<Box<dyn AsyncTimer>> {
        let mut t = SleepyTimer {
            clock: self.0.clone(),
            deadline,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
        };
        t.arm();
        Box::pin(t)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(future);
    }

    fn wrap_udp_socket(&self, _: std::net::UdpSocket) -> std::io::Result<Arc<dyn AsyncUdpSocket>> {
        Err(std::io::Error::other(
            "the simulation uses its own sockets, never the OS's",
        ))
    }

    fn now(&self) -> Instant {
        self.0.now()
    }
}

/// A timer on the laptop's clock: it never fires while the laptop sleeps, and a deadline in
/// laptop time moves later by however long the laptop slept.
struct SleepyTimer {
    clock: Arc<Sleep>,
    deadline: Instant,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl fmt::Debug for SleepyTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SleepyTimer").finish_non_exhaustive()
    }
}

impl SleepyTimer {
    /// Arms the tokio timer for the next moment the deadline could be due.
    fn arm(&mut self) {
        let wait = if self.clock.is_asleep() {
            Duration::from_millis(ASLEEP_POLL_MS)
        } else {
            self.deadline.saturating_duration_since(self.clock.now())
        };
        let at = tokio::time::Instant::now() + wait;
        self.sleep.as_mut().reset(at);
    }
}

impl AsyncTimer for SleepyTimer {
    fn reset(mut self: Pin<&mut Self>, deadline: Instant) {
        self.deadline = deadline;
        self.arm();
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<()> {
        // Bounded: each pass either returns or re-arms a timer in the future.
        loop {
            if Future::poll(self.sleep.as_mut(), cx).is_pending() {
                return Poll::Pending;
            }
            if !self.clock.is_asleep() && self.clock.now() >= self.deadline {
                return Poll::Ready(());
            }
            self.arm();
        }
    }
}
