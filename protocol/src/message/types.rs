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
    /// The broker answers after the append is durable per the topic's durability.
    Leader,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: u32,
    pub log_start_offset: u64,
    pub high_watermark: u64,
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
