//! The Prometheus text format (version 0.0.4) of everything [`super::Metrics`] holds, plus
//! what the caller reads elsewhere (XDP maps, the cluster link). Series are summed over
//! workers; every metric has HELP and TYPE, and label values are escaped.

use std::{collections::BTreeMap, fmt::Write};

use super::{
    labels::{AUTH_FAILURES, METHODS, STATUS_CLASSES},
    latency::{Part, Subject, BUCKET_BOUNDS_US, QUANTILES},
    worker::PolicyKind,
    Metrics,
};

/// What the XDP maps said at the scrape.
pub struct XdpSample {
    /// Counters by name, summed over CPUs.
    pub counters: Vec<(&'static str, u64)>,
    /// The sources with the most drops: (address, packets, drops).
    pub top_sources: Vec<(String, u64, u64)>,
}

/// What the scrape adds from outside the workers.
#[derive(Default)]
pub struct Extra {
    pub xdp: Option<XdpSample>,
    /// Whether the Redis link is up and how long ago it last synchronised, when clustered.
    pub cluster: Option<(bool, Option<f64>)>,
    /// Access-log buffers dropped because the writer fell behind, when the log is on.
    pub access_log_dropped: Option<u64>,
}

/// Appends `value` escaped as a label value (backslash, double quote, newline).
fn escape(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

struct Writer {
    out: String,
}

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn seconds(us: u64) -> String {
    format!("{}", us as f64 / 1e6)
}

/// Renders every metric.
pub fn render(metrics: &Metrics, extra: &Extra) -> String {
    let mut w = Writer {
        out: String::with_capacity(16 * 1024),
    };
    let workers = metrics.workers();

    w.family(
        "portcullis_build_info",
        "gauge",
        "The running build: always 1, with the version as a label.",
    );
    w.sample(
        "portcullis_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    w.family(
        "portcullis_uptime_seconds",
        "gauge",
        "Seconds since the process started.",
    );
    w.sample(
        "portcullis_uptime_seconds",
        &[],
        metrics.uptime().as_secs_f64(),
    );
    let (ok, refused, last_ms) = metrics.reloads();
    w.family(
        "portcullis_config_reloads_total",
        "counter",
        "Config reloads, by result.",
    );
    w.sample(
        "portcullis_config_reloads_total",
        &[("result", "accepted")],
        ok,
    );
    w.sample(
        "portcullis_config_reloads_total",
        &[("result", "refused")],
        refused,
    );
    w.family(
        "portcullis_config_last_reload_timestamp_seconds",
        "gauge",
        "Unix time of the last accepted reload (0 before the first).",
    );
    w.sample(
        "portcullis_config_last_reload_timestamp_seconds",
        &[],
        last_ms as f64 / 1e3,
    );

    // Connections, per worker.
    w.family(
        "portcullis_connections",
        "gauge",
        "Client connections a worker holds, by state (open counts idle ones too; idle counts \
         parked ones, quiet long enough to wait outside a task).",
    );
    for (id, c) in &workers {
        let id = id.to_string();
        w.sample(
            "portcullis_connections",
            &[("worker", &id), ("state", "open")],
            c.connections_open.get(),
        );
        w.sample(
            "portcullis_connections",
            &[("worker", &id), ("state", "idle")],
            c.connections_idle.get(),
        );
        w.sample(
            "portcullis_connections",
            &[("worker", &id), ("state", "parked")],
            c.connections_parked.get(),
        );
    }

    w.family(
        "portcullis_connections_refused_total",
        "counter",
        "Connections refused (503, then closed) at max_connections_per_worker, per worker.",
    );
    for (id, c) in &workers {
        w.sample(
            "portcullis_connections_refused_total",
            &[("worker", &id.to_string())],
            c.connections_refused.get(),
        );
    }
    w.family(
        "portcullis_tls_handshake_failures_total",
        "counter",
        "TLS handshakes that failed, per worker and reason.",
    );
    for (id, c) in &workers {
        let id = id.to_string();
        for (i, n) in c.tls_handshake_failures.iter().enumerate() {
            w.sample(
                "portcullis_tls_handshake_failures_total",
                &[
                    ("worker", &id),
                    ("reason", super::worker::TLS_FAILURE_REASONS[i]),
                ],
                n.get(),
            );
        }
    }
    if let Some(dropped) = extra.access_log_dropped {
        w.family(
            "portcullis_access_log_dropped_buffers_total",
            "counter",
            "Access-log buffers (up to 64 KiB of lines each) dropped because the writer fell behind.",
        );
        w.sample("portcullis_access_log_dropped_buffers_total", &[], dropped);
    }

    let routes = super::totals::routes(metrics);
    w.family(
        "portcullis_requests_total",
        "counter",
        "Requests by route id, method (unknown methods are OTHER) and status class (none: no response was sent).",
    );
    for (route, t) in &routes {
        for (m, row) in t.requests.iter().enumerate() {
            for (s, n) in row.iter().enumerate() {
                if *n > 0 {
                    w.sample(
                        "portcullis_requests_total",
                        &[
                            ("route", route),
                            ("method", METHODS[m]),
                            ("class", STATUS_CLASSES[s]),
                        ],
                        n,
                    );
                }
            }
        }
    }
    w.family(
        "portcullis_received_bytes_total",
        "counter",
        "Request bytes read from clients (heads and bodies), by route id.",
    );
    for (route, t) in &routes {
        w.sample(
            "portcullis_received_bytes_total",
            &[("route", route)],
            t.bytes_in,
        );
    }
    w.family(
        "portcullis_sent_bytes_total",
        "counter",
        "Response bytes written to clients (heads and bodies), by route id.",
    );
    for (route, t) in &routes {
        w.sample(
            "portcullis_sent_bytes_total",
            &[("route", route)],
            t.bytes_out,
        );
    }
    w.family(
        "portcullis_auth_failures_total",
        "counter",
        "Requests refused by a route's access policy, by reason.",
    );
    for (route, t) in &routes {
        for (i, n) in t.auth_failures.iter().enumerate() {
            w.sample(
                "portcullis_auth_failures_total",
                &[("route", route), ("reason", AUTH_FAILURES[i])],
                n,
            );
        }
    }
    w.family(
        "portcullis_concurrency_waits_total",
        "counter",
        "Requests that queued for a concurrency slot, by route id.",
    );
    for (route, t) in &routes {
        w.sample(
            "portcullis_concurrency_waits_total",
            &[("route", route)],
            t.concurrency_waits,
        );
    }
    w.family(
        "portcullis_concurrency_refusals_total",
        "counter",
        "Requests refused (503) after waiting for a concurrency slot, by route id.",
    );
    for (route, t) in &routes {
        w.sample(
            "portcullis_concurrency_refusals_total",
            &[("route", route)],
            t.concurrency_refusals,
        );
    }
    w.family(
        "portcullis_transform_dropped_values_total",
        "counter",
        "Header, query or rewrite values rendered from templates and dropped because they held CR, LF or NUL, by route id.",
    );
    for (route, t) in &routes {
        w.sample(
            "portcullis_transform_dropped_values_total",
            &[("route", route)],
            t.dropped_values,
        );
    }
    w.family(
        "portcullis_json_transform_skipped_total",
        "counter",
        "Responses a route's JSON rules passed untouched, by route id and reason (too_large, not_json, encoded).",
    );
    for (route, t) in &routes {
        for (i, n) in t.json_skips.iter().enumerate() {
            w.sample(
                "portcullis_json_transform_skipped_total",
                &[
                    ("route", route),
                    ("reason", crate::transform::json_body::JsonSkip::LABELS[i]),
                ],
                *n,
            );
        }
    }

    let mut policies: BTreeMap<(String, PolicyKind, String), u64> = BTreeMap::new();
    for (_, c) in &workers {
        for (key, n) in c.policies() {
            *policies.entry(key).or_default() += n.get();
        }
    }
    w.family(
        "portcullis_refusals_total",
        "counter",
        "Requests refused (429) by a rate limit or quota, by route id, kind and name.",
    );
    for ((route, kind, name), n) in &policies {
        w.sample(
            "portcullis_refusals_total",
            &[("route", route), ("kind", kind.label()), ("name", name)],
            n,
        );
    }

    let servers = super::totals::servers(metrics);
    for (name, help, pick) in [
        (
            "portcullis_upstream_requests_total",
            "Requests sent to an upstream server (each attempt).",
            0,
        ),
        (
            "portcullis_upstream_connect_failures_total",
            "Connections to an upstream server that failed or timed out.",
            1,
        ),
        (
            "portcullis_upstream_timeouts_total",
            "Upstream connects and responses that timed out.",
            2,
        ),
    ] {
        w.family(name, "counter", help);
        for ((upstream, server), n) in &servers {
            let v = [n.0, n.1, n.2][pick];
            w.sample(name, &[("upstream", upstream), ("server", server)], v);
        }
    }

    // Latency histograms, summed over workers.
    let mut histograms: BTreeMap<(Subject, Part), ([u64; BUCKET_BOUNDS_US.len() + 1], u64)> =
        BTreeMap::new();
    for (_, c) in &workers {
        for (key, b) in c.buckets() {
            let e = histograms
                .entry(key)
                .or_insert(([0; BUCKET_BOUNDS_US.len() + 1], 0));
            for (i, n) in b.counts.iter().enumerate() {
                e.0[i] += n.get();
            }
            e.1 += b.sum_us.get();
        }
    }
    let bounds: Vec<String> = BUCKET_BOUNDS_US.iter().map(|b| seconds(*b)).collect();
    for (name, help, want_route) in [
        (
            "portcullis_request_duration_seconds",
            "Request latency by route id, split into time in the gateway (part=gateway: the whole request less the upstream wait) and time waiting on the upstream (part=upstream: from the upstream connection being ready to its first response byte).",
            true,
        ),
        (
            "portcullis_upstream_duration_seconds",
            "Time waiting on the upstream, from the connection being ready to the first response byte, by upstream.",
            false,
        ),
    ] {
        w.family(name, "histogram", help);
        for ((subject, part), (counts, sum_us)) in &histograms {
            let (label, value) = match subject {
                Subject::Route(r) if want_route => ("route", r),
                Subject::Upstream(u) if !want_route => ("upstream", u),
                _ => continue,
            };
            let mut cumulative = 0;
            let bucket = format!("{name}_bucket");
            for (i, n) in counts.iter().enumerate() {
                cumulative += n;
                let le = bounds.get(i).map_or("+Inf", String::as_str);
                let mut labels = vec![(label, value.as_str())];
                if want_route {
                    labels.push(("part", part.label()));
                }
                labels.push(("le", le));
                w.sample(&bucket, &labels, cumulative);
            }
            let mut labels = vec![(label, value.as_str())];
            if want_route {
                labels.push(("part", part.label()));
            }
            w.sample(&format!("{name}_sum"), &labels, seconds(*sum_us));
            w.sample(&format!("{name}_count"), &labels, cumulative);
        }
    }
    let window = metrics.windows.window().as_secs();
    w.family(
        "portcullis_latency_quantile_seconds",
        "gauge",
        &format!("Latency percentiles over the last {window} s, from the HDR histograms of every worker merged (2 significant digits), by route id or upstream, part and quantile."),
    );
    for (subject, part, quantiles, _) in metrics.windows.percentiles() {
        let (label, value) = match &subject {
            Subject::Route(r) => ("route", r),
            Subject::Upstream(u) => ("upstream", u),
        };
        for (q, v) in QUANTILES.iter().zip(quantiles) {
            let q = q.to_string();
            w.sample(
                "portcullis_latency_quantile_seconds",
                &[(label, value), ("part", part.label()), ("quantile", &q)],
                v,
            );
        }
    }

    if let Some(XdpSample {
        counters,
        top_sources: sources,
    }) = &extra.xdp
    {
        w.family(
            "portcullis_xdp_packets_total",
            "counter",
            "Packets the XDP program saw, by verdict or reason (summed over CPUs).",
        );
        for (name, n) in counters {
            w.sample("portcullis_xdp_packets_total", &[("counter", name)], n);
        }
        w.family(
            "portcullis_xdp_top_source_drops",
            "gauge",
            "Packets dropped per source for the sources with the most drops (at most 10).",
        );
        for (addr, _, drops) in sources {
            w.sample(
                "portcullis_xdp_top_source_drops",
                &[("source", addr)],
                drops,
            );
        }
        w.family(
            "portcullis_xdp_top_source_packets",
            "gauge",
            "Packets seen per source, for the same sources.",
        );
        for (addr, packets, _) in sources {
            w.sample(
                "portcullis_xdp_top_source_packets",
                &[("source", addr)],
                packets,
            );
        }
    }
    if let Some((up, since)) = extra.cluster {
        w.family(
            "portcullis_cluster_up",
            "gauge",
            "1 while the Redis link that shares limits and quotas works.",
        );
        w.sample("portcullis_cluster_up", &[], u8::from(up));
        if let Some(since) = since {
            w.family(
                "portcullis_cluster_last_sync_age_seconds",
                "gauge",
                "Seconds since the last successful synchronisation with Redis.",
            );
            w.sample("portcullis_cluster_last_sync_age_seconds", &[], since);
        }
    }
    w.out
}
