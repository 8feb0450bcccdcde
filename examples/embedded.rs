//! A service with its own event backbone: a broker, a producer and a consumer in one process.
//!
//!     cargo run -p quiver-examples --example embedded
//!
//! The broker listens on an ephemeral loopback port with a generated development certificate
//! in a temporary data directory; everything else is the same code `quiverd` runs.

use futures::StreamExt;
use quiver_broker::{Broker, BrokerConfig};
use quiver_client::{
    Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, StartPosition,
    TopicConfig,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let data = tempfile::tempdir()?;

    // 1. Start a broker inside this process.
    let broker = Broker::start(BrokerConfig::new(data.path()).listen("127.0.0.1:0".parse()?)).await?;
    let ca = broker.ca_path().cloned().ok_or_else(|| anyhow::anyhow!("no development CA"))?;
    println!("broker on {} (CA {})", broker.local_addr(), ca.display());

    // 2. Connect a client and create a topic.
    let client = Client::connect(ClientConfig::new(broker.local_addr().to_string(), ca)).await?;
    client.admin().create_topic("orders", 2, TopicConfig::default()).await?;

    // 3. Produce: keyed records keep per-key order on one partition.
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    for i in 0..10 {
        let record = ProducerRecord::new(format!("order {i}")).key(format!("customer-{}", i % 3));
        let meta = producer.send("orders", record).await?;
        println!("stored order {i} at partition {} offset {:?}", meta.partition, meta.offset);
    }

    // 4. Consume as a group; acknowledge, then commit so a restart resumes after these.
    let config = ConsumerConfig::new("orders").group("billing").start(StartPosition::Earliest);
    let mut consumer = Consumer::subscribe(client.clone(), config).await?;
    for _ in 0..10 {
        let msg = consumer.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
        println!(
            "got {:?} from partition {} offset {}",
            String::from_utf8_lossy(&msg.value),
            msg.partition,
            msg.offset
        );
        msg.ack();
    }
    let report = consumer.commit().await?;
    println!("committed (partition -> next offset): {:?}", report.committed);
    consumer.close().await;

    client.close().await;
    broker.shutdown().await;
    Ok(())
}
