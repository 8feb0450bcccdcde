//! The controller: one Raft group of every broker whose committed commands every broker applies
//! in order (docs/replication.md §6). A command is a Kafka v2 batch of one record whose value is
//! the command as JSON, so the controller's log is a segment log like any partition's.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use quiver_protocol::batch::{BatchBuilder, RecordIter, ValidatedBatch};
use quiver_protocol::message::{validate_partition_count, validate_topic_name};
use quiver_protocol::{ErrorCode, TopicConfig};
use raft::eraftpb::{Entry, EntryType};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{driver, group_id, Cluster, ClusterConfig, PeerLinks, CONTROLLER_GROUP};
use crate::log::{LogConfig, PartitionLog};
use crate::partition::PartitionError;
use crate::storage::Storage;
use crate::topics::Topics;

/// A metadata change, as the controller's log stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Command {
    CreateTopic {
        name: String,
        partitions: u32,
        config: TopicConfig,
        /// The brokers its partitions are placed over (the proposer's, filled in when it is
        /// proposed): a broker replaying the create later (one added since) places them the
        /// same. Creates logged before this was recorded have none: placed over the brokers
        /// the cluster started with.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        brokers: Option<Vec<u64>>,
    },
    DeleteTopic {
        name: String,
    },
    /// The next `count` producer-id counters go to `broker` (producer_ids.rs); `key` is the key
    /// of every id if this is the first reservation, else ignored.
    ReserveProducerIds {
        broker: u64,
        count: i64,
        key: String,
    },
    /// The cluster's brokers from now on (docs/replication.md §11): (id, `HOST:PORT`). Before
    /// the first such command, the `--peers` list. (A list, not a map: JSON map keys are
    /// strings, which serde's tagged enums do not read back as numbers.)
    Brokers {
        brokers: Vec<(u64, String)>,
        /// The brokers the cluster started with (its `--peers`), carried along so that a broker
        /// added later places the topics created before any change as everyone else did.
        bootstrap: Vec<u64>,
    },
    /// Adds (`add`) or removes ACL rules (docs/security.md). Replayed in order at start, so
    /// the rules in force are the log's.
    Acls {
        add: bool,
        rules: Vec<crate::auth::StoredRule>,
    },
}

impl Command {
    /// The entry data: a one-record batch holding the JSON.
    pub(crate) fn encode(&self) -> Bytes {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let mut b = BatchBuilder::new(128 + json.len());
        b.push(crate::partition::now_ms(), None, &json, &[]);
        b.finish()
    }

    /// Parses an entry's data and checks the command against the limits every proposer
    /// checked (topic name, partition count, config): entries come from the log and from
    /// peers, and applying one must never create what no broker would have accepted.
    pub(super) fn decode(data: Bytes) -> Result<Command, String> {
        let batch = ValidatedBatch::new(data).map_err(|e| e.to_string())?;
        let header = *batch.header();
        let record = RecordIter::new(batch.freeze(), header)
            .next()
            .ok_or("an empty command batch")?
            .map_err(|e| e.to_string())?;
        let command: Command = serde_json::from_slice(&record.value).map_err(|e| e.to_string())?;
        match &command {
            Command::CreateTopic { name, partitions, config, brokers } => {
                if brokers
                    .as_ref()
                    .is_some_and(|b| b.is_empty() || b.len() > quiver_protocol::limits::MAX_RAFT_VOTERS)
                {
                    return Err("a create placed over no brokers, or too many".into());
                }
                validate_topic_name(name)?;
                validate_partition_count(*partitions)?;
                config.validate()?;
            }
            Command::DeleteTopic { name } => validate_topic_name(name)?,
            Command::Brokers { brokers, bootstrap } => {
                parse_brokers(brokers)?;
                if bootstrap.is_empty() || bootstrap.len() > quiver_protocol::limits::MAX_RAFT_VOTERS {
                    return Err(format!("a bootstrap set of {} brokers", bootstrap.len()));
                }
            }
            Command::Acls { rules, .. } => {
                if rules.len() > quiver_protocol::limits::MAX_ACL_RULES {
                    return Err(format!("an ACL change of {} rules", rules.len()));
                }
                for rule in rules {
                    rule.clone().into_rule()?;
                }
            }
            Command::ReserveProducerIds { count, key, .. } => {
                if !(1..=crate::producers::ID_BLOCK).contains(count) {
                    return Err(format!("a producer-id reservation of {count} counters"));
                }
                if super::producer_ids::decode_key(key).is_none() {
                    return Err("a producer-id reservation with a malformed key".into());
                }
            }
        }
        Ok(command)
    }

    /// Whether this broker has applied the command's effect.
    pub(super) fn visible(&self, cluster: &Cluster) -> bool {
        match self {
            Command::CreateTopic { name, .. } => cluster.topic_index.contains_key(name),
            Command::DeleteTopic { name } => !cluster.topic_index.contains_key(name),
            Command::ReserveProducerIds { .. } => true,
            Command::Acls { add, rules } => rules
                .iter()
                .filter_map(|r| r.clone().into_rule().ok())
                .all(|r| cluster.acls.contains(&r) == *add),
            Command::Brokers { brokers, .. } => {
                let mine = cluster.members.read();
                mine.len() == brokers.len() && brokers.iter().all(|(id, _)| mine.contains_key(id))
            }
        }
    }
}

/// See [`Cluster::set_delete_hooks`].
pub struct DeleteHooks {
    pub dropped: Box<dyn Fn(&str) + Send + Sync>,
    pub forget: ForgetTopic,
}

/// Forgets a deleted topic's committed offsets (blocking).
pub type ForgetTopic = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

impl std::fmt::Debug for DeleteHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeleteHooks")
    }
}

/// What a broker's controller keeps besides the group.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// The outcome of each command applied this run, by index, for the proposer to answer with.
    pub(crate) outcomes: DashMap<u64, Result<(), PartitionError>>,
}

impl Cluster {
    /// The outcome of the command at `index` (applied by now).
    pub(super) fn outcome(&self, index: u64) -> Result<(), PartitionError> {
        self.applied_state.outcomes.remove(&index).map(|(_, r)| r).unwrap_or(Ok(()))
    }

    /// What a topic delete also does besides removing the files: forget the topic's groups
    /// (`dropped`) and its committed offsets (`forget`, blocking). Set once the broker's state
    /// exists; a delete replayed before (at start) only removes files.
    pub fn set_delete_hooks(&self, hooks: DeleteHooks) {
        let _ = self.delete_hooks.set(hooks);
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn start(
    config: ClusterConfig,
    first_voters: Vec<u64>,
    data_dir: &std::path::Path,
    storage: Arc<dyn Storage>,
    topics: Arc<Topics>,
    max_partitions_total: u32,
    links: Arc<PeerLinks>,
    acls: Arc<crate::auth::Acls>,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<Cluster>> {
    use anyhow::Context;
    let dir = data_dir.join("cluster").join("controller");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ids, me) = (first_voters, config.node_id);
    let (store, commit, logged) = {
        let storage = storage.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let (log, _) = PartitionLog::open(
                storage.clone(),
                dir.clone(),
                LogConfig::default(),
                crate::partition::now_ms(),
            )
            .with_context(|| format!("opening the controller log {}", dir.display()))?;
            let store = crate::replica::LogStorage::open(Arc::new(Mutex::new(log)), storage, &ids)
                .with_context(|| format!("opening the controller's Raft state in {}", dir.display()))?;
            let commit = store.hard_state().get_commit();
            let logged = raft::Storage::last_index(&store)?;
            Ok((store, commit, logged))
        })
        .await??
    };
    let fresh = store.hard_state().get_term() == 0;
    // Applied 0: every committed command is applied again at start (they are idempotent).
    let node = raft::RawNode::new(&super::live_config(me, 0), store, &crate::replica::raft_logger())?;
    let (apply_tx, apply_rx) = mpsc::unbounded_channel::<Vec<Entry>>();
    // Unbounded: metadata commands are few and small, and the driver must not wait on them.
    let on_commit: driver::OnCommit = Box::new(move |entries, _| {
        let _ = apply_tx.send(entries);
    });
    let members = config.peers.clone();
    let handle = driver::spawn(
        node,
        driver::GroupName { id: CONTROLLER_GROUP, name: "controller".into() },
        links.clone(),
        None,
        on_commit,
        // Set once the log is replayed (`follow_members`).
        Vec::new(),
        shutdown.child_token(),
    );
    let (applied_tx, applied) = watch::channel(0u64);
    let bootstrap = match config.join {
        Some(_) => Vec::new(),
        None => members.keys().copied().collect(),
    };
    let cluster = Arc::new(Cluster {
        acls,
        config,
        links,
        controller: handle,
        groups: DashMap::new(),
        partitions: DashMap::new(),
        observed: DashMap::new(),
        applied,
        topic_index: DashMap::new(),
        applied_state: Applied::default(),
        delete_hooks: OnceLock::new(),
        producer_ids: Default::default(),
        shutdown: shutdown.clone(),
        bootstrap: parking_lot::RwLock::new(bootstrap),
        data_dir: data_dir.to_path_buf(),
        retired: Default::default(),
        replayed: Default::default(),
        following: Default::default(),
        ending: DashMap::new(),
        members: parking_lot::RwLock::new(members),
        first_replicas: DashMap::new(),
    });
    // Blocks reserved for this broker by commands already in its log at start may have been
    // handed out before a crash (even those committed after the persisted commit): never
    // issued from again.
    cluster.producer_ids.set_replayed_through(logged);
    tokio::spawn(super::remote::announce_loop(cluster.clone(), topics.clone()));
    let topics_for_follow = topics.clone();
    tokio::spawn(apply_loop(cluster.clone(), topics, apply_rx, applied_tx, max_partitions_total));
    if commit > 0 {
        let mut a = cluster.applied.clone();
        tokio::time::timeout(Duration::from_secs(120), a.wait_for(|&a| a >= commit))
            .await
            .context("replaying the controller log took over 120 s")?
            .context("the controller stopped while replaying")?;
        tracing::info!(commands = commit, "replayed the controller log");
    }
    // From now on the groups move toward placement over the brokers the log ends with.
    cluster.replayed.store(true, std::sync::atomic::Ordering::Release);
    cluster.follow_members(&topics_for_follow);
    // A block in hand before anyone asks: a broker cut off from the controller later still
    // issues producer ids from it.
    cluster.keep_spare_producer_ids();
    // A new cluster's lowest id asks for votes at once rather than after a timeout.
    if fresh && cluster.config.join.is_none() && cluster.config.peers.keys().next() == Some(&me) {
        let _ = cluster.controller.events.try_send(super::Event::Campaign);
    }
    Ok(cluster)
}

async fn apply_loop(
    cluster: Arc<Cluster>,
    topics: Arc<Topics>,
    mut rx: mpsc::UnboundedReceiver<Vec<Entry>>,
    applied: watch::Sender<u64>,
    max_partitions_total: u32,
) {
    while let Some(entries) = rx.recv().await {
        for e in entries {
            if e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty() {
                let outcome = match Command::decode(e.data.clone()) {
                    Ok(c) => apply(&cluster, &topics, e.index, c, max_partitions_total).await,
                    Err(why) => {
                        tracing::error!(index = e.index, "an undecodable controller command: {why}");
                        Err(PartitionError::new(ErrorCode::Internal, why))
                    }
                };
                if let Err(ref err) = outcome {
                    tracing::debug!(index = e.index, "controller command: {err}");
                }
                cluster.applied_state.outcomes.insert(e.index, outcome);
                // Outcomes nobody asked for (replays, other brokers' commands) are dropped.
                if cluster.applied_state.outcomes.len() > 1024 {
                    let old = e.index.saturating_sub(1024);
                    cluster.applied_state.outcomes.retain(|&i, _| i > old);
                }
            }
            applied.send_replace(e.index);
        }
    }
}

async fn apply(
    cluster: &Arc<Cluster>,
    topics: &Arc<Topics>,
    index: u64,
    command: Command,
    max_partitions_total: u32,
) -> Result<(), PartitionError> {
    match command {
        Command::CreateTopic { name, partitions, config, brokers } => {
            if let Some(existing) = cluster.topic_index.get(&name) {
                if *existing != index {
                    return Err(PartitionError::new(
                        ErrorCode::TopicExists,
                        format!("topic '{name}' already exists"),
                    ));
                }
            }
            let topic = match topics.get(&name) {
                // The files here are a later create's of the name (this one was deleted since):
                // a replay reaches that create further on; this one applies to nothing.
                Ok(t) if t.created_at_index.is_some_and(|later| later > index) => return Ok(()),
                Ok(t) => t,
                Err(_) => {
                    topics
                        .create_at(&name, partitions, config.clone(), max_partitions_total, Some(index))
                        .await?
                }
            };
            // Placed over the brokers of the time of the create; a broker added since that does
            // not know the cluster's first brokers yet (an old create) guesses with today's and
            // corrects it when it applies the change that added it (`follow_members`).
            let recorded =
                brokers.or_else(|| Some(cluster.bootstrap.read().clone()).filter(|b| !b.is_empty()));
            let known = recorded.is_some();
            let ids = recorded.unwrap_or_else(|| cluster.member_ids());
            for p in &topic.partitions {
                let replicas = crate::placement::replicas(&name, p.id, &ids, usize::from(config.replicas));
                let group = group_id(index, p.id);
                cluster.partitions.insert((name.clone(), p.id), (group, replicas.clone()));
                if known {
                    cluster.first_replicas.insert(group, replicas.clone());
                } else {
                    cluster.first_replicas.remove(&group);
                }
                if cluster.groups.contains_key(&group) {
                    continue;
                }
                // Where the placement is only a guess, a replica here waits for the brokers'
                // change that added this broker (`follow_members`): one started from a wrong
                // first configuration could count the wrong majority.
                if !known || !replicas.contains(&cluster.config.node_id) {
                    // Held elsewhere: known here from its leader's notices (remote.rs).
                    let (handle, observed) = super::remote::observer(&replicas);
                    cluster.observed.insert(group, observed);
                    cluster.groups.insert(group, handle);
                    continue;
                }
                cluster.attach_here(p, &topic.config, group, &replicas, &replicas)?;
            }
            cluster.topic_index.insert(name, index);
            // Placed over other brokers than the cluster has now (a change committed between
            // its proposal and here): it moves to its placement over today's brokers.
            let mut today = cluster.member_ids();
            let mut placed_over = ids;
            today.sort_unstable();
            placed_over.sort_unstable();
            if known && today != placed_over {
                cluster.follow_members(topics);
            }
            Ok(())
        }
        Command::Brokers { brokers, bootstrap } => {
            let brokers = parse_brokers(&brokers).map_err(|e| PartitionError::new(ErrorCode::Internal, e))?;
            *cluster.bootstrap.write() = bootstrap;
            let gone: Vec<u64> =
                cluster.members.read().keys().copied().filter(|id| !brokers.contains_key(id)).collect();
            cluster.retired.write().extend(gone);
            tracing::info!(index, brokers = ?brokers.keys().collect::<Vec<_>>(), "the cluster's brokers changed");
            for (&id, &addr) in &brokers {
                cluster.links.add_peer(id, addr);
            }
            if cluster.config.join.is_some() {
                let (dir, list) = (cluster.data_dir.clone(), brokers.clone());
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = super::save_brokers(&dir, &list) {
                        tracing::warn!("keeping the list of brokers: {e:#}");
                    }
                });
            }
            *cluster.members.write() = brokers;
            cluster.follow_members(topics);
            Ok(())
        }
        Command::ReserveProducerIds { broker, count, key } => {
            cluster.producer_ids.apply(index, broker == cluster.config.node_id, count, &key)
        }
        Command::Acls { add, rules } => {
            // Decoded, so every rule checked already.
            let rules: Vec<_> = rules.into_iter().filter_map(|r| r.into_rule().ok()).collect();
            cluster.acls.apply(add, &rules)
        }
        Command::DeleteTopic { name } => {
            if topics.get(&name).is_ok_and(|t| t.created_at_index.is_some_and(|created| created > index)) {
                // Replaying the delete of an earlier topic of the name: these files are a later
                // create's (which this delete preceded), and they stay.
                return Ok(());
            }
            if cluster.topic_index.remove(&name).is_none() && topics.get(&name).is_err() {
                return Err(PartitionError::new(ErrorCode::UnknownTopic, format!("unknown topic '{name}'")));
            }
            let keys: Vec<_> =
                cluster.partitions.iter().filter(|e| e.key().0 == name).map(|e| e.key().clone()).collect();
            for key in keys {
                if let Some((_, (group, _))) = cluster.partitions.remove(&key) {
                    // Dropping the handle closes the group's queue; the partition closing below
                    // ends its driver's reads.
                    cluster.groups.remove(&group);
                    cluster.observed.remove(&group);
                }
            }
            let hooks = cluster.delete_hooks.get();
            let forget_hook = hooks.map(|h| h.forget.clone());
            let topic = name.clone();
            let forget = move || match forget_hook {
                Some(f) => f(&topic),
                None => Ok(()),
            };
            let dropped = || {
                if let Some(h) = hooks {
                    (h.dropped)(&name);
                }
            };
            match topics.delete(&name, dropped, forget).await {
                Ok(_) => Ok(()),
                Err(e) if e.code == ErrorCode::UnknownTopic => Ok(()),
                Err(e) => Err(e),
            }
        }
    }
}

/// The brokers of a `Brokers` command, checked: at least one, at most a Raft group's voters,
/// each address a socket address.
fn parse_brokers(
    brokers: &[(u64, String)],
) -> Result<std::collections::BTreeMap<u64, std::net::SocketAddr>, String> {
    if brokers.is_empty() || brokers.len() > quiver_protocol::limits::MAX_RAFT_VOTERS {
        return Err(format!("a broker set of {} brokers", brokers.len()));
    }
    let parsed: std::collections::BTreeMap<u64, std::net::SocketAddr> = brokers
        .iter()
        .map(|(id, addr)| match addr.parse() {
            Ok(a) if *id > 0 => Ok((*id, a)),
            _ => Err(format!("broker {id} at '{addr}': not an id and a HOST:PORT address")),
        })
        .collect::<Result<_, String>>()?;
    if parsed.len() != brokers.len() {
        return Err("a broker set naming an id twice".into());
    }
    Ok(parsed)
}
