//! The nemesis: a schedule of faults drawn from a seed ([`schedule`], pure: the same seed,
//! duration, brokers and fault list give the same steps), and its execution against a
//! [`Cluster`] ([`Nemesis::run`]), one fault at a time, each undone before the next. Which
//! broker leads a partition is known only when a step runs, so a step aimed at "the leader of
//! partition p" hits whichever broker leads then; the timing of real processes is not
//! deterministic either.

use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

use super::history::{Event, Recorder, Type};
use super::rng::Rng;
use super::run::NegativeControl;
use crate::proxy::LinkFaults;
use crate::Cluster;

/// The fault kinds `--faults` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// kill -9, later restarted.
    Kill,
    /// SIGSTOP, later SIGCONT.
    Pause,
    /// SIGTERM, wait for the exit, start again.
    Restart,
    /// The brokers split into a majority and a minority.
    Halves,
    /// Two sides that do not see each other, and one broker that sees both.
    Bridge,
    /// One broker's datagrams to every other are dropped (or theirs to it), not the reverse.
    OneWay,
    /// One broker cut off from every other.
    Isolate,
    /// A link cut and healed again and again.
    Flap,
    /// Every broker-to-broker link loses, delays, duplicates and reorders datagrams.
    Links,
    /// A broker killed, a byte flipped in one of its segment files, started again.
    Corrupt,
    /// A broker killed, every write it had not fsynced dropped (by its sync ledger), started
    /// again.
    PowerLoss,
    /// A broker added to the running cluster (`add-broker`, started with `--join`), partitions
    /// moving to it, maybe an original broker killed meanwhile, then removed again
    /// (`remove-broker`, its replicas moving away) and stopped.
    Membership,
    /// One broker's wall clock stepped (libfaketime; its monotonic clocks untouched), then set
    /// right again.
    Clock,
}

impl FaultKind {
    pub const ALL: [FaultKind; 13] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Restart,
        FaultKind::Halves,
        FaultKind::Bridge,
        FaultKind::OneWay,
        FaultKind::Isolate,
        FaultKind::Flap,
        FaultKind::Links,
        FaultKind::Corrupt,
        FaultKind::PowerLoss,
        FaultKind::Membership,
        FaultKind::Clock,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Restart => "restart",
            FaultKind::Halves => "halves",
            FaultKind::Bridge => "bridge",
            FaultKind::OneWay => "one-way",
            FaultKind::Isolate => "isolate",
            FaultKind::Flap => "flap",
            FaultKind::Links => "links",
            FaultKind::Corrupt => "corrupt",
            FaultKind::PowerLoss => "power-loss",
            FaultKind::Membership => "membership",
            FaultKind::Clock => "clock",
        }
    }

    /// A comma-separated list of names; `all`, `partition` (halves, bridge, one-way, isolate,
    /// flap) and `process` (kill, pause, restart) name groups; `none` an empty list.
    pub fn parse_list(s: &str) -> Result<Vec<FaultKind>, String> {
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let kinds: Vec<FaultKind> = match name {
                "all" => FaultKind::ALL.to_vec(),
                "none" => Vec::new(),
                "partition" => vec![
                    FaultKind::Halves,
                    FaultKind::Bridge,
                    FaultKind::OneWay,
                    FaultKind::Isolate,
                    FaultKind::Flap,
                ],
                "process" => vec![FaultKind::Kill, FaultKind::Pause, FaultKind::Restart],
                n => vec![FaultKind::ALL.into_iter().find(|k| k.name() == n).ok_or_else(|| {
                    let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                    format!(
                        "unknown fault '{n}' (faults: {}, all, partition, process, none)",
                        names.join(", ")
                    )
                })?],
            };
            for k in kinds {
                if !out.contains(&k) {
                    out.push(k);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Which broker a process fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Node index (0-based; broker id is index + 1).
    Node(usize),
    /// Whichever broker leads this partition when the step runs.
    LeaderOf(u32),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    Kill(Target),
    Pause(Target),
    Restart(Target),
    Halves {
        minority: Vec<usize>,
    },
    Bridge {
        a: Vec<usize>,
        b: Vec<usize>,
        bridge: usize,
    },
    OneWay {
        node: usize,
        outbound: bool,
    },
    Isolate(Target),
    Flap {
        a: usize,
        b: usize,
        period_ms: u64,
    },
    Links(LinkFaults),
    /// Flip one bit of a record batch's body (past its 61-byte header) in one segment file of
    /// `partition` on `node` while it is down: the active (last) segment or a closed one.
    /// `pick` chooses the file, the batch and the byte.
    Corrupt {
        node: usize,
        partition: u32,
        closed: bool,
        pick: u64,
    },
    /// The acks-leader negative control's fault: the leader cut off from its peers (it keeps
    /// answering its clients), then killed, then healed and restarted.
    IsolateThenKill(Target),
    /// These brokers killed together, each data directory cut to what its sync ledger says
    /// was fsynced (`power.rs`), then started again.
    PowerLoss(Vec<Target>),
    /// A new broker added, held (with `kill`, this original broker SIGKILLed for the middle
    /// third of the hold while partitions move), then removed and stopped.
    Membership {
        kill: Option<usize>,
    },
    /// Broker `node`'s wall clock moved by `offset_s` seconds, set right after the hold.
    ClockStep {
        node: usize,
        offset_s: i64,
    },
}

/// One step: start `at_ms` after the run began (or as soon as the previous one ended), undo
/// after `hold_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub at_ms: u64,
    pub hold_ms: u64,
    pub fault: Fault,
}

/// The steps of a run of `duration` against `brokers` brokers with `partitions` partitions,
/// drawn from `kinds` (empty: no steps). A negative control has steps of its own: with
/// acks-leader every step isolates then kills a partition's leader; with fsync-off every step
/// is a power loss of every broker at once.
pub fn schedule(
    seed: u64,
    duration: Duration,
    brokers: usize,
    partitions: u32,
    kinds: &[FaultKind],
    control: Option<NegativeControl>,
) -> Vec<Step> {
    let mut rng = Rng::new(Rng::derive(seed, 0x006e_656d_6573_6973));
    let end = duration.as_millis() as u64;
    let mut at = 3_000u64.min(end / 4);
    let mut steps = Vec::new();
    if brokers == 0 || (kinds.is_empty() && control.is_none()) {
        return steps;
    }
    let n = brokers as u64;
    loop {
        let target = |rng: &mut Rng| match rng.chance(0.5) {
            true => Target::LeaderOf(rng.below(u64::from(partitions.max(1))) as u32),
            false => Target::Node(rng.below(n) as usize),
        };
        let (fault, hold_ms) = if control == Some(NegativeControl::AcksLeader) {
            (
                Fault::IsolateThenKill(Target::LeaderOf(rng.below(u64::from(partitions.max(1))) as u32)),
                rng.between(1_500, 3_000),
            )
        } else if control == Some(NegativeControl::FsyncOff) {
            // Every broker: a survivor would keep the page cache's copy and lead the others
            // back to it.
            let all = (0..brokers).map(Target::Node).collect();
            (Fault::PowerLoss(all), rng.between(500, 2_000))
        } else {
            let kind = *rng.pick(kinds).unwrap_or(&FaultKind::Kill);
            match kind {
                FaultKind::Kill => (Fault::Kill(target(&mut rng)), rng.between(500, 6_000)),
                FaultKind::Pause => (Fault::Pause(target(&mut rng)), rng.between(500, 5_000)),
                FaultKind::Restart => (Fault::Restart(target(&mut rng)), 0),
                FaultKind::Halves => {
                    let mut nodes: Vec<usize> = (0..brokers).collect();
                    rng.shuffle(&mut nodes);
                    let minority = nodes[..(brokers - 1) / 2].to_vec();
                    (Fault::Halves { minority }, rng.between(2_000, 8_000))
                }
                FaultKind::Bridge => {
                    let mut nodes: Vec<usize> = (0..brokers).collect();
                    rng.shuffle(&mut nodes);
                    let bridge = nodes[0];
                    let rest = &nodes[1..];
                    let half = rest.len() / 2;
                    let (a, b) = (rest[..half].to_vec(), rest[half..].to_vec());
                    (Fault::Bridge { a, b, bridge }, rng.between(2_000, 8_000))
                }
                FaultKind::OneWay => (
                    Fault::OneWay { node: rng.below(n) as usize, outbound: rng.chance(0.5) },
                    rng.between(2_000, 8_000),
                ),
                FaultKind::Isolate => (Fault::Isolate(target(&mut rng)), rng.between(2_000, 8_000)),
                FaultKind::Flap => {
                    let a = rng.below(n) as usize;
                    let b = (a + 1 + rng.below(n.saturating_sub(1).max(1)) as usize) % brokers;
                    (Fault::Flap { a, b, period_ms: rng.between(200, 1_000) }, rng.between(3_000, 8_000))
                }
                FaultKind::Links => {
                    let faults = LinkFaults {
                        cut: false,
                        drop: rng.between(1, 30) as f64 / 100.0,
                        delay_ms: rng.between(0, 40),
                        jitter_ms: rng.between(0, 40),
                        duplicate: rng.between(0, 10) as f64 / 100.0,
                        reorder: rng.between(0, 20) as f64 / 100.0,
                    };
                    (Fault::Links(faults), rng.between(3_000, 10_000))
                }
                FaultKind::Corrupt => (
                    Fault::Corrupt {
                        node: rng.below(n) as usize,
                        partition: rng.below(u64::from(partitions.max(1))) as u32,
                        closed: rng.chance(0.5),
                        pick: rng.next_u64(),
                    },
                    rng.between(500, 2_000),
                ),
                FaultKind::PowerLoss => (Fault::PowerLoss(vec![target(&mut rng)]), rng.between(500, 6_000)),
                FaultKind::Membership => {
                    let kill = rng.chance(0.5).then(|| rng.below(n) as usize);
                    (Fault::Membership { kill }, rng.between(6_000, 15_000))
                }
                FaultKind::Clock => {
                    // Seconds, minutes, an hour or a day, either way (retention is days).
                    let magnitude = match rng.below(4) {
                        0 => rng.between(1, 10),
                        1 => rng.between(10, 600),
                        2 => 3_600,
                        _ => 86_400,
                    } as i64;
                    let offset_s = if rng.chance(0.5) { magnitude } else { -magnitude };
                    (Fault::ClockStep { node: rng.below(n) as usize, offset_s }, rng.between(2_000, 10_000))
                }
            }
        };
        if at + hold_ms > end {
            break;
        }
        steps.push(Step { at_ms: at, hold_ms, fault });
        // After a power loss of every broker, time to elect and take writes again.
        let regroup = if control == Some(NegativeControl::FsyncOff) { 5_000 } else { 0 };
        at += hold_ms + rng.between(1_000, 4_000) + regroup;
    }
    steps
}

/// How long a membership step waits for a change to be taken (another may be under way) and
/// for a removed broker's replicas to move away.
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(60);

/// Runs a schedule against a cluster, recording each step in the history.
pub struct Nemesis<'a> {
    pub cluster: &'a mut Cluster,
    pub rec: Recorder,
    pub topic: String,
    /// A broker process faults leave alone (redirected to the next broker): the one the
    /// consumers talk to first (`--spare-coordinator`).
    pub spare: Option<usize>,
}

impl Nemesis<'_> {
    /// Runs `steps` from `start`, never beginning one after `deadline`; then heals the network
    /// and starts every broker that is down or paused.
    pub async fn run(&mut self, steps: &[Step], start: Instant, deadline: Instant) -> anyhow::Result<()> {
        let mut result = Ok(());
        for (i, step) in steps.iter().enumerate() {
            let at = start + Duration::from_millis(step.at_ms);
            tokio::time::sleep_until(at).await;
            if Instant::now() >= deadline {
                break;
            }
            if let Err(e) = self.step(i, step).await {
                result = Err(e).with_context(|| format!("nemesis step {i} {:?}", step.fault));
                break;
            }
        }
        self.heal_all().await?;
        result
    }

    fn note(&self, kind: Type, fault: String) {
        tracing::info!("nemesis: {fault}");
        self.rec.record(Event { fault: Some(fault), ..Event::new("nemesis", kind, "nemesis") });
    }

    async fn step(&mut self, i: usize, step: &Step) -> anyhow::Result<()> {
        let hold = Duration::from_millis(step.hold_ms);
        match &step.fault {
            Fault::Kill(t) => {
                let node = self.spared(self.resolve(*t).await);
                self.note(Type::Invoke, format!("step {i}: kill -9 broker {} ({t:?})", node + 1));
                self.cluster.nodes[node].kill9();
                tokio::time::sleep(hold).await;
                self.cluster.nodes[node].respawn()?;
                self.note(Type::Ok, format!("step {i}: broker {} started again", node + 1));
            }
            Fault::Pause(t) => {
                let node = self.spared(self.resolve(*t).await);
                self.note(Type::Invoke, format!("step {i}: SIGSTOP broker {} ({t:?})", node + 1));
                signal(&self.cluster.nodes[node], "STOP");
                tokio::time::sleep(hold).await;
                signal(&self.cluster.nodes[node], "CONT");
                self.note(Type::Ok, format!("step {i}: SIGCONT broker {}", node + 1));
            }
            Fault::Restart(t) => {
                let node = self.spared(self.resolve(*t).await);
                self.note(Type::Invoke, format!("step {i}: graceful restart of broker {} ({t:?})", node + 1));
                let r = self.cluster.nodes[node].terminate().await;
                self.cluster.nodes[node].respawn()?;
                r?;
                self.note(Type::Ok, format!("step {i}: broker {} restarted", node + 1));
            }
            Fault::Halves { minority } => {
                let n = self.cluster.nodes.len();
                let majority: Vec<usize> = (0..n).filter(|x| !minority.contains(x)).collect();
                self.note(
                    Type::Invoke,
                    format!("step {i}: partition {} | {}", ids(minority), ids(&majority)),
                );
                self.split(minority, &majority);
                self.hold_then_heal(i, hold).await;
            }
            Fault::Bridge { a, b, bridge } => {
                self.note(
                    Type::Invoke,
                    format!("step {i}: bridge: {} | {} cut, broker {} sees both", ids(a), ids(b), bridge + 1),
                );
                self.split(a, b);
                self.hold_then_heal(i, hold).await;
            }
            Fault::OneWay { node, outbound } => {
                let others: Vec<usize> = (0..self.cluster.nodes.len()).filter(|x| x != node).collect();
                let what = if *outbound { "to" } else { "from" };
                self.note(
                    Type::Invoke,
                    format!("step {i}: one-way cut: broker {} sends nothing {what} the others", node + 1),
                );
                for &o in &others {
                    let (from, to) = if *outbound { (*node, o) } else { (o, *node) };
                    self.cluster.set_link(from, to, LinkFaults::CUT);
                }
                self.hold_then_heal(i, hold).await;
            }
            Fault::Isolate(t) => {
                let node = self.resolve(*t).await;
                self.note(Type::Invoke, format!("step {i}: isolate broker {} ({t:?})", node + 1));
                self.cluster.isolate(node);
                self.hold_then_heal(i, hold).await;
            }
            Fault::Flap { a, b, period_ms } => {
                self.note(
                    Type::Invoke,
                    format!("step {i}: flap the link {}<->{} every {period_ms} ms", a + 1, b + 1),
                );
                let end = Instant::now() + hold;
                let mut cut = true;
                while Instant::now() < end {
                    let f = if cut { LinkFaults::CUT } else { LinkFaults::PASS };
                    self.cluster.set_link(*a, *b, f);
                    self.cluster.set_link(*b, *a, f);
                    cut = !cut;
                    tokio::time::sleep(Duration::from_millis(*period_ms)).await;
                }
                self.hold_then_heal(i, Duration::ZERO).await;
            }
            Fault::Links(f) => {
                self.note(Type::Invoke, format!("step {i}: every link {f:?}"));
                let n = self.cluster.nodes.len();
                for from in 0..n {
                    for to in (0..n).filter(|&t| t != from) {
                        self.cluster.set_link(from, to, *f);
                    }
                }
                self.hold_then_heal(i, hold).await;
            }
            Fault::Corrupt { node, partition, closed, pick } => {
                let node = &self.spared(*node);
                self.note(Type::Invoke, format!("step {i}: kill -9 broker {} to damage a segment", node + 1));
                self.cluster.nodes[*node].kill9();
                let dir = self.cluster.nodes[*node]
                    .data_dir
                    .join("topics")
                    .join(&self.topic)
                    .join(partition.to_string());
                let what = match flip_a_byte(&dir, *closed, *pick) {
                    Ok(w) => w,
                    Err(e) => format!("nothing damaged: {e:#}"),
                };
                self.note(Type::Info, format!("step {i}: broker {} partition {partition}: {what}", node + 1));
                tokio::time::sleep(hold).await;
                self.cluster.nodes[*node].respawn()?;
                self.note(Type::Ok, format!("step {i}: broker {} started again", node + 1));
            }
            Fault::PowerLoss(targets) => {
                let mut nodes = Vec::new();
                for t in targets {
                    let node = self.spared(self.resolve(*t).await);
                    if !nodes.contains(&node) {
                        nodes.push(node);
                    }
                }
                self.note(Type::Invoke, format!("step {i}: power loss of broker(s) {}", ids(&nodes)));
                for &node in &nodes {
                    self.cluster.nodes[node].kill9();
                }
                for &node in &nodes {
                    let b = &self.cluster.nodes[node];
                    let ledger =
                        b.sync_ledger.clone().context("power loss needs brokers with a sync ledger")?;
                    let done = super::power::power_loss(&b.data_dir, &ledger)?;
                    self.note(Type::Info, format!("step {i}: broker {}: {done}", node + 1));
                }
                tokio::time::sleep(hold).await;
                for &node in &nodes {
                    self.cluster.nodes[node].respawn()?;
                }
                self.note(Type::Ok, format!("step {i}: broker(s) {} started again", ids(&nodes)));
            }
            Fault::Membership { kill } => {
                let admin = self.cluster.client().await?;
                let added = self.cluster.add_broker(&admin, MEMBERSHIP_WAIT).await;
                let index = match added {
                    Ok(index) => index,
                    Err(e) => {
                        // A fault left the controller without a leader for longer: noted, and
                        // the run goes on (the next steps still run).
                        self.note(Type::Info, format!("step {i}: no broker added: {e:#}"));
                        admin.close().await;
                        return Ok(());
                    }
                };
                self.note(
                    Type::Invoke,
                    format!("step {i}: broker {} added and started with --join", index + 1),
                );
                match kill.map(|k| self.spared(k)) {
                    Some(k) => {
                        tokio::time::sleep(hold / 3).await;
                        self.note(
                            Type::Info,
                            format!("step {i}: kill -9 broker {} while partitions move", k + 1),
                        );
                        self.cluster.nodes[k].kill9();
                        tokio::time::sleep(hold / 3).await;
                        self.cluster.nodes[k].respawn()?;
                        self.note(Type::Info, format!("step {i}: broker {} started again", k + 1));
                        tokio::time::sleep(hold / 3).await;
                    }
                    None => tokio::time::sleep(hold).await,
                }
                let removed = self.cluster.remove_broker(&admin, index, MEMBERSHIP_WAIT).await;
                admin.close().await;
                match removed {
                    Ok(true) => self.note(Type::Ok, format!("step {i}: broker {} removed and stopped", index + 1)),
                    Ok(false) => self.note(
                        Type::Ok,
                        format!(
                            "step {i}: broker {} removed and stopped, replicas still placed on it after {MEMBERSHIP_WAIT:?}",
                            index + 1
                        ),
                    ),
                    Err(e) => {
                        // Still a member: it stays up (and is healed and read as any other).
                        self.note(Type::Info, format!("step {i}: broker {} not removed: {e:#}", index + 1))
                    }
                }
            }
            Fault::ClockStep { node, offset_s } => {
                let Some(clock) = self.cluster.nodes[*node].clock.clone() else {
                    self.note(
                        Type::Info,
                        format!("step {i}: no clock step: broker {} runs without libfaketime", node + 1),
                    );
                    return Ok(());
                };
                self.note(
                    Type::Invoke,
                    format!("step {i}: broker {}'s wall clock moved {offset_s:+} s", node + 1),
                );
                clock.set(*offset_s)?;
                tokio::time::sleep(hold).await;
                clock.set(0)?;
                self.note(Type::Ok, format!("step {i}: broker {}'s wall clock set right", node + 1));
            }
            Fault::IsolateThenKill(t) => {
                let node = self.spared(self.resolve(*t).await);
                self.note(
                    Type::Invoke,
                    format!("step {i}: isolate broker {} ({t:?}), then kill -9 it", node + 1),
                );
                self.cluster.isolate(node);
                tokio::time::sleep(hold).await;
                self.cluster.nodes[node].kill9();
                self.cluster.heal();
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.cluster.nodes[node].respawn()?;
                self.note(Type::Ok, format!("step {i}: healed, broker {} started again", node + 1));
            }
        }
        Ok(())
    }

    /// `node`, or the next member if it is the spared broker.
    fn spared(&self, node: usize) -> usize {
        match self.spare {
            Some(s) if s == node => {
                let members = self.cluster.members();
                let at = members.iter().position(|&m| m == node).unwrap_or(0);
                members.get((at + 1) % members.len().max(1)).copied().unwrap_or(node)
            }
            _ => node,
        }
    }

    /// Cuts every link between `a` and `b`, both ways.
    fn split(&self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                self.cluster.set_link(x, y, LinkFaults::CUT);
                self.cluster.set_link(y, x, LinkFaults::CUT);
            }
        }
    }

    async fn hold_then_heal(&self, i: usize, hold: Duration) {
        tokio::time::sleep(hold).await;
        self.cluster.heal();
        self.note(Type::Ok, format!("step {i}: network healed"));
    }

    /// The node a target names now: a leader's node is asked of the running brokers (the
    /// first that names one); if none does, the partition's number picks one.
    async fn resolve(&self, t: Target) -> usize {
        let n = self.cluster.nodes.len();
        match t {
            Target::Node(i) => i.min(n.saturating_sub(1)),
            Target::LeaderOf(p) => {
                let members = self.cluster.members();
                for &i in &members {
                    let view = tokio::time::timeout(
                        Duration::from_secs(3),
                        self.cluster.partition_of(i, &self.topic, p),
                    )
                    .await;
                    if let Ok(Ok(v)) = view {
                        if let Some(l) = v.leader.map(|l| self.cluster.index_of(l)) {
                            if members.contains(&l) {
                                return l;
                            }
                        }
                    }
                }
                members.get(p as usize % members.len().max(1)).copied().unwrap_or(0)
            }
        }
    }

    /// Heals every link, resumes every paused broker and starts every stopped one.
    pub async fn heal_all(&mut self) -> anyhow::Result<()> {
        self.cluster.heal();
        for i in 0..self.cluster.nodes.len() {
            if self.cluster.retired.contains(&i) {
                continue;
            }
            signal(&self.cluster.nodes[i], "CONT");
            if !self.cluster.nodes[i].is_running() {
                self.cluster.nodes[i].respawn()?;
            }
        }
        for node in &self.cluster.nodes {
            if let Some(clock) = &node.clock {
                clock.set(0)?;
            }
        }
        self.note(Type::Ok, "healed: every link passes, every broker runs".into());
        Ok(())
    }
}

fn ids(nodes: &[usize]) -> String {
    let v: Vec<String> = nodes.iter().map(|n| (n + 1).to_string()).collect();
    format!("{{{}}}", v.join(","))
}

/// `kill -<sig> <pid>` (the harness forbids unsafe code, so no libc::kill).
fn signal(node: &crate::BrokerProcess, sig: &str) {
    if let Some(pid) = node.pid() {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Flips one bit in the body of a record batch of one segment file under `dir` (the active,
/// last, one unless `closed` and a closed one exists). Returns what it did.
pub fn flip_a_byte(dir: &std::path::Path, closed: bool, pick: u64) -> anyhow::Result<String> {
    use quiver_protocol::batch::{BatchHeader, BATCH_HEADER_BYTES};
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    let Some(last) = segments.len().checked_sub(1) else { anyhow::bail!("no segment in {}", dir.display()) };
    let index = if closed && last > 0 { (pick % last as u64) as usize } else { last };
    let path = &segments[index];
    let mut bytes = std::fs::read(path)?;
    let mut batches = Vec::new();
    let mut pos = 0;
    while let Ok(h) = BatchHeader::parse(&bytes[pos..]) {
        let len = h.total_len();
        if len <= BATCH_HEADER_BYTES || pos + len > bytes.len() {
            break;
        }
        batches.push((pos, len, h.base_offset));
        pos += len;
    }
    let Some(&(start, len, base)) = batches.get((pick >> 16) as usize % batches.len().max(1)) else {
        anyhow::bail!("no whole batch in {}", path.display())
    };
    let at = start + BATCH_HEADER_BYTES + (pick >> 32) as usize % (len - BATCH_HEADER_BYTES);
    bytes[at] ^= 0x10;
    std::fs::write(path, &bytes)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let kind = if index == last { "active" } else { "closed" };
    Ok(format!("flipped a bit at byte {at} of {kind} segment {name} (the batch at offset {base})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_schedule() {
        let kinds = FaultKind::ALL;
        let a = schedule(42, Duration::from_secs(120), 3, 3, &kinds, None);
        assert_eq!(a, schedule(42, Duration::from_secs(120), 3, 3, &kinds, None));
        assert_ne!(a, schedule(43, Duration::from_secs(120), 3, 3, &kinds, None));
        assert!(a.len() > 5, "{a:?}");
        assert!(a.iter().all(|s| s.at_ms + s.hold_ms <= 120_000));
    }

    #[test]
    fn fault_lists_parse() {
        assert_eq!(FaultKind::parse_list("all"), Ok(FaultKind::ALL.to_vec()));
        assert_eq!(FaultKind::parse_list("kill,pause"), Ok(vec![FaultKind::Kill, FaultKind::Pause]));
        assert!(FaultKind::parse_list("kill,nope").is_err());
    }
}
