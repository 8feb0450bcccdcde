//! Configuration changes toward a desired replica set, one at a time (docs/replication.md §11).
//!
//! A group's leader compares its configuration with the replicas it should have (placement over
//! the cluster's current brokers) and takes one step toward them, only when no change is
//! pending: a missing replica joins as a learner; a learner whose log holds the commit becomes
//! a voter; once every desired replica votes, a voter no longer desired is removed (the
//! leader itself hands leadership to a desired voter first). Every step is a simple change of
//! at most one voter (raft-rs refuses more without a joint configuration), so no two
//! majorities of consecutive configurations are disjoint, and the group never has fewer voters
//! than desired. The group's driver and the seeded simulator call the same two functions.

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
use raft::{RawNode, StateRole};

use super::{LogStorage, ReplicaError};

/// A learner becomes a voter once its log is within this many entries of the commit.
const PROMOTE_WITHIN: u64 = 64;

/// The next change a leader makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Add a replica that receives the log but does not vote.
    AddLearner(u64),
    /// Make a caught-up learner a voter.
    Promote(u64),
    /// Remove a replica (a voter no longer desired, or a learner no longer wanted).
    Remove(u64),
    /// Hand leadership to this voter (the leader is to be removed).
    Transfer(u64),
}

/// The next step `node` (if it leads) takes toward voters `desired`; `None` when it is there,
/// when a change is still pending (proposed, not applied), while a transfer runs, or when it
/// does not lead.
pub(crate) fn next_step(node: &RawNode<LogStorage>, desired: &[u64]) -> Option<Step> {
    let raft = &node.raft;
    if raft.state != StateRole::Leader
        || desired.is_empty()
        || raft.has_pending_conf()
        || raft.lead_transferee.is_some()
    {
        return None;
    }
    let conf = raft.prs().conf().to_conf_state();
    if !conf.get_voters_outgoing().is_empty() {
        return None; // a joint configuration: never entered by us; raft-rs leaves it
    }
    let (voters, learners) = (conf.get_voters(), conf.get_learners());
    if let Some(&missing) = desired.iter().find(|d| !voters.contains(d) && !learners.contains(d)) {
        return Some(Step::AddLearner(missing));
    }
    let commit = raft.raft_log.committed;
    // Near the commit and receiving appends as they come: under a steady load a learner a
    // little slower than the fastest follower may never reach the commit exactly at a tick.
    let caught_up = |id: u64| {
        raft.prs().get(id).is_some_and(|p| {
            p.state == raft::ProgressState::Replicate && p.matched + PROMOTE_WITHIN >= commit
        })
    };
    let mut learners = learners.to_vec();
    learners.sort_unstable();
    for l in learners {
        if !desired.contains(&l) {
            return Some(Step::Remove(l));
        }
        if caught_up(l) {
            return Some(Step::Promote(l));
        }
    }
    if !desired.iter().all(|d| voters.contains(d)) {
        return None; // a learner still catching up
    }
    let mut extra: Vec<u64> = voters.iter().copied().filter(|v| !desired.contains(v)).collect();
    extra.sort_unstable();
    let me = raft.id;
    // Others first: the leader leaves last, once it is the only voter left to remove.
    match extra.iter().find(|&&v| v != me) {
        Some(&v) => Some(Step::Remove(v)),
        None if extra.contains(&me) => {
            // The most caught-up desired voter that is alive takes over (heard from within
            // the last election timeout and taking appends): raft-rs drops every proposal while
            // a transfer is under way, and one to a dead voter was tried again each time it
            // timed out, so the partition took no writes until that voter came back. None
            // alive: the leader stays, and tries again next tick.
            let to = desired
                .iter()
                .filter_map(|&d| raft.prs().get(d).map(|p| (d, p)))
                .filter(|(_, p)| p.recent_active && p.state == raft::ProgressState::Replicate)
                .max_by_key(|(_, p)| p.matched)
                .map(|(d, _)| d)?;
            Some(Step::Transfer(to))
        }
        None => None,
    }
}

/// Proposes `step` on `node` (its leader).
pub(crate) fn take(node: &mut RawNode<LogStorage>, step: Step) -> Result<(), ReplicaError> {
    let (kind, id) = match step {
        Step::AddLearner(id) => (ConfChangeType::AddLearnerNode, id),
        Step::Promote(id) => (ConfChangeType::AddNode, id),
        Step::Remove(id) => (ConfChangeType::RemoveNode, id),
        Step::Transfer(id) => {
            node.transfer_leader(id);
            return Ok(());
        }
    };
    let mut change = ConfChangeSingle::default();
    change.set_change_type(kind);
    change.node_id = id;
    let mut cc = ConfChangeV2::default();
    cc.set_changes(vec![change].into());
    node.propose_conf_change(Vec::new(), cc)?;
    Ok(())
}
