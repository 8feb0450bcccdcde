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
    /// UDP address to listen on [default: 127.0.0.1:7420]
    #[arg(long, env = "QUIVER_LISTEN")]
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

async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => BrokerConfig::from_toml_file(path)?,
        None => BrokerConfig::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
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
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        token.cancel();
    });
    broker.stopped().await;
    Ok(())
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
