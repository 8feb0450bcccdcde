//! Consumer-group membership on the broker: a `GroupCoordinator` (the sans-IO state machine in
//! `protocol::group`) per group, fed from requests, a timer, and connection closes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use quiver_protocol::group::{Assignment, GroupCoordinator, GroupError};
use quiver_protocol::message::{validate_group_name, MemberInfo, MemberRef, Message};
use quiver_protocol::ErrorCode;

use crate::partition::PartitionError;
use crate::server::BrokerState;

/// The members a connection speaks for; they leave when it closes, unless they have since
/// moved to another connection (a client that reconnected).
pub type ConnectionMembers = Arc<ConnectionInfo>;

#[derive(Debug, Default)]
pub struct ConnectionInfo {
    id: u64,
    members: Mutex<Vec<(String, String)>>,
}

impl ConnectionInfo {
    pub fn new(id: u64) -> Arc<Self> {
        Arc::new(ConnectionInfo { id, members: Mutex::new(Vec::new()) })
    }
}

/// Session timeouts a member may ask for.
const MIN_SESSION_TIMEOUT_MS: u32 = 500;
const MAX_SESSION_TIMEOUT_MS: u32 = 300_000;

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
    groups: Mutex<HashMap<String, GroupCoordinator>>,
    /// Random per broker start: member ids from before a restart never match new ones.
    nonce: String,
    coordinators: std::sync::atomic::AtomicU64,
    /// Which connection each (group, member) last spoke on.
    member_connection: Mutex<HashMap<(String, String), u64>>,
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
            nonce,
            coordinators: Default::default(),
            member_connection: Default::default(),
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
        let groups = self.groups.lock();
        let live = groups.get(group).filter(|g| !g.is_empty());
        if let (Some(g), Some(_)) = (live, member) {
            if g.topic() != topic {
                return Err(fenced(GroupError::TopicMismatch {
                    group_topic: g.topic().to_string(),
                    topic: topic.into(),
                }));
            }
        }
        match (live, member) {
            (Some(g), Some(m)) => g.check_owner(&m.member_id, m.generation, partition).map_err(fenced),
            (None, Some(m)) => Err(fenced(GroupError::UnknownMember(m.member_id.clone()))),
            // Outside membership (admin tools, single consumers): only while the group has no
            // members, so a reset cannot pull offsets from under a live group.
            (Some(_), None) => Err(PartitionError::new(
                ErrorCode::FencedMember,
                format!("group '{group}' has active members; join it to consume or commit"),
            )),
            (None, None) => Ok(()),
        }
    }

    /// Drops members whose session expired.
    pub fn expire(&self) {
        let now = self.now_ms();
        let mut groups = self.groups.lock();
        for (name, g) in groups.iter_mut() {
            for member in g.expire(now) {
                tracing::info!(group = %name, %member, "member session expired; rebalancing");
            }
        }
        // Empty groups live on only as committed offsets.
        groups.retain(|_, g| !g.is_empty());
    }

    /// A connection closed: its members leave at once.
    pub fn connection_closed(&self, conn: &ConnectionMembers) {
        let members = std::mem::take(&mut *conn.members.lock());
        let mut groups = self.groups.lock();
        let mut owners = self.member_connection.lock();
        for (group, member) in members {
            let key = (group.clone(), member.clone());
            if owners.get(&key) != Some(&conn.id) {
                continue; // it moved to another connection
            }
            owners.remove(&key);
            if let Some(g) = groups.get_mut(&group) {
                if g.leave(&member) {
                    tracing::info!(%group, %member, "member's connection closed; rebalancing");
                }
            }
        }
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
        let now = self.now_ms();
        let mut map = self.groups.lock();
        let prefix = || {
            let n = self.coordinators.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("{}-{n}", self.nonce)
        };
        let g = map
            .entry(group.to_string())
            .or_insert_with(|| GroupCoordinator::new(topic, partitions, prefix()));
        if g.is_empty() && g.topic() != topic {
            // An empty group may move to another topic.
            *g = GroupCoordinator::new(topic, partitions, prefix());
        }
        let a = g.join(topic, member_id, timeout, now).map_err(fenced)?;
        drop(map);
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
        let mut map = self.groups.lock();
        let g = map.get_mut(group).ok_or_else(|| fenced(GroupError::UnknownMember(member_id.to_string())))?;
        let a = g.heartbeat(member_id, generation, now).map_err(fenced)?;
        drop(map);
        self.speaks_on(conn, group, member_id);
        Ok(a)
    }

    /// Records that a member speaks on this connection (joined, or heartbeated after a
    /// reconnect).
    fn speaks_on(&self, conn: &ConnectionMembers, group: &str, member: &str) {
        let key = (group.to_string(), member.to_string());
        let previous = self.member_connection.lock().insert(key.clone(), conn.id);
        if previous != Some(conn.id) {
            conn.members.lock().push(key);
        }
    }

    /// Names of groups with members.
    pub fn names(&self) -> Vec<String> {
        self.groups.lock().iter().filter(|(_, g)| !g.is_empty()).map(|(n, _)| n.clone()).collect()
    }
}

fn fenced(e: GroupError) -> PartitionError {
    let code = match e {
        GroupError::TopicMismatch { .. } => ErrorCode::InvalidGroup,
        _ => ErrorCode::FencedMember,
    };
    PartitionError::new(code, e.to_string())
}

fn assignment(a: Assignment) -> Message {
    Message::GroupAssignment { member_id: a.member_id, generation: a.generation, partitions: a.partitions }
}

/// Handles the group requests.
pub(crate) fn handle(
    state: &BrokerState,
    msg: Message,
    conn: &ConnectionMembers,
) -> Result<Message, PartitionError> {
    let groups = &state.groups;
    match msg {
        Message::JoinGroup { group, topic, member_id, session_timeout_ms } => {
            validate_group_name(&group).map_err(|m| PartitionError::new(ErrorCode::InvalidGroup, m))?;
            let partitions = state.topics.get(&topic)?.partitions.len() as u32;
            let a =
                groups.join(conn, &group, &topic, partitions, member_id.as_deref(), session_timeout_ms)?;
            Ok(assignment(a))
        }
        Message::Heartbeat { group, member_id, generation } => {
            Ok(assignment(groups.heartbeat(conn, &group, &member_id, generation)?))
        }
        Message::LeaveGroup { group, member_id } => {
            if let Some(g) = groups.groups.lock().get_mut(&group) {
                g.leave(&member_id);
            }
            conn.members.lock().retain(|(g, m)| !(g == &group && m == &member_id));
            groups.member_connection.lock().remove(&(group, member_id));
            Ok(Message::Done)
        }
        Message::ListGroups => {
            let mut names = groups.names();
            for ((g, _, _), _) in state.offsets.all() {
                names.push(g.to_string());
            }
            names.sort();
            names.dedup();
            Ok(Message::Groups(names))
        }
        Message::DescribeGroup { group } => {
            let map = groups.groups.lock();
            let (topic, generation, members) = match map.get(&group) {
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
                    let topic = state
                        .offsets
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

    /// Session expiry follows the monotonic clock the broker gives the groups: a member expires
    /// once that clock passed its session timeout without a heartbeat, whatever the wall clock
    /// does meanwhile (here it barely moves).
    #[test]
    fn sessions_expire_by_the_monotonic_clock() {
        let start = Instant::now();
        let elapsed_ms = Arc::new(AtomicU64::new(0));
        let clock = {
            let elapsed_ms = elapsed_ms.clone();
            Clock::new(move || start + Duration::from_millis(elapsed_ms.load(Ordering::Relaxed)))
        };
        let groups = Groups::with_clock(clock);
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
}
