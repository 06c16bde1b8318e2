//! Spend against budgets, in integer micro-units of the configured currency, exact across
//! workers. Each budget counter holds what is committed: spend settled plus reservations of
//! requests in flight. A request reserves its estimate before it is sent (one `fetch_add` per
//! budget, undone when that passes the limit), and settles with its real cost when it ends,
//! so concurrent requests can never be admitted past a budget; what a budget can be exceeded
//! by is what admitted requests cost beyond their estimates (see [`estimate`]).
//!
//! Settled spend is written to `vault-spend.json` (crash-safely, as the store is) within
//! [`FLUSH_INTERVAL`] of settling and on a clean stop: a `kill -9` loses at most that much
//! settling. Counters of past days and months are dropped.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::store::StoreError;
use crate::config::BudgetPeriod;

pub const FILE_NAME: &str = "vault-spend.json";
/// How often settled spend is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// One budget counter: a scope (`key:ID` or `owner:NAME`), a period and its instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CounterKey {
    pub scope: String,
    pub period: BudgetPeriod,
    /// Days or months since the epoch (UTC); 0 for `total`.
    pub instance: u32,
}

#[derive(Debug, Default)]
pub struct Counter {
    /// Settled spend plus reservations in flight.
    committed: AtomicU64,
    settled: AtomicU64,
}

impl Counter {
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }
    pub fn settled(&self) -> u64 {
        self.settled.load(Ordering::Acquire)
    }
}

/// The instance of `period` at `unix_secs`.
pub fn instance(period: BudgetPeriod, unix_secs: u64) -> u32 {
    use crate::config::QuotaPeriod;
    match period {
        BudgetPeriod::Total => 0,
        BudgetPeriod::Minute => (unix_secs / 60) as u32,
        BudgetPeriod::Day => crate::quotas::period_now(QuotaPeriod::Day, unix_secs).0,
        BudgetPeriod::Month => crate::quotas::period_now(QuotaPeriod::Month, unix_secs).0,
    }
}

#[derive(Serialize, Deserialize)]
struct Saved {
    counters: Vec<(CounterKey, u64)>,
}

/// Every budget counter of the host, in a lock-free map (workers of every core find their
/// counters in it), and what each key used.
pub struct Ledger {
    dir: PathBuf,
    counters: papaya::HashMap<CounterKey, Arc<Counter>>,
    /// Key id -> requests settled and tokens reported, for the metrics.
    usage: papaya::HashMap<String, Arc<KeyUsage>>,
    dirty: AtomicBool,
    /// One flush at a time (the flusher thread and a clean stop).
    flushing: Mutex<()>,
}

/// What one key's settled requests used.
#[derive(Debug, Default)]
pub struct KeyUsage {
    pub requests: AtomicU64,
    pub input_tokens: AtomicU64,
    pub output_tokens: AtomicU64,
    pub cost_micros: AtomicU64,
}

/// What one request reserved, to settle or give back. Dropped unsettled (its task ended
/// without the log phase: a panic, a stop), it is given back rather than held forever.
#[derive(Debug, Default)]
pub struct Reservation {
    pub amount: u64,
    pub counters: Vec<Arc<Counter>>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for c in self.counters.drain(..) {
            c.committed.fetch_sub(self.amount, Ordering::AcqRel);
        }
    }
}

impl Ledger {
    /// Loads the settled spend of current periods from `dir`.
    pub fn open(dir: &Path) -> Result<Ledger, StoreError> {
        let path = dir.join(FILE_NAME);
        let counters = papaya::HashMap::new();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let saved: Saved =
                    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                let pinned = counters.pin();
                for (key, settled) in saved.counters {
                    pinned.insert(
                        key,
                        Arc::new(Counter {
                            committed: AtomicU64::new(settled),
                            settled: AtomicU64::new(settled),
                        }),
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Io { path, source }),
        }
        Ok(Ledger {
            dir: dir.to_owned(),
            counters,
            usage: papaya::HashMap::new(),
            dirty: AtomicBool::new(false),
            flushing: Mutex::new(()),
        })
    }

    /// The counter of `scope` for `period` now.
    pub fn counter(&self, scope: &str, period: BudgetPeriod, unix_secs: u64) -> Arc<Counter> {
        let key = CounterKey {
            scope: scope.to_owned(),
            period,
            instance: instance(period, unix_secs),
        };
        self.counters
            .pin()
            .get_or_insert_with(key, Default::default)
            .clone()
    }

    /// Counts a settled request of key `id`.
    pub fn record_usage(&self, id: &str, input: u64, output: u64, cost: u64) {
        let pinned = self.usage.pin();
        let usage = match pinned.get(id) {
            Some(u) => u.clone(),
            None => pinned
                .get_or_insert_with(id.to_owned(), Default::default)
                .clone(),
        };
        usage.requests.fetch_add(1, Ordering::Relaxed);
        usage.input_tokens.fetch_add(input, Ordering::Relaxed);
        usage.output_tokens.fetch_add(output, Ordering::Relaxed);
        usage.cost_micros.fetch_add(cost, Ordering::Relaxed);
    }

    /// Every key's usage since start.
    pub fn usage(&self) -> Vec<(String, Arc<KeyUsage>)> {
        let mut out: Vec<_> = self
            .usage
            .pin()
            .iter()
            .map(|(k, u)| (k.clone(), u.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Reserves `amount` against every `(counter, limit)`, or none of them: `Err` names the
    /// first whose limit it would pass.
    pub fn reserve(
        &self,
        amount: u64,
        budgets: Vec<(Arc<Counter>, u64)>,
    ) -> Result<Reservation, usize> {
        let mut taken = Vec::with_capacity(budgets.len());
        for (i, (counter, limit)) in budgets.into_iter().enumerate() {
            let before = counter.committed.fetch_add(amount, Ordering::AcqRel);
            if before.saturating_add(amount) > limit {
                counter.committed.fetch_sub(amount, Ordering::AcqRel);
                for c in &taken {
                    let c: &Arc<Counter> = c;
                    c.committed.fetch_sub(amount, Ordering::AcqRel);
                }
                return Err(i);
            }
            taken.push(counter);
        }
        Ok(Reservation {
            amount,
            counters: taken,
        })
    }

    /// Replaces a reservation by the request's real `cost` (`None`: the request never reached
    /// the provider, nothing is spent).
    pub fn settle(&self, mut reservation: Reservation, cost: Option<u64>) {
        let counters = std::mem::take(&mut reservation.counters);
        for c in &counters {
            match cost {
                Some(cost) => {
                    // committed += cost - amount, without going below zero on the way.
                    c.committed.fetch_add(cost, Ordering::AcqRel);
                    c.committed.fetch_sub(reservation.amount, Ordering::AcqRel);
                    c.settled.fetch_add(cost, Ordering::AcqRel);
                }
                None => {
                    c.committed.fetch_sub(reservation.amount, Ordering::AcqRel);
                }
            }
        }
        if cost.is_some() && !counters.is_empty() {
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// Settled spend and commitments, for the admin API.
    pub fn snapshot(&self) -> Vec<(CounterKey, u64, u64)> {
        let mut out: Vec<_> = self
            .counters
            .pin()
            .iter()
            .map(|(k, c)| (k.clone(), c.settled(), c.committed()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Writes the settled spend of current periods, if anything settled since the last write.
    pub fn flush(&self, unix_secs: u64) -> Result<(), StoreError> {
        let _one = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let saved = {
            let pinned = self.counters.pin();
            // Past days and months are done with, once nothing is reserved in them.
            pinned.retain(|k, c| {
                k.instance == instance(k.period, unix_secs) || c.committed() > c.settled()
            });
            let mut counters: Vec<_> = pinned
                .iter()
                .map(|(k, c)| (k.clone(), c.settled()))
                .collect();
            counters.sort();
            Saved { counters }
        };
        let text = serde_json::to_vec(&saved).expect("the ledger serialises");
        let result = super::store::write_atomically(&self.dir, FILE_NAME, &text);
        if result.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        result
    }
}

/// The reservation of a request: its prompt counted as a token per 4 bytes of the request
/// body (JSON structure included, so at or above the real count for English text; well
/// below it only for scripts of many bytes per token, which is what the bound above is about),
/// and its output as the tokens it allows itself (`max_tokens` and its aliases) or
/// `default_output_tokens`.
pub fn estimate(price: &crate::config::ModelPrice, body_bytes: usize, max_output: u64) -> u64 {
    let prompt = (body_bytes as u64).div_ceil(4);
    cost_of(price, prompt, max_output, 0, 0)
}

/// What `input` (uncached prompt), `output`, cached-read and cache-write tokens cost at
/// `price` (per million tokens), rounded up: never less than the provider bills.
pub fn cost_of(
    price: &crate::config::ModelPrice,
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
) -> u64 {
    let part = |tokens: u64, per_million: u64| {
        let micros = (u128::from(tokens) * u128::from(per_million)).div_ceil(1_000_000);
        u64::try_from(micros).unwrap_or(u64::MAX)
    };
    part(input, price.input)
        .saturating_add(part(cache_read, price.cache_read.unwrap_or(price.input)))
        .saturating_add(part(cache_write, price.cache_write.unwrap_or(price.input)))
        .saturating_add(part(output, price.output))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelPrice;

    #[test]
    fn reservations_never_pass_a_limit_under_contention() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(dir.path()).unwrap());
        let counter = ledger.counter("key:k", BudgetPeriod::Total, 0);
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        if let Ok(r) = ledger.reserve(7, vec![(counter.clone(), 700)]) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            ledger.settle(r, Some(7));
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 100);
        assert_eq!(counter.settled(), 700);
        ledger.flush(0).unwrap();
        let again = Ledger::open(dir.path()).unwrap();
        assert_eq!(
            again.counter("key:k", BudgetPeriod::Total, 0).settled(),
            700
        );
    }

    #[test]
    fn costs_round_up_and_price_cached_tokens_apart() {
        let price = ModelPrice {
            input: 150_000,
            output: 600_000,
            cache_read: Some(75_000),
            cache_write: None,
        };
        assert_eq!(
            cost_of(&price, 1, 0, 0, 0),
            1,
            "a fraction of a micro-unit is one"
        );
        assert_eq!(cost_of(&price, 1_000_000, 1_000_000, 0, 0), 750_000);
        assert_eq!(cost_of(&price, 0, 0, 1_000_000, 0), 75_000);
        assert_eq!(estimate(&price, 400, 100), 15 + 60);
    }
}
