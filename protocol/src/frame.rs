//! Frame boundaries on a stream (docs/design.md §4.1): `u32 body_length` (little-endian), then
//! `u8 version`, `u8 kind` and the payload. Sans-IO: feed bytes in, take frames out.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::limits::{FRAME_HEADER_BYTES, MAX_FRAME_BYTES, PROTOCOL_VERSION};

/// A frame whose boundary is known, payload not yet decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub kind: u8,
    pub payload: Bytes,
}

/// The stream cannot be resynchronised after one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame length {0} is over the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge(u64),
    #[error("frame length {0} is shorter than the 2-byte version and kind")]
    TooShort(u32),
    #[error("frame version {0} is not supported (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
}

/// Takes the next whole frame off the front of `buf`, or returns `Ok(None)` if more bytes are
/// needed. The length is checked before the caller needs to buffer the body, so `reserve_hint`
/// (how many bytes to expect) is bounded by `MAX_FRAME_BYTES`.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<RawFrame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    check_length(len)?;
    if buf.len() >= 5 && buf[4] != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion(buf[4]));
    }
    let total = 4 + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(4);
    let _version = frame.get_u8();
    let kind = frame.get_u8();
    Ok(Some(RawFrame { kind, payload: frame.freeze() }))
}

fn check_length(len: u32) -> Result<(), FrameError> {
    if len as usize > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len as u64));
    }
    if (len as usize) < FRAME_HEADER_BYTES - 4 {
        return Err(FrameError::TooShort(len));
    }
    Ok(())
}

/// Writes a frame header for a payload of `payload_len` bytes.
pub fn put_header(buf: &mut impl BufMut, kind: u8, payload_len: usize) {
    buf.put_u32_le((payload_len + 2) as u32);
    buf.put_u8(PROTOCOL_VERSION);
    buf.put_u8(kind);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn oversized_length_is_rejected_before_buffering() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(decode_frame(&mut buf), Err(FrameError::TooLarge(u32::MAX as u64)));
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn partial_then_whole() {
        let mut out = BytesMut::new();
        put_header(&mut out, 9, 3);
        out.put_slice(b"abc");
        let mut buf = BytesMut::from(&out[..5]);
        assert_eq!(decode_frame(&mut buf), Ok(None));
        buf.extend_from_slice(&out[5..]);
        let f = decode_frame(&mut buf).expect("ok").expect("frame");
        assert_eq!(f.kind, 9);
        assert_eq!(&f.payload[..], b"abc");
        assert!(buf.is_empty());
    }

    /// Every frame `decode_frame` yields from `data` fed in chunks of the given sizes, and
    /// whether it failed.
    fn frames_of(data: &[u8], chunks: &[usize]) -> (Vec<RawFrame>, bool) {
        let mut buf = BytesMut::new();
        let (mut out, mut fed) = (Vec::new(), 0);
        let mut sizes = chunks.iter().cycle();
        while fed < data.len() {
            let n = sizes.next().copied().unwrap_or(1).clamp(1, data.len() - fed);
            buf.extend_from_slice(&data[fed..fed + n]);
            fed += n;
            loop {
                match decode_frame(&mut buf) {
                    Ok(Some(f)) => out.push(f),
                    Ok(None) => break,
                    Err(_) => return (out, true),
                }
                // Reserving room for a frame never goes past its checked length.
                assert!(buf.capacity() <= 4 + MAX_FRAME_BYTES + data.len());
            }
        }
        (out, false)
    }

    proptest! {
        #![proptest_config(crate::fuzz::config(1024))]

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode_frame(&mut buf) {}
        }

        /// Valid frames, mutated (lengths set to their worst values, bytes changed, cut,
        /// extended): the same frames and the same failure whether the bytes arrive at once or
        /// in arbitrary chunks, so a frame boundary never depends on how the stream was read.
        #[test]
        fn chunking_never_changes_the_frames(
            payloads in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40)), 1..5),
            muts in proptest::collection::vec(crate::fuzz::mutation(), 0..4),
            chunks in proptest::collection::vec(1usize..50, 1..8),
        ) {
            let mut data = BytesMut::new();
            for (kind, p) in &payloads {
                put_header(&mut data, *kind, p.len());
                data.put_slice(p);
            }
            let data = crate::fuzz::apply(&data, &muts);
            let whole = frames_of(&data, &[data.len().max(1)]);
            let chunked = frames_of(&data, &chunks);
            prop_assert_eq!(&whole, &chunked);
            if muts.is_empty() {
                prop_assert_eq!(whole.0.len(), payloads.len());
                prop_assert!(!whole.1);
            }
        }
    }
}
