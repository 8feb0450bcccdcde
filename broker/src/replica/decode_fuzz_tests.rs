//! Hostile bytes in a replica's durable files: the snapshot data (`SnapshotData`) and the
//! `raft-state` file. Arbitrary bytes, and valid encodings mutated with and without their CRC
//! made to match again: an error or a value that round-trips, never a panic.

use proptest::prelude::*;

use super::snapshot::SnapshotData;
use super::state::DurableState;
use crate::fuzz;

proptest! {
    #![proptest_config(fuzz::config(256))]

    #[test]
    fn snapshot_data(
        (index, extra) in (1..u64::MAX / 2, 0..u64::MAX / 2),
        muts in fuzz::mutations(),
        fix_crc in any::<bool>(),
        junk in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let _ = SnapshotData::decode(&junk);
        let data = SnapshotData { log_start_offset: index + extra, index };
        prop_assert_eq!(SnapshotData::decode(&data.encode()), Ok(data));
        fuzz::decodes_or_fails(&data.encode(), &muts, fix_crc, SnapshotData::decode, |d| d.encode().to_vec())?;
    }

    #[test]
    fn raft_state(
        (term, commit, snapshot_index, snapshot_term) in (0..1u64 << 31, any::<u64>(), any::<u64>(), 0..1u64 << 31),
        voters in proptest::collection::vec(any::<u64>(), 0..5),
        muts in fuzz::mutations(),
        fix_crc in any::<bool>(),
        junk in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let _ = DurableState::decode(&junk);
        let mut state = DurableState { snapshot_index, snapshot_term, ..Default::default() };
        state.hard_state.term = term;
        state.hard_state.commit = commit;
        state.conf_state.voters = voters;
        if let Ok(back) = DurableState::decode(&state.encode()) {
            prop_assert_eq!(back, state.clone());
        }
        fuzz::decodes_or_fails(&state.encode(), &muts, fix_crc, DurableState::decode, DurableState::encode)?;
    }
}
