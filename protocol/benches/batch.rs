//! Micro-benchmarks of the record-batch codec (`protocol/src/batch.rs`), on the paths every
//! record takes:
//!
//! * `batch_build`: the producer filling a `BatchBuilder` and finishing it (CRC included);
//! * `batch_validate`: `batch::validate`, which the broker runs on every produced batch
//!   (header, CRC over the whole batch, framing of every record);
//! * `batch_iterate`: the consumer taking a delivery apart, `BatchSplitter` (CRC per batch)
//!   then `RecordIter` over every record.
//!
//! Throughput is in batch bytes. `cargo bench -p quiver-protocol --bench batch` measures;
//! `cargo test -p quiver-protocol --benches` runs each benchmark once.

// A bench is test code: a broken fixture should stop it with a message. clippy.toml allows
// `expect` only inside `#[test]` code, which a criterion harness is not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quiver_protocol::batch::{self, BatchBuilder, BatchSplitter, RecordIter};
use quiver_protocol::limits::MAX_BATCH_BYTES;

/// Batch shapes: name, records per batch, value bytes per record. Each record also has an
/// 8-byte key and no headers.
const SHAPES: [(&str, usize, usize); 2] = [("1000x1KiB", 1000, 1024), ("100x100B", 100, 100)];
/// A delivery is filled with copies of the batch up to this size (`max_deliver_bytes`, the
/// broker's default limit for one `Deliver` frame).
const DELIVERY_BYTES: usize = 1 << 20;
const NOW_MS: i64 = 1_700_000_000_000;

/// Builds one batch as the producer does: a builder started at 64 KiB that grows as needed.
fn build(records: usize, value: &[u8]) -> Bytes {
    let mut b = BatchBuilder::new(MAX_BATCH_BYTES.min(64 * 1024));
    for i in 0..records {
        b.push(NOW_MS + i as i64, Some(&(i as u64).to_be_bytes()), value, &[]);
    }
    b.finish()
}

/// Back-to-back copies of `batch` stamped with consecutive offsets, like a `Deliver` payload.
fn delivery(batch: &Bytes, records: usize) -> Bytes {
    let copies = (DELIVERY_BYTES / batch.len()).max(1);
    let mut out = BytesMut::with_capacity(copies * batch.len());
    for i in 0..copies {
        let start = out.len();
        out.extend_from_slice(batch);
        batch::stamp(&mut out[start..], (i * records) as u64, 0);
    }
    out.freeze()
}

fn build_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_build");
    for (name, records, value_len) in SHAPES {
        let value = vec![0x5a; value_len];
        g.throughput(Throughput::Bytes(build(records, &value).len() as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| build(black_box(records), black_box(&value)))
        });
    }
    g.finish();
}

fn validate_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_validate");
    for (name, records, value_len) in SHAPES {
        let batch = build(records, &vec![0x5a; value_len]);
        batch::validate(&batch).expect("valid batch");
        g.throughput(Throughput::Bytes(batch.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| batch::validate(black_box(&batch)).expect("valid batch"))
        });
    }
    g.finish();
}

fn iterate_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_iterate");
    for (name, records, value_len) in SHAPES {
        let delivery = delivery(&build(records, &vec![0x5a; value_len]), records);
        g.throughput(Throughput::Bytes(delivery.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                // Cloning `Bytes` is a refcount bump, as the client's hand-over of a frame is.
                for item in BatchSplitter::new(black_box(&delivery).clone()) {
                    let (header, batch) = item.expect("whole batch");
                    for record in RecordIter::new(batch, header) {
                        black_box(record.expect("record"));
                    }
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, build_bench, validate_bench, iterate_bench);
criterion_main!(benches);
