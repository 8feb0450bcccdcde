//! `quic-pipe`: how fast one QUIC connection moves bytes on this machine with Quiver's TLS and
//! transport settings and nothing else (no frames, no log, no acks). It is the ceiling any
//! broker workload over one connection is measured against (BENCHMARKS.md).
//!
//! ```sh
//! quic_pipe server --dir /tmp/pipe &                      # 2 worker threads, like quiverd
//! quic_pipe client --ca /tmp/pipe/tls/ca.pem --gb 2       # one thread, like a bench client
//! quic_pipe client --ca /tmp/pipe/tls/ca.pem --packet 1452  # fixed packet size, both ends
//! quic_pipe client --ca /tmp/pipe/tls/ca.pem --ping 20000 --chunk 1100  # round trips
//! ```
//! `--ping N` sends N `--chunk`-byte messages one at a time on one stream, each answered with
//! 16 bytes, and reports the round trip's p50/p99: the transport's floor under Quiver's
//! one-at-a-time produce latency (a 1 KiB record's produce frame is about 1,100 bytes).
//! `--packet` must be given to the server too; without it both ends discover the MTU up to
//! `MAX_UDP_PAYLOAD`, as Quiver does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use quiver_protocol::message::Message;
use quiver_transport::{self as transport, FrameReader};

#[derive(Parser)]
enum Cmd {
    /// Accept connections and count what each one sends.
    Server {
        #[arg(long, default_value = "/tmp/quic-pipe")]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7499")]
        listen: SocketAddr,
        /// Fixed UDP payload size instead of MTU discovery.
        #[arg(long)]
        packet: Option<u16>,
    },
    /// Send `--gb` gigabytes in `--chunk`-byte writes and report MB/s.
    Client {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7499")]
        connect: SocketAddr,
        #[arg(long, default_value_t = 2.0)]
        gb: f64,
        #[arg(long, default_value_t = 1 << 20)]
        chunk: usize,
        #[arg(long)]
        packet: Option<u16>,
        /// Round trips instead of bulk: this many messages, one at a time.
        #[arg(long)]
        ping: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cmd::parse() {
        Cmd::Server { dir, listen, packet } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(server(dir, listen, packet)),
        Cmd::Client { ca, connect, gb, chunk, packet, ping } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(client(ca, connect, gb, chunk.max(1), packet, ping)),
    }
}

/// Quiver's transport settings, optionally with a fixed packet size.
fn tune(
    t: &mut quinn::TransportConfig,
    e: &mut quinn::EndpointConfig,
    packet: Option<u16>,
) -> anyhow::Result<()> {
    if let Some(size) = packet {
        e.max_udp_payload_size(size)?;
        t.initial_mtu(size).min_mtu(size).mtu_discovery_config(None);
    }
    Ok(())
}

async fn server(dir: PathBuf, listen: SocketAddr, packet: Option<u16>) -> anyhow::Result<()> {
    let config = quiver_broker::config::BrokerConfig { data_dir: dir, listen, ..Default::default() };
    let files = quiver_broker::tls::ensure_certificates(&config)?;
    let mut server_config = quiver_broker::tls::server_config(&files, &config)?;
    let mut endpoint_config = quiver_broker::tls::endpoint_config(&config)?;
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window((16u32 << 20).into()).receive_window((32u32 << 20).into());
    transport::discover_mtu(&mut t);
    tune(&mut t, &mut endpoint_config, packet)?;
    server_config.transport_config(Arc::new(t));
    let socket = transport::udp_socket(listen, true)?;
    let endpoint =
        quinn::Endpoint::new(endpoint_config, Some(server_config), socket, Arc::new(quinn::TokioRuntime))?;
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let conn = incoming.await?;
            // The client's hello, answered as a broker would.
            let (mut send, recv) = conn.accept_bi().await?;
            FrameReader::new(recv).next().await?;
            let ok = Message::HelloOk {
                protocol_version: 1,
                broker_id: 0,
                server_version: "quic-pipe".into(),
                principal: None,
            };
            transport::write_message(&mut send, &ok).await?;
            send.finish()?;
            let (mut send, mut recv) = conn.accept_bi().await?;
            let mut head = [0u8; 5];
            recv.read_exact(&mut head).await?;
            if head[0] == PING {
                // Round trips: read each message whole, answer 16 bytes.
                let size = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
                anyhow::ensure!(size <= MAX_PING_BYTES, "ping messages of {size} bytes");
                let mut buf = vec![0u8; size];
                loop {
                    match recv.read_exact(&mut buf).await {
                        Ok(()) => send.write_all(&[1u8; 16]).await?,
                        Err(quinn::ReadExactError::FinishedEarly(_)) => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                send.finish()?;
                let _ = send.stopped().await;
                return anyhow::Ok(());
            }
            let mut n = 0u64;
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                n += chunk.bytes.len() as u64;
            }
            send.write_all(&n.to_le_bytes()).await?;
            send.finish()?;
            let _ = send.stopped().await;
            anyhow::Ok(())
        });
    }
    Ok(())
}

/// First byte of the measured stream: bulk bytes, or round trips.
const BULK: u8 = 0;
const PING: u8 = 1;
/// The largest ping message the server accepts.
const MAX_PING_BYTES: usize = 1 << 20;

async fn client(
    ca: PathBuf,
    connect: SocketAddr,
    gb: f64,
    chunk: usize,
    packet: Option<u16>,
    ping: Option<u64>,
) -> anyhow::Result<()> {
    let pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert?)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(transport::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"quiver/1".to_vec()];
    let mut client_config =
        quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?));
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window((16u32 << 20).into()).receive_window((64u32 << 20).into()).send_window(64 << 20);
    transport::discover_mtu(&mut t);
    let mut endpoint_config = quinn::EndpointConfig::default();
    transport::limit_datagrams(&mut endpoint_config);
    tune(&mut t, &mut endpoint_config, packet)?;
    client_config.transport_config(Arc::new(t));
    let socket = transport::udp_socket("127.0.0.1:0".parse()?, false)?;
    let endpoint = quinn::Endpoint::new(endpoint_config, None, socket, Arc::new(quinn::TokioRuntime))?;
    let conn = endpoint.connect_with(client_config, connect, "localhost")?.await?;
    let (mut send, recv) = conn.open_bi().await?;
    transport::write_message(
        &mut send,
        &Message::Hello { protocol_version: 1, client_id: "quic-pipe".into(), token: None },
    )
    .await?;
    send.finish()?;
    FrameReader::new(recv).next().await?;

    let (mut send, mut recv) = conn.open_bi().await?;
    if let Some(n) = ping {
        anyhow::ensure!(chunk <= MAX_PING_BYTES, "--chunk is at most {MAX_PING_BYTES} with --ping");
        let mut head = vec![PING];
        head.extend_from_slice(&(chunk as u32).to_le_bytes());
        send.write_all(&head).await?;
        let data = vec![7u8; chunk];
        let mut answer = [0u8; 16];
        let mut rtts = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let t = Instant::now();
            send.write_all(&data).await?;
            recv.read_exact(&mut answer).await?;
            rtts.push(t.elapsed().as_micros() as u64);
        }
        send.finish()?;
        rtts.sort_unstable();
        let at = |q: f64| rtts.get(((rtts.len() as f64 - 1.0) * q) as usize).copied().unwrap_or(0);
        println!(
            "{n} round trips of {chunk} bytes: p50 {} µs, p90 {}, p99 {}, max {}",
            at(0.5),
            at(0.9),
            at(0.99),
            at(1.0)
        );
        return Ok(());
    }
    send.write_all(&[BULK, 0, 0, 0, 0]).await?;
    let total = (gb * 1e9) as u64;
    let data = Bytes::from(vec![7u8; chunk]);
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        send.write_chunk(data.clone()).await?;
        sent += chunk as u64;
    }
    send.finish()?;
    let reply = recv.read_to_end(8).await?;
    let received = u64::from_le_bytes(reply.try_into().map_err(|_| anyhow::anyhow!("short reply"))?);
    anyhow::ensure!(received == sent, "sent {sent} bytes, server counted {received}");
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{sent} bytes in {secs:.2} s = {:.1} MB/s, packets of {} bytes",
        sent as f64 / secs / 1e6,
        conn.stats().path.current_mtu
    );
    Ok(())
}
