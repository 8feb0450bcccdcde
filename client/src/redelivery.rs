//! Redelivery and dead letters are run by the broker (design.md §12); these are the header
//! names it puts on dead-lettered records.

pub use quiver_protocol::ledger::{DELIVERY_COUNT, ORIGIN_OFFSET, ORIGIN_PARTITION, ORIGIN_TOPIC};
