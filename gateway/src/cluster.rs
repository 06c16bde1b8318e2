//! `[cluster]`: limits and quotas shared across hosts through Redis, without a Redis round trip
//! on the request path.
//!
//! Each host counts what it admits locally (an atomic per shared counter) and a sync thread
//! pushes those counts in batches (`INCRBY`), reading back the global total, every
//! `sync_interval` or sooner once a counter has half a batch pending. A host admits while
//! `last known global + local pending < limit` and it has fewer than `batch` pending.
//! **Bound:** all hosts may act on the same stale global total, so the combined admitted count
//! exceeds the limit by at most `(hosts - 1) * batch`. The host-local limits and quotas still
//! apply on top. When Redis is unreachable each host falls back to its local limits alone (so a
//! cluster may then admit up to `hosts * limit`), says so in the log, and pushes its pending
//! counts once Redis answers again.

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

use crate::config::ClusterConfig;

/// Counters idle this long are forgotten locally (Redis expires its copy by itself).
const IDLE_FORGET: Duration = Duration::from_secs(120);

#[derive(Debug)]
struct SharedCounter {
    /// The global total as of the last sync.
    global: AtomicU64,
    /// Admitted here and not pushed yet.
    pending: AtomicU64,
    /// Seconds Redis keeps the key.
    ttl_secs: u64,
    last_used: AtomicU64,
}

/// This host's view of the shared counters.
#[derive(Debug)]
pub struct Cluster {
    counters: HashMap<Box<[u8]>, Arc<SharedCounter>>,
    batch: u64,
    healthy: AtomicBool,
    wake: SyncSender<()>,
    started: Instant,
}

impl Cluster {
    /// Starts the sync thread for `config`.
    pub fn start(config: &ClusterConfig) -> anyhow::Result<Arc<Cluster>> {
        let client = redis::Client::open(config.redis.as_str()).map_err(|e| {
            anyhow::anyhow!(
                "cluster.redis ({}): {e}",
                crate::log_throttle::redacted_url(&config.redis)
            )
        })?;
        let (wake, rx) = sync_channel(1);
        let cluster = Arc::new(Cluster {
            counters: HashMap::new(),
            batch: config.batch,
            healthy: AtomicBool::new(true),
            wake,
            started: Instant::now(),
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

    /// Admits one request against the shared counter `key` (limit `limit`, Redis TTL
    /// `ttl_secs`). Never waits on Redis.
    pub fn admit(&self, key: &[u8], limit: u64, ttl_secs: u64) -> bool {
        if !self.healthy.load(Ordering::Acquire) {
            return true;
        }
        let guard = self.counters.guard();
        let counter = match self.counters.get(key, &guard) {
            Some(c) => c.clone(),
            None => self
                .counters
                .get_or_insert(
                    key.into(),
                    Arc::new(SharedCounter {
                        global: AtomicU64::new(0),
                        pending: AtomicU64::new(0),
                        ttl_secs,
                        last_used: AtomicU64::new(0),
                    }),
                    &guard,
                )
                .clone(),
        };
        counter
            .last_used
            .store(self.started.elapsed().as_secs(), Ordering::Relaxed);
        loop {
            let pending = counter.pending.load(Ordering::Acquire);
            if counter.global.load(Ordering::Acquire) + pending >= limit || pending >= self.batch {
                let _ = self.wake.try_send(());
                return false;
            }
            if counter
                .pending
                .compare_exchange_weak(pending, pending + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                if pending + 1 >= self.batch.div_ceil(2) {
                    let _ = self.wake.try_send(());
                }
                return true;
            }
        }
    }
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

    /// Pushes every pending count and reads back every active global total, in one pipeline.
    fn sync(&mut self) -> redis::RedisResult<()> {
        if self.conn.is_none() {
            self.conn = Some(
                self.client
                    .get_connection_with_timeout(Duration::from_millis(500))?,
            );
        }
        let now = self.cluster.started.elapsed().as_secs();
        let mut batch: Vec<(Box<[u8]>, Arc<SharedCounter>, u64)> = Vec::new();
        let mut idle: Vec<Box<[u8]>> = Vec::new();
        for (key, counter) in self.cluster.counters.pin().iter() {
            let pending = counter.pending.load(Ordering::Acquire);
            if pending == 0
                && now.saturating_sub(counter.last_used.load(Ordering::Relaxed))
                    > IDLE_FORGET.as_secs()
            {
                idle.push(key.clone());
                continue;
            }
            batch.push((key.clone(), counter.clone(), pending));
        }
        for key in idle {
            self.cluster.counters.pin().remove(&key);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, counter, pending) in &batch {
            pipe.cmd("INCRBY").arg(&key[..]).arg(*pending);
            pipe.cmd("EXPIRE")
                .arg(&key[..])
                .arg(counter.ttl_secs)
                .ignore();
        }
        let conn = self.conn.as_mut().expect("connected above");
        let totals: Vec<u64> = pipe.query(conn)?;
        for ((_, counter, pushed), total) in batch.iter().zip(totals) {
            counter.global.store(total, Ordering::Release);
            counter.pending.fetch_sub(*pushed, Ordering::AcqRel);
        }
        Ok(())
    }
}
