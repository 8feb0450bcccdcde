//! Group coordinators of a cluster (docs/replication.md §10): consumer-group state lives in an
//! internal replicated topic, `__offsets`, of [`OFFSETS_PARTITIONS`] partitions created by the
//! controller's leader; group `g` belongs to partition `crc32c(g) mod partitions`, and its
//! coordinator is that partition's Raft leader, as Kafka's is the leader of its
//! `__consumer_offsets` partition.
//!
//! A broker coordinates the groups of an offsets partition while it leads that partition in the
//! term it read the partition's state in: [`run`] watches each partition's Raft status, and once
//! this broker leads it and its commit reached the first entry of its term (everything an
//! earlier coordinator answered for is then below the commit) it reads the log up to the high
//! watermark into an [`OffsetStore`] whose writes are committed through the Raft group in that
//! term only. When the leadership or term changes the store is *deposed*: its writes fail with
//! `NotCoordinator`, its groups' members here are dropped (they rejoin at the new coordinator),
//! and subscriptions using it end. Other brokers forward group requests to the coordinator.
//!
//! Followers keep no group state, but drop the segments a coordinator's completed compaction
//! replaced (`compact_followers`), so every replica's log stays as small as the leader's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quiver_protocol::ErrorCode;

use crate::offsets::{Loaded, OffsetStore};
use crate::partition::PartitionError;
use crate::state::BrokerState;

/// The internal topic holding every group's committed offsets, ack ledgers (design.md §5.4).
pub(crate) const OFFSETS_TOPIC: &str = "__offsets";
/// Its partitions (fixed when the controller creates it, so a group never moves partition).
pub(crate) const OFFSETS_PARTITIONS: u32 = 8;
/// Its replicas: as many as the brokers, up to 3 (survives the loss of one broker).
const OFFSETS_REPLICAS: usize = 3;
/// Segment size of the offsets partitions: what a compaction can drop lies in whole segments.
pub(crate) const OFFSETS_SEGMENT_BYTES: u64 = 1 << 20;
/// How often the coordinator loop looks at the offsets partitions' leaders.
const WATCH: Duration = Duration::from_millis(100);
/// How long a group request waits for a coordinator to be elected (and to read its state)
/// before it is answered `NotCoordinator` (retriable).
pub(crate) const COORDINATOR_WAIT: Duration = Duration::from_secs(3);

/// The offsets partition of `group`.
pub(crate) fn partition_of(group: &str, partitions: u32) -> u32 {
    crc32c::crc32c(group.as_bytes()) % partitions.max(1)
}

/// Where a group is served.
pub(crate) enum Locate {
    /// This broker coordinates it.
    Here(Arc<OffsetStore>),
    /// Another broker does.
    There(u64),
    /// None known yet (an election, or the offsets topic not created yet).
    Unknown,
}

/// Where `group` is served, as this broker knows it now.
pub(crate) fn locate(state: &BrokerState, group: &str) -> Locate {
    let (Some(cluster), Ok(topic)) = (&state.cluster, state.topics.get(OFFSETS_TOPIC)) else {
        return Locate::Unknown;
    };
    let k = partition_of(group, topic.partitions.len() as u32);
    if let Some(l) = state.coordinators.loaded.get(&k) {
        if !l.deposed.load(Ordering::Acquire) {
            return Locate::Here(l.store.clone());
        }
    }
    let Some((handle, _)) = cluster.group(OFFSETS_TOPIC, k) else { return Locate::Unknown };
    let status = handle.status.borrow();
    match status.leader {
        Some(l) if l != cluster.node_id() && !status.stopped => Locate::There(l),
        _ => Locate::Unknown, // elected here but not read yet, or none elected
    }
}

/// [`locate`], waiting up to [`COORDINATOR_WAIT`] while none is known.
pub(crate) async fn locate_wait(state: &BrokerState, group: &str) -> Locate {
    let deadline = tokio::time::Instant::now() + COORDINATOR_WAIT;
    loop {
        match locate(state, group) {
            Locate::Unknown if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            found => return found,
        }
    }
}

/// Stops coordinating offsets partition `k`: the store's writes fail from now on, and the
/// members of its groups here are dropped (their next request sends them to the new
/// coordinator, where they join again).
fn depose(state: &BrokerState, k: u32, partitions: u32) {
    let Some((_, loaded)) = state.coordinators.loaded.remove(&k) else { return };
    loaded.deposed.store(true, Ordering::Release);
    state.groups.drop_groups(|g| partition_of(g, partitions) == k);
    tracing::info!(partition = k, term = loaded.term, "no longer the coordinator of offsets partition {k}");
    metrics::gauge!("quiver_coordinated_offsets_partitions").set(state.coordinators.loaded.len() as f64);
}

/// Makes `group`'s membership on this coordinator durable before a reply that reflects it goes
/// out (invariants 1 and 4 of docs/replication.md §10): a join's new member id and generation,
/// a heartbeat's new assignment, a leave. Nothing to do on one node (members live in memory) or
/// when the last record already says it; a failure means this broker no longer coordinates.
pub(crate) async fn record_group(
    state: &Arc<BrokerState>,
    store: &Arc<OffsetStore>,
    group: &str,
) -> Result<(), PartitionError> {
    if !store.is_coordinated() || store.group_recorded(group, state.groups.snapshot(group).as_ref()) {
        return Ok(());
    }
    let (st, store, name) = (state.clone(), store.clone(), group.to_string());
    tokio::task::spawn_blocking(move || record_blocking(&st, &store, &name))
        .await
        .map_err(|e| PartitionError::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| PartitionError::new(e.code(), e.to_string()))
}

/// Writes `group`'s membership record if `store` is a coordinator's and its last record says
/// otherwise. Blocking.
fn record_blocking(
    state: &BrokerState,
    store: &OffsetStore,
    group: &str,
) -> Result<(), crate::offsets::OffsetsError> {
    if !store.is_coordinated() || store.group_recorded(group, state.groups.snapshot(group).as_ref()) {
        return Ok(());
    }
    store.record_group_blocking(group, || state.groups.snapshot(group))?;
    metrics::counter!("quiver_group_records_total").increment(1);
    Ok(())
}

/// Records the membership of `groups` that changed without a request (members whose session
/// expired or whose connection closed), so a coordinator taking over does not restore members
/// that were gone (they would own partitions again: seed 1215 delivered committed records to
/// such a member). Blocking; a failure is logged (the next change or request records it).
pub(crate) fn record_groups_blocking(state: &BrokerState, groups: &[String]) {
    for group in groups {
        let Locate::Here(store) = locate(state, group) else { continue };
        if let Err(e) = record_blocking(state, &store, group) {
            tracing::warn!(%group, "recording the group's membership failed: {e}");
        }
    }
}

/// Whether `name` is reserved for the broker's internal topics (refused to clients).
pub(crate) fn is_internal(name: &str) -> bool {
    name.starts_with("__")
}

/// The error a group request gets while no coordinator is known.
pub(crate) fn not_coordinator(group: &str) -> PartitionError {
    PartitionError::new(
        ErrorCode::NotCoordinator,
        format!("no coordinator of group '{group}' is known yet (an election is under way); retry"),
    )
}

/// The coordinator loop of a cluster broker (see the module's comment). Runs until shutdown.
pub(crate) async fn run(state: Arc<BrokerState>) {
    let Some(cluster) = state.cluster.clone() else { return };
    let me = cluster.node_id();
    let mut tick = tokio::time::interval(WATCH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut create_asked: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        let Ok(topic) = state.topics.get(OFFSETS_TOPIC) else {
            // The controller's leader creates the topic (once a second at most, until it exists).
            let leads = cluster.controller.status.borrow().leader == Some(me);
            if leads && create_asked.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                create_asked = Some(tokio::time::Instant::now());
                let c = cluster.clone();
                tokio::spawn(async move {
                    if let Err(e) = c
                        .create_offsets_topic(
                            OFFSETS_TOPIC,
                            OFFSETS_PARTITIONS,
                            OFFSETS_REPLICAS,
                            OFFSETS_SEGMENT_BYTES,
                        )
                        .await
                    {
                        tracing::debug!("creating {OFFSETS_TOPIC}: {e}");
                    }
                });
            }
            continue;
        };
        let partitions = topic.partitions.len() as u32;
        let coordinators = &state.coordinators;
        for p in &topic.partitions {
            let k = p.id;
            let status = cluster.group(OFFSETS_TOPIC, k).map(|(h, _)| h.status.borrow().clone());
            let leading = status
                .as_ref()
                .filter(|s| s.leader == Some(me) && s.ready && !s.stopped && p.is_replicated());
            match leading {
                Some(s) if coordinators.holds(k, s.term) => {}
                Some(s) if !high_watermark_covers(p, s.commit) => {} // read it a tick later
                Some(s) => {
                    depose(&state, k, partitions);
                    // Members are served only from the log's state: none from before.
                    state.groups.drop_groups(|g| partition_of(g, partitions) == k);
                    let term = s.term;
                    let deposed = Arc::new(AtomicBool::new(false));
                    let (partition, d) = (p.clone(), deposed.clone());
                    let runtime = tokio::runtime::Handle::current();
                    let started = std::time::Instant::now();
                    let opened = tokio::task::spawn_blocking(move || {
                        OffsetStore::open_replicated(partition, term, runtime, d)
                    })
                    .await;
                    match opened.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                        Ok(store) => {
                            // Ledgers of topics deleted since are not served (a compaction
                            // drops them for good).
                            let store = Arc::new(store);
                            store.forget_missing_topics(|t| state.topics.get(t).is_ok());
                            // Members carry on where the last coordinator left them (invariant 4);
                            // nothing a request made meanwhile (with a deposed store) stays.
                            state.groups.drop_groups(|g| partition_of(g, partitions) == k);
                            for (group, snapshot) in store.groups() {
                                state.groups.restore(&group, snapshot);
                            }
                            tracing::info!(
                                partition = k,
                                term,
                                groups = store.group_names().len(),
                                elapsed_ms = started.elapsed().as_millis() as u64,
                                "coordinating the groups of offsets partition {k}"
                            );
                            coordinators.loaded.insert(k, Loaded { term, store, deposed });
                            metrics::gauge!("quiver_coordinated_offsets_partitions")
                                .set(coordinators.loaded.len() as f64);
                        }
                        Err(e) => tracing::warn!(partition = k, "reading offsets partition {k}: {e}"),
                    }
                }
                None => depose(&state, k, partitions),
            }
        }
    }
}

/// Whether `p`'s high watermark covers every entry up to Raft index `commit` (the end of that
/// entry in the log): the state is read up to the high watermark, so a coordinator must not
/// read it while the watermark still lags the commit its readiness was judged by. (A group
/// record once went back five generations at a coordinator change: a read that stopped early
/// would do exactly that; this rules it out.)
fn high_watermark_covers(p: &crate::partition::Partition, commit: u64) -> bool {
    let end = p.shared_log().lock().offset_of_ordinal(commit + 1);
    match end {
        Ok(Some(end)) => p.high_watermark() >= end,
        // Compacted below the log start, or the log is shorter (then the watermark is its end).
        Ok(None) => true,
        Err(_) => false,
    }
}

/// Drops, on every replica of an offsets partition this broker does not coordinate, the
/// segments wholly below the last snapshot its coordinator completed (and that is committed):
/// what a coordinator's compaction does to its own log. Reads each partition's new committed
/// batches once (only the markers matter). Blocking.
pub(crate) fn compact_followers(state: &BrokerState) {
    let Ok(topic) = state.topics.get(OFFSETS_TOPIC) else { return };
    for p in &topic.partitions {
        if state.coordinators.loaded.contains_key(&p.id) || !p.is_replicated() {
            continue;
        }
        let mut followed = state.coordinators.followed.lock();
        let (from, last) = followed.get(&p.id).copied().unwrap_or((0, None));
        let from = from.max(p.log_start_offset());
        let hw = p.high_watermark();
        let (next, complete) = {
            let log = p.shared_log();
            let log = log.lock();
            crate::offsets::last_complete_snapshot(&log, from, hw)
        };
        let last = complete.or(last);
        followed.insert(p.id, (next, last));
        drop(followed);
        if let Some(begin) = last.filter(|&b| b > p.log_start_offset()) {
            match p.delete_segments_below_blocking(begin) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(
                    partition = p.id,
                    begin,
                    segments = n,
                    "offsets partition: dropped what a snapshot replaced"
                ),
                Err(e) => {
                    tracing::warn!(partition = p.id, "offsets partition: dropping compacted segments: {e}")
                }
            }
        }
    }
}

/// Where a group request is served.
pub(crate) enum Route {
    /// Here, with this store.
    Store(Arc<OffsetStore>),
    /// Elsewhere (forwarded to the coordinator), or refused: the answer.
    Answer(quiver_protocol::message::Message),
}

/// Where a group's request or subscription is served.
pub(crate) enum Resolved {
    Store(Arc<OffsetStore>),
    /// The coordinator, another broker: a request is forwarded there, a subscription's stream
    /// is handed there whole.
    Forward(u64),
    Refused(PartitionError),
}

/// The store serving a request of `group` (about `partition` of a topic, if it names one):
/// - on one node, the broker's own;
/// - the coordinator's, on the broker coordinating the group;
/// - a client's request or subscription elsewhere goes to the coordinator (`Forward`);
/// - a peer's request elsewhere is served from this broker's own store only when it is about
///   a partition the peer holds no replica of and this broker does (the coordinator handed that
///   partition's subscription or commit here, `remote.rs`), else refused `NotCoordinator`: a
///   peer forwards a group's requests only to the broker it took for the coordinator.
pub(crate) async fn resolve(
    state: &BrokerState,
    members: &crate::groups::ConnectionMembers,
    group: &str,
    partition: Option<(&str, u32)>,
) -> Resolved {
    let Some(cluster) = &state.cluster else { return Resolved::Store(state.offsets.clone()) };
    let peer = members.peer_node();
    let found = match peer {
        Some(_) => locate(state, group),
        None => locate_wait(state, group).await,
    };
    match (found, peer) {
        (Locate::Here(store), _) => Resolved::Store(store),
        (Locate::There(target), None) => Resolved::Forward(target),
        (Locate::Unknown, None) => Resolved::Refused(not_coordinator(group)),
        (_, Some(from)) => {
            let handed_here = match partition {
                Some((topic, p)) => cluster.partitions.get(&(topic.to_string(), p)).is_some_and(|e| {
                    !e.value().1.contains(&from) && e.value().1.contains(&cluster.node_id())
                }),
                // Offsets of a whole topic: the asking coordinator takes only the rows of the
                // partitions it holds no replica of (`Cluster::remote_offsets`).
                None => true,
            };
            match handed_here {
                true => Resolved::Store(state.offsets.clone()),
                false => Resolved::Refused(PartitionError::new(
                    ErrorCode::NotCoordinator,
                    format!(
                        "broker {} does not coordinate group '{group}' (any more); retry",
                        cluster.node_id()
                    ),
                )),
            }
        }
    }
}

/// [`resolve`] for a request: one for another broker is forwarded there (`request` builds it)
/// and its answer returned.
pub(crate) async fn route(
    state: &BrokerState,
    members: &crate::groups::ConnectionMembers,
    group: &str,
    partition: Option<(&str, u32)>,
    request: impl FnOnce() -> quiver_protocol::message::Message,
) -> Route {
    use quiver_protocol::message::Message;
    let refused = |e: PartitionError| Route::Answer(Message::error(e.code, e.message));
    match resolve(state, members, group, partition).await {
        Resolved::Store(store) => Route::Store(store),
        Resolved::Refused(e) => refused(e),
        Resolved::Forward(target) => {
            let Some(cluster) = &state.cluster else { return refused(not_coordinator(group)) };
            metrics::counter!("quiver_forwarded_group_requests_total").increment(1);
            match cluster.links.request(target, &request(), crate::cluster::FORWARD_TIMEOUT).await {
                Ok(answer) => Route::Answer(answer),
                Err(e) => refused(PartitionError::new(
                    ErrorCode::NotCoordinator,
                    format!(
                        "the coordinator of group '{group}', broker {target}, did not answer ({}); retry",
                        e.message
                    ),
                )),
            }
        }
    }
}
