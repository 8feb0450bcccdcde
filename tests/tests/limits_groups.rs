//! Named limits on what a client can make the broker keep (design.md §2), over real QUIC:
//! producer ids per connection, and dead-letter topics a subscriber can make the broker create.

use std::time::Duration;

use quiver_client::{Consumer, ConsumerConfig, StartPosition, TopicConfig};
use quiver_protocol::limits::MAX_PRODUCER_IDS_PER_CONNECTION;
use quiver_protocol::message::Message;
use quiver_protocol::ErrorCode;
use quiver_tests::{bounded, client_of, embedded, init_tracing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gets_a_bounded_number_of_producer_ids() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |_| {}).await?;
        // A producer that got its id before the connection ran out (used at the end).
        client.admin().create_topic("gone", 1, TopicConfig::default()).await?;
        let producer = quiver_client::Producer::new(client.clone(), Default::default());
        producer.send("gone", quiver_client::ProducerRecord::new("first")).await?;
        for _ in 0..MAX_PRODUCER_IDS_PER_CONNECTION - 1 {
            let ok = client.request(&Message::InitProducer).await?;
            assert!(matches!(ok, Message::InitProducerOk { .. }), "{ok:?}");
        }
        match client.request(&Message::InitProducer).await {
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::LimitExceeded), "{e}");
                assert!(e.to_string().contains("MAX_PRODUCER_IDS_PER_CONNECTION"), "{e}");
            }
            Ok(other) => panic!("producer id {} handed out: {other:?}", MAX_PRODUCER_IDS_PER_CONNECTION + 1),
        }
        // Another connection gets its own.
        let other = client_of(&broker).await?;
        assert!(matches!(other.request(&Message::InitProducer).await?, Message::InitProducerOk { .. }));

        // A producer on the exhausted connection whose batch fails for good needs a new id to
        // go on; refused one, it fails what waits instead of hanging (new-user test: a publish
        // whose topic was deleted under it hung forever once 1,024 batches had failed).
        client.admin().delete_topic("gone").await?;
        // The first records fail (the topic is gone) and spend the sequence; the next ones wait
        // for a new producer id, which this connection cannot get.
        for round in 0..2 {
            let failed = tokio::time::timeout(Duration::from_secs(20), async {
                let mut acks = Vec::new();
                for i in 0..10 {
                    let record = quiver_client::ProducerRecord::new(format!("r{round}-{i}"));
                    acks.push(producer.enqueue("gone", record).await);
                }
                let mut failed = 0;
                for a in acks {
                    match a {
                        Ok(fut) => failed += usize::from(fut.await.is_err()),
                        Err(_) => failed += 1,
                    }
                }
                failed
            })
            .await
            .map_err(|_| anyhow::anyhow!("round {round}: the producer hung after its topic was deleted"))?;
            assert_eq!(failed, 10, "every record to a deleted topic fails");
        }
        broker.shutdown().await;
        Ok(())
    })
    .await
}

/// Only `<topic>.dlq` is created on demand; a subscriber naming another dead-letter topic must
/// name one that exists, so it cannot make the broker create topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_cannot_make_the_broker_create_arbitrary_dead_letter_topics() -> anyhow::Result<()> {
    init_tracing();
    bounded(60, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |_| {}).await?;
        client.admin().create_topic("jobs", 1, TopicConfig::default()).await?;
        let config = |dlq: Option<&str>| {
            let mut c = ConsumerConfig::new("jobs").group("w").start(StartPosition::Earliest);
            c.max_deliveries = Some(2);
            c.ack_deadline = Some(Duration::from_millis(100));
            c.dead_letter_topic = dlq.map(str::to_string);
            c
        };
        let refused = Consumer::subscribe(client.clone(), config(Some("anything-at-all"))).await;
        let e =
            refused.err().ok_or_else(|| anyhow::anyhow!("subscribed with a missing dead-letter topic"))?;
        assert_eq!(e.code(), Some(ErrorCode::UnknownTopic), "{e}");
        assert!(e.to_string().contains("create it first"), "{e}");
        let topics = client.admin().list_topics().await?;
        assert!(topics.iter().all(|t| t.name != "anything-at-all"), "created: {topics:?}");

        // An existing one, and the default, are fine.
        client.admin().create_topic("jobs-failed", 1, TopicConfig::default()).await?;
        Consumer::subscribe(client.clone(), config(Some("jobs-failed"))).await?.close().await;
        Consumer::subscribe(client.clone(), config(None)).await?.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}
