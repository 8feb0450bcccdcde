//! Decoding a frame's payload into a `Message`: never panics, never allocates from an unchecked
//! length.

use super::*;
use crate::codec::{DecodeError, Reader};
use crate::frame::RawFrame;
use crate::limits::{
    MAX_ACL_PATTERN_BYTES, MAX_BATCH_BYTES, MAX_FRAME_BYTES, MAX_PRINCIPAL_BYTES, MAX_STRING_BYTES,
    MAX_TOKEN_BYTES, MAX_TOPIC_NAME_BYTES,
};

impl Message {
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
        kind::ERROR => Error {
            code: ErrorCode::from_code(r.u16()?),
            message: text(r)?,
            leader: match r.remaining() {
                0 => None,
                _ => r.option(|r| r.u32())?,
            },
        },
        kind::HELLO => Hello {
            protocol_version: r.u16()?,
            client_id: text(r)?,
            // Absent from clients that present no token (and from those that predate it).
            token: match r.remaining() {
                0 => None,
                _ => r.option(|r| r.string("token", MAX_TOKEN_BYTES))?,
            },
        },
        kind::HELLO_OK => HelloOk {
            protocol_version: r.u16()?,
            broker_id: r.u32()?,
            server_version: text(r)?,
            principal: match r.remaining() {
                0 => None,
                _ => r.option(text)?,
            },
        },
        kind::PRODUCE => Produce {
            topic: topic(r)?,
            partition: r.u32()?,
            acks: {
                let at = r.position();
                match r.u8()? {
                    0 => Acks::None,
                    1 => Acks::Leader,
                    2 => Acks::All,
                    t => return Err(DecodeError::invalid("acks", at, format!("tag {t}")).into()),
                }
            },
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
            // Absent from clients and from brokers that predate it.
            group_position: match r.remaining() {
                0 => None,
                _ => r.option(|r| r.u64())?,
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
                partitions: r.list("partitions", 33, |r| {
                    Ok(PartitionInfo {
                        partition: r.u32()?,
                        log_start_offset: r.u64()?,
                        high_watermark: r.u64()?,
                        leader: r.option(|r| r.u32())?,
                        epoch: r.u64()?,
                        replicas: broker_ids(r)?,
                    })
                })?,
            })
        })?),
        kind::CREATE_TOPIC => CreateTopic { name: topic(r)?, partitions: r.u32()?, config: get_config(r)? },
        kind::DELETE_TOPIC => DeleteTopic { name: topic(r)? },
        kind::DONE => Done,
        kind::CLUSTER_STATUS => ClusterStatus,
        kind::CLUSTER_STATUS_OK => ClusterStatusOk {
            brokers: r.list("brokers", 4 + 4 + 1, |r| {
                Ok(BrokerStatus { id: r.u32()?, addr: text(r)?, up: r.bool()? })
            })?,
            partitions: r.list("partitions", 4 + 4 + 1 + 8 + 4 + 4 + 8 + 8, |r| {
                Ok(ReplicaStatus {
                    topic: topic(r)?,
                    partition: r.u32()?,
                    leader: r.option(|r| r.u32())?,
                    epoch: r.u64()?,
                    replicas: broker_ids(r)?,
                    in_sync: broker_ids(r)?,
                    commit: r.u64()?,
                    lag: r.u64()?,
                })
            })?,
        },
        kind::RAFT => Raft { payload: r.bytes("raft message", crate::limits::MAX_RAFT_MESSAGE_BYTES)? },
        kind::LEADERS => Leaders {
            notices: r.list("leader notices", 5 * 8 + 4 + 8 + 4, |r| {
                Ok(LeaderNotice {
                    group: r.u64()?,
                    term: r.u64()?,
                    commit: r.u64()?,
                    log_start_offset: r.u64()?,
                    high_watermark: r.u64()?,
                    in_sync: broker_ids(r)?,
                    lag: r.u64()?,
                    members: broker_ids(r)?,
                })
            })?,
        },
        kind::RESERVE_PRODUCER_IDS => ReserveProducerIds { broker: r.u32()? },
        kind::CHANGE_BROKERS => {
            ChangeBrokers { add: r.option(|r| Ok((r.u32()?, text(r)?)))?, remove: r.option(|r| r.u32())? }
        }
        kind::CHANGE_ACLS => ChangeAcls { add: r.bool()?, rules: get_acl_rules(r)? },
        kind::LIST_ACLS => ListAcls,
        kind::ACL_LIST => AclList(get_acl_rules(r)?),
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

/// Smallest encoded `TopicInfo`: empty name (2) + config with no options (23) + empty
/// partition list (4). List counts are checked against this before anything is allocated, so
/// it must never exceed a real minimum (a property test found 40 did).
pub(super) const TOPIC_INFO_MIN_BYTES: usize = 2 + 23 + 4;

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

fn get_u32s(r: &mut Reader) -> Result<Vec<u32>, DecodeError> {
    r.list("partitions", 4, |r| r.u32())
}

fn get_member(r: &mut Reader) -> Result<Option<MemberRef>, DecodeError> {
    r.option(|r| Ok(MemberRef { member_id: r.string("member", MAX_STRING_BYTES)?, generation: r.u64()? }))
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

/// A list of broker ids (a partition's replicas), at most `MAX_RAFT_VOTERS`.
fn broker_ids(r: &mut Reader) -> Result<Vec<u32>, DecodeError> {
    let at = r.position();
    let ids = r.list("broker ids", 4, |r| r.u32())?;
    if ids.len() > crate::limits::MAX_RAFT_VOTERS {
        return Err(DecodeError::invalid("broker ids", at, format!("{} ids", ids.len())));
    }
    Ok(ids)
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
        replicas: r.u16()?,
    })
}

/// ACL rules: principal, resource code, pattern, operation code (at least 2 + 1 + 2 + 1 bytes).
fn get_acl_rules(r: &mut Reader) -> Result<Vec<AclRule>, DecodeError> {
    r.list("acl rules", 6, |r| {
        let principal = r.string("principal", MAX_PRINCIPAL_BYTES)?;
        let at = r.position();
        let resource = AclResource::from_code(r.u8()?)
            .ok_or_else(|| DecodeError::invalid("acl resource", at, "unknown code".to_string()))?;
        let pattern = r.string("pattern", MAX_ACL_PATTERN_BYTES)?;
        let at = r.position();
        let operation = AclOperation::from_code(r.u8()?)
            .ok_or_else(|| DecodeError::invalid("acl operation", at, "unknown code".to_string()))?;
        Ok(AclRule { principal, resource, pattern, operation })
    })
}
