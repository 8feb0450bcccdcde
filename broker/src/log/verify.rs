//! Background verification (design.md §5.3): recovery trusts closed segments whose indexes
//! check out, and the active segment below its recovery point, reading only their headers, so
//! their CRCs are checked after start, slowly, outside the log's lock.

use std::path::PathBuf;
use std::sync::Arc;

use super::recovery::{report_damage, scan, Damage, Scan};
use super::segment::{Check, Walker};
use super::{LogError, PartitionLog};
use crate::storage::{Storage, StorageFile};

/// One closed segment to verify, taken under the log's lock and checked without it. It holds
/// the file open, so retention deleting the segment meanwhile does not break the check.
#[derive(Debug)]
pub struct VerifyTarget {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    log: Arc<dyn StorageFile>,
    walker: Walker,
    base: u64,
    size: u64,
    next_offset: u64,
}

impl PartitionLog {
    /// The first closed segment with a base offset above `after` (from the oldest if `None`),
    /// for [`VerifyTarget::verify`]. One at a time, so verification opens one file at a time.
    pub fn verify_target(&self, after: Option<u64>) -> Result<Option<VerifyTarget>, LogError> {
        let i = after.map_or(0, |a| self.closed.partition_point(|s| s.base <= a));
        let Some(seg) = self.closed.get(i) else {
            // Then the active segment, up to where a completed fsync covered it.
            let synced = self.recovery.synced();
            let seg = &self.active;
            if after.is_some_and(|a| a >= seg.base) || synced.segment_base != seg.base || synced.position == 0
            {
                return Ok(None);
            }
            return Ok(Some(VerifyTarget {
                storage: self.storage.clone(),
                dir: self.dir.clone(),
                walker: seg.walker(Check::Crc)?.expecting(Some(self.epochs.clone())),
                log: seg.log()?,
                base: seg.base,
                size: synced.position.min(seg.size),
                next_offset: synced.next_offset,
            }));
        };
        let log = self.open_log(seg)?;
        Ok(Some(VerifyTarget {
            storage: self.storage.clone(),
            dir: self.dir.clone(),
            walker: seg.walker(Check::Crc)?.expecting(Some(self.epochs.clone())),
            log,
            base: seg.base,
            size: seg.size,
            next_offset: seg.next_offset,
        }))
    }
}

impl VerifyTarget {
    /// Checks the CRC of every batch and its leader epoch against the epoch record, calling `pace` with each batch's length (it may sleep to
    /// bound the rate; returning false stops the check). Damage found is logged, counted in
    /// `quiver_corrupt_batches_total` and copied to `quarantine/`, and returned. Reads of it
    /// already fail, as every batch is checked before it is served.
    pub fn verify(&self, mut pace: impl FnMut(u64) -> bool) -> Result<Vec<Damage>, LogError> {
        let mut stopped = false;
        let Scan { end, mut damage } = scan(&self.walker, self.base, self.size, |at, _| {
            stopped = !pace(at.header.total_len() as u64);
            !stopped
        })?;
        if let Some(reason) = end.defect.filter(|_| !stopped) {
            damage.push(Damage {
                path: self.walker.path().to_path_buf(),
                position: end.pos,
                len: self.size - end.pos,
                offsets: end.next_offset..self.next_offset,
                reason,
            });
        }
        for d in &damage {
            report_damage(&*self.storage, &self.dir, &*self.log, d, "verify");
        }
        Ok(damage)
    }

    /// Bytes of the segment.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Base offset of the segment.
    pub fn base(&self) -> u64 {
        self.base
    }
}
