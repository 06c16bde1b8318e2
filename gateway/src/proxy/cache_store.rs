//! The cache's part of the exchange with the upstream (phases 13 to 15 on a route that
//! caches): the gateway's own conditional fields when it revalidates a stale entry, the
//! decision on each response head (a 304 refreshes the entry, which then answers; a 5xx lets
//! a stale entry answer when it may; a storable response is recorded while it streams), and
//! the cache status field on relayed answers.

use std::{io::Write, sync::Arc, time::Instant};

use tracing::debug;

use super::{
    connection::Connection,
    context::{RequestContext, RequestFacts},
    snapshot::ConfigSnapshot,
};
use crate::{
    cache::{
        directives::ResponseDirectives,
        policy,
        record::{with_request_fields, Recorder},
        CacheStatus, Entry,
    },
    http::{encode, response::ResponseHead, BodyFraming},
    io::Transport,
};

impl<C: Transport> Connection<'_, C> {
    /// Revalidating a stale entry with a validator, for a client that sent no conditional of
    /// its own: `If-None-Match` and `If-Modified-Since` from the entry go at the end of the
    /// upstream head.
    pub(super) fn add_revalidation_fields(&mut self) {
        let Some(c) = &mut self.ctx.cache else { return };
        let Some(entry) = c.entry.as_ref().filter(|_| c.fill.is_some()) else {
            return;
        };
        if !entry.has_validator() || !self.out.ends_with(b"\r\n\r\n") {
            return;
        }
        let head = &self.inbuf[..self.ctx.facts.head_len.min(self.inbuf.len())];
        let clients_own = with_request_fields(head, |fields| {
            fields.iter().any(|f| {
                f.name.eq_ignore_ascii_case("if-none-match")
                    || f.name.eq_ignore_ascii_case("if-modified-since")
            })
        });
        if clients_own {
            return;
        }
        self.out.truncate(self.out.len() - 2);
        // Validators were checked field values when stored.
        if let Some(etag) = &entry.etag {
            self.out.extend_from_slice(b"if-none-match: ");
            self.out.extend_from_slice(etag);
            self.out.extend_from_slice(b"\r\n");
        }
        if let Some(modified) = &entry.last_modified {
            self.out.extend_from_slice(b"if-modified-since: ");
            self.out.extend_from_slice(modified);
            self.out.extend_from_slice(b"\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
        c.revalidating = true;
    }

    /// The upstream failed: a stale entry answers instead when it may (its `stale-if-error`,
    /// or the route's `stale_on_error`).
    pub(super) fn stale_instead_of_error(&mut self) -> bool {
        let Some(c) = &mut self.ctx.cache else {
            return false;
        };
        if c.stale_for_error().is_none() {
            return false;
        }
        c.status = CacheStatus::Stale;
        c.fill = None;
        if let Some(cache) = &self.generation.snapshot.cache {
            cache
                .counters
                .stale
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        true
    }
}

/// Decides what the cache does with `resp` (to the request whose head starts `inbuf`); true
/// when a stored entry answers instead.
pub(super) fn cache_response(
    ctx: &mut RequestContext,
    snapshot: &ConfigSnapshot,
    inbuf: &[u8],
    resp: &ResponseHead,
    facts: &RequestFacts,
) -> bool {
    let (Some(c), Some(cache)) = (&mut ctx.cache, &snapshot.cache) else {
        return false;
    };
    let now = Instant::now();
    if c.revalidating && resp.status == 304 {
        if let Some(old) = &c.entry {
            // Still good: fresh again for what the 304 says, else for as long as before.
            let d = ResponseDirectives::of(resp.headers);
            let entry = Entry {
                status: old.status,
                head: old.head.clone(),
                body: old.body.clone(),
                stored_at: now,
                initial_age: std::time::Duration::ZERO,
                fresh_for: d.freshness().unwrap_or(old.fresh_for),
                stale_while_revalidate: old.stale_while_revalidate,
                stale_if_error: old.stale_if_error,
                must_revalidate: old.must_revalidate,
                etag: old.etag.clone(),
                last_modified: old.last_modified.clone(),
                url: old.url.clone(),
                tags: old.tags.clone(),
            };
            let entry = Arc::new(entry);
            cache.replace(&c.key, entry.clone());
            cache
                .counters
                .revalidated
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            c.entry = Some(entry);
            c.status = CacheStatus::Hit;
            return true;
        }
    }
    if matches!(resp.status, 500 | 502 | 503 | 504) && c.stale_for_error().is_some() {
        c.status = CacheStatus::Stale;
        cache
            .counters
            .stale
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return true;
    }
    // Whatever else comes, a stale entry has done its part.
    c.entry = None;
    if c.fill.is_none() || facts.is_head || resp.status == 206 {
        return false;
    }
    let Some(route) = ctx.route.map(|r| snapshot.routes.route(r)) else {
        return false;
    };
    let Some(rules) = &route.cache else {
        return false;
    };
    let plan = match policy::plan(
        resp,
        c.credentials,
        rules,
        &snapshot.config.cache.tag_header,
    ) {
        Ok(mut plan) => {
            plan.vary = cache.vary_rule(&c.key[..c.primary_len], plan.vary);
            plan
        }
        Err(why) => {
            debug!(route = %route.id, status = resp.status, ?why, "response not stored");
            return false;
        }
    };
    let mut head = Vec::new();
    if encode::write_storable_head(&mut head, resp, plan.strip_set_cookie).is_err() {
        return false;
    }
    let declared = match resp.body {
        BodyFraming::Length(n) => Some(n),
        BodyFraming::None => Some(0),
        _ => None,
    };
    let request_head = &inbuf[..facts.head_len.min(inbuf.len())];
    c.recorder = Recorder::new(
        &c.key[..c.primary_len],
        request_head,
        resp.status,
        head.into(),
        plan,
        cache.max_entry_bytes,
        declared,
    );
    if c.recorder.is_none() {
        cache
            .counters
            .too_large
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    false
}

/// On a route that caches, `X-Cache: MISS` (or BYPASS) at the end of the gateway's own fields
/// of a relayed answer.
pub(super) fn write_cache_status_field(ctx: &mut RequestContext, snapshot: &ConfigSnapshot) {
    let Some(c) = &ctx.cache else { return };
    let name = &snapshot.config.cache.status_header;
    let _ = write!(
        ctx.correlation.response_fields,
        "{name}: {}\r\n",
        c.status.as_str()
    );
}
