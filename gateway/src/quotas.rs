//! Quotas over calendar periods (UTC day or month), exact across workers and persisted.
//!
//! Counters are atomics in a lock-free map: a request takes one with `fetch_add`, and gives it
//! back when that overshot the limit, so admission is exact whatever the concurrency; nothing on
//! the request path takes a lock. Counts are keyed by stable names (the route id and the
//! quota's name, see [`crate::config::RouteConfig::stable_id`]), never by positions, so
//! reordering routes keeps them. A background thread appends the counters that changed to the
//! journal every `flush_interval` and fsyncs ([`crate::state::journal`]): a crash (`kill -9`,
//! power loss) loses at most the counting of the last `flush_interval`, and never leaves a torn
//! state that loads wrongly. A clean stop flushes once more.
//!
//! The map holds at most `[quotas] max_keys` counters; when full, a new key is refused (429)
//! rather than a live count dropped. Header values count under their keyed hash, never raw.
//! What counts: a request is charged when admitted, and given back when a later stage refuses
//! it or it fails before any byte reached the upstream (see [`QuotaStore::refund`]).

use std::{
    collections::HashMap as StdHashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use papaya::HashMap;
use tracing::{info, warn};

use crate::{
    config::{Config, QuotaConfig, QuotaPeriod},
    limits::{scope_hash, subject_bytes, LimitKey, LimitSubject, MAX_SUBJECT_BYTES},
    state::{
        data_dir::{DataDirError, DataDirLock},
        journal::{Journal, JournalError, Record},
        subject::{SecretError, SubjectHasher},
    },
};

/// Scope hash, period kind, period id.
const KEY_PREFIX_BYTES: usize = 8 + 1 + 4;
const KEY_BYTES: usize = KEY_PREFIX_BYTES + MAX_SUBJECT_BYTES;

/// Days since 1970-01-01 for a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// (year, month) of a day since 1970-01-01.
fn civil_month(days: i64) -> (i64, i64) {
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m)
}

/// The current period's id, and seconds until it ends.
pub fn period_now(period: QuotaPeriod, unix_secs: u64) -> (u32, u64) {
    let days = (unix_secs / 86_400) as i64;
    match period {
        QuotaPeriod::Day => (days as u32, 86_400 - unix_secs % 86_400),
        QuotaPeriod::Month => {
            let (y, m) = civil_month(days);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let end = days_from_civil(ny, nm, 1) as u64 * 86_400;
            ((y * 12 + m - 1) as u32, end - unix_secs)
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One route's quota.
#[derive(Debug)]
pub struct Quota {
    pub name: String,
    pub limit: u64,
    pub period: QuotaPeriod,
    key: LimitKey,
    /// The hash of the route id and the quota's name that keys its counters.
    scope: [u8; 8],
}

impl Quota {
    /// What the quota counts by.
    pub fn key(&self) -> &crate::limits::LimitKey {
        &self.key
    }

    pub fn new(route_id: &str, c: &QuotaConfig) -> Quota {
        let name = c.stable_name();
        Quota {
            scope: scope_hash(&[route_id, &name]),
            name,
            limit: c.limit,
            period: c.period,
            key: LimitKey::parse(&c.key).expect("validate() checked the key"),
        }
    }

    /// The period's length in seconds, for RateLimit-Policy.
    pub fn window_secs(&self) -> u64 {
        match self.period {
            QuotaPeriod::Day => 86_400,
            QuotaPeriod::Month => 30 * 86_400,
        }
    }
}

/// Why a quota refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaRefusal {
    /// Spent for this period: retry after this many seconds.
    Spent(u64),
    /// The counts were handed to a new process (binary upgrade): this one charges no more.
    HandedOver,
    /// The store is full and this key is new: refused rather than dropping a live count.
    Full,
}

/// One unit taken from a quota for a request, to give back if the request is then refused
/// before it reached the upstream. Kept on the stack: no allocation per request.
#[derive(Debug, Clone, Copy)]
pub struct QuotaCharge {
    key: [u8; KEY_BYTES],
    len: u8,
    shared: bool,
}

impl QuotaCharge {
    fn key(&self) -> &[u8] {
        &self.key[..usize::from(self.len)]
    }
}

/// Most quotas one route may have (the charges of a request travel on the stack).
pub const MAX_QUOTAS_PER_ROUTE: usize = 4;

/// The charges taken for one request, to give back together.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuotaCharges {
    charges: [Option<QuotaCharge>; MAX_QUOTAS_PER_ROUTE],
}

impl QuotaCharges {
    pub fn push(&mut self, charge: QuotaCharge) {
        if let Some(slot) = self.charges.iter_mut().find(|c| c.is_none()) {
            *slot = Some(charge);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.charges.iter().all(Option::is_none)
    }

    /// Gives every charge back (see [`QuotaStore::refund`]) and forgets them.
    pub fn refund(&mut self, store: &QuotaStore, cluster: Option<&crate::cluster::Cluster>) {
        for charge in self.charges.iter_mut().filter_map(Option::take) {
            store.refund(&charge, cluster);
        }
    }
}

#[derive(Debug)]
struct Counter {
    count: AtomicU64,
    /// The count the journal holds.
    flushed: AtomicU64,
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum QuotaStoreError {
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{dir}: cannot write the migrated state: {source}")]
    Migrate {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Every quota counter of this host.
pub struct QuotaStore {
    counters: HashMap<Box<[u8]>, Counter>,
    /// Scope hash -> (route id, quota name), for the journal. Only the flusher reads it.
    names: Mutex<StdHashMap<[u8; 8], (String, String)>>,
    journal: Mutex<Journal>,
    max_keys: usize,
    /// Keys header values, for quotas and limits alike.
    pub hasher: SubjectHasher,
    dirty: AtomicBool,
    /// Held while this process owns the data directory; given up on a binary upgrade.
    lock: Mutex<Option<DataDirLock>>,
    /// The counts now belong to a new process: nothing more is charged or written here.
    handed_over: AtomicBool,
}

impl std::fmt::Debug for QuotaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("QuotaStore")
            .field("counters", &self.counters.len())
            .finish()
    }
}

fn period_kind(p: QuotaPeriod) -> u8 {
    match p {
        QuotaPeriod::Day => 0,
        QuotaPeriod::Month => 1,
    }
}

fn key_bytes(scope: [u8; 8], period: QuotaPeriod, period_id: u32, subject: &[u8]) -> QuotaCharge {
    let mut key = [0u8; KEY_BYTES];
    key[..8].copy_from_slice(&scope);
    key[8] = period_kind(period);
    key[9..13].copy_from_slice(&period_id.to_le_bytes());
    let subject = &subject[..subject.len().min(MAX_SUBJECT_BYTES)];
    key[13..13 + subject.len()].copy_from_slice(subject);
    QuotaCharge {
        key,
        len: (KEY_PREFIX_BYTES + subject.len()) as u8,
        shared: false,
    }
}

impl QuotaStore {
    /// Opens the store in `[quotas] data_dir`: takes its lock, loads the counters a previous
    /// run saved (migrating the format that keyed them by route position, once), and opens the
    /// journal. Unreadable lines are skipped and logged; a file that is not ours is an error.
    pub fn open(config: &Config) -> Result<Arc<QuotaStore>, QuotaStoreError> {
        let q = &config.quotas;
        let lock = DataDirLock::acquire(&q.data_dir)?;
        let hasher = SubjectHasher::load(q.key_file.as_deref(), &q.data_dir)?;
        let (journal, loaded) = Journal::open(&q.data_dir)?;
        let mut names = StdHashMap::new();
        // What the legacy format's positions meant, read from the current config.
        let mut by_position = StdHashMap::new();
        for (r, route) in config.routes.iter().enumerate() {
            let id = route.stable_id();
            for (i, quota) in route.quotas.iter().enumerate() {
                let name = quota.stable_name();
                let scope = scope_hash(&[&id, &name]);
                names.insert(scope, (id.clone(), name));
                by_position.insert((r, i), (scope, quota));
            }
        }
        let store = QuotaStore {
            counters: HashMap::new(),
            names: Mutex::new(StdHashMap::new()),
            journal: Mutex::new(journal),
            max_keys: q.max_keys,
            hasher,
            dirty: AtomicBool::new(false),
            lock: Mutex::new(Some(lock)),
            handed_over: AtomicBool::new(false),
        };
        let pinned = store.counters.pin();
        for r in &loaded.records {
            let scope = scope_hash(&[&r.route, &r.quota]);
            names
                .entry(scope)
                .or_insert_with(|| (r.route.clone(), r.quota.clone()));
            let key = key_bytes(scope, r.period, r.period_id, &r.subject);
            pinned.insert(
                key.key().into(),
                Counter {
                    count: AtomicU64::new(r.count),
                    flushed: AtomicU64::new(r.count),
                },
            );
        }
        let mut migrated = 0;
        for (key, count) in &loaded.legacy {
            // route (u16) | quota (u8) | period kind (u8) | period id (u32) | subject
            if key.len() < 8 {
                continue;
            }
            let position = (
                usize::from(u16::from_le_bytes([key[0], key[1]])),
                usize::from(key[2]),
            );
            let Some((scope, quota)) = by_position.get(&position) else {
                continue;
            };
            let period = if key[3] == 0 {
                QuotaPeriod::Day
            } else {
                QuotaPeriod::Month
            };
            let period_id = u32::from_le_bytes(key[4..8].try_into().expect("4 bytes"));
            let raw = &key[8..];
            // Format 1 kept header values raw and consumer ids up to 128 bytes.
            let hashed;
            let digest;
            let subject: &[u8] = match LimitKey::parse(&quota.key) {
                Some(LimitKey::Header(_)) if raw.len() != 16 => {
                    hashed = store.hasher.hash(raw);
                    &hashed
                }
                _ if raw.len() > MAX_SUBJECT_BYTES => {
                    digest = <sha2::Sha256 as sha2::Digest>::digest(raw);
                    &digest
                }
                _ => raw,
            };
            let key = key_bytes(*scope, period, period_id, subject);
            pinned.insert(
                key.key().into(),
                Counter {
                    count: AtomicU64::new(*count),
                    flushed: AtomicU64::new(0),
                },
            );
            migrated += 1;
        }
        drop(pinned);
        *store.names.lock().expect("not poisoned") = names;
        for (path, line, why) in &loaded.skipped {
            warn!(file = %path.display(), line, "skipped an unreadable quota record: {why}");
        }
        if loaded.skipped_total > loaded.skipped.len() {
            warn!(
                skipped = loaded.skipped_total,
                "skipped unreadable quota records (first ones above)"
            );
        }
        if !loaded.legacy.is_empty() {
            store.compact().map_err(|source| QuotaStoreError::Migrate {
                dir: q.data_dir.clone(),
                source,
            })?;
            info!(
                migrated,
                of = loaded.legacy.len(),
                "migrated quota counters from format 1 (keyed by route position) to stable names"
            );
        }
        Ok(Arc::new(store))
    }

    /// Learns the route ids and quota names of `config` (a reloaded config may add some), so
    /// their counters are written under their names.
    pub fn register_names(&self, config: &Config) {
        let mut names = self.names.lock().expect("not poisoned");
        for route in &config.routes {
            let id = route.stable_id();
            for quota in &route.quotas {
                let name = quota.stable_name();
                names
                    .entry(scope_hash(&[&id, &name]))
                    .or_insert_with(|| (id.clone(), name));
            }
        }
    }

    /// Takes one request from the quota; on success the charge to give back if the request is
    /// refused later.
    pub fn take(
        &self,
        quota: &Quota,
        subject: &LimitSubject,
        cluster: Option<&crate::cluster::Cluster>,
    ) -> Result<QuotaCharge, QuotaRefusal> {
        if self.handed_over.load(Ordering::Acquire) {
            return Err(QuotaRefusal::HandedOver);
        }
        let now = unix_now();
        let (period_id, remaining) = period_now(quota.period, now);
        let mut buf = [0u8; MAX_SUBJECT_BYTES];
        let subject = subject_bytes(&quota.key, subject, &mut buf);
        let mut charge = key_bytes(quota.scope, quota.period, period_id, subject);
        let key = charge.key();
        let guard = self.counters.guard();
        let counter = match self.counters.get(key, &guard) {
            Some(c) => c,
            None => {
                if self.counters.len() >= self.max_keys {
                    return Err(QuotaRefusal::Full);
                }
                self.counters.get_or_insert(
                    key.into(),
                    Counter {
                        count: AtomicU64::new(0),
                        flushed: AtomicU64::new(0),
                    },
                    &guard,
                )
            }
        };
        if counter.count.fetch_add(1, Ordering::AcqRel) >= quota.limit {
            counter.count.fetch_sub(1, Ordering::AcqRel);
            return Err(QuotaRefusal::Spent(remaining.max(1)));
        }
        if let Some(c) = cluster {
            // The same bytes on every host name the same Redis counter.
            let shared = shared_key(key);
            if !c.admit(&shared.0[..shared.1], quota.limit, remaining + 60) {
                counter.count.fetch_sub(1, Ordering::AcqRel);
                return Err(QuotaRefusal::Spent(remaining.max(1)));
            }
            charge.shared = true;
        }
        self.dirty.store(true, Ordering::Release);
        Ok(charge)
    }

    /// Gives back a charge: the request it was taken for was refused by a later stage, or
    /// failed before any byte of it reached the upstream. In cluster mode the shared admission
    /// becomes a local credit.
    pub fn refund(&self, charge: &QuotaCharge, cluster: Option<&crate::cluster::Cluster>) {
        let guard = self.counters.guard();
        if let Some(c) = self.counters.get(charge.key(), &guard) {
            let _ = c
                .count
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            self.dirty.store(true, Ordering::Release);
        }
        if let (true, Some(c)) = (charge.shared, cluster) {
            let shared = shared_key(charge.key());
            c.refund(&shared.0[..shared.1]);
        }
    }

    fn current_periods() -> [u32; 2] {
        let now = unix_now();
        [
            period_now(QuotaPeriod::Day, now).0,
            period_now(QuotaPeriod::Month, now).0,
        ]
    }

    /// The record for a counter of a current period, or `None` for past periods and unknown
    /// scopes.
    fn record(
        names: &StdHashMap<[u8; 8], (String, String)>,
        current: [u32; 2],
        key: &[u8],
        count: u64,
    ) -> Option<Record> {
        let scope: [u8; 8] = key.get(..8)?.try_into().ok()?;
        let kind = *key.get(8)?;
        let period_id = u32::from_le_bytes(key.get(9..13)?.try_into().ok()?);
        if period_id < current[usize::from(kind).min(1)] {
            return None;
        }
        let (route, quota) = names.get(&scope)?;
        Some(Record {
            route: route.clone(),
            quota: quota.clone(),
            period: if kind == 0 {
                QuotaPeriod::Day
            } else {
                QuotaPeriod::Month
            },
            period_id,
            subject: key[13..].to_vec(),
            count,
        })
    }

    /// Appends the counters that changed since the last flush, and compacts the journal when
    /// it has grown past the snapshot.
    pub fn flush(&self) -> std::io::Result<()> {
        // After a hand-over the counts belong to the new process: writing would overwrite its.
        if self.handed_over.load(Ordering::Acquire) {
            return Ok(());
        }
        self.write_changes()
    }

    fn write_changes(&self) -> std::io::Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let current = Self::current_periods();
        let names = self.names.lock().expect("not poisoned");
        let mut changed = Vec::new();
        let mut marks = Vec::new();
        for (key, c) in self.counters.pin().iter() {
            let count = c.count.load(Ordering::Acquire);
            if count == c.flushed.load(Ordering::Acquire) {
                continue;
            }
            if let Some(r) = Self::record(&names, current, key, count) {
                changed.push(r);
                marks.push((key.clone(), count));
            }
        }
        drop(names);
        let mut journal = self.journal.lock().expect("not poisoned");
        if let Err(e) = journal.append(&changed) {
            self.dirty.store(true, Ordering::Release);
            return Err(e);
        }
        let pinned = self.counters.pin();
        for (key, count) in marks {
            if let Some(c) = pinned.get(&key) {
                c.flushed.store(count, Ordering::Release);
            }
        }
        let compact = journal.wants_compaction();
        drop(journal);
        if compact {
            self.compact()?;
        }
        Ok(())
    }

    /// Writes every current counter as a new snapshot and empties the journal.
    fn compact(&self) -> std::io::Result<()> {
        let current = Self::current_periods();
        let names = self.names.lock().expect("not poisoned");
        let mut all = Vec::new();
        let mut marks = Vec::new();
        for (key, c) in self.counters.pin().iter() {
            let count = c.count.load(Ordering::Acquire);
            if let Some(r) = Self::record(&names, current, key, count) {
                all.push(r);
                marks.push((key.clone(), count));
            }
        }
        drop(names);
        self.journal.lock().expect("not poisoned").compact(&all)?;
        let pinned = self.counters.pin();
        for (key, count) in marks {
            if let Some(c) = pinned.get(&key) {
                c.flushed.store(count, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Gives the data directory to a new process (binary upgrade): charges stop, a final flush
    /// writes every count, and the lock is released for the new process to take.
    pub fn hand_over(&self) -> std::io::Result<()> {
        self.handed_over.store(true, Ordering::Release);
        // Charges already under way have bumped their counters; the final write sees them.
        self.dirty.store(true, Ordering::Release);
        if let Err(e) = self.write_changes() {
            // Nothing was handed over: keep charging and writing here.
            self.handed_over.store(false, Ordering::Release);
            return Err(e);
        }
        self.lock.lock().expect("not poisoned").take();
        Ok(())
    }

    /// Takes the data directory back after an upgrade that failed (the new process never
    /// started serving).
    pub fn take_back(&self, dir: &std::path::Path) -> Result<(), DataDirError> {
        let lock = DataDirLock::acquire(dir)?;
        *self.lock.lock().expect("not poisoned") = Some(lock);
        self.handed_over.store(false, Ordering::Release);
        Ok(())
    }

    /// Counters held now.
    pub fn len(&self) -> usize {
        self.counters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
    }

    /// Drops counters of past periods from memory.
    pub fn sweep(&self) {
        let current = Self::current_periods();
        self.counters.pin().retain(|key, _| {
            key.get(9..13)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .is_some_and(|id| id >= current[usize::from(key[8]).min(1)])
        });
    }

    /// Starts the flushing thread.
    pub fn start_flusher(self: &Arc<Self>, interval: Duration) -> std::io::Result<()> {
        let store = self.clone();
        std::thread::Builder::new()
            .name("portcullis-quotas".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                if let Err(e) = store.flush() {
                    warn!("cannot save quota counters: {e}");
                }
                store.sweep();
            })?;
        Ok(())
    }
}

/// `pcl:q:` and the local key: the Redis key of a quota counter.
fn shared_key(key: &[u8]) -> ([u8; 6 + KEY_BYTES], usize) {
    let mut shared = [0u8; 6 + KEY_BYTES];
    shared[..6].copy_from_slice(b"pcl:q:");
    shared[6..6 + key.len()].copy_from_slice(key);
    (shared, 6 + key.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_periods() {
        // 2026-11-26T12:00:00Z
        let t = 1_795_694_400;
        assert_eq!(period_now(QuotaPeriod::Day, t).1, 12 * 3600);
        let (month, left) = period_now(QuotaPeriod::Month, t);
        assert_eq!(month, (2026 * 12 + 10) as u32);
        assert_eq!(left, 4 * 86_400 + 12 * 3600, "until 2026-12-01");
        // December rolls into the next year.
        let dec = 1_796_083_200 + 86_400; // 2026-12-02
        assert_eq!(
            period_now(QuotaPeriod::Month, dec).0,
            (2026 * 12 + 11) as u32
        );
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_month(days_from_civil(2024, 2, 29)), (2024, 2));
    }
}
