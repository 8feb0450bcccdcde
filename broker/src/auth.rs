//! Who a connection is and what it may do (docs/security.md).
//!
//! **Authentication** gives a connection a principal: the subject common name of a client
//! certificate signed by `--client-ca` (checked by rustls during the handshake), or the owner
//! of a token presented in `Hello` (`--token-file`: opaque tokens kept as SHA-256 hashes). A
//! connection with neither is anonymous: refused unless `--allow-anonymous`, in which case it
//! is the principal `anonymous`. With neither `--client-ca` nor `--token-file` authentication
//! is off: every connection may do everything (the development default, loopback only).
//!
//! **Authorisation** checks every request against ACL rules (allow rules; deny by default) and
//! `--super-users`. Rules are kept by the controller in a cluster (replayed from its log) and
//! in `<data_dir>/acls.json` on a single node; a change applies to the next request of every
//! connection, and live subscriptions re-check theirs when the rules change.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use quiver_protocol::limits::{MAX_ACL_PATTERN_BYTES, MAX_ACL_RULES, MAX_TOKEN_FILE_BYTES};
pub use quiver_protocol::message::validate_principal;
use quiver_protocol::message::{AclOperation, AclResource, AclRule, Message};
use quiver_protocol::ErrorCode;

use crate::partition::PartitionError;

/// The principal of connections without credentials when `--allow-anonymous` is given.
pub const ANONYMOUS: &str = "anonymous";

/// How a broker authenticates and authorises (from `BrokerConfig`).
#[derive(Debug)]
pub struct Auth {
    /// Client certificates or tokens are accepted: authorisation applies.
    enabled: bool,
    allow_anonymous: bool,
    super_users: BTreeSet<String>,
    tokens: Option<TokenFile>,
    pub acls: Arc<Acls>,
    /// When the last audit line was logged (ms since the epoch): at most one a second.
    last_audit_log_ms: AtomicU64,
    /// Open connections per authenticated principal, at most `max_per_principal` each.
    connections: Counts,
    max_per_principal: usize,
    /// Open client streams per principal, at most `max_streams_per_principal` each.
    streams: Arc<Counts>,
    max_streams_per_principal: usize,
    pub quotas: Quotas,
}

/// How many of something each principal holds.
type Counts = dashmap::DashMap<Arc<str>, usize>;

/// One fewer for `principal` (its entry goes at 0).
fn give_back(counts: &Counts, principal: &Arc<str>) {
    counts.remove_if_mut(principal, |_, n| {
        *n = n.saturating_sub(1);
        *n == 0
    });
}

/// A client stream's place in its principal's count; given back when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    counted: Option<(Arc<Counts>, Arc<str>)>,
}

impl StreamSlot {
    /// A stream counted against nobody (a peer's).
    pub fn uncounted() -> StreamSlot {
        StreamSlot { counted: None }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Some((counts, principal)) = self.counted.take() {
            give_back(&counts, &principal);
        }
    }
}

impl Auth {
    /// From the broker's settings; `acl_file` keeps the rules on a single node (`None` in a
    /// cluster, where the controller's log keeps them).
    pub fn new(config: &crate::config::BrokerConfig, acl_file: Option<PathBuf>) -> anyhow::Result<Auth> {
        let tokens = match &config.token_file {
            Some(path) => Some(TokenFile::open(path)?),
            None => None,
        };
        let acls = Arc::new(match acl_file {
            Some(path) => Acls::load(path)?,
            None => Acls::default(),
        });
        Ok(Auth {
            enabled: config.auth_enabled(),
            allow_anonymous: config.allow_anonymous,
            super_users: config.super_users.iter().cloned().collect(),
            tokens,
            acls,
            last_audit_log_ms: AtomicU64::new(0),
            connections: dashmap::DashMap::new(),
            max_per_principal: config.max_connections_per_principal,
            streams: Arc::new(dashmap::DashMap::new()),
            max_streams_per_principal: config.max_streams_per_principal,
            quotas: Quotas::new(config),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether connections must present credentials (authentication on, no anonymous access).
    pub fn requires_credentials(&self) -> bool {
        self.enabled && !self.allow_anonymous
    }

    /// The principal a connection acts as, or why it may do nothing: peers (brokers) are not
    /// checked; with authentication off every connection acts as `anonymous`.
    fn principal_of(&self, conn: &crate::groups::ConnectionInfo) -> Result<Arc<str>, PartitionError> {
        if let Some(p) = conn.principal() {
            return Ok(p);
        }
        if !self.enabled || self.allow_anonymous {
            return Ok(Arc::from(ANONYMOUS));
        }
        Err(PartitionError::new(
            ErrorCode::Unauthenticated,
            "this broker requires authentication: present a client certificate (--cert/--key) or a token \
             (--token / QUIVER_TOKEN)",
        ))
    }

    /// Gives the connection its principal, counting it against the principal's connections
    /// (`max_connections_per_principal`); a connection that had another principal gives that
    /// one's place back.
    pub fn admit(
        &self,
        conn: &crate::groups::ConnectionInfo,
        principal: Arc<str>,
    ) -> Result<(), PartitionError> {
        self.take_one(&self.connections, &principal, self.max_per_principal, "connections", "connect")?;
        if let Some(old) = conn.replace_principal(principal) {
            self.forget(&old);
        }
        conn.set_anonymous(false);
        Ok(())
    }

    /// Admits a connection without credentials as the principal `anonymous` (counted against
    /// that principal's connections; its streams are bounded per connection only).
    pub fn admit_anonymous(&self, conn: &crate::groups::ConnectionInfo) -> Result<(), PartitionError> {
        self.admit(conn, Arc::from(ANONYMOUS))?;
        conn.set_anonymous(true);
        Ok(())
    }

    /// Counts a stream the client opened against its principal's `max_streams_per_principal`.
    /// Only authenticated principals are counted: anonymous connections (authentication off, or
    /// `--allow-anonymous`) are bounded by `max_streams_per_connection` alone, and a connection
    /// that has yet to authenticate may hold `UNAUTHENTICATED_STREAMS` (the server refuses
    /// more), and is closed unless it authenticates within 10 s. Peers are not counted.
    pub fn open_stream(&self, conn: &crate::groups::ConnectionInfo) -> Result<StreamSlot, PartitionError> {
        let principal = match conn.principal() {
            Some(p) if !conn.is_peer() && !conn.is_anonymous() && self.enabled => p,
            _ => return Ok(StreamSlot::uncounted()),
        };
        self.take_one(&self.streams, &principal, self.max_streams_per_principal, "streams", "stream")?;
        Ok(StreamSlot { counted: Some((Arc::clone(&self.streams), principal)) })
    }

    /// One more of `what` for `principal`, unless it holds `max` already (then a clear
    /// refusal naming the setting, counted and logged as an audit line).
    fn take_one(
        &self,
        counts: &Counts,
        principal: &Arc<str>,
        max: usize,
        what: &'static str,
        operation: &'static str,
    ) -> Result<(), PartitionError> {
        let mut n = counts.entry(principal.clone()).or_insert(0);
        if *n < max {
            *n += 1;
            return Ok(());
        }
        metrics::counter!("quiver_auth_denied_total", "operation" => operation, "outcome" => "limit")
            .increment(1);
        let text = format!(
            "principal '{}' holds {} {what} (max_{what}_per_principal)",
            principal.escape_debug(),
            *n
        );
        if self.may_log_audit() {
            tracing::warn!("refused: {text}");
        }
        Err(PartitionError::new(ErrorCode::LimitExceeded, text))
    }

    /// A closed connection gives its principal's place back.
    pub fn release(&self, conn: &crate::groups::ConnectionInfo) {
        if let Some(p) = conn.principal() {
            self.forget(&p);
        }
    }

    fn forget(&self, principal: &Arc<str>) {
        give_back(&self.connections, principal);
    }

    /// The quota bucket of the connection's principal for `direction`, if it has one (peers
    /// have none).
    pub fn quota(
        &self,
        conn: &crate::groups::ConnectionInfo,
        direction: Direction,
    ) -> Option<Arc<RateBucket>> {
        if conn.is_peer() || self.quotas.config.is_empty() {
            return None;
        }
        let principal = conn.principal().unwrap_or_else(|| Arc::from(ANONYMOUS));
        self.quotas.bucket(&principal, direction)
    }

    /// Checks that the connection has a principal (or may act as `anonymous`).
    pub fn authenticated(&self, conn: &crate::groups::ConnectionInfo) -> Result<(), PartitionError> {
        if conn.is_peer() || !self.enabled {
            return Ok(());
        }
        self.principal_of(conn).map(drop)
    }

    /// Checks that the connection may do `operation` on the named resource; the error says
    /// who was refused what. Denials are counted and logged (at most one line a second).
    pub fn check(
        &self,
        conn: &crate::groups::ConnectionInfo,
        operation: AclOperation,
        resource: AclResource,
        name: &str,
    ) -> Result<(), PartitionError> {
        if conn.is_peer() || !self.enabled {
            return Ok(());
        }
        let principal = match self.principal_of(conn) {
            Ok(p) => p,
            Err(e) => {
                self.audit("unauthenticated", ANONYMOUS, operation, resource, name);
                return Err(e);
            }
        };
        if self.super_users.contains(&*principal) || self.acls.allows(&principal, operation, resource, name) {
            return Ok(());
        }
        self.audit("denied", &principal, operation, resource, name);
        let what = match resource {
            AclResource::Cluster => "the cluster".to_string(),
            r => format!("{} '{}'", r.name(), name.escape_debug()),
        };
        let verb = match (operation, resource) {
            (AclOperation::Produce, _) => "produce to",
            (AclOperation::Consume, AclResource::Group) => "consume as a member of",
            (AclOperation::Consume, _) => "consume from",
            (AclOperation::Commit, _) => "commit offsets of",
            (AclOperation::Create, _) => "create",
            (AclOperation::Delete, _) => "delete",
            (AclOperation::Admin, _) => "administer",
        };
        Err(PartitionError::new(
            ErrorCode::NotAuthorized,
            format!(
                "not authorised: principal '{}' may not {verb} {what} (needs `{}` on it: `quiver acl add`)",
                principal.escape_debug(),
                operation.name()
            ),
        ))
    }

    /// Checks everything `msg` asks for (the table in docs/security.md); `Ok` for requests
    /// any authenticated principal may make.
    pub fn authorize(
        &self,
        conn: &crate::groups::ConnectionInfo,
        msg: &Message,
    ) -> Result<(), PartitionError> {
        use AclOperation::*;
        use AclResource::{Cluster, Group, Topic};
        if conn.is_peer() || !self.enabled {
            return Ok(());
        }
        match msg {
            Message::Hello { .. } => Ok(()),
            Message::Produce { topic, .. } => self.check(conn, Produce, Topic, topic),
            Message::Fetch { topic, .. } | Message::OffsetForTime { topic, .. } => {
                self.check(conn, Consume, Topic, topic)
            }
            Message::Subscribe(sub) => self.check_subscribe(conn, sub),
            Message::CommitOffset { group, topic, .. } => {
                self.check(conn, Commit, Group, group)?;
                self.check(conn, Consume, Topic, topic)
            }
            Message::FetchOffsets { group, topic } => {
                self.check(conn, Consume, Group, group)?;
                self.check(conn, Consume, Topic, topic)
            }
            Message::JoinGroup { group, topic, .. } => {
                self.check(conn, Consume, Group, group)?;
                self.check(conn, Consume, Topic, topic)
            }
            Message::Heartbeat { group, .. }
            | Message::LeaveGroup { group, .. }
            | Message::DescribeGroup { group } => self.check(conn, Consume, Group, group),
            Message::CreateTopic { name, .. } => self.check(conn, Create, Topic, name),
            Message::DeleteTopic { name } => self.check(conn, Delete, Topic, name),
            Message::ChangeBrokers { .. } | Message::ChangeAcls { .. } | Message::ListAcls => {
                self.check(conn, Admin, Cluster, "*")
            }
            // Names and placement (what routing needs), producer ids (worthless without
            // produce permission on a topic), group names: any authenticated principal.
            _ => self.principal_of(conn).map(drop),
        }
    }

    /// Whether the connection may learn of a topic or group at all: it may do something with
    /// it (any operation a rule or `--super-users` gives it). Listings leave the rest out.
    pub fn may_see(&self, conn: &crate::groups::ConnectionInfo, resource: AclResource, name: &str) -> bool {
        if conn.is_peer() || !self.enabled {
            return true;
        }
        let Ok(principal) = self.principal_of(conn) else { return false };
        self.super_users.contains(&*principal)
            || AclOperation::ALL.into_iter().any(|op| self.acls.allows(&principal, op, resource, name))
    }

    /// The refusal of a request about a resource the connection may not see.
    pub fn unseen(
        &self,
        conn: &crate::groups::ConnectionInfo,
        resource: AclResource,
        name: &str,
    ) -> PartitionError {
        let principal = conn.principal().map_or_else(|| ANONYMOUS.to_string(), |p| p.to_string());
        self.audit("denied", &principal, AclOperation::Consume, resource, name);
        PartitionError::new(
            ErrorCode::NotAuthorized,
            format!(
                "not authorised: principal '{}' may not use {} '{}' (no rule gives it any operation on it: `quiver acl add`)",
                principal.escape_debug(),
                resource.name(),
                name.escape_debug()
            ),
        )
    }

    /// What a subscription needs: consume on its topic (and group), produce on its
    /// dead-letter topic.
    pub fn check_subscribe(
        &self,
        conn: &crate::groups::ConnectionInfo,
        sub: &quiver_protocol::message::Subscribe,
    ) -> Result<(), PartitionError> {
        use AclOperation::*;
        use AclResource::{Group, Topic};
        self.check(conn, Consume, Topic, &sub.topic)?;
        if let Some(group) = &sub.group {
            self.check(conn, Consume, Group, group)?;
        }
        // The dead-letter topic the subscription will write (subscription::dead_letter_topic):
        // the one named, or `<topic>.dlq`, which is also created when missing.
        if sub.policy.max_deliveries > 0 {
            match &sub.policy.dead_letter_topic {
                Some(dlq) => self.check(conn, Produce, Topic, dlq)?,
                None => {
                    let dlq = format!("{}.dlq", sub.topic);
                    self.check(conn, Produce, Topic, &dlq)?;
                    self.check(conn, Create, Topic, &dlq)?;
                }
            }
        }
        Ok(())
    }

    /// Authenticates a token presented in `Hello`: its owner, or why not. Blocking (the token
    /// file is read again when it changed).
    pub fn authenticate_token_blocking(&self, token: &str) -> Result<Arc<str>, String> {
        let result = match &self.tokens {
            None => Err("this broker accepts no tokens (no --token-file)".to_string()),
            Some(tokens) => tokens.authenticate_blocking(token),
        };
        if let Err(why) = &result {
            metrics::counter!("quiver_auth_failures_total", "method" => "token").increment(1);
            if self.may_log_audit() {
                tracing::warn!("token refused: {why}");
            }
        }
        result
    }

    fn audit(&self, outcome: &'static str, principal: &str, op: AclOperation, res: AclResource, name: &str) {
        metrics::counter!("quiver_auth_denied_total", "operation" => op.name(), "outcome" => outcome)
            .increment(1);
        if self.may_log_audit() {
            tracing::warn!(
                principal = %principal.escape_debug(),
                operation = op.name(),
                resource = res.name(),
                name = %name.escape_debug(),
                "{outcome}"
            );
        }
    }

    /// At most one audit line a second, so a client hammering a refused operation cannot fill
    /// the log (the counters count every one).
    fn may_log_audit(&self) -> bool {
        let now = now_ms();
        let last = self.last_audit_log_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= 1000
            && self
                .last_audit_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A live subscription's permission, checked again whenever the ACL rules change: a revoked
/// one ends the subscription with `NotAuthorized`.
#[derive(Debug)]
pub struct Permission {
    auth: Arc<Auth>,
    conn: crate::groups::ConnectionMembers,
    sub: quiver_protocol::message::Subscribe,
    version: tokio::sync::watch::Receiver<u64>,
}

impl Permission {
    /// For a client's subscription when authorisation applies; `None` otherwise (peers,
    /// authentication off).
    pub fn watch(
        auth: &Arc<Auth>,
        conn: &crate::groups::ConnectionMembers,
        sub: &quiver_protocol::message::Subscribe,
    ) -> Option<Permission> {
        (auth.enabled && !conn.is_peer()).then(|| Permission {
            auth: auth.clone(),
            conn: conn.clone(),
            sub: sub.clone(),
            version: auth.acls.subscribe(),
        })
    }

    /// Whether the rules changed since the last check (cheap: one atomic load).
    pub fn changed(&self) -> bool {
        self.version.has_changed().unwrap_or(false)
    }

    /// Another receiver of the rules' version, for a loop to wait on.
    pub fn watcher(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.clone()
    }

    /// Whether the subscription is still allowed by the rules in force now (for a loop that
    /// only looks now and then: a relayed subscription).
    pub fn still_allowed(&self) -> bool {
        self.auth.check_subscribe(&self.conn, &self.sub).is_ok()
    }

    /// Checks the subscription against the rules in force now.
    pub fn recheck(&mut self) -> Result<(), PartitionError> {
        self.version.borrow_and_update();
        self.auth.check_subscribe(&self.conn, &self.sub)
    }
}

/// The principal a client certificate names: its subject common name (docs/security.md).
pub fn certificate_principal(cert: &[u8]) -> Result<String, String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| format!("unreadable certificate: {e}"))?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .ok_or("the certificate's subject has no common name (CN), which names the principal")?;
    let name = cn.as_str().map_err(|e| format!("the certificate's common name is not text: {e}"))?;
    validate_principal(name)?;
    Ok(name.to_string())
}

/// Checks one ACL rule as a client sent it.
pub fn validate_rule(rule: &AclRule) -> Result<(), String> {
    if rule.principal != "*" {
        validate_principal(&rule.principal)?;
    }
    let p = &rule.pattern;
    if p.is_empty() || p.len() > MAX_ACL_PATTERN_BYTES || p.chars().any(char::is_control) {
        return Err(format!(
            "pattern '{}': 1 to {MAX_ACL_PATTERN_BYTES} bytes, no control characters",
            p.escape_debug()
        ));
    }
    if p[..p.len() - 1].contains('*') {
        return Err(format!(
            "pattern '{}': '*' may only end it (a prefix) or be all of it",
            p.escape_debug()
        ));
    }
    if rule.resource == AclResource::Cluster && p != "*" {
        return Err("a cluster rule's pattern is '*'".into());
    }
    use AclOperation::*;
    let meaningful: &[AclOperation] = match rule.resource {
        AclResource::Topic => &[Produce, Consume, Create, Delete],
        AclResource::Group => &[Consume, Commit],
        AclResource::Cluster => &[Admin],
    };
    if !meaningful.contains(&rule.operation) {
        let names: Vec<&str> = meaningful.iter().map(|o| o.name()).collect();
        return Err(format!(
            "'{}' on a {} means nothing: a {} rule allows {}",
            rule.operation.name(),
            rule.resource.name(),
            rule.resource.name(),
            names.join(", ")
        ));
    }
    Ok(())
}

/// Whether `pattern` (a name, `prefix*` or `*`) matches `name`. The broker's own topics
/// (`__offsets`: every group's commits) are matched only by patterns that name them (`__*`
/// or the name): `*` and other prefixes never reach them.
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(_) if name.starts_with("__") && !pattern.starts_with("__") => false,
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// The ACL rules in force, and a version that moves on every change (live subscriptions
/// watch it to re-check their permission).
#[derive(Debug)]
pub struct Acls {
    rules: RwLock<Arc<BTreeSet<AclRule>>>,
    version: tokio::sync::watch::Sender<u64>,
    /// Single node: where the rules are kept (`None` in a cluster).
    file: Option<PathBuf>,
    /// Held while a change is written (single node), so changes land in order.
    writing: Mutex<()>,
}

impl Default for Acls {
    fn default() -> Self {
        Acls {
            rules: RwLock::default(),
            version: tokio::sync::watch::Sender::new(0),
            file: None,
            writing: Mutex::new(()),
        }
    }
}

impl Acls {
    /// The rules kept in `path` (none when it does not exist yet).
    fn load(path: PathBuf) -> anyhow::Result<Acls> {
        use anyhow::Context;
        let rules: BTreeSet<AclRule> = match std::fs::read(&path) {
            Ok(bytes) => {
                let stored: Vec<StoredRule> =
                    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
                stored
                    .into_iter()
                    .map(StoredRule::into_rule)
                    .collect::<Result<_, _>>()
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Acls { rules: RwLock::new(Arc::new(rules)), file: Some(path), ..Default::default() })
    }

    /// Every rule, in order.
    pub fn list(&self) -> Vec<AclRule> {
        self.rules.read().iter().cloned().collect()
    }

    pub fn contains(&self, rule: &AclRule) -> bool {
        self.rules.read().contains(rule)
    }

    /// Watches the version, which moves on every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn allows(&self, principal: &str, operation: AclOperation, resource: AclResource, name: &str) -> bool {
        self.rules.read().iter().any(|r| {
            r.operation == operation
                && r.resource == resource
                && (r.principal == "*" || r.principal == principal)
                && matches(&r.pattern, name)
        })
    }

    /// Applies a change in memory (a cluster's controller, replaying or applying its log).
    pub fn apply(&self, add: bool, rules: &[AclRule]) -> Result<(), PartitionError> {
        let mut current = self.rules.write();
        *current = Arc::new(changed(&current, add, rules)?);
        drop(current);
        self.version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Applies a change and keeps the rules in the file (single node). Blocking.
    pub fn change_blocking(&self, add: bool, rules: &[AclRule]) -> Result<(), PartitionError> {
        let _writing = self.writing.lock();
        let Some(path) = &self.file else { return self.apply(add, rules) };
        let next = changed(&self.rules.read(), add, rules)?;
        let stored: Vec<StoredRule> = next.iter().map(StoredRule::from).collect();
        let json = serde_json::to_vec_pretty(&stored).unwrap_or_default();
        write_durably(path, &json).map_err(|e| {
            PartitionError::new(ErrorCode::StorageError, format!("writing {}: {e}", path.display()))
        })?;
        // Durable first, then in force: a rule a client was told is in place survives a crash.
        self.apply(add, rules)
    }
}

/// `current` with `rules` added (or removed), within `MAX_ACL_RULES`.
fn changed(
    current: &BTreeSet<AclRule>,
    add: bool,
    rules: &[AclRule],
) -> Result<BTreeSet<AclRule>, PartitionError> {
    let mut next = current.clone();
    for rule in rules {
        if add {
            next.insert(rule.clone());
        } else {
            next.remove(rule);
        }
    }
    if next.len() > MAX_ACL_RULES {
        return Err(PartitionError::new(
            ErrorCode::LimitExceeded,
            format!("at most {MAX_ACL_RULES} ACL rules are kept (MAX_ACL_RULES)"),
        ));
    }
    Ok(next)
}

/// Writes `data` to `path` through a temporary file, fsynced, renamed, directory fsynced.
fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// An ACL rule as `acls.json` and the controller's log keep it (names, not codes).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredRule {
    pub principal: String,
    pub resource: String,
    pub pattern: String,
    pub operation: String,
}

impl From<&AclRule> for StoredRule {
    fn from(r: &AclRule) -> Self {
        StoredRule {
            principal: r.principal.clone(),
            resource: r.resource.name().to_string(),
            pattern: r.pattern.clone(),
            operation: r.operation.name().to_string(),
        }
    }
}

impl StoredRule {
    pub fn into_rule(self) -> Result<AclRule, String> {
        let resource = AclResource::ALL
            .into_iter()
            .find(|r| r.name() == self.resource)
            .ok_or_else(|| format!("unknown ACL resource '{}'", self.resource.escape_debug()))?;
        let operation = AclOperation::parse(&self.operation)
            .ok_or_else(|| format!("unknown ACL operation '{}'", self.operation.escape_debug()))?;
        let rule = AclRule { principal: self.principal, resource, pattern: self.pattern, operation };
        validate_rule(&rule)?;
        Ok(rule)
    }
}

/// Opaque tokens, kept hashed: `<principal> sha256:<hex> [expires=<unix seconds>]` per line,
/// `#` comments. Read again when the file changes, so tokens are added and revoked without a
/// restart.
#[derive(Debug)]
struct TokenFile {
    path: PathBuf,
    loaded: Mutex<LoadedTokens>,
}

#[derive(Debug, Default)]
struct LoadedTokens {
    /// The file's modification time and length when read.
    stamp: Option<(SystemTime, u64)>,
    /// Token hash (hex) → (principal, expiry in unix seconds).
    by_hash: HashMap<String, (Arc<str>, Option<u64>)>,
}

impl TokenFile {
    fn open(path: &Path) -> anyhow::Result<TokenFile> {
        let file = TokenFile { path: path.to_path_buf(), loaded: Mutex::default() };
        file.refresh_blocking(true).map_err(|e| anyhow::anyhow!("--token-file {}: {e}", path.display()))?;
        Ok(file)
    }

    /// Reads the file again if its modification time or length changed. A bad line is skipped
    /// with a warning and the rest apply (a typo must not keep the broker from starting). With
    /// `strict` (at start) a file that cannot be read is an error; afterwards a file that is
    /// gone or too large admits nobody: a revocation never fails open.
    fn refresh_blocking(&self, strict: bool) -> Result<(), String> {
        let mut loaded = self.loaded.lock();
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) if !strict => {
                if loaded.stamp.is_some() {
                    tracing::warn!(
                        "token file {}: {e}; no token is accepted until it is back",
                        self.path.display()
                    );
                }
                *loaded = LoadedTokens::default();
                return Ok(());
            }
            Err(e) => return Err(format!("reading {}: {e}", self.path.display())),
        };
        let stamp = (meta.modified().unwrap_or(UNIX_EPOCH), meta.len());
        if loaded.stamp == Some(stamp) {
            return Ok(());
        }
        let text = if meta.len() > MAX_TOKEN_FILE_BYTES {
            Err(format!("{} is larger than {MAX_TOKEN_FILE_BYTES} bytes", self.path.display()))
        } else {
            std::fs::read_to_string(&self.path).map_err(|e| format!("reading {}: {e}", self.path.display()))
        };
        let text = match text {
            Ok(t) => t,
            Err(e) if strict => return Err(e),
            Err(e) => {
                tracing::warn!("token file: {e}; no token is accepted until it is fixed");
                *loaded = LoadedTokens { stamp: Some(stamp), by_hash: HashMap::new() };
                return Ok(());
            }
        };
        let mut by_hash = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match parse_token_line(line) {
                Ok((principal, hash, expires)) => {
                    by_hash.insert(hash, (Arc::from(principal), expires));
                }
                Err(e) => tracing::warn!("token file {} line {}: {e}; skipped", self.path.display(), n + 1),
            }
        }
        *loaded = LoadedTokens { stamp: Some(stamp), by_hash };
        Ok(())
    }

    fn authenticate_blocking(&self, token: &str) -> Result<Arc<str>, String> {
        if let Err(e) = self.refresh_blocking(false) {
            tracing::warn!("token file: {e}");
        }
        let hash = hash_token(token);
        let loaded = self.loaded.lock();
        let (principal, expires) = loaded
            .by_hash
            .get(&hash)
            .ok_or("the token is unknown, altered or revoked (not in the token file)")?;
        if let Some(at) = expires {
            if now_ms() / 1000 >= *at {
                return Err(format!(
                    "the token of '{}' expired at {}",
                    principal.escape_debug(),
                    utc_time(*at)
                ));
            }
        }
        Ok(principal.clone())
    }
}

fn parse_token_line(line: &str) -> Result<(&str, String, Option<u64>), String> {
    let mut parts = line.split_whitespace();
    let principal = parts.next().ok_or("empty line")?;
    validate_principal(principal)?;
    let hash = parts
        .next()
        .and_then(|h| h.strip_prefix("sha256:"))
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or("expected `<principal> sha256:<64 hex digits> [expires=<unix seconds>]`")?;
    let expires = match parts.next() {
        None => None,
        Some(e) => Some(
            e.strip_prefix("expires=")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("'{e}': expected expires=<unix seconds>"))?,
        ),
    };
    if parts.next().is_some() {
        return Err("unexpected text after the expiry".into());
    }
    Ok((principal, hash.to_ascii_lowercase(), expires))
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC` (the civil calendar from days since the epoch).
fn utc_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The SHA-256 of a token, in lower-case hex: what a token file keeps.
pub fn hash_token(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random token (`qvt_` and 64 hex digits) and the token-file line that admits it for
/// `principal`, expiring at `expires` (unix seconds) if given.
pub fn new_token(principal: &str, expires: Option<u64>) -> anyhow::Result<(String, String)> {
    use ring::rand::SecureRandom;
    validate_principal(principal).map_err(|e| anyhow::anyhow!(e))?;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| anyhow::anyhow!("no system randomness"))?;
    let token = format!("qvt_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let mut line = format!("{principal} sha256:{}", hash_token(&token));
    if let Some(at) = expires {
        line.push_str(&format!(" expires={at}"));
    }
    Ok((token, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(principal: &str, resource: AclResource, pattern: &str, operation: AclOperation) -> AclRule {
        AclRule { principal: principal.into(), resource, pattern: pattern.into(), operation }
    }

    #[test]
    fn patterns_match_names_prefixes_and_everything() {
        let acls = Acls::default();
        acls.apply(
            true,
            &[
                rule("alice", AclResource::Topic, "orders", AclOperation::Produce),
                rule("alice", AclResource::Topic, "logs.*", AclOperation::Consume),
                rule("*", AclResource::Group, "*", AclOperation::Consume),
            ],
        )
        .unwrap();
        assert!(acls.allows("alice", AclOperation::Produce, AclResource::Topic, "orders"));
        assert!(!acls.allows("alice", AclOperation::Produce, AclResource::Topic, "orders2"));
        assert!(!acls.allows("alice", AclOperation::Consume, AclResource::Topic, "orders"));
        assert!(!acls.allows("bob", AclOperation::Produce, AclResource::Topic, "orders"));
        assert!(acls.allows("alice", AclOperation::Consume, AclResource::Topic, "logs.app"));
        assert!(!acls.allows("alice", AclOperation::Consume, AclResource::Topic, "logs"));
        assert!(acls.allows("bob", AclOperation::Consume, AclResource::Group, "any"));
        assert!(!acls.allows("bob", AclOperation::Consume, AclResource::Topic, "any"));
        acls.apply(true, &[rule("carol", AclResource::Topic, "*", AclOperation::Consume)]).unwrap();
        assert!(acls.allows("carol", AclOperation::Consume, AclResource::Topic, "x"));
        assert!(!acls.allows("carol", AclOperation::Consume, AclResource::Topic, "__offsets"), "internal");
        acls.apply(false, &[rule("alice", AclResource::Topic, "orders", AclOperation::Produce)]).unwrap();
        assert!(!acls.allows("alice", AclOperation::Produce, AclResource::Topic, "orders"));
    }

    #[test]
    fn rules_are_validated() {
        assert!(validate_rule(&rule("a", AclResource::Topic, "x*y", AclOperation::Produce)).is_err());
        assert!(validate_rule(&rule("a", AclResource::Cluster, "x", AclOperation::Admin)).is_err());
        assert!(validate_rule(&rule("a b", AclResource::Topic, "x", AclOperation::Produce)).is_err());
        assert!(validate_rule(&rule("", AclResource::Topic, "x", AclOperation::Produce)).is_err());
        assert!(validate_rule(&rule("*", AclResource::Topic, "x*", AclOperation::Produce)).is_ok());
        assert!(validate_rule(&rule("a", AclResource::Cluster, "*", AclOperation::Produce)).is_err());
        assert!(validate_rule(&rule("a", AclResource::Group, "g", AclOperation::Produce)).is_err());
    }

    #[test]
    fn single_node_rules_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acls.json");
        let acls = Acls::load(path.clone()).unwrap();
        let r = rule("alice", AclResource::Topic, "t*", AclOperation::Delete);
        acls.change_blocking(true, std::slice::from_ref(&r)).unwrap();
        assert_eq!(Acls::load(path.clone()).unwrap().list(), vec![r.clone()]);
        acls.change_blocking(false, &[r]).unwrap();
        assert!(Acls::load(path).unwrap().list().is_empty());
    }

    #[test]
    fn tokens_are_checked_by_hash_expiry_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let (alice, line) = new_token("alice", None).unwrap();
        let (old, old_line) = new_token("carol", Some(1)).unwrap();
        std::fs::write(&path, format!("# tokens\n{line}\n{old_line}\n")).unwrap();
        let file = TokenFile::open(&path).unwrap();
        assert_eq!(&*file.authenticate_blocking(&alice).unwrap(), "alice");
        assert!(file.authenticate_blocking(&old).unwrap_err().contains("expired"));
        let mut tampered = alice.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(file.authenticate_blocking(&tampered).unwrap_err().contains("unknown, altered or revoked"));
        // A token added to the file is accepted without a restart; a removed one is refused.
        let (bob, bob_line) = new_token("bob", None).unwrap();
        std::fs::write(&path, format!("{bob_line}\n")).unwrap();
        // The stamp includes the length; a rewrite of equal length within the clock's
        // resolution is the one change this could miss.
        assert_eq!(&*file.authenticate_blocking(&bob).unwrap(), "bob");
        assert!(file.authenticate_blocking(&alice).is_err());
        // A typo in an edit skips its line only; a file that is gone admits nobody.
        std::fs::write(&path, format!("{bob_line}\nnot a token line\n")).unwrap();
        assert_eq!(&*file.authenticate_blocking(&bob).unwrap(), "bob");
        std::fs::remove_file(&path).unwrap();
        assert!(file.authenticate_blocking(&bob).is_err(), "revoked by removing the file");
    }

    #[test]
    fn streams_count_against_authenticated_principals_only() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "").unwrap();
        let mut config = crate::config::BrokerConfig::new(dir.path());
        config.token_file = Some(tokens);
        config.allow_anonymous = true;
        config.max_streams_per_principal = 2;
        let auth = Auth::new(&config, None).unwrap();
        let alice = crate::groups::ConnectionInfo::new(1);
        auth.admit(&alice, Arc::from("alice")).unwrap();
        let held = [auth.open_stream(&alice).unwrap(), auth.open_stream(&alice).unwrap()];
        let refused = auth.open_stream(&alice).unwrap_err();
        assert_eq!(refused.code, ErrorCode::LimitExceeded);
        assert!(refused.message.contains("max_streams_per_principal"), "{}", refused.message);
        drop(held);
        let again = auth.open_stream(&alice).unwrap();
        // Anonymous connections (here `--allow-anonymous`) share no count, nor does one not yet
        // authenticated; a token later presented on an anonymous connection counts from then.
        let anon = crate::groups::ConnectionInfo::new(2);
        auth.admit_anonymous(&anon).unwrap();
        let free: Vec<_> = (0..5).map(|_| auth.open_stream(&anon).unwrap()).collect();
        let fresh = crate::groups::ConnectionInfo::new(3);
        let early: Vec<_> = (0..5).map(|_| auth.open_stream(&fresh).unwrap()).collect();
        auth.admit(&anon, Arc::from("alice")).unwrap();
        let _second = auth.open_stream(&anon).unwrap();
        assert!(auth.open_stream(&anon).is_err(), "alice holds two streams");
        drop((free, early, again));
    }

    #[test]
    fn a_malformed_line_is_skipped_and_a_missing_file_is_an_error_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let (bob, line) = new_token("bob", None).unwrap();
        std::fs::write(&path, format!("alice sha256:abc\n{line}\n")).unwrap();
        let file = TokenFile::open(&path).unwrap();
        assert_eq!(&*file.authenticate_blocking(&bob).unwrap(), "bob");
        assert!(TokenFile::open(&dir.path().join("missing")).is_err());
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }
}

/// Byte-rate quotas per principal (`BrokerConfig::quotas`): one bucket per principal and
/// direction, shared by all its connections.
#[derive(Debug, Default)]
pub struct Quotas {
    config: std::collections::BTreeMap<String, crate::config::Quota>,
    produce: dashmap::DashMap<Arc<str>, Arc<RateBucket>>,
    consume: dashmap::DashMap<Arc<str>, Arc<RateBucket>>,
}

/// Which way the bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Produce,
    Consume,
}

impl Quotas {
    pub fn new(config: &crate::config::BrokerConfig) -> Quotas {
        Quotas { config: config.quotas.clone(), ..Default::default() }
    }

    /// The bucket of `principal` for `direction`, if it has a quota (its own or `"*"`'s).
    pub fn bucket(&self, principal: &Arc<str>, direction: Direction) -> Option<Arc<RateBucket>> {
        if self.config.is_empty() {
            return None;
        }
        let q = self.config.get(&**principal).or_else(|| self.config.get("*"))?;
        let (rate, map) = match direction {
            Direction::Produce => (q.produce_bytes_per_sec?, &self.produce),
            Direction::Consume => (q.consume_bytes_per_sec?, &self.consume),
        };
        Some(map.entry(principal.clone()).or_insert_with(|| Arc::new(RateBucket::new(rate))).clone())
    }
}

/// A token bucket that goes into debt: `take(bytes)` always succeeds and says how long the
/// taker should wait before it takes more, so a principal's bytes average `rate` per second
/// with at most a tenth of a second's burst, however many connections share the bucket.
#[derive(Debug)]
pub struct RateBucket {
    rate: f64,
    burst: f64,
    /// Bytes available (negative: owed), and when that was computed.
    state: Mutex<(f64, std::time::Instant)>,
}

impl RateBucket {
    pub fn new(bytes_per_sec: u64) -> RateBucket {
        let rate = bytes_per_sec.max(1) as f64;
        RateBucket { rate, burst: rate / 10.0, state: Mutex::new((rate / 10.0, std::time::Instant::now())) }
    }

    /// Gives back bytes taken but not used.
    pub fn refund(&self, bytes: usize) {
        if bytes > 0 {
            let mut s = self.state.lock();
            s.0 = (s.0 + bytes as f64).min(self.burst);
        }
    }

    /// Takes `bytes`; how long to wait before the next take.
    pub fn take(&self, bytes: usize) -> std::time::Duration {
        let now = std::time::Instant::now();
        let mut s = self.state.lock();
        let refill = now.saturating_duration_since(s.1).as_secs_f64() * self.rate;
        s.0 = (s.0 + refill).min(self.burst) - bytes as f64;
        s.1 = now;
        if s.0 >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-s.0 / self.rate)
        }
    }
}
