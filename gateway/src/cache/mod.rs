//! The response cache (RFC 9111, shared-cache rules): complete upstream responses kept in
//! memory, bounded in bytes and shared by every worker of the host, served with `Age` and a
//! status field (`X-Cache: HIT | MISS | STALE | BYPASS`). What is stored, and under which key,
//! is decided by [`policy`] and [`key`]; concurrent misses of one key are coalesced into one
//! upstream request ([`Fill`]); purges go by resource, prefix or tag.
//!
//! The store is moka's concurrent cache, weighed in bytes (head, body, key), evicting by its
//! TinyLFU policy: its locks are sharded, and a hit takes one of them briefly.

pub mod broadcast;
pub mod directives;
pub mod key;
pub mod metrics;
pub mod policy;
pub mod record;
pub mod serve;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use httparse::Header;

/// Entries whose stale time ran out are forgotten after this much more (a validator may still
/// save a full transfer meanwhile).
const REVALIDATION_KEEP: Duration = Duration::from_secs(3600);
/// Resources whose invalidation is remembered, at most (entries beyond it are invalidated
/// by a scan instead).
const MAX_INVALIDATIONS: u64 = 100_000;
/// How long an invalidation is remembered: longer than any entry is kept for it to matter.
const INVALIDATION_KEEP: Duration = Duration::from_secs(2 * 86_400);

/// What the cache did with a request, as its status field says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Stale,
    Bypass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Stale => "STALE",
            CacheStatus::Bypass => "BYPASS",
        }
    }
}

/// A stored response.
#[derive(Debug)]
pub struct Entry {
    pub status: u16,
    /// `HTTP/1.1 NNN Reason` and the stored fields, each line ending in CRLF: no framing,
    /// `Age`, connection or per-request fields.
    pub head: Box<[u8]>,
    pub body: bytes::Bytes,
    /// When it was stored or last revalidated, and the age the upstream gave it then.
    pub stored_at: Instant,
    pub initial_age: Duration,
    pub fresh_for: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// Never served stale.
    pub must_revalidate: bool,
    pub etag: Option<Box<[u8]>>,
    pub last_modified: Option<Box<[u8]>>,
    /// The resource (`scheme://host/path?query`), what purges by key and prefix match.
    pub url: Box<[u8]>,
    /// Values of the tag field, what purges by tag match.
    pub tags: Box<[Box<str>]>,
}

/// How usable an entry is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Stale, within `stale-while-revalidate`: served while it is refreshed.
    StaleWhileRevalidate,
    Stale,
}

impl Entry {
    pub fn age(&self, now: Instant) -> Duration {
        self.initial_age + now.saturating_duration_since(self.stored_at)
    }

    pub fn freshness(&self, now: Instant) -> Freshness {
        let age = self.age(now);
        if age < self.fresh_for {
            Freshness::Fresh
        } else if !self.must_revalidate && age < self.fresh_for + self.stale_while_revalidate {
            Freshness::StaleWhileRevalidate
        } else {
            Freshness::Stale
        }
    }

    /// Whether it may answer in place of an upstream error, `extra` past its freshness at
    /// most beyond its own `stale-if-error` (a route's `stale_on_error`).
    pub fn usable_on_error(&self, now: Instant, extra: Duration) -> bool {
        !self.must_revalidate && self.age(now) < self.fresh_for + self.stale_if_error.max(extra)
    }

    /// A copy the upstream confirmed with a 304 whose fields are `confirmation`: fresh again
    /// for what the 304 says, else for as long as before.
    pub fn refreshed(&self, confirmation: &[Header]) -> Entry {
        let d = directives::ResponseDirectives::of(confirmation);
        Entry {
            status: self.status,
            head: self.head.clone(),
            body: self.body.clone(),
            stored_at: Instant::now(),
            initial_age: Duration::ZERO,
            fresh_for: d.freshness().unwrap_or(self.fresh_for),
            stale_while_revalidate: self.stale_while_revalidate,
            stale_if_error: self.stale_if_error,
            must_revalidate: self.must_revalidate,
            etag: self.etag.clone(),
            last_modified: self.last_modified.clone(),
            url: self.url.clone(),
            tags: self.tags.clone(),
        }
    }

    pub fn has_validator(&self) -> bool {
        self.etag.is_some() || self.last_modified.is_some()
    }

    fn weight(&self, key: &[u8]) -> u32 {
        let bytes = self.head.len() + self.body.len() + key.len() + self.url.len() + 160;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    /// How long it is worth keeping: while it is fresh or may be served stale, then a while
    /// for revalidation when it has a validator.
    fn keep_for(&self) -> Duration {
        let stale = self.stale_while_revalidate.max(self.stale_if_error);
        let revalidate = if self.has_validator() {
            REVALIDATION_KEEP
        } else {
            Duration::ZERO
        };
        (self.fresh_for + stale + revalidate)
            .saturating_sub(self.initial_age)
            .max(Duration::from_secs(1))
    }
}

/// An entry's weight in bytes; moka hands the key as `&K`.
#[allow(clippy::borrowed_box)]
fn weigh(key: &Box<[u8]>, entry: &Arc<Entry>) -> u32 {
    entry.weight(key)
}

/// A `Vary` rule's weight in bytes.
#[allow(clippy::borrowed_box)]
fn weigh_rule(primary: &Box<[u8]>, names: &Arc<[Box<str>]>) -> u32 {
    let names: usize = names.iter().map(|n| n.len() + 16).sum();
    u32::try_from(primary.len() + names + 64).unwrap_or(u32::MAX)
}

struct KeepFor;

impl moka::Expiry<Box<[u8]>, Arc<Entry>> for KeepFor {
    fn expire_after_create(
        &self,
        _key: &Box<[u8]>,
        value: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.keep_for())
    }

    fn expire_after_update(
        &self,
        _key: &Box<[u8]>,
        value: &Arc<Entry>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.keep_for())
    }
}

/// What the cache counted, for `/metrics`.
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stale: AtomicU64,
    pub bypasses: AtomicU64,
    /// Stale entries the upstream confirmed with 304.
    pub revalidated: AtomicU64,
    pub stores: AtomicU64,
    /// Responses not stored because they were larger than `max_entry_bytes`.
    pub too_large: AtomicU64,
    /// Responses not stored because their body did not arrive whole.
    pub incomplete: AtomicU64,
    pub evictions: AtomicU64,
    /// Misses that waited for another request filling the same key.
    pub coalesced: AtomicU64,
    pub purged: AtomicU64,
}

/// A purge: every entry of one resource, of resources under a prefix, or with a tag.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purge {
    Key(String),
    Prefix(String),
    Tag(String),
}

/// The host's cache.
pub struct ResponseCache {
    entries: moka::sync::Cache<Box<[u8]>, Arc<Entry>>,
    /// Primary key -> the field names its responses vary on (weighed in bytes).
    vary: moka::sync::Cache<Box<[u8]>, Arc<[Box<str>]>>,
    /// Resources an unsafe method was sent for, and when: their entries stored before then
    /// are gone (checked on lookup, so an invalidation costs no scan).
    invalidated: moka::sync::Cache<Box<[u8]>, Instant>,
    /// Set by the first invalidation: until then lookups skip that check.
    any_invalidated: AtomicBool,
    fills: papaya::HashMap<Box<[u8]>, Arc<Fill>>,
    pub counters: Arc<CacheCounters>,
    pub max_entry_bytes: usize,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl ResponseCache {
    pub fn new(max_bytes: u64, max_entry_bytes: usize) -> ResponseCache {
        let counters = Arc::new(CacheCounters::default());
        let evicted = counters.clone();
        ResponseCache {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(weigh)
                .expire_after(KeepFor)
                .eviction_listener(move |_, _, cause| {
                    if cause == moka::notification::RemovalCause::Size {
                        evicted.evictions.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .build(),
            vary: moka::sync::Cache::builder()
                .max_capacity((max_bytes / 16).max(1 << 20))
                .weigher(weigh_rule)
                .build(),
            invalidated: moka::sync::Cache::builder()
                .max_capacity(MAX_INVALIDATIONS)
                .time_to_live(INVALIDATION_KEEP)
                .build(),
            any_invalidated: AtomicBool::new(false),
            fills: papaya::HashMap::new(),
            counters,
            max_entry_bytes,
        }
    }

    /// Completes `key` (holding the primary key) with the variant part the resource's known
    /// `Vary` rule selects from `headers`, and finds its entry.
    pub fn find(&self, key: &mut Vec<u8>, headers: &[Header]) -> Option<Arc<Entry>> {
        if let Some(vary) = self.vary.get(&key[..]) {
            key::variant(key, &vary, headers);
        }
        let entry = self.entries.get(&key[..])?;
        if self.any_invalidated.load(Ordering::Relaxed) {
            if let Some(at) = self.invalidated.get(&entry.url[..]) {
                if entry.stored_at <= at {
                    self.entries.invalidate(&key[..]);
                    return None;
                }
            }
        }
        Some(entry)
    }

    /// The fields responses of `primary` vary on: `names` (a new response's) and those its
    /// earlier responses gave, so one variant without Vary cannot make the others unreachable
    /// or answer for them.
    pub fn vary_rule(&self, primary: &[u8], names: Vec<Box<str>>) -> Vec<Box<str>> {
        let Some(known) = self.vary.get(primary) else {
            return names;
        };
        let mut all: Vec<Box<str>> = known.iter().cloned().chain(names).collect();
        all.sort();
        all.dedup();
        all
    }

    /// Stores `entry` under `key`, the variant of `primary` that `vary` selects (see
    /// [`key::variant`]); from now on lookups of `primary` select by `vary`.
    pub fn store(&self, primary: &[u8], key: Box<[u8]>, vary: Vec<Box<str>>, entry: Entry) {
        if vary.is_empty() {
            self.vary.invalidate(primary);
        } else {
            self.vary.insert(primary.into(), vary.into());
        }
        self.entries.insert(key, Arc::new(entry));
        self.counters.stores.fetch_add(1, Ordering::Relaxed);
    }

    /// Replaces the entry under `key` (a full key) by `entry` (a revalidated copy).
    pub fn replace(&self, key: &[u8], entry: Arc<Entry>) {
        self.entries.insert(key.into(), entry);
    }

    /// Makes every entry of the resource `url` stored until now unusable (what an unsafe
    /// method on it does, RFC 9111 §4.4), without a scan.
    pub fn invalidate_resource(&self, url: &[u8]) {
        self.invalidated.insert(url.into(), Instant::now());
        self.any_invalidated.store(true, Ordering::Relaxed);
    }

    /// Removes what `p` names; returns how many entries.
    pub fn apply(&self, p: &Purge) -> usize {
        let n = match p {
            Purge::Key(url) => self.purge(|e| &*e.url == url.as_bytes()),
            Purge::Prefix(prefix) => self.purge(|e| e.url.starts_with(prefix.as_bytes())),
            Purge::Tag(tag) => self.purge(|e| e.tags.iter().any(|t| **t == **tag)),
        };
        self.counters.purged.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    fn purge(&self, matches: impl Fn(&Entry) -> bool) -> usize {
        let doomed: Vec<Arc<Box<[u8]>>> = self
            .entries
            .iter()
            .filter(|(_, e)| matches(e))
            .map(|(k, _)| k)
            .collect();
        for k in &doomed {
            self.entries.invalidate(&***k);
        }
        doomed.len()
    }

    /// Bytes held (weights of the entries), and how many entries.
    pub fn size(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (self.entries.weighted_size(), self.entries.entry_count())
    }

    /// Becomes the one request filling `key`, or learns who is.
    pub fn begin_fill(self: &Arc<Self>, key: &[u8]) -> FillRole {
        let fill = Arc::new(Fill::default());
        let pinned = self.fills.pin();
        match pinned.try_insert(key.into(), fill.clone()) {
            Ok(_) => FillRole::Filler(FillGuard {
                cache: self.clone(),
                key: key.into(),
                fill,
            }),
            Err(e) => FillRole::Waiter(e.current.clone()),
        }
    }
}

/// What the cache does with one request, from the lookup phase to the log phase.
#[derive(Debug)]
pub struct CacheRequest {
    pub status: CacheStatus,
    /// The primary key (its first `primary_len` bytes), then the variant the lookup selected.
    pub key: Vec<u8>,
    pub primary_len: usize,
    /// The entry served (a hit, or stale), or the stale one being revalidated, kept to answer
    /// in place of an upstream error when it may.
    pub entry: Option<Arc<Entry>>,
    /// This request fills the key (its response is recorded when storable).
    pub fill: Option<FillGuard>,
    /// Another request fills the key: wait for it first.
    pub wait: Option<Arc<Fill>>,
    pub recorder: Option<record::Recorder>,
    /// The gateway added its own conditional fields to the upstream request.
    pub revalidating: bool,
    /// The request carried credentials (see [`policy::plan`]).
    pub credentials: bool,
    /// The key holds the authenticated consumer.
    pub keyed_by_consumer: bool,
    /// A single byte range asked for, answered from a whole entry.
    pub range: serve::RangeAsk,
    pub stale_on_error: Duration,
    pub lock_timeout: Duration,
}

impl CacheRequest {
    pub fn new(status: CacheStatus, key: Vec<u8>) -> CacheRequest {
        CacheRequest {
            status,
            primary_len: key.len(),
            key,
            entry: None,
            fill: None,
            wait: None,
            recorder: None,
            revalidating: false,
            credentials: false,
            keyed_by_consumer: false,
            range: serve::RangeAsk::None,
            stale_on_error: Duration::ZERO,
            lock_timeout: Duration::ZERO,
        }
    }

    /// The stale entry, when it may answer in place of an upstream failure now.
    pub fn stale_for_error(&self) -> Option<&Arc<Entry>> {
        self.entry
            .as_ref()
            .filter(|e| e.usable_on_error(Instant::now(), self.stale_on_error))
    }
}

/// One key being filled: those waiting for it are woken when it ends, stored or not.
#[derive(Debug, Default)]
pub struct Fill {
    done: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Fill {
    /// Waits until the fill ends, for at most `limit`; whether it ended.
    pub async fn wait(&self, limit: Duration) -> bool {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.done.load(Ordering::Acquire) {
            return true;
        }
        tokio::time::timeout(limit, notified).await.is_ok()
    }
}

/// Whether this request fills a key or waits for the one that does.
#[derive(Debug)]
pub enum FillRole {
    Filler(FillGuard),
    Waiter(Arc<Fill>),
}

/// Held by the request filling a key; dropping it (stored or not) wakes the waiters.
pub struct FillGuard {
    cache: Arc<ResponseCache>,
    key: Box<[u8]>,
    fill: Arc<Fill>,
}

impl std::fmt::Debug for FillGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FillGuard")
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        let pinned = self.cache.fills.pin();
        let _ = pinned.remove_if(&self.key, |_, f| Arc::ptr_eq(f, &self.fill));
        self.fill.done.store(true, Ordering::Release);
        self.fill.notify.notify_waiters();
    }
}

/// A request or response field, for tests.
#[cfg(test)]
pub(crate) fn test_field<'a>(name: &'a str, value: &'a str) -> Header<'a> {
    Header {
        name,
        value: value.as_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(url: &str, tags: &[&str], body: usize) -> Entry {
        Entry {
            status: 200,
            head: b"HTTP/1.1 200 OK\r\n".to_vec().into(),
            body: bytes::Bytes::from(vec![b'x'; body]),
            stored_at: Instant::now(),
            initial_age: Duration::ZERO,
            fresh_for: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            must_revalidate: false,
            etag: None,
            last_modified: None,
            url: url.as_bytes().into(),
            tags: tags.iter().map(|t| Box::from(*t)).collect(),
        }
    }

    #[test]
    fn purges_go_by_resource_prefix_and_tag() {
        let c = Arc::new(ResponseCache::new(1 << 20, 1 << 16));
        for (url, tags) in [
            ("http://h/a", &["t1"][..]),
            ("http://h/img/1", &["t2"]),
            ("http://h/img/2", &["t1", "t2"]),
        ] {
            c.store(
                url.as_bytes(),
                url.as_bytes().into(),
                vec![],
                entry(url, tags, 10),
            );
        }
        let mut key = b"http://h/a".to_vec();
        assert!(c.find(&mut key, &[]).is_some());
        assert_eq!(c.apply(&Purge::Prefix("http://h/img/".into())), 2);
        assert_eq!(c.apply(&Purge::Tag("t1".into())), 1);
        assert_eq!(c.apply(&Purge::Key("http://h/a".into())), 0);
        assert_eq!(c.size().1, 0);
    }

    #[test]
    fn the_byte_bound_evicts() {
        let c = Arc::new(ResponseCache::new(64 * 1024, 1 << 16));
        for i in 0..100 {
            let url = format!("http://h/{i}");
            c.store(
                url.as_bytes(),
                url.as_bytes().into(),
                vec![],
                entry(&url, &[], 4096),
            );
        }
        let (bytes, _) = c.size();
        assert!(bytes <= 64 * 1024, "{bytes}");
        assert!(c.counters.evictions.load(Ordering::Relaxed) > 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_fills_and_the_others_wait_for_it() {
        let c = Arc::new(ResponseCache::new(1 << 20, 1 << 16));
        let FillRole::Filler(guard) = c.begin_fill(b"k") else {
            panic!("the first fills")
        };
        let FillRole::Waiter(fill) = c.begin_fill(b"k") else {
            panic!("the second waits")
        };
        assert!(!fill.wait(Duration::from_millis(10)).await, "bounded");
        drop(guard);
        assert!(fill.wait(Duration::from_millis(10)).await);
        assert!(matches!(c.begin_fill(b"k"), FillRole::Filler(_)));
    }
}
