//! Frames over quinn streams, shared by the client and the broker.
//!
//! `FrameReader` buffers only what one frame needs (its length is checked against
//! `MAX_FRAME_BYTES` first) and gives a started frame `frame_timeout` to arrive completely, so
//! a peer cannot hold a half-sent frame open for ever. `next()` is cancel-safe: all state lives
//! in the struct, so it can sit in a `select!`.
//!
//! A reader may be given memory budgets (semaphores counting bytes): before buffering a
//! frame's body it takes the frame's length from each, and the returned `Frame` holds them
//! until it is dropped. QUIC flow control alone cannot bound this memory, because reading
//! from quinn returns credit to the peer; the budgets do, and while a budget is exhausted the
//! stream simply is not read, so flow control pushes back on the sender.

use std::time::Duration;

use std::sync::Arc;

use bytes::BytesMut;
use quiver_protocol::frame::{decode_frame, FrameError, RawFrame};
use quiver_protocol::message::{Encoded, Message, MessageError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default for how long the rest of a frame may take once its first byte arrived.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes asked of quinn per read.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Message(#[from] MessageError),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("a frame took longer than {0:?} to arrive")]
    Timeout(Duration),
    #[error(transparent)]
    Read(#[from] quinn::ReadError),
}

/// Writing a frame failed.
pub type WriteError = quinn::WriteError;

/// A frame with the memory-budget permits that cover it.
#[derive(Debug)]
pub struct Frame {
    pub raw: RawFrame,
    pub permits: Vec<OwnedSemaphorePermit>,
}

#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    frame_timeout: Duration,
    budgets: Vec<Arc<Semaphore>>,
    /// Permits taken for the frame being buffered.
    held: Vec<OwnedSemaphorePermit>,
    /// When the frame being buffered must be complete (set at its first byte).
    deadline: Option<tokio::time::Instant>,
}

/// Frames up to this size skip the budgets: acks, hellos and subscribes must never queue
/// behind large produce frames, and their memory is bounded by the stream limits anyway.
pub const UNBUDGETED_FRAME_BYTES: u32 = 64 * 1024;

impl FrameReader {
    pub fn new(recv: quinn::RecvStream) -> Self {
        FrameReader {
            recv,
            buf: BytesMut::with_capacity(8 * 1024),
            frame_timeout: DEFAULT_FRAME_TIMEOUT,
            budgets: Vec::new(),
            held: Vec::new(),
            deadline: None,
        }
    }

    pub fn with_frame_timeout(mut self, t: Duration) -> Self {
        self.frame_timeout = t;
        self
    }

    /// Adds a memory budget in bytes (at least `MAX_FRAME_BYTES` permits, or large frames
    /// would wait for ever).
    pub fn with_budget(mut self, budget: Arc<Semaphore>) -> Self {
        self.budgets.push(budget);
        self
    }

    /// The next raw frame, or `None` at a clean end of stream.
    pub async fn next_raw(&mut self) -> Result<Option<RawFrame>, ReadError> {
        Ok(self.next_frame().await?.map(|f| f.raw))
    }

    /// The next frame with its budget permits, or `None` at a clean end of stream.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            self.reserve_budget().await?;
            // Once the length is known (and checked), `decode_frame` reserves room for the
            // whole frame, so the buffer never grows by doubling and copying what it holds.
            if let Some(raw) = decode_frame(&mut self.buf)? {
                self.deadline = None;
                if raw.payload.len() > UNBUDGETED_FRAME_BYTES as usize {
                    // Leave a large frame sole owner of its buffer (the few bytes read past it
                    // move to a new one), so a receiver can take it back as `BytesMut` and
                    // modify it in place, as the broker does when it stamps offsets.
                    self.buf = BytesMut::from(&self.buf[..]);
                }
                return Ok(Some(Frame { raw, permits: std::mem::take(&mut self.held) }));
            }
            let chunk = if self.buf.is_empty() {
                self.recv.read_chunk(READ_CHUNK_BYTES, true).await?
            } else {
                // One deadline for the whole frame, from its first byte: trickling a byte at a
                // time does not extend it.
                let deadline =
                    *self.deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.frame_timeout);
                tokio::time::timeout_at(deadline, self.recv.read_chunk(READ_CHUNK_BYTES, true))
                    .await
                    .map_err(|_| ReadError::Timeout(self.frame_timeout))??
            };
            match chunk {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(ReadError::Truncated),
            }
        }
    }

    /// Once a frame's length is known, takes that many bytes from every budget (waiting, and
    /// so not reading the stream, while a budget is exhausted).
    async fn reserve_budget(&mut self) -> Result<(), ReadError> {
        if self.held.len() == self.budgets.len() || self.buf.len() < 4 {
            return Ok(());
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        if len as usize > quiver_protocol::limits::MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(len as u64).into());
        }
        if len <= UNBUDGETED_FRAME_BYTES {
            return Ok(());
        }
        // One budget at a time, recording each permit as it is taken, so a cancelled call
        // resumes where it stopped.
        while self.held.len() < self.budgets.len() {
            let budget = self.budgets[self.held.len()].clone();
            let permit = budget.acquire_many_owned(len.max(1)).await.map_err(|_| ReadError::Truncated)?;
            self.held.push(permit);
        }
        Ok(())
    }

    /// The next frame decoded as a `Message`, or `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Message>, ReadError> {
        match self.next_raw().await? {
            Some(raw) => Ok(Some(Message::decode(raw)?)),
            None => Ok(None),
        }
    }

    /// Tells the peer to stop sending on this stream.
    pub fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(code));
    }
}

/// Writes one message; the batch tail goes out without being copied.
pub async fn write_message(send: &mut quinn::SendStream, msg: &Message) -> Result<(), WriteError> {
    write_encoded(send, msg.encode()).await
}

pub async fn write_encoded(send: &mut quinn::SendStream, enc: Encoded) -> Result<(), WriteError> {
    if enc.tail.is_empty() {
        send.write_chunk(enc.head).await
    } else {
        send.write_all_chunks(&mut [enc.head, enc.tail]).await
    }
}

/// The TLS crypto provider of both ends: *ring*, with the TLS 1.3 suites ordered AES-128-GCM
/// first. rustls lists AES-256-GCM first; AES-128 runs 10 AES rounds per block instead of 14,
/// and every byte on a QUIC connection is encrypted once and decrypted once.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    use rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256);
    std::sync::Arc::new(provider)
}

/// Socket buffer asked for, each way. The kernel caps it at `net.core.rmem_max` /
/// `wmem_max` (stock kernels: about 208 KiB; it doubles what it grants for bookkeeping).
/// 208 KiB holds only a few GRO-coalesced datagrams: a receiver that is busy for a moment
/// drops packets, and every drop halves QUIC's congestion window.
pub const SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// A UDP socket bound to `addr` with large send and receive buffers, for a quinn endpoint.
/// With `warn_if_small`, a kernel that grants much less logs a warning naming the sysctl.
pub fn udp_socket(addr: std::net::SocketAddr, warn_if_small: bool) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack where the address allows it, as std's bind would leave it.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a smaller grant only costs throughput.
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::debug!("could not enlarge the UDP receive buffer: {e}");
    }
    if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::debug!("could not enlarge the UDP send buffer: {e}");
    }
    socket.bind(&addr.into())?;
    let granted = socket.recv_buffer_size().unwrap_or(0);
    tracing::debug!(recv = granted, send = socket.send_buffer_size().unwrap_or(0), "UDP socket buffers");
    if warn_if_small && granted < SOCKET_BUFFER_BYTES / 2 {
        tracing::warn!(
            granted,
            "the kernel granted a small UDP receive buffer; for full throughput raise it with \
             `sysctl -w net.core.rmem_max=8388608 net.core.wmem_max=8388608`"
        );
    }
    Ok(socket.into())
}

/// Largest UDP payload either end accepts and MTU discovery searches up to. Connections start
/// at 1,200 bytes (safe on any path) and probe upwards; on an ordinary 1,500-byte network they
/// settle near 1,452, on loopback (MTU 64 KiB) at this bound. Per-packet work (header
/// protection, AEAD setup, loss tracking, acks) is most of QUIC's cost, so bigger packets move
/// more bytes per CPU cycle: a raw quinn stream on this machine carries 1.2 GB/s with 1,452-byte
/// packets and 2.3–2.7 GB/s with 5,000–6,500 (BENCHMARKS.md).
///
/// The bound is not higher because quinn sends up to 10 packets in one GSO system call, and
/// Linux caps a GSO send at 64 KiB: with packets above about 6,550 bytes the send fails
/// with `EMSGSIZE` and the connection stalls (6,500 works here, 6,600 stalls).
pub const MAX_UDP_PAYLOAD: u16 = 6000;

/// Applies the datagram limits above to an endpoint configuration.
pub fn limit_datagrams(endpoint: &mut quinn::EndpointConfig) {
    // MAX_UDP_PAYLOAD lies within quinn's accepted range (1,200..=65,527).
    let _ = endpoint.max_udp_payload_size(MAX_UDP_PAYLOAD);
}

/// Turns on MTU discovery up to [`MAX_UDP_PAYLOAD`] in a transport configuration.
pub fn discover_mtu(transport: &mut quinn::TransportConfig) {
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(MAX_UDP_PAYLOAD);
    transport.mtu_discovery_config(Some(mtud));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_is_offered_first() {
        let provider = crypto_provider();
        let suites: Vec<_> = provider.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        // Nothing dropped: the other TLS 1.3 suites stay available to peers that prefer them.
        assert_eq!(suites.len(), rustls::crypto::ring::default_provider().cipher_suites.len());
    }

    #[test]
    fn datagram_bound_fits_one_gso_send() {
        // quinn batches up to 10 packets per GSO send; Linux allows 64 KiB per send.
        assert!(usize::from(MAX_UDP_PAYLOAD) * 10 <= 65_507);
    }
}
