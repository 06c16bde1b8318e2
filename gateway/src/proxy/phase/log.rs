//! Log phase, the last for every request however it ended: stamps the end time, settles quota
//! charges the upstream never received, reports the gateway's own error answers to the XDP ban
//! hook, and writes the request's summary (at debug level; the access log and metrics read the
//! same context).

use std::net::SocketAddr;

use tokio::time::Instant;
use tracing::debug;

use crate::proxy::{
    context::{Outcome, RequestContext},
    snapshot::ConfigSnapshot,
    worker::Worker,
};

pub fn finish(
    ctx: &mut RequestContext,
    snapshot: &ConfigSnapshot,
    worker: &Worker,
    peer: SocketAddr,
) {
    let now = Instant::now();
    ctx.timings.done = Some(now);
    if !ctx.charges.is_empty() {
        ctx.charges
            .refund(&snapshot.quota_store, snapshot.cluster.as_deref());
    }
    if let Outcome::Answered(_) = ctx.outcome {
        worker.answered(peer.ip(), ctx.status);
    }
    if tracing::enabled!(tracing::Level::DEBUG) {
        let route = ctx.route.map(|r| snapshot.routes.route(r).id.as_str());
        let upstream = ctx
            .upstream
            .map(|(g, s)| (snapshot.routes.upstream_names()[g].as_str(), s));
        let caller = ctx.caller.as_ref().map(|c| c.identity(snapshot).0);
        let started = ctx.timings.head_started.unwrap_or(ctx.timings.accepted);
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
            total_us = now.duration_since(started).as_micros() as u64,
            upstream_us = ctx
                .timings
                .upstream_connected
                .map(|t| now.duration_since(t).as_micros() as u64),
            "request done"
        );
    }
}
