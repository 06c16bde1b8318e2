//! `state_bench`: memory and flush cost of the limit and quota state under a flood of distinct
//! keys (a header value per request), with the capacities given, against the same flood with
//! capacities above it (unbounded, as before the caps).
//!
//! `cargo run --release -p portcullis-benches --bin state_bench -- --keys 1000000 --cap 100000`

use std::{net::IpAddr, path::Path, time::Instant};

use clap::Parser;
use portcullis::{config::Config, limits::LimitSubject, quotas::QuotaStore, routing::RouteTable};

#[derive(Parser)]
struct Args {
    /// Distinct keys to send.
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    /// `max_limit_keys` and `quotas.max_keys`.
    #[arg(long, default_value_t = 100_000)]
    cap: usize,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dir = tempfile::tempdir()?;
    let config = Config::parse(
        Path::new("state_bench.toml"),
        &format!(
            "[server]\nmax_limit_keys = {cap}\n[quotas]\ndata_dir = \"{}\"\nmax_keys = {cap}\n[upstreams.u]\nservers = [\"127.0.0.1:9\"]\n[[routes]]\nupstream = \"u\"\nlimits = [{{ key = \"header:X-Tenant\", rate = 10, per = \"1s\" }}]\nquotas = [{{ key = \"header:X-Tenant\", limit = 1000, period = \"day\" }}]\n",
            dir.path().display(),
            cap = a.cap
        ),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = QuotaStore::open(&config)?;
    let routes = RouteTable::new(&config);
    let route = &routes.routes()[0];
    let client: IpAddr = "203.0.113.9".parse()?;
    // Sends tenants `keys` once each through the route's limit (when `limit`) and quota;
    // returns (admitted, refused) by the quota.
    let send = |keys: std::ops::Range<usize>, limit: bool| {
        let (mut admitted, mut refused) = (0u64, 0u64);
        for i in keys {
            let v = format!("tenant-{i}").into_bytes();
            let value: &[u8] = &v;
            let header = move |_: &str| Some(value);
            let subject = LimitSubject {
                client,
                consumer: None,
                header: &header,
                hasher: &store.hasher,
            };
            if limit {
                let _ = route.limits[0].admit(&subject, None);
            }
            match store.take(&route.quotas[0], &subject, None) {
                Ok(_) => admitted += 1,
                Err(_) => refused += 1,
            }
        }
        (admitted, refused)
    };
    let timed_flush = || -> anyhow::Result<std::time::Duration> {
        let t = Instant::now();
        store.flush()?;
        Ok(t.elapsed())
    };
    let before = rss_kib();
    let started = Instant::now();
    let (admitted, full) = send(0..a.keys, true);
    let fill = started.elapsed();
    let after = rss_kib();
    let first_flush = timed_flush()?;
    // A steady second: a thousand of the live keys come back.
    send(0..1000, false);
    let steady_flush = timed_flush()?;
    // The same again: the journal was just compacted (if it had outgrown the snapshot), so this
    // is the plain append of what changed.
    send(1000..2000, false);
    let append_flush = timed_flush()?;
    let journal = std::fs::metadata(dir.path().join("quotas.journal"))?.len()
        + std::fs::metadata(dir.path().join("quotas.state"))
            .map(|m| m.len())
            .unwrap_or(0);
    println!(
        "keys={} cap={} fill={:.2}s rss_growth={}MiB limit_keys={} quota_keys={} admitted={admitted} refused_full={full} first_flush={:.1}ms steady_flush_1000_changed={:.2}ms append_only_flush_1000_changed={:.2}ms state_bytes={}",
        a.keys,
        a.cap,
        fill.as_secs_f64(),
        (after.saturating_sub(before)) / 1024,
        route.limits[0].tracked_keys(),
        store.len(),
        first_flush.as_secs_f64() * 1e3,
        steady_flush.as_secs_f64() * 1e3,
        append_flush.as_secs_f64() * 1e3,
        journal
    );
    Ok(())
}
