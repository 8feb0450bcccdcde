//! The `quiver` CLI as a user drives it: publish from stdin, tail, groups, JSON, errors.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use quiver_tests::{bounded, init_tracing, BrokerProcess};

const BROKER: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const CLI: &str = env!("CARGO_BIN_EXE_quiver-under-test");

fn quiver(broker: &BrokerProcess, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Output> {
    let mut cmd = Command::new(CLI);
    cmd.arg("--broker").arg(broker.addr.to_string()).arg("--ca").arg(broker.ca_path()).args(args);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)?;
    }
    Ok(child.wait_with_output()?)
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_tail_groups_and_errors() -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let ok = |o: &Output| -> anyhow::Result<()> {
                anyhow::ensure!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
                Ok(())
            };
            ok(&quiver(&broker, &["topic", "create", "cli", "--partitions", "3"], None)?)?;
            let input: String = (1..=5000).map(|i| format!("event-{i}\n")).collect();
            ok(&quiver(&broker, &["publish", "cli"], Some(input.as_bytes()))?)?;

            let out = quiver(&broker, &["tail", "cli", "--from", "earliest", "--count", "5000"], None)?;
            ok(&out)?;
            let mut got = lines(&out);
            got.sort();
            let mut want: Vec<String> = input.lines().map(str::to_string).collect();
            want.sort();
            assert_eq!(got, want);

            // Two group tails: together exactly everything, no overlap.
            let g1 = quiver(
                &broker,
                &["tail", "cli", "--from", "earliest", "--group", "g", "--count", "2000"],
                None,
            )?;
            let g2 = quiver(
                &broker,
                &["tail", "cli", "--from", "earliest", "--group", "g", "--count", "3000"],
                None,
            )?;
            ok(&g1)?;
            ok(&g2)?;
            let mut both: Vec<String> = lines(&g1).into_iter().chain(lines(&g2)).collect();
            both.sort();
            assert_eq!(both, want, "group tails overlap or leave a gap");

            // Arguments, key and headers; JSON output.
            ok(&quiver(&broker, &["topic", "create", "one", "--partitions", "1"], None)?)?;
            ok(&quiver(&broker, &["publish", "one", "hello", "--key", "k1", "--header", "a=b"], None)?)?;
            let out =
                quiver(&broker, &["tail", "one", "--from", "earliest", "--count", "1", "--json"], None)?;
            ok(&out)?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            assert_eq!(v["value"], "hello");
            assert_eq!(v["key"], "k1");
            assert_eq!(v["headers"]["a"], "b");
            assert_eq!(v["offset"], 0);

            // Start at a time: everything from the epoch, nothing from the far future.
            let out = quiver(&broker, &["tail", "one", "--from", "time:0", "--count", "1"], None)?;
            ok(&out)?;
            assert_eq!(lines(&out), vec!["hello".to_string()]);

            // A group's offsets reset by time: time:0 is the start of every partition.
            ok(&quiver(
                &broker,
                &["group", "reset-offsets", "g", "--topic", "cli", "--to", "time:0"],
                None,
            )?)?;
            let out = quiver(&broker, &["group", "describe", "g"], None)?;
            ok(&out)?;
            let described = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(described.contains("0 member(s)"), "{described}");
            let again = quiver(&broker, &["tail", "cli", "--group", "g", "--count", "5000"], None)?;
            ok(&again)?;
            assert_eq!(lines(&again).len(), 5000, "after the reset the group reads everything again");

            // Errors: one line, non-zero exit, no panic.
            let out = quiver(&broker, &["tail", "no-such-topic", "--count", "1"], None)?;
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(err.trim(), "error: unknown topic 'no-such-topic'");
            let out = quiver(&broker, &["publish", "no-such-topic", "x"], None)?;
            assert!(!out.status.success());
            assert!(String::from_utf8_lossy(&out.stderr).contains("unknown topic"));

            // A CA that did not sign the broker's certificate.
            let other = tempfile::tempdir()?;
            let files =
                quiver_broker::tls::ensure_certificates(&quiver_broker::BrokerConfig::new(other.path()))?;
            let wrong_ca = files.ca.ok_or_else(|| anyhow::anyhow!("no CA generated"))?;
            let out = Command::new(CLI)
                .args(["--broker", &broker.addr.to_string(), "--ca"])
                .arg(&wrong_ca)
                .args(["topic", "list"])
                .output()?;
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(err.trim().lines().count(), 1, "{err}");
            assert!(err.contains("certificate") || err.contains("TLS"), "{err}");
            assert!(!err.contains("panicked"), "{err}");

            // No --ca, and no development broker's CA where the default points: the error says
            // how to name one.
            let home = tempfile::tempdir()?;
            let out = Command::new(CLI)
                .env("HOME", home.path())
                .env_remove("QUIVER_CA")
                .args(["--broker", &broker.addr.to_string(), "topic", "list"])
                .output()?;
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(err.trim().lines().count(), 1, "{err}");
            assert!(err.contains("pass --ca (or set QUIVER_CA)") && err.contains("No such file"), "{err}");
            Ok(())
        })
        .await?
    })
    .await
}

/// `quiver bench` as a user runs it: a produce+consume run, then a consume-only run of what the
/// first left in the topic; the JSON report must count what really went through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_what_went_through() -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        let pid = broker.pid().ok_or_else(|| anyhow::anyhow!("no broker pid"))?.to_string();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let run = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
                let mut all =
                    vec!["bench", "--json", "--topic", "b", "--message-size", "300", "--broker-pid", &pid];
                all.extend_from_slice(args);
                let out = quiver(&broker, &all, None)?;
                anyhow::ensure!(
                    out.status.success(),
                    "bench failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let text = String::from_utf8_lossy(&out.stdout);
                let json = text.find('{').map(|i| &text[i..]).unwrap_or_default();
                Ok(serde_json::from_str(json)?)
            };
            let count = |r: &serde_json::Value, path: &[&str]| {
                path.iter().try_fold(r, |v, k| v.get(k)).and_then(|v| v.as_u64()).unwrap_or(0)
            };

            let r = run(&["--messages", "3000", "--consumers", "1"])?;
            assert_eq!(count(&r, &["produce", "messages"]), 3000, "{r}");
            assert_eq!(count(&r, &["produce", "bytes"]), 3000 * 300, "{r}");
            assert_eq!(count(&r, &["consume", "messages"]), 3000, "{r}");
            assert_eq!(count(&r, &["produce_latency", "samples"]), 3000, "{r}");
            assert_eq!(count(&r, &["end_to_end_latency", "samples"]), 3000, "{r}");
            assert!(count(&r, &["broker_memory", "peak_kib"]) > 0, "{r}");
            let mtu = count(&r, &["producer_path", "mtu"]);
            assert!((1200..=u64::from(quiver_protocol::limits::MAX_UDP_PAYLOAD)).contains(&mtu), "{r}");
            assert!(count(&r, &["producer_path", "sent_packets"]) > 0, "{r}");

            // Consume-only: the 3,000 messages the first run left.
            let r = run(&["--producers", "0", "--consumers", "1"])?;
            assert_eq!(count(&r, &["consume", "messages"]), 3000, "{r}");
            assert!(r.get("producer_path").is_some_and(|p| p.is_null()), "{r}");
            Ok(())
        })
        .await?
    })
    .await
}

/// Output that cannot be written is an error line or a quiet end, never a panic: a reader that
/// went away (`quiver topic list | head -1`) ends the command with status 0, a full device with
/// one error line and a non-zero status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_output_is_not_a_panic() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for i in 0..50 {
                let o = quiver(&broker, &["topic", "create", &format!("t{i}")], None)?;
                anyhow::ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            }
            let run = |stdout: Stdio| -> anyhow::Result<Output> {
                let mut cmd = Command::new(CLI);
                cmd.arg("--broker").arg(broker.addr.to_string()).arg("--ca").arg(broker.ca_path());
                cmd.args(["topic", "list"]).stdin(Stdio::null()).stdout(stdout).stderr(Stdio::piped());
                Ok(cmd.spawn()?.wait_with_output()?)
            };
            // A pipe whose reader is gone before anything is written.
            let (reader, writer) = std::io::pipe()?;
            drop(reader);
            let closed = run(Stdio::from(writer))?;
            let err = String::from_utf8_lossy(&closed.stderr);
            assert!(closed.status.success(), "closed pipe: {:?} {err}", closed.status);
            assert!(!err.contains("panicked"), "{err}");
            let full = run(Stdio::from(std::fs::OpenOptions::new().write(true).open("/dev/full")?))?;
            let err = String::from_utf8_lossy(&full.stderr);
            assert!(!full.status.success(), "a full device is an error");
            assert!(!err.contains("panicked") && err.lines().count() == 1, "{err}");
            assert!(err.contains("standard output"), "{err}");
            Ok(())
        })
        .await?
    })
    .await
}
