//! `loadgen`: the Portcullis load generator. Open loop with `--rate`, closed loop without.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use portcullis_benches::loadgen::{self, LoadSpec};

#[derive(Parser)]
#[command(about = "HTTP/1.1 load generator with HDR latency histograms (open or closed loop)")]
struct Args {
    /// Address to load.
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value = "bench.local")]
    host: String,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Requests per second over all connections (open loop); omit for closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Pin thread i to core (first + i).
    #[arg(long)]
    pin_from_core: Option<usize>,
    /// Extra request header, `Name: value` (repeatable). `{n}` in the first one that has it is
    /// replaced by a counter, different for every request.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Local address to connect from, such as 127.0.0.2 (another client to the gateway);
    /// repeatable: connections take the addresses in turn.
    #[arg(long = "source")]
    sources: Vec<std::net::IpAddr>,
    /// Count every complete response, whatever its status, and keep the connection.
    #[arg(long)]
    any_status: bool,
    /// Where to write the percentile distribution.
    #[arg(long)]
    hgrm: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        a.connections >= a.threads && a.threads >= 1,
        "need at least one connection per thread"
    );
    let spec = LoadSpec {
        target: a.target,
        path: a.path,
        host: a.host,
        extra_headers: a.headers.iter().map(|h| format!("{h}\r\n")).collect(),
        connections: a.connections,
        threads: a.threads,
        duration: Duration::from_secs_f64(a.duration),
        rate: a.rate,
        pin_from_core: a.pin_from_core,
        sources: a.sources,
        any_status: a.any_status,
    };
    let summary = loadgen::run(&spec)?;
    println!("{}", summary.text());
    println!("{}", summary.machine_line());
    if let Some(path) = a.hgrm {
        loadgen::write_hgrm(&summary.histogram, &path)?;
    }
    Ok(())
}
