//! Request rate limits, exact across all workers of one host.
//!
//! Each limit is GCRA: per key, one timestamp (the theoretical arrival time of the next request)
//! in an `AtomicU64`, updated by compare-and-swap, so concurrent workers can neither lose an
//! update nor admit the same slot twice. Keys live in a lock-free map (papaya): no mutex on the
//! request path. Entries that have fully recovered carry no information and are swept
//! periodically, so memory follows the number of active keys.
//!
//! Several limits on one route are checked in order; a request refused by a later limit has
//! already used its slot in the earlier ones (as in Kong and Envoy's local limiter).
//!
//! The map of one limit holds at most `[server] max_limit_keys` keys. When a new key finds it
//! full, fully recovered entries are dropped first (they hold no information), then the least
//! recently active eighth (those with the oldest theoretical arrival time). The trade-off: an
//! evicted key starts afresh, so under a flood of distinct keys a returning caller may get a
//! fresh burst; memory stays bounded whatever the flood. Header values are counted under their
//! keyed hash ([`crate::state::subject`]), never raw.

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

use papaya::HashMap;

use crate::{config::LimitConfig, state::subject::SubjectHasher};

/// Sweep entries that have fully recovered every this often.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// What a limit counts separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    Client,
    Consumer,
    Route,
    Header(String),
}

impl LimitKey {
    pub fn parse(text: &str) -> Option<LimitKey> {
        match text {
            "client" => Some(LimitKey::Client),
            "consumer" => Some(LimitKey::Consumer),
            "route" => Some(LimitKey::Route),
            _ => {
                let name = text.strip_prefix("header:")?;
                (!name.is_empty() && name.bytes().all(crate::config::is_token_byte))
                    .then(|| LimitKey::Header(name.to_owned()))
            }
        }
    }
}

/// Nanoseconds since the first use, on the monotonic clock.
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // Start one hour in, so "fully recovered" (tat <= now) never needs a negative time.
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 3_600_000_000_000
}

/// Entries sampled to find the age below which an eviction pass drops entries.
const EVICTION_SAMPLE: usize = 512;

/// One compiled limit.
#[derive(Debug)]
pub struct Limit {
    /// Names the shared counter in cluster mode: a hash of the route id and the limit's name,
    /// the same on every host and across restarts and reorderings.
    scope: [u8; 8],
    pub name: String,
    max_keys: usize,
    pub key: LimitKey,
    /// Requests per window, and the window, as configured (for RateLimit-Policy).
    pub quota: u64,
    pub window: Duration,
    interval_ns: u64,
    tolerance_ns: u64,
    /// Shared with the limit of the same scope in the next config snapshot, so a reload keeps
    /// every bucket (and applies a changed rate to it).
    states: LimitState,
}

/// A limit's buckets, by key.
pub type LimitState = std::sync::Arc<HashMap<Box<[u8]>, AtomicU64>>;

/// A refusal: when to retry, and the fields describing the limit.
#[derive(Debug, Clone, Copy)]
pub struct Refusal<'l> {
    pub limit: &'l Limit,
    pub retry_after: Duration,
}

/// The identity a limit may key on.
pub struct LimitSubject<'a> {
    pub client: IpAddr,
    pub consumer: Option<&'a str>,
    /// Looks up a request field by name.
    pub header: &'a dyn Fn(&str) -> Option<&'a [u8]>,
    /// Keys header values.
    pub hasher: &'a SubjectHasher,
}

/// Longest subject in key bytes: a SHA-256 (long consumer ids).
pub const MAX_SUBJECT_BYTES: usize = 32;

/// The bytes `key` counts `subject` under, written into `buf`: the client address (16 bytes,
/// IPv4 mapped), the consumer id (its SHA-256 when longer than 32 bytes), a header value's
/// keyed hash, or nothing for `route`. Without a consumer or the header, the client address.
pub fn subject_bytes<'b>(
    key: &LimitKey,
    subject: &LimitSubject,
    buf: &'b mut [u8; MAX_SUBJECT_BYTES],
) -> &'b [u8] {
    let consumer = subject.consumer.filter(|_| *key == LimitKey::Consumer);
    let header = match key {
        LimitKey::Header(name) => (subject.header)(name),
        _ => None,
    };
    let len = match (key, consumer, header) {
        (LimitKey::Route, ..) => 0,
        (_, Some(id), _) if id.len() <= MAX_SUBJECT_BYTES => {
            buf[..id.len()].copy_from_slice(id.as_bytes());
            id.len()
        }
        (_, Some(id), _) => {
            buf.copy_from_slice(&<sha2::Sha256 as sha2::Digest>::digest(id));
            MAX_SUBJECT_BYTES
        }
        (_, _, Some(value)) => {
            let hashed = subject.hasher.hash(value);
            buf[..hashed.len()].copy_from_slice(&hashed);
            hashed.len()
        }
        _ => {
            let octets = match subject.client {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            buf[..16].copy_from_slice(&octets);
            16
        }
    };
    &buf[..len]
}

/// The first 8 bytes of SHA-256 over `parts` joined by tabs: a stable name for state.
pub fn scope_hash(parts: &[&str]) -> [u8; 8] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update(b"\t");
        }
        h.update(p.as_bytes());
    }
    h.finalize()[..8].try_into().expect("8 of 32 bytes")
}

impl Limit {
    /// Compiles limit `c`, whose state is named by `scope` (such as the route id) and its own
    /// name; at most `max_keys` keys. `carried` finds the buckets of a previous snapshot's limit
    /// by that name, which are then kept.
    pub fn new(
        scope: &[&str],
        c: &LimitConfig,
        max_keys: usize,
        carried: &dyn Fn(&[u8; 8]) -> Option<LimitState>,
    ) -> Limit {
        let window = c.per.get();
        let interval_ns = (window.as_nanos() as u64 / c.rate).max(1);
        let burst = c.burst.unwrap_or(c.rate).max(1);
        let name = c.stable_name();
        let scope = scope_hash(&[scope, &[name.as_str()]].concat());
        Limit {
            states: carried(&scope).unwrap_or_default(),
            scope,
            name,
            max_keys,
            key: LimitKey::parse(&c.key).expect("validate() checked the key"),
            quota: c.rate,
            window,
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(burst - 1),
        }
    }

    /// Admits one request for `subject`, or says when to retry.
    pub fn admit(
        &self,
        subject: &LimitSubject,
        cluster: Option<&crate::cluster::Cluster>,
    ) -> Result<(), Duration> {
        let mut buf = [0u8; MAX_SUBJECT_BYTES];
        let key = subject_bytes(&self.key, subject, &mut buf);
        let guard = self.states.guard();
        let now = now_ns();
        let tat = match self.states.get(key, &guard) {
            Some(t) => t,
            None => {
                if self.states.len() >= self.max_keys {
                    self.evict(now);
                }
                self.states
                    .get_or_insert(key.into(), AtomicU64::new(0), &guard)
            }
        };
        loop {
            let old = tat.load(Ordering::Acquire);
            let base = old.max(now);
            if base - now > self.tolerance_ns {
                return Err(Duration::from_nanos(base - now - self.tolerance_ns));
            }
            if tat
                .compare_exchange_weak(
                    old,
                    base + self.interval_ns,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
            {
                break;
            }
        }
        let Some(c) = cluster else { return Ok(()) };
        // In cluster mode the limit is also a fixed window of `quota` per `window`, shared.
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let window = self.window.as_secs().max(1);
        // pcl:l: | scope | window | subject: on the stack, the same bytes on every host.
        let mut shared = [0u8; 6 + 8 + 8 + MAX_SUBJECT_BYTES];
        shared[..6].copy_from_slice(b"pcl:l:");
        shared[6..14].copy_from_slice(&self.scope);
        shared[14..22].copy_from_slice(&(unix / window).to_le_bytes());
        shared[22..22 + key.len()].copy_from_slice(key);
        let shared = &shared[..22 + key.len()];
        if c.admit(shared, self.quota, window + 60) {
            Ok(())
        } else {
            Err(Duration::from_secs(window - unix % window))
        }
    }

    /// Makes room in a full map: recovered entries first, then, if that freed less than an
    /// eighth, the entries least recently active (oldest theoretical arrival time), judged
    /// from a sample.
    fn evict(&self, now: u64) {
        let map = self.states.pin();
        map.retain(|_, tat| tat.load(Ordering::Acquire) > now);
        if map.len() < self.max_keys - self.max_keys / 8 {
            return;
        }
        let mut sample: Vec<u64> = map
            .iter()
            .take(EVICTION_SAMPLE)
            .map(|(_, tat)| tat.load(Ordering::Acquire))
            .collect();
        sample.sort_unstable();
        let threshold = sample[sample.len() / 8];
        map.retain(|_, tat| tat.load(Ordering::Acquire) > threshold);
    }

    /// The name of this limit's state, and the state, for the next snapshot to keep.
    pub fn state(&self) -> ([u8; 8], LimitState) {
        (self.scope, self.states.clone())
    }

    /// Keys tracked now.
    pub fn tracked_keys(&self) -> usize {
        self.states.len()
    }

    /// Removes entries that have fully recovered (they are the same as absent ones).
    pub fn sweep(&self) {
        let now = now_ns();
        self.states
            .pin()
            .retain(|_, tat| tat.load(Ordering::Acquire) > now);
    }
}

/// Applies `limits` in order; the first refusal wins.
pub fn check<'l>(
    limits: &'l [Limit],
    subject: &LimitSubject,
    cluster: Option<&crate::cluster::Cluster>,
) -> Result<(), Refusal<'l>> {
    for limit in limits {
        if let Err(retry_after) = limit.admit(subject, cluster) {
            return Err(Refusal { limit, retry_after });
        }
    }
    Ok(())
}

/// A route's in-flight limit, shared by all workers: one count for the route, or one per
/// consumer (unauthenticated callers share one).
#[derive(Debug)]
pub struct ConcurrencyLimit {
    pub max: usize,
    pub queue_timeout: Duration,
    per_consumer: bool,
    route: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Shared with the next snapshot's limit of the same route, like `route`.
    consumers: std::sync::Arc<HashMap<Box<str>, std::sync::Arc<std::sync::atomic::AtomicUsize>>>,
}

/// A slot taken from a [`ConcurrencyLimit`]; returned when dropped, whatever the outcome.
pub struct ConcurrencySlot {
    counter: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ConcurrencyLimit {
    /// Compiles `c`; the in-flight counts of `previous` (the same route in the snapshot before)
    /// are kept, so a reload never loses track of requests in flight.
    pub fn new(
        c: &crate::config::ConcurrencyConfig,
        previous: Option<&ConcurrencyLimit>,
    ) -> ConcurrencyLimit {
        ConcurrencyLimit {
            max: c.max,
            queue_timeout: c.queue_timeout.get(),
            per_consumer: c.key == "consumer",
            route: previous.map(|p| p.route.clone()).unwrap_or_default(),
            consumers: previous.map(|p| p.consumers.clone()).unwrap_or_default(),
        }
    }

    /// The count this request is held against.
    pub fn counter(
        &self,
        consumer: Option<&str>,
    ) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        if !self.per_consumer {
            return self.route.clone();
        }
        let id = consumer.unwrap_or("");
        let guard = self.consumers.guard();
        match self.consumers.get(id, &guard) {
            Some(c) => c.clone(),
            None => self
                .consumers
                .get_or_insert(id.into(), Default::default(), &guard)
                .clone(),
        }
    }

    /// Takes a slot of `counter` if one is free.
    pub fn try_acquire(
        &self,
        counter: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> Option<ConcurrencySlot> {
        let mut current = counter.load(Ordering::Acquire);
        loop {
            if current >= self.max {
                return None;
            }
            match counter.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(ConcurrencySlot {
                        counter: counter.clone(),
                    })
                }
                Err(now) => current = now,
            }
        }
    }
}

impl Drop for ConcurrencySlot {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a refused request was counted as, for the admin API's list of the most refused keys:
/// the client address, the consumer id (its first [`MAX_SUBJECT_BYTES`] bytes), a keyed hash of
/// a header value (never the value), or the route as a whole. Small and `Copy`, so it travels
/// with the refusal without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubjectLabel {
    kind: SubjectKind,
    len: u8,
    bytes: [u8; MAX_SUBJECT_BYTES],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubjectKind {
    Client,
    Consumer,
    Header,
    Route,
}

impl SubjectLabel {
    pub fn of(key: &LimitKey, subject: &LimitSubject) -> SubjectLabel {
        let mut label = SubjectLabel {
            kind: SubjectKind::Route,
            len: 0,
            bytes: [0; MAX_SUBJECT_BYTES],
        };
        let mut put = |kind, b: &[u8]| {
            let n = b.len().min(MAX_SUBJECT_BYTES);
            label.kind = kind;
            label.len = n as u8;
            label.bytes[..n].copy_from_slice(&b[..n]);
        };
        match key {
            LimitKey::Route => {}
            LimitKey::Consumer if subject.consumer.is_some() => put(
                SubjectKind::Consumer,
                subject.consumer.unwrap_or_default().as_bytes(),
            ),
            LimitKey::Header(name) if (subject.header)(name).is_some() => {
                let value = (subject.header)(name).unwrap_or_default();
                put(SubjectKind::Header, &subject.hasher.hash(value)[..8]);
            }
            _ => {
                let octets = match subject.client {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                    IpAddr::V6(v6) => v6.octets(),
                };
                put(SubjectKind::Client, &octets);
            }
        }
        label
    }
}

impl std::fmt::Display for SubjectLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.bytes[..usize::from(self.len)];
        match self.kind {
            SubjectKind::Route => f.write_str("route"),
            SubjectKind::Client => {
                let octets: [u8; 16] = b.try_into().unwrap_or([0; 16]);
                let v6 = std::net::Ipv6Addr::from(octets);
                match v6.to_ipv4_mapped() {
                    Some(v4) => write!(f, "client:{v4}"),
                    None => write!(f, "client:{v6}"),
                }
            }
            SubjectKind::Consumer => write!(f, "consumer:{}", String::from_utf8_lossy(b)),
            SubjectKind::Header => write!(f, "header-hash:{}", hex::encode(b)),
        }
    }
}
