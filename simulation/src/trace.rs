//! The semantic trace of one run: virtual time, node, event kind and a size. Its hash is the
//! determinism check: the same seed must give the same hash, bit for bit.

use std::sync::{Arc, Mutex};

/// A shared, append-only trace. All nodes run on one thread; the mutex only satisfies quinn's
/// `Send + Sync` bounds.
#[derive(Clone, Debug, Default)]
pub struct Trace(Arc<Mutex<Inner>>);

#[derive(Debug)]
struct Inner {
    hash: u64,
    events: u64,
    lines: Option<Vec<String>>,
    /// Coverage markers this run reached.
    reached: std::collections::BTreeSet<&'static str>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            hash: 0xcbf29ce484222325,
            events: 0,
            lines: None,
            reached: Default::default(),
        }
    }
}

impl Trace {
    /// A trace that also keeps its lines, for printing a failing seed.
    pub fn verbose() -> Self {
        let t = Self::default();
        t.0.lock().unwrap_or_else(|p| p.into_inner()).lines = Some(Vec::new());
        t
    }

    /// Records one event at the current virtual time (inside a node).
    pub fn event(&self, node: &str, kind: &str, size: u64) {
        let us = turmoil::sim_elapsed().map(|d| d.as_micros()).unwrap_or(0);
        self.event_at(us, node, kind, size);
    }

    /// Records one event at virtual time `us` (the driver, outside every node, says when).
    pub fn event_at(&self, us: u128, node: &str, kind: &str, size: u64) {
        let ms = us;
        let line = format!("{ms} {node} {kind} {size}");
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            // FNV-1a, 64 bits: stable across builds and platforms.
            g.hash ^= u64::from(b);
            g.hash = g.hash.wrapping_mul(0x100000001b3);
        }
        g.events += 1;
        if let Some(lines) = &mut g.lines {
            lines.push(line);
        }
    }

    /// A coverage marker: this interesting thing happened at least once in this run. The
    /// runner reports every marker of [`crate::coverage::MARKERS`] that no seed reached.
    pub fn sometimes(&self, marker: &'static str) {
        debug_assert!(
            crate::coverage::MARKERS.contains(&marker)
                || crate::coverage::SYNC_MARKERS.contains(&marker)
                || crate::coverage::SUPERVISE_MARKERS.contains(&marker)
                || crate::coverage::FORWARD_MARKERS.contains(&marker),
            "unknown coverage marker '{marker}'"
        );
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reached
            .insert(marker);
    }

    /// The coverage markers reached.
    pub fn reached(&self) -> std::collections::BTreeSet<&'static str> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reached
            .clone()
    }

    pub fn hash(&self) -> u64 {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).hash
    }

    pub fn events(&self) -> u64 {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).events
    }

    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .clone()
            .unwrap_or_default()
    }
}
