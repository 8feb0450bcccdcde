//! Record batches in Kafka's v2 layout (docs/design.md §3), big-endian as Kafka specifies.
//!
//! A batch is kept as the bytes it arrived in: the broker validates and stamps it, the disk
//! stores it, consumers receive it unchanged. Records are decoded lazily, as zero-copy slices.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::DecodeError;
use crate::limits::{MAX_BATCH_BYTES, MAX_HEADERS_PER_RECORD, MAX_RECORDS_PER_BATCH};

/// Bytes before the first record.
pub const BATCH_HEADER_BYTES: usize = 61;
/// `base_offset` and `batch_length`, which `batch_length` does not count.
pub const BATCH_LOG_OVERHEAD: usize = 12;
/// Where the CRC-covered part starts.
const CRC_START: usize = 21;
const MAGIC: i8 = 2;
const COMPRESSION_MASK: i16 = 0x07;
/// Attributes bit 5: a control batch (Kafka's transaction markers and KRaft's `LeaderChange`;
/// ours also holds Raft's own entries, docs/replication.md §2). Consumers skip its records.
pub const CONTROL_ATTRIBUTE: i16 = 0x20;
/// Smallest possible encoded record: length + attributes + ts delta + offset delta + key len +
/// value len + header count, one byte each.
const MIN_RECORD_BYTES: usize = 7;

/// Why a record batch was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("batch magic is {0}, only 2 is supported")]
    BadMagic(i8),
    #[error("batch CRC mismatch: header says {expected:#010x}, bytes give {actual:#010x}")]
    CrcMismatch { expected: u32, actual: u32 },
    #[error("compression codec {0} is not supported")]
    UnsupportedCompression(u8),
    #[error("batch length {0} is outside 49..={max}", max = MAX_BATCH_BYTES - BATCH_LOG_OVERHEAD)]
    BadLength(i64),
    #[error("inconsistent batch: {0}")]
    Inconsistent(String),
}

/// The fixed 61-byte header of a v2 batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: u64,
    pub batch_length: u32,
    pub leader_epoch: i32,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records_count: u32,
}

impl BatchHeader {
    /// Parses the header at the start of `buf`. Checks magic, the length bounds and the record
    /// count bounds; does not look at the records or the CRC.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < BATCH_HEADER_BYTES {
            return Err(
                DecodeError::Truncated { offset: 0, need: BATCH_HEADER_BYTES, have: buf.len() }.into()
            );
        }
        let i64_at = |o: usize| i64::from_be_bytes(buf[o..o + 8].try_into().unwrap_or([0; 8]));
        let i32_at = |o: usize| i32::from_be_bytes(buf[o..o + 4].try_into().unwrap_or([0; 4]));
        let i16_at = |o: usize| i16::from_be_bytes(buf[o..o + 2].try_into().unwrap_or([0; 2]));
        let magic = buf[16] as i8;
        if magic != MAGIC {
            return Err(BatchError::BadMagic(magic));
        }
        let batch_length = i32_at(8) as i64;
        if batch_length < (BATCH_HEADER_BYTES - BATCH_LOG_OVERHEAD) as i64
            || batch_length > (MAX_BATCH_BYTES - BATCH_LOG_OVERHEAD) as i64
        {
            return Err(BatchError::BadLength(batch_length));
        }
        let base_offset = i64_at(0);
        if base_offset < 0 {
            return Err(BatchError::Inconsistent(format!("negative base offset {base_offset}")));
        }
        let records_count = i32_at(57);
        let last_offset_delta = i32_at(23);
        if records_count < 1 || records_count as usize > MAX_RECORDS_PER_BATCH {
            return Err(BatchError::Inconsistent(format!("record count {records_count}")));
        }
        if records_count as usize * MIN_RECORD_BYTES
            > batch_length as usize + BATCH_LOG_OVERHEAD - BATCH_HEADER_BYTES
        {
            return Err(BatchError::Inconsistent(format!(
                "{records_count} records cannot fit in {batch_length} bytes"
            )));
        }
        if last_offset_delta != records_count - 1 {
            return Err(BatchError::Inconsistent(format!(
                "last offset delta {last_offset_delta} with {records_count} records"
            )));
        }
        Ok(BatchHeader {
            base_offset: base_offset as u64,
            batch_length: batch_length as u32,
            leader_epoch: i32_at(12),
            crc: u32::from_be_bytes(buf[17..21].try_into().unwrap_or([0; 4])),
            attributes: i16_at(21),
            last_offset_delta,
            base_timestamp: i64_at(27),
            max_timestamp: i64_at(35),
            producer_id: i64_at(43),
            producer_epoch: i16_at(51),
            base_sequence: i32_at(53),
            records_count: records_count as u32,
        })
    }

    /// Whole batch size in bytes, header included.
    pub fn total_len(&self) -> usize {
        BATCH_LOG_OVERHEAD + self.batch_length as usize
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> u64 {
        self.base_offset + self.last_offset_delta as u64
    }

    /// Offset the next batch starts at.
    pub fn next_offset(&self) -> u64 {
        self.last_offset() + 1
    }

    pub fn compression(&self) -> u8 {
        (self.attributes & COMPRESSION_MASK) as u8
    }

    /// Whether attributes bit 5 marks a control batch.
    pub fn is_control(&self) -> bool {
        self.attributes & CONTROL_ATTRIBUTE != 0
    }
}

/// Verifies the CRC of one whole batch (`batch.len()` must be its `total_len`).
pub fn verify_crc(batch: &[u8], header: &BatchHeader) -> Result<(), BatchError> {
    let actual = crc32c::crc32c(&batch[CRC_START.min(batch.len())..]);
    if actual != header.crc {
        return Err(BatchError::CrcMismatch { expected: header.crc, actual });
    }
    Ok(())
}

/// Full validation of one batch that must span exactly `batch`: header, length, CRC,
/// compression, and the framing of every record.
pub fn validate(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(batch)?;
    if header.total_len() != batch.len() {
        return Err(BatchError::Inconsistent(format!(
            "batch length field says {} bytes, frame holds {}",
            header.total_len(),
            batch.len()
        )));
    }
    verify_crc(batch, &header)?;
    if header.compression() != 0 {
        return Err(BatchError::UnsupportedCompression(header.compression()));
    }
    check_framing(&batch[BATCH_HEADER_BYTES..], header.records_count)?;
    Ok(header)
}

/// Writes the broker-assigned base offset and leader epoch into a batch. Both fields sit
/// outside the CRC, so the checksum stays valid.
pub fn stamp(batch: &mut [u8], base_offset: u64, leader_epoch: i32) {
    batch[0..8].copy_from_slice(&(base_offset as i64).to_be_bytes());
    batch[12..16].copy_from_slice(&leader_epoch.to_be_bytes());
}

/// One whole batch that passed [`validate`], with its parsed header. Only the validating
/// constructors make one, so holding it proves the bytes were checked: the produce path
/// validates once, in the request handler, and the partition and the log use the header
/// without parsing the bytes again. The bytes are owned and mutable only through
/// [`stamp`](Self::stamp), which keeps the header and the bytes in step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedBatch {
    header: BatchHeader,
    bytes: BytesMut,
}

impl ValidatedBatch {
    /// Validates `bytes` (exactly one batch). Large frames own their buffer, so the batch is
    /// normally kept without a copy; a copy is the fallback when something else still shares it.
    pub fn new(bytes: Bytes) -> Result<Self, BatchError> {
        let header = validate(&bytes)?;
        let bytes = bytes.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
        Ok(ValidatedBatch { header, bytes })
    }

    /// As [`new`](Self::new), for a buffer already owned.
    pub fn from_mut(bytes: BytesMut) -> Result<Self, BatchError> {
        let header = validate(&bytes)?;
        Ok(ValidatedBatch { header, bytes })
    }

    /// The header, as of the last [`stamp`](Self::stamp).
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// Writes the base offset and leader epoch into the bytes and the header (both outside the
    /// CRC, so the batch stays valid).
    pub fn stamp(&mut self, base_offset: u64, leader_epoch: i32) {
        stamp(&mut self.bytes, base_offset, leader_epoch);
        self.header.base_offset = base_offset;
        self.header.leader_epoch = leader_epoch;
    }

    /// The batch's bytes, frozen without a copy.
    pub fn freeze(self) -> Bytes {
        self.bytes.freeze()
    }
}

impl std::ops::Deref for ValidatedBatch {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl AsRef<[u8]> for ValidatedBatch {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// One decoded record, with absolute offset and timestamp. Key, value and header values are
/// slices of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<(String, Bytes)>,
}

/// Iterates the records of one batch.
#[derive(Debug)]
pub struct RecordIter {
    body: Bytes,
    pos: usize,
    header: BatchHeader,
    index: u32,
}

impl RecordIter {
    /// `batch` is one whole batch, already validated or CRC-checked.
    pub fn new(batch: Bytes, header: BatchHeader) -> Self {
        let body =
            if batch.len() >= BATCH_HEADER_BYTES { batch.slice(BATCH_HEADER_BYTES..) } else { Bytes::new() };
        RecordIter { body, pos: 0, header, index: 0 }
    }

    fn next_record(&mut self) -> Result<Record, BatchError> {
        let (ts_delta, offset_delta, next) = decode_record_frame(&self.body, self.pos, self.index)?;
        // Re-walk the fields to slice them out (framing already checked above).
        let mut c = VarCursor { buf: &self.body, pos: self.pos };
        let _len = c.varint()?;
        let _attrs = c.byte()?;
        let _ts = c.varlong()?;
        let _od = c.varint()?;
        let key = c.nullable_bytes()?.map(|(s, e)| self.body.slice(s..e));
        let value = c.nullable_bytes()?.map(|(s, e)| self.body.slice(s..e)).unwrap_or_default();
        let n_headers = c.varint()?;
        let mut headers = Vec::new();
        for _ in 0..n_headers.max(0) {
            let (ks, ke) = c.nullable_bytes()?.unwrap_or((0, 0));
            let hkey = String::from_utf8_lossy(&self.body[ks..ke]).into_owned();
            let hval = c.nullable_bytes()?.map(|(s, e)| self.body.slice(s..e)).unwrap_or_default();
            headers.push((hkey, hval));
        }
        self.pos = next;
        self.index += 1;
        Ok(Record {
            offset: self.header.base_offset + offset_delta as u64,
            timestamp: self.header.base_timestamp.saturating_add(ts_delta),
            key,
            value,
            headers,
        })
    }
}

impl Iterator for RecordIter {
    type Item = Result<Record, BatchError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.header.records_count {
            return None;
        }
        let r = self.next_record();
        if r.is_err() {
            self.index = self.header.records_count; // stop after an error
        }
        Some(r)
    }
}

/// Walks every record of a batch body, checking its framing.
fn check_framing(body: &[u8], records_count: u32) -> Result<(), BatchError> {
    let mut pos = 0usize;
    for i in 0..records_count {
        let (_, _, next) = decode_record_frame(body, pos, i)?;
        pos = next;
    }
    if pos != body.len() {
        return Err(BatchError::Inconsistent(format!("{} bytes after the last record", body.len() - pos)));
    }
    Ok(())
}

/// Checks one record's framing at `pos`; returns (timestamp delta, offset delta, next pos).
fn decode_record_frame(body: &[u8], pos: usize, index: u32) -> Result<(i64, i32, usize), BatchError> {
    let mut c = VarCursor { buf: body, pos };
    let len = c.varint()?;
    if len < 0 || len as usize > body.len() - c.pos {
        return Err(BatchError::Inconsistent(format!("record {index} length {len} exceeds the batch")));
    }
    let end = c.pos + len as usize;
    let mut r = VarCursor { buf: &body[..end], pos: c.pos };
    let _attributes = r.byte()?;
    let ts_delta = r.varlong()?;
    let offset_delta = r.varint()?;
    if offset_delta as i64 != index as i64 {
        return Err(BatchError::Inconsistent(format!("record {index} has offset delta {offset_delta}")));
    }
    r.nullable_bytes()?;
    r.nullable_bytes()?;
    let n_headers = r.varint()?;
    if n_headers < 0 || n_headers as usize > MAX_HEADERS_PER_RECORD {
        return Err(BatchError::Inconsistent(format!("record {index} has {n_headers} headers")));
    }
    for _ in 0..n_headers {
        if r.nullable_bytes()?.is_none() {
            return Err(BatchError::Inconsistent(format!("record {index} has a null header key")));
        }
        r.nullable_bytes()?;
    }
    if r.pos != end {
        return Err(BatchError::Inconsistent(format!("record {index} has {} trailing bytes", end - r.pos)));
    }
    Ok((ts_delta, offset_delta, end))
}

struct VarCursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl VarCursor<'_> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b =
            *self.buf.get(self.pos).ok_or(DecodeError::Truncated { offset: self.pos, need: 1, have: 0 })?;
        self.pos += 1;
        Ok(b)
    }

    fn raw_varint(&mut self, max_bytes: u32) -> Result<u64, DecodeError> {
        let start = self.pos;
        let mut value = 0u64;
        for i in 0..max_bytes {
            let b = self.byte()?;
            value |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::invalid("varint", start, "too many bytes"))
    }

    fn varint(&mut self) -> Result<i32, DecodeError> {
        let start = self.pos;
        let raw = self.raw_varint(5)?;
        let raw = u32::try_from(raw).map_err(|_| DecodeError::invalid("varint", start, "overflows i32"))?;
        Ok(((raw >> 1) as i32) ^ -((raw & 1) as i32))
    }

    fn varlong(&mut self) -> Result<i64, DecodeError> {
        let raw = self.raw_varint(10)?;
        Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }

    /// A varint length (-1 = null) and that many bytes; returns their range.
    fn nullable_bytes(&mut self) -> Result<Option<(usize, usize)>, DecodeError> {
        let at = self.pos;
        let len = self.varint()?;
        if len < 0 {
            return if len == -1 {
                Ok(None)
            } else {
                Err(DecodeError::invalid("length", at, format!("{len}")))
            };
        }
        let len = len as usize;
        if len > self.buf.len() - self.pos {
            return Err(DecodeError::Truncated {
                offset: self.pos,
                need: len,
                have: self.buf.len() - self.pos,
            });
        }
        let range = (self.pos, self.pos + len);
        self.pos += len;
        Ok(Some(range))
    }
}

fn zigzag32(v: i32) -> u32 {
    ((v << 1) ^ (v >> 31)) as u32
}
fn zigzag64(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}
fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}
fn put_uvarint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}
fn nullable_len(b: Option<&[u8]>) -> usize {
    match b {
        None => 1,
        Some(b) => varint_len(zigzag32(b.len() as i32) as u64) + b.len(),
    }
}
fn put_nullable(buf: &mut BytesMut, b: Option<&[u8]>) {
    match b {
        None => put_uvarint(buf, zigzag32(-1) as u64),
        Some(b) => {
            put_uvarint(buf, zigzag32(b.len() as i32) as u64);
            buf.put_slice(b);
        }
    }
}

/// Identity fields for idempotent producers; all -1 when unused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerIdentity {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

impl Default for ProducerIdentity {
    fn default() -> Self {
        ProducerIdentity { producer_id: -1, producer_epoch: -1, base_sequence: -1 }
    }
}

/// Builds one uncompressed v2 batch. The base offset is written as 0; the broker stamps it.
#[derive(Debug)]
pub struct BatchBuilder {
    buf: BytesMut,
    base_timestamp: i64,
    max_timestamp: i64,
    count: u32,
    identity: ProducerIdentity,
    attributes: i16,
}

impl BatchBuilder {
    pub fn new(capacity: usize) -> Self {
        let mut buf = BytesMut::with_capacity(capacity.max(BATCH_HEADER_BYTES));
        buf.resize(BATCH_HEADER_BYTES, 0);
        BatchBuilder {
            buf,
            base_timestamp: 0,
            max_timestamp: 0,
            count: 0,
            identity: ProducerIdentity::default(),
            attributes: 0,
        }
    }

    /// Makes the batch a control batch ([`CONTROL_ATTRIBUTE`]): what the broker writes for
    /// Raft's own entries. Producers never send one.
    pub fn control(mut self) -> Self {
        self.attributes |= CONTROL_ATTRIBUTE;
        self
    }

    pub fn with_identity(mut self, identity: ProducerIdentity) -> Self {
        self.identity = identity;
        self
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// Bytes the finished batch will take so far.
    pub fn size_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Size a record would add, so callers can keep batches under a byte limit.
    pub fn record_size(key: Option<&[u8]>, value: &[u8], headers: &[(&str, &[u8])]) -> usize {
        let body = Self::record_body_len(0, 0, key, value, headers) + 20; // deltas at most ~20 bytes
        body + varint_len(body as u64 * 2)
    }

    fn record_body_len(
        ts: i64,
        od: i32,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> usize {
        let mut n = 1
            + varint_len(zigzag64(ts))
            + varint_len(zigzag32(od) as u64)
            + nullable_len(key)
            + nullable_len(Some(value))
            + varint_len(zigzag32(headers.len() as i32) as u64);
        for (k, v) in headers {
            n += nullable_len(Some(k.as_bytes())) + nullable_len(Some(v));
        }
        n
    }

    /// Appends a record with a create-time timestamp in ms.
    pub fn push(&mut self, timestamp_ms: i64, key: Option<&[u8]>, value: &[u8], headers: &[(&str, &[u8])]) {
        if self.count == 0 {
            self.base_timestamp = timestamp_ms;
            self.max_timestamp = timestamp_ms;
        }
        self.max_timestamp = self.max_timestamp.max(timestamp_ms);
        let ts_delta = timestamp_ms.saturating_sub(self.base_timestamp);
        let od = self.count as i32;
        let body_len = Self::record_body_len(ts_delta, od, key, value, headers);
        let buf = &mut self.buf;
        put_uvarint(buf, zigzag32(body_len as i32) as u64);
        buf.put_u8(0);
        put_uvarint(buf, zigzag64(ts_delta));
        put_uvarint(buf, zigzag32(od) as u64);
        put_nullable(buf, key);
        put_nullable(buf, Some(value));
        put_uvarint(buf, zigzag32(headers.len() as i32) as u64);
        for (k, v) in headers {
            put_nullable(buf, Some(k.as_bytes()));
            put_nullable(buf, Some(v));
        }
        self.count += 1;
    }

    /// Writes the header and CRC.
    ///
    /// # Panics
    /// If no record was pushed: an empty batch (`last_offset_delta` -1) is a caller bug, and
    /// every caller checks `is_empty` first.
    pub fn finish(mut self) -> Bytes {
        assert!(self.count > 0, "BatchBuilder::finish on an empty batch");
        let len = self.buf.len();
        let h = &mut self.buf[..BATCH_HEADER_BYTES];
        h[0..8].copy_from_slice(&0i64.to_be_bytes());
        h[8..12].copy_from_slice(&((len - BATCH_LOG_OVERHEAD) as i32).to_be_bytes());
        h[12..16].copy_from_slice(&0i32.to_be_bytes());
        h[16] = MAGIC as u8;
        h[21..23].copy_from_slice(&self.attributes.to_be_bytes());
        h[23..27].copy_from_slice(&(self.count as i32 - 1).to_be_bytes());
        h[27..35].copy_from_slice(&self.base_timestamp.to_be_bytes());
        h[35..43].copy_from_slice(&self.max_timestamp.to_be_bytes());
        h[43..51].copy_from_slice(&self.identity.producer_id.to_be_bytes());
        h[51..53].copy_from_slice(&self.identity.producer_epoch.to_be_bytes());
        h[53..57].copy_from_slice(&self.identity.base_sequence.to_be_bytes());
        h[57..61].copy_from_slice(&(self.count as i32).to_be_bytes());
        let crc = crc32c::crc32c(&self.buf[CRC_START..]);
        self.buf[17..21].copy_from_slice(&crc.to_be_bytes());
        self.buf.freeze()
    }
}

/// One batch found by [`Batches`]: its header, where it starts in the buffer, and its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSpan<'a> {
    pub header: BatchHeader,
    /// Where the batch starts in the buffer walked.
    pub position: usize,
    /// The whole batch, header included (`header.total_len()` bytes).
    pub bytes: &'a [u8],
}

impl BatchSpan<'_> {
    /// The batch's bytes as a range of the buffer walked.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.position..self.position + self.bytes.len()
    }
}

/// Why [`Batches`] stopped early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// The buffer ends inside a batch (its header or its body). A read span may end so; a
    /// delivery must not.
    #[error("batch at byte {position} is cut off: it needs {need} bytes, {have} are left")]
    Truncated { position: usize, need: usize, have: usize },
    /// The bytes at `position` are not a batch: a bad header, or a bad CRC when checked.
    #[error("batch at byte {position}: {error}")]
    Invalid { position: usize, error: BatchError },
}

impl From<WalkError> for BatchError {
    fn from(e: WalkError) -> Self {
        match e {
            WalkError::Truncated { need, have, .. } => {
                BatchError::Decode(DecodeError::Truncated { offset: 0, need, have })
            }
            WalkError::Invalid { error, .. } => error,
        }
    }
}

/// Walks a buffer of back-to-back batches (a segment read, a `Deliver` or `FetchOk` payload),
/// yielding each whole batch with its parsed header. Every length is checked before use: the
/// header's against `MAX_BATCH_BYTES` (by [`BatchHeader::parse`]), then against the bytes left.
/// CRCs are checked only when asked ([`checking_crc`](Self::checking_crc)). After an error the
/// walk ends; [`position`](Self::position) is where the unwalked bytes start.
#[derive(Debug, Clone)]
pub struct Batches<'a> {
    buf: &'a [u8],
    pos: usize,
    check_crc: bool,
    done: bool,
}

impl<'a> Batches<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Batches { buf, pos: 0, check_crc: false, done: false }
    }

    /// Also verifies each batch's CRC before yielding it.
    pub fn checking_crc(mut self) -> Self {
        self.check_crc = true;
        self
    }

    /// Bytes walked so far: the end of the last batch yielded.
    pub fn position(&self) -> usize {
        self.pos
    }
}

impl<'a> Iterator for Batches<'a> {
    type Item = Result<BatchSpan<'a>, WalkError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.buf[self.pos.min(self.buf.len())..];
        if self.done || rest.is_empty() {
            return None;
        }
        let position = self.pos;
        let truncated = |need| WalkError::Truncated { position, need, have: rest.len() };
        let result = if rest.len() < BATCH_HEADER_BYTES {
            Err(truncated(BATCH_HEADER_BYTES))
        } else {
            match BatchHeader::parse(rest) {
                Err(error) => Err(WalkError::Invalid { position, error }),
                Ok(header) if header.total_len() > rest.len() => Err(truncated(header.total_len())),
                Ok(header) => {
                    let bytes = &rest[..header.total_len()];
                    match self.check_crc.then(|| verify_crc(bytes, &header)) {
                        Some(Err(error)) => Err(WalkError::Invalid { position, error }),
                        _ => Ok(BatchSpan { header, position, bytes }),
                    }
                }
            }
        };
        match &result {
            Ok(span) => self.pos += span.bytes.len(),
            Err(_) => self.done = true,
        }
        Some(result)
    }
}

impl std::iter::FusedIterator for Batches<'_> {}

/// Splits a buffer of back-to-back batches (as in `Deliver`/`FetchOk` or a segment file) into
/// whole batches, verifying each CRC: [`Batches`] over an owned buffer, yielding zero-copy
/// slices of it. A trailing partial batch is an error.
#[derive(Debug)]
pub struct BatchSplitter {
    buf: Bytes,
    pos: usize,
    done: bool,
}

impl BatchSplitter {
    pub fn new(buf: Bytes) -> Self {
        BatchSplitter { buf, pos: 0, done: false }
    }
}

impl Iterator for BatchSplitter {
    type Item = Result<(BatchHeader, Bytes), BatchError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let rest = self.buf.get(self.pos..)?;
        let item = Batches::new(rest).checking_crc().next()?;
        Some(match item {
            Ok(span) => {
                let range = span.range();
                let batch = self.buf.slice(self.pos + range.start..self.pos + range.end);
                self.pos += range.end;
                Ok((span.header, batch))
            }
            Err(e) => {
                self.done = true;
                Err(e.into())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    #[should_panic(expected = "empty batch")]
    fn finishing_an_empty_batch_is_a_bug() {
        BatchBuilder::new(64).finish();
    }

    /// (timestamp, key, value, headers)
    type TestRecord = (i64, Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>);

    fn build(records: &[TestRecord]) -> Bytes {
        let mut b = BatchBuilder::new(1024);
        for (ts, k, v, h) in records {
            let hs: Vec<(&str, &[u8])> = h.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
            b.push(*ts, k.as_deref(), v, &hs);
        }
        b.finish()
    }

    #[test]
    fn header_is_61_bytes_and_crc_survives_stamping() {
        let batch = build(&[(1000, Some(b"k".to_vec()), b"v".to_vec(), vec![])]);
        let mut m = BytesMut::from(&batch[..]);
        stamp(&mut m, 42, 7);
        let h = validate(&m).expect("valid");
        assert_eq!(h.base_offset, 42);
        assert_eq!(h.leader_epoch, 7);
        assert_eq!(h.records_count, 1);
    }

    #[test]
    fn a_control_batch_sets_bit_5_and_validates() {
        let mut b = BatchBuilder::new(64).control();
        b.push(-1, Some(&[0, 0, 0, 2]), b"", &[]);
        let batch = b.finish();
        let v = ValidatedBatch::new(batch).expect("a control batch is a valid batch");
        assert!(v.header().is_control());
        assert_eq!(v.header().attributes, CONTROL_ATTRIBUTE);
        assert_eq!(v.header().compression(), 0);
        assert!(!validate(&build(&[(1, None, b"v".to_vec(), vec![])])).expect("valid").is_control());
    }

    #[test]
    fn a_validated_batch_is_checked_once_and_stamps_header_and_bytes_together() {
        let batch =
            build(&[(1000, Some(b"k".to_vec()), b"v".to_vec(), vec![]), (1001, None, b"w".to_vec(), vec![])]);
        let mut v = ValidatedBatch::new(batch.clone()).expect("valid");
        assert_eq!(v.header(), &validate(&batch).expect("valid"));
        v.stamp(42, 7);
        assert_eq!((v.header().base_offset, v.header().leader_epoch), (42, 7));
        assert_eq!(v.header().last_offset(), 43);
        assert_eq!(&validate(&v).expect("still valid"), v.header());
        assert_eq!(v.clone().freeze().len(), batch.len());

        // Everything `validate` refuses, the constructors refuse.
        let mut flipped = batch.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(ValidatedBatch::new(Bytes::from(flipped)), Err(BatchError::CrcMismatch { .. })));
        let mut two = BytesMut::from(&batch[..]);
        two.extend_from_slice(&batch);
        assert!(matches!(ValidatedBatch::from_mut(two), Err(BatchError::Inconsistent(_))));
        assert!(ValidatedBatch::new(Bytes::from_static(&[0; 10])).is_err());
    }

    /// The one batch walk: whole batches in order, a cut-off tail and a bad header or CRC as
    /// typed errors with their position, nothing after an error.
    #[test]
    fn batches_walks_whole_batches_and_stops_at_the_first_bad_one() {
        let a = build(&[(1, None, b"a".to_vec(), vec![])]);
        let b = build(&[(2, None, b"bb".to_vec(), vec![]), (3, None, b"c".to_vec(), vec![])]);
        let mut buf = a.to_vec();
        buf.extend_from_slice(&b);
        let spans: Vec<_> = Batches::new(&buf).collect::<Result<_, _>>().expect("whole batches");
        assert_eq!(spans.len(), 2);
        assert_eq!((spans[0].range(), spans[1].range()), (0..a.len(), a.len()..buf.len()));
        assert_eq!(spans[1].header.records_count, 2);
        assert_eq!(spans[1].bytes, &b[..]);

        // A tail cut inside the header, then inside the body.
        for cut in [a.len() + 10, buf.len() - 1] {
            let mut walk = Batches::new(&buf[..cut]);
            assert!(walk.next().is_some_and(|r| r.is_ok()));
            let err = walk.next().and_then(Result::err);
            assert!(
                matches!(err, Some(WalkError::Truncated { position, have, .. }) if position == a.len() && have == cut - a.len()),
                "{err:?}"
            );
            assert_eq!((walk.next(), walk.position()), (None, a.len()));
        }

        // A bad CRC only counts when checked; a bad header always does.
        let mut damaged = buf.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert_eq!(Batches::new(&damaged).filter(Result::is_ok).count(), 2);
        let mut walk = Batches::new(&damaged).checking_crc();
        assert!(walk.next().is_some_and(|r| r.is_ok()));
        assert!(matches!(
            walk.next(),
            Some(Err(WalkError::Invalid { error: BatchError::CrcMismatch { .. }, .. }))
        ));
        damaged[a.len() + 16] = 9; // magic
        let mut walk = Batches::new(&damaged);
        walk.next();
        assert!(
            matches!(walk.next(), Some(Err(WalkError::Invalid { error: BatchError::BadMagic(9), position })) if position == a.len())
        );
        assert!(walk.next().is_none());
    }

    #[test]
    fn flipped_byte_fails_crc() {
        let batch = build(&[(1, None, b"hello".to_vec(), vec![])]);
        let mut m = batch.to_vec();
        let last = m.len() - 1;
        m[last] ^= 1;
        assert!(matches!(validate(&m), Err(BatchError::CrcMismatch { .. })));
    }

    /// (timestamp, key, value, headers) records for the fuzz properties.
    fn arb_records() -> impl Strategy<Value = Vec<TestRecord>> {
        proptest::collection::vec(
            (
                any::<i64>(),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..12)),
                proptest::collection::vec(any::<u8>(), 0..40),
                proptest::collection::vec((".{0,6}", proptest::collection::vec(any::<u8>(), 0..6)), 0..3),
            ),
            1..6,
        )
    }

    /// Rewrites a batch's CRC to match its bytes, as a hostile producer would.
    fn recrc(batch: &mut [u8]) {
        if batch.len() >= BATCH_HEADER_BYTES {
            let crc = crc32c::crc32c(&batch[CRC_START..]);
            batch[17..21].copy_from_slice(&crc.to_be_bytes());
        }
    }

    /// Every decoder of batch bytes over `data`, results dropped: none may panic.
    fn decode_everything(data: &[u8]) {
        let _ = validate(data);
        if let Ok(h) = BatchHeader::parse(data) {
            if h.total_len() <= data.len() && verify_crc(&data[..h.total_len()], &h).is_ok() {
                // What a reader does after a CRC check alone: walk the records.
                for r in RecordIter::new(Bytes::copy_from_slice(&data[..h.total_len()]), h) {
                    let _ = r;
                }
            }
        }
        for item in BatchSplitter::new(Bytes::copy_from_slice(data)) {
            let _ = item;
        }
        let mut walk = Batches::new(data).checking_crc();
        for span in walk.by_ref().flatten() {
            assert!(span.range().end <= data.len());
        }
        assert!(walk.position() <= data.len());
    }

    proptest! {
        #![proptest_config(crate::fuzz::config(512))]

        #[test]
        fn round_trip(records in proptest::collection::vec(
            (0i64..1_000_000, proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
             proptest::collection::vec(any::<u8>(), 0..200),
             proptest::collection::vec(("[a-z]{0,8}", proptest::collection::vec(any::<u8>(), 0..8)), 0..3)),
            1..20)) {
            let batch = build(&records);
            let h = validate(&batch).expect("valid");
            prop_assert_eq!(h.records_count as usize, records.len());
            let decoded: Vec<Record> = RecordIter::new(batch, h).collect::<Result<_, _>>().expect("records");
            for (i, (r, (ts, k, v, hs))) in decoded.iter().zip(records.iter()).enumerate() {
                prop_assert_eq!(r.offset, i as u64);
                prop_assert_eq!(r.timestamp, *ts);
                prop_assert_eq!(r.key.as_deref(), k.as_deref());
                prop_assert_eq!(&r.value[..], &v[..]);
                prop_assert_eq!(r.headers.len(), hs.len());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = validate(&data);
            for item in BatchSplitter::new(Bytes::from(data.clone())) { let _ = item; }
            let mut walk = Batches::new(&data).checking_crc();
            for item in walk.by_ref() { let _ = item; }
            prop_assert!(walk.position() <= data.len());
        }

        #[test]
        fn corrupted_valid_batch_never_panics(idx in 0usize..400, byte in any::<u8>()) {
            let batch = build(&[(5, Some(b"key".to_vec()), vec![7; 100], vec![("h".into(), b"x".to_vec())]), (9, None, vec![1; 50], vec![])]);
            let mut m = batch.to_vec();
            let i = idx % m.len();
            m[i] = byte;
            if let Ok(h) = validate(&m) {
                for r in RecordIter::new(Bytes::from(m), h) { let _ = r; }
            }
        }

        /// Back-to-back valid batches, mutated anywhere (length and count fields set to their
        /// worst values, cut, extended, spliced), with or without the CRCs made to match
        /// again: every decoder answers without panicking; what `validate` accepts decodes
        /// into exactly its records.
        #[test]
        fn mutated_batches_never_panic(
            batches in proptest::collection::vec(arb_records(), 1..3),
            muts in crate::fuzz::mutations(),
            fix_crc in any::<bool>(),
        ) {
            let mut buf = Vec::new();
            for records in &batches {
                buf.extend_from_slice(&build(records));
            }
            let mut m = crate::fuzz::apply(&buf, &muts);
            if fix_crc {
                recrc(&mut m);
            }
            decode_everything(&m);
            if let Ok(h) = validate(&m) {
                let n = RecordIter::new(Bytes::from(m.clone()), h).filter(Result::is_ok).count();
                prop_assert_eq!(n, h.records_count as usize);
            }
        }

        #[test]
        fn arbitrary_bytes_behind_a_valid_crc_never_panic(
            header in proptest::collection::vec(any::<u8>(), BATCH_HEADER_BYTES..=BATCH_HEADER_BYTES),
            body in proptest::collection::vec(any::<u8>(), 0..300),
            count in 1i32..20,
        ) {
            // A header that passes `parse`, a garbage body, a matching CRC: only the record
            // framing stands between the bytes and the record decoder.
            let mut m = header;
            m.extend_from_slice(&body);
            let len = (m.len() - BATCH_LOG_OVERHEAD) as i32;
            m[0..8].copy_from_slice(&0i64.to_be_bytes());
            m[8..12].copy_from_slice(&len.to_be_bytes());
            m[16] = MAGIC as u8;
            m[23..27].copy_from_slice(&(count - 1).to_be_bytes());
            m[57..61].copy_from_slice(&count.to_be_bytes());
            recrc(&mut m);
            decode_everything(&m);
        }

        /// The CRC catches corruption: any burst of up to 32 bits changed in the CRC-covered
        /// part (or in the CRC itself) of a valid batch is refused (CRC32C detects every burst
        /// that short), and so is any change to the length or magic.
        #[test]
        fn crc_catches_every_short_burst(
            records in arb_records(),
            at in any::<prop::sample::Index>(),
            burst in proptest::collection::vec(any::<u8>(), 1..=4),
        ) {
            let batch = build(&records);
            // Covered: the length (8..12) and everything from the magic on; the base offset and
            // leader epoch (0..8, 12..16) sit outside the CRC by design (the broker stamps them).
            let pick = at.index(batch.len() - 12);
            let start = if pick < 4 { 8 + pick } else { 12 + pick };
            let end = (start + burst.len()).min(batch.len());
            let mut m = batch.to_vec();
            for (b, x) in m[start..end].iter_mut().zip(&burst) {
                *b ^= x | 1; // never a no-op: the low bit always flips
            }
            prop_assert!(validate(&m).is_err(), "change at {}..{} accepted", start, end);
            prop_assert!(BatchSplitter::new(Bytes::from(m)).any(|r| r.is_err()));
        }
    }
}
