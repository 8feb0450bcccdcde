//! The Quiver broker: partition logs on disk, the QUIC endpoint and its sessions.

pub mod log;
pub mod storage;
