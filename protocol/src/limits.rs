//! Every bound in Quiver, in one place, each with its reason. Every length read from the wire
//! or from disk is compared with one of these before anything is allocated, and every queue,
//! window and table that input can grow has one (docs/design.md §2).

use std::time::Duration;

// ---- Frames and messages on the wire --------------------------------------------------------

/// Largest frame body (version + kind + payload) accepted on a stream: room for one maximal
/// batch with its request around it, and the size each frame buffer is checked against before
/// it is allocated.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Frame header on the wire: u32 length, u8 version, u8 kind.
pub const FRAME_HEADER_BYTES: usize = 6;
/// Frames up to this size skip the frame reader's memory budgets: acks, hellos and subscribes
/// must never queue behind large produce frames, and their memory is bounded by the stream
/// limits anyway.
pub const UNBUDGETED_FRAME_BYTES: u32 = 64 * 1024;
/// The only frame version this code speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// ALPN protocol id for QUIC connections.
pub const ALPN: &[u8] = b"quiver/1";
/// ALPN protocol id of broker-to-broker connections (same UDP port as clients). Offered by a
/// broker only when a peer CA is configured; a connection that negotiates it must present a
/// certificate signed by that CA, or the broker closes it (docs/replication.md, "Broker-to-broker
/// TLS").
pub const PEER_ALPN: &[u8] = b"quiver-peer/1";
/// Longest string field other than a topic or group name (the u16 length prefix's maximum).
pub const MAX_STRING_BYTES: usize = u16::MAX as usize;
/// Most items in any list on the wire, so a decoded count cannot ask for unbounded memory.
pub const MAX_LIST_ITEMS: usize = 65_536;

// ---- Record batches -------------------------------------------------------------------------

/// Largest record batch, header included: half a frame, so a read of one batch always fits
/// in one `Deliver` or `FetchOk` frame.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Most records in one batch (a record takes at least 7 bytes, so a count above this in a
/// batch of at most `MAX_BATCH_BYTES` is a lie).
pub const MAX_RECORDS_PER_BATCH: usize = 1_000_000;
/// Most headers on one record, bounding the per-record header table.
pub const MAX_HEADERS_PER_RECORD: usize = 1024;

// ---- Topics and the log ---------------------------------------------------------------------

/// Longest topic name, as in Kafka (it becomes a directory name).
pub const MAX_TOPIC_NAME_BYTES: usize = 249;
/// Most partitions in one topic: each holds open files and a tail cache.
pub const MAX_PARTITIONS: u32 = 4096;
/// Smallest `segment_bytes` a topic may set: a segment must hold a few batches, or rolling
/// costs more than writing.
pub const MIN_SEGMENT_BYTES: u64 = 4096;
/// Largest `segment_bytes` a topic may set: index entries hold u32 positions, and this leaves
/// room for the one batch that may start just below the limit.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 31;
/// Most bytes one read plan covers, unless its first batch alone is larger. Half of
/// `MAX_FRAME_BYTES`, so a plan always fits in one `Deliver` or `FetchOk` frame.
pub const MAX_READ_BYTES: usize = MAX_BATCH_BYTES;
/// Most bytes of one damaged span that recovery copies to `quarantine/`: enough to study a
/// corruption, not enough to fill the disk with one.
pub const MAX_QUARANTINE_BYTES: u64 = 64 << 20;
/// Appends queued for one partition before producers wait (backpressure): bounds the memory
/// of batches accepted but not yet written.
pub const APPEND_QUEUE_DEPTH: usize = 1024;
/// Most appends one group commit takes, so one fsync's waiters (and the latency of the first
/// of them) stay bounded under load.
pub const MAX_GROUP_COMMIT: usize = 256;
/// Bytes per second the background check of closed segments reads at most, so it never
/// competes with producers and consumers for the disk.
pub const VERIFY_BYTES_PER_SEC: u64 = 32 << 20;

/// Leader epochs one partition's epoch record holds: one per leader change still in the log.
/// A partition that changed leaders this often without retention removing the old epochs is
/// refused new epochs (`TooManyEpochs`) rather than growing an unbounded file.
pub const MAX_EPOCH_ENTRIES: usize = 1 << 16;
/// Closed segments' log files the broker keeps open at once across all partitions (the least
/// recently read are closed beyond it): one shared bound, so a partition needs one descriptor
/// (its active segment) whatever its history, and 10,000 partitions fit the common hard
/// open-file limit of 20,000.
pub const MAX_OPEN_CLOSED_SEGMENT_FILES: usize = 1024;
/// Fsynced bytes of a partition's active segment beyond its recovery-point file after which
/// the file is rewritten at once (not at the next `recovery_point_ms` tick): bounds what
/// recovery CRC-scans after a crash, so a broker with many gigabytes of log serves within
/// about a second of a kill -9.
pub const MAX_UNCHECKPOINTED_BYTES: u64 = 64 * 1024 * 1024;

// ---- Producers and idempotence --------------------------------------------------------------

/// Most producer ids one connection may obtain with `InitProducer` within
/// [`PRODUCER_ID_WINDOW`]: each id is durable broker state.
pub const MAX_PRODUCER_IDS_PER_CONNECTION: u32 = 1_024;
/// The window `MAX_PRODUCER_IDS_PER_CONNECTION` counts producer ids in.
pub const PRODUCER_ID_WINDOW: Duration = Duration::from_secs(60);
/// Batches remembered per producer and partition for deduplication; must exceed the
/// producer's in-flight limit, or a retry of the oldest in-flight batch could be appended twice.
pub const RECENT_BATCHES: usize = 16;
/// Producers remembered per partition; beyond it the one that wrote longest ago is forgotten
/// (its retries would then be appended again). Bounds the producer-state snapshot.
pub const MAX_PRODUCERS_PER_PARTITION: usize = 10_000;

// ---- Consumer groups and acknowledgements ---------------------------------------------------

/// Longest consumer group name (it becomes part of on-disk keys).
pub const MAX_GROUP_NAME_BYTES: usize = 255;
/// Longest member id a group's membership record holds (docs/replication.md §10): ids are the
/// brokers' own (a 12-character nonce and two counters), far below this.
pub const MAX_MEMBER_ID_BYTES: usize = 128;
/// Most members in one consumer group (Kafka's `group.max.size` plays this part): a
/// rebalance's work grows with it.
pub const MAX_MEMBERS_PER_GROUP: usize = 1_000;
/// Most group members one connection speaks for.
pub const MAX_MEMBERS_PER_CONNECTION: usize = 1_000;
/// Most consumer groups a broker knows (with members or committed offsets); a new group name
/// in `JoinGroup`, `Subscribe` or `CommitOffset` beyond it is refused.
pub const MAX_GROUPS: usize = 10_000;
/// Shortest session timeout a member may ask for: shorter ones expire members on a hiccup.
pub const MIN_SESSION_TIMEOUT_MS: u32 = 500;
/// Longest session timeout a member may ask for: a dead member holds its partitions this long.
pub const MAX_SESSION_TIMEOUT_MS: u32 = 300_000;
/// How long the broker remembers the members of groups dropped with their topic (twice the
/// longest session): a member that comes back within it is told `TopicDeleted`.
pub const DELETED_MEMBER_TTL_MS: u64 = 2 * MAX_SESSION_TIMEOUT_MS as u64;
/// At most how many such deleted members are remembered (the oldest are forgotten first).
pub const MAX_DELETED_MEMBERS: usize = 100_000;
/// At most this many acknowledged ranges above the floor are remembered in an ack ledger;
/// further acks that would add a range are dropped (those messages are delivered again:
/// at-least-once).
pub const MAX_ACKED_RANGES: usize = 65_536;
/// Ranges per `Settled` frame (16 bytes each), so one frame stays well below `MAX_FRAME_BYTES`.
pub const MAX_SETTLED_RANGES: usize = 65_536;
/// Acknowledged ranges (and, separately, delivery-count ranges) persisted per offsets entry;
/// beyond them a restart delivers again (design.md §12).
pub const MAX_PERSISTED_RANGES: usize = 1024;
/// The most the offsets log holds after a commit or flush (a compaction is due long before: at
/// half of it); a compaction's snapshot may go on top until the old segments are deleted, so a
/// log over twice this is refused at start with an error naming it. Also the largest
/// old-format `offsets.log` migrated at start.
pub const MAX_OFFSETS_FILE_BYTES: u64 = 1 << 30;
/// Largest `topics/<t>/topic.json` read at start (a name, a count and a config take a few
/// hundred bytes); a longer one is refused before it is read.
pub const MAX_TOPIC_FILE_BYTES: u64 = 64 * 1024;

// ---- Replication (Raft messages between brokers, docs/replication.md) ------------------------

/// Largest Raft term accepted: a term is stamped into each batch as its `i32` partition leader
/// epoch, so a larger one could not be stored (and raft-rs misbehaves near `u64::MAX`).
pub const MAX_RAFT_TERM: u64 = i32::MAX as u64;
/// Most entries in one Raft message: a leader sends at most about `MAX_RAFT_MESSAGE_BYTES` of
/// batches per append, and most batches are far above 1 KiB, so this only stops a count from
/// sizing a vector before the entries are there.
pub const MAX_RAFT_ENTRIES_PER_MESSAGE: usize = 8_192;
/// Most bytes of entry data in one Raft message: one maximal batch (`MAX_BATCH_BYTES`) always
/// fits, and the message stays within one frame.
pub const MAX_RAFT_MESSAGE_BYTES: usize = MAX_BATCH_BYTES + 1024 * 1024;
/// Largest `context` of a message or an entry (raft-rs uses it for read-index and leadership
/// transfer bookkeeping: a few bytes).
pub const MAX_RAFT_CONTEXT_BYTES: usize = 1024;
/// Most ids in each list of a configuration (voters, learners, ...): far more brokers than a
/// partition will ever have replicas or the controller voters.
pub const MAX_RAFT_VOTERS: usize = 256;
/// Largest committed configuration-change entry a replica applies: ours hold one change
/// (about ten bytes); the bound keeps protobuf's parser to small input.
pub const MAX_RAFT_CONF_CHANGE_BYTES: usize = 256;
/// Largest `raft-state` file of a partition (its hard state, snapshot position, conf index
/// and configuration): a fixed part plus four lists of at most `MAX_RAFT_VOTERS` ids.
pub const MAX_RAFT_STATE_BYTES: u64 = 64 + 4 * (4 + 8 * MAX_RAFT_VOTERS as u64);
/// Largest snapshot payload: a partition snapshot is a position plus the producer-state
/// snapshot at it (broker/src/producers.rs `MAX_SNAPSHOT_BYTES`, a few MiB), the
/// controller's its metadata.
pub const MAX_RAFT_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;

// ---- QUIC and sockets -----------------------------------------------------------------------

/// Largest UDP payload either end accepts and MTU discovery searches up to. Connections start
/// at 1,200 bytes (safe on any path) and probe upwards; on an ordinary 1,500-byte network they
/// settle near 1,452, on loopback (MTU 64 KiB) at this bound. Per-packet work (header
/// protection, AEAD setup, loss tracking, acks) is most of QUIC's cost, so bigger packets move
/// more bytes per CPU cycle: a raw quinn stream on this machine carries 1.2 GB/s with 1,452-byte
/// packets and 2.3–2.7 GB/s with 5,000–6,500 (BENCHMARKS.md).
///
/// The bound is not higher because quinn sends up to 10 packets in one GSO system call, and
/// Linux caps a GSO send at 64 KiB: with packets above about 6,550 bytes the send fails
/// with `EMSGSIZE` and the connection stalls (6,500 works here, 6,600 stalls).
pub const MAX_UDP_PAYLOAD: u16 = 6000;
/// Socket buffer asked for, each way. The kernel caps it at `net.core.rmem_max` /
/// `wmem_max` (stock kernels: about 208 KiB; it doubles what it grants for bookkeeping).
/// 208 KiB holds only a few GRO-coalesced datagrams: a receiver that is busy for a moment
/// drops packets, and every drop halves QUIC's congestion window.
pub const SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// Flow-control window of one QUIC stream, both ends: a whole maximal frame fits in flight.
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Bytes sent but not yet acknowledged on one QUIC connection, both ends (a broker shares
/// `max_total_send_bytes` among its clients' connections: each gets at most this).
pub const SEND_WINDOW_BYTES: u64 = 64 * 1024 * 1024;
/// The least send window a broker gives a client connection however many there are: about
/// 650 MB/s on loopback, 6 MB/s across 10 ms. With the default `max_connections` (16,384)
/// the shares never go below it, so `max_total_send_bytes` holds.
pub const MIN_SEND_WINDOW_BYTES: u64 = 64 * 1024;

/// Streams a new connection may open at first; the broker doubles the limit (up to its
/// `max_streams_per_connection`) as the client's open streams reach half of it. quinn keeps
/// state for every stream a peer may open, so a small start keeps an idle connection small.
pub const INITIAL_STREAMS_PER_CONNECTION: u32 = 128;

// ---- Metrics endpoint -----------------------------------------------------------------------

/// Largest HTTP request head read from a metrics scraper (two fixed GET paths need little).
pub const MAX_METRICS_REQUEST_BYTES: usize = 8 * 1024;

// How the bounds fit together, checked when the crate compiles.
const _: () = {
    // A maximal batch, and a maximal read, fit in one frame with room for the request.
    assert!(MAX_BATCH_BYTES * 2 <= MAX_FRAME_BYTES);
    assert!(MAX_READ_BYTES * 2 <= MAX_FRAME_BYTES);
    // A maximal Settled frame fits in a frame.
    assert!(MAX_SETTLED_RANGES * 16 < MAX_FRAME_BYTES);
    // A maximal frame fits in one stream's window.
    assert!(MAX_FRAME_BYTES <= STREAM_RECEIVE_WINDOW_BYTES as usize);
    // quinn batches up to 10 packets per GSO send; Linux allows 64 KiB per send.
    assert!(MAX_UDP_PAYLOAD as usize * 10 <= 65_507);
    assert!(MIN_SESSION_TIMEOUT_MS < MAX_SESSION_TIMEOUT_MS);
    assert!((MAX_SESSION_TIMEOUT_MS as u64) < DELETED_MEMBER_TTL_MS);
};

// ---- Security (docs/security.md) ------------------------------------------------------------

/// Longest token a client may present in `Hello`: generated tokens are 68 bytes; the rest is
/// room for other schemes, and a bound on what an unauthenticated client makes the broker hash.
pub const MAX_TOKEN_BYTES: usize = 1024;
/// Longest principal name (a certificate's common name, a token's owner, an ACL's subject):
/// X.509 caps a common name at 64 characters; tokens' owners are held to the same bound.
pub const MAX_PRINCIPAL_BYTES: usize = 256;
/// Longest ACL pattern: a topic or group name, or a prefix of one followed by `*`.
pub const MAX_ACL_PATTERN_BYTES: usize = 256;
/// Largest token file a broker reads (`--token-file`): about a million tokens' lines.
pub const MAX_TOKEN_FILE_BYTES: u64 = 128 * 1024 * 1024;
/// Most ACL rules a cluster keeps: each request is checked against the rules of its principal.
pub const MAX_ACL_RULES: usize = 10_000;
