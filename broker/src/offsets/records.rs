//! The offsets store's records (docs/design.md §5.4): one Kafka v2 record per (group, topic,
//! partition) ledger, in batches appended to a partition log like any other. The record key
//! names the ledger, the value is its snapshot; an empty value is a tombstone (the key was
//! deleted). Reading the log from its start, the last record of a key wins.
//!
//! Both are little-endian, as our own encodings are (the batch around them is Kafka's,
//! big-endian), and each starts with a `u16` version, as Kafka's `__consumer_offsets` records
//! do: the key's version says what kind of record it is (1: a ledger, 2: a compaction marker,
//! 3: a group's membership), the value's how its fields are laid out.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use quiver_protocol::batch::{self, BatchBuilder, Batches, RecordIter, ValidatedBatch};
use quiver_protocol::codec::{Reader, WriteExt};
use quiver_protocol::group::{GroupSnapshot, MemberSnapshot};
use quiver_protocol::ledger::LedgerSnapshot;
use quiver_protocol::limits::{
    MAX_BATCH_BYTES, MAX_GROUP_NAME_BYTES, MAX_MEMBERS_PER_GROUP, MAX_MEMBER_ID_BYTES, MAX_PARTITIONS,
    MAX_PERSISTED_RANGES, MAX_RECORDS_PER_BATCH, MAX_STRING_BYTES, MAX_TOPIC_NAME_BYTES,
};
use quiver_protocol::DecodeError;

use super::OffsetKey;
use crate::log::{LogError, PartitionLog};

/// Key version of a (group, topic, partition) ledger record.
const LEDGER_KEY: u16 = 1;
/// Key version of a compaction marker, `u16 2, u8 kind`: kind [`SNAPSHOT_BEGIN`] starts a
/// snapshot (a batch of its own, the first of a new segment, empty value), kind
/// [`SNAPSHOT_COMPLETE`] follows its last record once it is durable (value `u64` the offset of
/// its begin marker). At open, a begin without its complete marker is a snapshot cut short by a
/// crash and is cut off; a complete one lets everything below it go.
const SNAPSHOT_KEY: u16 = 2;
pub(super) const SNAPSHOT_BEGIN: u8 = 0;
pub(super) const SNAPSHOT_COMPLETE: u8 = 1;
/// Key version of a group's membership record, `u16 3, string group` (docs/replication.md
/// §10, invariant 4): written by a cluster's coordinators only; an empty value deletes it.
const GROUP_KEY: u16 = 3;
/// Value version: floor, acked, counts, horizon, maybe.
const LEDGER_VALUE: u16 = 1;
/// Value version of a group record (see [`encode_group`]).
const GROUP_VALUE: u16 = 1;
/// Largest group value: version, topic, partitions, generation, next member, id prefix, the
/// members (each partition owned by one of them at most) and the revocations (one per
/// partition at most). Well below [`MAX_BATCH_BYTES`]: a record always fits a batch.
pub(super) const GROUP_VALUE_MAX_BYTES: usize = 2
    + 2
    + MAX_TOPIC_NAME_BYTES
    + 4
    + 8
    + 8
    + 2
    + MAX_MEMBER_ID_BYTES
    + 4
    + MAX_MEMBERS_PER_GROUP * (2 + MAX_MEMBER_ID_BYTES + 8 + 8 + 4)
    + MAX_PARTITIONS as usize * 12
    + 4
    + MAX_PARTITIONS as usize * (4 + 2 + MAX_MEMBER_ID_BYTES + 16);
/// Largest key: version, group, topic, partition.
pub(super) const KEY_MAX_BYTES: usize = 2 + 2 + MAX_STRING_BYTES + 2 + MAX_TOPIC_NAME_BYTES + 4;
/// Largest value: version, floor, at most [`MAX_PERSISTED_RANGES`] ranges in each list,
/// horizon.
pub(super) const VALUE_MAX_BYTES: usize =
    2 + 8 + 4 + 16 * MAX_PERSISTED_RANGES + 4 + 20 * MAX_PERSISTED_RANGES + 8 + 4 + 16 * MAX_PERSISTED_RANGES;
/// Bytes read from the log at a time at open.
pub(super) const READ_CHUNK_BYTES: usize = 1024 * 1024;
/// Leader epoch stamped into every batch of a broker's own store (one node, one epoch); the
/// replicated offsets partitions' leaders stamp their terms.
pub(super) const LEADER_EPOCH: i32 = 0;

/// `u16 version, string group, string topic, u32 partition`.
pub(super) fn encode_key((group, topic, partition): &OffsetKey) -> BytesMut {
    let mut buf = BytesMut::with_capacity(2 + 2 + group.len() + 2 + topic.len() + 4);
    buf.put_u16_le(LEDGER_KEY);
    buf.put_string(group);
    buf.put_string(topic);
    buf.put_u32_le(*partition);
    buf
}

/// `u16 version, u64 floor, ranges acked, list<{u64 start, u64 end, u32 count}> counts,
/// u64 horizon, ranges maybe`; ranges are `u32 count, count x {u64 start, u64 end}`.
pub(super) fn encode_value(s: &LedgerSnapshot) -> BytesMut {
    let mut buf = BytesMut::with_capacity(
        2 + 8 + 8 + 4 + 16 * (s.acked.len() + s.maybe.len()) + 4 + 20 * s.counts.len() + 4,
    );
    buf.put_u16_le(LEDGER_VALUE);
    buf.put_u64_le(s.floor);
    put_ranges(&mut buf, &s.acked);
    buf.put_u32_le(s.counts.len() as u32);
    for (r, c) in &s.counts {
        buf.put_u64_le(r.start);
        buf.put_u64_le(r.end);
        buf.put_u32_le(*c);
    }
    buf.put_u64_le(s.horizon);
    put_ranges(&mut buf, &s.maybe);
    buf
}

fn put_ranges(buf: &mut BytesMut, ranges: &[std::ops::Range<u64>]) {
    buf.put_u32_le(ranges.len() as u32);
    for r in ranges {
        buf.put_u64_le(r.start);
        buf.put_u64_le(r.end);
    }
}

/// `u16 3, string group`.
fn encode_group_key(group: &str) -> BytesMut {
    let mut buf = BytesMut::with_capacity(2 + 2 + group.len());
    buf.put_u16_le(GROUP_KEY);
    buf.put_string(group);
    buf
}

/// `u16 version, string topic, u32 partitions, u64 generation, u64 next member, string id
/// prefix, list<{string id, u64 session timeout ms, u64 seen generation, list<{u32 partition,
/// u64 since}> owned}> members, list<{u32 partition, string from, u64 since, u64 at}>
/// revoking`.
pub(super) fn encode_group(g: &GroupSnapshot) -> BytesMut {
    let mut buf = BytesMut::with_capacity(64 + 48 * g.members.len() + 40 * g.revoking.len());
    buf.put_u16_le(GROUP_VALUE);
    buf.put_string(&g.topic);
    buf.put_u32_le(g.partitions);
    buf.put_u64_le(g.generation);
    buf.put_u64_le(g.next_member);
    buf.put_string(&g.id_prefix);
    buf.put_u32_le(g.members.len() as u32);
    for m in &g.members {
        buf.put_string(&m.id);
        buf.put_u64_le(m.session_timeout_ms);
        buf.put_u64_le(m.seen_generation);
        buf.put_u32_le(m.owned.len() as u32);
        for (p, since) in &m.owned {
            buf.put_u32_le(*p);
            buf.put_u64_le(*since);
        }
    }
    buf.put_u32_le(g.revoking.len() as u32);
    for (p, from, since, at) in &g.revoking {
        buf.put_u32_le(*p);
        buf.put_string(from);
        buf.put_u64_le(*since);
        buf.put_u64_le(*at);
    }
    buf
}

/// Decodes a (non-empty) group value, checking every count and partition against the limits
/// and the group's partition count. Fields a later version appends are ignored.
pub(super) fn decode_group(value: Bytes) -> Result<GroupSnapshot, DecodeError> {
    if value.len() > GROUP_VALUE_MAX_BYTES {
        return Err(too_large("group value", value.len(), GROUP_VALUE_MAX_BYTES));
    }
    let invalid = |field, reason: String| DecodeError::Invalid { field, offset: 0, reason };
    let mut r = Reader::new(value);
    let version = r.u16()?;
    if version != GROUP_VALUE {
        return Err(invalid("group value", format!("version {version} is unknown")));
    }
    let topic = r.string("group topic", MAX_TOPIC_NAME_BYTES)?;
    let partitions = r.u32()?;
    if partitions > MAX_PARTITIONS {
        return Err(invalid("group partitions", format!("{partitions} is over {MAX_PARTITIONS}")));
    }
    let generation = r.u64()?;
    let next_member = r.u64()?;
    // Counters a coordinator only ever adds one to: far from overflowing.
    for (field, v) in [("group generation", generation), ("next member", next_member)] {
        if v > u64::MAX / 2 {
            return Err(invalid(field, format!("{v} is out of range")));
        }
    }
    let id_prefix = r.string("member id prefix", MAX_MEMBER_ID_BYTES)?;
    let in_range = |p: u32| {
        (p < partitions)
            .then_some(p)
            .ok_or_else(|| invalid("group partition", format!("{p} is not below {partitions}")))
    };
    let members = r.list("group members", 2 + 8 + 8 + 4, |r| {
        Ok(MemberSnapshot {
            id: r.string("member id", MAX_MEMBER_ID_BYTES)?,
            session_timeout_ms: r.u64()?,
            seen_generation: r.u64()?,
            owned: r.list("owned partitions", 12, |r| Ok((in_range(r.u32()?)?, r.u64()?)))?,
        })
    })?;
    if members.len() > MAX_MEMBERS_PER_GROUP {
        let reason = format!("{} members, over {MAX_MEMBERS_PER_GROUP}", members.len());
        return Err(invalid("group members", reason));
    }
    let revoking = r.list("revoking", 4 + 2 + 16, |r| {
        Ok((in_range(r.u32()?)?, r.string("member id", MAX_MEMBER_ID_BYTES)?, r.u64()?, r.u64()?))
    })?;
    // What a coordinator writes: one entry per member, a partition owned by one member at
    // most and not also being revoked (anything else would give a partition two owners).
    let mut ids = std::collections::HashSet::new();
    if !members.iter().all(|m| ids.insert(m.id.as_str())) {
        return Err(invalid("group members", "a member id appears twice".into()));
    }
    let mut taken = std::collections::HashSet::new();
    let owned = members.iter().flat_map(|m| m.owned.iter().map(|(p, _)| *p));
    if !owned.chain(revoking.iter().map(|(p, ..)| *p)).all(|p| taken.insert(p)) {
        return Err(invalid("group partitions", "a partition has two owners".into()));
    }
    // A revocation is from a member (a member that leaves takes its revocations along).
    if revoking.iter().any(|(_, from, ..)| !ids.contains(from.as_str())) {
        return Err(invalid("revoking", "a partition is revoked from a member not in the group".into()));
    }
    Ok(GroupSnapshot { topic, partitions, generation, next_member, id_prefix, members, revoking })
}

/// What a record's key names: a ledger, or a kind this version does not know (skipped).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Key {
    Ledger(OffsetKey),
    /// A group's membership.
    Group(Arc<str>),
    /// A compaction marker of this kind.
    Snapshot(u8),
    Unknown(u16),
}

pub(super) fn decode_key(key: Bytes) -> Result<Key, DecodeError> {
    if key.len() > KEY_MAX_BYTES {
        return Err(too_large("offsets key", key.len(), KEY_MAX_BYTES));
    }
    let mut r = Reader::new(key);
    let version = r.u16()?;
    if version == SNAPSHOT_KEY {
        let kind = r.u8()?;
        r.finish()?;
        return Ok(Key::Snapshot(kind));
    }
    if version == GROUP_KEY {
        let group = r.string("group", MAX_GROUP_NAME_BYTES)?;
        r.finish()?;
        return Ok(Key::Group(Arc::from(group)));
    }
    if version != LEDGER_KEY {
        return Ok(Key::Unknown(version));
    }
    let group = r.string("group", MAX_STRING_BYTES)?;
    let topic = r.string("topic", MAX_TOPIC_NAME_BYTES)?;
    let partition = r.u32()?;
    r.finish()?;
    Ok(Key::Ledger((Arc::from(group), Arc::from(topic), partition)))
}

fn too_large(field: &'static str, len: usize, limit: usize) -> DecodeError {
    DecodeError::TooLarge { field, offset: 0, value: len as u64, limit: limit as u64 }
}

/// Decodes a (non-empty) value. Fields a later version appends are ignored.
pub(super) fn decode_value(value: Bytes) -> Result<LedgerSnapshot, DecodeError> {
    if value.len() > VALUE_MAX_BYTES {
        return Err(too_large("offsets value", value.len(), VALUE_MAX_BYTES));
    }
    let mut r = Reader::new(value);
    let version = r.u16()?;
    if version != LEDGER_VALUE {
        let reason = format!("version {version} is unknown");
        return Err(DecodeError::Invalid { field: "offsets value", offset: 0, reason });
    }
    let floor = r.u64()?;
    let acked = r.list("acked", 16, |r| Ok(r.u64()?..r.u64()?))?;
    let counts = r.list("counts", 20, |r| Ok((r.u64()?..r.u64()?, r.u32()?)))?;
    let horizon = r.u64()?;
    let maybe = r.list("maybe", 16, |r| Ok(r.u64()?..r.u64()?))?;
    Ok(LedgerSnapshot { floor, acked, counts, horizon, maybe })
}

/// Builds the batches of one write: one batch, unless the records pass [`MAX_BATCH_BYTES`]
/// (a snapshot of many ledgers), then as many as they need. The records of one write are
/// independent (each a whole ledger), so a crash that keeps only some of the batches loses
/// nothing that was acknowledged: the write was not.
pub(super) struct WriteBuilder {
    done: Vec<ValidatedBatch>,
    current: BatchBuilder,
    timestamp_ms: i64,
}

impl WriteBuilder {
    pub(super) fn new(timestamp_ms: i64) -> Self {
        WriteBuilder { done: Vec::new(), current: BatchBuilder::new(4096), timestamp_ms }
    }

    /// Adds the record of a ledger, or a tombstone; returns the record's size in the log.
    pub(super) fn push(&mut self, key: &OffsetKey, value: Option<&LedgerSnapshot>) -> u64 {
        let key = encode_key(key);
        let value = value.map(encode_value).unwrap_or_default();
        self.push_raw(&key, &value)
    }

    /// Adds a group's membership record, or its tombstone; returns the record's size.
    pub(super) fn push_group(&mut self, group: &str, value: Option<&GroupSnapshot>) -> u64 {
        let key = encode_group_key(group);
        let value = value.map(encode_group).unwrap_or_default();
        self.push_raw(&key, &value)
    }

    fn push_raw(&mut self, key: &[u8], value: &[u8]) -> u64 {
        let size = BatchBuilder::record_size(Some(key), value, &[]);
        let full =
            self.current.size_bytes() + size > MAX_BATCH_BYTES || self.current.len() >= MAX_RECORDS_PER_BATCH;
        if full && !self.current.is_empty() {
            self.seal();
        }
        self.current.push(self.timestamp_ms, Some(key), value, &[]);
        size as u64
    }

    fn seal(&mut self) {
        let builder = std::mem::replace(&mut self.current, BatchBuilder::new(4096));
        // The builder writes a valid batch (keys and values are bounded well below
        // MAX_BATCH_BYTES); validating it again is the assertion of design.md's rule 8.
        match ValidatedBatch::new(builder.finish()) {
            Ok(batch) => self.done.push(batch),
            Err(e) => unreachable!("the batch builder wrote an invalid batch: {e}"),
        }
    }

    /// The batches, in order; none if nothing was pushed.
    pub(super) fn finish(mut self) -> Vec<ValidatedBatch> {
        if !self.current.is_empty() {
            self.seal();
        }
        self.done
    }
}

/// A batch of one compaction marker record (see [`SNAPSHOT_KEY`]).
pub(super) fn marker_batch(kind: u8, begin: u64, timestamp_ms: i64) -> ValidatedBatch {
    let mut key = BytesMut::with_capacity(3);
    key.put_u16_le(SNAPSHOT_KEY);
    key.put_u8(kind);
    let value = if kind == SNAPSHOT_COMPLETE { begin.to_le_bytes().to_vec() } else { Vec::new() };
    let mut builder = BatchBuilder::new(64);
    builder.push(timestamp_ms, Some(&key), &value, &[]);
    match ValidatedBatch::new(builder.finish()) {
        Ok(batch) => batch,
        Err(e) => unreachable!("the batch builder wrote an invalid batch: {e}"),
    }
}

/// The compaction markers found reading the log: the offset of the last begin marker, and the
/// begin offset the last complete marker names.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Snapshots {
    pub(super) last_begin: Option<u64>,
    pub(super) last_complete: Option<u64>,
}

impl Snapshots {
    /// A snapshot that began and never completed (a crash during a compaction): where to cut.
    pub(super) fn unfinished(&self) -> Option<u64> {
        self.last_begin.filter(|&b| self.last_complete.is_none_or(|c| c < b))
    }
}

/// A record's size in the log, as [`WriteBuilder::push`] counts it.
fn record_size(key: &[u8], value: &[u8]) -> u64 {
    BatchBuilder::record_size(Some(key), value, &[]) as u64
}

/// What the log holds, the last record of each key winning: ledgers and groups, each with the
/// size of its record.
#[derive(Debug, Default)]
pub(super) struct Live {
    pub(super) ledgers: HashMap<OffsetKey, (LedgerSnapshot, u64)>,
    pub(super) groups: HashMap<Arc<str>, (GroupSnapshot, u64)>,
}

/// Every live ledger and group in the log, with the size of its record: the log read from its start a
/// chunk at a time, the last record of a key winning and a tombstone deleting it. A damaged
/// span (which recovery kept: corruption, not a torn write) is logged and stepped over. An
/// intact record that does not decode is skipped, and with it what earlier records said of its
/// key (it replaced them).
pub(super) fn read_log(log: &PartitionLog) -> Result<(Live, Snapshots), LogError> {
    read_log_to(log, log.next_offset())
}

/// [`read_log`] up to `end` (a replicated log's high watermark: nothing above it is committed).
/// A batch that starts below `end` and ends past it is not read (a commit ends on batches).
pub(super) fn read_log_to(log: &PartitionLog, end: u64) -> Result<(Live, Snapshots), LogError> {
    let mut map = Live::default();
    let mut snapshots = Snapshots::default();
    let mut offset = log.log_start_offset();
    let end = end.min(log.next_offset());
    while offset < end {
        let bytes = match log.read_plan(offset, READ_CHUNK_BYTES).and_then(|plan| plan.execute()) {
            Ok(bytes) => bytes,
            Err(e @ LogError::Corrupt { .. }) => {
                let resume = log.resume_after_damage(offset);
                tracing::error!(from = offset, to = resume, "offsets store: skipping damaged records: {e}");
                offset = resume;
                continue;
            }
            Err(e) => return Err(e),
        };
        let before = offset;
        // `execute` hands out whole batches whose CRCs it checked.
        for span in Batches::new(&bytes) {
            let Ok(span) = span else { break };
            if span.header.next_offset() > end {
                return Ok((map, snapshots));
            }
            offset = span.header.next_offset();
            apply_batch(bytes.slice(span.range()), &mut map, &mut snapshots);
        }
        if offset == before {
            // A read that yields no batch at an offset below the log end: the file changed.
            return Err(LogError::Corrupt {
                path: log.dir().to_path_buf(),
                position: 0,
                reason: format!("offsets store: no batch at offset {offset}"),
            });
        }
    }
    Ok((map, snapshots))
}

/// Reads the compaction markers of `log` in `from..end` (committed batches): returns the offset
/// where the next read starts and the begin offset of the last complete snapshot found. Damaged
/// spans are stepped over (a marker there is only found by a later snapshot's).
pub(crate) fn last_complete_snapshot(log: &PartitionLog, from: u64, end: u64) -> (u64, Option<u64>) {
    let end = end.min(log.next_offset());
    let mut offset = from.max(log.log_start_offset());
    let mut last = None;
    while offset < end {
        let bytes = match log.read_plan(offset, READ_CHUNK_BYTES).and_then(|plan| plan.execute()) {
            Ok(bytes) => bytes,
            Err(LogError::Corrupt { .. }) => {
                offset = log.resume_after_damage(offset);
                continue;
            }
            Err(_) => return (offset, last),
        };
        let before = offset;
        for span in Batches::new(&bytes) {
            let Ok(span) = span else { break };
            if span.header.next_offset() > end {
                return (offset, last);
            }
            offset = span.header.next_offset();
            if span.header.is_control() || span.header.records_count != 1 {
                continue; // markers are batches of one record
            }
            let batch = bytes.slice(span.range());
            let Some(Ok(record)) = RecordIter::new(batch, span.header).next() else { continue };
            let Some(key) = record.key else { continue };
            if let Ok(Key::Snapshot(SNAPSHOT_COMPLETE)) = decode_key(key) {
                if let Ok(begin) = <[u8; 8]>::try_from(&record.value[..]) {
                    last = Some(u64::from_le_bytes(begin));
                }
            }
        }
        if offset == before {
            return (offset, last);
        }
    }
    (offset, last)
}

/// Applies the records of one batch (CRC already checked) to `live`.
pub(super) fn apply_batch(batch: Bytes, live: &mut Live, snapshots: &mut Snapshots) {
    let header = match batch::validate(&batch) {
        Ok(header) => header,
        Err(e) => {
            tracing::error!("offsets store: skipping a batch that does not validate: {e}");
            return;
        }
    };
    if header.is_control() {
        return; // a replicated log's Raft entries (a new leader's empty entry)
    }
    for record in RecordIter::new(batch, header) {
        let record = match record {
            Ok(record) => record,
            Err(e) => {
                tracing::error!("offsets store: skipping a record that does not decode: {e}");
                break;
            }
        };
        let Some(raw_key) = record.key else {
            tracing::warn!(offset = record.offset, "offsets store: skipping a record without a key");
            continue;
        };
        let size = record_size(&raw_key, &record.value);
        let key = match decode_key(raw_key) {
            Ok(Key::Ledger(key)) => key,
            Ok(Key::Group(group)) => {
                if record.value.is_empty() {
                    live.groups.remove(&group);
                    continue;
                }
                match decode_group(record.value) {
                    Ok(snapshot) => {
                        live.groups.insert(group, (snapshot, size));
                    }
                    Err(e) => {
                        tracing::warn!(%group, offset = record.offset, "offsets store: skipping a group record that does not decode: {e}");
                        live.groups.remove(&group);
                    }
                }
                continue;
            }
            Ok(Key::Snapshot(SNAPSHOT_BEGIN)) => {
                snapshots.last_begin = Some(record.offset);
                continue;
            }
            Ok(Key::Snapshot(SNAPSHOT_COMPLETE)) => {
                match <[u8; 8]>::try_from(&record.value[..]) {
                    Ok(begin) => snapshots.last_complete = Some(u64::from_le_bytes(begin)),
                    Err(_) => tracing::warn!(
                        offset = record.offset,
                        "offsets store: a snapshot marker of the wrong size"
                    ),
                }
                continue;
            }
            Ok(Key::Snapshot(kind)) => {
                tracing::warn!(
                    offset = record.offset,
                    kind,
                    "offsets store: skipping a snapshot marker of an unknown kind"
                );
                continue;
            }
            Ok(Key::Unknown(version)) => {
                tracing::warn!(
                    offset = record.offset,
                    version,
                    "offsets store: skipping a record of a kind this version does not know"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(
                    offset = record.offset,
                    "offsets store: skipping a record whose key does not decode: {e}"
                );
                continue;
            }
        };
        if record.value.is_empty() {
            live.ledgers.remove(&key);
            continue;
        }
        match decode_value(record.value) {
            Ok(snapshot) => {
                live.ledgers.insert(key, (snapshot, size));
            }
            Err(e) => {
                tracing::warn!(group = %key.0, topic = %key.1, partition = key.2, offset = record.offset, "offsets store: skipping a record that does not decode: {e}");
                live.ledgers.remove(&key);
            }
        }
    }
}
