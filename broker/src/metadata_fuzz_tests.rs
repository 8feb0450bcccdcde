//! Hostile bytes in the broker's small metadata files: `topics/<t>/topic.json`, a segment's
//! producer-state snapshot (`<base>.producers`) and `producer_ids`. Arbitrary bytes, valid
//! files mutated (with and without a matching CRC where the file has one), and round trips:
//! an error (or `None`) or a value that encodes back to itself and is usable; never a panic,
//! never an allocation a length in the file decides.

use proptest::prelude::*;
use quiver_protocol::batch::{BatchBuilder, BatchHeader, ProducerIdentity};
use quiver_protocol::limits::{MAX_PARTITIONS, MAX_TOPIC_FILE_BYTES};
use quiver_protocol::message::{Durability, TopicConfig};

use crate::fuzz;
use crate::producers::{decode_ids_file, IdsFile, ProducerStates};
use crate::topics::TopicFile;

fn topic_file() -> impl Strategy<Value = TopicFile> {
    let name = "[A-Za-z0-9._-]{1,40}".prop_filter("not . or ..", |n| n != "." && n != "..");
    let durability = prop_oneof![Just(Durability::Always), Just(Durability::Interval), Just(Durability::Os)];
    (
        name,
        1..=MAX_PARTITIONS,
        (proptest::option::of(any::<u64>()), proptest::option::of(any::<u64>())),
        (4096u64..=1 << 31, 1..u64::MAX, durability, any::<u32>(), 1..=256u16),
    )
        .prop_map(|(name, partitions, (rb, rm), (sb, sm, durability, flush, replicas))| {
            let config = TopicConfig::new()
                .with_retention_bytes(rb)
                .with_retention_ms(rm)
                .with_segment_bytes(sb)
                .with_segment_ms(sm)
                .with_durability(durability)
                .with_flush_interval_ms(flush)
                .with_replicas(replicas);
            TopicFile { name, partitions, config, created_at_index: None }
        })
}

/// A header of a batch of `n` records by producer `pid` starting at sequence `seq`.
fn header(pid: i64, seq: i32, n: usize, base_offset: u64) -> Option<BatchHeader> {
    let identity = ProducerIdentity { producer_id: pid, producer_epoch: 0, base_sequence: seq };
    let mut b = BatchBuilder::new(64).with_identity(identity);
    for _ in 0..n.max(1) {
        b.push(0, None, b"v", &[]);
    }
    let mut h = BatchHeader::parse(&b.finish()).ok()?;
    h.base_offset = base_offset;
    Some(h)
}

fn producer_states(writes: &[(i64, i32, u8, u64)]) -> ProducerStates {
    let mut s = ProducerStates::default();
    for &(pid, seq, n, offset) in writes {
        if let Some(h) = header(pid, seq, usize::from(n % 4) + 1, offset) {
            s.record(&h, offset);
        }
    }
    s
}

proptest! {
    #![proptest_config(fuzz::config(256))]

    #[test]
    fn topic_json(
        file in topic_file(),
        muts in fuzz::mutations(),
        junk in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = TopicFile::decode(&junk);
        let bytes = file.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back = TopicFile::decode(bytes.as_bytes());
        prop_assert_eq!(back.as_ref(), Ok(&file));
        let mutated = fuzz::apply(bytes.as_bytes(), &muts);
        if let Ok(back) = TopicFile::decode(&mutated) {
            prop_assert!(back.partitions <= MAX_PARTITIONS);
            let again = back.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(TopicFile::decode(again.as_bytes()), Ok(back));
        }
    }

    #[test]
    fn producer_snapshot(
        writes in proptest::collection::vec((0..8i64, 0..i32::MAX, any::<u8>(), 0..1u64 << 40), 0..40),
        muts in fuzz::mutations(),
        fix_crc in any::<bool>(),
        junk in proptest::collection::vec(any::<u8>(), 0..256),
        probe in (0..8i64, any::<i32>(), any::<u8>(), any::<u64>()),
    ) {
        let _ = ProducerStates::decode_snapshot(&junk);
        let states = producer_states(&writes);
        let bytes = states.encode_snapshot();
        let back = ProducerStates::decode_snapshot(&bytes).ok_or_else(|| TestCaseError::fail("a valid snapshot"))?;
        prop_assert_eq!(back.sorted(), states.sorted());
        let mut mutated = fuzz::apply(&bytes, &muts);
        if fix_crc {
            fuzz::fix_trailing_crc(&mut mutated);
        }
        if let Some(mut back) = ProducerStates::decode_snapshot(&mutated) {
            let again = ProducerStates::decode_snapshot(&back.encode_snapshot())
                .ok_or_else(|| TestCaseError::fail("does not decode again"))?;
            prop_assert_eq!(again.sorted(), back.sorted());
            // Whatever it holds, the state is usable: checks and records never panic.
            let (pid, seq, n, offset) = probe;
            if let Some(h) = header(pid, seq & i32::MAX, usize::from(n % 4) + 1, offset) {
                let _ = back.check(&h);
                back.record(&h, offset);
                let _ = back.check(&h);
            }
        }
    }

    #[test]
    fn producer_ids_file(
        block_end in 0..=1i64 << 32,
        key in any::<[u8; 32]>(),
        muts in fuzz::mutations(),
        fix_crc in any::<bool>(),
        junk in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let _ = decode_ids_file(&junk);
        let bytes = crate::producers::encode_ids_file(block_end, &key);
        prop_assert_eq!(decode_ids_file(&bytes), Ok(IdsFile::Keyed { block_end, key }));
        let mut mutated = fuzz::apply(&bytes, &muts);
        if fix_crc {
            fuzz::fix_trailing_crc(&mut mutated);
        }
        match decode_ids_file(&mutated) {
            Ok(IdsFile::Keyed { block_end, key }) => {
                prop_assert!((0..=1i64 << 32).contains(&block_end));
                prop_assert_eq!(crate::producers::encode_ids_file(block_end, &key), mutated);
            }
            Ok(IdsFile::Sequential { block_end }) => prop_assert!((0..=1i64 << 32).contains(&block_end)),
            Err(_) => {}
        }
    }
}

/// Seen while writing `producer_ids_file`: a block end near `i64::MAX` behind a matching CRC
/// was accepted, and the next block's end overflowed. The block end is bounded at decode.
#[test]
fn a_producer_ids_block_end_past_the_counter_range_is_refused() {
    for end in [i64::MAX, (1 << 32) + 1, -1] {
        let bytes = crate::producers::encode_ids_file(end, &[7; 32]);
        assert!(decode_ids_file(&bytes).is_err(), "{end}");
    }
}

/// Found by `producer_ids_file`: non-zero reserved bytes behind a matching CRC were accepted
/// (the file then did not encode back to itself). They must be zero, as written.
#[test]
fn producer_ids_reserved_bytes_must_be_zero() {
    let mut bytes = crate::producers::encode_ids_file(0, &[0; 32]);
    bytes[6] = 1;
    fuzz::fix_trailing_crc(&mut bytes);
    assert!(decode_ids_file(&bytes).is_err());
}

/// A topic.json claiming more partitions than any topic can have is refused before the start
/// makes a job per partition, and so is one too long to be ours.
#[test]
fn a_topic_file_is_bounded_before_it_is_used() {
    let file = TopicFile {
        name: "t".into(),
        partitions: u32::MAX,
        config: TopicConfig::new(),
        created_at_index: None,
    };
    let bytes = serde_json::to_vec(&file).unwrap_or_default();
    assert!(TopicFile::decode(&bytes).is_err());
    let long = vec![b' '; MAX_TOPIC_FILE_BYTES as usize + 1];
    assert!(TopicFile::decode(&long).is_err());
}
