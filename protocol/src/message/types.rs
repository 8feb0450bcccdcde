//! The structs and enums that frames carry.

use super::TopicConfig;

/// Where a subscription starts when it has no committed group offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    Earliest,
    Latest,
    Offset(u64),
    Timestamp(i64),
}

/// How much acknowledgement a producer waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// The broker answers without waiting for the append.
    None,
    /// The broker answers after the append is durable per the topic's durability on the
    /// leader (on a replicated topic: before a majority may have it).
    Leader,
    /// The broker answers once a majority of the partition's replicas have the batch durably
    /// (Raft's commit, docs/replication.md §3). The same as `Leader` on one node.
    All,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: u32,
    pub log_start_offset: u64,
    pub high_watermark: u64,
    /// The broker leading the partition, when known (always the answering broker on one node).
    pub leader: Option<u32>,
    /// The leader's Raft term (the batches' leader epoch); 0 on one node.
    pub epoch: u64,
    /// The brokers holding a replica (empty on one node).
    pub replicas: Vec<u32>,
}

/// One broker of a cluster as another sees it (`ClusterStatusOk`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerStatus {
    pub id: u32,
    pub addr: String,
    /// Whether the answering broker has a live link to it (itself: always).
    pub up: bool,
}

/// One partition's replication as the answering broker knows it (`ClusterStatusOk`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub topic: String,
    pub partition: u32,
    pub leader: Option<u32>,
    pub epoch: u64,
    pub replicas: Vec<u32>,
    /// Replicas whose log matches the leader's up to its commit (known on the leader; else
    /// what the answering broker last learned).
    pub in_sync: Vec<u32>,
    /// The Raft commit index (the batch ordinal up to which entries are committed).
    pub commit: u64,
    /// How many entries (batches) the replica furthest behind lacks of the leader's log (as the
    /// leader last knew; 0 when unknown).
    pub lag: u64,
}

/// One partition group as its leader (the sending broker) sees it (`Leaders`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderNotice {
    /// The Raft group (docs/replication.md §2b: derived from the topic's create).
    pub group: u64,
    pub term: u64,
    /// The Raft commit index.
    pub commit: u64,
    pub log_start_offset: u64,
    pub high_watermark: u64,
    pub in_sync: Vec<u32>,
    /// As `ReplicaStatus::lag`.
    pub lag: u64,
    /// The group's configuration as the leader applied it (voters and learners): a broker
    /// outside it whose replica was removed while it was down learns so from this
    /// (docs/replication.md §11).
    pub members: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub config: TopicConfig,
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub partition: u32,
    pub committed: Option<u64>,
    pub log_start_offset: u64,
    pub high_watermark: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub topic: String,
    pub partition: u32,
    pub group: Option<String>,
    /// The group member and the generation it was assigned the partition in (membership).
    pub member: Option<MemberRef>,
    pub start: StartPosition,
    pub window_messages: u32,
    pub window_bytes: u32,
    /// Redelivery and dead letters, applied by the broker (design.md §12).
    pub policy: RedeliveryPolicy,
    /// The group's position as its coordinator's replicated store has it, set only by a
    /// coordinator handing a group subscription to a replica of a partition it holds none of
    /// (docs/replication.md §10): the replica starts no lower. Ignored from clients.
    pub group_position: Option<u64>,
}

/// What the broker does with messages that are not acknowledged (design.md §12).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RedeliveryPolicy {
    /// Hand a message out again when it is not acknowledged within this; 0 = never (only
    /// nacks and new sessions redeliver).
    pub ack_wait_ms: u32,
    /// After this many deliveries a message goes to the dead-letter topic; 0 = unlimited.
    pub max_deliveries: u32,
    /// Where dead letters go; default `<topic>.dlq`.
    pub dead_letter_topic: Option<String>,
}

/// Records of a delivery handed out with the same delivery count (`DeliverSome`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRange {
    pub start: u64,
    pub end: u64,
    pub delivery_count: u32,
}

/// A group member as of a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRef {
    pub member_id: String,
    pub generation: u64,
}

/// One member of a group and what it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub member_id: String,
    pub partitions: Vec<u32>,
}

/// What an ACL rule applies to (docs/security.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AclResource {
    /// Topics whose name matches the rule's pattern.
    Topic,
    /// Consumer groups whose name matches the rule's pattern.
    Group,
    /// The cluster itself (ACL changes, broker membership); the pattern is `*`.
    Cluster,
}

impl AclResource {
    pub const ALL: [AclResource; 3] = [AclResource::Topic, AclResource::Group, AclResource::Cluster];

    pub fn name(self) -> &'static str {
        match self {
            AclResource::Topic => "topic",
            AclResource::Group => "group",
            AclResource::Cluster => "cluster",
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }
}

/// What an ACL rule allows (docs/security.md has the table of which request needs which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AclOperation {
    Produce,
    Consume,
    Commit,
    Create,
    Delete,
    Admin,
}

impl AclOperation {
    pub const ALL: [AclOperation; 6] = [
        AclOperation::Produce,
        AclOperation::Consume,
        AclOperation::Commit,
        AclOperation::Create,
        AclOperation::Delete,
        AclOperation::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AclOperation::Produce => "produce",
            AclOperation::Consume => "consume",
            AclOperation::Commit => "commit",
            AclOperation::Create => "create",
            AclOperation::Delete => "delete",
            AclOperation::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.name().eq_ignore_ascii_case(s.trim()))
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }
}

/// One permission: `principal` (or `*`, anyone authenticated) may do `operation` on the
/// resources of kind `resource` whose name matches `pattern` (a name, `prefix*`, or `*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AclRule {
    pub principal: String,
    pub resource: AclResource,
    pub pattern: String,
    pub operation: AclOperation,
}
