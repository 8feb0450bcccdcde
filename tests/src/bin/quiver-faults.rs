//! `quiver-faults`: the fault harness (docs/faults.md). Runs a seeded nemesis against a local
//! cluster of real brokers under a recorded workload and checks the history:
//!
//! ```text
//! cargo run -p quiver-tests --bin quiver-faults -- --duration 60s --seed 42 --brokers 3
//! cargo run -p quiver-tests --bin quiver-faults -- check <out>/history.jsonl
//! ```
//!
//! Exit code 0: no anomaly outside `--allow`; 1: anomalies; 2: the harness itself failed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use quiver_tests::faults::checker::{self, Report};
use quiver_tests::faults::history;
use quiver_tests::faults::nemesis::FaultKind;
use quiver_tests::faults::{run, NegativeControl, RunConfig};

#[derive(Parser)]
#[command(name = "quiver-faults", about = "Jepsen-style fault runs against a local Quiver cluster")]
#[command(args_conflicts_with_subcommands = true)]
struct Args {
    /// How long the nemesis runs (e.g. 60s, 5m); the heal, quiet period and checks follow.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the nemesis schedule and the workload's choices [default: from the clock].
    #[arg(long)]
    seed: Option<u64>,
    /// Brokers in the cluster.
    #[arg(long, default_value_t = 3)]
    brokers: u64,
    /// Partitions of the topic (replicated on min(brokers, 3) brokers).
    #[arg(long, default_value_t = 3)]
    partitions: u32,
    /// Faults, comma separated: kill, pause, restart, halves, bridge, one-way, isolate, flap,
    /// links, corrupt, power-loss, membership, clock; or all, partition, process, none.
    #[arg(long, default_value = "all")]
    faults: String,
    /// Producers (producer-0 idempotent, the others as the seed says; acks=all).
    #[arg(long, default_value_t = 3)]
    producers: usize,
    /// Group consumers (one group).
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Where the history, summary and brokers' data go [default: a new temp dir, printed, kept].
    #[arg(long)]
    out: Option<PathBuf>,
    /// A run the checker must flag: acks-leader or fsync-off (docs/faults.md).
    #[arg(long, value_parser = |s: &str| s.parse::<NegativeControl>())]
    negative_control: Option<NegativeControl>,
    /// Anomaly kinds to report without failing (comma separated): a kind, `group` or
    /// `group-redelivery`. Printed when used.
    #[arg(long, value_delimiter = ',')]
    allow: Vec<String>,
    /// Process faults (kill, pause, restart, corrupt, power-loss) leave alone the broker the
    /// consumers talk to first (the group's coordinator before group state was replicated; the
    /// coordinator is now the leader of the group's `__offsets` partition, which moves).
    #[arg(long)]
    spare_coordinator: bool,
    /// The quiverd binary [default: $QUIVERD_UNDER_TEST, or quiverd-under-test next to this
    /// program, built with cargo if missing].
    #[arg(long)]
    quiverd: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Checks a history file alone and prints the same table and summary.
    Check {
        history: PathBuf,
        /// As for a run.
        #[arg(long, value_delimiter = ',')]
        allow: Vec<String>,
    },
}

fn main() {
    let code = match real_main() {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("quiver-faults: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn real_main() -> anyhow::Result<bool> {
    let args = Args::parse();
    let filter = std::env::var("QUIVER_FAULTS_LOG").unwrap_or_else(|_| "warn,quiver_tests=info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    if let Some(Command::Check { history, allow }) = &args.command {
        let allow = allow_list(allow)?;
        let events = history::load(history)?;
        let report = checker::check(&events, &allow);
        print_report(&report);
        return Ok(report.ok);
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let out = match &args.out {
        Some(o) => o.clone(),
        None => tempfile::Builder::new().prefix("quiver-faults-").tempdir()?.keep(),
    };
    let quiverd = quiverd(args.quiverd.as_deref())?;
    let allow = allow_list(&args.allow)?;
    let kinds = FaultKind::parse_list(&args.faults).map_err(|e| anyhow::anyhow!(e))?;
    let faults: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
    println!("quiver-faults: seed {seed}");
    println!(
        "  duration {:?}, {} brokers, {} partitions, faults {}, negative control {:?}",
        args.duration,
        args.brokers,
        args.partitions,
        if faults.is_empty() { "none".to_string() } else { faults.join(",") },
        args.negative_control
    );
    println!("  out: {}", out.display());
    if args.spare_coordinator {
        println!("  --spare-coordinator: process faults leave the consumer group's coordinator alone");
    }
    if !allow.is_empty() {
        println!("  --allow: these anomaly kinds are reported but do not fail the run: {allow:?}");
    }
    let mut cfg = RunConfig::new(quiverd, &out, seed, args.duration);
    cfg.brokers = args.brokers;
    cfg.partitions = args.partitions;
    cfg.faults = kinds.clone();
    cfg.producers = args.producers;
    cfg.consumers = args.consumers;
    cfg.negative_control = args.negative_control;
    cfg.allow = allow;
    cfg.spare_coordinator = args.spare_coordinator;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // Bounded: the nemesis's duration plus the heal, quiet period and reads.
    let bound = args.duration + Duration::from_secs(600);
    let outcome = runtime.block_on(async {
        tokio::time::timeout(bound, run(&cfg))
            .await
            .map_err(|_| anyhow::anyhow!("the run took over {bound:?}"))?
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    let outcome = outcome?;
    print_report(&outcome.report);
    println!("history: {}", outcome.history.display());
    if !outcome.report.ok {
        let mut replay = format!(
            "replay: cargo run -p quiver-tests --bin quiver-faults -- --seed {seed} --duration {}s --brokers {} --partitions {} --faults {}",
            args.duration.as_secs(),
            args.brokers,
            args.partitions,
            if faults.is_empty() { "none".to_string() } else { faults.join(",") },
        );
        if args.spare_coordinator {
            replay.push_str(" --spare-coordinator");
        }
        if let Some(nc) = args.negative_control {
            replay.push_str(match nc {
                NegativeControl::AcksLeader => " --negative-control acks-leader",
                NegativeControl::FsyncOff => " --negative-control fsync-off",
            });
        }
        println!("{replay}");
        println!(
            "(the same seed gives the same schedule and workload choices; process timing is not replayed)"
        );
    }
    Ok(outcome.report.ok)
}

fn allow_list(names: &[String]) -> anyhow::Result<std::collections::BTreeSet<String>> {
    checker::expand_allow(names).map_err(|e| anyhow::anyhow!(e))
}

fn print_report(report: &Report) {
    println!("{}", report.table());
    if let Ok(json) = serde_json::to_string(report) {
        println!("{json}");
    }
    match report.failing().as_slice() {
        [] => println!(
            "RESULT: no anomalies{}",
            if report.allowed.is_empty() { "" } else { " outside --allow" }
        ),
        kinds => println!("RESULT: anomalies found: {}", kinds.join(", ")),
    }
}

/// Parses `90`, `90s`, `500ms`, `5m`, `1h`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration '{s}' (e.g. 60s, 5m, 500ms)"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" | "min" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("bad duration unit in '{s}' (ms, s, m, h)")),
    }
}

/// The broker binary: the flag, `$QUIVERD_UNDER_TEST`, or `quiverd-under-test` beside this
/// program (`cargo run --bin quiver-faults` builds only this binary, so it is built with the
/// cargo that ran us when missing).
fn quiverd(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("QUIVERD_UNDER_TEST") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe()?;
    let dir = me.parent().context("the program's directory")?;
    let bin = dir.join(format!("quiverd-under-test{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        let cargo = std::env::var_os("CARGO").context(
            "quiverd-under-test is not built: run `cargo build -p quiver-tests --bin quiverd-under-test` or pass --quiverd",
        )?;
        eprintln!("building quiverd-under-test ...");
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "quiver-tests", "--bin", "quiverd-under-test"])
            .status()?;
        anyhow::ensure!(status.success(), "building quiverd-under-test failed");
    }
    anyhow::ensure!(bin.exists(), "{} missing", bin.display());
    Ok(bin)
}
