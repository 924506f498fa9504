//! A canary bug of the sync core, switched on only by the simulation (through
//! `cs_protocol::canary`) to prove it catches lost writes: a deletion beats a concurrent edit.
//! Off unless set on this thread, so production never takes it.

use std::cell::Cell;

thread_local! {
    static DELETE_WINS: Cell<bool> = const { Cell::new(false) };
}

/// Switches the canary on this thread.
pub fn set_delete_wins(on: bool) {
    DELETE_WINS.with(|c| c.set(on));
}

/// Whether the canary is on for this thread.
pub fn delete_wins() -> bool {
    DELETE_WINS.with(Cell::get)
}
