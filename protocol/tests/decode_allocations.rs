//! Hostile bytes may not make a decoder allocate more than its input justifies: every length
//! and count read from the wire is checked (against a named limit and against the bytes that
//! remain) before anything is sized from it (docs/design.md §2).
//!
//! This binary counts every byte allocated through the global allocator while one decode runs,
//! so it holds a single `#[test]` (no other test thread allocates meanwhile). It decodes a
//! valid sample of every message kind, Raft message and record batch with every 4-byte window
//! set to the worst length values (both byte orders), every cut, and random mutations
//! (`QUIVER_FUZZ_CASES` of them per sample, 256 by default), and requires
//! `allocated <= ALLOC_FACTOR * input + ALLOC_SLACK_BYTES` (a frame header may also reserve
//! one frame, which `MAX_FRAME_BYTES` bounds).

use std::alloc::System;

use bytes::{BufMut, Bytes, BytesMut};
use quiver_protocol::batch::{validate, BatchBuilder, BatchHeader, BatchSplitter, Batches, RecordIter};
use quiver_protocol::frame::{decode_frame, RawFrame};
use quiver_protocol::limits::MAX_FRAME_BYTES;
use quiver_protocol::message::*;
use quiver_protocol::raft::*;
use quiver_protocol::ErrorCode;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Decoded structures may take this many times the bytes they came from (a `String` or a `Vec`
/// header is 24 bytes for an item that may take 2 on the wire; a decoded struct is wider than
/// its fields' bytes) ...
const ALLOC_FACTOR: usize = 16;
/// ... plus this much (error messages, the shared header of a sliced `Bytes`).
const ALLOC_SLACK_BYTES: usize = 4 * 1024;

/// Worst values for a length or count field.
const WORST: [u32; 7] =
    [u32::MAX, 0x8000_0000, i32::MAX as u32, 16 * 1024 * 1024 + 1, 1 << 20, 65_536, 65_535];

fn bytes(n: usize, seed: u8) -> Bytes {
    Bytes::from((0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<_>>())
}

fn batch() -> Bytes {
    let mut b = BatchBuilder::new(256);
    b.push(1_000, Some(b"key"), b"value", &[("h1", b"x"), ("h2", b"")]);
    b.push(1_001, None, b"", &[]);
    b.push(1_002, Some(b""), &[7; 30], &[("h", b"yy")]);
    b.finish()
}

fn messages() -> Vec<Message> {
    let config = TopicConfig::new().with_retention_bytes(Some(1 << 30)).with_durability(Durability::Interval);
    let member = Some(MemberRef { member_id: "member-1".into(), generation: 7 });
    let batches = {
        let mut b = BytesMut::new();
        b.put_slice(&batch());
        b.put_slice(&batch());
        b.freeze()
    };
    vec![
        Message::error_with_leader(ErrorCode::NotLeader, "not the leader", Some(3)),
        Message::Hello { protocol_version: 1, client_id: "client-a".into(), token: None },
        Message::HelloOk {
            protocol_version: 1,
            broker_id: 2,
            server_version: "0.1.0".into(),
            principal: None,
        },
        Message::Produce { topic: "orders".into(), partition: 3, acks: Acks::All, batch: batch() },
        Message::ProduceOk { base_offset: 9, log_append_time_ms: 10 },
        Message::Subscribe(Subscribe {
            topic: "orders".into(),
            partition: 1,
            group: Some("billing".into()),
            member: member.clone(),
            start: StartPosition::Offset(5),
            window_messages: 100,
            window_bytes: 1 << 20,
            policy: RedeliveryPolicy {
                ack_wait_ms: 30_000,
                max_deliveries: 5,
                dead_letter_topic: Some("orders.dlq".into()),
            },
            group_position: Some(42),
        }),
        Message::Subscribed { start_offset: 1, log_start_offset: 0, high_watermark: 9 },
        Message::Deliver { high_watermark: 9, batches: batches.clone() },
        Message::Ack { next_offset: 4 },
        Message::DeliverSome {
            high_watermark: 9,
            ranges: vec![
                DeliveryRange { start: 1, end: 3, delivery_count: 2 },
                DeliveryRange { start: 5, end: 6, delivery_count: 1 },
            ],
            batches: batches.clone(),
        },
        Message::AckRanges { floor: 3, ranges: vec![5..7, 9..12, 20..21] },
        Message::Nack { offset: 4, delay_ms: 100 },
        Message::Settled { ranges: vec![1..2, 4..8] },
        Message::Fetch { topic: "orders".into(), partition: 0, offset: 5, max_bytes: 1 << 20 },
        Message::FetchOk { log_start_offset: 0, high_watermark: 9, batches },
        Message::CommitOffset {
            group: "billing".into(),
            topic: "orders".into(),
            partition: 2,
            offset: 8,
            member: member.clone(),
            reset: true,
        },
        Message::CommitOk,
        Message::FetchOffsets { group: "billing".into(), topic: "orders".into() },
        Message::Offsets(vec![
            PartitionOffsets { partition: 0, committed: Some(3), log_start_offset: 0, high_watermark: 9 },
            PartitionOffsets { partition: 1, committed: None, log_start_offset: 2, high_watermark: 4 },
        ]),
        Message::Metadata { topic: Some("orders".into()) },
        Message::MetadataOk(vec![
            TopicInfo {
                name: "orders".into(),
                config: config.clone(),
                partitions: vec![
                    PartitionInfo {
                        partition: 0,
                        log_start_offset: 0,
                        high_watermark: 9,
                        leader: Some(1),
                        epoch: 2,
                        replicas: vec![1, 2, 3],
                    },
                    PartitionInfo {
                        partition: 1,
                        log_start_offset: 3,
                        high_watermark: 4,
                        leader: None,
                        epoch: 0,
                        replicas: vec![],
                    },
                ],
            },
            TopicInfo { name: "x".into(), config: config.clone(), partitions: vec![] },
        ]),
        Message::CreateTopic { name: "orders".into(), partitions: 3, config },
        Message::DeleteTopic { name: "orders".into() },
        Message::Done,
        Message::InitProducer,
        Message::InitProducerOk { producer_id: 12, producer_epoch: 1 },
        Message::JoinGroup {
            group: "billing".into(),
            topic: "orders".into(),
            member_id: Some("member-1".into()),
            session_timeout_ms: 10_000,
        },
        Message::Heartbeat { group: "billing".into(), member_id: "member-1".into(), generation: 7 },
        Message::GroupAssignment { member_id: "member-1".into(), generation: 7, partitions: vec![0, 2, 4] },
        Message::LeaveGroup { group: "billing".into(), member_id: "member-1".into() },
        Message::ListGroups,
        Message::Groups(vec!["a".into(), "billing".into(), "".into()]),
        // The densest lists: items of the smallest size on the wire (2 bytes for a 24-byte
        // `String`, 6 for a 48-byte `MemberInfo`).
        Message::Groups(vec![String::new(); 300]),
        Message::GroupDescription {
            topic: "t".into(),
            generation: 1,
            members: vec![MemberInfo { member_id: String::new(), partitions: vec![] }; 100],
        },
        Message::DescribeGroup { group: "billing".into() },
        Message::GroupDescription {
            topic: "orders".into(),
            generation: 7,
            members: vec![
                MemberInfo { member_id: "m1".into(), partitions: vec![0, 1] },
                MemberInfo { member_id: "m2".into(), partitions: vec![] },
            ],
        },
        Message::OffsetForTime { topic: "orders".into(), partition: 1, timestamp_ms: -5 },
        Message::OffsetIs { offset: 3 },
        Message::ClusterStatus,
        Message::ClusterStatusOk {
            brokers: vec![BrokerStatus { id: 1, addr: "127.0.0.1:7420".into(), up: true }],
            partitions: vec![ReplicaStatus {
                topic: "orders".into(),
                partition: 0,
                leader: Some(1),
                epoch: 3,
                replicas: vec![1, 2, 3],
                in_sync: vec![1, 2],
                commit: 40,
                lag: 2,
            }],
        },
        Message::Raft { payload: raft_messages()[0].clone() },
        Message::Leaders {
            notices: vec![LeaderNotice {
                group: 4,
                term: 2,
                commit: 9,
                log_start_offset: 0,
                high_watermark: 9,
                in_sync: vec![1, 2],
                lag: 0,
                members: vec![1, 2, 3],
            }],
        },
    ]
}

fn raft_messages() -> Vec<Bytes> {
    let mut append = RaftMessage::new(7, RaftMessageType::Append, 1, 2, 5);
    append.index = 10;
    append.log_term = 4;
    append.commit = 9;
    append.entries = (0..3)
        .map(|i| RaftEntry {
            entry_type: RaftEntryType::Normal,
            term: 5,
            index: 11 + i,
            data: bytes(20 + i as usize, i as u8),
            context: bytes(2, 9),
        })
        .collect();
    let mut snap = RaftMessage::new(7, RaftMessageType::Snapshot, 1, 2, 5);
    snap.snapshot = Some(RaftSnapshot {
        index: 10,
        term: 4,
        conf_state: RaftConfState {
            voters: vec![1, 2, 3],
            learners: vec![4],
            voters_outgoing: vec![1, 2],
            learners_next: vec![],
            auto_leave: true,
        },
        data: bytes(32, 1),
    });
    snap.context = bytes(8, 3);
    [append, snap, RaftMessage::new(7, RaftMessageType::HeartbeatResponse, 2, 1, 5)]
        .iter()
        .map(|m| {
            let mut b = BytesMut::new();
            m.encode(&mut b);
            b.freeze()
        })
        .collect()
}

/// Bytes `f` allocates.
fn allocated(f: impl FnOnce()) -> usize {
    let region = Region::new(GLOBAL);
    f();
    region.change().bytes_allocated
}

fn check(what: &str, input: &[u8], extra_allowed: usize, f: impl FnOnce()) {
    let n = allocated(f);
    let limit = ALLOC_FACTOR * input.len() + ALLOC_SLACK_BYTES + extra_allowed;
    assert!(
        n <= limit,
        "{what}: {n} bytes allocated for {} bytes of input (limit {limit}): {input:02x?}",
        input.len()
    );
}

fn decode_message(kind: u8, payload: &[u8]) {
    let payload = Bytes::copy_from_slice(payload);
    check(&format!("message kind {kind}"), &payload.clone(), 0, || {
        let _ = Message::decode(RawFrame { kind, payload });
    });
}

fn decode_frames(stream: &[u8]) {
    let mut buf = BytesMut::from(stream);
    // A frame's header may reserve its whole (checked) length before the body is there.
    check("frame stream", stream, 4 + MAX_FRAME_BYTES, || {
        while let Ok(Some(frame)) = decode_frame(&mut buf) {
            let _ = Message::decode(frame);
        }
    });
}

fn decode_raft(input: &[u8]) {
    let input = Bytes::copy_from_slice(input);
    check("raft message", &input.clone(), 0, || {
        let _ = RaftMessage::decode(input);
    });
}

fn decode_batches(input: &[u8]) {
    let owned = Bytes::copy_from_slice(input);
    check("record batches", input, 0, || {
        let _ = validate(input);
        for span in Batches::new(input).checking_crc().flatten() {
            for r in RecordIter::new(owned.slice(span.range()), span.header) {
                let _ = r;
            }
        }
        for item in BatchSplitter::new(owned.clone()) {
            let _ = item;
        }
        if let Ok(h) = BatchHeader::parse(input) {
            if h.total_len() <= input.len() {
                for r in RecordIter::new(owned.slice(..h.total_len()), h) {
                    let _ = r;
                }
            }
        }
    });
}

/// Every 4-byte window of `valid` set to each worst value, in both byte orders; every cut.
fn sweep(valid: &[u8], decode: &mut dyn FnMut(&[u8])) {
    for at in 0..valid.len() {
        for v in WORST {
            for raw in [v.to_le_bytes(), v.to_be_bytes()] {
                let mut m = valid.to_vec();
                let end = (at + 4).min(m.len());
                m[at..end].copy_from_slice(&raw[..end - at]);
                decode(&m);
            }
        }
        decode(&valid[..at]);
    }
}

/// A small deterministic generator (xorshift), so a failure replays from its printed input.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
    let mut m = valid.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = m.len();
        match rng.below(5) {
            0 if len > 0 => {
                let at = rng.below(len);
                m[at] = rng.next() as u8;
            }
            1 if len > 0 => {
                let at = rng.below(len);
                let v = WORST[rng.below(WORST.len())];
                let raw = if rng.below(2) == 0 { v.to_le_bytes() } else { v.to_be_bytes() };
                let end = (at + 4).min(len);
                m[at..end].copy_from_slice(&raw[..end - at]);
            }
            2 => m.truncate(rng.below(len + 1)),
            3 => {
                let at = rng.below(len + 1);
                let junk: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                m.splice(at..at, junk);
            }
            _ => m.extend((0..1 + rng.below(16)).map(|_| rng.next() as u8)),
        }
    }
    m
}

fn cases() -> usize {
    std::env::var("QUIVER_FUZZ_CASES").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(256)
}

#[test]
fn decoders_allocate_in_proportion_to_their_input() {
    // The counter counts: a vector sized from a length is seen.
    assert!(allocated(|| drop(std::hint::black_box(Vec::<u8>::with_capacity(1 << 20)))) >= 1 << 20);
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    let cases = cases();
    for msg in messages() {
        let kind = msg.kind();
        let whole = msg.encode().to_bytes();
        let payload = whole.slice(6..);
        sweep(&payload, &mut |p| decode_message(kind, p));
        sweep(&whole, &mut decode_frames);
        for _ in 0..cases {
            decode_message(kind, &mutate(&mut rng, &payload));
            decode_frames(&mutate(&mut rng, &whole));
        }
    }
    for m in raft_messages() {
        sweep(&m, &mut decode_raft);
        for _ in 0..cases {
            decode_raft(&mutate(&mut rng, &m));
        }
    }
    let mut two = batch().to_vec();
    two.extend_from_slice(&batch());
    sweep(&two, &mut decode_batches);
    for _ in 0..cases {
        decode_batches(&mutate(&mut rng, &two));
    }
    // Random bytes under every kind.
    for kind in 0..=u8::MAX {
        for _ in 0..cases.div_ceil(8) {
            let junk: Vec<u8> = (0..rng.below(128)).map(|_| rng.next() as u8).collect();
            decode_message(kind, &junk);
        }
    }
}
