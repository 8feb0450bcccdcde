//! Consume a topic as a member of a group, printing and acknowledging each message, and commit
//! every second so a restart resumes where this one stopped. A message whose value starts with
//! `fail` is nacked: the broker hands it out again a second later with its delivery count + 1,
//! and after 3 deliveries moves it to `<TOPIC>.dlq`.
//!
//!     cargo run -p quiver-examples --example consumer -- [TOPIC] [GROUP]

use std::time::Duration;

use futures::StreamExt;
use quiver_client::default_ca_path;
use quiver_client::{Client, ClientConfig, Consumer, ConsumerConfig, StartPosition};

// One thread: the connection's tasks and this loop never wake each other across threads.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "events".into());
    let group = args.next().unwrap_or_else(|| "example-group".into());
    let broker = std::env::var("QUIVER_BROKER").unwrap_or_else(|_| "127.0.0.1:7420".into());
    let ca = std::env::var("QUIVER_CA").map(Into::into).unwrap_or_else(|_| default_ca_path());

    let client = Client::connect(ClientConfig::new(broker, ca)).await?;
    let mut config = ConsumerConfig::new(topic).group(group).start(StartPosition::Earliest);
    config.ack_deadline = Some(Duration::from_secs(30)); // not acked in 30 s: handed out again
    config.max_deliveries = Some(3); // then to the dead-letter topic
    let mut consumer = Consumer::subscribe(client, config).await?;
    let mut commit = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            msg = consumer.next() => {
                let Some(msg) = msg else { break };
                let msg = msg?;
                let value = String::from_utf8_lossy(&msg.value);
                println!("{}/{} (delivery {}): {value}", msg.partition, msg.offset, msg.delivery_count);
                if value.starts_with("fail") {
                    msg.nack(Some(Duration::from_secs(1)));
                } else {
                    msg.ack();
                }
            }
            _ = commit.tick() => {
                let report = consumer.commit().await?;
                println!("committed {:?} (not started: {:?}, moved away: {:?})", report.committed, report.skipped, report.revoked);
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    let report = consumer.commit().await?;
    println!("committed {:?}", report.committed);
    Ok(())
}
