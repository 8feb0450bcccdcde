//! The process's open-file limit and what the broker's partitions need of it
//! (docs/design.md §5.7).
//!
//! QUIC serves every connection over one UDP socket, so a broker's file descriptors go to its
//! partitions: one per partition for the active segment's log (its index files are written
//! when it is sealed), and up to [`CLOSED_SEGMENT_FILES`] closed segments' logs that reads
//! opened, shared by all partitions (each twice with `direct_writes`). A topic is created
//! only if every partition could hold its file within the limit, less the shared ones and
//! [`RESERVED_FDS`] for everything else; starting never depends on it.

/// Segment log files one partition holds open (not counting reads in flight): the active
/// one. Each is one descriptor, or two with `direct_writes`
/// ([`Storage::fds_per_segment_file`](crate::storage::Storage::fds_per_segment_file)).
pub const FILES_PER_PARTITION: u64 = 1;

/// Closed segments' log files open at once across all partitions (least recently read ones
/// are closed beyond it): the files reads of history opened.
pub use quiver_protocol::limits::MAX_OPEN_CLOSED_SEGMENT_FILES as CLOSED_SEGMENT_FILES;

/// Descriptors kept for everything but partitions: the offsets store, the data directory's
/// lock, snapshots and index files being written, the metrics listener's connections, the
/// runtime.
pub const RESERVED_FDS: u64 = 256;

/// Raises the soft open-file limit to the hard limit; returns the limit before and after.
pub fn raise_limit() -> std::io::Result<(u64, u64)> {
    let (before, _) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let after = rlimit::increase_nofile_limit(u64::MAX)?;
    Ok((before, after))
}

/// The soft open-file limit now, `None` if it cannot be read (no check is made then).
pub fn limit() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE).ok().map(|(soft, _)| soft)
}

/// Most partitions a broker can hold under an open-file limit of `limit`, with `fds_per_file`
/// descriptors per segment log file.
pub fn partitions_within(limit: u64, fds_per_file: u64) -> u64 {
    let per_file = fds_per_file.max(1);
    limit.saturating_sub(RESERVED_FDS + CLOSED_SEGMENT_FILES as u64 * per_file)
        / (FILES_PER_PARTITION * per_file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{FsStorage, Storage};

    #[test]
    fn direct_writes_halve_the_partitions_a_limit_allows() {
        let buffered = FsStorage::new().fds_per_segment_file();
        let direct = FsStorage::new().direct_writes(true).fds_per_segment_file();
        assert_eq!((buffered, direct), (1, 2));
        let shared = CLOSED_SEGMENT_FILES as u64;
        assert_eq!(partitions_within(20_000, buffered), 20_000 - RESERVED_FDS - shared);
        assert_eq!(partitions_within(20_000, direct), (20_000 - RESERVED_FDS - 2 * shared) / 2);
        assert_eq!(partitions_within(100, 1), 0, "a limit below the reserve allows none");
    }
}
