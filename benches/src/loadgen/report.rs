//! Results of a load run: the printed summary, a machine-readable line, and the full percentile
//! distribution in the `.hgrm` text format (as wrk2 and HdrHistogram's plotter read it).

use std::{fmt::Write as _, path::Path, time::Duration};

use hdrhistogram::Histogram;

pub struct Summary {
    /// Latencies in microseconds.
    pub histogram: Histogram<u64>,
    pub completed: u64,
    pub errors: u64,
    pub elapsed: Duration,
}

/// Percentiles reported everywhere.
pub const PERCENTILES: [(f64, &str); 6] = [
    (50.0, "p50"),
    (90.0, "p90"),
    (99.0, "p99"),
    (99.9, "p99.9"),
    (99.99, "p99.99"),
    (100.0, "max"),
];

impl Summary {
    pub fn requests_per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile_us(&self, p: f64) -> u64 {
        if p >= 100.0 {
            self.histogram.max()
        } else {
            self.histogram.value_at_quantile(p / 100.0)
        }
    }

    /// A human-readable report.
    pub fn text(&self) -> String {
        let mut s = format!(
            "requests: {} in {:.1}s, {:.0} req/s, errors: {}\nlatency:",
            self.completed,
            self.elapsed.as_secs_f64(),
            self.requests_per_second(),
            self.errors
        );
        for (p, name) in PERCENTILES {
            let _ = write!(s, " {name}={}us", self.percentile_us(p));
        }
        s
    }

    /// One `key=value` line for scripts (`cargo xtask bench` reads it).
    pub fn machine_line(&self) -> String {
        let mut s = format!(
            "summary rps={:.1} completed={} errors={}",
            self.requests_per_second(),
            self.completed,
            self.errors
        );
        for (p, name) in PERCENTILES {
            let _ = write!(s, " {name}_us={}", self.percentile_us(p));
        }
        s
    }
}

/// Writes the percentile distribution (values in milliseconds, as HdrHistogram's tools expect).
pub fn write_hgrm(histogram: &Histogram<u64>, path: &Path) -> std::io::Result<()> {
    let mut out = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    for v in histogram.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let inverse = if q < 1.0 {
            format!("{:.2}", 1.0 / (1.0 - q))
        } else {
            "inf".into()
        };
        let _ = writeln!(
            out,
            "{:12.3} {:14.12} {:10} {:>14}",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            v.count_since_last_iteration(),
            inverse
        );
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]\n#[Max     = {:12.3}, Total count    = {:12}]",
        histogram.mean() / 1000.0,
        histogram.stdev() / 1000.0,
        histogram.max() as f64 / 1000.0,
        histogram.len()
    );
    std::fs::write(path, out)
}
