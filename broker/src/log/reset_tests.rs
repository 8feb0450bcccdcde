//! Replacing the log with an empty one (a Raft snapshot install, log/reset.rs) and the epoch of
//! the batch before the log start that retention and a reset must keep.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering::SeqCst};
use std::sync::Arc;

use bytes::Bytes;

use super::replication_tests::read_all;
use super::tests::{batch, config, mem, open, TestResult, DIR};
use super::*;
use crate::storage::countdown::Countdown;
use crate::storage::{MemStorage, Storage};

/// Appends `n` batches in `epoch`.
fn append_in(log: &mut PartitionLog, n: u64, epoch: i32) -> Result<Vec<Bytes>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let seq = log.next_offset();
        let mut b = batch(seq, (seq % 3 + 1) as usize, 0);
        log.append(&mut b, epoch, 0)?;
        out.push(b.freeze());
    }
    Ok(out)
}

/// A crash at every step of a reset leaves, after reopening, the old log or the new empty one,
/// never a mix; the new one takes appends at the new offset and ordinal and keeps the epoch
/// before its start.
#[test]
fn a_crash_at_any_point_of_a_reset_leaves_the_old_log_or_the_new_one() -> TestResult {
    let dir = Path::new(DIR);
    let cfg = config(600);
    let (mut saw_old, mut saw_new) = (false, false);
    for crash_after in 0.. {
        let mem = Arc::new(MemStorage::new());
        let budget = Arc::new(AtomicI64::new(-1));
        let storage: Arc<dyn Storage> = Arc::new(Countdown::new(mem.clone(), budget.clone()));
        let (mut log, _) = open(&storage, dir, &cfg)?;
        let mut model = append_in(&mut log, 12, 1)?;
        model.extend(append_in(&mut log, 12, 2)?);
        log.sync()?;
        assert!(log.segment_count() > 2);
        let (old_next, old_ordinal) = (log.next_offset(), log.next_ordinal());
        let (base, ordinal) = (old_next + 40, old_ordinal + 7);
        budget.store(crash_after, SeqCst);
        let done = log.reset(base, ordinal, 2);
        budget.store(-1, SeqCst);
        if done.is_ok() {
            assert_eq!((log.log_start_offset(), log.next_offset()), (base, base));
            assert_eq!((log.first_ordinal(), log.next_ordinal()), (ordinal, ordinal));
            assert_eq!(log.epoch_before_start(), Some(2));
        } else {
            assert!(
                matches!(log.append(&mut batch(0, 1, 0), 2, 0), Err(LogError::Poisoned)),
                "poisoned after a failed reset"
            );
        }
        drop(log);
        mem.crash();
        let plain: Arc<dyn Storage> = mem.clone();
        let (mut log, _) = open(&plain, dir, &cfg)?;
        if log.next_ordinal() == old_ordinal {
            saw_old = true;
            assert!(done.is_err(), "a completed reset was lost (crash after {crash_after})");
            assert_eq!((log.first_ordinal(), log.log_start_offset()), (1, 0));
            assert_eq!(read_all(&log)?, model, "crash after {crash_after}");
        } else {
            saw_new = true;
            assert_eq!(
                (log.log_start_offset(), log.next_offset()),
                (base, base),
                "crash after {crash_after}"
            );
            assert_eq!((log.first_ordinal(), log.next_ordinal()), (ordinal, ordinal));
            assert_eq!(log.epoch_before_start(), Some(2));
            assert_eq!(log.segment_count(), 1);
            let names = mem.list(dir)?;
            assert!(!names.iter().any(|n| n.starts_with("log-reset")), "{names:?}");
            let after = append_in(&mut log, 3, 3)?;
            assert_eq!((log.first_ordinal(), log.next_ordinal()), (ordinal, ordinal + 3));
            assert_eq!(log.offset_of_ordinal(ordinal)?, Some(base));
            assert_eq!(log.epoch_at(base), Some(3));
            log.sync()?;
            drop(log);
            mem.crash();
            let (log, _) = open(&plain, dir, &cfg)?;
            assert_eq!(read_all(&log)?, after);
            assert_eq!((log.first_ordinal(), log.epoch_before_start()), (ordinal, Some(2)));
        }
        if done.is_ok() {
            break;
        }
        assert!(crash_after < 200, "the reset never completed");
    }
    assert!(saw_old && saw_new);
    Ok(())
}

/// Retention keeps the epoch of the last batch it deleted, also when an epoch begins exactly at
/// the new log start, and across a crash before or after the epoch record is rewritten.
#[test]
fn retention_keeps_the_epoch_of_the_batch_before_the_log_start() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(600);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(log.epoch_before_start(), None);
    append_in(&mut log, 10, 1)?;
    // Epoch 2 begins in a segment of its own: deleting everything before it leaves no entry of
    // epoch 1 in the record.
    log.roll_now()?;
    let start2 = log.next_offset();
    append_in(&mut log, 10, 2)?;
    log.sync()?;
    log.delete_segments_below(start2)?;
    assert_eq!(log.log_start_offset(), start2);
    assert_eq!(log.epoch_before_start(), Some(1));
    drop(log);
    mem.crash();
    let (mut log, _) = open(&storage, dir, &cfg)?;
    assert_eq!((log.log_start_offset(), log.epoch_before_start()), (start2, Some(1)));
    // Inside epoch 2 now.
    let next_start = log.closed.get(1).map(|s| s.base).ok_or("too few segments")?;
    log.delete_segments_below(next_start)?;
    assert_eq!(log.epoch_before_start(), Some(2));
    drop(log);
    mem.crash();
    let (log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(log.epoch_before_start(), Some(2));
    Ok(())
}

#[test]
fn a_reset_to_an_impossible_position_is_refused() -> TestResult {
    let (_, storage) = mem();
    let (mut log, _) = open(&storage, Path::new(DIR), &config(600))?;
    assert!(matches!(log.reset(3, 10, 1), Err(LogError::InvalidReset { .. })));
    assert!(matches!(log.reset(3, 1, 1), Err(LogError::InvalidReset { .. })));
    Ok(())
}
