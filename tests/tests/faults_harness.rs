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

/// The negative control: producers with acks=leader while the nemesis isolates and kills
/// leaders. Today's broker acknowledges acks=leader on a replicated partition only once the
/// batch is committed, so this run loses nothing (printed); the checker's teeth are then shown
/// on the run's own history with one acknowledged record removed from every broker's log (it
/// must report it `lost`) and one value written twice (it must report a `duplicate`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_negative_control_is_flagged() -> anyhow::Result<()> {
    use quiver_tests::faults::checker::check;
    use quiver_tests::faults::history::{load, Type};
    init_tracing();
    let seed = seed(7);
    bounded(420, async move {
        let dir = test_dir()?;
        let mut cfg = RunConfig::new(BIN, dir.path(), seed, Duration::from_secs(30));
        cfg.negative_control = Some(NegativeControl::AcksLeader);
        cfg.consumers = 0;
        eprintln!("seed {seed}");
        let outcome = run(&cfg).await?;
        eprintln!("acks=leader under leader isolation and kills:\n{}", outcome.report.table());
        anyhow::ensure!(outcome.report.stats.nemesis_steps >= 3, "too few leader kills ran");

        let mut events = load(&outcome.history)?;
        let victim = events
            .iter()
            .find(|e| e.f == "produce" && e.kind == Type::Ok && e.partition == Some(0))
            .and_then(|e| e.value.clone())
            .ok_or_else(|| anyhow::anyhow!("nothing acknowledged on partition 0"))?;
        for e in events.iter_mut().filter(|e| e.f == "read-log" && e.partition == Some(0)) {
            if let Some(log) = e.log.as_mut() {
                log.retain(|(_, v)| *v != victim);
                let copy = log.first().cloned();
                if let Some((_, v)) = copy {
                    log.push((u64::MAX, v));
                }
            }
        }
        let tampered = check(&events, &Default::default());
        eprintln!("the same history, {victim:?} removed and a value repeated:\n{}", tampered.table());
        let dups = |r: &quiver_tests::faults::Report| r.count("duplicate") + r.stats.duplicate_non_idempotent;
        anyhow::ensure!(!tampered.ok && tampered.count("lost") == 1, "the checker missed a lost record");
        anyhow::ensure!(dups(&tampered) == dups(&outcome.report) + 1, "the checker missed a duplicate");
        Ok(())
    })
    .await
}
