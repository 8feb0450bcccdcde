//! Quiver's QUIC layer, shared by the broker and the client SDK (and later by links between
//! brokers): frames over quinn streams with memory budgets ([`FrameReader`],
//! [`write_message`]), endpoint and socket setup ([`udp_socket`], [`transport_config`],
//! [`limit_datagrams`], [`discover_mtu`]), the TLS crypto provider ([`crypto_provider`]) and a
//! mutual-TLS client configuration ([`mutual_tls_client_config`], for links between brokers), and
//! where a default broker listens and keeps its development CA ([`DEFAULT_PORT`],
//! [`default_data_dir`], [`default_ca_path`]).
//!
//! What travels in the frames (the messages, their encoding) and every bound, the QUIC ones
//! included, are `quiver-protocol`'s (`quiver_protocol::limits`); this crate only moves frames.

mod defaults;
mod endpoint;
mod frame;
mod tls;

pub use defaults::{default_ca_path, default_data_dir, DEFAULT_PORT};
pub use endpoint::{crypto_provider, discover_mtu, limit_datagrams, transport_config, udp_socket};
pub use frame::{
    write_encoded, write_message, Frame, FrameReader, ReadError, WriteError, DEFAULT_FRAME_TIMEOUT,
};
pub use tls::{mutual_tls_client_config, TlsConfigError};
