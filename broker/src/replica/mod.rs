//! A partition replica driven by raft-rs (issue 17, docs/replication.md): the Raft log is the
//! partition's segment log (§2, §2a).
//!
//! This is the sans-IO core the broker's replication loop and the seeded simulator both drive:
//! [`LogStorage`] is raft-rs's read-only `Storage` over the log plus the durable hard state
//! beside it, and [`handle_ready`] performs one `Ready` in the order raft-rs documents. No
//! networking and no partition wiring yet (§2a).

// Until the replication loop exists, only the simulator calls this module.
#![cfg_attr(not(test), allow(dead_code))]

mod admit;
#[cfg(test)]
mod decode_fuzz_tests;
mod logger;
pub(crate) mod membership;
mod ready;
mod snapshot;
mod state;
mod storage;
mod wire;

#[cfg(test)]
mod sim_tests;

use std::path::PathBuf;

use quiver_protocol::batch::BatchError;

use crate::log::LogError;

pub(crate) use crate::partition::Tracker;
#[cfg_attr(not(test), allow(unused_imports))]
pub(crate) use admit::admit;
#[cfg_attr(not(test), allow(unused_imports))]
pub(crate) use logger::raft_logger;
#[cfg_attr(not(test), allow(unused_imports))]
pub(crate) use ready::{config, handle_ready, handle_taken, in_place, propose_batch};
pub(crate) use storage::{LogStorage, Placed};
pub(crate) use wire::{from_wire, to_wire};

/// Whether `node` may send `m`. A replica repairing lost committed entries (damage found at
/// recovery, docs/replication.md §7) neither asks for votes nor grants them, so it can neither
/// lead nor help elect a leader that lacks what it had acknowledged; it still answers appends
/// and heartbeats, which is how it repairs.
pub(crate) fn may_send(node: &raft::RawNode<LogStorage>, m: &raft::eraftpb::Message) -> bool {
    use raft::eraftpb::MessageType::*;
    if !node.store().repairing() {
        return true;
    }
    match m.get_msg_type() {
        MsgRequestVote | MsgRequestPreVote => false,
        MsgRequestVoteResponse | MsgRequestPreVoteResponse => m.reject,
        _ => true,
    }
}

/// Why a replica could not take a step. Any of these stops the partition's group: the
/// replica's log or hard state is no longer known to match what it told its peers.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplicaError {
    /// The partition log failed (IO, poisoned, corrupt).
    #[error(transparent)]
    Log(#[from] LogError),
    /// `raft-state` is damaged or not ours.
    #[error("raft state {path}: {reason}")]
    StateCorrupt { path: PathBuf, reason: String },
    /// An entry's data is not a valid record batch.
    #[error("entry data is not a valid batch: {0}")]
    Batch(#[from] BatchError),
    /// raft-rs refused a call (a proposal dropped, an invalid configuration).
    #[error(transparent)]
    Raft(#[from] raft::Error),
    /// A term that cannot be stored as an `i32` leader epoch (or 0, which no entry has).
    #[error("term {0} cannot be a leader epoch")]
    TermOutOfRange(u64),
    /// An entry kind the storage does not hold (we propose configuration changes as V2 only).
    #[error("unsupported entry: {0}")]
    UnsupportedEntry(&'static str),
    /// Entries that do not continue the log: a bug in the caller or in raft-rs' input checks.
    #[error("entries start at index {got}, the log continues at {expected}")]
    Gap { expected: u64, got: u64 },
    /// Raft asked to overwrite a committed entry: a broken invariant.
    #[error("truncating at index {index} would remove committed entries (commit {commit})")]
    TruncateCommitted { index: u64, commit: u64 },
    /// A stored batch from the leader that carries other offsets or another epoch than this
    /// replica's log gives it: the logs diverged below the point Raft agrees on.
    #[error(
        "entry {index}: batch says offset {batch_offset} epoch {batch_epoch}, the log has \
         offset {offset} epoch {epoch}"
    )]
    Diverged { index: u64, offset: u64, epoch: i32, batch_offset: u64, batch_epoch: i32 },
    /// Proposals are made on the leader only (followers would forward them).
    #[error("not the leader")]
    NotLeader,
    /// A producer's batch with the control bit: it would read back as a Raft entry.
    #[error("control batches cannot be proposed")]
    ControlBatch,
    /// A Raft snapshot from the leader that cannot be installed (its data does not check out).
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The producer state or tail cache could not follow the log (a failed snapshot write).
    #[error("partition state: {0}")]
    Tracker(String),
}
