//! The fault harness in CI (docs/faults.md): a short seeded schedule of every fault against
//! three brokers must show no anomaly, and the acks=leader negative control must be flagged
//! (the checker can fail). `QUIVER_FAULTS_SEED` picks another seed; a failure prints the
//! `quiver-faults` command that replays it. The consumer group's coordinator is spared by the
//! process faults (`--spare-coordinator`): group state is not replicated yet (docs/faults.md).

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
    let seed = seed(42);
    bounded(480, async move {
        let dir = test_dir()?;
        let mut cfg = RunConfig::new(BIN, dir.path(), seed, Duration::from_secs(75));
        cfg.faults = FaultKind::ALL.to_vec();
        cfg.spare_coordinator = true;
        eprintln!("seed {seed}");
        let outcome = run(&cfg).await?;
        eprintln!("{}", outcome.report.table());
        anyhow::ensure!(
            outcome.report.ok,
            "anomalies {:?}; replay: cargo run -p quiver-tests --bin quiver-faults -- --seed {seed} --duration 75s \
             --brokers 3 --faults all --spare-coordinator",
            outcome.report.failing()
        );
        anyhow::ensure!(outcome.report.stats.produce_ok > 100, "too little was acknowledged to prove anything");
        anyhow::ensure!(outcome.report.stats.nemesis_steps >= 5, "too few faults ran");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acks_leader_negative_control_loses_acknowledged_writes() -> anyhow::Result<()> {
    init_tracing();
    let seed = seed(7);
    bounded(420, async move {
        let dir = test_dir()?;
        let mut cfg = RunConfig::new(BIN, dir.path(), seed, Duration::from_secs(40));
        cfg.negative_control = Some(NegativeControl::AcksLeader);
        cfg.consumers = 0;
        eprintln!("seed {seed}");
        let outcome = run(&cfg).await?;
        eprintln!("{}", outcome.report.table());
        anyhow::ensure!(
            outcome.report.count("lost") > 0 && !outcome.report.ok,
            "the checker did not flag acks=leader under leader kills (seed {seed})"
        );
        Ok(())
    })
    .await
}
