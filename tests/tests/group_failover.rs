//! Consumer groups, as users run them: three `quiver tail --group` processes share a
//! 6-partition topic, two partitions each; one is SIGKILLed mid-stream; within its session
//! timeout its partitions move to the others, which start from the committed offset, so every
//! message is printed by some member (what the killed one had not committed, again).

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quiver_client::{Producer, ProducerConfig, ProducerRecord, TopicConfig};
use quiver_tests::{bounded, init_tracing, next_message, publish, BrokerProcess};

const BROKER: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const CLI: &str = env!("CARGO_BIN_EXE_quiver-under-test");
const SESSION_MS: u64 = 2000;

struct Tail {
    child: Child,
    out: std::path::PathBuf,
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(broker: &BrokerProcess, dir: &std::path::Path, n: usize) -> anyhow::Result<Tail> {
    let out = dir.join(format!("tail-{n}.out"));
    let child = Command::new(CLI)
        .args(["--broker", &broker.addr.to_string(), "--ca"])
        .arg(broker.ca_path())
        .args(["tail", "orders", "--group", "workers", "--from", "earliest"])
        .args(["--session-timeout-ms", &SESSION_MS.to_string()])
        .stdout(std::fs::File::create(&out)?)
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Tail { child, out })
}

fn lines(t: &Tail) -> Vec<String> {
    std::fs::read_to_string(&t.out).unwrap_or_default().lines().map(str::to_string).collect()
}

async fn wait_for(
    what: &str,
    secs: u64,
    mut f: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await? {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_member_partitions_move_and_nothing_is_lost() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, &dir.path().join("broker"), None).await?;
        let client = broker.client().await?;
        let admin = client.admin();
        admin.create_topic("orders", 6, TopicConfig::default()).await?;

        let mut tails = [tail(&broker, dir.path(), 0)?, tail(&broker, dir.path(), 1)?, tail(&broker, dir.path(), 2)?];
        wait_for("three members with two partitions each", 30, async || {
            let d = match admin.describe_group("workers").await {
                Ok(d) => d,
                Err(_) => return Ok(false),
            };
            Ok(d.members.len() == 3 && d.members.iter().all(|m| m.partitions.len() == 2))
        })
        .await?;

        // Produce a third, kill one member (SIGKILL: no leave, no commit), produce the rest.
        const N: u64 = 3000;
        let send = async |range: std::ops::Range<u64>| publish(&client, "orders", range.map(|i| format!("m-{i}"))).await;
        send(0..N / 3).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let victim = &mut tails[0];
        victim.child.kill()?;
        victim.child.wait()?;
        let killed_at = Instant::now();
        send(N / 3..2 * N / 3).await?;

        // Within the session timeout (plus a heartbeat or two), the survivors own everything.
        wait_for("two members with three partitions each", 15, async || {
            let d = admin.describe_group("workers").await?;
            Ok(d.members.len() == 2 && d.members.iter().all(|m| m.partitions.len() == 3))
        })
        .await?;
        let moved_after = killed_at.elapsed();
        assert!(moved_after < Duration::from_millis(SESSION_MS * 3), "took {moved_after:?}");
        send(2 * N / 3..N).await?;

        // Every message is printed by some member; duplicates only from what was redelivered.
        let want: HashSet<String> = (0..N).map(|i| format!("m-{i}")).collect();
        wait_for("every message printed", 30, async || {
            let got: HashSet<String> = tails.iter().flat_map(lines).collect();
            Ok(want.is_subset(&got))
        })
        .await?;
        let printed: Vec<String> = tails.iter().flat_map(lines).collect();
        eprintln!(
            "partitions moved {moved_after:?} after the kill; {} messages, {} lines printed ({} again after the failover), victim printed {}",
            N,
            printed.len(),
            printed.len() as u64 - N,
            lines(&tails[0]).len()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_messages_go_to_the_next_owner_and_fenced_commits_fail() -> anyhow::Result<()> {
    use futures::StreamExt;
    use quiver_client::{ClientError, Consumer, ConsumerConfig, StartPosition};
    use quiver_protocol::ErrorCode;
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        let client = broker.client().await?;
        client.admin().create_topic("jobs", 2, TopicConfig::default()).await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        for i in 0..100 {
            producer.send("jobs", ProducerRecord::new(format!("{i}"))).await?;
        }
        let config = || {
            let mut c = ConsumerConfig::new("jobs").group("g").start(StartPosition::Earliest);
            c.session_timeout = Duration::from_millis(SESSION_MS);
            c
        };

        // A member reads everything and acknowledges only the first 10 it sees, then its
        // connection dies without a commit.
        let a_client = broker.client().await?;
        let mut a = Consumer::subscribe(a_client.clone(), config()).await?;
        let mut acked = HashSet::new();
        for n in 0..100 {
            let m = a.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
            if n < 10 {
                m.ack();
                acked.insert(String::from_utf8(m.value.to_vec())?);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await; // let the acks reach the broker
        drop(a); // stops without a commit
        a_client.close().await; // and the connection goes; the broker removes the member

        // The next member gets both partitions and exactly what A did not acknowledge.
        let mut b = Consumer::subscribe(client.clone(), config()).await?;
        let mut redelivered = HashSet::new();
        while redelivered.len() < 90 {
            let m = next_message(&mut b, Duration::from_secs(10)).await?;
            m.ack();
            redelivered.insert(String::from_utf8(m.value.to_vec())?);
        }
        assert!(redelivered.is_disjoint(&acked), "acknowledged messages were delivered again");
        assert_eq!(redelivered.len() + acked.len(), 100);

        // A stale member cannot commit: its id is gone (A) or it does not own the partition.
        let admin = client.admin();
        let stale = quiver_protocol::MemberRef { member_id: "member-1".into(), generation: 1 };
        let err = admin.commit_offset_as("g", "jobs", 0, 0, Some(stale)).await.err();
        assert!(
            matches!(&err, Some(ClientError::Broker { code: ErrorCode::FencedMember, message }) if message.contains("not in the group")),
            "{err:?}"
        );
        // And nobody outside the membership can move a live group's offsets.
        let err = admin.commit_offset("g", "jobs", 0, 0).await.err();
        assert!(matches!(&err, Some(ClientError::Broker { code: ErrorCode::FencedMember, .. })), "{err:?}");
        b.close().await;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_and_late_messages_come_back_then_go_to_the_dead_letter_topic() -> anyhow::Result<()> {
    use quiver_client::redelivery::{DELIVERY_COUNT, ORIGIN_OFFSET, ORIGIN_PARTITION, ORIGIN_TOPIC};
    use quiver_client::{Consumer, ConsumerConfig, StartPosition};
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        let client = broker.client().await?;
        client.admin().create_topic("work", 1, TopicConfig::default()).await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        for i in 0..10 {
            producer.send("work", ProducerRecord::new(format!("job-{i}"))).await?;
        }
        let mut config = ConsumerConfig::new("work").group("crew").start(StartPosition::Earliest);
        config.ack_deadline = Some(Duration::from_millis(300));
        config.max_deliveries = Some(3);
        let mut consumer = Consumer::subscribe(client.clone(), config).await?;

        // job-3 always fails (nack); job-5 is ignored once (deadline), then acknowledged.
        let mut seen: Vec<(String, u32)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut acked = HashSet::new();
        while acked.len() < 9 {
            anyhow::ensure!(Instant::now() < deadline, "stuck; seen {seen:?}");
            let m = next_message(&mut consumer, Duration::from_secs(5)).await?;
            let v = String::from_utf8(m.value.to_vec())?;
            seen.push((v.clone(), m.delivery_count));
            match (v.as_str(), m.delivery_count) {
                ("job-3", _) => m.nack(None),
                ("job-5", 1) => {} // neither ack nor nack: the deadline brings it back
                _ => {
                    m.ack();
                    acked.insert(v);
                }
            }
        }
        let counts = |name: &str| seen.iter().filter(|(v, _)| v == name).map(|(_, c)| *c).collect::<Vec<_>>();
        assert_eq!(counts("job-3"), vec![1, 2, 3], "{seen:?}");
        assert_eq!(counts("job-5"), vec![1, 2], "{seen:?}");

        // job-3 lands in work.dlq with its origin, and the group's floor moves past it.
        let mut dlq = Consumer::subscribe(
            client.clone(),
            ConsumerConfig::new("work.dlq").start(StartPosition::Earliest),
        )
        .await
        .ok();
        for _ in 0..50 {
            if dlq.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            dlq = Consumer::subscribe(
                client.clone(),
                ConsumerConfig::new("work.dlq").start(StartPosition::Earliest),
            )
            .await
            .ok();
        }
        let mut dlq = dlq.ok_or_else(|| anyhow::anyhow!("no dead-letter topic"))?;
        let dead = next_message(&mut dlq, Duration::from_secs(10)).await?;
        assert_eq!(&dead.value[..], b"job-3");
        let header = |k: &str| {
            dead.headers.iter().find(|(n, _)| n == k).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header(ORIGIN_TOPIC).as_deref(), Some("work"));
        assert_eq!(header(ORIGIN_PARTITION).as_deref(), Some("0"));
        assert_eq!(header(ORIGIN_OFFSET).as_deref(), Some("3"));
        assert_eq!(header(DELIVERY_COUNT).as_deref(), Some("3"));
        consumer.commit().await?;
        let committed = client.admin().group_offsets("crew", "work").await?[0].committed;
        assert_eq!(committed, Some(10), "every message is acknowledged or dead-lettered");
        consumer.close().await;
        Ok(())
    })
    .await
}

/// The broker tracks acknowledgements per message for the group: when a member goes away, the
/// next one gets exactly what the first had not acknowledged (not what it acknowledged above
/// its ack floor), each with its delivery count + 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_member_gets_only_the_unacknowledged_with_higher_counts() -> anyhow::Result<()> {
    use futures::StreamExt;
    use quiver_client::{Consumer, ConsumerConfig, StartPosition};
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        let setup = broker.client().await?;
        setup.admin().create_topic("jobs", 1, TopicConfig::default()).await?;
        publish(&setup, "jobs", (0..20).map(|i| i.to_string())).await?;
        let config = || {
            let mut c = ConsumerConfig::new("jobs").group("crew").start(StartPosition::Earliest);
            c.session_timeout = Duration::from_millis(SESSION_MS);
            c
        };

        // The first member acknowledges the even offsets only, then its connection dies.
        let first_client = broker.client().await?;
        let mut first = Consumer::subscribe(first_client.clone(), config()).await?;
        for _ in 0..20 {
            let m = next_message(&mut first, Duration::from_secs(10)).await?;
            assert_eq!(m.delivery_count, 1);
            if m.offset % 2 == 0 {
                m.ack();
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await; // acks reach the broker
        first_client.close().await;
        std::mem::forget(first); // no leave: the broker notices the closed connection

        let mut second = Consumer::subscribe(broker.client().await?, config()).await?;
        let mut got = Vec::new();
        for _ in 0..10 {
            let m = next_message(&mut second, Duration::from_secs(10)).await?;
            got.push((m.offset, m.delivery_count));
            m.ack();
        }
        let expected: Vec<(u64, u32)> = (0..20).filter(|o| o % 2 == 1).map(|o| (o, 2)).collect();
        assert_eq!(got, expected);
        // Nothing acknowledged comes back.
        let extra = tokio::time::timeout(Duration::from_secs(1), second.next()).await;
        assert!(extra.is_err(), "unexpected delivery: {extra:?}");
        second.commit().await?;
        assert_eq!(setup.admin().group_offsets("crew", "jobs").await?[0].committed, Some(20));
        second.close().await;
        Ok(())
    })
    .await
}

/// `max_deliveries` counts deliveries across sessions: a message that every consumer takes and
/// never acknowledges (each one dies with it) goes to the dead letters once it was handed out
/// that many times, instead of being handed out for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_kills_every_consumer_ends_in_the_dead_letters() -> anyhow::Result<()> {
    use quiver_client::{Consumer, ConsumerConfig, StartPosition};
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        let setup = broker.client().await?;
        setup.admin().create_topic("poison", 1, TopicConfig::default()).await?;
        publish(&setup, "poison", ["bad".to_string()]).await?;
        let config = || {
            let mut c = ConsumerConfig::new("poison").group("crew").start(StartPosition::Earliest);
            c.session_timeout = Duration::from_millis(SESSION_MS);
            c.max_deliveries = Some(2);
            c
        };
        for attempt in 1..=2u32 {
            let client = broker.client().await?;
            let mut c = Consumer::subscribe(client.clone(), config()).await?;
            let m = next_message(&mut c, Duration::from_secs(10)).await?;
            assert_eq!((&m.value[..], m.delivery_count), (&b"bad"[..], attempt));
            client.close().await; // dies holding it
            std::mem::forget(c);
        }
        // Every message handed out counts, processed or not: publish the next one only now.
        publish(&setup, "poison", ["good".to_string()]).await?;
        let mut c = Consumer::subscribe(broker.client().await?, config()).await?;
        let m = next_message(&mut c, Duration::from_secs(10)).await?;
        assert_eq!((&m.value[..], m.delivery_count), (&b"good"[..], 1));
        m.ack();
        let mut dlq = Consumer::subscribe(
            broker.client().await?,
            ConsumerConfig::new("poison.dlq").start(StartPosition::Earliest),
        )
        .await?;
        let dead = next_message(&mut dlq, Duration::from_secs(10)).await?;
        assert_eq!(&dead.value[..], b"bad");
        c.commit().await?;
        assert_eq!(setup.admin().group_offsets("crew", "poison").await?[0].committed, Some(2));
        c.close().await;
        Ok(())
    })
    .await
}
