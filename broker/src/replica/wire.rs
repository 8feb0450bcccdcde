//! Conversion between raft-rs's `Message` and our wire type (`protocol::raft::RaftMessage`):
//! raft-rs never sees bytes from the network, only what our codec decoded and `admit` checked
//! (docs/replication.md §1).

use quiver_protocol::raft::{
    RaftConfState, RaftEntry, RaftEntryType, RaftMessage, RaftMessageType, RaftSnapshot,
};
use raft::eraftpb::{ConfState, Entry, EntryType, Message, MessageType, Snapshot};

/// The wire form of a message raft-rs wants sent, for Raft group `group`. `None` for kinds that
/// never leave a broker (raft-rs only emits peer kinds in `Ready`; this is the check).
pub(crate) fn to_wire(group: u64, m: &Message) -> Option<RaftMessage> {
    use MessageType::*;
    let msg_type = match m.get_msg_type() {
        MsgAppend => RaftMessageType::Append,
        MsgAppendResponse => RaftMessageType::AppendResponse,
        MsgRequestVote => RaftMessageType::RequestVote,
        MsgRequestVoteResponse => RaftMessageType::RequestVoteResponse,
        MsgSnapshot => RaftMessageType::Snapshot,
        MsgHeartbeat => RaftMessageType::Heartbeat,
        MsgHeartbeatResponse => RaftMessageType::HeartbeatResponse,
        MsgTimeoutNow => RaftMessageType::TimeoutNow,
        MsgRequestPreVote => RaftMessageType::RequestPreVote,
        MsgRequestPreVoteResponse => RaftMessageType::RequestPreVoteResponse,
        _ => return None,
    };
    let mut w = RaftMessage::new(group, msg_type, m.from, m.to, m.term);
    w.log_term = m.log_term;
    w.index = m.index;
    w.entries = m
        .get_entries()
        .iter()
        .map(|e| RaftEntry {
            entry_type: match e.get_entry_type() {
                EntryType::EntryNormal => RaftEntryType::Normal,
                EntryType::EntryConfChange => RaftEntryType::ConfChange,
                EntryType::EntryConfChangeV2 => RaftEntryType::ConfChangeV2,
            },
            term: e.term,
            index: e.index,
            data: e.data.clone(),
            context: e.context.clone(),
        })
        .collect();
    w.commit = m.commit;
    w.commit_term = m.commit_term;
    if m.has_snapshot() {
        let s = m.get_snapshot();
        let md = s.get_metadata();
        let cs = md.get_conf_state();
        w.snapshot = Some(RaftSnapshot {
            index: md.index,
            term: md.term,
            conf_state: RaftConfState {
                voters: cs.get_voters().to_vec(),
                learners: cs.get_learners().to_vec(),
                voters_outgoing: cs.get_voters_outgoing().to_vec(),
                learners_next: cs.get_learners_next().to_vec(),
                auto_leave: cs.get_auto_leave(),
            },
            data: s.data.clone(),
        });
    }
    w.request_snapshot = m.request_snapshot;
    w.reject = m.reject;
    w.reject_hint = m.reject_hint;
    w.context = m.context.clone();
    w.priority = m.priority;
    Some(w)
}

/// raft-rs's form of a decoded wire message (the group is the caller's to route by).
pub(crate) fn from_wire(w: RaftMessage) -> Message {
    let mut m = Message::default();
    m.set_msg_type(match w.msg_type {
        RaftMessageType::Append => MessageType::MsgAppend,
        RaftMessageType::AppendResponse => MessageType::MsgAppendResponse,
        RaftMessageType::RequestVote => MessageType::MsgRequestVote,
        RaftMessageType::RequestVoteResponse => MessageType::MsgRequestVoteResponse,
        RaftMessageType::Snapshot => MessageType::MsgSnapshot,
        RaftMessageType::Heartbeat => MessageType::MsgHeartbeat,
        RaftMessageType::HeartbeatResponse => MessageType::MsgHeartbeatResponse,
        RaftMessageType::TimeoutNow => MessageType::MsgTimeoutNow,
        RaftMessageType::RequestPreVote => MessageType::MsgRequestPreVote,
        RaftMessageType::RequestPreVoteResponse => MessageType::MsgRequestPreVoteResponse,
    });
    m.to = w.to;
    m.from = w.from;
    m.term = w.term;
    m.log_term = w.log_term;
    m.index = w.index;
    let entries: Vec<Entry> = w
        .entries
        .into_iter()
        .map(|e| {
            let mut entry = Entry::default();
            entry.set_entry_type(match e.entry_type {
                RaftEntryType::Normal => EntryType::EntryNormal,
                RaftEntryType::ConfChange => EntryType::EntryConfChange,
                RaftEntryType::ConfChangeV2 => EntryType::EntryConfChangeV2,
            });
            entry.term = e.term;
            entry.index = e.index;
            entry.data = e.data;
            entry.context = e.context;
            entry
        })
        .collect();
    m.set_entries(entries.into());
    m.commit = w.commit;
    m.commit_term = w.commit_term;
    if let Some(s) = w.snapshot {
        let mut snap = Snapshot::default();
        let md = snap.mut_metadata();
        md.index = s.index;
        md.term = s.term;
        let mut cs = ConfState::default();
        cs.set_voters(s.conf_state.voters);
        cs.set_learners(s.conf_state.learners);
        cs.set_voters_outgoing(s.conf_state.voters_outgoing);
        cs.set_learners_next(s.conf_state.learners_next);
        cs.set_auto_leave(s.conf_state.auto_leave);
        md.set_conf_state(cs);
        snap.data = s.data;
        m.set_snapshot(snap);
    }
    m.request_snapshot = w.request_snapshot;
    m.reject = w.reject;
    m.reject_hint = w.reject_hint;
    m.context = w.context;
    m.priority = w.priority;
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};

    #[test]
    fn an_append_survives_the_round_trip_through_our_codec() {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        (m.from, m.to, m.term, m.log_term, m.index, m.commit) = (1, 2, 7, 6, 41, 40);
        let mut e = Entry::default();
        (e.term, e.index) = (7, 42);
        e.data = Bytes::from_static(b"batch bytes");
        m.set_entries(vec![e].into());
        let wire = to_wire(9, &m).expect("a peer kind");
        let mut buf = BytesMut::new();
        wire.encode(&mut buf);
        let back = RaftMessage::decode(buf.freeze()).expect("decodes");
        assert_eq!(back.group, 9);
        assert_eq!(from_wire(back), m);
    }

    #[test]
    fn local_kinds_are_never_sent() {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgPropose);
        assert!(to_wire(1, &m).is_none());
    }
}
