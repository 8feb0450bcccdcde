//! Opening a partition directory: finding its segments and recovering the tail
//! (docs/design.md §5.3).
//!
//! Closed segments were synced (with their indexes) when they were rolled, so they are trusted
//! when their indexes check out; a cheap header walk from the last index entry to the end of the
//! file confirms they end where the next segment begins. The last segment is always scanned
//! with CRCs: damage below its recovery point (what a completed fsync covered) is corruption
//! and kept; from the recovery point on, the first defect is a torn write and is cut.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::checkpoint::{self, RecoveryPoint};
use super::epochs::{self, Epochs};
use super::index::{IndexDefect, OffsetEntry, TimeEntry};
use super::segment::{BatchAt, Check, DamagedSpan, ScanEnd, Segment, TailDefect, Walker};
use super::{LogConfig, LogError};
use quiver_protocol::limits::MAX_QUARANTINE_BYTES;

use crate::storage::Storage;
use quiver_protocol::batch::BatchHeader;

/// What [`PartitionLog::open`](super::PartitionLog::open) found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments in the partition after recovery.
    pub segments: usize,
    /// The tail that was cut off the last segment, if any.
    pub truncation: Option<Truncation>,
    /// Base offsets of segments whose index files were rebuilt or rewritten.
    pub rebuilt_indexes: Vec<u64>,
    /// Files in the directory that are not segment files, left alone.
    pub skipped_files: Vec<String>,
    /// Index files without a segment (left by an interrupted deletion), removed.
    pub removed_files: Vec<String>,
    /// Damaged spans with valid batches after them: corruption, not a torn write. Kept in
    /// place (reads of them fail with a clear error) and copied to `quarantine/`.
    pub damaged: Vec<Damage>,
    /// The checkpointed recovery point recovery used for the last segment, if one applied.
    pub recovery_point: Option<RecoveryPoint>,
}

impl RecoveryReport {
    /// Bytes cut off the last segment (0 if its tail was intact).
    pub fn truncated_bytes(&self) -> u64 {
        self.truncation.as_ref().map_or(0, |t| t.bytes_dropped)
    }
}

/// A torn or damaged tail dropped from the last segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// Base offset of the segment.
    pub segment_base: u64,
    /// Path of its log file.
    pub path: PathBuf,
    /// Byte position the file was cut at: the end of the last good batch.
    pub position: u64,
    /// Bytes removed.
    pub bytes_dropped: u64,
    /// Why the batch at `position` was not accepted.
    pub reason: TailDefect,
    /// Whether a whole valid batch was among the bytes cut (written after the last completed
    /// fsync, so never acknowledged under `durability = always`).
    pub cut_valid_batch: bool,
    /// Whether every byte cut was zero (lost pages).
    pub all_zero: bool,
    /// Where the cut bytes were copied (at most 64 MiB), if the copy succeeded.
    pub copy: Option<PathBuf>,
}

/// A damaged span of a segment followed by valid data (or, in a closed segment, by the next
/// segment): not a torn write, so never cut (design.md §5.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub path: PathBuf,
    /// Where the damage starts: the end of the last good batch before it.
    pub position: u64,
    /// Bytes up to the next good batch (or the end of a closed segment).
    pub len: u64,
    /// The offsets those bytes held, which reads now refuse.
    pub offsets: std::ops::Range<u64>,
    /// What was wrong with the first batch of the span.
    pub reason: TailDefect,
}

/// Where a damage-tolerant scan ended: the end of the last good batch, and the defect if
/// nothing valid follows it; plus the damaged spans it stepped over.
pub(crate) struct Scan {
    pub(crate) end: ScanEnd,
    pub(crate) damage: Vec<Damage>,
}

/// Walks the batches of a segment file from its start to `len`, calling `on_batch` for each
/// good one (with `true` for the first after damage); `on_batch` returning false stops the
/// scan. A defect followed by a valid batch further on is damage: recorded, then stepped over.
/// A defect with nothing valid after it ends the scan.
pub(crate) fn scan(
    walker: &Walker,
    base: u64,
    len: u64,
    mut on_batch: impl FnMut(BatchAt, bool) -> bool,
) -> Result<Scan, LogError> {
    let (mut pos, mut offset, mut resumed) = (0, base, false);
    let mut damage = Vec::new();
    loop {
        let mut stopped = false;
        let end = walker.run(pos, offset, len, |at| {
            let go_on = on_batch(at, std::mem::take(&mut resumed));
            stopped = !go_on;
            go_on
        })?;
        let defect = match &end.defect {
            Some(defect) if !stopped => defect.clone(),
            _ => return Ok(Scan { end, damage }),
        };
        let Some(at) = walker.resync(end.pos, end.next_offset, len)? else {
            return Ok(Scan { end, damage });
        };
        let resume = u64::from(at.pos);
        damage.push(Damage {
            path: walker.path().to_path_buf(),
            position: end.pos,
            len: resume - end.pos,
            offsets: end.next_offset..at.header.base_offset,
            reason: defect,
        });
        (pos, offset, resumed) = (resume, at.header.base_offset, true);
    }
}

/// Reports damage found in a segment: an error naming the file, position and offsets, the
/// `quiver_corrupt_batches_total` metric, and a copy of the damaged bytes in `quarantine/`.
pub(crate) fn report_damage(
    storage: &dyn Storage,
    dir: &Path,
    seg_log: &dyn crate::storage::StorageFile,
    d: &Damage,
    found_by: &'static str,
) {
    metrics::counter!("quiver_corrupt_batches_total", "found_by" => found_by).increment(1);
    let copy = quarantine(storage, dir, seg_log, d);
    tracing::error!(
        segment = %d.path.display(),
        position = d.position,
        bytes = d.len,
        first_offset = d.offsets.start,
        end_offset = d.offsets.end,
        reason = %d.reason,
        copy = ?copy.as_ref().map(|p| p.display().to_string()),
        "damaged batches with valid data after them: corruption, not a torn write; kept in place, reads of these offsets fail"
    );
}

/// Copies a damaged span to `<dir>/quarantine/<segment file>.<position>` (once: an existing
/// copy is kept). Best effort: the bytes stay in the segment either way.
fn quarantine(
    storage: &dyn Storage,
    dir: &Path,
    log: &dyn crate::storage::StorageFile,
    d: &Damage,
) -> Option<PathBuf> {
    if d.len == 0 {
        return None;
    }
    let qdir = dir.join("quarantine");
    let name = d.path.file_name()?.to_string_lossy().into_owned();
    let path = qdir.join(format!("{name}.{}", d.position));
    let result = (|| -> std::io::Result<()> {
        storage.create_dir_all(&qdir)?;
        storage.sync_dir(dir)?;
        if storage.list(&qdir)?.iter().any(|n| qdir.join(n) == path) {
            return Ok(());
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let _ = storage.remove(&tmp);
        let f = storage.open(&tmp)?;
        let (mut pos, end) = (d.position, d.position + d.len.min(MAX_QUARANTINE_BYTES));
        let mut buf = vec![0u8; (1 << 20).min((end - pos) as usize)];
        while pos < end {
            let n = buf.len().min((end - pos) as usize);
            log.read_exact_at(pos, &mut buf[..n])?;
            f.append(&buf[..n])?;
            pos += n as u64;
        }
        f.sync()?;
        storage.rename(&tmp, &path)?;
        storage.sync_dir(&qdir)
    })();
    match result {
        Ok(()) => Some(path),
        Err(err) => {
            tracing::warn!(path = %path.display(), %err, "could not copy damaged bytes to quarantine");
            None
        }
    }
}

/// Segments of a recovered partition: the closed ones, oldest first, and the active one.
pub(crate) struct Recovered {
    pub(crate) closed: Vec<Segment>,
    pub(crate) active: Segment,
    pub(crate) report: RecoveryReport,
    /// What is durable of the active segment after recovery.
    pub(crate) synced: RecoveryPoint,
    /// What the checkpoint file said, if it checked out.
    pub(crate) written: Option<RecoveryPoint>,
    /// The names in the partition directory when it was opened.
    pub(crate) names: Vec<String>,
}

/// Opens every segment in `dir` (creating the directory and a first segment if needed).
/// `epochs` is the partition's epoch record if it checked out: every batch recovery walks
/// must carry the epoch it has in force at the batch's offset, or it is a defect like a bad
/// CRC (design.md §5.7).
pub(crate) fn recover(
    storage: &Arc<dyn Storage>,
    dir: &Path,
    config: &LogConfig,
    now_ms: i64,
    epochs: Option<Arc<Epochs>>,
    observer: &mut dyn FnMut(u64, &BatchHeader),
) -> Result<Recovered, LogError> {
    storage.create_dir_all(dir).map_err(LogError::io("create directory", dir))?;
    let mut report = RecoveryReport::default();
    let (bases, names) = find_segments(&**storage, dir, &mut report)?;
    let written = checkpoint::read(&**storage, dir, &names);
    let Some((&last, closed_bases)) = bases.split_last() else {
        let active = Segment::create(storage, dir, 0, unknown_base_ordinal(0))?;
        storage.sync_dir(dir).map_err(LogError::io("sync directory", dir))?;
        report.segments = 1;
        let synced = RecoveryPoint::default();
        return Ok(Recovered { closed: Vec::new(), active, report, synced, written, names });
    };
    let mut closed: Vec<Segment> = Vec::with_capacity(closed_bases.len());
    for (i, &base) in closed_bases.iter().enumerate() {
        let next_base = bases.get(i + 1).copied().unwrap_or(last);
        let chain = closed.last().map(Segment::next_ordinal);
        let interval = config.index_interval_bytes;
        let mut seg =
            open_closed(storage, dir, base, next_base, interval, chain, epochs.clone(), &mut report)?;
        // Closed segments' files open on demand (a bounded number at a time), so a broker's
        // file descriptors do not grow with the number of segments.
        seg.release();
        closed.push(seg);
    }
    let interval = config.index_interval_bytes;
    let mut active = open_last(storage, dir, last, interval, written, epochs, &mut report, observer)?;
    active_base_ordinal(storage, dir, &mut active, closed.last(), &names)?;
    active.roll_base_ms = (active.size > 0).then_some(now_ms);
    report.segments = closed.len() + 1;
    let synced = RecoveryPoint { segment_base: last, position: active.size, next_offset: active.next_offset };
    Ok(Recovered { closed, active, report, synced, written, names })
}

/// The base ordinal of a first retained segment whose index does not say it (a version-1 or
/// damaged index, from before ordinals existed): `base + 1`, as if every batch before it had
/// held one record (design.md §5.7). For a log that starts at 0 that is the true ordinal, 1.
/// For one whose start retention moved, it is the largest ordinal the first batch could have
/// had, and it is above 1, so the Raft snapshot before the log (index `first - 1`) is not the
/// empty one. Deterministic, so a log opened twice before it is written back numbers the same.
pub(crate) fn unknown_base_ordinal(base: u64) -> u64 {
    base.saturating_add(1)
}

/// A segment's base ordinal from what its index header says (`header`, if it had a plausible
/// one: at least 1 and at most `base + 1`, since every batch holds an offset) and what the
/// segment before it implies (`chain`: its base ordinal + its batches). The header wins: it is
/// what was handed out; a chain above it (possible only with damage) wins, so ordinals never
/// repeat.
fn reconcile_ordinal(seg: &Segment, header: Option<u64>, chain: Option<u64>) -> u64 {
    let header = header.filter(|&h| h >= 1 && h <= unknown_base_ordinal(seg.base));
    match (header, chain) {
        (Some(h), Some(c)) => {
            if h != c {
                tracing::warn!(segment = %seg.log_path.display(), header = h, previous_segment_implies = c, "a segment's base ordinal differs from what the segment before it implies");
            }
            h.max(c)
        }
        (Some(h), None) => h,
        (None, Some(c)) => c,
        (None, None) => unknown_base_ordinal(seg.base),
    }
}

/// Sets the base ordinal of the last segment: what the last closed segment implies, else what
/// the header of its offset index says (written when the segment was created), else
/// [`unknown_base_ordinal`]. Writes the header back (durably) if it could not be derived the
/// same way again, so the ordinals survive retention deleting every closed segment.
fn active_base_ordinal(
    storage: &Arc<dyn Storage>,
    dir: &Path,
    active: &mut Segment,
    last_closed: Option<&Segment>,
    names: &[String],
) -> Result<(), LogError> {
    let header = match names.iter().any(|n| *n == super::segment::file_name(active.base, "index")) {
        true => active.offsets.header_ordinal(),
        false => None,
    };
    active.offsets.release();
    let ordinal = reconcile_ordinal(active, header, last_closed.map(Segment::next_ordinal));
    active.set_base_ordinal(ordinal);
    if header.unwrap_or(unknown_base_ordinal(active.base)) != ordinal {
        // The last segment's entries are never read (recovery rebuilds them): the header is
        // what matters here.
        active.offsets.write_out()?;
        storage.sync_dir(dir).map_err(LogError::io("sync directory", dir))?;
    }
    Ok(())
}

/// The kinds of file a partition directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Log,
    Index,
    /// Idempotent-producer state as of the segment's start (`<base>.producers`), kept by the
    /// partition, not the log.
    Producers,
    /// A file being replaced (`<base>.<ext>.tmp`) when the broker stopped: never renamed, so
    /// never part of the partition.
    Temp,
}

/// Whether `name` is one of a segment's files (log, indexes, producer snapshot, or a temp file
/// of one of them).
pub(super) fn is_segment_file(name: &str) -> bool {
    parse_name(name).is_some()
}

/// Parses `<20 digits>.log|index|timeindex`.
fn parse_name(name: &str) -> Option<(u64, FileKind)> {
    let (stem, ext) = name.split_once('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let base = stem.parse().ok()?;
    if ext.strip_suffix(".tmp").is_some_and(|ext| parse_name(&format!("{stem}.{ext}")).is_some()) {
        return Some((base, FileKind::Temp));
    }
    match ext {
        "log" => Some((base, FileKind::Log)),
        "index" | "timeindex" => Some((base, FileKind::Index)),
        "producers" => Some((base, FileKind::Producers)),
        _ => None,
    }
}

/// Base offsets of the segments in `dir`, sorted, and the names in it. Skips foreign files and
/// removes index files whose segment is gone.
fn find_segments(
    storage: &dyn Storage,
    dir: &Path,
    report: &mut RecoveryReport,
) -> Result<(Vec<u64>, Vec<String>), LogError> {
    let names = storage.list(dir).map_err(LogError::io("list directory", dir))?;
    let mut logs = BTreeSet::new();
    let mut indexes = Vec::new();
    for name in names.iter().cloned() {
        if name == checkpoint::FILE || name == epochs::FILE {
            continue;
        }
        if name == super::RAFT_STATE_FILE || name == super::RAFT_STATE_TEMP_FILE {
            continue; // the replica's, not the log's
        }
        if name == super::reset::FILE {
            continue; // completed before recovery runs: only a failed completion leaves it
        }
        let temp = [checkpoint::TEMP_FILE, epochs::TEMP_FILE, super::reset::TEMP_FILE];
        let kind = match temp.contains(&name.as_str()) {
            true => Some((0, FileKind::Temp)),
            false => parse_name(&name),
        };
        match kind {
            Some((base, FileKind::Log)) => {
                logs.insert(base);
            }
            Some((base, FileKind::Index)) => indexes.push((base, name)),
            Some((_, FileKind::Producers)) => {}
            Some((_, FileKind::Temp)) => {
                if let Err(err) = storage.remove(&dir.join(&name)) {
                    tracing::warn!(dir = %dir.display(), file = %name, %err, "could not remove a temp file");
                }
                report.removed_files.push(name);
            }
            None => {
                tracing::warn!(dir = %dir.display(), file = %name, "skipping a file that is not part of a segment");
                report.skipped_files.push(name);
            }
        }
    }
    for (base, name) in indexes {
        if logs.contains(&base) {
            continue;
        }
        // Retention deletes the log file first; a crash can leave its indexes behind.
        tracing::warn!(dir = %dir.display(), file = %name, "removing an index without a segment");
        if let Err(err) = storage.remove(&dir.join(&name)) {
            tracing::warn!(file = %name, %err, "could not remove orphan index");
        }
        report.removed_files.push(name);
    }
    Ok((logs.into_iter().collect(), names))
}

/// Opens a closed segment that must end exactly at `next_base`. `chain` is the ordinal after
/// the previous segment's last batch (`None` for the first segment). The batches walked
/// (from the last index entry on, or all of them for a rebuild) are checked against `epochs`.
#[allow(clippy::too_many_arguments)]
fn open_closed(
    storage: &Arc<dyn Storage>,
    dir: &Path,
    base: u64,
    next_base: u64,
    interval: u32,
    chain: Option<u64>,
    epochs: Option<Arc<Epochs>>,
    report: &mut RecoveryReport,
) -> Result<Segment, LogError> {
    let mut seg = Segment::open_files(storage, dir, base)?;
    let len = seg.log()?.len().map_err(LogError::io("stat segment", &seg.log_path))?;
    let span = next_base - base;
    let loaded = seg.offsets.load(len, span);
    let old_version = matches!(loaded, Err(IndexDefect::OldVersion));
    let why = match (loaded, seg.times.load(len, span)) {
        (Ok((offsets, header)), Ok((times, _))) => {
            match trust_indexes(&mut seg, offsets, times, len, next_base, epochs.clone())? {
                true => {
                    let ordinal = reconcile_ordinal(&seg, Some(header), chain);
                    seg.set_base_ordinal(ordinal);
                    if ordinal != header {
                        rewrite_indexes(&mut seg, true)?;
                        report.rebuilt_indexes.push(base);
                    }
                    return Ok(seg);
                }
                false => "the segment's tail does not match its index".to_string(),
            }
        }
        (Err(defect), _) => format!("offset index {defect}"),
        (_, Err(defect)) => format!("time index {defect}"),
    };
    // A header that survived damaged entries still says the base ordinal; a version-1 index
    // has none.
    let header = seg.offsets.header_ordinal();
    if old_version {
        tracing::info!(segment = %seg.log_path.display(), "rebuilding a version-1 offset index with ordinals");
    } else {
        tracing::warn!(segment = %seg.log_path.display(), reason = %why, "rebuilding the indexes of a closed segment");
    }
    seg.reset();
    let walker = seg.walker(Check::Headers)?.expecting(epochs);
    let Scan { end, mut damage } = scan(&walker, base, len, |at, resumed| {
        seg.track(at, interval, false, resumed);
        true
    })?;
    // A closed segment was synced before the next one was created, so damage here is not a
    // torn write: a damaged end is kept in place up to the next segment, never cut.
    if let Some(reason) = end.defect {
        if end.next_offset >= next_base {
            return Err(seg.corrupt(end.pos, format!("closed segment: {reason}")));
        }
        damage.push(Damage {
            path: seg.log_path.clone(),
            position: end.pos,
            len: len - end.pos,
            offsets: end.next_offset..next_base,
            reason,
        });
        seg.count_damage(&(end.next_offset..next_base));
        seg.size = len;
        seg.next_offset = next_base;
    } else if end.next_offset != next_base {
        let reason =
            format!("closed segment ends at offset {}, next segment starts at {next_base}", end.next_offset);
        return Err(seg.corrupt(end.pos, reason));
    }
    for d in damage {
        report_damage(&**storage, dir, &*seg.log()?, &d, "recovery");
        seg.damaged.push(DamagedSpan { offsets: d.offsets.clone(), position: d.position, len: d.len });
        report.damaged.push(d);
    }
    let ordinal = reconcile_ordinal(&seg, header, chain);
    seg.set_base_ordinal(ordinal);
    rewrite_indexes(&mut seg, true)?;
    report.rebuilt_indexes.push(base);
    Ok(seg)
}

/// Adopts loaded index entries if the batches after the last offset entry run exactly to the
/// end of the file and to `next_base`. Returns whether they did.
fn trust_indexes(
    seg: &mut Segment,
    offsets: Vec<OffsetEntry>,
    times: Vec<TimeEntry>,
    len: u64,
    next_base: u64,
    epochs: Option<Arc<Epochs>>,
) -> Result<bool, LogError> {
    let from = offsets.last().copied().unwrap_or_default();
    // Time entries cover every batch up to the last offset entry (they are written together),
    // so the walk below supplies the rest of the segment's max timestamp, which retention by
    // age relies on.
    let mut max_ts = times.last().map_or(i64::MIN, |t| t.max_ts);
    // The last entry's ordinal plus the batches from it on: the segment's count, and so the
    // next segment's base ordinal, from the walk recovery does anyway.
    let mut batches = u64::from(from.ord);
    let walker = seg.walker(Check::Headers)?.expecting(epochs);
    let end = walker.run(u64::from(from.pos), seg.base + u64::from(from.rel), len, |at| {
        max_ts = max_ts.max(at.header.max_timestamp);
        batches += 1;
        true
    })?;
    if end.defect.is_some() || end.pos != len || end.next_offset != next_base {
        return Ok(false);
    }
    seg.offsets.set_entries(offsets);
    seg.times.set_entries(times);
    seg.size = len;
    seg.next_offset = next_base;
    seg.batches = batches;
    seg.max_timestamp = max_ts;
    Ok(true)
}

/// Whether `from..len` of the segment looks like the padding of a direct write: fewer than one
/// block of zero bytes, ending the file at a block boundary (a torn write ends anywhere).
fn is_padding(seg: &Segment, from: u64, len: u64) -> Result<bool, LogError> {
    let block = crate::storage::PADDING_BLOCK as u64;
    let n = len - from;
    if n == 0 || n >= block || !len.is_multiple_of(block) {
        return Ok(false);
    }
    let mut bytes = vec![0u8; n as usize];
    seg.log()?.read_exact_at(from, &mut bytes).map_err(LogError::io("read segment", &seg.log_path))?;
    Ok(bytes.iter().all(|&b| b == 0))
}

/// Opens the last segment (design.md §5.3) and scans every batch with its CRC. `point` is the
/// checkpointed recovery point: bytes below it were covered by a completed fsync, so a defect
/// there is corruption, kept in place (reads of it fail) and quarantined. From it on, bytes may
/// be a torn write: the first defect is cut, even if valid batches follow (no fsync covered
/// them, so none was acknowledged under `durability = always`), and the cut bytes are copied
/// to `quarantine/` and counted. Leaves the segment synced to its end. Every batch is checked
/// against `epochs` as well: a leader epoch the record contradicts is a defect like a bad CRC.
#[allow(clippy::too_many_arguments)]
fn open_last(
    storage: &Arc<dyn Storage>,
    dir: &Path,
    base: u64,
    interval: u32,
    point: Option<RecoveryPoint>,
    epochs: Option<Arc<Epochs>>,
    report: &mut RecoveryReport,
    observer: &mut dyn FnMut(u64, &BatchHeader),
) -> Result<Segment, LogError> {
    let mut seg = Segment::open_files(storage, dir, base)?;
    let len = seg.log()?.len().map_err(LogError::io("stat segment", &seg.log_path))?;
    // Where the region that may be torn starts, and the offset there if the checkpoint says.
    let (limit, limit_next) = match point {
        Some(p) if p.segment_base == base => {
            report.recovery_point = Some(p);
            (p.position, Some(p.next_offset))
        }
        Some(p) if p.segment_base > base => {
            // This segment was sealed (synced) before that one was created: all of it is below
            // the point. The segment the point names is gone.
            point_mismatch(
                &seg,
                format!("the recovery point names segment {}, which is missing", p.segment_base),
            );
            (len, None)
        }
        // None, or an older segment's (written before the last roll): nothing here is known
        // to be synced.
        _ => (0, None),
    };
    let walker = seg.walker(Check::Crc)?.expecting(epochs.clone());
    // Below the recovery point a completed fsync covered the bytes: their headers are walked
    // (offsets, lengths, the index rebuilt) but their CRCs are not read here. Reads check
    // every batch's CRC before serving it, and the background pass checks the synced part of
    // the active segment too (verify.rs). So a restart scans with CRCs only what was written
    // after the last checkpointed fsync (design.md §5.3).
    let below = seg.walker(Check::Headers)?.expecting(epochs);
    let (mut pos, mut offset, mut resumed) = (0u64, base, false);
    let mut damage = Vec::new();
    // Below the recovery point.
    while pos < limit {
        let end = below.run(pos, offset, len, |at| {
            seg.track(at, interval, false, std::mem::take(&mut resumed));
            observer(base, &at.header);
            u64::from(at.pos) + (at.header.total_len() as u64) < limit
        })?;
        (pos, offset) = (end.pos, end.next_offset);
        let Some(defect) = end.defect else {
            // The scan reached the recovery point (a batch ended at or past it) or the file end.
            if pos == limit && limit_next.is_some_and(|n| n != offset) {
                point_mismatch(&seg, format!("the recovery point says offset {limit_next:?} at byte {limit}, the scan found {offset}"));
            } else if pos > limit {
                point_mismatch(
                    &seg,
                    format!("the recovery point at byte {limit} is inside the batch ending at {pos}"),
                );
            } else if pos < limit {
                // The file ends at a batch boundary before the point: synced batches are gone.
                let end_offset = limit_next.unwrap_or(offset).max(offset);
                seg.count_damage(&(offset..end_offset));
                let reason = TailDefect::Missing { end: len, point: limit };
                damage.push(Damage {
                    path: seg.log_path.clone(),
                    position: len,
                    len: 0,
                    offsets: offset..end_offset,
                    reason,
                });
                (seg.next_offset, offset) = (end_offset, end_offset);
            }
            break;
        };
        if is_padding(&seg, pos, len)? {
            break; // cut quietly below
        }
        // A defect below the point: corruption. Valid data resumes at a whole batch below it,
        // or at the point itself.
        let bound = limit.min(len);
        if let Some(at) = below.resync(pos, offset, bound)? {
            let resume = u64::from(at.pos);
            let offsets = offset..at.header.base_offset;
            damage.push(Damage {
                path: seg.log_path.clone(),
                position: pos,
                len: resume - pos,
                offsets,
                reason: defect,
            });
            (pos, offset, resumed) = (resume, at.header.base_offset, true);
            continue;
        }
        let end_offset = limit_next.unwrap_or(offset).max(offset);
        let reason = match limit > len {
            true => TailDefect::Missing { end: len, point: limit },
            false => defect,
        };
        damage.push(Damage {
            path: seg.log_path.clone(),
            position: pos,
            len: bound - pos,
            offsets: offset..end_offset,
            reason,
        });
        seg.count_damage(&(offset..end_offset));
        (seg.size, seg.next_offset) = (bound, end_offset);
        (pos, offset, resumed) = (bound, end_offset, true);
        break;
    }
    // From the recovery point on: the first defect ends the log.
    let end = walker.run(pos, offset, len, |at| {
        seg.track(at, interval, false, std::mem::take(&mut resumed));
        observer(base, &at.header);
        true
    })?;
    for d in damage {
        if matches!(d.reason, TailDefect::Missing { .. }) {
            tracing::error!(segment = %d.path.display(), file_end = len, recovery_point = limit, "the segment ends before its recovery point: synced (acknowledged) data is missing; keeping what is there, reads of the missing offsets fail");
        }
        report_damage(&**storage, dir, &*seg.log()?, &d, "recovery");
        seg.damaged.push(DamagedSpan { offsets: d.offsets.clone(), position: d.position, len: d.len });
        report.damaged.push(d);
    }
    let mut cut = false;
    if end.defect.is_some() && is_padding(&seg, end.pos, len)? {
        // The zeros after the last block written with O_DIRECT (storage/direct.rs), left by a
        // crash or a clean shutdown alike: not damage.
        tracing::debug!(segment = %seg.log_path.display(), bytes = len - end.pos, "cutting block padding");
        seg.log()?.truncate(end.pos).map_err(LogError::io("truncate segment", &seg.log_path))?;
        cut = true;
    } else if let Some(reason) = end.defect {
        report.truncation =
            Some(cut_torn_tail(&**storage, dir, &seg, &walker, end.pos, end.next_offset, len, reason)?);
        cut = true;
    }
    if cut || seg.size > limit {
        // What the recovered log holds is made durable, so the recovery point can be its end.
        seg.log()?.sync().map_err(LogError::io("sync segment", &seg.log_path))?;
    }
    // The last segment's index files are not read: the scan above rebuilt its entries, and
    // `seal` writes the files when the segment is closed (design.md §5.2).
    Ok(seg)
}

/// A checkpointed recovery point that does not match the segment: logged and counted; recovery
/// goes on without cutting anything below it.
fn point_mismatch(seg: &Segment, why: String) {
    metrics::counter!("quiver_corrupt_batches_total", "found_by" => "recovery_point").increment(1);
    tracing::error!(segment = %seg.log_path.display(), %why, "the recovery point does not match the segment");
}

/// Cuts the last segment at `pos`, a defect at or after the recovery point (a torn write):
/// copies the cut bytes to `quarantine/`, counts them (`found_by="recovery_cut"`), and logs
/// (`error` if they held a valid batch or any non-zero byte, else `warn`).
#[allow(clippy::too_many_arguments)]
fn cut_torn_tail(
    storage: &dyn Storage,
    dir: &Path,
    seg: &Segment,
    walker: &Walker,
    pos: u64,
    offset: u64,
    len: u64,
    reason: TailDefect,
) -> Result<Truncation, LogError> {
    let log = seg.log()?;
    let dropped = len - pos;
    let valid = walker.resync(pos, offset, len)?;
    let mut all_zero = true;
    let mut buf = vec![0u8; (1 << 20).min(dropped as usize)];
    let mut at = pos;
    while at < len && all_zero {
        let n = buf.len().min((len - at) as usize);
        log.read_exact_at(at, &mut buf[..n]).map_err(LogError::io("read segment", &seg.log_path))?;
        all_zero = buf[..n].iter().all(|&b| b == 0);
        at += n as u64;
    }
    metrics::counter!("quiver_corrupt_batches_total", "found_by" => "recovery_cut").increment(1);
    let span = Damage {
        path: seg.log_path.clone(),
        position: pos,
        len: dropped,
        offsets: offset..offset,
        reason: reason.clone(),
    };
    let copy = quarantine(storage, dir, &*log, &span);
    let copy_name = copy.as_ref().map(|p| p.display().to_string());
    let valid_offset = valid.map(|at| at.header.base_offset);
    if valid.is_some() || !all_zero {
        tracing::error!(segment = %seg.log_path.display(), position = pos, bytes_dropped = dropped, %reason, valid_batch_cut = ?valid_offset, copy = ?copy_name, "truncating a damaged tail after the recovery point: a torn write (never covered by a completed fsync)");
    } else {
        tracing::warn!(segment = %seg.log_path.display(), position = pos, bytes_dropped = dropped, %reason, copy = ?copy_name, "truncating a damaged tail of zeros after the recovery point");
    }
    log.truncate(pos).map_err(LogError::io("truncate segment", &seg.log_path))?;
    Ok(Truncation {
        segment_base: seg.base,
        path: seg.log_path.clone(),
        position: pos,
        bytes_dropped: dropped,
        reason,
        cut_valid_batch: valid.is_some(),
        all_zero,
        copy,
    })
}

/// Writes both index files from memory, and syncs them if asked.
fn rewrite_indexes(seg: &mut Segment, sync: bool) -> Result<(), LogError> {
    seg.offsets.rewrite()?;
    seg.times.rewrite()?;
    if sync {
        seg.offsets.sync()?;
        seg.times.sync()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_strictly() {
        assert_eq!(parse_name("00000000000000000042.log"), Some((42, FileKind::Log)));
        assert_eq!(parse_name("00000000000000000042.index"), Some((42, FileKind::Index)));
        assert_eq!(parse_name("00000000000000000042.timeindex"), Some((42, FileKind::Index)));
        assert_eq!(parse_name("42.log"), None);
        assert_eq!(parse_name("0000000000000000004x.log"), None);
        assert_eq!(parse_name("00000000000000000042.producers.tmp"), Some((42, FileKind::Temp)));
        assert_eq!(parse_name("00000000000000000042.other.tmp"), None);
        assert_eq!(parse_name("99999999999999999999.log"), None); // over u64::MAX
        assert_eq!(parse_name("+0000000000000000042.log"), None);
    }
}
