//! The log against a model (a `Vec` of batches with their offsets, epochs and ordinals):
//! random sequences of leader and follower appends, truncations (by offset and by ordinal),
//! rolls, retention, syncs, reopens and power losses on the in-memory storage. After every step
//! reads at every offset, the log start and end, the epoch record and its lookups, and the
//! batch ordinals and their lookups match the model; after a power loss the log is a prefix of
//! the model holding everything synced, and every batch kept has the ordinal it had. Failing cases are saved by proptest in
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
    /// offset into the batch instead, which is refused unless it holds one record;
    /// `by_ordinal` truncates with `truncate_to_ordinal` (never inside).
    Truncate { pick: usize, inside: bool, by_ordinal: bool },
    /// Deletes the closed segments below the start of the `pick`-th batch (modulo, or the end).
    Retain { pick: usize },
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
        3 => (any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(pick, inside, by_ordinal)| Op::Truncate { pick, inside, by_ordinal }),
        1 => any::<usize>().prop_map(|pick| Op::Retain { pick }),
        1 => Just(Op::Roll),
        2 => any::<bool>().prop_map(|checkpoint| Op::Sync { checkpoint }),
        1 => Just(Op::Reopen),
        2 => (0..3u8, 0..400usize).prop_map(|(kind, n)| Op::Crash { kind, n }),
    ]
}

/// The model: the batches as stored from the log start, the epoch entries as Kafka keeps them,
/// how many batches a completed fsync covers, and the log start with its ordinal (the ordinal
/// of `batches[i]` is `first_ordinal + i`).
#[derive(Debug)]
struct Model {
    batches: Vec<Bytes>,
    epochs: Vec<EpochEntry>,
    synced: usize,
    start: u64,
    first_ordinal: u64,
}

impl Default for Model {
    fn default() -> Self {
        Model { batches: Vec::new(), epochs: Vec::new(), synced: 0, start: 0, first_ordinal: 1 }
    }
}

impl Model {
    fn end(&self) -> u64 {
        self.batches.last().and_then(|b| BatchHeader::parse(b).ok()).map_or(self.start, |h| h.next_offset())
    }

    fn next_ordinal(&self) -> u64 {
        self.first_ordinal + self.batches.len() as u64
    }

    /// Retention moved the log start to `start` (a batch boundary): the batches before it go,
    /// and the epochs wholly before it (Kafka's `truncateFromStart`).
    fn retain_from(&mut self, start: u64) {
        let gone = self
            .batches
            .iter()
            .take_while(|b| BatchHeader::parse(b).is_ok_and(|h| h.base_offset < start))
            .count();
        self.batches.drain(..gone);
        self.synced = self.synced.saturating_sub(gone);
        self.first_ordinal += gone as u64;
        self.start = start;
        if let Some(covering) = self.epochs.iter().rposition(|e| e.start <= start) {
            self.epochs.drain(..covering);
            self.epochs[0].start = start;
        }
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
    let fail = |e: LogError| TestCaseError::fail(e.to_string());
    prop_assert_eq!(log.log_start_offset(), model.start);
    prop_assert_eq!(log.next_offset(), model.end());
    prop_assert_eq!(log.first_ordinal(), model.first_ordinal);
    prop_assert_eq!(log.next_ordinal(), model.next_ordinal());
    prop_assert_eq!(log.offset_of_ordinal(model.next_ordinal()).map_err(fail)?, Some(model.end()));
    prop_assert_eq!(log.offset_of_ordinal(model.next_ordinal() + 1).map_err(fail)?, None);
    prop_assert_eq!(log.offset_of_ordinal(model.first_ordinal - 1).map_err(fail)?, None);
    prop_assert_eq!(log.ordinal_at(model.end()).map_err(fail)?, None);
    if model.start > 0 {
        prop_assert_eq!(log.ordinal_at(model.start - 1).map_err(fail)?, None);
    }
    for (i, b) in model.batches.iter().enumerate() {
        let h = BatchHeader::parse(b).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let ordinal = model.first_ordinal + i as u64;
        prop_assert_eq!(log.offset_of_ordinal(ordinal).map_err(fail)?, Some(h.base_offset));
        for offset in h.base_offset..=h.last_offset() {
            prop_assert_eq!(log.ordinal_at(offset).map_err(fail)?, Some(ordinal), "offset {}", offset);
        }
    }
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
            Op::Truncate { pick, inside, by_ordinal } => {
                let keep = pick % (model.batches.len() + 1);
                if by_ordinal {
                    log.truncate_to_ordinal(model.first_ordinal + keep as u64).map_err(fail)?;
                    model.truncate(keep);
                    let below = log.truncate_to_ordinal(model.first_ordinal.saturating_sub(1));
                    prop_assert!(
                        model.first_ordinal == 1 || matches!(below, Err(LogError::OrdinalOutOfRange { .. })),
                        "{:?}",
                        below
                    );
                    let above = log.truncate_to_ordinal(model.next_ordinal() + 1);
                    prop_assert!(matches!(above, Err(LogError::OrdinalOutOfRange { .. })), "{:?}", above);
                    check(&log, &model)?;
                    continue;
                }
                let base = match model.batches.get(keep) {
                    Some(b) => BatchHeader::parse(b).map_err(|e| TestCaseError::fail(e.to_string()))?,
                    None => {
                        log.truncate_to(model.end()).map_err(fail)?;
                        model.truncate(keep);
                        check(&log, &model)?;
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
            Op::Retain { pick } => {
                let pick = pick % (model.batches.len() + 1);
                let below = match model.batches.get(pick) {
                    Some(b) => {
                        BatchHeader::parse(b).map_err(|e| TestCaseError::fail(e.to_string()))?.base_offset
                    }
                    None => model.end(),
                };
                let report = log.delete_segments_below(below).map_err(fail)?;
                prop_assert!(report.log_start_offset <= below);
                model.retain_from(report.log_start_offset);
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
    ops.push(Op::Truncate { pick: 2, inside: false, by_ordinal: false });
    ops.push(Op::Lead { records: 3, bump: 1 });
    ops.push(Op::Lead { records: 3, bump: 0 });
    ops.push(Op::Crash { kind: 2, n: 0 });
    run(&ops).map_err(|e| e.to_string().into())
}
