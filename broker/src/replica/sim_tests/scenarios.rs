//! The randomised scenarios, each run over many seeds (docs/replication.md §9.1). A seed
//! decides everything: the replica count (3, 4 or 5), the network's loss, delay and
//! duplication, which replica crashes when. A failure names its seed and how to replay it.

use super::*;

/// How many seeds each scenario runs: `QUIVER_SIM_SEEDS` (thousands by flag), 60 by default
/// (300 distinct seeds over the five seeded scenarios in CI, the snapshot one included).
pub(super) fn seeds() -> u64 {
    std::env::var("QUIVER_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60)
}

/// Runs `scenario` over the seeds (each scenario its own stream of them); a failure names its
/// seed, and `QUIVER_SIM_SEED=<seed>` replays that one alone. `test` is the test's path below
/// `sim_tests` (`scenarios::<name>`, `snapshot::<name>`), the filter that reruns it.
pub(super) fn over_seeds(test: &str, salt: u64, count: u64, scenario: fn(u64) -> Result<(), Error>) {
    let only: Option<u64> = std::env::var("QUIVER_SIM_SEED").ok().and_then(|s| {
        let s = s.trim_start_matches("0x");
        u64::from_str_radix(s, 16).ok()
    });
    let seeds: Vec<u64> = match only {
        Some(seed) => vec![seed],
        None => (1..=count).map(|i| (i + (salt << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ SEED).collect(),
    };
    for seed in seeds {
        if let Err(e) = scenario(seed) {
            panic!(
                "{test}: {e}\nreplay: QUIVER_SIM_SEED={seed:#x} cargo test -p quiver-broker --lib \
                 replica::sim_tests::{test}"
            );
        }
    }
}

/// Every fault at once, at random, on 3 to 5 replicas: lost, delayed, duplicated and
/// reordered messages, partitions (symmetric and one-way) that heal, crashes that tear
/// unsynced tails, the leader killed right after proposing, restarts. Then the network heals
/// and every replica restarts: the cluster converges and nothing committed was lost.
fn random_faults(seed: u64) -> Result<(), Error> {
    let mut sim = Sim::new(seed, Opts::replicas(replicas_for(seed)))?;
    sim.randomize_faults();
    sim.elect(3_000)?;
    for _ in 0..1_500 {
        if sim.rng.gen_range(0..100) < 2 {
            sim.fault()?;
        }
        sim.step(15)?;
    }
    for id in sim.down() {
        sim.restart(id)?;
    }
    sim.converge(20_000)?;
    sim.nothing_committed_lost()
}

/// Election, proposals under faults, a follower crash and catch-up, an isolated leader whose
/// synced but uncommitted tail is truncated on rejoin.
pub(super) fn isolated_leader(seed: u64) -> Result<(), Error> {
    let mut sim = Sim::new(seed, Opts::replicas(replicas_for(seed)))?;
    sim.elect(2_000)?;
    sim.run(600, 15)?;
    sim.converge(5_000)?;
    let first = sim.committed_len();
    if first < 3 {
        return Err(format!("seed {seed:#x}: only {first} entries committed").into());
    }

    // A follower crashes, the others go on, it restarts and catches up.
    let leader = sim.leader().ok_or("no leader")?;
    let follower = sim.ids.iter().copied().find(|&i| i != leader).ok_or("no follower")?;
    sim.crash_torn(follower)?;
    sim.run(300, 15)?;
    sim.restart(follower)?;
    sim.converge(5_000)?;

    // The leader is cut off and keeps proposing: its tail is appended (and fsynced) but never
    // committed. The others elect a new leader and commit other entries at those indexes.
    let old = sim.leader().ok_or("no leader")?;
    sim.isolate(old);
    let committed_before = sim.replica(old).commit;
    for _ in 0..5 {
        sim.propose(old)?;
        sim.settle()?;
    }
    let tail: Vec<(u64, Bytes)> = {
        let node = sim.node(old).ok_or("old leader down")?;
        let log = node.store().log().lock();
        (committed_before + 1..log.next_ordinal())
            .map(|i| Ok((i, batch_at(&log, i)?)))
            .collect::<Result<_, Error>>()?
    };
    if tail.len() < 5 {
        return Err(format!(
            "seed {seed:#x}: the isolated leader holds only {} uncommitted entries",
            tail.len()
        )
        .into());
    }
    let last = tail[tail.len() - 1].0;
    let mut new_leader = None;
    for _ in 0..5_000 {
        sim.step(10)?;
        new_leader = sim.leader().filter(|&l| l != old);
        if new_leader.is_some() && sim.committed_len() as u64 > last {
            break;
        }
    }
    if new_leader.is_none() || sim.committed_len() as u64 <= last {
        return Err(format!(
            "seed {seed:#x}: the majority did not elect a new leader and commit past the old tail"
        )
        .into());
    }
    sim.crash_torn(old)?;
    sim.cut.clear();
    sim.run(100, 10)?;
    sim.restart(old)?;
    sim.converge(10_000)?;
    // The old leader's uncommitted tail was replaced by the committed history.
    let log = sim.node(old).ok_or("old leader down")?.store().log().clone();
    let log = log.lock();
    for (index, bytes) in &tail {
        if batch_at(&log, *index)? == *bytes {
            return Err(format!(
                "seed {seed:#x}: old leader {old} still holds its uncommitted entry {index}"
            )
            .into());
        }
    }
    Ok(())
}

/// Power loss on a majority at once, the leader among them, with entries in flight (unsynced
/// writes lost, tails torn), then back-to-back leader kills right after each proposes, before
/// its entry can propagate; with fsync on nothing committed may be lost.
fn majority_crash(seed: u64, opts: Opts) -> Result<(), Error> {
    majority_crash_on(&mut Sim::new(seed, opts)?)
}

/// [`majority_crash`] on a prepared simulation (the negative control turns a check off).
fn majority_crash_on(sim: &mut Sim) -> Result<(), Error> {
    sim.elect(2_000)?;
    sim.run(400, 20)?;
    let leader = sim.leader().ok_or("no leader")?;
    let others: Vec<u64> = sim.ids.iter().copied().filter(|&i| i != leader).collect();
    let victims: Vec<u64> =
        std::iter::once(leader).chain(others.into_iter().take(sim.majority() - 1)).collect();
    // Proposals in flight: appended on the leader, maybe not yet on the others.
    for _ in 0..3 {
        sim.propose(leader)?;
    }
    sim.settle()?;
    for &id in &victims {
        sim.crash_torn(id)?;
    }
    sim.check()?;
    for &id in &victims {
        sim.restart(id)?;
    }
    sim.run(300, 20)?;
    // Kill each new leader right after it proposes, twice.
    for _ in 0..2 {
        let l = sim.elect(3_000)?;
        sim.propose(l)?;
        sim.settle()?;
        sim.crash_torn(l)?;
        sim.run(50, 0)?;
        sim.restart(l)?;
    }
    sim.converge(10_000)?;
    sim.nothing_committed_lost()
}

/// The last replica standing (the leader or a follower) never leads alone and never commits:
/// with all the others down, once it is not leading (check-quorum deposes a leader) it never
/// leads again, and nothing new commits, however long it runs and asks to propose.
fn last_one_standing(seed: u64) -> Result<(), Error> {
    let mut sim = Sim::new(seed, Opts::replicas(replicas_for(seed)))?;
    let leader = sim.elect(2_000)?;
    sim.run(200, 20)?;
    sim.converge(5_000)?;
    let before = sim.committed_len();
    let survivor = match seed % 2 {
        0 => leader,
        _ => sim.ids.iter().copied().find(|&i| i != leader).ok_or("no follower")?,
    };
    for id in sim.ids.clone().into_iter().filter(|&i| i != survivor) {
        sim.crash_torn(id)?;
    }
    let mut deposed = !sim.is_leader(survivor);
    // At least 1,000 steps and six election timeouts of the survivor's own ticks (with the
    // leader proposing, most steps deliver messages).
    let until = sim.replica(survivor).ticks + 6 * config(survivor, 0).election_tick as u64;
    for step in 0..20_000 {
        if step >= 1_000 && sim.replica(survivor).ticks >= until {
            break;
        }
        if sim.is_leader(survivor) {
            if deposed {
                let term = sim.node(survivor).map_or(0, |n| n.raft.term);
                return Err(sim.fail(Broken::Other, format!("replica {survivor} leads alone in term {term}")));
            }
            sim.propose(survivor)?;
        } else {
            deposed = true;
        }
        sim.step(0)?;
    }
    if sim.committed_len() != before {
        let n = sim.committed_len() - before;
        return Err(sim.fail(Broken::Other, format!("a lone replica committed {n} entries")));
    }
    if sim.is_leader(survivor) {
        return Err(sim.fail(Broken::Other, "a lone replica still leads after check-quorum".into()));
    }
    Ok(())
}

/// A flipped byte or a torn tail in the committed log of one of three replicas: recovery cuts
/// it, the replica neither votes nor leads while it repairs (checked on every step), and it
/// repairs from the others.
fn damaged_replica(seed: u64) -> Result<(), Error> {
    let mut sim = Sim::new(seed, Opts::replicas(3))?;
    sim.elect(2_000)?;
    sim.run(400, 20)?;
    sim.converge(5_000)?;
    let victim = sim.ids[(seed % 3) as usize];
    // Heartbeats until the victim's whole log is committed and the commit, written lazily
    // (every second), has reached `raft-state`: only a loss below the persisted commit is
    // known to be a lost committed entry (§7), and the damage must hit a committed batch.
    let settled = |sim: &Sim| {
        sim.node(victim).is_some_and(|n| {
            let persisted = n.store().hard_state().commit;
            persisted == sim.committed_len() as u64 && persisted == n.raft.raft_log.last_index()
        })
    };
    for _ in 0..5_000 {
        if settled(&sim) {
            break;
        }
        sim.step(0)?;
    }
    if !settled(&sim) {
        return Err(
            format!("seed {seed:#x}: replica {victim}'s log never settled committed in raft-state").into()
        );
    }
    sim.crash(victim, 0)?;
    let tear = seed.is_multiple_of(2);
    if !sim.damage_tail(victim, tear)? {
        return Ok(());
    }
    sim.restart(victim)?;
    if !sim.node(victim).is_some_and(|n| n.store().repairing()) {
        return Err(
            sim.fail(Broken::Other, format!("replica {victim} lost a committed entry but is not repairing"))
        );
    }
    // With the leader down, the one healthy replica left cannot be elected, nor commit, while
    // the damaged one repairs (it still takes appends from a leader: that is how it repairs;
    // the old leader's messages still in flight may finish the repair, and then it votes).
    let other = match sim.leader() {
        Some(l) if l != victim => l,
        _ => sim.ids.iter().copied().find(|&i| i != victim).ok_or("no other")?,
    };
    sim.crash(other, 0)?;
    let before = sim.committed_len();
    for _ in 0..500 {
        sim.step(20)?;
        if !sim.node(victim).is_some_and(|n| n.store().repairing()) {
            continue;
        }
        if let Some(l) = sim.leader() {
            return Err(
                sim.fail(Broken::Other, format!("replica {l} was elected while replica {victim} repairs"))
            );
        }
        if sim.committed_len() != before {
            return Err(
                sim.fail(Broken::Other, "entries committed with only a repairing replica's help".into())
            );
        }
    }
    sim.restart(other)?;
    sim.converge(10_000)?;
    if sim.node(victim).is_some_and(|n| n.store().repairing()) {
        return Err(sim.fail(Broken::Other, format!("replica {victim} never finished repairing")));
    }
    sim.nothing_committed_lost()
}

#[test]
fn sim_random_faults_on_3_to_5_replicas_lose_nothing_committed() {
    over_seeds(
        "scenarios::sim_random_faults_on_3_to_5_replicas_lose_nothing_committed",
        1,
        seeds(),
        random_faults,
    );
}

#[test]
fn sim_majority_crash_and_back_to_back_leader_kills_lose_nothing_committed() {
    over_seeds(
        "scenarios::sim_majority_crash_and_back_to_back_leader_kills_lose_nothing_committed",
        2,
        seeds(),
        |seed| majority_crash(seed, Opts::replicas(replicas_for(seed))),
    );
}

#[test]
fn sim_the_last_replica_standing_never_leads_or_commits_alone() {
    over_seeds(
        "scenarios::sim_the_last_replica_standing_never_leads_or_commits_alone",
        3,
        seeds(),
        last_one_standing,
    );
}

#[test]
fn sim_a_damaged_replica_neither_votes_nor_leads_until_repaired() {
    over_seeds(
        "scenarios::sim_a_damaged_replica_neither_votes_nor_leads_until_repaired",
        4,
        seeds(),
        damaged_replica,
    );
}

/// The negative control: without fsync of the log, a majority power loss loses acknowledged
/// entries, and the checker says so (proof the checks can fail): the durable-majority check
/// at once, and with it off, the lost or replaced committed entries after the crash.
#[test]
fn sim_negative_control_without_fsync_is_caught() {
    let no_sync = |seed| Opts { no_sync: true, ..Opts::replicas(replicas_for(seed)) };
    for seed in 1..=10u64 {
        let e = majority_crash(seed, no_sync(seed)).err();
        assert_eq!(e.as_ref().and_then(broken), Some(Broken::Durability), "seed {seed}: {e:?}");
    }
    let lost = (1..=20u64).filter_map(|seed| {
        let mut sim = Sim::new(seed, no_sync(seed)).ok()?;
        sim.check_durable = false;
        let r = majority_crash_on(&mut sim);
        r.err().and_then(|e| broken(&e))
    });
    assert!(
        lost.into_iter().any(|b| b == Broken::Committed),
        "with fsync off and the durable check off, no seed lost a committed entry the checker saw"
    );
}

#[test]
fn sim_an_isolated_leaders_uncommitted_tail_is_replaced() {
    if let Err(e) = isolated_leader(SEED) {
        panic!("{e}");
    }
    // The slowest scenario, and the least random: a third as many seeds.
    over_seeds(
        "scenarios::sim_an_isolated_leaders_uncommitted_tail_is_replaced",
        5,
        seeds() / 3,
        isolated_leader,
    );
}

#[test]
fn a_seed_replays_exactly() -> Result<(), Error> {
    // What a run produced: the committed history, the leader of each term, the clock.
    type Trace = (Vec<Bytes>, BTreeMap<u64, u64>, i64);
    let run = |seed| -> Result<Trace, Error> {
        let mut sim = Sim::new(seed, Opts::replicas(replicas_for(seed)))?;
        sim.randomize_faults();
        sim.elect(2_000)?;
        for _ in 0..600 {
            if sim.rng.gen_range(0..100) < 3 {
                sim.fault()?;
            }
            sim.step(15)?;
        }
        Ok((sim.committed.clone(), sim.leaders.clone(), sim.now_ms))
    };
    for seed in [SEED, SEED + 1, SEED + 2] {
        assert_eq!(run(seed)?, run(seed)?);
    }
    Ok(())
}
