//! The cache's part of the exchange with the upstream (phases 13 to 15 on a route that
//! caches): the gateway's own conditional fields when it revalidates a stale entry, the
//! decision on each response head (a 304 refreshes the entry, which then answers; a 5xx lets
//! a stale entry answer when it may; a storable response is recorded while it streams), and
//! the cache status field on relayed answers.

use std::{io::Write, sync::Arc};

use tracing::debug;

use super::{
    connection::Connection,
    context::{RequestContext, RequestFacts},
    snapshot::ConfigSnapshot,
};
use crate::{
    cache::{
        policy,
        record::{with_request_fields, Recorder},
        CacheStatus, ResponseCache,
    },
    http::{encode, response::ResponseHead, BodyFraming},
    io::Transport,
};

impl<C: Transport> Connection<'_, C> {
    /// Revalidating a stale entry with a validator, for a client that sent no conditional of
    /// its own: `If-None-Match` and `If-Modified-Since` from the entry go at the end of the
    /// upstream head.
    pub(super) fn add_revalidation_fields(&mut self) {
        let ctx = &mut *self.ctx;
        let Some(c) = &mut ctx.cache else { return };
        let Some(entry) = c.entry.as_ref().filter(|_| c.fill.is_some()) else {
            return;
        };
        if !entry.has_validator() || !self.out.ends_with(b"\r\n\r\n") {
            return;
        }
        let head = &self.inbuf[..ctx.facts.head_len.min(self.inbuf.len())];
        let clients_own = with_request_fields(head, |fields| {
            fields.iter().any(|f| {
                f.name.eq_ignore_ascii_case("if-none-match")
                    || f.name.eq_ignore_ascii_case("if-modified-since")
            })
        });
        if clients_own {
            return;
        }
        super::cache_refresh::add_validators(&mut self.out, entry);
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
        self.generation
            .snapshot
            .cache
            .counters
            .stale
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    let cache = &snapshot.cache;
    let Some(c) = &mut ctx.cache else {
        return false;
    };
    if c.revalidating && resp.status == 304 {
        if let Some(old) = &c.entry {
            let entry = Arc::new(old.refreshed(resp.headers));
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
    if c.fill.is_none() || facts.is_head {
        return false;
    }
    let Some(route) = ctx.route else {
        return false;
    };
    let request_head = &inbuf[..facts.head_len.min(inbuf.len())];
    c.recorder = start_recording(
        snapshot,
        cache,
        route,
        (c.credentials, c.keyed_by_consumer),
        &c.key[..c.primary_len],
        request_head,
        resp,
    );
    if c.recorder.is_none() {
        // Nothing will be stored: those waiting for it go upstream now, not after the body.
        c.fill = None;
    }
    false
}

/// A recorder for `resp` to a request of route `route` (primary key `primary`, head as
/// received `request_head`), when it may be stored.
pub(super) fn start_recording(
    snapshot: &ConfigSnapshot,
    cache: &ResponseCache,
    route: usize,
    (credentials, keyed_by_consumer): (bool, bool),
    primary: &[u8],
    request_head: &[u8],
    resp: &ResponseHead,
) -> Option<Recorder> {
    let route = snapshot.routes.route(route);
    let rules = route.cache.as_ref()?;
    if resp.status == 206 {
        return None;
    }
    let owned = |name: &str| {
        crate::proxy::upstream_head::gateway_owned_field(
            name,
            &snapshot.issuers.claim_header_names,
            &snapshot.identity_headers,
        )
    };
    let plan = match policy::plan(
        resp,
        credentials,
        keyed_by_consumer,
        rules,
        &snapshot.config.cache.tag_header,
        &owned,
    ) {
        Ok(mut plan) => {
            plan.vary = cache.vary_rule(primary, plan.vary);
            // Kept in memory for as long as the route may answer with it on errors.
            plan.stale_if_error = plan.stale_if_error.max(rules.stale_on_error);
            plan
        }
        Err(why) => {
            debug!(route = %route.id, status = resp.status, ?why, "response not stored");
            return None;
        }
    };
    let mut head = Vec::new();
    encode::write_storable_head(&mut head, resp, plan.strip_set_cookie).ok()?;
    let declared = match resp.body {
        BodyFraming::Length(n) => Some(n),
        BodyFraming::None => Some(0),
        _ => None,
    };
    let recorder = Recorder::new(
        primary,
        request_head,
        resp.status,
        head.into(),
        plan,
        cache.max_entry_bytes,
        declared,
    );
    if recorder.is_none() {
        cache
            .counters
            .too_large
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    recorder
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
