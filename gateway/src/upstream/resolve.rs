//! Host names of upstream servers, resolved off the request path: one thread keeps every name's
//! addresses, asks again when the answer's TTL (DNS servers configured) or the interval (the
//! system resolver) runs out, and keeps the last good addresses when an attempt fails. Workers
//! read a name's addresses with one lock-free load per new connection.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, ToSocketAddrs},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use hickory_resolver::{
    config::{NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverOpts},
    name_server::TokioConnectionProvider,
    proto::xfer::Protocol,
    TokioResolver,
};
use tracing::{info, warn};

use crate::config::ResolverConfig;

/// Longest the resolver thread sleeps before looking for names added meanwhile.
const POLL: Duration = Duration::from_millis(200);
/// Longest a config build waits for a new name's first answer (so first requests find it).
const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// One server name and its current addresses.
#[derive(Debug)]
pub struct ResolvedName {
    pub host: String,
    pub port: u16,
    addresses: ArcSwap<Vec<SocketAddr>>,
    /// Set once the first attempt ended, whatever its outcome.
    attempted: AtomicBool,
}

impl ResolvedName {
    /// The addresses in use (empty until the name first resolved).
    pub fn addresses(&self) -> arc_swap::Guard<Arc<Vec<SocketAddr>>> {
        self.addresses.load()
    }
}

type Key = (String, u16);

struct Shared {
    names: Mutex<BTreeMap<Key, Weak<ResolvedName>>>,
    config: ArcSwap<ResolverConfig>,
    started: AtomicBool,
}

/// The process's resolver: a registry of names and the thread that resolves them. Kept across
/// reloads; a reload may change `[resolver]`.
pub struct NameResolver {
    shared: Arc<Shared>,
}

impl NameResolver {
    pub fn new(config: &ResolverConfig) -> NameResolver {
        NameResolver {
            shared: Arc::new(Shared {
                names: Mutex::new(BTreeMap::new()),
                config: ArcSwap::from_pointee(config.clone()),
                started: AtomicBool::new(false),
            }),
        }
    }

    /// Uses `config` from now on (after a reload).
    pub fn configure(&self, config: &ResolverConfig) {
        if **self.shared.config.load() != *config {
            self.shared.config.store(Arc::new(config.clone()));
        }
    }

    /// The entry for `host:port`, new or shared; its resolution starts at once. Entries
    /// nobody holds any more are forgotten.
    pub fn track(&self, host: &str, port: u16) -> Arc<ResolvedName> {
        let entry = {
            let mut names = self.shared.names.lock().unwrap_or_else(|e| e.into_inner());
            names.retain(|_, w| w.strong_count() > 0);
            let key = (host.to_owned(), port);
            if let Some(e) = names.get(&key).and_then(Weak::upgrade) {
                return e;
            }
            let entry = Arc::new(ResolvedName {
                host: host.to_owned(),
                port,
                addresses: ArcSwap::from_pointee(Vec::new()),
                attempted: AtomicBool::new(false),
            });
            names.insert(key, Arc::downgrade(&entry));
            entry
        };
        self.start();
        entry
    }

    /// Waits (a few seconds at most, for all together) until each of `names` had its first
    /// attempt, so the first requests find addresses. Not on a worker: config builds run on
    /// the main, control and admin threads.
    pub fn await_first_answers(&self, names: &[&Arc<ResolvedName>]) {
        let until = Instant::now() + FIRST_ANSWER_WAIT;
        while names.iter().any(|n| !n.attempted.load(Ordering::Acquire)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn start(&self) {
        if self.shared.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = Arc::downgrade(&self.shared);
        let spawned = std::thread::Builder::new()
            .name("resolver".into())
            .spawn(move || run(shared));
        if let Err(e) = spawned {
            // The next config build tries again.
            self.shared.started.store(false, Ordering::Release);
            warn!(error = %e, "cannot start the resolver thread: upstream host names stay unresolved");
        }
    }
}

/// What the thread knows of one name.
struct Schedule {
    entry: Weak<ResolvedName>,
    due: Instant,
}

fn run(shared: Weak<Shared>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot start the resolver's runtime: upstream host names stay unresolved");
            return;
        }
    };
    runtime.block_on(async move {
        let mut schedule: BTreeMap<Key, Schedule> = BTreeMap::new();
        let mut dns: Option<(Arc<ResolverConfig>, Arc<TokioResolver>)> = None;
        loop {
            // The gateway is gone: so is the thread.
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let config = shared.config.load_full();
            if dns.as_ref().is_none_or(|(c, _)| **c != *config) {
                dns = Some((config.clone(), Arc::new(dns_resolver(&config))));
            }
            let now = Instant::now();
            {
                let names = shared.names.lock().unwrap_or_else(|e| e.into_inner());
                schedule.retain(|k, s| s.entry.strong_count() > 0 && names.contains_key(k));
                for (k, w) in names.iter() {
                    schedule.entry(k.clone()).or_insert_with(|| Schedule {
                        entry: w.clone(),
                        due: now,
                    });
                }
            }
            drop(shared);
            let mut attempts = tokio::task::JoinSet::new();
            for (key, s) in &schedule {
                if s.due <= now {
                    if let Some(entry) = s.entry.upgrade() {
                        let resolver = dns.as_ref().map(|(_, r)| r.clone());
                        let config = config.clone();
                        let key = key.clone();
                        attempts.spawn(async move {
                            let next = attempt(&entry, &config, resolver.as_deref()).await;
                            (key, next)
                        });
                    }
                }
            }
            while let Some(done) = attempts.join_next().await {
                if let Ok((key, next)) = done {
                    if let Some(s) = schedule.get_mut(&key) {
                        s.due = Instant::now() + next;
                    }
                }
            }
            // An attempt that did not report (it panicked) waits as a failure would.
            let floor = Instant::now() + config.retry.get();
            for s in schedule.values_mut() {
                if s.due <= now {
                    s.due = floor;
                }
            }
            let next_due = schedule.values().map(|s| s.due).min();
            let wait = next_due
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(POLL)
                .min(POLL);
            tokio::time::sleep(wait).await;
        }
    });
}

/// A hickory resolver asking `config.nameservers` (unused when there are none).
fn dns_resolver(config: &ResolverConfig) -> TokioResolver {
    let mut servers = Vec::new();
    for &address in &config.nameservers {
        servers.push(NameServerConfig::new(address, Protocol::Udp));
        servers.push(NameServerConfig::new(address, Protocol::Tcp));
    }
    let mut options = ResolverOpts::default();
    options.timeout = config.timeout.get();
    options.attempts = 1;
    options.ndots = 0;
    options.use_hosts_file = ResolveHosts::Never;
    options.positive_min_ttl = Some(config.min_ttl.get());
    options.positive_max_ttl = Some(config.max_ttl.get());
    options.cache_size = 64;
    let group = NameServerConfigGroup::from(servers);
    TokioResolver::builder_with_config(
        hickory_resolver::config::ResolverConfig::from_parts(None, Vec::new(), group),
        TokioConnectionProvider::default(),
    )
    .with_options(options)
    .build()
}

/// Resolves `entry` once; returns how long until the next attempt.
async fn attempt(
    entry: &ResolvedName,
    config: &ResolverConfig,
    dns: Option<&TokioResolver>,
) -> Duration {
    let name = format!("{}:{}", entry.host, entry.port);
    let outcome: Result<(Vec<SocketAddr>, Duration), String> = match dns {
        Some(resolver) if !config.nameservers.is_empty() => {
            // Fully qualified: no search domains are tried.
            match resolver.lookup_ip(format!("{}.", entry.host)).await {
                Ok(answer) => {
                    let ttl = answer
                        .valid_until()
                        .saturating_duration_since(Instant::now())
                        .clamp(config.min_ttl.get(), config.max_ttl.get());
                    let addrs = answer
                        .iter()
                        .map(|ip| SocketAddr::new(ip, entry.port))
                        .collect();
                    Ok((addrs, ttl))
                }
                Err(e) => Err(e.to_string()),
            }
        }
        _ => {
            let (host, port) = (entry.host.clone(), entry.port);
            // getaddrinfo cannot be cancelled: past the timeout its thread finishes on its
            // own (tokio's blocking pool bounds how many), and the attempt counts as failed.
            let lookup = tokio::task::spawn_blocking(move || {
                (host.as_str(), port)
                    .to_socket_addrs()
                    .map(|a| a.collect::<Vec<_>>())
            });
            match tokio::time::timeout(config.timeout.get(), lookup).await {
                Ok(Ok(Ok(addrs))) => Ok((addrs, config.interval.get())),
                Ok(Ok(Err(e))) => Err(e.to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {:?}", config.timeout.get())),
            }
        }
    };
    let next = match outcome {
        Ok((mut addrs, ttl)) if !addrs.is_empty() => {
            addrs.sort();
            addrs.dedup();
            if **entry.addresses.load() != addrs {
                info!(server = %name, addresses = ?addrs, "upstream server name resolved");
                entry.addresses.store(Arc::new(addrs));
            }
            ttl
        }
        Ok(_) => {
            warn!(server = %name, kept = ?**entry.addresses.load(), "upstream server name has no addresses; keeping the last good ones");
            config.retry.get()
        }
        Err(e) => {
            warn!(server = %name, error = %e, kept = ?**entry.addresses.load(), "cannot resolve upstream server name; keeping the last good addresses");
            config.retry.get()
        }
    };
    entry.attempted.store(true, Ordering::Release);
    next
}
