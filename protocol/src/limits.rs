//! Named limits. Every length read from the wire or from disk is compared with one of these
//! before anything is allocated (docs/design.md §2).

/// Largest frame body (version + kind + payload) accepted on a stream.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Largest record batch, header included.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Most records in one batch.
pub const MAX_RECORDS_PER_BATCH: usize = 1_000_000;
/// Most headers on one record.
pub const MAX_HEADERS_PER_RECORD: usize = 1024;
/// Longest topic name, as in Kafka.
pub const MAX_TOPIC_NAME_BYTES: usize = 249;
/// Most partitions in one topic.
pub const MAX_PARTITIONS: u32 = 4096;
/// Smallest `segment_bytes` a topic may set.
pub const MIN_SEGMENT_BYTES: u64 = 4096;
/// Largest `segment_bytes` a topic may set: index entries hold u32 positions, and this leaves
/// room for the one batch that may start just below the limit.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 31;
/// Longest string field other than a topic or group name (the u16 length prefix's maximum).
pub const MAX_STRING_BYTES: usize = u16::MAX as usize;
/// Longest consumer group name.
pub const MAX_GROUP_NAME_BYTES: usize = 255;
/// Most members in one consumer group (Kafka's `group.max.size` plays this part).
pub const MAX_MEMBERS_PER_GROUP: usize = 1_000;
/// Most group members one connection speaks for.
pub const MAX_MEMBERS_PER_CONNECTION: usize = 1_000;
/// Most consumer groups a broker knows (with members or committed offsets); a new group name
/// in `JoinGroup`, `Subscribe` or `CommitOffset` beyond it is refused.
pub const MAX_GROUPS: usize = 10_000;
/// Most producer ids one connection may obtain with `InitProducer` within a minute.
pub const MAX_PRODUCER_IDS_PER_CONNECTION: u32 = 1_024;
/// Most items in any list on the wire.
pub const MAX_LIST_ITEMS: usize = 65_536;
/// Frame header on the wire: u32 length, u8 version, u8 kind.
pub const FRAME_HEADER_BYTES: usize = 6;
/// The only frame version this code speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// ALPN protocol id for QUIC connections.
pub const ALPN: &[u8] = b"quiver/1";
