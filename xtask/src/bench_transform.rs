//! `cargo xtask bench-transform`: what header rules, a regex rewrite and a JSON body transform
//! cost in throughput. One gateway has four routes to the same backend, measured in one run:
//!
//! - (a) `plain`: a prefix route, `/plain/1k` to the backend's `/1k` (1 KiB);
//! - (b) `rules`: a `path_regex` route, `/users/42/1k` rewritten to the same `/1k`, with four
//!   request header rules (two `set` from path captures and the route, one `add` of the request
//!   id, one `remove`) and one response header rule;
//! - (c) `json-plain`: `/jsonplain/json/4096`, the backend's 4096-byte JSON object, untouched;
//! - (d) `json-enriched`: the same response with two members set and one removed by
//!   `response_json`.
//!
//! (a) and (b) fetch the same resource, as do (c) and (d), so only the gateway's work differs.
//! Every request carries the same extra header (`x-debug`, which (b) removes). Each target
//! gets a warm-up, then `--repeats` rounds of one closed-loop run each, the order rotated every
//! round so that drift on a shared machine hits all alike; the table has the median of the
//! rounds. Before measuring, one request to each route checks that the transforms are applied.
//!
//! Layout as `bench-observability`: on two cores the gateway (one worker) and the backend on
//! the first core, the load generator alone on the other.

use std::{fmt::Write as _, path::Path};

use anyhow::{bail, Context};

use crate::{
    bench::{
        ensure_commands, http_once, layout, load_summary, machine, median, start_backend,
        start_gateway, timestamp, LoadSummary, LoadgenRun, Reply,
    },
    workspace_root,
};

const BACKEND_PORT: u16 = 19601;
const GATEWAY_PORT: u16 = 19680;
const WARMUP_SECS: f64 = 1.0;
/// Sent with every request, to every target alike; the `rules` route removes it.
const EXTRA_HEADER: &str = "x-debug: 1";
/// The backend's 1 KiB body (`benches/src/backend.rs`).
const ONE_K: usize = 1024;
/// The size of the backend's `/json/4096` body.
const JSON_BYTES: usize = 4096;

struct Target {
    key: &'static str,
    name: &'static str,
    path: &'static str,
}

const TARGETS: [Target; 4] = [
    Target {
        key: "a",
        name: "plain route, 1 KiB",
        path: "/plain/1k",
    },
    Target {
        key: "b",
        name: "5 header rules + regex rewrite, 1 KiB",
        path: "/users/42/1k",
    },
    Target {
        key: "c",
        name: "4 KiB JSON, untouched",
        path: "/jsonplain/json/4096",
    },
    Target {
        key: "d",
        name: "4 KiB JSON, enriched (response_json)",
        path: "/jsonrich/json/4096",
    },
];

fn config(dir: &Path) -> String {
    format!(
        r#"[server]
listen = ["127.0.0.1:{GATEWAY_PORT}"]
workers = 1

[quotas]
data_dir = "{data}"

[upstreams.backend]
servers = ["127.0.0.1:{BACKEND_PORT}"]

# (a) plain
[[routes]]
id = "plain"
match = {{ path_prefix = "/plain/" }}
upstream = "backend"
strip_prefix = true

# (b) five header rules and a regex rewrite
[[routes]]
id = "rules"
match = {{ path_regex = "/users/(?<id>[0-9]+)/(?<rest>.*)" }}
upstream = "backend"
rewrite = "/{{path.rest}}"
request_headers = {{ set = {{ "x-user-id" = "{{path.id}}", "x-route" = "{{route}}" }}, add = {{ "x-request-id-copy" = "{{request_id}}" }}, remove = ["x-debug"] }}
response_headers = {{ set = {{ "x-served-by" = "portcullis" }} }}

# (c) 4 KiB JSON untouched
[[routes]]
id = "json-plain"
match = {{ path_prefix = "/jsonplain/" }}
upstream = "backend"
strip_prefix = true

# (d) same response, enriched
[[routes]]
id = "json-enriched"
match = {{ path_prefix = "/jsonrich/" }}
upstream = "backend"
strip_prefix = true
response_json = {{ set = {{ "/meta/route" = "{{route}}", "/meta/request_id" = "{{request_id}}" }}, remove = ["/items/0/name"] }}
"#,
        data = dir.join("data").display(),
    )
}

/// The body length a reply declares (`Content-Length`), or "chunked".
fn body_size(reply: &Reply) -> String {
    match reply.header("content-length") {
        Some(n) => n.to_owned(),
        None => reply
            .header("transfer-encoding")
            .unwrap_or("unframed")
            .to_owned(),
    }
}

/// One request to `target`: checks that its route did what it is configured to do, so the
/// figures are of the work they claim. Returns the response body's size as declared.
fn probe(target: &Target) -> anyhow::Result<String> {
    let reply = http_once(
        GATEWAY_PORT,
        &format!(
            "GET {} HTTP/1.1\r\nHost: bench.local\r\n{EXTRA_HEADER}\r\nConnection: close\r\n\r\n",
            target.path
        ),
    )?;
    let fail = |why: &str| -> anyhow::Result<String> {
        bail!(
            "({}) {}: {why}; got:\n{}\n\n{}",
            target.key,
            target.path,
            reply.head,
            reply.body.chars().take(600).collect::<String>()
        )
    };
    if reply.status != 200 {
        return fail("not 200");
    }
    let json = reply
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/json"));
    match target.key {
        "a" | "b" => {
            if reply.body.len() != ONE_K || reply.body.bytes().any(|b| b != b'a') {
                return fail("not the backend's 1 KiB body");
            }
            if target.key == "b" && reply.header("x-served-by") != Some("portcullis") {
                return fail("no `x-served-by: portcullis` (response_headers not applied)");
            }
        }
        "c" => {
            if !json || reply.body.len() != JSON_BYTES || !reply.body.starts_with("{\"items\":[") {
                return fail("not the backend's 4096-byte application/json body");
            }
        }
        _ => {
            if !json {
                return fail("not application/json");
            }
            if !reply.body.contains("\"meta\"") || !reply.body.contains("json-enriched") {
                return fail("no /meta/route member (response_json set not applied)");
            }
            if reply.body.contains("\"item-0000\"") {
                return fail("/items/0/name is still there (response_json remove not applied)");
            }
        }
    }
    Ok(body_size(&reply))
}

fn measure(
    bin: &Path,
    core: usize,
    target: &Target,
    connections: usize,
    duration: f64,
) -> anyhow::Result<LoadSummary> {
    let run = load_summary(
        LoadgenRun {
            port: GATEWAY_PORT,
            path: target.path,
            connections,
            rate: None,
            duration,
            core,
            extra: &["--header", EXTRA_HEADER],
        }
        .spawn(bin)?,
    )?;
    if run.errors > 0 {
        bail!(
            "({}) {}: {} failed requests at {:.0} req/s (the load generator counts only 2xx \
             responses framed by Content-Length)",
            target.key,
            target.path,
            run.errors,
            run.rps
        );
    }
    Ok(run)
}

pub fn run(duration: f64, repeats: usize, connections: usize) -> anyhow::Result<()> {
    anyhow::ensure!(repeats >= 1, "--repeats must be at least 1");
    anyhow::ensure!(connections >= 1, "--connections must be at least 1");
    ensure_commands(&[("taskset", "util-linux")])?;
    let bin = crate::build_release()?;
    let layout = layout();
    let server = &layout.server_cores[..1];
    let load = *layout.load_cores.first().context("no core for the load")?;
    let dir = workspace_root().join("bench-results").join("transform");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("portcullis.toml");
    std::fs::write(&config_path, config(&dir))?;
    let stamp = timestamp()?;
    eprintln!(
        "bench-transform: gateway (1 worker) and backend on core {server:?}, load generator on core {load}; logs in {}",
        dir.display()
    );

    let _backend = start_backend(&bin, server, BACKEND_PORT, &dir)?;
    let _gateway = start_gateway(&bin, server, &config_path, &dir, GATEWAY_PORT)?;

    let sizes: Vec<String> = TARGETS.iter().map(probe).collect::<anyhow::Result<_>>()?;
    for t in &TARGETS {
        eprintln!("bench-transform: ({}) {}: warm-up", t.key, t.path);
        measure(&bin, load, t, connections, WARMUP_SECS)?;
    }
    // Per target, one summary per round.
    let mut runs: Vec<Vec<LoadSummary>> = TARGETS.iter().map(|_| Vec::new()).collect();
    for round in 0..repeats {
        for i in 0..TARGETS.len() {
            let at = (i + round) % TARGETS.len();
            let t = &TARGETS[at];
            eprintln!(
                "bench-transform: round {}/{repeats}: ({}) {}",
                round + 1,
                t.key,
                t.path
            );
            runs[at].push(measure(&bin, load, t, connections, duration)?);
        }
    }

    let rps: Vec<f64> = runs
        .iter()
        .map(|r| median(r.iter().map(|s| s.rps).collect()))
        .collect();
    let (cpu, kernel) = machine()?;
    let mut md = format!(
        "Measured {stamp} on {} core(s) ({cpu}), Linux {kernel}. Portcullis (1 worker) and the backend pinned to core(s) {server:?}, the load generator alone on core {load}; closed loop over {connections} keep-alive connections, {duration} s per run, {repeats} round(s) after a {WARMUP_SECS} s warm-up of each target, every round all four targets in a rotated order.\n\n",
        layout.server_cores.len() + layout.load_cores.len(),
    );
    let _ = writeln!(
        md,
        "| target | path | response body bytes | req/s (median of {repeats}) | each round | p50 | p99 |\n|---|---|---:|---:|---:|---:|---:|"
    );
    for (i, t) in TARGETS.iter().enumerate() {
        let each = runs[i]
            .iter()
            .map(|s| format!("{:.0}", s.rps))
            .collect::<Vec<_>>()
            .join(" / ");
        let p50 = median(runs[i].iter().map(|s| s.p50_us as f64).collect());
        let p99 = median(runs[i].iter().map(|s| s.p99_us as f64).collect());
        let _ = writeln!(
            md,
            "| ({}) {} | `{}` | {} | {:.0} | {each} | {p50:.0} µs | {p99:.0} µs |",
            t.key, t.name, t.path, sizes[i], rps[i]
        );
    }
    let _ = writeln!(
        md,
        "\n| ratio | req/s |\n|---|---:|\n| (b) / (a): header rules and regex rewrite | {:.3}x |\n| (d) / (c): JSON body transform | {:.3}x |",
        rps[1] / rps[0],
        rps[3] / rps[2]
    );
    let _ = writeln!(
        md,
        "\nMethod: one gateway with four routes to the same upstream (the benchmark backend, `benches/src/backend.rs`). (a) `/plain/1k` is a prefix route stripped to the backend's `/1k`; (b) `/users/42/1k` matches `path_regex = \"/users/(?<id>[0-9]+)/(?<rest>.*)\"`, is rewritten to `/{{path.rest}}` (the same `/1k`), sets `x-user-id` and `x-route`, adds `x-request-id-copy`, removes `x-debug` and sets `x-served-by` on the response; (c) `/jsonplain/json/4096` is the backend's 4096-byte JSON object (`content-type: application/json`) passed untouched; (d) `/jsonrich/json/4096` is the same response with `response_json` setting `/meta/route` and `/meta/request_id` and removing `/items/0/name`. Every request carries `{EXTRA_HEADER}`. Before measuring, one request to each route checked the transforms were applied. Latencies are closed-loop (from each request's send), the median of the rounds' percentiles; the access log is off, metrics are off. Config: `bench-results/transform/portcullis.toml`."
    );
    let out_file = workspace_root().join("benches/results/transform.md");
    std::fs::create_dir_all(out_file.parent().context("path")?)?;
    std::fs::write(&out_file, &md)?;
    std::fs::write(dir.join("results.md"), &md)?;
    println!("{md}");
    println!(
        "bench-transform: table {}, config and logs {}",
        out_file.display(),
        dir.display()
    );
    // The gateway and the backend stop here, as on any error above (Proc's Drop).
    Ok(())
}
