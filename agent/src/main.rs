//! `cs-agent`: runs inside a workspace and serves the laptop's `cs` over QUIC.
//!
//! Exit codes: 0 after a clean shutdown (SIGTERM, SIGINT), 1 on an error (printed as one line
//! with its causes), 2 on a usage error.

use clap::Parser;
use cs_agent::app;

fn main() {
    let args = app::Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = app::run(args) {
        eprintln!("cs-agent: {e:#}");
        std::process::exit(1);
    }
}
