//! `cargo xtask bench-reload`: a steady open-loop load while the config is reloaded every
//! second (alternating two files), and while the binary is upgraded 5 times
//! (`portcullis --upgrade`), against the same load with neither: failed requests (any
//! connection error or non-2xx) and p99 during against p99 without. With
//! `--baseline-bin`, also the maximum throughput of another build of the gateway (such as the
//! previous commit's) against this one, alternating in the same run.
//!
//! Layout on two cores: the gateway (one worker) and the backend on the first core, the load
//! generator on the other.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{
    bench::{layout, load_summary, spawn_pinned, start_backend, wait_for_port, LoadgenRun},
    workspace_root,
};

const BACKEND_PORT: u16 = 19201;
const GATEWAY_PORT: u16 = 19280;
const RATE: u32 = 2000;
const CONNECTIONS: usize = 32;
/// Connections for the maximum-throughput comparison.
const MAX_CONNECTIONS: usize = 64;

fn config(dir: &Path, variant: usize) -> String {
    let body = if variant == 0 { "one" } else { "two" };
    let extra = if variant == 0 {
        String::new()
    } else {
        "[[routes]]\nmatch = { path = \"/added\" }\nrespond = { status = 200, body = \"added\" }\n\n"
            .to_owned()
    };
    format!(
        "[server]\nlisten = [\"127.0.0.1:{GATEWAY_PORT}\"]\nworkers = 1\n\n[quotas]\ndata_dir = \"{}\"\n\n[upstreams.backend]\nservers = [\"127.0.0.1:{BACKEND_PORT}\"]\nmax_idle_per_server = 256\n\n[[routes]]\nmatch = {{ path = \"/static\" }}\nrespond = {{ status = 200, body = \"{body}\" }}\n\n{extra}[[routes]]\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"backend\"\n",
        dir.join("data").display()
    )
}

fn loadgen(bin: &Path, core: usize, duration: f64, rate: Option<u32>) -> anyhow::Result<Child> {
    LoadgenRun {
        port: GATEWAY_PORT,
        path: "/1k",
        connections: if rate.is_some() {
            CONNECTIONS
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

fn start_gateway(
    gateway: &Path,
    server: &[usize],
    config: &Path,
    log: &Path,
) -> anyhow::Result<crate::bench::Proc> {
    let p = spawn_pinned(
        "portcullis",
        server,
        gateway,
        &["--config", config.to_str().context("path")?],
        log,
    )?;
    wait_for_port(GATEWAY_PORT, "portcullis")?;
    Ok(p)
}

pub fn run(duration: f64, baseline_bin: Option<PathBuf>) -> anyhow::Result<()> {
    let bin = crate::build_release()?;
    let layout = layout();
    let server = &layout.server_cores[..1];
    let load = *layout.load_cores.first().context("no core for the load")?;
    let dir = workspace_root().join("bench-results").join("reload");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("portcullis.toml");
    std::fs::write(&config_path, config(&dir, 0))?;
    let _backend = start_backend(&bin, server, BACKEND_PORT, &dir)?;
    let mut report = String::new();
    {
        let _gateway = start_gateway(
            &bin.join("portcullis"),
            server,
            &config_path,
            &dir.join("portcullis.log"),
        )?;
        let base = load_summary(loadgen(&bin, load, duration, Some(RATE))?)?;
        let (base_errors, base_p99) = (base.errors, base.p99_us);
        let during = loadgen(&bin, load, duration, Some(RATE))?;
        let started = Instant::now();
        let (mut reloads, mut refused) = (0, 0);
        let mut variant = 0;
        while started.elapsed() < Duration::from_secs_f64(duration - 1.0) {
            std::thread::sleep(Duration::from_secs(1));
            variant = 1 - variant;
            std::fs::write(&config_path, config(&dir, variant))?;
            let out = Command::new(bin.join("portcullis"))
                .args(["reload", "--config"])
                .arg(&config_path)
                .output()?;
            if out.status.success() {
                reloads += 1;
            } else {
                refused += 1;
                eprintln!(
                    "bench-reload: reload refused: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let reloading = load_summary(during)?;
        let (errors, p99) = (reloading.errors, reloading.p99_us);
        if refused > 0 {
            bail!("{refused} reloads were refused");
        }
        // Five upgrades, one every duration/6 seconds; each new process takes over from the
        // one before, which drains and exits.
        std::fs::write(&config_path, config(&dir, 0))?;
        let during = loadgen(&bin, load, duration, Some(RATE))?;
        let mut current: Option<Child> = None;
        for i in 0..5 {
            std::thread::sleep(Duration::from_secs_f64(duration / 6.0));
            let log = dir.join(format!("upgrade-{i}.log"));
            let child = Command::new("taskset")
                .arg("-c")
                .arg(crate::bench::cpu_list(server))
                .arg(bin.join("portcullis"))
                .args(["--upgrade", "--config"])
                .arg(&config_path)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()?;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !std::fs::read_to_string(&log)?.contains("upgrade: the old process is draining") {
                if Instant::now() > deadline {
                    bail!(
                        "upgrade {i} did not complete: {}",
                        std::fs::read_to_string(&log)?
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(mut old) = current.replace(child) {
                let _ = old.wait();
            }
        }
        let upgrading = load_summary(during)?;
        let (upgrade_errors, upgrade_p99) = (upgrading.errors, upgrading.p99_us);
        if let Some(mut last) = current {
            let _ = Command::new("kill").arg(last.id().to_string()).status();
            let _ = last.wait();
        }
        report.push_str(&format!(
            "Open loop, {RATE} req/s over {CONNECTIONS} keep-alive connections, {duration} s each, one worker.\n\n| run | failed requests | p99 |\n|---|---:|---:|\n| no reload | {base_errors} | {base_p99} µs |\n| {reloads} reloads, one a second | {errors} | {p99} µs |\n| 5 binary upgrades | {upgrade_errors} | {upgrade_p99} µs |\n\n"
        ));
    }
    if let Some(baseline) = baseline_bin {
        std::fs::write(&config_path, config(&dir, 0))?;
        let mut rows = Vec::new();
        // Alternate, twice each, so drift on this shared machine hits both alike.
        for round in 0..2 {
            for (name, gateway) in [
                ("this build", bin.join("portcullis")),
                ("baseline", baseline.clone()),
            ] {
                let _ = std::fs::remove_dir_all(dir.join("data"));
                let _gw = start_gateway(
                    &gateway,
                    server,
                    &config_path,
                    &dir.join(format!("max-{name}-{round}.log").replace(' ', "-")),
                )?;
                let rps = load_summary(loadgen(&bin, load, duration / 2.0, None)?)?.rps;
                rows.push((name, rps));
            }
        }
        let mean = |n: &str| {
            let v: Vec<f64> = rows
                .iter()
                .filter(|(k, _)| *k == n)
                .map(|(_, r)| *r)
                .collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        let (this, base) = (mean("this build"), mean("baseline"));
        report.push_str(&format!(
            "Closed loop, {MAX_CONNECTIONS} connections, 1 KiB through the proxy, mean of 2 alternating runs:\n\n| build | req/s |\n|---|---:|\n| this build | {this:.0} |\n| baseline ({}) | {base:.0} |\n| ratio | {:.2}x |\n",
            baseline.display(),
            this / base
        ));
    }
    println!("{report}");
    std::fs::write(dir.join("results.md"), &report)?;
    Ok(())
}
