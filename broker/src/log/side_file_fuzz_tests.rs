//! Hostile bytes in the log's small durable files: the recovery point, the epoch record
//! (`leader-epochs`, both versions) and the log-reset marker. Arbitrary bytes, and valid files
//! mutated with and without their CRC made to match again (so the checks behind the CRC are
//! reached): an error or a value that round-trips, never a panic. (The segment and index files
//! are fuzzed through recovery in `recovery_fuzz_tests`.)

use proptest::prelude::*;

use super::checkpoint::RecoveryPoint;
use super::epochs::Epochs;
use super::reset::Reset;
use super::EpochEntry;
use crate::fuzz;

fn epochs(entries: &[(i32, u64)]) -> Option<Epochs> {
    Epochs::from_entries(entries.iter().map(|&(epoch, start)| EpochEntry { epoch, start }).collect()).ok()
}

proptest! {
    #![proptest_config(fuzz::config(256))]

    #[test]
    fn recovery_point(
        (segment_base, position, extra) in (any::<u64>(), any::<u64>(), 0..1000u64),
        muts in fuzz::mutations(),
        fix_crc in any::<bool>(),
        junk in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let _ = RecoveryPoint::decode(&junk);
        let point = RecoveryPoint { segment_base, position, next_offset: segment_base.saturating_add(extra) };
        prop_assert_eq!(RecoveryPoint::decode(&point.encode()), Ok(point));
        fuzz::decodes_or_fails(&point.encode(), &muts, fix_crc, RecoveryPoint::decode, |p| p.encode().to_vec())?;
    }

    #[test]
    fn epoch_record(
        steps in proptest::collection::vec((0..3i32, 0..100u64), 0..8),
        muts in fuzz::mutations(),
        fix_crc in any::<bool>(),
        junk in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let _ = Epochs::decode(&junk);
        let mut entries = Vec::new();
        let (mut epoch, mut start) = (0i32, 0u64);
        for (bump, gap) in steps {
            epoch += bump + 1;
            start += gap;
            entries.push((epoch, start));
        }
        if let Some(e) = epochs(&entries) {
            let bytes = e.encode();
            prop_assert_eq!(Epochs::decode(&bytes), Ok(e.clone()));
            fuzz::decodes_or_fails(&bytes, &muts, fix_crc, Epochs::decode, Epochs::encode)?;
        }
    }

    #[test]
    fn reset_marker(
        (base_offset, ordinal_back, epoch_before) in (2..u64::MAX, any::<u64>(), 0..i32::MAX),
        muts in fuzz::mutations(),
        fix_crc in any::<bool>(),
        junk in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let _ = Reset::decode(&junk);
        let base_ordinal = 2 + ordinal_back % (base_offset - 1);
        let reset = Reset { base_offset, base_ordinal, epoch_before };
        prop_assert!(reset.is_valid());
        prop_assert_eq!(Reset::decode(&reset.encode()), Ok(reset));
        fuzz::decodes_or_fails(&reset.encode(), &muts, fix_crc, Reset::decode, |r| r.encode().to_vec())?;
    }
}
