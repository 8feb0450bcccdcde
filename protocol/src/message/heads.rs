//! The heads of `Deliver` and `DeliverSome` frames, which the broker writes before batches it
//! sends as separate buffers (zero-copy from its tail cache).

use bytes::{BufMut, Bytes, BytesMut};

use super::{kind, DeliveryRange};
use crate::frame::put_header;

pub(super) fn put_deliver_some(
    b: &mut BytesMut,
    high_watermark: u64,
    ranges: &[DeliveryRange],
    batches_len: usize,
) {
    b.put_u64_le(high_watermark);
    b.put_u32_le(ranges.len() as u32);
    for r in ranges {
        b.put_u64_le(r.start);
        b.put_u64_le(r.end);
        b.put_u32_le(r.delivery_count);
    }
    b.put_u32_le(batches_len as u32);
}

/// The head of a `DeliverSome` frame whose batches follow as separate buffers.
pub fn deliver_some_head(high_watermark: u64, ranges: &[DeliveryRange], batches_len: usize) -> Bytes {
    let mut body = BytesMut::with_capacity(16 + 20 * ranges.len());
    put_deliver_some(&mut body, high_watermark, ranges, batches_len);
    let mut head = BytesMut::with_capacity(6 + body.len());
    put_header(&mut head, kind::DELIVER_SOME, body.len() + batches_len);
    head.put_slice(&body);
    head.freeze()
}

/// The head of a `Deliver` frame whose batches (`batches_len` bytes in all) follow as separate
/// buffers, so a delivery assembled from several cached batches is sent without a copy.
pub fn deliver_head(high_watermark: u64, batches_len: usize) -> Bytes {
    let mut head = BytesMut::with_capacity(18);
    put_header(&mut head, kind::DELIVER, 12 + batches_len);
    head.put_u64_le(high_watermark);
    head.put_u32_le(batches_len as u32);
    head.freeze()
}
