//! Stable numeric error codes carried in `Error` frames (docs/design.md §4.4). Never renumber.

/// An error code on the wire. Unknown codes decode as `Unknown(code)` so old clients can show
/// errors from newer brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Malformed,
    FrameTooLarge,
    UnsupportedVersion,
    UnknownKind,
    UnexpectedKind,
    UnknownTopic,
    UnknownPartition,
    TopicExists,
    InvalidTopic,
    OffsetOutOfRange,
    CorruptBatch,
    BatchTooLarge,
    UnsupportedCompression,
    GroupBusy,
    InvalidGroup,
    /// An idempotent producer's batch does not continue its sequence (a gap).
    OutOfOrderSequence,
    /// A group member's generation is stale or it does not own the partition.
    FencedMember,
    StorageError,
    ShuttingDown,
    Internal,
    /// A batch names a producer id this broker never issued, or an epoch it was not issued with.
    UnknownProducer,
    /// Stored data failed its checksum: the broker's copy of these offsets is damaged and is
    /// not served (the error names the segment file and position).
    CorruptLog,
    /// The topic was deleted under a subscription (or an append): final, not retriable.
    TopicDeleted,
    /// A named limit (protocol/src/limits.rs, design.md §2) would be exceeded.
    LimitExceeded,
    /// The broker is not (or no longer) the partition's leader, or none is known yet (an
    /// election is under way): retry, after refreshing metadata, within a second or two.
    NotLeader,
    /// A connection asked for the broker-to-broker protocol (`PEER_ALPN`) without a
    /// certificate signed by the peer CA: the broker closes it with this code.
    Unauthenticated,
    /// The broker does not coordinate this consumer group (in a cluster, the leader of the
    /// group's offsets partition does), or its coordinator is being elected: retry.
    NotCoordinator,
    /// The connection's principal may not do this (docs/security.md): nothing was done.
    NotAuthorized,
    Unknown(u16),
}

impl ErrorCode {
    pub fn code(self) -> u16 {
        use ErrorCode::*;
        match self {
            Malformed => 1,
            FrameTooLarge => 2,
            UnsupportedVersion => 3,
            UnknownKind => 4,
            UnexpectedKind => 5,
            UnknownTopic => 10,
            UnknownPartition => 11,
            TopicExists => 12,
            InvalidTopic => 13,
            OffsetOutOfRange => 14,
            CorruptBatch => 15,
            BatchTooLarge => 16,
            UnsupportedCompression => 17,
            GroupBusy => 18,
            InvalidGroup => 19,
            OutOfOrderSequence => 20,
            FencedMember => 21,
            StorageError => 30,
            ShuttingDown => 31,
            Internal => 32,
            UnknownProducer => 22,
            CorruptLog => 33,
            TopicDeleted => 34,
            LimitExceeded => 35,
            NotLeader => 23,
            Unauthenticated => 24,
            NotCoordinator => 25,
            NotAuthorized => 26,
            Unknown(c) => c,
        }
    }

    pub fn from_code(code: u16) -> Self {
        use ErrorCode::*;
        match code {
            1 => Malformed,
            2 => FrameTooLarge,
            3 => UnsupportedVersion,
            4 => UnknownKind,
            5 => UnexpectedKind,
            10 => UnknownTopic,
            11 => UnknownPartition,
            12 => TopicExists,
            13 => InvalidTopic,
            14 => OffsetOutOfRange,
            15 => CorruptBatch,
            16 => BatchTooLarge,
            17 => UnsupportedCompression,
            18 => GroupBusy,
            19 => InvalidGroup,
            20 => OutOfOrderSequence,
            21 => FencedMember,
            30 => StorageError,
            31 => ShuttingDown,
            32 => Internal,
            22 => UnknownProducer,
            33 => CorruptLog,
            34 => TopicDeleted,
            35 => LimitExceeded,
            23 => NotLeader,
            24 => Unauthenticated,
            25 => NotCoordinator,
            26 => NotAuthorized,
            c => Unknown(c),
        }
    }

    /// Whether retrying the same request on a new connection may succeed.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::StorageError
                | ErrorCode::ShuttingDown
                | ErrorCode::NotLeader
                | ErrorCode::NotCoordinator
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Unknown(c) => write!(f, "error code {c}"),
            other => write!(f, "{other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for c in 0..=u16::from(u8::MAX) {
            assert_eq!(ErrorCode::from_code(c).code(), c);
        }
    }
}
