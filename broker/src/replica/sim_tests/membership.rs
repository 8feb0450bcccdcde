//! Configuration changes under faults (docs/replication.md §11), seeded like the other
//! scenarios and replayed the same way.

use super::scenarios::{over_seeds, seeds};
use super::*;
use crate::replica::membership::{self, Step};

/// A group of 3 or 4 first voters gains the replica that started outside it and loses one of
/// its first voters (the leader itself in a third of the seeds), one simple change at a time,
/// each step chosen by `membership::next_step` as a broker's driver chooses it, while
/// proposals, crashes with torn tails, restarts, partitions and a lossy network go on. The
/// removed replica stops once its removal is applied. Then every replica restarts (its
/// configuration comes back from disk; a change handed out again is not applied twice) and
/// the group converges: exactly the desired voters everywhere, nothing committed lost, every
/// committed entry durable on a majority of the configuration throughout (`check`).
fn add_one_remove_one(seed: u64) -> Result<(), Error> {
    let first = 3 + (seed % 2) as usize;
    let mut sim = Sim::new(seed, Opts { initial_voters: Some(first), ..Opts::replicas(first + 1) })?;
    sim.randomize_faults();
    let leader = sim.elect(3_000)?;
    let joiner = first as u64 + 1;
    let leaving = match seed % 3 {
        0 => leader,
        _ => sim.first_voters.iter().copied().find(|&v| v != leader).ok_or("one voter")?,
    };
    let mut desired: Vec<u64> =
        sim.first_voters.iter().copied().filter(|&v| v != leaving).chain([joiner]).collect();
    desired.sort_unstable();
    let steps_taken = move_to(&mut sim, &desired, true)?;
    if !steps_taken.contains(&Step::AddLearner(joiner)) || !steps_taken.contains(&Step::Promote(joiner)) {
        return Err(format!("seed {seed:#x}: the joiner was not added then promoted: {steps_taken:?}").into());
    }
    // The removed replica stops for good.
    sim.retire_removed(leaving)?;
    for _ in 0..1_000 {
        if sim.rng.gen_range(0..100) < 2 {
            sim.fault()?;
        }
        sim.step(15)?;
    }
    for id in sim.down() {
        sim.restart(id)?;
    }
    sim.converge(20_000)?;
    // Every replica restarts from its disk: the configuration is the one it applied.
    for id in sim.ids.clone() {
        sim.crash(id, 0)?;
        sim.restart(id)?;
    }
    sim.converge(20_000)?;
    for &id in &sim.ids {
        let node = sim.node(id).ok_or("down after converging")?;
        let cs = node.raft.prs().conf().to_conf_state();
        let mut voters = cs.get_voters().to_vec();
        voters.sort_unstable();
        if voters != desired || !cs.get_learners().is_empty() {
            return Err(format!(
                "seed {seed:#x}: replica {id} ended with voters {voters:?} learners {:?}, not {desired:?}",
                cs.get_learners()
            )
            .into());
        }
    }
    sim.nothing_committed_lost()
}

impl Sim {
    /// Replica `id`, removed from the group, leaves for good.
    fn retire_removed(&mut self, id: u64) -> Result<(), Error> {
        self.crash(id, 0)?;
        self.replica(id).retired = true;
        self.ids.retain(|&i| i != id);
        self.cut.retain(|&(a, b)| a != id && b != id);
        Ok(())
    }
}

/// Moves the group to voters `desired` (sorted) as brokers' drivers do (`membership::next_step`
/// on the leader, one simple change at a time), with faults as `randomize_faults` set them;
/// the steps taken, in order. `crashes`: replicas crash and the network partitions meanwhile
/// (`Sim::fault`).
fn move_to(sim: &mut Sim, desired: &[u64], crashes: bool) -> Result<Vec<Step>, Error> {
    let mut steps_taken = Vec::new();
    for _ in 0..30_000 {
        if crashes && sim.rng.gen_range(0..100) < 2 {
            sim.fault()?;
        }
        if let Some(l) = sim.leader() {
            let node = sim.replica(l).node.as_mut().ok_or("the leader is down")?;
            if let Some(step) = membership::next_step(node, desired) {
                match membership::take(node, step) {
                    Ok(()) | Err(ReplicaError::Raft(raft::Error::ProposalDropped)) => {}
                    Err(e) => return Err(e.into()),
                }
                if steps_taken.last() != Some(&step) {
                    steps_taken.push(step);
                }
            }
            let node = sim.node(l).ok_or("the leader is down")?;
            let cs = node.raft.prs().conf().to_conf_state();
            let mut voters = cs.get_voters().to_vec();
            voters.sort_unstable();
            if voters == desired && cs.get_learners().is_empty() && !node.raft.has_pending_conf() {
                return Ok(steps_taken);
            }
        }
        sim.step(15)?;
    }
    let leader = sim.leader();
    let conf = leader.and_then(|l| sim.node(l)).map(|n| n.raft.prs().conf().to_conf_state());
    Err(format!(
        "seed {:#x}: the group did not reach voters {desired:?}; steps taken {steps_taken:?}, leader {leader:?}, configuration {conf:?}",
        sim.seed
    )
    .into())
}

/// [`move_to`], then the replicas it removed (`leaving`) leave for good and every other
/// replica is up again.
fn move_and_retire(sim: &mut Sim, desired: &[u64], leaving: &[u64], crashes: bool) -> Result<(), Error> {
    move_to(sim, desired, crashes)?;
    for &gone in leaving {
        sim.retire_removed(gone)?;
    }
    for id in sim.down() {
        sim.restart(id)?;
    }
    Ok(())
}

/// A replica added while the group's leader is a replica that joined after the group was
/// created: the new one starts from the group's first configuration, which does not hold that
/// leader, and must still follow it (it learns the configuration from the log it is sent).
/// Voters {1,2,3} move to {1,2,4}, leadership goes to 4, then they move to {1,4,5}.
fn added_under_a_leader_that_joined_later(seed: u64) -> Result<(), Error> {
    let mut sim = Sim::new(seed, Opts { initial_voters: Some(3), ..Opts::replicas(5) })?;
    sim.randomize_faults();
    sim.elect(3_000)?;
    move_and_retire(&mut sim, &[1, 2, 4], &[3], true)?;
    let mut led = false;
    for _ in 0..200 {
        if sim.leader() == Some(4) {
            led = true;
            break;
        }
        if let Some(l) = sim.leader() {
            if let Some(node) = sim.replica(l).node.as_mut() {
                node.transfer_leader(4);
            }
        }
        for id in sim.down() {
            sim.restart(id)?;
        }
        for _ in 0..20 {
            sim.step(0)?;
        }
    }
    if !led {
        return Err(format!("seed {seed:#x}: leadership never went to replica 4").into());
    }
    // No crashes or partitions now (the network stays lossy): a failover to 1 or 2, which are
    // in the first configuration, would hide a replica that cannot follow 4.
    sim.cut.clear();
    move_and_retire(&mut sim, &[1, 4, 5], &[2], false)?;
    sim.converge(20_000)?;
    sim.nothing_committed_lost()
}

/// The leader is the voter being moved away, and the voter it would hand leadership to dies
/// just then: it must hand over to another live desired voter, not try the dead one until it
/// comes back (raft-rs drops every proposal while a transfer is under way, so the partition
/// took no writes meanwhile). Voters {1,2,3} led by L move to {1,2,3} − L + 4.
fn leader_moving_away_skips_a_dead_voter(seed: u64) -> Result<(), Error> {
    let mut sim = Sim::new(seed, Opts { initial_voters: Some(3), ..Opts::replicas(4) })?;
    sim.randomize_faults();
    let leader = sim.elect(3_000)?;
    let mut desired: Vec<u64> =
        sim.first_voters.iter().copied().filter(|&v| v != leader).chain([4]).collect();
    desired.sort_unstable();
    let mut killed = None;
    for _ in 0..30_000 {
        if let Some(l) = sim.leader() {
            if l != leader {
                let node = sim.node(l).ok_or("the leader is down")?;
                let mut voters = node.raft.prs().conf().to_conf_state().get_voters().to_vec();
                voters.sort_unstable();
                if killed.is_some() && voters == desired {
                    break; // handed over to a live voter, which finished the move
                }
            }
            let node = sim.replica(l).node.as_mut().ok_or("the leader is down")?;
            match membership::next_step(node, &desired) {
                // The first hand-over's target dies as it is chosen (and stays down).
                Some(Step::Transfer(to)) if killed.is_none() => {
                    sim.crash(to, 0)?;
                    killed = Some(to);
                }
                Some(step) => match membership::take(node, step) {
                    Ok(()) | Err(ReplicaError::Raft(raft::Error::ProposalDropped)) => {}
                    Err(e) => return Err(e.into()),
                },
                None => {}
            }
        }
        // Partitions heal, and only the killed voter stays down.
        sim.cut.clear();
        for id in sim.down().into_iter().filter(|&id| Some(id) != killed) {
            sim.restart(id)?;
        }
        sim.step(15)?;
    }
    let Some(dead) = killed else {
        return Err(format!("seed {seed:#x}: the leader never handed over").into());
    };
    let now = sim.leader();
    let conf = now.and_then(|l| sim.node(l)).map(|n| n.raft.prs().conf().to_conf_state());
    if now.is_none_or(|l| l == leader || l == dead)
        || conf.as_ref().is_none_or(|c| {
            let mut v = c.get_voters().to_vec();
            v.sort_unstable();
            v != desired
        })
    {
        return Err(format!(
            "seed {seed:#x}: with voter {dead} down, the move off leader {leader} did not finish: leader {now:?}, configuration {conf:?}"
        )
        .into());
    }
    sim.restart(dead)?;
    sim.retire_removed(leader)?;
    sim.converge(20_000)?;
    sim.nothing_committed_lost()
}

#[test]
fn sim_a_leader_moving_away_hands_over_to_a_live_voter() {
    over_seeds(
        "membership::sim_a_leader_moving_away_hands_over_to_a_live_voter",
        13,
        seeds(),
        leader_moving_away_skips_a_dead_voter,
    );
}

#[test]
fn sim_a_replica_added_under_a_leader_that_joined_later_catches_up() {
    over_seeds(
        "membership::sim_a_replica_added_under_a_leader_that_joined_later_catches_up",
        11,
        seeds(),
        added_under_a_leader_that_joined_later,
    );
}

#[test]
fn sim_a_replica_added_and_one_removed_under_faults_lose_nothing_committed() {
    over_seeds(
        "membership::sim_a_replica_added_and_one_removed_under_faults_lose_nothing_committed",
        7,
        seeds(),
        add_one_remove_one,
    );
}
