//! Latency: exact Prometheus buckets per series (per-worker counters, fixed bounds), and HDR
//! histograms per worker that a collector thread merges into a sliding window for the
//! percentile gauges.
//!
//! The request path records into its own worker's counters and histogram only. Once a second
//! each worker hands its histograms (those that recorded anything) to the collector over a
//! channel and starts fresh ones; the collector files them into time slots, so the percentiles
//! cover the last `percentile_window` (in six slots: between five and six sixths of it, plus
//! up to a second not yet handed over).

use std::{
    cell::RefCell,
    collections::{BTreeMap, VecDeque},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

use super::counter::LocalCounter;

/// Upper bounds of the Prometheus buckets, in microseconds (then `+Inf`): 100 µs to 60 s.
pub const BUCKET_BOUNDS_US: [u64; 18] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];
/// Largest latency the HDR histograms hold (longer ones are clamped to it): one hour.
const HDR_MAX_US: u64 = 3_600_000_000;
/// Two significant digits: a percentile is within 1% of the true value.
const HDR_SIGNIFICANT_DIGITS: u8 = 2;
/// The percentiles exported as gauges.
pub const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];
/// Slots the sliding window is kept in.
const WINDOW_SLOTS: u32 = 6;

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HDR_MAX_US, HDR_SIGNIFICANT_DIGITS)
        .expect("constant bounds are valid")
}

/// Which latency a series measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    /// Time spent in the gateway: the whole request less the wait on the upstream.
    Gateway,
    /// From the upstream connection being ready to the first byte of its response.
    Upstream,
}

impl Part {
    pub fn label(self) -> &'static str {
        match self {
            Part::Gateway => "gateway",
            Part::Upstream => "upstream",
        }
    }
}

/// What a series belongs to: a route (by id) or an upstream group (by name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    Route(String),
    Upstream(String),
}

/// One series' bucket counters in one worker: written by the worker, read by the scrape.
#[derive(Debug, Default)]
pub struct Buckets {
    /// Counts per bucket (not cumulative); the last is `+Inf`.
    pub counts: [LocalCounter; BUCKET_BOUNDS_US.len() + 1],
    pub sum_us: LocalCounter,
}

impl Buckets {
    #[inline]
    fn record(&self, us: u64) {
        let i = BUCKET_BOUNDS_US.partition_point(|b| *b < us);
        self.counts[i].inc();
        self.sum_us.add(us);
    }
}

/// One series as one worker records it.
pub struct Series {
    subject: Subject,
    part: Part,
    pub buckets: Arc<Buckets>,
    /// Made on first use, handed to the collector once a second.
    hdr: RefCell<Option<Histogram<u64>>>,
}

impl Series {
    pub fn new(subject: Subject, part: Part) -> Series {
        Series {
            subject,
            part,
            buckets: Arc::default(),
            hdr: RefCell::new(None),
        }
    }

    #[inline]
    pub fn record(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.buckets.record(us);
        let mut hdr = self.hdr.borrow_mut();
        hdr.get_or_insert_with(new_histogram)
            .saturating_record(us.min(HDR_MAX_US));
    }

    /// Hands what was recorded since the last call to the collector.
    pub fn hand_over(&self, collector: &mpsc::Sender<Recorded>) {
        if let Some(hdr) = self.hdr.borrow_mut().take() {
            let _ = collector.send(Recorded {
                subject: self.subject.clone(),
                part: self.part,
                at: Instant::now(),
                histogram: hdr,
            });
        }
    }
}

/// One worker's histogram of one series for about a second.
pub struct Recorded {
    subject: Subject,
    part: Part,
    at: Instant,
    histogram: Histogram<u64>,
}

/// The window of one series: slots of `slot` each, newest last.
struct Window {
    slots: VecDeque<(Instant, Histogram<u64>)>,
}

/// The merged histograms of every series over the sliding window.
pub struct LatencyWindows {
    window: Duration,
    series: Mutex<BTreeMap<(Subject, Part), Window>>,
}

impl LatencyWindows {
    /// Starts the collector thread, which files what workers hand over; returns the windows and
    /// the sender workers hand over to.
    pub fn start(
        window: Duration,
    ) -> std::io::Result<(Arc<LatencyWindows>, mpsc::Sender<Recorded>)> {
        let windows = Arc::new(LatencyWindows {
            window,
            series: Mutex::new(BTreeMap::new()),
        });
        let (tx, rx) = mpsc::channel::<Recorded>();
        let filing = windows.clone();
        std::thread::Builder::new()
            .name("portcullis-metrics".into())
            .spawn(move || {
                // Ends when every worker's sender is gone.
                for recorded in rx {
                    filing.file(recorded);
                }
            })?;
        Ok((windows, tx))
    }

    fn slot_len(&self) -> Duration {
        self.window / WINDOW_SLOTS
    }

    fn file(&self, r: Recorded) {
        let slot = self.slot_len();
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let w = series.entry((r.subject, r.part)).or_insert_with(|| Window {
            slots: VecDeque::new(),
        });
        match w.slots.back_mut() {
            Some((start, h)) if r.at.duration_since(*start) < slot => {
                let _ = h.add(&r.histogram);
            }
            _ => w.slots.push_back((r.at, r.histogram)),
        }
        while w.slots.len() > WINDOW_SLOTS as usize {
            w.slots.pop_front();
        }
    }

    /// The window covered, for the exposition's help text.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// For every series with samples in the window: its percentiles (in seconds) and the
    /// number of samples.
    pub fn percentiles(&self) -> Vec<(Subject, Part, [f64; QUANTILES.len()], u64)> {
        let now = Instant::now();
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        series.retain(|(subject, part), w| {
            while w
                .slots
                .front()
                .is_some_and(|(start, _)| now.duration_since(*start) > self.window)
            {
                w.slots.pop_front();
            }
            if w.slots.is_empty() {
                return false;
            }
            let mut merged = new_histogram();
            for (_, h) in &w.slots {
                let _ = merged.add(h);
            }
            let quantiles = QUANTILES.map(|q| merged.value_at_quantile(q) as f64 / 1e6);
            out.push((subject.clone(), *part, quantiles, merged.len()));
            true
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_upper_bounds_inclusive() {
        let b = Buckets::default();
        for us in [1, 100, 101, 60_000_000, 60_000_001] {
            b.record(us);
        }
        let counts: Vec<u64> = b.counts.iter().map(LocalCounter::get).collect();
        assert_eq!(counts[0], 2, "1 µs and 100 µs are in le=100µs");
        assert_eq!(counts[1], 1, "101 µs is in le=250µs");
        assert_eq!(counts[BUCKET_BOUNDS_US.len() - 1], 1, "60 s is in le=60s");
        assert_eq!(counts[BUCKET_BOUNDS_US.len()], 1, "beyond 60 s is +Inf");
        assert_eq!(b.sum_us.get(), 1 + 100 + 101 + 60_000_000 + 60_000_001);
    }

    #[test]
    fn percentiles_merge_what_workers_hand_over() {
        let (windows, tx) = LatencyWindows::start(Duration::from_secs(60)).unwrap();
        // Two workers: one sees 900 fast requests, the other 100 slow ones.
        let fast = Series::new(Subject::Route("r".into()), Part::Gateway);
        let slow = Series::new(Subject::Route("r".into()), Part::Gateway);
        for _ in 0..900 {
            fast.record(Duration::from_micros(200));
        }
        for _ in 0..100 {
            slow.record(Duration::from_millis(20));
        }
        fast.hand_over(&tx);
        slow.hand_over(&tx);
        let deadline = Instant::now() + Duration::from_secs(5);
        let found = loop {
            let p = windows.percentiles();
            if p.first().is_some_and(|s| s.3 == 1000) {
                break p;
            }
            assert!(Instant::now() < deadline, "the collector filed nothing");
            std::thread::sleep(Duration::from_millis(5));
        };
        let (_, _, q, n) = &found[0];
        assert_eq!(*n, 1000);
        assert!((q[0] - 0.0002).abs() < 0.000_005, "p50 {}", q[0]);
        assert!((q[2] - 0.020).abs() < 0.000_3, "p99 {}", q[2]);
    }
}
