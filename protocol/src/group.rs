//! The consumer-group coordinator of one group, as a sans-IO state machine (design.md §11).
//!
//! Inputs are `join`, `heartbeat`, `leave` and `expire`, each with the current time; outputs are
//! assignments. No clock, no IO: the broker drives it from requests and a timer, and tests
//! drive it directly.

use std::collections::{BTreeMap, BTreeSet};

use crate::limits::MAX_MEMBERS_PER_GROUP;

/// Why a member's request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("member {0} is not in the group (it left, or its session expired)")]
    UnknownMember(String),
    #[error("member {member} is fenced: its generation {generation} is stale (current {current})")]
    Fenced { member: String, generation: u64, current: u64 },
    #[error("partition {partition} is not assigned to member {member}")]
    NotOwner { member: String, partition: u32 },
    #[error("the group consumes topic '{group_topic}', not '{topic}'")]
    TopicMismatch { group_topic: String, topic: String },
    #[error("the group has {max} members, the most a group may have (MAX_MEMBERS_PER_GROUP)")]
    GroupFull { max: usize },
}

/// What a member owns now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub member_id: String,
    pub generation: u64,
    pub partitions: Vec<u32>,
}

#[derive(Debug, Clone)]
struct Member {
    session_timeout_ms: u64,
    last_seen_ms: u64,
    /// Partitions the member owns, with the generation it was given each in.
    owned: BTreeMap<u32, u64>,
    /// The newest generation the member has heartbeated with.
    seen_generation: u64,
}

/// A partition being taken from a member: it owned it in generations `since..at`.
#[derive(Debug, Clone)]
struct Revoking {
    from: String,
    /// The generation the member was given the partition in.
    since: u64,
    /// The generation of the revocation: from it on, the member no longer owns the partition.
    at: u64,
}

/// One group: its topic, members and who owns which partition.
#[derive(Debug, Clone)]
pub struct GroupCoordinator {
    topic: String,
    partitions: u32,
    generation: u64,
    members: BTreeMap<String, Member>,
    /// Partitions taken from a member that has not yet confirmed. Nobody else gets them until
    /// then.
    revoking: BTreeMap<u32, Revoking>,
    next_member: u64,
    /// Makes member ids unique across coordinators (and broker restarts), so a client that
    /// still holds an old id cannot pass for a new member with the same number.
    id_prefix: String,
}

/// What a group's coordinator must not forget when another takes over (docs/replication.md
/// §10, invariant 4): the whole state but the members' last heartbeat times, which are the
/// coordinator's own clock. The broker keeps it as a record of the group's offsets partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub topic: String,
    pub partitions: u32,
    pub generation: u64,
    pub next_member: u64,
    pub id_prefix: String,
    pub members: Vec<MemberSnapshot>,
    /// Partitions being revoked: (partition, from member, given in generation, revoked at).
    pub revoking: Vec<(u32, String, u64, u64)>,
}

/// One member in a [`GroupSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSnapshot {
    pub id: String,
    pub session_timeout_ms: u64,
    pub seen_generation: u64,
    /// (partition, the generation it was given in).
    pub owned: Vec<(u32, u64)>,
}

impl GroupCoordinator {
    /// The state another coordinator continues from ([`GroupCoordinator::restore`]).
    pub fn snapshot(&self) -> GroupSnapshot {
        GroupSnapshot {
            topic: self.topic.clone(),
            partitions: self.partitions,
            generation: self.generation,
            next_member: self.next_member,
            id_prefix: self.id_prefix.clone(),
            members: self
                .members
                .iter()
                .map(|(id, m)| MemberSnapshot {
                    id: id.clone(),
                    session_timeout_ms: m.session_timeout_ms,
                    // Only read to confirm a revocation from this member: without one pending
                    // it need not be kept, so a rebalance's heartbeats (each raising it) do not
                    // each change the record.
                    seen_generation: if self.revoking.values().any(|r| &r.from == id) {
                        m.seen_generation
                    } else {
                        0
                    },
                    owned: m.owned.iter().map(|(p, g)| (*p, *g)).collect(),
                })
                .collect(),
            revoking: self.revoking.iter().map(|(p, r)| (*p, r.from.clone(), r.since, r.at)).collect(),
        }
    }

    /// A group as `snapshot` left it, on another coordinator whose clock reads `now_ms`: every
    /// member's session starts again now (a member that died meanwhile expires one session
    /// later). Members keep their ids, generation and partitions, so no rebalance follows.
    pub fn restore(snapshot: GroupSnapshot, now_ms: u64) -> Self {
        GroupCoordinator {
            topic: snapshot.topic,
            partitions: snapshot.partitions,
            generation: snapshot.generation,
            next_member: snapshot.next_member,
            id_prefix: snapshot.id_prefix,
            members: snapshot
                .members
                .into_iter()
                .map(|m| {
                    let member = Member {
                        session_timeout_ms: m.session_timeout_ms,
                        last_seen_ms: now_ms,
                        owned: m.owned.into_iter().collect(),
                        seen_generation: m.seen_generation,
                    };
                    (m.id, member)
                })
                .collect(),
            revoking: snapshot
                .revoking
                .into_iter()
                .map(|(p, from, since, at)| (p, Revoking { from, since, at }))
                .collect(),
        }
    }

    /// `id_prefix` must differ between coordinators of the same group over time (the broker
    /// uses a random per-start nonce).
    pub fn new(topic: impl Into<String>, partitions: u32, id_prefix: impl Into<String>) -> Self {
        GroupCoordinator {
            id_prefix: id_prefix.into(),
            topic: topic.into(),
            partitions,
            generation: 0,
            members: BTreeMap::new(),
            revoking: BTreeMap::new(),
            next_member: 1,
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn contains(&self, member_id: &str) -> bool {
        self.members.contains_key(member_id)
    }

    /// Adds a member (or re-joins one that still exists) and rebalances.
    pub fn join(
        &mut self,
        topic: &str,
        member_id: Option<&str>,
        session_timeout_ms: u64,
        now_ms: u64,
    ) -> Result<Assignment, GroupError> {
        if topic != self.topic {
            return Err(GroupError::TopicMismatch {
                group_topic: self.topic.clone(),
                topic: topic.to_string(),
            });
        }
        let mut joined = false;
        let id = match member_id {
            Some(id) if self.members.contains_key(id) => id.to_string(),
            _ if self.members.len() >= MAX_MEMBERS_PER_GROUP => {
                return Err(GroupError::GroupFull { max: MAX_MEMBERS_PER_GROUP })
            }
            _ => {
                let id = format!("{}-{}", self.id_prefix, self.next_member);
                self.next_member += 1;
                joined = true;
                self.members.insert(
                    id.clone(),
                    Member {
                        session_timeout_ms,
                        last_seen_ms: now_ms,
                        owned: BTreeMap::new(),
                        seen_generation: 0,
                    },
                );
                id
            }
        };
        if let Some(m) = self.members.get_mut(&id) {
            m.last_seen_ms = now_ms;
            m.session_timeout_ms = session_timeout_ms;
        }
        self.rebalance(joined);
        Ok(self.assignment(&id))
    }

    /// A member is alive and has applied `generation`; returns what it owns now.
    pub fn heartbeat(
        &mut self,
        member_id: &str,
        generation: u64,
        now_ms: u64,
    ) -> Result<Assignment, GroupError> {
        if generation > self.generation {
            // A generation this coordinator never handed out: a stale client.
            return Err(GroupError::Fenced {
                member: member_id.to_string(),
                generation,
                current: self.generation,
            });
        }
        let m = self
            .members
            .get_mut(member_id)
            .ok_or_else(|| GroupError::UnknownMember(member_id.to_string()))?;
        m.last_seen_ms = now_ms;
        m.seen_generation = m.seen_generation.max(generation);
        let seen = m.seen_generation;
        // Revocations this member has now applied can be handed on.
        let confirmed: Vec<u32> = self
            .revoking
            .iter()
            .filter(|(_, r)| r.from == member_id && seen >= r.at)
            .map(|(p, _)| *p)
            .collect();
        if !confirmed.is_empty() {
            for p in confirmed {
                self.revoking.remove(&p);
            }
            self.rebalance(true);
        }
        Ok(self.assignment(member_id))
    }

    /// A member leaves (or its connection closed); its partitions are free at once.
    pub fn leave(&mut self, member_id: &str) -> bool {
        if self.members.remove(member_id).is_none() {
            return false;
        }
        self.revoking.retain(|_, r| r.from != member_id);
        self.rebalance(true);
        true
    }

    /// Removes members whose session expired; returns their ids.
    pub fn expire(&mut self, now_ms: u64) -> Vec<String> {
        let expired: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| now_ms.saturating_sub(m.last_seen_ms) > m.session_timeout_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.leave(id);
        }
        expired
    }

    /// Checks that `member` may consume or commit `partition` at `generation`: the member must
    /// have owned the partition in that generation and still hold it. It holds it while it owns
    /// it, and while it is being revoked from it until it confirms (so it can commit what it
    /// consumed); it owned it from the generation it was given it in (a member that lost it and
    /// got it back cannot use a generation from before) up to the current generation, or, while
    /// being revoked, up to the one before the revocation (design.md §11).
    pub fn check_owner(&self, member_id: &str, generation: u64, partition: u32) -> Result<(), GroupError> {
        let m =
            self.members.get(member_id).ok_or_else(|| GroupError::UnknownMember(member_id.to_string()))?;
        let owned_in = match (m.owned.get(&partition), self.revoking.get(&partition)) {
            (Some(&since), _) => since..=self.generation,
            (None, Some(r)) if r.from == member_id => r.since..=r.at.saturating_sub(1),
            _ => return Err(GroupError::NotOwner { member: member_id.to_string(), partition }),
        };
        if !owned_in.contains(&generation) {
            return Err(GroupError::Fenced {
                member: member_id.to_string(),
                generation,
                current: self.generation,
            });
        }
        Ok(())
    }

    /// (member, partitions) for every member, for describe.
    pub fn members(&self) -> Vec<(String, Vec<u32>)> {
        self.members.iter().map(|(id, m)| (id.clone(), m.owned.keys().copied().collect())).collect()
    }

    fn assignment(&self, member_id: &str) -> Assignment {
        Assignment {
            member_id: member_id.to_string(),
            generation: self.generation,
            partitions: self
                .members
                .get(member_id)
                .map(|m| m.owned.keys().copied().collect())
                .unwrap_or_default(),
        }
    }

    /// Sticky, cooperative: members keep up to their fair share; the surplus is revoked (and
    /// only handed on once confirmed); free partitions go to the members with the fewest.
    /// `changed`: the membership or the revocations changed, so the generation moves even if
    /// no partition does. Costs O(members + partitions) per free partition handed out, with no
    /// copies of the members.
    fn rebalance(&mut self, mut changed: bool) {
        let n = self.members.len() as u32;
        if n > 0 {
            let fair = self.partitions.div_ceil(n) as usize;
            // Revoke above the fair share.
            let next_generation = self.generation + 1;
            for (id, m) in self.members.iter_mut() {
                while m.owned.len() > fair {
                    if let Some((p, since)) = m.owned.pop_last() {
                        self.revoking.insert(p, Revoking { from: id.clone(), since, at: next_generation });
                        changed = true;
                    }
                }
            }
            // Hand out partitions nobody owns or is giving up.
            let owned: BTreeSet<u32> = self.members.values().flat_map(|m| m.owned.keys().copied()).collect();
            for p in 0..self.partitions {
                if owned.contains(&p) || self.revoking.contains_key(&p) {
                    continue;
                }
                if let Some(m) =
                    self.members.values_mut().filter(|m| m.owned.len() < fair).min_by_key(|m| m.owned.len())
                {
                    // Given in the generation this rebalance creates.
                    m.owned.insert(p, next_generation);
                    changed = true;
                }
            }
        }
        if changed {
            self.generation += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owners(g: &GroupCoordinator) -> BTreeMap<u32, String> {
        let mut out = BTreeMap::new();
        for (id, parts) in g.members() {
            for p in parts {
                assert!(out.insert(p, id.clone()).is_none(), "partition {p} owned twice");
            }
        }
        out
    }

    /// A restored group is the same group: same answers to the same requests, no rebalance,
    /// and new members get ids the old coordinator never issued.
    #[test]
    fn a_restored_group_carries_on_where_the_snapshot_left_it() {
        let mut g = GroupCoordinator::new("t", 4, "old");
        let a = g.join("t", None, 3000, 0).expect("join").member_id;
        g.heartbeat(&a, 0, 0).expect("hb");
        let b = g.join("t", None, 3000, 10).expect("join").member_id;
        let ha = g.heartbeat(&a, 0, 20).expect("hb"); // A gives up two: being revoked now
        let mut r = GroupCoordinator::restore(g.snapshot(), 1_000_000);
        assert_eq!(r.snapshot(), g.snapshot());
        assert_eq!(r.generation(), g.generation());
        for (x, y) in [(&mut g, 20), (&mut r, 1_000_020)] {
            let ha2 = x.heartbeat(&a, ha.generation, y).expect("hb");
            let hb = x.heartbeat(&b, ha2.generation, y).expect("hb");
            assert_eq!((ha2.partitions.len(), hb.partitions.len()), (2, 2));
        }
        assert_eq!(r.snapshot(), g.snapshot());
        // Sessions restart on the new clock: nobody expires at once.
        assert!(r.expire(1_000_020 + 2_999).is_empty());
        let c = r.join("t", None, 3000, 1_000_030).expect("join").member_id;
        assert!(c != a && c != b && c.starts_with("old-"), "{c}");
    }

    #[test]
    fn three_members_share_six_partitions_and_failover_moves_partitions() {
        let mut g = GroupCoordinator::new("t", 6, "member");
        let a = g.join("t", None, 3000, 0).expect("join").member_id;
        assert_eq!(g.heartbeat(&a, 0, 0).expect("hb").partitions.len(), 6);
        let b = g.join("t", None, 3000, 10).expect("join").member_id;
        // A must give up three first; B gets nothing until A confirms.
        let ha = g.heartbeat(&a, 0, 20).expect("hb");
        assert_eq!(ha.partitions.len(), 3);
        assert!(g.heartbeat(&b, 0, 20).expect("hb").partitions.is_empty());
        let ha = g.heartbeat(&a, ha.generation, 30).expect("hb");
        assert_eq!(g.heartbeat(&b, ha.generation, 30).expect("hb").partitions.len(), 3);
        let c = g.join("t", None, 3000, 40).expect("join").member_id;
        for _ in 0..3 {
            for m in [&a, &b, &c] {
                let gen = g.generation();
                g.heartbeat(m, gen, 50).expect("hb");
            }
        }
        for m in [&a, &b, &c] {
            assert_eq!(g.heartbeat(m, g.generation(), 60).expect("hb").partitions.len(), 2, "{m}");
        }
        owners(&g);
        // C dies: after its session its two partitions go to A and B.
        g.heartbeat(&a, g.generation(), 3000).expect("hb");
        g.heartbeat(&b, g.generation(), 3000).expect("hb");
        assert_eq!(g.expire(3100), vec![c.clone()]);
        assert_eq!(owners(&g).len(), 6);
        assert!(g.check_owner(&c, 1, 0).is_err());
    }

    #[test]
    fn a_partition_lost_and_regained_refuses_the_older_generation() {
        let mut g = GroupCoordinator::new("t", 2, "member");
        let a = g.join("t", None, 1000, 0).expect("join");
        assert_eq!(a.partitions, vec![0, 1]);
        let first = a.generation;
        let b = g.join("t", None, 1000, 0).expect("join").member_id;
        let ha = g.heartbeat(&a.member_id, g.generation(), 0).expect("hb");
        assert_eq!(ha.partitions, vec![0]);
        assert_eq!(g.heartbeat(&b, g.generation(), 0).expect("hb").partitions, vec![1]);
        g.leave(&b);
        let back = g.heartbeat(&a.member_id, g.generation(), 0).expect("hb");
        assert_eq!(back.partitions, vec![0, 1]);
        // Partition 0 never left A: its first generation is still good for it.
        assert!(g.check_owner(&a.member_id, first, 0).is_ok());
        // Partition 1 went to B and came back: only the generation that gave it back counts.
        assert!(matches!(g.check_owner(&a.member_id, first, 1), Err(GroupError::Fenced { .. })));
        assert!(g.check_owner(&a.member_id, back.generation, 1).is_ok());
    }

    #[test]
    fn fenced_and_unknown_members_are_refused() {
        let mut g = GroupCoordinator::new("t", 2, "member");
        let a = g.join("t", None, 1000, 0).expect("join");
        assert!(g.check_owner(&a.member_id, a.generation, 0).is_ok());
        assert!(matches!(g.check_owner("member-99", 1, 0), Err(GroupError::UnknownMember(_))));
        assert!(matches!(g.heartbeat(&a.member_id, a.generation + 5, 0), Err(GroupError::Fenced { .. })));
        assert!(matches!(g.heartbeat(&a.member_id, a.generation + 5, 0), Err(GroupError::Fenced { .. })));
        assert!(matches!(g.check_owner(&a.member_id, a.generation + 5, 0), Err(GroupError::Fenced { .. })));
        assert!(matches!(g.join("other", None, 1000, 0), Err(GroupError::TopicMismatch { .. })));
        g.leave(&a.member_id);
        assert!(g.check_owner(&a.member_id, a.generation, 0).is_err());
    }

    /// While a partition is being revoked its member may still commit it, but only with a
    /// generation in which it owned it: not one from before it was given the partition, nor
    /// one from the revocation on.
    #[test]
    fn a_revoking_member_passes_only_with_a_generation_it_owned_the_partition_in() {
        let mut g = GroupCoordinator::new("t", 2, "member");
        let a = g.join("t", None, 1000, 0).expect("join");
        assert_eq!((a.generation, a.partitions.clone()), (1, vec![0, 1]));
        // B takes partition 1 from A and gives it back: A owns it again since generation 4.
        let b = g.join("t", None, 1000, 0).expect("join").member_id;
        g.heartbeat(&a.member_id, g.generation(), 0).expect("hb"); // A confirms: 1 goes to B
        g.leave(&b);
        let regained = g.heartbeat(&a.member_id, g.generation(), 0).expect("hb");
        assert_eq!(regained.partitions, vec![0, 1]);
        let since = regained.generation;
        assert!(g.check_owner(&a.member_id, since, 1).is_ok());
        // C joins: partition 1 is being revoked from A, which has not confirmed yet.
        let c = g.join("t", None, 1000, 0).expect("join").member_id;
        let revoked_at = g.generation();
        assert!(revoked_at > since);
        assert!(g.heartbeat(&c, revoked_at, 0).expect("hb").partitions.is_empty());
        // A's generations in which it owned 1 pass ...
        for gen in since..revoked_at {
            assert!(g.check_owner(&a.member_id, gen, 1).is_ok(), "generation {gen}");
        }
        // ... one from before it got it back does not, nor the revocation's or a later one.
        for gen in [a.generation, since - 1, revoked_at, revoked_at + 1] {
            assert!(
                matches!(g.check_owner(&a.member_id, gen, 1), Err(GroupError::Fenced { .. })),
                "generation {gen}"
            );
        }
        // Nobody else passes for it while it is being revoked.
        assert!(matches!(g.check_owner(&c, revoked_at, 1), Err(GroupError::NotOwner { .. })));
        // Once A confirms, A is refused and C owns it.
        g.heartbeat(&a.member_id, revoked_at, 0).expect("hb");
        assert!(matches!(g.check_owner(&a.member_id, since, 1), Err(GroupError::NotOwner { .. })));
        let hc = g.heartbeat(&c, g.generation(), 0).expect("hb");
        assert_eq!(hc.partitions, vec![1]);
        assert!(g.check_owner(&c, hc.generation, 1).is_ok());
    }

    /// A group takes at most `MAX_MEMBERS_PER_GROUP` members; a rejoin of one it has still
    /// works, and a place frees up when one leaves.
    #[test]
    fn a_full_group_refuses_new_members() {
        let mut g = GroupCoordinator::new("t", 8, "member");
        let mut ids = Vec::new();
        for _ in 0..MAX_MEMBERS_PER_GROUP {
            ids.push(g.join("t", None, 1000, 0).expect("join").member_id);
        }
        assert_eq!(g.join("t", None, 1000, 0), Err(GroupError::GroupFull { max: MAX_MEMBERS_PER_GROUP }));
        assert!(g.join("t", Some(&ids[0]), 1000, 0).is_ok());
        g.leave(&ids[1]);
        assert!(g.join("t", None, 1000, 0).is_ok());
    }

    proptest! {
        /// Whatever the sequence of joins, heartbeats, leaves and expiries: no partition has two
        /// owners, and once everyone has heartbeated twice every partition has one.
        #[test]
        fn single_owner_and_eventually_complete(
            ops in proptest::collection::vec((0u8..4, 0usize..5), 1..60),
            partitions in 1u32..12,
        ) {
            let mut g = GroupCoordinator::new("t", partitions, "member");
            let mut ids: Vec<String> = Vec::new();
            let mut now = 0;
            for (op, who) in ops {
                now += 100;
                match op {
                    0 => ids.push(g.join("t", None, 1000, now).expect("join").member_id),
                    1 if !ids.is_empty() => {
                        let id = ids[who % ids.len()].clone();
                        let gen = g.generation();
                        let _ = g.heartbeat(&id, gen, now);
                    }
                    2 if !ids.is_empty() => {
                        let id = ids.remove(who % ids.len());
                        g.leave(&id);
                    }
                    _ => {
                        for id in g.expire(now) {
                            ids.retain(|i| *i != id);
                        }
                    }
                }
                owners(&g);
            }
            if !ids.is_empty() {
                for _ in 0..3 {
                    for id in &ids {
                        let gen = g.generation();
                        g.heartbeat(id, gen, now).expect("hb");
                    }
                }
                prop_assert_eq!(owners(&g).len() as u32, partitions);
            }
        }
    }
}
