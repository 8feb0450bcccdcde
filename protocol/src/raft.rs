//! Raft messages between brokers (docs/replication.md §1): our own encoding of what raft-rs
//! exchanges as structs (`eraftpb::Message` and what it holds), so no protobuf decoder ever
//! parses bytes from the network. The broker converts between these types and raft-rs's; this
//! crate does not depend on raft-rs.
//!
//! Decoding is also the first line of defence for raft-rs, which trusts its input (a heartbeat
//! whose commit is past the log end, or a term near `u64::MAX`, panic inside it): every length
//! is checked against its named limit before anything is allocated, and a message is refused
//! unless it is of a kind peers may send (never a proposal, which only a leader makes locally,
//! and never a local-only kind), its terms fit a batch's `i32` leader epoch, and its entries
//! are contiguous with terms that never decrease and never pass the message's. What needs the
//! receiver's state (is the sender a voter of the group, is the commit within the log) is
//! checked by the broker before `step`.
//!
//! Layout, little-endian: `u8 version = 1, u64 group, u8 type, u64 to, u64 from, u64 term,
//! u64 log_term, u64 index, entries, u64 commit, u64 commit_term, option<snapshot>,
//! u64 request_snapshot, bool reject, u64 reject_hint, bytes context, i64 priority`, where
//! `entries = u32 count, count x {u8 type, u64 term, u64 index, bytes data, bytes context}`,
//! `snapshot = u64 index, u64 term, conf_state, bytes data`, and `conf_state = 4 lists of u64
//! ids (voters, learners, voters_outgoing, learners_next), bool auto_leave`; `bytes` is a u32
//! length and the bytes, a list a u32 count and the items.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{check_limit, DecodeError, Reader, WriteExt};
use crate::limits::{
    MAX_BATCH_BYTES, MAX_RAFT_CONTEXT_BYTES, MAX_RAFT_ENTRIES_PER_MESSAGE, MAX_RAFT_MESSAGE_BYTES,
    MAX_RAFT_SNAPSHOT_BYTES, MAX_RAFT_TERM, MAX_RAFT_VOTERS,
};

/// The only encoding version this code speaks.
pub const RAFT_CODEC_VERSION: u8 = 1;

/// Kinds of message a peer may send, numbered as raft-rs's `MessageType`. The rest of raft-rs's
/// kinds are refused from the network: `MsgHup`, `MsgBeat`, `MsgUnreachable`, `MsgSnapStatus`
/// and `MsgCheckQuorum` are local; `MsgPropose` is made by the leader itself (raft-rs would
/// otherwise decode configuration changes a follower forwarded); leadership transfer starts on
/// the leader, and reads go by the high watermark, not read-index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RaftMessageType {
    Append = 3,
    AppendResponse = 4,
    RequestVote = 5,
    RequestVoteResponse = 6,
    Snapshot = 7,
    Heartbeat = 8,
    HeartbeatResponse = 9,
    TimeoutNow = 14,
    RequestPreVote = 17,
    RequestPreVoteResponse = 18,
}

impl RaftMessageType {
    pub fn from_u8(v: u8) -> Option<Self> {
        use RaftMessageType::*;
        Some(match v {
            3 => Append,
            4 => AppendResponse,
            5 => RequestVote,
            6 => RequestVoteResponse,
            7 => Snapshot,
            8 => Heartbeat,
            9 => HeartbeatResponse,
            14 => TimeoutNow,
            17 => RequestPreVote,
            18 => RequestPreVoteResponse,
            _ => return None,
        })
    }
}

/// Entry kinds, numbered as raft-rs's `EntryType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RaftEntryType {
    /// A record batch (or, for the controller, a metadata command); empty for a new leader's
    /// first entry.
    Normal = 0,
    ConfChange = 1,
    ConfChangeV2 = 2,
}

impl RaftEntryType {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => RaftEntryType::Normal,
            1 => RaftEntryType::ConfChange,
            2 => RaftEntryType::ConfChangeV2,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftEntry {
    pub entry_type: RaftEntryType,
    pub term: u64,
    pub index: u64,
    /// For a partition: the record batch's bytes, stored as they are.
    pub data: Bytes,
    pub context: Bytes,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftConfState {
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub voters_outgoing: Vec<u64>,
    pub learners_next: Vec<u64>,
    pub auto_leave: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftSnapshot {
    pub index: u64,
    pub term: u64,
    pub conf_state: RaftConfState,
    pub data: Bytes,
}

/// One Raft message for one group (a partition's, or the controller's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftMessage {
    /// The Raft group: the controller assigns each partition's.
    pub group: u64,
    pub msg_type: RaftMessageType,
    pub to: u64,
    pub from: u64,
    pub term: u64,
    pub log_term: u64,
    pub index: u64,
    pub entries: Vec<RaftEntry>,
    pub commit: u64,
    pub commit_term: u64,
    pub snapshot: Option<RaftSnapshot>,
    pub request_snapshot: u64,
    pub reject: bool,
    pub reject_hint: u64,
    pub context: Bytes,
    pub priority: i64,
}

/// Fixed bytes of an entry besides its two byte fields' contents (type, term, index, lengths).
const ENTRY_MIN_BYTES: usize = 1 + 8 + 8 + 4 + 4;

impl RaftMessage {
    /// A message with every field zero or empty.
    pub fn new(group: u64, msg_type: RaftMessageType, from: u64, to: u64, term: u64) -> Self {
        RaftMessage {
            group,
            msg_type,
            to,
            from,
            term,
            log_term: 0,
            index: 0,
            entries: Vec::new(),
            commit: 0,
            commit_term: 0,
            snapshot: None,
            request_snapshot: 0,
            reject: false,
            reject_hint: 0,
            context: Bytes::new(),
            priority: 0,
        }
    }

    /// Bytes `encode` writes.
    pub fn encoded_len(&self) -> usize {
        let entries: usize =
            self.entries.iter().map(|e| ENTRY_MIN_BYTES + e.data.len() + e.context.len()).sum();
        let snapshot = self.snapshot.as_ref().map_or(0, |s| {
            let c = &s.conf_state;
            let ids = c.voters.len() + c.learners.len() + c.voters_outgoing.len() + c.learners_next.len();
            8 + 8 + 4 * 4 + 8 * ids + 1 + 4 + s.data.len()
        });
        1 + 8 + 1 + 8 * 5 + 4 + entries + 8 + 8 + 1 + snapshot + 8 + 1 + 8 + 4 + self.context.len() + 8
    }

    /// Appends the encoding to `buf`. The encoder trusts its caller (the broker, converting what
    /// raft-rs produced); `decode` checks everything.
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.reserve(self.encoded_len());
        buf.put_u8(RAFT_CODEC_VERSION);
        buf.put_u64_le(self.group);
        buf.put_u8(self.msg_type as u8);
        for v in [self.to, self.from, self.term, self.log_term, self.index] {
            buf.put_u64_le(v);
        }
        buf.put_u32_le(self.entries.len() as u32);
        for e in &self.entries {
            buf.put_u8(e.entry_type as u8);
            buf.put_u64_le(e.term);
            buf.put_u64_le(e.index);
            buf.put_bytes_field(&e.data);
            buf.put_bytes_field(&e.context);
        }
        buf.put_u64_le(self.commit);
        buf.put_u64_le(self.commit_term);
        match &self.snapshot {
            None => buf.put_bool(false),
            Some(s) => {
                buf.put_bool(true);
                buf.put_u64_le(s.index);
                buf.put_u64_le(s.term);
                let c = &s.conf_state;
                for ids in [&c.voters, &c.learners, &c.voters_outgoing, &c.learners_next] {
                    buf.put_u32_le(ids.len() as u32);
                    for id in ids {
                        buf.put_u64_le(*id);
                    }
                }
                buf.put_bool(c.auto_leave);
                buf.put_bytes_field(&s.data);
            }
        }
        buf.put_u64_le(self.request_snapshot);
        buf.put_bool(self.reject);
        buf.put_u64_le(self.reject_hint);
        buf.put_bytes_field(&self.context);
        buf.put_i64_le(self.priority);
    }

    /// Decodes and checks one message (the whole of `bytes`); entry data and contexts are
    /// zero-copy slices of it.
    pub fn decode(bytes: Bytes) -> Result<RaftMessage, DecodeError> {
        let mut r = Reader::new(bytes);
        let at = r.position();
        let version = r.u8()?;
        if version != RAFT_CODEC_VERSION {
            return Err(invalid("version", at, format!("{version} is not {RAFT_CODEC_VERSION}")));
        }
        let group = r.u64()?;
        let at = r.position();
        let kind = r.u8()?;
        let msg_type = RaftMessageType::from_u8(kind)
            .ok_or_else(|| invalid("message type", at, format!("{kind} is not a kind peers may send")))?;
        let to = r.u64()?;
        let from = r.u64()?;
        let term = read_term(&mut r, "term")?;
        let log_term = read_term(&mut r, "log term")?;
        let index = r.u64()?;
        let entries = entries(&mut r, term)?;
        let commit = r.u64()?;
        let commit_term = read_term(&mut r, "commit term")?;
        let snapshot = r.option(snapshot)?;
        let request_snapshot = r.u64()?;
        let reject = r.bool()?;
        let reject_hint = r.u64()?;
        let context = r.bytes("context", MAX_RAFT_CONTEXT_BYTES)?;
        let priority = r.i64()?;
        r.finish()?;
        let m = RaftMessage {
            group,
            msg_type,
            to,
            from,
            term,
            log_term,
            index,
            entries,
            commit,
            commit_term,
            snapshot,
            request_snapshot,
            reject,
            reject_hint,
            context,
            priority,
        };
        m.check_append()?;
        Ok(m)
    }

    /// An append's entries follow the entry it names (`index`, `log_term`).
    fn check_append(&self) -> Result<(), DecodeError> {
        let Some(first) = self.entries.first() else { return Ok(()) };
        if self.msg_type != RaftMessageType::Append {
            return Err(invalid("entries", 0, format!("a {:?} carries no entries", self.msg_type)));
        }
        if Some(first.index) != self.index.checked_add(1) {
            return Err(invalid(
                "entries",
                0,
                format!("first index {} does not follow {}", first.index, self.index),
            ));
        }
        if first.term < self.log_term {
            return Err(invalid(
                "entries",
                0,
                format!("term {} below the previous entry's {}", first.term, self.log_term),
            ));
        }
        Ok(())
    }
}

fn invalid(field: &'static str, offset: usize, reason: String) -> DecodeError {
    DecodeError::Invalid { field, offset, reason }
}

fn read_term(r: &mut Reader, field: &'static str) -> Result<u64, DecodeError> {
    let at = r.position();
    let t = r.u64()?;
    if t > MAX_RAFT_TERM {
        return Err(DecodeError::TooLarge { field, offset: at, value: t, limit: MAX_RAFT_TERM });
    }
    Ok(t)
}

/// Entries: counted and sized against their limits before anything is allocated; contiguous
/// indexes, terms never decreasing and never past the message's.
fn entries(r: &mut Reader, message_term: u64) -> Result<Vec<RaftEntry>, DecodeError> {
    let at = r.position();
    let count = r.u32()? as usize;
    check_limit("entries", at, count, MAX_RAFT_ENTRIES_PER_MESSAGE)?;
    if r.remaining() < count.saturating_mul(ENTRY_MIN_BYTES) {
        return Err(DecodeError::Truncated {
            offset: at,
            need: count * ENTRY_MIN_BYTES,
            have: r.remaining(),
        });
    }
    let mut out: Vec<RaftEntry> = Vec::with_capacity(count);
    let mut data_bytes = 0usize;
    for _ in 0..count {
        let at = r.position();
        let kind = r.u8()?;
        let entry_type = RaftEntryType::from_u8(kind)
            .ok_or_else(|| invalid("entry type", at, format!("{kind} is unknown")))?;
        let entry_term = read_term(r, "entry term")?;
        let index = r.u64()?;
        let data = r.bytes("entry data", MAX_BATCH_BYTES)?;
        let context = r.bytes("entry context", MAX_RAFT_CONTEXT_BYTES)?;
        data_bytes += data.len();
        check_limit("entry data in one message", at, data_bytes, MAX_RAFT_MESSAGE_BYTES)?;
        if entry_term > message_term {
            return Err(invalid(
                "entry term",
                at,
                format!("{entry_term} is past the message's {message_term}"),
            ));
        }
        if let Some(prev) = out.last() {
            if Some(index) != prev.index.checked_add(1) {
                return Err(invalid("entry index", at, format!("{index} does not follow {}", prev.index)));
            }
            if entry_term < prev.term {
                return Err(invalid(
                    "entry term",
                    at,
                    format!("{entry_term} is below the previous {}", prev.term),
                ));
            }
        }
        out.push(RaftEntry { entry_type, term: entry_term, index, data, context });
    }
    Ok(out)
}

fn ids(r: &mut Reader, field: &'static str) -> Result<Vec<u64>, DecodeError> {
    let at = r.position();
    let count = r.u32()? as usize;
    check_limit(field, at, count, MAX_RAFT_VOTERS)?;
    (0..count).map(|_| r.u64()).collect()
}

fn snapshot(r: &mut Reader) -> Result<RaftSnapshot, DecodeError> {
    let index = r.u64()?;
    let term = read_term(r, "snapshot term")?;
    let conf_state = RaftConfState {
        voters: ids(r, "voters")?,
        learners: ids(r, "learners")?,
        voters_outgoing: ids(r, "outgoing voters")?,
        learners_next: ids(r, "next learners")?,
        auto_leave: r.bool()?,
    };
    let data = r.bytes("snapshot data", MAX_RAFT_SNAPSHOT_BYTES)?;
    Ok(RaftSnapshot { index, term, conf_state, data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn append(index: u64, terms: &[u64]) -> RaftMessage {
        let mut m = RaftMessage::new(7, RaftMessageType::Append, 1, 2, *terms.last().unwrap_or(&1));
        m.index = index;
        m.log_term = terms.first().copied().unwrap_or(1);
        m.entries = terms
            .iter()
            .enumerate()
            .map(|(i, &t)| RaftEntry {
                entry_type: RaftEntryType::Normal,
                term: t,
                index: index + 1 + i as u64,
                data: Bytes::from(vec![i as u8; 10 + i]),
                context: Bytes::new(),
            })
            .collect();
        m.commit = index;
        m
    }

    fn encoded(m: &RaftMessage) -> Bytes {
        let mut buf = BytesMut::new();
        m.encode(&mut buf);
        assert_eq!(buf.len(), m.encoded_len(), "encoded_len");
        buf.freeze()
    }

    /// Rewrites the u8 at `at` of an encoded message.
    fn with_byte(bytes: &Bytes, at: usize, v: u8) -> Bytes {
        let mut b = bytes.to_vec();
        b[at] = v;
        Bytes::from(b)
    }

    const TYPE_AT: usize = 1 + 8;

    #[test]
    fn an_append_with_a_snapshot_free_body_round_trips_zero_copy() {
        let m = append(41, &[3, 3, 4]);
        let bytes = encoded(&m);
        let back = RaftMessage::decode(bytes.clone()).expect("decodes");
        assert_eq!(back, m);
        let data = &back.entries[2].data;
        let start = data.as_ptr() as usize - bytes.as_ptr() as usize;
        assert!(start < bytes.len(), "entry data is a slice of the message, not a copy");
    }

    #[test]
    fn a_snapshot_message_round_trips() {
        let mut m = RaftMessage::new(0, RaftMessageType::Snapshot, 3, 1, 9);
        m.snapshot = Some(RaftSnapshot {
            index: 1000,
            term: 8,
            conf_state: RaftConfState {
                voters: vec![1, 2, 3],
                learners: vec![4],
                auto_leave: true,
                ..Default::default()
            },
            data: Bytes::from_static(b"position and producers"),
        });
        assert_eq!(RaftMessage::decode(encoded(&m)).expect("decodes"), m);
    }

    #[test]
    fn kinds_peers_may_not_send_are_refused() {
        let bytes = encoded(&RaftMessage::new(1, RaftMessageType::Heartbeat, 1, 2, 5));
        assert!(RaftMessage::decode(bytes.clone()).is_ok());
        // MsgHup, MsgBeat, MsgPropose, MsgUnreachable, MsgSnapStatus, MsgCheckQuorum,
        // MsgTransferLeader, MsgReadIndex(Resp), and anything unknown.
        for kind in [0u8, 1, 2, 10, 11, 12, 13, 15, 16, 19, 255] {
            let err = RaftMessage::decode(with_byte(&bytes, TYPE_AT, kind)).expect_err("accepted");
            assert!(err.to_string().contains("message type"), "{kind}: {err}");
        }
    }

    #[test]
    fn terms_beyond_a_batch_epoch_are_refused() {
        let mut m = RaftMessage::new(1, RaftMessageType::RequestVote, 1, 2, MAX_RAFT_TERM);
        assert!(RaftMessage::decode(encoded(&m)).is_ok());
        m.term = MAX_RAFT_TERM + 1;
        let err = RaftMessage::decode(encoded(&m)).expect_err("accepted");
        assert!(matches!(err, DecodeError::TooLarge { field: "term", .. }), "{err}");
        let mut m = append(5, &[2, 3]);
        m.commit_term = u64::MAX;
        assert!(RaftMessage::decode(encoded(&m)).is_err(), "commit term u64::MAX");
    }

    #[test]
    fn entries_must_be_contiguous_follow_the_named_entry_and_never_go_back_in_term() {
        let gap = {
            let mut m = append(10, &[2, 2, 2]);
            m.entries[2].index += 1;
            m
        };
        let not_next = {
            let mut m = append(10, &[2, 2]);
            m.index = 8;
            m
        };
        let back_in_term = append(10, &[3, 2]);
        let past_message = {
            let mut m = append(10, &[2, 3]);
            m.term = 2;
            m
        };
        let on_a_heartbeat = {
            let mut m = append(10, &[2]);
            m.msg_type = RaftMessageType::Heartbeat;
            m
        };
        for (name, m) in [
            ("gap", gap),
            ("not after index", not_next),
            ("term goes back", back_in_term),
            ("term past the message", past_message),
            ("entries on a heartbeat", on_a_heartbeat),
        ] {
            let err = RaftMessage::decode(encoded(&m)).expect_err(name);
            assert!(matches!(err, DecodeError::Invalid { .. }), "{name}: {err}");
        }
        let wrap = {
            let mut m = append(u64::MAX - 1, &[2]);
            m.entries[0].index = u64::MAX;
            m
        };
        assert!(RaftMessage::decode(encoded(&wrap)).is_ok(), "the last index there is");
        let past_the_end = {
            let mut m = append(5, &[2]);
            m.index = u64::MAX;
            m.entries[0].index = 0;
            m
        };
        assert!(RaftMessage::decode(encoded(&past_the_end)).is_err(), "an index past u64::MAX");
    }

    #[test]
    fn counts_are_checked_before_anything_is_allocated() {
        let bytes = encoded(&append(0, &[]));
        // The entry count sits right after the five u64 after the type byte.
        let count_at = TYPE_AT + 1 + 5 * 8;
        let mut b = bytes.to_vec();
        b[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = RaftMessage::decode(Bytes::from(b.clone())).expect_err("accepted");
        assert!(matches!(err, DecodeError::TooLarge { field: "entries", .. }), "{err}");
        b[count_at..count_at + 4].copy_from_slice(&(MAX_RAFT_ENTRIES_PER_MESSAGE as u32).to_le_bytes());
        let err = RaftMessage::decode(Bytes::from(b)).expect_err("accepted");
        assert!(matches!(err, DecodeError::Truncated { .. }), "a count the bytes cannot hold: {err}");
    }

    fn arb_entry_types() -> impl Strategy<Value = RaftEntryType> {
        prop_oneof![
            Just(RaftEntryType::Normal),
            Just(RaftEntryType::ConfChange),
            Just(RaftEntryType::ConfChangeV2)
        ]
    }

    fn arb_message() -> impl Strategy<Value = RaftMessage> {
        let types = prop_oneof![
            Just(RaftMessageType::Append),
            Just(RaftMessageType::AppendResponse),
            Just(RaftMessageType::RequestVote),
            Just(RaftMessageType::RequestVoteResponse),
            Just(RaftMessageType::Snapshot),
            Just(RaftMessageType::Heartbeat),
            Just(RaftMessageType::HeartbeatResponse),
            Just(RaftMessageType::TimeoutNow),
            Just(RaftMessageType::RequestPreVote),
            Just(RaftMessageType::RequestPreVoteResponse),
        ];
        (
            types,
            any::<u64>(),
            0..=MAX_RAFT_TERM,
            0..1_000_000u64,
            proptest::collection::vec(
                (arb_entry_types(), proptest::collection::vec(any::<u8>(), 0..64)),
                0..6,
            ),
            proptest::option::of((
                any::<u64>(),
                proptest::collection::vec(any::<u64>(), 0..5),
                any::<bool>(),
            )),
            (
                any::<u64>(),
                any::<bool>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..16),
                any::<i64>(),
            ),
        )
            .prop_map(
                |(
                    msg_type,
                    group,
                    term,
                    index,
                    entries,
                    snapshot,
                    (commit, reject, hint, context, priority),
                )| {
                    let mut m = RaftMessage::new(group, msg_type, 1, 2, term);
                    m.index = index;
                    m.log_term = term / 2;
                    if msg_type == RaftMessageType::Append {
                        m.entries = entries
                            .into_iter()
                            .enumerate()
                            .map(|(i, (entry_type, data))| RaftEntry {
                                entry_type,
                                term,
                                index: index + 1 + i as u64,
                                data: Bytes::from(data),
                                context: Bytes::new(),
                            })
                            .collect();
                    }
                    m.commit = commit;
                    m.commit_term = term;
                    m.snapshot = snapshot.map(|(i, voters, auto_leave)| RaftSnapshot {
                        index: i,
                        term,
                        conf_state: RaftConfState { voters, auto_leave, ..Default::default() },
                        data: Bytes::from_static(b"s"),
                    });
                    m.reject = reject;
                    m.reject_hint = hint;
                    m.context = Bytes::from(context);
                    m.priority = priority;
                    m
                },
            )
    }

    proptest! {
        #![proptest_config(crate::fuzz::config(512))]

        #[test]
        fn valid_messages_round_trip(m in arb_message()) {
            prop_assert_eq!(RaftMessage::decode(encoded(&m)).expect("decodes"), m);
        }

        /// Hostile bytes: random input, and valid messages cut short or with a byte changed,
        /// give an error or a message that encodes back to the same bytes; never a panic.
        #[test]
        fn hostile_bytes_never_panic(
            m in arb_message(),
            garbage in proptest::collection::vec(any::<u8>(), 0..256),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let _ = RaftMessage::decode(Bytes::from(garbage));
            let bytes = encoded(&m);
            let _ = RaftMessage::decode(bytes.slice(..cut.index(bytes.len())));
            let flipped = with_byte(&bytes, flip.index(bytes.len()), byte);
            if let Ok(back) = RaftMessage::decode(flipped.clone()) {
                prop_assert_eq!(encoded(&back), flipped);
            }
        }

        /// Several mutations at once (length and count fields set to their worst values,
        /// bytes inserted or removed): an error, or a message that encodes to the same bytes.
        #[test]
        fn mutated_messages_decode_or_fail(m in arb_message(), muts in crate::fuzz::mutations()) {
            let bytes = Bytes::from(crate::fuzz::apply(&encoded(&m), &muts));
            if let Ok(back) = RaftMessage::decode(bytes.clone()) {
                prop_assert_eq!(encoded(&back), bytes);
            }
        }
    }
}
