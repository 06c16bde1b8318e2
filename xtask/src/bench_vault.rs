//! `cargo xtask bench-vault`: what the LLM key vault adds to the time to first byte of a
//! streamed (server-sent events) chat completion. One gateway has two routes to the same
//! upstream, one with `vault = "openai"` and one without; the same request goes to both, and to
//! the backend directly, in the same run, interleaved request by request.
//!
//! The upstream is the benchmark backend's `/sse` stream (`benches/src/backend.rs`): the head
//! and the first event at once, three more events at least 1 ms later, then (as long again) the
//! final usage event and `[DONE]`. The client is `sse_ttfb` (`benches/src/bin/sse_ttfb.rs`):
//! one keep-alive connection per target, one request at a time, each round in a shuffled order.
//!
//! On the vault route the request carries a virtual key, is admitted against a budget (its
//! estimate reserved), has the key swapped for the provider key, and its stream is metered for
//! the usage; afterwards the key's settled spend is checked against the requests sent.
//!
//! Layout as `bench-observability`: on two cores the gateway (one worker) and the backend on
//! the first core, the client alone on the other.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{
    bench::{
        ensure_commands, http_once, layout, machine, start_backend, start_gateway, timestamp,
        wait_for_port,
    },
    workspace_root,
};

const BACKEND_PORT: u16 = 19501;
const GATEWAY_PORT: u16 = 19580;
const ADMIN_PORT: u16 = 19590;
const TOKEN_ENV: &str = "PORTCULLIS_BENCH_ADMIN_TOKEN";
const ADMIN_TOKEN: &str = "portcullis-bench-vault-admin-token-0123456789";
const PROVIDER_KEY: &str = "sk-bench-openai-0123456789abcdef";
const WARMUP_ROUNDS: u64 = 300;
/// Idle time between one response's end and the next request, so that work a gateway does
/// after a response (settling it) does not fall into the next one's time.
const GAP_US: u64 = 500;
/// The backend's usage event: 10 prompt and 20 completion tokens; at the configured prices
/// (1 and 2 micro-units a token) each vault request settles at this.
const COST_PER_REQUEST: u64 = 10 + 20 * 2;

/// The targets in the order the client gets them: (name in the table, `NAME=ADDR/PATH`).
const TARGETS: [(&str, &str); 3] = [
    (
        "direct backend",
        "direct=127.0.0.1:19501/plain/v1/sse/chat/completions",
    ),
    (
        "portcullis plain route",
        "plain=127.0.0.1:19580/plain/v1/sse/chat/completions",
    ),
    (
        "portcullis vault route",
        "vault=127.0.0.1:19580/vault/v1/sse/chat/completions",
    ),
];
const PERCENTILES: [&str; 4] = ["p50", "p90", "p99", "p99.9"];

fn config(dir: &Path) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:{GATEWAY_PORT}\"]\nworkers = 1\n\n\
         [quotas]\ndata_dir = \"{data}\"\n\n\
         [admin]\nlisten = \"127.0.0.1:{ADMIN_PORT}\"\ntoken_env = \"{TOKEN_ENV}\"\n\n\
         [vault]\nmaster_key_file = \"{key}\"\n\n\
         [vault.providers.openai]\nkind = \"openai\"\n\n\
         [vault.prices.gpt-bench]\ninput = 1000000\noutput = 2000000\n\n\
         [upstreams.mock]\nservers = [\"127.0.0.1:{BACKEND_PORT}\"]\nmax_idle_per_server = 256\n\n\
         [[routes]]\nid = \"vault\"\nmatch = {{ path_prefix = \"/vault/\" }}\nupstream = \"mock\"\nvault = \"openai\"\n\n\
         [[routes]]\nid = \"plain\"\nmatch = {{ path_prefix = \"/plain/\" }}\nupstream = \"mock\"\n",
        data = dir.join("data").display(),
        key = dir.join("master.key").display(),
    )
}

/// A fresh master key (64 hex digits from the kernel's random source), mode 0600 from the start.
fn write_master_key(path: &Path) -> anyhow::Result<()> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(format!("{hex}\n").as_bytes())?;
    Ok(())
}

/// One admin API call: its status and body.
fn admin(method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let reply = http_once(
        ADMIN_PORT,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .context("admin listener")?;
    Ok((reply.status, reply.body))
}

fn admin_expect(method: &str, path: &str, body: &str, want: u16) -> anyhow::Result<String> {
    let (status, answer) = admin(method, path, body)?;
    if status != want {
        bail!("admin {method} {path}: {status} (wanted {want}): {answer}");
    }
    Ok(answer)
}

/// The position just after `"field"` and its colon in flat JSON.
fn after_field(json: &str, field: &str) -> Option<usize> {
    let quoted = format!("\"{field}\"");
    let at = json.find(&quoted)? + quoted.len();
    let rest = &json[at..];
    let colon = rest.find(':')?;
    rest[..colon].trim().is_empty().then_some(at + colon + 1)
}

/// A string field's value (no escapes: ids and keys).
fn json_str(json: &str, field: &str) -> Option<String> {
    let rest = json[after_field(json, field)?..].trim_start();
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned())
}

fn json_u64(json: &str, field: &str) -> Option<u64> {
    let rest = json[after_field(json, field)?..].trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The provider key, a virtual key with a budget far above the run's spend: (id, secret).
fn provision() -> anyhow::Result<(String, String)> {
    admin_expect(
        "POST",
        "/vault/providers/openai/keys",
        &format!("{{\"key\": \"{PROVIDER_KEY}\"}}"),
        201,
    )?;
    let created = admin_expect(
        "POST",
        "/vault/keys",
        r#"{"owner": {"consumer": "bench"}, "providers": ["openai"]}"#,
        201,
    )?;
    let id = json_str(&created, "id").with_context(|| format!("no key id in {created}"))?;
    let key = json_str(&created, "key").with_context(|| format!("no key in {created}"))?;
    if !key.starts_with("pcvk_") {
        bail!("not a virtual key: {created}");
    }
    admin_expect(
        "POST",
        &format!("/vault/keys/{id}/budget"),
        r#"{"period": "total", "limit_micros": 1000000000000}"#,
        200,
    )?;
    Ok((id, key))
}

/// The settled all-time spend of key `id` once nothing is reserved (waits up to 5 s).
fn settled_spend(id: &str) -> anyhow::Result<u64> {
    let scope = format!("\"key:{id}\"");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let body = admin_expect("GET", "/vault/spend", "", 200)?;
        // The counters are flat objects: find the key's all-time one.
        let counter = body
            .split('{')
            .map(|part| part.split('}').next().unwrap_or(""))
            .find(|c| c.contains(&scope) && json_str(c, "period").as_deref() == Some("total"));
        if let Some(c) = counter {
            let spent = json_u64(c, "spent_micros").context("spent_micros")?;
            if json_u64(c, "reserved_micros") == Some(0) {
                return Ok(spent);
            }
        }
        if Instant::now() > deadline {
            bail!("key {id}: no settled all-time spend: {body}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `key=value` fields of the client's line `<kind> index=<i> ...`, by index.
fn client_lines(text: &str, kind: &str) -> BTreeMap<usize, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some(kind) {
            continue;
        }
        let fields: BTreeMap<String, String> = words
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        if let Some(i) = fields.get("index").and_then(|i| i.parse().ok()) {
            out.insert(i, fields);
        }
    }
    out
}

/// One target's figures, in µs.
struct Figures {
    requests: u64,
    all_requests: u64,
    connections: u64,
    /// Responses whose first event came with their end (not streamed).
    held_back: u64,
    ttfb: BTreeMap<&'static str, f64>,
    ttfb_mean: f64,
    head_p50: f64,
    total_p50: f64,
    total_p99: f64,
    blocks: Vec<f64>,
}

fn figures(
    target: &BTreeMap<String, String>,
    blocks: Option<&BTreeMap<String, String>>,
) -> anyhow::Result<Figures> {
    let us = |k: &str| -> anyhow::Result<f64> {
        let v: f64 = target
            .get(k)
            .with_context(|| format!("the client printed no {k}"))?
            .parse()
            .with_context(|| format!("bad {k}"))?;
        Ok(v / 1000.0)
    };
    let count = |k: &str| -> anyhow::Result<u64> {
        target
            .get(k)
            .with_context(|| format!("the client printed no {k}"))?
            .parse()
            .with_context(|| format!("bad {k}"))
    };
    let mut ttfb = BTreeMap::new();
    for p in PERCENTILES {
        ttfb.insert(p, us(&format!("ttfb_{p}_ns"))?);
    }
    Ok(Figures {
        requests: count("requests")?,
        all_requests: count("all_requests")?,
        connections: count("connections")?,
        held_back: count("held_back")?,
        ttfb,
        ttfb_mean: us("ttfb_mean_ns")?,
        head_p50: us("head_p50_ns")?,
        total_p50: us("total_p50_ns")?,
        total_p99: us("total_p99_ns")?,
        blocks: blocks
            .and_then(|b| b.get("ttfb_p50_ns"))
            .map(|v| {
                v.split(',')
                    .filter_map(|n| n.parse::<f64>().ok())
                    .map(|n| n / 1000.0)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

pub fn run(duration: f64) -> anyhow::Result<()> {
    ensure_commands(&[("taskset", "util-linux")])?;
    let bin = crate::build_release()?;
    let layout = layout();
    let server = &layout.server_cores[..1];
    let client_core = *layout
        .load_cores
        .first()
        .context("no core for the client")?;
    let dir = workspace_root().join("bench-results").join("vault");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data"))?;
    write_master_key(&dir.join("master.key"))?;
    let config_path = dir.join("portcullis.toml");
    std::fs::write(&config_path, config(&dir))?;
    // The gateway reads its admin token from the environment it inherits. Set before any
    // thread or child exists.
    std::env::set_var(TOKEN_ENV, ADMIN_TOKEN);
    let stamp = timestamp()?;
    eprintln!(
        "bench-vault: gateway (1 worker) and backend on core {server:?}, client on core {client_core}; logs in {}",
        dir.display()
    );

    let _backend = start_backend(&bin, server, BACKEND_PORT, &dir)?;
    let _gateway = start_gateway(&bin, server, &config_path, &dir, GATEWAY_PORT)?;
    wait_for_port(ADMIN_PORT, "the admin listener")?;
    let (key_id, key) = provision()?;

    eprintln!(
        "bench-vault: {WARMUP_ROUNDS} warm-up rounds, then {duration} s of rounds over {}",
        TARGETS.map(|t| t.0).join(", ")
    );
    let mut client = Command::new(bin.join("sse_ttfb"));
    for (_, spec) in TARGETS {
        client.args(["--target", spec]);
    }
    let out = client
        .args(["--bearer", &key])
        .args(["--duration", &duration.to_string()])
        .args(["--warmup-rounds", &WARMUP_ROUNDS.to_string()])
        .args(["--gap-us", &GAP_US.to_string()])
        .args(["--pin-core", &client_core.to_string()])
        .arg("--hgrm-dir")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run sse_ttfb")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    std::fs::write(dir.join("client.txt"), &text)?;
    if !out.status.success() {
        bail!("sse_ttfb failed ({}): {text}", out.status);
    }
    let targets = client_lines(&text, "target");
    let blocks = client_lines(&text, "blocks");
    let summary: BTreeMap<String, String> = text
        .lines()
        .find_map(|l| l.strip_prefix("summary "))
        .context("the client printed no summary")?
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let rounds = summary.get("rounds").cloned().unwrap_or_default();
    let elapsed: f64 = summary
        .get("elapsed_s")
        .and_then(|v| v.parse().ok())
        .unwrap_or(duration);
    let results: Vec<Figures> = (0..TARGETS.len())
        .map(|i| {
            figures(
                targets
                    .get(&i)
                    .with_context(|| format!("no results for {}", TARGETS[i].0))?,
                blocks.get(&i),
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let (direct, plain, vault) = (&results[0], &results[1], &results[2]);

    // Every vault request (warm-up included) settled at its streamed usage.
    // The key is new: everything it spent, it spent in this run.
    let spent = settled_spend(&key_id)?;
    let expected = vault.all_requests * COST_PER_REQUEST;

    let (cpu, kernel) = machine()?;
    let mut md = format!(
        "Measured {stamp} on {} core(s) ({cpu}), Linux {kernel}. Portcullis (1 worker) and the backend pinned to core(s) {server:?}, the client alone on core {client_core}; {rounds} rounds in {elapsed:.1} s after {WARMUP_ROUNDS} warm-up rounds, each round one request to each target.\n\n",
        layout.server_cores.len() + layout.load_cores.len(),
    );
    md.push_str("Time to first byte of the first event of a streamed chat completion (µs):\n\n| target | p50 | p90 | p99 | p99.9 | mean | requests |\n|---|---:|---:|---:|---:|---:|---:|\n");
    for ((name, _), f) in TARGETS.iter().zip(&results) {
        let _ = write!(md, "| {name} |");
        for p in PERCENTILES {
            let _ = write!(md, " {:.1} |", f.ttfb[p]);
        }
        let _ = writeln!(md, " {:.1} | {} |", f.ttfb_mean, f.requests);
    }
    md.push_str("| vault − plain |");
    for p in PERCENTILES {
        let _ = write!(md, " {:+.1} |", vault.ttfb[p] - plain.ttfb[p]);
    }
    let _ = writeln!(md, " {:+.1} | |", vault.ttfb_mean - plain.ttfb_mean);
    md.push_str("| vault / plain |");
    for p in PERCENTILES {
        let _ = write!(md, " {:.2}x |", vault.ttfb[p] / plain.ttfb[p]);
    }
    let _ = writeln!(md, " {:.2}x | |", vault.ttfb_mean / plain.ttfb_mean);
    let quarter = |f: &Figures, g: &Figures| -> String {
        f.blocks
            .iter()
            .zip(&g.blocks)
            .map(|(a, b)| format!("{:+.1}", a - b))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let _ = writeln!(
        md,
        "\nVault − plain at p50 in each quarter of the run: {} µs. Plain − direct at p50 (the proxy's own cost): {:+.1} µs.",
        quarter(vault, plain),
        plain.ttfb["p50"] - direct.ttfb["p50"],
    );
    md.push_str("\n| target | first response byte p50 | whole stream p50 | whole stream p99 | held back | connections |\n|---|---:|---:|---:|---:|---:|\n");
    for ((name, _), f) in TARGETS.iter().zip(&results) {
        let _ = writeln!(
            md,
            "| {name} | {:.1} µs | {:.0} µs | {:.0} µs | {} | {} |",
            f.head_p50, f.total_p50, f.total_p99, f.held_back, f.connections
        );
    }
    let _ = writeln!(
        md,
        "\nMethod: `sse_ttfb` sends the same `POST` (a {{\"model\": \"gpt-bench\", \"max_tokens\": 64, \"stream\": true, ...}} JSON body with Content-Length, `Authorization: Bearer` a virtual key) to the backend directly, to a Portcullis route to it, and to a route to the same upstream with `vault = \"openai\"`, one keep-alive connection each, one request at a time: every round one request to each target in a freshly shuffled order, {GAP_US} µs idle between requests. The time to first byte runs from just before the request's single write to the return of the read that brought the first byte of the body; the backend writes the head and the first event together, at least 1 ms later three more events, and as long again after those the usage event and `[DONE]`; a response whose first event came less than 0.5 ms before its end counts as held back (none should). Every response is checked to be 200, `text/event-stream` and byte for byte the backend's events. On the vault route each request is looked up by its virtual key, admitted against an all-time budget (its estimate reserved), sent with the provider key instead, and its stream metered for the usage. The differences are between the percentiles of each target, not percentiles of paired differences. Metrics are on (the admin listener), the access log off, alike for both routes. Distributions in `bench-results/vault/*.hgrm`."
    );
    let _ = writeln!(
        md,
        "\nVault metering: the key's settled spend over the run is {spent} micro-units for {} vault requests (warm-up included; {COST_PER_REQUEST} each at the streamed usage of 10 + 20 tokens): {}.",
        vault.all_requests,
        if spent == expected {
            "every request settled at its reported usage".to_owned()
        } else {
            format!("expected {expected}")
        }
    );
    let mut warnings = Vec::new();
    if spent != expected {
        warnings.push(format!("the vault's settled spend ({spent}) is not {COST_PER_REQUEST} per vault request ({expected}): some requests did not settle at the usage their stream reported"));
    }
    for ((name, _), f) in TARGETS.iter().zip(&results) {
        if f.held_back > 0 {
            warnings.push(format!("{name}: {} of {} responses had their first event less than 0.5 ms before their end: held back, not streamed", f.held_back, f.requests));
        }
    }
    for w in &warnings {
        let _ = writeln!(md, "\n**Warning:** {w}.");
    }
    let out_file = workspace_root().join("benches/results/vault.md");
    std::fs::create_dir_all(out_file.parent().context("path")?)?;
    std::fs::write(&out_file, &md)?;
    std::fs::write(dir.join("results.md"), &md)?;
    println!("{md}");
    println!(
        "bench-vault: table {}, logs and distributions {}",
        out_file.display(),
        dir.display()
    );
    // The gateway and the backend stop here, as on any error above (Proc's Drop).
    Ok(())
}
