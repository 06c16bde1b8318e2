//! `[cache]`: the response cache's bounds and field names; routes opt in with a `cache` table.

use serde::{Deserialize, Serialize};

use super::{key_path, ConfigDuration, Invalid, KeyPath};

/// `[cache]`: one cache per host, shared by the workers and kept across reloads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Bytes the entries may take (heads, bodies and keys); the least useful go first.
    pub max_bytes: u64,
    /// Largest body stored; a larger response passes through uncached (counted).
    pub max_entry_bytes: u64,
    /// The response field that says HIT, MISS, STALE or BYPASS on cached routes.
    pub status_header: String,
    /// The response field whose values (space- or comma-separated) tag an entry, for purges
    /// by tag.
    pub tag_header: String,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: 256 * 1024 * 1024,
            max_entry_bytes: 8 * 1024 * 1024,
            status_header: "X-Cache".into(),
            tag_header: "Surrogate-Key".into(),
        }
    }
}

impl CacheConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        let at = || key_path("cache");
        if self.max_bytes < 1024 * 1024 {
            return Err(Invalid::new(
                at().key("max_bytes"),
                "at least 1048576 (1 MiB)",
            ));
        }
        if self.max_entry_bytes == 0 || self.max_entry_bytes > self.max_bytes / 8 {
            return Err(Invalid::new(
                at().key("max_entry_bytes"),
                "from 1 to an eighth of max_bytes",
            ));
        }
        for (key, name) in [
            ("status_header", &self.status_header),
            ("tag_header", &self.tag_header),
        ] {
            if name.is_empty() || !name.bytes().all(super::is_token_byte) {
                return Err(Invalid::new(
                    at().key(key),
                    "a field name (letters, digits and !#$%&'*+-.^_`|~)",
                ));
            }
        }
        Ok(())
    }
}

/// A route's `cache = { ... }`: it caches GET and HEAD answers by RFC 9111's rules.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheConfig {
    /// How long a response that states no freshness (no `max-age`, `s-maxage` or `Expires`)
    /// is fresh; without it such responses are not stored.
    pub default_ttl: Option<ConfigDuration>,
    /// Request fields that are part of the key (each value selects its own entries).
    #[serde(default)]
    pub key_headers: Vec<String>,
    /// Key the cache by the authenticated consumer: answers to authenticated requests are then
    /// stored, each consumer with its own.
    #[serde(default)]
    pub key_consumer: bool,
    /// Sort the query's parameters in the key (`?b=1&a=2` and `?a=2&b=1` share an entry).
    #[serde(default)]
    pub sort_query: bool,
    /// Store responses that set cookies, without their `Set-Cookie` (the request that filled
    /// the entry still gets its cookie); without it they are not stored.
    #[serde(default)]
    pub strip_set_cookie: bool,
    /// Answer from an entry up to this long past its freshness when the upstream fails or
    /// answers 500, 502, 503 or 504, whatever the entry's own `stale-if-error` says.
    pub stale_on_error: Option<ConfigDuration>,
    /// How long concurrent misses of one key wait for the request filling it before going
    /// upstream themselves.
    #[serde(default = "default_lock_timeout")]
    pub lock_timeout: ConfigDuration,
}

fn default_lock_timeout() -> ConfigDuration {
    ConfigDuration::from_millis(5000)
}

impl RouteCacheConfig {
    pub fn validate(&self, at: impl Fn() -> KeyPath) -> Result<(), Invalid> {
        for (i, name) in self.key_headers.iter().enumerate() {
            if name.is_empty() || !name.bytes().all(super::is_token_byte) {
                return Err(Invalid::new(
                    at().key("key_headers").index(i),
                    "a field name",
                ));
            }
        }
        if self.lock_timeout.get() > std::time::Duration::from_secs(60) {
            return Err(Invalid::new(at().key("lock_timeout"), "at most 60s"));
        }
        Ok(())
    }
}
