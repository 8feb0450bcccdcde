//! Helpers for the decoders' property tests ("hostile bytes", docs in README's testing section).
//!
//! Every fuzz property takes its case count from [`config`]: a short run by default, sized so
//! the whole fuzz set stays cheap in `cargo test`, and `QUIVER_FUZZ_CASES=N` for a long run.
//! proptest prints the shrunk failing input and saves its seed under `proptest-regressions/`,
//! where it replays first on the next run; a failure worth keeping also becomes a plain
//! `#[test]` with its bytes.

// Shared by the protocol and broker crates' tests (the broker includes this file by path);
// each uses only part of it.
#![allow(dead_code)]

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError};

/// The env var that sets the case count of every fuzz property.
pub const CASES_VAR: &str = "QUIVER_FUZZ_CASES";

/// `default` cases, or `QUIVER_FUZZ_CASES` when it is set to a number.
pub fn config(default: u32) -> Config {
    let cases = std::env::var(CASES_VAR).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default);
    Config { cases, ..Config::default() }
}

/// One change to a valid encoding.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// The byte at (index modulo length) becomes `byte`.
    Set(prop::sample::Index, u8),
    /// One bit of the byte at the index flips.
    FlipBit(prop::sample::Index, u8),
    /// Four bytes at the index become a length-like value (a count or size field's worst
    /// cases), little-endian (our fields) or big-endian (Kafka's batch fields).
    SetU32(prop::sample::Index, u32, bool),
    /// The input is cut at the index.
    Truncate(prop::sample::Index),
    /// Bytes are added at the end.
    Extend(Vec<u8>),
    /// Bytes are inserted at the index.
    Insert(prop::sample::Index, Vec<u8>),
    /// Up to 16 bytes are removed at the index.
    Remove(prop::sample::Index, u8),
}

fn length_like() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(u32::MAX),
        Just(i32::MAX as u32),
        Just(0x8000_0000),
        Just(65_535),
        Just(65_536),
        Just(16 * 1024 * 1024),
        Just(16 * 1024 * 1024 + 1),
        any::<u32>(),
    ]
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    let bytes = proptest::collection::vec(any::<u8>(), 1..16);
    prop_oneof![
        4 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        3 => (any::<prop::sample::Index>(), 0..8u8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        3 => (any::<prop::sample::Index>(), length_like(), any::<bool>())
            .prop_map(|(i, v, be)| Mutation::SetU32(i, v, be)),
        2 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        1 => bytes.clone().prop_map(Mutation::Extend),
        1 => (any::<prop::sample::Index>(), bytes).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<prop::sample::Index>(), 1..16u8).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

/// One to four mutations.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 1..5)
}

/// Applies `ms` in order to a copy of `bytes`.
pub fn apply(bytes: &[u8], ms: &[Mutation]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for m in ms {
        apply_one(&mut out, m);
    }
    out
}

fn apply_one(out: &mut Vec<u8>, m: &Mutation) {
    let len = out.len();
    match m {
        Mutation::Extend(b) => out.extend_from_slice(b),
        Mutation::Insert(i, b) => {
            let at = i.index(len + 1);
            out.splice(at..at, b.iter().copied());
        }
        _ if len == 0 => {}
        Mutation::Set(i, b) => out[i.index(len)] = *b,
        Mutation::FlipBit(i, bit) => out[i.index(len)] ^= 1 << (bit % 8),
        Mutation::SetU32(i, v, be) => {
            let at = i.index(len);
            let end = (at + 4).min(len);
            let raw = if *be { v.to_be_bytes() } else { v.to_le_bytes() };
            out[at..end].copy_from_slice(&raw[..end - at]);
        }
        Mutation::Truncate(i) => out.truncate(i.index(len)),
        Mutation::Remove(i, n) => {
            let at = i.index(len);
            let end = (at + *n as usize).min(len);
            out.drain(at..end);
        }
    }
}

/// Makes the trailing little-endian CRC32C of a file match the bytes before it, as on every
/// small durable file of the broker: mutations then reach the field checks behind the CRC.
pub fn fix_trailing_crc(bytes: &mut [u8]) {
    if let Some((body, crc)) = bytes.split_last_chunk_mut::<4>() {
        *crc = crc32c::crc32c(body).to_le_bytes();
    }
}

/// The property every durable-file decoder keeps: `valid` mutated by `muts` (its CRC made to
/// match again when `fix_crc`) decodes to an error or to a value that encodes to bytes
/// decoding to the same value; never a panic.
pub fn decodes_or_fails<T: PartialEq + std::fmt::Debug, E>(
    valid: &[u8],
    muts: &[Mutation],
    fix_crc: bool,
    decode: impl Fn(&[u8]) -> Result<T, E>,
    encode: impl Fn(&T) -> Vec<u8>,
) -> Result<(), TestCaseError> {
    let mut bytes = apply(valid, muts);
    if fix_crc {
        fix_trailing_crc(&mut bytes);
    }
    if let Ok(v) = decode(&bytes) {
        let again =
            decode(&encode(&v)).map_err(|_| TestCaseError::fail(format!("{v:?} does not decode again")))?;
        prop_assert_eq!(again, v);
    }
    Ok(())
}
