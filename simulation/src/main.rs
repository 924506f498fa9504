//! `cs-simulation`: run seeds of the whole-system simulation.
//!
//! `cargo run --release -p cs-simulation -- --seed N` replays one seed (printing its options,
//! outcome and trace hash); `--seeds A..B` runs a range on `--threads` threads (default: the
//! machine's cores); `--scenario sync|supervise|forward` runs the sync, supervise or forward scenario instead of exec; `--regressions` adds the seeds of `simulation/regressions.txt`; `--trace`
//! prints the trace of every seed run; `--canary NAME` switches a deliberate bug on. Exits 1 if
//! any seed failed.

use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context as _};
use cs_simulation::trace::Trace;
use cs_simulation::{coverage, Options};

/// `println!` that treats a closed pipe (`| head`) as the end of the run, not an error.
macro_rules! out {
    ($($t:tt)*) => {
        if writeln!(std::io::stdout().lock(), $($t)*).is_err() {
            std::process::exit(0);
        }
    };
}

/// The options, as `--help` prints them and an unknown option's error names them.
const USAGE: &str = "[--seed N | --seeds A..B] [--regressions] [--threads N] [--canary NAME] \
[--scenario exec|sync|supervise|forward] [--trace] [--suspect]";

fn main() -> anyhow::Result<()> {
    // CS_LOG=debug shows the product's own logs (for reading one seed, not for many).
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("CS_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let mut args = std::env::args().skip(1);
    let mut seeds: Vec<u64> = Vec::new();
    let mut print_trace = false;
    let mut canaries = Vec::new();
    let mut canary_names: Vec<String> = Vec::new();
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut scenario = Scenario::Exec;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seed" => {
                let v = args.next().context("--seed needs a number")?;
                seeds.push(v.parse().with_context(|| format!("invalid seed '{v}'"))?);
            }
            "--seeds" => {
                let v = args.next().context("--seeds needs A..B")?;
                let (a, b) = v
                    .split_once("..")
                    .with_context(|| format!("invalid range '{v}': expected A..B"))?;
                let a: u64 = a.parse().with_context(|| format!("invalid range '{v}'"))?;
                let b: u64 = b.parse().with_context(|| format!("invalid range '{v}'"))?;
                seeds.extend(a..b);
            }
            "--regressions" => seeds.extend(cs_simulation::regression_seeds()),
            "--trace" => print_trace = true,
            "--scenario" => {
                let v = args
                    .next()
                    .context("--scenario needs exec, sync, supervise or forward")?;
                scenario = match v.as_str() {
                    "exec" => Scenario::Exec,
                    "sync" => Scenario::Sync,
                    "supervise" => Scenario::Supervise,
                    "forward" => Scenario::Forward,
                    other => bail!(
                        "unknown scenario '{other}': expected exec, sync, supervise or forward"
                    ),
                };
            }
            "--suspect" => return suspect(),
            "--threads" => {
                let v = args.next().context("--threads needs a number")?;
                threads = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .with_context(|| format!("invalid thread count '{v}'"))?;
            }
            "--canary" => {
                let v = args.next().context("--canary needs a name")?;
                canaries.push(cs_simulation::parse_canary(&v).map_err(anyhow::Error::msg)?);
                canary_names.push(v);
            }
            "-h" | "--help" => {
                println!("usage: cs-simulation {USAGE}");
                return Ok(());
            }
            other => bail!("unknown option '{other}': expected {USAGE}"),
        }
    }
    if seeds.is_empty() {
        seeds.push(0);
    }
    // Real time, on purpose: the runner reports seeds per second.
    #[allow(clippy::disallowed_methods)]
    let start = std::time::Instant::now();
    let next = AtomicUsize::new(0);
    // (seed, line printed, failed, virtual ms, markers reached), in the order seeds finish.
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.min(seeds.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&seed) = seeds.get(i) else { break };
                let trace = if print_trace {
                    Trace::verbose()
                } else {
                    Trace::default()
                };
                let opts = match scenario {
                    Scenario::Sync => cs_simulation::sync_scenario::SyncOptions::draw(seed).to_string(),
                    Scenario::Supervise => {
                        cs_simulation::supervise_scenario::SupOptions::draw(seed).to_string()
                    }
                    Scenario::Forward => {
                        cs_simulation::forward_scenario::FwdOptions::draw(seed).to_string()
                    }
                    Scenario::Exec => Options::draw(seed).to_string(),
                };
                // What else the replay needs: the scenario and the canaries of this run.
                let flag = match scenario {
                    Scenario::Exec => "",
                    Scenario::Sync => " --scenario sync",
                    Scenario::Supervise => " --scenario supervise",
                    Scenario::Forward => " --scenario forward",
                };
                let replay_flags: String = std::iter::once(flag.to_string())
                    .chain(canary_names.iter().map(|c| format!(" --canary {c}")))
                    .collect();
                let run = match scenario {
                    Scenario::Sync => cs_simulation::run_sync_seed,
                    Scenario::Supervise => cs_simulation::run_supervise_seed,
                    Scenario::Forward => cs_simulation::run_forward_seed,
                    Scenario::Exec => cs_simulation::run_seed,
                };
                let sync = scenario == Scenario::Sync;
                let (unit, bad) = match scenario {
                    Scenario::Exec => ("commands", "failed"),
                    Scenario::Sync => ("cycles", "conflicts"),
                    Scenario::Supervise => ("processes", "failed"),
                    Scenario::Forward => ("connections clean", "other"),
                };
                let _ = sync;
                let (line, failed, virtual_ms, reached) =
                    match run(seed, trace.clone(), &canaries) {
                        Ok(o) => (
                            format!(
                                "seed {seed}: ok hash {:016x} events {} {} ok {} {} {} virtual {} ms; {opts}",
                                o.hash,
                                o.events,
                                unit,
                                o.commands_ok,
                                bad,
                                o.commands_failed,
                                o.virtual_ms
                            ),
                            false,
                            o.virtual_ms,
                            o.reached,
                        ),
                        Err(f) => (
                            format!(
                                "seed {seed}: FAILED hash {:016x} {}; {opts} (replay: cargo run --release -p cs-simulation -- --seed {seed}{replay_flags})",
                                f.hash, f.message
                            ),
                            true,
                            0,
                            trace.reached(),
                        ),
                    };
                let mut out = line.clone();
                if print_trace {
                    for l in trace.lines() {
                        out.push_str("\n  ");
                        out.push_str(&l);
                    }
                }
                // A closed pipe (`| head`) is not an error: stop quietly.
                if writeln!(std::io::stdout().lock(), "{out}").is_err() {
                    std::process::exit(0);
                }
                results
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((seed, failed, virtual_ms, reached));
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let secs = start.elapsed().as_secs_f64();
    let failed: Vec<u64> = results.iter().filter(|r| r.1).map(|r| r.0).collect();
    let virtual_ms: u64 = results.iter().map(|r| r.2).sum();
    let n = results.len();
    out!(
        "{n} seeds, {} failed, {:.1} seeds/s on {threads} thread(s), virtual/real time {:.0}x",
        failed.len(),
        n as f64 / secs,
        virtual_ms as f64 / 1e3 / secs
    );
    if n > 1 {
        let markers = match scenario {
            Scenario::Sync => coverage::SYNC_MARKERS,
            Scenario::Supervise => coverage::SUPERVISE_MARKERS,
            Scenario::Forward => coverage::FORWARD_MARKERS,
            Scenario::Exec => coverage::MARKERS,
        };
        let missing = coverage::missing_of(markers, results.iter().flat_map(|r| r.3.iter()));
        if missing.is_empty() {
            out!("coverage: every marker reached");
        } else {
            out!("coverage: never reached: {}", missing.join("; "));
        }
    }
    if !failed.is_empty() {
        out!("failed seeds: {failed:?}");
        std::process::exit(1);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Exec,
    Sync,
    Supervise,
    Forward,
}

/// `--suspect`: the lost-Finished experiment (see `cs_simulation::suspect`), as a table.
fn suspect() -> anyhow::Result<()> {
    use cs_simulation::suspect::{lost_finished, Client};
    out!(
        "lost client Finished, then a one-way partition (laptop to agent); latency 10 ms each way"
    );
    out!(
        "{:>9} {:>7} {:>6} {:>12} {:>9}  first error",
        "partition",
        "idle",
        "client",
        "hello at",
        "attempts"
    );
    for idle in [4_000u64, 10_000] {
        for partition in [200u64, 1_000, 3_000, 6_000, 12_000] {
            for client in [Client::Raw, Client::Ours] {
                let o = lost_finished(client, partition, idle).map_err(anyhow::Error::msg)?;
                out!(
                    "{:>7}ms {:>5}ms {:>6} {:>12} {:>9}  {}",
                    partition,
                    idle,
                    format!("{client:?}").to_lowercase(),
                    o.hello_ms.map_or("never".into(), |t| format!("{t} ms")),
                    o.attempts,
                    o.first_error.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
