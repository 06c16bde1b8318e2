//! The load generator: HTTP/1.1 over many keep-alive connections, at a fixed request rate (open
//! loop: each request's latency counts from when it was due, as wrk2 does, so a stall is not
//! hidden by coordinated omission) or at fixed concurrency (closed loop). Latencies go into HDR
//! histograms, one per thread, merged at the end.

mod connection;
mod report;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

pub use report::{write_hgrm, Summary};

/// Highest latency the histograms track, in microseconds (a minute).
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub target: SocketAddr,
    /// Request line target, such as `/1k`.
    pub path: String,
    pub host: String,
    /// Extra header lines, each ending in CRLF.
    pub extra_headers: String,
    pub connections: usize,
    pub threads: usize,
    pub duration: Duration,
    /// Requests per second over all connections; `None` runs closed loop.
    pub rate: Option<f64>,
    /// Core to pin the first thread to (others follow).
    pub pin_from_core: Option<usize>,
    /// Local addresses to connect from, one per connection in turn (each loopback address is
    /// another client to the gateway); empty: the kernel's choice.
    pub sources: Vec<std::net::IpAddr>,
    /// Count any complete response as done and keep the connection (for floods of requests
    /// the gateway refuses); by default only 2xx count and anything else reconnects.
    pub any_status: bool,
}

/// Written in a request where each request should differ: replaced, per request, by a
/// ten-digit counter unique across connections (such as a distinct token).
pub const COUNTER_PLACEHOLDER: &str = "{n}";

/// One thread's results.
pub struct ThreadResult {
    pub histogram: Histogram<u64>,
    pub completed: u64,
    pub errors: u64,
}

/// Runs the load and returns the merged histogram (microseconds), completions and errors.
pub fn run(spec: &LoadSpec) -> anyhow::Result<Summary> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now() + Duration::from_millis(50);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut handles = Vec::new();
    let mut first_connection = 0;
    for t in 0..spec.threads {
        // Spread connections evenly; the first threads take the remainder.
        let conns =
            spec.connections / spec.threads + usize::from(t < spec.connections % spec.threads);
        let first = first_connection;
        first_connection += conns;
        let spec = spec.clone();
        let stop = stop.clone();
        let core = spec
            .pin_from_core
            .and_then(|first| cores.get((first + t) % cores.len().max(1)).copied());
        handles.push(std::thread::spawn(
            move || -> anyhow::Result<ThreadResult> {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                tokio_uring::start(connection::drive_thread(spec, conns, first, start, stop))
            },
        ));
    }
    std::thread::sleep(start.saturating_duration_since(Instant::now()) + spec.duration);
    stop.store(true, Ordering::Release);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)?;
    let (mut completed, mut errors) = (0, 0);
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        histogram.add(&r.histogram)?;
        completed += r.completed;
        errors += r.errors;
    }
    Ok(Summary {
        histogram,
        completed,
        errors,
        elapsed: spec.duration,
    })
}
