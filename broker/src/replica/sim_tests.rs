//! A seeded, deterministic simulation of one partition's three replicas (docs/replication.md
//! §9.1): raft-rs `RawNode`s over real segment logs on `MemStorage` (with its crash model), an
//! in-memory network that drops and reorders, time as ticks. No threads, no sockets: a seed
//! replays a run exactly. The invariants of §5 are checked after every step.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use quiver_protocol::batch::{BatchBuilder, BatchHeader, ValidatedBatch};
use raft::eraftpb::Message;
use raft::{RawNode, StateRole, Storage as _};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::log::{LogConfig, PartitionLog};
use crate::storage::{MemStorage, Storage};

type Error = Box<dyn std::error::Error>;

const DIR: &str = "/data/t-0";
const IDS: [u64; 3] = [1, 2, 3];
const SEED: u64 = 0x5eed_0017;

fn log_config() -> LogConfig {
    // Small segments: appends, truncation and reads cross segment boundaries.
    LogConfig { segment_bytes: 2048, index_interval_bytes: 256, ..LogConfig::default() }
}

/// Files whose `sync` does nothing: the negative control (a broker without fsync), which the
/// checker must catch losing acknowledged entries in a majority crash.
#[derive(Debug, Default)]
struct NoSync;

#[derive(Debug)]
struct NoSyncFile(Arc<dyn crate::storage::StorageFile>);

impl crate::storage::FileWrapper for NoSync {
    fn wrap(
        &self,
        _: &Path,
        file: Arc<dyn crate::storage::StorageFile>,
    ) -> Arc<dyn crate::storage::StorageFile> {
        Arc::new(NoSyncFile(file))
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

struct Replica {
    mem: Arc<MemStorage>,
    /// Mutating storage operations left before the replica "crashes" (negative: never); see
    /// `storage::countdown`. Armed by `snap_fault` when a snapshot reaches the replica.
    fault: Arc<std::sync::atomic::AtomicI64>,
    /// Arms `fault` with this budget when the next snapshot is delivered to the replica.
    snap_fault: Option<i64>,
    /// `None` while crashed.
    node: Option<RawNode<LogStorage>>,
    /// The commit index seen last while running (never goes back in one run).
    commit: u64,
    /// Indexes already compared with the cluster's committed history.
    checked: u64,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    replicas: Vec<Replica>,
    net: Vec<Message>,
    /// Replica cut off from the others (messages to and from it are dropped).
    isolated: Option<u64>,
    drop_percent: u32,
    /// term -> the leader seen in it.
    leaders: BTreeMap<u64, u64>,
    /// The committed history: index -> the stored batch's bytes.
    committed: Vec<Bytes>,
    /// The term of the replica that first reported each index committed: the entry was
    /// committed in that term or earlier.
    committed_term: Vec<u64>,
    now_ms: i64,
    proposed: u64,
    /// Replicas that lost power on an injected storage fault (and rebooted).
    faults: u64,
}

/// The stored bytes of the batch with ordinal `index`.
fn batch_at(log: &PartitionLog, index: u64) -> Result<Bytes, Error> {
    let offset = log.offset_of_ordinal(index)?.ok_or("no such ordinal")?;
    let bytes = log.read_plan(offset, 1)?.execute()?;
    let h = BatchHeader::parse(&bytes)?;
    Ok(bytes.slice(..h.total_len()))
}

thread_local! {
    /// Set by the negative control: replicas' files skip fsync.
    static NO_SYNC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn open_node(
    id: u64,
    mem: &Arc<MemStorage>,
    fault: &Arc<std::sync::atomic::AtomicI64>,
    now_ms: i64,
) -> Result<RawNode<LogStorage>, Error> {
    let storage: Arc<dyn Storage> = if NO_SYNC.with(|n| n.get()) {
        Arc::new(crate::storage::Wrapped { inner: SharedMem(mem.clone()), wrapper: NoSync })
    } else {
        Arc::new(crate::storage::countdown::Countdown { mem: mem.clone(), budget: fault.clone() })
    };
    let (log, _) = PartitionLog::open(storage.clone(), DIR.into(), log_config(), now_ms)?;
    let store = LogStorage::open(Arc::new(Mutex::new(log)), storage, &IDS)?;
    let applied = store.applied();
    Ok(RawNode::new(&config(id, applied), store, &raft_logger())?)
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

impl Sim {
    fn new(seed: u64) -> Result<Sim, Error> {
        let mut replicas = Vec::new();
        for id in IDS {
            let mem = Arc::new(MemStorage::new());
            let fault = Arc::new(std::sync::atomic::AtomicI64::new(-1));
            let node = open_node(id, &mem, &fault, 0)?;
            replicas.push(Replica { mem, fault, snap_fault: None, node: Some(node), commit: 0, checked: 0 });
        }
        Ok(Sim {
            seed,
            rng: StdRng::seed_from_u64(seed),
            replicas,
            net: Vec::new(),
            isolated: None,
            drop_percent: 10,
            leaders: BTreeMap::new(),
            committed: Vec::new(),
            committed_term: Vec::new(),
            now_ms: 0,
            proposed: 0,
            faults: 0,
        })
    }

    fn fail(&self, what: String) -> Error {
        format!("seed {:#x}: {what}", self.seed).into()
    }

    fn replica(&mut self, id: u64) -> &mut Replica {
        &mut self.replicas[(id - 1) as usize]
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

    /// Handles every pending `Ready` until none is left, queueing the messages.
    fn settle(&mut self) -> Result<(), Error> {
        use std::sync::atomic::Ordering::SeqCst;
        let mut faulted = Vec::new();
        loop {
            let mut any = false;
            for r in &mut self.replicas {
                let Some(node) = r.node.as_mut() else { continue };
                if !node.has_ready() {
                    continue;
                }
                any = true;
                let mut early = Vec::new();
                let out = match handle_ready(node, self.now_ms, &mut |m| early.extend(m)) {
                    Ok(out) => out,
                    // An injected fault: the replica loses power there (and reboots below).
                    Err(_) if r.fault.load(SeqCst) == 0 => {
                        let id = node.raft.id;
                        // What it had committed in memory counts as seen (restart checks it).
                        r.commit = r.commit.max(node.raft.raft_log.committed);
                        r.fault.store(-1, SeqCst);
                        r.node = None;
                        r.mem.crash();
                        faulted.push(id);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                self.net.extend(early);
                for m in out.messages {
                    if !crate::replica::may_send(node, &m) {
                        continue;
                    }
                    self.net.push(m);
                }
            }
            if !any {
                if faulted.is_empty() {
                    return Ok(());
                }
                for id in std::mem::take(&mut faulted) {
                    self.faults += 1;
                    self.restart(id)?;
                }
            }
        }
    }

    /// One random step: a tick of one replica, a delivery (or drop) of a random message, or a
    /// proposal on the leader.
    fn step(&mut self, propose_percent: u32) -> Result<(), Error> {
        let roll = self.rng.gen_range(0..100);
        if roll < propose_percent {
            if let Some(id) = self.leader() {
                self.propose(id)?;
            }
        } else if roll < 30 || self.net.is_empty() {
            let id = IDS[self.rng.gen_range(0..IDS.len())];
            self.now_ms += 10;
            if let Some(node) = self.replica(id).node.as_mut() {
                node.tick();
            }
        } else {
            let m = self.net.swap_remove(self.rng.gen_range(0..self.net.len()));
            let cut = self.isolated.is_some_and(|i| i == m.from || i == m.to);
            if !cut && self.rng.gen_range(0..100) >= self.drop_percent {
                let r = self.replica(m.to);
                if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                    if let Some(budget) = r.snap_fault.take() {
                        r.fault.store(budget, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                if let Some(node) = r.node.as_mut() {
                    // Through the gate every peer message passes (admit.rs); refusals (a
                    // response from an unknown peer, a stale message) are normal.
                    let mut m = m;
                    if crate::replica::admit(node, &mut m).is_ok() {
                        let _ = node.step(m);
                    }
                }
            }
        }
        self.settle()?;
        self.check()
    }

    fn propose(&mut self, id: u64) -> Result<(), Error> {
        self.proposed += 1;
        let mut b = BatchBuilder::new(256);
        for i in 0..self.rng.gen_range(1..4) {
            let value = format!("seed {:#x} proposal {} record {i}", self.seed, self.proposed);
            b.push(self.now_ms, None, value.as_bytes(), &[]);
        }
        let batch = ValidatedBatch::new(b.finish())?;
        let node = self.replica(id).node.as_mut().ok_or("leader is down")?;
        match propose_batch(node, batch) {
            // A leader that is stepping down (check-quorum, a transfer) drops proposals.
            Ok(()) | Err(ReplicaError::Raft(raft::Error::ProposalDropped)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The invariants of docs/replication.md §5 that one step can break.
    fn check(&mut self) -> Result<(), Error> {
        for i in 0..self.replicas.len() {
            let Some(node) = self.replicas[i].node.as_ref() else { continue };
            let (id, term, commit) = (node.raft.id, node.raft.term, node.raft.raft_log.committed);
            let is_leader = node.raft.state == StateRole::Leader;
            let log = node.store().log().clone();
            // 7. A replica repairing lost committed entries never leads (§7).
            if is_leader && node.store().repairing() {
                return Err(self.fail(format!("replica {id} leads while repairing lost committed entries")));
            }
            // 1. Election safety: at most one leader per term.
            if is_leader {
                match self.leaders.insert(term, id) {
                    Some(other) if other != id => {
                        return Err(self.fail(format!("two leaders in term {term}: {other} and {id}")))
                    }
                    _ => {}
                }
            }
            // 6. The commit never goes back while a replica runs.
            if commit < self.replicas[i].commit {
                return Err(self.fail(format!(
                    "replica {id}: commit went back from {} to {commit}",
                    self.replicas[i].commit
                )));
            }
            self.replicas[i].commit = commit;
            // 3/4. Committed prefixes identical byte for byte: each newly committed index
            // matches the cluster's history (or extends it).
            let log = log.lock();
            // Below the log start (a snapshot installed, a prefix deleted) nothing is held.
            let from = (self.replicas[i].checked + 1).max(log.first_ordinal());
            for index in from..=commit {
                let bytes = batch_at(&log, index)?;
                match self.committed.get((index - 1) as usize) {
                    Some(known) if *known != bytes => {
                        return Err(self.fail(format!("replica {id}: committed index {index} differs")))
                    }
                    Some(_) => {}
                    None if index as usize == self.committed.len() + 1 => {
                        self.committed.push(bytes);
                        self.committed_term.push(term);
                    }
                    None => return Err(self.fail(format!("replica {id}: commit {commit} skips history"))),
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
                    if index >= log.next_ordinal() {
                        return Err(self.fail(format!("leader {id} (term {term}) lacks committed {index}")));
                    }
                    if batch_at(&log, index)? != *known {
                        return Err(
                            self.fail(format!("leader {id} (term {term}) differs at committed {}", k + 1))
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Power loss on replica `id`: unsynced bytes are gone, the node with them.
    fn crash(&mut self, id: u64) {
        let r = self.replica(id);
        r.node = None;
        r.mem.crash();
    }

    /// Reopens the log and the hard state and starts a new `RawNode`.
    fn restart(&mut self, id: u64) -> Result<(), Error> {
        let now = self.now_ms;
        let (mem, fault) = (self.replica(id).mem.clone(), self.replica(id).fault.clone());
        let node = open_node(id, &mem, &fault, now)?;
        let persisted = node.raft.raft_log.committed;
        let r = self.replica(id);
        if persisted > r.commit {
            return Err(format!("replica {id} restarted with commit {persisted} past {}", r.commit).into());
        }
        // The persisted commit is a lower bound; everything in the log is checked again.
        (r.commit, r.checked) = (persisted, 0);
        r.node = Some(node);
        Ok(())
    }

    fn run(&mut self, steps: usize, propose_percent: u32) -> Result<(), Error> {
        for _ in 0..steps {
            self.step(propose_percent)?;
        }
        Ok(())
    }

    /// Runs without drops or isolation until every replica is up and has committed its whole
    /// log and the logs are equal; fails after `max_steps`.
    fn converge(&mut self, max_steps: usize) -> Result<(), Error> {
        (self.isolated, self.drop_percent) = (None, 0);
        for _ in 0..max_steps {
            self.step(0)?;
            if self.converged()? {
                return Ok(());
            }
        }
        Err(self.fail(format!("no convergence in {max_steps} steps")))
    }

    fn converged(&self) -> Result<bool, Error> {
        let mut logs = Vec::new();
        // Compared from the latest log start: below it some replica holds only a snapshot.
        let mut start = 1;
        for r in &self.replicas {
            let Some(node) = r.node.as_ref() else { return Ok(false) };
            start = start.max(node.store().first_index()?);
        }
        for r in &self.replicas {
            let Some(node) = r.node.as_ref() else { return Ok(false) };
            let last = node.store().last_index()?;
            if node.raft.raft_log.committed != last {
                return Ok(false);
            }
            let log = node.store().log().lock();
            logs.push((start..=last).map(|i| batch_at(&log, i)).collect::<Result<Vec<_>, _>>()?);
        }
        Ok(logs.windows(2).all(|w| w[0] == w[1]) && self.leader().is_some())
    }

    /// After convergence: every entry ever committed is in the (common) log, at its index.
    fn nothing_committed_lost(&self) -> Result<(), Error> {
        for r in &self.replicas {
            let Some(node) = r.node.as_ref() else { continue };
            let log = node.store().log().lock();
            for (k, known) in self.committed.iter().enumerate() {
                let index = k as u64 + 1;
                if index < log.first_ordinal() {
                    continue; // covered by a snapshot or deleted by retention
                }
                if index >= log.next_ordinal() || batch_at(&log, index)? != *known {
                    return Err(self.fail(format!(
                        "replica {}: committed index {index} is lost or replaced",
                        node.raft.id
                    )));
                }
            }
        }
        Ok(())
    }

    /// Flips one byte in the last batch of `id`'s active segment (the replica is down): its
    /// recovery cuts the damaged tail, below its persisted commit if that tail was committed.
    fn damage_tail(&mut self, id: u64) -> Result<bool, Error> {
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
        let at = bytes.len() - 10;
        bytes[at] ^= 0x5a;
        mem.set_contents(&path, &bytes)?;
        Ok(true)
    }

    fn elect(&mut self, max_steps: usize) -> Result<u64, Error> {
        for _ in 0..max_steps {
            self.step(0)?;
            if let Some(id) = self.leader() {
                return Ok(id);
            }
        }
        Err(self.fail("no leader elected".into()))
    }

    fn committed_len(&self) -> usize {
        self.committed.len()
    }
}

/// The whole scenario for one seed: election, proposals under drops and reordering, a
/// follower crash and catch-up, an isolated leader whose unsynced and uncommitted tail is lost
/// or truncated on rejoin.
fn scenario(seed: u64) -> Result<(), Error> {
    let mut sim = Sim::new(seed)?;
    sim.elect(2_000)?;
    sim.run(600, 15)?;
    sim.converge(5_000)?;
    let first = sim.committed_len();
    if first < 3 {
        return Err(sim.fail(format!("only {first} entries committed")));
    }

    // A follower crashes, the others go on, it restarts and catches up.
    let leader = sim.leader().ok_or("no leader")?;
    let follower = IDS.iter().copied().find(|&i| i != leader).ok_or("no follower")?;
    sim.crash(follower);
    sim.run(300, 15)?;
    sim.restart(follower)?;
    sim.converge(5_000)?;

    // The leader is cut off and keeps proposing: its tail is appended (and fsynced) but never
    // committed. The others elect a new leader and commit other entries at those indexes.
    let old = sim.leader().ok_or("no leader")?;
    sim.isolated = Some(old);
    let committed_before = sim.replica(old).commit;
    for _ in 0..5 {
        sim.propose(old)?;
        sim.settle()?;
    }
    let tail: Vec<(u64, Bytes)> = {
        let node = sim.replica(old).node.as_ref().ok_or("old leader down")?;
        let log = node.store().log().lock();
        (committed_before + 1..log.next_ordinal())
            .map(|i| Ok((i, batch_at(&log, i)?)))
            .collect::<Result<_, Error>>()?
    };
    if tail.len() < 5 {
        return Err(sim.fail(format!("the isolated leader holds only {} uncommitted entries", tail.len())));
    }
    let mut new_leader = None;
    for _ in 0..5_000 {
        sim.step(10)?;
        new_leader = sim.leader().filter(|&l| l != old);
        if new_leader.is_some() && sim.committed_len() as u64 > tail[tail.len() - 1].0 {
            break;
        }
    }
    if new_leader.is_none() || sim.committed_len() as u64 <= tail[tail.len() - 1].0 {
        return Err(sim.fail("the majority did not elect a new leader and commit past the old tail".into()));
    }
    sim.crash(old);
    sim.isolated = None;
    sim.run(100, 10)?;
    sim.restart(old)?;
    sim.converge(10_000)?;
    // The old leader's uncommitted tail was replaced by the committed history.
    let terms: Vec<u64> = sim.leaders.keys().copied().collect();
    eprintln!(
        "seed {seed:#x}: {} committed, {} proposed, leader terms {terms:?}, old leader {old}'s tail {}..={} replaced",
        sim.committed_len(),
        sim.proposed,
        tail[0].0,
        tail[tail.len() - 1].0
    );
    let log = sim.replica(old).node.as_ref().ok_or("old leader down")?.store().log().clone();
    let log = log.lock();
    for (index, bytes) in &tail {
        if batch_at(&log, *index)? == *bytes {
            return Err(sim.fail(format!("old leader {old} still holds its uncommitted entry {index}")));
        }
    }
    Ok(())
}

/// Power loss on a majority at once, mid-traffic (unsynced writes lost), then back-to-back
/// leader kills before commits propagate; with fsync on nothing committed may be lost.
fn majority_crash(seed: u64) -> Result<(), Error> {
    let mut sim = Sim::new(seed)?;
    sim.elect(2_000)?;
    sim.run(400, 20)?;
    let leader = sim.leader().ok_or("no leader")?;
    let other = IDS.iter().copied().find(|&i| i != leader).ok_or("no follower")?;
    // Proposals in flight: appended on the leader, maybe not yet on the others.
    for _ in 0..3 {
        sim.propose(leader)?;
    }
    sim.settle()?;
    sim.crash(leader);
    sim.crash(other);
    sim.restart(leader)?;
    sim.restart(other)?;
    sim.run(300, 20)?;
    // Kill each new leader right after it proposes, twice.
    for _ in 0..2 {
        let l = sim.elect(3_000)?;
        sim.propose(l)?;
        sim.settle()?;
        sim.crash(l);
        sim.run(50, 0)?;
        sim.restart(l)?;
    }
    sim.converge(10_000)?;
    sim.nothing_committed_lost()
}

/// The last replica standing never commits alone: with the two others down, nothing new
/// commits however long it runs and proposes.
fn last_one_standing(seed: u64) -> Result<(), Error> {
    let mut sim = Sim::new(seed)?;
    let leader = sim.elect(2_000)?;
    sim.run(200, 20)?;
    sim.converge(5_000)?;
    let before = sim.committed_len();
    for id in IDS.iter().copied().filter(|&i| i != leader) {
        sim.crash(id);
    }
    for _ in 0..1_000 {
        if sim.replica(leader).node.as_ref().is_some_and(|n| n.raft.state == StateRole::Leader) {
            sim.propose(leader)?;
        }
        sim.step(0)?;
    }
    if sim.committed_len() != before {
        return Err(sim.fail(format!("a lone replica committed {} entries", sim.committed_len() - before)));
    }
    if sim.replica(leader).node.as_ref().is_some_and(|n| n.raft.state == StateRole::Leader) {
        return Err(sim.fail("a lone replica still leads after check-quorum".into()));
    }
    Ok(())
}

/// A flipped byte in one replica's committed tail: recovery cuts it, the replica neither
/// votes nor leads while it repairs (checked on every step), and it repairs from the others.
fn damaged_replica(seed: u64) -> Result<(), Error> {
    let mut sim = Sim::new(seed)?;
    sim.elect(2_000)?;
    sim.run(400, 20)?;
    sim.converge(5_000)?;
    let victim = IDS[(seed % 3) as usize];
    // Heartbeats for a while: the commit, written lazily, reaches `raft-state`.
    sim.run(1_000, 0)?;
    sim.crash(victim);
    if !sim.damage_tail(victim)? {
        return Ok(());
    }
    sim.restart(victim)?;
    let repairing = sim.replica(victim).node.as_ref().is_some_and(|n| n.store().repairing());
    if !repairing {
        return Err(sim.fail(format!("replica {victim} lost a committed entry but is not repairing")));
    }
    // Take down one of the others: the damaged one must not help elect a leader lacking
    // what it lost, so nothing may commit until the third is back.
    let other = IDS.iter().copied().find(|&i| i != victim).ok_or("no other")?;
    sim.crash(other);
    sim.run(500, 20)?;
    sim.restart(other)?;
    sim.converge(10_000)?;
    if sim.replica(victim).node.as_ref().is_some_and(|n| n.store().repairing()) {
        return Err(sim.fail(format!("replica {victim} never finished repairing")));
    }
    sim.nothing_committed_lost()
}

/// How many seeds each scenario runs: `QUIVER_SIM_SEEDS` (thousands by flag), 70 by default
/// (280 runs over the four randomised scenarios in CI).
fn seeds() -> u64 {
    std::env::var("QUIVER_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(70)
}

/// Runs `scenario` over the seeds; a failure names its seed, and `QUIVER_SIM_SEED=<seed>`
/// replays that one alone.
fn over_seeds(name: &str, scenario: fn(u64) -> Result<(), Error>) {
    let only: Option<u64> = std::env::var("QUIVER_SIM_SEED").ok().and_then(|s| {
        let s = s.trim_start_matches("0x");
        u64::from_str_radix(s, 16).ok()
    });
    let seeds: Vec<u64> = match only {
        Some(seed) => vec![seed],
        None => (1..=seeds()).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ SEED).collect(),
    };
    for seed in seeds {
        if let Err(e) = scenario(seed) {
            panic!("{name}: {e} (replay: QUIVER_SIM_SEED={seed:#x} cargo test -p quiver-broker {name})");
        }
    }
}

#[path = "sim_snapshot_tests.rs"]
mod snapshot;

#[test]
fn sim_majority_crash_and_back_to_back_leader_kills_lose_nothing_committed() {
    over_seeds("sim_majority_crash", majority_crash);
}

#[test]
fn sim_the_last_replica_standing_never_commits_alone() {
    over_seeds("sim_last_one_standing", last_one_standing);
}

#[test]
fn sim_a_damaged_replica_neither_votes_nor_leads_until_repaired() {
    over_seeds("sim_damaged_replica", damaged_replica);
}

/// The negative control: without fsync, a majority power loss loses acknowledged entries, and
/// the checker says so for at least one seed (proof the checks can fail).
#[test]
fn sim_negative_control_without_fsync_is_caught() {
    NO_SYNC.with(|n| n.set(true));
    let caught = (1..=20u64).any(|seed| majority_crash(seed).is_err());
    NO_SYNC.with(|n| n.set(false));
    assert!(caught, "the checker missed lost entries with fsync off");
}

#[test]
fn three_replicas_elect_commit_survive_crashes_and_truncate_a_stale_tail() {
    if let Err(e) = scenario(SEED) {
        panic!("{e}");
    }
}

#[test]
fn several_seeds() {
    for seed in 1..=8u64 {
        if let Err(e) = scenario(seed) {
            panic!("{e}");
        }
    }
}

#[test]
fn a_seed_replays_exactly() -> Result<(), Error> {
    let run = |seed| -> Result<Vec<Bytes>, Error> {
        let mut sim = Sim::new(seed)?;
        sim.elect(2_000)?;
        sim.run(400, 15)?;
        Ok(sim.committed.clone())
    };
    assert_eq!(run(SEED)?, run(SEED)?);
    Ok(())
}

/// The storage adapter on its own: Raft's own entries come back as Raft entries, terms and
/// indexes map to epochs and ordinals, a conflicting suffix is truncated, and the answers
/// raft-rs relies on are errors, not panics.
#[test]
fn storage_maps_entries_to_batches_and_back() -> Result<(), Error> {
    use raft::eraftpb::{Entry, EntryType};
    let mem = Arc::new(MemStorage::new());
    let storage: Arc<dyn Storage> = mem.clone();
    let (log, _) = PartitionLog::open(storage.clone(), DIR.into(), log_config(), 0)?;
    let mut store = LogStorage::open(Arc::new(Mutex::new(log)), storage, &IDS)?;
    assert_eq!((store.first_index()?, store.last_index()?, store.term(0)?), (1, 0, 0));
    assert!(store.initial_state()?.initialized());

    let entry = |index, term, kind, data: &[u8]| {
        let mut e = Entry::default();
        e.set_index(index);
        e.set_term(term);
        e.set_entry_type(kind);
        e.set_data(Bytes::copy_from_slice(data));
        e
    };
    let mut b = BatchBuilder::new(64);
    b.push(5, None, b"hello", &[]);
    b.push(6, None, b"world", &[]);
    let user = b.finish();
    let written = [
        entry(1, 1, EntryType::EntryNormal, b""),
        entry(2, 1, EntryType::EntryNormal, &user),
        entry(3, 2, EntryType::EntryConfChangeV2, b"cc"),
        entry(4, 2, EntryType::EntryNormal, &user),
    ];
    store.append(&written, 0)?;
    assert_eq!((store.first_index()?, store.last_index()?), (1, 4));
    assert_eq!([store.term(1)?, store.term(2)?, store.term(3)?, store.term(4)?], [1, 1, 2, 2]);
    let read = store.entries(1, 5, None, raft::GetEntriesContext::empty(false))?;
    assert_eq!(read.len(), 4);
    for (r, w) in read.iter().zip(&written) {
        assert_eq!(
            (r.get_index(), r.get_term(), r.get_entry_type()),
            (w.get_index(), w.get_term(), w.get_entry_type())
        );
    }
    assert!(read[0].get_data().is_empty());
    assert_eq!(read[2].get_data(), b"cc");
    // The user batch is stored stamped: offsets 1..3 (the leader-change record took offset 0).
    let h = BatchHeader::parse(read[1].get_data())?;
    assert_eq!((h.base_offset, h.leader_epoch, h.records_count), (1, 1, 2));
    assert_eq!(BatchHeader::parse(read[3].get_data())?.base_offset, 4);
    // A size limit still returns one entry.
    assert_eq!(store.entries(2, 5, 1, raft::GetEntriesContext::empty(false))?.len(), 1);
    // Out of range: errors raft-rs expects, never a panic.
    assert!(matches!(
        store.entries(1, 6, None, raft::GetEntriesContext::empty(false)),
        Err(raft::Error::Store(raft::StorageError::Unavailable))
    ));
    assert!(matches!(store.term(5), Err(raft::Error::Store(raft::StorageError::Unavailable))));
    assert!(matches!(
        store.entries(0, 2, None, raft::GetEntriesContext::empty(false)),
        Err(raft::Error::Store(raft::StorageError::Compacted))
    ));

    // A new leader's entries conflict from index 3: truncated, then appended.
    let mut hs = store.hard_state().clone();
    hs.set_commit(2);
    store.set_hard_state(&hs)?;
    store.flush_commit()?;
    store
        .append(&[entry(3, 3, EntryType::EntryNormal, b""), entry(4, 3, EntryType::EntryNormal, &user)], 0)?;
    assert_eq!((store.last_index()?, store.term(3)?, store.term(4)?), (4, 3, 3));
    // Never at or below the commit; never with a gap; never a control batch as user data.
    assert!(matches!(
        store.append(&[entry(2, 3, EntryType::EntryNormal, b"")], 0),
        Err(ReplicaError::TruncateCommitted { .. })
    ));
    assert!(matches!(
        store.append(&[entry(6, 3, EntryType::EntryNormal, b"")], 0),
        Err(ReplicaError::Gap { .. })
    ));
    let log = store.log().lock();
    let leader_change = batch_at(&log, 3)?;
    drop(log);
    assert!(matches!(
        store.append(&[entry(5, 3, EntryType::EntryNormal, &leader_change)], 0),
        Err(ReplicaError::UnsupportedEntry(_))
    ));
    assert!(matches!(
        store.append(&[entry(5, 3, EntryType::EntryConfChange, b"x")], 0),
        Err(ReplicaError::UnsupportedEntry(_))
    ));

    // Everything synced survives a crash, hard state and configuration included.
    let mut cs = store.initial_state()?.conf_state;
    cs.set_learners(vec![4]);
    store.set_conf_state(cs.clone())?;
    mem.crash();
    let storage: Arc<dyn Storage> = mem.clone();
    let (log, _) = PartitionLog::open(storage.clone(), Path::new(DIR).into(), log_config(), 0)?;
    let store = LogStorage::open(Arc::new(Mutex::new(log)), storage, &IDS)?;
    assert_eq!((store.last_index()?, store.term(4)?, store.hard_state().get_commit()), (4, 3, 2));
    assert_eq!(store.initial_state()?.conf_state, cs);
    Ok(())
}
