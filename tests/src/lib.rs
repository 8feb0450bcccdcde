//! Harness for end-to-end tests: broker processes on ephemeral loopback ports with their own
//! temp data directories, SIGKILL and restart, and small helpers. Everything is real: the
//! `quiverd` code in a child process, QUIC with TLS on 127.0.0.1, files on disk.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use quiver_broker::{Broker, BrokerConfig};
use quiver_client::{Client, ClientConfig};

pub mod proxy;

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
        std::fs::create_dir_all(data_dir)?;
        let mut b = BrokerProcess {
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
        };
        b.spawn_process()?;
        Ok(b)
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
        cmd.env("QUIVER_LOG", "info").stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
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
                if let Ok(c) = self.try_client(Duration::from_millis(500)).await {
                    c.close().await;
                    return Ok(());
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
/// own data directory under one temp dir.
#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<BrokerProcess>,
    pub ca: PathBuf,
}

impl Cluster {
    /// Starts `n` brokers (ids 1..=n) and waits until a topic can be created through them.
    pub async fn start(bin: &str, dir: &Path, n: u64) -> anyhow::Result<Cluster> {
        Self::start_with(bin, dir, n, false).await
    }

    /// As [`start`](Cluster::start), each broker also serving Prometheus metrics on a free
    /// loopback TCP port (`--metrics-listen`, in [`BrokerProcess::metrics`]).
    pub async fn start_with_metrics(bin: &str, dir: &Path, n: u64) -> anyhow::Result<Cluster> {
        Self::start_with(bin, dir, n, true).await
    }

    async fn start_with(bin: &str, dir: &Path, n: u64, metrics: bool) -> anyhow::Result<Cluster> {
        let addrs: Vec<SocketAddr> =
            (0..n).map(|_| format!("127.0.0.1:{}", free_udp_port()).parse()).collect::<Result<_, _>>()?;
        let peers: Vec<String> = addrs.iter().enumerate().map(|(i, a)| format!("{}@{a}", i + 1)).collect();
        let peers = peers.join(",");
        let ca_dir = dir.join("ca");
        let mut nodes = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let id = i as u64 + 1;
            let node = if metrics {
                let listen = free_tcp_port_addr()?;
                let mut node = BrokerProcess::start_node_with(
                    bin,
                    &dir.join(format!("node-{id}")),
                    id,
                    *addr,
                    &peers,
                    &ca_dir,
                    &["--metrics-listen".to_string(), listen.to_string()],
                )?;
                node.metrics = Some(listen);
                node
            } else {
                BrokerProcess::start_node(bin, &dir.join(format!("node-{id}")), id, *addr, &peers, &ca_dir)?
            };
            nodes.push(node);
        }
        Ok(Cluster { nodes, ca: ca_dir.join("ca.pem") })
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

    /// Creates a topic, retrying while the cluster elects its controller.
    pub async fn create_topic(
        &self,
        client: &Client,
        name: &str,
        partitions: u32,
        replicas: u16,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let config = quiver_client::TopicConfig::default().with_replicas(replicas);
        loop {
            match client.admin().create_topic(name, partitions, config.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => bail!("creating {name}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}
