//! Budgets and per-minute limits of the vault shared by the hosts of a `[cluster]` through
//! Redis: every reservation is taken by one Lua script that checks and reserves against every
//! counter of the request at once, and settled by another, so the hosts together admit exactly
//! what one host would (see the bound in [`super::ledger`]).
//!
//! Each counter is three Redis keys: a hash of `settled` and `reserved` totals, a hash of the
//! reservations in flight (id -> amount, or `done` once settled), and a sorted set of their
//! deadlines. A reservation whose host died before settling it lapses at its deadline
//! ([`RESERVATION_LEASE`]) and is given back by the next script that touches the counter; a
//! request that outlives its lease still adds its cost when it settles.
//!
//! The request path never blocks on Redis: a worker sends its reservation to the link thread
//! and awaits the answer for at most [`RESERVE_WAIT`]. Past it, or while Redis is unreachable,
//! the request is admitted by the host's own ledger alone (counted in
//! `portcullis_vault_cluster_fallbacks_total`): during an outage each host can spend up to a
//! whole budget, so the cluster up to `hosts` budgets. Settlements made while Redis is away
//! are queued (at most [`MAX_QUEUED_SETTLEMENTS`]) and sent once it answers again, so no spend
//! is lost to an outage.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, Sender},
        Arc,
    },
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::config::BudgetPeriod;

/// Longest a request waits for Redis to answer its reservation.
pub const RESERVE_WAIT: Duration = Duration::from_millis(250);
/// How long a reservation holds in Redis if its host never settles it.
pub const RESERVATION_LEASE: Duration = Duration::from_secs(15 * 60);
/// Settlements kept for Redis while it is unreachable; beyond it the oldest are dropped, in
/// the log.
pub const MAX_QUEUED_SETTLEMENTS: usize = 100_000;
/// Reservations and settlements sent to Redis in one pipeline, at most.
const MAX_BATCH: usize = 256;
/// Prefix of every key the vault keeps in Redis.
pub const KEY_PREFIX: &str = "portcullis:vault:";
/// Lua numbers are doubles: amounts and limits stay below 2^53 to be exact.
const LUA_EXACT: u64 = 1 << 53;

/// Checks every counter of a request and reserves on all of them, or on none. Returns 0, or
/// the 1-based position of the first counter the request would pass.
const RESERVE_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS / 3
for i = 0, n - 1 do
  local k, kr, ke = KEYS[3*i+1], KEYS[3*i+2], KEYS[3*i+3]
  local lapsed = redis.call('ZRANGEBYSCORE', ke, '-inf', now, 'LIMIT', 0, 64)
  for _, r in ipairs(lapsed) do
    local a = tonumber(redis.call('HGET', kr, r))
    if a then redis.call('HINCRBY', k, 'reserved', -a) end
    redis.call('HDEL', kr, r)
    redis.call('ZREM', ke, r)
  end
  if redis.call('HEXISTS', kr, ARGV[1]) == 1 then
    return -1
  end
  local amount = tonumber(ARGV[3 + 3*i])
  local limit = tonumber(ARGV[4 + 3*i])
  local settled = tonumber(redis.call('HGET', k, 'settled') or '0')
  local reserved = tonumber(redis.call('HGET', k, 'reserved') or '0')
  if settled + reserved + amount > limit then
    return i + 1
  end
end
for i = 0, n - 1 do
  local k, kr, ke = KEYS[3*i+1], KEYS[3*i+2], KEYS[3*i+3]
  local amount = tonumber(ARGV[3 + 3*i])
  local ttl = tonumber(ARGV[5 + 3*i])
  redis.call('HINCRBY', k, 'reserved', amount)
  redis.call('HSET', kr, ARGV[1], amount)
  redis.call('ZADD', ke, now + tonumber(ARGV[2]), ARGV[1])
  if ttl > 0 then
    redis.call('EXPIRE', k, ttl)
    redis.call('EXPIRE', kr, ttl)
    redis.call('EXPIRE', ke, ttl)
  end
end
return 0
"#;

/// Gives a reservation back and adds the request's real amount (`-1`: gives back only). A
/// settlement sent twice (a reply lost with the connection) counts once: the id is marked
/// `done` (until the lease's end), also when it held no reservation (one lapsed, or a request
/// admitted while Redis did not answer, settled here afterwards).
const SETTLE_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS / 3
for i = 0, n - 1 do
  local k, kr, ke = KEYS[3*i+1], KEYS[3*i+2], KEYS[3*i+3]
  local held = redis.call('HGET', kr, ARGV[1])
  if held ~= 'done' then
    local a = tonumber(held)
    if a then redis.call('HINCRBY', k, 'reserved', -a) end
    redis.call('HSET', kr, ARGV[1], 'done')
    redis.call('ZADD', ke, now + tonumber(ARGV[2]), ARGV[1])
    local amount = tonumber(ARGV[3 + 2*i])
    if amount > 0 then redis.call('HINCRBY', k, 'settled', amount) end
    local ttl = tonumber(ARGV[4 + 2*i])
    if ttl > 0 then
      redis.call('EXPIRE', k, ttl)
      redis.call('EXPIRE', kr, ttl)
      redis.call('EXPIRE', ke, ttl)
    end
  end
end
return 0
"#;

/// One counter a request reserves on: a ledger scope and period, how much, against which limit.
#[derive(Debug, Clone)]
pub struct SharedItem {
    /// The counter's Redis key (without the reservation and deadline suffixes).
    pub key: String,
    pub amount: u64,
    pub limit: u64,
    pub ttl_secs: u64,
    pub measure: Measure,
}

/// What a counter counts, which says what its settlement adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    Spend,
    Requests,
    Tokens,
}

impl SharedItem {
    pub fn new(
        scope: &str,
        period: BudgetPeriod,
        unix_secs: u64,
        amount: u64,
        limit: u64,
        measure: Measure,
    ) -> SharedItem {
        let instance = super::ledger::instance(period, unix_secs);
        SharedItem {
            key: counter_key(scope, period, instance),
            amount: amount.min(LUA_EXACT),
            limit: limit.min(LUA_EXACT),
            ttl_secs: ttl_of(period),
            measure,
        }
    }
}

/// The Redis key of a ledger counter (the hash of its `settled` and `reserved` totals).
pub fn counter_key(scope: &str, period: BudgetPeriod, instance: u32) -> String {
    format!("{KEY_PREFIX}{scope}:{period:?}:{instance}")
}

/// How long Redis keeps a counter: past its period, with a margin for clock skew.
fn ttl_of(period: BudgetPeriod) -> u64 {
    match period {
        BudgetPeriod::Minute => 3 * 60,
        BudgetPeriod::Day => 2 * 86_400,
        BudgetPeriod::Month => 33 * 86_400,
        BudgetPeriod::Total => 0,
    }
}

/// What Redis said of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedAnswer {
    Reserved,
    /// The request would pass a counter of this measure.
    Refused(Measure),
    /// Redis did not answer in time or is unreachable: the host's ledger alone decides.
    Unavailable,
}

/// A reservation held in Redis, settled with [`SharedReservation::settle`] or given back when
/// dropped; or, for a request admitted while Redis did not answer, only what it spent, sent
/// when it settles (`settle_only`), so the shared totals miss none of it.
#[derive(Debug)]
pub struct SharedReservation {
    id: String,
    items: Vec<SharedItem>,
    link: Sender<Message>,
    settle_only: bool,
}

impl SharedReservation {
    /// Settles with the real amounts per measure (`None`: nothing was spent of it).
    pub fn settle(mut self, spend: Option<u64>, requests: Option<u64>, tokens: Option<u64>) {
        let amounts = self
            .items
            .iter()
            .map(|i| match i.measure {
                Measure::Spend => spend,
                Measure::Requests => requests,
                Measure::Tokens => tokens,
            })
            .map(|a| a.map_or(-1, |a| a.min(LUA_EXACT) as i64))
            .collect();
        let items = std::mem::take(&mut self.items);
        let _ = self.link.send(Message::Settle(Settlement {
            id: std::mem::take(&mut self.id),
            items,
            amounts,
        }));
    }
}

impl Drop for SharedReservation {
    fn drop(&mut self) {
        if self.items.is_empty() || self.settle_only {
            return;
        }
        let amounts = vec![-1; self.items.len()];
        let _ = self.link.send(Message::Settle(Settlement {
            id: std::mem::take(&mut self.id),
            items: std::mem::take(&mut self.items),
            amounts,
        }));
    }
}

#[derive(Debug)]
struct Settlement {
    id: String,
    items: Vec<SharedItem>,
    /// Per item; -1: give back only.
    amounts: Vec<i64>,
}

#[derive(Debug)]
enum Message {
    Reserve {
        id: String,
        items: Vec<SharedItem>,
        /// Past it the asker has gone on without an answer: not reserved at all.
        deadline: Instant,
        reply: tokio::sync::oneshot::Sender<SharedAnswer>,
    },
    Settle(Settlement),
}

/// This host's link to the shared counters.
#[derive(Debug)]
pub struct SharedLedger {
    link: Sender<Message>,
    healthy: Arc<AtomicBool>,
    /// Requests admitted by the host's ledger alone, Redis not answering.
    pub fallbacks: AtomicU64,
    host: String,
    next_id: AtomicU64,
}

impl SharedLedger {
    /// Starts the link thread to `redis_url`.
    pub fn start(redis_url: &str) -> anyhow::Result<SharedLedger> {
        let client = redis::Client::open(redis_url).map_err(|e| {
            anyhow::anyhow!(
                "cluster.redis ({}): {e}",
                crate::log_throttle::redacted_url(redis_url)
            )
        })?;
        let (link, rx) = std::sync::mpsc::channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let thread = LinkThread {
            client,
            conn: None,
            healthy: healthy.clone(),
            queued: VecDeque::new(),
            server_errors: 0,
        };
        std::thread::Builder::new()
            .name("vault-cluster".into())
            .spawn(move || thread.run(rx))?;
        Ok(SharedLedger {
            link,
            healthy,
            fallbacks: AtomicU64::new(0),
            host: super::virtual_key::new_id()[3..].to_owned(),
            next_id: AtomicU64::new(0),
        })
    }

    /// Reserves `items` in Redis: the answer, and the reservation when it was taken.
    pub async fn reserve(
        &self,
        items: Vec<SharedItem>,
    ) -> (SharedAnswer, Option<SharedReservation>) {
        if items.is_empty() {
            return (SharedAnswer::Reserved, None);
        }
        let answer = if self.healthy.load(Ordering::Acquire) {
            let id = self.new_id();
            let (reply, mut answer) = tokio::sync::oneshot::channel();
            let deadline = Instant::now() + RESERVE_WAIT;
            let sent = self.link.send(Message::Reserve {
                id: id.clone(),
                items: items.clone(),
                deadline,
                reply,
            });
            let answer = match sent {
                Ok(()) => match tokio::time::timeout(RESERVE_WAIT, &mut answer).await {
                    Ok(a) => a.unwrap_or(SharedAnswer::Unavailable),
                    Err(_) => {
                        // An answer sent as the wait ran out is taken, not lost (the link gives
                        // back what it reserves for an asker that closed).
                        answer.close();
                        answer.try_recv().unwrap_or(SharedAnswer::Unavailable)
                    }
                },
                Err(_) => SharedAnswer::Unavailable,
            };
            if answer == SharedAnswer::Reserved {
                let held = SharedReservation {
                    id,
                    items,
                    link: self.link.clone(),
                    settle_only: false,
                };
                return (answer, Some(held));
            }
            answer
        } else {
            SharedAnswer::Unavailable
        };
        match answer {
            SharedAnswer::Unavailable => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                // Admitted by this host alone: what it spends still goes to the shared totals.
                let spent_only = SharedReservation {
                    id: self.new_id(),
                    items,
                    link: self.link.clone(),
                    settle_only: true,
                };
                (answer, Some(spent_only))
            }
            _ => (answer, None),
        }
    }

    fn new_id(&self) -> String {
        format!(
            "{}-{}",
            self.host,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Whether Redis answered the last exchange.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }
}

struct LinkThread {
    client: redis::Client,
    conn: Option<(redis::Connection, String, String)>,
    healthy: Arc<AtomicBool>,
    queued: VecDeque<Settlement>,
    /// Exchanges Redis answered with an error in a row.
    server_errors: u32,
}

/// How often the link retries Redis while it is unreachable.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

impl LinkThread {
    fn run(mut self, rx: Receiver<Message>) {
        loop {
            let wait = if self.queued.is_empty() && self.healthy.load(Ordering::Acquire) {
                Duration::from_secs(3600)
            } else {
                RETRY_INTERVAL
            };
            let mut reserves = Vec::new();
            match rx.recv_timeout(wait) {
                Ok(m) => self.take(m, &mut reserves),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // The vault is gone: one last try for what is queued.
                    let _ = self.exchange(&mut Vec::new());
                    return;
                }
            }
            // Reserves wait on the request path: all that came are sent (settlements queue).
            while reserves.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => self.take(m, &mut reserves),
                    Err(_) => break,
                }
            }
            match self.exchange(&mut reserves) {
                Ok(()) => {
                    self.server_errors = 0;
                    if !self.healthy.swap(true, Ordering::AcqRel) {
                        info!("Redis reachable again: vault budgets shared again");
                    }
                }
                Err(e) => {
                    self.conn = None;
                    let refused_by_redis = !(e.is_io_error()
                        || e.is_timeout()
                        || e.is_connection_dropped()
                        || e.is_connection_refusal());
                    if refused_by_redis {
                        // A script Redis keeps refusing (a key of another type under its name)
                        // must not hold up every settlement after it.
                        self.server_errors += 1;
                        if self.server_errors >= 3 {
                            self.server_errors = 0;
                            if self.queued.pop_front().is_some() {
                                warn!(
                                    "vault: Redis refused a settlement three times; dropped: {e}"
                                );
                            }
                        }
                    }
                    if self.healthy.swap(false, Ordering::AcqRel) {
                        warn!("Redis unreachable, vault budgets and limits are this host's alone until it answers: {e}");
                    }
                    for (id, items, reply) in reserves {
                        // It may have run before the failure: given back, to be sure.
                        self.queued.push_back(Settlement {
                            id,
                            amounts: vec![-1; items.len()],
                            items,
                        });
                        let _ = reply.send(SharedAnswer::Unavailable);
                    }
                }
            }
        }
    }

    fn take(
        &mut self,
        m: Message,
        reserves: &mut Vec<(
            String,
            Vec<SharedItem>,
            tokio::sync::oneshot::Sender<SharedAnswer>,
        )>,
    ) {
        match m {
            Message::Reserve {
                id,
                items,
                deadline,
                reply,
            } => {
                if Instant::now() < deadline && !reply.is_closed() {
                    reserves.push((id, items, reply));
                }
            }
            Message::Settle(s) => {
                if self.queued.len() >= MAX_QUEUED_SETTLEMENTS {
                    self.queued.pop_front();
                    warn!("vault: Redis away too long, an unsent settlement was dropped");
                }
                self.queued.push_back(s);
            }
        }
    }

    fn connect(&mut self) -> redis::RedisResult<()> {
        if self.conn.is_some() {
            return Ok(());
        }
        let mut conn = crate::cluster::connect(&self.client)?;
        let reserve: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(RESERVE_SCRIPT)
            .query(&mut conn)?;
        let settle: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(SETTLE_SCRIPT)
            .query(&mut conn)?;
        self.conn = Some((conn, reserve, settle));
        Ok(())
    }

    /// Sends the queued settlements and `reserves` in one pipeline, and answers the reserves.
    fn exchange(
        &mut self,
        reserves: &mut Vec<(
            String,
            Vec<SharedItem>,
            tokio::sync::oneshot::Sender<SharedAnswer>,
        )>,
    ) -> redis::RedisResult<()> {
        if reserves.is_empty() && self.queued.is_empty() {
            if self.healthy.load(Ordering::Acquire) {
                return Ok(());
            }
            // Unreachable and idle: see whether it answers again.
            self.connect()?;
            let conn = &mut self.conn.as_mut().expect("connected above").0;
            return redis::cmd("PING").query::<String>(conn).map(|_| ());
        }
        self.connect()?;
        let (conn, reserve_sha, settle_sha) = self.conn.as_mut().expect("connected above");
        let mut pipe = redis::pipe();
        let settling = self.queued.len().min(MAX_BATCH);
        for s in self.queued.iter().take(settling) {
            let cmd = pipe.cmd("EVALSHA").arg(&*settle_sha).arg(s.items.len() * 3);
            for i in &s.items {
                cmd.arg(&i.key)
                    .arg(format!("{}:r", i.key))
                    .arg(format!("{}:e", i.key));
            }
            cmd.arg(&s.id).arg(RESERVATION_LEASE.as_millis() as u64);
            for (i, amount) in s.items.iter().zip(&s.amounts) {
                cmd.arg(*amount).arg(i.ttl_secs);
            }
            cmd.ignore();
        }
        for (id, items, _) in reserves.iter() {
            let cmd = pipe.cmd("EVALSHA").arg(&*reserve_sha).arg(items.len() * 3);
            for i in items {
                cmd.arg(&i.key)
                    .arg(format!("{}:r", i.key))
                    .arg(format!("{}:e", i.key));
            }
            cmd.arg(id).arg(RESERVATION_LEASE.as_millis() as u64);
            for i in items {
                cmd.arg(i.amount).arg(i.limit).arg(i.ttl_secs);
            }
        }
        let answers: Vec<i64> = pipe.query(conn)?;
        self.queued.drain(..settling);
        for ((id, items, reply), answer) in reserves.drain(..).zip(answers) {
            let answer = match answer {
                0 => SharedAnswer::Reserved,
                // The id was used already: never twice.
                n if n < 0 => SharedAnswer::Unavailable,
                n => SharedAnswer::Refused(
                    items
                        .get(n as usize - 1)
                        .map_or(Measure::Spend, |i| i.measure),
                ),
            };
            if reply.send(answer).is_err() && answer == SharedAnswer::Reserved {
                // The asker went on without it: give it back.
                self.queued.push_back(Settlement {
                    id,
                    amounts: vec![-1; items.len()],
                    items,
                });
            }
        }
        Ok(())
    }
}
