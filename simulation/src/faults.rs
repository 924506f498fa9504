//! What one seed does: its options, drawn from the seed alone (swarm testing: each seed picks
//! its own mix of fault classes, then their parameters). The runner prints them, so a seed plus
//! the commit replays the whole run.

use rand::{Rng, SeedableRng};

use crate::net::DatagramFaults;
use crate::script::{Script, Then};

/// Bounds of the safety phase's length, drawn per seed: faults happen only before it ends,
/// then everything heals.
pub const SAFETY_MS_MIN: u64 = 2_000;
pub const SAFETY_MS_MAX: u64 = 8_000;
/// Commands the laptop runs in the safety phase.
pub const COMMANDS_MAX: usize = 8;
/// Workspaces (agent nodes) a seed may have.
pub const WORKSPACES_MAX: usize = 2;

/// One scheduled fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultEvent {
    /// Virtual time it starts, in ms.
    pub at_ms: u64,
    pub kind: FaultKind,
}

/// The fault classes a schedule draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Laptop and agent `ws` cannot reach each other.
    Partition { ws: usize, len_ms: u64 },
    /// Datagrams from the laptop to agent `ws` (or back, when `to_laptop`) are dropped.
    PartitionOneWay {
        ws: usize,
        to_laptop: bool,
        len_ms: u64,
    },
    /// Datagrams between the laptop and agent `ws` are held, then delivered at once.
    Clog { ws: usize, len_ms: u64 },
    /// Agent `ws` crashes and comes back after `down_ms` (its state in memory is gone).
    AgentCrash { ws: usize, down_ms: u64 },
    /// The laptop's daemon crashes and restarts at once.
    LaptopCrash,
    /// The laptop sleeps: its clock stops and its network is silent.
    LaptopSleep { len_ms: u64 },
}

/// Everything a seed decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub seed: u64,
    /// When the safety phase ends and everything heals, in virtual ms.
    pub safety_ms: u64,
    pub workspaces: usize,
    pub datagrams: DatagramFaults,
    pub latency_max_ms: u64,
    /// Sorted by time.
    pub events: Vec<FaultEvent>,
    /// The safety phase's commands: (workspace, script).
    pub commands: Vec<(usize, Script)>,
}

impl Options {
    pub fn draw(seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_fa17);
        // Swarm: each class is on for this seed or not, then its parameters.
        let mut on = |p: f64| rng.gen_bool(p);
        let classes = [
            on(0.8),
            on(0.4),
            on(0.3),
            on(0.3),
            on(0.4),
            on(0.3),
            on(0.3),
            on(0.2),
            on(0.2),
            on(0.2),
        ];
        let [loss_on, dup_on, corrupt_on, reorder_on, part_on, oneway_on, clog_on, crash_on, lcrash_on, sleep_on] =
            classes;
        let workspaces = rng.gen_range(1..=WORKSPACES_MAX);
        let safety_ms = rng.gen_range(SAFETY_MS_MIN..=SAFETY_MS_MAX);
        let mut p = |on: bool, max: f64| if on { rng.gen_range(0.0..max) } else { 0.0 };
        let datagrams = DatagramFaults {
            loss: p(loss_on, 0.30),
            duplicate: p(dup_on, 0.05),
            corrupt: p(corrupt_on, 0.02),
            reorder: p(reorder_on, 0.10),
        };
        let mut events = Vec::new();
        let mut add = |rng: &mut rand::rngs::StdRng,
                       on: bool,
                       make: &dyn Fn(&mut rand::rngs::StdRng) -> FaultKind| {
            if on {
                for _ in 0..rng.gen_range(1..=2) {
                    let at_ms = rng.gen_range(50..safety_ms - 300);
                    events.push(FaultEvent {
                        at_ms,
                        kind: make(rng),
                    });
                }
            }
        };
        add(&mut rng, part_on, &|r| FaultKind::Partition {
            ws: r.gen_range(0..workspaces),
            len_ms: r.gen_range(100..6_000),
        });
        add(&mut rng, oneway_on, &|r| FaultKind::PartitionOneWay {
            ws: r.gen_range(0..workspaces),
            to_laptop: r.gen_bool(0.5),
            len_ms: r.gen_range(100..6_000),
        });
        add(&mut rng, clog_on, &|r| FaultKind::Clog {
            ws: r.gen_range(0..workspaces),
            len_ms: r.gen_range(50..3_000),
        });
        add(&mut rng, crash_on, &|r| FaultKind::AgentCrash {
            ws: r.gen_range(0..workspaces),
            down_ms: r.gen_range(0..3_000),
        });
        add(&mut rng, lcrash_on, &|_| FaultKind::LaptopCrash);
        add(&mut rng, sleep_on, &|r| FaultKind::LaptopSleep {
            len_ms: r.gen_range(500..8_000),
        });
        events.sort_by_key(|e| e.at_ms);
        let commands = (0..rng.gen_range(1..=COMMANDS_MAX))
            .map(|_| {
                let bytes = rng.gen_range(0..64 * 1024);
                let then = match rng.gen_range(0..10) {
                    0 => Then::Crash(*[6, 9, 11].get(rng.gen_range(0..3)).unwrap_or(&9)),
                    1 => Then::Hang,
                    _ => Then::Exit(rng.gen_range(0..4)),
                };
                (rng.gen_range(0..workspaces), Script { bytes, then })
            })
            .collect();
        Self {
            seed,
            safety_ms,
            workspaces,
            datagrams,
            latency_max_ms: rng.gen_range(1..60),
            events,
            commands,
        }
    }
}

impl std::fmt::Display for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = &self.datagrams;
        write!(
            f,
            "safety {}ms workspaces {} loss {:.3} dup {:.3} corrupt {:.3} reorder {:.3} latency<={}ms commands {} events [",
            self.safety_ms, self.workspaces, d.loss, d.duplicate, d.corrupt, d.reorder, self.latency_max_ms, self.commands.len()
        )?;
        for (i, e) in self.events.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{}ms {:?}", e.at_ms, e.kind)?;
        }
        write!(f, "]")
    }
}
