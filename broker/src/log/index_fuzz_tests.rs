//! Hostile bytes in a segment's index files on their own (`<base>.index`, `<base>.timeindex`,
//! design.md §5.2): arbitrary bytes, and valid files mutated (worst length values, cuts,
//! splices). Decoding gives an error or entries that pass every check the open relies on
//! (first entry, strictly increasing, within the segment) and encode back to the very bytes
//! decoded; never a panic. What a decodable but wrong entry does to reads is covered by the
//! lookups' own check (recovery_fuzz_tests).

use proptest::prelude::*;

use super::index::{decode_entries, encode_file, IndexEntry, OffsetEntry, TimeEntry};
use crate::fuzz;

const BASE: u64 = 5_000;

/// Valid offset entries for a segment of `log_len` bytes spanning `span` offsets.
fn offsets() -> impl Strategy<Value = (Vec<OffsetEntry>, u64, u64)> {
    proptest::collection::vec((1..50u32, 61..5_000u32, 1..4u32), 0..20).prop_map(|steps| {
        let mut entries = vec![OffsetEntry::default()];
        let (mut rel, mut pos, mut ord) = (0u32, 0u32, 0u32);
        for (drel, dpos, dord) in steps {
            let dord = dord.min(drel);
            (rel, pos, ord) = (rel + drel, pos + dpos, ord + dord);
            entries.push(OffsetEntry { rel, pos, ord });
        }
        (entries, u64::from(pos) + 100, u64::from(rel) + 10)
    })
}

fn times() -> impl Strategy<Value = Vec<TimeEntry>> {
    proptest::collection::vec((1..50u32, 1..1_000_000i64), 0..20).prop_map(|steps| {
        let mut entries = vec![TimeEntry { max_ts: -7, rel: 0 }];
        let (mut rel, mut ts) = (0u32, -7i64);
        for (drel, dts) in steps {
            (rel, ts) = (rel + drel, ts + dts);
            entries.push(TimeEntry { max_ts: ts, rel });
        }
        entries
    })
}

/// `bytes` decode to an error, or to entries that hold the open's invariants and encode back
/// to `bytes`.
fn decodes_or_fails<E: IndexEntry>(bytes: &[u8], log_len: u64, span: u64) -> Result<(), TestCaseError> {
    if let Ok((entries, ordinal)) = decode_entries::<E>(bytes, BASE, log_len, span) {
        prop_assert!(entries.first().is_none_or(IndexEntry::is_first));
        prop_assert!(entries.windows(2).all(|w| w[1].follows(&w[0])));
        prop_assert!(entries.iter().all(|e| e.within(log_len, span)));
        prop_assert_eq!(encode_file(BASE, ordinal, &entries), bytes.to_vec());
    }
    Ok(())
}

proptest! {
    #![proptest_config(fuzz::config(512))]

    #[test]
    fn offset_index(
        (entries, log_len, span) in offsets(),
        ordinal in any::<u64>(),
        muts in fuzz::mutations(),
        junk in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        decodes_or_fails::<OffsetEntry>(&junk, log_len, span)?;
        let bytes = encode_file(BASE, ordinal, &entries);
        prop_assert_eq!(decode_entries::<OffsetEntry>(&bytes, BASE, log_len, span), Ok((entries, ordinal)));
        decodes_or_fails::<OffsetEntry>(&fuzz::apply(&bytes, &muts), log_len, span)?;
    }

    #[test]
    fn time_index(
        entries in times(),
        muts in fuzz::mutations(),
        junk in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let span = u64::from(entries.last().map_or(0, |e| e.rel)) + 1;
        decodes_or_fails::<TimeEntry>(&junk, 1 << 20, span)?;
        let bytes = encode_file(BASE, 0, &entries);
        prop_assert_eq!(decode_entries::<TimeEntry>(&bytes, BASE, 1 << 20, span), Ok((entries, 0)));
        decodes_or_fails::<TimeEntry>(&fuzz::apply(&bytes, &muts), 1 << 20, span)?;
    }
}
