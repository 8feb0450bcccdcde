//! Cluster mode (issue 17, docs/replication.md): brokers started with `--node-id` and
//! `--peers` form a cluster of static voters.
//!
//! - **The controller** is one Raft group (id 0) of every broker, whose log is a segment log of
//!   its own (`<data>/cluster/controller`). Its entries are metadata commands (JSON in the
//!   entry; stored as a record batch's single record like any entry); each broker applies them
//!   in commit order to its topics. It replays from the start at every start: the commands are
//!   idempotent on a broker that already has the topic.
//! - **Each partition** of a replicated topic is one Raft group over the partition's own segment
//!   log (`replica::LogStorage`), its id derived from the controller index of the topic's
//!   create (`group_id`). The Raft leader is the partition leader; its high watermark is the
//!   commit.
//! - **Routing**: a produce reaching a broker that does not lead the partition is forwarded to
//!   the leader over the peer link (and retried while an election runs); reads are served by
//!   any replica up to its commit (never beyond, so never what a failover could cut).
//!
//! - **Placement** (`placement::replicas`): a partition's replicas are `replicas` of the
//!   brokers chosen by rendezvous hashing, the first being its preferred leader. A broker holding
//!   no replica of a partition observes it (`remote.rs`): it learns its leader from the leader's
//!   notices, forwards its produce requests there and hands its reads to a replica.

mod controller;
mod driver;
mod forward;
#[cfg(test)]
mod fuzz_tests;
mod links;
mod producer_ids;
mod remote;

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use quiver_protocol::message::{BrokerStatus, Message, ReplicaStatus};
use quiver_protocol::ErrorCode;
use tokio_util::sync::CancellationToken;

pub use crate::config::ClusterConfig;
pub(crate) use controller::Command;
pub use controller::DeleteHooks;
pub(crate) use driver::{Event, GroupHandle};
pub(crate) use forward::StreamForward;
pub(crate) use links::PeerLinks;
pub(crate) use remote::{forward_subscription, splice_subscription, RelayedClient};

use crate::partition::{Partition, PartitionError};
use crate::storage::Storage;
use crate::topics::Topics;

/// The controller's Raft group id.
pub(crate) const CONTROLLER_GROUP: u64 = 0;
/// How long a request waits for a partition's leader to be elected (a failover) before the
/// client is told `NotLeader` and retries itself.
pub(crate) const LEADER_WAIT: Duration = Duration::from_secs(3);
/// A peer link with no traffic for this long is dead (Raft heartbeats flow every 100 ms).
pub(crate) const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a request for a topic this broker does not know waits for the controller log to
/// bring it (a create answered by another broker a moment ago).
pub(crate) const TOPIC_WAIT: Duration = Duration::from_secs(1);
/// How long a forwarded request may take.
pub(crate) const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// A broker's view of its cluster.
#[derive(Debug)]
pub struct Cluster {
    pub(crate) config: ClusterConfig,
    pub(crate) links: Arc<PeerLinks>,
    pub(crate) controller: GroupHandle,
    /// Partition groups by group id, and by (topic, partition).
    pub(crate) groups: DashMap<u64, GroupHandle>,
    pub(crate) partitions: DashMap<(String, u32), (u64, Vec<u64>)>,
    /// The groups of `groups` this broker holds no replica of, as their leaders describe them.
    pub(crate) observed: DashMap<u64, remote::Observed>,
    pub(crate) applied: tokio::sync::watch::Receiver<u64>,
    /// The controller index each topic was created at (its groups' ids derive from it).
    pub(crate) topic_index: DashMap<String, u64>,
    pub(crate) applied_state: controller::Applied,
    pub(crate) delete_hooks: std::sync::OnceLock<controller::DeleteHooks>,
    pub(crate) producer_ids: producer_ids::ClusterProducerIds,
    pub(crate) shutdown: CancellationToken,
    /// The cluster's brokers, as the controller log has them (docs/replication.md §11): the
    /// `--peers` list until the first `Brokers` command.
    pub(crate) members: parking_lot::RwLock<std::collections::BTreeMap<u64, std::net::SocketAddr>>,
    /// Each replicated group's first voters (its placement when its topic was created): the
    /// configuration a replica added later starts from, before it replays the group's changes.
    pub(crate) first_replicas: DashMap<u64, Vec<u64>>,
    /// The brokers the cluster started with: `--peers`; for a broker that joined, learned
    /// from the first `Brokers` command it applies (empty until then).
    pub(crate) bootstrap: parking_lot::RwLock<Vec<u64>>,
    /// The broker's data directory (a joined broker keeps the brokers it knows there).
    pub(crate) data_dir: std::path::PathBuf,
    /// Ids of brokers removed from the cluster: never added again (§11). Its replicas' state
    /// could still name it a voter of groups that removed it, and would count a majority that
    /// is not the group's.
    pub(crate) retired: parking_lot::RwLock<std::collections::BTreeSet<u64>>,
    /// Set once the controller log replayed at start: until then no group is given desired
    /// voters (a replay passes through old broker sets; a leader elected meanwhile must not
    /// move its group toward one of them).
    pub(crate) replayed: std::sync::atomic::AtomicBool,
    /// Held while the partitions follow a new broker set (at most one replica started per
    /// group).
    following: parking_lot::Mutex<()>,
    /// Replicas stopped here whose drivers may still run (`observe_instead`): the status each
    /// driver publishes, closed once it ended.
    pub(crate) ending: DashMap<u64, tokio::sync::watch::Receiver<driver::GroupStatus>>,
    /// The ACL rules, as the controller's log has them (docs/security.md).
    pub(crate) acls: Arc<crate::auth::Acls>,
}

impl Cluster {
    pub fn node_id(&self) -> u64 {
        self.config.node_id
    }

    /// The cluster's brokers' ids, in order.
    pub(crate) fn member_ids(&self) -> Vec<u64> {
        self.members.read().keys().copied().collect()
    }

    /// Whether `id` is a broker of the cluster, or one this broker linked to since it started
    /// (a broker being removed still talks to the others until its replicas moved).
    pub(crate) fn knows_broker(&self, id: u64) -> bool {
        self.members.read().contains_key(&id) || self.links.is_peer(id)
    }

    /// Runs a replica of `p` here: a Raft group whose first configuration is `first` (a new
    /// topic's placement; for a replica added to a running group, the group's first voters:
    /// it replays every change from there), changed toward `desired` by its leader. When a
    /// change removes it, the partition is observed from here on (`remote.rs`).
    pub(crate) fn attach_here(
        self: &Arc<Self>,
        p: &Arc<Partition>,
        config: &quiver_protocol::TopicConfig,
        group: u64,
        first: &[u64],
        desired: &[u64],
    ) -> Result<(), PartitionError> {
        let me = self.config.node_id;
        if let Some(old) = self.ending.get(&group).map(|o| o.clone()) {
            if old.has_changed().is_ok() {
                return Err(PartitionError::new(
                    ErrorCode::NotLeader,
                    "the previous replica of this partition here is still stopping",
                ));
            }
            self.ending.remove(&group);
        }
        let desired = match self.replayed.load(std::sync::atomic::Ordering::Acquire) {
            true => desired,
            false => &[],
        };
        let handle = attach(&self.links, me, p, config, group, first, desired, &self.shutdown)?;
        let mut status = handle.status.clone();
        let running = handle.status.clone();
        self.observed.remove(&group);
        self.groups.insert(group, handle);
        let cluster = Arc::downgrade(self);
        tokio::spawn(async move {
            if status.wait_for(|s| s.removed).await.is_err() {
                return; // the group stopped or was dropped
            }
            let Some(cluster) = cluster.upgrade() else { return };
            tracing::info!(
                group,
                "this replica was removed from its group; the partition is observed from here on"
            );
            cluster.observe_instead(group, &running);
        });
        Ok(())
    }

    /// Every round (`announce_loop`): a partition placed here whose replica here stopped (removed
    /// from its group while this broker placed it here again, or stopped by a notice) gets a new
    /// one, once the old one's driver ended.
    pub(crate) fn reconcile(self: &Arc<Self>, topics: &Topics) {
        if !self.replayed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let me = self.config.node_id;
        let missing = self
            .partitions
            .iter()
            .any(|e| e.value().1.contains(&me) && self.observed.contains_key(&e.value().0));
        if missing {
            self.follow_members(topics);
        }
    }

    /// After the brokers changed: every partition's desired replicas are its placement over
    /// the new set; a group led here moves toward them (driver), and a partition this broker
    /// now holds a replica of but runs none for gets one, starting from the group's first
    /// voters (the leader adds it as a learner and sends it the log). The controller's desired
    /// voters are all the brokers.
    pub(crate) fn follow_members(self: &Arc<Self>, topics: &Topics) {
        let _following = self.following.lock();
        let replayed = self.replayed.load(std::sync::atomic::Ordering::Acquire);
        let ids = self.member_ids();
        if replayed {
            self.controller.desired.send_replace(ids.clone());
        }
        let me = self.config.node_id;
        for t in topics.all() {
            let Some(index) = self.topic_index.get(&*t.name).map(|i| *i) else { continue };
            for p in &t.partitions {
                let group = group_id(index, p.id);
                let desired = crate::placement::replicas(&t.name, p.id, &ids, usize::from(t.config.replicas));
                self.partitions.insert((t.name.to_string(), p.id), (group, desired.clone()));
                if let Some(mut o) = self.observed.get_mut(&group) {
                    o.set_replicas(&desired);
                }
                let runs_here = self.groups.contains_key(&group) && !self.observed.contains_key(&group);
                if runs_here {
                    if let Some(g) = self.groups.get(&group).filter(|_| replayed) {
                        g.desired.send_replace(desired.clone());
                    }
                } else if desired.contains(&me) {
                    // The group's first voters: recorded at its create, or (an old create) its
                    // placement over the cluster's first brokers.
                    let first = match self.first_replicas.get(&group).map(|f| f.clone()) {
                        Some(first) => first,
                        None => {
                            let bootstrap = self.bootstrap.read().clone();
                            if bootstrap.is_empty() {
                                continue; // not known yet: a guess could count a wrong majority
                            }
                            crate::placement::replicas(
                                &t.name,
                                p.id,
                                &bootstrap,
                                usize::from(t.config.replicas),
                            )
                        }
                    };
                    match self.attach_here(p, &t.config, group, &first, &desired) {
                        Ok(()) => {
                            tracing::info!(group, topic = %t.name, partition = p.id, "a replica of this partition moves here")
                        }
                        // The previous replica's driver is still stopping: the next round.
                        Err(e) if e.code == ErrorCode::NotLeader => tracing::debug!(group, "{e}"),
                        Err(e) => tracing::error!(group, "starting a replica of {}/{}: {e}", t.name, p.id),
                    }
                }
            }
        }
    }

    /// Hands a Raft frame from peer `from` to its group (dropped if the group is unknown here,
    /// e.g. a topic this broker has not applied yet: Raft resends).
    pub(crate) fn deliver(&self, from: u64, payload: bytes::Bytes) {
        let wire = match quiver_protocol::raft::RaftMessage::decode(payload) {
            Ok(w) => w,
            Err(e) => {
                metrics::counter!("quiver_raft_messages_refused_total").increment(1);
                tracing::debug!(peer = from, "an undecodable Raft message: {e}");
                return;
            }
        };
        if wire.from != from {
            metrics::counter!("quiver_raft_messages_refused_total").increment(1);
            tracing::warn!(peer = from, claimed = wire.from, "a Raft message claiming another sender");
            return;
        }
        let group = wire.group;
        let handle = if group == CONTROLLER_GROUP {
            Some(self.controller.clone())
        } else {
            self.groups.get(&group).map(|g| g.clone())
        };
        if let Some(h) = handle {
            let _ = h.events.try_send(Event::Raft(crate::replica::from_wire(wire)));
        }
    }

    /// The group serving `topic`/`partition`, if it is replicated.
    pub(crate) fn group(&self, topic: &str, partition: u32) -> Option<(GroupHandle, Vec<u64>)> {
        let entry = self.partitions.get(&(topic.to_string(), partition))?;
        let (id, replicas) = entry.value().clone();
        Some((self.groups.get(&id)?.clone(), replicas))
    }

    /// `topic` once this broker applied its create, waiting up to `TOPIC_WAIT`.
    pub(crate) async fn wait_for_topic(
        &self,
        topics: &Topics,
        name: &str,
    ) -> Option<Arc<crate::topics::Topic>> {
        let deadline = tokio::time::Instant::now() + TOPIC_WAIT;
        let mut applied = self.applied.clone();
        loop {
            if let Ok(t) = topics.get(name) {
                return Some(t);
            }
            match tokio::time::timeout_at(deadline, applied.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// What `ClusterStatus` answers.
    pub(crate) fn status(&self, topics: &Topics) -> Message {
        let brokers = self
            .members
            .read()
            .iter()
            .map(|(&id, addr)| BrokerStatus {
                id: id as u32,
                addr: addr.to_string(),
                up: self.links.is_up(id),
            })
            .collect();
        let mut partitions = Vec::new();
        for t in topics.all() {
            for p in &t.partitions {
                let Some((g, replicas)) = self.group(&t.name, p.id) else { continue };
                let s = g.status.borrow().clone();
                partitions.push(ReplicaStatus {
                    topic: t.name.to_string(),
                    partition: p.id,
                    leader: s.leader.map(|l| l as u32),
                    epoch: s.term,
                    // The configuration the replica here applied (moving: old and new ones),
                    // else the placement.
                    replicas: match s.voters.is_empty() {
                        true => replicas.iter().map(|&r| r as u32).collect(),
                        false => s.voters.iter().chain(&s.learners).map(|&r| r as u32).collect(),
                    },
                    in_sync: s.in_sync.iter().map(|&r| r as u32).collect(),
                    commit: s.commit,
                    lag: s.lag,
                });
            }
        }
        Message::ClusterStatusOk { brokers, partitions }
    }

    /// A broker stopping gracefully hands the leadership of the data partitions and of the
    /// controller it leads to caught-up voters first, and waits up to `within` for them to
    /// move: clients then see a new leader within a few round trips instead of an election
    /// timeout (about 1 s) after it stops. `__offsets` partitions keep their leader until the
    /// coordinators' final flush (`maintenance::close_coordinators`), which needs it. Returns how
    /// many groups still had this broker as leader at the end.
    pub async fn hand_over_leadership(&self, within: Duration) -> usize {
        let me = self.config.node_id;
        let mut handles: Vec<GroupHandle> = self
            .partitions
            .iter()
            .filter(|e| !crate::coordinator::is_internal(&e.key().0) && e.value().1.len() > 1)
            .filter_map(|e| self.groups.get(&e.value().0).map(|g| g.clone()))
            .collect();
        if self.members.read().len() > 1 {
            handles.push(self.controller.clone());
        }
        let leading = |h: &GroupHandle| h.status.borrow().leader == Some(me);
        handles.retain(leading);
        if handles.is_empty() {
            return 0;
        }
        let deadline = tokio::time::Instant::now() + within;
        let mut asked = tokio::time::Instant::now() - Duration::from_secs(1);
        loop {
            let still: Vec<&GroupHandle> = handles.iter().filter(|h| leading(h)).collect();
            if still.is_empty() || tokio::time::Instant::now() >= deadline {
                tracing::info!(
                    groups = handles.len(),
                    still_leading = still.len(),
                    "handed leadership over before stopping"
                );
                return still.len();
            }
            // Again now and then: a transfer raft-rs gave up (its target fell behind) restarts.
            if asked.elapsed() >= Duration::from_millis(300) {
                for h in &still {
                    let _ = h.events.try_send(Event::HandOver);
                }
                asked = tokio::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Runs a controller command: proposed on the controller's leader (forwarded there as the
    /// client's own request when this broker does not lead), and answered once this broker
    /// applied it, so the caller can use what it created at once.
    pub(crate) async fn run_command(
        &self,
        command: Command,
        request: &Message,
    ) -> Result<(), PartitionError> {
        let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
        loop {
            let leader = self.controller.leader(LEADER_WAIT).await;
            let outcome = match leader {
                None => Err(PartitionError::new(
                    ErrorCode::NotLeader,
                    "the cluster has no controller leader (no quorum?)",
                )),
                Some(l) if l == self.config.node_id => self.propose_here(&command).await.map(drop),
                Some(l) => match self.links.request(l, request, FORWARD_TIMEOUT).await {
                    Ok(Message::Done) => self.wait_visible(&command).await,
                    Ok(Message::Error { code, message, .. }) => Err(PartitionError::new(code, message)),
                    Ok(other) => Err(PartitionError::new(
                        ErrorCode::Internal,
                        format!("the controller answered with frame kind {}", other.kind()),
                    )),
                    Err(e) => Err(e),
                },
            };
            match outcome {
                Err(e) if e.code == ErrorCode::NotLeader && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// Adds or removes one broker (docs/replication.md §11): on the controller's leader, the
    /// new set is proposed as a `Brokers` command once the previous change is done (the
    /// controller's voters are the brokers); elsewhere the request goes to that leader. Answers
    /// once this broker applied the new set; the partitions then move on their own.
    pub(crate) async fn change_brokers(
        &self,
        topics: &Topics,
        add: Option<(u32, String)>,
        remove: Option<u32>,
        request: &Message,
    ) -> Result<(), PartitionError> {
        let malformed = |m: String| PartitionError::new(ErrorCode::Malformed, m);
        if add.is_some() == remove.is_some() {
            return Err(malformed("add one broker or remove one, one change at a time".into()));
        }
        let leader = self.controller.leader(LEADER_WAIT).await;
        let me = self.config.node_id;
        let wanted = |members: &std::collections::BTreeMap<u64, std::net::SocketAddr>| match (&add, remove) {
            (Some((id, _)), _) => members.contains_key(&u64::from(*id)),
            (_, Some(id)) => !members.contains_key(&u64::from(id)),
            _ => true,
        };
        match leader {
            None => Err(PartitionError::new(
                ErrorCode::NotLeader,
                "the cluster has no controller leader (no quorum?)",
            )),
            Some(l) if l != me => {
                match self.links.request(l, request, FORWARD_TIMEOUT).await? {
                    Message::Done => {}
                    Message::Error { code, message, .. } => return Err(PartitionError::new(code, message)),
                    other => {
                        return Err(PartitionError::new(
                            ErrorCode::Internal,
                            format!("the controller answered with frame kind {}", other.kind()),
                        ))
                    }
                }
                self.applied_here(|| wanted(&self.members.read()), "the change").await
            }
            Some(_) => {
                let mut next = self.members.read().clone();
                let status = self.controller.status.borrow().clone();
                let mut voters = status.voters.clone();
                voters.sort_unstable();
                let ids: Vec<u64> = next.keys().copied().collect();
                let settled = voters == ids && status.learners.is_empty();
                // Undoing an addition still under way (a broker added but never started, say):
                // removing it leaves the configuration the controller has.
                let undo = remove.is_some_and(|r| {
                    let r = u64::from(r);
                    !voters.contains(&r)
                        && status.learners.iter().all(|&l| l == r)
                        && ids.iter().copied().filter(|&i| i != r).eq(voters.iter().copied())
                });
                match (add, remove) {
                    (Some((id, addr)), _) => {
                        let id = u64::from(id);
                        let parsed: std::net::SocketAddr = addr.parse().map_err(|e| {
                            malformed(format!("broker address '{addr}': {e} (HOST:PORT, an IP address)"))
                        })?;
                        if id == 0 {
                            return Err(malformed("broker ids start at 1".into()));
                        }
                        if next.contains_key(&id) {
                            return Err(malformed(format!("broker {id} is already in the cluster")));
                        }
                        if let Some((other, _)) = next.iter().find(|(_, a)| **a == parsed) {
                            return Err(malformed(format!("broker {other} is already at {parsed}")));
                        }
                        if self.retired.read().contains(&id) {
                            return Err(PartitionError::new(
                                ErrorCode::Malformed,
                                format!(
                                    "broker id {id} was removed from this cluster and is not used again: \
                                     add the machine under a new id, with an empty data directory"
                                ),
                            ));
                        }
                        if next.len() >= quiver_protocol::limits::MAX_RAFT_VOTERS {
                            return Err(malformed("the cluster has as many brokers as it can".into()));
                        }
                        next.insert(id, parsed);
                    }
                    (_, Some(id)) => {
                        let id = u64::from(id);
                        if next.remove(&id).is_none() {
                            return Err(malformed(format!("no broker {id} in this cluster")));
                        }
                        if let Some(t) =
                            topics.all().into_iter().find(|t| usize::from(t.config.replicas) > next.len())
                        {
                            return Err(malformed(format!(
                                "topic '{}' has {} replicas: removing broker {id} leaves {} brokers",
                                t.name,
                                t.config.replicas,
                                next.len()
                            )));
                        }
                    }
                    _ => {}
                }
                // Checked after the request itself: one that can never be made fails at once.
                if !settled && !undo {
                    return Err(PartitionError::new(
                        ErrorCode::NotLeader,
                        format!(
                            "the previous change is still under way: the brokers are {ids:?}, the controller's voters \
                             {voters:?} and learners {:?} (an added broker must start and catch up first; one that \
                             never started can be removed again); retry",
                            status.learners,
                        ),
                    ));
                }
                let brokers = next.iter().map(|(&id, a)| (id, a.to_string())).collect();
                let bootstrap = self.bootstrap.read().clone();
                self.propose_here(&Command::Brokers { brokers, bootstrap }).await.map(drop)
            }
        }
    }

    /// Proposes a command on this broker, the controller's leader; answers with its index once
    /// committed and applied here.
    async fn propose_here(&self, command: &Command) -> Result<u64, PartitionError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        // A create records the brokers it is placed over (§11).
        let recorded;
        let command = match command {
            Command::CreateTopic { name, partitions, config, brokers: None } => {
                recorded = Command::CreateTopic {
                    name: name.clone(),
                    partitions: *partitions,
                    config: config.clone(),
                    brokers: Some(self.member_ids()),
                };
                &recorded
            }
            other => other,
        };
        let data = command.encode();
        if self.controller.events.send(Event::Command { data, reply }).await.is_err() {
            return Err(PartitionError::new(ErrorCode::ShuttingDown, "the controller stopped"));
        }
        match rx.await {
            Ok(Ok(index)) => {
                self.wait_applied(index).await.and_then(|()| self.outcome(index)).map(|()| index)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(PartitionError::new(ErrorCode::ShuttingDown, "the controller stopped")),
        }
    }

    /// Creates the internal offsets topic (docs/replication.md §10) on this broker, the
    /// controller's leader, unless it exists: `partitions` partitions, as many replicas as there
    /// are brokers up to `max_replicas`.
    pub(crate) async fn create_offsets_topic(
        &self,
        name: &str,
        partitions: u32,
        max_replicas: usize,
        segment_bytes: u64,
    ) -> Result<(), PartitionError> {
        let name = name.to_string();
        if self.topic_index.contains_key(&name) {
            return Ok(());
        }
        let replicas = self.members.read().len().clamp(1, max_replicas) as u16;
        // Small segments: a compaction drops the segments wholly below its snapshot, and the
        // log rolls on its own only when a segment is full. Never cut by time or size:
        // retention would drop the only record of an idle group's commit.
        let config = quiver_protocol::TopicConfig::new()
            .with_replicas(replicas)
            .with_segment_bytes(segment_bytes)
            .with_retention_ms(None)
            .with_retention_bytes(None);
        self.propose_here(&Command::CreateTopic { name, partitions, config, brokers: None }).await.map(drop)
    }

    /// A new producer id (docs/replication.md §2c), issued here from a block of counters the
    /// controller log reserved for this broker: a broker cut off from the controller still
    /// issues ids while it holds a block. A spare block is kept reserved ahead.
    pub(crate) async fn producer_id(self: &Arc<Self>) -> Result<i64, PartitionError> {
        let ids = &self.producer_ids;
        let mut issuing = ids.issuing().lock().await;
        let id = match ids.next_from_block(&mut issuing) {
            Some(id) => id,
            None => {
                *issuing = match ids.take_spare() {
                    Some(block) => block,
                    None => {
                        self.reserve_producer_ids().await?;
                        ids.take_spare().ok_or_else(|| {
                            PartitionError::new(
                                ErrorCode::Internal,
                                "the reserved producer-id block went missing",
                            )
                        })?
                    }
                };
                tracing::debug!(block = ?*issuing, "issuing producer ids from a new block");
                ids.next_from_block(&mut issuing)
                    .ok_or_else(|| PartitionError::new(ErrorCode::Internal, "an empty producer-id block"))?
            }
        };
        drop(issuing);
        self.keep_spare_producer_ids();
        Ok(id)
    }

    /// Reserves a block for later in the background when none is spare.
    pub(crate) fn keep_spare_producer_ids(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        let ids = &self.producer_ids;
        if ids.spares() > 0 || ids.reserving.swap(true, Ordering::AcqRel) {
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move {
            loop {
                match cluster.reserve_producer_ids().await {
                    Ok(()) => break,
                    Err(e) if e.code == ErrorCode::ShuttingDown || cluster.shutdown.is_cancelled() => break,
                    Err(e) => {
                        tracing::debug!("reserving a spare block of producer ids: {e}; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = cluster.shutdown.cancelled() => break,
                        }
                    }
                }
            }
            cluster.producer_ids.reserving.store(false, Ordering::Release);
        });
    }

    /// Reserves the next block of producer-id counters for this broker through the controller
    /// (proposed here when this broker leads it, else asked of its leader); returns once the
    /// reservation is applied here.
    async fn reserve_producer_ids(&self) -> Result<(), PartitionError> {
        let me = self.config.node_id;
        let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
        loop {
            let outcome = match self.controller.leader(LEADER_WAIT).await {
                None => Err(PartitionError::new(
                    ErrorCode::NotLeader,
                    "the cluster has no controller leader (no quorum?)",
                )),
                Some(l) if l == me => self.reserve_producer_ids_for(me).await,
                Some(l) => {
                    let request = Message::ReserveProducerIds { broker: me as u32 };
                    match self.links.request(l, &request, FORWARD_TIMEOUT).await {
                        Ok(Message::Done) => {
                            // Committed at the leader: applied here a moment later.
                            let ids = &self.producer_ids;
                            self.applied_here(|| ids.spares() > 0, "the producer-id reservation").await
                        }
                        Ok(Message::Error { code, message, .. }) => Err(PartitionError::new(code, message)),
                        Ok(other) => Err(PartitionError::new(
                            ErrorCode::Internal,
                            format!(
                                "the controller's leader answered a reservation with frame kind {}",
                                other.kind()
                            ),
                        )),
                        Err(e) => Err(e),
                    }
                }
            };
            match outcome {
                Err(e) if e.code == ErrorCode::NotLeader && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// On the controller's leader: reserves the next block for `broker` (a peer's
    /// `ReserveProducerIds`, or this broker's own), answered once committed and applied here.
    pub(crate) async fn reserve_producer_ids_for(&self, broker: u64) -> Result<(), PartitionError> {
        if !self.members.read().contains_key(&broker) {
            return Err(PartitionError::new(
                ErrorCode::Malformed,
                format!("no broker {broker} in this cluster"),
            ));
        }
        let key = producer_ids::fresh_key_hex()
            .map_err(|e| PartitionError::new(ErrorCode::Internal, format!("a producer-id key: {e}")))?;
        let command = Command::ReserveProducerIds { broker, count: crate::producers::ID_BLOCK, key };
        self.propose_here(&command).await.map(drop)
    }

    /// Checks a batch's producer identity where its partition is led: an id whose block this
    /// broker has not applied yet waits up to [`TOPIC_WAIT`] for the controller log.
    pub(crate) async fn check_producer_id(
        &self,
        producer_id: i64,
        epoch: i16,
    ) -> Result<(), crate::producers::ProducerIdError> {
        if !self.producer_ids.known(producer_id) {
            let mut applied = self.applied.clone();
            let ids = &self.producer_ids;
            let _ = tokio::time::timeout(TOPIC_WAIT, applied.wait_for(|_| ids.known(producer_id))).await;
        }
        self.producer_ids.check(producer_id, epoch)
    }

    async fn wait_applied(&self, index: u64) -> Result<(), PartitionError> {
        let mut applied = self.applied.clone();
        let done = tokio::time::timeout(FORWARD_TIMEOUT, applied.wait_for(|&a| a >= index))
            .await
            .is_ok_and(|r| r.is_ok());
        match done {
            true => Ok(()),
            false => {
                Err(PartitionError::new(ErrorCode::NotLeader, "the command was not applied in time; retry"))
            }
        }
    }

    /// After the controller's leader answered: waits until this broker applied the command too.
    async fn wait_visible(&self, command: &Command) -> Result<(), PartitionError> {
        self.applied_here(|| command.visible(self), "the command").await
    }

    /// Once the controller's leader answered: waits up to [`FORWARD_TIMEOUT`] until this
    /// broker's applied commands make `done` true (`what` names it in the retriable error).
    async fn applied_here(&self, done: impl Fn() -> bool, what: &str) -> Result<(), PartitionError> {
        let mut applied = self.applied.clone();
        let seen = tokio::time::timeout(FORWARD_TIMEOUT, applied.wait_for(|_| done()))
            .await
            .is_ok_and(|r| r.is_ok());
        match seen {
            true => Ok(()),
            false => Err(PartitionError::new(
                ErrorCode::NotLeader,
                format!("{what} was not applied here in time; retry"),
            )),
        }
    }
}

/// Starts cluster mode: the peer links, the controller (replaying its log, which attaches every
/// replicated partition this broker holds), then returns once the replay is done.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn start(
    broker: &crate::config::BrokerConfig,
    mut config: ClusterConfig,
    storage: Arc<dyn Storage>,
    topics: Arc<Topics>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    acls: Arc<crate::auth::Acls>,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<Cluster>> {
    let me = config.node_id;
    // The controller's first voters, for a replica that never wrote its state: the `--peers`
    // list; a joining broker starts from the brokers before it (not itself: it must not
    // campaign before the controller added it) and replays every change (§11).
    let mut first_voters = config.ids();
    if let Some(join) = config.join.clone() {
        let saved = saved_brokers(&broker.data_dir);
        let mut asked = None;
        for &at in &join {
            match ask_brokers(&endpoint, &client, at).await {
                Ok(brokers) => {
                    asked = Some((at, brokers));
                    break;
                }
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
        let (from, brokers) = match (asked, saved) {
            (Some((at, brokers)), _) => (at.to_string(), brokers),
            (None, Some(saved)) => ("the brokers this broker knew".to_string(), saved),
            (None, None) => anyhow::bail!(
                "no broker of {join:?} gave the cluster's brokers (see the warnings above; one that \
                 closed the connection with \"not a peer\" does not know broker {me} yet: add it first \
                 with `quiver cluster add-broker {me}@{}`), and this broker knows no others",
                broker.listen
            ),
        };
        config.peers = brokers;
        anyhow::ensure!(
            config.peers.contains_key(&me),
            "broker {me} is not a broker of the cluster ({from}) yet: add it first with \
             `quiver cluster add-broker {me}@{}`",
            broker.listen
        );
        save_brokers(&broker.data_dir, &config.peers)?;
        first_voters = config.peers.keys().copied().filter(|&id| id != me).collect();
        tracing::info!(brokers = ?config.peers, "joining the cluster");
    }
    let links = PeerLinks::start(me, &config.peers, endpoint, client, shutdown.clone());
    controller::start(
        config,
        first_voters,
        &broker.data_dir,
        storage,
        topics,
        broker.max_partitions_total,
        links,
        acls,
        shutdown,
    )
    .await
}

/// Where a broker that joined keeps the brokers it last knew (`--join` falls back to them).
fn brokers_file(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("cluster").join("brokers.json")
}

fn saved_brokers(
    data_dir: &std::path::Path,
) -> Option<std::collections::BTreeMap<u64, std::net::SocketAddr>> {
    let path = brokers_file(data_dir);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice::<Vec<(u64, std::net::SocketAddr)>>(&bytes) {
        Ok(list) if !list.is_empty() && list.len() <= quiver_protocol::limits::MAX_RAFT_VOTERS => {
            Some(list.into_iter().collect())
        }
        Ok(_) | Err(_) => {
            tracing::warn!(path = %path.display(), "ignoring an unreadable list of brokers");
            None
        }
    }
}

/// Writes the brokers this broker knows (tmp, rename): a restart with `--join` uses them when
/// none of the given brokers answers.
pub(crate) fn save_brokers(
    data_dir: &std::path::Path,
    brokers: &std::collections::BTreeMap<u64, std::net::SocketAddr>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let path = brokers_file(data_dir);
    let list: Vec<(u64, std::net::SocketAddr)> = brokers.iter().map(|(&id, &a)| (id, a)).collect();
    // Each write its own temporary file: a start and an applied change may write at once.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("json.{n}.tmp"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&tmp, serde_json::to_vec(&list)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

/// The brokers of the cluster `at` belongs to, asked of it over a peer connection.
async fn ask_brokers(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    at: std::net::SocketAddr,
) -> anyhow::Result<std::collections::BTreeMap<u64, std::net::SocketAddr>> {
    use anyhow::Context;
    let ask = async {
        let conn = endpoint.connect_with(client.clone(), at, &at.ip().to_string())?.await?;
        let (mut send, recv) = conn.open_bi().await?;
        quiver_transport::write_message(&mut send, &Message::ClusterStatus).await?;
        let _ = send.finish();
        let answer = quiver_transport::FrameReader::new(recv).next().await?;
        conn.close(0u32.into(), b"done");
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(FORWARD_TIMEOUT, ask)
        .await
        .with_context(|| format!("no answer from {at} within {FORWARD_TIMEOUT:?}"))?
        .with_context(|| {
            format!("asking {at} for the cluster's brokers (is this broker added, with the cluster's CA?)")
        })?;
    match answer {
        Some(Message::ClusterStatusOk { brokers, .. }) => brokers
            .into_iter()
            .map(|b| {
                let addr = b.addr.parse().with_context(|| format!("broker {} at '{}'", b.id, b.addr))?;
                Ok((u64::from(b.id), addr))
            })
            .collect(),
        Some(Message::Error { message, .. }) => anyhow::bail!("{at} refused: {message}"),
        other => anyhow::bail!("{at} answered {other:?} to a cluster status request"),
    }
}

/// The Raft group of partition `partition` of the topic created at controller index `index`.
pub(crate) fn group_id(index: u64, partition: u32) -> u64 {
    (index << 16) | u64::from(partition + 1)
}

/// Attaches `p` to a new Raft group with `replicas` as its voters.
#[allow(clippy::too_many_arguments)]
fn attach(
    cluster_links: &Arc<PeerLinks>,
    me: u64,
    p: &Arc<Partition>,
    config: &quiver_protocol::TopicConfig,
    group: u64,
    replicas: &[u64],
    desired: &[u64],
    shutdown: &CancellationToken,
) -> Result<GroupHandle, PartitionError> {
    // The topic's durability, as on one node: `always` fsyncs each append before it counts
    // towards a commit; `interval` fsyncs every `flush_interval_ms`; `os` leaves it to the OS
    // (here: every 30 s, so a replica is never unsynced without bound).
    let sync_every = match config.durability {
        quiver_protocol::Durability::Always => None,
        quiver_protocol::Durability::Interval => Some(config.flush_interval_ms.max(1)),
        quiver_protocol::Durability::Os => Some(30_000),
    };
    let store = crate::replica::LogStorage::open(p.shared_log(), p.storage(), replicas)
        .map_err(|e| PartitionError::new(ErrorCode::StorageError, e.to_string()))?
        .with_tracker(p.tracker())
        .with_sync_every(sync_every);
    let commit = store.applied();
    let fresh = store.hard_state().get_term() == 0;
    let hw = store
        .offset_after(commit)
        .map_err(|e| PartitionError::new(ErrorCode::StorageError, e.to_string()))?
        .unwrap_or(0);
    // Until the group says otherwise, consumers see only what was committed before.
    p.reset_high_watermark(hw);
    let node = raft::RawNode::new(&live_config(me, commit), store, &crate::replica::raft_logger())
        .map_err(|e| PartitionError::new(ErrorCode::Internal, e.to_string()))?;
    let weak = Arc::downgrade(p);
    let on_commit: driver::OnCommit = Box::new(move |_entries, hw| {
        if let Some(p) = weak.upgrade() {
            p.advance_high_watermark(hw);
        }
    });
    let name = format!("{}/{}", p.topic, p.id);
    let handle = driver::spawn(
        node,
        driver::GroupName { id: group, name },
        cluster_links.clone(),
        Some(p.tracker()),
        on_commit,
        desired.to_vec(),
        shutdown.child_token(),
    );
    p.attach_replica(handle.proposals.clone());
    if fresh && replicas.first() == Some(&me) {
        let _ = handle.events.try_send(Event::Campaign);
    }
    Ok(handle)
}

/// raft-rs settings for a live group: heartbeat every tick (100 ms), an election after 4 to 8
/// ticks without one (raft-rs randomises it), pre-vote and check-quorum on
/// (docs/replication.md §4). The simulator uses `replica::config`, whose timeout a seed can
/// replay.
pub(crate) fn live_config(id: u64, applied: u64) -> raft::Config {
    raft::Config {
        heartbeat_tick: 1,
        election_tick: 4,
        min_election_tick: 4,
        max_election_tick: 8,
        ..crate::replica::config(id, applied)
    }
}
