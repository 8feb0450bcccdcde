//! The log as replication uses it (design.md §5.7): leader epochs in every batch and their
//! durable record, truncation of a suffix, and a follower's append of the leader's bytes.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering::SeqCst};
use std::sync::Arc;

use bytes::Bytes;
use quiver_protocol::batch::BatchHeader;

use super::tests::{batch, check_reads, config, mem, open, segment_path, TestResult, DIR};
use super::*;
use crate::storage::MemStorage;

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
    let end = log.next_offset();
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

    // A record with an epoch begun at the log end that never got a durable batch (a crash
    // between the two): dropped at open and written back, so the stale entry on disk cannot
    // later contradict a batch appended at that offset in an epoch the record already has.
    let mut ahead = entries.clone();
    ahead.push(EpochEntry { epoch: 9, start: end });
    mem.set_contents(&epoch_file(dir), &epochs::Epochs::from_entries(ahead)?.encode())?;
    let (log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(log.epoch_entries(), entries, "ahead");
    drop(log);
    assert_eq!(mem.contents(&epoch_file(dir)), Some(good.clone()), "written back");
    Ok(())
}

/// A record that checks out is what batches are held to (design.md §5.7): it is written
/// durably before an epoch's first batch, so a batch carrying another epoch than the one in
/// force at its offset has damaged epoch bytes (outside its CRC). Recovery treats it as it
/// treats a bad CRC: kept in place as damage (below the recovery point and in closed
/// segments; cut in the torn region), and reads of it fail. So a flip that raises the last
/// batch's epoch never raises the log's latest epoch.
#[test]
fn batches_that_contradict_a_sound_record_are_damage() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(300);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let mut written = Vec::new();
    for epoch in [0, 0, 0, 0, 1, 1, 1, 1, 1, 4, 4] {
        written.push(lead(&mut log, epoch, 3)?);
    }
    let entries = log.epoch_entries().to_vec();
    log.sync()?;
    log.recovery_checkpoint().write()?;
    drop(log);
    // As if the last two batches' epochs had been flipped from 1 to 4.
    let record = epochs::Epochs::from_entries(entries[..2].to_vec())?;
    mem.set_contents(&epoch_file(dir), &record.encode())?;
    let (mut log, report) = open(&storage, dir, &cfg)?;
    assert_eq!(log.epoch_entries(), &entries[..2]);
    assert_eq!(log.latest_epoch(), Some(1));
    assert!(report
        .damaged
        .iter()
        .any(|d| matches!(d.reason, TailDefect::EpochMismatch { expected: 1, found: 4 })));
    for (i, want) in written.iter().enumerate() {
        let at = BatchHeader::parse(want)?.base_offset;
        let read = log.read_plan(at, 1).and_then(|p| p.execute());
        match i < 9 {
            true => assert_eq!(&read?[..want.len()], &want[..], "batch {i}"),
            false => assert!(matches!(read, Err(LogError::Corrupt { .. })), "batch {i}: {read:?}"),
        }
    }
    // The log goes on in the epoch the record has.
    lead(&mut log, 1, 1)?;
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

#[test]
fn truncation_cuts_segments_indexes_side_files_and_epochs() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(400);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let mut model = Vec::new();
    for i in 0..12 {
        model.push(lead(&mut log, if i < 5 { 1 } else { 2 }, 2)?);
    }
    let segments = log.segment_count();
    assert!(segments >= 4, "{segments}");
    // A side file per segment, as the partition writes producer snapshots.
    let bases = log.side_file_bases("log")?;
    for &b in &bases {
        mem.set_contents(&segment_path(dir, b, "producers"), b"snapshot")?;
    }
    // Not a batch boundary, below the start, past the end: refused, nothing changed.
    assert!(matches!(log.truncate_to(1), Err(LogError::NotBatchBoundary { offset: 1, batch_base: 0 })));
    assert!(matches!(log.truncate_to(25), Err(LogError::OffsetOutOfRange { .. })));
    check_reads(&log, &model)?;
    // Into the middle of a segment (not the last): later segments, their files, and epoch 2 go.
    let cut = model
        .iter()
        .filter_map(|b| BatchHeader::parse(b).ok().map(|h| h.base_offset))
        .find(|&o| o > bases[0] && !bases.contains(&o) && o < bases[bases.len() - 2])
        .ok_or("no batch inside a segment")?;
    let kept_segments = bases.iter().filter(|&&b| b < cut).count();
    let keep = model.iter().take_while(|b| BatchHeader::parse(b).is_ok_and(|h| h.base_offset < cut)).count();
    log.truncate_to(cut)?;
    model.truncate(keep);
    assert_eq!(log.next_offset(), cut);
    assert_eq!(log.segment_count(), kept_segments, "bases {bases:?} cut {cut}");
    check_reads(&log, &model)?;
    let names = storage.list(dir)?;
    for &b in &bases[kept_segments..] {
        assert!(!names.iter().any(|n| n.starts_with(&format!("{b:020}."))), "{b} left in {names:?}");
    }
    let active = log.active_base_offset();
    assert!(names.contains(&format!("{active:020}.producers")), "the kept segment's snapshot stays");
    assert!(cut <= 10, "epoch 1 wrote offsets 0..10");
    assert_eq!(log.latest_epoch(), Some(1));
    assert_eq!(log.epoch_at(cut - 1), Some(1));
    assert_eq!(log.end_offset_for_epoch(2), None);
    // Appends go on from the cut, in a new epoch, and everything survives a crash.
    model.push(lead(&mut log, 3, 1)?);
    model.push(lead(&mut log, 3, 2)?);
    check_reads(&log, &model)?;
    log.sync()?;
    let entries = log.epoch_entries().to_vec();
    drop(log);
    mem.crash();
    let (log, report) = open(&storage, dir, &cfg)?;
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    assert_eq!(log.epoch_entries(), entries);
    check_reads(&log, &model)?;
    Ok(())
}

/// Truncating to a segment's base keeps that segment, empty, as the active one; truncating to
/// the log start empties the log; truncating at the log end drops only epochs begun there.
#[test]
fn truncation_at_segment_bases_and_the_ends() -> TestResult {
    let (_, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(300);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let mut model = Vec::new();
    for _ in 0..8 {
        model.push(lead(&mut log, 0, 2)?);
    }
    let bases = log.side_file_bases("log")?;
    assert!(bases.len() >= 3);
    log.truncate_to(bases[2])?;
    model.retain(|b| BatchHeader::parse(b).is_ok_and(|h| h.base_offset < bases[2]));
    assert_eq!((log.segment_count(), log.active_base_offset(), log.next_offset()), (3, bases[2], bases[2]));
    check_reads(&log, &model)?;
    log.begin_epoch(7)?;
    log.truncate_to(log.next_offset())?;
    assert_eq!(log.latest_epoch(), Some(0));
    log.truncate_to(0)?;
    assert_eq!((log.segment_count(), log.next_offset(), log.latest_epoch()), (1, 0, None));
    model.clear();
    model.push(lead(&mut log, 2, 1)?);
    drop(log);
    let (log, _) = open(&storage, dir, &cfg)?;
    check_reads(&log, &model)
}

/// A sync handle taken before a truncation must not record its recovery point (past the cut)
/// nor report its offsets durable.
#[test]
fn a_sync_handle_from_before_a_truncation_fails() -> TestResult {
    let (_, storage) = mem();
    let (mut log, _) = open(&storage, Path::new(DIR), &config(1 << 20))?;
    lead(&mut log, 0, 1)?;
    lead(&mut log, 0, 1)?;
    let handle = log.sync_handle();
    log.truncate_to(1)?;
    assert!(handle.sync().is_err());
    assert!(log.recovery_checkpoint().synced().next_offset <= 1);
    // Not a storage failure: the log goes on.
    lead(&mut log, 0, 1)?;
    log.sync()?;
    Ok(())
}

/// Storage that loses power after `left` more changes (file appends, truncations, syncs,
/// creations, removals, renames, directory syncs): every later change fails without effect,
/// and the test then crashes the memory storage underneath.
#[derive(Debug)]
pub(super) struct PowerCut {
    pub(super) inner: Arc<MemStorage>,
    pub(super) left: Arc<AtomicI64>,
}

impl PowerCut {
    fn step(left: &AtomicI64) -> io::Result<()> {
        match left.fetch_sub(1, SeqCst) > 0 {
            true => Ok(()),
            false => Err(io::Error::other("power lost")),
        }
    }
}

#[derive(Debug)]
struct PowerCutFile {
    inner: Arc<dyn StorageFile>,
    left: Arc<AtomicI64>,
}

impl Storage for PowerCut {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        if !self.inner.list(path.parent().unwrap_or(Path::new("/")))?.iter().any(|n| path.ends_with(n)) {
            PowerCut::step(&self.left)?;
        }
        let inner = self.inner.open(path)?;
        Ok(Arc::new(PowerCutFile { inner, left: self.left.clone() }))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        PowerCut::step(&self.left)?;
        self.inner.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        PowerCut::step(&self.left)?;
        self.inner.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        PowerCut::step(&self.left)?;
        self.inner.sync_dir(dir)
    }
}

impl StorageFile for PowerCutFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact_at(pos, buf)
    }
    fn append(&self, data: &[u8]) -> io::Result<()> {
        PowerCut::step(&self.left)?;
        self.inner.append(data)
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        PowerCut::step(&self.left)?;
        self.inner.truncate(len)
    }
    fn sync(&self) -> io::Result<()> {
        PowerCut::step(&self.left)?;
        self.inner.sync()
    }
}

/// The batches a log holds, read back in order.
pub(super) fn read_all(log: &PartitionLog) -> Result<Vec<Bytes>, LogError> {
    let mut out = Vec::new();
    let mut offset = log.log_start_offset();
    while offset < log.next_offset() {
        let bytes = log.read_plan(offset, 1)?.execute()?;
        let header = BatchHeader::parse(&bytes)?;
        out.push(bytes.slice(..header.total_len()));
        offset = header.next_offset();
    }
    Ok(out)
}

/// The epoch record the batches imply: an entry where the epoch changes.
pub(super) fn epochs_of(batches: &[Bytes]) -> Vec<EpochEntry> {
    let mut out: Vec<EpochEntry> = Vec::new();
    for b in batches {
        let Ok(h) = BatchHeader::parse(b) else { continue };
        if out.last().is_none_or(|e| e.epoch != h.leader_epoch) {
            out.push(EpochEntry { epoch: h.leader_epoch, start: h.base_offset });
        }
    }
    out
}

/// Power is lost at every step of a truncation across segments followed by appends in a new
/// epoch (and, in a second pass, with a torn or reordered tail on top). Every time, the
/// reopened log is a prefix of the old log or of the new one, holds everything synced before
/// the truncation up to the cut, reports no damage, and its epoch record matches its batches.
#[test]
fn power_loss_at_any_step_of_a_truncation_leaves_a_prefix() -> TestResult {
    let cfg = config(400);
    let dir = Path::new(DIR);
    let mut steps_seen = 0;
    for torn in [None, Some(0usize), Some(1), Some(40)] {
        for step in 0.. {
            let mem = Arc::new(MemStorage::new());
            let plain: Arc<dyn Storage> = mem.clone();
            let left = Arc::new(AtomicI64::new(i64::MAX));
            let storage: Arc<dyn Storage> = Arc::new(PowerCut { inner: mem.clone(), left: left.clone() });
            let (mut log, _) = open(&storage, dir, &cfg)?;
            let mut old = Vec::new();
            for i in 0..14 {
                old.push(lead(&mut log, if i < 6 { 1 } else { 2 }, 2)?);
            }
            log.sync()?;
            log.recovery_checkpoint().write()?;
            // Two more, never synced.
            old.push(lead(&mut log, 2, 1)?);
            old.push(lead(&mut log, 2, 1)?);
            let synced = old.len() - 2;
            let cut_batch = 4;
            let cut = BatchHeader::parse(&old[cut_batch])?.base_offset;
            assert!(log.active_base_offset() > cut, "the cut is in a closed segment");

            left.store(step, SeqCst);
            let mut new: Vec<Bytes> = old[..cut_batch].to_vec();
            let done = (|| -> Result<(), LogError> {
                log.truncate_to(cut)?;
                for _ in 0..3 {
                    new.push(lead(&mut log, 3, 2)?);
                }
                log.sync()
            })();
            drop(log);
            match torn {
                None => mem.crash(),
                Some(0) => mem.crash_reordered(0..60),
                Some(n) => mem.crash_torn(n),
            }
            let (log, report) = open(&plain, dir, &cfg)?;
            assert!(report.damaged.is_empty(), "step {step} {torn:?}: {:?}", report.damaged);
            let got = read_all(&log)?;
            let prefix_of = |model: &[Bytes]| got.len() <= model.len() && got[..] == model[..got.len()];
            assert!(prefix_of(&old) || prefix_of(&new), "step {step} {torn:?}: not a prefix");
            assert!(got.len() >= cut_batch.min(synced), "step {step} {torn:?}: lost synced batches");
            if done.is_ok() {
                assert_eq!(got, new, "step {step} {torn:?}: all synced after the truncation");
            }
            assert_eq!(log.epoch_entries(), epochs_of(&got), "step {step} {torn:?}");
            if done.is_ok() {
                steps_seen = steps_seen.max(step);
                break;
            }
        }
    }
    assert!(steps_seen > 10, "the truncation took {steps_seen} steps");
    Ok(())
}

#[test]
fn a_follower_appends_the_leaders_bytes_as_they_are() -> TestResult {
    let (mem, leader_storage) = mem();
    let (_, follower_storage) = super::tests::mem();
    let dir = Path::new(DIR);
    let cfg = config(300);
    let (mut leader, _) = open(&leader_storage, dir, &cfg)?;
    let (mut follower, _) = open(&follower_storage, dir, &cfg)?;
    let mut model = Vec::new();
    for epoch in [0, 0, 1, 1, 1, 3, 3] {
        let b = lead(&mut leader, epoch, 2)?;
        follower.append_replicated(&ValidatedBatch::new(b.clone())?, 0, None)?;
        model.push(b);
    }
    check_reads(&follower, &model)?;
    assert_eq!(follower.epoch_entries(), leader.epoch_entries());
    assert_eq!(follower.segment_count(), leader.segment_count());
    // Wrong offset, lower epoch, damaged bytes: refused, nothing appended.
    let next = follower.next_offset();
    let mut b = batch(0, 1, 0);
    b.stamp(next + 1, 3);
    assert!(
        matches!(follower.append_replicated(&b, 0, None), Err(LogError::NotAtLogEnd { expected, got }) if expected == next && got == next + 1)
    );
    b.stamp(next, 2);
    assert!(matches!(
        follower.append_replicated(&b, 0, None),
        Err(LogError::EpochRegressed { latest: 3, requested: 2 })
    ));
    b.stamp(next, 3);
    // Damaged bytes never become a ValidatedBatch, so they never reach the log.
    let mut damaged = bytes::BytesMut::from(&b[..]);
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    assert!(ValidatedBatch::from_mut(damaged).is_err());
    assert_eq!(follower.next_offset(), next);
    // A higher epoch begins durably with its first batch.
    b.stamp(next, 6);
    follower.append_replicated(&b, 0, None)?;
    model.push(b.freeze());
    follower.sync()?;
    drop(follower);
    let _ = mem; // the leader's storage
    let (follower, _) = open(&follower_storage, dir, &cfg)?;
    assert_eq!(follower.latest_epoch(), Some(6));
    check_reads(&follower, &model)
}

/// The log's invariants are checked, not assumed: an epoch entry past the log end, or (in
/// debug builds) an index entry past a segment's end, is a bug that stops the log.
#[test]
fn broken_invariants_are_caught() -> TestResult {
    let (_, storage) = mem();
    let (mut log, _) = open(&storage, Path::new(DIR), &config(300))?;
    for _ in 0..4 {
        lead(&mut log, 0, 2)?;
    }
    let end = log.next_offset();
    let caught = |log: &PartitionLog| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| log.check_invariants(true))).is_err()
    };
    assert!(!caught(&log));
    let good = log.epochs.clone();
    log.epochs = Arc::new(epochs::Epochs::from_entries(vec![
        EpochEntry { epoch: 0, start: 0 },
        EpochEntry { epoch: 1, start: end + 1 },
    ])?);
    assert!(caught(&log), "an epoch past the log end");
    log.epochs = good;
    if cfg!(debug_assertions) {
        let size = log.active.size as u32;
        log.active.offsets.push(index::OffsetEntry { rel: 1000, pos: size + 1, ord: 1000 }, false);
        assert!(caught(&log), "an index entry past the segment");
    }
    Ok(())
}
