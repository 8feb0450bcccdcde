//! Requests and responses (docs/design.md §4.3): one enum, one kind byte per variant.
//!
//! Encoding splits a frame into a head and an optional zero-copy tail, so that record batches
//! (always the last field) go to the socket without being copied into the frame buffer.
//!
//! One file per job: `types` (the structs and enums frames carry), `config` (topic settings,
//! also serialized to the on-disk `topic.json`), `encode`, `decode`, `heads` (the zero-copy
//! `Deliver`/`DeliverSome` heads the broker sends before cached batches), `validate` (name and
//! count checks).

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::DecodeError;
use crate::error::ErrorCode;
use crate::limits::MAX_STRING_BYTES;

mod config;
mod decode;
mod encode;
mod heads;
#[cfg(test)]
mod tests;
mod types;
mod validate;

pub use config::{Durability, TopicConfig};
pub use heads::{deliver_head, deliver_some_head};
pub use types::{
    Acks, AclOperation, AclResource, AclRule, BrokerStatus, DeliveryRange, LeaderNotice, MemberInfo,
    MemberRef, PartitionInfo, PartitionOffsets, RedeliveryPolicy, ReplicaStatus, StartPosition, Subscribe,
    TopicInfo,
};
use validate::truncate_utf8;
pub use validate::{validate_group_name, validate_partition_count, validate_principal, validate_topic_name};

/// Every frame payload, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Error {
        code: ErrorCode,
        message: String,
        /// With `NotLeader`: the broker that leads the partition, when the answering broker
        /// knows it (encoded last, optional: older peers' frames end before it).
        leader: Option<u32>,
    },
    Hello {
        protocol_version: u16,
        client_id: String,
        /// A token authenticating the connection (docs/security.md); encoded last, only when
        /// set.
        token: Option<String>,
    },
    HelloOk {
        protocol_version: u16,
        broker_id: u32,
        server_version: String,
        /// Who the broker takes the connection for, once authentication is on (encoded last,
        /// only when set).
        principal: Option<String>,
    },
    Produce {
        topic: String,
        partition: u32,
        acks: Acks,
        batch: Bytes,
    },
    ProduceOk {
        base_offset: u64,
        log_append_time_ms: i64,
    },
    Subscribe(Subscribe),
    Subscribed {
        start_offset: u64,
        log_start_offset: u64,
        high_watermark: u64,
    },
    Deliver {
        high_watermark: u64,
        batches: Bytes,
    },
    Ack {
        next_offset: u64,
    },
    /// A delivery in which only the listed records are handed out, with their delivery counts
    /// (redeliveries, and batches with acknowledged records to skip).
    DeliverSome {
        high_watermark: u64,
        ranges: Vec<DeliveryRange>,
        batches: Bytes,
    },
    /// Everything below `floor` is acknowledged, and so are the ranges above it.
    AckRanges {
        floor: u64,
        ranges: Vec<std::ops::Range<u64>>,
    },
    /// Hand this message out again after `delay_ms`.
    Nack {
        offset: u64,
        delay_ms: u32,
    },
    /// The broker settled these offsets itself (dead-lettered): count them as acknowledged.
    Settled {
        ranges: Vec<std::ops::Range<u64>>,
    },
    Fetch {
        topic: String,
        partition: u32,
        offset: u64,
        max_bytes: u32,
    },
    FetchOk {
        log_start_offset: u64,
        high_watermark: u64,
        batches: Bytes,
    },
    CommitOffset {
        group: String,
        topic: String,
        partition: u32,
        offset: u64,
        member: Option<MemberRef>,
        /// Set the offset even below the current one (an administrative reset of an empty
        /// group); otherwise a commit only moves the group forward.
        reset: bool,
    },
    CommitOk,
    FetchOffsets {
        group: String,
        topic: String,
    },
    Offsets(Vec<PartitionOffsets>),
    Metadata {
        topic: Option<String>,
    },
    MetadataOk(Vec<TopicInfo>),
    CreateTopic {
        name: String,
        partitions: u32,
        config: TopicConfig,
    },
    DeleteTopic {
        name: String,
    },
    Done,
    /// Asks for a producer id for idempotent produce.
    InitProducer,
    InitProducerOk {
        producer_id: i64,
        producer_epoch: i16,
    },
    JoinGroup {
        group: String,
        topic: String,
        member_id: Option<String>,
        session_timeout_ms: u32,
    },
    Heartbeat {
        group: String,
        member_id: String,
        generation: u64,
    },
    GroupAssignment {
        member_id: String,
        generation: u64,
        partitions: Vec<u32>,
    },
    LeaveGroup {
        group: String,
        member_id: String,
    },
    ListGroups,
    Groups(Vec<String>),
    DescribeGroup {
        group: String,
    },
    GroupDescription {
        topic: String,
        generation: u64,
        members: Vec<MemberInfo>,
    },
    /// The first offset whose batch has a timestamp at or after `timestamp_ms` (the time
    /// index), or the high watermark.
    OffsetForTime {
        topic: String,
        partition: u32,
        timestamp_ms: i64,
    },
    OffsetIs {
        offset: u64,
    },
    /// Asks a broker of a cluster what it knows of the brokers and the partitions' replicas.
    ClusterStatus,
    ClusterStatusOk {
        brokers: Vec<BrokerStatus>,
        partitions: Vec<ReplicaStatus>,
    },
    /// One Raft message between brokers (protocol::raft's encoding), on broker-to-broker
    /// connections only (mutual TLS, docs/replication.md §5).
    Raft {
        payload: Bytes,
    },
    /// What a broker leading partitions tells the brokers that hold no replica of them
    /// (broker-to-broker only): they answer metadata and route requests from it.
    Leaders {
        notices: Vec<LeaderNotice>,
    },
    /// A broker asks the controller's leader to reserve the next block of producer-id counters
    /// for it (broker-to-broker only; answered `Done` once committed).
    ReserveProducerIds {
        broker: u32,
    },
    /// Changes the cluster's brokers, one at a time (docs/replication.md §11): adds broker
    /// `add` (id, `HOST:PORT`) or removes broker `remove`; answered `Done` once the controller
    /// committed the new set (the partitions then move on their own).
    ChangeBrokers {
        add: Option<(u32, String)>,
        remove: Option<u32>,
    },
    /// Adds (`add`) or removes ACL rules; answered `Done` once in effect (in a cluster, once
    /// the controller committed the change and this broker applied it). Needs `admin` on the
    /// cluster.
    ChangeAcls {
        add: bool,
        rules: Vec<AclRule>,
    },
    /// Asks for every ACL rule; answered `AclList`. Needs `admin` on the cluster.
    ListAcls,
    AclList(Vec<AclRule>),
}

/// Why a frame's payload could not become a `Message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed frame of kind {kind}: {source}")]
    Malformed { kind: u8, source: DecodeError },
}

impl MessageError {
    pub fn code(&self) -> ErrorCode {
        match self {
            MessageError::UnknownKind(_) => ErrorCode::UnknownKind,
            MessageError::Malformed { .. } => ErrorCode::Malformed,
        }
    }
}

/// An encoded frame: `head` then `tail` on the wire. `tail` is the zero-copy batch field.
#[derive(Debug, Clone, Default)]
pub struct Encoded {
    pub head: Bytes,
    pub tail: Bytes,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Both parts in one buffer (for tests and small frames).
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.len());
        b.put_slice(&self.head);
        b.put_slice(&self.tail);
        b.freeze()
    }
}

mod kind {
    pub const ERROR: u8 = 0;
    pub const HELLO: u8 = 1;
    pub const HELLO_OK: u8 = 2;
    pub const PRODUCE: u8 = 3;
    pub const PRODUCE_OK: u8 = 4;
    pub const SUBSCRIBE: u8 = 5;
    pub const SUBSCRIBED: u8 = 6;
    pub const DELIVER: u8 = 7;
    pub const ACK: u8 = 8;
    pub const FETCH: u8 = 9;
    pub const FETCH_OK: u8 = 10;
    pub const COMMIT_OFFSET: u8 = 11;
    pub const COMMIT_OK: u8 = 12;
    pub const FETCH_OFFSETS: u8 = 13;
    pub const OFFSETS: u8 = 14;
    pub const METADATA: u8 = 15;
    pub const METADATA_OK: u8 = 16;
    pub const CREATE_TOPIC: u8 = 17;
    pub const DELETE_TOPIC: u8 = 18;
    pub const DONE: u8 = 21;
    pub const INIT_PRODUCER: u8 = 22;
    pub const INIT_PRODUCER_OK: u8 = 23;
    pub const JOIN_GROUP: u8 = 24;
    pub const HEARTBEAT: u8 = 25;
    pub const GROUP_ASSIGNMENT: u8 = 26;
    pub const LEAVE_GROUP: u8 = 27;
    pub const LIST_GROUPS: u8 = 28;
    pub const GROUPS: u8 = 29;
    pub const DESCRIBE_GROUP: u8 = 30;
    pub const GROUP_DESCRIPTION: u8 = 31;
    pub const OFFSET_FOR_TIME: u8 = 32;
    pub const OFFSET_IS: u8 = 33;
    pub const DELIVER_SOME: u8 = 34;
    pub const ACK_RANGES: u8 = 35;
    pub const NACK: u8 = 36;
    pub const SETTLED: u8 = 37;
    pub const CLUSTER_STATUS: u8 = 38;
    pub const CLUSTER_STATUS_OK: u8 = 39;
    pub const RAFT: u8 = 40;
    pub const LEADERS: u8 = 41;
    pub const RESERVE_PRODUCER_IDS: u8 = 42;
    pub const CHANGE_BROKERS: u8 = 43;
    pub const CHANGE_ACLS: u8 = 44;
    pub const LIST_ACLS: u8 = 45;
    pub const ACL_LIST: u8 = 46;
}

impl Message {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        truncate_utf8(&mut message, MAX_STRING_BYTES);
        Message::Error { code, message, leader: None }
    }

    /// `NotLeader` (or another error) naming the partition's leader, when known.
    pub fn error_with_leader(code: ErrorCode, message: impl Into<String>, leader: Option<u32>) -> Self {
        match Message::error(code, message) {
            Message::Error { code, message, .. } => Message::Error { code, message, leader },
            other => other,
        }
    }

    pub fn kind(&self) -> u8 {
        use Message::*;
        match self {
            Error { .. } => kind::ERROR,
            Hello { .. } => kind::HELLO,
            HelloOk { .. } => kind::HELLO_OK,
            Produce { .. } => kind::PRODUCE,
            ProduceOk { .. } => kind::PRODUCE_OK,
            Subscribe(_) => kind::SUBSCRIBE,
            Subscribed { .. } => kind::SUBSCRIBED,
            Deliver { .. } => kind::DELIVER,
            Ack { .. } => kind::ACK,
            DeliverSome { .. } => kind::DELIVER_SOME,
            AckRanges { .. } => kind::ACK_RANGES,
            Nack { .. } => kind::NACK,
            Settled { .. } => kind::SETTLED,
            Fetch { .. } => kind::FETCH,
            FetchOk { .. } => kind::FETCH_OK,
            CommitOffset { .. } => kind::COMMIT_OFFSET,
            CommitOk => kind::COMMIT_OK,
            FetchOffsets { .. } => kind::FETCH_OFFSETS,
            Offsets(_) => kind::OFFSETS,
            Metadata { .. } => kind::METADATA,
            MetadataOk(_) => kind::METADATA_OK,
            CreateTopic { .. } => kind::CREATE_TOPIC,
            DeleteTopic { .. } => kind::DELETE_TOPIC,
            Done => kind::DONE,
            InitProducer => kind::INIT_PRODUCER,
            InitProducerOk { .. } => kind::INIT_PRODUCER_OK,
            JoinGroup { .. } => kind::JOIN_GROUP,
            Heartbeat { .. } => kind::HEARTBEAT,
            GroupAssignment { .. } => kind::GROUP_ASSIGNMENT,
            LeaveGroup { .. } => kind::LEAVE_GROUP,
            ListGroups => kind::LIST_GROUPS,
            Groups(_) => kind::GROUPS,
            DescribeGroup { .. } => kind::DESCRIBE_GROUP,
            GroupDescription { .. } => kind::GROUP_DESCRIPTION,
            OffsetForTime { .. } => kind::OFFSET_FOR_TIME,
            OffsetIs { .. } => kind::OFFSET_IS,
            ClusterStatus => kind::CLUSTER_STATUS,
            ClusterStatusOk { .. } => kind::CLUSTER_STATUS_OK,
            Raft { .. } => kind::RAFT,
            Leaders { .. } => kind::LEADERS,
            ReserveProducerIds { .. } => kind::RESERVE_PRODUCER_IDS,
            ChangeBrokers { .. } => kind::CHANGE_BROKERS,
            ChangeAcls { .. } => kind::CHANGE_ACLS,
            ListAcls => kind::LIST_ACLS,
            AclList(_) => kind::ACL_LIST,
        }
    }
}
