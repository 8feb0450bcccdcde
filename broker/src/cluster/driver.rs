//! One Raft group's driver (docs/replication.md §4): a task that owns the group's `RawNode`,
//! ticks it, steps what peers send, proposes what producers (or the controller) hand it, and
//! performs each `Ready` on a blocking thread (the log's appends and fsyncs are blocking IO).
//! Committed entries go to the group's `on_commit`; proposals are answered once their entry is
//! committed in the term they were proposed in, or, with `acks = leader`, once this leader's
//! own log has it (appended, and fsynced under `durability = always`) while it still leads in
//! that term (docs/replication.md §3).
//!
//! A panic inside raft-rs (it panics on storage read errors, docs/replication.md §1) or a
//! failed `Ready` stops this group only: its waiters are failed, its status says it stopped,
//! and the broker serves everything else.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quiver_protocol::message::Acks;
use quiver_protocol::ErrorCode;
use raft::eraftpb::{Entry, Message};
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::links::PeerLinks;
use crate::partition::{Appended, PartitionError, Proposal};
use crate::producers::SeqCheck;
use crate::replica::{self, LogStorage, Tracker};

/// How often every group ticks: the heartbeat interval (docs/replication.md §4).
pub(crate) const TICK: Duration = Duration::from_millis(100);
/// Events a group may have queued; senders wait beyond it (produce back-pressure), Raft
/// messages from peers are dropped beyond it (Raft resends).
pub(crate) const GROUP_QUEUE: usize = 1024;
/// Events handled between two `Ready`s: proposals that arrive together are appended and
/// fsynced together (the group commit of a replicated partition).
const EVENTS_PER_READY: usize = 256;
/// A `Ready` is taken on the driver's task only when at most this many entries were newly
/// committed (raft-rs reads them from the log as it builds the `Ready`).
const IN_PLACE_COMMITTED: u64 = 64;

/// What a group's driver is asked to do.
pub(crate) enum Event {
    /// A message from a peer, decoded by our codec (not yet checked by `admit`).
    Raft(Message),
    /// A controller command (opaque bytes), on the leader: answered with its Raft index once
    /// committed.
    Command { data: Bytes, reply: oneshot::Sender<Result<u64, PartitionError>> },
    /// Start an election now (a new group's preferred leader, so a topic serves at once).
    Campaign,
    /// On the leader: hand leadership to the most caught-up other voter (a broker stopping
    /// gracefully), so the group elects at once instead of after an election timeout.
    HandOver,
}

/// What the rest of the broker may know of a group, published after every step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GroupStatus {
    pub(crate) leader: Option<u64>,
    pub(crate) term: u64,
    pub(crate) commit: u64,
    /// On the leader: replicas whose log matches up to the commit; elsewhere empty.
    pub(crate) in_sync: Vec<u64>,
    /// On the leader: entries the replica furthest behind lacks of its log; elsewhere 0.
    pub(crate) lag: u64,
    /// Set when the group stopped (a failed fsync, a panic in raft-rs): it serves nothing.
    pub(crate) stopped: bool,
    /// On the leader: its commit reached the first entry of its term, so the commit covers
    /// every entry any earlier leader had answered for (docs/replication.md §10, invariant 3).
    pub(crate) ready: bool,
    /// The configuration this replica applied: voters and learners (§11).
    pub(crate) voters: Vec<u64>,
    pub(crate) learners: Vec<u64>,
    /// This replica applied a change that removed it from the group: it serves nothing more.
    pub(crate) removed: bool,
}

/// Where committed entries go, with the log offset just past the commit (the new high
/// watermark). Called on the driver's task, in commit order.
pub(crate) type OnCommit = Box<dyn FnMut(Vec<Entry>, u64) + Send>;

/// A running group: its event queue and its status.
#[derive(Debug, Clone)]
pub(crate) struct GroupHandle {
    pub(crate) events: mpsc::Sender<Event>,
    /// Producers' batches (a partition's group), kept apart from Raft traffic so a flood of
    /// proposals never crowds out heartbeats.
    pub(crate) proposals: mpsc::Sender<Proposal>,
    pub(crate) status: watch::Receiver<GroupStatus>,
    /// The voters the group should have (placement over the cluster's brokers, §11): its
    /// leader changes the configuration toward them one step at a time.
    pub(crate) desired: Arc<watch::Sender<Vec<u64>>>,
}

impl GroupHandle {
    /// Resolves once the group's leader is no longer `leader` (an election moved it, or the
    /// group stopped): what a request waiting on that leader's answer waits for besides it.
    pub(crate) async fn leader_moved_from(&self, leader: u64) {
        let mut status = self.status.clone();
        let _ = status.wait_for(|s| s.stopped || s.leader.is_some_and(|l| l != leader)).await;
    }

    /// The leader, waiting up to `wait` for one to be elected.
    pub(crate) async fn leader(&self, wait: Duration) -> Option<u64> {
        let mut status = self.status.clone();
        let found = tokio::time::timeout(wait, status.wait_for(|s| s.leader.is_some() || s.stopped)).await;
        match found {
            Ok(Ok(s)) => s.leader,
            _ => None,
        }
    }
}

enum Waiter {
    /// A producer's batch. `acks = leader` is answered when it is placed (in this leader's log,
    /// durable per the topic's durability); any other at its commit.
    Batch {
        term: u64,
        acks: Acks,
        placed: Option<(u64, u64)>,
        reply: oneshot::Sender<Result<Appended, PartitionError>>,
    },
    Command {
        term: u64,
        reply: oneshot::Sender<Result<u64, PartitionError>>,
    },
}

impl Waiter {
    fn term(&self) -> u64 {
        match self {
            Waiter::Batch { term, .. } | Waiter::Command { term, .. } => *term,
        }
    }

    fn fail(self, e: PartitionError) {
        match self {
            Waiter::Batch { reply, .. } => drop(reply.send(Err(e))),
            Waiter::Command { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

/// The driver's state besides the node.
pub(crate) struct Driver {
    pub(crate) group: u64,
    pub(crate) name: String,
    pub(crate) links: Arc<PeerLinks>,
    pub(crate) tracker: Option<Tracker>,
    pub(crate) on_commit: OnCommit,
    pub(crate) status: watch::Sender<GroupStatus>,
    waiting: BTreeMap<u64, Waiter>,
    /// Idempotent producers' last sequence proposed and not yet appended (within one round).
    inflight: HashMap<i64, i32>,
    /// The log offset just past the commit, as of the last `Ready` (0 until then): a retried
    /// batch is answered from the producer state only once it is below this.
    committed_offset: u64,
    refused: metrics::Counter,
    /// Set when raft-rs panicked in `step`: the node may be half updated, so the group stops.
    poisoned: bool,
    /// `Ready`s handled on the driver's task (`replica::in_place`).
    in_place: metrics::Counter,
    /// (term, index): the last entry of this node's log when it was first seen leading in
    /// `term`, at or after the empty entry raft-rs appends on election; see `GroupStatus::ready`.
    term_start: std::cell::Cell<(u64, u64)>,
    /// The voters this group should have (`GroupHandle::desired`).
    desired: watch::Receiver<Vec<u64>>,
    /// This replica was seen in the group's configuration.
    was_member: std::cell::Cell<bool>,
}

/// Which group a driver runs: its id (on the wire) and its name (in logs).
pub(crate) struct GroupName {
    pub(crate) id: u64,
    pub(crate) name: String,
}

/// Starts a group's driver task over `node`, whose configuration its leader moves toward
/// voters `desired`.
pub(crate) fn spawn(
    node: RawNode<LogStorage>,
    GroupName { id: group, name }: GroupName,
    links: Arc<PeerLinks>,
    tracker: Option<Tracker>,
    on_commit: OnCommit,
    desired: Vec<u64>,
    shutdown: CancellationToken,
) -> GroupHandle {
    let (events, rx) = mpsc::channel(GROUP_QUEUE);
    let (proposals, proposals_rx) = mpsc::channel(GROUP_QUEUE);
    let (status, status_rx) = watch::channel(GroupStatus::default());
    let (desired, desired_rx) = watch::channel(desired);
    let driver = Driver {
        group,
        name,
        links,
        tracker,
        on_commit,
        status,
        waiting: BTreeMap::new(),
        inflight: HashMap::new(),
        poisoned: false,
        committed_offset: 0,
        refused: metrics::counter!("quiver_raft_messages_refused_total"),
        in_place: metrics::counter!("quiver_raft_readies_in_place_total"),
        term_start: std::cell::Cell::new((0, 0)),
        desired: desired_rx,
        was_member: std::cell::Cell::new(false),
    };
    tokio::spawn(driver.run(node, rx, proposals_rx, shutdown));
    GroupHandle { events, proposals, status: status_rx, desired: Arc::new(desired) }
}

fn not_leader(leader: Option<u64>) -> PartitionError {
    match leader {
        Some(l) => PartitionError::new(ErrorCode::NotLeader, format!("not the leader; broker {l} leads"))
            .with_leader(Some(l)),
        None => PartitionError::new(ErrorCode::NotLeader, "no leader elected yet; retry"),
    }
}

impl Driver {
    async fn run(
        mut self,
        node: RawNode<LogStorage>,
        mut rx: mpsc::Receiver<Event>,
        mut proposals: mpsc::Receiver<Proposal>,
        shutdown: CancellationToken,
    ) {
        let mut node = Some(node);
        // Every group of the broker ticks on the same clock (`PeerLinks::ticks`): they wake
        // together, once per tick, instead of each on its own timer at its own phase (hundreds
        // of timers spread over the tick kept the runtime's threads parking and waking).
        let mut ticks = self.links.ticks.clone();
        ticks.mark_unchanged();
        while let Some(n) = node.as_mut() {
            tokio::select! {
                changed = ticks.changed() => {
                    if changed.is_err() {
                        break; // the broker is stopping
                    }
                    n.tick();
                    self.change_membership(n);
                }
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle(n, ev),
                    None => break,
                },
                Some(p) = proposals.recv() => self.propose(n, p),
                _ = shutdown.cancelled() => break,
            }
            for _ in 0..EVENTS_PER_READY {
                match rx.try_recv() {
                    Ok(ev) => self.handle(n, ev),
                    Err(_) => break,
                }
            }
            for _ in 0..EVENTS_PER_READY {
                match proposals.try_recv() {
                    Ok(p) => self.propose(n, p),
                    Err(_) => break,
                }
            }
            if self.poisoned {
                node = None;
            } else if n.has_ready() {
                node = self.ready(node.take()).await;
            }
            self.inflight.clear();
            if let Some(n) = node.as_ref() {
                self.publish(n);
            }
        }
        let stopped = node.is_none();
        // The commit is written lazily (replica/storage.rs): a clean stop writes the newest.
        // Not by a replica removed from its group: its state no longer matters, and a replica
        // started here again (added back, §11) may already be using the file.
        let removed = self.status.borrow().removed;
        if let Some(mut n) = node.take().filter(|_| !removed) {
            let name = self.name.clone();
            let flushed = tokio::task::spawn_blocking(move || n.mut_store().flush_commit()).await;
            if let Ok(Err(e)) = flushed {
                tracing::warn!(group = %name, "writing the commit at shutdown: {e}");
            }
        }
        for (_, w) in std::mem::take(&mut self.waiting) {
            w.fail(PartitionError::new(ErrorCode::ShuttingDown, "the partition's replica stopped"));
        }
        self.status.send_modify(|s| {
            s.leader = None;
            s.stopped = stopped;
        });
        // A stopped group fails what is queued instead of leaving it to hang.
        rx.close();
        proposals.close();
        while let Some(ev) = rx.recv().await {
            if let Event::Command { reply, .. } = ev {
                drop(reply.send(Err(not_leader(None))));
            }
        }
        while let Some(p) = proposals.recv().await {
            drop(p.reply.send(Err(not_leader(None))));
        }
    }

    fn handle(&mut self, node: &mut RawNode<LogStorage>, ev: Event) {
        if self.poisoned {
            return; // dropped; the loop stops the group and fails what waits
        }
        match ev {
            Event::Raft(mut m) => {
                if let Err(why) = replica::admit(node, &mut m) {
                    self.refused.increment(1);
                    tracing::debug!(group = self.group, from = m.from, "refused a Raft message: {why}");
                    return;
                }
                // raft-rs trusts what `admit` let through; a panic here is caught by `ready`'s
                // caller only, so step under catch_unwind too.
                let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| node.step(m)));
                match stepped {
                    Ok(Ok(()))
                    | Ok(Err(raft::Error::StepPeerNotFound))
                    | Ok(Err(raft::Error::StepLocalMsg)) => {}
                    Ok(Err(e)) => tracing::debug!(group = self.group, "step: {e}"),
                    Err(_) => {
                        tracing::error!(group = %self.name, "raft-rs panicked stepping a message; stopping the group");
                        self.poisoned = true;
                    }
                }
            }
            Event::Command { data, reply } => {
                if node.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(not_leader(leader_of(node))));
                    return;
                }
                match node.propose(Vec::new(), data.to_vec()) {
                    Ok(()) => {
                        let index = node.raft.raft_log.last_index();
                        self.waiting.insert(index, Waiter::Command { term: node.raft.term, reply });
                    }
                    Err(e) => drop(reply.send(Err(PartitionError::new(ErrorCode::NotLeader, e.to_string())))),
                }
            }
            Event::Campaign => {
                if node.raft.state != StateRole::Leader {
                    let _ = node.campaign();
                }
            }
            Event::HandOver => {
                let raft = &node.raft;
                if raft.state != StateRole::Leader || raft.lead_transferee.is_some() {
                    return;
                }
                // A live voter taking appends as they come, the most caught up: a dead one would
                // cost the transfer's election timeout (raft-rs drops proposals meanwhile).
                let conf = raft.prs().conf().to_conf_state();
                let target = conf
                    .get_voters()
                    .iter()
                    .copied()
                    .filter(|&v| v != raft.id)
                    .filter_map(|v| raft.prs().get(v).map(|p| (v, p)))
                    .filter(|(_, p)| p.recent_active && p.state == raft::ProgressState::Replicate)
                    .max_by_key(|(_, p)| p.matched)
                    .map(|(v, _)| v);
                if let Some(to) = target {
                    tracing::debug!(group = self.group, to, "handing leadership over");
                    node.transfer_leader(to);
                }
            }
        }
    }

    fn propose(&mut self, node: &mut RawNode<LogStorage>, proposal: Proposal) {
        let Proposal { batch, acks, term, reply } = proposal;
        if self.poisoned || node.raft.state != StateRole::Leader {
            let _ = reply.send(Err(not_leader(leader_of(node))));
            return;
        }
        if term.is_some_and(|t| t != node.raft.term) {
            let _ = reply.send(Err(PartitionError::new(
                ErrorCode::NotLeader,
                format!(
                    "proposed for term {} but the leader is in term {}",
                    term.unwrap_or(0),
                    node.raft.term
                ),
            )));
            return;
        }
        let h = *batch.header();
        // Idempotent producers: a retry of a batch already in the log is answered with its
        // offsets, as on one node; one still on its way to the log is to be retried.
        if h.producer_id >= 0 {
            let last_seq = h.base_sequence.wrapping_add(h.records_count.max(1) as i32 - 1);
            match self.inflight.get(&h.producer_id) {
                Some(&inflight) if h.base_sequence == inflight.wrapping_add(1) => {}
                Some(_) => {
                    let _ = reply.send(Err(PartitionError::new(
                        ErrorCode::NotLeader,
                        "this batch is already being replicated; retry for its offsets",
                    )));
                    return;
                }
                None => {
                    if let Some(t) = &self.tracker {
                        match t.producers.lock().check(&h) {
                            SeqCheck::Append => {}
                            // The producer state follows appends, not the commit: a batch
                            // this leader holds may still be cut (an isolated leader's), so
                            // under acks = all a retry is answered only once it is committed.
                            // Under acks = leader the retry gets what the first send would
                            // have got: the offsets this leader's log holds it at.
                            SeqCheck::Duplicate { last_offset, .. }
                                if last_offset >= self.committed_offset && acks != Acks::Leader =>
                            {
                                let _ = reply.send(Err(PartitionError::new(
                                    ErrorCode::NotLeader,
                                    "this batch is not committed yet; retry for its offsets",
                                )));
                                return;
                            }
                            SeqCheck::Duplicate { base_offset, last_offset } => {
                                metrics::counter!("quiver_duplicate_batches_total").increment(1);
                                let append_time_ms = crate::partition::now_ms();
                                let _ = reply.send(Ok(Appended { base_offset, last_offset, append_time_ms }));
                                return;
                            }
                            SeqCheck::OutOfOrder { expected, got } => {
                                let _ = reply.send(Err(PartitionError::new(
                                    ErrorCode::OutOfOrderSequence,
                                    format!(
                                        "producer {} sent sequence {got}, expected {expected}",
                                        h.producer_id
                                    ),
                                )));
                                return;
                            }
                        }
                    }
                }
            }
            self.inflight.insert(h.producer_id, last_seq);
        }
        match replica::propose_batch(node, batch) {
            Ok(()) => {
                let index = node.raft.raft_log.last_index();
                self.waiting.insert(index, Waiter::Batch { term: node.raft.term, acks, placed: None, reply });
            }
            Err(e) => {
                let _ = reply.send(Err(PartitionError::new(ErrorCode::NotLeader, e.to_string())));
            }
        }
    }

    /// Performs one `Ready`: on this task when it needs no blocking IO (`replica::in_place`:
    /// nothing to fsync, a few kilobytes to copy into the page cache at most), else on a
    /// blocking thread. `None` when the group must stop.
    async fn ready(&mut self, node: Option<RawNode<LogStorage>>) -> Option<RawNode<LogStorage>> {
        let mut node = node?;
        let now = crate::partition::now_ms();
        let (links, group) = (self.links.clone(), self.group);
        // raft-rs reads the newly committed entries when the `Ready` is taken: a few, just
        // written, are read here; a long catch-up is taken on the blocking thread.
        let backlog = node.raft.raft_log.committed.saturating_sub(node.raft.raft_log.applied);
        let taken = match backlog <= IN_PLACE_COMMITTED {
            true => match std::panic::catch_unwind(AssertUnwindSafe(|| node.ready())) {
                Ok(rd) => Some(rd),
                Err(_) => {
                    tracing::error!(group = %self.name, "raft-rs panicked taking a Ready; stopping the group");
                    return None;
                }
            },
            false => None,
        };
        let perform = move |mut node: RawNode<LogStorage>, rd: Option<raft::Ready>| {
            let out = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let mut early = |msgs: Vec<Message>| {
                    for m in &msgs {
                        links.send(group, m);
                    }
                };
                let out = match rd {
                    Some(rd) => replica::handle_taken(&mut node, rd, now, &mut early)?,
                    None => replica::handle_ready(&mut node, now, &mut early)?,
                };
                let commit = node.raft.raft_log.committed;
                let hw = node.store().offset_after(commit)?;
                Ok::<_, replica::ReplicaError>((out, hw))
            }));
            (node, out)
        };
        let joined = match taken {
            Some(rd) if replica::in_place(&node, &rd, now) => {
                self.in_place.increment(1);
                Ok(perform(node, Some(rd)))
            }
            rd => tokio::task::spawn_blocking(move || perform(node, rd)).await,
        };
        let (node, out) = match joined {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(group = %self.name, "the Ready task failed: {e}; stopping the group");
                return None;
            }
        };
        let (out, hw) = match out {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::error!(group = %self.name, "Raft ready failed: {e}; stopping the group");
                return None;
            }
            Err(_) => {
                tracing::error!(group = %self.name, "raft-rs panicked handling a Ready; stopping the group");
                return None;
            }
        };
        for m in out.messages.iter().filter(|m| replica::may_send(&node, m)) {
            self.links.send(self.group, m);
        }
        if let Some(hw) = hw {
            self.committed_offset = self.committed_offset.max(hw);
        }
        // acks = leader: answered once placed, if this replica still leads in the term it
        // proposed in (an entry of another term at that index is another leader's, and a
        // replica that lost leadership fails its waiters below). The batch may still be cut
        // if this leader fails before a majority has it, as with Kafka's acks=1.
        let leading = (node.raft.state == StateRole::Leader).then_some(node.raft.term);
        for p in &out.placed {
            let Some(Waiter::Batch { term, acks, placed, .. }) = self.waiting.get_mut(&p.index) else {
                continue;
            };
            *placed = Some((p.base_offset, p.last_offset));
            if *acks == Acks::Leader && p.term == *term && leading == Some(*term) {
                if let Some(Waiter::Batch { reply, .. }) = self.waiting.remove(&p.index) {
                    let append_time_ms = crate::partition::now_ms();
                    let a =
                        Appended { base_offset: p.base_offset, last_offset: p.last_offset, append_time_ms };
                    let _ = reply.send(Ok(a));
                }
            }
        }
        // A snapshot installed moves the high watermark to the new log start (nothing to
        // apply: the log is the state machine).
        if !out.committed.is_empty() || out.snapshot.is_some() {
            for e in &out.committed {
                let Some(w) = self.waiting.remove(&e.index) else { continue };
                if w.term() != e.term {
                    w.fail(not_leader(leader_of(&node)));
                    continue;
                }
                match w {
                    Waiter::Batch { placed: Some((base_offset, last_offset)), reply, .. } => {
                        let append_time_ms = crate::partition::now_ms();
                        let _ = reply.send(Ok(Appended { base_offset, last_offset, append_time_ms }));
                    }
                    Waiter::Batch { placed: None, reply, .. } => {
                        let _ = reply.send(Err(PartitionError::new(
                            ErrorCode::Internal,
                            "committed entry was never placed in the log",
                        )));
                    }
                    Waiter::Command { reply, .. } => drop(reply.send(Ok(e.index))),
                }
            }
            if let Some(hw) = hw {
                (self.on_commit)(out.committed, hw);
            }
        }
        // A replica that lost leadership cannot answer what it proposed: its entries may be
        // kept or cut by the next leader. The producer retries with the same sequence numbers
        // and the next leader answers from its producer state.
        if node.raft.state != StateRole::Leader && !self.waiting.is_empty() {
            let leader = leader_of(&node);
            for (_, w) in std::mem::take(&mut self.waiting) {
                w.fail(not_leader(leader));
            }
        }
        Some(node)
    }

    /// On the leader, once per tick: the next configuration change toward the desired voters
    /// (docs/replication.md §11), if none is pending.
    fn change_membership(&mut self, node: &mut RawNode<LogStorage>) {
        if self.poisoned || node.raft.state != StateRole::Leader {
            return;
        }
        let desired = self.desired.borrow().clone();
        let Some(step) = replica::membership::next_step(node, &desired) else { return };
        match replica::membership::take(node, step) {
            Ok(()) => tracing::info!(group = %self.name, ?step, "changing the group's configuration"),
            Err(e) => tracing::debug!(group = %self.name, ?step, "a configuration change was refused: {e}"),
        }
    }

    fn publish(&self, node: &RawNode<LogStorage>) {
        let leader = leader_of(node);
        let commit = node.raft.raft_log.committed;
        let (in_sync, lag) = if node.raft.state == StateRole::Leader {
            let mut ids: Vec<u64> =
                node.raft.prs().iter().filter(|(_, p)| p.matched >= commit).map(|(id, _)| *id).collect();
            ids.sort_unstable();
            let last = node.raft.raft_log.last_index();
            let lag = node.raft.prs().iter().map(|(_, p)| last.saturating_sub(p.matched)).max().unwrap_or(0);
            (ids, lag)
        } else {
            (Vec::new(), 0)
        };
        let ready = node.raft.state == StateRole::Leader && {
            let term = node.raft.term;
            if self.term_start.get().0 != term {
                self.term_start.set((term, node.raft.raft_log.last_index()));
            }
            commit >= self.term_start.get().1
        };
        let conf = node.store().conf_state();
        let (voters, learners) = (conf.get_voters().to_vec(), conf.get_learners().to_vec());
        let me = node.raft.id;
        // Removed: it was in the configuration and a change took it out (a replica joining
        // replays changes made before it was added: it is not removed by those).
        let member = voters.contains(&me) || learners.contains(&me);
        if member {
            self.was_member.set(true);
        }
        let gone = !member && node.store().conf_index() > 0;
        let removed = gone && (self.was_member.get() || !self.desired.borrow().contains(&me));
        let next = GroupStatus {
            leader,
            term: node.raft.term,
            commit,
            in_sync,
            lag,
            stopped: false,
            ready,
            voters,
            learners,
            removed,
        };
        let mut became_leader = false;
        self.status.send_if_modified(|s| {
            let changed = *s != next;
            if changed {
                became_leader = next.leader == Some(node.raft.id) && s.leader != next.leader;
                *s = next;
            }
            changed
        });
        if became_leader {
            self.links.announce.notify_one();
            if self.group == super::CONTROLLER_GROUP {
                tracing::info!(leader = node.raft.id, term = node.raft.term, "elected controller leader");
            } else {
                tracing::debug!(group = %self.name, term = node.raft.term, "elected leader");
            }
        }
    }
}

fn leader_of(node: &RawNode<LogStorage>) -> Option<u64> {
    match node.raft.leader_id {
        raft::INVALID_ID => None,
        id => Some(id),
    }
}
