//! Pre-auth limit phase: the route's limits counted before credentials are looked at, so junk
//! credentials cost an attacker no more than any other request.

use std::net::IpAddr;

use super::traffic_subject::{too_many, with_subject};
use crate::{
    http::request::RequestHead,
    limits,
    proxy::{answer::Answer, snapshot::ConfigSnapshot},
    routing::Route,
};

pub fn check(
    snapshot: &ConfigSnapshot,
    route: &Route,
    req: &RequestHead,
    peer: IpAddr,
) -> Result<(), Answer> {
    if route.pre_auth_limits.is_empty() {
        return Ok(());
    }
    with_subject(req, peer, None, &snapshot.quota_store.hasher, |subject| {
        limits::check(&route.pre_auth_limits, subject, snapshot.cluster.as_deref())
            .map_err(|refusal| too_many(route, &route.pre_auth_limits, refusal, true, subject))
    })
}
