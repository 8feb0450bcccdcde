//! Batch ordinals (design.md §5.7): the Raft index of a batch, persisted as each segment's base
//! ordinal in its offset index header. Reopens, retention, truncation across segments, and
//! data directories written before ordinals existed (version-1 indexes).

use std::path::Path;
use std::sync::Arc;

use quiver_protocol::batch::BatchHeader;

use super::replication_tests::read_all;
use super::tests::{append_n, config, mem, open, segment_path, TestResult, DIR};
use super::*;
use crate::storage::{MemStorage, Storage};

type Error = Box<dyn std::error::Error>;

/// `(ordinal, base offset)` of every batch, from `ordinal_at`, checked against
/// `offset_of_ordinal` and against ordinals growing by one from `first_ordinal`.
fn ordinals(log: &PartitionLog) -> Result<Vec<(u64, u64)>, Error> {
    let mut out = Vec::new();
    for b in read_all(log)? {
        let h = BatchHeader::parse(&b)?;
        let ord = log.ordinal_at(h.base_offset)?.ok_or("no ordinal")?;
        assert_eq!(log.ordinal_at(h.last_offset())?, Some(ord));
        assert_eq!(log.offset_of_ordinal(ord)?, Some(h.base_offset));
        out.push((ord, h.base_offset));
    }
    let expected: Vec<u64> = (0..out.len() as u64).map(|i| log.first_ordinal() + i).collect();
    assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), expected);
    assert_eq!(log.next_ordinal(), log.first_ordinal() + out.len() as u64);
    assert_eq!(log.offset_of_ordinal(log.next_ordinal())?, Some(log.next_offset()));
    Ok(out)
}

/// Rewrites a version-2 offset index as a version-1 one (no ordinals), as an older broker
/// wrote it.
fn downgrade_index(mem: &MemStorage, path: &Path) -> TestResult {
    let v2 = mem.contents(path).ok_or("no index")?;
    assert_eq!(&v2[4..6], &[2, 0]);
    let mut v1 = v2[..16].to_vec();
    v1[4] = 1;
    for entry in v2[24..].chunks_exact(12) {
        v1.extend_from_slice(&entry[..8]);
    }
    mem.set_contents(path, &v1)?;
    Ok(())
}

fn segment_bases(log: &PartitionLog) -> Vec<u64> {
    log.closed.iter().map(|s| s.base).chain([log.active.base]).collect()
}

#[test]
fn ordinals_survive_reopen_retention_and_crash() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1500);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    assert_eq!((log.first_ordinal(), log.next_ordinal()), (1, 1));
    assert_eq!(log.offset_of_ordinal(1)?, Some(0));
    assert_eq!(log.offset_of_ordinal(0)?, None);
    append_n(&mut log, 60, |_| 0)?;
    assert!(log.segment_count() >= 4, "want several segments");
    let before = ordinals(&log)?;
    assert_eq!(before.len(), 60);
    assert_eq!(log.first_ordinal(), 1);
    log.sync()?;
    drop(log);
    let (mut log, report) = open(&storage, dir, &cfg)?;
    assert!(report.rebuilt_indexes.is_empty(), "{:?}", report.rebuilt_indexes);
    assert_eq!(ordinals(&log)?, before);
    // Retention: the first ordinal follows the new first segment.
    let third = segment_bases(&log)[2];
    log.delete_segments_below(third)?;
    let kept: Vec<(u64, u64)> = before.iter().copied().filter(|&(_, o)| o >= third).collect();
    assert_eq!(log.first_ordinal(), kept[0].0);
    assert_eq!(ordinals(&log)?, kept);
    drop(log);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(ordinals(&log)?, kept);
    // Everything but the active segment goes: its ordinals come from its own index header.
    log.roll_now()?;
    let next = log.next_ordinal();
    log.delete_segments_below(log.next_offset())?;
    assert_eq!(log.segment_count(), 1);
    assert_eq!((log.first_ordinal(), log.next_ordinal()), (next, next));
    append_n(&mut log, 5, |_| 0)?;
    let tail = ordinals(&log)?;
    assert_eq!(tail[0].0, next);
    drop(log);
    mem.crash();
    let (log, _) = open(&storage, dir, &cfg)?;
    let survived = ordinals(&log)?;
    assert_eq!(survived[..], tail[..survived.len()]);
    assert_eq!(log.first_ordinal(), next);
    Ok(())
}

#[test]
fn truncation_across_segments_renumbers_only_the_cut() -> TestResult {
    let (_mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1500);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    append_n(&mut log, 60, |_| 0)?;
    let before = ordinals(&log)?;
    // Into the second segment: later segments are deleted, that one becomes active.
    let second = segment_bases(&log)[1];
    let (cut_ord, cut_offset) =
        before.iter().copied().find(|&(_, o)| o > second).ok_or("no batch after the second base")?;
    log.truncate_to_ordinal(cut_ord)?;
    assert_eq!(log.next_offset(), cut_offset);
    assert_eq!(log.next_ordinal(), cut_ord);
    assert_eq!(log.active.base, second);
    let kept: Vec<(u64, u64)> = before.iter().copied().filter(|&(o, _)| o < cut_ord).collect();
    assert_eq!(ordinals(&log)?, kept);
    // Appends after the cut continue from it, across new rolls, and keep their ordinals.
    append_n(&mut log, 30, |_| 0)?;
    let after = ordinals(&log)?;
    assert_eq!(after[..kept.len()], kept[..]);
    assert_eq!(after.len(), kept.len() + 30);
    drop(log);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(ordinals(&log)?, after);
    // To a segment boundary, by ordinal, and to the end (nothing cut).
    let third = segment_bases(&log)[2];
    let at_base = after.iter().find(|&&(_, o)| o == third).ok_or("no batch at a base")?.0;
    log.truncate_to_ordinal(log.next_ordinal())?;
    log.truncate_to_ordinal(at_base)?;
    assert_eq!((log.next_offset(), log.next_ordinal()), (third, at_base));
    assert!(matches!(log.truncate_to_ordinal(at_base + 1), Err(LogError::OrdinalOutOfRange { .. })));
    assert!(matches!(log.truncate_to_ordinal(0), Err(LogError::OrdinalOutOfRange { .. })));
    drop(log);
    let (log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(ordinals(&log)?, after[..(at_base - 1) as usize]);
    Ok(())
}

#[test]
fn version_1_indexes_get_ordinals_once() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1500);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    append_n(&mut log, 50, |_| 0)?;
    log.sync()?;
    let before = ordinals(&log)?;
    let bases = segment_bases(&log);
    drop(log);
    // As an older broker left it: version-1 indexes, no index file for the active segment.
    let (closed, active) = bases.split_at(bases.len() - 1);
    for &base in closed {
        downgrade_index(&mem, &segment_path(dir, base, "index"))?;
    }
    storage.remove(&segment_path(dir, active[0], "index"))?;
    let (log, report) = open(&storage, dir, &cfg)?;
    assert_eq!(report.rebuilt_indexes, closed);
    assert_eq!(ordinals(&log)?, before, "a log that starts at 0 numbers from 1");
    drop(log);
    for &base in closed {
        let index = mem.contents(&segment_path(dir, base, "index")).ok_or("no index")?;
        assert_eq!(&index[4..6], &[2, 0], "written back as version 2");
    }
    let (log, report) = open(&storage, dir, &cfg)?;
    assert!(report.rebuilt_indexes.is_empty());
    assert_eq!(ordinals(&log)?, before);
    Ok(())
}

#[test]
fn version_1_log_with_a_moved_start_numbers_from_its_base() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1500);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    append_n(&mut log, 50, |_| 0)?;
    log.sync()?;
    let bases = segment_bases(&log);
    drop(log);
    // An older broker's retention deleted the first two segments.
    for &base in &bases[..2] {
        for ext in ["log", "index", "timeindex"] {
            storage.remove(&segment_path(dir, base, ext))?;
        }
    }
    let (closed, active) = bases[2..].split_at(bases.len() - 3);
    for &base in closed {
        downgrade_index(&mem, &segment_path(dir, base, "index"))?;
    }
    storage.remove(&segment_path(dir, active[0], "index"))?;
    let (log, _) = open(&storage, dir, &cfg)?;
    let start = log.log_start_offset();
    assert_eq!(start, bases[2]);
    // The rule for an unknown first ordinal: base offset + 1.
    assert_eq!(log.first_ordinal(), start + 1);
    let numbered = ordinals(&log)?;
    drop(log);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(ordinals(&log)?, numbered);
    // Persisted from then on: retention deleting the first segments changes no ordinal.
    log.delete_segments_below(log.active.base)?;
    let kept: Vec<(u64, u64)> = numbered.iter().copied().filter(|&(_, o)| o >= log.active.base).collect();
    assert_eq!(ordinals(&log)?, kept);
    drop(log);
    let (log, _) = open(&storage, dir, &cfg)?;
    assert_eq!(ordinals(&log)?, kept);
    Ok(())
}

#[test]
fn a_damaged_offset_index_keeps_its_header_ordinal() -> TestResult {
    let (mem, storage) = mem();
    let dir = Path::new(DIR);
    let cfg = config(1500);
    let (mut log, _) = open(&storage, dir, &cfg)?;
    append_n(&mut log, 50, |_| 0)?;
    log.sync()?;
    let bases = segment_bases(&log);
    // Delete the first segment so the chain cannot supply the second's base ordinal.
    log.delete_segments_below(bases[1])?;
    let before = ordinals(&log)?;
    drop(log);
    let path = segment_path(dir, bases[1], "index");
    let mut index = mem.contents(&path).ok_or("no index")?;
    index.truncate(index.len() - 5);
    mem.set_contents(&path, &index)?;
    let (log, report) = open(&storage, dir, &cfg)?;
    assert_eq!(report.rebuilt_indexes, vec![bases[1]]);
    assert_eq!(ordinals(&log)?, before);
    Ok(())
}

/// A log of six batches whose third has a damaged length (found by recovery, kept in place),
/// and the batches' headers.
fn damaged_log() -> Result<(Arc<dyn Storage>, Vec<BatchHeader>), Error> {
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
    bytes[at + 9] ^= 0x10; // the third batch's length
    mem.set_contents(&path, &bytes)?;
    let headers = model.iter().map(|b| BatchHeader::parse(b)).collect::<Result<_, _>>()?;
    Ok((storage, headers))
}

/// Every batch has ordinal index + 1, but for `skip` (a damaged span a reopen no longer knows
/// about: its lookups fail as corrupt, as its reads do).
fn check_damaged(log: &PartitionLog, headers: &[BatchHeader], skip: Option<u64>) -> TestResult {
    for (i, h) in headers.iter().enumerate() {
        let ord = i as u64 + 1;
        if Some(ord) == skip {
            assert!(matches!(log.offset_of_ordinal(ord), Err(LogError::Corrupt { .. })));
            assert!(matches!(log.ordinal_at(h.base_offset), Err(LogError::Corrupt { .. })));
            continue;
        }
        assert_eq!(log.offset_of_ordinal(ord)?, Some(h.base_offset), "ordinal {ord}");
        for offset in h.base_offset..h.next_offset() {
            assert_eq!(log.ordinal_at(offset)?, Some(ord), "offset {offset}");
        }
    }
    Ok(())
}

/// A damaged span recovery keeps counts as one ordinal (here it held one batch, so every
/// ordinal is what it was); lookups answer for it without reading it, and the numbering of
/// the batches after it survives sealing the segment and reopening it.
#[test]
fn a_damaged_span_is_one_ordinal() -> TestResult {
    let dir = Path::new(DIR);
    let cfg = config(1 << 20);
    let (storage, headers) = damaged_log()?;
    let (mut log, report) = open(&storage, dir, &cfg)?;
    assert_eq!(report.damaged.len(), 1);
    check_damaged(&log, &headers, None)?;
    assert_eq!(log.next_ordinal(), 7);
    log.roll_now()?;
    check_damaged(&log, &headers, None)?;
    drop(log);
    // Closed now, its index trusted: the span is no longer known, its ordinal still counted.
    let (mut log, _) = open(&storage, dir, &cfg)?;
    check_damaged(&log, &headers, Some(3))?;
    assert_eq!(log.next_ordinal(), 7);
    // Truncation right after the span (the batch there has an index entry).
    log.truncate_to_ordinal(4)?;
    assert_eq!((log.next_offset(), log.next_ordinal()), (headers[3].base_offset, 4));
    drop(log);
    let (log, _) = open(&storage, dir, &cfg)?;
    assert_eq!((log.next_offset(), log.next_ordinal()), (headers[3].base_offset, 4));
    check_damaged(&log, &headers[..3], None)?;

    // Truncating at the span's own ordinal cuts from its start.
    let (storage, headers) = damaged_log()?;
    let (mut log, _) = open(&storage, dir, &cfg)?;
    log.truncate_to_ordinal(3)?;
    assert_eq!((log.next_offset(), log.next_ordinal()), (headers[2].base_offset, 3));
    Ok(())
}
