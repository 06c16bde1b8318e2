//! Log phase, the last for every request however it ended: stamps the end time, settles quota
//! charges the upstream never received, reports the gateway's own error answers to the XDP ban
//! hook, records the request's metrics, and writes its summary (at debug level; the access log
//! reads the same context).

use std::net::SocketAddr;

use tokio::time::Instant;
use tracing::debug;

use crate::{
    metrics::labels::{auth_failure_index, status_class_index},
    proxy::{
        answer::{Answer, TrafficPolicy},
        context::{Outcome, RequestContext},
        route_metrics::GenerationMetrics,
        worker::{Generation, Worker},
    },
};

pub fn finish(
    ctx: &mut RequestContext,
    generation: &Generation,
    worker: &Worker,
    peer: SocketAddr,
) {
    let snapshot = &*generation.snapshot;
    let now = Instant::now();
    ctx.timings.done = Some(now);
    if !ctx.charges.is_empty() {
        ctx.charges
            .refund(&snapshot.quota_store, snapshot.cluster.as_deref());
    }
    if let Outcome::Answered(_) = ctx.outcome {
        worker.answered(peer.ip(), ctx.status);
    }
    if let Some(m) = &generation.metrics {
        record(m, ctx, now);
    }
    if tracing::enabled!(tracing::Level::DEBUG) {
        let route = ctx.route.map(|r| snapshot.routes.route(r).id.as_str());
        let upstream = ctx
            .upstream
            .map(|(g, s)| (snapshot.routes.upstream_names()[g].as_str(), s));
        let caller = ctx.caller.as_ref().map(|c| c.identity(snapshot).0);
        debug!(
            request_id = %ctx.id,
            %peer,
            route,
            caller,
            ?upstream,
            status = ctx.status,
            outcome = ?ctx.outcome,
            bytes_in = ctx.bytes_in,
            bytes_out = ctx.bytes_out,
            total_us = total(ctx, now).as_micros() as u64,
            upstream_us = upstream_wait(ctx).map(|d| d.as_micros() as u64),
            "request done"
        );
    }
}

/// From the first byte of the request to `now`.
fn total(ctx: &RequestContext, now: Instant) -> std::time::Duration {
    now.duration_since(ctx.timings.head_started.unwrap_or(ctx.timings.accepted))
}

/// From the upstream connection being ready to its first response byte.
fn upstream_wait(ctx: &RequestContext) -> Option<std::time::Duration> {
    let t = &ctx.timings;
    Some(t.first_response_byte?.duration_since(t.upstream_connected?))
}

fn record(m: &GenerationMetrics, ctx: &RequestContext, now: Instant) {
    let route = ctx.route.map(|r| &m.routes[r]);
    let counters = route.map_or(&m.unrouted, |r| &r.counters);
    counters.requests[ctx.method][status_class_index(ctx.status)].inc();
    counters.bytes_in.add(ctx.bytes_in);
    counters.bytes_out.add(ctx.bytes_out);
    let Some(route) = route else {
        return;
    };
    match ctx.outcome {
        Outcome::Answered(Answer::Denied(e)) => counters.auth_failures[auth_failure_index(e)].inc(),
        Outcome::Answered(Answer::TooMany { policy, .. }) => {
            let counter = match policy {
                TrafficPolicy::PreAuthLimit(i) => route.pre_auth_limits.get(i),
                TrafficPolicy::Limit(i) => route.limits.get(i),
                TrafficPolicy::Quota(i) => route.quotas.get(i),
            };
            if let Some(c) = counter {
                c.inc();
            }
        }
        _ => {}
    }
    let total = total(ctx, now);
    let wait = upstream_wait(ctx);
    route
        .gateway_time
        .record(total.saturating_sub(wait.unwrap_or_default()));
    if let Some(wait) = wait {
        route.upstream_time.record(wait);
        if let Some((group, _)) = ctx.upstream {
            m.upstreams[group].wait.record(wait);
        }
    }
}
