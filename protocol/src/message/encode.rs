//! Encoding a `Message` into a frame head and a zero-copy tail.

use bytes::{BufMut, Bytes, BytesMut};

use super::heads::put_deliver_some;
use super::*;
use crate::codec::WriteExt;
use crate::frame::put_header;

impl Message {
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
            Error { code, message, leader } => {
                b.put_u16_le(code.code());
                b.put_string(message);
                if leader.is_some() {
                    put_option(b, *leader, |b, l| b.put_u32_le(l));
                }
            }
            Hello { protocol_version, client_id, token } => {
                b.put_u16_le(*protocol_version);
                b.put_string(client_id);
                if token.is_some() {
                    put_option(b, token.as_deref(), |b, t| b.put_string(t));
                }
            }
            HelloOk { protocol_version, broker_id, server_version, principal } => {
                b.put_u16_le(*protocol_version);
                b.put_u32_le(*broker_id);
                b.put_string(server_version);
                if principal.is_some() {
                    put_option(b, principal.as_deref(), |b, p| b.put_string(p));
                }
            }
            Produce { topic, partition, acks, batch } => {
                b.put_string(topic);
                b.put_u32_le(*partition);
                b.put_u8(match acks {
                    Acks::None => 0,
                    Acks::Leader => 1,
                    Acks::All => 2,
                });
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
                // Only when set (brokers among themselves): a subscription without it is the
                // same bytes as before, which brokers that predate the field decode.
                if let Some(p) = s.group_position {
                    put_option(b, Some(p), |b, p| b.put_u64_le(p));
                }
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
                        put_option(b, p.leader, |b, l| b.put_u32_le(l));
                        b.put_u64_le(p.epoch);
                        put_u32s(b, &p.replicas);
                    }
                }
            }
            CreateTopic { name, partitions, config } => {
                b.put_string(name);
                b.put_u32_le(*partitions);
                put_config(b, config);
            }
            DeleteTopic { name } => b.put_string(name),
            ClusterStatus => {}
            ClusterStatusOk { brokers, partitions } => {
                b.put_u32_le(brokers.len() as u32);
                for x in brokers {
                    b.put_u32_le(x.id);
                    b.put_string(&x.addr);
                    b.put_u8(u8::from(x.up));
                }
                b.put_u32_le(partitions.len() as u32);
                for p in partitions {
                    b.put_string(&p.topic);
                    b.put_u32_le(p.partition);
                    put_option(b, p.leader, |b, l| b.put_u32_le(l));
                    b.put_u64_le(p.epoch);
                    put_u32s(b, &p.replicas);
                    put_u32s(b, &p.in_sync);
                    b.put_u64_le(p.commit);
                    b.put_u64_le(p.lag);
                }
            }
            Raft { payload } => {
                b.put_u32_le(payload.len() as u32);
                return payload.clone();
            }
            ReserveProducerIds { broker } => b.put_u32_le(*broker),
            ChangeBrokers { add, remove } => {
                put_option(b, add.as_ref(), |b, (id, addr)| {
                    b.put_u32_le(*id);
                    b.put_string(addr);
                });
                put_option(b, *remove, |b, id| b.put_u32_le(id));
            }
            ChangeAcls { add, rules } => {
                b.put_u8(u8::from(*add));
                put_acl_rules(b, rules);
            }
            ListAcls => {}
            AclList(rules) => put_acl_rules(b, rules),
            Leaders { notices } => {
                b.put_u32_le(notices.len() as u32);
                for n in notices {
                    b.put_u64_le(n.group);
                    b.put_u64_le(n.term);
                    b.put_u64_le(n.commit);
                    b.put_u64_le(n.log_start_offset);
                    b.put_u64_le(n.high_watermark);
                    put_u32s(b, &n.in_sync);
                    b.put_u64_le(n.lag);
                    put_u32s(b, &n.members);
                }
            }
        }
        Bytes::new()
    }
}

pub(super) fn put_option<T>(b: &mut BytesMut, v: Option<T>, f: impl FnOnce(&mut BytesMut, T)) {
    match v {
        None => b.put_u8(0),
        Some(v) => {
            b.put_u8(1);
            f(b, v)
        }
    }
}

fn put_ranges(b: &mut BytesMut, ranges: &[std::ops::Range<u64>]) {
    b.put_u32_le(ranges.len() as u32);
    for r in ranges {
        b.put_u64_le(r.start);
        b.put_u64_le(r.end);
    }
}

fn put_u32s(b: &mut BytesMut, v: &[u32]) {
    b.put_u32_le(v.len() as u32);
    for x in v {
        b.put_u32_le(*x);
    }
}

fn put_member(b: &mut BytesMut, m: Option<&MemberRef>) {
    put_option(b, m, |b, m| {
        b.put_string(&m.member_id);
        b.put_u64_le(m.generation);
    });
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
    b.put_u16_le(c.replicas);
}

fn put_acl_rules(b: &mut BytesMut, rules: &[AclRule]) {
    b.put_u32_le(rules.len() as u32);
    for rule in rules {
        b.put_string(&rule.principal);
        b.put_u8(rule.resource.code());
        b.put_string(&rule.pattern);
        b.put_u8(rule.operation.code());
    }
}
