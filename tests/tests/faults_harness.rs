//! The fault harness in CI (docs/faults.md): a short seeded schedule of every fault against
//! three brokers must show no anomaly, and the acks=leader and fsync-off negative controls must
//! be flagged on their own runs (the checker can fail: acks=leader loses acknowledged writes
//! when a leader is cut off, durability=os when every broker loses power). `QUIVER_FAULTS_SEED` picks another seed; a failure prints the
//! `quiver-faults` command that replays it. The consumer group's coordinator is not spared:
//! group state (offsets, ledgers, membership) is replicated in `__offsets`.

use std::time::Duration;

use quiver_tests::faults::nemesis::FaultKind;
use quiver_tests::faults::{run, NegativeControl, RunConfig};
use quiver_tests::{bounded, init_tracing, test_dir};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");

fn seed(default: u64) -> u64 {
    std::env::var("QUIVER_FAULTS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_schedule_of_every_fault_finds_no_anomaly() -> anyhow::Result<()> {
    init_tracing();
    // Seed 64: a broker added and removed with a kill while partitions move, two kills, two
    // restarts, a pause, a corrupt segment, a wall-clock step (with libfaketime, as .ci/run
    // installs), a halves partition and two one-way cuts, drawn from the 13 kinds. (Seeds 64
    // and 69 found two SDK bugs after a coordinator's failover, docs/faults.md.)
    let seed = seed(64);
    bounded(480, async move {
        let dir = test_dir()?;
        let mut cfg = RunConfig::new(BIN, dir.path(), seed, Duration::from_secs(75));
        cfg.faults = FaultKind::ALL.to_vec();
        eprintln!("seed {seed}");
        let outcome = run(&cfg).await?;
        eprintln!("{}", outcome.report.table());
        anyhow::ensure!(
            outcome.report.ok,
            "anomalies {:?}; replay: cargo run -p quiver-tests --bin quiver-faults -- --seed {seed} --duration 75s \
             --brokers 3 --faults all",
            outcome.report.failing()
        );
        anyhow::ensure!(outcome.report.stats.produce_ok > 100, "too little was acknowledged to prove anything");
        anyhow::ensure!(outcome.report.stats.nemesis_steps >= 5, "too few faults ran");
        Ok(())
    })
    .await
}

/// The negative control: producers with acks=leader while the nemesis isolates a partition's
/// leader (it keeps answering its producers alone), then kills it. The broker answers
/// acks=leader once the leader's own log has a batch (docs/replication.md §3), so what the
/// isolated leader answered is cut when it rejoins the majority's newer log: the checker must
/// report `lost` on the run's own history. One seed isolates about six leaders for 1.5-3 s each
/// under three producers and loses hundreds of acknowledged writes (seed 7: 275 of 7,820); a
/// second seed is tried only if the first lost nothing, and both are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_negative_control_is_flagged() -> anyhow::Result<()> {
    init_tracing();
    let first = seed(7);
    bounded(420, async move {
        let mut tried = Vec::new();
        for seed in [first, first.wrapping_add(1)] {
            let dir = test_dir()?;
            let mut cfg = RunConfig::new(BIN, dir.path(), seed, Duration::from_secs(30));
            cfg.negative_control = Some(NegativeControl::AcksLeader);
            cfg.consumers = 0;
            eprintln!("seed {seed}");
            let outcome = run(&cfg).await?;
            eprintln!("acks=leader under leader isolation and kills (seed {seed}):\n{}", outcome.report.table());
            anyhow::ensure!(outcome.report.stats.nemesis_steps >= 3, "seed {seed}: too few leader kills ran");
            anyhow::ensure!(outcome.report.stats.produce_ok > 100, "seed {seed}: too little was acknowledged");
            let lost = outcome.report.count("lost");
            tried.push((seed, lost));
            if lost > 0 {
                anyhow::ensure!(!outcome.report.ok, "seed {seed}: {lost} lost, yet the report passed");
                eprintln!("seeds tried (seed, lost): {tried:?}");
                return Ok(());
            }
        }
        anyhow::bail!(
            "the acks=leader control lost no acknowledged write (seed, lost): {tried:?}; replay: cargo run -p \
             quiver-tests --bin quiver-faults -- --seed {first} --duration 30s --negative-control acks-leader --consumers 0"
        )
    })
    .await
}

/// The fsync-off negative control: the topic is created with durability = os (a replica
/// fsyncs every 30 s), and every step is a power loss of every broker at once (kill -9, each
/// data directory cut to what its sync ledger says was fsynced, restart). What was
/// acknowledged since the last fsync is gone from every replica: the checker must report `lost`
/// (seed 7, 20 s: 196 lost of 5,314 acknowledged, 2 steps; 30 s: 792 of 7,878, 3 steps). With durability = always the same
/// fault loses nothing (the schedule test above, and `--faults power-loss`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fsync_off_negative_control_is_flagged() -> anyhow::Result<()> {
    init_tracing();
    let seed = seed(7);
    bounded(240, async move {
        let dir = test_dir()?;
        let mut cfg = RunConfig::new(BIN, dir.path(), seed, Duration::from_secs(20));
        cfg.negative_control = Some(NegativeControl::FsyncOff);
        cfg.consumers = 0;
        eprintln!("seed {seed}");
        let outcome = run(&cfg).await?;
        eprintln!("durability=os under power loss of every broker (seed {seed}):\n{}", outcome.report.table());
        let lost = outcome.report.count("lost");
        anyhow::ensure!(outcome.report.stats.nemesis_steps >= 2, "seed {seed}: too few power losses ran");
        anyhow::ensure!(outcome.report.stats.produce_ok > 100, "seed {seed}: too little was acknowledged");
        anyhow::ensure!(
            lost > 0 && !outcome.report.ok,
            "the fsync-off control lost no acknowledged write (seed {seed}); replay: cargo run -p quiver-tests \
             --bin quiver-faults -- --seed {seed} --duration 20s --negative-control fsync-off --consumers 0"
        );
        Ok(())
    })
    .await
}
