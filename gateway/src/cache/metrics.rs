//! The cache's lines of `/metrics`: answers by cache status, stores and what was not stored,
//! evictions, coalesced waits, purges, and the bytes and entries held.

use std::{fmt::Write, sync::atomic::Ordering};

use super::ResponseCache;

pub fn render(cache: &ResponseCache, out: &mut String) {
    let c = &cache.counters;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let _ = writeln!(out, "# HELP portcullis_cache_requests_total Requests on caching routes, by what the cache did.\n# TYPE portcullis_cache_requests_total counter");
    for (result, n) in [
        ("hit", load(&c.hits)),
        ("miss", load(&c.misses)),
        ("stale", load(&c.stale)),
        ("bypass", load(&c.bypasses)),
    ] {
        let _ = writeln!(
            out,
            "portcullis_cache_requests_total{{result=\"{result}\"}} {n}"
        );
    }
    for (name, help, n) in [
        (
            "portcullis_cache_revalidated_total",
            "Stale entries the upstream confirmed (304).",
            load(&c.revalidated),
        ),
        (
            "portcullis_cache_stores_total",
            "Responses stored.",
            load(&c.stores),
        ),
        (
            "portcullis_cache_evictions_total",
            "Entries evicted to stay within max_bytes.",
            load(&c.evictions),
        ),
        (
            "portcullis_cache_coalesced_total",
            "Misses answered by another request's fill.",
            load(&c.coalesced),
        ),
        (
            "portcullis_cache_purged_total",
            "Entries removed by purges.",
            load(&c.purged),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {n}"
        );
    }
    let _ = writeln!(out, "# HELP portcullis_cache_not_stored_total Storable responses not stored, by reason.\n# TYPE portcullis_cache_not_stored_total counter");
    for (reason, n) in [
        ("too_large", load(&c.too_large)),
        ("incomplete", load(&c.incomplete)),
    ] {
        let _ = writeln!(
            out,
            "portcullis_cache_not_stored_total{{reason=\"{reason}\"}} {n}"
        );
    }
    let (bytes, entries) = cache.size();
    let _ = writeln!(out, "# HELP portcullis_cache_bytes Bytes the entries take.\n# TYPE portcullis_cache_bytes gauge\nportcullis_cache_bytes {bytes}");
    let _ = writeln!(out, "# HELP portcullis_cache_entries Entries held.\n# TYPE portcullis_cache_entries gauge\nportcullis_cache_entries {entries}");
}
