//! The history of a run: every operation's invocation and completion as one JSON object per
//! line (Jepsen's shape): `{"t":..,"process":..,"type":"invoke|ok|fail|info","f":..,...}`.
//!
//! `t` is microseconds since the run started (the harness's monotonic clock). `type` says what
//! an event is: `invoke` (an operation begins), `ok` (it took effect), `fail` (it certainly did
//! not), `info` (its outcome is unknown: a timeout, a lost connection). Events without an
//! invocation (`deliver`, `ack`, `nack`, the nemesis's, the final reads) are recorded as `ok`
//! or `info` alone. docs/faults.md lists every `f` and its fields.

use std::collections::BTreeMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// What an event says of its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Type {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// One line of the history. Fields an operation does not have are left out of the JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub t: u64,
    pub process: String,
    #[serde(rename = "type")]
    pub kind: Type,
    pub f: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// A consumer's session (a new subscription: at start, or after its stream failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_count: Option<u32>,
    /// Of a produce: whether the producer was idempotent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotent: Option<bool>,
    /// Of a produce: `all` or `leader`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acks: Option<String>,
    /// Of a commit's completion: partition -> committed offset (the next to consume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offsets: Option<BTreeMap<u32, u64>>,
    /// Of assign/revoke: the partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<u32>>,
    /// Of a final read: the broker (node index, 0-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<usize>,
    /// Of `read-log`: the broker's whole log of the partition as (offset, value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<Vec<(u64, String)>>,
    /// Of the nemesis: what it did; of a failure: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    /// Of `run`: the seed and the options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Event {
    pub fn new(process: impl Into<String>, kind: Type, f: &str) -> Event {
        Event {
            t: 0,
            process: process.into(),
            kind,
            f: f.into(),
            topic: None,
            partition: None,
            offset: None,
            value: None,
            session: None,
            delivery_count: None,
            idempotent: None,
            acks: None,
            offsets: None,
            partitions: None,
            node: None,
            log: None,
            error: None,
            fault: None,
            seed: None,
        }
    }

    pub fn at(mut self, t: u64) -> Event {
        self.t = t;
        self
    }

    pub fn tp(mut self, topic: &str, partition: u32) -> Event {
        self.topic = Some(topic.into());
        self.partition = Some(partition);
        self
    }

    pub fn offset(mut self, offset: u64) -> Event {
        self.offset = Some(offset);
        self
    }

    pub fn value(mut self, value: impl Into<String>) -> Event {
        self.value = Some(value.into());
        self
    }

    pub fn session(mut self, session: u64) -> Event {
        self.session = Some(session);
        self
    }

    pub fn error(mut self, e: impl ToString) -> Event {
        self.error = Some(e.to_string());
        self
    }
}

/// Appends events to a history file; shared by every task of a run. The lock is held for one
/// line's write (a test harness: a few thousand events a second).
#[derive(Debug, Clone)]
pub struct Recorder {
    start: Instant,
    out: Arc<Mutex<BufWriter<std::fs::File>>>,
}

impl Recorder {
    pub fn create(path: &Path) -> anyhow::Result<Recorder> {
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Recorder { start: Instant::now(), out: Arc::new(Mutex::new(BufWriter::new(file))) })
    }

    /// Microseconds since the run started.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// Stamps `event` with the time and writes it.
    pub fn record(&self, mut event: Event) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        event.t = self.now();
        if let Ok(line) = serde_json::to_string(&event) {
            let _ = writeln!(out, "{line}");
        }
    }

    pub fn flush(&self) -> std::io::Result<()> {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// Reads a history file written by [`Recorder`].
pub fn load(path: &Path) -> anyhow::Result<Vec<Event>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut events = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        events
            .push(serde_json::from_str(&line).with_context(|| format!("{} line {}", path.display(), i + 1))?);
    }
    Ok(events)
}
