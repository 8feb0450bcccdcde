//! Hostile bytes get clear errors, never a crash, a hang or unbounded memory, and other
//! clients carry on.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use quiver_client::{Client, Producer, ProducerConfig, ProducerRecord, TopicConfig};
use quiver_protocol::message::{Acks, Message};
use quiver_protocol::ErrorCode;
use quiver_tests::{bounded, embedded, init_tracing, BrokerProcess};
use quiver_transport::{write_message, FrameReader};

const BIN: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const CONFIG: &str = "frame_timeout_ms = 1000\n";

async fn raw_stream(client: &Client) -> anyhow::Result<(quinn::SendStream, FrameReader)> {
    let conn = client.connection().await?;
    let (send, recv) = conn.open_bi().await?;
    Ok((send, FrameReader::new(recv)))
}

async fn expect_error(reader: &mut FrameReader, code: ErrorCode) -> anyhow::Result<String> {
    match tokio::time::timeout(Duration::from_secs(10), reader.next()).await?? {
        Some(Message::Error { code: got, message, .. }) if got == code => Ok(message),
        other => anyhow::bail!("expected {code:?}, got {other:?}"),
    }
}

fn hello() -> Message {
    Message::Hello { protocol_version: 1, client_id: "bad-input-test".into(), token: None }
}

async fn expect_hello_ok(send: &mut quinn::SendStream, reader: &mut FrameReader) -> anyhow::Result<()> {
    write_message(send, &hello()).await?;
    match reader.next().await? {
        Some(Message::HelloOk { .. }) => Ok(()),
        other => anyhow::bail!("expected HelloOk, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_clear_errors() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BIN, dir.path(), Some(CONFIG)).await?;
        let client = broker.client().await?;
        client.admin().create_topic("ok", 1, TopicConfig::default()).await?;

        // Malformed body: a Produce kind whose payload is garbage. The stream survives.
        let (mut send, mut reader) = raw_stream(&client).await?;
        send.write_all(&[5, 0, 0, 0, 1, 3, 0xde, 0xad, 0xbe]).await?;
        let m = expect_error(&mut reader, ErrorCode::Malformed).await?;
        assert!(m.contains("malformed"), "{m}");
        expect_hello_ok(&mut send, &mut reader).await?;

        // Unknown kind: clear error, stream survives.
        send.write_all(&[2, 0, 0, 0, 1, 200]).await?;
        expect_error(&mut reader, ErrorCode::UnknownKind).await?;
        expect_hello_ok(&mut send, &mut reader).await?;

        // Unknown topic.
        let batch = {
            let mut b = quiver_protocol::BatchBuilder::new(64);
            b.push(1, None, b"x", &[]);
            b.finish()
        };
        let produce = |topic: &str, batch: bytes::Bytes| Message::Produce {
            topic: topic.into(),
            partition: 0,
            acks: Acks::Leader,
            batch,
        };
        write_message(&mut send, &produce("no-such-topic", batch.clone())).await?;
        expect_error(&mut reader, ErrorCode::UnknownTopic).await?;

        // A batch whose CRC does not match: rejected, nothing appended.
        let mut corrupt = batch.to_vec();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        write_message(&mut send, &produce("ok", corrupt.into())).await?;
        expect_error(&mut reader, ErrorCode::CorruptBatch).await?;
        assert_eq!(client.admin().describe_topic("ok").await?.partitions[0].high_watermark, 0);

        // A control batch (attributes bit 5): only brokers write those (Raft's own entries,
        // docs/replication.md §2); a client's is refused and nothing is appended.
        let control = {
            let mut b = quiver_protocol::BatchBuilder::new(64).control();
            b.push(1, Some(b"\0\0\0\x02"), b"", &[]);
            b.finish()
        };
        write_message(&mut send, &produce("ok", control)).await?;
        let m = expect_error(&mut reader, ErrorCode::CorruptBatch).await?;
        assert!(m.contains("control"), "{m}");
        assert_eq!(client.admin().describe_topic("ok").await?.partitions[0].high_watermark, 0);

        // A 4 GiB length prefix: refused before anything is buffered; the stream ends.
        let (mut send, mut reader) = raw_stream(&client).await?;
        send.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 3]).await?;
        expect_error(&mut reader, ErrorCode::FrameTooLarge).await?;
        assert!(matches!(reader.next().await, Ok(None) | Err(_)), "stream should end after FrameTooLarge");

        // A wrong version byte.
        let (mut send, mut reader) = raw_stream(&client).await?;
        send.write_all(&[2, 0, 0, 0, 9, 1]).await?;
        expect_error(&mut reader, ErrorCode::UnsupportedVersion).await?;

        // A frame that starts and never finishes: cut off after frame_timeout_ms.
        let (mut send, mut reader) = raw_stream(&client).await?;
        send.write_all(&[100, 0, 0, 0, 1, 1, 0]).await?;
        let m = expect_error(&mut reader, ErrorCode::Malformed).await?;
        assert!(m.contains("longer than"), "{m}");

        // The connection and other clients are unaffected.
        let other = broker.client().await?;
        let meta =
            Producer::new(other, ProducerConfig::default()).send("ok", ProducerRecord::new("fine")).await?;
        assert_eq!(meta.offset, Some(0));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_huge_frames_do_not_grow_memory_without_bound() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BIN, dir.path(), Some("frame_timeout_ms = 20000\n")).await?;
        let client = broker.client().await?;
        client.admin().create_topic("ok", 1, TopicConfig::default()).await?;
        let before = broker.rss_kib().unwrap_or(0);

        // One client opens many streams, each announcing a maximal frame and sending part of
        // it as fast as the broker lets it. Flow control must stop it, not the broker's memory.
        let conn = client.connection().await?;
        let chunk = vec![0u8; 1024 * 1024];
        let mut writers = Vec::new();
        for _ in 0..64 {
            let (mut send, _recv) = conn.open_bi().await?;
            let chunk = chunk.clone();
            writers.push(tokio::spawn(async move {
                let mut head = BytesMut::new();
                head.put_u32_le(quiver_protocol::limits::MAX_FRAME_BYTES as u32);
                head.put_u8(1);
                head.put_u8(3);
                let _ = send.write_all(&head).await;
                for _ in 0..15 {
                    if send.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                // Hold the stream open while the measurement happens.
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(_recv);
            }));
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let during = broker.rss_kib().unwrap_or(0);
        // 64 streams x 15 MiB would be 960 MiB if buffered. Bounded: quinn holds at most the
        // 64 MiB connection window of unread bytes and the broker at most its 64 MiB
        // per-connection request budget.
        let grown_mib = during.saturating_sub(before) / 1024;
        eprintln!("broker RSS grew by {grown_mib} MiB under the attack");
        assert!(grown_mib < 180, "broker grew by {grown_mib} MiB (before {before} KiB, during {during} KiB)");

        // Meanwhile another client is served.
        let other = broker.client().await?;
        let meta =
            Producer::new(other, ProducerConfig::default()).send("ok", ProducerRecord::new("fine")).await?;
        assert_eq!(meta.offset, Some(0));
        for w in writers {
            w.abort();
        }
        Ok(())
    })
    .await
}

/// A subscriber that floods the broker with the largest acknowledgement frames it may send
/// (65,536 scattered ranges each) and nacks: other clients' round trips stay quick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_flood_does_not_starve_other_clients() -> anyhow::Result<()> {
    use quiver_protocol::message::{RedeliveryPolicy, StartPosition, Subscribe};
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BIN, dir.path(), Some(CONFIG)).await?;
        let client = broker.client().await?;
        client.admin().create_topic("acks", 1, TopicConfig::default()).await?;
        quiver_tests::publish(&client, "acks", (0..140_000).map(|i| i.to_string())).await?;

        let (mut send, mut reader) = raw_stream(&client).await?;
        let sub = Subscribe {
            topic: "acks".into(),
            partition: 0,
            group: Some("flood".into()),
            member: None,
            start: StartPosition::Earliest,
            window_messages: 1_000_000,
            window_bytes: 64 * 1024 * 1024,
            policy: RedeliveryPolicy { ack_wait_ms: 60_000, ..Default::default() },
            group_position: None,
        };
        write_message(&mut send, &Message::Subscribe(sub)).await?;
        // Take deliveries until every offset was handed out, so the ranges all count.
        let mut delivered = 0u64;
        while delivered < 140_000 {
            match tokio::time::timeout(Duration::from_secs(10), reader.next()).await?? {
                Some(Message::Subscribed { .. }) => {}
                Some(Message::Deliver { batches, .. }) => {
                    for item in quiver_protocol::BatchSplitter::new(batches) {
                        delivered = delivered.max(item?.0.next_offset());
                    }
                }
                other => anyhow::bail!("unexpected {other:?}"),
            }
        }
        let ranges: Vec<std::ops::Range<u64>> = (0..65_536u64).map(|i| 2 * i + 1..2 * i + 2).collect();
        let flood = tokio::spawn(async move {
            for round in 0..40u64 {
                write_message(&mut send, &Message::AckRanges { floor: 0, ranges: ranges.clone() }).await?;
                write_message(&mut send, &Message::Nack { offset: 2 * round, delay_ms: 0 }).await?;
            }
            anyhow::Ok(send)
        });

        let other = broker.client().await?;
        let producer = Producer::new(other.clone(), ProducerConfig::default());
        let mut slowest = Duration::ZERO;
        for i in 0..30 {
            let t0 = std::time::Instant::now();
            producer.send("acks", ProducerRecord::new(format!("during-{i}"))).await?;
            other.admin().describe_topic("acks").await?;
            slowest = slowest.max(t0.elapsed());
        }
        let _send = flood.await??;
        assert!(slowest < Duration::from_secs(2), "a produce and a metadata round trip took {slowest:?}");
        // Only odd offsets were acknowledged: the floor (the committed offset) stays at 0.
        let committed = other.admin().group_offsets("flood", "acks").await?[0].committed;
        assert_eq!(committed, Some(0));
        Ok(())
    })
    .await
}

/// The broker takes no QUIC datagrams (the protocol sends none): it advertises no datagram
/// support, so a peer cannot make it buffer them unread (issue 19: 40,000 padded datagrams
/// added 204 MiB before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_accepts_no_datagrams() -> anyhow::Result<()> {
    init_tracing();
    bounded(30, async {
        let dir = tempfile::tempdir()?;
        let (broker, client) = embedded(dir.path(), |_| {}).await?;
        let conn = client.connection().await?;
        anyhow::ensure!(conn.max_datagram_size().is_none(), "the broker advertises datagrams");
        let refused = conn.send_datagram(bytes::Bytes::from_static(b"x"));
        anyhow::ensure!(refused.is_err(), "a datagram was accepted for sending");
        client.close().await;
        broker.shutdown().await;
        Ok(())
    })
    .await
}
