//! What a peer's message must pass before raft-rs `step`s it (docs/replication.md §1). raft-rs
//! trusts its input: in the spike it panicked on a heartbeat whose commit is past the local log
//! end and on terms near `u64::MAX`, and it follows an append from any id. `protocol::raft`
//! already refuses kinds peers may not send, oversized terms and gapped entries on the wire;
//! this checks what needs the replica's own state, and is the one gate whatever the transport.

use quiver_protocol::limits::MAX_RAFT_TERM;
use raft::eraftpb::{Message, MessageType};
use raft::RawNode;

use super::LogStorage;

/// Why a peer's message was not stepped. The message is dropped (and counted); the sender
/// retries as Raft does for any lost message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error("message for replica {to}, this is {me}")]
    NotForMe { to: u64, me: u64 },
    #[error("{0:?} is not a kind peers send")]
    LocalKind(MessageType),
    #[error("term {0} is past the largest a batch can carry")]
    TermTooLarge(u64),
    #[error("sender {0} is not a member of the group")]
    UnknownSender(u64),
}

/// Checks `m` for `node`, and clamps a heartbeat's commit to the local log end.
///
/// Why clamp and not refuse: a leader sends `min(match, commit)`, which is past the log end
/// only when this replica lost entries it had acknowledged (damage found at recovery, §7): it
/// must keep hearing from the leader to repair, and a lower commit is always safe (the commit
/// only moves forward, and the appends that follow carry the real one).
pub(crate) fn admit(node: &RawNode<LogStorage>, m: &mut Message) -> Result<(), Refused> {
    let me = node.raft.id;
    if m.to != me {
        return Err(Refused::NotForMe { to: m.to, me });
    }
    use MessageType::*;
    match m.get_msg_type() {
        MsgAppend
        | MsgAppendResponse
        | MsgRequestVote
        | MsgRequestVoteResponse
        | MsgSnapshot
        | MsgHeartbeat
        | MsgHeartbeatResponse
        | MsgTimeoutNow
        | MsgRequestPreVote
        | MsgRequestPreVoteResponse => {}
        other => return Err(Refused::LocalKind(other)),
    }
    for term in [m.term, m.log_term, m.commit_term] {
        if term > MAX_RAFT_TERM {
            return Err(Refused::TermTooLarge(term));
        }
    }
    if let Some(t) = m.get_entries().iter().map(|e| e.term).find(|&t| t > MAX_RAFT_TERM) {
        return Err(Refused::TermTooLarge(t));
    }
    // A leader's messages are followed from a sender outside this replica's configuration: a
    // replica added to a running group starts from the group's first configuration and learns
    // the rest from the log its leader sends, and that leader may have joined later (found by
    // `sim_a_replica_added_under_a_leader_that_joined_later_catches_up`: such a replica never
    // caught up, and the move never ended). Raft needs no membership check there: a leader of
    // a term is the only one its voters elected, and a stale one's term is refused by raft-rs.
    // Peers are authenticated brokers (the link's id is the sender's, `Cluster::deliver`).
    // Votes and responses still come only from members.
    let from_leader = matches!(m.get_msg_type(), MsgAppend | MsgHeartbeat | MsgSnapshot);
    let conf = node.raft.prs().conf();
    if !from_leader && !conf.voters().contains(m.from) && !conf.learners().contains(&m.from) {
        return Err(Refused::UnknownSender(m.from));
    }
    if m.get_msg_type() == MsgHeartbeat {
        let last = node.raft.raft_log.last_index();
        if m.commit > last {
            m.commit = last;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{LogConfig, PartitionLog};
    use crate::replica::{config, raft_logger};
    use crate::storage::{MemStorage, Storage};
    use parking_lot::Mutex;
    use std::sync::Arc;

    fn node() -> RawNode<LogStorage> {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let (log, _) =
            PartitionLog::open(storage.clone(), "/p".into(), LogConfig::default(), 0).expect("log");
        let mut s = LogStorage::open(Arc::new(Mutex::new(log)), storage, &[1, 2, 3]).expect("opens");
        s.set_conf_state(raft::eraftpb::ConfState::from((vec![1, 2, 3], vec![4])), 0).expect("conf");
        RawNode::new(&config(1, 0), s, &raft_logger()).expect("node")
    }

    fn msg(kind: MessageType, from: u64, to: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.from = from;
        m.to = to;
        m.term = 1;
        m
    }

    #[test]
    fn members_messages_pass_and_others_are_refused() {
        let n = node();
        assert_eq!(admit(&n, &mut msg(MessageType::MsgRequestVote, 2, 1)), Ok(()));
        assert_eq!(admit(&n, &mut msg(MessageType::MsgAppendResponse, 4, 1)), Ok(()), "a learner");
        // A leader's messages from outside the configuration this replica has applied so far
        // (it may have joined after the group began); anything else from there is refused.
        for kind in [MessageType::MsgAppend, MessageType::MsgHeartbeat, MessageType::MsgSnapshot] {
            assert_eq!(admit(&n, &mut msg(kind, 9, 1)), Ok(()), "{kind:?}");
        }
        for kind in [
            MessageType::MsgRequestVote,
            MessageType::MsgRequestPreVote,
            MessageType::MsgAppendResponse,
            MessageType::MsgHeartbeatResponse,
            MessageType::MsgTimeoutNow,
        ] {
            assert_eq!(admit(&n, &mut msg(kind, 9, 1)), Err(Refused::UnknownSender(9)), "{kind:?}");
        }
        assert_eq!(
            admit(&n, &mut msg(MessageType::MsgAppend, 2, 3)),
            Err(Refused::NotForMe { to: 3, me: 1 })
        );
        for kind in [
            MessageType::MsgPropose,
            MessageType::MsgHup,
            MessageType::MsgTransferLeader,
            MessageType::MsgReadIndex,
        ] {
            assert_eq!(admit(&n, &mut msg(kind, 2, 1)), Err(Refused::LocalKind(kind)));
        }
        let mut huge = msg(MessageType::MsgHeartbeat, 2, 1);
        huge.term = u64::MAX;
        assert_eq!(admit(&n, &mut huge), Err(Refused::TermTooLarge(u64::MAX)));
        let mut entry_term = msg(MessageType::MsgAppend, 2, 1);
        entry_term.mut_entries().push(raft::eraftpb::Entry { term: MAX_RAFT_TERM + 1, ..Default::default() });
        assert_eq!(admit(&n, &mut entry_term), Err(Refused::TermTooLarge(MAX_RAFT_TERM + 1)));
    }

    /// raft-rs panics on a heartbeat whose commit is past the log end (what a leader sends a
    /// replica that lost acknowledged entries): clamped, it is stepped safely.
    #[test]
    fn a_heartbeat_commit_past_the_log_end_is_clamped_and_steps_without_a_panic() {
        let mut n = node();
        let mut m = msg(MessageType::MsgHeartbeat, 2, 1);
        m.commit = 1_000;
        admit(&n, &mut m).expect("admitted");
        assert_eq!(m.commit, n.raft.raft_log.last_index());
        n.step(m).expect("stepped");
        let mut unclamped = msg(MessageType::MsgHeartbeat, 2, 1);
        unclamped.commit = 1_000;
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| n.step(unclamped)));
        assert!(panicked.is_err(), "raft-rs no longer panics here: the clamp may be unnecessary");
    }
}
