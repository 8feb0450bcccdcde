//! `quiverd`: the Quiver broker. With no flags it serves a single node on 127.0.0.1:7420 with
//! data (and a generated development certificate) under `~/.quiver/data`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use quiver_broker::{Broker, BrokerConfig};

#[derive(Parser)]
#[command(name = "quiverd", version, about = "The Quiver event broker")]
struct Args {
    /// Data directory [default: ~/.quiver/data]
    #[arg(long, env = "QUIVER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// UDP address to listen on, HOST:PORT (a name resolves to its first IPv4 address, else its
    /// first) [default: 127.0.0.1:7420]
    #[arg(long, env = "QUIVER_LISTEN", value_parser = resolve_listen)]
    listen: Option<SocketAddr>,
    /// Serve Prometheus metrics and /healthz over HTTP on this TCP address (off by default).
    #[arg(long, env = "QUIVER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// TOML configuration file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Server certificate chain (PEM); with --tls-key. Without them a development CA is generated.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that signs broker certificates: accept broker-to-broker links
    /// (mutual TLS) from brokers it signed; needs --tls-cert/--tls-key.
    #[arg(long, env = "QUIVER_TLS_CA", value_name = "FILE", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Directory of a development CA shared by a cluster's brokers: the first creates
    /// DIR/ca.pem and DIR/ca.key, each issues its own certificate from it. Clients trust
    /// DIR/ca.pem. Not with --tls-cert.
    #[arg(long, env = "QUIVER_DEV_CA", value_name = "DIR", conflicts_with = "tls_cert")]
    dev_ca: Option<PathBuf>,
    /// Authenticate clients by certificate: those signed by this CA (PEM) act as their
    /// certificate's subject common name (docs/security.md). Turns authentication on.
    #[arg(long, env = "QUIVER_CLIENT_CA", value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// Authenticate clients by token: a file of `<principal> sha256:<hex> [expires=<unix
    /// seconds>]` lines (`quiverd token NAME --file FILE` adds one), read again when it
    /// changes. Turns authentication on.
    #[arg(long, env = "QUIVER_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// With authentication on, let clients without credentials in as the principal `anonymous`
    /// (ACLs apply to it); with it off, needed to listen beyond loopback.
    #[arg(long, env = "QUIVER_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,
    /// Principals allowed everything whatever the ACLs say (the first administrators),
    /// comma-separated.
    #[arg(long, env = "QUIVER_SUPER_USERS", value_delimiter = ',', value_name = "NAME,...")]
    super_users: Option<Vec<String>>,
    /// A principal's byte-rate quota (`*` for every principal without its own; `anonymous`
    /// with authentication off): NAME:produce=BYTES_PER_SEC,consume=BYTES_PER_SEC (either
    /// part may be left out). Repeat for several principals.
    #[arg(long, value_name = "NAME:produce=N,consume=N", value_parser = parse_quota)]
    quota: Vec<(String, quiver_broker::config::Quota)>,
    /// This broker's id in a cluster (with --peers, or --join).
    #[arg(long, env = "QUIVER_NODE_ID")]
    node_id: Option<u64>,
    /// Join the running cluster of which HOST:PORT is a broker (several: comma-separated, the
    /// first that answers), as broker --node-id at --listen (add it first: `quiver cluster
    /// add-broker ID@HOST:PORT`). With an empty --data-dir the first time; at a restart the
    /// brokers it knew are used when none of these answers.
    #[arg(
        long,
        env = "QUIVER_JOIN",
        value_name = "HOST:PORT,...",
        value_delimiter = ',',
        requires = "node_id",
        requires = "listen",
        conflicts_with = "peers"
    )]
    join: Option<Vec<SocketAddr>>,
    /// Every broker of the cluster, this one included: ID@HOST:PORT,ID@HOST:PORT,...
    /// (static voters; each address is that broker's --listen).
    #[arg(long, env = "QUIVER_PEERS", requires = "node_id")]
    peers: Option<String>,
    /// Stop gracefully once the process that started this one is gone (`dev-cluster`'s
    /// brokers: a supervisor killed with SIGKILL does not leave them running).
    #[arg(long, hide = true)]
    stop_with_parent: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Starts a local cluster of brokers (one process each) on 127.0.0.1 and prints how to
    /// point the CLI at it; stops them on Ctrl-C.
    DevCluster {
        /// How many brokers.
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Where their data (node-1, node-2, ...) and the shared development CA (ca/) go.
        #[arg(long)]
        data_dir: PathBuf,
        /// Broker N listens on UDP 127.0.0.1:(base-port + N).
        #[arg(long, default_value_t = 7430)]
        base_port: u16,
        /// Further flags for every broker, after `--` (e.g. `-- --token-file tokens
        /// --super-users admin`, or `--client-ca <data-dir>/ca/ca.pem`).
        #[arg(last = true, value_name = "BROKER_FLAGS")]
        broker_flags: Vec<String>,
    },
    /// Creates a token for a principal: adds its hash to the token file (created if missing,
    /// mode 0600) and prints the token once. Brokers reading that file with --token-file accept
    /// it at once.
    Token {
        /// The principal the token authenticates.
        principal: String,
        /// The token file (the brokers' --token-file).
        #[arg(long)]
        file: PathBuf,
        /// Days until it expires (never, when not given).
        #[arg(long)]
        valid_days: Option<u64>,
    },
    /// Issues a development client certificate for a principal (its common name), signed by
    /// the development CA of --data-dir (or of --dev-ca DIR): writes NAME.pem and NAME.key into
    /// --out. Start the broker with --client-ca pointing at that CA's ca.pem.
    ClientCert {
        principal: String,
        /// Where NAME.pem and NAME.key go.
        #[arg(long)]
        out: PathBuf,
        /// The broker's data directory, whose tls/ca.pem and tls/ca.key sign it [default:
        /// ~/.quiver/data]
        #[arg(long, env = "QUIVER_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// A cluster's development CA directory (its ca.pem and ca.key) instead.
        #[arg(long, value_name = "DIR", conflicts_with = "data_dir")]
        dev_ca: Option<PathBuf>,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUIVER_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    // Test-only (docs/faults.md, "Power loss"): read once, before any file is opened.
    match quiver_broker::storage::ledger::init() {
        Ok(Some(path)) => tracing::warn!(
            ledger = %path.display(),
            "{} is set: recording every fsync for a fault harness (a test-only hook)",
            quiver_broker::storage::ledger::ENV
        ),
        Ok(None) => {}
        Err(e) => {
            eprintln!("error: opening the sync ledger named by {}: {e}", quiver_broker::storage::ledger::ENV);
            std::process::exit(1);
        }
    }
    // Partitions hold files open (docs/design.md §5.7): take what the hard limit allows.
    match quiver_broker::open_files::raise_limit() {
        Ok((before, after)) if after > before => {
            tracing::info!(before, after, "raised the open-file limit (RLIMIT_NOFILE) to the hard limit")
        }
        Ok((_, limit)) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!("could not raise the open-file limit: {e}"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// `--quota NAME:produce=N,consume=N`.
fn parse_quota(s: &str) -> Result<(String, quiver_broker::config::Quota), String> {
    let (name, rates) = s.split_once(':').ok_or("expected NAME:produce=N,consume=N")?;
    let mut quota = quiver_broker::config::Quota::default();
    for part in rates.split(',').filter(|p| !p.is_empty()) {
        let (key, value) =
            part.split_once('=').ok_or_else(|| format!("'{part}': expected produce=N or consume=N"))?;
        let n: u64 = value.parse().map_err(|_| format!("'{value}': bytes per second, a whole number"))?;
        match key {
            "produce" => quota.produce_bytes_per_sec = Some(n),
            "consume" => quota.consume_bytes_per_sec = Some(n),
            other => return Err(format!("'{other}': produce or consume")),
        }
    }
    Ok((name.to_string(), quota))
}

/// `HOST:PORT` for `--listen`: an address, or a name resolved now.
fn resolve_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(s)
        .map_err(|e| format!("'{s}' is not HOST:PORT ({e}), e.g. 127.0.0.1:7420"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("'{s}' resolves to no address"))
}

/// `~` or `~/...` with the home directory in place of `~`; any other path as it is.
fn expand_home(path: &std::path::Path) -> PathBuf {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => path.to_path_buf(),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Some(Command::DevCluster { nodes, data_dir, base_port, broker_flags }) => {
            return dev_cluster(nodes, &data_dir, base_port, &broker_flags).await
        }
        Some(Command::Token { principal, file, valid_days }) => {
            return add_token(&principal, &file, valid_days)
        }
        Some(Command::ClientCert { principal, out, data_dir, dev_ca }) => {
            let ca_dir = match (dev_ca.or(args.dev_ca), data_dir.or(args.data_dir)) {
                (Some(dir), _) => expand_home(&dir),
                (None, Some(d)) => expand_home(&d).join("tls"),
                (None, None) => expand_home(&BrokerConfig::default().data_dir).join("tls"),
            };
            return client_cert(&principal, &ca_dir, &out);
        }
        None => {}
    }
    let mut config = match &args.config {
        Some(path) => BrokerConfig::from_toml_file(path)?,
        None => BrokerConfig::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    // A config file or a quoted environment variable gets no shell to expand `~`.
    config.data_dir = expand_home(&config.data_dir);
    let listen_given = args.listen.is_some();
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if args.metrics_listen.is_some() {
        config.metrics_listen = args.metrics_listen;
    }
    if args.tls_cert.is_some() {
        config.tls_cert = args.tls_cert;
        config.tls_key = args.tls_key;
    }
    if args.tls_ca.is_some() {
        config.tls_ca = args.tls_ca;
    }
    if args.dev_ca.is_some() {
        config.dev_ca = args.dev_ca;
    }
    if args.client_ca.is_some() {
        config.client_ca = args.client_ca.map(|p| expand_home(&p));
    }
    if args.token_file.is_some() {
        config.token_file = args.token_file.map(|p| expand_home(&p));
    }
    config.allow_anonymous |= args.allow_anonymous;
    config.quotas.extend(args.quota);
    if let Some(users) = args.super_users {
        config.super_users = users;
    }
    if args.node_id.is_some() && args.peers.is_none() && args.join.is_none() {
        anyhow::bail!("--node-id needs --peers (a new cluster) or --join HOST:PORT (a running one)");
    }
    if let (Some(id), Some(join)) = (args.node_id, args.join.clone()) {
        config.broker_id = u32::try_from(id).context("--node-id must fit 32 bits")?;
        config.cluster = Some(quiver_broker::cluster::ClusterConfig::joining(id, config.listen, join));
        anyhow::ensure!(
            config.dev_ca.is_some() || config.tls_ca.is_some(),
            "brokers of a cluster authenticate each other: give --dev-ca DIR (the same DIR as the \
             cluster's brokers) or --tls-cert/--tls-key with --tls-ca"
        );
    }
    if let (Some(id), Some(peers)) = (args.node_id, &args.peers) {
        let cluster = quiver_broker::cluster::ClusterConfig::parse(id, peers)
            .map_err(|e| anyhow::anyhow!("--peers: {e}"))?;
        config.broker_id = u32::try_from(id).context("--node-id must fit 32 bits")?;
        // A broker listens where its peers reach it: its own --peers entry, unless told.
        let own = cluster.peers[&id];
        if !listen_given {
            config.listen = own;
        } else if config.listen != own {
            tracing::warn!(listen = %config.listen, peers_entry = %own, "--listen differs from this broker's own --peers entry: peers dial the --peers address");
        }
        config.cluster = Some(cluster);
        anyhow::ensure!(
            config.dev_ca.is_some() || config.tls_ca.is_some(),
            "brokers of a cluster authenticate each other: give --dev-ca DIR (the same DIR to every \
             broker) or --tls-cert/--tls-key with --tls-ca"
        );
    }
    let broker = Broker::start(config.clone()).await.context("starting the broker")?;
    match broker.ca_path() {
        Some(ca) => tracing::info!(
            listen = %broker.local_addr(),
            data_dir = %config.data_dir.display(),
            ca = %ca.display(),
            "quiverd {} ready (clients trust the development CA at {})",
            env!("CARGO_PKG_VERSION"),
            ca.display()
        ),
        None => {
            tracing::info!(listen = %broker.local_addr(), data_dir = %config.data_dir.display(), "quiverd ready")
        }
    }
    if let Some(m) = broker.metrics_addr() {
        tracing::info!("metrics at http://{m}/metrics, liveness at http://{m}/healthz");
    }
    let token = broker.shutdown_token();
    let stop_with_parent = args.stop_with_parent;
    tokio::spawn(async move {
        tokio::select! {
            _ = wait_for_signal() => tracing::info!("shutting down"),
            _ = parent_gone(), if stop_with_parent => tracing::info!("the process that started this broker is gone; shutting down"),
        }
        token.cancel();
    });
    broker.stopped().await;
    Ok(())
}

/// `quiverd token`: a new token for `principal`, its hash appended to `file`.
fn add_token(principal: &str, file: &std::path::Path, valid_days: Option<u64>) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    anyhow::ensure!(valid_days != Some(0), "--valid-days 0 would make a token that has already expired");
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let expires = match valid_days {
        Some(days) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
            Some(now + days.saturating_mul(86_400))
        }
        None => None,
    };
    let (token, line) = quiver_broker::auth::new_token(principal, expires)?;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("opening {}", file.display()))?;
    writeln!(f, "{line}")
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", file.display()))?;
    eprintln!("added a token for '{principal}' to {}; it is shown once:", file.display());
    println!("{token}");
    Ok(())
}

/// `quiverd client-cert`: a client certificate for `principal` from the development CA in
/// `ca_dir` (its ca.pem and ca.key).
fn client_cert(principal: &str, ca_dir: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let (ca, key) = (ca_dir.join("ca.pem"), ca_dir.join("ca.key"));
    anyhow::ensure!(
        ca.exists() && key.exists(),
        "no development CA in {} (ca.pem and ca.key): start a broker with that data directory (or --dev-ca) once to generate it",
        ca_dir.display()
    );
    let (cert_pem, key_pem) = quiver_broker::tls::issue_client_certificate(&ca, &key, principal, None)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let stem = principal.replace(['/', '\\'], "_");
    let (cert_path, key_path) = (out.join(format!("{stem}.pem")), out.join(format!("{stem}.key")));
    std::fs::write(&cert_path, cert_pem).with_context(|| format!("writing {}", cert_path.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)
        .with_context(|| format!("writing {}", key_path.display()))?;
    std::io::Write::write_all(&mut f, key_pem.as_bytes())?;
    eprintln!(
        "wrote {} and {} (principal '{principal}'); brokers accept it with --client-ca {}",
        cert_path.display(),
        key_path.display(),
        ca.display()
    );
    Ok(())
}

/// `quiverd dev-cluster`: N brokers as child processes of this binary, sharing a development CA.
async fn dev_cluster(
    nodes: u32,
    data_dir: &std::path::Path,
    base_port: u16,
    broker_flags: &[String],
) -> anyhow::Result<()> {
    anyhow::ensure!((1..=9).contains(&nodes), "--nodes must be 1 to 9");
    let exe = std::env::current_exe().context("finding the quiverd binary")?;
    let ca_dir = data_dir.join("ca");
    std::fs::create_dir_all(&ca_dir).with_context(|| format!("creating {}", ca_dir.display()))?;
    let addr = |i: u32| format!("127.0.0.1:{}", u32::from(base_port) + i);
    let peers: Vec<String> = (1..=nodes).map(|i| format!("{i}@{}", addr(i))).collect();
    let peers = peers.join(",");
    let start = |i: u32| {
        std::process::Command::new(&exe)
            .arg("--node-id")
            .arg(i.to_string())
            .arg("--listen")
            .arg(addr(i))
            .arg("--data-dir")
            .arg(data_dir.join(format!("node-{i}")))
            .arg("--peers")
            .arg(&peers)
            .arg("--dev-ca")
            .arg(&ca_dir)
            .arg("--stop-with-parent")
            .args(broker_flags)
            .spawn()
            .with_context(|| format!("starting broker {i}"))
    };
    // A port another process holds would make its broker exit at once, again and again.
    for i in 1..=nodes {
        std::net::UdpSocket::bind(addr(i)).with_context(|| {
            format!("UDP {} is in use (another broker?): pick another --base-port", addr(i))
        })?;
    }
    let mut children = (1..=nodes).map(start).collect::<anyhow::Result<Vec<_>>>()?;
    // One that fails at start (a bad data directory, a port taken meanwhile) stops them all.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let exited: Vec<String> = children
        .iter_mut()
        .enumerate()
        .filter_map(|(i, c)| c.try_wait().ok().flatten().map(|status| format!("broker {} ({status})", i + 1)))
        .collect();
    if !exited.is_empty() {
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        anyhow::bail!("{} exited at start (its log is above); nothing is running", exited.join(", "));
    }
    let brokers: Vec<String> = (1..=nodes).map(addr).collect();
    eprintln!(
        "started {nodes} brokers; point the CLI at them with:\n  export QUIVER_BROKER={} QUIVER_CA={}\n  quiver cluster status\na broker that dies (try kill -9 on a leader) is started again after {} s",
        brokers.join(","),
        ca_dir.join("ca.pem").display(),
        RESTART_AFTER.as_secs()
    );
    // A supervisor: a broker that exits is started again, so failover can be watched.
    let supervise = async {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            for (i, c) in children.iter_mut().enumerate() {
                if let Ok(Some(status)) = c.try_wait() {
                    let id = i as u32 + 1;
                    eprintln!(
                        "broker {id} exited ({status}); starting it again in {} s",
                        RESTART_AFTER.as_secs()
                    );
                    tokio::time::sleep(RESTART_AFTER).await;
                    match start(id) {
                        Ok(child) => *c = child,
                        Err(e) => return e,
                    }
                }
            }
        }
    };
    let failed = tokio::select! {
        _ = wait_for_signal() => None,
        e = supervise => Some(e),
    };
    for c in &children {
        // SIGTERM: a graceful stop (each syncs and closes its logs).
        terminate(c.id());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for c in &mut children {
        while matches!(c.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    failed.map_or(Ok(()), Err)
}

/// Resolves once this process's parent changed (it exited and the process was re-parented).
async fn parent_gone() {
    let parent = std::os::unix::process::parent_id();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if std::os::unix::process::parent_id() != parent {
            return;
        }
    }
}

/// How long `dev-cluster` waits before starting a broker that exited.
const RESTART_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

/// Asks a child broker to stop gracefully (SIGTERM, through kill(1): no unsafe here).
fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
