//! Workspace automation (the seed's "Workspace Automation" page): the start sequence,
//! checkouts, manifests with hooks, supervised daemons and cron jobs.
//!
//! The cores here read no clock, no filesystem and spawn nothing: times come in as values
//! ([`cron::Minute`], milliseconds), files as text. The agent's shells do the IO.

pub mod backoff;
pub mod checkout;
pub mod cron;
pub mod definition;
pub mod env;
pub mod jobs;
pub mod sequence;
pub mod template;
