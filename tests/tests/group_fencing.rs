//! Fencing of consumers outside a group's membership (design.md §11): a plain `--group`
//! consumer (no member id) may consume and commit for the group only while the group has no
//! members. Once a member joins, that consumer's subscription ends with `FencedMember` and its
//! acknowledgements no longer move the group's offset.

use std::time::Duration;

use futures::StreamExt;
use quiver_client::{Consumer, ConsumerConfig, StartPosition, TopicConfig};
use quiver_protocol::ErrorCode;
use quiver_tests::{bounded, embedded, init_tracing, next_message, publish};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memberless_subscription_is_fenced_once_the_group_has_members() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |c| c.offsets_flush_ms = 50).await?;
        client.admin().create_topic("f", 1, TopicConfig::default()).await?;
        publish(&client, "f", (0..20).map(|i| i.to_string())).await?;

        let mut config = ConsumerConfig::new("f").group("g").start(StartPosition::Earliest);
        config.membership = false;
        let mut outsider = Consumer::subscribe(client.clone(), config).await?;
        let mut held = Vec::new();
        for _ in 0..20 {
            held.push(next_message(&mut outsider, Duration::from_secs(10)).await?);
        }
        for m in &held[..10] {
            m.ack();
        }
        outsider.commit().await?;
        let committed = || async { anyhow::Ok(client.admin().group_offsets("g", "f").await?[0].committed) };
        assert_eq!(committed().await?, Some(10));

        // A member joins (and holds partition 0 without consuming it yet).
        let member = client.admin().join_group("g", "f", None, Duration::from_secs(30)).await?;
        assert_eq!(member.partitions, vec![0]);

        // The outsider's acknowledgements no longer count, and its subscription ends.
        for m in &held[10..] {
            m.ack();
        }
        let ended = tokio::time::timeout(Duration::from_secs(10), outsider.next()).await;
        match ended {
            Ok(Some(Err(e))) => assert_eq!(e.code(), Some(ErrorCode::FencedMember), "{e}"),
            other => panic!("the memberless subscription was not fenced: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await; // past an offsets flush
        assert_eq!(committed().await?, Some(10), "a memberless consumer moved a live group's offset");
        drop(outsider);
        broker.shutdown().await;
        Ok(())
    })
    .await
}
