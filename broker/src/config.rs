//! Broker configuration: a TOML file and flags, validated once at start-up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The port a broker listens on when given none (the CLI's default too).
pub use quiver_transport::DEFAULT_PORT;

/// Everything a broker needs to start. Build with `BrokerConfig::new(data_dir)` and adjust.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Where topics, offsets and generated certificates live.
    pub data_dir: PathBuf,
    /// UDP address for QUIC.
    pub listen: SocketAddr,
    pub broker_id: u32,
    /// PEM certificate chain and key. Without them a development CA and certificate are
    /// generated into `<data_dir>/tls/` and reused on restart.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The CA that signs broker certificates (PEM), with `tls_cert`/`tls_key`: this broker
    /// then accepts broker-to-broker links (ALPN `quiver-peer/1`) from brokers whose
    /// certificate it signed, and presents `tls_cert` as its own client certificate when it
    /// dials them (which therefore needs the ClientAuth usage too).
    pub tls_ca: Option<PathBuf>,
    /// A development CA shared by the brokers of a cluster (not with `tls_cert`): the first
    /// broker creates `<dev_ca>/ca.pem` and `ca.key`, each broker issues its own certificate
    /// signed by it into `<data_dir>/tls/` (`broker.pem`, reissued when the CA changed), and
    /// that CA authenticates brokers to each other. Clients trust `<dev_ca>/ca.pem`.
    pub dev_ca: Option<PathBuf>,
    /// Client certificates (mutual TLS): a certificate signed by this CA (PEM) authenticates
    /// its subject common name as the connection's principal (docs/security.md). Turns
    /// authentication on.
    pub client_ca: Option<PathBuf>,
    /// Tokens: a file of `<principal> sha256:<hex> [expires=<unix seconds>]` lines (made with
    /// `quiverd token`), read again when it changes. Turns authentication on.
    pub token_file: Option<PathBuf>,
    /// With authentication on: connections without credentials act as the principal
    /// `anonymous` (ACLs apply to it) instead of being refused. With it off: needed to listen
    /// beyond loopback, where anyone could otherwise do anything.
    pub allow_anonymous: bool,
    /// Principals allowed everything, whatever the ACLs say (the first administrator).
    pub super_users: Vec<String>,
    /// Byte-rate quotas per principal (`"*"`: every principal without its own), enforced by
    /// reading a principal's requests and sending its deliveries no faster (QUIC flow control
    /// then slows the client down; nobody is disconnected). With authentication off every
    /// client is the principal `anonymous`.
    pub quotas: BTreeMap<String, Quota>,
    /// Connections beyond this are refused.
    pub max_connections: usize,
    /// Concurrent bidirectional streams per connection (one per subscribed partition plus the
    /// producer's per-partition streams and short request streams). The default lets one client
    /// produce to and consume every partition of the widest topic (`MAX_PARTITIONS`) at once;
    /// below that, a client subscribing to more partitions waits for streams that never come.
    /// A connection starts at `INITIAL_STREAMS_PER_CONNECTION` and is raised toward this as it
    /// opens streams (quinn keeps state per allowed stream: an idle connection stays small).
    pub max_streams_per_connection: u32,
    /// Pipelined requests a stream may have outstanding before the broker stops reading it.
    pub max_inflight_requests_per_stream: usize,
    /// A frame, once its first byte arrived, must arrive completely within this.
    pub frame_timeout_ms: u64,
    /// A connection with no traffic (clients send keep-alives) is closed after this.
    pub idle_timeout_ms: u64,
    /// A request stream with no request for this long (none arriving, none being answered)
    /// is ended, as is a stream that sends no first frame: idle streams hold broker memory.
    /// Subscription streams are not idle while subscribed. The SDK opens a new stream when it
    /// needs one again.
    pub stream_idle_timeout_ms: u64,
    /// TLS handshakes in progress at once; more are refused until some finish (each holds
    /// connection state before any authentication).
    pub max_handshakes: usize,
    /// Connections one principal may hold at once, when authentication is on.
    pub max_connections_per_principal: usize,
    /// Bidirectional streams one principal may hold open at once over all its connections
    /// (anonymous clients share one count). Every open stream holds broker memory for up to
    /// `stream_idle_timeout_ms` however idle it is; beyond this a new stream is answered
    /// `LimitExceeded` and ended. The default covers two clients producing to and consuming
    /// every partition of the widest topic at once.
    pub max_streams_per_principal: usize,
    /// Request bytes one connection may have buffered in the broker (being received or being
    /// handled). At least `MAX_FRAME_BYTES`.
    pub max_connection_buffer_bytes: u32,
    /// Request bytes all connections together may have buffered.
    pub max_total_buffer_bytes: u32,
    /// Bytes written to clients' connections and not yet acknowledged by them (sent or not:
    /// a client that stops reading or acknowledging leaves them there), all connections
    /// together: each client connection's QUIC send window is its share (docs/security.md).
    pub max_total_send_bytes: u64,
    /// Upper bound on a subscription's delivery window, whatever the client asks for.
    pub max_window_bytes: u32,
    /// Largest `Deliver` frame the broker builds.
    pub max_deliver_bytes: u32,
    /// How often retention runs.
    pub retention_check_ms: u64,
    /// How often lazily committed (acked) group offsets are persisted.
    pub offsets_flush_ms: u64,
    /// How often each partition's recovery point (how far a completed fsync reached) is
    /// written, when it moved (design.md §5.3): one small file write and two fsyncs per
    /// partition. Damage after the last written point is treated as a torn write at start.
    pub recovery_point_ms: u64,
    /// Send QUIC Retry to validate client addresses before allocating connection state.
    pub validate_addresses: bool,
    /// Newest appended bytes kept in memory per partition for subscribers at the tail.
    pub tail_cache_bytes_per_partition: usize,
    /// Bytes all tail caches together may hold: the bound on their memory however many
    /// partitions are written (design.md §8). Batches beyond it are read from the files.
    pub tail_cache_bytes_total: usize,
    /// Large segment appends (64 KiB and more) bypass the page cache (`O_DIRECT`) where the
    /// file system allows. Sustains more produce throughput where the page cache, not the
    /// disk, is the limit; history is then read from disk on its first read (BENCHMARKS.md).
    pub direct_writes: bool,
    /// Partitions across all topics; creating more is refused (bounds metadata and files).
    pub max_partitions_total: u32,
    /// TCP address for Prometheus `/metrics` and `/healthz`; off when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// Cluster mode (`--node-id`, `--peers`); a single node when unset. Flags only.
    #[serde(skip)]
    pub cluster: Option<ClusterConfig>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            data_dir: default_data_dir(),
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            broker_id: 0,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            dev_ca: None,
            client_ca: None,
            token_file: None,
            allow_anonymous: false,
            super_users: Vec::new(),
            quotas: BTreeMap::new(),
            max_connections: 16_384,
            max_streams_per_connection: 2 * quiver_protocol::limits::MAX_PARTITIONS + 256,
            max_inflight_requests_per_stream: 64,
            frame_timeout_ms: 30_000,
            idle_timeout_ms: 30_000,
            stream_idle_timeout_ms: 300_000,
            max_handshakes: 1024,
            max_connections_per_principal: 1024,
            max_streams_per_principal: 16_384,
            max_connection_buffer_bytes: 64 * 1024 * 1024,
            max_total_buffer_bytes: 1024 * 1024 * 1024,
            max_total_send_bytes: 1024 * 1024 * 1024,
            max_window_bytes: 64 * 1024 * 1024,
            max_deliver_bytes: 1024 * 1024,
            retention_check_ms: 30_000,
            offsets_flush_ms: 1000,
            recovery_point_ms: 10_000,
            validate_addresses: true,
            max_partitions_total: 100_000,
            tail_cache_bytes_per_partition: 8 * 1024 * 1024,
            tail_cache_bytes_total: 256 * 1024 * 1024,
            direct_writes: false,
            metrics_listen: None,
            cluster: None,
        }
    }
}

pub use quiver_protocol::limits::INITIAL_STREAMS_PER_CONNECTION;

impl BrokerConfig {
    pub fn initial_streams_per_connection(&self) -> u32 {
        INITIAL_STREAMS_PER_CONNECTION.min(self.max_streams_per_connection)
    }

    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        BrokerConfig { data_dir: data_dir.into(), ..Default::default() }
    }

    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Reads a TOML file; unknown keys are an error so typos do not pass silently.
    pub fn from_toml_file(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }

    /// Whether clients authenticate (`client_ca` or `token_file`), and so ACLs apply.
    pub fn auth_enabled(&self) -> bool {
        self.client_ca.is_some() || self.token_file.is_some()
    }

    /// Checks relations between settings.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.auth_enabled() || self.allow_anonymous || self.listen.ip().is_loopback(),
            "listening on {} beyond loopback with authentication off would let anyone who reaches the port do \
             anything (delete topics included): turn authentication on (--client-ca FILE and/or --token-file \
             FILE, docs/security.md), or pass --allow-anonymous to serve anonymous clients deliberately",
            self.listen
        );
        for (name, q) in &self.quotas {
            if name != "*" {
                quiver_protocol::message::validate_principal(name)
                    .map_err(|e| anyhow::anyhow!("quota: {e}"))?;
            }
            anyhow::ensure!(
                q.produce_bytes_per_sec != Some(0) && q.consume_bytes_per_sec != Some(0),
                "quota of '{name}': a rate of 0 would stop it for good; leave it unset for no limit"
            );
        }
        for name in &self.super_users {
            quiver_protocol::message::validate_principal(name)
                .map_err(|e| anyhow::anyhow!("super user: {e}"))?;
        }
        anyhow::ensure!(
            self.tls_cert.is_some() == self.tls_key.is_some(),
            "tls_cert and tls_key go together"
        );
        anyhow::ensure!(
            self.tls_ca.is_none() || self.tls_cert.is_some(),
            "tls_ca (the CA of broker certificates) needs tls_cert and tls_key: the broker's own certificate signed by it"
        );
        anyhow::ensure!(
            self.dev_ca.is_none() || self.tls_cert.is_none(),
            "dev_ca and tls_cert exclude each other: dev_ca generates the broker's certificate"
        );
        anyhow::ensure!(self.max_connections > 0, "max_connections must be positive");
        anyhow::ensure!(self.max_handshakes > 0, "max_handshakes must be positive");
        anyhow::ensure!(
            self.max_connections_per_principal > 0,
            "max_connections_per_principal must be positive"
        );
        anyhow::ensure!(self.max_streams_per_principal > 0, "max_streams_per_principal must be positive");
        let least_send = (quiver_protocol::limits::MIN_SEND_WINDOW_BYTES * self.max_connections as u64)
            .max(quiver_protocol::limits::SEND_WINDOW_BYTES);
        anyhow::ensure!(
            self.max_total_send_bytes >= least_send,
            "max_total_send_bytes must be at least {least_send} (max_connections x {} bytes, the least \
             send window, and at least one whole window of {} bytes)",
            quiver_protocol::limits::MIN_SEND_WINDOW_BYTES,
            quiver_protocol::limits::SEND_WINDOW_BYTES
        );
        anyhow::ensure!(self.stream_idle_timeout_ms > 0, "stream_idle_timeout_ms must be positive");
        anyhow::ensure!(
            self.max_inflight_requests_per_stream > 0,
            "max_inflight_requests_per_stream must be positive"
        );
        anyhow::ensure!(self.max_window_bytes > 0, "max_window_bytes must be positive");
        anyhow::ensure!(self.max_deliver_bytes > 0, "max_deliver_bytes must be positive");
        anyhow::ensure!(self.max_partitions_total > 0, "max_partitions_total must be positive");
        anyhow::ensure!(self.recovery_point_ms > 0, "recovery_point_ms must be positive");
        let frame = quiver_protocol::limits::MAX_FRAME_BYTES;
        anyhow::ensure!(
            self.max_connection_buffer_bytes as usize >= frame
                && self.max_total_buffer_bytes as usize >= frame,
            "buffer budgets must be at least the frame limit ({frame} bytes)"
        );
        anyhow::ensure!(
            self.max_deliver_bytes as usize <= quiver_protocol::limits::MAX_FRAME_BYTES / 2,
            "max_deliver_bytes must be at most half of the frame limit"
        );
        Ok(())
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("tls")
    }

    /// The CA file clients should trust when certificates were generated: the shared CA's
    /// with `dev_ca`, else the single node's under `<data_dir>/tls/`.
    pub fn dev_ca_path(&self) -> PathBuf {
        match &self.dev_ca {
            // `tls::dev_ca::CA_CERT_FILE`, spelled out: tls reads the config, not the reverse.
            Some(dir) => dir.join("ca.pem"),
            None => self.tls_dir().join("ca.pem"),
        }
    }
}

/// A principal's byte rates (docs/security.md, "Quotas"); unset: unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quota {
    /// Bytes of produce requests per second (all its connections together).
    pub produce_bytes_per_sec: Option<u64>,
    /// Bytes of deliveries and fetches per second (all its connections together).
    pub consume_bytes_per_sec: Option<u64>,
}

/// Who this broker is and who its peers are (`--node-id`, `--peers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub node_id: u64,
    /// Every voter, this broker included: id → address (the address clients and brokers
    /// reach it at).
    pub peers: BTreeMap<u64, SocketAddr>,
    /// `--join HOST:PORT,...`: brokers of a running cluster (docs/replication.md §11). The
    /// brokers are asked of the first that answers at start (this one must have been added
    /// with `quiver cluster add-broker`), else taken from the data directory (a restart);
    /// `peers` holds only this broker until then.
    pub join: Option<Vec<SocketAddr>>,
}

impl ClusterConfig {
    /// Parses `--peers 1@HOST:PORT,2@HOST:PORT,...` for broker `node_id`.
    pub fn parse(node_id: u64, peers: &str) -> Result<ClusterConfig, String> {
        let mut map = BTreeMap::new();
        for item in peers.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, addr) =
                item.split_once('@').ok_or_else(|| format!("peer '{item}' is not ID@HOST:PORT"))?;
            let id: u64 = id.parse().map_err(|_| format!("peer '{item}': '{id}' is not a node id"))?;
            if id == 0 || id > u64::from(u32::MAX) {
                return Err(format!("peer '{item}': node ids are 1 to {}", u32::MAX));
            }
            let addr = std::net::ToSocketAddrs::to_socket_addrs(addr)
                .map_err(|e| format!("peer '{item}': {e} (the form is ID@HOST:PORT, e.g. 1@127.0.0.1:7431)"))?
                .next()
                .ok_or_else(|| format!("peer '{item}': no address"))?;
            if let Some((other, _)) = map.iter().find(|(_, a)| **a == addr) {
                return Err(format!("nodes {other} and {id} have the same address {addr} in --peers"));
            }
            if map.insert(id, addr).is_some() {
                return Err(format!("node id {id} appears twice in --peers"));
            }
        }
        if map.len() > quiver_protocol::limits::MAX_RAFT_VOTERS {
            return Err(format!("more than {} peers", quiver_protocol::limits::MAX_RAFT_VOTERS));
        }
        if !map.contains_key(&node_id) {
            return Err(format!("--node-id {node_id} is not in --peers"));
        }
        Ok(ClusterConfig { node_id, peers: map, join: None })
    }

    /// A broker joining the running cluster at `join` as broker `node_id`, listening at
    /// `listen` (`--join`).
    pub fn joining(node_id: u64, listen: SocketAddr, join: Vec<SocketAddr>) -> ClusterConfig {
        ClusterConfig { node_id, peers: BTreeMap::from([(node_id, listen)]), join: Some(join) }
    }

    pub fn ids(&self) -> Vec<u64> {
        self.peers.keys().copied().collect()
    }
}

/// The CLI looks for the development CA under the same directory, so a broker and CLI started
/// with no flags find each other.
pub use quiver_transport::default_data_dir;

#[cfg(test)]
mod tests {
    use super::ClusterConfig;

    #[test]
    fn peers_are_checked_for_repeats_and_membership() {
        let ok = ClusterConfig::parse(2, "1@127.0.0.1:7431, 2@127.0.0.1:7432").expect("valid");
        assert_eq!(ok.ids(), vec![1, 2]);
        let refused = |peers: &str| ClusterConfig::parse(1, peers).expect_err(peers);
        assert!(refused("1@127.0.0.1:7431,1@127.0.0.1:7432").contains("appears twice"));
        // One address for two ids: a broker would dial itself as its peer.
        assert!(refused("1@127.0.0.1:7703,2@127.0.0.1:7703").contains("same address"));
        assert!(refused("2@127.0.0.1:7432").contains("not in --peers"));
        assert!(refused("0@127.0.0.1:7432").contains("node ids are"));
        assert!(refused("1@nowhere").contains("ID@HOST:PORT"));
    }
}
