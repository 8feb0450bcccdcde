//! A broker SIGKILLed while a group consumes: explicitly committed offsets survive, acks since
//! then are kept at most `offsets_flush_ms` late (design.md §8), and the same consumer object
//! rejoins and carries on without losing anything.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use quiver_client::{Consumer, ConsumerConfig, StartPosition, TopicConfig};
use quiver_tests::{bounded, init_tracing, publish, BrokerProcess};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_a_broker_crash_and_the_group_carries_on() -> anyhow::Result<()> {
    init_tracing();
    bounded(90, async {
        let dir = tempfile::tempdir()?;
        let mut broker = BrokerProcess::start(BIN, dir.path(), None).await?;
        let client = broker.client().await?;
        client.admin().create_topic("pay", 2, TopicConfig::default()).await?;
        publish(&client, "pay", (0..1000).map(|i| i.to_string())).await?;

        let mut config = ConsumerConfig::new("pay").group("billing").start(StartPosition::Earliest);
        config.session_timeout = Duration::from_secs(2);
        let mut consumer = Consumer::subscribe(client.clone(), config).await?;
        let next = async |consumer: &mut Consumer| -> anyhow::Result<String> {
            let m = tokio::time::timeout(Duration::from_secs(20), consumer.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
            m.ack();
            Ok(String::from_utf8(m.value.to_vec())?)
        };
        let mut committed = HashSet::new();
        for _ in 0..500 {
            committed.insert(next(&mut consumer).await?);
        }
        consumer.commit().await?; // durable before it returns
        let mut acked_after = HashSet::new();
        for _ in 0..300 {
            acked_after.insert(next(&mut consumer).await?);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;

        broker.kill9();
        broker.restart().await?;

        let admin = broker.client().await?.admin();
        let total: u64 = admin.group_offsets("billing", "pay").await?.iter().map(|p| p.committed.unwrap_or(0)).sum();
        assert!((500..=800).contains(&total), "committed {total}: below the explicit commit, or above what was acked");

        // The same consumer rejoins; what follows is everything not committed, and nothing
        // that was committed before the crash.
        let mut rest = HashSet::new();
        let all: HashSet<String> = (0..1000).map(|i| i.to_string()).collect();
        while !committed.union(&rest).cloned().collect::<HashSet<_>>().is_superset(&all) {
            let v = next(&mut consumer).await?;
            assert!(!committed.contains(&v), "{v} was committed before the crash and came back");
            rest.insert(v);
        }
        eprintln!(
            "committed at the crash: {total}; delivered again after it: {} of the {} acked since the explicit commit",
            rest.intersection(&acked_after).count(),
            acked_after.len()
        );
        consumer.close().await;
        Ok(())
    })
    .await
}
