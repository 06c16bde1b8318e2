//! `[cluster]`: limits and quotas shared across hosts through Redis, without a Redis round trip
//! on the request path.
//!
//! Each host leases admissions from Redis ahead of need: one `INCRBY key lease` reserves
//! `lease` admissions of a shared counter (the reply, the new total, says how many of them fall
//! below the limit), and the request path spends reserved admissions from an atomic. The sync
//! thread asks for the next lease once fewer than half of one remain, so steady traffic never
//! waits for Redis and is never refused while the shared count is below the limit.
//!
//! **Bounds.** Upper: every admission was reserved below the limit, except that on first
//! contact with a counter (a new key or window) a host admits up to one lease before its first
//! reservation returns, which that reservation then accounts for; so the combined count exceeds
//! the limit by at most `hosts * lease`, and only when hosts first meet a counter after others
//! have already filled it. Lower: reserved but unused admissions are lost to the other hosts, so
//! once Redis says a counter is full the hosts together have admitted at least
//! `limit - hosts * lease`. A refund (a request refused after its quota was taken) returns the
//! admission to the host's lease, a local credit. The host-local limits and quotas still apply
//! on top. While Redis is unreachable each host falls back to its local limits alone (so a
//! cluster may admit up to `hosts * limit`), says so in the log, and resumes leasing once Redis
//! answers again.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender},
        Arc,
    },
    time::{Duration, Instant},
};

use papaya::HashMap;
use tracing::{info, warn};

use crate::{config::ClusterConfig, log_throttle::redacted_url};

/// A connection to the cluster's Redis for the gateway's own threads: at most 500 ms to
/// connect and 2 s per reply, so a stalled Redis holds no caller for long.
pub fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let conn = client.get_connection_with_timeout(Duration::from_millis(500))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(conn)
}

/// Counters idle this long are forgotten locally (Redis expires its copy by itself).
const IDLE_FORGET: Duration = Duration::from_secs(120);

#[derive(Debug)]
struct SharedCounter {
    limit: u64,
    /// Seconds Redis keeps the key.
    ttl_secs: u64,
    /// Reserved admissions not spent yet.
    granted: AtomicU64,
    /// Admitted before the first reservation returned (first contact), at most one lease.
    provisional: AtomicU64,
    /// A reservation has returned for this counter.
    reserved: AtomicBool,
    /// Redis reported the limit reached: nothing more can be reserved in this window.
    exhausted: AtomicBool,
    /// The sync thread should reserve another lease.
    wants_lease: AtomicBool,
    last_used: AtomicU64,
}

/// This host's view of the shared counters.
#[derive(Debug)]
pub struct Cluster {
    counters: HashMap<Box<[u8]>, Arc<SharedCounter>>,
    lease: u64,
    healthy: AtomicBool,
    wake: SyncSender<()>,
    started: Instant,
    /// Milliseconds after `started` of the last successful sync (0: none yet).
    last_sync_ms: std::sync::atomic::AtomicU64,
}

impl Cluster {
    /// Whether Redis is reachable, and seconds since the last successful sync (none yet: None).
    pub fn sync_state(&self) -> (bool, Option<f64>) {
        let at = self.last_sync_ms.load(Ordering::Acquire);
        let age = (at > 0)
            .then(|| (self.started.elapsed().as_millis() as u64).saturating_sub(at) as f64 / 1e3);
        (self.healthy.load(Ordering::Acquire), age)
    }

    /// Starts the sync thread for `config`.
    pub fn start(config: &ClusterConfig) -> anyhow::Result<Arc<Cluster>> {
        let client = redis::Client::open(config.redis.as_str())
            .map_err(|e| anyhow::anyhow!("cluster.redis ({}): {e}", redacted_url(&config.redis)))?;
        let (wake, rx) = sync_channel(1);
        let cluster = Arc::new(Cluster {
            counters: HashMap::new(),
            lease: config.lease,
            healthy: AtomicBool::new(true),
            wake,
            started: Instant::now(),
            last_sync_ms: std::sync::atomic::AtomicU64::new(0),
        });
        let sync = Syncer {
            cluster: cluster.clone(),
            client,
            interval: config.sync_interval.get(),
            conn: None,
        };
        std::thread::Builder::new()
            .name("portcullis-cluster".into())
            .spawn(move || sync.run(rx))?;
        Ok(cluster)
    }

    fn counter(&self, key: &[u8], limit: u64, ttl_secs: u64) -> Arc<SharedCounter> {
        let guard = self.counters.guard();
        let counter = match self.counters.get(key, &guard) {
            Some(c) => c.clone(),
            None => self
                .counters
                .get_or_insert(
                    key.into(),
                    Arc::new(SharedCounter {
                        limit,
                        ttl_secs,
                        granted: AtomicU64::new(0),
                        provisional: AtomicU64::new(0),
                        reserved: AtomicBool::new(false),
                        exhausted: AtomicBool::new(false),
                        wants_lease: AtomicBool::new(true),
                        last_used: AtomicU64::new(0),
                    }),
                    &guard,
                )
                .clone(),
        };
        counter
            .last_used
            .store(self.started.elapsed().as_secs(), Ordering::Relaxed);
        counter
    }

    fn ask_for_lease(&self, counter: &SharedCounter) {
        if !counter.wants_lease.swap(true, Ordering::AcqRel) {
            let _ = self.wake.try_send(());
        }
    }

    /// Admits one request against the shared counter `key` (limit `limit`, Redis TTL
    /// `ttl_secs`). Never waits on Redis.
    pub fn admit(&self, key: &[u8], limit: u64, ttl_secs: u64) -> bool {
        if !self.healthy.load(Ordering::Acquire) {
            return true;
        }
        let counter = self.counter(key, limit, ttl_secs);
        if !counter.reserved.load(Ordering::Acquire) {
            // First contact: up to one lease on account of the reservation under way.
            let _ = self.wake.try_send(());
            return increment_below(&counter.provisional, self.lease.min(limit));
        }
        if decrement_above_zero(&counter.granted) {
            if counter.granted.load(Ordering::Acquire) < self.lease.div_ceil(2)
                && !counter.exhausted.load(Ordering::Acquire)
            {
                self.ask_for_lease(&counter);
            }
            return true;
        }
        if !counter.exhausted.load(Ordering::Acquire) {
            self.ask_for_lease(&counter);
        }
        false
    }

    /// Gives back one admission of `key` taken by [`Cluster::admit`] for a request that was then
    /// refused: a local credit, spent again before the next lease.
    pub fn refund(&self, key: &[u8]) {
        let guard = self.counters.guard();
        if let Some(c) = self.counters.get(key, &guard) {
            if c.reserved.load(Ordering::Acquire) {
                c.granted.fetch_add(1, Ordering::AcqRel);
            } else {
                let _ = decrement_above_zero(&c.provisional);
            }
        }
    }
}

/// Adds one to `counter` while it is below `max`; false at `max`.
fn increment_below(counter: &AtomicU64, max: u64) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// Takes one from `counter` unless it is zero; false at zero.
fn decrement_above_zero(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

struct Syncer {
    cluster: Arc<Cluster>,
    client: redis::Client,
    interval: Duration,
    conn: Option<redis::Connection>,
}

impl Syncer {
    fn run(mut self, wake: Receiver<()>) {
        loop {
            match wake.recv_timeout(self.interval) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            match self.sync() {
                Ok(()) => {
                    let at = self.cluster.started.elapsed().as_millis().max(1) as u64;
                    self.cluster.last_sync_ms.store(at, Ordering::Release);
                    if !self.cluster.healthy.swap(true, Ordering::AcqRel) {
                        info!("Redis reachable again: shared limits and quotas resumed");
                    }
                }
                Err(e) => {
                    self.conn = None;
                    if self.cluster.healthy.swap(false, Ordering::AcqRel) {
                        warn!("Redis unreachable, falling back to local limits and quotas: {e}");
                    }
                }
            }
        }
    }

    /// Reserves a lease for every counter that wants one, in one pipeline.
    fn sync(&mut self) -> redis::RedisResult<()> {
        if self.conn.is_none() {
            self.conn = Some(
                self.client
                    .get_connection_with_timeout(Duration::from_millis(500))?,
            );
        }
        let now = self.cluster.started.elapsed().as_secs();
        let mut wanted: Vec<(Box<[u8]>, Arc<SharedCounter>)> = Vec::new();
        let mut idle: Vec<Box<[u8]>> = Vec::new();
        for (key, counter) in self.cluster.counters.pin().iter() {
            // A full counter is kept until Redis forgets it too: forgetting it sooner would make
            // the next request a first contact, admitting another lease past the limit.
            let keep_for = if counter.exhausted.load(Ordering::Acquire) {
                IDLE_FORGET.as_secs().max(counter.ttl_secs)
            } else {
                IDLE_FORGET.as_secs()
            };
            if now.saturating_sub(counter.last_used.load(Ordering::Relaxed)) > keep_for {
                idle.push(key.clone());
                continue;
            }
            if counter.wants_lease.load(Ordering::Acquire)
                && !counter.exhausted.load(Ordering::Acquire)
            {
                wanted.push((key.clone(), counter.clone()));
            }
        }
        for key in idle {
            self.cluster.counters.pin().remove(&key);
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let lease = self.cluster.lease;
        let mut pipe = redis::pipe();
        for (key, counter) in &wanted {
            pipe.cmd("INCRBY").arg(&key[..]).arg(lease);
            pipe.cmd("EXPIRE")
                .arg(&key[..])
                .arg(counter.ttl_secs)
                .ignore();
        }
        let conn = self.conn.as_mut().expect("connected above");
        let totals: Vec<u64> = pipe.query(conn)?;
        for ((_, counter), total) in wanted.iter().zip(totals) {
            // Of the `lease` just reserved, the part below the limit may be admitted.
            let before = total.saturating_sub(lease);
            let usable = counter.limit.saturating_sub(before).min(lease);
            if total >= counter.limit {
                counter.exhausted.store(true, Ordering::Release);
            }
            counter.wants_lease.store(false, Ordering::Release);
            if counter.reserved.swap(true, Ordering::AcqRel) {
                counter.granted.fetch_add(usable, Ordering::AcqRel);
            } else {
                // The first reservation pays for what was admitted provisionally.
                let spent = counter.provisional.load(Ordering::Acquire);
                counter
                    .granted
                    .fetch_add(usable.saturating_sub(spent), Ordering::AcqRel);
            }
        }
        Ok(())
    }
}
