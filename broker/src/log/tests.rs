//! Tests of the partition log as a whole: appends and reads across rolls, crash recovery on
//! the in-memory "power loss" storage and on real files, index rebuilds, retention, time
//! lookups, and hostile segment bytes.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use quiver_protocol::batch::{BatchBuilder, BatchHeader, BatchSplitter, ValidatedBatch};

use super::*;
use crate::storage::{FsStorage, MemStorage, Storage};

pub(super) type TestResult = Result<(), Box<dyn Error>>;

pub(super) const DIR: &str = "/data/topics/t/0";

pub(super) fn config(segment_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        segment_ms: 1 << 40,
        retention_bytes: None,
        retention_ms: None,
        index_interval_bytes: 300,
        ..Default::default()
    }
}

/// A batch of `records` records; values carry `seq` so every batch has distinct bytes.
pub(super) fn batch(seq: u64, records: usize, ts: i64) -> ValidatedBatch {
    let mut builder = BatchBuilder::new(256);
    for i in 0..records {
        let value = format!("batch {seq} record {i} {}", "x".repeat((seq % 7) as usize * 10));
        builder.push(ts + i as i64, Some(b"key"), value.as_bytes(), &[("h", b"v")]);
    }
    ValidatedBatch::new(builder.finish()).expect("valid batch")
}

pub(super) fn open(
    storage: &Arc<dyn Storage>,
    dir: &Path,
    config: &LogConfig,
) -> Result<(PartitionLog, RecoveryReport), LogError> {
    PartitionLog::open(storage.clone(), dir.to_path_buf(), config.clone(), 0)
}

pub(super) fn mem() -> (Arc<MemStorage>, Arc<dyn Storage>) {
    let mem = Arc::new(MemStorage::new());
    let storage: Arc<dyn Storage> = mem.clone();
    (mem, storage)
}

/// Appends `n` batches of 1..=4 records with timestamps `ts(seq)`; returns them as stamped.
pub(super) fn append_n(
    log: &mut PartitionLog,
    n: u64,
    ts: impl Fn(u64) -> i64,
) -> Result<Vec<Bytes>, Box<dyn Error>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let seq = log.next_offset();
        let mut b = batch(seq, (seq % 4 + 1) as usize, ts(seq));
        // Epoch 0, as on one node: the tests append with it directly too (epochs never go back).
        let info = log.append(&mut b, 0, ts(seq))?;
        assert_eq!(info.base_offset, seq);
        let header = BatchHeader::parse(&b)?;
        assert_eq!((header.base_offset, header.leader_epoch), (seq, 0));
        assert_eq!(info.last_offset, header.last_offset());
        out.push(b.freeze());
    }
    Ok(out)
}

/// Reads from every offset with several byte budgets and compares with `model` (the batches
/// of the log, in order, starting at the log start).
pub(super) fn check_reads(log: &PartitionLog, model: &[Bytes]) -> TestResult {
    for (i, expected) in model.iter().enumerate() {
        let header = BatchHeader::parse(expected)?;
        for offset in header.base_offset..=header.last_offset() {
            for max_bytes in [0, 150, 700, 1 << 20] {
                let plan = log.read_plan(offset, max_bytes)?;
                let bytes = plan.execute()?;
                let len = bytes.len();
                assert!(len <= plan.len());
                let got: Vec<(BatchHeader, Bytes)> = BatchSplitter::new(bytes).collect::<Result<_, _>>()?;
                assert!(!got.is_empty(), "offset {offset} read nothing");
                assert!(got.len() == 1 || len <= max_bytes, "read {len} > {max_bytes}");
                for (j, (_, b)) in got.iter().enumerate() {
                    assert_eq!(b, &model[i + j], "offset {offset} batch {j}");
                }
                assert_eq!(plan.first_offset(), header.base_offset);
            }
        }
    }
    let next = log.next_offset();
    assert!(log.read_plan(next, 100)?.execute()?.is_empty());
    assert!(matches!(log.read_plan(next + 1, 100), Err(LogError::OffsetOutOfRange { .. })));
    Ok(())
}

pub(super) fn segment_path(dir: &Path, base: u64, ext: &str) -> PathBuf {
    dir.join(segment::file_name(base, ext))
}

fn bases(storage: &dyn Storage, dir: &Path) -> Result<Vec<u64>, Box<dyn Error>> {
    let mut names = storage.list(dir)?;
    names.sort();
    Ok(names.iter().filter_map(|n| n.strip_suffix(".log")).filter_map(|n| n.parse().ok()).collect())
}

#[test]
fn empty_directory_starts_at_zero() -> TestResult {
    let (_, storage) = mem();
    let (log, report) = open(&storage, Path::new(DIR), &config(1000))?;
    assert_eq!((log.log_start_offset(), log.next_offset(), log.segment_count()), (0, 0, 1));
    assert_eq!(report, RecoveryReport { segments: 1, ..RecoveryReport::default() });
    assert!(log.read_plan(0, 100)?.is_empty());
    assert!(storage.list(Path::new(DIR))?.contains(&"00000000000000000000.log".to_string()));
    Ok(())
}

#[test]
fn round_trip_across_rolls_and_reopen() -> TestResult {
    let (_, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1000);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let model = append_n(&mut log, 60, |s| 1000 + s as i64)?;
    assert!(log.segment_count() > 4, "only {} segments", log.segment_count());
    assert_eq!(log.size_bytes(), model.iter().map(|b| b.len() as u64).sum::<u64>());
    check_reads(&log, &model)?;
    let next = log.next_offset();
    let segments = log.segment_count();
    assert_eq!(bases(&*storage, dir)?.len(), segments);
    drop(log);

    let (log, report) = open(&storage, dir, &cfg)?;
    assert_eq!((log.next_offset(), log.segment_count(), log.log_start_offset()), (next, segments, 0));
    assert_eq!(report.truncation, None);
    assert!(report.rebuilt_indexes.is_empty(), "{report:?}");
    check_reads(&log, &model)
}

#[test]
fn every_segment_holds_whole_batches_within_segment_bytes() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let (mut log, _) = open(&storage, dir, &config(1000))?;
    append_n(&mut log, 40, |_| 0)?;
    for base in bases(&*storage, dir)? {
        let bytes = mem.contents(&segment_path(dir, base, "log")).ok_or("missing segment")?;
        assert!(bytes.len() <= 1000);
        let batches: Vec<_> = BatchSplitter::new(Bytes::from(bytes)).collect::<Result<_, _>>()?;
        assert_eq!(batches.first().map(|(h, _)| h.base_offset), Some(base));
    }
    Ok(())
}

#[test]
fn oversized_batch_gets_a_segment_of_its_own() -> TestResult {
    let (_, storage) = mem();
    let (mut log, _) = open(&storage, Path::new(DIR), &config(200))?;
    let mut model = append_n(&mut log, 3, |_| 0)?;
    assert_eq!(log.segment_count(), 3);
    let mut big = batch(99, 10, 0);
    assert!(big.len() > 200);
    assert!(log.append(&mut big, 0, 0)?.rolled);
    model.push(big.freeze());
    model.extend(append_n(&mut log, 1, |_| 0)?);
    assert_eq!(log.segment_count(), 5);
    check_reads(&log, &model)
}

#[test]
fn rolls_when_the_segment_is_old() -> TestResult {
    let (_, storage) = mem();
    let cfg = LogConfig { segment_ms: 1000, ..config(1 << 20) };
    let (mut log, _) = open(&storage, Path::new(DIR), &cfg)?;
    assert!(!log.append(&mut batch(0, 1, 0), 0, 5000)?.rolled);
    assert!(!log.append(&mut batch(1, 1, 0), 0, 5999)?.rolled);
    assert!(log.append(&mut batch(2, 1, 0), 0, 6000)?.rolled);
    assert_eq!(log.segment_count(), 2);
    Ok(())
}

/// `append` takes a `ValidatedBatch`, so a buffer that is not exactly one valid batch cannot
/// reach it: the validation that makes one refuses it.
#[test]
fn append_rejects_a_buffer_that_is_not_one_batch() -> TestResult {
    let mut two = bytes::BytesMut::from(&batch(0, 1, 0)[..]);
    two.extend_from_slice(&batch(1, 1, 0));
    assert!(ValidatedBatch::from_mut(two).is_err());
    assert!(ValidatedBatch::new(Bytes::from_static(&[0u8; 10])).is_err());
    Ok(())
}

#[test]
fn crash_loses_only_unsynced_appends() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1 << 20);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let synced = append_n(&mut log, 5, |_| 0)?;
    let handle = log.sync_handle();
    handle.sync()?;
    let durable = handle.durable_offset();
    append_n(&mut log, 3, |_| 0)?;
    assert!(log.next_offset() > durable);
    drop(log);
    mem.crash();
    let (mut log, report) = open(&storage, dir, &cfg)?;
    assert_eq!(log.next_offset(), durable);
    assert_eq!(report.truncation, None, "a clean crash leaves no torn bytes");
    check_reads(&log, &synced)?;

    let mut model = synced;
    model.extend(append_n(&mut log, 4, |_| 0)?);
    log.sync()?;
    drop(log);
    mem.crash();
    let (log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(log.next_offset(), durable + model[5..].iter().map(|b| count(b)).sum::<u64>());
    check_reads(&log, &model)
}

fn count(batch: &[u8]) -> u64 {
    BatchHeader::parse(batch).map_or(0, |h| h.next_offset() - h.base_offset)
}

#[test]
fn rolled_segments_survive_a_crash_without_any_sync() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1000);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let model = append_n(&mut log, 30, |_| 0)?;
    let segments = log.segment_count();
    let active_base = bases(&*storage, dir)?.last().copied().ok_or("no segment")?;
    assert!(active_base > 0 && active_base < log.next_offset());
    drop(log);
    mem.crash();
    // Each roll synced the closed segment and the directory; only the active segment's
    // content is lost, and its empty file remains as the last segment.
    let (log, _) = open(&storage, dir, &cfg)?;
    assert_eq!((log.segment_count(), log.next_offset()), (segments, active_base));
    let kept: Vec<Bytes> = model.iter().filter(|b| count_to(b) <= active_base).cloned().collect();
    check_reads(&log, &kept)
}

fn count_to(batch: &[u8]) -> u64 {
    BatchHeader::parse(batch).map_or(u64::MAX, |h| h.next_offset())
}

#[test]
fn torn_crashes_recover_to_a_prefix() -> TestResult {
    for keep in [1, 10, 61, 100, 250, 400, 10_000] {
        let (mem, storage) = mem();
        let dir = Path::new(DIR);
        let cfg = config(1 << 20);
        let (mut log, _) = open(&storage, dir, &cfg)?;
        let mut model = append_n(&mut log, 3, |_| 0)?;
        log.sync()?;
        model.extend(append_n(&mut log, 5, |_| 0)?);
        drop(log);
        mem.crash_torn(keep);
        let (log, report) = open(&storage, dir, &cfg)?;
        let survivors: Vec<Bytes> =
            model.iter().take_while(|b| count_to(b) <= log.next_offset()).cloned().collect();
        assert!(survivors.len() >= 3, "keep {keep}: lost synced batches");
        assert_eq!(survivors.last().map(|b| count_to(b)), Some(log.next_offset()));
        let synced_len: usize = model[..3].iter().map(|b| b.len()).sum();
        let kept_len: usize = survivors.iter().map(|b| b.len()).sum();
        assert_eq!(
            report.truncated_bytes() as usize,
            (synced_len + keep).min(model.iter().map(|b| b.len()).sum()) - kept_len
        );
        check_reads(&log, &survivors)?;
    }
    Ok(())
}

/// A closed log on real files in a temp dir, and the batches it holds.
type FsLog = (tempfile::TempDir, Arc<dyn Storage>, Vec<Bytes>);

/// Appends `n` batches to a log in a fresh temp dir on real files, syncs and closes it; with
/// `clean`, as a clean shutdown does, also checkpoints the recovery point (else it is as if the
/// power failed before any checkpoint was written).
fn fs_log(n: u64, cfg: &LogConfig, clean: bool) -> Result<FsLog, Box<dyn Error>> {
    let tmp = tempfile::tempdir()?;
    let storage: Arc<dyn Storage> = Arc::new(FsStorage::new());
    let (mut log, _) = open(&storage, &tmp.path().join("p"), cfg)?;
    let model = append_n(&mut log, n, |s| s as i64)?;
    log.sync()?;
    if clean {
        assert!(log.recovery_checkpoint().write()?);
    }
    Ok((tmp, storage, model))
}

fn last_segment(storage: &dyn Storage, dir: &Path) -> Result<PathBuf, Box<dyn Error>> {
    let last = bases(storage, dir)?.last().copied().ok_or("no segment")?;
    Ok(segment_path(dir, last, "log"))
}

/// A batch of `records` records of `value_len` bytes each.
fn big_batch(seq: u64, records: usize, value_len: usize) -> ValidatedBatch {
    let mut builder = BatchBuilder::new(256);
    let value: Vec<u8> = (0..value_len).map(|i| (i as u64 * 7 + seq) as u8).collect();
    for i in 0..records {
        builder.push(i as i64, None, &value, &[]);
    }
    ValidatedBatch::new(builder.finish()).expect("valid batch")
}

#[test]
fn direct_writes_round_trip_across_rolls_and_reopen_without_padding() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("p");
    let storage: Arc<dyn Storage> = Arc::new(FsStorage::new().direct_writes(true));
    let cfg = config(300 * 1024);
    let (mut log, _) = open(&storage, &dir, &cfg)?;
    // Large batches take the O_DIRECT path, small ones the page cache, interleaved.
    let mut model = Vec::new();
    for i in 0..24u64 {
        let seq = log.next_offset();
        let mut b = if i % 3 == 2 { batch(seq, 2, 0) } else { big_batch(seq, 20, 5000 + i as usize) };
        log.append(&mut b, 1, 0)?;
        model.push(b.freeze());
    }
    assert!(log.segment_count() > 3, "only {} segments", log.segment_count());
    let check = |log: &PartitionLog| -> TestResult {
        for expected in &model {
            let header = BatchHeader::parse(expected)?;
            let bytes = log.read_plan(header.base_offset, 1)?.execute()?;
            assert_eq!(&bytes, expected, "batch at {}", header.base_offset);
        }
        Ok(())
    };
    check(&log)?;
    let next = log.next_offset();
    drop(log);

    // Closed segments were cut to their last batch when sealed; only the last file may carry
    // block padding, which reopening drops without calling it damage.
    let bases = bases(&*storage, &dir)?;
    let bytes_in = |from: u64, to: u64| -> u64 {
        model
            .iter()
            .filter(|b| BatchHeader::parse(b).is_ok_and(|h| (from..to).contains(&h.base_offset)))
            .map(|b| b.len() as u64)
            .sum()
    };
    let file_len = |base: u64| std::fs::metadata(segment_path(&dir, base, "log")).map(|m| m.len());
    for pair in bases.windows(2) {
        assert_eq!(file_len(pair[0])?, bytes_in(pair[0], pair[1]), "closed segment {}", pair[0]);
    }
    let last = *bases.last().ok_or("no segment")?;
    let (log, report) = open(&storage, &dir, &cfg)?;
    assert_eq!(report.truncation, None);
    assert_eq!(log.next_offset(), next);
    check(&log)?;
    assert_eq!(file_len(last)?, bytes_in(last, u64::MAX), "padding left after reopen");
    Ok(())
}

#[test]
fn torn_tail_on_disk_drops_only_the_last_batch() -> TestResult {
    let cfg = config(2000);
    let (tmp, storage, model) = fs_log(20, &cfg, false)?;
    let dir = tmp.path().join("p");
    let path = last_segment(&*storage, &dir)?;
    let file = std::fs::OpenOptions::new().write(true).open(&path)?;
    let len = file.metadata()?.len();
    let last_len = model.last().map_or(0, |b| b.len() as u64);
    file.set_len(len - last_len / 2)?;
    drop(file);

    let (mut log, report) = open(&storage, &dir, &cfg)?;
    let cut = report.truncation.clone().ok_or("no truncation reported")?;
    assert_eq!(cut.path, path);
    assert_eq!(cut.position, len - last_len);
    assert_eq!(cut.bytes_dropped, last_len - last_len / 2);
    assert!(matches!(cut.reason, TailDefect::PastEnd { .. }), "{:?}", cut.reason);
    assert_eq!(std::fs::metadata(&path)?.len(), len - last_len);
    let kept = &model[..model.len() - 1];
    assert_eq!(log.next_offset(), count_to(&kept[kept.len() - 1]));
    check_reads(&log, kept)?;

    // The repaired log takes appends again and reopens clean.
    let mut model = kept.to_vec();
    model.extend(append_n(&mut log, 3, |_| 0)?);
    log.sync()?;
    drop(log);
    let (log, report) = open(&storage, &dir, &cfg)?;
    assert_eq!(report.truncation, None);
    check_reads(&log, &model)
}

/// Flips one byte of the records of batch `from_end` (1 = last) in the last segment.
fn flip_in_batch(path: &Path, model: &[Bytes], from_end: usize) -> TestResult {
    let mut bytes = std::fs::read(path)?;
    let tail: usize = model[model.len() - from_end..].iter().map(|b| b.len()).sum();
    let at = bytes.len() - tail + 70; // past the 61-byte header, inside the records
    bytes[at] ^= 0x40;
    std::fs::write(path, bytes)?;
    Ok(())
}

/// Reads of every offset of `model` but those of `damaged` (which must fail as corrupt).
fn check_reads_around(log: &PartitionLog, model: &[Bytes], damaged: usize) -> TestResult {
    for (i, b) in model.iter().enumerate() {
        let h = BatchHeader::parse(b)?;
        for offset in h.base_offset..=h.last_offset() {
            let read = log.read_plan(offset, 1 << 20).and_then(|plan| plan.execute());
            if i == damaged {
                assert!(matches!(read, Err(LogError::Corrupt { .. })), "offset {offset}: {read:?}");
                continue;
            }
            let got: Vec<(BatchHeader, Bytes)> = BatchSplitter::new(read?).collect::<Result<_, _>>()?;
            assert_eq!(got.first().map(|(_, b)| b), Some(b), "offset {offset}");
            // A read that starts before the damage stops at it: nothing damaged is served.
            let expected_len = if i < damaged { damaged - i } else { model.len() - i };
            assert_eq!(got.len(), expected_len, "offset {offset}");
            for (j, (_, got)) in got.iter().enumerate() {
                assert_eq!(got, &model[i + j]);
            }
        }
    }
    Ok(())
}

/// Without a recovery point (the power failed before any was checkpointed), the whole last
/// segment may be torn: a damaged last batch is cut, and the cut bytes are kept aside.
#[test]
fn flipped_bit_in_the_last_batch_after_the_recovery_point_is_cut_and_kept_aside() -> TestResult {
    let cfg = config(1 << 20);
    let (tmp, storage, model) = fs_log(10, &cfg, false)?;
    let dir = tmp.path().join("p");
    flip_in_batch(&last_segment(&*storage, &dir)?, &model, 1)?;
    let (log, report) = open(&storage, &dir, &cfg)?;
    assert_eq!(report.recovery_point, None);
    let cut = report.truncation.ok_or("no truncation reported")?;
    assert!(matches!(cut.reason, TailDefect::Crc(_)), "{:?}", cut.reason);
    assert_eq!(cut.bytes_dropped, model[model.len() - 1].len() as u64);
    assert!(!cut.cut_valid_batch && !cut.all_zero);
    let mut original = model[model.len() - 1].to_vec();
    original[70] ^= 0x40;
    assert_eq!(std::fs::read(cut.copy.ok_or("no copy")?)?, original, "the cut bytes are kept aside");
    assert!(report.damaged.is_empty());
    check_reads(&log, &model[..model.len() - 1])
}

/// Bit rot in the last batch below the recovery point (a clean shutdown checkpointed it) is
/// corruption of acknowledged data: kept in place, refused on read, found and copied aside by
/// the background pass (recovery reads only headers below the point); never cut.
#[test]
fn flipped_bit_in_the_last_batch_below_the_recovery_point_is_kept_as_corruption() -> TestResult {
    let cfg = config(1 << 20);
    let (tmp, storage, model) = fs_log(10, &cfg, true)?;
    let dir = tmp.path().join("p");
    let path = last_segment(&*storage, &dir)?;
    let len = std::fs::metadata(&path)?.len();
    flip_in_batch(&path, &model, 1)?;
    let (mut log, report) = open(&storage, &dir, &cfg)?;
    assert_eq!(report.recovery_point.map(|p| p.position), Some(len));
    assert_eq!(report.truncation, None, "acknowledged data was cut");
    assert!(report.damaged.is_empty(), "recovery CRC-checked below the recovery point");
    let last = model.len() - 1;
    let h = BatchHeader::parse(&model[last])?;
    let found = verify_all(&log)?;
    let [d] = &found[..] else { return Err(format!("{found:?}").into()) };
    assert_eq!((d.offsets.clone(), d.len), (h.base_offset..h.next_offset(), model[last].len() as u64));
    assert_eq!(std::fs::metadata(&path)?.len(), len);
    assert_eq!(log.next_offset(), h.next_offset(), "the damaged offsets are not handed out again");
    check_reads_around(&log, &model, last)?;
    assert!(dir.join("quarantine").join(format!("{:020}.log.{}", 0, d.position)).exists());
    // Appends go on after it; a reopen finds the same damage and keeps it.
    let more = append_n(&mut log, 2, |s| s as i64)?;
    log.sync()?;
    drop(log);
    let (log, report) = open(&storage, &dir, &cfg)?;
    assert_eq!((report.damaged.len(), report.truncation), (0, None));
    assert_eq!(verify_all(&log)?.len(), 1);
    let all: Vec<Bytes> = model.iter().chain(&more).cloned().collect();
    check_reads_around(&log, &all, last)
}

/// A flipped bit in a synced batch with valid batches after it is corruption, not a torn
/// write: nothing after it is dropped, the damaged batch is refused on read with a clear error,
/// and its bytes are copied to `quarantine/`. Appends go on after the valid data.
#[test]
fn flipped_bit_mid_active_segment_keeps_everything_after_it() -> TestResult {
    for from_end in [2, 5] {
        let cfg = config(1 << 20);
        let (tmp, storage, model) = fs_log(10, &cfg, true)?;
        let dir = tmp.path().join("p");
        flip_in_batch(&last_segment(&*storage, &dir)?, &model, from_end)?;
        let (mut log, report) = open(&storage, &dir, &cfg)?;
        assert_eq!(report.truncation, None, "acknowledged data after the damage was cut");
        assert!(report.damaged.is_empty(), "recovery CRC-checked below the recovery point");
        let damaged = model.len() - from_end;
        let h = BatchHeader::parse(&model[damaged])?;
        let found = verify_all(&log)?;
        let [d] = &found[..] else { return Err(format!("{found:?}").into()) };
        assert_eq!(d.offsets, h.base_offset..h.next_offset());
        assert_eq!(d.len, model[damaged].len() as u64);
        assert_eq!(log.next_offset(), BatchHeader::parse(&model[9])?.next_offset());
        check_reads_around(&log, &model, damaged)?;
        let copy = dir.join("quarantine").join(format!("{:020}.log.{}", 0, d.position));
        let mut original = model[damaged].to_vec();
        original[70] ^= 0x40;
        assert_eq!(std::fs::read(&copy)?, original, "the damaged bytes are kept aside");
        let more = append_n(&mut log, 2, |s| s as i64)?;
        drop(log);
        // Reopening keeps it; the background pass finds it again.
        let (log, report) = open(&storage, &dir, &cfg)?;
        assert_eq!(verify_all(&log)?.len() + report.damaged.len(), 1);
        let all: Vec<Bytes> = model.iter().chain(&more).cloned().collect();
        check_reads_around(&log, &all, damaged)?;
    }
    Ok(())
}

/// A damaged batch is repaired in place with another replica's copy of it (here the model's):
/// every offset reads again, the file is byte for byte what was written, and nothing is
/// written over an intact batch, nor with a batch of other offsets or length.
#[test]
fn a_damaged_batch_is_repaired_in_place_with_a_good_copy_and_only_then() -> TestResult {
    for from_end in [1, 4] {
        let cfg = config(1 << 20);
        let (tmp, storage, model) = fs_log(10, &cfg, true)?;
        let dir = tmp.path().join("p");
        let path = last_segment(&*storage, &dir)?;
        let before = std::fs::read(&path)?;
        flip_in_batch(&path, &model, from_end)?;
        let (mut log, _) = open(&storage, &dir, &cfg)?;
        let damaged = model.len() - from_end;
        check_reads_around(&log, &model, damaged)?;
        // Copies that do not fit are refused: the next batch (intact), a batch cut short.
        let next = (damaged + 1) % model.len();
        assert!(!log.repair_batch(&ValidatedBatch::new(model[next].clone())?)?, "an intact batch");
        let mut other = batch(99, 3, 0);
        other.stamp(BatchHeader::parse(&model[damaged])?.base_offset, 0);
        assert!(!log.repair_batch(&other)?, "another length at those offsets");
        check_reads_around(&log, &model, damaged)?;
        // The replica's copy: repaired, and read back whole.
        assert!(log.repair_batch(&ValidatedBatch::new(model[damaged].clone())?)?);
        check_reads(&log, &model)?;
        assert_eq!(std::fs::read(&path)?, before, "the file is what was written");
        assert!(!log.repair_batch(&ValidatedBatch::new(model[damaged].clone())?)?, "nothing left to repair");
        drop(log);
        let (log, report) = open(&storage, &dir, &cfg)?;
        assert!(report.damaged.is_empty() && verify_all(&log)?.is_empty());
        check_reads(&log, &model)?;
    }
    Ok(())
}

/// A damaged length field hides where the next batch starts: recovery finds it by scanning.
#[test]
fn damaged_length_mid_segment_resyncs_on_the_next_valid_batch() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1 << 20);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let model = append_n(&mut log, 6, |_| 0)?;
    log.sync()?;
    log.recovery_checkpoint().write()?;
    drop(log);
    let path = segment_path(dir, 0, "log");
    let mut bytes = mem.contents(&path).ok_or("no segment")?;
    let at: usize = model[..2].iter().map(|b| b.len()).sum();
    bytes[at + 9] ^= 0x10; // the batch length (bytes 8..12)
    mem.set_contents(&path, &bytes)?;
    let (log, report) = open(&storage, dir, &cfg)?;
    assert_eq!(report.truncation, None);
    assert_eq!(report.damaged.len(), 1, "{:?}", report.damaged);
    check_reads_around(&log, &model, 2)
}

#[test]
fn offset_gap_in_the_last_segment_is_cut() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1 << 20);
    storage.create_dir_all(dir)?;
    let mut first = batch(0, 2, 0);
    first.stamp(0, 0);
    let mut gap = batch(1, 1, 0);
    gap.stamp(5, 0);
    let mut bytes = first.to_vec();
    bytes.extend_from_slice(&gap);
    mem.set_contents(&segment_path(dir, 0, "log"), &bytes)?;
    let (log, report) = open(&storage, dir, &cfg)?;
    let cut = report.truncation.ok_or("no truncation")?;
    assert_eq!(cut.reason, TailDefect::OffsetMismatch { expected: 2, found: 5 });
    assert_eq!((cut.position, cut.bytes_dropped), (first.len() as u64, gap.len() as u64));
    check_reads(&log, &[first.freeze()])?;

    // A last segment whose first batch does not match its name is cut to nothing.
    mem.set_contents(&segment_path(dir, 0, "log"), &gap)?;
    let (log, report) = open(&storage, dir, &cfg)?;
    assert_eq!(report.truncated_bytes(), gap.len() as u64);
    assert_eq!(log.next_offset(), 0);
    Ok(())
}

#[test]
fn missing_or_garbage_indexes_are_rebuilt_identically() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(2000);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let model = append_n(&mut log, 40, |s| 10 * s as i64)?;
    log.sync()?;
    drop(log);
    let all = bases(&*storage, dir)?;
    assert!(all.len() >= 3, "want two closed segments");
    // The active segment's offset index holds only its header until it is sealed; closed
    // ones have their entries.
    let (first, last) = (all[0], all[all.len() - 2]);
    let active_index = mem.contents(&segment_path(dir, all[all.len() - 1], "index"));
    assert_eq!(active_index.map(|i| i.len()), Some(24));
    let originals: Vec<(PathBuf, Vec<u8>)> = [
        segment_path(dir, first, "index"),
        segment_path(dir, first, "timeindex"),
        segment_path(dir, last, "index"),
    ]
    .into_iter()
    .filter_map(|p| mem.contents(&p).map(|c| (p, c)))
    .collect();
    assert_eq!(originals.len(), 3);
    assert!(originals[0].1.len() > 24 + 12, "want a closed segment with several index entries");

    storage.remove(&originals[0].0)?;
    mem.set_contents(&originals[1].0, b"QVTI garbage that is not an index")?;
    mem.set_contents(&originals[2].0, &originals[2].1[..originals[2].1.len() - 3])?;
    let (log, report) = open(&storage, dir, &cfg)?;
    assert_eq!(report.rebuilt_indexes, vec![first, last]);
    for (path, original) in &originals {
        assert_eq!(mem.contents(path).as_ref(), Some(original), "{}", path.display());
    }
    check_reads(&log, &model)?;
    let first_at_155 =
        model.iter().filter_map(|b| BatchHeader::parse(b).ok()).find(|h| h.max_timestamp >= 155);
    assert_eq!(log.offset_for_timestamp(155)?, first_at_155.map(|h| h.base_offset));
    Ok(())
}

#[test]
fn index_entry_past_the_log_is_rebuilt() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(2000);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let model = append_n(&mut log, 30, |_| 0)?;
    drop(log);
    let path = segment_path(dir, 0, "index");
    let mut index = mem.contents(&path).ok_or("no index")?;
    index.extend_from_slice(&500u32.to_le_bytes());
    index.extend_from_slice(&1_000_000u32.to_le_bytes());
    index.extend_from_slice(&400u32.to_le_bytes());
    mem.set_contents(&path, &index)?;
    let (log, report) = open(&storage, dir, &cfg)?;
    assert_eq!(report.rebuilt_indexes, vec![0]);
    check_reads(&log, &model)
}

#[test]
fn damaged_end_of_a_closed_segment_is_kept_and_refused_on_read() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1000);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let model = append_n(&mut log, 30, |_| 0)?;
    log.sync()?;
    drop(log);
    let path = segment_path(dir, 0, "log");
    let mut bytes = mem.contents(&path).ok_or("no segment")?;
    let len = bytes.len();
    bytes.truncate(len - 5);
    mem.set_contents(&path, &bytes)?;
    let (log, report) = open(&storage, dir, &cfg)?;
    let [d] = &report.damaged[..] else { return Err(format!("{:?}", report.damaged).into()) };
    // The last batch of the first segment: its offsets are refused, the rest reads.
    let last =
        model.iter().position(|b| BatchHeader::parse(b).is_ok_and(|h| h.next_offset() == d.offsets.end));
    let last = last.ok_or("damage does not end at a batch")?;
    check_reads_around(&log, &model[..=last], last)?;
    for b in &model[last + 1..] {
        let got = log.read_plan(BatchHeader::parse(b)?.base_offset, 0)?.execute()?;
        assert_eq!(&got, b);
    }
    Ok(())
}

/// Runs the background verification over every closed segment and the synced active part.
fn verify_all(log: &PartitionLog) -> Result<Vec<Damage>, LogError> {
    let (mut found, mut after) = (Vec::new(), None);
    while let Some(target) = log.verify_target(after)? {
        after = Some(target.base());
        found.extend(target.verify(|_| true)?);
    }
    Ok(found)
}

/// A closed segment is trusted at start (its headers, not its CRCs, are read): a flipped bit
/// in it is never served, and the background check finds it.
#[test]
fn corrupt_closed_segment_is_refused_on_read_and_found_by_verification() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1000);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let model = append_n(&mut log, 30, |_| 0)?;
    log.sync()?;
    assert!(log.segment_count() > 2);
    assert!(verify_all(&log)?.is_empty(), "a clean log verifies clean");
    drop(log);
    let path = segment_path(dir, 0, "log");
    let mut bytes = mem.contents(&path).ok_or("no segment")?;
    bytes[model[0].len() + 70] ^= 0x01; // inside the second batch's records
    mem.set_contents(&path, &bytes)?;
    let (log, report) = open(&storage, dir, &cfg)?;
    assert!(report.damaged.is_empty() && report.truncation.is_none(), "closed segments are trusted");
    let h1 = BatchHeader::parse(&model[1])?;
    assert!(matches!(log.read_plan(h1.base_offset, 1 << 20)?.execute(), Err(LogError::Corrupt { .. })));
    // A read from before it stops short of it.
    let got = log.read_plan(0, 1 << 20)?.execute()?;
    assert_eq!(got, model[0]);
    let found = verify_all(&log)?;
    let [d] = &found[..] else { return Err(format!("{found:?}").into()) };
    assert_eq!(d.offsets, h1.base_offset..h1.next_offset());
    assert!(matches!(d.reason, TailDefect::Crc(_)));
    let copy = dir.join("quarantine").join(format!("{:020}.log.{}", 0, d.position));
    assert_eq!(mem.contents(&copy).map(|c| c.len()), Some(model[1].len()));
    Ok(())
}

#[test]
fn foreign_files_orphans_and_an_empty_last_segment() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1000);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let model = append_n(&mut log, 12, |_| 0)?;
    let next = log.next_offset();
    log.sync()?;
    drop(log);
    mem.set_contents(&dir.join("notes.txt"), b"hello")?;
    mem.set_contents(&dir.join("123.log"), b"short name")?;
    mem.set_contents(&segment_path(dir, 7, "timeindex"), b"orphan")?;
    // A roll that crashed right after creating the next segment leaves it empty.
    mem.set_contents(&segment_path(dir, next, "log"), b"")?;
    let (mut log, report) = open(&storage, dir, &cfg)?;
    let mut skipped = report.skipped_files.clone();
    skipped.sort();
    assert_eq!(skipped, vec!["123.log".to_string(), "notes.txt".to_string()]);
    assert_eq!(report.removed_files, vec![segment::file_name(7, "timeindex")]);
    assert!(mem.contents(&segment_path(dir, 7, "timeindex")).is_none());
    assert_eq!(log.next_offset(), next);
    check_reads(&log, &model)?;
    let mut model = model;
    model.extend(append_n(&mut log, 2, |_| 0)?);
    check_reads(&log, &model)
}

/// `roll_now` starts a segment at the next offset (not for an empty one), and
/// `delete_segments_below` drops exactly the closed segments wholly below an offset, durably:
/// a crash afterwards reopens the log at the new start.
#[test]
fn roll_now_and_delete_segments_below() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let (mut log, _) = open(&storage, dir, &config(1 << 20))?;
    append_n(&mut log, 5, |_| 0)?;
    assert!(log.roll_now()?);
    assert!(!log.roll_now()?, "an empty active segment is not rolled");
    let second_base = log.next_offset();
    append_n(&mut log, 5, |_| 0)?;
    assert!(log.roll_now()?);
    let third_base = log.next_offset();
    let third = append_n(&mut log, 3, |_| 0)?;
    log.sync()?;
    assert_eq!(bases(&*storage, dir)?, vec![0, second_base, third_base]);
    // Inside the second segment: only the first goes.
    let report = log.delete_segments_below(second_base + 1)?;
    assert_eq!(report.deleted_bases, vec![0]);
    assert_eq!(log.log_start_offset(), second_base);
    // Past the log end: every closed segment goes, never the active one.
    let report = log.delete_segments_below(u64::MAX)?;
    assert_eq!((report.deleted_bases, report.log_start_offset), (vec![second_base], third_base));
    check_reads(&log, &third)?;
    drop(log);
    mem.crash();
    let (log, _) = open(&storage, dir, &config(1 << 20))?;
    assert_eq!((log.log_start_offset(), log.next_offset()), (third_base, third_base + count_all(&third)));
    check_reads(&log, &third)?;
    Ok(())
}

fn count_all(batches: &[Bytes]) -> u64 {
    batches.iter().map(|b| count(b)).sum()
}

#[test]
fn retention_by_bytes() -> TestResult {
    let (_, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = LogConfig { retention_bytes: Some(3000), ..config(1000) };
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let model = append_n(&mut log, 80, |_| 0)?;
    let before = log.segment_count();
    let report = log.apply_retention(0)?;
    assert!(report.deleted_segments() > 0);
    assert_eq!(log.segment_count(), before - report.deleted_segments());
    assert!(log.size_bytes() >= 3000);
    assert_eq!(report.log_start_offset, log.log_start_offset());
    assert_eq!(report.deleted_bases.first(), Some(&0));
    // The oldest remaining segment is kept because deleting it would go below the limit.
    let oldest_size = log.read_plan(log.log_start_offset(), usize::MAX)?.len() as u64;
    assert!(log.size_bytes() - oldest_size < 3000 || log.segment_count() == 1);
    let start = log.log_start_offset();
    assert!(start > 0);
    match log.read_plan(start - 1, 100) {
        Err(LogError::OffsetOutOfRange { requested, log_start, next }) => {
            assert_eq!((requested, log_start, next), (start - 1, start, log.next_offset()));
        }
        other => return Err(format!("expected OffsetOutOfRange, got {other:?}").into()),
    }
    let kept: Vec<Bytes> = model.iter().filter(|b| count_to(b) > start).cloned().collect();
    check_reads(&log, &kept)?;
    assert_eq!(bases(&*storage, dir)?.first(), Some(&start));
    // Three files per closed segment; the active one has its log and its offset index's
    // header until it is sealed; and the recovery point, written at each roll; and the
    // leader-epoch record.
    assert_eq!(storage.list(dir)?.len(), 3 * log.segment_count() - 1 + 1 + 1);
    assert_eq!(log.apply_retention(0)?.deleted_segments(), 0);
    drop(log);
    let (log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(log.log_start_offset(), start);
    check_reads(&log, &kept)
}

/// Newest timestamp of each closed segment, read straight from the segment files.
fn closed_segment_ages(mem: &MemStorage, dir: &Path) -> Result<Vec<(u64, i64)>, Box<dyn Error>> {
    let all = bases(mem, dir)?;
    let mut out = Vec::new();
    for &base in &all[..all.len() - 1] {
        let bytes = mem.contents(&segment_path(dir, base, "log")).ok_or("missing segment")?;
        let batches: Vec<(BatchHeader, Bytes)> =
            BatchSplitter::new(bytes.into()).collect::<Result<_, _>>()?;
        out.push((base, batches.iter().map(|(h, _)| h.max_timestamp).max().unwrap_or(i64::MIN)));
    }
    Ok(out)
}

#[test]
fn retention_by_age_deletes_exactly_the_old_segments() -> TestResult {
    // A sparse and a nearly empty time index: either way a closed segment's age must count
    // the batches after its last index entry.
    for interval in [300, 1 << 20] {
        for now in (1000..=11_000).step_by(250) {
            let (mem, storage) = mem();
            let dir = Path::new(DIR);
            let cfg = LogConfig { retention_ms: Some(1000), index_interval_bytes: interval, ..config(1000) };
            let (mut log, _) = open(&storage, dir, &cfg)?;
            let model = append_n(&mut log, 40, |s| 100 * s as i64)?;
            // Reopen, so the segments' newest timestamps come from their index files and tails.
            drop(log);
            let (mut log, _) = open(&storage, dir, &cfg)?;
            let expected: Vec<u64> = closed_segment_ages(&mem, dir)?
                .into_iter()
                .take_while(|&(_, newest)| newest < now - 1000)
                .map(|(b, _)| b)
                .collect();
            let report = log.apply_retention(now)?;
            assert_eq!(report.deleted_bases, expected, "interval {interval} now {now}");
            assert_eq!(report.log_start_offset, log.log_start_offset());
            let kept: Vec<Bytes> =
                model.iter().filter(|b| count_to(b) > log.log_start_offset()).cloned().collect();
            check_reads(&log, &kept)?;
        }
    }
    Ok(())
}

#[test]
fn retention_never_deletes_the_active_segment() -> TestResult {
    let (_, storage) = mem();
    let cfg = LogConfig { retention_ms: Some(1), retention_bytes: Some(0), ..config(1000) };
    let (mut log, _) = open(&storage, Path::new(DIR), &cfg)?;
    let model = append_n(&mut log, 20, |_| 0)?;
    assert!(log.segment_count() > 1);
    log.apply_retention(i64::MAX)?;
    assert_eq!(log.segment_count(), 1);
    assert!(log.log_start_offset() < log.next_offset());
    let kept: Vec<Bytes> = model.iter().filter(|b| count_to(b) > log.log_start_offset()).cloned().collect();
    check_reads(&log, &kept)
}

#[test]
fn index_files_follow_the_format() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let fixed = |ts: i64| {
        let mut b = BatchBuilder::new(128);
        b.push(ts, None, b"same size", &[]);
        b.push(ts + 1, None, b"same size", &[]);
        ValidatedBatch::new(b.finish()).expect("valid batch")
    };
    let size = fixed(0).len();
    // An entry every second batch: batches 0, 2, 4, 6 (offsets 0, 4, 8, 12).
    let cfg = LogConfig { index_interval_bytes: 2 * size as u32, ..config(1 << 20) };
    let (mut log, _) = open(&storage, dir, &cfg)?;
    for k in 0..7i64 {
        // Batches 3 and 4 go back in time, so the max so far does not rise by batch 4 and the
        // time index skips it.
        let ts = if k == 3 || k == 4 { 0 } else { 100 * k };
        log.append(&mut fixed(ts), 0, 0)?;
    }
    // The offset index's header (with the base ordinal) is written when a segment is created,
    // unless its base ordinal is its base offset + 1, as here (what recovery assumes without
    // one); the entries, and the time index, when it is sealed.
    let mut offsets = b"QVIX\x02\x00\x00\x00".to_vec();
    offsets.extend_from_slice(&0u64.to_le_bytes());
    offsets.extend_from_slice(&1u64.to_le_bytes());
    assert_eq!(mem.contents(&segment_path(dir, 0, "index")), None);
    assert_eq!(mem.contents(&segment_path(dir, 0, "timeindex")), None);
    log.roll(None)?;
    let mut times = b"QVTI\x01\x00\x00\x00".to_vec();
    times.extend_from_slice(&0u64.to_le_bytes());
    for k in [0u32, 2, 4, 6] {
        offsets.extend_from_slice(&(2 * k).to_le_bytes());
        offsets.extend_from_slice(&(k * size as u32).to_le_bytes());
        offsets.extend_from_slice(&k.to_le_bytes());
        if k != 4 {
            times.extend_from_slice(&(100 * i64::from(k) + 1).to_le_bytes());
            times.extend_from_slice(&(2 * k).to_le_bytes());
        }
    }
    assert_eq!(mem.contents(&segment_path(dir, 0, "index")), Some(offsets));
    assert_eq!(mem.contents(&segment_path(dir, 0, "timeindex")), Some(times));
    Ok(())
}

#[test]
fn offset_for_timestamp_finds_the_first_batch_at_or_after() -> TestResult {
    let (_, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1500);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    // Batch at offset s has records stamped 1000 + 10 s ..; one batch goes back in time.
    let model = append_n(&mut log, 50, |s| if s == 30 { 5 } else { 1000 + 10 * s as i64 })?;
    let expect = |ts: i64| -> Option<u64> {
        model
            .iter()
            .filter_map(|b| BatchHeader::parse(b).ok())
            .find(|h| h.max_timestamp >= ts)
            .map(|h| h.base_offset)
    };
    for reopen in [false, true] {
        if reopen {
            drop(log);
            log = open(&storage, dir, &cfg)?.0;
        }
        for ts in
            [i64::MIN, 0, 5, 999, 1000, 1001, 1100, 1234, 1300, 1305, 1400, 1490, 1491, 1493, 1494, 5000]
        {
            assert_eq!(log.offset_for_timestamp(ts)?, expect(ts), "ts {ts}");
        }
        assert!(log.segment_count() > 3);
    }
    Ok(())
}

#[test]
fn config_is_validated() {
    let (_, storage) = mem();
    for bad in [config(0), config(MAX_SEGMENT_BYTES + 1), LogConfig { segment_ms: 0, ..config(100) }] {
        assert!(matches!(open(&storage, Path::new(DIR), &bad), Err(LogError::InvalidConfig(_))));
    }
}

proptest! {
    #![proptest_config(crate::fuzz::config(200))]

    /// Hostile bytes as the last segment, or as a closed one, never panic; when the open
    /// succeeds every offset reads.
    #[test]
    fn arbitrary_segment_bytes_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..600),
        splice_valid in any::<bool>(),
        as_closed in any::<bool>(),
        index in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let (mem, storage) = mem();
        let dir = Path::new(DIR);
        let cfg = config(1000);
        let mut bytes = Vec::new();
        if splice_valid {
            // A valid batch first, so the scan gets past the first header.
            bytes.extend_from_slice(&batch(0, 2, 0));
        }
        bytes.extend_from_slice(&data);
        let set = |path: PathBuf, b: &[u8]| mem.set_contents(&path, b);
        prop_assert!(storage.create_dir_all(dir).is_ok());
        prop_assert!(set(segment_path(dir, 0, "log"), &bytes).is_ok());
        prop_assert!(set(segment_path(dir, 0, "index"), &index).is_ok());
        if as_closed {
            prop_assert!(set(segment_path(dir, 2, "log"), &[]).is_ok());
        }
        if let Ok((mut log, _)) = open(&storage, dir, &cfg) {
            // Every offset reads, or (damage kept in place) fails as corrupt.
            for offset in log.log_start_offset()..log.next_offset() {
                let read = log.read_plan(offset, 100).and_then(|plan| plan.execute());
                prop_assert!(matches!(read, Ok(_) | Err(LogError::Corrupt { .. })), "{:?}", read);
            }
            let _ = log.offset_for_timestamp(0);
            // Ordinal lookups answer or fail as corrupt, never panic.
            prop_assert!(log.first_ordinal() <= log.next_ordinal());
            for offset in log.log_start_offset()..log.next_offset() {
                let ord = log.ordinal_at(offset);
                prop_assert!(matches!(ord, Ok(Some(_)) | Err(LogError::Corrupt { .. })), "{:?}", ord);
            }
            for ord in log.first_ordinal()..=log.next_ordinal() {
                let offset = log.offset_of_ordinal(ord);
                prop_assert!(matches!(offset, Ok(Some(_)) | Err(LogError::Corrupt { .. })), "{:?}", offset);
            }
            prop_assert!(log.append(&mut batch(9, 1, 0), 0, 0).is_ok());
        }
    }
}

/// Counts the files a storage has open (handles not yet dropped), and the most at once.
#[derive(Debug, Default)]
struct OpenFiles {
    open: Arc<std::sync::atomic::AtomicUsize>,
    peak: Arc<std::sync::atomic::AtomicUsize>,
}

impl crate::storage::FileWrapper for OpenFiles {
    fn wrap(
        &self,
        _: &Path,
        inner: Arc<dyn crate::storage::StorageFile>,
    ) -> Arc<dyn crate::storage::StorageFile> {
        let now = self.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
        Arc::new(CountedFile { inner, open: self.open.clone() })
    }
}

type Counting = crate::storage::Wrapped<MemStorage, OpenFiles>;

#[derive(Debug)]
struct CountedFile {
    inner: Arc<dyn crate::storage::StorageFile>,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for CountedFile {
    fn drop(&mut self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl crate::storage::StorageFile for CountedFile {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_exact_at(pos, buf)
    }
    fn append(&self, data: &[u8]) -> std::io::Result<()> {
        self.inner.append(data)
    }
    fn truncate(&self, len: u64) -> std::io::Result<()> {
        self.inner.truncate(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
}

/// A partition with many segments holds a bounded number of files open, whatever is done
/// with it: open (recovery), appends across rolls, reads of every offset, time lookups,
/// verification, retention. (It held 3 per segment.)
#[test]
fn open_files_are_bounded_whatever_the_number_of_segments() -> TestResult {
    use std::sync::atomic::Ordering::SeqCst;
    let counting = Arc::new(Counting::default());
    let storage: Arc<dyn Storage> = counting.clone();
    let dir = Path::new(DIR);
    let cfg = config(400);
    // At most the active segment's 3 files, OPEN_CLOSED_SEGMENTS closed logs, and the one or
    // two a single operation has in hand (a roll opens the new segment before closing the old).
    let bound = 3 + OPEN_CLOSED_SEGMENTS + 3;
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let model = append_n(&mut log, 200, |s| s as i64)?;
    log.sync()?;
    assert!(log.segment_count() > 40, "{} segments", log.segment_count());
    assert!(counting.wrapper.open.load(SeqCst) <= 3 + OPEN_CLOSED_SEGMENTS);
    drop(log);
    assert_eq!(counting.wrapper.open.load(SeqCst), 0, "every file closed with the log");

    let (log, _) = open(&storage, dir, &cfg)?;
    assert!(counting.wrapper.open.load(SeqCst) <= 3 + OPEN_CLOSED_SEGMENTS, "after recovery");
    check_reads(&log, &model)?;
    assert!(counting.wrapper.open.load(SeqCst) <= 3 + OPEN_CLOSED_SEGMENTS, "after reads");
    for ts in [0, 50, 150, 199] {
        log.offset_for_timestamp(ts)?;
    }
    assert!(verify_all(&log)?.is_empty());
    assert!(counting.wrapper.open.load(SeqCst) <= 3 + OPEN_CLOSED_SEGMENTS, "after verification");
    // A read plan keeps its file readable after its segment is closed or deleted.
    let plan = log.read_plan(0, 1 << 20)?;
    let mut log = log;
    log.config.retention_bytes = Some(1);
    log.apply_retention(0)?;
    assert_eq!(plan.execute()?.slice(..model[0].len()), model[0]);
    assert!(
        counting.wrapper.peak.load(SeqCst) <= bound,
        "peak {} open files",
        counting.wrapper.peak.load(SeqCst)
    );
    Ok(())
}

/// Batches A and B are written after the last completed fsync; the power fails with A's
/// block lost (zeros) and B on disk, as reordered writeback or a direct write overtaking
/// buffered ones can leave them. Neither was acknowledged: recovery cuts at A, so B goes too,
/// nothing is kept as corruption, and the log takes appends at A's offset.
#[test]
fn a_lost_block_before_a_surviving_one_after_the_recovery_point_is_cut() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1 << 20);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    let mut model = append_n(&mut log, 4, |_| 0)?;
    log.sync()?;
    log.recovery_checkpoint().write()?;
    let synced_next = log.next_offset();
    let unsynced = append_n(&mut log, 2, |_| 0)?;
    let (a, b) = (unsynced[0].len(), unsynced[1].len());
    drop(log);
    mem.crash_reordered(0..a);
    let path = segment_path(dir, 0, "log");
    let synced_len: usize = model.iter().map(|b| b.len()).sum();
    let on_disk = mem.contents(&path).ok_or("no segment")?;
    assert_eq!(&on_disk[synced_len + a..], &unsynced[1][..], "B survived the crash");

    let (mut log, report) = open(&storage, dir, &cfg)?;
    assert!(report.damaged.is_empty(), "unacknowledged bytes kept as corruption: {:?}", report.damaged);
    let cut = report.truncation.ok_or("nothing cut")?;
    assert_eq!((cut.position, cut.bytes_dropped), (synced_len as u64, (a + b) as u64));
    assert!(cut.cut_valid_batch, "B was valid and cut");
    let copy = mem.contents(&cut.copy.ok_or("no copy")?).ok_or("copy missing")?;
    assert_eq!(&copy[a..], &unsynced[1][..], "the cut bytes are kept aside");
    assert_eq!(log.next_offset(), synced_next);
    check_reads(&log, &model)?;
    model.extend(append_n(&mut log, 2, |_| 0)?);
    log.sync()?;
    drop(log);
    let (log, report) = open(&storage, dir, &cfg)?;
    assert_eq!((report.truncation, report.damaged.len()), (None, 0));
    check_reads(&log, &model)
}

/// A clean shutdown checkpoints the recovery point at the end of the log; after a later crash
/// that tears the unsynced appends, everything below it is kept, damage there included.
#[test]
fn clean_shutdown_checkpoint_keeps_everything_below_it_after_a_torn_crash() -> TestResult {
    for keep in [0, 30, 200] {
        let (mem, storage) = mem();
        let dir = Path::new(DIR);
        let cfg = config(1 << 20);
        let (mut log, _) = open(&storage, dir, &cfg)?;
        let model = append_n(&mut log, 6, |_| 0)?;
        log.sync()?;
        assert!(log.recovery_checkpoint().write()?, "the clean-shutdown checkpoint was not written");
        drop(log);
        let path = segment_path(dir, 0, "log");
        let synced_len = mem.contents(&path).ok_or("no segment")?.len() as u64;
        let point = RecoveryPoint::decode(&mem.contents(&dir.join("recovery-point")).ok_or("no file")?)?;
        let next = BatchHeader::parse(&model[5])?.next_offset();
        assert_eq!(point, RecoveryPoint { segment_base: 0, position: synced_len, next_offset: next });
        // Bit rot in the last synced batch, then more appends that a crash tears.
        let mut bytes = mem.contents(&path).ok_or("no segment")?;
        bytes[synced_len as usize - 5] ^= 0x01;
        mem.set_contents(&path, &bytes)?;
        let (mut log, _) = open(&storage, dir, &cfg)?;
        append_n(&mut log, 3, |_| 0)?;
        drop(log);
        mem.crash_torn(keep);
        let (log, report) = open(&storage, dir, &cfg)?;
        assert!(report.damaged.is_empty(), "recovery CRC-checked below the recovery point");
        let found = verify_all(&log)?;
        let [d] = &found[..] else { return Err(format!("{found:?}").into()) };
        assert_eq!(d.offsets, BatchHeader::parse(&model[5])?.base_offset..next);
        assert_eq!(report.truncated_bytes(), keep as u64, "keep {keep}");
        assert_eq!(log.next_offset(), next);
        check_reads_around(&log, &model, 5)?;
    }
    Ok(())
}

/// What the partition writer asks before appending on its async task: a group that would roll
/// the segment, begin an epoch or write to a poisoned log must go to a blocking thread.
#[test]
fn appends_in_active_segment_says_when_an_append_would_only_write_the_active_segment() -> TestResult {
    let (_mem, storage) = mem();
    let (mut log, _) = open(&storage, Path::new(DIR), &config(4096))?;
    let b = batch(1, 2, 1_000);
    assert!(
        !log.appends_in_active_segment([b.header()], 0, 1_000),
        "the first append begins epoch 0 (an fsync of the epochs file)"
    );
    log.append(&mut b.clone(), 0, 1_000)?;
    assert!(log.appends_in_active_segment([b.header()], 0, 1_000));
    assert!(!log.appends_in_active_segment([b.header()], 1, 1_000), "a new epoch");
    // Fill the segment up to just below a roll; the batch that would pass it is refused.
    let len = b.len() as u64;
    let room = (4096 - len) / len;
    assert!(log.appends_in_active_segment(std::iter::repeat_n(b.header(), room as usize), 0, 1_000));
    assert!(!log.appends_in_active_segment(std::iter::repeat_n(b.header(), room as usize + 1), 0, 1_000));
    let old = config(4096).segment_ms as i64;
    assert!(!log.appends_in_active_segment([b.header()], 0, 1_000 + old), "a segment old enough to roll");
    log.mark_failed();
    assert!(!log.appends_in_active_segment([b.header()], 0, 1_000), "a poisoned log");
    Ok(())
}
