//! `cargo xtask bench-balance`: what the balancing policy and outlier ejection do for clients
//! when one of three servers goes bad, and how many keys consistent hashing moves when a
//! server goes away.
//!
//! Three benchmark backends (`benches/src/backend.rs`) serve one upstream; the third adds
//! 50 ms to every answer (`--delay-ms`). Four gateway configs, one per policy:
//! `round_robin` and `least_request`, each with outlier ejection off
//! (`outlier = { enabled = false }`) and on
//! (`consecutive_failures = 5, base_ejection = "30s", max_ejected_percent = 50`).
//!
//! - Phase A, one slow: an open-loop load (`--rate` over 64 connections) against each gateway;
//! - phase B, one killed: the third backend is killed (SIGKILL, so its port refuses
//!   connections) and the same load runs again.
//!
//! Every run has a gateway of its own, started for it (one worker), so no ejection or
//! balancing state carries over; in phase A it gets a 1 s warm-up first, in phase B none, so the
//! failures before an ejection are counted. Each of `--repeats` rounds runs phase A for every
//! policy, kills the slow backend, runs phase B for every policy, and starts it again for the
//! next round, the order of the policies rotated every round.
//!
//! Then consistent hashing, measured through the gateway (xtask does not depend on the gateway
//! crate): `balance = "hash"` on `header:x-user` over four backends that name themselves in
//! `x-backend`; 2,000 keys sent once each, then again to a gateway with three of the four
//! servers, counting the keys whose server changed.
//!
//! Layout as `bench-transform`: the gateway and the backends on the first server core, the load
//! generator alone on the first load core.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{bail, Context};

use crate::{
    bench::{
        ensure_commands, http_once, layout, load_summary, machine, median, spawn_pinned,
        start_backend_with, timestamp, wait_for_port, LoadSummary, LoadgenRun, Proc,
    },
    workspace_root,
};

/// The balanced upstream's three backends; the last is the slow one, then the killed one.
const BACKEND_PORTS: [u16; 3] = [19701, 19702, 19703];
/// The consistent-hash upstream's four backends.
const HASH_BACKEND_PORTS: [u16; 4] = [19711, 19712, 19713, 19714];
/// Policy `i`'s gateway listens on `GATEWAY_PORT + i`.
const GATEWAY_PORT: u16 = 19780;
const HASH_GATEWAY_PORT: u16 = 19790;
const SLOW_MS: u64 = 50;
const CONNECTIONS: usize = 64;
const WARMUP_SECS: f64 = 1.0;
const PATH: &str = "/1k";
const HASH_KEYS: usize = 2000;
const HASH_SEED: u64 = 7;
const EJECTION: &str =
    "outlier = { consecutive_failures = 5, base_ejection = \"30s\", max_ejected_percent = 50 }";

struct Policy {
    name: &'static str,
    balance: &'static str,
    outlier: &'static str,
}

const POLICIES: [Policy; 4] = [
    Policy {
        name: "round_robin, no ejection",
        balance: "round_robin",
        outlier: "outlier = { enabled = false }",
    },
    Policy {
        name: "least_request, no ejection",
        balance: "least_request",
        outlier: "outlier = { enabled = false }",
    },
    Policy {
        name: "round_robin + ejection",
        balance: "round_robin",
        outlier: EJECTION,
    },
    Policy {
        name: "least_request + ejection",
        balance: "least_request",
        outlier: EJECTION,
    },
];

const PHASES: [&str; 2] = [
    "A: one slow (+50 ms)",
    "B: one killed (connections refused)",
];

/// A gateway config: one worker on `port`, every path to one upstream of `servers` balanced by
/// `balance` (lines of the upstream table, such as `balance = "hash"`).
fn config(dir: &Path, port: u16, servers: &[u16], balance: &str) -> String {
    let servers = servers
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"[server]
listen = ["127.0.0.1:{port}"]
workers = 1

[quotas]
data_dir = "{data}"

[upstreams.backend]
servers = [{servers}]
{balance}

[[routes]]
match = {{ path_prefix = "/" }}
upstream = "backend"
"#,
        data = dir.join(format!("data-{port}")).display(),
    )
}

/// Starts a gateway on `port` with the config written to `dir/<name>.toml`.
fn start_gateway(
    bin: &Path,
    cores: &[usize],
    dir: &Path,
    name: &str,
    port: u16,
    config: &str,
) -> anyhow::Result<Proc> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config)?;
    let gateway = spawn_pinned(
        "portcullis",
        cores,
        &bin.join("portcullis"),
        &["--config", path.to_str().context("path")?],
        &dir.join(format!("{name}.log")),
    )?;
    wait_for_port(port, "portcullis")?;
    Ok(gateway)
}

/// One request through the gateway on `port`: the name of the backend that answered it.
fn served_by(port: u16, extra_header: &str) -> anyhow::Result<String> {
    let reply = http_once(
        port,
        &format!(
            "GET {PATH} HTTP/1.1\r\nHost: bench.local\r\n{extra_header}Connection: close\r\n\r\n"
        ),
    )?;
    if reply.status != 200 {
        bail!(
            "{PATH} through port {port}: status {}:\n{}",
            reply.status,
            reply.head
        );
    }
    reply
        .header("x-backend")
        .map(str::to_owned)
        .with_context(|| format!("no x-backend field in the answer:\n{}", reply.head))
}

/// The balanced upstream's backends, `b1` to `b3`.
struct Backends<'a> {
    bin: &'a Path,
    cores: &'a [usize],
    dir: &'a Path,
    /// None: killed.
    procs: Vec<Option<Proc>>,
}

impl Backends<'_> {
    /// Starts backend `i` (`b1`, `b2`, `b3`; the last slow).
    fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let name = format!("b{}", i + 1);
        let delay = if i == BACKEND_PORTS.len() - 1 {
            SLOW_MS
        } else {
            0
        };
        let delay = delay.to_string();
        let proc = start_backend_with(
            self.bin,
            self.cores,
            BACKEND_PORTS[i],
            &["--name", &name, "--delay-ms", &delay],
            &self.dir.join(format!("backend-{name}.log")),
        )?;
        self.procs[i] = Some(proc);
        Ok(())
    }
}

/// What every measured run shares.
struct Measure<'a> {
    bin: &'a Path,
    server: &'a [usize],
    load: usize,
    dir: &'a Path,
    rate: u32,
    duration: f64,
}

impl Measure<'_> {
    fn drive(&self, port: u16, duration: f64) -> anyhow::Result<LoadSummary> {
        load_summary(
            LoadgenRun {
                port,
                path: PATH,
                connections: CONNECTIONS,
                rate: Some(self.rate),
                duration,
                core: self.load,
                extra: &[],
            }
            .spawn(self.bin)?,
        )
    }

    /// One run of policy `i` in `phase` on a gateway started for it.
    fn run(&self, i: usize, phase: usize, round: usize) -> anyhow::Result<LoadSummary> {
        let port = GATEWAY_PORT + i as u16;
        let p = &POLICIES[i];
        let upstream = format!("balance = \"{}\"\n{}", p.balance, p.outlier);
        let _gateway = start_gateway(
            self.bin,
            self.server,
            self.dir,
            &format!(
                "policy{}-phase{}-round{}",
                i + 1,
                ["a", "b"][phase],
                round + 1
            ),
            port,
            &config(self.dir, port, &BACKEND_PORTS, &upstream),
        )?;
        if phase == 0 {
            served_by(port, "")?;
            self.drive(port, WARMUP_SECS)?;
        }
        eprintln!(
            "bench-balance: round {}: phase {}: {}",
            round + 1,
            PHASES[phase],
            p.name
        );
        self.drive(port, self.duration)
    }
}

/// The consistent-hash measurement: which backend each key went to with four servers, and
/// with the first three.
struct HashMoves {
    before: Vec<String>,
    after: Vec<String>,
}

fn hash_moves(bin: &Path, cores: &[usize], dir: &Path) -> anyhow::Result<HashMoves> {
    let _backends = HASH_BACKEND_PORTS
        .iter()
        .enumerate()
        .map(|(i, &port)| {
            let name = format!("s{}", i + 1);
            start_backend_with(
                bin,
                cores,
                port,
                &["--name", &name],
                &dir.join(format!("backend-{name}.log")),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let upstream =
        format!("balance = \"hash\"\nhash_key = \"header:x-user\"\nhash_seed = {HASH_SEED}");
    let mut servers = Vec::new();
    for (name, ports) in [
        ("hash-4-servers", &HASH_BACKEND_PORTS[..]),
        ("hash-3-servers", &HASH_BACKEND_PORTS[..3]),
    ] {
        eprintln!(
            "bench-balance: consistent hash: {HASH_KEYS} keys, {} servers",
            ports.len()
        );
        let _gateway = start_gateway(
            bin,
            cores,
            dir,
            name,
            HASH_GATEWAY_PORT,
            &config(dir, HASH_GATEWAY_PORT, ports, &upstream),
        )?;
        servers.push(
            (0..HASH_KEYS)
                .map(|n| served_by(HASH_GATEWAY_PORT, &format!("x-user: user-{n}\r\n")))
                .collect::<anyhow::Result<Vec<_>>>()?,
        );
    }
    let after = servers.pop().context("two runs")?;
    let before = servers.pop().context("two runs")?;
    Ok(HashMoves { before, after })
}

pub fn run(duration: f64, rate: u32, repeats: usize) -> anyhow::Result<()> {
    anyhow::ensure!(repeats >= 1, "--repeats must be at least 1");
    anyhow::ensure!(rate >= 1, "--rate must be at least 1");
    anyhow::ensure!(duration > 0.0, "--duration must be more than 0");
    ensure_commands(&[("taskset", "util-linux")])?;
    let bin = crate::build_release()?;
    let layout = layout();
    let server = &layout.server_cores[..1];
    let load = *layout.load_cores.first().context("no core for the load")?;
    let dir = workspace_root().join("bench-results").join("balance");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let stamp = timestamp()?;
    eprintln!(
        "bench-balance: gateways (1 worker) and backends on core {server:?}, load generator on core {load}; configs and logs in {}",
        dir.display()
    );

    let hash = hash_moves(&bin, server, &dir)?;

    let mut backends = Backends {
        bin: &bin,
        cores: server,
        dir: &dir,
        procs: BACKEND_PORTS.iter().map(|_| None).collect(),
    };
    for i in 0..BACKEND_PORTS.len() {
        backends.start(i)?;
    }
    let measure = Measure {
        bin: &bin,
        server,
        load,
        dir: &dir,
        rate,
        duration,
    };
    let slow = BACKEND_PORTS.len() - 1;
    // Per (policy, phase), one summary per round.
    let mut runs: BTreeMap<(usize, usize), Vec<LoadSummary>> = BTreeMap::new();
    for round in 0..repeats {
        for phase in 0..PHASES.len() {
            if phase == 1 {
                backends.procs[slow]
                    .as_mut()
                    .context("the slow backend runs")?
                    .kill()?;
                backends.procs[slow] = None;
            }
            for k in 0..POLICIES.len() {
                let i = (k + round) % POLICIES.len();
                let run = measure.run(i, phase, round)?;
                runs.entry((i, phase)).or_default().push(run);
            }
        }
        if round + 1 < repeats {
            backends.start(slow)?;
        }
    }
    drop(backends);

    let (cpu, kernel) = machine()?;
    let mut md = format!(
        "Measured {stamp} on {} core(s) ({cpu}), Linux {kernel}. Each Portcullis (1 worker) and the backends pinned to core(s) {server:?}, the load generator alone on core {load}; open loop at {rate} req/s over {CONNECTIONS} keep-alive connections to `{PATH}`, {duration} s per run, {repeats} round(s).\n\n",
        layout.server_cores.len() + layout.load_cores.len(),
    );
    let _ = writeln!(
        md,
        "| policy | phase | req/s (median of {repeats}) | p50 | p99 | failed requests (all rounds) |\n|---|---|---:|---:|---:|---:|"
    );
    for (phase, phase_name) in PHASES.iter().enumerate() {
        for (i, p) in POLICIES.iter().enumerate() {
            let r = &runs[&(i, phase)];
            let rps = median(r.iter().map(|s| s.rps).collect());
            let p50 = median(r.iter().map(|s| s.p50_us as f64).collect());
            let p99 = median(r.iter().map(|s| s.p99_us as f64).collect());
            let failed: u64 = r.iter().map(|s| s.errors).sum();
            let sent: u64 = r.iter().map(|s| s.errors + s.completed).sum();
            let _ = writeln!(
                md,
                "| {} | {phase_name} | {rps:.0} | {} | {} | {failed} of {sent} ({:.2}%) |",
                p.name,
                latency(p50),
                latency(p99),
                100.0 * failed as f64 / sent.max(1) as f64
            );
        }
    }

    let total = hash.before.len();
    let moved = hash
        .before
        .iter()
        .zip(&hash.after)
        .filter(|(b, a)| b != a)
        .count();
    let removed = "s4";
    let on_removed = hash.before.iter().filter(|s| *s == removed).count();
    let moved_from_kept = hash
        .before
        .iter()
        .zip(&hash.after)
        .filter(|(b, a)| *b != removed && b != a)
        .count();
    let mut per_server: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &hash.before {
        *per_server.entry(s).or_default() += 1;
    }
    let n = HASH_BACKEND_PORTS.len();
    let share = moved as f64 / total as f64;
    let _ = writeln!(
        md,
        "\n| consistent hash (`header:x-user`, seed {HASH_SEED}) | keys |\n|---|---:|\n| keys per server with {n} servers | {} |\n| keys moved when `{removed}` is removed ({n} → {} servers) | {moved} of {total} ({share:.3}) |\n| of which were on `{removed}` (had to move) | {on_removed} |\n| of which were on a server that stayed | {moved_from_kept} |\n| moved share / (1/{n}) | {:.2} |",
        per_server
            .iter()
            .map(|(s, c)| format!("{s} {c}"))
            .collect::<Vec<_>>()
            .join(", "),
        n - 1,
        share * n as f64,
    );
    let _ = writeln!(
        md,
        "\nMethod: three benchmark backends (`benches/src/backend.rs`, one worker each, `--name b1..b3`) behind one upstream, every path routed to it; `b3` waits {SLOW_MS} ms before each answer (`--delay-ms {SLOW_MS}`). Four policies: `balance = \"round_robin\"` and `balance = \"least_request\"`, each with `outlier = {{ enabled = false }}` and with `{EJECTION}`. Routes keep the default retry (one retry to another server for connect failures and resets, within the upstream's default retry budget of 20% of requests in flight or 3). Phase A: the load against each policy's gateway with all three backends up. Phase B: `b3` killed with SIGKILL (its port refuses connections), the same load again. Every run is on a gateway started for it, so ejection and balancing state start clean; phase A runs get a {WARMUP_SECS} s warm-up and a probe request first, phase B runs neither, so the failures before `b3` is ejected are counted. Each round runs phase A for every policy, kills `b3`, runs phase B for every policy and starts `b3` again for the next round; the order of the policies rotates every round. Failed requests are the load generator's errors: any answer other than 2xx, and connection errors; req/s counts the 2xx answers only. Latencies are of the answered requests, counted from each request's due time (open loop, so a stall is not hidden), the median of the rounds' percentiles; the load generator keeps one request outstanding per connection, so a request due behind a slow answer on its connection waits for it, as it would in a client's connection pool. The consistent-hash figures are measured through the gateway (`balance = \"hash\"`, `hash_key = \"header:x-user\"`, `hash_seed = {HASH_SEED}`) over four more backends named `s1..s4`: {HASH_KEYS} requests with `x-user: user-0` to `user-{}`, one each on its own connection, with all four servers and then with `s1..s3`; a key moved when another backend answered it. Configs and logs: `bench-results/balance/`.",
        HASH_KEYS - 1
    );
    let out_file = workspace_root().join("benches/results/balance.md");
    std::fs::create_dir_all(out_file.parent().context("path")?)?;
    std::fs::write(&out_file, &md)?;
    std::fs::write(dir.join("results.md"), &md)?;
    println!("{md}");
    println!(
        "bench-balance: table {}, configs and logs {}",
        out_file.display(),
        dir.display()
    );
    Ok(())
}

/// A latency in microseconds, written in µs below 10 ms and in ms above.
fn latency(us: f64) -> String {
    if us < 10_000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}
