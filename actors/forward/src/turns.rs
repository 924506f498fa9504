//! Sending turns among the bulk streams of one QUIC connection.
//!
//! quinn sends streams of equal priority round robin, one packet each. With 16 forwarded
//! downloads that means every batch of datagrams the other side reads holds a little of
//! every stream, so its pumps make 16 small local writes per batch, each waking the local
//! reader: 6 times the writes and 11 times the context switches of `ssh -L` for the same
//! bytes (`perf stat` of the agent in a 16-connection upload: 99,507 `sendto` in 5 s, about
//! 12 KB each; sshd 37,118 writes of about 37 KB). Sending one stream until it runs dry
//! (quinn's `send_fairness(false)`) brought that to 16,656 writes, but let one stream hold all
//! the others, small requests included, for as long as it had more to send.
//!
//! Turns keep the batching and bound the wait:
//! - A stream whose local side keeps it busy (its full reads add up to [`BULK_AFTER_BYTES`]
//!   without a pause) is *bulk* and joins its connection's queue of bulk streams.
//! - The stream at the front of the queue has the turn: priority [`PRIORITY_TURN`]; the rest
//!   of the queue waits at [`PRIORITY_WAITING`]; every other stream (requests, echoes, sync,
//!   commands) keeps quinn's default 0 and goes first.
//! - After writing [`QUANTUM_BYTES`] the stream with the turn goes to the back of the queue;
//!   so does one whose local side has nothing ready ([`Ticket::pass`]). A stream leaves the
//!   queue when it ends, and when its local side stays quiet for [`BULK_IDLE`]; then it is
//!   an ordinary stream again ([`Bulkness`]). A stream that left the queue whenever it
//!   had nothing ready went back to priority 0, above the bulk streams, just when its sending
//!   kept up best, and ran ahead of the others: in 16-connection transfers of 32 MiB each
//!   the first finished at 39-63% of the sample's time, against 94-99% through `ssh -L`.
//!
//! Priorities only order streams that have bytes to send, so nothing waits on a stream that
//! cannot send: if the stream with the turn is blocked (its reader is slow), the waiting ones
//! share the link round robin as before. This module holds only the queue; it reads no clock
//! or socket.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;

/// Bytes the stream with the turn writes before the next bulk stream's turn: the amount a
/// receiving stream gets in one run (quinn grants stream credit in steps of an eighth of the
/// 8 MiB stream window, 1 MiB).
pub const QUANTUM_BYTES: u64 = 1024 * 1024;
/// Bytes of full reads from a stream's local side, without a pause of [`BULK_IDLE`], that make
/// the stream bulk.
pub const BULK_AFTER_BYTES: u64 = 1024 * 1024;
/// How long a read from a bulk stream's local side waits before the stream is an ordinary one
/// again.
pub const BULK_IDLE: Duration = Duration::from_millis(50);
/// A bulk stream whose turn it is: below every other kind of stream.
pub const PRIORITY_TURN: i32 = -1;
/// A bulk stream waiting for its turn.
pub const PRIORITY_WAITING: i32 = -2;
/// Connections whose queues are looked up at once (see [`Turns::of`]); past it the oldest
/// entries are dropped, which only costs those connections their batching.
pub const CONNECTIONS_MAX: usize = 4096;

#[derive(Debug, Default)]
struct Queue {
    /// Bulk streams in turn order; the front has the turn.
    order: VecDeque<(u64, Arc<Notify>)>,
    /// Bytes the front has written in its current turn.
    written: u64,
    /// The next ticket number.
    next: u64,
}

impl Queue {
    fn front_is(&self, id: u64) -> bool {
        self.order.front().map(|(front, _)| *front) == Some(id)
    }

    fn wake_front(&self) {
        if let Some((_, wake)) = self.order.front() {
            wake.notify_one();
        }
    }
}

/// One connection's queue of bulk streams.
#[derive(Debug, Default)]
pub struct Turns {
    q: Mutex<Queue>,
}

/// A bulk stream's place in its connection's queue; dropping it leaves the queue.
#[derive(Debug)]
pub struct Ticket {
    turns: Arc<Turns>,
    id: u64,
    wake: Arc<Notify>,
}

type Registry = Mutex<VecDeque<(usize, Weak<Turns>)>>;

static REGISTRY: Registry = Mutex::new(VecDeque::new());

impl Turns {
    /// The queue of `conn`'s streams, shared by every pump on it in this process.
    pub fn of(conn: &quinn::Connection) -> Arc<Turns> {
        Self::lookup(&REGISTRY, conn.stable_id())
    }

    fn lookup(registry: &Registry, key: usize) -> Arc<Turns> {
        let mut r = registry.lock().unwrap_or_else(|p| p.into_inner());
        r.retain(|(_, w)| w.strong_count() > 0);
        if let Some(t) = r
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
        {
            return t;
        }
        let t = Arc::new(Turns::default());
        if r.len() >= CONNECTIONS_MAX {
            r.pop_front();
        }
        r.push_back((key, Arc::downgrade(&t)));
        t
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the back of the queue.
    pub fn join(self: &Arc<Self>) -> Ticket {
        let mut q = self.queue();
        let id = q.next;
        q.next += 1;
        let wake = Arc::new(Notify::new());
        if q.order.is_empty() {
            q.written = 0;
        }
        q.order.push_back((id, wake.clone()));
        Ticket {
            turns: self.clone(),
            id,
            wake,
        }
    }

    /// Bulk streams in the queue.
    pub fn len(&self) -> usize {
        self.queue().order.len()
    }

    /// Whether no stream is bulk.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ticket {
    /// Whether this stream has the turn.
    pub fn holds(&self) -> bool {
        self.turns.queue().front_is(self.id)
    }

    /// The stream priority that goes with this ticket now.
    pub fn priority(&self) -> i32 {
        if self.holds() {
            PRIORITY_TURN
        } else {
            PRIORITY_WAITING
        }
    }

    /// Counts `n` bytes written; after [`QUANTUM_BYTES`] in one turn, the turn passes on.
    /// Bytes written while waiting do not count.
    pub fn wrote(&self, n: u64) {
        let mut q = self.turns.queue();
        if !q.front_is(self.id) {
            return;
        }
        q.written += n;
        if q.written >= QUANTUM_BYTES {
            q.written = 0;
            q.order.rotate_left(1);
            q.wake_front();
        }
    }

    /// Passes the turn on if this stream has it (its local side has nothing ready): it goes to
    /// the back of the queue and stays bulk.
    pub fn pass(&self) {
        let mut q = self.turns.queue();
        if q.front_is(self.id) && q.order.len() > 1 {
            q.written = 0;
            q.order.rotate_left(1);
            q.wake_front();
        }
    }

    /// Resolves when the turn may have come to this stream (check [`Ticket::holds`]).
    pub async fn turn_may_have_come(&self) {
        self.wake.notified().await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut q = self.turns.queue();
        let Some(at) = q.order.iter().position(|(id, _)| *id == self.id) else {
            return;
        };
        q.order.remove(at);
        if at == 0 {
            q.written = 0;
            q.wake_front();
        }
    }
}

/// What a stream's local reads make of it, from how full they were and how long each waited
/// (the pump's clock says).
///
/// Only full reads count toward [`BULK_AFTER_BYTES`]: a request or a keystroke never makes a
/// stream bulk. But short reads do not end a run either: a bulk stream whose sending keeps up
/// with its local side reads little at a time, and it is still bulk. Only a pause of
/// [`BULK_IDLE`] does. (A stream that stopped being bulk at each short read or empty local side
/// went back to priority 0, above the bulk streams, just when its sending kept up best, and ran
/// ahead of them: in 16-connection transfers of 32 MiB each the first finished at 39-76% of the
/// sample's time, against 91-100% through `ssh -L`.)
#[derive(Debug, Default)]
pub struct Bulkness {
    /// Bytes of full reads since the last pause.
    run: u64,
    bulk: bool,
}

/// How a read changed a stream's [`Bulkness`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// It is bulk now: it joins the queue.
    Joins,
    /// It is an ordinary stream again: it leaves the queue.
    Leaves,
    /// As before.
    Stays,
}

impl Bulkness {
    /// Counts a read of `n` bytes (`full`: as many as were asked for) that waited `waited`.
    pub fn read(&mut self, full: bool, n: u64, waited: Duration) -> Change {
        let was = self.bulk;
        if waited >= BULK_IDLE {
            self.run = 0;
            self.bulk = false;
        }
        if full {
            self.run = self.run.saturating_add(n);
        }
        if self.run >= BULK_AFTER_BYTES {
            self.bulk = true;
        }
        match (was, self.bulk) {
            (false, true) => Change::Joins,
            (true, false) => Change::Leaves,
            _ => Change::Stays,
        }
    }

    /// Whether the stream is bulk.
    pub fn is_bulk(&self) -> bool {
        self.bulk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(tickets: &[&Ticket]) -> Vec<usize> {
        tickets
            .iter()
            .enumerate()
            .filter(|(_, t)| t.holds())
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn the_turn_passes_round_robin_after_a_quantum() {
        let turns = Arc::new(Turns::default());
        let (a, b, c) = (turns.join(), turns.join(), turns.join());
        let all = [&a, &b, &c];
        assert_eq!(holder(&all), [0]);
        assert_eq!(a.priority(), PRIORITY_TURN);
        assert_eq!(b.priority(), PRIORITY_WAITING);
        // Waiting streams' writes do not count toward anyone's turn.
        b.wrote(QUANTUM_BYTES * 4);
        assert_eq!(holder(&all), [0]);
        a.wrote(QUANTUM_BYTES - 1);
        assert_eq!(holder(&all), [0]);
        a.wrote(1);
        assert_eq!(holder(&all), [1]);
        b.wrote(QUANTUM_BYTES);
        assert_eq!(holder(&all), [2]);
        c.wrote(QUANTUM_BYTES + 5);
        assert_eq!(holder(&all), [0], "after the last, the first again");
        // The overshoot of a write is not carried into the next turn.
        a.wrote(QUANTUM_BYTES - 1);
        assert_eq!(holder(&all), [0]);
    }

    #[test]
    fn leaving_passes_the_turn_and_a_new_stream_waits_at_the_back() {
        let turns = Arc::new(Turns::default());
        let a = turns.join();
        let b = turns.join();
        a.wrote(QUANTUM_BYTES / 2);
        drop(a);
        assert!(b.holds());
        // b's turn starts afresh: half a quantum more is not enough.
        b.wrote(QUANTUM_BYTES / 2);
        assert!(b.holds());
        let c = turns.join();
        assert!(!c.holds());
        // A waiting stream leaving changes nothing for the front.
        let d = turns.join();
        drop(c);
        assert!(b.holds());
        b.wrote(QUANTUM_BYTES / 2);
        assert!(d.holds());
        drop(b);
        drop(d);
        assert!(turns.is_empty());
        let e = turns.join();
        assert!(e.holds(), "an empty queue's first comer has the turn");
    }

    #[test]
    fn passing_hands_the_turn_on_and_keeps_the_place_in_the_queue() {
        let turns = Arc::new(Turns::default());
        let (a, b, c) = (turns.join(), turns.join(), turns.join());
        let all = [&a, &b, &c];
        a.wrote(QUANTUM_BYTES / 2);
        // A waiting stream passing changes nothing.
        c.pass();
        assert_eq!(holder(&all), [0]);
        a.pass();
        assert_eq!(holder(&all), [1]);
        assert_eq!(turns.len(), 3, "a passed but stays bulk");
        // b's turn starts afresh, and a comes after c.
        b.wrote(QUANTUM_BYTES / 2);
        assert_eq!(holder(&all), [1]);
        b.wrote(QUANTUM_BYTES / 2);
        assert_eq!(holder(&all), [2]);
        c.wrote(QUANTUM_BYTES);
        assert_eq!(holder(&all), [0]);
        // Alone in the queue, a stream keeps its turn.
        drop((b, c));
        a.pass();
        assert!(a.holds());
    }

    #[test]
    fn full_reads_without_a_pause_make_a_stream_bulk_and_only_a_pause_ends_it() {
        const FULL: u64 = 64 * 1024;
        let brief = BULK_IDLE / 10;
        let mut s = Bulkness::default();
        // Short reads never make a stream bulk, however many and however close together.
        for _ in 0..10_000 {
            assert_eq!(s.read(false, 1000, Duration::ZERO), Change::Stays);
        }
        assert!(!s.is_bulk());
        // Full reads do, after BULK_AFTER_BYTES, brief waits and short reads in between.
        let fulls = BULK_AFTER_BYTES / FULL;
        for i in 1..fulls {
            assert_eq!(s.read(true, FULL, brief), Change::Stays, "full read {i}");
            assert_eq!(s.read(false, 10, brief), Change::Stays);
        }
        assert_eq!(s.read(true, FULL, Duration::ZERO), Change::Joins);
        // A bulk stream stays bulk through short reads and brief waits...
        for _ in 0..1000 {
            assert_eq!(s.read(false, 100, brief), Change::Stays);
        }
        assert!(s.is_bulk());
        // ...and is an ordinary stream again after a pause, even if that read is full.
        assert_eq!(s.read(true, FULL, BULK_IDLE), Change::Leaves);
        assert!(!s.is_bulk());
        // A pause starts the count afresh (the read after it counts).
        for _ in 2..fulls {
            assert_eq!(s.read(true, FULL, Duration::ZERO), Change::Stays);
        }
        assert_eq!(
            s.read(true, FULL, BULK_IDLE),
            Change::Stays,
            "the count began again"
        );
        for _ in 2..fulls {
            assert_eq!(s.read(true, FULL, Duration::ZERO), Change::Stays);
        }
        assert_eq!(s.read(true, FULL, Duration::ZERO), Change::Joins);
    }

    #[tokio::test]
    async fn the_next_stream_is_woken_when_the_turn_comes_to_it() {
        let turns = Arc::new(Turns::default());
        let a = turns.join();
        let b = turns.join();
        let woke =
            tokio::time::timeout(std::time::Duration::from_millis(50), b.turn_may_have_come());
        // Not yet: a still has its turn.
        assert!(woke.await.is_err());
        a.wrote(QUANTUM_BYTES);
        // The wake-up is kept for a waiter that comes after it.
        tokio::time::timeout(std::time::Duration::from_secs(5), b.turn_may_have_come())
            .await
            .expect("b is woken");
        assert!(b.holds());
        // a leaving while waiting wakes nobody; b leaving hands the turn back to a.
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), a.turn_may_have_come())
            .await
            .expect("a is woken");
        assert!(a.holds());
    }

    #[test]
    fn each_connection_has_its_own_queue_and_dead_ones_are_forgotten() {
        let registry: Registry = Mutex::new(VecDeque::new());
        let one = Turns::lookup(&registry, 1);
        let again = Turns::lookup(&registry, 1);
        assert!(Arc::ptr_eq(&one, &again));
        let two = Turns::lookup(&registry, 2);
        assert!(!Arc::ptr_eq(&one, &two));
        drop((one, again));
        let _three = Turns::lookup(&registry, 3);
        let keys: Vec<usize> = registry.lock().unwrap().iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, [2, 3], "the dropped queue of connection 1 is gone");
    }
}
