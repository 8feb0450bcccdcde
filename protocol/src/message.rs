//! Requests and responses (docs/design.md §4.3): one enum, one kind byte per variant.
//!
//! Encoding splits a frame into a head and an optional zero-copy tail, so that record batches
//! (always the last field) go to the socket without being copied into the frame buffer.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{DecodeError, Reader, WriteExt};
use crate::error::ErrorCode;
use crate::frame::{put_header, RawFrame};
use crate::limits::{
    MAX_BATCH_BYTES, MAX_FRAME_BYTES, MAX_PARTITIONS, MAX_STRING_BYTES, MAX_TOPIC_NAME_BYTES,
};

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

/// When appended data is synced to disk (docs/design.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync before acknowledging, with group commit.
    Always,
    /// fsync every `flush_interval_ms`; acknowledgements do not wait.
    Interval,
    /// Never sync explicitly.
    Os,
}

/// Per-topic settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopicConfig {
    pub retention_bytes: Option<u64>,
    pub retention_ms: Option<u64>,
    pub segment_bytes: u64,
    pub segment_ms: u64,
    pub durability: Durability,
    pub flush_interval_ms: u32,
}

impl TopicConfig {
    /// Checks every setting against its named limit (docs/design.md §2); the broker refuses a
    /// topic whose config fails this, before anything is created.
    pub fn validate(&self) -> Result<(), String> {
        use crate::limits::{MAX_SEGMENT_BYTES, MIN_SEGMENT_BYTES};
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(format!(
                "segment_bytes must be {MIN_SEGMENT_BYTES} to {MAX_SEGMENT_BYTES}, got {}",
                self.segment_bytes
            ));
        }
        if self.segment_ms == 0 {
            return Err("segment_ms must be at least 1".into());
        }
        Ok(())
    }
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            retention_bytes: None,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            segment_bytes: 256 * 1024 * 1024,
            segment_ms: 7 * 24 * 3600 * 1000,
            durability: Durability::Always,
            flush_interval_ms: 1000,
        }
    }
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

/// Every frame payload, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Error {
        code: ErrorCode,
        message: String,
    },
    Hello {
        protocol_version: u16,
        client_id: String,
    },
    HelloOk {
        protocol_version: u16,
        broker_id: u32,
        server_version: String,
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
}

impl Message {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        truncate_utf8(&mut message, MAX_STRING_BYTES);
        Message::Error { code, message }
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
        }
    }

    /// Encodes the whole frame, header included. Strings longer than their limit are a caller
    /// bug for names (validated before) and are truncated for free text.
    pub fn encode(&self) -> Encoded {
        let mut b = BytesMut::with_capacity(64);
        let tail = self.encode_payload(&mut b);
        let mut head = BytesMut::with_capacity(6 + b.len());
        put_header(&mut head, self.kind(), b.len() + tail.len());
        head.put_slice(&b);
        Encoded { head: head.freeze(), tail }
    }

    fn encode_payload(&self, b: &mut BytesMut) -> Bytes {
        use Message::*;
        match self {
            Error { code, message } => {
                b.put_u16_le(code.code());
                b.put_string(message);
            }
            Hello { protocol_version, client_id } => {
                b.put_u16_le(*protocol_version);
                b.put_string(client_id);
            }
            HelloOk { protocol_version, broker_id, server_version } => {
                b.put_u16_le(*protocol_version);
                b.put_u32_le(*broker_id);
                b.put_string(server_version);
            }
            Produce { topic, partition, acks, batch } => {
                b.put_string(topic);
                b.put_u32_le(*partition);
                b.put_u8(matches!(acks, Acks::Leader) as u8);
                b.put_u32_le(batch.len() as u32);
                return batch.clone();
            }
            ProduceOk { base_offset, log_append_time_ms } => {
                b.put_u64_le(*base_offset);
                b.put_i64_le(*log_append_time_ms);
            }
            Subscribe(s) => {
                b.put_string(&s.topic);
                b.put_u32_le(s.partition);
                put_option(b, s.group.as_deref(), |b, g| b.put_string(g));
                put_start(b, s.start);
                b.put_u32_le(s.window_messages);
                b.put_u32_le(s.window_bytes);
                put_member(b, s.member.as_ref());
                b.put_u32_le(s.policy.ack_wait_ms);
                b.put_u32_le(s.policy.max_deliveries);
                put_option(b, s.policy.dead_letter_topic.as_deref(), |b, t| b.put_string(t));
            }
            Subscribed { start_offset, log_start_offset, high_watermark } => {
                b.put_u64_le(*start_offset);
                b.put_u64_le(*log_start_offset);
                b.put_u64_le(*high_watermark);
            }
            Deliver { high_watermark, batches } => {
                b.put_u64_le(*high_watermark);
                b.put_u32_le(batches.len() as u32);
                return batches.clone();
            }
            Ack { next_offset } => b.put_u64_le(*next_offset),
            DeliverSome { high_watermark, ranges, batches } => {
                put_deliver_some(b, *high_watermark, ranges, batches.len());
                return batches.clone();
            }
            AckRanges { floor, ranges } => {
                b.put_u64_le(*floor);
                put_ranges(b, ranges);
            }
            Nack { offset, delay_ms } => {
                b.put_u64_le(*offset);
                b.put_u32_le(*delay_ms);
            }
            Settled { ranges } => put_ranges(b, ranges),
            Fetch { topic, partition, offset, max_bytes } => {
                b.put_string(topic);
                b.put_u32_le(*partition);
                b.put_u64_le(*offset);
                b.put_u32_le(*max_bytes);
            }
            FetchOk { log_start_offset, high_watermark, batches } => {
                b.put_u64_le(*log_start_offset);
                b.put_u64_le(*high_watermark);
                b.put_u32_le(batches.len() as u32);
                return batches.clone();
            }
            CommitOffset { group, topic, partition, offset, member, reset } => {
                b.put_string(group);
                b.put_string(topic);
                b.put_u32_le(*partition);
                b.put_u64_le(*offset);
                put_member(b, member.as_ref());
                b.put_u8(u8::from(*reset));
            }
            CommitOk | Done | InitProducer | ListGroups => {}
            JoinGroup { group, topic, member_id, session_timeout_ms } => {
                b.put_string(group);
                b.put_string(topic);
                put_option(b, member_id.as_deref(), |b, m| b.put_string(m));
                b.put_u32_le(*session_timeout_ms);
            }
            Heartbeat { group, member_id, generation } => {
                b.put_string(group);
                b.put_string(member_id);
                b.put_u64_le(*generation);
            }
            GroupAssignment { member_id, generation, partitions } => {
                b.put_string(member_id);
                b.put_u64_le(*generation);
                put_u32s(b, partitions);
            }
            LeaveGroup { group, member_id } => {
                b.put_string(group);
                b.put_string(member_id);
            }
            Groups(names) => {
                b.put_u32_le(names.len() as u32);
                for n in names {
                    b.put_string(n);
                }
            }
            DescribeGroup { group } => b.put_string(group),
            OffsetForTime { topic, partition, timestamp_ms } => {
                b.put_string(topic);
                b.put_u32_le(*partition);
                b.put_i64_le(*timestamp_ms);
            }
            OffsetIs { offset } => b.put_u64_le(*offset),
            GroupDescription { topic, generation, members } => {
                b.put_string(topic);
                b.put_u64_le(*generation);
                b.put_u32_le(members.len() as u32);
                for m in members {
                    b.put_string(&m.member_id);
                    put_u32s(b, &m.partitions);
                }
            }
            InitProducerOk { producer_id, producer_epoch } => {
                b.put_i64_le(*producer_id);
                b.put_u16_le(*producer_epoch as u16);
            }
            FetchOffsets { group, topic } => {
                b.put_string(group);
                b.put_string(topic);
            }
            Offsets(list) => {
                b.put_u32_le(list.len() as u32);
                for p in list {
                    b.put_u32_le(p.partition);
                    put_option(b, p.committed, |b, c| b.put_u64_le(c));
                    b.put_u64_le(p.log_start_offset);
                    b.put_u64_le(p.high_watermark);
                }
            }
            Metadata { topic } => put_option(b, topic.as_deref(), |b, t| b.put_string(t)),
            MetadataOk(topics) => {
                b.put_u32_le(topics.len() as u32);
                for t in topics {
                    b.put_string(&t.name);
                    put_config(b, &t.config);
                    b.put_u32_le(t.partitions.len() as u32);
                    for p in &t.partitions {
                        b.put_u32_le(p.partition);
                        b.put_u64_le(p.log_start_offset);
                        b.put_u64_le(p.high_watermark);
                    }
                }
            }
            CreateTopic { name, partitions, config } => {
                b.put_string(name);
                b.put_u32_le(*partitions);
                put_config(b, config);
            }
            DeleteTopic { name } => b.put_string(name),
        }
        Bytes::new()
    }

    /// Decodes a frame's payload. Never panics; never allocates from an unchecked length.
    pub fn decode(frame: RawFrame) -> Result<Message, MessageError> {
        let kind = frame.kind;
        let mut r = Reader::new(frame.payload);
        let msg = decode_payload(kind, &mut r).map_err(|e| match e {
            Decoded::Unknown => MessageError::UnknownKind(kind),
            Decoded::Err(source) => MessageError::Malformed { kind, source },
        })?;
        r.finish().map_err(|source| MessageError::Malformed { kind, source })?;
        Ok(msg)
    }
}

enum Decoded {
    Unknown,
    Err(DecodeError),
}

impl From<DecodeError> for Decoded {
    fn from(e: DecodeError) -> Self {
        Decoded::Err(e)
    }
}

fn decode_payload(kind: u8, r: &mut Reader) -> Result<Message, Decoded> {
    use Message::*;
    let topic = |r: &mut Reader| r.string("topic", MAX_TOPIC_NAME_BYTES);
    let text = |r: &mut Reader| r.string("string", MAX_STRING_BYTES);
    Ok(match kind {
        kind::ERROR => Error { code: ErrorCode::from_code(r.u16()?), message: text(r)? },
        kind::HELLO => Hello { protocol_version: r.u16()?, client_id: text(r)? },
        kind::HELLO_OK => {
            HelloOk { protocol_version: r.u16()?, broker_id: r.u32()?, server_version: text(r)? }
        }
        kind::PRODUCE => Produce {
            topic: topic(r)?,
            partition: r.u32()?,
            acks: if r.bool()? { Acks::Leader } else { Acks::None },
            batch: r.bytes("batch", MAX_BATCH_BYTES)?,
        },
        kind::PRODUCE_OK => ProduceOk { base_offset: r.u64()?, log_append_time_ms: r.i64()? },
        kind::SUBSCRIBE => Subscribe(crate::message::Subscribe {
            topic: topic(r)?,
            partition: r.u32()?,
            group: r.option(text)?,
            start: get_start(r)?,
            window_messages: r.u32()?,
            window_bytes: r.u32()?,
            member: get_member(r)?,
            // Absent in subscriptions from clients that predate it.
            policy: match r.remaining() {
                0 => RedeliveryPolicy::default(),
                _ => RedeliveryPolicy {
                    ack_wait_ms: r.u32()?,
                    max_deliveries: r.u32()?,
                    dead_letter_topic: r.option(topic)?,
                },
            },
        }),
        kind::SUBSCRIBED => {
            Subscribed { start_offset: r.u64()?, log_start_offset: r.u64()?, high_watermark: r.u64()? }
        }
        kind::DELIVER => Deliver { high_watermark: r.u64()?, batches: r.bytes("batches", MAX_FRAME_BYTES)? },
        kind::ACK => Ack { next_offset: r.u64()? },
        kind::DELIVER_SOME => DeliverSome {
            high_watermark: r.u64()?,
            ranges: r.list("ranges", 20, |r| {
                Ok(DeliveryRange { start: r.u64()?, end: r.u64()?, delivery_count: r.u32()? })
            })?,
            batches: r.bytes("batches", MAX_FRAME_BYTES)?,
        },
        kind::ACK_RANGES => AckRanges { floor: r.u64()?, ranges: get_ranges(r)? },
        kind::NACK => Nack { offset: r.u64()?, delay_ms: r.u32()? },
        kind::SETTLED => Settled { ranges: get_ranges(r)? },
        kind::FETCH => Fetch { topic: topic(r)?, partition: r.u32()?, offset: r.u64()?, max_bytes: r.u32()? },
        kind::FETCH_OK => FetchOk {
            log_start_offset: r.u64()?,
            high_watermark: r.u64()?,
            batches: r.bytes("batches", MAX_FRAME_BYTES)?,
        },
        kind::COMMIT_OFFSET => CommitOffset {
            group: text(r)?,
            topic: topic(r)?,
            partition: r.u32()?,
            offset: r.u64()?,
            member: get_member(r)?,
            // Absent from clients that predate it: a plain commit.
            reset: r.remaining() > 0 && r.bool()?,
        },
        kind::COMMIT_OK => CommitOk,
        kind::FETCH_OFFSETS => FetchOffsets { group: text(r)?, topic: topic(r)? },
        kind::OFFSETS => Offsets(r.list("offsets", 21, |r| {
            Ok(PartitionOffsets {
                partition: r.u32()?,
                committed: r.option(|r| r.u64())?,
                log_start_offset: r.u64()?,
                high_watermark: r.u64()?,
            })
        })?),
        kind::METADATA => Metadata { topic: r.option(topic)? },
        kind::METADATA_OK => MetadataOk(r.list("topics", TOPIC_INFO_MIN_BYTES, |r| {
            Ok(TopicInfo {
                name: topic(r)?,
                config: get_config(r)?,
                partitions: r.list("partitions", 20, |r| {
                    Ok(PartitionInfo {
                        partition: r.u32()?,
                        log_start_offset: r.u64()?,
                        high_watermark: r.u64()?,
                    })
                })?,
            })
        })?),
        kind::CREATE_TOPIC => CreateTopic { name: topic(r)?, partitions: r.u32()?, config: get_config(r)? },
        kind::DELETE_TOPIC => DeleteTopic { name: topic(r)? },
        kind::DONE => Done,
        kind::INIT_PRODUCER => InitProducer,
        kind::JOIN_GROUP => JoinGroup {
            group: text(r)?,
            topic: topic(r)?,
            member_id: r.option(text)?,
            session_timeout_ms: r.u32()?,
        },
        kind::HEARTBEAT => Heartbeat { group: text(r)?, member_id: text(r)?, generation: r.u64()? },
        kind::GROUP_ASSIGNMENT => {
            GroupAssignment { member_id: text(r)?, generation: r.u64()?, partitions: get_u32s(r)? }
        }
        kind::LEAVE_GROUP => LeaveGroup { group: text(r)?, member_id: text(r)? },
        kind::LIST_GROUPS => ListGroups,
        kind::GROUPS => Groups(r.list("groups", 2, text)?),
        kind::DESCRIBE_GROUP => DescribeGroup { group: text(r)? },
        kind::OFFSET_FOR_TIME => {
            OffsetForTime { topic: topic(r)?, partition: r.u32()?, timestamp_ms: r.i64()? }
        }
        kind::OFFSET_IS => OffsetIs { offset: r.u64()? },
        kind::GROUP_DESCRIPTION => GroupDescription {
            topic: topic(r)?,
            generation: r.u64()?,
            members: r
                .list("members", 6, |r| Ok(MemberInfo { member_id: text(r)?, partitions: get_u32s(r)? }))?,
        },
        kind::INIT_PRODUCER_OK => InitProducerOk { producer_id: r.i64()?, producer_epoch: r.u16()? as i16 },
        _ => return Err(Decoded::Unknown),
    })
}

fn put_option<T>(b: &mut BytesMut, v: Option<T>, f: impl FnOnce(&mut BytesMut, T)) {
    match v {
        None => b.put_u8(0),
        Some(v) => {
            b.put_u8(1);
            f(b, v)
        }
    }
}

/// Smallest encoded `TopicInfo`: empty name (2) + config with no options (23) + empty
/// partition list (4). List counts are checked against this before anything is allocated, so
/// it must never exceed a real minimum (a property test found 40 did).
const TOPIC_INFO_MIN_BYTES: usize = 2 + 23 + 4;

fn put_ranges(b: &mut BytesMut, ranges: &[std::ops::Range<u64>]) {
    b.put_u32_le(ranges.len() as u32);
    for r in ranges {
        b.put_u64_le(r.start);
        b.put_u64_le(r.end);
    }
}

/// Offset ranges; an empty or reversed range is malformed.
fn get_ranges(r: &mut Reader) -> Result<Vec<std::ops::Range<u64>>, DecodeError> {
    r.list("ranges", 16, |r| {
        let at = r.position();
        let (start, end) = (r.u64()?, r.u64()?);
        if start >= end {
            return Err(DecodeError::invalid("range", at, format!("{start}..{end} is empty")));
        }
        Ok(start..end)
    })
}

fn put_deliver_some(b: &mut BytesMut, high_watermark: u64, ranges: &[DeliveryRange], batches_len: usize) {
    b.put_u64_le(high_watermark);
    b.put_u32_le(ranges.len() as u32);
    for r in ranges {
        b.put_u64_le(r.start);
        b.put_u64_le(r.end);
        b.put_u32_le(r.delivery_count);
    }
    b.put_u32_le(batches_len as u32);
}

/// The head of a `DeliverSome` frame whose batches follow as separate buffers.
pub fn deliver_some_head(high_watermark: u64, ranges: &[DeliveryRange], batches_len: usize) -> Bytes {
    let mut body = BytesMut::with_capacity(16 + 20 * ranges.len());
    put_deliver_some(&mut body, high_watermark, ranges, batches_len);
    let mut head = BytesMut::with_capacity(6 + body.len());
    put_header(&mut head, kind::DELIVER_SOME, body.len() + batches_len);
    head.put_slice(&body);
    head.freeze()
}

fn put_u32s(b: &mut BytesMut, v: &[u32]) {
    b.put_u32_le(v.len() as u32);
    for x in v {
        b.put_u32_le(*x);
    }
}

fn get_u32s(r: &mut Reader) -> Result<Vec<u32>, DecodeError> {
    r.list("partitions", 4, |r| r.u32())
}

fn put_member(b: &mut BytesMut, m: Option<&MemberRef>) {
    put_option(b, m, |b, m| {
        b.put_string(&m.member_id);
        b.put_u64_le(m.generation);
    });
}

fn get_member(r: &mut Reader) -> Result<Option<MemberRef>, DecodeError> {
    r.option(|r| Ok(MemberRef { member_id: r.string("member", MAX_STRING_BYTES)?, generation: r.u64()? }))
}

fn put_start(b: &mut BytesMut, s: StartPosition) {
    match s {
        StartPosition::Earliest => b.put_u8(0),
        StartPosition::Latest => b.put_u8(1),
        StartPosition::Offset(o) => {
            b.put_u8(2);
            b.put_u64_le(o)
        }
        StartPosition::Timestamp(t) => {
            b.put_u8(3);
            b.put_i64_le(t)
        }
    }
}

fn get_start(r: &mut Reader) -> Result<StartPosition, DecodeError> {
    let at = r.position();
    Ok(match r.u8()? {
        0 => StartPosition::Earliest,
        1 => StartPosition::Latest,
        2 => StartPosition::Offset(r.u64()?),
        3 => StartPosition::Timestamp(r.i64()?),
        t => return Err(DecodeError::invalid("start position", at, format!("tag {t}"))),
    })
}

fn put_config(b: &mut BytesMut, c: &TopicConfig) {
    put_option(b, c.retention_bytes, |b, v| b.put_u64_le(v));
    put_option(b, c.retention_ms, |b, v| b.put_u64_le(v));
    b.put_u64_le(c.segment_bytes);
    b.put_u64_le(c.segment_ms);
    b.put_u8(match c.durability {
        Durability::Always => 0,
        Durability::Interval => 1,
        Durability::Os => 2,
    });
    b.put_u32_le(c.flush_interval_ms);
}

fn get_config(r: &mut Reader) -> Result<TopicConfig, DecodeError> {
    let retention_bytes = r.option(|r| r.u64())?;
    let retention_ms = r.option(|r| r.u64())?;
    let segment_bytes = r.u64()?;
    let segment_ms = r.u64()?;
    let at = r.position();
    let durability = match r.u8()? {
        0 => Durability::Always,
        1 => Durability::Interval,
        2 => Durability::Os,
        t => return Err(DecodeError::invalid("durability", at, format!("tag {t}"))),
    };
    Ok(TopicConfig {
        retention_bytes,
        retention_ms,
        segment_bytes,
        segment_ms,
        durability,
        flush_interval_ms: r.u32()?,
    })
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// The head of a `Deliver` frame whose batches (`batches_len` bytes in all) follow as separate
/// buffers, so a delivery assembled from several cached batches is sent without a copy.
pub fn deliver_head(high_watermark: u64, batches_len: usize) -> Bytes {
    let mut head = BytesMut::with_capacity(18);
    put_header(&mut head, kind::DELIVER, 12 + batches_len);
    head.put_u64_le(high_watermark);
    head.put_u32_le(batches_len as u32);
    head.freeze()
}

/// Topic names: 1..=249 bytes of `[A-Za-z0-9._-]`, not `.` or `..`, as in Kafka.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_TOPIC_NAME_BYTES {
        return Err(format!("topic name must be 1 to {MAX_TOPIC_NAME_BYTES} bytes"));
    }
    if name == "." || name == ".." {
        return Err("topic name cannot be '.' or '..'".into());
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("topic name has '{c}'; allowed are letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

/// Group names: 1..=MAX_GROUP_NAME_BYTES bytes.
pub fn validate_group_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > crate::limits::MAX_GROUP_NAME_BYTES {
        return Err(format!("group name must be 1 to {} bytes", crate::limits::MAX_GROUP_NAME_BYTES));
    }
    Ok(())
}

/// Partition counts: 1..=MAX_PARTITIONS.
pub fn validate_partition_count(n: u32) -> Result<(), String> {
    if n == 0 || n > MAX_PARTITIONS {
        return Err(format!("partition count must be 1 to {MAX_PARTITIONS}, got {n}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::decode_frame;
    use proptest::prelude::*;

    fn arb_config() -> impl Strategy<Value = TopicConfig> {
        (
            any::<Option<u64>>(),
            any::<Option<u64>>(),
            any::<u64>(),
            any::<u64>(),
            prop_oneof![Just(Durability::Always), Just(Durability::Interval), Just(Durability::Os)],
            any::<u32>(),
        )
            .prop_map(|(rb, rm, sb, sm, durability, fi)| TopicConfig {
                retention_bytes: rb,
                retention_ms: rm,
                segment_bytes: sb,
                segment_ms: sm,
                durability,
                flush_interval_ms: fi,
            })
    }

    fn arb_start() -> impl Strategy<Value = StartPosition> {
        prop_oneof![
            Just(StartPosition::Earliest),
            Just(StartPosition::Latest),
            any::<u64>().prop_map(StartPosition::Offset),
            any::<i64>().prop_map(StartPosition::Timestamp),
        ]
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let name = "[a-z0-9._-]{1,20}";
        let bytes = proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from);
        prop_oneof![
            (any::<u16>(), ".{0,20}")
                .prop_map(|(c, m)| Message::Error { code: ErrorCode::from_code(c), message: m }),
            (any::<u16>(), ".{0,10}").prop_map(|(v, c)| Message::Hello { protocol_version: v, client_id: c }),
            (any::<u16>(), any::<u32>(), ".{0,10}").prop_map(|(v, b, s)| Message::HelloOk {
                protocol_version: v,
                broker_id: b,
                server_version: s
            }),
            (name, any::<u32>(), any::<bool>(), bytes.clone()).prop_map(|(t, p, a, b)| Message::Produce {
                topic: t,
                partition: p,
                acks: if a { Acks::Leader } else { Acks::None },
                batch: b
            }),
            (any::<u64>(), any::<i64>())
                .prop_map(|(o, t)| Message::ProduceOk { base_offset: o, log_append_time_ms: t }),
            (name, any::<u32>(), proptest::option::of(name), arb_start(), any::<u32>(), any::<u32>())
                .prop_map(|(t, p, g, s, wm, wb)| Message::Subscribe(Subscribe {
                    topic: t,
                    partition: p,
                    group: g,
                    start: s,
                    window_messages: wm,
                    window_bytes: wb,
                    member: None,
                    policy: RedeliveryPolicy {
                        ack_wait_ms: wm / 3,
                        max_deliveries: wb / 5,
                        dead_letter_topic: Some("dead".into()),
                    },
                })),
            (
                any::<u64>(),
                proptest::collection::vec((any::<u64>(), 1u64..100, any::<u32>()), 0..4),
                bytes.clone()
            )
                .prop_map(|(h, rs, b)| Message::DeliverSome {
                    high_watermark: h,
                    ranges: rs
                        .into_iter()
                        .map(|(s, n, c)| DeliveryRange { start: s / 2, end: s / 2 + n, delivery_count: c })
                        .collect(),
                    batches: b
                }),
            (any::<u64>(), proptest::collection::vec((0u64..1 << 60, 1u64..100), 0..4)).prop_map(
                |(f, rs)| {
                    Message::AckRanges { floor: f, ranges: rs.into_iter().map(|(s, n)| s..s + n).collect() }
                }
            ),
            (any::<u64>(), any::<u32>()).prop_map(|(o, d)| Message::Nack { offset: o, delay_ms: d }),
            proptest::collection::vec((0u64..1 << 60, 1u64..100), 0..4)
                .prop_map(|rs| Message::Settled { ranges: rs.into_iter().map(|(s, n)| s..s + n).collect() }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| Message::Subscribed {
                start_offset: a,
                log_start_offset: b,
                high_watermark: c
            }),
            (any::<u64>(), bytes.clone())
                .prop_map(|(h, b)| Message::Deliver { high_watermark: h, batches: b }),
            any::<u64>().prop_map(|o| Message::Ack { next_offset: o }),
            (name, any::<u32>(), any::<u64>(), any::<u32>()).prop_map(|(t, p, o, m)| Message::Fetch {
                topic: t,
                partition: p,
                offset: o,
                max_bytes: m
            }),
            (any::<u64>(), any::<u64>(), bytes).prop_map(|(a, b, c)| Message::FetchOk {
                log_start_offset: a,
                high_watermark: b,
                batches: c
            }),
            (name, name, any::<u32>(), any::<u64>()).prop_map(|(g, t, p, o)| Message::CommitOffset {
                group: g,
                topic: t,
                partition: p,
                offset: o,
                member: Some(MemberRef { member_id: "m-1".into(), generation: 3 }),
                reset: o % 2 == 0,
            }),
            Just(Message::CommitOk),
            (name, name).prop_map(|(g, t)| Message::FetchOffsets { group: g, topic: t }),
            proptest::collection::vec((any::<u32>(), any::<Option<u64>>(), any::<u64>(), any::<u64>()), 0..4)
                .prop_map(|v| Message::Offsets(
                    v.into_iter()
                        .map(|(p, c, l, h)| PartitionOffsets {
                            partition: p,
                            committed: c,
                            log_start_offset: l,
                            high_watermark: h
                        })
                        .collect()
                )),
            proptest::option::of(name).prop_map(|t| Message::Metadata { topic: t }),
            proptest::collection::vec(
                (
                    name,
                    arb_config(),
                    proptest::collection::vec((any::<u32>(), any::<u64>(), any::<u64>()), 0..4)
                ),
                0..3
            )
            .prop_map(|v| Message::MetadataOk(
                v.into_iter()
                    .map(|(n, c, ps)| TopicInfo {
                        name: n,
                        config: c,
                        partitions: ps
                            .into_iter()
                            .map(|(p, l, h)| PartitionInfo {
                                partition: p,
                                log_start_offset: l,
                                high_watermark: h
                            })
                            .collect()
                    })
                    .collect()
            )),
            (name, any::<u32>(), arb_config()).prop_map(|(n, p, c)| Message::CreateTopic {
                name: n,
                partitions: p,
                config: c
            }),
            name.prop_map(|n| Message::DeleteTopic { name: n }),
            Just(Message::Done),
            Just(Message::InitProducer),
            Just(Message::ListGroups),
            (name, any::<u32>(), any::<i64>()).prop_map(|(t, p, ts)| Message::OffsetForTime {
                topic: t,
                partition: p,
                timestamp_ms: ts
            }),
            any::<u64>().prop_map(|o| Message::OffsetIs { offset: o }),
            (name, name, proptest::option::of(name), any::<u32>()).prop_map(|(g, t, m, s)| {
                Message::JoinGroup { group: g, topic: t, member_id: m, session_timeout_ms: s }
            }),
            (name, proptest::collection::vec(any::<u32>(), 0..5), any::<u64>()).prop_map(|(m, p, g)| {
                Message::GroupAssignment { member_id: m, generation: g, partitions: p }
            }),
            (name, name, any::<u64>()).prop_map(|(g, m, n)| Message::Heartbeat {
                group: g,
                member_id: m,
                generation: n
            }),
            proptest::collection::vec(name, 0..3).prop_map(Message::Groups),
            (
                name,
                any::<u64>(),
                proptest::collection::vec((name, proptest::collection::vec(any::<u32>(), 0..3)), 0..3)
            )
                .prop_map(|(t, g, ms)| Message::GroupDescription {
                    topic: t,
                    generation: g,
                    members: ms
                        .into_iter()
                        .map(|(m, p)| MemberInfo { member_id: m, partitions: p })
                        .collect()
                }),
            (any::<i64>(), any::<i16>())
                .prop_map(|(p, e)| Message::InitProducerOk { producer_id: p, producer_epoch: e }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(msg in arb_message()) {
            let mut buf = BytesMut::from(&msg.encode().to_bytes()[..]);
            let frame = decode_frame(&mut buf).expect("frame ok").expect("whole frame");
            prop_assert!(buf.is_empty());
            prop_assert_eq!(Message::decode(frame).expect("decodes"), msg);
        }

        #[test]
        fn arbitrary_payload_never_panics(kind in any::<u8>(), data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Message::decode(RawFrame { kind, payload: Bytes::from(data) });
        }

        #[test]
        fn truncated_frames_are_errors(msg in arb_message(), cut in 1usize..32) {
            let full = msg.encode().to_bytes();
            let payload = full.slice(6..);
            if cut <= payload.len() {
                let short = payload.slice(..payload.len() - cut);
                // An error, except where a trailing field may be absent (older peers): then the
                // message without it, and only when the cut is exactly there.
                if let Ok(m) = Message::decode(RawFrame { kind: msg.kind(), payload: short }) {
                    prop_assert_eq!(m, without_optional_tail(&msg));
                }
            }
        }
    }

    /// `msg` as decoded from a frame cut just before its optional trailing fields.
    fn without_optional_tail(msg: &Message) -> Message {
        match msg.clone() {
            Message::Subscribe(mut s) => {
                s.policy = RedeliveryPolicy::default();
                Message::Subscribe(s)
            }
            Message::CommitOffset { group, topic, partition, offset, member, .. } => {
                Message::CommitOffset { group, topic, partition, offset, member, reset: false }
            }
            // No optional tail: no truncation of it may decode at all.
            _ => Message::Done,
        }
    }

    #[test]
    fn huge_list_count_is_rejected_without_allocating() {
        let mut b = BytesMut::new();
        b.put_u32_le(u32::MAX);
        let err = Message::decode(RawFrame { kind: 14, payload: b.freeze() }).unwrap_err();
        assert!(matches!(err, MessageError::Malformed { .. }), "{err:?}");
    }

    #[test]
    fn deliver_head_matches_encode() {
        let batches = Bytes::from_static(b"abcdefgh");
        let whole = Message::Deliver { high_watermark: 42, batches: batches.clone() }.encode().to_bytes();
        let mut parts = deliver_head(42, batches.len()).to_vec();
        parts.extend_from_slice(&batches);
        assert_eq!(&whole[..], &parts[..]);

        let ranges = vec![DeliveryRange { start: 3, end: 5, delivery_count: 2 }];
        let whole =
            Message::DeliverSome { high_watermark: 42, ranges: ranges.clone(), batches: batches.clone() }
                .encode()
                .to_bytes();
        let mut parts = deliver_some_head(42, &ranges, batches.len()).to_vec();
        parts.extend_from_slice(&batches);
        assert_eq!(&whole[..], &parts[..]);
    }

    #[test]
    fn unknown_kind() {
        let err = Message::decode(RawFrame { kind: 200, payload: Bytes::new() }).unwrap_err();
        assert_eq!(err, MessageError::UnknownKind(200));
        assert_eq!(err.code(), ErrorCode::UnknownKind);
    }

    #[test]
    fn topic_names() {
        assert!(validate_topic_name("orders.v1_x-2").is_ok());
        assert!(validate_topic_name("").is_err());
        assert!(validate_topic_name("..").is_err());
        assert!(validate_topic_name("a/b").is_err());
        assert!(validate_topic_name(&"x".repeat(250)).is_err());
    }
}
