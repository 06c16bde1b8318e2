//! The admin API: what each endpoint answers, as JSON (metrics in the Prometheus text format).
//! Every endpoint needs the bearer token when one is configured, `/metrics` included; only the
//! static status page at `/` does not (it carries no data and sends the token with its calls).

use std::{net::IpAddr, sync::Arc, time::Duration};

use serde_json::{json, Value};

use super::token::AdminToken;
use crate::{
    metrics::{exposition, Metrics},
    runtime::{live::Live, shutdown::DrainFlag},
};

/// A request as the server read it.
pub struct AdminRequest {
    pub method: String,
    pub target: String,
    pub authorization: Option<Vec<u8>>,
    pub body: Vec<u8>,
}

pub struct AdminResponse {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl AdminResponse {
    pub fn json(status: u16, value: &Value) -> AdminResponse {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
        body.push(b'\n');
        AdminResponse {
            status,
            content_type: "application/json",
            body,
        }
    }

    /// The body on one line (JSON re-rendered without newlines), for the control socket.
    pub fn compact_body(&self) -> String {
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(v) => v.to_string(),
            Err(_) => String::from_utf8_lossy(&self.body).replace('\n', " "),
        }
    }

    /// `{"error": {"status": .., "message": ..}}`.
    pub fn error(status: u16, message: &str) -> AdminResponse {
        Self::json(
            status,
            &json!({ "error": { "status": status, "message": message } }),
        )
    }
}

/// What the endpoints read.
pub struct AdminState {
    pub token: Option<AdminToken>,
    pub metrics: Arc<Metrics>,
    pub live: Arc<Live>,
    pub drain: DrainFlag,
    pub workers: usize,
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
}

/// Sources listed in the XDP metrics.
const TOP_SOURCES: usize = 10;

pub fn handle(state: &AdminState, req: &AdminRequest) -> AdminResponse {
    let path = req.target.split('?').next().unwrap_or_default();
    if path == "/" || path == "/index.html" {
        return match req.method.as_str() {
            "GET" => AdminResponse {
                status: 200,
                content_type: "text/html; charset=utf-8",
                body: super::page::STATUS_PAGE.as_bytes().to_vec(),
            },
            _ => AdminResponse::error(405, "the status page is read with GET"),
        };
    }
    if let Some(token) = &state.token {
        let presented = req
            .authorization
            .as_deref()
            .and_then(|v| v.strip_prefix(b"Bearer "));
        match presented {
            None => {
                return AdminResponse::error(
                    401,
                    "send the admin token as `Authorization: Bearer TOKEN`",
                )
            }
            Some(t) if !token.matches(t) => return AdminResponse::error(401, "wrong admin token"),
            Some(_) => {}
        }
    }
    let method = req.method.as_str();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if let Some(answer) = super::vault_api::handle(state, method, &segments, &req.body) {
        return answer;
    }
    if segments.first() == Some(&"cache") {
        let snapshot = state.live.snapshot();
        return super::cache_api::dispatch(&snapshot, method, &segments[1..], &req.body);
    }
    match (method, segments.as_slice()) {
        ("GET", ["metrics"]) => metrics(state),
        ("GET", ["healthz"]) => AdminResponse::json(200, &json!({ "status": "alive" })),
        ("GET", ["readyz"]) => {
            if state.drain.is_set() {
                AdminResponse::json(503, &json!({ "status": "draining" }))
            } else {
                AdminResponse::json(200, &json!({ "status": "ready" }))
            }
        }
        ("GET", ["status"]) => status(state),
        ("GET", ["stats"]) => stats(state),
        ("GET", ["routes"]) => routes(state),
        ("GET", ["limits", "top"]) => top_refused(state),
        ("GET", ["config"]) => config(state),
        ("GET", ["upstreams"]) => upstreams(state),
        ("POST", ["reload"]) => match state.live.reload() {
            Ok(summary) => {
                AdminResponse::json(200, &json!({ "reloaded": true, "changes": summary }))
            }
            Err(e) => AdminResponse::json(
                409,
                &json!({ "error": { "status": 409, "message": e.to_string() } }),
            ),
        },
        ("GET", ["xdp", "bans"]) => bans_list(state),
        ("POST", ["xdp", "bans"]) => bans_add(state, &req.body),
        ("DELETE", ["xdp", "bans", addr]) => bans_remove(state, addr),
        (
            _,
            ["metrics" | "healthz" | "readyz" | "status" | "stats" | "routes" | "upstreams"
            | "reload"],
        )
        | (_, ["xdp", "bans", ..])
        | (_, ["limits", "top"]) => AdminResponse::error(405, "method not allowed here"),
        _ => AdminResponse::error(404, "no such admin endpoint"),
    }
}

fn metrics(state: &AdminState) -> AdminResponse {
    let snapshot = state.live.snapshot();
    let mut extra = exposition::Extra::default();
    if let Some(x) = &snapshot.config.xdp {
        if let Ok(stats) = crate::xdp::read_pinned_stats(&x.pin_path) {
            let top = stats
                .sources
                .iter()
                .take(TOP_SOURCES)
                .map(|s| (s.addr.to_string(), s.packets, s.drops))
                .collect();
            extra.xdp = Some(exposition::XdpSample {
                counters: stats.counters,
                top_sources: top,
            });
        }
    }
    if let Some(cluster) = &snapshot.cluster {
        extra.cluster = Some(cluster.sync_state());
    }
    extra.access_log_dropped = state
        .access_log
        .as_ref()
        .map(|l| l.dropped.load(std::sync::atomic::Ordering::Relaxed));
    let mut text = exposition::render(&state.metrics, &extra);
    if let Some(vault) = &snapshot.vault {
        crate::vault::metrics::render(vault, &mut text);
    }
    crate::upstream::metrics::render(
        &snapshot.config.upstreams,
        &snapshot.upstream_parts.balancing,
        &mut text,
    );
    if snapshot.routes.any_caches() {
        crate::cache::metrics::render(&snapshot.cache, &mut text);
    }
    AdminResponse {
        status: 200,
        content_type: "text/plain; version=0.0.4; charset=utf-8",
        body: text.into_bytes(),
    }
}

fn status(state: &AdminState) -> AdminResponse {
    let snapshot = state.live.snapshot();
    let (accepted, refused, last_ms) = state.metrics.reloads();
    AdminResponse::json(
        200,
        &json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": state.metrics.uptime().as_secs(),
            "workers": state.workers,
            "draining": state.drain.is_set(),
            "config_sha256": snapshot.config.source_sha256,
            "reloads": { "accepted": accepted, "refused": refused, "last_unix_ms": last_ms },
            "routes": snapshot.routes.len(),
            "listening": state.live.listeners().bound().iter().map(ToString::to_string).collect::<Vec<_>>(),
        }),
    )
}

/// What the status page shows: per route, totals and the window's percentiles; XDP's top
/// dropped sources.
fn stats(state: &AdminState) -> AdminResponse {
    use crate::metrics::latency::{Part, Subject};
    let totals = crate::metrics::totals::routes(&state.metrics);
    let percentiles = state.metrics.windows.percentiles();
    let quantile = |id: &str, part: Part, q: usize| {
        percentiles
            .iter()
            .find(|(s, p, _, _)| *p == part && matches!(s, Subject::Route(r) if r == id))
            .map(|(_, _, qs, _)| qs[q])
    };
    let routes: Vec<Value> = totals
        .iter()
        .map(|(id, t)| {
            json!({
                "id": id,
                "requests": t.all(),
                "client_errors": t.of_class(4),
                "server_errors": t.of_class(5),
                "refused": policy_refusals(state, id),
                "auth_failures": t.auth_failures.iter().sum::<u64>(),
                "bytes_in": t.bytes_in,
                "bytes_out": t.bytes_out,
                "p50": quantile(id, Part::Gateway, 0),
                "p90": quantile(id, Part::Gateway, 1),
                "p99": quantile(id, Part::Gateway, 2),
                "p999": quantile(id, Part::Gateway, 3),
                "upstream_p50": quantile(id, Part::Upstream, 0),
                "upstream_p99": quantile(id, Part::Upstream, 2),
            })
        })
        .collect();
    let snapshot = state.live.snapshot();
    let xdp = snapshot.config.xdp.as_ref().and_then(|x| {
        let stats = crate::xdp::read_pinned_stats(&x.pin_path).ok()?;
        Some(json!({
            "counters": stats.counters.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "top_sources": stats.sources.iter().filter(|s| s.drops > 0).take(TOP_SOURCES).map(|s| json!({
                "address": s.addr.to_string(), "packets": s.packets, "drops": s.drops,
            })).collect::<Vec<_>>(),
        }))
    });
    AdminResponse::json(
        200,
        &json!({
            "window_seconds": state.metrics.windows.window().as_secs(),
            "routes": routes,
            "xdp": xdp,
        }),
    )
}

/// 429s by the route's limits and quotas, over every worker.
fn policy_refusals(state: &AdminState, route: &str) -> u64 {
    state
        .metrics
        .workers()
        .iter()
        .flat_map(|(_, w)| w.policies())
        .filter(|((r, _, _), _)| r == route)
        .map(|(_, n)| n.get())
        .sum()
}

/// The config in force, defaults filled in, as JSON, with secrets redacted: API-key hashes,
/// and the credentials, query and fragment of every URL.
fn config(state: &AdminState) -> AdminResponse {
    let snapshot = state.live.snapshot();
    let mut value = match serde_json::to_value(&snapshot.config) {
        Ok(v) => v,
        Err(e) => return AdminResponse::error(500, &format!("cannot render the config: {e}")),
    };
    redact(&mut value, None);
    AdminResponse::json(
        200,
        &json!({ "sha256": snapshot.config.source_sha256, "config": value }),
    )
}

/// Keys whose values are never shown.
const SECRET_KEYS: [&str; 1] = ["api_keys"];

fn redact(value: &mut Value, key: Option<&str>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                redact(v, Some(k));
            }
        }
        Value::Array(items) => {
            for v in items {
                redact(v, key);
            }
        }
        Value::String(s) if key.is_some_and(|k| SECRET_KEYS.contains(&k)) => {
            *s = "(redacted)".to_owned();
        }
        Value::String(s) if s.contains("://") => {
            *s = crate::log_throttle::redacted_url(s);
        }
        _ => {}
    }
}

/// Keys listed by `/limits/top`.
const TOP_REFUSED: usize = 20;

/// The keys refused most by rate limits and quotas, over every worker (each worker keeps a
/// Space-Saving summary, published once a second; `max_overcount` bounds how much of a count
/// may belong to keys it displaced).
fn top_refused(state: &AdminState) -> AdminResponse {
    use std::collections::BTreeMap;
    let mut merged: BTreeMap<(String, &'static str, String, String), (u64, u64)> = BTreeMap::new();
    for (_, worker) in state.metrics.workers() {
        let names = worker.policies();
        let published = worker
            .top_refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for entry in published {
            let Some(((route, kind, name), _)) = names
                .iter()
                .find(|(_, counter)| Arc::ptr_eq(counter, &entry.policy))
            else {
                continue;
            };
            let e = merged
                .entry((
                    route.clone(),
                    kind.label(),
                    name.clone(),
                    entry.subject.to_string(),
                ))
                .or_default();
            e.0 += entry.count;
            e.1 += entry.error;
        }
    }
    let mut list: Vec<_> = merged.into_iter().collect();
    list.sort_by_key(|entry| std::cmp::Reverse(entry.1 .0));
    let keys: Vec<Value> = list
        .into_iter()
        .take(TOP_REFUSED)
        .map(|((route, kind, name, key), (count, error))| {
            json!({ "route": route, "kind": kind, "name": name, "key": key, "refused": count, "max_overcount": error })
        })
        .collect();
    AdminResponse::json(200, &json!({ "top": keys }))
}

fn routes(state: &AdminState) -> AdminResponse {
    let snapshot = state.live.snapshot();
    let list: Vec<Value> = snapshot
        .config
        .routes
        .iter()
        .map(|r| {
            json!({
                "id": r.stable_id(),
                "upstream": r.upstream,
                "respond": r.respond.as_ref().map(|x| x.status),
                "auth": r.auth.as_ref().map(|a| a.methods.iter().map(|m| format!("{m:?}").to_lowercase()).collect::<Vec<_>>()),
                "limits": r.limits.iter().map(|l| l.name.clone()).collect::<Vec<_>>(),
                "quotas": r.quotas.iter().map(|q| q.name.clone()).collect::<Vec<_>>(),
                "max_body_bytes": r.max_body_bytes,
            })
        })
        .collect();
    AdminResponse::json(200, &json!({ "routes": list }))
}

fn upstreams(state: &AdminState) -> AdminResponse {
    let snapshot = state.live.snapshot();
    let counts = crate::metrics::totals::servers(&state.metrics);
    let list: Vec<Value> = snapshot
        .config
        .upstreams
        .iter()
        .map(|(name, u)| {
            let loads = snapshot
                .upstream_parts
                .balancing
                .get(name)
                .map(|(l, _)| l.clone());
            let servers: Vec<Value> = u
                .servers
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let (requests, connect_failures, timeouts) = counts
                        .get(&(name.clone(), s.to_string()))
                        .copied()
                        .unwrap_or_default();
                    let resolved: Option<Vec<String>> = snapshot
                        .upstream_parts
                        .names
                        .get(s)
                        .map(|n| n.addresses().iter().map(|a| a.to_string()).collect());
                    json!({
                        "address": s.to_string(),
                        "resolved": resolved,
                        "requests": requests,
                        "connect_failures": connect_failures,
                        "timeouts": timeouts,
                        "weight": u.weight(i),
                        "in_flight": loads.as_ref().map(|l| l.in_flight(i)),
                        "latency_ewma_ms": loads.as_ref().map(|l| l.latency(i).as_secs_f64() * 1e3),
                        "healthy": loads.as_ref().map(|l| l.is_healthy(i)),
                        "ejected_for_ms": loads.as_ref().and_then(|l| l.ejected_for(i)).map(|d| d.as_millis() as u64),
                    })
                })
                .collect();
            json!({
                "name": name,
                "balance": u.balance,
                "requests_in_flight": loads.as_ref().map(|l| l.requests()),
                "connections": loads.as_ref().map(|l| l.connections()),
                "servers": servers,
            })
        })
        .collect();
    AdminResponse::json(200, &json!({ "upstreams": list }))
}

fn ban_table(state: &AdminState) -> Result<(crate::xdp::BanTable, Duration), AdminResponse> {
    let snapshot = state.live.snapshot();
    let Some(x) = &snapshot.config.xdp else {
        return Err(AdminResponse::error(
            404,
            "XDP is not configured: there are no bans",
        ));
    };
    crate::xdp::BanTable::open(&x.pin_path)
        .map(|t| (t, x.ban_duration.get()))
        .map_err(|e| AdminResponse::error(503, &format!("the ban map is not available: {e:#}")))
}

fn bans_list(state: &AdminState) -> AdminResponse {
    let (table, _) = match ban_table(state) {
        Ok(t) => t,
        Err(r) => return r,
    };
    match table.list() {
        Ok(bans) => AdminResponse::json(
            200,
            &json!({ "bans": bans.iter().map(|(a, left)| json!({ "address": a.to_string(), "seconds_left": left.as_secs() })).collect::<Vec<_>>() }),
        ),
        Err(e) => AdminResponse::error(500, &format!("cannot read the bans: {e:#}")),
    }
}

fn bans_add(state: &AdminState, body: &[u8]) -> AdminResponse {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ban {
        address: IpAddr,
        seconds: Option<u64>,
    }
    let ban: Ban = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => {
            return AdminResponse::error(
                400,
                &format!("expected {{\"address\": \"203.0.113.9\", \"seconds\": 600}} (seconds optional): {e}"),
            )
        }
    };
    let (mut table, default) = match ban_table(state) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let duration = ban.seconds.map_or(default, Duration::from_secs);
    if duration.is_zero() {
        return AdminResponse::error(400, "`seconds` must be at least 1");
    }
    match table.add(ban.address, duration) {
        Ok(()) => AdminResponse::json(
            201,
            &json!({ "banned": ban.address.to_string(), "seconds": duration.as_secs() }),
        ),
        Err(e) => AdminResponse::error(500, &format!("cannot add the ban: {e:#}")),
    }
}

fn bans_remove(state: &AdminState, addr: &str) -> AdminResponse {
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return AdminResponse::error(400, "the last path segment must be an IP address");
    };
    let (mut table, _) = match ban_table(state) {
        Ok(t) => t,
        Err(r) => return r,
    };
    match table.remove(addr) {
        Ok(true) => AdminResponse::json(200, &json!({ "unbanned": addr.to_string() })),
        Ok(false) => AdminResponse::error(404, "that address is not banned"),
        Err(e) => AdminResponse::error(500, &format!("cannot remove the ban: {e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_shown_without_its_secrets() {
        let (_, hash) = crate::auth::new_key();
        let src = format!(
            "[cluster]\nredis = \"redis://user:hunter2@127.0.0.1:6379/0\"\n\n[[consumers]]\nid = \"alice\"\napi_keys = [\"{hash}\"]\n\n[[routes]]\nrespond = {{ status = 200 }}\n"
        );
        let config = crate::config::Config::parse(std::path::Path::new("t.toml"), &src).unwrap();
        let mut value = serde_json::to_value(&config).unwrap();
        redact(&mut value, None);
        let text = value.to_string();
        assert!(!text.contains("hunter2") && !text.contains(&hash), "{text}");
        assert_eq!(value["consumers"][0]["api_keys"][0], "(redacted)");
        assert_eq!(value["consumers"][0]["id"], "alice");
        assert!(text.contains("127.0.0.1:6379"), "{text}");
        // Defaults are filled in.
        assert_eq!(value["server"]["keepalive_timeout"], "60s");
    }
}
