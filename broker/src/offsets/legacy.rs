//! The file format of the offsets store before it kept records in a partition log, read only to
//! migrate a data directory written by an older version (docs/design.md §5.4).
//!
//! `<dir>/offsets.log` was a sequence of entries `u32 body_length, u32 crc32c(body), body`,
//! body = `string group, string topic, u32 partition, u64 floor`, then (each absent in entries
//! of still older versions) the acked ranges and delivery counts, the horizon, and the maybe
//! delivered ranges. The last entry for a key won.
//!
//! Migration at open, crash-safe at every step: the file's live state is appended to the log
//! as records and fsynced, and only then is the file removed (and the directory fsynced). A
//! crash before the removal is durable leaves the file, and the next open migrates it again:
//! nothing else is written to the log while the file exists (the store opens only after the
//! migration), so the log then holds nothing newer than the file, and the records written
//! twice say the same (the last record of a key wins).

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use quiver_protocol::codec::Reader;
use quiver_protocol::ledger::LedgerSnapshot;
use quiver_protocol::limits::{MAX_PERSISTED_RANGES, MAX_STRING_BYTES, MAX_TOPIC_NAME_BYTES};

use super::records::{WriteBuilder, LEADER_EPOCH, READ_CHUNK_BYTES};
use super::{now_ms, OffsetKey, OffsetsError};
use crate::log::PartitionLog;
use crate::storage::{Storage, StorageFile};

pub(super) const FILE_NAME: &str = "offsets.log";
/// A snapshot of the old format that never replaced the file (a crash before its rename).
pub(super) const TMP_NAME: &str = "offsets.log.tmp";

/// Largest entry body of the old format.
const ENTRY_MAX_BYTES: usize = 2
    + MAX_STRING_BYTES
    + 2
    + MAX_TOPIC_NAME_BYTES
    + 4
    + 8
    + 4
    + 16 * MAX_PERSISTED_RANGES
    + 4
    + 20 * MAX_PERSISTED_RANGES
    + 8
    + 4
    + 16 * MAX_PERSISTED_RANGES;

/// Migrates `<dir>/offsets.log`, if there is one, into `log`; returns the number of ledgers it
/// held. A file over `max_file_bytes` is refused (it was refused before the format changed).
pub(super) fn migrate(
    storage: &dyn Storage,
    dir: &Path,
    log: &mut PartitionLog,
    max_file_bytes: u64,
    max_log_bytes: u64,
) -> Result<Option<usize>, OffsetsError> {
    let path = dir.join(FILE_NAME);
    let io_err = |source| OffsetsError::Io { path: path.clone(), source };
    let names = storage.list(dir).map_err(io_err)?;
    if names.iter().any(|n| n == TMP_NAME) {
        storage.remove(&dir.join(TMP_NAME)).map_err(io_err)?;
    }
    if !names.iter().any(|n| n == FILE_NAME) {
        return Ok(None);
    }
    let file = storage.open(&path).map_err(io_err)?;
    let len = file.len().map_err(io_err)?;
    if len > max_file_bytes {
        return Err(OffsetsError::TooLarge { path, bytes: len, limit: max_file_bytes });
    }
    let (entries, good) = read_entries(&*file, len).map_err(io_err)?;
    if good < len {
        // What the old store would have cut at its next open: a torn append, never acknowledged.
        tracing::warn!(path = %path.display(), dropped = len - good, "offsets store: the old file has a damaged tail; migrating what precedes it");
    }
    // In key order, so a rerun writes the same records.
    let mut entries: Vec<(OffsetKey, LedgerSnapshot)> = entries.into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut write = WriteBuilder::new(now_ms());
    for (key, snapshot) in &entries {
        write.push(key, Some(snapshot));
    }
    let batches = write.finish();
    let bytes = log.size_bytes() + batches.iter().map(|b| b.len() as u64).sum::<u64>();
    if bytes > max_log_bytes {
        return Err(OffsetsError::TooLarge { path: log.dir().to_path_buf(), bytes, limit: max_log_bytes });
    }
    let log_dir = log.dir().to_path_buf();
    let log_err = |e| OffsetsError::from_log(&log_dir, e);
    for mut batch in batches {
        log.append(&mut batch, LEADER_EPOCH, now_ms()).map_err(log_err)?;
    }
    log.sync().map_err(log_err)?;
    // The records are durable: the file can go.
    storage.remove(&path).map_err(io_err)?;
    storage.sync_dir(dir).map_err(io_err)?;
    tracing::info!(path = %path.display(), ledgers = entries.len(), log = %log_dir.display(), "offsets store: migrated the old offsets file into the offsets log");
    Ok(Some(entries.len()))
}

/// The snapshot of an entry body after its key: the floor, then the ranges, the horizon and
/// the maybe-delivered ranges, each absent in entries written by versions before it.
fn get_snapshot(r: &mut Reader) -> Result<LedgerSnapshot, quiver_protocol::DecodeError> {
    let mut s = LedgerSnapshot { floor: r.u64()?, ..Default::default() };
    if r.remaining() > 0 {
        s.acked = r.list("acked", 16, |r| Ok(r.u64()?..r.u64()?))?;
        s.counts = r.list("counts", 20, |r| Ok((r.u64()?..r.u64()?, r.u32()?)))?;
    }
    if r.remaining() > 0 {
        s.horizon = r.u64()?;
    }
    if r.remaining() > 0 {
        s.maybe = r.list("maybe", 16, |r| Ok(r.u64()?..r.u64()?))?;
    }
    Ok(s)
}

/// Reads the entries of a file of `len` bytes a chunk at a time (never more than a chunk and
/// one entry in memory), until the first damaged one; returns them and the good length.
pub(super) fn read_entries(
    file: &dyn StorageFile,
    len: u64,
) -> io::Result<(HashMap<OffsetKey, LedgerSnapshot>, u64)> {
    let mut map = HashMap::new();
    let mut unparsed: Vec<u8> = Vec::new();
    let (mut good, mut read) = (0u64, 0u64);
    loop {
        let (used, damaged) = parse_entries(&unparsed, &mut map);
        good += used as u64;
        unparsed.drain(..used);
        if damaged || read == len {
            return Ok((map, good));
        }
        let n = (len - read).min(READ_CHUNK_BYTES as u64) as usize;
        let old = unparsed.len();
        unparsed.resize(old + n, 0);
        file.read_exact_at(read, &mut unparsed[old..])?;
        read += n as u64;
    }
}

/// Parses the whole entries at the start of `data` into `map`; returns the bytes they take and
/// whether parsing stopped at a damaged entry (rather than at an incomplete one).
pub(super) fn parse_entries(data: &[u8], map: &mut HashMap<OffsetKey, LedgerSnapshot>) -> (usize, bool) {
    let mut pos = 0;
    while data.len() - pos >= 8 {
        let len = u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_le_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        if len > ENTRY_MAX_BYTES {
            return (pos, true);
        }
        if data.len() - pos - 8 < len {
            return (pos, false);
        }
        let body = &data[pos + 8..pos + 8 + len];
        if crc32c::crc32c(body) != crc {
            return (pos, true);
        }
        let mut r = Reader::new(Bytes::copy_from_slice(body));
        let key = (|| {
            let g = r.string("group", MAX_STRING_BYTES)?;
            let t = r.string("topic", MAX_TOPIC_NAME_BYTES)?;
            Ok::<OffsetKey, quiver_protocol::DecodeError>((Arc::from(g), Arc::from(t), r.u32()?))
        })();
        // An entry that is intact (the checksum holds) but not understood is skipped rather
        // than dropping what follows; its key's older entries are void too (it replaced them).
        match key.map(|k| (get_snapshot(&mut r), k)) {
            Ok((Ok(s), k)) => {
                map.insert(k, s);
            }
            Ok((Err(e), k)) => {
                tracing::warn!(group = %k.0, topic = %k.1, partition = k.2, "offsets store: skipping an old entry that does not decode: {e}");
                map.remove(&k);
            }
            Err(e) => tracing::warn!("offsets store: skipping an old entry that does not decode: {e}"),
        }
        pos += 8 + len;
    }
    (pos, false)
}

/// The old encoder, for tests that write a file as an older version did: appends one entry
/// and returns its size.
#[cfg(test)]
pub(super) fn put_entry(
    buf: &mut bytes::BytesMut,
    (group, topic, partition): &OffsetKey,
    s: &LedgerSnapshot,
) -> u64 {
    use bytes::{BufMut, BytesMut};
    use quiver_protocol::codec::WriteExt;
    let put_ranges = |body: &mut BytesMut, ranges: &[std::ops::Range<u64>]| {
        body.put_u32_le(ranges.len() as u32);
        for r in ranges {
            body.put_u64_le(r.start);
            body.put_u64_le(r.end);
        }
    };
    let mut body = BytesMut::new();
    body.put_string(group);
    body.put_string(topic);
    body.put_u32_le(*partition);
    body.put_u64_le(s.floor);
    put_ranges(&mut body, &s.acked);
    body.put_u32_le(s.counts.len() as u32);
    for (r, c) in &s.counts {
        body.put_u64_le(r.start);
        body.put_u64_le(r.end);
        body.put_u32_le(*c);
    }
    body.put_u64_le(s.horizon);
    put_ranges(&mut body, &s.maybe);
    buf.put_u32_le(body.len() as u32);
    buf.put_u32_le(crc32c::crc32c(&body));
    buf.put_slice(&body);
    8 + body.len() as u64
}
