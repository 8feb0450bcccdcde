//! The log against a model (a `Vec` of batches with their offsets and epochs): random
//! sequences of leader and follower appends, truncations, rolls, syncs, reopens and power
//! losses on the in-memory storage. After every step reads at every offset, the log start and
//! end, and the epoch record and its lookups match the model; after a power loss the log is a
//! prefix of the model holding everything synced. Failing cases are saved by proptest in
//! `broker/proptest-regressions/log/model_tests.txt` and replay first on the next run.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use quiver_protocol::batch::BatchHeader;

use super::replication_tests::read_all;
use super::tests::{batch, TestResult, DIR};
use super::*;
use crate::storage::MemStorage;

#[derive(Debug, Clone)]
enum Op {
    /// A leader's append, `bump` epochs above the current one.
    Lead { records: usize, bump: i32 },
    /// A follower's append of a batch stamped by the leader.
    Follow { records: usize, bump: i32 },
    /// An epoch begun with no batch yet.
    Begin { bump: i32 },
    /// An append or begin with an epoch below the latest: refused.
    Regress,
    /// Truncation at the start of the `pick`-th batch (modulo, or the end); `inside` aims one
    /// offset into the batch instead, which is refused unless it holds one record.
    Truncate { pick: usize, inside: bool },
    /// Time passes past `segment_ms`: the next append rolls.
    Roll,
    /// An fsync, and sometimes a recovery-point checkpoint.
    Sync { checkpoint: bool },
    /// A clean close and reopen.
    Reopen,
    /// Power loss (0: synced bytes only; 1: a torn tail; 2: a lost block in the unsynced
    /// bytes), then reopen.
    Crash { kind: u8, n: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1..4usize, prop_oneof![8 => Just(0), 1 => Just(1), 1 => Just(2)]).prop_map(|(records, bump)| Op::Lead { records, bump }),
        4 => (1..4usize, prop_oneof![8 => Just(0), 2 => Just(1)]).prop_map(|(records, bump)| Op::Follow { records, bump }),
        1 => (1..3i32).prop_map(|bump| Op::Begin { bump }),
        1 => Just(Op::Regress),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(pick, inside)| Op::Truncate { pick, inside }),
        1 => Just(Op::Roll),
        2 => any::<bool>().prop_map(|checkpoint| Op::Sync { checkpoint }),
        1 => Just(Op::Reopen),
        2 => (0..3u8, 0..400usize).prop_map(|(kind, n)| Op::Crash { kind, n }),
    ]
}

/// The model: the batches as stored, the epoch entries as Kafka keeps them, and how many
/// batches a completed fsync covers.
#[derive(Debug, Default)]
struct Model {
    batches: Vec<Bytes>,
    epochs: Vec<EpochEntry>,
    synced: usize,
}

impl Model {
    fn end(&self) -> u64 {
        self.batches.last().and_then(|b| BatchHeader::parse(b).ok()).map_or(0, |h| h.next_offset())
    }

    fn latest(&self) -> Option<i32> {
        self.epochs.last().map(|e| e.epoch)
    }

    fn begin(&mut self, epoch: i32) {
        if self.latest().is_some_and(|l| l >= epoch) {
            return;
        }
        let end = self.end();
        self.epochs.retain(|e| e.start < end);
        self.epochs.push(EpochEntry { epoch, start: end });
    }

    fn truncate(&mut self, keep: usize) {
        self.batches.truncate(keep);
        self.synced = self.synced.min(keep);
        let end = self.end();
        self.epochs.retain(|e| e.start < end);
    }

    /// What reopening keeps: epochs that got no batch are dropped.
    fn reopened(&mut self) {
        let end = self.end();
        self.epochs.retain(|e| e.start < end);
    }

    /// Kafka's `OffsetsForLeaderEpoch`, written out plainly.
    fn end_offset_for(&self, epoch: i32) -> Option<(i32, u64)> {
        let latest = self.epochs.last()?;
        if latest.epoch == epoch {
            return Some((epoch, self.end()));
        }
        let higher = self.epochs.iter().find(|e| e.epoch > epoch)?;
        match self.epochs.iter().rev().find(|e| e.epoch <= epoch) {
            Some(floor) => Some((floor.epoch, higher.start)),
            None => Some((epoch, higher.start)),
        }
    }
}

fn check(log: &PartitionLog, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(log.log_start_offset(), 0);
    prop_assert_eq!(log.next_offset(), model.end());
    let got = read_all(log).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(got == model.batches, "batches differ");
    for b in &model.batches {
        let h = BatchHeader::parse(b).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for offset in h.base_offset..=h.last_offset() {
            let plan = log.read_plan(offset, 0).and_then(|p| p.execute());
            let first = plan.map_err(|e| TestCaseError::fail(format!("read at {offset}: {e}")))?;
            prop_assert!(first.starts_with(b), "read at {}", offset);
            prop_assert_eq!(log.epoch_at(offset), Some(h.leader_epoch));
        }
    }
    prop_assert_eq!(log.epoch_at(model.end()), None);
    prop_assert_eq!(log.epoch_entries(), &model.epochs[..]);
    let top = model.latest().unwrap_or(0);
    for epoch in 0..=top + 1 {
        prop_assert_eq!(log.end_offset_for_epoch(epoch), model.end_offset_for(epoch), "epoch {}", epoch);
    }
    Ok(())
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let fail = |e: LogError| TestCaseError::fail(e.to_string());
    let mem = Arc::new(MemStorage::new());
    let storage: Arc<dyn Storage> = mem.clone();
    let dir = Path::new(DIR);
    let cfg = LogConfig { segment_ms: 1000, ..super::tests::config(300) };
    let reopen = |now: i64| PartitionLog::open(storage.clone(), dir.to_path_buf(), cfg.clone(), now);
    let (mut log, _) = reopen(0).map_err(fail)?;
    let mut model = Model::default();
    let mut now = 0i64;
    for (step, op) in ops.iter().enumerate() {
        let current = model.latest().unwrap_or(0);
        match *op {
            Op::Lead { records, bump } => {
                let epoch = current + bump;
                let mut b = batch(step as u64, records, now);
                let info = log.append(&mut b, epoch, now).map_err(fail)?;
                prop_assert_eq!(info.base_offset, model.end());
                model.begin(epoch);
                model.batches.push(b.freeze());
            }
            Op::Follow { records, bump } => {
                let epoch = current + bump;
                let mut b = batch(step as u64, records, now);
                b.stamp(model.end(), epoch);
                log.append_replicated(&b, now, None).map_err(fail)?;
                model.begin(epoch);
                model.batches.push(b.freeze());
            }
            Op::Begin { bump } => {
                log.begin_epoch(current + bump).map_err(fail)?;
                model.begin(current + bump);
            }
            Op::Regress => {
                if let Some(latest) = model.latest().filter(|&l| l > 0) {
                    let refused = log.begin_epoch(latest - 1);
                    prop_assert!(matches!(refused, Err(LogError::EpochRegressed { .. })), "{:?}", refused);
                    let mut b = batch(step as u64, 1, now);
                    b.stamp(model.end(), latest - 1);
                    let refused = log.append_replicated(&b, now, None);
                    prop_assert!(matches!(refused, Err(LogError::EpochRegressed { .. })), "{:?}", refused);
                }
            }
            Op::Truncate { pick, inside } => {
                let keep = pick % (model.batches.len() + 1);
                let base = match model.batches.get(keep) {
                    Some(b) => BatchHeader::parse(b).map_err(|e| TestCaseError::fail(e.to_string()))?,
                    None => {
                        log.truncate_to(model.end()).map_err(fail)?;
                        model.truncate(keep);
                        continue;
                    }
                };
                if inside && base.records_count > 1 {
                    let refused = log.truncate_to(base.base_offset + 1);
                    prop_assert!(matches!(refused, Err(LogError::NotBatchBoundary { .. })), "{:?}", refused);
                } else {
                    log.truncate_to(base.base_offset).map_err(fail)?;
                    model.truncate(keep);
                }
            }
            Op::Roll => now += 1000,
            Op::Sync { checkpoint } => {
                log.sync().map_err(fail)?;
                if checkpoint {
                    log.recovery_checkpoint().write().map_err(fail)?;
                }
                model.synced = model.batches.len();
            }
            Op::Reopen => {
                drop(log);
                log = reopen(now).map_err(fail)?.0;
                model.reopened();
            }
            Op::Crash { kind, n } => {
                drop(log);
                match kind {
                    0 => mem.crash(),
                    1 => mem.crash_torn(n),
                    _ => mem.crash_reordered(n..n + 50),
                }
                let (reopened, report) = reopen(now).map_err(fail)?;
                log = reopened;
                prop_assert!(report.damaged.is_empty(), "step {}: {:?}", step, report.damaged);
                let got = read_all(&log).map_err(fail)?;
                prop_assert!(got.len() >= model.synced, "step {}: synced batches lost", step);
                prop_assert!(
                    got[..] == model.batches[..got.len()],
                    "step {}: not a prefix of the model",
                    step
                );
                model.truncate(got.len());
                model.reopened();
            }
        }
        check(&log, &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_log_matches_its_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(&ops)?;
    }
}

/// A sequence the model test found worth keeping: truncation below a checkpointed recovery
/// point followed by unsynced appends and a power loss that zeroes a block of them.
#[test]
fn truncation_below_the_recovery_point_then_power_loss() -> TestResult {
    let mut ops = Vec::new();
    for _ in 0..6 {
        ops.push(Op::Lead { records: 2, bump: 0 });
    }
    ops.push(Op::Sync { checkpoint: true });
    ops.push(Op::Truncate { pick: 2, inside: false });
    ops.push(Op::Lead { records: 3, bump: 1 });
    ops.push(Op::Lead { records: 3, bump: 0 });
    ops.push(Op::Crash { kind: 2, n: 0 });
    run(&ops).map_err(|e| e.to_string().into())
}
