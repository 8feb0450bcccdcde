//! Replica repair from a snapshot (docs/replication.md §2a), in the seeded simulation: a
//! follower is down while the others commit many entries and drop the prefix it needs
//! (through the log's own API, as retention does), comes back, installs a snapshot of the
//! leader's log start and catches up by appends; for some seeds it loses power in the middle
//! of the install. The checker's invariants hold on every step, and at the end the logs are
//! byte-identical (offsets included) from the latest log start, nothing committed is lost, and
//! the follower's high watermark is the leader's. Like the other seeded scenarios it runs on
//! 3, 4 or 5 replicas (the seed picks) over the network that loses, delays and duplicates.

use super::scenarios::{over_seeds, seeds};
use super::*;

/// The voters of the storage-level test below.
const IDS: [u64; 3] = [1, 2, 3];

impl Sim {
    /// On every running replica but `except`: seals the active segment and deletes every
    /// segment below the offset after its commit (what retention does with closed segments
    /// wholly below the high watermark). Returns the smallest log start ordinal left.
    fn drop_committed_prefix(&mut self, except: u64) -> Result<u64, Error> {
        let mut first = u64::MAX;
        for r in &mut self.replicas {
            let Some(node) = r.node.as_ref() else { continue };
            if node.raft.id == except {
                continue;
            }
            let commit = node.raft.raft_log.committed;
            let upto = node.store().offset_after(commit)?.ok_or("commit past the log")?;
            let mut log = node.store().log().lock();
            log.roll_now()?;
            log.delete_segments_below(upto)?;
            first = first.min(log.first_ordinal());
        }
        Ok(first)
    }
}

fn snapshot_catch_up(seed: u64) -> Result<(), Error> {
    let mut sim = Sim::new(seed, Opts::replicas(replicas_for(seed)))?;
    sim.elect(2_000)?;
    sim.run(300, 20)?;
    sim.converge(5_000)?;
    let leader = sim.leader().ok_or("no leader")?;
    let follower = sim.ids.iter().copied().find(|&i| i != leader).ok_or("no follower")?;
    let follower_last = {
        let node = sim.replica(follower).node.as_ref().ok_or("follower down")?;
        node.store().last_index()?
    };
    sim.crash(follower, 0)?;
    // The others go on (under drops) and drop the prefix the follower needs.
    let mut first = 0;
    for _ in 0..40 {
        sim.run(300, 30)?;
        first = sim.drop_committed_prefix(follower)?;
        if first > follower_last + 1 {
            break;
        }
    }
    if first <= follower_last + 1 {
        return Err(sim.fail(
            Broken::Other,
            format!("the log start stayed at {first}, the follower has up to {follower_last}"),
        ));
    }
    // Some seeds lose power in the middle of installing the snapshot (any of its writes).
    if seed % 2 == 1 {
        let budget = sim.rng.gen_range(0..30);
        sim.replica(follower).snap_fault = Some(budget);
    }
    sim.restart(follower)?;
    sim.converge(20_000)?;
    sim.nothing_committed_lost()?;
    let leader = sim.leader().ok_or("no leader")?;
    let (lead_log, lead_commit) = {
        let node = sim.replica(leader).node.as_ref().ok_or("leader down")?;
        (node.store().log().clone(), node.raft.raft_log.committed)
    };
    let node = sim.replica(follower).node.as_ref().ok_or("follower down")?;
    let log = node.store().log().clone();
    let (f_first, f_start) = {
        let log = log.lock();
        (log.first_ordinal(), log.log_start_offset())
    };
    if f_first <= follower_last + 1 {
        return Err(sim.fail(
            Broken::Other,
            format!("follower {follower} starts at {f_first}: it did not install a snapshot"),
        ));
    }
    // Its offsets are the leader's: the batch at its first ordinal sits at the same offset
    // on the leader (the leader may have dropped more since, then its start is later).
    let lead = lead_log.lock();
    if f_first >= lead.first_ordinal() {
        let on_leader = lead.offset_of_ordinal(f_first)?.ok_or("leader lacks the follower's first")?;
        if on_leader != f_start {
            return Err(sim.fail(
                Broken::Committed,
                format!(
                    "follower {follower} starts at offset {f_start}, the leader has ordinal {f_first} at {on_leader}"
                ),
            ));
        }
    }
    drop(lead);
    let f_commit = node.raft.raft_log.committed;
    let hw = node.store().offset_after(f_commit)?;
    let lead_hw =
        sim.replica(leader).node.as_ref().ok_or("leader down")?.store().offset_after(lead_commit)?;
    if f_commit == lead_commit && hw != lead_hw {
        return Err(sim.fail(
            Broken::Committed,
            format!("high watermarks differ: follower {hw:?}, leader {lead_hw:?}"),
        ));
    }
    eprintln!(
        "seed {seed:#x}: follower {follower} had up to {follower_last}, installed a snapshot, starts at ordinal {f_first} offset {f_start}; {} committed, {} power losses mid-install",
        sim.committed_len(),
        sim.power_losses
    );
    if sim.replica(follower).fault.load(SeqCst) > 0 {
        // Armed but never reached zero: the install needed fewer writes than the budget.
        sim.replica(follower).fault.store(-1, SeqCst);
    }
    Ok(())
}

#[test]
fn sim_a_follower_behind_the_log_start_catches_up_from_a_snapshot() {
    over_seeds(
        "snapshot::sim_a_follower_behind_the_log_start_catches_up_from_a_snapshot",
        6,
        seeds(),
        snapshot_catch_up,
    );
}

/// After a snapshot install the replica reopens on an empty log: `offset_after` the snapshot
/// index is the log start offset (the high watermark a restarted replica serves), Raft sees
/// the snapshot's term before its first index, and a crash between the log reset and the
/// `raft-state` write still answers that term from the log's epoch record.
#[test]
fn an_installed_snapshot_survives_a_restart_and_serves_its_high_watermark() -> Result<(), Error> {
    use raft::eraftpb::Snapshot;
    let mem = Arc::new(MemStorage::new());
    let storage: Arc<dyn Storage> = mem.clone();
    let (log, _) = PartitionLog::open(storage.clone(), DIR.into(), log_config(), 0)?;
    let mut store = LogStorage::open(Arc::new(Mutex::new(log)), storage.clone(), &IDS)?;
    let mut snap = Snapshot::default();
    let data = super::super::snapshot::SnapshotData { log_start_offset: 500, index: 40, conf_index: 0 };
    snap.set_data(Bytes::copy_from_slice(&data.encode()));
    snap.mut_metadata().set_index(40);
    snap.mut_metadata().set_term(3);
    snap.mut_metadata().mut_conf_state().set_voters(IDS.to_vec());
    // Garbage data is refused before anything changes.
    let mut bad = snap.clone();
    bad.set_data(Bytes::from_static(b"not a snapshot"));
    assert!(matches!(store.apply_snapshot(&bad, 0), Err(ReplicaError::Snapshot(_))));
    assert_eq!(store.first_index()?, 1);
    store.apply_snapshot(&snap, 0)?;
    let check = |store: &LogStorage| -> Result<(), Error> {
        assert_eq!((store.first_index()?, store.last_index()?, store.term(40)?), (41, 40, 3));
        assert_eq!(store.offset_after(40)?, Some(500));
        assert_eq!(store.applied(), 40);
        let s = store.snapshot(0, 2)?;
        assert_eq!((s.get_metadata().get_index(), s.get_metadata().get_term()), (40, 3));
        assert_eq!(super::super::snapshot::SnapshotData::decode(s.get_data())?, data);
        Ok(())
    };
    check(&store)?;
    drop(store);
    mem.crash();
    let (log, _) = PartitionLog::open(storage.clone(), DIR.into(), log_config(), 0)?;
    let store = LogStorage::open(Arc::new(Mutex::new(log)), storage.clone(), &IDS)?;
    check(&store)?;
    // The same install with the raft-state write lost (the old file back): the term before
    // the log start comes from the epoch record.
    drop(store);
    let fresh = super::super::state::DurableState::default();
    super::super::state::write(&*storage, Path::new(DIR), &fresh)?;
    let (log, _) = PartitionLog::open(storage.clone(), DIR.into(), log_config(), 0)?;
    let store = LogStorage::open(Arc::new(Mutex::new(log)), storage, &IDS)?;
    assert_eq!((store.first_index()?, store.term(40)?), (41, 3));
    assert_eq!(store.offset_after(0)?, Some(500));
    Ok(())
}
