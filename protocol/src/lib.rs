//! Quiver's sans-IO protocol core: limits, codecs, Kafka-v2 record batches, wire frames,
//! requests and responses, and stable error codes. No IO, no clock, no async runtime.
//! Formats are specified byte by byte in `docs/design.md`.

pub mod batch;
pub mod codec;
pub mod limits;

pub use batch::{BatchBuilder, BatchError, BatchHeader, BatchSplitter, Record, RecordIter};
pub use codec::DecodeError;
