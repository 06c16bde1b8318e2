//! The balancers' lines of `/metrics`: per server, whether it is healthy, ejected, how many
//! requests it has in flight, its latency average and its ejections; per upstream, requests in
//! flight, open connections, retries made and circuit breaker refusals.

use std::{collections::BTreeMap, fmt::Write, sync::Arc};

use super::balance::{Maglev, ServerLoads};
use crate::config::UpstreamConfig;

/// A label value, escaped as the exposition format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(
    upstreams: &BTreeMap<String, UpstreamConfig>,
    balancing: &BTreeMap<String, (Arc<ServerLoads>, Option<Arc<Maglev>>)>,
    out: &mut String,
) {
    let servers = |f: &dyn Fn(&ServerLoads, usize) -> f64, out: &mut String, name: &str| {
        for (upstream, config) in upstreams {
            let Some((loads, _)) = balancing.get(upstream) else {
                continue;
            };
            for (i, s) in config.servers.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{name}{{upstream=\"{}\",server=\"{}\"}} {}",
                    label(upstream),
                    label(&s.to_string()),
                    f(loads, i)
                );
            }
        }
    };
    for (name, kind, help, f) in [
        (
            "portcullis_upstream_server_healthy",
            "gauge",
            "1 while the server passes its active health checks (or has none), else 0.",
            &(|l: &ServerLoads, i: usize| f64::from(u8::from(l.is_healthy(i))))
                as &dyn Fn(&ServerLoads, usize) -> f64,
        ),
        (
            "portcullis_upstream_server_ejected",
            "gauge",
            "1 while outlier detection keeps the server out, else 0.",
            &|l: &ServerLoads, i: usize| f64::from(u8::from(l.ejected_for(i).is_some())),
        ),
        (
            "portcullis_upstream_server_in_flight",
            "gauge",
            "Requests in flight to the server, from every worker.",
            &|l: &ServerLoads, i: usize| l.in_flight(i) as f64,
        ),
        (
            "portcullis_upstream_server_latency_ewma_seconds",
            "gauge",
            "Peak-EWMA of the server's time to the response head.",
            &|l: &ServerLoads, i: usize| l.latency(i).as_secs_f64(),
        ),
        (
            "portcullis_upstream_server_ejections_total",
            "counter",
            "Times outlier detection ejected the server.",
            &|l: &ServerLoads, i: usize| l.ejections_total(i) as f64,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        servers(f, out, name);
    }
    for (name, kind, help, f) in [
        (
            "portcullis_upstream_in_flight",
            "gauge",
            "Requests in flight to the upstream, from every worker.",
            &(|l: &ServerLoads| l.requests() as f64) as &dyn Fn(&ServerLoads) -> f64,
        ),
        (
            "portcullis_upstream_connections",
            "gauge",
            "Connections open to the upstream's servers, pooled ones included.",
            &|l: &ServerLoads| l.connections() as f64,
        ),
        (
            "portcullis_upstream_retries_total",
            "counter",
            "Requests sent again to another server.",
            &|l: &ServerLoads| l.retries_total() as f64,
        ),
        (
            "portcullis_upstream_circuit_open_total",
            "counter",
            "Requests answered 503 at once by the upstream's circuit breaker.",
            &|l: &ServerLoads| l.circuit_refusals() as f64,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (upstream, (loads, _)) in balancing {
            let _ = writeln!(
                out,
                "{name}{{upstream=\"{}\"}} {}",
                label(upstream),
                f(loads)
            );
        }
    }
}
