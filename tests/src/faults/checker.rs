//! The checker: reads a history ([`super::history`]) and reports, per anomaly kind, how many
//! it found and the first example. The definitions (docs/faults.md §Anomalies):
//!
//! Produce side (the partition's replicated log):
//! - `lost`: a produce acknowledged (`ok`) whose value is not in the final log.
//! - `duplicate`: a value of an idempotent producer at two offsets of the final log (a
//!   non-idempotent producer's retries may write a value twice: counted in the stats only).
//! - `inconsistent-offset`: a value's acknowledged offset is not where the final log has it.
//! - `divergent-replicas`: two brokers serve different values at an offset, or different logs.
//! - `phantom`: a value in the log that no producer ever sent.
//! - `unreadable-log`: a broker could not serve its whole log at the end. A broker that
//!   refuses a damaged batch it found by CRC (`CorruptLog`) is not an anomaly (it detected
//!   the damage and serves no bad bytes) but is counted in the stats (`refused_corrupt`): it
//!   did not repair the batch from its peers either.
//!
//! Group side (one consumer group reading every partition):
//! - `non-monotonic-read`: within one consumer session and partition, a first delivery
//!   (delivery count 1) at an offset not above the last first delivery, with no assignment
//!   change in between (redeliveries, count > 1, are exempt: a nack or reconnect explains them).
//! - `skipped-offset`: a log offset below the highest offset the group was delivered that the
//!   group was never delivered.
//! - `commit-went-back`: a confirmed commit of a partition below an earlier confirmed one, or the
//!   group's committed offset read at the end below the highest confirmed.
//! - `redelivered-after-commit`: a delivery of an offset below a commit confirmed before it.
//! - `acked-never-delivered`: an acknowledged produce the group was never delivered.
//!
//! The reference log of a partition is the longest one any broker served at the end (ties: the
//! lowest node); every other broker's log must equal it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::history::{Event, Type};

/// Every anomaly kind, in the order the table lists them.
pub const KINDS: &[&str] = &[
    "lost",
    "duplicate",
    "inconsistent-offset",
    "divergent-replicas",
    "phantom",
    "unreadable-log",
    "non-monotonic-read",
    "skipped-offset",
    "commit-went-back",
    "redelivered-after-commit",
    "acked-never-delivered",
];

/// The group-side kinds (the consumer-group state is kept on one broker today, so faults that
/// hit its coordinator are expected to produce some of these).
pub const GROUP_KINDS: &[&str] = &[
    "non-monotonic-read",
    "skipped-offset",
    "commit-went-back",
    "redelivered-after-commit",
    "acked-never-delivered",
];

/// `--allow` names: an anomaly kind, `group` (every group kind) or `group-redelivery`
/// (the kinds a coordinator that forgets acknowledgements and commits produces).
pub fn expand_allow(names: &[String]) -> Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    for n in names {
        match n.as_str() {
            "group" => out.extend(GROUP_KINDS.iter().map(|k| k.to_string())),
            "group-redelivery" => out.extend(
                ["redelivered-after-commit", "non-monotonic-read", "commit-went-back"].map(String::from),
            ),
            k if KINDS.contains(&k) => {
                out.insert(k.to_string());
            }
            other => {
                return Err(format!(
                    "unknown anomaly kind '{other}' (kinds: {}, group, group-redelivery)",
                    KINDS.join(", ")
                ))
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Found {
    pub count: u64,
    /// The first example, in words.
    pub first: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub produce_invoked: u64,
    pub produce_ok: u64,
    pub produce_fail: u64,
    pub produce_info: u64,
    pub duplicate_non_idempotent: u64,
    pub deliveries: u64,
    pub redeliveries: u64,
    pub distinct_delivered: u64,
    pub nacks: u64,
    pub commits_ok: u64,
    pub commits_failed: u64,
    pub nemesis_steps: u64,
    /// Broker logs that stopped at a batch the broker refused as damaged (`CorruptLog`).
    pub refused_corrupt: Vec<String>,
    /// Records in each partition's reference log.
    pub log_records: BTreeMap<u32, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: Option<u64>,
    pub anomalies: BTreeMap<String, Found>,
    /// Kinds reported but not failing the run (`--allow`).
    pub allowed: BTreeSet<String>,
    pub stats: Stats,
    /// Whether no kind outside `allowed` was found.
    pub ok: bool,
}

impl Report {
    fn note(&mut self, kind: &str, example: impl FnOnce() -> String) {
        let f = self.anomalies.entry(kind.to_string()).or_default();
        f.count += 1;
        if f.first.is_none() {
            f.first = Some(example());
        }
    }

    pub fn count(&self, kind: &str) -> u64 {
        self.anomalies.get(kind).map_or(0, |f| f.count)
    }

    /// Kinds found that fail the run.
    pub fn failing(&self) -> Vec<&str> {
        self.anomalies
            .iter()
            .filter(|(k, f)| f.count > 0 && !self.allowed.contains(*k))
            .map(|(k, _)| k.as_str())
            .collect()
    }

    /// A table: kind, count, first example (`allowed` marked).
    pub fn table(&self) -> String {
        let mut s = format!("{:<26} {:>7}  {}\n", "anomaly", "count", "first example");
        s.push_str(&format!("{}\n", "-".repeat(100)));
        for k in KINDS {
            let f = self.anomalies.get(*k).cloned().unwrap_or_default();
            let mark = if self.allowed.contains(*k) && f.count > 0 { " (allowed)" } else { "" };
            s.push_str(&format!("{:<26} {:>7}  {}{mark}\n", k, f.count, f.first.as_deref().unwrap_or("-")));
        }
        let st = &self.stats;
        s.push_str(&format!(
            "produces: {} invoked, {} ok, {} fail, {} info; deliveries {} ({} redeliveries, {} distinct values), \
             nacks {}, commits {} ok / {} failed; nemesis steps {}; log records {:?}; \
             duplicates of non-idempotent producers (allowed: at least once) {}; \
             logs a broker refused as damaged (CorruptLog, not repaired): {:?}\n",
            st.produce_invoked,
            st.produce_ok,
            st.produce_fail,
            st.produce_info,
            st.deliveries,
            st.redeliveries,
            st.distinct_delivered,
            st.nacks,
            st.commits_ok,
            st.commits_failed,
            st.nemesis_steps,
            st.log_records,
            st.duplicate_non_idempotent,
            st.refused_corrupt,
        ));
        s
    }
}

/// A broker's log of a partition: (offset, value) in offset order.
type Log = Vec<(u64, String)>;

/// What one produced value became.
#[derive(Debug, Default)]
struct Produced {
    partition: u32,
    idempotent: bool,
    /// The acknowledged offset, once `ok`.
    acked: Option<Option<u64>>,
    process: String,
}

#[derive(Debug)]
struct Delivery {
    t: u64,
    process: String,
    session: u64,
    partition: u32,
    offset: u64,
    value: String,
    count: u32,
}

/// Checks a whole history. `allowed` kinds are reported but do not make `ok` false.
pub fn check(events: &[Event], allowed: &BTreeSet<String>) -> Report {
    let mut r = Report {
        seed: events.iter().find_map(|e| e.seed),
        anomalies: KINDS.iter().map(|k| (k.to_string(), Found::default())).collect(),
        allowed: allowed.clone(),
        stats: Stats::default(),
        ok: true,
    };
    let produced = produces(events, &mut r.stats);
    let logs = final_logs(events, &mut r);
    check_logs(&produced, &logs, &mut r);
    check_group(events, &produced, &logs, &mut r);
    r.stats.nemesis_steps =
        events.iter().filter(|e| e.f == "nemesis" && e.kind == Type::Invoke).count() as u64;
    r.ok = r.failing().is_empty();
    r
}

fn produces(events: &[Event], st: &mut Stats) -> HashMap<String, Produced> {
    let mut produced: HashMap<String, Produced> = HashMap::new();
    for e in events.iter().filter(|e| e.f == "produce") {
        let Some(v) = &e.value else { continue };
        match e.kind {
            Type::Invoke => {
                st.produce_invoked += 1;
                produced.insert(
                    v.clone(),
                    Produced {
                        partition: e.partition.unwrap_or(0),
                        idempotent: e.idempotent.unwrap_or(false),
                        acked: None,
                        process: e.process.clone(),
                    },
                );
            }
            Type::Ok => {
                st.produce_ok += 1;
                if let Some(p) = produced.get_mut(v) {
                    p.acked = Some(e.offset);
                }
            }
            Type::Fail => st.produce_fail += 1,
            Type::Info => st.produce_info += 1,
        }
    }
    produced
}

/// Each partition's reference log (offset -> value), after comparing every broker's.
fn final_logs(events: &[Event], r: &mut Report) -> BTreeMap<u32, Vec<(u64, String)>> {
    let mut by_partition: BTreeMap<u32, Vec<(usize, &Log)>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.f == "read-log") {
        let (p, node) = (e.partition.unwrap_or(0), e.node.unwrap_or(0));
        match (&e.log, e.kind) {
            (Some(log), Type::Ok) => by_partition.entry(p).or_default().push((node, log)),
            (_, Type::Fail) if e.error.as_deref().is_some_and(|e| e.starts_with("CorruptLog")) => {
                r.stats.refused_corrupt.push(format!("broker {} partition {p}", node + 1));
            }
            _ => r.note("unreadable-log", || {
                format!("broker {} partition {p}: {}", node + 1, e.error.as_deref().unwrap_or("no log"))
            }),
        }
    }
    let mut out = BTreeMap::new();
    for (p, mut logs) in by_partition {
        logs.sort_by_key(|(node, log)| (std::cmp::Reverse(log.len()), *node));
        let (ref_node, reference) = logs[0];
        for (node, log) in &logs[1..] {
            let at: HashMap<u64, &String> = reference.iter().map(|(o, v)| (*o, v)).collect();
            let differ = log.iter().find(|(o, v)| at.get(o).is_some_and(|rv| *rv != v));
            if let Some((o, v)) = differ {
                r.note("divergent-replicas", || {
                    format!(
                        "partition {p} offset {o}: broker {} has {v:?}, broker {} has {:?}",
                        node + 1,
                        ref_node + 1,
                        at.get(o)
                    )
                });
            } else if log.len() != reference.len() {
                r.note("divergent-replicas", || {
                    format!(
                        "partition {p}: broker {} serves {} records, broker {} serves {}",
                        node + 1,
                        log.len(),
                        ref_node + 1,
                        reference.len()
                    )
                });
            }
        }
        r.stats.log_records.insert(p, reference.len() as u64);
        out.insert(p, reference.clone());
    }
    out
}

fn check_logs(
    produced: &HashMap<String, Produced>,
    logs: &BTreeMap<u32, Vec<(u64, String)>>,
    r: &mut Report,
) {
    let mut where_: HashMap<&str, Vec<(u32, u64)>> = HashMap::new();
    for (p, log) in logs {
        for (o, v) in log {
            where_.entry(v.as_str()).or_default().push((*p, *o));
            if !produced.contains_key(v) {
                r.note("phantom", || format!("partition {p} offset {o} holds {v:?}, never sent"));
            }
        }
    }
    let mut values: Vec<(&String, &Produced)> = produced.iter().collect();
    values.sort_by(|a, b| a.0.cmp(b.0));
    for (v, pr) in values {
        let at = where_.get(v.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        if at.len() > 1 {
            if pr.idempotent {
                r.note("duplicate", || {
                    format!("{v:?} (idempotent {}) at {at:?} (partition, offset)", pr.process)
                });
            } else {
                r.stats.duplicate_non_idempotent += 1;
            }
        }
        let Some(acked) = pr.acked else { continue };
        if at.is_empty() {
            // A partition with no log read at all is reported as unreadable, not as loss.
            if logs.contains_key(&pr.partition) {
                r.note("lost", || {
                    format!(
                        "{v:?} acknowledged at {}/{acked:?} by {}, not in the final log",
                        pr.partition, pr.process
                    )
                });
            }
            continue;
        }
        if let Some(o) = acked {
            if !at.iter().any(|&(p, lo)| p == pr.partition && lo == o) {
                r.note("inconsistent-offset", || {
                    format!("{v:?} acknowledged at {}/{o}, the log has it at {at:?}", pr.partition)
                });
            }
        }
    }
}

fn deliveries(events: &[Event], st: &mut Stats) -> Vec<Delivery> {
    let mut out = Vec::new();
    for e in events.iter().filter(|e| e.f == "deliver" && e.kind == Type::Ok) {
        let (Some(p), Some(o), Some(v)) = (e.partition, e.offset, &e.value) else { continue };
        let count = e.delivery_count.unwrap_or(1);
        st.deliveries += 1;
        if count > 1 {
            st.redeliveries += 1;
        }
        out.push(Delivery {
            t: e.t,
            process: e.process.clone(),
            session: e.session.unwrap_or(0),
            partition: p,
            offset: o,
            value: v.clone(),
            count,
        });
    }
    out
}

fn check_group(
    events: &[Event],
    produced: &HashMap<String, Produced>,
    logs: &BTreeMap<u32, Vec<(u64, String)>>,
    r: &mut Report,
) {
    let ds = deliveries(events, &mut r.stats);
    r.stats.nacks = events.iter().filter(|e| e.f == "nack").count() as u64;
    if ds.is_empty() && !events.iter().any(|e| e.f == "subscribe") {
        return; // no group in this run
    }
    non_monotonic(events, &ds, r);

    // Skipped offsets and acknowledged values never delivered.
    let mut delivered: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    let mut delivered_values: BTreeSet<&str> = BTreeSet::new();
    for d in &ds {
        delivered.entry(d.partition).or_default().insert(d.offset);
        delivered_values.insert(d.value.as_str());
    }
    r.stats.distinct_delivered = delivered_values.len() as u64;
    for (p, log) in logs {
        let Some(max) = delivered.get(p).and_then(|s| s.last().copied()) else { continue };
        let seen = &delivered[p];
        for (o, v) in log.iter().filter(|(o, _)| *o < max && !seen.contains(o)) {
            r.note("skipped-offset", || {
                format!("partition {p} offset {o} ({v:?}) never delivered, the group read up to {max}")
            });
        }
    }
    let mut acked: Vec<(&String, &Produced)> = produced.iter().filter(|(_, p)| p.acked.is_some()).collect();
    acked.sort_by(|a, b| a.0.cmp(b.0));
    for (v, pr) in acked {
        if !delivered_values.contains(v.as_str()) {
            r.note("acked-never-delivered", || {
                format!("{v:?} (partition {}) never delivered to the group", pr.partition)
            });
        }
    }
    commits(events, &ds, r);
}

fn non_monotonic(events: &[Event], ds: &[Delivery], r: &mut Report) {
    // Assignment changes reset a partition's order (per process).
    let mut changes: HashMap<&str, Vec<u64>> = HashMap::new();
    for e in events.iter().filter(|e| matches!(e.f.as_str(), "assign" | "revoke" | "subscribe")) {
        changes.entry(e.process.as_str()).or_default().push(e.t);
    }
    let mut last: HashMap<(&str, u64, u32), (u64, u64)> = HashMap::new();
    for d in ds.iter().filter(|d| d.count == 1) {
        let key = (d.process.as_str(), d.session, d.partition);
        if let Some(&(prev, prev_t)) = last.get(&key) {
            let reset =
                changes.get(d.process.as_str()).is_some_and(|ts| ts.iter().any(|&t| t > prev_t && t <= d.t));
            if d.offset <= prev && !reset {
                r.note("non-monotonic-read", || {
                    format!(
                        "{} session {} partition {}: offset {} (first delivery) after {prev}",
                        d.process, d.session, d.partition, d.offset
                    )
                });
            }
        }
        last.insert(key, (d.offset, d.t));
    }
}

fn commits(events: &[Event], ds: &[Delivery], r: &mut Report) {
    // Confirmed commits per partition, in completion order: (t, offset).
    let mut confirmed: BTreeMap<u32, Vec<(u64, u64, String)>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.f == "commit") {
        match e.kind {
            Type::Ok => {
                r.stats.commits_ok += 1;
                for (p, o) in e.offsets.iter().flatten() {
                    confirmed.entry(*p).or_default().push((e.t, *o, e.process.clone()));
                }
            }
            Type::Fail | Type::Info => r.stats.commits_failed += 1,
            Type::Invoke => {}
        }
    }
    for (p, cs) in &confirmed {
        let mut high = 0u64;
        for (t, o, process) in cs {
            if *o < high {
                r.note("commit-went-back", || {
                    format!("partition {p}: {process} committed {o} at t={t}µs after {high} was confirmed")
                });
            }
            high = high.max(*o);
        }
    }
    for e in events.iter().filter(|e| e.f == "read-committed" && e.kind == Type::Ok) {
        let p = e.partition.unwrap_or(0);
        let high = confirmed.get(&p).and_then(|cs| cs.iter().map(|c| c.1).max());
        if let (Some(high), now) = (high, e.offset.unwrap_or(0)) {
            if now < high {
                r.note("commit-went-back", || {
                    format!("partition {p}: the group's committed offset at the end is {now}, {high} was confirmed")
                });
            }
        }
    }
    // Running maximum of confirmed commits, to find the highest confirmed before a delivery.
    let prefix: BTreeMap<u32, Vec<(u64, u64)>> = confirmed
        .iter()
        .map(|(p, cs)| {
            let mut high = 0;
            (
                *p,
                cs.iter()
                    .map(|(t, o, _)| {
                        high = high.max(*o);
                        (*t, high)
                    })
                    .collect(),
            )
        })
        .collect();
    for d in ds {
        let Some(cs) = prefix.get(&d.partition) else { continue };
        let i = cs.partition_point(|(t, _)| *t < d.t);
        if i == 0 {
            continue;
        }
        let committed = cs[i - 1].1;
        if d.offset < committed {
            r.note("redelivered-after-commit", || {
                format!(
                    "partition {} offset {} delivered to {} (count {}) at t={}µs, after offset {committed} was committed",
                    d.partition, d.offset, d.process, d.count, d.t
                )
            });
        }
    }
}
