//! Hostile bytes in a replica's durable files: the snapshot data (`SnapshotData`) and the
//! `raft-state` file. Arbitrary bytes, and valid encodings mutated with and without their CRC
//! made to match again: an error or a value that round-trips, never a panic. And what the
//! network hands raft-rs: any message our codec decodes from mutated bytes converts to
//! raft-rs's form (`wire::from_wire`) and back unchanged.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use quiver_protocol::raft::{
    RaftConfState, RaftEntry, RaftEntryType, RaftMessage, RaftMessageType, RaftSnapshot,
};

use super::snapshot::SnapshotData;
use super::state::DurableState;
use super::wire::{from_wire, to_wire};
use crate::fuzz;

fn message_type() -> impl Strategy<Value = RaftMessageType> {
    use RaftMessageType::*;
    prop::sample::select(vec![
        Append,
        AppendResponse,
        RequestVote,
        RequestVoteResponse,
        Snapshot,
        Heartbeat,
        HeartbeatResponse,
        TimeoutNow,
        RequestPreVote,
        RequestPreVoteResponse,
    ])
}

fn raft_message() -> impl Strategy<Value = RaftMessage> {
    let entry_type = prop::sample::select(vec![
        RaftEntryType::Normal,
        RaftEntryType::ConfChange,
        RaftEntryType::ConfChangeV2,
    ]);
    let entries = proptest::collection::vec(
        (entry_type, any::<u64>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..32)),
        0..4,
    );
    let ids = || proptest::collection::vec(any::<u64>(), 0..4);
    let snapshot =
        proptest::option::of((any::<u64>(), any::<u64>(), (ids(), ids(), ids(), ids(), any::<bool>())));
    (
        (message_type(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        (any::<u64>(), any::<u64>(), entries, any::<u64>(), any::<u64>()),
        snapshot,
        (
            any::<u64>(),
            any::<bool>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..8),
            any::<i64>(),
        ),
    )
        .prop_map(
            |((t, group, from, to, term), (log_term, index, entries, commit, commit_term), snap, rest)| {
                let mut m = RaftMessage::new(group, t, from, to, term);
                (m.log_term, m.index, m.commit, m.commit_term) = (log_term, index, commit, commit_term);
                m.entries = entries
                    .into_iter()
                    .map(|(entry_type, term, index, data)| RaftEntry {
                        entry_type,
                        term,
                        index,
                        data: Bytes::from(data),
                        context: Bytes::new(),
                    })
                    .collect();
                m.snapshot = snap.map(
                    |(index, term, (voters, learners, voters_outgoing, learners_next, auto_leave))| {
                        RaftSnapshot {
                            index,
                            term,
                            conf_state: RaftConfState {
                                voters,
                                learners,
                                voters_outgoing,
                                learners_next,
                                auto_leave,
                            },
                            data: Bytes::from_static(b"snap"),
                        }
                    },
                );
                let (request_snapshot, reject, reject_hint, context, priority) = rest;
                (m.request_snapshot, m.reject, m.reject_hint) = (request_snapshot, reject, reject_hint);
                (m.context, m.priority) = (Bytes::from(context), priority);
                m
            },
        )
}

fn encoded(m: &RaftMessage) -> Bytes {
    let mut buf = BytesMut::new();
    m.encode(&mut buf);
    buf.freeze()
}

/// raft-rs's form of `m` converts back to `m`.
fn converts_back(m: RaftMessage) -> Result<(), TestCaseError> {
    let back = to_wire(m.group, &from_wire(m.clone()));
    prop_assert_eq!(back, Some(m));
    Ok(())
}

proptest! {
    #![proptest_config(fuzz::config(256))]

    #[test]
    fn snapshot_data(
        (index, extra) in (1..u64::MAX / 2, 0..u64::MAX / 2),
        muts in fuzz::mutations(),
        fix_crc in any::<bool>(),
        junk in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let _ = SnapshotData::decode(&junk);
        let data = SnapshotData { log_start_offset: index + extra, index, conf_index: 0 };
        prop_assert_eq!(SnapshotData::decode(&data.encode()), Ok(data));
        fuzz::decodes_or_fails(&data.encode(), &muts, fix_crc, SnapshotData::decode, |d| d.encode().to_vec())?;
    }

    #[test]
    fn raft_state(
        (term, commit, snapshot_index, snapshot_term) in (0..1u64 << 31, any::<u64>(), any::<u64>(), 0..1u64 << 31),
        voters in proptest::collection::vec(any::<u64>(), 0..5),
        muts in fuzz::mutations(),
        fix_crc in any::<bool>(),
        junk in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let _ = DurableState::decode(&junk);
        let mut state = DurableState { snapshot_index, snapshot_term, ..Default::default() };
        state.hard_state.term = term;
        state.hard_state.commit = commit;
        state.conf_state.voters = voters;
        if let Ok(back) = DurableState::decode(&state.encode()) {
            prop_assert_eq!(back, state.clone());
        }
        fuzz::decodes_or_fails(&state.encode(), &muts, fix_crc, DurableState::decode, DurableState::encode)?;
    }

    #[test]
    fn decoded_messages_convert_for_raft_and_back(
        m in raft_message(),
        muts in fuzz::mutations(),
        junk in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        if let Ok(w) = RaftMessage::decode(Bytes::from(junk)) {
            converts_back(w)?;
        }
        converts_back(m.clone())?;
        if let Ok(w) = RaftMessage::decode(Bytes::from(fuzz::apply(&encoded(&m), &muts))) {
            converts_back(w)?;
        }
    }
}
