//! `cs-simulation`: run seeds of the whole-system simulation.
//!
//! `cargo run --release -p cs-simulation -- --seed N` replays one seed (printing its faults and
//! trace hash); `--seeds A..B` runs a range; `--trace` prints the trace of a single seed.

use anyhow::{bail, Context as _};
use cs_simulation::trace::Trace;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut range = 0..1u64;
    let mut print_trace = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seed" => {
                let v = args.next().context("--seed needs a number")?;
                let s: u64 = v.parse().with_context(|| format!("invalid seed '{v}'"))?;
                range = s..s + 1;
            }
            "--seeds" => {
                let v = args.next().context("--seeds needs A..B")?;
                let (a, b) = v
                    .split_once("..")
                    .with_context(|| format!("invalid range '{v}': expected A..B"))?;
                range = a.parse().with_context(|| format!("invalid range '{v}'"))?
                    ..b.parse().with_context(|| format!("invalid range '{v}'"))?;
            }
            "--trace" => print_trace = true,
            other => bail!("unknown option '{other}': expected --seed N, --seeds A..B or --trace"),
        }
    }
    let start = std::time::Instant::now();
    let (mut failed, mut virtual_ms, n) = (0, 0u64, range.end - range.start);
    for seed in range {
        let trace = if print_trace {
            Trace::verbose()
        } else {
            Trace::default()
        };
        match cs_simulation::run_seed(seed, trace.clone()) {
            Ok(o) => {
                virtual_ms += o.virtual_ms;
                println!(
                    "seed {seed}: ok hash {:016x} events {} commands ok {} failed {} virtual {} ms faults {:?}",
                    o.hash, o.events, o.commands_ok, o.commands_failed, o.virtual_ms, o.faults
                );
            }
            Err(e) => {
                failed += 1;
                println!(
                    "seed {seed}: FAILED {e}; faults {:?} (replay: cargo run --release -p cs-simulation -- --seed {seed})",
                    cs_simulation::Faults::draw(seed)
                );
            }
        }
        if print_trace {
            for l in trace.lines() {
                println!("  {l}");
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{n} seeds, {failed} failed, {:.1} seeds/s, virtual/real time {:.0}x",
        n as f64 / secs,
        virtual_ms as f64 / 1e3 / secs
    );
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
