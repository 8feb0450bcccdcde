//! Deleting a topic removes its groups' offsets before the name can be created again, and a
//! delete whose offsets cannot be removed says so (design.md §5.4).

use std::time::Duration;

use quiver_client::{Consumer, ConsumerConfig, StartPosition, TopicConfig};
use quiver_tests::{bounded, embedded, init_tracing, next_message, publish};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_starts_from_zero_for_a_group() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |_| {}).await?;
        let admin = client.admin();
        admin.create_topic("t", 1, TopicConfig::default()).await?;
        publish(&client, "t", (0..5).map(|i| format!("old-{i}"))).await?;
        admin.commit_offset("g", "t", 0, 5).await?;

        admin.delete_topic("t").await?;
        admin.create_topic("t", 1, TopicConfig::default()).await?;
        publish(&client, "t", (0..3).map(|i| format!("new-{i}"))).await?;
        let mut c = Consumer::subscribe(
            client.clone(),
            ConsumerConfig::new("t").group("g").start(StartPosition::Earliest),
        )
        .await?;
        let m = next_message(&mut c, Duration::from_secs(10)).await?;
        anyhow::ensure!(m.offset == 0 && &m.value[..] == b"new-0", "started at {} ({:?})", m.offset, m.value);
        c.close().await;

        // The offsets cannot be rewritten (their snapshot's temporary name is taken by a
        // directory): the delete reports it instead of answering Done.
        admin.create_topic("u", 1, TopicConfig::default()).await?;
        admin.commit_offset("g", "u", 0, 0).await?;
        std::fs::create_dir(dir.path().join("offsets").join("offsets.log.tmp"))?;
        match admin.delete_topic("u").await {
            Err(e) => anyhow::ensure!(e.to_string().contains("group offsets"), "{e}"),
            Ok(()) => anyhow::bail!("the delete succeeded although its offsets were not removed"),
        }
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}
