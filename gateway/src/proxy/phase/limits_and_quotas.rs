//! Limits and quotas phase: the route's rate limits, then its quotas, keyed by the caller the
//! authenticate phase established. Quotas taken go into the context; the log phase gives them
//! back unless the upstream received the request.

use std::net::IpAddr;

use super::traffic_subject::{too_many, with_subject};
use crate::{
    http::request::RequestHead,
    limits,
    log_throttle::Noisy,
    proxy::{
        answer::{Answer, TrafficPolicy},
        context::RequestContext,
        snapshot::ConfigSnapshot,
    },
    quotas::QuotaRefusal,
    routing::Route,
    throttled_warn,
};

pub fn check(
    snapshot: &ConfigSnapshot,
    route: &Route,
    req: &RequestHead,
    peer: IpAddr,
    ctx: &mut RequestContext,
) -> Result<(), Answer> {
    if route.limits.is_empty() && route.quotas.is_empty() {
        return Ok(());
    }
    let consumer = ctx.caller.as_ref().map(|c| c.identity(snapshot).0);
    let cluster = snapshot.cluster.as_deref();
    let store = &snapshot.quota_store;
    with_subject(req, peer, consumer, &store.hasher, |subject| {
        limits::check(&route.limits, subject, cluster)
            .map_err(|refusal| too_many(route, &route.limits, refusal, false, subject))?;
        for (i, quota) in route.quotas.iter().enumerate() {
            match store.take(quota, subject, cluster) {
                Ok(charge) => ctx.charges.push(charge),
                Err(QuotaRefusal::Spent(retry_after_secs)) => {
                    return Err(Answer::TooMany {
                        route: route.index,
                        policy: TrafficPolicy::Quota(i),
                        retry_after_secs,
                        subject: crate::limits::SubjectLabel::of(quota.key(), subject),
                    })
                }
                Err(QuotaRefusal::HandedOver) => {
                    return Err(Answer::error_and_close(
                        503,
                        "the gateway is being upgraded: try again",
                    ))
                }
                Err(QuotaRefusal::Full) => {
                    throttled_warn!(Noisy::StateFull, route = %route.id, quota = %quota.name, "quota store full: a new key was refused");
                    return Err(Answer::error(
                        429,
                        "quota capacity reached: new callers are refused until the period ends",
                    ));
                }
            }
        }
        Ok(())
    })
}
