//! Quiver's sans-IO protocol core: limits, codecs, Kafka-v2 record batches, wire frames,
//! requests and responses, and stable error codes. No IO, no clock, no async runtime.
//! Formats are specified byte by byte in `docs/design.md`.

pub mod batch;
pub mod codec;
pub mod delivery;
pub mod error;
pub mod frame;
#[cfg(test)]
pub(crate) mod fuzz;
pub mod group;
pub mod ledger;
pub mod limits;
pub mod message;
pub mod raft;

pub use batch::{
    BatchBuilder, BatchError, BatchHeader, BatchSpan, BatchSplitter, Batches, Record, RecordIter,
    ValidatedBatch, WalkError,
};
pub use codec::DecodeError;
pub use error::ErrorCode;
pub use frame::{decode_frame, FrameError, RawFrame};
pub use message::{
    Acks, Durability, Encoded, MemberInfo, MemberRef, Message, MessageError, PartitionInfo, PartitionOffsets,
    RedeliveryPolicy, StartPosition, Subscribe, TopicConfig, TopicInfo,
};
