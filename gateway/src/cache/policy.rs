//! Whether a response may be stored by a shared cache (RFC 9111 §3), and what its entry says
//! about freshness, validators and tags. Refused: any method but GET (HEAD answers are never
//! stored; a HEAD is answered from a GET's entry), statuses outside the cacheable ones,
//! `no-store` (response or request), `private`, `Set-Cookie` (unless the route strips it from
//! the stored copy), `Vary: *`, partial content, and answers to requests with credentials
//! unless the response says `public`, `s-maxage` or `must-revalidate`, or the route keys the
//! cache by consumer. A response without freshness information is stored only when the route
//! gives a default (and only for the statuses RFC 9110 §15.1 calls heuristically cacheable).

use std::time::Duration;

use super::{directives::ResponseDirectives, key};
use crate::http::response::ResponseHead;

/// Statuses stored when the response gives its freshness.
const EXPLICITLY_CACHEABLE: [u16; 13] = [
    200, 203, 204, 300, 301, 302, 307, 308, 404, 405, 410, 414, 501,
];
/// Statuses a route's default freshness applies to (RFC 9110 §15.1).
const HEURISTICALLY_CACHEABLE: [u16; 10] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414];

/// A route's caching rules, compiled from its `cache` table.
#[derive(Debug, Clone)]
pub struct RouteCachePolicy {
    pub default_ttl: Option<Duration>,
    pub key_headers: Vec<String>,
    pub key_consumer: bool,
    pub sort_query: bool,
    pub strip_set_cookie: bool,
    pub stale_on_error: Duration,
    pub lock_timeout: Duration,
}

/// Why a response was not stored (counted, and said at debug level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    Status,
    NoStore,
    Private,
    SetCookie,
    Credentials,
    VaryStar,
    /// `Vary` names a field the gateway sets itself (X-Consumer-Id, X-Forwarded-For, ...):
    /// the client's value is not what the upstream saw.
    VaryOnGatewayField,
    NoFreshness,
}

/// What an entry for a storable response will say.
#[derive(Debug)]
pub struct StorePlan {
    pub fresh_for: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub must_revalidate: bool,
    pub initial_age: Duration,
    pub vary: Vec<Box<str>>,
    pub strip_set_cookie: bool,
    pub etag: Option<Box<[u8]>>,
    pub last_modified: Option<Box<[u8]>>,
    pub tags: Box<[Box<str>]>,
}

/// Decides whether `resp` (to a GET) may be stored. `credentials`: the request carried
/// credentials (an Authorization field, or whatever the route authenticated it by);
/// `keyed_by_consumer`: the key holds the authenticated consumer; `tag_field`: the response
/// field whose values tag the entry; `owned`: request fields the gateway sets or replaces
/// itself, which a response may not vary on (the upstream saw other values than the client
/// sent).
pub fn plan(
    resp: &ResponseHead,
    credentials: bool,
    keyed_by_consumer: bool,
    route: &RouteCachePolicy,
    tag_field: &str,
    owned: &dyn Fn(&str) -> bool,
) -> Result<StorePlan, NotStored> {
    let d = ResponseDirectives::of(resp.headers);
    if d.no_store {
        return Err(NotStored::NoStore);
    }
    if d.private {
        return Err(NotStored::Private);
    }
    let has_set_cookie = resp
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("set-cookie"));
    if has_set_cookie && !route.strip_set_cookie {
        return Err(NotStored::SetCookie);
    }
    if credentials && !(d.public || d.s_maxage.is_some() || d.must_revalidate || keyed_by_consumer)
    {
        return Err(NotStored::Credentials);
    }
    let mut fresh_for = match d.freshness() {
        Some(f) if EXPLICITLY_CACHEABLE.contains(&resp.status) => f,
        Some(_) => return Err(NotStored::Status),
        None if HEURISTICALLY_CACHEABLE.contains(&resp.status) => {
            route.default_ttl.ok_or(NotStored::NoFreshness)?
        }
        None => return Err(NotStored::Status),
    };
    if d.no_cache {
        // Revalidated before every use, whatever a route default says (§5.2.2.4).
        fresh_for = Duration::ZERO;
    }
    let etag = super::directives::field(resp.headers, "etag").map(Box::from);
    let last_modified = super::directives::field(resp.headers, "last-modified").map(Box::from);
    if fresh_for.is_zero() && etag.is_none() && last_modified.is_none() {
        // Stale at once and nothing to revalidate it by: of no use.
        return Err(NotStored::NoFreshness);
    }
    let vary = key::vary_names(resp.headers).ok_or(NotStored::VaryStar)?;
    if vary.iter().any(|name| owned(name)) {
        return Err(NotStored::VaryOnGatewayField);
    }
    let initial_age = super::directives::field(resp.headers, "age")
        .and_then(|a| std::str::from_utf8(a).ok()?.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    let tags = resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(tag_field))
        .flat_map(|h| h.value.split(|b| b.is_ascii_whitespace() || *b == b','))
        .filter(|t| !t.is_empty())
        .take(64)
        .map(|t| String::from_utf8_lossy(t).into())
        .collect();
    Ok(StorePlan {
        fresh_for,
        stale_while_revalidate: Duration::from_secs(d.stale_while_revalidate.unwrap_or(0)),
        stale_if_error: Duration::from_secs(d.stale_if_error.unwrap_or(0)),
        must_revalidate: d.must_revalidate || d.proxy_revalidate || d.no_cache,
        initial_age,
        vary,
        strip_set_cookie: has_set_cookie,
        etag,
        last_modified,
        tags,
    })
}
