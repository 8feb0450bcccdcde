//! Producer ids in a cluster come from the controller (issue 18, docs/replication.md §2c): ids
//! asked of every broker never collide, also across a SIGKILL of the controller's leader and
//! its restart; an id issued through one broker is accepted by the leader of any partition,
//! before and after the restart; an id nobody issued is refused by every broker.

use std::collections::BTreeSet;
use std::time::Duration;

use quiver_client::{Client, ClientError};
use quiver_protocol::batch::{BatchBuilder, ProducerIdentity};
use quiver_protocol::message::{Acks, Message};
use quiver_protocol::ErrorCode;
use quiver_tests::{bounded, init_tracing, Cluster};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const TOPIC: &str = "ids";
const PARTITIONS: u32 = 3;

async fn producer_id(client: &Client) -> anyhow::Result<i64> {
    // The controller may be electing a leader (after a kill): NotLeader is retried.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client.request(&Message::InitProducer).await {
            Ok(Message::InitProducerOk { producer_id, .. }) => return Ok(producer_id),
            Ok(other) => anyhow::bail!("expected InitProducerOk, got kind {}", other.kind()),
            Err(e) if e.is_retriable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends one idempotent batch (sequence `seq`) under `producer_id` to `partition`; the broker
/// forwards it to the partition's leader, which checks the id.
async fn produce(
    client: &Client,
    producer_id: i64,
    partition: u32,
    seq: i32,
) -> Result<Message, ClientError> {
    let identity = ProducerIdentity { producer_id, producer_epoch: 0, base_sequence: seq };
    let mut b = BatchBuilder::new(64).with_identity(identity);
    b.push(1, None, format!("{producer_id}:{seq}").as_bytes(), &[]);
    let request = Message::Produce { topic: TOPIC.into(), partition, acks: Acks::All, batch: b.finish() };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client.request(&request).await {
            Err(e) if e.is_retriable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => return other,
        }
    }
}

/// The node index whose log says it was elected controller leader in the highest term.
fn controller_leader(cluster: &Cluster) -> anyhow::Result<usize> {
    let mut best = None;
    for (i, node) in cluster.nodes.iter().enumerate() {
        for line in node.log().lines().filter(|l| l.contains("elected controller leader")) {
            let term = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("term="))
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(0);
            if best.is_none_or(|(t, _)| term > t) {
                best = Some((term, i));
            }
        }
    }
    best.map(|(_, i)| i).ok_or_else(|| anyhow::anyhow!("no broker logged its election as controller leader"))
}

fn accepted(r: Result<Message, ClientError>, what: &str) -> anyhow::Result<()> {
    match r {
        Ok(Message::ProduceOk { .. }) => Ok(()),
        other => anyhow::bail!("{what}: expected ProduceOk, got {other:?}"),
    }
}

fn refused(r: Result<Message, ClientError>, what: &str) -> anyhow::Result<()> {
    match r {
        Err(ClientError::Broker { code: ErrorCode::UnknownProducer, message }) => {
            anyhow::ensure!(message.contains("never issued"), "{what}: {message}");
            Ok(())
        }
        other => anyhow::bail!("{what}: expected UnknownProducer, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_ids_are_unique_across_brokers_and_checked_by_every_leader() -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        let dir = tempfile::tempdir()?;
        let mut cluster = Cluster::start(BIN, dir.path(), 3).await?;
        let admin = cluster.client().await?;
        cluster.create_topic(&admin, TOPIC, PARTITIONS, 3).await?;
        let clients: Vec<Client> = {
            let mut v = Vec::new();
            for i in 0..3 {
                v.push(cluster.client_of(i).await?);
            }
            v
        };

        // Ids asked of every broker, in turns: none twice.
        let mut issued = BTreeSet::new();
        let mut by_broker = Vec::new();
        for round in 0..4 {
            for (i, c) in clients.iter().enumerate() {
                let id = producer_id(c).await?;
                anyhow::ensure!(issued.insert(id), "id {id} issued twice (broker {}, round {round})", i + 1);
                by_broker.push((i, id));
            }
        }

        // An id issued through broker i, used through broker j, on every partition: the
        // partition's leader (whichever broker) accepts it. Sequence numbers per partition.
        for (n, &(i, id)) in by_broker.iter().take(3).enumerate() {
            let through = &clients[(i + 1 + n) % 3];
            for p in 0..PARTITIONS {
                accepted(
                    produce(through, id, p, 0).await,
                    &format!("id from broker {} on partition {p}", i + 1),
                )?;
            }
        }
        // Made up: a wrong tag, a counter far past every block, through every broker.
        let (_, some) = by_broker[0];
        for (i, c) in clients.iter().enumerate() {
            for p in 0..PARTITIONS {
                refused(produce(c, some ^ 1, p, 0).await, &format!("wrong tag via broker {}", i + 1))?;
                // A counter past every reserved block might be one reserved a moment ago that
                // this broker has not applied yet: refused as retriable, never accepted.
                let unreserved = Message::Produce {
                    topic: TOPIC.into(),
                    partition: p,
                    acks: Acks::All,
                    batch: {
                        let identity = ProducerIdentity {
                            producer_id: (1 << 30) << 31,
                            producer_epoch: 0,
                            base_sequence: 0,
                        };
                        let mut b = BatchBuilder::new(64).with_identity(identity);
                        b.push(1, None, b"made up", &[]);
                        b.finish()
                    },
                };
                match c.request(&unreserved).await {
                    Err(ClientError::Broker { code: ErrorCode::NotLeader, message }) => {
                        anyhow::ensure!(message.contains("not known"), "{message}")
                    }
                    other => anyhow::bail!("an unreserved counter via broker {}: {other:?}", i + 1),
                }
            }
        }

        // The controller's leader is killed: the others elect one, which reserves a block of
        // its own; nothing it issues collides with what the dead leader issued.
        let li = controller_leader(&cluster)?;
        cluster.nodes[li].kill9();
        let survivors: Vec<usize> = (0..3).filter(|&i| i != li).collect();
        for _ in 0..3 {
            for &i in &survivors {
                let c = cluster.client_of(i).await?;
                let id = producer_id(&c).await?;
                anyhow::ensure!(issued.insert(id), "id {id} issued twice after the leader's kill");
            }
        }
        // It comes back: ids issued before its death are still accepted anywhere, and new
        // ones through it still never collide.
        cluster.nodes[li].restart().await?;
        let back = cluster.client_of(li).await?;
        for _ in 0..3 {
            let id = producer_id(&back).await?;
            anyhow::ensure!(issued.insert(id), "id {id} issued twice after the restart");
        }
        let (_, old) = by_broker[3];
        for p in 0..PARTITIONS {
            accepted(produce(&back, old, p, 0).await, &format!("an id from before the kill, partition {p}"))?;
        }
        Ok(())
    })
    .await
}
