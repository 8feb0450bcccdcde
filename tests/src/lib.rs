//! Harness for end-to-end tests: broker processes on ephemeral loopback ports with their own
//! temp data directories, SIGKILL and restart, and small helpers. Everything is real: the
//! `quiverd` code in a child process, QUIC with TLS on 127.0.0.1, files on disk.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use quiver_broker::{Broker, BrokerConfig};
use quiver_client::{Client, ClientConfig};

pub mod faults;
pub mod proxy;
pub mod workload;

use proxy::{LinkFaults, Mode, UdpProxy};

/// 127.0.0.1 with an ephemeral port: for the listeners an embedded broker's config names.
pub const LOOPBACK_ANY_PORT: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));

/// A broker in this process (the embedding API) on an ephemeral loopback port with its data in
/// `dir`, and a client connected to it. `tweak` adjusts the config before the start.
pub async fn embedded(dir: &Path, tweak: impl FnOnce(&mut BrokerConfig)) -> anyhow::Result<(Broker, Client)> {
    let mut config = BrokerConfig::new(dir).listen(LOOPBACK_ANY_PORT);
    tweak(&mut config);
    let broker = Broker::start(config).await?;
    let client = client_of(&broker).await?;
    Ok((broker, client))
}

/// A client of an embedded broker, trusting its development CA.
pub async fn client_of(broker: &Broker) -> anyhow::Result<Client> {
    let ca = broker.ca_path().cloned().ok_or_else(|| anyhow::anyhow!("no development CA"))?;
    Ok(Client::connect(ClientConfig::new(broker.local_addr().to_string(), ca)).await?)
}

/// One HTTP GET of `path` from a broker's metrics listener: the whole response. Blocking.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The sum of the Prometheus samples in `body` whose line starts with `prefix` (a name, or a
/// name with labels).
pub fn metric_sum(body: &str, prefix: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A free TCP address on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_tcp_port_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A free UDP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// One broker process.
#[derive(Debug)]
pub struct BrokerProcess {
    bin: PathBuf,
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    config_path: Option<PathBuf>,
    /// Flags after `--data-dir`/`--listen` (cluster mode's).
    extra_args: Vec<String>,
    /// The CA clients trust (`<data>/tls/ca.pem`, or a cluster's shared one).
    ca: PathBuf,
    /// Where it serves `/metrics`, if it was started with `--metrics-listen`.
    pub metrics: Option<SocketAddr>,
    /// The test-only sync ledger it records its fsyncs in (`QUIVER_TEST_SYNC_LEDGER`), for
    /// power-loss faults (docs/faults.md).
    pub sync_ledger: Option<PathBuf>,
    /// Its wall clock, when it runs under libfaketime (clock faults, docs/faults.md).
    pub clock: Option<FakeClock>,
}

/// A broker's wall clock under libfaketime: `LD_PRELOAD` of `lib`, its offset read from `file`
/// (re-read once a second), the monotonic clocks left alone (an NTP step moves only the wall
/// clock).
#[derive(Debug, Clone)]
pub struct FakeClock {
    pub lib: PathBuf,
    pub file: PathBuf,
}

impl FakeClock {
    /// Where libfaketime's multi-threaded library is: `QUIVER_FAKETIME_LIB`, or where Debian,
    /// Ubuntu and a source install put it. `None` when it is not installed.
    pub fn find_lib() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("QUIVER_FAKETIME_LIB") {
            return Some(PathBuf::from(p));
        }
        [
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
            "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
            "/usr/lib/faketime/libfaketimeMT.so.1",
            "/usr/local/lib/faketime/libfaketimeMT.so.1",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    }

    /// Sets the clock `offset_s` seconds from the real time (0: the real time).
    pub fn set(&self, offset_s: i64) -> anyhow::Result<()> {
        let tmp = self.file.with_extension("clock.tmp");
        std::fs::write(&tmp, format!("{offset_s:+}\n"))?;
        std::fs::rename(&tmp, &self.file)?;
        Ok(())
    }
}

impl BrokerProcess {
    /// Starts `bin` with `--data-dir`, `--listen` on a free port, and an optional TOML config.
    pub async fn start(bin: &str, data_dir: &Path, config_toml: Option<&str>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let config_path = match config_toml {
            Some(text) => {
                let p = data_dir.join("quiverd-test.toml");
                std::fs::write(&p, text)?;
                Some(p)
            }
            None => None,
        };
        let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse()?;
        let mut b = BrokerProcess {
            bin: PathBuf::from(bin),
            child: None,
            addr,
            data_dir: data_dir.to_path_buf(),
            log_path: data_dir.join("quiverd-test.log"),
            config_path,
            extra_args: Vec::new(),
            ca: data_dir.join("tls").join("ca.pem"),
            metrics: None,
            sync_ledger: None,
            clock: None,
        };
        b.spawn().await?;
        Ok(b)
    }

    /// Starts `bin` as broker `node_id` of a cluster: `--listen addr --peers peers --dev-ca ca_dir`.
    /// Returns once the process runs (a cluster serves once a quorum is up: see [`Cluster`]).
    pub fn start_node(
        bin: &str,
        data_dir: &Path,
        node_id: u64,
        addr: SocketAddr,
        peers: &str,
        ca_dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_node_with(bin, data_dir, node_id, addr, peers, ca_dir, &[])
    }

    /// As [`start_node`](BrokerProcess::start_node) with more flags (kept across restarts).
    pub fn start_node_with(
        bin: &str,
        data_dir: &Path,
        node_id: u64,
        addr: SocketAddr,
        peers: &str,
        ca_dir: &Path,
        more_args: &[String],
    ) -> anyhow::Result<Self> {
        let mut b = Self::node(bin, data_dir, node_id, addr, peers, ca_dir, more_args)?;
        b.spawn_process()?;
        Ok(b)
    }

    /// Starts `bin` as broker `node_id` joining the running cluster that `join` belongs to
    /// (`--join`, docs/replication.md §11); it must have been added to it first.
    pub fn start_joining(
        bin: &str,
        data_dir: &Path,
        node_id: u64,
        addr: SocketAddr,
        join: SocketAddr,
        ca_dir: &Path,
    ) -> anyhow::Result<Self> {
        Self::start_joining_any(bin, data_dir, node_id, addr, &join.to_string(), ca_dir)
    }

    /// [`start_joining`](BrokerProcess::start_joining) given `host:port,...` to ask.
    pub fn start_joining_any(
        bin: &str,
        data_dir: &Path,
        node_id: u64,
        addr: SocketAddr,
        join: &str,
        ca_dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut b = Self::node(bin, data_dir, node_id, addr, "", ca_dir, &[])?;
        b.extra_args = vec![
            "--node-id".into(),
            node_id.to_string(),
            "--join".into(),
            join.to_string(),
            "--dev-ca".into(),
            ca_dir.display().to_string(),
        ];
        b.spawn_process()?;
        Ok(b)
    }

    /// A cluster node as [`start_node_with`](BrokerProcess::start_node_with) describes it, not
    /// started yet.
    fn node(
        bin: &str,
        data_dir: &Path,
        node_id: u64,
        addr: SocketAddr,
        peers: &str,
        ca_dir: &Path,
        more_args: &[String],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        Ok(BrokerProcess {
            bin: PathBuf::from(bin),
            child: None,
            addr,
            data_dir: data_dir.to_path_buf(),
            log_path: data_dir.join("quiverd-test.log"),
            config_path: None,
            extra_args: vec![
                "--node-id".into(),
                node_id.to_string(),
                "--peers".into(),
                peers.into(),
                "--dev-ca".into(),
                ca_dir.display().to_string(),
            ]
            .into_iter()
            .chain(more_args.iter().cloned())
            .collect(),
            ca: ca_dir.join("ca.pem"),
            metrics: None,
            sync_ledger: None,
            clock: None,
        })
    }

    /// The sum of the Prometheus samples starting with `prefix` on its `/metrics` (0 if the
    /// metric has not been recorded yet); needs `metrics`.
    pub async fn metric(&self, prefix: &str) -> anyhow::Result<f64> {
        let addr = self.metrics.ok_or_else(|| anyhow::anyhow!("broker started without --metrics-listen"))?;
        let body = tokio::task::spawn_blocking(move || http_get(addr, "/metrics")).await??;
        anyhow::ensure!(body.starts_with("HTTP/1.1 200"), "GET /metrics: {body}");
        Ok(metric_sum(&body, prefix))
    }

    /// Starts the process again (after `kill9` or `terminate`) without waiting for it to serve.
    pub fn respawn(&mut self) -> anyhow::Result<()> {
        self.spawn_process()
    }

    fn spawn_process(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path)?;
        // `QUIVERD_UNDER_TEST` names another build of the broker: a target directory shared by
        // several checkouts may have rebuilt this package's own copy from another one.
        let bin = std::env::var_os("QUIVERD_UNDER_TEST").map_or_else(|| self.bin.clone(), PathBuf::from);
        let mut cmd = Command::new(&bin);
        cmd.arg("--data-dir").arg(&self.data_dir).arg("--listen").arg(self.addr.to_string());
        if let Some(c) = &self.config_path {
            cmd.arg("--config").arg(c);
        }
        cmd.args(&self.extra_args);
        if let Some(ledger) = &self.sync_ledger {
            cmd.env(quiver_broker::storage::ledger::ENV, ledger);
        }
        if let Some(clock) = &self.clock {
            cmd.env("LD_PRELOAD", &clock.lib)
                .env("FAKETIME_TIMESTAMP_FILE", &clock.file)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_CACHE_DURATION", "1");
        }
        cmd.env("QUIVER_LOG", std::env::var("QUIVER_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(cmd.spawn().with_context(|| format!("spawning {}", bin.display()))?);
        Ok(())
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        self.spawn_process()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("broker exited at start ({status}); log:\n{}", self.log());
            }
            if self.ca_path().exists() {
                match self.try_client(Duration::from_millis(500)).await {
                    Ok(c) => {
                        c.close().await;
                        return Ok(());
                    }
                    // A broker with authentication on answers, and refuses a client without
                    // credentials: it is up.
                    Err(e) if format!("{e:#}").contains("requires authentication") => return Ok(()),
                    Err(_) => {}
                }
            }
            if Instant::now() > deadline {
                bail!("broker did not come up on {}; log:\n{}", self.addr, self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.ca.clone()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    async fn try_client(&self, timeout: Duration) -> anyhow::Result<Client> {
        let mut cfg = ClientConfig::new(self.addr.to_string(), self.ca_path());
        cfg.connect_timeout = timeout;
        Ok(Client::connect(cfg).await?)
    }

    /// A connected client.
    pub async fn client(&self) -> anyhow::Result<Client> {
        self.try_client(Duration::from_secs(5)).await
    }

    /// SIGKILL: no chance to flush or sync anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL if running, then start again on the same address and data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn().await
    }

    /// SIGTERM (a graceful shutdown, as a service manager stops it), then waits up to 30 s
    /// for the process to exit.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("broker did not exit within 30 s of SIGTERM; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// A graceful restart: SIGTERM, wait for the exit, start again on the same address and
    /// data directory.
    pub async fn restart_graceful(&mut self) -> anyhow::Result<()> {
        self.terminate().await?;
        self.spawn().await
    }

    /// The `quiver` CLI at `bin`, pointed at this broker (`--broker`, `--ca`); add the command.
    pub fn cli(&self, bin: &str) -> Command {
        let mut cmd = Command::new(bin);
        cmd.arg("--broker").arg(self.addr.to_string()).arg("--ca").arg(self.ca_path());
        cmd
    }

    /// Resident memory of the broker process, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        quiver_broker::observability::rss_kib(self.pid()?)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Publishes `values` to `topic` (pipelined) and waits until every one is acknowledged.
pub async fn publish(
    client: &Client,
    topic: &str,
    values: impl IntoIterator<Item = String>,
) -> anyhow::Result<()> {
    let producer = quiver_client::Producer::new(client.clone(), Default::default());
    let mut acks = Vec::new();
    for v in values {
        acks.push(producer.enqueue(topic, quiver_client::ProducerRecord::new(v)).await?);
    }
    for a in acks {
        a.await?;
    }
    Ok(())
}

/// Installs a test log subscriber once (RUST_LOG-style filter in `QUIVER_TEST_LOG`).
/// The consumer's next message within `within`; an error if it ends, fails or times out.
pub async fn next_message(
    consumer: &mut quiver_client::Consumer,
    within: std::time::Duration,
) -> anyhow::Result<quiver_client::ConsumedMessage> {
    use futures::StreamExt;
    let next = tokio::time::timeout(within, consumer.next())
        .await
        .map_err(|_| anyhow::anyhow!("no message within {within:?}"))?;
    Ok(next.ok_or_else(|| anyhow::anyhow!("stream ended"))??)
}

pub fn init_tracing() {
    let filter = std::env::var("QUIVER_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// Writes a token file at `path` with a fresh token for each principal (no expiry); the
/// tokens, in the order given.
pub fn write_tokens<const N: usize>(path: &Path, principals: [&str; N]) -> anyhow::Result<[String; N]> {
    let (mut text, mut tokens) = (String::new(), Vec::with_capacity(N));
    for principal in principals {
        let (token, line) = quiver_broker::auth::new_token(principal, None)?;
        text.push_str(&line);
        text.push('\n');
        tokens.push(token);
    }
    std::fs::write(path, text)?;
    tokens.try_into().map_err(|_| anyhow::anyhow!("one token per principal"))
}

/// A temporary directory for a test's brokers, removed at the end; kept (its path printed)
/// when `QUIVER_TEST_KEEP` is set, so the brokers' logs of a failed run can be read.
pub fn test_dir() -> anyhow::Result<tempfile::TempDir> {
    let mut dir = tempfile::tempdir()?;
    if std::env::var_os("QUIVER_TEST_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    Ok(dir)
}

/// Runs a test body with a hard time bound, so a hang fails instead of blocking CI.
pub async fn bounded<T>(
    secs: u64,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(r) => r,
        Err(_) => bail!("test did not finish within {secs} s"),
    }
}

/// What a partition with a damaged span serves: a fetch at `damaged` fails with `CorruptLog`,
/// one at offset 0 returns batches, and a new record lands at `next` (damaged offsets are
/// never reused).
pub async fn check_damaged_partition(
    client: &Client,
    topic: &str,
    damaged: u64,
    next: u64,
) -> anyhow::Result<()> {
    use quiver_client::ClientError;
    use quiver_protocol::message::Message;
    use quiver_protocol::ErrorCode;
    let fetch = |offset| Message::Fetch { topic: topic.into(), partition: 0, offset, max_bytes: 1 << 20 };
    match client.request(&fetch(damaged)).await {
        Err(ClientError::Broker { code: ErrorCode::CorruptLog, .. }) => {}
        other => bail!("expected CorruptLog, got {other:?}"),
    }
    match client.request(&fetch(0)).await? {
        Message::FetchOk { batches, .. } => anyhow::ensure!(!batches.is_empty(), "no batches at offset 0"),
        other => bail!("expected FetchOk, got kind {}", other.kind()),
    }
    let producer = quiver_client::Producer::new(client.clone(), Default::default());
    let meta = producer.send(topic, quiver_client::ProducerRecord::new("after")).await?;
    anyhow::ensure!(
        meta.offset == Some(next),
        "new record at {:?}, want {next}: damaged offsets reused?",
        meta.offset
    );
    Ok(())
}

/// A cluster of broker processes on loopback (`--peers`, a shared `--dev-ca`), each with its
/// own data directory under one temp dir. Nodes are indexed from 0 (`nodes[i]` is broker id
/// `i + 1`).
#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<BrokerProcess>,
    pub ca: PathBuf,
    /// With [`Cluster::start_with_proxies`]: the proxy on each directed broker-to-broker path
    /// `(from, to)` (node indexes), through which `from` reaches `to`.
    pub proxies: BTreeMap<(usize, usize), UdpProxy>,
    /// Node indexes of brokers removed from the cluster (and stopped): never started again,
    /// never read from.
    pub retired: std::collections::BTreeSet<usize>,
}

impl Cluster {
    /// Starts `n` brokers (ids 1..=n) that reach each other directly. They serve once a
    /// quorum is up; [`Cluster::client`] and [`Cluster::create_topic`] wait for that.
    pub async fn start(bin: &str, dir: &Path, n: u64) -> anyhow::Result<Cluster> {
        let addrs = free_addrs(n)?;
        let peers = peer_list(&addrs);
        Self::start_nodes(bin, dir, &addrs, |_| peers.clone(), BTreeMap::new(), NodeOptions::default())
    }

    /// As [`start`](Cluster::start), each broker also serving Prometheus metrics on a free
    /// loopback TCP port (`--metrics-listen`, in [`BrokerProcess::metrics`]).
    pub async fn start_with_metrics(bin: &str, dir: &Path, n: u64) -> anyhow::Result<Cluster> {
        let addrs = free_addrs(n)?;
        let peers = peer_list(&addrs);
        let opts = NodeOptions { metrics: true, ..NodeOptions::default() };
        Self::start_nodes(bin, dir, &addrs, |_| peers.clone(), BTreeMap::new(), opts)
    }

    /// As [`start`](Cluster::start), every broker also given `args` (kept across restarts).
    pub async fn start_with_args(bin: &str, dir: &Path, n: u64, args: &[String]) -> anyhow::Result<Cluster> {
        let addrs = free_addrs(n)?;
        let peers = peer_list(&addrs);
        Self::start_nodes_with(
            bin,
            dir,
            &addrs,
            |_| peers.clone(),
            BTreeMap::new(),
            NodeOptions::default(),
            args,
        )
    }

    /// Starts `n` brokers with a [`UdpProxy`] on every directed path `i -> j`: broker `i`'s
    /// `--peers` names itself at its listen address and every other broker `j` at the proxy
    /// `(i, j)` (peer links identify a broker by its certificate, so that works). Raft traffic
    /// and forwarded requests from `i` to `j` (and their answers) go through that proxy, so
    /// [`Cluster::cut`] and [`Cluster::isolate`] can drop them. Clients still reach every
    /// broker directly.
    pub async fn start_with_proxies(bin: &str, dir: &Path, n: u64) -> anyhow::Result<Cluster> {
        Self::start_with_proxies_seeded(bin, dir, n, 0, false, None).await
    }

    /// As [`start_with_proxies`](Cluster::start_with_proxies), each proxy's RNG (drops,
    /// delays, duplicates, reordering: [`Cluster::set_link`]) seeded from `seed` and its path.
    /// With `sync_ledgers`, broker `id` records its fsyncs in `<dir>/node-<id>.synced.ledger`
    /// (the test-only hook power-loss faults need, docs/faults.md). With `faketime` (the
    /// libfaketime library), broker `id` runs with its wall clock offset by what
    /// `<dir>/node-<id>.clock` says ([`FakeClock`]).
    pub async fn start_with_proxies_seeded(
        bin: &str,
        dir: &Path,
        n: u64,
        seed: u64,
        sync_ledgers: bool,
        faketime: Option<&Path>,
    ) -> anyhow::Result<Cluster> {
        let addrs = free_addrs(n)?;
        let mut proxies = BTreeMap::new();
        for from in 0..addrs.len() {
            for (to, &addr) in addrs.iter().enumerate() {
                if from != to {
                    let path_seed = faults::rng::Rng::derive(seed, (from * 64 + to) as u64 + 1);
                    proxies.insert((from, to), UdpProxy::start_seeded(addr, path_seed).await?);
                }
            }
        }
        let peers_of = |from: usize| {
            let via = addrs.iter().enumerate().map(|(to, &addr)| match proxies.get(&(from, to)) {
                Some(p) => p.addr,
                None => addr,
            });
            peer_list(&via.collect::<Vec<_>>())
        };
        let peers: Vec<String> = (0..addrs.len()).map(peers_of).collect();
        let opts =
            NodeOptions { sync_ledgers, faketime: faketime.map(Path::to_path_buf), ..NodeOptions::default() };
        Self::start_nodes(bin, dir, &addrs, |i| peers[i].clone(), proxies, opts)
    }

    fn start_nodes(
        bin: &str,
        dir: &Path,
        addrs: &[SocketAddr],
        peers_of: impl Fn(usize) -> String,
        proxies: BTreeMap<(usize, usize), UdpProxy>,
        opts: NodeOptions,
    ) -> anyhow::Result<Cluster> {
        Self::start_nodes_with(bin, dir, addrs, peers_of, proxies, opts, &[])
    }

    fn start_nodes_with(
        bin: &str,
        dir: &Path,
        addrs: &[SocketAddr],
        peers_of: impl Fn(usize) -> String,
        proxies: BTreeMap<(usize, usize), UdpProxy>,
        opts: NodeOptions,
        args: &[String],
    ) -> anyhow::Result<Cluster> {
        let ca_dir = dir.join("ca");
        let mut nodes = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let id = i as u64 + 1;
            let data = dir.join(format!("node-{id}"));
            let mut extra = args.to_vec();
            let listen = if opts.metrics { Some(free_tcp_port_addr()?) } else { None };
            if let Some(l) = listen {
                extra.extend(["--metrics-listen".to_string(), l.to_string()]);
            }
            let mut node = BrokerProcess::node(bin, &data, id, *addr, &peers_of(i), &ca_dir, &extra)?;
            node.metrics = listen;
            if opts.sync_ledgers {
                node.sync_ledger = Some(dir.join(format!("node-{id}.synced.ledger")));
            }
            if let Some(lib) = &opts.faketime {
                let clock = FakeClock { lib: lib.clone(), file: dir.join(format!("node-{id}.clock")) };
                clock.set(0)?;
                node.clock = Some(clock);
            }
            node.spawn_process()?;
            nodes.push(node);
        }
        Ok(Cluster { nodes, ca: ca_dir.join("ca.pem"), proxies, retired: Default::default() })
    }

    /// Sets the proxy on the path `from -> to` (node indexes); a no-op without proxies.
    pub fn cut(&self, from: usize, to: usize, mode: Mode) {
        if let Some(p) = self.proxies.get(&(from, to)) {
            p.set(mode);
        }
    }

    /// What happens to every datagram broker `from` sends to broker `to` (node indexes): on
    /// the proxy `(from, to)` those are the requests going up, on the proxy `(to, from)` the
    /// answers coming back down. A no-op without proxies.
    pub fn set_link(&self, from: usize, to: usize, faults: LinkFaults) {
        if let Some(p) = self.proxies.get(&(from, to)) {
            p.set_up(faults);
        }
        if let Some(p) = self.proxies.get(&(to, from)) {
            p.set_down(faults);
        }
    }

    /// Drops everything between node `i` and every other broker, both ways (its clients still
    /// reach it).
    pub fn isolate(&self, i: usize) {
        for (&(from, to), p) in &self.proxies {
            if from == i || to == i {
                p.set(Mode::DropAll);
            }
        }
    }

    /// Lets every broker-to-broker path through again.
    pub fn heal(&self) {
        for p in self.proxies.values() {
            p.set(Mode::Pass);
        }
    }

    /// Adds broker `id` (the next node index + 1, ids are never reused) at a free loopback
    /// port: `add-broker` through `admin`, then the process started with `--join` naming every
    /// running broker. Its paths to the others have no proxies. Returns its node index.
    pub async fn add_broker(&mut self, admin: &Client, within: Duration) -> anyhow::Result<usize> {
        let index = self.nodes.len();
        let id = index as u32 + 1;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse()?;
        let deadline = Instant::now() + within;
        loop {
            match admin.admin().add_broker(id, &addr.to_string()).await {
                Ok(()) => break,
                // An earlier attempt that timed out was carried out after all.
                Err(e) if e.to_string().contains(&format!("broker {id} is already in the cluster")) => break,
                Err(e) if Instant::now() < deadline && e.is_retriable() => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Err(e) => bail!("adding broker {id}: {e}"),
            }
        }
        let first = &self.nodes[0];
        let dir = first.data_dir.parent().context("a node's data dir has a parent")?.to_path_buf();
        let ca_dir = self.ca.parent().context("the CA has a directory")?.to_path_buf();
        let join: Vec<String> = self.members().into_iter().map(|i| self.nodes[i].addr.to_string()).collect();
        let bin = first.bin.display().to_string();
        let node = BrokerProcess::start_joining_any(
            &bin,
            &dir.join(format!("node-{id}")),
            u64::from(id),
            addr,
            &join.join(","),
            &ca_dir,
        )?;
        self.nodes.push(node);
        Ok(index)
    }

    /// Removes broker `index + 1` (retrying while another change is under way), waits until
    /// no running broker places a replica on it (at most `within`), then stops it for good.
    /// Returns whether its replicas all moved away in time.
    pub async fn remove_broker(
        &mut self,
        admin: &Client,
        index: usize,
        within: Duration,
    ) -> anyhow::Result<bool> {
        let id = index as u32 + 1;
        let deadline = Instant::now() + within;
        loop {
            match admin.admin().remove_broker(id).await {
                Ok(()) => break,
                Err(e) if e.to_string().contains(&format!("no broker {id} in this cluster")) => break,
                Err(e) if Instant::now() < deadline && e.is_retriable() => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Err(e) => bail!("removing broker {id}: {e}"),
            }
        }
        let others: Vec<usize> = self.members().into_iter().filter(|i| *i != index).collect();
        let moved = loop {
            let mut placed = false;
            for &i in &others {
                match self.status_of(i).await {
                    Ok(status) => placed |= status.partitions.iter().any(|p| p.replicas.contains(&id)),
                    Err(_) => placed = true, // cannot tell yet
                }
            }
            if !placed {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let _ = self.nodes[index].terminate().await;
        self.retired.insert(index);
        Ok(moved)
    }

    /// Node indexes of the brokers not removed.
    pub fn members(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| !self.retired.contains(i)).collect()
    }

    /// The node index of broker `id` (ids start at 1).
    pub fn index_of(&self, id: u32) -> usize {
        (id as usize).saturating_sub(1)
    }

    /// `host:port,host:port,...` of every broker.
    pub fn brokers(&self) -> String {
        self.nodes.iter().map(|n| n.addr.to_string()).collect::<Vec<_>>().join(",")
    }

    /// A client given every broker (it uses the first that answers).
    pub async fn client(&self) -> anyhow::Result<Client> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut cfg = ClientConfig::new(self.brokers(), &self.ca);
            cfg.connect_timeout = Duration::from_secs(2);
            match Client::connect(cfg).await {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => bail!("no broker of the cluster answered: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// A client of broker `i` (0-based) alone.
    pub async fn client_of(&self, i: usize) -> anyhow::Result<Client> {
        let mut cfg = ClientConfig::new(self.nodes[i].addr.to_string(), &self.ca);
        cfg.connect_timeout = Duration::from_secs(5);
        Ok(Client::connect(cfg).await?)
    }

    /// A client given the brokers `order` (node indexes) in that order: it connects to the
    /// first that answers, and after a loss to the next in the list. `tweak` adjusts the
    /// config (timeouts) first.
    pub async fn client_in_order(
        &self,
        order: &[usize],
        tweak: impl FnOnce(ClientConfig) -> ClientConfig,
    ) -> anyhow::Result<Client> {
        let brokers = order.iter().map(|&i| self.nodes[i].addr.to_string());
        let cfg = tweak(ClientConfig::new("", &self.ca).with_brokers(brokers));
        Ok(Client::connect(cfg).await?)
    }

    /// Broker `i`'s own view of the cluster (one quick attempt: a dead or isolated broker is
    /// an error within a few seconds, not after the SDK's retries).
    pub async fn status_of(&self, i: usize) -> anyhow::Result<quiver_client::ClusterStatus> {
        let cfg = ClientConfig::new(self.nodes[i].addr.to_string(), &self.ca)
            .with_connect_timeout(Duration::from_secs(1))
            .with_request_timeout(Duration::from_secs(2));
        let client = Client::connect(cfg).await?;
        let status = client.admin().cluster_status().await;
        client.close().await;
        Ok(status?)
    }

    /// Broker `i`'s view of `topic`/`partition`: (leader id, commit index, high watermark).
    pub async fn partition_of(&self, i: usize, topic: &str, partition: u32) -> anyhow::Result<ReplicaView> {
        let cfg = ClientConfig::new(self.nodes[i].addr.to_string(), &self.ca)
            .with_connect_timeout(Duration::from_secs(1))
            .with_request_timeout(Duration::from_secs(2));
        let client = Client::connect(cfg).await?;
        let (status, info) =
            (client.admin().cluster_status().await, client.admin().describe_topic(topic).await);
        client.close().await;
        let (status, info) = (status?, info?);
        let r = status
            .partitions
            .iter()
            .find(|r| r.topic == topic && r.partition == partition)
            .with_context(|| format!("broker {} has no replica of {topic}/{partition}", i + 1))?;
        let p = info
            .partitions
            .iter()
            .find(|p| p.partition == partition)
            .with_context(|| format!("broker {} does not describe {topic}/{partition}", i + 1))?;
        Ok(ReplicaView {
            leader: r.leader,
            epoch: r.epoch,
            commit: r.commit,
            high_watermark: p.high_watermark,
            in_sync: r.in_sync.clone(),
        })
    }

    /// Waits until the brokers `nodes` agree on a leader of `topic`/`partition` that is one of
    /// them, and returns its id.
    pub async fn agreed_leader(
        &self,
        nodes: &[usize],
        topic: &str,
        partition: u32,
        within: Duration,
    ) -> anyhow::Result<u32> {
        let deadline = Instant::now() + within;
        loop {
            let mut seen = Vec::new();
            for &i in nodes {
                seen.push(self.partition_of(i, topic, partition).await.ok().and_then(|v| v.leader));
            }
            match seen.first().copied().flatten() {
                Some(l) if seen.iter().all(|s| *s == Some(l)) && nodes.contains(&self.index_of(l)) => {
                    return Ok(l)
                }
                _ if Instant::now() > deadline => {
                    bail!("brokers {nodes:?} did not agree on a leader of {topic}/{partition} within {within:?}: {seen:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Waits until every broker knows `topic`. A create is answered once the broker that took
    /// it applied it; another may apply it later (one whose link to the controller's leader
    /// is still coming up), and until then it answers `UnknownTopic`, which clients take as
    /// final. Tests that move clients between brokers wait for this first.
    pub async fn topic_everywhere(&self, topic: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        for i in 0..self.nodes.len() {
            while let Err(e) = self.partition_of(i, topic, 0).await {
                if Instant::now() > deadline {
                    bail!("broker {} does not know {topic} after {within:?}: {e}", i + 1);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Waits until broker `i`'s commit of `topic`/`partition` reaches `commit` and it follows
    /// `leader`.
    pub async fn caught_up(
        &self,
        i: usize,
        leader: u32,
        topic: &str,
        partition: u32,
        commit: u64,
        within: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let view = self.partition_of(i, topic, partition).await;
            match &view {
                Ok(v) if v.leader == Some(leader) && v.commit >= commit => return Ok(()),
                _ if Instant::now() > deadline => {
                    bail!("broker {} did not reach commit {commit} under leader {leader} within {within:?}: {view:?}", i + 1)
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Waits until every broker serves the same high watermark for `topic`/`partition`, and
    /// it has stayed so for a moment (a producer has stopped); returns it.
    pub async fn settled_high_watermark(
        &self,
        topic: &str,
        partition: u32,
        within: Duration,
    ) -> anyhow::Result<u64> {
        let deadline = Instant::now() + within;
        let mut last = None;
        loop {
            let mut hws = Vec::new();
            for i in self.members() {
                hws.push(self.partition_of(i, topic, partition).await.ok().map(|v| v.high_watermark));
            }
            let same = hws.first().copied().flatten().filter(|&h| hws.iter().all(|x| *x == Some(h)));
            if let Some(h) = same {
                if last == Some(h) {
                    return Ok(h);
                }
            }
            if Instant::now() > deadline {
                bail!("the brokers' high watermarks of {topic}/{partition} did not settle within {within:?}: {hws:?}");
            }
            last = same;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Every value in `topic`, read from broker `node` (0-based) alone from the earliest
    /// offset: `expect` of them, and an error if it serves fewer within 20 s of each other or
    /// one more within half a second after.
    pub async fn read_all_from(
        &self,
        node: usize,
        topic: &str,
        expect: usize,
    ) -> anyhow::Result<Vec<String>> {
        use futures::StreamExt;
        use quiver_client::{Consumer, ConsumerConfig, StartPosition};
        let client = self.client_of(node).await?;
        let mut consumer =
            Consumer::subscribe(client.clone(), ConsumerConfig::new(topic).start(StartPosition::Earliest))
                .await?;
        let mut out = Vec::new();
        while out.len() < expect {
            let m = tokio::time::timeout(Duration::from_secs(20), consumer.next())
                .await
                .map_err(|_| anyhow::anyhow!("broker {} served {} of {expect}", node + 1, out.len()))?
                .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
            m.ack();
            out.push(String::from_utf8(m.value.to_vec())?);
        }
        if let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
            bail!("broker {} served an extra message {:?}", node + 1, m.value);
        }
        client.close().await;
        Ok(out)
    }

    /// `n` brokers and one topic every broker knows, with a client of the cluster: the set-up
    /// of most cluster tests.
    pub async fn start_with_topic(
        bin: &str,
        dir: &Path,
        n: u64,
        topic: &str,
        partitions: u32,
        replicas: u16,
    ) -> anyhow::Result<(Cluster, Client)> {
        let cluster = Cluster::start(bin, dir, n).await?;
        let admin = cluster.client().await?;
        cluster.create_topic(&admin, topic, partitions, replicas).await?;
        cluster.topic_everywhere(topic, Duration::from_secs(20)).await?;
        Ok((cluster, admin))
    }

    /// Creates a topic, retrying while the cluster elects its controller.
    pub async fn create_topic(
        &self,
        client: &Client,
        name: &str,
        partitions: u32,
        replicas: u16,
    ) -> anyhow::Result<()> {
        let config = quiver_client::TopicConfig::default().with_replicas(replicas);
        self.create_topic_with(client, name, partitions, config).await
    }

    /// As [`create_topic`](Cluster::create_topic), with the whole topic configuration.
    pub async fn create_topic_with(
        &self,
        client: &Client,
        name: &str,
        partitions: u32,
        config: quiver_client::TopicConfig,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut retried = false;
        loop {
            match client.admin().create_topic(name, partitions, config.clone()).await {
                Ok(()) => return Ok(()),
                // An earlier attempt went through after all (its answer was lost).
                Err(quiver_client::ClientError::Broker {
                    code: quiver_protocol::ErrorCode::TopicExists,
                    ..
                }) if retried => return Ok(()),
                Err(e) if Instant::now() > deadline => bail!("creating {name}: {e}"),
                Err(_) => {
                    retried = true;
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
            }
        }
    }
}

/// What every node of a [`Cluster`] is started with, beyond its address and peers.
#[derive(Debug, Clone, Default)]
struct NodeOptions {
    /// `--metrics-listen` on a free loopback TCP port.
    metrics: bool,
    /// `QUIVER_TEST_SYNC_LEDGER` at `<dir>/node-<id>.synced.ledger`.
    sync_ledgers: bool,
    /// libfaketime, a clock file per broker at `<dir>/node-<id>.clock`.
    faketime: Option<PathBuf>,
}

/// The `host:port` of `n` free loopback UDP ports.
fn free_addrs(n: u64) -> anyhow::Result<Vec<SocketAddr>> {
    Ok((0..n).map(|_| format!("127.0.0.1:{}", free_udp_port()).parse()).collect::<Result<_, _>>()?)
}

/// `1@a,2@b,...`: broker `i + 1` at `addrs[i]`.
fn peer_list(addrs: &[SocketAddr]) -> String {
    addrs.iter().enumerate().map(|(i, a)| format!("{}@{a}", i + 1)).collect::<Vec<_>>().join(",")
}

/// One broker's view of one replicated partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaView {
    pub leader: Option<u32>,
    pub epoch: u64,
    /// The Raft commit index.
    pub commit: u64,
    /// The offset consumers read up to on this broker.
    pub high_watermark: u64,
    /// Known on the leader only.
    pub in_sync: Vec<u32>,
}

/// Every data record of `topic`/`partition` that `client`'s broker serves, as (offset,
/// value), by raw fetches from offset 0 up to the high watermark it answers (control batches,
/// Raft's own entries, skipped). Fails if a fetch returns a record at or past the high
/// watermark it reported (reads never go beyond the commit, docs/replication.md §5.5), if
/// offsets go back, or if a batch fails its CRC.
pub async fn read_partition(
    client: &Client,
    topic: &str,
    partition: u32,
) -> anyhow::Result<Vec<(u64, Bytes)>> {
    use quiver_protocol::batch::{Batches, RecordIter};
    use quiver_protocol::message::Message;
    let mut out: Vec<(u64, Bytes)> = Vec::new();
    let mut offset = 0u64;
    loop {
        let fetch = Message::Fetch { topic: topic.into(), partition, offset, max_bytes: 1 << 20 };
        let (hw, batches) = match client.request(&fetch).await? {
            Message::FetchOk { high_watermark, batches, .. } => (high_watermark, batches),
            other => bail!("expected FetchOk for {topic}/{partition} at {offset}, got kind {}", other.kind()),
        };
        if offset >= hw {
            return Ok(out);
        }
        let mut next = offset;
        for span in Batches::new(&batches).checking_crc() {
            let span = span.with_context(|| format!("fetch of {topic}/{partition} at {offset}"))?;
            let h = span.header;
            anyhow::ensure!(
                h.next_offset() <= hw,
                "a fetch at {offset} served a batch up to {} past the high watermark {hw}",
                h.next_offset()
            );
            next = next.max(h.next_offset());
            if h.is_control() {
                continue;
            }
            let whole = batches.slice(span.range());
            for r in RecordIter::new(whole, h) {
                let r = r?;
                if r.offset < offset {
                    continue; // the batch began before the offset asked for
                }
                if let Some(&(last, _)) = out.last() {
                    anyhow::ensure!(r.offset > last, "offset {} served after {last}", r.offset);
                }
                out.push((r.offset, r.value));
            }
        }
        anyhow::ensure!(next > offset, "a fetch at {offset} below the high watermark {hw} returned nothing");
        offset = next;
    }
}
