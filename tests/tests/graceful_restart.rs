//! A graceful broker restart (SIGTERM, start again on the same port) ends no client: running
//! `quiver tail` processes, plain and in a group, stay alive and print what is published after
//! the restart, and a `quiver publish` fed across the restart gets every message acknowledged.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use quiver_client::TopicConfig;
use quiver_tests::{bounded, init_tracing, BrokerProcess};

const BROKER: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const CLI: &str = env!("CARGO_BIN_EXE_quiver-under-test");

/// A `quiver tail` process writing to files; killed when dropped.
struct Tail {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Tail {
    fn start(broker: &BrokerProcess, dir: &Path, name: &str, args: &[&str]) -> anyhow::Result<Tail> {
        let (out, err) = (dir.join(format!("{name}.out")), dir.join(format!("{name}.err")));
        let child = broker
            .cli(CLI)
            .arg("tail")
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?)
            .spawn()?;
        Ok(Tail { child, out, err })
    }

    fn lines(&self) -> BTreeSet<String> {
        std::fs::read_to_string(&self.out).unwrap_or_default().lines().map(str::to_string).collect()
    }

    /// `Err` with its exit status and stderr once the process has ended.
    fn alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => anyhow::bail!(
                "tail exited ({status}): {}",
                std::fs::read_to_string(&self.err).unwrap_or_default().trim()
            ),
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until every plain tail printed all of `want` and the group tails together
/// did, failing at once if a tail exits.
async fn wait_for(
    plain: &mut [Tail],
    group: &mut [Tail],
    want: &BTreeSet<String>,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for t in plain.iter_mut().chain(group.iter_mut()) {
            t.alive()?;
        }
        let plain_done = plain.iter().all(|t| t.lines().is_superset(want));
        let group_lines: BTreeSet<String> = group.iter().flat_map(Tail::lines).collect();
        if plain_done && group_lines.is_superset(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let missing: Vec<usize> = plain.iter().map(|t| want.difference(&t.lines()).count()).collect();
            anyhow::bail!(
                "{what}: plain tails miss {missing:?} of {}, the group misses {}",
                want.len(),
                want.difference(&group_lines).count()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn values(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tails_and_a_publisher_ride_through_a_graceful_restart() -> anyhow::Result<()> {
    init_tracing();
    bounded(240, async {
        let dir = tempfile::tempdir()?;
        let mut broker = BrokerProcess::start(BROKER, &dir.path().join("data"), None).await?;
        let client = broker.client().await?;
        client.admin().create_topic("follow", 2, TopicConfig::default()).await?;
        client.close().await;

        let mut plain = Vec::new();
        let mut group = Vec::new();
        for i in 0..3 {
            plain.push(Tail::start(
                &broker,
                dir.path(),
                &format!("plain{i}"),
                &["follow", "--from", "earliest"],
            )?);
            let args = ["follow", "--from", "earliest", "--group", "g", "--session-timeout-ms", "3000"];
            group.push(Tail::start(&broker, dir.path(), &format!("group{i}"), &args)?);
        }

        let before = values("before", 20);
        let out = broker.cli(CLI).arg("publish").arg("follow").args(&before).output()?;
        anyhow::ensure!(out.status.success(), "publish: {}", String::from_utf8_lossy(&out.stderr));
        wait_for(&mut plain, &mut group, &before.into_iter().collect(), "before the restart").await?;

        // A publisher fed a line every 50 ms across the restart.
        let mut publisher = broker
            .cli(CLI)
            .args(["publish", "follow"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdin = publisher.stdin.take().ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        let mid = values("mid", 60);
        let feed = {
            let mid = mid.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                for v in mid {
                    writeln!(stdin, "{v}")?;
                    stdin.flush()?;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(()) // stdin closes: the publisher flushes and exits
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;

        broker.restart_graceful().await?;
        tracing::info!("broker restarted gracefully");

        let after = values("after", 20);
        let out = broker.cli(CLI).arg("publish").arg("follow").args(&after).output()?;
        anyhow::ensure!(out.status.success(), "publish: {}", String::from_utf8_lossy(&out.stderr));

        feed.join().map_err(|_| anyhow::anyhow!("feeder panicked"))??;
        let published = tokio::task::spawn_blocking(move || publisher.wait_with_output()).await??;
        anyhow::ensure!(
            published.status.success(),
            "the publisher across the restart failed: {}",
            String::from_utf8_lossy(&published.stderr)
        );

        let want: BTreeSet<String> = after.into_iter().chain(mid).collect();
        wait_for(&mut plain, &mut group, &want, "after the restart").await?;
        broker.kill9();
        Ok(())
    })
    .await
}

/// CLI commands run while the broker drains for a graceful restart wait for it to be back
/// instead of failing at once with "the broker is shutting down" (a new user's loop of `quiver publish`
/// failed 255 times in a row during a 2.7 s drain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_during_a_graceful_restart_wait_for_the_broker() -> anyhow::Result<()> {
    init_tracing();
    bounded(90, async {
        let dir = tempfile::tempdir()?;
        let mut broker = BrokerProcess::start(BROKER, &dir.path().join("data"), None).await?;
        let client = broker.client().await?;
        client.admin().create_topic("r", 1, TopicConfig::default()).await?;
        // A subscription keeps a stream open, so the broker drains for a while.
        let _tail = Tail::start(&broker, dir.path(), "tail", &["r"])?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A CLI command at a time, as a user's loop runs them: each connects anew, so those
        // started while the broker drains get a connection that it closes at once.
        let asking = {
            let (mut describe, stop) = (broker.cli(CLI), stop.clone());
            describe.args(["topic", "describe", "r"]);
            tokio::task::spawn_blocking(move || {
                let (mut ok, mut failed) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match describe.output() {
                        Ok(out) if out.status.success() => ok += 1,
                        Ok(out) => failed.push(String::from_utf8_lossy(&out.stderr).trim().to_string()),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        broker.restart_graceful().await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (ok, failed) = asking.await?;
        eprintln!("{ok} commands answered across the restart, {} failed", failed.len());
        anyhow::ensure!(
            failed.is_empty(),
            "{} commands failed, e.g. {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
        client.close().await;
        Ok(())
    })
    .await
}

/// A member that joins again (the restarted broker forgot it) drops what its old sessions still
/// had buffered: those records come again in the new sessions, so handing the old copies out too
/// delivered each twice (and, in a cluster, after another member had committed past them: the
/// redelivered-after-commit of the fault run of seed 1215).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoining_member_does_not_hand_out_what_its_old_sessions_buffered() -> anyhow::Result<()> {
    use futures::StreamExt;
    init_tracing();
    bounded(90, async {
        let dir = tempfile::tempdir()?;
        let mut broker = BrokerProcess::start(BROKER, &dir.path().join("data"), None).await?;
        let client = broker.client().await?;
        client.admin().create_topic("buffered", 1, TopicConfig::default()).await?;
        let producer = quiver_client::Producer::new(client.clone(), quiver_client::ProducerConfig::default());
        for i in 0..100 {
            producer.send("buffered", quiver_client::ProducerRecord::new(format!("v{i}"))).await?;
        }
        let config = quiver_client::ConsumerConfig::new("buffered")
            .group("bufferers")
            .start(quiver_client::StartPosition::Earliest);
        let mut consumer = quiver_client::Consumer::subscribe(client.clone(), config).await?;
        let mut events = consumer.events().ok_or_else(|| anyhow::anyhow!("no events"))?;
        // Deliveries pile up unread while the broker restarts and forgets the member.
        tokio::time::sleep(Duration::from_secs(1)).await;
        while events.try_recv().is_ok() {}
        broker.restart_graceful().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(quiver_client::ConsumerEvent::Assigned(_))) => break,
                Ok(Some(_)) => {}
                _ => anyhow::bail!("the member did not join again after the restart"),
            }
        }
        let mut offsets = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await {
            let m = m?;
            m.ack();
            offsets.push(m.offset);
        }
        let distinct: std::collections::BTreeSet<u64> = offsets.iter().copied().collect();
        eprintln!("{} deliveries, {} distinct offsets", offsets.len(), distinct.len());
        anyhow::ensure!(distinct.len() == 100, "{} of 100 records delivered", distinct.len());
        anyhow::ensure!(offsets.len() == 100, "{} deliveries of 100 records", offsets.len());
        consumer.close().await;
        client.close().await;
        Ok(())
    })
    .await
}
