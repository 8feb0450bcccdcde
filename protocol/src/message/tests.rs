use super::*;
use crate::frame::{decode_frame, RawFrame};
use crate::fuzz;
use proptest::prelude::*;

fn arb_config() -> impl Strategy<Value = TopicConfig> {
    (
        any::<Option<u64>>(),
        any::<Option<u64>>(),
        any::<u64>(),
        any::<u64>(),
        prop_oneof![Just(Durability::Always), Just(Durability::Interval), Just(Durability::Os)],
        any::<u32>(),
        any::<u16>(),
    )
        .prop_map(|(rb, rm, sb, sm, durability, fi, replicas)| TopicConfig {
            retention_bytes: rb,
            retention_ms: rm,
            segment_bytes: sb,
            segment_ms: sm,
            durability,
            flush_interval_ms: fi,
            replicas,
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
        (any::<u16>(), ".{0,20}").prop_map(|(c, m)| Message::Error {
            code: ErrorCode::from_code(c),
            message: m,
            leader: None
        }),
        (any::<u16>(), ".{0,40}", any::<u32>()).prop_map(|(c, m, l)| Message::Error {
            code: ErrorCode::from_code(c),
            message: m,
            leader: Some(l)
        }),
        (any::<u16>(), ".{0,10}", proptest::option::of(".{0,70}")).prop_map(|(v, c, t)| Message::Hello {
            protocol_version: v,
            client_id: c,
            token: t
        }),
        (any::<u16>(), any::<u32>(), ".{0,10}", proptest::option::of(".{0,20}")).prop_map(|(v, b, s, p)| {
            Message::HelloOk { protocol_version: v, broker_id: b, server_version: s, principal: p }
        }),
        (any::<bool>(), proptest::collection::vec((".{0,10}", 0..3u8, ".{0,10}", 0..6u8), 0..4)).prop_map(
            |(add, rules)| Message::ChangeAcls {
                add,
                rules: rules
                    .into_iter()
                    .map(|(principal, r, pattern, o)| AclRule {
                        principal,
                        resource: AclResource::ALL[usize::from(r)],
                        pattern,
                        operation: AclOperation::ALL[usize::from(o)],
                    })
                    .collect(),
            }
        ),
        Just(Message::ListAcls),
        proptest::collection::vec((".{0,10}", ".{0,10}"), 0..3).prop_map(|rules| Message::AclList(
            rules
                .into_iter()
                .map(|(principal, pattern)| AclRule {
                    principal,
                    resource: AclResource::Topic,
                    pattern,
                    operation: AclOperation::Consume,
                })
                .collect()
        )),
        (name, any::<u32>(), 0..3u8, bytes.clone()).prop_map(|(t, p, a, b)| Message::Produce {
            topic: t,
            partition: p,
            acks: [Acks::None, Acks::Leader, Acks::All][usize::from(a)],
            batch: b
        }),
        (any::<u64>(), any::<i64>())
            .prop_map(|(o, t)| Message::ProduceOk { base_offset: o, log_append_time_ms: t }),
        (name, any::<u32>(), proptest::option::of(name), arb_start(), any::<u32>(), any::<u32>()).prop_map(
            |(t, p, g, s, wm, wb)| Message::Subscribe(Subscribe {
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
                group_position: None,
            })
        ),
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
        (any::<u64>(), proptest::collection::vec((0u64..1 << 60, 1u64..100), 0..4)).prop_map(|(f, rs)| {
            Message::AckRanges { floor: f, ranges: rs.into_iter().map(|(s, n)| s..s + n).collect() }
        }),
        (any::<u64>(), any::<u32>()).prop_map(|(o, d)| Message::Nack { offset: o, delay_ms: d }),
        proptest::collection::vec((0u64..1 << 60, 1u64..100), 0..4)
            .prop_map(|rs| Message::Settled { ranges: rs.into_iter().map(|(s, n)| s..s + n).collect() }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| Message::Subscribed {
            start_offset: a,
            log_start_offset: b,
            high_watermark: c
        }),
        (any::<u64>(), bytes.clone()).prop_map(|(h, b)| Message::Deliver { high_watermark: h, batches: b }),
        any::<u64>().prop_map(|o| Message::Ack { next_offset: o }),
        (name, any::<u32>(), any::<u64>(), any::<u32>()).prop_map(|(t, p, o, m)| Message::Fetch {
            topic: t,
            partition: p,
            offset: o,
            max_bytes: m
        }),
        (any::<u64>(), any::<u64>(), bytes.clone()).prop_map(|(a, b, c)| Message::FetchOk {
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
            (name, arb_config(), proptest::collection::vec((any::<u32>(), any::<u64>(), any::<u64>()), 0..4)),
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
                            high_watermark: h,
                            leader: (p % 2 == 0).then_some(p / 3),
                            epoch: l ^ h,
                            replicas: vec![p, p / 2],
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
        Just(Message::ClusterStatus),
        (
            proptest::collection::vec((any::<u32>(), ".{0,20}", any::<bool>()), 0..4),
            proptest::collection::vec(
                (name, any::<u32>(), any::<Option<u32>>(), any::<u64>(), any::<u64>()),
                0..4
            )
        )
            .prop_map(|(b, p)| Message::ClusterStatusOk {
                brokers: b.into_iter().map(|(id, addr, up)| BrokerStatus { id, addr, up }).collect(),
                partitions: p
                    .into_iter()
                    .map(|(topic, partition, leader, epoch, commit)| ReplicaStatus {
                        topic,
                        partition,
                        leader,
                        epoch,
                        replicas: vec![1, 2, 3],
                        in_sync: leader.into_iter().collect(),
                        commit,
                        lag: commit / 3,
                    })
                    .collect(),
            }),
        bytes.clone().prop_map(|payload| Message::Raft { payload }),
        any::<u32>().prop_map(|broker| Message::ReserveProducerIds { broker }),
        (proptest::option::of((any::<u32>(), "[a-z0-9.:]{0,20}")), proptest::option::of(any::<u32>()))
            .prop_map(|(add, remove)| Message::ChangeBrokers { add, remove }),
        proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()), 0..4).prop_map(
            |n| Message::Leaders {
                notices: n
                    .into_iter()
                    .map(|(group, term, commit, hw)| LeaderNotice {
                        group,
                        term,
                        commit,
                        log_start_offset: hw / 2,
                        high_watermark: hw,
                        in_sync: vec![1, 3],
                        lag: term,
                        members: vec![1, 3, 4],
                    })
                    .collect(),
            }
        ),
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
                members: ms.into_iter().map(|(m, p)| MemberInfo { member_id: m, partitions: p }).collect()
            }),
        (any::<i64>(), any::<i16>())
            .prop_map(|(p, e)| Message::InitProducerOk { producer_id: p, producer_epoch: e }),
        (name, ".{0,20}").prop_map(|(g, m)| Message::LeaveGroup { group: g, member_id: m }),
        ".{0,30}".prop_map(|g| Message::DescribeGroup { group: g }),
        (
            name,
            any::<u32>(),
            proptest::option::of(".{0,12}"),
            arb_start(),
            proptest::option::of((".{0,12}", any::<u64>())),
            (any::<u32>(), any::<u32>(), proptest::option::of(name), proptest::option::of(any::<u64>())),
        )
            .prop_map(
                |(t, p, g, s, m, (ack_wait_ms, max_deliveries, dead_letter_topic, group_position))| {
                    Message::Subscribe(Subscribe {
                        topic: t,
                        partition: p,
                        group: g,
                        start: s,
                        window_messages: ack_wait_ms ^ max_deliveries,
                        window_bytes: max_deliveries,
                        member: m.map(|(member_id, generation)| MemberRef { member_id, generation }),
                        policy: RedeliveryPolicy { ack_wait_ms, max_deliveries, dead_letter_topic },
                        group_position,
                    })
                }
            ),
        (
            ".{0,12}",
            name,
            any::<u32>(),
            any::<u64>(),
            proptest::option::of((".{0,12}", any::<u64>())),
            any::<bool>()
        )
            .prop_map(|(g, t, p, o, m, reset)| Message::CommitOffset {
                group: g,
                topic: t,
                partition: p,
                offset: o,
                member: m.map(|(member_id, generation)| MemberRef { member_id, generation }),
                reset,
            }),
    ]
}

/// A frame kind: mostly the known ones (so payload decoders are reached), sometimes any.
fn arb_kind() -> impl Strategy<Value = u8> {
    prop_oneof![4 => 0u8..=41, 1 => any::<u8>()]
}

proptest! {
    #![proptest_config(fuzz::config(512))]

    #[test]
    fn round_trip(msg in arb_message()) {
        let mut buf = BytesMut::from(&msg.encode().to_bytes()[..]);
        let frame = decode_frame(&mut buf).expect("frame ok").expect("whole frame");
        prop_assert!(buf.is_empty());
        prop_assert_eq!(Message::decode(frame).expect("decodes"), msg);
    }

    #[test]
    fn arbitrary_payload_never_panics(kind in arb_kind(), data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Message::decode(RawFrame { kind, payload: Bytes::from(data) });
    }

    /// Valid encodings with bytes changed, length fields set to their worst values, cut,
    /// extended, spliced: an error or a message, never a panic; a message that decodes
    /// encodes to bytes that decode to it again (nothing half-read is kept).
    #[test]
    fn mutated_encodings_decode_or_fail(msg in arb_message(), muts in fuzz::mutations()) {
        let full = msg.encode().to_bytes();
        let payload = fuzz::apply(&full[6..], &muts);
        if let Ok(m) = Message::decode(RawFrame { kind: msg.kind(), payload: Bytes::from(payload) }) {
            let again = m.encode().to_bytes();
            let back = Message::decode(RawFrame { kind: m.kind(), payload: again.slice(6..) });
            prop_assert_eq!(back, Ok(m));
        }
    }

    /// A stream of valid frames, mutated and fed in arbitrary chunks: the frame reader yields
    /// frames, asks for more, or fails; it never panics and never buffers past one frame's limit.
    #[test]
    fn a_mutated_frame_stream_never_panics(
        msgs in proptest::collection::vec(arb_message(), 1..4),
        muts in proptest::collection::vec(fuzz::mutation(), 0..4),
        chunks in proptest::collection::vec(1usize..64, 1..16),
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend_from_slice(&m.encode().to_bytes());
        }
        let stream = fuzz::apply(&stream, &muts);
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut sizes = chunks.iter().cycle();
        'feed: while fed < stream.len() {
            let n = (*sizes.next().unwrap_or(&1)).min(stream.len() - fed);
            buf.extend_from_slice(&stream[fed..fed + n]);
            fed += n;
            loop {
                match decode_frame(&mut buf) {
                    Ok(Some(frame)) => {
                        prop_assert!(frame.payload.len() + 2 <= crate::limits::MAX_FRAME_BYTES);
                        let _ = Message::decode(frame);
                    }
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
            prop_assert!(buf.capacity() <= crate::limits::MAX_FRAME_BYTES + 4 + stream.len());
        }
        if muts.is_empty() {
            prop_assert!(buf.is_empty(), "unmutated frames are consumed whole");
        }
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
                let allowed = without_optional_tails(&msg);
                prop_assert!(allowed.contains(&m), "{:?} is none of {:?}", m, allowed);
            }
        }
    }
}

/// `msg` as decoded from a frame cut just before one of its optional trailing fields.
fn without_optional_tails(msg: &Message) -> Vec<Message> {
    match msg.clone() {
        Message::Subscribe(mut s) => {
            s.group_position = None;
            let without_position = Message::Subscribe(s.clone());
            s.policy = RedeliveryPolicy::default();
            vec![without_position, Message::Subscribe(s)]
        }
        Message::CommitOffset { group, topic, partition, offset, member, .. } => {
            vec![Message::CommitOffset { group, topic, partition, offset, member, reset: false }]
        }
        Message::Error { code, message, leader: Some(_) } => {
            vec![Message::Error { code, message, leader: None }]
        }
        Message::Hello { protocol_version, client_id, token: Some(_) } => {
            vec![Message::Hello { protocol_version, client_id, token: None }]
        }
        Message::HelloOk { protocol_version, broker_id, server_version, principal: Some(_) } => {
            vec![Message::HelloOk { protocol_version, broker_id, server_version, principal: None }]
        }
        // No optional tail: no truncation of it may decode at all.
        _ => Vec::new(),
    }
}

#[test]
fn not_leader_names_the_leader_and_older_frames_without_it_still_decode() {
    let named = Message::error_with_leader(ErrorCode::NotLeader, "broker 3 leads", Some(3));
    let mut buf = BytesMut::from(&named.encode().to_bytes()[..]);
    let frame = decode_frame(&mut buf).expect("frame").expect("whole");
    assert_eq!(Message::decode(frame).expect("decodes"), named);
    let old = Message::error(ErrorCode::NotLeader, "no leader yet");
    let bytes = old.encode().to_bytes();
    assert_eq!(bytes.len(), 6 + 2 + 2 + "no leader yet".len(), "no tail without a leader");
    let mut buf = BytesMut::from(&bytes[..]);
    let frame = decode_frame(&mut buf).expect("frame").expect("whole");
    assert_eq!(Message::decode(frame).expect("decodes"), old);
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
    let whole = Message::DeliverSome { high_watermark: 42, ranges: ranges.clone(), batches: batches.clone() }
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
