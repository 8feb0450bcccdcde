//! `quiver`: the command-line client. Errors are one line on stderr and a non-zero exit.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::{FutureExt, StreamExt};
use quiver_client::default_ca_path;
use quiver_client::{
    Acks, BrokerStatus, Client, ClientConfig, Consumer, ConsumerConfig, Durability, Producer, ProducerConfig,
    ProducerRecord, ReplicaStatus, StartPosition, TopicConfig,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

mod bench;

#[derive(Parser)]
#[command(name = "quiver", version, about = "Command-line client for the Quiver event broker")]
struct Cli {
    /// Broker address (host:port, UDP), or several brokers of a cluster separated by commas
    /// (host:port,host:port,...): tried in turn until one answers.
    #[arg(long, global = true, env = "QUIVER_BROKER", default_value_t = format!("127.0.0.1:{}", quiver_client::DEFAULT_PORT))]
    broker: String,
    /// CA certificate (PEM) that signed the broker's certificate [default: ~/.quiver/data/tls/ca.pem]
    #[arg(long, global = true, env = "QUIVER_CA")]
    ca: Option<PathBuf>,
    /// Token to authenticate with, for a broker started with --token-file (prefer the
    /// environment variable: a flag shows in the process list).
    #[arg(long, global = true, env = "QUIVER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Client certificate chain (PEM), for a broker started with --client-ca; with --key.
    /// Before the subcommand (`quiver --cert c.pem --key c.key publish ...`: `publish --key`
    /// is a record's key).
    #[arg(long, env = "QUIVER_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert; before the subcommand.
    #[arg(long, env = "QUIVER_KEY", requires = "cert")]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(TopicCmd),
    /// Publish messages: the arguments, or stdin one message per line.
    Publish(PublishArgs),
    /// Print messages from a topic, one value per line.
    Tail(TailArgs),
    /// Measure throughput and latency (like `nats bench` / `kafka-producer-perf-test`).
    Bench(BenchArgs),
    /// List, describe and reset consumer groups.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Show a consumer group's committed offsets and lag for a topic.
    Offsets {
        group: String,
        #[arg(long)]
        topic: String,
    },
    /// The cluster's brokers and its partitions' replication.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Who may do what (docs/security.md): ACL rules, in force once authentication is on.
    #[command(subcommand)]
    Acl(AclCmd),
    /// The principal the broker takes this client for (its certificate's or token's).
    Whoami,
}

#[derive(Subcommand)]
enum AclCmd {
    /// Allows a principal operations on topics, groups or the cluster.
    Add(AclArgs),
    /// Takes rules away (exactly as added).
    Remove(AclArgs),
    /// Every rule: principal, resource, pattern, operation.
    List {
        /// One JSON object per line: {"principal","resource","pattern","operation"}.
        #[arg(long)]
        json: bool,
        /// Only this principal's rules (`*` rules are listed under `*`).
        #[arg(long)]
        principal: Option<String>,
    },
}

#[derive(Args)]
struct AclArgs {
    /// The principal (a client certificate's common name, a token's owner, `anonymous`), or
    /// `*` for every principal (`anonymous` included where the broker allows it).
    #[arg(long)]
    principal: String,
    /// Topics: a name, a prefix followed by `*`, or `*`.
    #[arg(long, group = "resource", value_name = "PATTERN")]
    topic: Option<String>,
    /// Consumer groups: a name, a prefix followed by `*`, or `*`.
    #[arg(long, group = "resource", value_name = "PATTERN")]
    group: Option<String>,
    /// The cluster (for `admin`: ACL changes and broker membership).
    #[arg(long, group = "resource")]
    cluster: bool,
    /// Operations, comma-separated: produce, consume, commit, create, delete, admin.
    #[arg(long, value_delimiter = ',', required = true)]
    operation: Vec<String>,
}

impl AclArgs {
    fn rules(&self) -> anyhow::Result<Vec<quiver_client::AclRule>> {
        use quiver_client::{AclOperation, AclResource};
        let (resource, pattern) = match (&self.topic, &self.group, self.cluster) {
            (Some(t), _, _) => (AclResource::Topic, t.clone()),
            (_, Some(g), _) => (AclResource::Group, g.clone()),
            (_, _, true) => (AclResource::Cluster, "*".to_string()),
            _ => bail!("name what the rule is for: --topic PATTERN, --group PATTERN or --cluster"),
        };
        self.operation
            .iter()
            .map(|op| {
                let operation = AclOperation::parse(op).ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown operation '{op}': produce, consume, commit, create, delete or admin"
                    )
                })?;
                Ok(quiver_client::AclRule {
                    principal: self.principal.clone(),
                    resource,
                    pattern: pattern.clone(),
                    operation,
                })
            })
            .collect()
    }
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Brokers (id, addr, up) and partitions (topic, partition, leader, epoch, replicas,
    /// in_sync, commit, lag) as the answering broker sees them.
    Status {
        /// One JSON object: {"brokers":[{"id","addr","up"}],"partitions":[{"topic","partition",
        /// "leader","epoch","replicas","in_sync","commit","lag"}]} (leader null when unknown; lag:
        /// entries the replica furthest behind lacks of the leader's log).
        #[arg(long)]
        json: bool,
    },
    /// Adds a broker to the running cluster (then start it with `quiverd --node-id ID --listen
    /// HOST:PORT --join ANY-BROKER --dev-ca DIR`); partitions move to it on their own.
    AddBroker {
        /// ID@HOST:PORT: its id and the address it listens at.
        #[arg(value_name = "ID@HOST:PORT")]
        new_broker: String,
    },
    /// Removes a broker from the cluster: its replicas move to the others (see `cluster
    /// status`); stop it once it holds none.
    RemoveBroker { id: u32 },
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Groups with members or committed offsets.
    List,
    /// Members, their partitions, committed offsets and lag.
    Describe { group: String },
    /// Move a group's committed offsets (only while the group has no members).
    ResetOffsets {
        group: String,
        #[arg(long)]
        topic: String,
        /// earliest, latest, an offset, or time:<when> (as `tail --from`: RFC 3339, -10m, or
        /// milliseconds since the epoch).
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand)]
enum TopicCmd {
    /// Create a topic (its partitions and settings are fixed at creation).
    Create(CreateArgs),
    /// Topics with their partition counts.
    List,
    /// A topic's settings and each partition's leader, epoch, replicas, in-sync replicas, lag
    /// (entries the furthest replica lacks), log start and high watermark.
    Describe { name: String },
    /// Delete a topic, its data and its groups' offsets for it.
    Delete { name: String },
}

#[derive(Args)]
struct CreateArgs {
    name: String,
    /// Number of partitions (1 to 4,096).
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Brokers holding a copy of each partition (at most the cluster's size; 1 on one broker).
    #[arg(long, default_value_t = 1)]
    replicas: u16,
    /// Delete old segments once a partition is larger than this.
    #[arg(long)]
    retention_bytes: Option<u64>,
    /// Delete segments older than this (default 7 days).
    #[arg(long)]
    retention_ms: Option<u64>,
    /// Roll to a new segment at this size.
    #[arg(long)]
    segment_bytes: Option<u64>,
    /// Roll to a new segment at this age.
    #[arg(long)]
    segment_ms: Option<u64>,
    /// When appends are synced: always (before ack, group commit), interval, or os.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Always)]
    durability: DurabilityArg,
    /// Sync period for --durability interval.
    #[arg(long, default_value_t = 1000)]
    flush_interval_ms: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum DurabilityArg {
    Always,
    Interval,
    Os,
}

#[derive(Clone, Copy, ValueEnum)]
enum AcksArg {
    /// A majority of the partition's replicas stored the batch (on one broker: as leader).
    All,
    /// The partition's leader stored the batch in its own log (fsynced under durability
    /// always), not waiting for followers: lost if that leader fails before one has it.
    Leader,
    /// No acknowledgement: fire and forget.
    None,
}

#[derive(Args)]
struct PublishArgs {
    topic: String,
    /// Messages to publish; without any, stdin is read one message per line.
    messages: Vec<String>,
    /// Key for every message (picks the partition).
    #[arg(long)]
    key: Option<String>,
    /// Header K=V on every message (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// What the broker waits for before acknowledging a batch.
    #[arg(long, value_enum, default_value_t = AcksArg::All)]
    acks: AcksArg,
    /// How long a batch waits for more messages.
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// Largest batch in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    batch_bytes: usize,
}

#[derive(Args)]
struct TailArgs {
    topic: String,
    /// earliest, latest, an offset, or time:<when> (the first message at or after that time,
    /// found with the time index): an RFC 3339 time (time:2026-12-04T10:00:00Z), a time before
    /// now (time:-10m; units ms, s, m, h, d) or milliseconds since the epoch.
    #[arg(long, default_value = "latest")]
    from: String,
    /// Exit after this many messages (default: follow until Ctrl-C).
    #[arg(long)]
    count: Option<u64>,
    /// Consumer group: resume from its committed offsets, commit what was printed on exit.
    #[arg(long)]
    group: Option<String>,
    /// Only this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// One JSON object per line with topic, partition, offset, delivery_count, timestamp, key,
    /// headers, value.
    #[arg(long)]
    json: bool,
    /// With --group: how long the broker waits for this member's heartbeats before giving its
    /// partitions to others.
    #[arg(long, default_value_t = 10_000)]
    session_timeout_ms: u64,
}

#[derive(Args)]
struct BenchArgs {
    /// Topic to use; created if missing, kept afterwards. Default: a fresh topic per run,
    /// deleted when the run ends.
    #[arg(long)]
    topic: Option<String>,
    /// Producers; 0 with --topic reads what the topic holds (consume-only).
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Consumers, each reading every message from the start (no group); 0: produce only.
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Partitions of the topic the bench creates; producers spread messages over them.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Bytes of each message's value (the first 8 carry the send time).
    #[arg(long, default_value_t = 1024)]
    message_size: usize,
    /// Total messages across producers.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Run producers for this many seconds instead of a message count.
    #[arg(long)]
    duration: Option<f64>,
    /// all: wait for a majority of replicas to store each batch; leader: for the leader alone;
    /// none: fire and forget.
    #[arg(long, value_enum, default_value_t = AcksArg::Leader)]
    acks: AcksArg,
    /// A producer sends a partition's batch once it holds this many bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    batch_bytes: usize,
    /// ...or once its oldest record has waited this many milliseconds.
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// Durability of the topic the bench creates.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Interval)]
    durability: DurabilityArg,
    /// Milliseconds between fsyncs of the topic the bench creates, with --durability interval.
    #[arg(long, default_value_t = 1000)]
    flush_interval_ms: u32,
    /// Replicas of each partition of the topic the bench creates (in a cluster: its brokers).
    #[arg(long, default_value_t = 1)]
    replicas: u16,
    /// Send one message and wait for its ack before the next (latency mode).
    #[arg(long)]
    one_at_a_time: bool,
    /// Unacknowledged messages per producer before it waits (bounds produce->ack latency).
    #[arg(long, default_value_t = 4096)]
    max_inflight: usize,
    /// Sample this local broker process's resident memory during the run.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Open this many extra connections first and keep them idle during the run.
    #[arg(long, default_value_t = 0)]
    idle_connections: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn durability(d: DurabilityArg) -> Durability {
    match d {
        DurabilityArg::Always => Durability::Always,
        DurabilityArg::Interval => Durability::Interval,
        DurabilityArg::Os => Durability::Os,
    }
}

fn acks(a: AcksArg) -> Acks {
    match a {
        AcksArg::All => Acks::All,
        AcksArg::None => Acks::None,
        AcksArg::Leader => Acks::Leader,
    }
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("'{s}' is not K=V"))
}

/// Writes to standard output. A closed pipe (`quiver topic list | head -1`) ends the process
/// quietly, as SIGPIPE ends other tools; any other failure (a full disk) is an error, not a
/// panic.
fn write_stdout(args: std::fmt::Arguments) -> anyhow::Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    match o.write_fmt(args).and_then(|()| o.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(anyhow::anyhow!("writing to standard output: {e}")),
    }
}

/// `println!` through [`write_stdout`], returning its error from the enclosing function.
macro_rules! outln {
    ($($arg:tt)*) => { write_stdout(format_args!("{}\n", format_args!($($arg)*)))? };
}

/// `print!` through [`write_stdout`].
macro_rules! out {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*))? };
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUIVER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // One thread: a command drives one connection, whose tasks (quinn's drivers, the
    // consumer's partition tasks, the command's loop) then never wake each other across
    // threads, which costs a quarter of consume throughput on two cores (BENCHMARKS.md).
    // `quiver bench` gives each of its clients a thread of its own.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async {
        match run(cli).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_millis(100));
    std::process::exit(code);
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let ca = cli.ca.clone().unwrap_or_else(default_ca_path);
    let mut config = ClientConfig::new(cli.broker.clone(), ca);
    // An empty QUIVER_TOKEN (a `$(...)` that failed) is no token, not a wrong one.
    if let Some(token) = cli.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        config = config.with_token(token);
    }
    if let (Some(cert), Some(key)) = (&cli.cert, &cli.key) {
        config = config.with_client_cert(cert, key);
    }
    let attempt = connect_timeout_per_broker(config.brokers().len());
    let client = Client::connect(config.with_connect_timeout(attempt)).await.map_err(|e| {
        match e {
        // The default CA is that of a broker started here with its default data dir: say how
        // to name another one.
        e @ quiver_client::ClientError::BadCa { .. } if cli.ca.is_none() => anyhow::Error::new(e).context(
            "no --ca given: pass --ca (or set QUIVER_CA) to the ca.pem that signed the broker's certificate, \
             <broker data dir>/tls/ca.pem for a development broker",
        ),
        e => e.into(),
    }
    })?;
    let result = match cli.command {
        Command::Topic(cmd) => topic(&client, cmd).await,
        Command::Publish(args) => publish(&client, args).await,
        Command::Tail(args) => tail(&client, args).await,
        Command::Offsets { group, topic } => offsets(&client, &group, &topic).await,
        Command::Group(cmd) => group(&client, cmd).await,
        Command::Cluster(ClusterCmd::Status { json }) => cluster_status(&client, json).await,
        Command::Cluster(ClusterCmd::AddBroker { new_broker: broker }) => {
            let (id, addr) = broker
                .split_once('@')
                .and_then(|(id, addr)| Some((id.parse::<u32>().ok()?, addr)))
                .ok_or_else(|| anyhow::anyhow!("'{broker}': expected ID@HOST:PORT"))?;
            client.admin().add_broker(id, addr).await?;
            outln!("broker {id} added at {addr}; start it with --join");
            Ok(())
        }
        Command::Cluster(ClusterCmd::RemoveBroker { id }) => {
            client.admin().remove_broker(id).await?;
            outln!("broker {id} removed; its replicas move to the other brokers");
            Ok(())
        }
        Command::Bench(args) => bench(client.config().clone(), args).await,
        Command::Acl(cmd) => acl(&client, cmd).await,
        Command::Whoami => {
            match client.principal() {
                Some(p) => outln!("{p}"),
                None => {
                    outln!("anonymous (the broker has authentication off: every client may do everything)")
                }
            }
            Ok(())
        }
    };
    client.close().await;
    result
}

async fn acl(client: &Client, cmd: AclCmd) -> anyhow::Result<()> {
    let admin = client.admin();
    match cmd {
        AclCmd::Add(args) => {
            let rules = args.rules()?;
            let existing = admin.list_acls().await?;
            let new = rules.iter().filter(|r| !existing.contains(r)).count();
            admin.add_acls(rules.clone()).await?;
            match rules.len() - new {
                0 => outln!("added {new} rule(s)"),
                there => outln!("added {new} rule(s); {there} already there"),
            }
        }
        AclCmd::Remove(args) => {
            let rules = args.rules()?;
            let existing = admin.list_acls().await?;
            let (found, missing): (Vec<_>, Vec<_>) = rules.into_iter().partition(|r| existing.contains(r));
            if found.is_empty() {
                bail!(
                    "no such rule: rules are removed exactly as added (the pattern too, e.g. 'orders*' \
                     is not 'orders'); `quiver acl list` shows them"
                );
            }
            let n = found.len();
            admin.remove_acls(found).await?;
            match missing.len() {
                0 => outln!("removed {n} rule(s)"),
                m => outln!("removed {n} rule(s); {m} did not exist"),
            }
        }
        AclCmd::List { json, principal } => {
            let rules = admin.list_acls().await?;
            let rules: Vec<_> =
                rules.into_iter().filter(|r| principal.as_ref().is_none_or(|p| &r.principal == p)).collect();
            if rules.is_empty() && !json {
                eprintln!("no ACL rules{}", principal.map(|p| format!(" for '{p}'")).unwrap_or_default());
            }
            for r in rules {
                if json {
                    let line = serde_json::json!({
                        "principal": r.principal,
                        "resource": r.resource.name(),
                        "pattern": r.pattern,
                        "operation": r.operation.name(),
                    });
                    outln!("{line}");
                } else {
                    outln!("{}\t{}\t{}\t{}", r.principal, r.resource.name(), r.pattern, r.operation.name());
                }
            }
        }
    }
    Ok(())
}

/// How long the CLI waits for each broker of `n` to answer: the SDK's 5 s for one, less for
/// several, so that finding none of up to five answering takes about 10 s, not 5 s each; never
/// under 2 s, which leaves a lost first handshake packet time to be sent again.
fn connect_timeout_per_broker(n: usize) -> Duration {
    const ALL: Duration = Duration::from_secs(10);
    (ALL / n.max(1) as u32).clamp(Duration::from_secs(2), Duration::from_secs(5))
}

async fn topic(client: &Client, cmd: TopicCmd) -> anyhow::Result<()> {
    let admin = client.admin();
    match cmd {
        TopicCmd::Create(a) => {
            let mut config = TopicConfig::default();
            if a.retention_bytes.is_some() {
                config.retention_bytes = a.retention_bytes;
            }
            if a.retention_ms.is_some() {
                config.retention_ms = a.retention_ms;
            }
            config.segment_bytes = a.segment_bytes.unwrap_or(config.segment_bytes);
            config.segment_ms = a.segment_ms.unwrap_or(config.segment_ms);
            config.durability = durability(a.durability);
            config.flush_interval_ms = a.flush_interval_ms;
            let config = config.with_replicas(a.replicas);
            admin.create_topic(&a.name, a.partitions, config).await?;
            if a.replicas > 1 {
                outln!(
                    "created topic {} with {} partition(s), {} replicas each",
                    a.name,
                    a.partitions,
                    a.replicas
                );
            } else {
                outln!("created topic {} with {} partition(s)", a.name, a.partitions);
            }
        }
        TopicCmd::List => {
            for t in admin.list_topics().await? {
                outln!("{}\t{} partition(s)", t.name, t.partitions.len());
            }
        }
        TopicCmd::Describe { name } => {
            let t = admin.describe_topic(&name).await?;
            let c = &t.config;
            outln!("topic {}", t.name);
            outln!(
                "  replicas={} durability={} segment_bytes={} segment_ms={} retention_bytes={} retention_ms={}",
                c.replicas,
                match c.durability {
                    Durability::Always => "always",
                    Durability::Interval => "interval",
                    Durability::Os => "os",
                },
                c.segment_bytes,
                c.segment_ms,
                c.retention_bytes.map_or("none".into(), |v| v.to_string()),
                c.retention_ms.map_or("none".into(), |v| v.to_string()),
            );
            // The offsets are the partition's range (log start to high watermark); `lag` is the
            // replication lag (entries the replica furthest behind lacks of the leader's log);
            // a group's lag is `quiver offsets`.
            let replicated = t.partitions.iter().any(|p| !p.replicas.is_empty());
            let status = match replicated {
                true => admin.cluster_status().await.map(|s| s.partitions).unwrap_or_default(),
                false => Vec::new(),
            };
            let mut rows = vec![[
                "partition",
                "leader",
                "epoch",
                "replicas",
                "in_sync",
                "lag",
                "log_start",
                "high_watermark",
            ]
            .map(String::from)];
            for p in t.partitions {
                let r = status.iter().find(|r| r.topic == t.name && r.partition == p.partition);
                rows.push([
                    p.partition.to_string(),
                    p.leader.map_or("-".into(), |l| l.to_string()),
                    p.epoch.to_string(),
                    ids(&p.replicas),
                    r.map_or("-".into(), |r| ids(&r.in_sync)),
                    r.map_or("-".into(), |r| r.lag.to_string()),
                    p.log_start_offset.to_string(),
                    p.high_watermark.to_string(),
                ]);
            }
            for line in aligned(&rows) {
                outln!("  {line}");
            }
        }
        TopicCmd::Delete { name } => {
            admin.delete_topic(&name).await?;
            outln!("deleted topic {name}");
        }
    }
    Ok(())
}

async fn publish(client: &Client, a: PublishArgs) -> anyhow::Result<()> {
    let config = ProducerConfig::default()
        .with_acks(acks(a.acks))
        .with_linger(Duration::from_millis(a.linger_ms))
        .with_max_batch_bytes(a.batch_bytes);
    let producer = Producer::new(client.clone(), config);
    let make = |value: String| {
        let mut r = ProducerRecord::new(value);
        if let Some(k) = &a.key {
            r = r.key(Bytes::from(k.clone()));
        }
        for (k, v) in &a.headers {
            r = r.header(k.clone(), Bytes::from(v.clone()));
        }
        r
    };
    // Acknowledgements are settled in send order; only the oldest is polled.
    let mut pending = std::collections::VecDeque::new();
    let mut sent = 0u64;
    let mut first_error: Option<String> = None;
    let mut failed = 0u64;
    let mut settle = |r: Result<_, quiver_client::ClientError>| {
        if let Err(e) = r {
            failed += 1;
            first_error.get_or_insert_with(|| e.to_string());
        }
    };
    if a.messages.is_empty() {
        let mut lines = tokio::io::BufReader::with_capacity(1 << 20, tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await.context("reading stdin")? {
            pending.push_back(producer.enqueue(&a.topic, make(line)).await?);
            sent += 1;
            // Settle finished acknowledgements as we go so memory stays flat.
            while let Some(r) = pending.front_mut().and_then(|f| f.now_or_never()) {
                settle(r);
                pending.pop_front();
            }
        }
    } else {
        for m in a.messages.clone() {
            pending.push_back(producer.enqueue(&a.topic, make(m)).await?);
            sent += 1;
        }
    }
    producer.flush().await?;
    for ack in pending {
        settle(ack.await);
    }
    if let Some(e) = first_error {
        bail!("{failed} of {sent} message(s) were not acknowledged: {e}");
    }
    Ok(())
}

fn parse_from(s: &str) -> anyhow::Result<StartPosition> {
    Ok(match s {
        "earliest" => StartPosition::Earliest,
        "latest" => StartPosition::Latest,
        t if t.starts_with("time:") => StartPosition::Timestamp(
            parse_time(&t["time:".len()..], now_ms()).map_err(|e| anyhow::anyhow!("--from '{t}': {e}"))?,
        ),
        n => StartPosition::Offset(n.parse().map_err(|_| {
            anyhow::anyhow!("--from '{n}': expected earliest, latest, an offset or time:<when>")
        })?),
    })
}

/// Epoch milliseconds below this (March 1973) are refused: such a number is almost surely
/// seconds (`$(date +%s)` is about 1.7e9), which read as milliseconds would mean January 1970
/// and replay the whole topic.
const MIN_EPOCH_MS: i64 = 100_000_000_000;

/// The time a `time:<when>` names, in milliseconds since the epoch: an RFC 3339 time
/// (`2026-12-04T10:00:00Z`, `2026-12-04T11:00:00.250+01:00`), a time relative to `now_ms`
/// (`-30s`, `-10m`, `-2h`, `-1d`, `-500ms`), or milliseconds since the epoch (0, or from 10^11;
/// a number that can only be seconds is refused).
fn parse_time(when: &str, now_ms: i64) -> Result<i64, String> {
    const EXPECTED: &str = "expected time:<RFC 3339 time> (e.g. time:2026-12-04T10:00:00Z), \
         time:-<N><ms|s|m|h|d> (before now, e.g. time:-10m) or time:<milliseconds since the epoch>";
    if let Some(ago) = when.strip_prefix('-') {
        let split = ago.find(|c: char| !c.is_ascii_digit()).unwrap_or(ago.len());
        let (n, unit) = ago.split_at(split);
        let unit_ms: i64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(EXPECTED.into()),
        };
        let n: i64 = n.parse().map_err(|_| EXPECTED.to_string())?;
        return n
            .checked_mul(unit_ms)
            .and_then(|ago| now_ms.checked_sub(ago))
            .ok_or_else(|| format!("'{when}' is too far back"));
    }
    if !when.is_empty() && when.bytes().all(|b| b.is_ascii_digit()) {
        let n: i64 =
            when.parse().map_err(|_| format!("{when} is too large for milliseconds since the epoch"))?;
        if n != 0 && n < MIN_EPOCH_MS {
            let as_seconds = time::OffsetDateTime::from_unix_timestamp(n)
                .ok()
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
                .unwrap_or_else(|| "?".into());
            return Err(format!(
                "{n} looks like seconds since the epoch ({as_seconds}), but the number is read as \
                 milliseconds; give time:{n}000 or an RFC 3339 time such as time:{as_seconds}"
            ));
        }
        return Ok(n);
    }
    let t = time::OffsetDateTime::parse(when, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("'{when}' is not a time ({e}); {EXPECTED}"))?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| format!("'{when}' is out of range"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn tail(client: &Client, a: TailArgs) -> anyhow::Result<()> {
    let mut config = ConsumerConfig::new(a.topic.clone()).start(parse_from(&a.from)?);
    config.group = a.group.clone();
    config.partitions = a.partition.map(|p| vec![p]);
    config.session_timeout = Duration::from_millis(a.session_timeout_ms);
    let mut consumer = Consumer::subscribe(client.clone(), config).await?;
    // Tokio's stdout: a slow reader (a pipe into `less`) must not block the one runtime thread,
    // which also drives the connection and the group heartbeats.
    let mut out = tokio::io::BufWriter::with_capacity(1 << 16, tokio::io::stdout());
    let mut printed = 0u64;
    let limit = a.count.unwrap_or(u64::MAX);
    // Ctrl-C or SIGTERM end a follow cleanly: what was printed is committed, the group left.
    let ctrl_c = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    tokio::pin!(ctrl_c);
    // Messages are acknowledged once their lines are flushed to stdout, not when buffered: a
    // reader that goes away (`| head`) leaves what it never got unacknowledged.
    let mut unflushed: Vec<quiver_client::ConsumedMessage> = Vec::new();
    let mut reader_gone = false;
    // A final error from the consumer (damaged data, a deleted topic) ends the tail, but only
    // after what came before it is printed, acknowledged and (with a group) committed.
    let mut failed = None;
    while printed < limit {
        // Flush whenever we would wait (so a follower sees lines as they arrive), and every
        // few thousand lines.
        if unflushed.len() >= 4096 && !flush_and_ack(&mut out, &mut unflushed).await? {
            reader_gone = true;
            break;
        }
        let next = match consumer.next().now_or_never() {
            Some(m) => m,
            None => {
                if !flush_and_ack(&mut out, &mut unflushed).await? {
                    reader_gone = true;
                    break;
                }
                tokio::select! {
                    m = consumer.next() => m,
                    _ = &mut ctrl_c => break,
                }
            }
        };
        let msg = match next {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => {
                failed = Some(e);
                break;
            }
            None => break,
        };
        if a.json {
            let headers: serde_json::Map<String, serde_json::Value> = msg
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned().into()))
                .collect();
            let line = serde_json::json!({
                "topic": &*msg.topic,
                "partition": msg.partition,
                "offset": msg.offset,
                "delivery_count": msg.delivery_count,
                "timestamp": msg.timestamp_ms,
                "key": msg.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
                "headers": headers,
                "value": String::from_utf8_lossy(&msg.value),
            });
            out.write_all(format!("{line}\n").as_bytes()).await.or_else(reader_went_away)?;
        } else {
            out.write_all(&msg.value).await.or_else(reader_went_away)?;
            out.write_all(b"\n").await.or_else(reader_went_away)?;
        }
        unflushed.push(msg);
        printed += 1;
    }
    if !reader_gone {
        flush_and_ack(&mut out, &mut unflushed).await?;
    }
    drop(out);
    // A deleted topic has no offsets left to commit to (the delete removed them).
    let topic_gone =
        failed.as_ref().is_some_and(|e| e.code() == Some(quiver_protocol::ErrorCode::TopicDeleted));
    if a.group.is_some() && !topic_gone {
        let report = match (consumer.commit().await, &failed) {
            (Ok(report), _) => report,
            (Err(c), Some(e)) => anyhow::bail!("{e} (and committing the group's offsets failed: {c})"),
            (Err(c), None) => return Err(anyhow::Error::new(c).context("committing the group's offsets")),
        };
        if !report.revoked.is_empty() {
            eprintln!(
                "partitions {:?} moved to another member before their acknowledgements were committed; \
                 that member reads them again from the group's last commit",
                report.revoked
            );
        }
    }
    consumer.close().await;
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Flushes stdout and acknowledges the messages whose lines it held. `Ok(false)` when the
/// reader went away (a closed pipe): those messages stay unacknowledged.
async fn flush_and_ack(
    out: &mut tokio::io::BufWriter<tokio::io::Stdout>,
    unflushed: &mut Vec<quiver_client::ConsumedMessage>,
) -> anyhow::Result<bool> {
    match out.flush().await {
        Ok(()) => {
            for m in unflushed.drain(..) {
                m.ack();
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A write to a closed pipe is not an error here: the flush after it tells the loop to stop.
fn reader_went_away(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(e)
    }
}

async fn offsets(client: &Client, group: &str, topic: &str) -> anyhow::Result<()> {
    let admin = client.admin();
    let offsets = admin.group_offsets(group, topic).await?;
    // A name the broker has never seen has nothing committed anywhere: say so (and fail, as
    // Kafka's tools do) rather than print a table of dashes.
    if offsets.iter().all(|p| p.committed.is_none()) && !admin.list_groups().await?.iter().any(|g| g == group)
    {
        bail!("unknown group '{group}' (no members and no committed offsets)");
    }
    let mut rows = vec![["partition", "committed", "earliest", "latest", "lag"].map(String::from)];
    for p in offsets {
        let lag = p.high_watermark - p.committed.unwrap_or(p.log_start_offset).min(p.high_watermark);
        rows.push([
            p.partition.to_string(),
            p.committed.map_or("-".to_string(), |c| c.to_string()),
            p.log_start_offset.to_string(),
            p.high_watermark.to_string(),
            lag.to_string(),
        ]);
    }
    for line in aligned(&rows) {
        outln!("{line}");
    }
    Ok(())
}

async fn bench(client: ClientConfig, a: BenchArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    anyhow::ensure!(
        a.producers > 0 || (a.topic.is_some() && a.consumers > 0),
        "--producers 0 (consume-only) needs --topic with existing messages and --consumers"
    );
    let config = bench::BenchConfig {
        client,
        topic: a.topic,
        producers: a.producers,
        consumers: a.consumers,
        partitions: a.partitions,
        message_size: a.message_size,
        messages: a.messages,
        duration: a.duration.map(Duration::from_secs_f64),
        acks: acks(a.acks),
        batch_bytes: a.batch_bytes,
        linger: Duration::from_millis(a.linger_ms),
        durability: durability(a.durability),
        flush_interval_ms: a.flush_interval_ms,
        replicas: a.replicas,
        one_at_a_time: a.one_at_a_time,
        max_inflight: a.max_inflight,
        broker_pid: a.broker_pid,
        idle_connections: a.idle_connections,
        progress: !a.json && std::io::stderr().is_terminal(),
    };
    let report = bench::run(config).await?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        out!("{}", report.render());
    }
    Ok(())
}

async fn group(client: &Client, cmd: GroupCmd) -> anyhow::Result<()> {
    let admin = client.admin();
    match cmd {
        GroupCmd::List => {
            for g in admin.list_groups().await? {
                outln!("{g}");
            }
        }
        GroupCmd::Describe { group } => {
            let d = admin.describe_group(&group).await?;
            // Everything is read before anything is printed: an error is one line, not half
            // a table.
            let offsets = match admin.group_offsets(&group, &d.topic).await {
                Err(e) if e.code() == Some(quiver_protocol::ErrorCode::UnknownTopic) => {
                    bail!("group {group}: its topic '{}' no longer exists", d.topic)
                }
                r => r?,
            };
            outln!(
                "group {group}: topic {}, generation {}, {} member(s)",
                d.topic,
                d.generation,
                d.members.len()
            );
            let mut owner = std::collections::HashMap::new();
            for m in &d.members {
                for p in &m.partitions {
                    owner.insert(*p, m.member_id.clone());
                }
            }
            let mut rows = vec![["partition", "member", "committed", "latest", "lag"].map(String::from)];
            for p in offsets {
                let lag = p.high_watermark - p.committed.unwrap_or(p.log_start_offset).min(p.high_watermark);
                rows.push([
                    p.partition.to_string(),
                    owner.get(&p.partition).map_or("-".to_string(), |m| m.clone()),
                    p.committed.map_or("-".to_string(), |c| c.to_string()),
                    p.high_watermark.to_string(),
                    lag.to_string(),
                ]);
            }
            for line in aligned(&rows) {
                outln!("  {line}");
            }
        }
        GroupCmd::ResetOffsets { group, topic, to } => {
            for p in admin.group_offsets(&group, &topic).await? {
                let target = match to.as_str() {
                    "earliest" => p.log_start_offset,
                    "latest" => p.high_watermark,
                    t if t.starts_with("time:") => {
                        let ts = parse_time(&t["time:".len()..], now_ms())
                            .map_err(|e| anyhow::anyhow!("--to '{t}': {e}"))?;
                        admin.offset_for_time(&topic, p.partition, ts).await?
                    }
                    n => n
                        .parse::<u64>()
                        .map_err(|_| {
                            anyhow::anyhow!("--to '{n}': expected earliest, latest, an offset or time:<when>")
                        })?
                        .clamp(p.log_start_offset, p.high_watermark),
                };
                admin.commit_offset(&group, &topic, p.partition, target).await?;
                outln!("{group} {topic}/{}: {target}", p.partition);
            }
        }
    }
    Ok(())
}

async fn cluster_status(client: &Client, json: bool) -> anyhow::Result<()> {
    let status = client.admin().cluster_status().await?;
    if json {
        outln!("{}", cluster_json(&status.brokers, &status.partitions));
        return Ok(());
    }
    for line in cluster_table(&status.brokers, &status.partitions) {
        outln!("{line}");
    }
    Ok(())
}

/// `cluster status --json`: one object, field names as documented (scripts rely on them).
fn cluster_json(brokers: &[BrokerStatus], partitions: &[ReplicaStatus]) -> serde_json::Value {
    let brokers: Vec<_> =
        brokers.iter().map(|b| serde_json::json!({ "id": b.id, "addr": b.addr, "up": b.up })).collect();
    let partitions: Vec<_> = partitions
        .iter()
        .map(|p| {
            serde_json::json!({
                "topic": p.topic,
                "partition": p.partition,
                "leader": p.leader,
                "epoch": p.epoch,
                "replicas": p.replicas,
                "in_sync": p.in_sync,
                "commit": p.commit,
                "lag": p.lag,
            })
        })
        .collect();
    serde_json::json!({ "brokers": brokers, "partitions": partitions })
}

/// `cluster status`: the brokers, a blank line, the partitions, each as aligned columns.
fn cluster_table(brokers: &[BrokerStatus], partitions: &[ReplicaStatus]) -> Vec<String> {
    let mut rows = vec![["id", "addr", "up"].map(String::from)];
    for b in brokers {
        rows.push([b.id.to_string(), b.addr.clone(), if b.up { "yes" } else { "no" }.to_string()]);
    }
    let mut lines = aligned(&rows);
    lines.push(String::new());
    let mut rows =
        vec![["topic", "partition", "leader", "epoch", "replicas", "in_sync", "commit", "lag"]
            .map(String::from)];
    for p in partitions {
        rows.push([
            p.topic.clone(),
            p.partition.to_string(),
            p.leader.map_or("-".into(), |l| l.to_string()),
            p.epoch.to_string(),
            ids(&p.replicas),
            ids(&p.in_sync),
            p.commit.to_string(),
            p.lag.to_string(),
        ]);
    }
    lines.extend(aligned(&rows));
    lines
}

/// Broker ids as `1,2,3`, or `-` for none.
fn ids(ids: &[u32]) -> String {
    if ids.is_empty() {
        return "-".into();
    }
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// Rows as lines whose columns line up (each padded to its widest cell, two spaces apart; the
/// last column is not padded).
fn aligned<const N: usize>(rows: &[[String; N]]) -> Vec<String> {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == N {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
                }
            }
            line
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_378_400_000; // 2026-12-04T10:00:00Z

    #[test]
    fn aligned_columns_line_up() {
        let rows = vec![
            ["partition", "member", "lag"].map(String::from),
            ["10", "m-1234567890", "5"].map(String::from),
        ];
        assert_eq!(aligned(&rows), vec!["partition  member        lag", "10         m-1234567890  5"]);
    }

    #[test]
    fn cluster_status_json_has_the_documented_fields() {
        let brokers = [BrokerStatus { id: 1, addr: "127.0.0.1:7420".into(), up: true }];
        let partitions = [
            ReplicaStatus {
                topic: "t".into(),
                partition: 0,
                leader: Some(1),
                epoch: 3,
                replicas: vec![1, 2, 3],
                in_sync: vec![1, 2, 3],
                commit: 42,
                lag: 0,
            },
            ReplicaStatus {
                topic: "t".into(),
                partition: 1,
                leader: None,
                epoch: 0,
                replicas: vec![2],
                in_sync: vec![],
                commit: 0,
                lag: 7,
            },
        ];
        let want = r#"{"brokers":[{"addr":"127.0.0.1:7420","id":1,"up":true}],"partitions":[{"commit":42,"epoch":3,"in_sync":[1,2,3],"lag":0,"leader":1,"partition":0,"replicas":[1,2,3],"topic":"t"},{"commit":0,"epoch":0,"in_sync":[],"lag":7,"leader":null,"partition":1,"replicas":[2],"topic":"t"}]}"#;
        assert_eq!(cluster_json(&brokers, &partitions).to_string(), want);
        let table = cluster_table(&brokers, &partitions);
        assert_eq!(table[0], "id  addr            up");
        assert_eq!(table[1], "1   127.0.0.1:7420  yes");
        assert_eq!(table[3], "topic  partition  leader  epoch  replicas  in_sync  commit  lag");
        assert_eq!(table[4], "t      0          1       3      1,2,3     1,2,3    42      0");
        assert_eq!(table[5], "t      1          -       0      2         -        0       7");
    }

    #[test]
    fn a_list_of_dead_brokers_is_given_up_on_in_about_ten_seconds() {
        assert_eq!(connect_timeout_per_broker(1), Duration::from_secs(5));
        assert_eq!(connect_timeout_per_broker(2), Duration::from_secs(5));
        assert!(connect_timeout_per_broker(3) * 3 <= Duration::from_secs(10));
        assert_eq!(connect_timeout_per_broker(50), Duration::from_secs(2));
    }

    #[test]
    fn rfc_3339_times() {
        assert_eq!(parse_time("2026-12-04T10:00:00Z", NOW), Ok(NOW));
        assert_eq!(parse_time("2026-12-04T11:00:00.250+01:00", NOW), Ok(NOW + 250));
        assert_eq!(parse_time("1970-01-01T00:00:00Z", NOW), Ok(0));
        assert!(parse_time("2026-12-04", NOW).is_err_and(|e| e.contains("RFC 3339")));
        assert!(parse_time("2026-12-04T10:00:00", NOW).is_err(), "an offset is required");
    }

    #[test]
    fn relative_times() {
        assert_eq!(parse_time("-30s", NOW), Ok(NOW - 30_000));
        assert_eq!(parse_time("-10m", NOW), Ok(NOW - 600_000));
        assert_eq!(parse_time("-2h", NOW), Ok(NOW - 7_200_000));
        assert_eq!(parse_time("-1d", NOW), Ok(NOW - 86_400_000));
        assert_eq!(parse_time("-500ms", NOW), Ok(NOW - 500));
        for bad in ["-10", "-m", "-10w", "-1.5h", "-", "-99999999999999999999d"] {
            assert!(parse_time(bad, NOW).is_err(), "{bad}");
        }
        assert!(parse_time("-9223372036854775807d", NOW).is_err_and(|e| e.contains("too far back")));
    }

    #[test]
    fn milliseconds_are_kept_and_seconds_refused() {
        assert_eq!(parse_time("1796378400000", NOW), Ok(NOW));
        assert_eq!(parse_time("0", NOW), Ok(0), "the epoch is the same in either unit");
        assert_eq!(parse_time("100000000000", NOW), Ok(MIN_EPOCH_MS));
        let e = parse_time("1796378400", NOW).err().unwrap_or_default();
        assert!(e.contains("seconds"), "{e}");
        assert!(e.contains("time:1796378400000"), "{e}");
        assert!(e.contains("time:2026-12-04T10:00:00Z"), "{e}");
        assert!(parse_time("99999999999", NOW).is_err());
        assert!(parse_time("", NOW).is_err());
        assert!(parse_time("99999999999999999999", NOW).is_err());
    }

    #[test]
    fn from_positions() {
        assert!(matches!(parse_from("time:-1h"), Ok(StartPosition::Timestamp(_))));
        assert!(matches!(parse_from("time:2026-12-04T10:00:00Z"), Ok(StartPosition::Timestamp(NOW))));
        let e = parse_from("time:1796378400").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.starts_with("--from 'time:1796378400': 1796378400 looks like seconds"), "{e}");
        assert!(matches!(parse_from("42"), Ok(StartPosition::Offset(42))));
    }
}
