//! A seeded, deterministic simulation of one partition's replicas (docs/replication.md §9.1):
//! three to five raft-rs `RawNode`s over real segment logs on `MemStorage` (with its crash
//! model: unsynced bytes lost, tails torn), an in-memory network that loses, delays,
//! duplicates and reorders messages and cuts links (both ways or one way), time as ticks. No
//! threads, no sockets: a seed replays a run exactly. The invariants of §5 are checked after
//! every step.
//!
//! The harness and its checker live here; the randomised scenarios in `scenarios`, the
//! scripted Figure-8 run of the Raft paper in `figure8`, a follower catching up from a
//! snapshot (losing power mid-install on an armed storage fault budget) in `snapshot`
//! (sim_snapshot_tests.rs), the storage adapter's own test in `storage_adapter`. Below a
//! replica's log start (a snapshot installed, a prefix deleted) the checker has nothing to
//! compare.

mod figure8;
mod membership;
mod scenarios;
#[path = "sim_snapshot_tests.rs"]
mod snapshot;
mod storage_adapter;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering::SeqCst};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use quiver_protocol::batch::{BatchBuilder, BatchHeader, ValidatedBatch};
use raft::eraftpb::{Message, MessageType};
use raft::{RawNode, StateRole, Storage as _};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::log::{LogConfig, PartitionLog};
use crate::storage::{MemStorage, Storage};

type Error = Box<dyn std::error::Error>;

const DIR: &str = "/data/t-0";
const SEED: u64 = 0x5eed_0017;
/// Simulated time one tick stands for.
const TICK_MS: i64 = 10;
/// A message not delivered this long after it became deliverable is lost: a network holds a
/// packet for a bounded time. (Without a bound, a random pick among hundreds of queued
/// messages delivered a dead replica's answers seconds after its crash, and kept a lone
/// leader believing in a quorum.)
const MAX_IN_FLIGHT_MS: i64 = 500;

fn log_config() -> LogConfig {
    // Small segments: appends, truncation and reads cross segment boundaries.
    LogConfig { segment_bytes: 2048, index_interval_bytes: 256, ..LogConfig::default() }
}

/// The negative control's log: one segment for the whole run, so what a power loss takes is
/// the unsynced tail. (With small segments it also empties closed segments whose names are
/// durable, leaving gaps in the offsets that recovery does not refuse: out of the fault model,
/// and reported, not tested, here.)
fn no_sync_log_config() -> LogConfig {
    LogConfig { segment_bytes: 1 << 20, ..log_config() }
}

/// Which invariant a run broke: the negative control asserts the checker caught the loss it
/// provoked, not some other failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broken {
    /// A committed entry is not held durably (same bytes, synced, under a durable name) by a
    /// majority of the replicas.
    Durability,
    /// A committed entry was lost, replaced or differs between replicas, or its offsets are not
    /// the ones the history gave them.
    Committed,
    /// Two leaders in a term, a commit going back, a repairing or lone replica leading.
    Other,
}

/// An invariant the checker found broken, with the seed that replays it.
#[derive(Debug)]
struct Violation {
    seed: u64,
    broken: Broken,
    what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seed {:#x}: {:?}: {}", self.seed, self.broken, self.what)
    }
}

impl std::error::Error for Violation {}

/// The invariant `e` broke, if it is a checker's finding (and not a harness error).
fn broken(e: &Error) -> Option<Broken> {
    e.downcast_ref::<Violation>().map(|v| v.broken)
}

/// Log files (segments, indexes, epoch and recovery records) whose `sync` does nothing: the
/// negative control (a broker that never fsyncs its log), which the checker must catch.
/// `raft-state` keeps its fsync, so a replica restarts and the loss shows as lost entries,
/// not as a corrupt state file.
#[derive(Debug, Default)]
struct NoSync;

#[derive(Debug)]
struct NoSyncFile(Arc<dyn crate::storage::StorageFile>);

impl crate::storage::FileWrapper for NoSync {
    fn wrap(
        &self,
        path: &Path,
        file: Arc<dyn crate::storage::StorageFile>,
    ) -> Arc<dyn crate::storage::StorageFile> {
        let raft_state =
            path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(crate::log::RAFT_STATE_FILE));
        match raft_state {
            true => file,
            false => Arc::new(NoSyncFile(file)),
        }
    }
}

impl crate::storage::StorageFile for NoSyncFile {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_exact_at(pos, buf)
    }
    fn append(&self, data: &[u8]) -> std::io::Result<()> {
        self.0.append(data)
    }
    fn truncate(&self, len: u64) -> std::io::Result<()> {
        self.0.truncate(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `MemStorage` behind an `Arc`, as a `Storage` (for `Wrapped`).
#[derive(Debug)]
struct SharedMem(Arc<MemStorage>);

impl Storage for SharedMem {
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        self.0.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        self.0.list(dir)
    }
    fn open(&self, path: &Path) -> std::io::Result<Arc<dyn crate::storage::StorageFile>> {
        self.0.open(path)
    }
    fn open_segment(&self, path: &Path) -> std::io::Result<Arc<dyn crate::storage::StorageFile>> {
        self.0.open_segment(path)
    }
    fn fds_per_segment_file(&self) -> u64 {
        self.0.fds_per_segment_file()
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        self.0.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.0.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.0.sync_dir(dir)
    }
}

/// How a simulation is built.
#[derive(Debug, Clone, Copy)]
struct Opts {
    /// Voters, ids `1..=replicas`.
    replicas: usize,
    /// The negative control: segment files are never fsynced.
    no_sync: bool,
    /// raft-rs' `max_size_per_msg`: 1 sends one entry per append (the scripted Figure-8 run
    /// steers entries one by one).
    max_msg_bytes: Option<u64>,
    /// The group's first voters are ids `1..=initial_voters` (all by default); the others
    /// start outside the configuration, as a broker that will join (§11).
    initial_voters: Option<usize>,
}

impl Opts {
    fn replicas(replicas: usize) -> Opts {
        Opts { replicas, no_sync: false, max_msg_bytes: None, initial_voters: None }
    }
}

/// The replica count a seed runs with: 3, 4 or 5.
fn replicas_for(seed: u64) -> usize {
    3 + (seed % 3) as usize
}

/// What the network does to messages. Percentages are per message.
#[derive(Debug, Clone, Copy)]
struct NetFaults {
    drop_percent: u32,
    /// Messages held back `1..=max_delay_ms` of simulated time before they can be delivered.
    delay_percent: u32,
    max_delay_ms: i64,
    /// Messages sent twice; the copy arrives up to four maximal delays later.
    dup_percent: u32,
}

impl NetFaults {
    const DEFAULT: NetFaults =
        NetFaults { drop_percent: 10, delay_percent: 20, max_delay_ms: 50, dup_percent: 5 };
    const NONE: NetFaults = NetFaults { drop_percent: 0, delay_percent: 0, max_delay_ms: 0, dup_percent: 0 };
}

/// A message on the wire, deliverable once the simulated clock reaches `due_ms`.
struct Flight {
    m: Message,
    due_ms: i64,
}

struct Replica {
    mem: Arc<MemStorage>,
    /// Mutating storage operations left before the replica "crashes" (negative: never); see
    /// `storage::countdown`. Armed by `snap_fault` when a snapshot reaches the replica.
    fault: Arc<AtomicI64>,
    /// Arms `fault` with this budget when the next snapshot is delivered to the replica.
    snap_fault: Option<i64>,
    /// `None` while crashed.
    node: Option<RawNode<LogStorage>>,
    /// The commit index seen last while running (never goes back in one run).
    commit: u64,
    /// Indexes already compared with the cluster's committed history.
    checked: u64,
    /// The committed indexes `1..=held` this replica holds durably (the same bytes, fsynced,
    /// under durable file names): what it would keep through a power loss now. Recomputed on
    /// restart.
    held: u64,
    /// While down: the batches its disk kept after index `held` (as of the crash). Entries it
    /// acknowledged before crashing can commit later; they count as held then.
    kept: Vec<Bytes>,
    /// Ticks it was given while up.
    ticks: u64,
    /// Removed from the group and stopped for good (§11): no longer checked or restarted.
    retired: bool,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    opts: Opts,
    /// The replicas in play (a retired one leaves).
    ids: Vec<u64>,
    /// The group's first configuration.
    first_voters: Vec<u64>,
    /// Every configuration a running replica was seen to apply, in order: (conf index,
    /// voters). Applied means committed, so the last is the group's.
    confs: Vec<(u64, Vec<u64>)>,
    replicas: Vec<Replica>,
    net: Vec<Flight>,
    faults: NetFaults,
    /// Cut links, `(from, to)`: a message on a cut link is lost when it would be delivered.
    cut: BTreeSet<(u64, u64)>,
    /// Whether the durable-majority check runs (off in one half of the negative control).
    check_durable: bool,
    /// term -> the leader seen in it.
    leaders: BTreeMap<u64, u64>,
    /// The committed history: index -> the stored batch's bytes.
    committed: Vec<Bytes>,
    /// The term of the replica that first reported each index committed: the entry was
    /// committed in that term or earlier.
    committed_term: Vec<u64>,
    /// The offset the next committed batch must start at (offsets are contiguous).
    next_offset: u64,
    now_ms: i64,
    proposed: u64,
    /// Replicas that lost power on an injected storage fault (and rebooted).
    power_losses: u64,
}

/// The stored bytes of the batch with ordinal `index`.
fn batch_at(log: &PartitionLog, index: u64) -> Result<Bytes, Error> {
    let offset = log.offset_of_ordinal(index)?.ok_or("no such ordinal")?;
    let bytes = log.read_plan(offset, 1)?.execute()?;
    let h = BatchHeader::parse(&bytes)?;
    Ok(bytes.slice(..h.total_len()))
}

/// Whether `log` holds `known` at `index` and a crash now would keep it.
fn durably_holds(mem: &MemStorage, log: &PartitionLog, index: u64, known: &Bytes) -> Result<bool, Error> {
    if index < log.first_ordinal() || index >= log.next_ordinal() {
        return Ok(false);
    }
    let offset = log.offset_of_ordinal(index)?.ok_or("no such ordinal")?;
    let plan = log.read_plan(offset, 1)?;
    let bytes = plan.execute()?;
    let len = BatchHeader::parse(&bytes)?.total_len();
    if bytes.get(..len) != Some(&known[..]) {
        return Ok(false);
    }
    let (path, position) = plan.location();
    Ok(mem.durable_len(path).is_some_and(|d| d >= position + len as u64))
}

fn is_election(m: &Message) -> bool {
    use MessageType::*;
    matches!(
        m.get_msg_type(),
        MsgRequestVote | MsgRequestVoteResponse | MsgRequestPreVote | MsgRequestPreVoteResponse
    )
}

impl Sim {
    fn new(seed: u64, opts: Opts) -> Result<Sim, Error> {
        let ids: Vec<u64> = (1..=opts.replicas as u64).collect();
        let first_voters = ids[..opts.initial_voters.unwrap_or(opts.replicas)].to_vec();
        let mut sim = Sim {
            seed,
            rng: StdRng::seed_from_u64(seed),
            opts,
            ids: ids.clone(),
            first_voters: first_voters.clone(),
            confs: vec![(0, first_voters)],
            replicas: Vec::new(),
            net: Vec::new(),
            faults: NetFaults::DEFAULT,
            cut: BTreeSet::new(),
            check_durable: true,
            leaders: BTreeMap::new(),
            committed: Vec::new(),
            committed_term: Vec::new(),
            next_offset: 0,
            now_ms: 0,
            proposed: 0,
            power_losses: 0,
        };
        for id in ids {
            let mem = Arc::new(MemStorage::new());
            let fault = Arc::new(AtomicI64::new(-1));
            let node = sim.open_node(id, &mem, &fault)?;
            sim.replicas.push(Replica {
                mem,
                fault,
                snap_fault: None,
                node: Some(node),
                commit: 0,
                checked: 0,
                held: 0,
                kept: Vec::new(),
                ticks: 0,
                retired: false,
            });
        }
        Ok(sim)
    }

    /// A seed's own network: loss, delay and duplication rates drawn from it.
    fn randomize_faults(&mut self) {
        self.faults = NetFaults {
            drop_percent: self.rng.gen_range(0..=20),
            delay_percent: self.rng.gen_range(0..=50),
            max_delay_ms: self.rng.gen_range(1..=10) * TICK_MS,
            dup_percent: self.rng.gen_range(0..=10),
        };
    }

    fn open_node(
        &self,
        id: u64,
        mem: &Arc<MemStorage>,
        fault: &Arc<AtomicI64>,
    ) -> Result<RawNode<LogStorage>, Error> {
        let storage: Arc<dyn Storage> = match self.opts.no_sync {
            true => Arc::new(crate::storage::Wrapped { inner: SharedMem(mem.clone()), wrapper: NoSync }),
            // Mutating operations fail once an armed fault budget runs out (a power loss there).
            false => Arc::new(crate::storage::countdown::Countdown::new(mem.clone(), fault.clone())),
        };
        let log_config = match self.opts.no_sync {
            true => no_sync_log_config(),
            false => log_config(),
        };
        let (log, _) = PartitionLog::open(storage.clone(), DIR.into(), log_config, self.now_ms)?;
        let store = LogStorage::open(Arc::new(Mutex::new(log)), storage, &self.first_voters)?;
        let mut config = config(id, store.applied());
        if let Some(max) = self.opts.max_msg_bytes {
            config.max_size_per_msg = max;
        }
        Ok(RawNode::new(&config, store, &raft_logger())?)
    }

    /// A majority of the voters.
    fn majority(&self) -> usize {
        self.voters().len() / 2 + 1
    }

    /// The voters of the newest configuration a replica was seen to apply.
    fn voters(&self) -> Vec<u64> {
        self.confs.last().map(|c| c.1.clone()).unwrap_or_default()
    }

    fn fail(&self, broken: Broken, what: String) -> Error {
        Box::new(Violation { seed: self.seed, broken, what })
    }

    fn replica(&mut self, id: u64) -> &mut Replica {
        &mut self.replicas[(id - 1) as usize]
    }

    fn node(&self, id: u64) -> Option<&RawNode<LogStorage>> {
        self.replicas[(id - 1) as usize].node.as_ref()
    }

    fn is_leader(&self, id: u64) -> bool {
        self.node(id).is_some_and(|n| n.raft.state == StateRole::Leader)
    }

    fn leader(&self) -> Option<u64> {
        let leaders = self
            .replicas
            .iter()
            .filter_map(|r| r.node.as_ref())
            .filter(|n| n.raft.state == StateRole::Leader);
        // With several (an old one not yet stepped down), the one of the highest term.
        leaders.max_by_key(|n| n.raft.term).map(|n| n.raft.id)
    }

    fn up(&self) -> Vec<u64> {
        self.ids.iter().copied().filter(|&id| self.node(id).is_some()).collect()
    }

    fn down(&self) -> Vec<u64> {
        self.ids.iter().copied().filter(|&id| self.node(id).is_none()).collect()
    }

    /// Handles every pending `Ready` until none is left, sending the messages. A replica whose
    /// armed storage fault fires loses power there and reboots once the others are settled.
    fn settle(&mut self) -> Result<(), Error> {
        let mut faulted = Vec::new();
        loop {
            let mut sent = Vec::new();
            for r in &mut self.replicas {
                let Some(node) = r.node.as_mut() else { continue };
                if !node.has_ready() {
                    continue;
                }
                let out = match handle_ready(node, self.now_ms, &mut |m| sent.extend(m)) {
                    Ok(out) => out,
                    // An injected fault: the replica loses power there (and reboots below).
                    Err(_) if r.fault.load(SeqCst) == 0 => {
                        let id = node.raft.id;
                        // What it had committed in memory counts as seen (restart checks it).
                        r.commit = r.commit.max(node.raft.raft_log.committed);
                        r.fault.store(-1, SeqCst);
                        r.node = None;
                        // Its disk is checked afresh on restart; nothing is counted as kept.
                        r.kept.clear();
                        r.mem.crash();
                        faulted.push(id);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                sent.extend(out.messages.into_iter().filter(|m| crate::replica::may_send(node, m)));
            }
            if sent.is_empty()
                && !self.replicas.iter().any(|r| r.node.as_ref().is_some_and(|n| n.has_ready()))
            {
                if faulted.is_empty() {
                    return Ok(());
                }
                for id in std::mem::take(&mut faulted) {
                    self.power_losses += 1;
                    self.restart(id)?;
                }
                continue;
            }
            for m in sent {
                self.send(m);
            }
        }
    }

    /// Puts `m` on the wire: now, or after a delay; sometimes twice.
    fn send(&mut self, m: Message) {
        let f = self.faults;
        let delay = match self.rng.gen_range(0..100) < f.delay_percent {
            true => self.rng.gen_range(1..=f.max_delay_ms),
            false => 0,
        };
        if self.rng.gen_range(0..100) < f.dup_percent {
            // A copy, sometimes long after the original (a retransmission overtaken by events).
            let late = self.rng.gen_range(0..=4 * f.max_delay_ms);
            self.net.push(Flight { m: m.clone(), due_ms: self.now_ms + late });
        }
        self.net.push(Flight { m, due_ms: self.now_ms + delay });
    }

    /// Steps `m` into its addressee, if it is up, through the gate every peer message passes
    /// (admit.rs); refusals (a response from an unknown peer, a stale message) are normal.
    /// A snapshot arms the addressee's storage fault budget if the test set one (`snap_fault`).
    fn deliver(&mut self, mut m: Message) {
        let r = self.replica(m.to);
        if m.get_msg_type() == MessageType::MsgSnapshot {
            if let Some(budget) = r.snap_fault.take() {
                r.fault.store(budget, SeqCst);
            }
        }
        if let Some(node) = r.node.as_mut() {
            if crate::replica::admit(node, &mut m).is_ok() {
                let _ = node.step(m);
            }
        }
    }

    /// Delivers (or loses) a random message among those due; false if none is. Messages past
    /// [`MAX_IN_FLIGHT_MS`] are lost first.
    fn deliver_due(&mut self) -> bool {
        let now = self.now_ms;
        self.net.retain(|f| now - f.due_ms <= MAX_IN_FLIGHT_MS);
        let due: Vec<usize> =
            self.net.iter().enumerate().filter(|(_, f)| f.due_ms <= self.now_ms).map(|(i, _)| i).collect();
        if due.is_empty() {
            return false;
        }
        let Flight { m, .. } = self.net.swap_remove(due[self.rng.gen_range(0..due.len())]);
        let lost =
            self.cut.contains(&(m.from, m.to)) || self.rng.gen_range(0..100) < self.faults.drop_percent;
        if !lost {
            self.deliver(m);
        }
        true
    }

    /// One tick of one random replica; the clock moves on.
    fn tick_one(&mut self) {
        let id = self.ids[self.rng.gen_range(0..self.ids.len())];
        self.now_ms += TICK_MS;
        let r = self.replica(id);
        if let Some(node) = r.node.as_mut() {
            node.tick();
            r.ticks += 1;
        }
    }

    /// One random step: a tick of one replica, a delivery (or loss) of a random due message,
    /// or a proposal on the leader.
    fn step(&mut self, propose_percent: u32) -> Result<(), Error> {
        let roll = self.rng.gen_range(0..100);
        if roll < propose_percent {
            if let Some(id) = self.leader() {
                self.propose(id)?;
            }
        } else if roll < 30 || !self.deliver_due() {
            self.tick_one();
        }
        self.settle()?;
        self.check()
    }

    /// Proposes a fresh batch on `id` (which must be up).
    fn propose(&mut self, id: u64) -> Result<(), Error> {
        self.proposed += 1;
        let mut b = BatchBuilder::new(256);
        for i in 0..self.rng.gen_range(1..4) {
            let value = format!("seed {:#x} proposal {} record {i}", self.seed, self.proposed);
            b.push(self.now_ms, None, value.as_bytes(), &[]);
        }
        let batch = ValidatedBatch::new(b.finish())?;
        let node = self.replica(id).node.as_mut().ok_or("proposer is down")?;
        match propose_batch(node, batch) {
            // A leader that is stepping down (check-quorum, a transfer) drops proposals.
            Ok(()) | Err(ReplicaError::Raft(raft::Error::ProposalDropped)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The invariants of docs/replication.md §5 that one step can break.
    fn check(&mut self) -> Result<(), Error> {
        for i in 0..self.replicas.len() {
            self.check_replica(i)?;
        }
        if self.check_durable {
            // After the history took in every replica's new commits.
            for i in 0..self.replicas.len() {
                self.update_held(i)?;
            }
            self.check_durable_majority()?;
        }
        Ok(())
    }

    fn check_replica(&mut self, i: usize) -> Result<(), Error> {
        let Some(node) = self.replicas[i].node.as_ref() else { return Ok(()) };
        let (id, term, commit) = (node.raft.id, node.raft.term, node.raft.raft_log.committed);
        let conf_index = node.store().conf_index();
        if self.confs.last().is_some_and(|c| conf_index > c.0) {
            let mut voters = node.store().conf_state().get_voters().to_vec();
            voters.sort_unstable();
            self.confs.push((conf_index, voters));
        }
        let is_leader = node.raft.state == StateRole::Leader;
        let log = node.store().log().clone();
        // 7. A replica repairing lost committed entries never leads (§7).
        if is_leader && node.store().repairing() {
            return Err(self
                .fail(Broken::Other, format!("replica {id} leads while repairing lost committed entries")));
        }
        // 1. Election safety: at most one leader per term.
        if is_leader {
            match self.leaders.insert(term, id) {
                Some(other) if other != id => {
                    return Err(
                        self.fail(Broken::Other, format!("two leaders in term {term}: {other} and {id}"))
                    )
                }
                _ => {}
            }
        }
        // 6. The commit never goes back while a replica runs.
        if commit < self.replicas[i].commit {
            let was = self.replicas[i].commit;
            return Err(
                self.fail(Broken::Other, format!("replica {id}: commit went back from {was} to {commit}"))
            );
        }
        self.replicas[i].commit = commit;
        // 3/4. Committed prefixes identical byte for byte: each newly committed index
        // matches the cluster's history (or extends it, at the next offset: each offset
        // holds one value).
        let log = log.lock();
        // Below the log start (a snapshot installed, a prefix deleted) nothing is held.
        let from = (self.replicas[i].checked + 1).max(log.first_ordinal());
        for index in from..=commit {
            let bytes = batch_at(&log, index)?;
            match self.committed.get((index - 1) as usize) {
                Some(known) if *known != bytes => {
                    return Err(self
                        .fail(Broken::Committed, format!("replica {id}: committed index {index} differs")))
                }
                Some(_) => {}
                None if index as usize == self.committed.len() + 1 => {
                    let h = BatchHeader::parse(&bytes)?;
                    if h.base_offset != self.next_offset {
                        return Err(self.fail(
                            Broken::Committed,
                            format!(
                                "replica {id}: committed index {index} starts at offset {}, not {}",
                                h.base_offset, self.next_offset
                            ),
                        ));
                    }
                    self.next_offset = h.next_offset();
                    self.committed.push(bytes);
                    self.committed_term.push(term);
                }
                None => {
                    return Err(
                        self.fail(Broken::Committed, format!("replica {id}: commit {commit} skips history"))
                    )
                }
            }
        }
        self.replicas[i].checked = commit.max(self.replicas[i].checked);
        // 3. Leader completeness: a leader holds everything committed in earlier terms (a
        // deposed leader that has not heard of it yet may still lack later entries).
        if is_leader {
            let due = self.committed.iter().zip(&self.committed_term).enumerate();
            for (k, (known, _)) in due.filter(|(_, (_, &t))| t < term) {
                let index = k as u64 + 1;
                if index < log.first_ordinal() {
                    continue; // covered by the snapshot at the log start
                }
                if index >= log.next_ordinal() || batch_at(&log, index)? != *known {
                    return Err(self.fail(
                        Broken::Committed,
                        format!("leader {id} (term {term}) lacks or differs at committed {index}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// What replica `i` holds durably: the last index counted must still be there (a
    /// truncation or a lost sync undoes it), then the count grows over new history.
    fn update_held(&mut self, i: usize) -> Result<(), Error> {
        let Some(node) = self.replicas[i].node.as_ref() else {
            let r = &mut self.replicas[i];
            let base = r.held;
            while let Some(known) = self.committed.get(r.held as usize) {
                match r.kept.get((r.held - base) as usize) {
                    Some(kept) if kept == known => r.held += 1,
                    _ => break,
                }
            }
            r.kept.drain(..(r.held - base) as usize);
            return Ok(());
        };
        let log = node.store().log().clone();
        let log = log.lock();
        let mem = self.replicas[i].mem.clone();
        // Committed indexes below the log start count as held: a snapshot covers them, or
        // retention deleted them (on purpose, below the high watermark).
        let below = (log.first_ordinal() - 1).min(self.committed.len() as u64);
        let mut held = self.replicas[i].held;
        if held > below && !durably_holds(&mem, &log, held, &self.committed[(held - 1) as usize])? {
            held = 0;
        }
        held = held.max(below);
        while (held as usize) < self.committed.len()
            && durably_holds(&mem, &log, held + 1, &self.committed[held as usize])?
        {
            held += 1;
        }
        self.replicas[i].held = held;
        Ok(())
    }

    /// Invariant 3 as durability: every committed (acknowledged) entry is held durably by a
    /// majority, counting the replicas that are down by what their disks kept, so that no
    /// power loss, however many replicas it hits, can take it from all of them.
    fn check_durable_majority(&self) -> Result<(), Error> {
        // Against the newest configuration, or the one before it: an entry committed by the
        // old majority just before a change applied may reach the new majority a moment later.
        let on_majority_of = |voters: &[u64]| {
            let mut held: Vec<u64> = voters.iter().map(|&id| self.replicas[(id - 1) as usize].held).collect();
            held.sort_unstable_by(|a, b| b.cmp(a));
            held[voters.len() / 2]
        };
        let voters = self.voters();
        let previous = self.confs.len().checked_sub(2).map(|i| on_majority_of(&self.confs[i].1));
        let on_majority = on_majority_of(&voters).max(previous.unwrap_or(0));
        if (on_majority as usize) < self.committed.len() {
            return Err(self.fail(
                Broken::Durability,
                format!(
                    "committed index {} is durable on fewer than {} of {} replicas (held: {:?})",
                    on_majority + 1,
                    self.majority(),
                    voters.len(),
                    self.replicas.iter().map(|r| r.held).collect::<Vec<_>>()
                ),
            ));
        }
        Ok(())
    }

    /// Power loss on replica `id`: unsynced bytes are gone (all but a torn `keep` bytes of
    /// each file's unsynced tail), the node with them.
    fn crash(&mut self, id: u64, keep: usize) -> Result<(), Error> {
        let i = (id - 1) as usize;
        if self.check_durable {
            self.update_held(i)?;
        }
        let r = &mut self.replicas[i];
        let Some(node) = r.node.take() else { return Ok(()) };
        // What the disk keeps past the committed history it holds: its own durable batches.
        r.kept.clear();
        if self.check_durable {
            let log = node.store().log().lock();
            for index in (r.held + 1).max(log.first_ordinal())..log.next_ordinal() {
                let bytes = batch_at(&log, index)?;
                if !durably_holds(&r.mem, &log, index, &bytes)? {
                    break;
                }
                r.kept.push(bytes);
            }
        }
        drop(node);
        r.mem.crash_torn(keep);
        Ok(())
    }

    /// Power loss with a random torn tail.
    fn crash_torn(&mut self, id: u64) -> Result<(), Error> {
        let keep = self.rng.gen_range(0..300);
        self.crash(id, keep)
    }

    /// Reopens the log and the hard state and starts a new `RawNode`.
    fn restart(&mut self, id: u64) -> Result<(), Error> {
        let (mem, fault) = (self.replica(id).mem.clone(), self.replica(id).fault.clone());
        let node = self.open_node(id, &mem, &fault)?;
        let persisted = node.raft.raft_log.committed;
        let r = self.replica(id);
        if persisted > r.commit {
            return Err(format!("replica {id} restarted with commit {persisted} past {}", r.commit).into());
        }
        // The persisted commit is a lower bound; everything in the log is checked again.
        (r.commit, r.checked, r.held) = (persisted, 0, 0);
        r.kept.clear();
        r.node = Some(node);
        Ok(())
    }

    fn run(&mut self, steps: usize, propose_percent: u32) -> Result<(), Error> {
        for _ in 0..steps {
            self.step(propose_percent)?;
        }
        Ok(())
    }

    /// Cuts every link to and from `id`.
    fn isolate(&mut self, id: u64) {
        for &other in self.ids.iter().filter(|&&o| o != id) {
            self.cut.insert((id, other));
            self.cut.insert((other, id));
        }
    }

    /// A new random partition in place of the old one: one replica cut off; a split into
    /// two sides; a replica that can send but not receive (or the reverse); or random links
    /// cut one way.
    fn partition(&mut self) {
        self.cut.clear();
        let pick = self.ids[self.rng.gen_range(0..self.ids.len())];
        match self.rng.gen_range(0..4) {
            0 => self.isolate(pick),
            1 => {
                let side: Vec<u64> = self.ids.iter().copied().filter(|_| self.rng.gen_bool(0.5)).collect();
                for &a in &side {
                    for &b in self.ids.iter().filter(|b| !side.contains(b)) {
                        self.cut.insert((a, b));
                        self.cut.insert((b, a));
                    }
                }
            }
            2 => {
                let inbound = self.rng.gen_bool(0.5);
                for &other in self.ids.iter().filter(|&&o| o != pick) {
                    self.cut.insert(if inbound { (other, pick) } else { (pick, other) });
                }
            }
            _ => {
                for &a in &self.ids {
                    for &b in self.ids.iter().filter(|&&b| b != a) {
                        if self.rng.gen_range(0..100) < 30 {
                            self.cut.insert((a, b));
                        }
                    }
                }
            }
        }
    }

    /// One random fault: a crash (of any replica, or of the leader right after it proposed,
    /// before the entry propagates), a restart, a new partition, or healing.
    fn fault(&mut self) -> Result<(), Error> {
        let (up, down) = (self.up(), self.down());
        match self.rng.gen_range(0..7) {
            0 if !up.is_empty() => {
                let id = up[self.rng.gen_range(0..up.len())];
                self.crash_torn(id)?;
            }
            1 => {
                if let Some(l) = self.leader() {
                    self.propose(l)?;
                    self.settle()?;
                    self.crash_torn(l)?;
                }
            }
            2 | 3 if !down.is_empty() => {
                let id = down[self.rng.gen_range(0..down.len())];
                self.restart(id)?;
            }
            4 => self.partition(),
            5 => self.cut.clear(),
            _ => {}
        }
        self.settle()?;
        self.check()
    }

    /// Heals the network, stops losing messages (delays and duplicates go on) and runs
    /// until every replica is up and has committed its whole log and the logs are equal;
    /// fails after `max_steps`.
    fn converge(&mut self, max_steps: usize) -> Result<(), Error> {
        self.cut.clear();
        self.faults.drop_percent = 0;
        for _ in 0..max_steps {
            self.step(0)?;
            if self.converged()? {
                return Ok(());
            }
        }
        Err(format!("seed {:#x}: no convergence in {max_steps} steps", self.seed).into())
    }

    fn converged(&self) -> Result<bool, Error> {
        let mut logs = Vec::new();
        // Compared from the latest log start: below it some replica holds only a snapshot.
        let mut start = 1;
        for r in self.replicas.iter().filter(|r| !r.retired) {
            let Some(node) = r.node.as_ref() else { return Ok(false) };
            start = start.max(node.store().first_index()?);
        }
        for r in self.replicas.iter().filter(|r| !r.retired) {
            let Some(node) = r.node.as_ref() else { return Ok(false) };
            let last = node.store().last_index()?;
            if node.raft.raft_log.committed != last {
                return Ok(false);
            }
            let log = node.store().log().lock();
            // The last index too: with every log emptied below the start, the batches alone
            // would compare equal for a replica still behind.
            let batches = (start..=last).map(|i| batch_at(&log, i)).collect::<Result<Vec<_>, _>>()?;
            logs.push((last, batches));
        }
        Ok(logs.windows(2).all(|w| w[0] == w[1]) && self.leader().is_some())
    }

    /// After convergence: every entry ever committed is in the (common) log, at its index.
    fn nothing_committed_lost(&self) -> Result<(), Error> {
        for r in self.replicas.iter().filter(|r| !r.retired) {
            let Some(node) = r.node.as_ref() else { continue };
            let log = node.store().log().lock();
            for (k, known) in self.committed.iter().enumerate() {
                let index = k as u64 + 1;
                if index < log.first_ordinal() {
                    continue; // covered by a snapshot or deleted by retention
                }
                if index >= log.next_ordinal() || batch_at(&log, index)? != *known {
                    return Err(self.fail(
                        Broken::Committed,
                        format!("replica {}: committed index {index} is lost or replaced", node.raft.id),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Damages the end of `id`'s active segment while the replica is down: a flipped byte in
    /// its last batch, or (`tear`) the batch cut short. Its recovery cuts the damaged tail,
    /// below its persisted commit if that tail was committed. False if the segment is too
    /// short to damage.
    fn damage_tail(&mut self, id: u64, tear: bool) -> Result<bool, Error> {
        let mem = self.replica(id).mem.clone();
        let seg = mem
            .list(Path::new(DIR))?
            .into_iter()
            .filter(|n| n.ends_with(".log"))
            .max()
            .ok_or("no segment")?;
        let path = Path::new(DIR).join(seg);
        let mut bytes = mem.contents(&path).ok_or("no segment contents")?;
        if bytes.len() < 80 {
            return Ok(false);
        }
        match tear {
            true => bytes.truncate(bytes.len() - self.rng.gen_range(1..40)),
            false => {
                let at = bytes.len() - 10;
                bytes[at] ^= 0x5a;
            }
        }
        mem.set_contents(&path, &bytes)?;
        let r = self.replica(id);
        (r.held, r.kept) = (0, Vec::new());
        Ok(true)
    }

    fn elect(&mut self, max_steps: usize) -> Result<u64, Error> {
        for _ in 0..max_steps {
            self.step(0)?;
            if let Some(id) = self.leader() {
                return Ok(id);
            }
        }
        Err(format!("seed {:#x}: no leader elected in {max_steps} steps", self.seed).into())
    }

    fn committed_len(&self) -> usize {
        self.committed.len()
    }
}
