//! Micro-benchmarks of the partition log (`broker/src/log`), on the paths of every produce and
//! every read:
//!
//! * `log_append`: `PartitionLog::append` of one validated batch (stamp, write to the active
//!   segment, index), without fsync; with `FsStorage` in a temp dir (the bytes land in the page
//!   cache) and with `MemStorage` (the log's own overhead, no syscalls);
//! * `log_read`: `read_plan` (under the partition lock) + `execute` (outside it) of 1 MiB from the
//!   middle of a 64 MiB log of 64 KiB batches, as a subscriber catching up does; the file is
//!   in the page cache, as a recently written log is;
//! * `log_sync`: `sync_handle().sync()` (fdatasync of the active segment) after 1 MiB was
//!   appended, the cost a group commit with `acks` that wait for durability pays.
//!
//! Throughput is in batch bytes. `cargo bench -p quiver-broker --bench log` measures;
//! `cargo test -p quiver-broker --benches` runs each benchmark once.

// A bench is test code: a broken fixture should stop it with a message. clippy.toml allows
// `expect` only inside `#[test]` code, which a criterion harness is not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use quiver_broker::log::{LogConfig, PartitionLog};
use quiver_broker::storage::{FsStorage, MemStorage, Storage};
use quiver_protocol::{BatchBuilder, ValidatedBatch};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// A log is replaced by an empty one (outside the timed part) once it holds this much, so a
/// run of any length uses bounded disk or memory. Below `segment_bytes`, so no append rolls.
const LOG_CAP: u64 = 256 * MIB as u64;
const NOW_MS: i64 = 1_700_000_000_000;

/// A batch of at most `bytes`, made of records with an 8-byte key and a 1000-byte value.
fn batch_of(bytes: usize) -> ValidatedBatch {
    let value = [0x5a; 1000];
    let mut b = BatchBuilder::new(bytes);
    for i in 0u64.. {
        let key = i.to_be_bytes();
        if b.size_bytes() + BatchBuilder::record_size(Some(&key), &value, &[]) > bytes {
            break;
        }
        b.push(NOW_MS, Some(&key), &value, &[]);
    }
    ValidatedBatch::new(b.finish()).expect("valid batch")
}

/// A partition log that starts over, in a fresh directory, once it reaches `LOG_CAP`.
struct BenchLog {
    fs: bool,
    root: tempfile::TempDir,
    generation: u32,
    log: PartitionLog,
}

impl BenchLog {
    fn new(fs: bool) -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let log = open(fs, root.path(), 0);
        BenchLog { fs, root, generation: 0, log }
    }

    /// Called outside the timed part before each append.
    fn reset_if_full(&mut self) {
        if self.log.size_bytes() < LOG_CAP {
            return;
        }
        self.generation += 1;
        let old = std::mem::replace(&mut self.log, open(self.fs, self.root.path(), self.generation));
        if self.fs {
            std::fs::remove_dir_all(old.dir()).expect("remove old log");
        }
    }

    fn append(&mut self, batch: &mut ValidatedBatch) {
        self.log.append(batch, 0, NOW_MS).expect("append");
    }
}

fn open(fs: bool, root: &Path, generation: u32) -> PartitionLog {
    // A new MemStorage per log, so a reset frees the old log's memory.
    let storage: Arc<dyn Storage> = if fs { Arc::new(FsStorage::new()) } else { Arc::new(MemStorage::new()) };
    let dir = root.join(format!("p{generation}"));
    PartitionLog::open(storage, dir, LogConfig::default(), NOW_MS).expect("open log").0
}

fn append_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("log_append");
    for (fs, size, name) in [(true, 64 * KIB, "64KiB"), (true, MIB, "1MiB"), (false, MIB, "1MiB")] {
        let mut batch = batch_of(size);
        let mut log = BenchLog::new(fs);
        g.throughput(Throughput::Bytes(batch.len() as u64));
        g.bench_function(BenchmarkId::new(if fs { "fs" } else { "mem" }, name), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    log.reset_if_full();
                    let start = Instant::now();
                    log.append(black_box(&mut batch));
                    timed += start.elapsed();
                }
                timed
            })
        });
    }
    g.finish();
}

fn read_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("log_read");
    let mut batch = batch_of(64 * KIB);
    let mut log = BenchLog::new(true);
    while log.log.size_bytes() < 64 * MIB as u64 {
        log.append(&mut batch);
    }
    let mid = log.log.next_offset() / 2;
    let plan = log.log.read_plan(mid, MIB).expect("read plan");
    g.throughput(Throughput::Bytes(plan.len() as u64));
    g.bench_function(BenchmarkId::new("fs", "1MiB"), |b| {
        b.iter(|| log.log.read_plan(black_box(mid), MIB).expect("read plan").execute().expect("read"))
    });
    g.finish();
}

fn sync_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("log_sync");
    // One fdatasync takes milliseconds: few, equal samples keep the run short.
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    let mut batch = batch_of(MIB);
    let mut log = BenchLog::new(true);
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.bench_function(BenchmarkId::new("fs", "after_1MiB"), |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                log.reset_if_full();
                log.append(&mut batch);
                let handle = log.log.sync_handle();
                let start = Instant::now();
                handle.sync().expect("sync");
                timed += start.elapsed();
            }
            timed
        })
    });
    g.finish();
}

criterion_group!(benches, append_bench, read_bench, sync_bench);
criterion_main!(benches);
