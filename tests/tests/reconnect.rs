//! The SDK rides out a broker restart: a producer's next sends succeed on a new connection and
//! a following consumer resumes without duplicates or gaps.

use std::time::Duration;

use futures::StreamExt;
use quiver_client::{
    Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, StartPosition, TopicConfig,
};
use quiver_tests::{bounded, init_tracing, next_message, BrokerProcess};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_and_consumer_survive_a_broker_restart() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let mut broker = BrokerProcess::start(BIN, dir.path(), None).await?;
        let client = broker.client().await?;
        client.admin().create_topic("rc", 2, TopicConfig::default()).await?;
        let producer = Producer::new(client.clone(), ProducerConfig::default());
        let mut consumer =
            Consumer::subscribe(client.clone(), ConsumerConfig::new("rc").start(StartPosition::Earliest))
                .await?;

        for i in 0..100 {
            producer.send("rc", ProducerRecord::new(format!("{i}"))).await?;
        }
        let mut seen = Vec::new();
        while seen.len() < 100 {
            let m = consumer.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
            m.ack();
            seen.push(String::from_utf8(m.value.to_vec())?.parse::<u64>()?);
        }

        broker.restart().await?;
        tracing::info!("broker restarted");

        // Same client, same producer and consumer objects.
        for i in 100..200 {
            producer.send("rc", ProducerRecord::new(format!("{i}"))).await?;
        }
        tracing::info!("sent 100 more");
        while seen.len() < 200 {
            let m = next_message(&mut consumer, Duration::from_secs(30)).await?;
            m.ack();
            seen.push(String::from_utf8(m.value.to_vec())?.parse::<u64>()?);
        }
        seen.sort();
        assert_eq!(seen, (0..200).collect::<Vec<_>>(), "no duplicates, no gaps");
        Ok(())
    })
    .await
}
