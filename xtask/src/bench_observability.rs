//! `cargo xtask bench-observability`: what metrics and the access log cost. The same gateway
//! build runs three ways, in alternating rounds so drift on a shared machine hits all alike:
//! plain; with `[admin]` (metrics on); with `[admin]` and `[access_log]` (to a file). Closed
//! loop, 64 connections, 1 KiB through the proxy; then an open loop at a fixed rate for p99.
//!
//! Layout on two cores: the gateway (one worker) and the backend on the first core, the load
//! generator on the other.

use std::{path::Path, process::Child};

use anyhow::Context;

use crate::{
    bench::{layout, load_summary, spawn_pinned, start_backend, wait_for_port, LoadgenRun},
    workspace_root,
};

const BACKEND_PORT: u16 = 19301;
const GATEWAY_PORT: u16 = 19380;
const ADMIN_PORT: u16 = 19390;
const MAX_CONNECTIONS: usize = 64;
const RATE: u32 = 4000;
const RATE_CONNECTIONS: usize = 32;
const ROUNDS: usize = 3;

const VARIANTS: [&str; 3] = ["plain", "metrics", "metrics + access log"];

fn config(dir: &Path, variant: usize) -> String {
    let mut extra = String::new();
    if variant >= 1 {
        extra.push_str(&format!(
            "[admin]\nlisten = \"127.0.0.1:{ADMIN_PORT}\"\ntoken_file = \"{}\"\n\n",
            dir.join("admin.token").display()
        ));
    }
    if variant >= 2 {
        extra.push_str(&format!(
            "[access_log]\npath = \"{}\"\n\n",
            dir.join("access.log").display()
        ));
    }
    format!(
        "[server]\nlisten = [\"127.0.0.1:{GATEWAY_PORT}\"]\nworkers = 1\n\n[quotas]\ndata_dir = \"{}\"\n\n{extra}[upstreams.backend]\nservers = [\"127.0.0.1:{BACKEND_PORT}\"]\nmax_idle_per_server = 256\n\n[[routes]]\nid = \"all\"\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"backend\"\n",
        dir.join("data").display()
    )
}

fn loadgen(bin: &Path, core: usize, duration: f64, rate: Option<u32>) -> anyhow::Result<Child> {
    LoadgenRun {
        port: GATEWAY_PORT,
        path: "/1k",
        connections: if rate.is_some() {
            RATE_CONNECTIONS
        } else {
            MAX_CONNECTIONS
        },
        rate,
        duration,
        core,
        extra: &[],
    }
    .spawn(bin)
}

pub fn run(duration: f64) -> anyhow::Result<()> {
    let bin = crate::build_release()?;
    let layout = layout();
    let server = &layout.server_cores[..1];
    let load = *layout.load_cores.first().context("no core for the load")?;
    let dir = workspace_root().join("bench-results").join("observability");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("admin.token"), "bench-admin-token-0123456789\n")?;
    let _backend = start_backend(&bin, server, BACKEND_PORT, &dir)?;
    // (variant, closed-loop req/s, open-loop p99 µs) per run.
    let mut runs: Vec<(usize, f64, u64)> = Vec::new();
    for round in 0..ROUNDS {
        for (variant, name) in VARIANTS.iter().enumerate() {
            let _ = std::fs::remove_dir_all(dir.join("data"));
            let _ = std::fs::remove_file(dir.join("access.log"));
            let config_path = dir.join(format!("variant-{variant}.toml"));
            std::fs::write(&config_path, config(&dir, variant))?;
            let _gateway = spawn_pinned(
                "portcullis",
                server,
                &bin.join("portcullis"),
                &["--config", config_path.to_str().context("path")?],
                &dir.join(format!("gateway-{variant}-{round}.log")),
            )?;
            wait_for_port(GATEWAY_PORT, "portcullis")?;
            let max = load_summary(loadgen(&bin, load, duration, None)?)?;
            let fixed = load_summary(loadgen(&bin, load, duration, Some(RATE))?)?;
            if max.errors > 0 || fixed.errors > 0 {
                anyhow::bail!(
                    "{name}: {} and {} failed requests",
                    max.errors,
                    fixed.errors
                );
            }
            runs.push((variant, max.rps, fixed.p99_us));
        }
    }
    let logged = std::fs::read_to_string(dir.join("access.log"))
        .map(|t| t.lines().count())
        .unwrap_or(0);
    let mean = |v: usize| {
        let r: Vec<&(usize, f64, u64)> = runs.iter().filter(|r| r.0 == v).collect();
        (
            r.iter().map(|r| r.1).sum::<f64>() / r.len() as f64,
            r.iter().map(|r| r.2 as f64).sum::<f64>() / r.len() as f64,
        )
    };
    let (plain_rps, plain_p99) = mean(0);
    let mut report = format!(
        "One worker, 1 KiB through the proxy; closed loop {MAX_CONNECTIONS} connections, open loop {RATE} req/s over {RATE_CONNECTIONS}; {duration} s each, mean of {ROUNDS} alternating rounds.\n\n| variant | req/s | vs plain | p99 at {RATE} req/s | vs plain |\n|---|---:|---:|---:|---:|\n"
    );
    for (v, name) in VARIANTS.iter().enumerate() {
        let (rps, p99) = mean(v);
        report.push_str(&format!(
            "| {name} | {rps:.0} | {:.3}x | {p99:.0} µs | {:.2}x |\n",
            rps / plain_rps,
            p99 / plain_p99
        ));
    }
    report.push_str(&format!(
        "\nAccess-log lines written in the last run: {logged}.\n"
    ));
    println!("{report}");
    std::fs::write(dir.join("results.md"), &report)?;
    Ok(())
}
