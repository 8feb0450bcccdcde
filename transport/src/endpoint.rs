//! Endpoint setup both ends share: the UDP socket, datagram and MTU limits, the QUIC transport
//! settings, and the TLS crypto provider.

use std::sync::Arc;

/// The TLS crypto provider of both ends: *ring*, with the TLS 1.3 suites ordered AES-128-GCM
/// first. rustls lists AES-256-GCM first; AES-128 runs 10 AES rounds per block instead of 14,
/// and every byte on a QUIC connection is encrypted once and decrypted once.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
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

/// Flow-control window of one stream, both ways: a whole maximal frame fits in flight.
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Bytes sent but not yet acknowledged on one connection.
pub const SEND_WINDOW_BYTES: u64 = 64 * 1024 * 1024;

/// The transport settings both ends share: no unidirectional streams (the protocol uses
/// none), a [`STREAM_RECEIVE_WINDOW_BYTES`] window per stream, a [`SEND_WINDOW_BYTES`] send
/// window and MTU discovery. Each end adds its connection receive window, idle timeout and
/// stream limits.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(STREAM_RECEIVE_WINDOW_BYTES.into());
    t.send_window(SEND_WINDOW_BYTES);
    discover_mtu(&mut t);
    t
}

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
