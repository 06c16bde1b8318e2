//! Log phase, the last for every request however it ended: stamps the end time, settles quota
//! charges the upstream never received, reports the gateway's own error answers to the XDP ban
//! hook, records the request's metrics, writes its access-log line (when the log is on and the
//! request is sampled) and a summary at debug level.

use std::net::SocketAddr;

use tokio::time::Instant;
use tracing::debug;

use crate::{
    access_log::{json_bytes, json_str},
    http::request::RequestHead,
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
    if let (Some(request), Some(vault)) = (ctx.vault.take(), &snapshot.vault) {
        let key = match &ctx.caller {
            Some(crate::proxy::context::Caller::Virtual(v)) => Some(&*v.key),
            _ => None,
        };
        crate::vault::settle(vault, request, key, ctx.status, total(ctx, now));
    }
    if let Outcome::Answered(_) = ctx.outcome {
        worker.answered(peer.ip(), ctx.status);
    }
    if let Some(m) = &generation.metrics {
        record(m, ctx, now);
    }
    if let Some(log) = &worker.access_log {
        if log.sampled() {
            log.append(|out| access_line(out, ctx, generation, peer, now));
        }
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

/// From the upstream connection being ready to its first response byte (or, when none came,
/// to the end: a timed-out upstream's wait is upstream time, not the gateway's).
fn upstream_wait(ctx: &RequestContext) -> Option<std::time::Duration> {
    let t = &ctx.timings;
    let until = t.first_response_byte.or(t.done)?;
    Some(until.duration_since(t.upstream_connected?))
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
    counters.dropped_values.add(ctx.dropped_values);
    if let Some(skip) = ctx.json_skip {
        counters.json_skips[skip.index()].inc();
    }
    match ctx.outcome {
        Outcome::Answered(Answer::Denied(e)) => counters.auth_failures[auth_failure_index(e)].inc(),
        Outcome::Answered(Answer::TooMany {
            policy, subject, ..
        }) => {
            let counter = match policy {
                TrafficPolicy::PreAuthLimit(i) => route.pre_auth_limits.get(i),
                TrafficPolicy::Limit(i) => route.limits.get(i),
                TrafficPolicy::Quota(i) => route.quotas.get(i),
            };
            if let Some(c) = counter {
                c.inc();
                m.top_refused.record(c, subject);
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

/// Keeps what the access log needs of the head, which is gone by the log phase: the method and
/// the normalised path (with the query when asked, its credential parameter dropped). The
/// context's buffers keep their capacity, so this allocates nothing once warm.
pub fn note_request(
    ctx: &mut RequestContext,
    req: &RequestHead,
    include_query: bool,
    credential_param: Option<&str>,
) {
    ctx.log_method.clear();
    ctx.log_method.extend_from_slice(req.method.as_bytes());
    ctx.log_target.clear();
    ctx.log_target.extend_from_slice(req.path);
    if include_query {
        match credential_param {
            Some(name) => crate::proxy::upstream_head::write_query_without(
                &mut ctx.log_target,
                req.query,
                name,
            ),
            None => ctx.log_target.extend_from_slice(req.query),
        }
    }
}

/// One JSON object (no newline): never a credential, a header value or a body.
fn access_line(
    out: &mut Vec<u8>,
    ctx: &RequestContext,
    generation: &Generation,
    peer: SocketAddr,
    now: Instant,
) {
    use std::io::Write;
    let snapshot = &*generation.snapshot;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let _ = write!(
        out,
        "{{\"time\":\"{}\",\"request_id\":",
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
    json_bytes(out, ctx.correlation.request_id());
    out.extend_from_slice(b",\"trace_id\":");
    match &ctx.correlation.trace_id {
        // 32 lowercase hex digits, from the parser or the gateway.
        Some(id) => {
            out.push(b'"');
            out.extend_from_slice(id);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"client\":\"");
    crate::http::encode::write_ip(out, peer.ip());
    out.extend_from_slice(b"\",\"method\":");
    json_bytes(out, &ctx.log_method);
    out.extend_from_slice(b",\"path\":");
    json_bytes(out, &ctx.log_target);
    out.extend_from_slice(b",\"route\":");
    match ctx.route {
        Some(r) => json_str(out, &snapshot.routes.route(r).id),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"consumer\":");
    match &ctx.caller {
        Some(c) => json_str(out, c.identity(snapshot).0),
        None => out.extend_from_slice(b"null"),
    }
    let _ = write!(
        out,
        ",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\"duration_ms\":{:.3}",
        ctx.status,
        ctx.bytes_in,
        ctx.bytes_out,
        ms(total(ctx, now))
    );
    out.extend_from_slice(b",\"upstream\":");
    match ctx.upstream {
        Some((g, s)) => {
            let _ = write!(out, "\"{}\"", generation.upstreams[g].server_label(s));
        }
        None => out.extend_from_slice(b"null"),
    }
    match upstream_wait(ctx) {
        Some(d) => {
            let _ = write!(out, ",\"upstream_ms\":{:.3}", ms(d));
        }
        None => out.extend_from_slice(b",\"upstream_ms\":null"),
    }
    let outcome = match ctx.outcome {
        Outcome::Pending => "pending",
        Outcome::Answered(_) => "answered",
        Outcome::Relayed => "relayed",
        Outcome::Cut(crate::proxy::context::Side::Client) => "client_gone",
        Outcome::Cut(crate::proxy::context::Side::Upstream) => "upstream_cut",
        Outcome::Tunnelled => "tunnelled",
    };
    let _ = write!(out, ",\"outcome\":\"{outcome}\",\"refused_by\":");
    let route = ctx.route.map(|r| snapshot.routes.route(r));
    match (ctx.outcome, route) {
        (Outcome::Answered(Answer::Denied(e)), _) => {
            let _ = write!(
                out,
                "\"auth:{}\"",
                crate::metrics::labels::AUTH_FAILURES[auth_failure_index(e)]
            );
        }
        (Outcome::Answered(Answer::TooMany { policy, .. }), Some(r)) => {
            let (kind, name) = match policy {
                TrafficPolicy::PreAuthLimit(i) => (
                    "pre_auth_limit",
                    r.pre_auth_limits.get(i).map(|l| l.name.as_str()),
                ),
                TrafficPolicy::Limit(i) => ("limit", r.limits.get(i).map(|l| l.name.as_str())),
                TrafficPolicy::Quota(i) => ("quota", r.quotas.get(i).map(|q| q.name.as_str())),
            };
            // Escaped as it is written: no string is built for it.
            let _ = serde::Serializer::collect_str(
                &mut serde_json::Serializer::new(&mut *out),
                &format_args!("{kind}:{}", name.unwrap_or("")),
            );
        }
        _ => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
}
