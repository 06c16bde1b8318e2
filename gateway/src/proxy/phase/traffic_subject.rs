//! What the limit and quota phases key their counters by: the client address, the caller, a
//! request header, all read from the head in place.

use std::net::IpAddr;

use crate::{
    http::request::RequestHead,
    limits::{self, LimitSubject},
    proxy::answer::{Answer, TrafficPolicy},
    routing::Route,
};

/// The first value of header `name` (case-insensitive), borrowed from the read buffer.
pub fn find_header<'b>(req: &RequestHead<'b, '_>, name: &str) -> Option<&'b [u8]> {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Runs `f` with the subject of `req` from `client` as the caller `consumer`.
pub fn with_subject<T>(
    req: &RequestHead,
    client: IpAddr,
    consumer: Option<&str>,
    hasher: &crate::state::subject::SubjectHasher,
    f: impl FnOnce(&LimitSubject) -> T,
) -> T {
    let header = |name: &str| find_header(req, name);
    f(&LimitSubject {
        client,
        consumer,
        header: &header,
        hasher,
    })
}

/// The 429 for `refusal` by one of `limits` (the route's pre-auth limits or its limits).
pub fn too_many(
    route: &Route,
    limits: &[limits::Limit],
    refusal: limits::Refusal,
    pre_auth: bool,
    subject: &LimitSubject,
) -> Answer {
    let index = limits
        .iter()
        .position(|l| std::ptr::eq(l, refusal.limit))
        .unwrap_or(0);
    let retry = refusal.retry_after.as_secs() + u64::from(refusal.retry_after.subsec_nanos() > 0);
    Answer::TooMany {
        route: route.index,
        policy: if pre_auth {
            TrafficPolicy::PreAuthLimit(index)
        } else {
            TrafficPolicy::Limit(index)
        },
        retry_after_secs: retry.max(1),
        subject: limits::SubjectLabel::of(&refusal.limit.key, subject),
    }
}
