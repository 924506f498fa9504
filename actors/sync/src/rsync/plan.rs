//! The transfer's plan. (Being written: see the module doc in `rsync/mod.rs`.)

use super::filter::Rules;
use super::{Entry, Options, Plan};

/// What the receiver must do so that `dst` becomes what rsync makes of it from `src`.
pub fn plan(src: &[Entry], dst: &[Entry], opts: &Options, rules: &Rules) -> Plan {
    let _ = (src, dst, opts, rules);
    Plan::default()
}
