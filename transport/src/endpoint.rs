//! Endpoint setup both ends share: the UDP socket, datagram and MTU limits, the QUIC transport
//! settings, and the TLS crypto provider.

use std::sync::Arc;

use quiver_protocol::limits::{
    MAX_UDP_PAYLOAD, SEND_WINDOW_BYTES, SOCKET_BUFFER_BYTES, STREAM_RECEIVE_WINDOW_BYTES,
};

/// The TLS crypto provider of both ends: *ring*, with the TLS 1.3 suites ordered AES-128-GCM
/// first. rustls lists AES-256-GCM first; AES-128 runs 10 AES rounds per block instead of 14,
/// and every byte on a QUIC connection is encrypted once and decrypted once.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

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

/// The transport settings both ends share: no unidirectional streams and no datagrams (the
/// protocol uses neither), a [`STREAM_RECEIVE_WINDOW_BYTES`] window per stream, a [`SEND_WINDOW_BYTES`] send
/// window and MTU discovery. Each end adds its connection receive window, idle timeout and
/// stream limits.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(0u32.into());
    // The protocol sends no datagrams: advertise none, so a peer cannot fill a receive buffer
    // that nothing reads (quinn's default keeps about 1 MiB of them per connection).
    t.datagram_receive_buffer_size(None);
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
}
