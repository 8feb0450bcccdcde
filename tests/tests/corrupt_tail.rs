//! Consuming up to damaged stored data (a flipped byte in a batch that recovery keeps in place):
//! every good offset before the damage reaches the application (and the CLI's stdout) before
//! the error, the error names where the damage is, and a group commits what it consumed.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use futures::StreamExt;
use quiver_client::{ClientError, Consumer, ConsumerConfig, StartPosition, TopicConfig};
use quiver_protocol::batch::BatchBuilder;
use quiver_protocol::message::{Acks, Message};
use quiver_protocol::{BatchHeader, ErrorCode};
use quiver_tests::{bounded, init_tracing, BrokerProcess};

const BROKER: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const CLI: &str = env!("CARGO_BIN_EXE_quiver-under-test");

/// Records per batch, batches written, and the batch whose bytes get damaged.
const PER_BATCH: u64 = 50;
const BATCHES: u64 = 20;
const DAMAGED: u64 = 10;
const GOOD: u64 = DAMAGED * PER_BATCH;
const TOTAL: u64 = BATCHES * PER_BATCH;

fn value(offset: u64) -> String {
    format!("m{offset:04}-{}", "x".repeat(100))
}

/// Writes `BATCHES` batches of `PER_BATCH` records to partition 0 of `topic`, stops the broker,
/// flips a byte in the middle of batch `DAMAGED`, and starts it again. Returns the damaged
/// batch's segment file name and its position in it.
async fn damaged_topic(
    broker: &mut BrokerProcess,
    topic: &str,
    config: TopicConfig,
) -> anyhow::Result<(String, u64)> {
    let client = broker.client().await?;
    client.admin().create_topic(topic, 1, config).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    for b in 0..BATCHES {
        let mut builder = BatchBuilder::new(8192);
        for i in 0..PER_BATCH {
            builder.push(now, None, value(b * PER_BATCH + i).as_bytes(), &[]);
        }
        let produce = Message::Produce {
            topic: topic.into(),
            partition: 0,
            acks: Acks::Leader,
            batch: builder.finish(),
        };
        match client.request(&produce).await? {
            Message::ProduceOk { base_offset, .. } => assert_eq!(base_offset, b * PER_BATCH),
            other => anyhow::bail!("expected ProduceOk, got kind {}", other.kind()),
        }
    }
    client.close().await;
    broker.terminate().await?;

    // Find the segment and position of the damaged batch by walking the batch headers.
    let dir = broker.data_dir.join(format!("topics/{topic}/0"));
    let mut segments: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".log"))
        .collect();
    segments.sort();
    let target = DAMAGED * PER_BATCH;
    for name in segments {
        let path = dir.join(&name);
        let mut bytes = std::fs::read(&path)?;
        let mut pos = 0;
        while pos < bytes.len() {
            let h = BatchHeader::parse(&bytes[pos..])?;
            if h.base_offset == target {
                bytes[pos + h.total_len() / 2] ^= 0x10;
                std::fs::write(&path, &bytes)?;
                broker.restart().await?;
                return Ok((name, pos as u64));
            }
            pos += h.total_len();
        }
    }
    anyhow::bail!("batch at offset {target} not found")
}

/// Consumes `topic` from the earliest offset until the stream fails; returns the offsets
/// received (acknowledging each) and the error.
async fn consume_until_error(consumer: &mut Consumer) -> anyhow::Result<(Vec<u64>, ClientError)> {
    let mut offsets = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
            Err(_) => anyhow::bail!("no error within 10 s after {} messages", offsets.len()),
            Ok(None) => anyhow::bail!("stream ended without an error after {} messages", offsets.len()),
            Ok(Some(Ok(m))) => {
                assert_eq!(&m.value[..], value(m.offset).as_bytes());
                offsets.push(m.offset);
                m.ack();
            }
            Ok(Some(Err(e))) => return Ok((offsets, e)),
        }
    }
}

/// Runs the CLI against `broker` (on a blocking thread: it waits for the process).
async fn quiver(broker: &BrokerProcess, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(CLI);
    cmd.arg("--broker").arg(broker.addr.to_string()).arg("--ca").arg(broker.ca_path()).args(args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    Ok(tokio::task::spawn_blocking(move || cmd.spawn()?.wait_with_output()).await??)
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

fn values(range: std::ops::Range<u64>) -> Vec<String> {
    range.map(value).collect()
}

/// The committed offset of `group` on partition 0 of `topic`.
async fn committed(broker: &BrokerProcess, group: &str, topic: &str) -> anyhow::Result<Option<u64>> {
    let client = broker.client().await?;
    let offsets = client.admin().group_offsets(group, topic).await?;
    client.close().await;
    Ok(offsets.first().and_then(|p| p.committed))
}

/// Checks a damaged topic through the SDK and the CLI, 20 subscriptions each: all good offsets
/// before the damage, then the error naming the damage's real position; a group commits them.
async fn check_damaged(
    broker: &BrokerProcess,
    topic: &str,
    segment: &str,
    position: u64,
) -> anyhow::Result<()> {
    let client = broker.client().await?;
    let at = format!("{segment} at byte {position}");
    for run in 0..20 {
        let config = ConsumerConfig::new(topic).start(StartPosition::Earliest);
        let mut consumer = Consumer::subscribe(client.clone(), config).await?;
        let (offsets, err) = consume_until_error(&mut consumer).await?;
        assert_eq!(offsets, (0..GOOD).collect::<Vec<_>>(), "run {run}: the good offsets before the damage");
        match err {
            ClientError::Broker { code: ErrorCode::CorruptLog, message } => {
                assert!(message.contains(&at), "run {run}: the error names the damage ({at}): {message}");
                let span = format!("offsets {GOOD}..{}", GOOD + PER_BATCH);
                assert!(
                    message.contains(&span),
                    "run {run}: the error names the offsets ({span}): {message}"
                );
            }
            other => anyhow::bail!("run {run}: expected CorruptLog, got {other:?}"),
        }
        consumer.close().await;
    }

    // An SDK group member: what it acknowledged is committed once it sees the error.
    let config = ConsumerConfig::new(topic).group("sdk").start(StartPosition::Earliest);
    let mut consumer = Consumer::subscribe(client.clone(), config).await?;
    let (offsets, _) = consume_until_error(&mut consumer).await?;
    assert_eq!(offsets.len() as u64, GOOD);
    consumer.commit().await?;
    consumer.close().await;
    assert_eq!(committed(broker, "sdk", topic).await?, Some(GOOD), "the SDK group's commit");
    client.close().await;

    for run in 0..20 {
        let args: &[&str] = match run % 2 {
            0 => &["tail", topic, "--from", "earliest"],
            _ => &["tail", topic, "--from", "earliest", "--count", "1000"],
        };
        let out = quiver(broker, args).await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let got = lines(&out);
        assert!(
            got == values(0..GOOD),
            "run {run}: {} lines printed, want {GOOD} (stderr: {stderr})",
            got.len()
        );
        assert!(!out.status.success(), "run {run}: the tail must fail");
        assert!(stderr.contains(&at), "run {run}: the error names the damage ({at}): {stderr}");
    }

    // A group tail stops at the damage, but first commits what it printed: the group does not
    // start over from 0, and the next tail fails at once at the damage.
    let out = quiver(broker, &["tail", topic, "--from", "earliest", "--group", "gg"]).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let got = lines(&out);
    assert!(got == values(0..GOOD), "group tail: {} lines printed, want {GOOD} ({stderr})", got.len());
    assert!(!out.status.success() && stderr.contains(&at), "group tail: {stderr}");
    assert_eq!(committed(broker, "gg", topic).await?, Some(GOOD), "the group tail's commit");
    let out = quiver(broker, &["tail", topic, "--from", "earliest", "--group", "gg"]).await?;
    assert!(lines(&out).is_empty() && !out.status.success(), "the group resumes at the damage");

    // Getting past the damage: reset the group's offset to the end of the damaged span (the
    // error names it for a span found at start), or tail from there without a group.
    let end = (DAMAGED + 1) * PER_BATCH;
    let to = end.to_string();
    let out = quiver(broker, &["group", "reset-offsets", "gg", "--topic", topic, "--to", &to]).await?;
    assert!(out.status.success(), "reset-offsets: {}", String::from_utf8_lossy(&out.stderr));
    let rest = (TOTAL - end).to_string();
    for extra in [&["--group", "gg"][..], &["--from", &to][..]] {
        let mut args = vec!["tail", topic, "--count", &rest];
        args.extend_from_slice(extra);
        let out = quiver(broker, &args).await?;
        let got = lines(&out);
        assert!(got == values(end..TOTAL), "{extra:?}: {} lines past the damage", got.len());
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_the_active_segment() -> anyhow::Result<()> {
    init_tracing();
    bounded(240, async {
        let dir = tempfile::tempdir()?;
        let mut broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        let (segment, position) = damaged_topic(&mut broker, "rot", TopicConfig::default()).await?;
        check_damaged(&broker, "rot", &segment, position).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_a_closed_segment() -> anyhow::Result<()> {
    init_tracing();
    bounded(240, async {
        let dir = tempfile::tempdir()?;
        let mut broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        // About 5.8 KB per batch: 3 batches per segment, the damaged one the second of a closed
        // segment (its base is 450).
        let config = TopicConfig::default().with_segment_bytes(18_000);
        let (segment, position) = damaged_topic(&mut broker, "rot", config).await?;
        anyhow::ensure!(segment != "00000000000000000000.log" && position > 0, "{segment} {position}");
        check_damaged(&broker, "rot", &segment, position).await
    })
    .await
}
