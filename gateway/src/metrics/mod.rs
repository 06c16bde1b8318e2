//! Metrics: what every worker counts and how long requests take, merged when scraped and
//! rendered in the Prometheus text format. Nothing on the request path is written by two
//! cores: each worker writes its own counters ([`worker`]) and latency series ([`latency`]);
//! the scrape reads them all and adds them up.

pub mod counter;
pub mod exposition;
pub mod labels;
pub mod latency;
pub mod top_refused;
pub mod totals;
pub mod worker;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use latency::{LatencyWindows, Recorded};
use worker::{WorkerCounters, WorkerMetrics};

/// The process's metrics: every worker's counters, the latency windows, and what the process
/// itself counts (reloads).
pub struct Metrics {
    started: Instant,
    workers: Mutex<Vec<(usize, Arc<WorkerCounters>)>>,
    pub windows: Arc<LatencyWindows>,
    collector: Mutex<mpsc::Sender<Recorded>>,
    reloads_ok: AtomicU64,
    reloads_refused: AtomicU64,
    last_reload_unix_ms: AtomicU64,
}

impl Metrics {
    /// Starts the latency collector; percentiles cover `window`.
    pub fn start(window: Duration) -> std::io::Result<Arc<Metrics>> {
        let (windows, collector) = LatencyWindows::start(window)?;
        Ok(Arc::new(Metrics {
            started: Instant::now(),
            workers: Mutex::default(),
            windows,
            collector: Mutex::new(collector),
            reloads_ok: AtomicU64::new(0),
            reloads_refused: AtomicU64::new(0),
            last_reload_unix_ms: AtomicU64::new(0),
        }))
    }

    /// Registers worker `id`; returns what its thread records into.
    pub fn worker(&self, id: usize) -> WorkerMetrics {
        let counters = Arc::new(WorkerCounters::default());
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, counters.clone()));
        let collector = self
            .collector
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        WorkerMetrics::new(counters, collector)
    }

    pub fn workers(&self) -> Vec<(usize, Arc<WorkerCounters>)> {
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Notes a reload's result.
    pub fn reloaded(&self, accepted: bool) {
        if accepted {
            self.reloads_ok.fetch_add(1, Ordering::Relaxed);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            self.last_reload_unix_ms
                .store(now.as_millis() as u64, Ordering::Relaxed);
        } else {
            self.reloads_refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Accepted and refused reloads, and the time of the last accepted one (Unix ms, 0 if none).
    pub fn reloads(&self) -> (u64, u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_refused.load(Ordering::Relaxed),
            self.last_reload_unix_ms.load(Ordering::Relaxed),
        )
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}
