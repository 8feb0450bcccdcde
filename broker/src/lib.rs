//! The Quiver broker: partition logs on disk, the QUIC endpoint and its sessions.
//!
//! Embed a broker in your own service:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use quiver_broker::{Broker, BrokerConfig};
//! let broker = Broker::start(BrokerConfig::new("/tmp/quiver-data").listen("127.0.0.1:0".parse()?)).await?;
//! println!("listening on {}, CA at {:?}", broker.local_addr(), broker.ca_path());
//! broker.shutdown().await;
//! # Ok(()) }
//! ```

pub mod auth;
pub mod budget;
pub mod cluster;
pub mod config;
mod coordinator;
pub mod data_dir;
mod dead_letters;
// The decoders' fuzz helpers (case counts from QUIVER_FUZZ_CASES, mutations of valid
// encodings): one file shared with the protocol crate's tests, without a test-only crate.
#[cfg(test)]
#[path = "../../protocol/src/fuzz.rs"]
pub(crate) mod fuzz;
pub mod groups;
pub mod log;
mod maintenance;
#[cfg(test)]
mod metadata_fuzz_tests;
pub mod observability;
pub mod offsets;
pub mod open_files;
pub mod partition;
pub mod placement;
pub mod producers;
pub(crate) mod replica;
mod requests;
pub mod server;
pub mod state;
pub mod storage;
mod subscription;
mod tail_cache;
pub mod tls;
pub mod topics;

pub use config::BrokerConfig;
pub use server::Broker;
