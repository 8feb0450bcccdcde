//! The log as replication uses it (design.md §5.7): leader epochs in every batch and their
//! durable record, truncation of a suffix, and a follower's append of the leader's bytes.

use std::path::Path;

use bytes::Bytes;
use quiver_protocol::batch::BatchHeader;

use super::tests::{batch, check_reads, config, mem, open, TestResult, DIR};
use super::*;

/// Appends one batch of `records` records as a leader in `epoch`; returns the stored bytes.
fn lead(log: &mut PartitionLog, epoch: i32, records: usize) -> Result<Bytes, LogError> {
    let seq = log.next_offset();
    let mut b = batch(seq, records, seq as i64);
    log.append(&mut b, epoch, seq as i64)?;
    Ok(b.freeze())
}

fn epoch_file(dir: &Path) -> std::path::PathBuf {
    dir.join(epochs::FILE)
}

#[test]
fn every_batch_carries_its_epoch_and_the_record_survives_a_crash() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(400);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(log.latest_epoch(), None);
    let mut model = Vec::new();
    for epoch in [0, 0, 2, 2, 2, 5] {
        model.push(lead(&mut log, epoch, 2)?);
    }
    for b in &model {
        let h = BatchHeader::parse(b)?;
        assert_eq!(log.epoch_at(h.base_offset), Some(h.leader_epoch));
        assert_eq!(log.epoch_at(h.last_offset()), Some(h.leader_epoch));
    }
    assert_eq!(log.epoch_at(log.next_offset()), None);
    let entries = log.epoch_entries().to_vec();
    assert_eq!(
        entries,
        [
            EpochEntry { epoch: 0, start: 0 },
            EpochEntry { epoch: 2, start: 4 },
            EpochEntry { epoch: 5, start: 10 }
        ]
    );
    assert_eq!(log.end_offset_for_epoch(0), Some((0, 4)));
    assert_eq!(log.end_offset_for_epoch(3), Some((2, 10)));
    assert_eq!(log.end_offset_for_epoch(5), Some((5, 12)));
    assert_eq!(log.end_offset_for_epoch(6), None);
    // Epochs never go back, whether begun or appended with.
    assert!(matches!(log.begin_epoch(4), Err(LogError::EpochRegressed { latest: 5, requested: 4 })));
    assert!(matches!(log.append(&mut batch(0, 1, 0), 1, 0), Err(LogError::EpochRegressed { .. })));
    log.sync()?;
    drop(log);
    mem.crash();
    let (log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(log.epoch_entries(), entries);
    check_reads(&log, &model)
}

#[test]
fn an_epoch_begun_without_batches_is_dropped_at_open_as_kafka_does() -> TestResult {
    let (_, storage) = mem();
    let dir = Path::new(DIR);
    let (mut log, _) = open(&storage, dir, &config(1 << 20))?;
    lead(&mut log, 1, 1)?;
    log.begin_epoch(3)?;
    assert_eq!(log.latest_epoch(), Some(3));
    assert_eq!(log.end_offset_for_epoch(1), Some((1, 1)));
    // Epoch 3 got no batch before epoch 4 began: it gives way.
    log.begin_epoch(4)?;
    assert_eq!(log.epoch_entries().len(), 2);
    drop(log);
    let (log, _) = open(&storage, dir, &config(1 << 20))?;
    assert_eq!(log.epoch_entries(), [EpochEntry { epoch: 1, start: 0 }]);
    Ok(())
}

/// A record that is missing (a data directory of an older version), damaged, or contradicted
/// by the log's last batch is rebuilt from the batches' headers.
#[test]
fn a_missing_damaged_or_stale_record_is_rebuilt_from_the_batches() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(300);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    for epoch in [0, 0, 0, 0, 1, 1, 1, 1, 1, 4, 4] {
        lead(&mut log, epoch, 3)?;
    }
    assert!(log.segment_count() > 3);
    let entries = log.epoch_entries().to_vec();
    log.sync()?;
    drop(log);
    let good = mem.contents(&epoch_file(dir)).ok_or("no epoch file")?;

    storage.remove(&epoch_file(dir))?;
    let (log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(log.epoch_entries(), entries, "missing");
    drop(log);
    assert_eq!(mem.contents(&epoch_file(dir)), Some(good.clone()), "written back");

    let mut bad = good.clone();
    bad[14] ^= 0x10;
    mem.set_contents(&epoch_file(dir), &bad)?;
    let (log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(log.epoch_entries(), entries, "damaged");
    drop(log);

    // A record that says the last batches are of epoch 1 (as if written before they were).
    let stale = epochs::Epochs::from_entries(entries[..2].to_vec())?;
    mem.set_contents(&epoch_file(dir), &stale.encode())?;
    let (log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(log.epoch_entries(), entries, "stale");
    Ok(())
}

/// Retention moves the first epoch's start up to the new log start (Kafka's
/// `truncateFromStart`) and drops the epochs wholly before it.
#[test]
fn retention_trims_the_epoch_record() -> TestResult {
    let (_, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = LogConfig { retention_bytes: Some(600), ..config(300) };
    let (mut log, _) = open(&storage, dir, &cfg)?;
    for epoch in [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2] {
        lead(&mut log, epoch, 2)?;
    }
    log.apply_retention(0)?;
    let start = log.log_start_offset();
    assert!(start > 8, "retention kept from {start}");
    let first = log.epoch_entries()[0];
    assert_eq!(first.start, start);
    assert_eq!(Some(first.epoch), log.epoch_at(start));
    assert!(first.epoch >= 1);
    let entries = log.epoch_entries().to_vec();
    drop(log);
    let (log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(log.epoch_entries(), entries);
    Ok(())
}
