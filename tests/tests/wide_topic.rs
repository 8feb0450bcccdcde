//! A topic of the widest size the broker allows (`MAX_PARTITIONS`) works end to end from one
//! client connection: publish to it, and tail every partition (issue 15 review: a tail of a
//! 4,096-partition topic waited forever for its last subscription streams).

use std::time::Duration;

use futures::StreamExt;
use quiver_client::{Consumer, ConsumerConfig, StartPosition, TopicConfig};
use quiver_protocol::limits::MAX_PARTITIONS;
use quiver_tests::{bounded, init_tracing, publish};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_widest_topic_is_published_to_and_tailed_from_one_connection() -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = quiver_tests::embedded(dir.path(), |_| {}).await?;
        let config = TopicConfig::default().with_segment_bytes(1 << 20);
        client.admin().create_topic("wide", MAX_PARTITIONS, config).await?;
        // Keys spread the records over many partitions; the producer opens a stream for each.
        let values: Vec<String> = (0..2000).map(|i| format!("v-{i}")).collect();
        publish(&client, "wide", values.clone()).await?;
        let mut consumer =
            Consumer::subscribe(client.clone(), ConsumerConfig::new("wide").start(StartPosition::Earliest))
                .await?;
        let mut got = Vec::new();
        while got.len() < values.len() {
            let msg = tokio::time::timeout(Duration::from_secs(60), consumer.next())
                .await
                .map_err(|_| anyhow::anyhow!("only {} of {} within 60 s", got.len(), values.len()))?
                .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
            got.push(String::from_utf8(msg.value.to_vec())?);
        }
        got.sort();
        let mut want = values;
        want.sort();
        assert_eq!(got, want);
        drop(consumer);
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}
