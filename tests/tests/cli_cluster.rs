//! The `quiver` CLI's cluster-facing surface against one broker: `cluster status` (table and
//! JSON), `publish --acks all`, `topic create --replicas`, `topic describe`, and a `--broker`
//! list with dead entries.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use quiver_tests::{bounded, free_udp_port, init_tracing, BrokerProcess};

const BROKER: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const CLI: &str = env!("CARGO_BIN_EXE_quiver-under-test");

/// Runs the CLI with `--broker brokers --ca ca` and `args`, feeding `stdin`.
fn quiver(
    brokers: &str,
    ca: &std::path::Path,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> anyhow::Result<Output> {
    let mut cmd = Command::new(CLI);
    cmd.arg("--broker").arg(brokers).arg("--ca").arg(ca).args(args);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)?;
    }
    Ok(child.wait_with_output()?)
}

fn ok(o: &Output) -> anyhow::Result<String> {
    anyhow::ensure!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn keys(v: &serde_json::Value) -> BTreeSet<&str> {
    v.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_json_on_one_broker_names_it_with_the_documented_fields() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        let (addr, ca) = (broker.addr.to_string(), broker.ca_path());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let out = ok(&quiver(&addr, &ca, &["cluster", "status", "--json"], None)?)?;
            assert_eq!(out.lines().count(), 1, "one JSON object: {out}");
            let v: serde_json::Value = serde_json::from_str(&out)?;
            assert_eq!(keys(&v), BTreeSet::from(["brokers", "partitions"]), "{v}");
            let brokers = v["brokers"].as_array().ok_or_else(|| anyhow::anyhow!("brokers: {v}"))?;
            assert_eq!(brokers.len(), 1, "{v}");
            assert_eq!(keys(&brokers[0]), BTreeSet::from(["id", "addr", "up"]), "{v}");
            assert!(brokers[0]["id"].is_u64(), "{v}");
            assert_eq!(brokers[0]["addr"], addr.as_str());
            assert_eq!(brokers[0]["up"], true);
            let partitions = v["partitions"].as_array().ok_or_else(|| anyhow::anyhow!("partitions: {v}"))?;
            for p in partitions {
                let want = ["topic", "partition", "leader", "epoch", "replicas", "in_sync", "commit", "lag"];
                assert_eq!(keys(p), BTreeSet::from(want), "{v}");
            }

            let table = ok(&quiver(&addr, &ca, &["cluster", "status"], None)?)?;
            let lines: Vec<&str> = table.lines().collect();
            assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), ["id", "addr", "up"], "{table}");
            assert!(lines[1].contains(addr.as_str()) && lines[1].ends_with("yes"), "{table}");
            assert!(lines.iter().any(|l| l.starts_with("topic") && l.contains("in_sync")), "{table}");
            Ok(())
        })
        .await?
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_acks_all_and_replicas_on_one_broker() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        let (addr, ca) = (broker.addr.to_string(), broker.ca_path());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let created = ok(&quiver(
                &addr,
                &ca,
                &["topic", "create", "acked", "--partitions", "2", "--replicas", "1"],
                None,
            )?)?;
            assert_eq!(created.trim(), "created topic acked with 2 partition(s)");
            let input: String = (0..2000).map(|i| format!("all-{i}\n")).collect();
            ok(&quiver(&addr, &ca, &["publish", "acked", "--acks", "all"], Some(input.as_bytes()))?)?;
            // The default is all too; leader and none are still there.
            ok(&quiver(&addr, &ca, &["publish", "acked", "default-1"], None)?)?;
            ok(&quiver(&addr, &ca, &["publish", "acked", "--acks", "leader", "leader-1"], None)?)?;
            let bad = quiver(&addr, &ca, &["publish", "acked", "--acks", "most", "x"], None)?;
            assert!(!bad.status.success());

            let out =
                ok(&quiver(&addr, &ca, &["tail", "acked", "--from", "earliest", "--count", "2002"], None)?)?;
            let got: BTreeSet<&str> = out.lines().collect();
            let mut want: BTreeSet<&str> = input.lines().collect();
            want.extend(["default-1", "leader-1"]);
            assert_eq!(got, want);

            let described = ok(&quiver(&addr, &ca, &["topic", "describe", "acked"], None)?)?;
            let lines: Vec<&str> = described.lines().collect();
            assert!(lines[1].contains("replicas=1"), "{described}");
            let header: Vec<&str> = lines[2].split_whitespace().collect();
            assert_eq!(
                header,
                ["partition", "leader", "epoch", "replicas", "in_sync", "lag", "log_start", "high_watermark"]
            );
            let total: u64 = lines[3..]
                .iter()
                .map(|l| l.split_whitespace().last().and_then(|hw| hw.parse::<u64>().ok()).unwrap_or(0))
                .sum();
            assert_eq!(total, 2002, "{described}");
            Ok(())
        })
        .await?
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_list_skips_dead_entries_and_gives_up_in_bounded_time() -> anyhow::Result<()> {
    init_tracing();
    bounded(90, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        let (addr, ca) = (broker.addr.to_string(), broker.ca_path());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let dead = || format!("127.0.0.1:{}", free_udp_port());
            let (d1, d2) = (dead(), dead());
            ok(&quiver(&format!("{d1},{addr}"), &ca, &["topic", "create", "via-list"], None)?)?;
            let listed = ok(&quiver(&format!("{d1}, {addr}"), &ca, &["topic", "list"], None)?)?;
            assert!(listed.contains("via-list"), "{listed}");

            let started = Instant::now();
            let out = quiver(&format!("{d1},{d2}"), &ca, &["topic", "list"], None)?;
            let took = started.elapsed();
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(&d1) && err.contains(&d2), "both named: {err}");
            assert_eq!(err.lines().count(), 1, "one line: {err}");
            assert!(took < Duration::from_secs(12), "gave up after {took:?}");
            Ok(())
        })
        .await?
    })
    .await
}
