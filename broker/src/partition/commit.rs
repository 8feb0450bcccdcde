//! The partition's commit offset and the produce acknowledgements waiting for it.
//!
//! An append is acknowledged when the commit offset passes its last offset, not when its group
//! is written. On one node the commit offset is the durable offset (design.md §6: under
//! `always` what the last fsync covered, otherwise what is written); with replication it will
//! be the commit index. Plain data, no IO, no clock: the partition's writer task pushes the
//! acks of a group, then advances the offset (or fails the acks) and sends what is released,
//! on its own task, without a channel hop per message.

use std::collections::VecDeque;

/// Acknowledgements ordered by the offset they wait for, and the commit offset.
#[derive(Debug)]
pub(crate) struct CommitQueue<T> {
    /// Every offset below this is committed. Never decreases; at most the log end.
    commit: u64,
    /// (last offset, ack), ascending by last offset.
    pending: VecDeque<(u64, T)>,
}

impl<T> CommitQueue<T> {
    /// A queue whose commit offset starts at `commit` (at open: the recovered log end, all of
    /// which is durable on one node).
    pub(crate) fn new(commit: u64) -> Self {
        CommitQueue { commit, pending: VecDeque::new() }
    }

    /// Every offset below this is committed.
    #[cfg(test)]
    pub(crate) fn commit_offset(&self) -> u64 {
        self.commit
    }

    /// Queues `ack` until the commit offset passes `last_offset`. It is released by the next
    /// [`advance`](Self::advance) that covers it, even one that does not move the offset (a
    /// retry answered with the offsets of a batch committed before). Appends arrive in offset
    /// order, so this is a push at the back; only such retries are inserted further in.
    pub(crate) fn push(&mut self, last_offset: u64, ack: T) {
        if self.pending.back().is_none_or(|(last, _)| *last <= last_offset) {
            self.pending.push_back((last_offset, ack));
        } else {
            let at = self.pending.partition_point(|(last, _)| *last <= last_offset);
            self.pending.insert(at, (last_offset, ack));
        }
    }

    /// Moves the commit offset to `commit` and returns the acks it releases, in offset order.
    /// Panics if `commit` is past `log_end` or below the current commit offset: either is a bug
    /// that would acknowledge data that is not there, or take back an acknowledgement.
    pub(crate) fn advance(&mut self, commit: u64, log_end: u64) -> impl Iterator<Item = T> + '_ {
        assert!(commit <= log_end, "commit offset {commit} is past the log end {log_end}");
        assert!(commit >= self.commit, "commit offset would move back from {} to {commit}", self.commit);
        self.commit = commit;
        let released = self.pending.partition_point(|(last, _)| *last < commit);
        self.pending.drain(..released).map(|(_, ack)| ack)
    }

    /// Takes every waiting ack, to be failed (a failed write or fsync: what it covered will
    /// never be committed by this log). The commit offset stays.
    pub(crate) fn fail_all(&mut self) -> impl Iterator<Item = T> + '_ {
        self.pending.drain(..).map(|(_, ack)| ack)
    }

    /// Acks waiting.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_released_in_offset_order_once_the_commit_offset_passes_them() {
        let mut q = CommitQueue::new(10);
        q.push(10, "a"); // offsets 10..=10
        q.push(14, "b"); // 11..=14
        q.push(15, "c");
        assert_eq!(q.advance(10, 16).collect::<Vec<_>>(), Vec::<&str>::new(), "nothing passed yet");
        assert_eq!(q.advance(11, 16).collect::<Vec<_>>(), ["a"]);
        assert_eq!(q.advance(14, 16).collect::<Vec<_>>(), Vec::<&str>::new(), "b's last offset is 14");
        assert_eq!(q.advance(16, 16).collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!((q.commit_offset(), q.len()), (16, 0));
    }

    #[test]
    fn a_retry_answered_with_older_offsets_waits_only_for_those() {
        let mut q = CommitQueue::new(0);
        q.push(4, "first");
        q.push(9, "second");
        q.push(4, "retry of first");
        q.push(12, "third");
        assert_eq!(q.advance(5, 13).collect::<Vec<_>>(), ["first", "retry of first"]);
        // Already committed: released by the next advance, even one that does not move.
        q.push(2, "retry of an old batch");
        assert_eq!(q.advance(5, 13).collect::<Vec<_>>(), ["retry of an old batch"]);
        assert_eq!(q.advance(13, 13).collect::<Vec<_>>(), ["second", "third"]);
    }

    #[test]
    fn a_failure_takes_every_waiting_ack_and_keeps_the_commit_offset() {
        let mut q = CommitQueue::new(3);
        q.push(5, 1);
        q.push(8, 2);
        assert_eq!(q.fail_all().collect::<Vec<_>>(), [1, 2]);
        assert_eq!((q.commit_offset(), q.len()), (3, 0));
        assert_eq!(q.advance(9, 9).count(), 0);
    }

    #[test]
    #[should_panic(expected = "move back")]
    fn the_commit_offset_never_decreases() {
        let mut q = CommitQueue::<()>::new(5);
        let _ = q.advance(4, 10);
    }

    #[test]
    #[should_panic(expected = "past the log end")]
    fn the_commit_offset_never_passes_the_log_end() {
        let mut q = CommitQueue::<()>::new(5);
        let _ = q.advance(11, 10);
    }
}
