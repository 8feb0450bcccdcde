//! Idempotent producers (design.md §10).
//!
//! A producer asks once for a producer id; every batch it sends carries that id and the
//! sequence number of its first record, per partition. Each partition remembers the last
//! `RECENT_BATCHES` batches of every producer, so a batch sent again after a lost
//! acknowledgement is answered with the offsets it already has instead of being appended
//! twice, and a batch that skips ahead (a gap) is refused.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::Mutex;
use quiver_protocol::batch::BatchHeader;
use quiver_protocol::limits::{MAX_PRODUCERS_PER_PARTITION, RECENT_BATCHES};

/// Producer ids are reserved durably in blocks of this many.
pub(crate) const ID_BLOCK: i64 = 1000;

/// Extension of a segment's producer-state snapshot, `<base>.producers`: the state as of the
/// segment's first batch.
pub const SNAPSHOT_EXT: &str = "producers";
const SNAPSHOT_VERSION: u8 = 1;
const SNAPSHOT_BATCH_BYTES: usize = 24;
/// The largest valid snapshot: every producer remembered, each with every batch.
pub const MAX_SNAPSHOT_BYTES: u64 =
    (1 + 4 + MAX_PRODUCERS_PER_PARTITION * (8 + 1 + RECENT_BATCHES * SNAPSHOT_BATCH_BYTES) + 4) as u64;

/// What to do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    Append,
    /// Already written at these offsets.
    Duplicate {
        base_offset: u64,
        last_offset: u64,
    },
    OutOfOrder {
        expected: i32,
        got: i32,
    },
}

/// Per producer, the batches it wrote last, and an index by the offset of each producer's
/// newest batch, so forgetting the producer that wrote longest ago costs O(log n).
#[derive(Debug, Default)]
pub struct ProducerStates {
    producers: HashMap<i64, VecDeque<Written>>,
    /// `(last offset of the producer's newest batch, producer id)`, one entry per producer.
    by_last_offset: BTreeSet<(u64, i64)>,
}

#[derive(Debug, Clone, Copy)]
struct Written {
    first_seq: i32,
    last_seq: i32,
    base_offset: u64,
    last_offset: u64,
}

impl ProducerStates {
    pub fn check(&self, h: &BatchHeader) -> SeqCheck {
        if h.producer_id < 0 || h.base_sequence < 0 {
            return SeqCheck::Append; // not idempotent
        }
        let Some(recent) = self.producers.get(&h.producer_id) else {
            // A new producer, or one whose state was not recovered: nothing to compare with.
            return SeqCheck::Append;
        };
        let last_seq = next_seq(h.base_sequence, h.last_offset_delta);
        if let Some(w) = recent.iter().find(|w| w.first_seq == h.base_sequence && w.last_seq == last_seq) {
            return SeqCheck::Duplicate { base_offset: w.base_offset, last_offset: w.last_offset };
        }
        let expected = recent.back().map(|w| next_seq(w.last_seq, 1)).unwrap_or(h.base_sequence);
        if h.base_sequence == expected {
            SeqCheck::Append
        } else {
            SeqCheck::OutOfOrder { expected, got: h.base_sequence }
        }
    }

    /// Records a batch written at `base_offset`.
    pub fn record(&mut self, h: &BatchHeader, base_offset: u64) {
        if h.producer_id < 0 || h.base_sequence < 0 {
            return;
        }
        if !self.producers.contains_key(&h.producer_id) && self.producers.len() >= MAX_PRODUCERS_PER_PARTITION
        {
            if let Some((_, id)) = self.by_last_offset.pop_first() {
                self.producers.remove(&id);
            }
        }
        let written = Written {
            first_seq: h.base_sequence,
            last_seq: next_seq(h.base_sequence, h.last_offset_delta),
            base_offset,
            last_offset: base_offset + h.last_offset_delta as u64,
        };
        let recent = self.producers.entry(h.producer_id).or_default();
        if let Some(newest) = recent.back() {
            self.by_last_offset.remove(&(newest.last_offset, h.producer_id));
        }
        recent.push_back(written);
        while recent.len() > RECENT_BATCHES {
            recent.pop_front();
        }
        self.by_last_offset.insert((written.last_offset, h.producer_id));
    }

    /// Every producer's recent batches `[first seq, last seq, base offset, last offset]`, by
    /// producer id: a comparable form (the map's order is not).
    #[cfg(test)]
    pub fn sorted(&self) -> Vec<(i64, Vec<[u64; 4]>)> {
        let mut out: Vec<_> = self
            .producers
            .iter()
            .map(|(&id, r)| {
                (
                    id,
                    r.iter()
                        .map(|w| [w.first_seq as u64, w.last_seq as u64, w.base_offset, w.last_offset])
                        .collect(),
                )
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Producers remembered.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// Whether no producer is remembered.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Adds a producer read from a snapshot.
    fn insert(&mut self, id: i64, recent: VecDeque<Written>) {
        if let Some(old) = self.producers.get(&id).and_then(|r| r.back()) {
            self.by_last_offset.remove(&(old.last_offset, id));
        }
        self.by_last_offset.insert((recent.back().map_or(0, |w| w.last_offset), id));
        self.producers.insert(id, recent);
    }
}

impl ProducerStates {
    /// `u8 version, u32 count, count × {i64 producer_id, u8 n, n × {i32 first_seq, i32 last_seq,
    /// u64 base_offset, u64 last_offset}}, u32 crc32c` (little-endian; design.md §10).
    pub fn encode_snapshot(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(9 + self.producers.len() * 64);
        b.push(SNAPSHOT_VERSION);
        b.extend_from_slice(&(self.producers.len() as u32).to_le_bytes());
        for (id, recent) in &self.producers {
            b.extend_from_slice(&id.to_le_bytes());
            b.push(recent.len() as u8);
            for w in recent {
                b.extend_from_slice(&w.first_seq.to_le_bytes());
                b.extend_from_slice(&w.last_seq.to_le_bytes());
                b.extend_from_slice(&w.base_offset.to_le_bytes());
                b.extend_from_slice(&w.last_offset.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads a snapshot; `None` if it is damaged (torn, wrong checksum, out of bounds).
    pub fn decode_snapshot(bytes: &[u8]) -> Option<Self> {
        let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        let mut r = quiver_protocol::codec::Reader::new(bytes::Bytes::copy_from_slice(body));
        if r.u8().ok()? != SNAPSHOT_VERSION {
            return None;
        }
        let count = r.u32().ok()? as usize;
        if count > MAX_PRODUCERS_PER_PARTITION {
            return None;
        }
        let mut states = ProducerStates::default();
        for _ in 0..count {
            let id = r.i64().ok()?;
            let n = r.u8().ok()? as usize;
            if n > RECENT_BATCHES {
                return None;
            }
            let mut recent = VecDeque::with_capacity(n);
            for _ in 0..n {
                recent.push_back(Written {
                    first_seq: r.u32().ok()? as i32,
                    last_seq: r.u32().ok()? as i32,
                    base_offset: r.u64().ok()?,
                    last_offset: r.u64().ok()?,
                });
            }
            states.insert(id, recent);
        }
        r.finish().ok()?;
        Some(states)
    }
}

/// Sequence arithmetic modulo 2^31, as Kafka's: sequences are never negative.
fn next_seq(seq: i32, delta: i32) -> i32 {
    seq.wrapping_add(delta) & i32::MAX
}

/// Hands out producer ids that are never reused, also across restarts, and that a client cannot
/// derive from another (design.md §10).
///
/// An id is `counter << 31 | tag`, where `tag` is 31 bits of an HMAC-SHA256 of the counter under
/// a key kept in the data directory. The end of the reserved block of counters is persisted
/// (tmp, fsync, rename, directory fsync) before any id from it is given out, so counters never
/// repeat; the tag means an id is accepted only as it was issued, so a client that knows its
/// own id cannot name its neighbours' (it would have to guess 31 bits, one refused produce
/// request per guess).
#[derive(Debug)]
pub struct ProducerIds {
    path: PathBuf,
    key: ring::hmac::Key,
    key_bytes: [u8; 32],
    /// (next counter, end of the reserved block)
    state: Mutex<(i64, i64)>,
    /// Every counter below this may have been handed out (this run or an earlier one); read
    /// without the lock by every produce request.
    issued_below: AtomicI64,
}

/// Counters are below 2^32, so `counter << 31 | tag` stays a positive i64.
pub(crate) const MAX_COUNTER: i64 = 1 << 32;
const TAG_MASK: i64 = (1 << 31) - 1;
const IDS_MAGIC: &[u8; 4] = b"QVPI";
const IDS_VERSION: u16 = 1;
/// magic, version, reserved, u64 block end, key, crc32c of what precedes it.
const IDS_FILE_BYTES: usize = 4 + 2 + 2 + 8 + 32 + 4;

/// The epoch every producer id is issued with (there is no fencing by epoch yet).
pub const PRODUCER_EPOCH: i16 = 0;

/// Why a batch's producer identity is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProducerIdError {
    /// The id was never handed out by `InitProducer` (on this broker's data directory, or in
    /// this cluster).
    #[error("producer id {0} was never issued here; ask for one with InitProducer")]
    NeverIssued(i64),
    /// The id was issued, but not with this epoch.
    #[error("producer {id} sent epoch {epoch}; its id was issued with epoch {PRODUCER_EPOCH}")]
    WrongEpoch {
        /// The producer id.
        id: i64,
        /// The epoch in the batch.
        epoch: i16,
    },
}

impl ProducerIds {
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let path = data_dir.join("producer_ids");
        let damaged = |why: &str| std::io::Error::other(format!("{} is damaged: {why}", path.display()));
        // Read at most one byte more than the largest layout: a longer file is damaged, and its
        // length must not decide an allocation.
        let bytes = match std::fs::File::open(&path) {
            Ok(f) => {
                use std::io::Read;
                let mut bytes = Vec::with_capacity(IDS_FILE_BYTES + 1);
                f.take(IDS_FILE_BYTES as u64 + 1).read_to_end(&mut bytes)?;
                Some(bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let (reserved, key, fresh) = match bytes.as_deref().map(decode_ids_file) {
            Some(Ok(IdsFile::Keyed { block_end, key })) => (block_end, key, false),
            // The first layout: ids it handed out are not accepted any more (producers take new
            // ones); counters start above them.
            Some(Ok(IdsFile::Sequential { block_end })) => (block_end, new_key()?, true),
            Some(Err(why)) => return Err(damaged(why)),
            None => (0, new_key()?, true),
        };
        let ids = ProducerIds {
            path,
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            key_bytes: key,
            // Counters below the persisted block end may have been handed out: start after it.
            state: Mutex::new((reserved, reserved)),
            issued_below: AtomicI64::new(reserved),
        };
        if fresh {
            // The key must be durable before any id made with it is handed out.
            ids.persist(reserved)?;
        }
        Ok(ids)
    }

    /// Writes the block end and the key: tmp, fsync, rename, fsync of the directory.
    fn persist(&self, block_end: i64) -> std::io::Result<()> {
        let body = encode_ids_file(block_end, &self.key_bytes);
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        crate::storage::ledger::replaced_whole(&self.path);
        Ok(())
    }

    /// Checks a batch's producer identity: a negative id is a batch without one (not
    /// idempotent); any other must be an id this broker handed out, with its epoch. Without
    /// this, a client could write under a sequence it made up, or under another producer's
    /// state by naming an id it was never given.
    pub fn check(&self, producer_id: i64, epoch: i16) -> Result<(), ProducerIdError> {
        check_id(&self.key, self.issued_below.load(Ordering::Acquire), producer_id, epoch)
    }

    /// A fresh id. Blocking (it may persist a new block).
    pub fn allocate_blocking(&self) -> std::io::Result<i64> {
        let mut st = self.state.lock();
        if st.0 >= st.1 {
            let end = st.1 + ID_BLOCK;
            if end > MAX_COUNTER {
                return Err(std::io::Error::other("every producer id this broker can issue was issued"));
            }
            self.persist(end)?;
            st.1 = end;
        }
        let counter = st.0;
        st.0 += 1;
        self.issued_below.fetch_max(st.0, Ordering::AcqRel);
        Ok(make_id(&self.key, counter))
    }
}

/// The id of `counter` under `key`: the counter in the high bits, the low 31 bits of an
/// HMAC of it below, so an id nobody issued is refused without a table of issued ids.
pub(crate) fn make_id(key: &ring::hmac::Key, counter: i64) -> i64 {
    counter << 31 | id_tag(key, counter)
}

fn id_tag(key: &ring::hmac::Key, counter: i64) -> i64 {
    let mac = ring::hmac::sign(key, &counter.to_le_bytes());
    let b = mac.as_ref();
    i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])) & TAG_MASK
}

/// Checks a batch's producer identity against the key ids are made with and the end of the
/// counters issued so far: a negative id is a batch without one (not idempotent).
pub(crate) fn check_id(
    key: &ring::hmac::Key,
    issued_below: i64,
    producer_id: i64,
    epoch: i16,
) -> Result<(), ProducerIdError> {
    if producer_id < 0 {
        return Ok(());
    }
    let counter = producer_id >> 31;
    if counter >= issued_below || producer_id & TAG_MASK != id_tag(key, counter) {
        return Err(ProducerIdError::NeverIssued(producer_id));
    }
    if epoch != PRODUCER_EPOCH {
        return Err(ProducerIdError::WrongEpoch { id: producer_id, epoch });
    }
    Ok(())
}

/// What a `producer_ids` file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IdsFile {
    /// `magic, u16 version, u16 reserved, u64 block end, [u8; 32] key, u32 crc32c`.
    Keyed { block_end: i64, key: [u8; 32] },
    /// The first layout: `u64 block end` of sequential ids and its crc32c, no key.
    Sequential { block_end: i64 },
}

/// Parses a `producer_ids` file: its layout by length, the checksum, magic and version, and a
/// block end within `0..=MAX_COUNTER` (a larger one would overflow the next block).
pub(crate) fn decode_ids_file(b: &[u8]) -> Result<IdsFile, &'static str> {
    let le_u64 = |at: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[at..at + 8]);
        i64::from_le_bytes(v)
    };
    match b.len() {
        IDS_FILE_BYTES => {
            let crc = u32::from_le_bytes([b[48], b[49], b[50], b[51]]);
            if &b[..4] != IDS_MAGIC || u16::from_le_bytes([b[4], b[5]]) != IDS_VERSION || b[6..8] != [0, 0] {
                return Err("bad magic, version or reserved bytes");
            }
            if crc32c::crc32c(&b[..IDS_FILE_BYTES - 4]) != crc {
                return Err("checksum mismatch");
            }
            let block_end = le_u64(8);
            if !(0..=MAX_COUNTER).contains(&block_end) {
                return Err("block end out of range");
            }
            let mut key = [0u8; 32];
            key.copy_from_slice(&b[16..48]);
            Ok(IdsFile::Keyed { block_end, key })
        }
        12 if crc32c::crc32c(&b[..8]) == u32::from_le_bytes([b[8], b[9], b[10], b[11]]) => {
            Ok(IdsFile::Sequential { block_end: le_u64(0).clamp(0, MAX_COUNTER) })
        }
        12 => Err("checksum mismatch"),
        _ => Err("unexpected length"),
    }
}

/// The bytes of a `producer_ids` file with `block_end` and `key` (as `persist` writes it).
pub(crate) fn encode_ids_file(block_end: i64, key: &[u8; 32]) -> Vec<u8> {
    let mut body = Vec::with_capacity(IDS_FILE_BYTES);
    body.extend_from_slice(IDS_MAGIC);
    body.extend_from_slice(&IDS_VERSION.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&block_end.to_le_bytes());
    body.extend_from_slice(key);
    body.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    body
}

/// A new random key for producer-id tags.
pub(crate) fn new_key() -> std::io::Result<[u8; 32]> {
    use ring::rand::SecureRandom;
    let mut key = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| std::io::Error::other("no system randomness for the producer-id key"))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_protocol::batch::{BatchBuilder, ProducerIdentity};

    fn header(pid: i64, seq: i32, n: usize) -> BatchHeader {
        let mut b = BatchBuilder::new(256).with_identity(ProducerIdentity {
            producer_id: pid,
            producer_epoch: 0,
            base_sequence: seq,
        });
        for _ in 0..n {
            b.push(1, None, b"v", &[]);
        }
        BatchHeader::parse(&b.finish()).expect("header")
    }

    #[test]
    fn duplicates_are_recognised_and_gaps_refused() {
        let mut s = ProducerStates::default();
        let a = header(7, 0, 3);
        assert_eq!(s.check(&a), SeqCheck::Append);
        s.record(&a, 100);
        let b = header(7, 3, 2);
        assert_eq!(s.check(&b), SeqCheck::Append);
        s.record(&b, 103);
        assert_eq!(s.check(&a), SeqCheck::Duplicate { base_offset: 100, last_offset: 102 });
        assert_eq!(s.check(&b), SeqCheck::Duplicate { base_offset: 103, last_offset: 104 });
        assert_eq!(s.check(&header(7, 9, 1)), SeqCheck::OutOfOrder { expected: 5, got: 9 });
        assert_eq!(s.check(&header(7, 5, 1)), SeqCheck::Append);
        // Other producers and non-idempotent batches are independent.
        assert_eq!(s.check(&header(8, 42, 1)), SeqCheck::Append);
        assert_eq!(s.check(&header(-1, -1, 1)), SeqCheck::Append);
    }

    #[test]
    fn snapshots_round_trip_and_damage_is_detected() {
        let mut s = ProducerStates::default();
        s.record(&header(7, 0, 3), 100);
        s.record(&header(7, 3, 2), 103);
        s.record(&header(9, 40, 1), 105);
        let bytes = s.encode_snapshot();
        let back = ProducerStates::decode_snapshot(&bytes).expect("decodes");
        assert_eq!(back.check(&header(7, 3, 2)), SeqCheck::Duplicate { base_offset: 103, last_offset: 104 });
        assert_eq!(back.check(&header(9, 41, 1)), SeqCheck::Append);
        assert_eq!(back.check(&header(9, 43, 1)), SeqCheck::OutOfOrder { expected: 41, got: 43 });
        for cut in 0..bytes.len() {
            assert!(ProducerStates::decode_snapshot(&bytes[..cut]).is_none(), "torn at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[6] ^= 1;
        assert!(ProducerStates::decode_snapshot(&flipped).is_none());
    }

    #[test]
    fn the_producer_that_wrote_longest_ago_is_forgotten() {
        let mut s = ProducerStates::default();
        for id in 0..MAX_PRODUCERS_PER_PARTITION as i64 {
            s.record(&header(id, 0, 1), id as u64 * 10);
        }
        // Producer 0 writes again, so producer 1 is now the one that wrote longest ago.
        s.record(&header(0, 1, 1), 1_000_000);
        s.record(&header(-1, -1, 1), 1_000_001); // not idempotent: not remembered
        s.record(&header(100_000, 0, 1), 1_000_002);
        assert_eq!(s.len(), MAX_PRODUCERS_PER_PARTITION);
        assert_eq!(s.check(&header(1, 0, 1)), SeqCheck::Append, "producer 1 forgotten");
        assert!(matches!(s.check(&header(0, 1, 1)), SeqCheck::Duplicate { .. }));
        assert!(matches!(s.check(&header(2, 0, 1)), SeqCheck::Duplicate { .. }));
        s.record(&header(100_001, 0, 1), 1_000_003);
        assert_eq!(s.check(&header(2, 0, 1)), SeqCheck::Append, "then producer 2");
        // The index survives a snapshot round trip.
        let mut back = ProducerStates::decode_snapshot(&s.encode_snapshot()).expect("decodes");
        back.record(&header(100_002, 0, 1), 1_000_004);
        assert_eq!(back.len(), MAX_PRODUCERS_PER_PARTITION);
        assert_eq!(back.check(&header(3, 0, 1)), SeqCheck::Append, "producer 3 forgotten after reload");
        assert!(matches!(back.check(&header(0, 1, 1)), SeqCheck::Duplicate { .. }));
    }

    #[test]
    fn only_issued_ids_and_epochs_pass() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = ProducerIds::open(dir.path()).expect("open");
        assert_eq!(ids.check(0, 0), Err(ProducerIdError::NeverIssued(0)));
        assert_eq!(ids.check(-1, -1), Ok(()), "no producer id: not idempotent");
        let a = ids.allocate_blocking().expect("id");
        let b = ids.allocate_blocking().expect("id");
        assert_eq!(ids.check(a, PRODUCER_EPOCH), Ok(()));
        assert_eq!(ids.check(b, PRODUCER_EPOCH), Ok(()));
        assert_eq!(ids.check(a, 3), Err(ProducerIdError::WrongEpoch { id: a, epoch: 3 }));
        // Neighbours of an issued id are not ids: another producer's cannot be derived.
        for forged in [a + 1, a - 1, a ^ 1, b - (1 << 31), a + (1 << 31), i64::MAX] {
            if forged != a && forged != b {
                assert_eq!(ids.check(forged, 0), Err(ProducerIdError::NeverIssued(forged)), "{forged}");
            }
        }
        drop(ids);
        // After a restart the key and the issued ids are the same.
        let ids = ProducerIds::open(dir.path()).expect("reopen");
        assert_eq!(ids.check(a, 0), Ok(()));
        assert_eq!(ids.check(b, 0), Ok(()));
        let c = ids.allocate_blocking().expect("id");
        assert_eq!(ids.check(c, 0), Ok(()));
        assert_eq!(ids.check(c + 1, 0), Err(ProducerIdError::NeverIssued(c + 1)));
    }

    #[test]
    fn a_file_of_the_first_layout_moves_to_keyed_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut old = 2000i64.to_le_bytes().to_vec();
        old.extend_from_slice(&crc32c::crc32c(&old).to_le_bytes());
        std::fs::write(dir.path().join("producer_ids"), &old).expect("write");
        let ids = ProducerIds::open(dir.path()).expect("open");
        assert_eq!(ids.check(5, 0), Err(ProducerIdError::NeverIssued(5)), "old ids are void");
        let a = ids.allocate_blocking().expect("id");
        assert!(a >> 31 >= 2000, "counters start above the old ids");
        drop(ids);
        let ids = ProducerIds::open(dir.path()).expect("reopen");
        assert_eq!(ids.check(a, 0), Ok(()));
        std::fs::write(dir.path().join("producer_ids"), b"garbage").expect("write");
        assert!(ProducerIds::open(dir.path()).is_err(), "damage is refused, not reset");
    }

    #[test]
    fn ids_are_not_reused_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = ProducerIds::open(dir.path()).expect("open");
        let a = ids.allocate_blocking().expect("id");
        let b = ids.allocate_blocking().expect("id");
        assert_ne!(a, b);
        drop(ids);
        let ids = ProducerIds::open(dir.path()).expect("reopen");
        let c = ids.allocate_blocking().expect("id");
        assert!(c > b, "{c} after {b}");
    }
}
