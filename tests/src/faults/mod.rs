//! A Jepsen-style fault harness the project owns (docs/faults.md): a seeded nemesis
//! ([`nemesis`]) breaks a cluster of real `quiverd` processes (kill -9, SIGSTOP, graceful
//! restarts, network partitions and degraded links through [`crate::proxy`], a flipped byte in
//! a segment file, power loss by the brokers' sync ledgers ([`power`])) while producers and group consumers ([`workload`]) record every operation
//! in a JSON-lines history ([`history`]); after a heal and a quiet period every broker's log is
//! read into the history too, and [`checker::check`] reports lost, duplicated, misplaced and
//! diverging records, and the consumer group's anomalies. `quiver-faults` (src/bin) runs it.

pub mod checker;
pub mod history;
pub mod nemesis;
pub mod power;
pub mod rng;
pub mod run;
pub mod workload;

#[cfg(test)]
mod checker_tests;

pub use checker::{check, Report};
pub use run::{run, NegativeControl, RunConfig, RunOutcome};
