//! Consumer-group membership on the broker: a `GroupCoordinator` (the sans-IO state machine in
//! `protocol::group`) per group, fed from requests, a timer, and connection closes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use parking_lot::Mutex;
use quiver_protocol::group::{Assignment, GroupCoordinator, GroupError};
use quiver_protocol::limits::{
    DELETED_MEMBER_TTL_MS, MAX_DELETED_MEMBERS, MAX_GROUPS, MAX_MEMBERS_PER_CONNECTION,
    MAX_SESSION_TIMEOUT_MS, MIN_SESSION_TIMEOUT_MS, PRODUCER_ID_WINDOW,
};
use quiver_protocol::message::{validate_group_name, MemberInfo, MemberRef, Message};
use quiver_protocol::ErrorCode;

use crate::offsets::OffsetStore;
use crate::partition::PartitionError;
use crate::topics::Topics;

/// The members a connection speaks for; they leave when it closes, unless they have since
/// moved to another connection (a client that reconnected).
pub type ConnectionMembers = Arc<ConnectionInfo>;

#[derive(Debug, Default)]
pub struct ConnectionInfo {
    id: u64,
    /// At most `MAX_MEMBERS_PER_CONNECTION`.
    members: Mutex<Vec<(String, String)>>,
    /// Producer ids handed out on this connection in the current minute (at most
    /// `MAX_PRODUCER_IDS_PER_CONNECTION`), and when that minute began.
    producer_ids: Mutex<(Option<Instant>, u32)>,
    /// A connection from another broker of the cluster: what it forwards is served here, never
    /// forwarded again (two brokers could otherwise hand a request back and forth).
    peer: bool,
    /// The node id of that broker.
    peer_node: Option<u64>,
    /// Who the connection authenticated as (a client certificate's, or a token's in `Hello`);
    /// `None` while anonymous (docs/security.md).
    principal: parking_lot::RwLock<Option<Arc<str>>>,
    /// Set when the connection's credentials were refused: it is closed.
    refused: tokio_util::sync::CancellationToken,
    /// Admitted as the principal `anonymous` (`--allow-anonymous`), not authenticated as a
    /// principal of that name.
    anonymous: std::sync::atomic::AtomicBool,
}

impl ConnectionInfo {
    pub fn new(id: u64) -> Arc<Self> {
        Arc::new(ConnectionInfo { id, ..Default::default() })
    }

    /// A connection from another broker of the cluster.
    pub fn peer(id: u64, node: u64) -> Arc<Self> {
        Arc::new(ConnectionInfo { id, peer: true, peer_node: Some(node), ..Default::default() })
    }

    /// The node id of the broker at the other end, for a peer connection.
    pub fn peer_node(&self) -> Option<u64> {
        self.peer_node
    }

    pub fn is_peer(&self) -> bool {
        self.peer
    }

    /// Who the connection authenticated as, if it did.
    pub fn principal(&self) -> Option<Arc<str>> {
        self.principal.read().clone()
    }

    /// Marks the connection's credentials refused: the server closes it.
    pub fn refuse(&self) {
        self.refused.cancel();
    }

    /// Resolves once the connection's credentials were refused.
    pub async fn refused(&self) {
        self.refused.cancelled().await
    }

    /// Sets the principal; returns the one it had.
    pub fn replace_principal(&self, principal: Arc<str>) -> Option<Arc<str>> {
        self.principal.write().replace(principal)
    }

    /// Marks the connection as admitted anonymously (or, `false`, as authenticated).
    pub fn set_anonymous(&self, anonymous: bool) {
        self.anonymous.store(anonymous, std::sync::atomic::Ordering::Release);
    }

    /// Whether the connection was admitted anonymously.
    pub fn is_anonymous(&self) -> bool {
        self.anonymous.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Counts one more producer id for this connection at `now`; false once it obtained
    /// `MAX_PRODUCER_IDS_PER_CONNECTION` within the last minute. A rate, not a lifetime
    /// count: a long-lived producer takes a new id after every failed batch.
    pub fn take_producer_id(&self, now: Instant) -> bool {
        let mut w = self.producer_ids.lock();
        if w.0.is_none_or(|start| now.saturating_duration_since(start) >= PRODUCER_ID_WINDOW) {
            *w = (Some(now), 0);
        }
        if w.1 >= quiver_protocol::limits::MAX_PRODUCER_IDS_PER_CONNECTION {
            return false;
        }
        w.1 += 1;
        true
    }
}

/// Members of groups dropped because their topic was deleted, oldest first.
#[derive(Debug, Default)]
struct DeletedMembers {
    /// (group, member id) to the deleted topic.
    topic_of: HashMap<(String, String), Arc<str>>,
    /// When each was dropped (ms on the groups' clock).
    order: VecDeque<(u64, (String, String))>,
}

impl DeletedMembers {
    fn insert(&mut self, key: (String, String), topic: Arc<str>, now_ms: u64) {
        if self.topic_of.insert(key.clone(), topic).is_none() {
            self.order.push_back((now_ms, key));
        }
        while self.order.len() > MAX_DELETED_MEMBERS {
            self.pop_oldest();
        }
    }

    fn prune(&mut self, now_ms: u64) {
        while self.order.front().is_some_and(|(at, _)| now_ms.saturating_sub(*at) > DELETED_MEMBER_TTL_MS) {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_front() {
            self.topic_of.remove(&key);
        }
    }
}

/// Where group timeouts read the time. Monotonic, so a step of the wall clock neither expires
/// every member nor keeps dead ones; tests pass their own.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> Instant + Send + Sync>);

impl Clock {
    pub fn new(now: impl Fn() -> Instant + Send + Sync + 'static) -> Self {
        Clock(Arc::new(now))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new(Instant::now)
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

#[derive(Debug)]
pub struct Groups {
    clock: Clock,
    /// The coordinators count time in milliseconds since this instant.
    epoch: Instant,
    /// One lock per shard, not one for every group.
    groups: DashMap<String, GroupCoordinator>,
    /// Names of the groups the broker knows (members or committed offsets), to bound them by
    /// `MAX_GROUPS`; read from the offsets store at first use. It may still hold groups whose
    /// offsets were removed since: it is read again before a new group is refused.
    known: Mutex<Option<HashSet<Arc<str>>>>,
    /// When `known` was last read again at the limit: at most once a second, so a client
    /// naming new groups in a loop does not make every request scan the offsets store.
    recounted: Mutex<Option<Instant>>,
    /// Random per broker start: member ids from before a restart never match new ones.
    nonce: String,
    coordinators: std::sync::atomic::AtomicU64,
    /// Which connection each (group, member) last spoke on.
    member_connection: DashMap<(String, String), u64>,
    /// Members of groups dropped with their topic: their requests are answered `TopicDeleted`
    /// (final), so they end instead of rejoining a topic re-created under the name.
    deleted_members: Mutex<DeletedMembers>,
}

impl Default for Groups {
    fn default() -> Self {
        Groups::with_clock(Clock::default())
    }
}

impl Groups {
    /// Groups whose session timeouts follow `clock`.
    pub fn with_clock(clock: Clock) -> Self {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 6];
        let _ = ring::rand::SystemRandom::new().fill(&mut b);
        let nonce = b.iter().map(|x| format!("{x:02x}")).collect();
        let epoch = (clock.0)();
        Groups {
            clock,
            epoch,
            groups: Default::default(),
            known: Default::default(),
            recounted: Default::default(),
            nonce,
            coordinators: Default::default(),
            member_connection: Default::default(),
            deleted_members: Default::default(),
        }
    }

    /// Milliseconds on the monotonic clock, as the coordinators take the time.
    fn now_ms(&self) -> u64 {
        (self.clock.0)().saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Refuses a consumer or commit that does not own the partition now.
    pub fn check_owner(
        &self,
        group: &str,
        topic: &str,
        member: Option<&MemberRef>,
        partition: u32,
    ) -> Result<(), PartitionError> {
        let entry = self.groups.get(group);
        let live = entry.as_deref().filter(|g| !g.is_empty());
        if let (Some(g), Some(_)) = (live, member) {
            if g.topic() != topic {
                return Err(fenced(GroupError::TopicMismatch {
                    group_topic: g.topic().to_string(),
                    topic: topic.into(),
                }));
            }
        }
        match (live, member) {
            (Some(g), Some(m)) => {
                let checked = g.check_owner(&m.member_id, m.generation, partition);
                drop(entry);
                checked.map_err(|e| self.refused(group, &m.member_id, e))
            }
            (None, Some(m)) => {
                drop(entry);
                Err(self.refused(group, &m.member_id, GroupError::UnknownMember(m.member_id.clone())))
            }
            // Outside membership (admin tools, single consumers): only while the group has no
            // members, so a reset cannot pull offsets from under a live group.
            (Some(_), None) => Err(PartitionError::new(
                ErrorCode::FencedMember,
                format!("group '{group}' has active members; stop them first (offsets are reset and set from outside only while a group is empty)"),
            )),
            (None, None) => Ok(()),
        }
    }

    /// Why a request of `member_id` was refused: `TopicDeleted` if its group was dropped with
    /// its topic (member ids are never reused, so it cannot be a member of anything since),
    /// else what the coordinator said.
    fn refused(&self, group: &str, member_id: &str, e: GroupError) -> PartitionError {
        let key = (group.to_string(), member_id.to_string());
        match self.deleted_members.lock().topic_of.get(&key) {
            Some(topic) => {
                PartitionError::new(ErrorCode::TopicDeleted, format!("topic '{topic}' was deleted"))
            }
            None => fenced(e),
        }
    }

    /// `topic` was deleted: its groups go (members and all), and their members are told
    /// `TopicDeleted` when they next heartbeat, consume or commit. A member joining after
    /// this starts a new group (of a topic created again under the name). Called once the
    /// topic is out of the registry, under the topics' admin lock.
    pub fn topic_deleted(&self, topic: &str) {
        let now = self.now_ms();
        let mut dropped = Vec::new();
        self.groups.retain(|name, g| {
            if g.topic() != topic {
                return true;
            }
            dropped.extend(g.members().into_iter().map(|(member, _)| (name.clone(), member)));
            tracing::info!(group = %name, topic, "topic deleted; dropping its group");
            false
        });
        if dropped.is_empty() {
            return;
        }
        let topic: Arc<str> = Arc::from(topic);
        let mut deleted = self.deleted_members.lock();
        for key in dropped {
            self.member_connection.remove(&key);
            deleted.insert(key, topic.clone(), now);
        }
    }

    /// Drops the groups `pred` names, members and all (this broker stopped coordinating them, in
    /// a cluster): their members' next requests are refused as unknown, and they join again at
    /// the new coordinator.
    pub fn drop_groups(&self, pred: impl Fn(&str) -> bool) {
        let mut dropped = Vec::new();
        self.groups.retain(|name, g| {
            if !pred(name) {
                return true;
            }
            dropped.extend(g.members().into_iter().map(|(member, _)| (name.clone(), member)));
            false
        });
        for key in dropped {
            self.member_connection.remove(&key);
        }
        // Counted again from what is coordinated here at the next admission.
        *self.known.lock() = None;
    }

    /// Drops members whose session expired; returns the groups that changed (their membership
    /// records are due, `coordinator::record_groups_blocking`).
    pub fn expire(&self) -> Vec<String> {
        let now = self.now_ms();
        self.deleted_members.lock().prune(now);
        let mut changed = Vec::new();
        self.groups.retain(|name, g| {
            let expired = g.expire(now);
            for member in &expired {
                tracing::info!(group = %name, %member, "member session expired; rebalancing");
            }
            if !expired.is_empty() {
                changed.push(name.to_string());
            }
            // Empty groups live on only as committed offsets.
            !g.is_empty()
        });
        changed
    }

    /// A connection closed: its members leave at once. Returns the groups that changed.
    pub fn connection_closed(&self, conn: &ConnectionMembers) -> Vec<String> {
        let members = std::mem::take(&mut *conn.members.lock());
        let mut changed = Vec::new();
        for (group, member) in members {
            let key = (group.clone(), member.clone());
            if self.member_connection.remove_if(&key, |_, c| *c == conn.id).is_none() {
                continue; // it moved to another connection
            }
            if let Some(mut g) = self.groups.get_mut(&group) {
                if g.leave(&member) {
                    tracing::info!(%group, %member, "member's connection closed; rebalancing");
                    changed.push(group.to_string());
                }
            }
        }
        changed
    }

    /// Adds a member to `group` (creating the group), or re-joins one that still exists.
    pub fn join(
        &self,
        conn: &ConnectionMembers,
        group: &str,
        topic: &str,
        partitions: u32,
        member_id: Option<&str>,
        session_timeout_ms: u32,
    ) -> Result<Assignment, PartitionError> {
        let timeout = session_timeout_ms.clamp(MIN_SESSION_TIMEOUT_MS, MAX_SESSION_TIMEOUT_MS) as u64;
        self.has_room_for_a_member(conn)?;
        let now = self.now_ms();
        let prefix = || {
            let n = self.coordinators.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("{}-{n}", self.nonce)
        };
        let mut g = self
            .groups
            .entry(group.to_string())
            .or_insert_with(|| GroupCoordinator::new(topic, partitions, prefix()));
        if g.is_empty() && g.topic() != topic {
            // An empty group may move to another topic.
            *g = GroupCoordinator::new(topic, partitions, prefix());
        }
        let a = g.join(topic, member_id, timeout, now).map_err(fenced)?;
        drop(g);
        tracing::info!(%group, member = %a.member_id, generation = a.generation, partitions = ?a.partitions, "member joined");
        self.speaks_on(conn, group, &a.member_id);
        Ok(a)
    }

    /// A member is alive and has applied `generation`: what it owns now.
    pub fn heartbeat(
        &self,
        conn: &ConnectionMembers,
        group: &str,
        member_id: &str,
        generation: u64,
    ) -> Result<Assignment, PartitionError> {
        let now = self.now_ms();
        let beat = match self.groups.get_mut(group) {
            Some(mut g) => g.heartbeat(member_id, generation, now),
            None => Err(GroupError::UnknownMember(member_id.to_string())),
        };
        let a = beat.map_err(|e| self.refused(group, member_id, e))?;
        if self.has_room_for_a_member(conn).is_ok() || self.speaks_on_already(conn, group, member_id) {
            self.speaks_on(conn, group, member_id);
        } else {
            // It stays a member, but leaves only by its session, not when this connection closes.
            tracing::warn!(%group, member = %member_id, "connection speaks for too many members; not tracking this one");
        }
        Ok(a)
    }

    /// A member leaves the group (asked to, or it joined a topic deleted meanwhile).
    pub fn leave(&self, conn: &ConnectionMembers, group: &str, member_id: &str) {
        if let Some(mut g) = self.groups.get_mut(group) {
            g.leave(member_id);
        }
        conn.members.lock().retain(|(g, m)| !(g == group && m == member_id));
        self.member_connection.remove(&(group.to_string(), member_id.to_string()));
    }

    /// Records that a member speaks on this connection (joined, or heartbeated after a
    /// reconnect).
    fn speaks_on(&self, conn: &ConnectionMembers, group: &str, member: &str) {
        let key = (group.to_string(), member.to_string());
        let previous = self.member_connection.insert(key.clone(), conn.id);
        if previous != Some(conn.id) {
            conn.members.lock().push(key);
        }
    }

    fn speaks_on_already(&self, conn: &ConnectionMembers, group: &str, member: &str) -> bool {
        self.member_connection.get(&(group.to_string(), member.to_string())).is_some_and(|c| *c == conn.id)
    }

    /// Whether `conn` may speak for one more member: its list is pruned of members that left,
    /// expired or moved to another connection before it counts as full.
    fn has_room_for_a_member(&self, conn: &ConnectionMembers) -> Result<(), PartitionError> {
        let mut members = conn.members.lock();
        // A peer forwards the joins of all its clients' members (each client connection there
        // is bounded itself).
        if members.len() < MAX_MEMBERS_PER_CONNECTION || conn.is_peer() {
            return Ok(());
        }
        members.retain(|key| {
            self.member_connection.get(key).is_some_and(|c| *c == conn.id)
                && self.groups.get(&key.0).is_some_and(|g| g.contains(&key.1))
        });
        if members.len() < MAX_MEMBERS_PER_CONNECTION {
            return Ok(());
        }
        Err(PartitionError::new(
            ErrorCode::LimitExceeded,
            format!(
                "this connection already speaks for {MAX_MEMBERS_PER_CONNECTION} group members \
                 (MAX_MEMBERS_PER_CONNECTION); leave some groups or use another connection"
            ),
        ))
    }

    /// Admits `group` before the broker keeps anything for it (members, offsets, metrics):
    /// a group it knows always, a new one while it knows fewer than `MAX_GROUPS`. `stored`
    /// lists the groups with committed offsets.
    pub fn admit(&self, group: &str, stored: impl Fn() -> Vec<Arc<str>>) -> Result<(), PartitionError> {
        let mut known = self.known.lock();
        let known = known.get_or_insert_with(|| stored().into_iter().collect());
        if known.contains(group) {
            return Ok(());
        }
        if known.len() >= MAX_GROUPS {
            // Offsets of deleted topics (and so groups) may be gone: count again, at most once
            // a second.
            let mut recounted = self.recounted.lock();
            let now = (self.clock.0)();
            if recounted.is_none_or(|t| now.saturating_duration_since(t) >= std::time::Duration::from_secs(1))
            {
                *recounted = Some(now);
                *known = stored().into_iter().collect();
                known.extend(self.groups.iter().map(|g| Arc::from(g.key().as_str())));
                if known.contains(group) {
                    return Ok(());
                }
            }
            if known.len() >= MAX_GROUPS {
                return Err(PartitionError::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "the broker already has {MAX_GROUPS} consumer groups (MAX_GROUPS); \
                         cannot create group '{group}'"
                    ),
                ));
            }
        }
        known.insert(Arc::from(group));
        Ok(())
    }

    /// `group`'s membership as a coordinator must record it (`None`: no members).
    pub fn snapshot(&self, group: &str) -> Option<quiver_protocol::group::GroupSnapshot> {
        self.groups.get(group).filter(|g| !g.is_empty()).map(|g| g.snapshot())
    }

    /// Continues a group from its membership record (this broker became its coordinator): its
    /// members keep their ids, generation and partitions, and each has a whole session from
    /// now to reach this broker.
    pub fn restore(&self, group: &str, snapshot: quiver_protocol::group::GroupSnapshot) {
        let now = self.now_ms();
        let g = GroupCoordinator::restore(snapshot, now);
        tracing::info!(%group, generation = g.generation(), members = g.members().len(), "group continued from its membership record");
        self.groups.insert(group.to_string(), g);
    }

    /// Names of groups with members.
    pub fn names(&self) -> Vec<String> {
        self.groups.iter().filter(|g| !g.is_empty()).map(|g| g.key().clone()).collect()
    }
}

fn fenced(e: GroupError) -> PartitionError {
    let code = match e {
        GroupError::TopicMismatch { .. } => ErrorCode::InvalidGroup,
        GroupError::GroupFull { .. } => ErrorCode::LimitExceeded,
        _ => ErrorCode::FencedMember,
    };
    PartitionError::new(code, e.to_string())
}

/// Names of the groups with committed offsets.
pub(crate) fn stored_groups(offsets: &OffsetStore) -> Vec<Arc<str>> {
    offsets.all().into_iter().map(|((g, _, _), _)| g).collect()
}

fn assignment(a: Assignment) -> Message {
    Message::GroupAssignment { member_id: a.member_id, generation: a.generation, partitions: a.partitions }
}

/// Handles the group requests.
pub(crate) fn handle(
    groups: &Groups,
    topics: &Topics,
    offsets: &OffsetStore,
    msg: Message,
    conn: &ConnectionMembers,
) -> Result<Message, PartitionError> {
    match msg {
        Message::JoinGroup { group, topic, member_id, session_timeout_ms } => {
            validate_group_name(&group).map_err(|m| PartitionError::new(ErrorCode::InvalidGroup, m))?;
            let t = topics.get(&topic)?;
            let partitions = t.partitions.len() as u32;
            groups.admit(&group, || stored_groups(offsets))?;
            let a =
                groups.join(conn, &group, &topic, partitions, member_id.as_deref(), session_timeout_ms)?;
            // A delete removes the topic from the registry before it drops the topic's groups:
            // a join that raced it either was dropped with the group or sees the topic gone
            // (or another topic of the name) here, and must not stay in a group of it.
            if !topics.get(&topic).is_ok_and(|now| Arc::ptr_eq(&now, &t)) {
                groups.leave(conn, &group, &a.member_id);
                return Err(PartitionError::new(
                    ErrorCode::TopicDeleted,
                    format!("topic '{topic}' was deleted"),
                ));
            }
            Ok(assignment(a))
        }
        Message::Heartbeat { group, member_id, generation } => {
            Ok(assignment(groups.heartbeat(conn, &group, &member_id, generation)?))
        }
        Message::LeaveGroup { group, member_id } => {
            groups.leave(conn, &group, &member_id);
            Ok(Message::Done)
        }
        Message::DescribeGroup { group } => {
            let (topic, generation, members) = match groups.groups.get(&group) {
                Some(g) => (
                    g.topic().to_string(),
                    g.generation(),
                    g.members()
                        .into_iter()
                        .map(|(member_id, partitions)| MemberInfo { member_id, partitions })
                        .collect(),
                ),
                None => {
                    // A group known only by its committed offsets.
                    let topic = offsets
                        .all()
                        .into_iter()
                        .find(|((g, _, _), _)| &**g == group.as_str())
                        .map(|((_, t, _), _)| t.to_string())
                        .ok_or_else(|| {
                            PartitionError::new(ErrorCode::InvalidGroup, format!("unknown group '{group}'"))
                        })?;
                    (topic, 0, Vec::new())
                }
            };
            Ok(Message::GroupDescription { topic, generation, members })
        }
        other => Err(PartitionError::new(
            ErrorCode::UnexpectedKind,
            format!("kind {} is not a group request", other.kind()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;

    /// Groups on a clock that moves only when the test stores milliseconds into the counter.
    fn groups_with_manual_clock() -> (Groups, Arc<AtomicU64>) {
        let start = Instant::now();
        let elapsed_ms = Arc::new(AtomicU64::new(0));
        let clock = {
            let elapsed_ms = elapsed_ms.clone();
            Clock::new(move || start + Duration::from_millis(elapsed_ms.load(Ordering::Relaxed)))
        };
        (Groups::with_clock(clock), elapsed_ms)
    }

    /// Session expiry follows the monotonic clock the broker gives the groups: a member expires
    /// once that clock passed its session timeout without a heartbeat, whatever the wall clock
    /// does meanwhile (here it barely moves).
    #[test]
    fn sessions_expire_by_the_monotonic_clock() {
        let (groups, elapsed_ms) = groups_with_manual_clock();
        let conn = ConnectionInfo::new(1);
        let a = groups.join(&conn, "g", "t", 2, None, 1_000).expect("join");
        let b = groups.join(&conn, "g", "t", 2, None, 5_000).expect("join");

        elapsed_ms.store(900, Ordering::Relaxed);
        groups.expire();
        assert_eq!(groups.names(), vec!["g".to_string()]);
        groups.heartbeat(&conn, "g", &a.member_id, a.generation).expect("a is alive");

        // A's last heartbeat was at 900 ms; 1 s later it is gone, B (5 s) is not.
        elapsed_ms.store(1_950, Ordering::Relaxed);
        groups.expire();
        groups.heartbeat(&conn, "g", &b.member_id, b.generation).expect("b is alive");
        elapsed_ms.store(1_901 + 1_000, Ordering::Relaxed);
        groups.expire();
        let refused = groups.heartbeat(&conn, "g", &a.member_id, a.generation);
        assert!(matches!(refused, Err(ref e) if e.code == ErrorCode::FencedMember), "{refused:?}");
        groups.heartbeat(&conn, "g", &b.member_id, b.generation).expect("b is alive");
    }

    /// At most `MAX_GROUPS` groups; groups the broker has are always admitted, and groups whose
    /// offsets were removed since (a deleted topic) stop counting.
    #[test]
    fn producer_ids_per_connection_are_a_rate_not_a_lifetime_count() {
        let conn = ConnectionInfo::new(1);
        let t0 = Instant::now();
        for _ in 0..quiver_protocol::limits::MAX_PRODUCER_IDS_PER_CONNECTION {
            assert!(conn.take_producer_id(t0));
        }
        assert!(!conn.take_producer_id(t0 + Duration::from_secs(59)), "over the limit within a minute");
        assert!(conn.take_producer_id(t0 + PRODUCER_ID_WINDOW), "a new minute, new ids");
    }

    #[test]
    fn new_groups_beyond_the_limit_are_refused() {
        let (groups, elapsed_ms) = groups_with_manual_clock();
        let stored: Arc<Mutex<Vec<Arc<str>>>> =
            Arc::new(Mutex::new((0..MAX_GROUPS - 1).map(|i| Arc::from(format!("stored-{i}"))).collect()));
        let reads = AtomicU64::new(0);
        let list = || {
            reads.fetch_add(1, Ordering::Relaxed);
            stored.lock().clone()
        };
        groups.admit("stored-7", list).expect("a stored group");
        groups.admit("new-1", list).expect("the last place");
        stored.lock().push(Arc::from("new-1")); // it committed
        groups.admit("new-1", list).expect("known by now");
        let refused = groups.admit("new-2", list).expect_err("over the limit");
        assert_eq!(refused.code, ErrorCode::LimitExceeded);
        assert!(refused.message.contains("MAX_GROUPS"), "{}", refused.message);
        groups.admit("stored-8", list).expect("a stored group is still admitted");
        // A client naming new groups in a loop does not make each request read the store.
        let before = reads.load(Ordering::Relaxed);
        for i in 0..100 {
            groups.admit(&format!("loop-{i}"), list).expect_err("over the limit");
        }
        assert_eq!(reads.load(Ordering::Relaxed), before, "the store was read within a second");
        // A topic delete removed the offsets of half the groups: room again, a second later.
        stored.lock().truncate(MAX_GROUPS / 2);
        elapsed_ms.store(1_000, Ordering::Relaxed);
        groups.admit("new-2", list).expect("room after the offsets went");
    }

    /// A connection speaks for at most `MAX_MEMBERS_PER_CONNECTION` members; members that
    /// expired no longer count.
    #[test]
    fn a_connection_speaks_for_a_bounded_number_of_members() {
        let (groups, elapsed_ms) = groups_with_manual_clock();
        let conn = ConnectionInfo::new(1);
        for i in 0..MAX_MEMBERS_PER_CONNECTION {
            groups.join(&conn, &format!("g{i}"), "t", 1, None, 500).expect("join");
        }
        let refused = groups.join(&conn, "one-more", "t", 1, None, 500).expect_err("over the limit");
        assert_eq!(refused.code, ErrorCode::LimitExceeded);
        assert!(refused.message.contains("MAX_MEMBERS_PER_CONNECTION"), "{}", refused.message);
        // Another connection is not affected.
        groups.join(&ConnectionInfo::new(2), "one-more", "t", 1, None, 500).expect("join");
        elapsed_ms.store(1_000, Ordering::Relaxed);
        groups.expire();
        groups.join(&conn, "one-more", "t", 1, None, 500).expect("the expired members left");
        assert_eq!(conn.members.lock().len(), 1);
    }
    /// A deleted topic's groups go with it: their members, idle ones included, are told
    /// `TopicDeleted` (not fenced, which would make them join again) on their next heartbeat,
    /// consume or commit, also once a topic of the name exists again; a new member of the group
    /// starts a fresh group of the new topic. The broker forgets them after a while.
    #[test]
    fn members_of_a_deleted_topics_group_are_told_so() {
        let (groups, elapsed_ms) = groups_with_manual_clock();
        let conn = ConnectionInfo::new(1);
        let busy = groups.join(&conn, "g", "t", 1, None, 10_000).expect("join");
        let idle = groups.join(&conn, "g", "t", 1, None, 10_000).expect("join");
        let idle = groups.heartbeat(&conn, "g", &idle.member_id, idle.generation).expect("alive");
        assert!(idle.partitions.is_empty());
        let other = groups.join(&conn, "h", "other", 1, None, 10_000).expect("join");

        groups.topic_deleted("t");
        let deleted = |r: Result<Assignment, PartitionError>| match r {
            Err(e) => {
                assert_eq!((e.code, e.message.as_str()), (ErrorCode::TopicDeleted, "topic 't' was deleted"))
            }
            Ok(a) => panic!("still a member: {a:?}"),
        };
        deleted(groups.heartbeat(&conn, "g", &idle.member_id, idle.generation));
        deleted(groups.heartbeat(&conn, "g", &busy.member_id, busy.generation));
        assert_eq!(groups.names(), vec!["h".to_string()], "only the other topic's group is left");
        groups
            .heartbeat(&conn, "h", &other.member_id, other.generation)
            .expect("another topic's group stays");

        // The topic exists again and the group has a new member: the old ones are still told.
        let fresh = groups.join(&conn, "g", "t", 1, None, 10_000).expect("a new member");
        assert_eq!(fresh.generation, 1, "a fresh group");
        assert_eq!(fresh.partitions, vec![0]);
        deleted(groups.heartbeat(&conn, "g", &idle.member_id, fresh.generation));
        deleted(groups.heartbeat(&conn, "g", &busy.member_id, busy.generation));
        let refused = groups
            .check_owner("g", "t", Some(&MemberRef { member_id: busy.member_id.clone(), generation: 1 }), 0)
            .expect_err("not a member");
        assert_eq!(refused.code, ErrorCode::TopicDeleted);

        // Remembered for twice the longest session only.
        elapsed_ms.store(DELETED_MEMBER_TTL_MS + 1, Ordering::Relaxed);
        groups.expire();
        let refused = groups.heartbeat(&conn, "g", &idle.member_id, 1).expect_err("gone");
        assert_eq!(refused.code, ErrorCode::FencedMember);
        assert!(groups.deleted_members.lock().order.is_empty());
    }
}
