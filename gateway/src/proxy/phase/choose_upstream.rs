//! Choose-upstream phase: which server of the route's upstream group gets the request, by the
//! group's balancer (see [`crate::upstream::balance`]). The request counts in flight to it once
//! the exchange with it begins ([`crate::proxy::forward`]).

use std::net::IpAddr;

use crate::{
    config::HashKey,
    http::request::RequestHead,
    proxy::{context::RequestContext, snapshot::ConfigSnapshot},
    upstream::UpstreamGroup,
};

/// The value of cookie `name` in the request's Cookie fields (RFC 6265 §5.4: `a=1; b=2`).
fn cookie<'r>(req: &RequestHead<'r, '_>, name: &str) -> Option<&'r [u8]> {
    req.headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
        .flat_map(|h| h.value.split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let (n, v) = pair.split_at(memchr::memchr(b'=', pair)?);
            (n.trim_ascii() == name.as_bytes()).then_some(v[1..].trim_ascii())
        })
}

/// Picks a server of `group` (group number `group_index`), not one of `avoid` (by index,
/// modulo 64) while another is usable, and records it in the context.
#[allow(clippy::too_many_arguments)]
pub fn pick(
    snapshot: &ConfigSnapshot,
    group: &UpstreamGroup,
    group_index: usize,
    req: &RequestHead,
    peer: IpAddr,
    ctx: &mut RequestContext,
    rng: &mut fastrand::Rng,
    avoid: u64,
) -> usize {
    let address = match peer {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    let key: Option<&[u8]> = match &group.config().hash_key {
        None => None,
        Some(HashKey::Client) => Some(&address),
        Some(HashKey::Consumer) => ctx
            .caller
            .as_ref()
            .map(|c| c.identity(snapshot).0.as_bytes()),
        Some(HashKey::Header(name)) => req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value),
        Some(HashKey::Cookie(name)) => cookie(req, name),
    };
    // An empty key is no key: it would send every such request to one server.
    let key = key.filter(|k| !k.is_empty());
    let server = group.pick(rng, key, avoid);
    ctx.upstream = Some((group_index, server));
    server
}
