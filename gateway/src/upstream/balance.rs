//! Which server of a group gets a request: smooth weighted round robin (nginx's), the
//! power of two choices on requests in flight (Envoy's least-request, choice count 2),
//! peak-EWMA latency times load (Finagle's), or consistent hashing with a Maglev table over
//! a keyed SipHash, so a key keeps its server across restarts, upgrades and Rust versions, and
//! a server added or removed moves about 1/N of the keys.
//!
//! Requests in flight, latencies and failures in a row are counted per server across every
//! worker (relaxed atomics, one cache line per server); each worker keeps its own round-robin
//! state. A server that fails `consecutive_failures` times in a row is ejected (Envoy's
//! outlier detection): no request goes to it until its time is up, while any server is left;
//! when every server is ejected, all are used again (panic mode), since refusing everything
//! helps no one.

use std::{
    cell::Cell,
    sync::{
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use siphasher::sip::SipHasher24;

use crate::config::{Balance, OutlierConfig, UpstreamConfig};

/// Entries of a Maglev table: a prime well above the servers of any group (Maglev moves
/// about 1/N of the keys when the table is at least 100 times N).
pub const MAGLEV_TABLE_SIZE: usize = 65_537;

/// The latency peak-EWMA assumes of a server it has no sample of yet.
const UNSAMPLED_LATENCY: Duration = Duration::from_millis(10);

/// How long a latency sample weighs in peak-EWMA (Finagle's default decay time).
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// One server's load as every worker sees it, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct ServerLoad {
    in_flight: AtomicUsize,
    /// Peak-EWMA of the time to the response head, in microseconds (`f64` bits).
    ewma_us: AtomicU64,
    /// When `ewma_us` was last updated, in microseconds since [`ServerLoads::epoch`].
    ewma_at_us: AtomicU64,
    /// Failures in a row (5xx, connect failures, resets, timeouts).
    failures: AtomicU32,
    /// Until when the server is ejected, in microseconds since the epoch (0: never was).
    ejected_until_us: AtomicU64,
    /// Ejections not yet forgiven: each lengthens the next (one `base_ejection` each).
    ejections: AtomicU32,
    /// The active health checks found the server unhealthy.
    unhealthy: std::sync::atomic::AtomicBool,
    /// Times outlier detection ejected the server.
    ejections_total: AtomicU64,
    /// When the health checks last found it healthy again (0: never unhealthy).
    healthy_again_us: AtomicU64,
    /// When its last ejection ended (0: never ejected), and when an ejection was last forgiven.
    back_from_ejection_us: AtomicU64,
    forgiven_at_us: AtomicU64,
}

/// An upstream's outlier settings, in the units the counters use.
#[derive(Debug, Clone, Copy)]
pub struct Ejection {
    enabled: bool,
    threshold: u32,
    base_us: u64,
    max_us: u64,
    max_percent: u32,
}

impl Ejection {
    pub fn new(c: &OutlierConfig) -> Ejection {
        Ejection {
            enabled: c.enabled,
            threshold: c.consecutive_failures,
            base_us: c.base_ejection.get().as_micros() as u64,
            max_us: c.max_ejection.get().as_micros() as u64,
            max_percent: c.max_ejected_percent,
        }
    }
}

/// What a request's outcome did to its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Unchanged,
    /// The server was ejected for this long.
    Ejected(Duration),
    /// An ejected server answered well again (after its time was up).
    Returned,
}

/// The loads of one upstream's servers, shared by the workers (and kept across reloads that
/// leave the servers as they were).
#[derive(Debug)]
pub struct ServerLoads {
    servers: Box<[ServerLoad]>,
    epoch: Instant,
    /// Requests in flight to the upstream, connections open to it and connects in progress,
    /// from every worker (what its circuit breaker limits).
    requests: AtomicUsize,
    connections: AtomicUsize,
    pending: AtomicUsize,
    /// Retries under way (what the retry budget limits).
    retries: AtomicUsize,
    /// Retries made, and requests the circuit breaker refused, since the loads were made.
    retries_total: AtomicU64,
    circuit_refusals: AtomicU64,
    /// The token of the health checker whose findings count.
    checker: AtomicU64,
}

/// What a [`Counted`] guard counts.
#[derive(Debug, Clone, Copy)]
enum Counter {
    Connection,
    Pending,
    Retry,
}

/// A connection open to an upstream, or a connect in progress, counted until dropped.
#[derive(Debug)]
pub struct Counted {
    loads: Arc<ServerLoads>,
    counter: Counter,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.loads
            .counter(self.counter)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl ServerLoads {
    pub fn new(servers: usize) -> Arc<ServerLoads> {
        Arc::new(ServerLoads {
            servers: (0..servers).map(|_| ServerLoad::default()).collect(),
            epoch: Instant::now(),
            requests: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            retries_total: AtomicU64::new(0),
            circuit_refusals: AtomicU64::new(0),
            checker: AtomicU64::new(0),
        })
    }

    /// Times outlier detection ejected `server`.
    pub fn ejections_total(&self, server: usize) -> u64 {
        self.servers[server].ejections_total.load(Ordering::Relaxed)
    }

    pub fn retries_total(&self) -> u64 {
        self.retries_total.load(Ordering::Relaxed)
    }

    pub fn circuit_refusals(&self) -> u64 {
        self.circuit_refusals.load(Ordering::Relaxed)
    }

    /// Counts a request the circuit breaker refused.
    pub fn count_circuit_refusal(&self) {
        self.circuit_refusals.fetch_add(1, Ordering::Relaxed);
    }

    fn counter(&self, c: Counter) -> &AtomicUsize {
        match c {
            Counter::Connection => &self.connections,
            Counter::Pending => &self.pending,
            Counter::Retry => &self.retries,
        }
    }

    /// A retry, counted until the guard drops, if the budget allows one more:
    /// `percent` of the requests in flight, or `min_concurrent` when that is more.
    pub fn try_retry(
        self: &Arc<Self>,
        budget: &crate::config::RetryBudgetConfig,
    ) -> Option<Counted> {
        let allowed = (self.requests() * budget.percent as usize / 100).max(budget.min_concurrent);
        if self.retries.fetch_add(1, Ordering::Relaxed) >= allowed {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Counted {
            loads: self.clone(),
            counter: Counter::Retry,
        })
    }

    /// Counts a retry sent.
    pub fn count_retry_sent(&self) {
        self.retries_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests in flight to the upstream, from every worker.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// Connections open to the upstream, from every worker.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Connects in progress to the upstream, from every worker.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Counts an open connection until the guard drops.
    pub fn count_connection(self: &Arc<Self>) -> Counted {
        self.connections.fetch_add(1, Ordering::Relaxed);
        Counted {
            loads: self.clone(),
            counter: Counter::Connection,
        }
    }

    /// Counts a connect in progress until the guard drops.
    pub fn count_pending(self: &Arc<Self>) -> Counted {
        self.pending.fetch_add(1, Ordering::Relaxed);
        Counted {
            loads: self.clone(),
            counter: Counter::Pending,
        }
    }

    /// Requests now in flight to `server`, from every worker.
    pub fn in_flight(&self, server: usize) -> usize {
        self.servers[server].in_flight.load(Ordering::Relaxed)
    }

    /// The peak-EWMA of `server`'s time to first response byte; zero before any sample.
    pub fn latency(&self, server: usize) -> Duration {
        Duration::from_secs_f64(
            f64::from_bits(self.servers[server].ewma_us.load(Ordering::Relaxed)) / 1e6,
        )
    }

    /// Counts a request to `server` in flight until the guard is dropped.
    pub fn start(self: &Arc<Self>, server: usize, ejection: Ejection) -> InFlight {
        self.servers[server]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            loads: self.clone(),
            server,
            ejection,
        }
    }

    fn now_us(&self) -> u64 {
        // Offset by one so that 0 keeps meaning "never ejected".
        self.epoch.elapsed().as_micros() as u64 + 1
    }

    /// How much longer `server` stays ejected (`None`: it is not).
    pub fn ejected_for(&self, server: usize) -> Option<Duration> {
        let until = self.servers[server]
            .ejected_until_us
            .load(Ordering::Relaxed);
        let now = self.now_us();
        (until > now).then(|| Duration::from_micros(until - now))
    }

    fn ejected_at(&self, server: usize, now: u64) -> bool {
        self.servers[server]
            .ejected_until_us
            .load(Ordering::Relaxed)
            > now
    }

    /// Makes a new health checker the one whose findings count (an older one stops at its
    /// next look); returns its token.
    pub fn new_checker(&self) -> u64 {
        self.checker.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Whether `token` is the current checker's.
    pub fn is_current_checker(&self, token: u64) -> bool {
        self.checker.load(Ordering::Relaxed) == token
    }

    /// Forgets every health finding (the upstream has no checks any more).
    pub fn clear_health(&self) {
        for s in self.servers.iter() {
            s.unhealthy.store(false, Ordering::Relaxed);
        }
    }

    /// Whether the active health checks (if any) last found `server` healthy.
    pub fn is_healthy(&self, server: usize) -> bool {
        !self.servers[server].unhealthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, server: usize, healthy: bool) {
        let was_unhealthy = self.servers[server]
            .unhealthy
            .swap(!healthy, Ordering::Relaxed);
        if healthy && was_unhealthy {
            self.servers[server]
                .healthy_again_us
                .store(self.now_us(), Ordering::Relaxed);
        }
    }

    /// How far into its slow start `server` is, from 0.1 to 1: the time since it came back
    /// (from an ejection or from failing its health checks) over `slow_start_us`.
    fn warmth(&self, server: usize, now: u64, slow_start_us: u64) -> f64 {
        if slow_start_us == 0 {
            return 1.0;
        }
        let load = &self.servers[server];
        let ejection_ended = load.ejected_until_us.load(Ordering::Relaxed);
        let back = load
            .healthy_again_us
            .load(Ordering::Relaxed)
            .max(load.back_from_ejection_us.load(Ordering::Relaxed))
            .max(if ejection_ended <= now {
                ejection_ended
            } else {
                0
            });
        if back == 0 {
            return 1.0;
        }
        (now.saturating_sub(back) as f64 / slow_start_us as f64).clamp(0.1, 1.0)
    }

    /// Whether requests may go to `server`: healthy and not ejected.
    fn usable_at(&self, server: usize, now: u64) -> bool {
        self.is_healthy(server) && !self.ejected_at(server, now)
    }

    /// Counts a request's outcome on `server`: a failure in a row too many ejects it, within
    /// the share of servers that may be out at once.
    fn record(&self, server: usize, ok: bool, policy: Ejection) -> Verdict {
        let load = &self.servers[server];
        let now = self.now_us();
        if ok {
            load.failures.store(0, Ordering::Relaxed);
            let until = load.ejected_until_us.load(Ordering::Relaxed);
            if until > now {
                return Verdict::Unchanged;
            }
            // Each base time well since the last ejection ended (or the last forgiveness)
            // forgives one ejection, as Envoy's interval does.
            let ejections = load.ejections.load(Ordering::Relaxed);
            let since = load
                .back_from_ejection_us
                .load(Ordering::Relaxed)
                .max(until)
                .max(load.forgiven_at_us.load(Ordering::Relaxed));
            if ejections > 0 && now.saturating_sub(since) >= policy.base_us {
                load.ejections.store(ejections - 1, Ordering::Relaxed);
                load.forgiven_at_us.store(now, Ordering::Relaxed);
            }
            if until != 0 && load.ejected_until_us.swap(0, Ordering::Relaxed) != 0 {
                load.back_from_ejection_us.store(until, Ordering::Relaxed);
                return Verdict::Returned;
            }
            return Verdict::Unchanged;
        }
        let failures = load.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if !policy.enabled || failures < policy.threshold || self.ejected_at(server, now) {
            return Verdict::Unchanged;
        }
        let out = (0..self.servers.len())
            .filter(|&i| self.ejected_at(i, now))
            .count();
        let cap = (self.servers.len() * policy.max_percent as usize / 100).max(1);
        if out >= cap {
            return Verdict::Unchanged;
        }
        let ejections = load.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let time = policy
            .base_us
            .saturating_mul(u64::from(ejections))
            .min(policy.max_us);
        load.ejected_until_us.store(now + time, Ordering::Relaxed);
        load.ejections_total.fetch_add(1, Ordering::Relaxed);
        load.failures.store(0, Ordering::Relaxed);
        Verdict::Ejected(Duration::from_micros(time))
    }

    /// Folds a time to first response byte into `server`'s peak-EWMA: a slower sample is taken
    /// at once (the peak), a faster one weighs by how long since the last.
    fn observe(&self, server: usize, sample: Duration) {
        let load = &self.servers[server];
        let now = self.epoch.elapsed().as_micros() as u64;
        let last = load.ewma_at_us.swap(now, Ordering::Relaxed);
        let previous = f64::from_bits(load.ewma_us.load(Ordering::Relaxed));
        let sample = sample.as_secs_f64() * 1e6;
        let next = if sample > previous || previous == 0.0 {
            sample
        } else {
            let elapsed = now.saturating_sub(last) as f64;
            let keep = (-elapsed / (EWMA_DECAY.as_secs_f64() * 1e6)).exp();
            previous * keep + sample * (1.0 - keep)
        };
        load.ewma_us.store(next.to_bits(), Ordering::Relaxed);
    }
}

/// A request counted in flight to one server.
#[derive(Debug)]
pub struct InFlight {
    loads: Arc<ServerLoads>,
    server: usize,
    ejection: Ejection,
}

impl InFlight {
    /// Records the time the server took to start answering.
    pub fn observe(&self, time_to_head: Duration) {
        self.loads.observe(self.server, time_to_head);
    }

    /// Records how the server did: `ok` is false for a 5xx, a failed connect, a reset or a
    /// timeout.
    pub fn outcome(&self, ok: bool) -> Verdict {
        self.loads.record(self.server, ok, self.ejection)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.loads.servers[self.server]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
        self.loads.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A keyed SipHash-2-4 of `bytes`: the same value for the same seed on every build.
fn stable_hash(seed: u64, lane: u64, bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = SipHasher24::new_with_keys(seed, lane);
    h.write(bytes);
    h.finish()
}

/// A Maglev lookup table (Eisenbud et al., NSDI 2016), weighted: each server takes as many
/// turns per round as its weight.
#[derive(Debug)]
pub struct Maglev {
    table: Box<[u32]>,
    seed: u64,
}

impl Maglev {
    /// Builds the table for servers named `labels` (their configured `ip:port` or
    /// `host:port`: the mapping follows names, not positions in the list).
    pub fn new(labels: &[String], weights: &[u32], seed: u64) -> Maglev {
        let m = MAGLEV_TABLE_SIZE as u64;
        let n = labels.len();
        let offsets: Vec<u64> = labels
            .iter()
            .map(|l| stable_hash(seed, 0, l.as_bytes()) % m)
            .collect();
        let skips: Vec<u64> = labels
            .iter()
            .map(|l| stable_hash(seed, 1, l.as_bytes()) % (m - 1) + 1)
            .collect();
        let mut next = vec![0u64; n];
        let mut table = vec![u32::MAX; MAGLEV_TABLE_SIZE];
        let mut filled = 0;
        // Turns go in the order of the names, so the table does not depend on the list's.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|a, b| labels[*a].cmp(&labels[*b]));
        'fill: loop {
            for &i in &order {
                for _ in 0..weights[i].max(1) {
                    let mut slot = (offsets[i] + next[i] * skips[i]) % m;
                    while table[slot as usize] != u32::MAX {
                        next[i] += 1;
                        slot = (offsets[i] + next[i] * skips[i]) % m;
                    }
                    table[slot as usize] = i as u32;
                    next[i] += 1;
                    filled += 1;
                    if filled == MAGLEV_TABLE_SIZE {
                        break 'fill;
                    }
                }
            }
        }
        Maglev {
            table: table.into(),
            seed,
        }
    }

    /// The server for `key`: its entry's, or while that one is not `usable`, the next usable
    /// entry's (the same on every worker and host).
    pub fn lookup(&self, key: &[u8], usable: impl Fn(usize) -> bool) -> usize {
        let h = stable_hash(self.seed, 2, key);
        let start = (h % MAGLEV_TABLE_SIZE as u64) as usize;
        let first = self.table[start] as usize;
        if usable(first) {
            return first;
        }
        (1..MAGLEV_TABLE_SIZE)
            .map(|k| self.table[(start + k) % MAGLEV_TABLE_SIZE] as usize)
            .find(|&s| usable(s))
            .unwrap_or(first)
    }
}

/// One worker's chooser for one group.
#[derive(Debug)]
pub struct Balancer {
    balance: Balance,
    weights: Box<[u32]>,
    /// Smooth weighted round robin's running scores.
    current: Box<[Cell<i64>]>,
    maglev: Option<Arc<Maglev>>,
    loads: Arc<ServerLoads>,
    ejection: Ejection,
    /// Servers used only while no other is usable.
    backup: Box<[bool]>,
    /// A server coming back takes its full share over this long (0: at once).
    slow_start_us: u64,
}

/// Smooth round robin's weights are scaled by this, so slow start can grant fractions.
const WEIGHT_SCALE: f64 = 100.0;

impl Balancer {
    /// `maglev` is the group's table when it hashes (built once per config, shared).
    pub fn new(
        config: &UpstreamConfig,
        loads: Arc<ServerLoads>,
        maglev: Option<Arc<Maglev>>,
    ) -> Self {
        let n = config.servers.len();
        Balancer {
            balance: config.balance,
            weights: (0..n).map(|i| config.weight(i)).collect(),
            current: (0..n).map(|_| Cell::new(0)).collect(),
            maglev,
            loads,
            ejection: Ejection::new(&config.outlier),
            backup: config
                .servers
                .iter()
                .map(|s| config.backups.contains(s))
                .collect(),
            slow_start_us: config.slow_start.map_or(0, |d| d.get().as_micros() as u64),
        }
    }

    /// `server`'s weight now: its configured one, times its slow start.
    fn weight_now(&self, server: usize, now: u64) -> f64 {
        f64::from(self.weights[server]) * self.loads.warmth(server, now, self.slow_start_us)
    }

    pub fn loads(&self) -> &Arc<ServerLoads> {
        &self.loads
    }

    /// Counts a request to `server` in flight until the guard is dropped.
    pub fn start(&self, server: usize) -> InFlight {
        self.loads.start(server, self.ejection)
    }

    /// The server for the next request; `key` is its hash key when the group hashes (none:
    /// the request has no such key, and round robin chooses).
    /// `avoid` holds servers (by index, modulo 64) a retry should not go back to while
    /// another is usable.
    pub fn pick(&self, rng: &mut fastrand::Rng, key: Option<&[u8]>, avoid: u64) -> usize {
        let n = self.weights.len();
        if n == 1 {
            return 0;
        }
        let now = self.loads.now_us();
        let fresh = |i: usize| avoid & (1u64 << (i % 64)) == 0;
        let fresh_left = (0..n).any(|i| fresh(i) && self.loads.usable_at(i, now));
        // Primaries while one is usable, else the backups; with none usable either, every
        // server (panic mode).
        let alive = |i: usize| self.loads.usable_at(i, now) && (!fresh_left || fresh(i));
        let tier = if (0..n).any(|i| !self.backup[i] && alive(i)) {
            Some(false)
        } else if (0..n).any(|i| self.backup[i] && alive(i)) {
            Some(true)
        } else {
            None
        };
        let usable = |i: usize| match tier {
            Some(backup) => self.backup[i] == backup && alive(i),
            None => true,
        };
        match self.balance {
            Balance::Hash => match (&self.maglev, key) {
                (Some(table), Some(key)) => table.lookup(key, usable),
                _ => self.round_robin(usable, now),
            },
            Balance::RoundRobin => self.round_robin(usable, now),
            Balance::LeastRequest => self.two_choices(rng, usable, |i| {
                (self.loads.in_flight(i) as f64 + 1.0) / self.weight_now(i, now)
            }),
            Balance::PeakEwma => self.two_choices(rng, usable, |i| {
                // A server without a sample yet is not free: it costs the default latency,
                // so what it has in flight counts.
                let latency = match self.loads.latency(i) {
                    Duration::ZERO => UNSAMPLED_LATENCY.as_secs_f64(),
                    l => l.as_secs_f64(),
                };
                latency * (self.loads.in_flight(i) as f64 + 1.0) / self.weight_now(i, now)
            }),
        }
    }

    /// nginx's smooth weighted round robin over the usable servers: each gains its weight,
    /// the highest is chosen and pays the total; weights 5, 1, 1 give a, a, b, a, c, a, a.
    fn round_robin(&self, usable: impl Fn(usize) -> bool, now: u64) -> usize {
        let mut total = 0i64;
        let mut best = None;
        for (i, c) in self.current.iter().enumerate() {
            if !usable(i) {
                continue;
            }
            let weight = (self.weight_now(i, now) * WEIGHT_SCALE).max(1.0) as i64;
            total += weight;
            c.set(c.get() + weight);
            if best.is_none_or(|b: usize| c.get() > self.current[b].get()) {
                best = Some(i);
            }
        }
        let best = best.unwrap_or(0);
        self.current[best].set(self.current[best].get() - total);
        best
    }

    /// Two distinct usable servers at random; the one of lower `cost` (ties: the first drawn).
    fn two_choices(
        &self,
        rng: &mut fastrand::Rng,
        usable: impl Fn(usize) -> bool,
        cost: impl Fn(usize) -> f64,
    ) -> usize {
        let n = self.weights.len();
        let (a, b) = if (0..n).all(&usable) {
            let a = rng.usize(..n);
            (a, (a + 1 + rng.usize(..n - 1)) % n)
        } else {
            // Some are out: draw from those left, so none of them is favoured.
            let left: Vec<usize> = (0..n).filter(|&i| usable(i)).collect();
            match left.len() {
                0 => return 0,
                1 => return left[0],
                m => {
                    let a = rng.usize(..m);
                    (left[a], left[(a + 1 + rng.usize(..m - 1)) % m])
                }
            }
        };
        if cost(b) < cost(a) {
            b
        } else {
            a
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves() {
        let config: UpstreamConfig = toml::from_str(
            "servers = [\"10.0.0.1:80\", \"10.0.0.2:80\", \"10.0.0.3:80\"]\nweights = [5, 1, 1]\n",
        )
        .unwrap();
        let b = Balancer::new(&config, ServerLoads::new(3), None);
        let mut rng = fastrand::Rng::with_seed(1);
        let picks: Vec<usize> = (0..7).map(|_| b.pick(&mut rng, None, 0)).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn backups_serve_only_when_no_primary_can_and_a_returning_server_starts_slowly() {
        let config: UpstreamConfig = toml::from_str(
            "servers = [\"10.0.0.1:80\", \"10.0.0.2:80\", \"10.0.0.3:80\"]\n\
             backups = [\"10.0.0.3:80\"]\nslow_start = \"60s\"\n",
        )
        .unwrap();
        let loads = ServerLoads::new(3);
        let b = Balancer::new(&config, loads.clone(), None);
        let mut rng = fastrand::Rng::with_seed(5);
        let mut picks =
            |n: usize| -> Vec<usize> { (0..n).map(|_| b.pick(&mut rng, None, 0)).collect() };
        assert!(picks(20).iter().all(|s| *s != 2), "the backup waits");
        loads.set_healthy(0, false);
        loads.set_healthy(1, false);
        assert!(
            picks(10).iter().all(|s| *s == 2),
            "no primary: the backup serves"
        );
        // A server back from failing its checks starts at a tenth of its share.
        let config: UpstreamConfig =
            toml::from_str("servers = [\"10.0.0.1:80\", \"10.0.0.2:80\"]\nslow_start = \"60s\"\n")
                .unwrap();
        let loads = ServerLoads::new(2);
        let b = Balancer::new(&config, loads.clone(), None);
        loads.set_healthy(0, false);
        loads.set_healthy(0, true);
        let back = (0..200).filter(|_| b.pick(&mut rng, None, 0) == 0).count();
        assert!((10..=30).contains(&back), "{back} of 200");
    }

    #[test]
    fn least_request_avoids_the_busy_server() {
        let config: UpstreamConfig = toml::from_str(
            "servers = [\"10.0.0.1:80\", \"10.0.0.2:80\"]\nbalance = \"least_request\"\n",
        )
        .unwrap();
        let loads = ServerLoads::new(2);
        let b = Balancer::new(&config, loads.clone(), None);
        let _busy: Vec<InFlight> = (0..5).map(|_| b.start(0)).collect();
        let mut rng = fastrand::Rng::with_seed(7);
        assert!((0..100).all(|_| b.pick(&mut rng, None, 0) == 1));
    }

    #[test]
    fn consecutive_failures_eject_for_growing_times_within_the_cap() {
        let config: UpstreamConfig = toml::from_str(
            "servers = [\"10.0.0.1:80\", \"10.0.0.2:80\", \"10.0.0.3:80\"]\n\
             outlier = { consecutive_failures = 2, base_ejection = \"10s\", max_ejected_percent = 40 }\n",
        )
        .unwrap();
        let b = Balancer::new(&config, ServerLoads::new(3), None);
        let fail = |s: usize| b.start(s).outcome(false);
        assert_eq!(fail(0), Verdict::Unchanged);
        assert_eq!(fail(0), Verdict::Ejected(Duration::from_secs(10)));
        assert!(b.loads().ejected_for(0).is_some());
        // The cap (40% of 3 is 1, and at least one): the next server stays in.
        assert_eq!(fail(1), Verdict::Unchanged);
        assert_eq!(fail(1), Verdict::Unchanged);
        assert!(b.loads().ejected_for(1).is_none());
        // No request goes to the ejected server while another is usable.
        let mut rng = fastrand::Rng::with_seed(3);
        assert!((0..50).all(|_| b.pick(&mut rng, None, 0) != 0));
        // A success resets the count in a row.
        assert_eq!(b.start(2).outcome(false), Verdict::Unchanged);
        assert_eq!(b.start(2).outcome(true), Verdict::Unchanged);
        assert_eq!(b.start(2).outcome(false), Verdict::Unchanged);
    }

    #[test]
    fn a_base_time_well_forgives_an_ejection() {
        let config: UpstreamConfig = toml::from_str(
            "servers = [\"10.0.0.1:80\", \"10.0.0.2:80\"]\n\
             outlier = { consecutive_failures = 1, base_ejection = \"100ms\", max_ejection = \"1s\", max_ejected_percent = 50 }\n",
        )
        .unwrap();
        let b = Balancer::new(&config, ServerLoads::new(2), None);
        let ms = |n| Verdict::Ejected(Duration::from_millis(n));
        assert_eq!(b.start(0).outcome(false), ms(100));
        std::thread::sleep(Duration::from_millis(110));
        assert_eq!(b.start(0).outcome(true), Verdict::Returned);
        // Failing again at once: the second ejection is longer.
        assert_eq!(b.start(0).outcome(false), ms(200));
        std::thread::sleep(Duration::from_millis(210));
        assert_eq!(b.start(0).outcome(true), Verdict::Returned);
        // Well for a base time: one ejection is forgiven, so the next is as long as the first.
        std::thread::sleep(Duration::from_millis(110));
        assert_eq!(b.start(0).outcome(true), Verdict::Unchanged);
        assert_eq!(b.start(0).outcome(false), ms(200));
    }

    #[test]
    fn a_retry_of_a_hashed_key_goes_to_another_server() {
        let config: UpstreamConfig = toml::from_str(
            "servers = [\"10.0.0.1:80\", \"10.0.0.2:80\", \"10.0.0.3:80\"]\nbalance = \"hash\"\nhash_key = \"client\"\n",
        )
        .unwrap();
        let table = Arc::new(Maglev::new(&labels(3), &[1, 1, 1], 0));
        let b = Balancer::new(&config, ServerLoads::new(3), Some(table));
        let mut rng = fastrand::Rng::with_seed(1);
        let first = b.pick(&mut rng, Some(b"k"), 0);
        assert_eq!(
            b.pick(&mut rng, Some(b"k"), 0),
            first,
            "one key, one server"
        );
        let second = b.pick(&mut rng, Some(b"k"), 1 << first);
        assert_ne!(second, first);
    }

    #[test]
    fn maglev_is_stable_and_moves_about_one_in_n() {
        let n = 10;
        let all = labels(n);
        let weights = vec![1; n];
        let table = Maglev::new(&all, &weights, 42);
        // The same seed gives the same table, whatever the order of the list.
        let mut reversed = all.clone();
        reversed.reverse();
        let again = Maglev::new(&reversed, &weights, 42);
        let keys: Vec<String> = (0..20_000).map(|k| format!("client-{k}")).collect();
        for k in &keys {
            assert_eq!(
                all[table.lookup(k.as_bytes(), |_| true)],
                reversed[again.lookup(k.as_bytes(), |_| true)]
            );
        }
        // Spread: every server gets its share within 20%.
        let mut counts = vec![0usize; n];
        for k in &keys {
            counts[table.lookup(k.as_bytes(), |_| true)] += 1;
        }
        for c in &counts {
            assert!((1600..=2400).contains(c), "{counts:?}");
        }
        // Removing one server moves its keys and few others.
        let fewer: Vec<String> = all[..n - 1].to_vec();
        let smaller = Maglev::new(&fewer, &weights[..n - 1], 42);
        let moved = keys
            .iter()
            .filter(|k| {
                all[table.lookup(k.as_bytes(), |_| true)]
                    != fewer[smaller.lookup(k.as_bytes(), |_| true)]
            })
            .count();
        let share = moved as f64 / keys.len() as f64;
        assert!(share > 0.5 / n as f64 && share < 1.5 / n as f64, "{share}");
        // A known value: the mapping does not change between builds, crate or Rust versions.
        assert_eq!(stable_hash(42, 2, b"client-0"), 7_591_218_136_679_000_576);
        assert_eq!(all[table.lookup(b"client-0", |_| true)], "10.0.0.7:80");
    }
}
