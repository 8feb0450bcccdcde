//! Producer ids in a cluster (docs/replication.md §2c): the controller's leader issues them,
//! from blocks of counters the controller log reserves, and every broker checks them against
//! what that log says.
//!
//! - **Never the same id twice**: a block is a range of the one counter the controller log
//!   advances; a command reserves the next `ID_BLOCK` counters for the broker that proposed it,
//!   and every broker applies the commands in the same order. A broker hands out ids from the
//!   block only after the command reserving it is committed and applied, and a restarted or
//!   newly elected leader starts a new block (what it handed out before is not recorded).
//! - **One key**: ids are `counter << 31 | tag`, the tag an HMAC of the counter (design.md
//!   §10). The first reservation carries a random key and every later one keeps it, so every
//!   broker can check any id: counter below the end of the blocks reserved so far, tag right.
//! - **Checked where the batch is led**: a block reserved a moment ago may not be applied on
//!   the partition's leader yet, so an id above what it knows waits for the controller log
//!   (up to [`TOPIC_WAIT`](super::TOPIC_WAIT)) before it is refused.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;

use dashmap::DashMap;
use quiver_protocol::ErrorCode;

use crate::partition::PartitionError;
use crate::producers::{check_id, make_id, ProducerIdError, ID_BLOCK, MAX_COUNTER};

/// What the controller log says of producer ids, and the block this broker issues from.
#[derive(Debug, Default)]
pub(crate) struct ClusterProducerIds {
    /// The key of every id, from the first reservation.
    key: OnceLock<ring::hmac::Key>,
    /// The end of the counters reserved so far.
    reserved_below: AtomicI64,
    /// Blocks this broker reserved, by the controller index of their command, until taken.
    mine: DashMap<u64, (i64, i64)>,
    /// The block this broker hands ids out of: (next counter, end).
    issuing: tokio::sync::Mutex<(i64, i64)>,
    /// A background reservation of a spare block is under way.
    pub(crate) reserving: std::sync::atomic::AtomicBool,
    /// The last index of the controller log when this broker started: reservations up to it
    /// are not this run's to issue from.
    replayed_through: std::sync::atomic::AtomicU64,
}

impl ClusterProducerIds {
    /// Applies a committed reservation (every broker, in log order).
    pub(crate) fn apply(
        &self,
        index: u64,
        reserving: bool,
        count: i64,
        key_hex: &str,
    ) -> Result<(), PartitionError> {
        if self.key.get().is_none() {
            let key = decode_key(key_hex).ok_or_else(|| {
                PartitionError::new(ErrorCode::Internal, "a producer-id reservation with a malformed key")
            })?;
            let _ = self.key.set(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key));
        }
        let start = self.reserved_below.load(Ordering::Acquire);
        let end = start.saturating_add(count.clamp(1, ID_BLOCK));
        if end > MAX_COUNTER {
            return Err(PartitionError::new(
                ErrorCode::LimitExceeded,
                "every producer id this cluster can issue was issued",
            ));
        }
        self.reserved_below.store(end, Ordering::Release);
        // A block reserved by a command that was in the log at start may have been issued
        // from before a restart (which ids is not recorded): only later ones are taken.
        if reserving && index > self.replayed_through.load(Ordering::Acquire) {
            self.mine.insert(index, (start, end));
        }
        Ok(())
    }

    /// Reservations up to `index` (the controller log's last index at start) were made in an
    /// earlier run: their blocks are never issued from again.
    pub(crate) fn set_replayed_through(&self, index: u64) {
        self.replayed_through.store(index, Ordering::Release);
    }

    /// An id from the block being issued, or `None` when it is used up (reserve another).
    pub(crate) fn next_from_block(&self, issuing: &mut (i64, i64)) -> Option<i64> {
        let key = self.key.get()?;
        if issuing.0 >= issuing.1 {
            return None;
        }
        let counter = issuing.0;
        issuing.0 += 1;
        Some(make_id(key, counter))
    }

    /// The block reserved by the command at `index`, taken for issuing.
    pub(crate) fn take_block(&self, index: u64) -> Option<(i64, i64)> {
        self.mine.remove(&index).map(|(_, b)| b)
    }

    /// The oldest block reserved for this broker and not yet issued from.
    pub(crate) fn take_spare(&self) -> Option<(i64, i64)> {
        let index = self.mine.iter().map(|e| *e.key()).min()?;
        self.take_block(index)
    }

    /// Blocks reserved for this broker and not yet issued from.
    pub(crate) fn spares(&self) -> usize {
        self.mine.len()
    }

    pub(crate) fn issuing(&self) -> &tokio::sync::Mutex<(i64, i64)> {
        &self.issuing
    }

    /// Whether the counter of `producer_id` is reserved as far as this broker applied.
    pub(crate) fn known(&self, producer_id: i64) -> bool {
        producer_id < 0 || (producer_id >> 31) < self.reserved_below.load(Ordering::Acquire)
    }

    /// Checks a batch's producer identity against what this broker applied.
    pub(crate) fn check(&self, producer_id: i64, epoch: i16) -> Result<(), ProducerIdError> {
        if producer_id < 0 {
            return Ok(());
        }
        match self.key.get() {
            Some(key) => check_id(key, self.reserved_below.load(Ordering::Acquire), producer_id, epoch),
            None => Err(ProducerIdError::NeverIssued(producer_id)),
        }
    }
}

/// A fresh key for a reservation, as hex (the controller's commands are JSON).
pub(crate) fn fresh_key_hex() -> std::io::Result<String> {
    Ok(crate::producers::new_key()?.iter().map(|b| format!("{b:02x}")).collect())
}

pub(super) fn decode_key(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        key[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_never_overlap_and_every_broker_checks_every_id() {
        let (a, b) = (ClusterProducerIds::default(), ClusterProducerIds::default());
        let key = fresh_key_hex().expect("randomness");
        let other_key = fresh_key_hex().expect("randomness");
        // Both brokers apply the same log: a reserves at index 5, b at index 6 (with another
        // key, which the first reservation's key overrides).
        for ids in [&a, &b] {
            ids.apply(5, std::ptr::eq(ids, &a), ID_BLOCK, &key).expect("apply");
            ids.apply(6, std::ptr::eq(ids, &b), ID_BLOCK, &other_key).expect("apply");
        }
        let mut block_a = a.take_block(5).expect("a's block");
        let mut block_b = b.take_block(6).expect("b's block");
        assert_eq!(block_a, (0, ID_BLOCK));
        assert_eq!(block_b, (ID_BLOCK, 2 * ID_BLOCK));
        assert!(a.take_block(6).is_none(), "b's block is not a's");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..ID_BLOCK {
            let x = a.next_from_block(&mut block_a).expect("id");
            let y = b.next_from_block(&mut block_b).expect("id");
            assert!(seen.insert(x) && seen.insert(y), "an id issued twice");
            for ids in [&a, &b] {
                assert_eq!(ids.check(x, 0), Ok(()));
                assert_eq!(ids.check(y, 0), Ok(()));
            }
        }
        assert!(a.next_from_block(&mut block_a).is_none(), "the block is used up");
        // Made-up ids: a wrong tag, a counter not reserved yet, a wrong epoch.
        let x = seen.iter().next().copied().expect("an id");
        assert!(matches!(a.check(x ^ 1, 0), Err(ProducerIdError::NeverIssued(_))));
        assert!(matches!(a.check((3 * ID_BLOCK) << 31, 0), Err(ProducerIdError::NeverIssued(_))));
        assert!(!a.known((3 * ID_BLOCK) << 31));
        assert!(matches!(a.check(x, 1), Err(ProducerIdError::WrongEpoch { .. })));
        assert_eq!(a.check(-1, -1), Ok(()));
    }

    #[test]
    fn a_broker_without_a_reservation_knows_no_id() {
        let ids = ClusterProducerIds::default();
        assert!(matches!(ids.check(1 << 31, 0), Err(ProducerIdError::NeverIssued(_))));
        assert!(ids.apply(1, true, ID_BLOCK, "not hex").is_err());
    }
}
