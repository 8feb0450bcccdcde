//! The data directory belongs to one broker, and no legal topic name or setting can make the
//! broker lose or strand data in it (issue 15, items 1, 2 and 12).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use quiver_client::{Client, Consumer, ConsumerConfig, StartPosition, TopicConfig};
use quiver_protocol::ErrorCode;
use quiver_tests::{bounded, free_udp_port, init_tracing, publish, BrokerProcess};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");

/// Every value of `topic`, read from the start until `n` arrived.
async fn read_all(client: &Client, topic: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let mut consumer =
        Consumer::subscribe(client.clone(), ConsumerConfig::new(topic).start(StartPosition::Earliest))
            .await?;
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let msg = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .map_err(|_| anyhow::anyhow!("{topic}: only {} of {n} within 20 s", got.len()))?
            .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        got.push(String::from_utf8(msg.value.to_vec())?);
    }
    got.sort();
    Ok(got)
}

fn values(prefix: &str, n: usize) -> Vec<String> {
    let mut v: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:05}")).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_on_a_live_data_directory_fails_at_once_and_touches_nothing() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let mut first = BrokerProcess::start(BIN, dir.path(), None).await?;
        let client = first.client().await?;
        client.admin().create_topic("t", 1, TopicConfig::default()).await?;
        publish(&client, "t", values("before", 500)).await?;

        // The second broker, on another port, the same directory.
        let port = free_udp_port();
        let started = Instant::now();
        let mut second = Command::new(BIN)
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let status = loop {
            if let Some(status) = second.try_wait()? {
                break Some(status);
            }
            if started.elapsed() > Duration::from_secs(15) {
                let _ = second.kill();
                let _ = second.wait();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = second.stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
        }
        let status =
            status.ok_or_else(|| anyhow::anyhow!("the second broker kept running; stderr:\n{stderr}"))?;
        anyhow::ensure!(!status.success(), "the second broker exited 0");
        let pid = first.pid().ok_or_else(|| anyhow::anyhow!("no pid"))?;
        anyhow::ensure!(stderr.contains(&dir.path().display().to_string()), "no directory in: {stderr}");
        anyhow::ensure!(stderr.contains(&format!("pid {pid}")), "no holder pid in: {stderr}");

        // The first broker goes on, and a crash and recovery find everything it acknowledged.
        publish(&client, "t", values("after", 500)).await?;
        client.close().await;
        first.kill9();
        first.restart().await?;
        anyhow::ensure!(
            !first.log().contains("truncating a damaged tail"),
            "recovery cut data:\n{}",
            first.log()
        );
        let client = first.client().await?;
        let mut want = values("before", 500);
        want.extend(values("after", 500));
        want.sort();
        assert_eq!(read_all(&client, "t", 1000).await?, want);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_names_that_look_like_deletion_markers_keep_their_data() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let mut broker = BrokerProcess::start(BIN, dir.path(), None).await?;
        let client = broker.client().await?;
        let admin = client.admin();
        let longest = "l".repeat(quiver_protocol::limits::MAX_TOPIC_NAME_BYTES);
        for name in ["v", "v.deleting", "orders.deleting", longest.as_str()] {
            admin.create_topic(name, 2, TopicConfig::default()).await?;
            publish(&client, name, values(name, 50)).await?;
        }
        // Deleting `v` while `v.deleting` exists, and a name of the longest legal length.
        admin.delete_topic("v").await?;
        admin.delete_topic(&longest).await?;
        client.close().await;

        broker.kill9();
        broker.restart().await?;
        let client = broker.client().await?;
        let names: Vec<String> = client.admin().list_topics().await?.into_iter().map(|t| t.name).collect();
        assert_eq!(names, vec!["orders.deleting".to_string(), "v.deleting".to_string()]);
        for name in ["v.deleting", "orders.deleting"] {
            assert_eq!(read_all(&client, name, 50).await?, values(name, 50), "{name}");
        }
        // A deleted name can be created again, empty.
        client.admin().create_topic("v", 1, TopicConfig::default()).await?;
        let info = client.admin().describe_topic("v").await?;
        assert_eq!(info.partitions[0].high_watermark, 0);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_bytes_past_the_limit_is_refused_and_leaves_nothing_behind() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BIN, dir.path(), None).await?;
        let client = broker.client().await?;
        let max = quiver_protocol::limits::MAX_SEGMENT_BYTES;
        for bad in [max + 1, u64::from(u32::MAX), 100] {
            let config = TopicConfig::default().with_segment_bytes(bad);
            let err = client.admin().create_topic("big", 1, config).await.expect_err("accepted");
            assert_eq!(err.code(), Some(ErrorCode::InvalidTopic), "{err}");
            assert!(err.to_string().contains("segment_bytes"), "{err}");
            assert!(!dir.path().join("topics").join("big").exists(), "a directory stayed behind");
        }
        let config = TopicConfig::default().with_segment_bytes(max);
        client.admin().create_topic("big", 1, config).await?;
        publish(&client, "big", values("x", 10)).await?;
        assert_eq!(read_all(&client, "big", 10).await?, values("x", 10));
        Ok(())
    })
    .await
}

/// Issue 15, item 13: a broker whose partitions once fit a higher open-file limit still starts
/// under a lower one (idle partitions hold one file each), and a topic that would not fit the
/// limit is refused with a clear error, leaving nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_on_disk_never_stop_a_start_and_topics_past_the_file_limit_are_refused(
) -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let mut broker = BrokerProcess::start(BIN, &data, None).await?;
        let client = broker.client().await?;
        client.admin().create_topic("wide", 300, TopicConfig::default()).await?;
        publish(&client, "wide", values("w", 900)).await?;
        client.close().await;
        broker.kill9();

        // The same broker under a 512-file limit, hard and soft, so it cannot raise it: three
        // files per partition (as before) would need 900.
        let low = dir.path().join("quiverd-ulimit-512");
        std::fs::write(&low, format!("#!/bin/sh\nulimit -n 512 || exit 97\nexec '{BIN}' \"$@\"\n"))?;
        std::fs::set_permissions(&low, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let mut low_broker = BrokerProcess::start(low.to_str().unwrap_or_default(), &data, None).await?;
        let client = low_broker.client().await?;
        assert_eq!(read_all(&client, "wide", 900).await?, values("w", 900));

        let err =
            client.admin().create_topic("more", 10, TopicConfig::default()).await.expect_err("accepted");
        assert_eq!(err.code(), Some(ErrorCode::LimitExceeded), "{err}");
        assert!(err.to_string().contains("open-file limit of 512"), "{err}");
        assert!(!data.join("topics").join("more").exists(), "a directory stayed behind");
        client.close().await;
        low_broker.kill9();
        Ok(())
    })
    .await
}

/// A topic directory that could not be loaded at start is never discarded by a create of the
/// same name (new-user review: create removed any directory of the name it did not know).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_could_not_be_loaded_is_not_discarded_by_a_create() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let mut broker = BrokerProcess::start(BIN, dir.path(), None).await?;
        let client = broker.client().await?;
        client.admin().create_topic("keep", 1, TopicConfig::default()).await?;
        publish(&client, "keep", values("k", 10)).await?;
        client.close().await;
        broker.kill9();
        // topic.json unreadable (here: a directory in its place): the start skips the topic.
        let topic_dir = dir.path().join("topics").join("keep");
        std::fs::rename(topic_dir.join("topic.json"), dir.path().join("topic.json.saved"))?;
        std::fs::create_dir(topic_dir.join("topic.json"))?;
        broker.restart().await?;
        let client = broker.client().await?;
        let err = client.admin().create_topic("keep", 1, TopicConfig::default()).await.expect_err("created");
        assert_eq!(err.code(), Some(ErrorCode::TopicExists), "{err}");
        assert!(err.to_string().contains("could not be loaded"), "{err}");
        // The data is still there: put topic.json back and it loads.
        client.close().await;
        broker.kill9();
        std::fs::remove_dir(topic_dir.join("topic.json"))?;
        std::fs::rename(dir.path().join("topic.json.saved"), topic_dir.join("topic.json"))?;
        broker.restart().await?;
        let client = broker.client().await?;
        assert_eq!(read_all(&client, "keep", 10).await?, values("k", 10));
        Ok(())
    })
    .await
}
