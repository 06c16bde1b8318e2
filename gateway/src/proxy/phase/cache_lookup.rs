//! Cache lookup phase, after limits and quotas (so hits count against them): on a route with
//! `cache`, a fresh entry answers at once; a stale one within `stale-while-revalidate`
//! answers too (the first such request refreshes it upstream); otherwise the request goes
//! upstream as the one filling the key (revalidating a stale entry that has a validator), or
//! waits for the request already filling it. Unsafe methods invalidate the resource; requests
//! with a body, `no-store`, or a Range the cache does not answer pass by (BYPASS).

use std::{sync::Arc, time::Instant};

use super::Exit;
use crate::{
    cache::{
        directives::RequestDirectives, key, serve, CacheRequest, CacheStatus, FillRole, Freshness,
        ResponseCache,
    },
    http::request::RequestHead,
    proxy::{answer::Answer, context::RequestContext, snapshot::ConfigSnapshot},
    routing::Route,
};

/// Runs the lookup; `Err` is the answer from the cache.
pub fn run(
    snapshot: &ConfigSnapshot,
    route: &Route,
    req: &RequestHead,
    ctx: &mut RequestContext,
) -> Result<(), Exit> {
    let cache = &snapshot.cache;
    let Some(policy) = &route.cache else {
        return Ok(());
    };
    let consumer = match (&ctx.caller, policy.key_consumer) {
        (Some(caller), true) => Some(caller.identity(snapshot).0),
        _ => None,
    };
    let mut primary = std::mem::take(&mut ctx.cache_key);
    key::primary(
        &mut primary,
        ctx.https,
        req.host.unwrap_or_default(),
        req.path,
        req.query,
        policy.sort_query,
        &policy.key_headers,
        req.headers,
        consumer,
    );
    let mut state = CacheRequest::new(CacheStatus::Bypass, primary);
    state.stale_on_error = policy.stale_on_error;
    state.keyed_by_consumer = consumer.is_some();
    state.lock_timeout = policy.lock_timeout;
    state.credentials = ctx.caller.is_some()
        || req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("authorization"));
    let counters = &cache.counters;
    let bypass = |ctx: &mut RequestContext, state: CacheRequest| {
        counters
            .bypasses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ctx.cache = Some(state);
        Ok(())
    };
    match req.method {
        "GET" | "HEAD" => {}
        // An unsafe method may change the resource: its entries go (RFC 9111 §4.4).
        "POST" | "PUT" | "DELETE" | "PATCH" => {
            let url_len = state
                .key
                .iter()
                .position(|b| *b == b'\n')
                .unwrap_or(state.key.len());
            cache.invalidate_resource(&state.key[..url_len]);
            return bypass(ctx, state);
        }
        _ => return bypass(ctx, state),
    }
    let asks = RequestDirectives::of(req.headers);
    state.range = serve::range_of(req.headers);
    if asks.no_store
        || req.has_body()
        || req.upgrade.is_some()
        || state.range == serve::RangeAsk::Other
    {
        return bypass(ctx, state);
    }
    let now = Instant::now();
    let found = cache.find(&mut state.key, req.headers);
    if let Some(entry) = found {
        match entry.freshness(now) {
            Freshness::Fresh if !asks.revalidate => return hit(ctx, cache, state, entry),
            Freshness::StaleWhileRevalidate if !asks.revalidate => {
                // Served stale at once; the first request to see it goes on through the
                // phases, so the upstream head is written for the background refresh.
                // Only a whole GET can refresh it (a HEAD or a range would not fetch the body).
                let whole_get = !req.is_head() && state.range == serve::RangeAsk::None;
                let refreshes = whole_get
                    && match cache.begin_fill(&state.key) {
                        FillRole::Filler(guard) => {
                            state.fill = Some(guard);
                            true
                        }
                        FillRole::Waiter(_) => false,
                    };
                state.entry = Some(entry);
                state.status = CacheStatus::Stale;
                counters
                    .stale
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                ctx.cache = Some(state);
                return if refreshes {
                    Ok(())
                } else {
                    Err(Answer::Cached.into())
                };
            }
            _ => state.entry = Some(entry),
        }
    }
    // A miss (or a stale entry): a range or a HEAD goes upstream as it is, unstored.
    if state.range != serve::RangeAsk::None || req.is_head() {
        state.entry = None;
        return bypass(ctx, state);
    }
    state.status = CacheStatus::Miss;
    counters
        .misses
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match cache.begin_fill(&state.key) {
        FillRole::Filler(guard) => state.fill = Some(guard),
        FillRole::Waiter(fill) => state.wait = Some(fill),
    }
    ctx.cache = Some(state);
    Ok(())
}

fn hit(
    ctx: &mut RequestContext,
    cache: &Arc<ResponseCache>,
    mut state: CacheRequest,
    entry: Arc<crate::cache::Entry>,
) -> Result<(), Exit> {
    cache
        .counters
        .hits
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    state.status = CacheStatus::Hit;
    state.entry = Some(entry);
    ctx.cache = Some(state);
    Err(Answer::Cached.into())
}

/// After waiting for another request's fill: the entry it stored, if it stored one this
/// request may have (`Err`: answer with it); else this request fills the key itself if it
/// is free, or goes upstream unstored.
pub fn after_wait(
    cache: &Arc<ResponseCache>,
    state: &mut CacheRequest,
    request_fields: &[httparse::Header],
) -> Result<(), Answer> {
    state.wait = None;
    state.key.truncate(state.primary_len);
    if let Some(entry) = cache.find(&mut state.key, request_fields) {
        if entry.freshness(Instant::now()) == Freshness::Fresh {
            cache
                .counters
                .coalesced
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            state.status = CacheStatus::Hit;
            state.entry = Some(entry);
            return Err(Answer::Cached);
        }
        // Stored stale (no-cache, max-age=0): kept, as the lookup keeps it, to be revalidated
        // or to answer for an upstream error.
        state.entry = Some(entry);
    }
    if let FillRole::Filler(guard) = cache.begin_fill(&state.key) {
        state.fill = Some(guard);
    }
    Ok(())
}
