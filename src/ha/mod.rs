//! The HA decision logic: pure, synchronous, and free of I/O.
//!
//! Each loop the agent builds a [`Snapshot`] (the DCS view, the local
//! PostgreSQL, fresh statuses of peers when a leader race is on, the
//! configuration and the time) and calls [`decide`], which returns one
//! [`Action`] and the typed [`Reason`] for it. The agent's executor is the
//! only code that turns the action into side effects.
//!
//! Time is a field of the snapshot (`now_ms`, on `CLOCK_BOOTTIME`), never
//! read here, so every branch — including "the lease is about to run out" —
//! is reachable from a table test. `purity_test.rs` fails the build if
//! this module ever grows an import of tokio, sockets, files or clocks.

mod decide;
mod election;
pub mod failsafe;
pub mod lease;
pub mod membership;
pub mod promotion;
mod slots;
mod snapshot;
pub mod sync;
pub mod vip;

pub use decide::decide;
pub use election::{Disqualified, rank_candidates};
pub use snapshot::{
    Action, Decision, DemoteReason, Job, Lease, Local, OnDisk, PeerReport, PeerStatus, Reason,
    Snapshot,
};

#[cfg(test)]
mod decide_test;
#[cfg(test)]
mod purity_test;
