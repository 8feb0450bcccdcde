//! Publish N messages to a running broker and wait for every acknowledgement.
//!
//!     cargo run -p quiver-examples --example producer -- [TOPIC] [N]
//!
//! Uses QUIVER_BROKER and QUIVER_CA when set, else the local development broker.

use std::time::Instant;

use quiver_client::default_ca_path;
use quiver_client::{Client, ClientConfig, Producer, ProducerConfig, ProducerRecord};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "events".into());
    let n: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(100_000);
    let broker = std::env::var("QUIVER_BROKER").unwrap_or_else(|_| "127.0.0.1:7420".into());
    let ca = std::env::var("QUIVER_CA").map(Into::into).unwrap_or_else(|_| default_ca_path());

    let client = Client::connect(ClientConfig::new(broker, ca)).await?;
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let started = Instant::now();
    let mut acks = Vec::with_capacity(n as usize);
    for i in 0..n {
        acks.push(producer.enqueue(&topic, ProducerRecord::new(format!("event {i}"))).await?);
    }
    for a in acks {
        a.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{n} messages acknowledged in {secs:.2} s ({:.0} msg/s)", n as f64 / secs);
    client.close().await;
    Ok(())
}
