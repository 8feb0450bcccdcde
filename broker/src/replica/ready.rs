//! One `Ready` of a replica, handled in the order raft-rs documents (raw_node.rs, 0.7): the
//! entries are appended and fsynced, then the hard state is persisted, and only then may the
//! messages that depend on them leave; `advance` follows. Plain functions over a `RawNode`, no
//! IO of their own beyond the log and the state file: the replication loop and the seeded
//! simulator drive them alike.

use quiver_protocol::batch::ValidatedBatch;
use raft::eraftpb::{ConfChangeV2, Entry, EntryType, Message, MessageType};
use raft::{Config, RawNode, Ready, StateRole};

use super::{LogStorage, ReplicaError};

/// What a handled `Ready` leaves for the caller.
#[derive(Debug, Default)]
pub(crate) struct ReadyOutput {
    /// Messages to send now that the entries and hard state they depend on are durable (the
    /// leader's own went out before, through `early`).
    pub(crate) messages: Vec<Message>,
    /// Entries committed and durable locally, in order: the high watermark moves past them.
    pub(crate) committed: Vec<Entry>,
    /// The commit index raft-rs reported, if it moved.
    pub(crate) commit: Option<u64>,
    /// Where this `Ready`'s entries landed in the log (durable).
    pub(crate) placed: Vec<super::Placed>,
    /// The index of a snapshot installed from the leader: the log now starts after it.
    pub(crate) snapshot: Option<u64>,
}

/// The peers `msgs` send a snapshot to.
fn snapshot_targets(msgs: &[Message]) -> Vec<u64> {
    msgs.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot).map(|m| m.to).collect()
}

/// The settings a partition's replica runs with (docs/replication.md §4). `applied` is where
/// committed entries were last handed out: a restarted replica passes its persisted commit,
/// the log being its own state machine. The election timeout is exactly `election_tick`
/// ticks: raft-rs randomises it with a thread-local RNG, which a seeded simulation cannot
/// replay, so the spread comes from when each replica ticks (the ticker staggers groups).
pub(crate) fn config(id: u64, applied: u64) -> Config {
    Config {
        id,
        applied,
        election_tick: 10,
        min_election_tick: 10,
        max_election_tick: 11,
        heartbeat_tick: 3,
        // raft-rs' default 0 means one entry per append message.
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        pre_vote: true,
        check_quorum: true,
        ..Config::default()
    }
}

/// Proposes one producer batch on the leader, without copying it (the entry shares its bytes).
/// The batch is stamped with its offsets and the leader's term when it is appended.
pub(crate) fn propose_batch(
    node: &mut RawNode<LogStorage>,
    batch: ValidatedBatch,
) -> Result<(), ReplicaError> {
    if node.raft.state != StateRole::Leader {
        return Err(ReplicaError::NotLeader);
    }
    if batch.header().is_control() {
        return Err(ReplicaError::ControlBatch);
    }
    let mut entry = Entry::default();
    entry.set_data(batch.freeze());
    // What `RawNode::propose` does, with the payload as shared `Bytes` instead of a `Vec`.
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgPropose);
    m.set_from(node.raft.id);
    m.set_entries(vec![entry].into());
    node.step(m)?;
    Ok(())
}

/// Handles one `Ready` if there is one: appends and fsyncs its entries (truncating a
/// diverged suffix first), persists the hard state, advances, and persists the commit the
/// advance reports. Returns the messages to send and the newly committed entries. A leader's
/// messages (its appends to followers) do not depend on its own fsync and go to `early` before
/// it (raft-rs' `Ready::messages`): the followers' fsyncs run beside the leader's. On error the
/// node must not be used again (its `Ready` was taken but not advanced).
pub(crate) fn handle_ready(
    node: &mut RawNode<LogStorage>,
    now_ms: i64,
    early: &mut dyn FnMut(Vec<Message>),
) -> Result<ReadyOutput, ReplicaError> {
    if !node.has_ready() {
        return Ok(ReadyOutput::default());
    }
    let rd = node.ready();
    handle_taken(node, rd, now_ms, early)
}

/// Whether handling `rd` (taken from `node`) does no blocking IO: no snapshot, no new term or
/// vote to persist, entries that `LogStorage::appends_in_place` takes, and no lazy write due.
/// Such a `Ready` may be handled on an async task.
pub(crate) fn in_place(node: &RawNode<LogStorage>, rd: &Ready, now_ms: i64) -> bool {
    let store = node.store();
    if rd.snapshot().get_metadata().get_index() != 0 || !rd.snapshot().get_data().is_empty() {
        return false;
    }
    if let Some(hs) = rd.hs() {
        let old = store.hard_state();
        if (hs.get_term(), hs.get_vote()) != (old.get_term(), old.get_vote()) {
            return false;
        }
    }
    // Applying a configuration change fsyncs the log and writes `raft-state`.
    if rd.committed_entries().iter().any(|e| e.get_entry_type() != raft::eraftpb::EntryType::EntryNormal) {
        return false;
    }
    !store.io_due(now_ms) && store.appends_in_place(rd.entries(), now_ms)
}

/// [`handle_ready`] for a `Ready` already taken from `node`.
pub(crate) fn handle_taken(
    node: &mut RawNode<LogStorage>,
    mut rd: Ready,
    now_ms: i64,
    early: &mut dyn FnMut(Vec<Message>),
) -> Result<ReadyOutput, ReplicaError> {
    let mut out = ReadyOutput::default();
    let leader_messages = rd.take_messages();
    let mut snapshots_sent = snapshot_targets(&leader_messages);
    if !leader_messages.is_empty() {
        early(leader_messages);
    }
    if !rd.snapshot().is_empty() {
        // A follower behind the leader's log start: its log is replaced before anything
        // else of this `Ready` (raft-rs: the snapshot, then entries, then the hard state).
        node.mut_store().apply_snapshot(rd.snapshot(), now_ms)?;
        out.snapshot = Some(rd.snapshot().get_metadata().get_index());
    }
    out.committed = rd.take_committed_entries();
    apply_conf_changes(node, &out.committed)?;
    out.placed = node.mut_store().append(rd.entries(), now_ms)?;
    if let Some(hs) = rd.hs() {
        node.mut_store().set_hard_state(hs)?;
    }
    out.messages.extend(rd.take_persisted_messages());
    let mut light = node.advance(rd);
    if let Some(commit) = light.commit_index() {
        node.mut_store().set_commit(commit)?;
        out.commit = Some(commit);
    }
    let light_messages = light.take_messages();
    snapshots_sent.extend(snapshot_targets(&light_messages));
    out.messages.extend(light_messages);
    let more = light.take_committed_entries();
    apply_conf_changes(node, &more)?;
    out.committed.extend(more);
    node.advance_apply();
    // Our snapshots are a few bytes sent like any message, not a transfer that completes
    // later: the leader probes the follower with appends at once (raft-rs would otherwise wait
    // in the snapshot state for a report, forever if the message was lost). A lost or
    // reordered snapshot makes those appends fail, and the leader sends it again.
    for to in snapshots_sent {
        node.report_snapshot(to, raft::SnapshotStatus::Finish);
    }
    node.mut_store().sync_due(now_ms)?;
    node.mut_store().commit_due(now_ms)?;
    Ok(out)
}

/// Applies the configuration changes among `committed` (in order) that the persisted
/// configuration does not hold yet, and persists each resulting configuration with the index
/// of its change (docs/replication.md §11). A change at or below the persisted conf index is
/// already in the configuration: handed out again after a restart (the commit is persisted
/// lazily), or brought by the leader's appends to a replica that joined with that
/// configuration; it is not applied again, so the configuration never passes through an
/// older state on the way back.
pub(crate) fn apply_conf_changes(
    node: &mut RawNode<LogStorage>,
    committed: &[Entry],
) -> Result<(), ReplicaError> {
    for e in committed {
        if e.get_entry_type() != EntryType::EntryConfChangeV2 || e.index <= node.store().conf_index() {
            continue;
        }
        if e.data.len() > quiver_protocol::limits::MAX_RAFT_CONF_CHANGE_BYTES {
            return Err(ReplicaError::Raft(raft::Error::ConfChangeError(format!(
                "a committed configuration change of {} bytes",
                e.data.len()
            ))));
        }
        let mut cc = ConfChangeV2::default();
        protobuf::Message::merge_from_bytes(&mut cc, &e.data).map_err(raft::Error::from)?;
        let cs = node.apply_conf_change(&cc)?;
        tracing::info!(
            id = node.raft.id,
            dir = %node.store().log().lock().dir().display(),
            index = e.index,
            voters = ?cs.get_voters(),
            learners = ?cs.get_learners(),
            "applied a configuration change"
        );
        node.mut_store().set_conf_state(cs, e.index)?;
    }
    if let Some(last) = committed.last() {
        node.mut_store().set_applied(last.index);
    }
    Ok(())
}
