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

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

use papaya::HashMap;

use crate::config::LimitConfig;

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

/// One compiled limit.
#[derive(Debug)]
pub struct Limit {
    /// The route's index, which names the shared counter in cluster mode.
    route: usize,
    index: usize,
    pub name: String,
    pub key: LimitKey,
    /// Requests per window, and the window, as configured (for RateLimit-Policy).
    pub quota: u64,
    pub window: Duration,
    interval_ns: u64,
    tolerance_ns: u64,
    states: HashMap<Box<[u8]>, AtomicU64>,
}

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
}

impl Limit {
    pub fn new(route: usize, index: usize, c: &LimitConfig) -> Limit {
        let window = c.per.get();
        let interval_ns = (window.as_nanos() as u64 / c.rate).max(1);
        let burst = c.burst.unwrap_or(c.rate).max(1);
        Limit {
            route,
            index,
            name: c.name.clone().unwrap_or_else(|| format!("limit{index}")),
            key: LimitKey::parse(&c.key).expect("validate() checked the key"),
            quota: c.rate,
            window,
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(burst - 1),
            states: HashMap::new(),
        }
    }

    /// Admits one request for `subject`, or says when to retry.
    pub fn admit(
        &self,
        subject: &LimitSubject,
        cluster: Option<&crate::cluster::Cluster>,
    ) -> Result<(), Duration> {
        // The client address as key bytes, written once up front (no allocation).
        let mut buf = [0u8; 16];
        let client_len = match subject.client {
            IpAddr::V4(v4) => {
                buf[..4].copy_from_slice(&v4.octets());
                4
            }
            IpAddr::V6(v6) => {
                buf = v6.octets();
                16
            }
        };
        let client = &buf[..client_len];
        let key: &[u8] = match &self.key {
            LimitKey::Route => &[],
            LimitKey::Client => client,
            LimitKey::Consumer => subject.consumer.map(str::as_bytes).unwrap_or(client),
            LimitKey::Header(name) => (subject.header)(name).unwrap_or(client),
        };
        let guard = self.states.guard();
        let tat = match self.states.get(key, &guard) {
            Some(t) => t,
            None => self
                .states
                .get_or_insert(key.into(), AtomicU64::new(0), &guard),
        };
        let now = now_ns();
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
        // pcl:l: | route | limit | window | key (keys over 128 bytes as their SHA-256): on the
        // stack, the same bytes on every host.
        let mut shared = [0u8; 6 + 4 + 1 + 8 + 128];
        shared[..6].copy_from_slice(b"pcl:l:");
        shared[6..10].copy_from_slice(&(self.route as u32).to_le_bytes());
        shared[10] = self.index as u8;
        shared[11..19].copy_from_slice(&(unix / window).to_le_bytes());
        let digest;
        let key = if key.len() > 128 {
            digest = <sha2::Sha256 as sha2::Digest>::digest(key);
            &digest[..]
        } else {
            key
        };
        shared[19..19 + key.len()].copy_from_slice(key);
        let shared = &shared[..19 + key.len()];
        if c.admit(shared, self.quota, window + 60) {
            Ok(())
        } else {
            Err(Duration::from_secs(window - unix % window))
        }
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
    consumers: HashMap<Box<str>, std::sync::Arc<std::sync::atomic::AtomicUsize>>,
}

/// A slot taken from a [`ConcurrencyLimit`]; returned when dropped, whatever the outcome.
pub struct ConcurrencySlot {
    counter: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ConcurrencyLimit {
    pub fn new(c: &crate::config::ConcurrencyConfig) -> ConcurrencyLimit {
        ConcurrencyLimit {
            max: c.max,
            queue_timeout: c.queue_timeout.get(),
            per_consumer: c.key == "consumer",
            route: Default::default(),
            consumers: HashMap::new(),
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
