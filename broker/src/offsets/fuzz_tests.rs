//! Hostile bytes in the offsets store's records (`records.rs`: a ledger record's key and
//! value) and in the old `offsets.log` it migrates from (`legacy.rs`). Arbitrary bytes, valid
//! encodings mutated (the old file's entries also with their CRC made to match, so the field
//! decoders behind it are reached) and round trips: an error, or a value that encodes back to
//! itself and restores into a usable ledger; never a panic, and never an allocation beyond
//! what the input's length allows (the lists' counts are checked against the bytes left).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use quiver_protocol::ledger::{AckLedger, LedgerSnapshot};
use quiver_protocol::limits::MAX_PERSISTED_RANGES;

use super::legacy::{parse_entries, put_entry};
use quiver_protocol::group::{GroupCoordinator, GroupSnapshot, MemberSnapshot};

use super::records::{decode_group, decode_key, decode_value, encode_group, encode_key, encode_value, Key};
use super::OffsetKey;
use crate::fuzz;

fn ranges() -> impl Strategy<Value = Vec<Range<u64>>> {
    proptest::collection::vec((any::<u64>(), any::<u64>()).prop_map(|(a, b)| a..b), 0..6)
}

fn snapshot() -> impl Strategy<Value = LedgerSnapshot> {
    (
        any::<u64>(),
        ranges(),
        proptest::collection::vec(((any::<u64>(), any::<u64>()), any::<u32>()), 0..6),
        any::<u64>(),
        ranges(),
    )
        .prop_map(|(floor, acked, counts, horizon, maybe)| LedgerSnapshot {
            floor,
            acked,
            counts: counts.into_iter().map(|((a, b), c)| (a..b, c)).collect(),
            horizon,
            maybe,
        })
}

fn key() -> impl Strategy<Value = OffsetKey> {
    ("[ -~]{0,40}", "[a-z0-9._-]{0,40}", any::<u32>())
        .prop_map(|(g, t, p)| (Arc::from(g.as_str()), Arc::from(t.as_str()), p))
}

/// A decoded snapshot restores into a ledger that works and snapshots again, whatever its
/// ranges say (reversed, overlapping, below the floor).
fn usable(s: &LedgerSnapshot) {
    let mut l = AckLedger::restore(s);
    let again = l.snapshot(MAX_PERSISTED_RANGES);
    let _ = AckLedger::restore(&again);
    let next = l.floor().saturating_add(3);
    let _ = l.deliver(l.floor()..next, 10);
    let _ = l.ack(l.floor()..next);
    l.end_session();
}

fn group() -> impl Strategy<Value = GroupSnapshot> {
    let member = (
        "[a-f0-9-]{1,30}",
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec((0u32..8, any::<u64>()), 0..4),
    )
        .prop_map(|(id, session_timeout_ms, seen_generation, owned)| MemberSnapshot {
            id,
            session_timeout_ms,
            seen_generation,
            owned,
        });
    (
        "[a-z0-9._-]{1,40}",
        any::<u64>(),
        any::<u64>(),
        "[a-f0-9-]{0,20}",
        proptest::collection::vec(member, 0..5),
        proptest::collection::vec((0u32..8, "[a-f0-9-]{1,30}", any::<u64>(), any::<u64>()), 0..3),
    )
        .prop_map(|(topic, generation, next_member, id_prefix, members, revoking)| GroupSnapshot {
            topic,
            partitions: 8,
            generation,
            next_member,
            id_prefix,
            members,
            revoking,
        })
}

/// What a coordinator could have written: one entry per member id, each partition with one
/// owner at most, in the coordinator's order.
fn canonical(mut g: GroupSnapshot) -> GroupSnapshot {
    let mut ids = std::collections::HashSet::new();
    g.members.retain(|m| ids.insert(m.id.clone()));
    let mut taken = std::collections::HashSet::new();
    for m in &mut g.members {
        m.owned.retain(|(p, _)| taken.insert(*p));
    }
    g.revoking.retain(|(p, ..)| taken.insert(*p));
    g.revoking.retain(|(_, from, ..)| ids.contains(from));
    g.generation %= u64::MAX / 2;
    g.next_member %= u64::MAX / 2;
    GroupCoordinator::restore(g, 0).snapshot()
}

/// A decoded group restores into a coordinator that answers requests, and snapshots back to
/// the same record.
fn usable_group(g: &GroupSnapshot) {
    let mut c = GroupCoordinator::restore(g.clone(), 0);
    assert_eq!(&c.snapshot(), g);
    for m in &g.members {
        let _ = c.heartbeat(&m.id, c.generation(), 1);
        let _ = c.check_owner(&m.id, c.generation(), 0);
    }
    let _ = c.join(&g.topic, None, 1000, 2);
    let _ = c.expire(u64::MAX);
}

proptest! {
    #![proptest_config(fuzz::config(256))]

    #[test]
    fn group_records(
        g in group().prop_map(canonical),
        muts in fuzz::mutations(),
        junk in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        if let Ok(back) = decode_group(Bytes::from(junk)) {
            usable_group(&canonical(back));
        }
        let value = encode_group(&g).freeze();
        prop_assert_eq!(decode_group(value.clone()), Ok(g.clone()));
        usable_group(&g);
        if let Ok(back) = decode_group(Bytes::from(fuzz::apply(&value, &muts))) {
            prop_assert_eq!(decode_group(encode_group(&back).freeze()), Ok(back.clone()));
            prop_assert!(back.members.iter().all(|m| m.owned.iter().all(|(p, _)| *p < back.partitions)));
            usable_group(&canonical(back));
        }
    }

    #[test]
    fn ledger_records(
        k in key(),
        s in snapshot(),
        muts in fuzz::mutations(),
        junk in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = decode_key(Bytes::from(junk.clone()));
        if let Ok(v) = decode_value(Bytes::from(junk)) {
            usable(&v);
        }
        let key_bytes = encode_key(&k).freeze();
        prop_assert_eq!(decode_key(key_bytes.clone()), Ok(Key::Ledger(k.clone())));
        let value = encode_value(&s).freeze();
        let decoded = decode_value(value.clone());
        prop_assert_eq!(decoded.as_ref(), Ok(&s));
        usable(&s);
        if let Ok(Key::Ledger(back)) = decode_key(Bytes::from(fuzz::apply(&key_bytes, &muts))) {
            prop_assert_eq!(decode_key(encode_key(&back).freeze()), Ok(Key::Ledger(back)));
        }
        if let Ok(back) = decode_value(Bytes::from(fuzz::apply(&value, &muts))) {
            let again = decode_value(encode_value(&back).freeze());
            prop_assert_eq!(again.as_ref(), Ok(&back));
            usable(&back);
        }
    }

    #[test]
    fn legacy_offsets_file(
        entries in proptest::collection::vec((key(), snapshot()), 0..6),
        muts in fuzz::mutations(),
        fix_crcs in any::<bool>(),
        junk in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let _ = parse_entries(&junk, &mut HashMap::new());
        let mut file = BytesMut::new();
        let mut want = HashMap::new();
        for (k, s) in &entries {
            put_entry(&mut file, k, s);
            want.insert(k.clone(), s.clone());
        }
        let mut got = HashMap::new();
        prop_assert_eq!(parse_entries(&file, &mut got), (file.len(), false));
        prop_assert_eq!(&got, &want);
        let mut bytes = fuzz::apply(&file, &muts);
        if fix_crcs {
            fix_entry_crcs(&mut bytes);
        }
        let mut got = HashMap::new();
        let (used, _) = parse_entries(&bytes, &mut got);
        prop_assert!(used <= bytes.len());
        for s in got.values() {
            usable(s);
        }
    }
}

/// Makes every entry's CRC match its body, walking the length fields as the parser does.
fn fix_entry_crcs(bytes: &mut [u8]) {
    let mut pos = 0;
    while bytes.len() - pos >= 8 {
        let len = u32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]) as usize;
        let Some(body) = bytes.get(pos + 8..).and_then(|b| b.get(..len)) else { return };
        let crc = crc32c::crc32c(body);
        bytes[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        pos += 8 + len;
    }
}
