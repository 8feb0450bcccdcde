//! Bounds-checked readers and writers for our little-endian wire fields.
//!
//! `Reader` never panics and never allocates from a length it has not checked against both a
//! named limit and the bytes that remain.

use bytes::{BufMut, Bytes, BytesMut};

/// Why a sequence of bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended before a field did.
    #[error("truncated at byte {offset}: need {need} bytes, have {have}")]
    Truncated { offset: usize, need: usize, have: usize },
    /// A length or count field exceeds its limit.
    #[error("{field} at byte {offset} is {value}, over the limit of {limit}")]
    TooLarge { field: &'static str, offset: usize, value: u64, limit: u64 },
    /// A field holds a value that is not allowed.
    #[error("invalid {field} at byte {offset}: {reason}")]
    Invalid { field: &'static str, offset: usize, reason: String },
    /// Bytes were left over after the last field.
    #[error("{extra} unexpected trailing bytes")]
    Trailing { extra: usize },
}

impl DecodeError {
    pub(crate) fn invalid(field: &'static str, offset: usize, reason: impl Into<String>) -> Self {
        DecodeError::Invalid { field, offset, reason: reason.into() }
    }
}

/// A cursor over a `Bytes` that hands out zero-copy slices.
#[derive(Debug, Clone)]
pub struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated { offset: self.pos, need: n, have: self.remaining() });
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.need(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        let at = self.pos;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::invalid("bool", at, format!("{v} is neither 0 nor 1"))),
        }
    }

    /// `n` bytes as a zero-copy slice.
    pub fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }

    /// u32 length + bytes, the length checked against `limit`.
    pub fn bytes(&mut self, field: &'static str, limit: usize) -> Result<Bytes, DecodeError> {
        let at = self.pos;
        let len = self.u32()? as usize;
        check_limit(field, at, len, limit)?;
        self.take(len)
    }

    /// u16 length + UTF-8, the length checked against `limit`.
    pub fn string(&mut self, field: &'static str, limit: usize) -> Result<String, DecodeError> {
        let at = self.pos;
        let len = self.u16()? as usize;
        check_limit(field, at, len, limit)?;
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::invalid(field, at, "not UTF-8"))
    }

    pub fn option<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        if self.bool()? {
            Ok(Some(f(self)?))
        } else {
            Ok(None)
        }
    }

    /// u32 count + items. `min_item_bytes` lets the count be checked against what remains
    /// before the vector is sized.
    pub fn list<T>(
        &mut self,
        field: &'static str,
        min_item_bytes: usize,
        mut f: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let at = self.pos;
        let count = self.u32()? as usize;
        check_limit(field, at, count, crate::limits::MAX_LIST_ITEMS)?;
        self.need(count.saturating_mul(min_item_bytes.max(1)))?;
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(f(self)?);
        }
        Ok(out)
    }

    /// Fails if anything is left.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing { extra }),
        }
    }
}

pub(crate) fn check_limit(
    field: &'static str,
    offset: usize,
    value: usize,
    limit: usize,
) -> Result<(), DecodeError> {
    if value > limit {
        return Err(DecodeError::TooLarge { field, offset, value: value as u64, limit: limit as u64 });
    }
    Ok(())
}

/// Writers matching `Reader`. Keeping fields within their limits is the encoder's job
/// (`Message::encode` validates names before and truncates free text); the writers below only
/// guarantee that a length prefix always matches the bytes after it.
pub trait WriteExt: BufMut {
    /// A u16 length and the UTF-8 bytes. A string longer than `u16::MAX` bytes is cut at the
    /// last character boundary within it, so the frame stays well formed.
    fn put_string(&mut self, s: &str) {
        let mut len = s.len().min(u16::MAX as usize);
        while !s.is_char_boundary(len) {
            len -= 1;
        }
        self.put_u16_le(len as u16);
        self.put_slice(&s.as_bytes()[..len]);
    }
    fn put_bytes_field(&mut self, b: &[u8]) {
        self.put_u32_le(b.len() as u32);
        self.put_slice(b);
    }
    fn put_bool(&mut self, v: bool) {
        self.put_u8(v as u8);
    }
}

impl WriteExt for BytesMut {}
impl WriteExt for Vec<u8> {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A string past the u16 length prefix is cut at a character boundary, never written with
    /// a wrapped length that would misframe everything after it.
    #[test]
    fn an_overlong_string_is_cut_at_a_character_boundary() {
        let long = "é".repeat(40_000); // 80,000 bytes
        let mut buf = BytesMut::new();
        buf.put_string(&long);
        buf.put_u8(7);
        let mut r = Reader::new(buf.freeze());
        let s = r.string("text", u16::MAX as usize).expect("decodes");
        assert_eq!(s.len(), 65_534);
        assert!(long.starts_with(&s));
        assert_eq!(r.u8().expect("the next field is intact"), 7);
    }
}
