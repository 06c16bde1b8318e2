//! Counters summed over workers, as the exposition and the admin API's summary read them.

use std::collections::BTreeMap;

use super::{
    labels::{AUTH_FAILURES, METHODS, STATUS_CLASSES},
    Metrics,
};

/// One route's counters over every worker.
#[derive(Debug, Default, Clone)]
pub struct RouteTotals {
    /// By method, then status class.
    pub requests: [[u64; STATUS_CLASSES.len()]; METHODS.len()],
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub auth_failures: [u64; AUTH_FAILURES.len()],
    pub concurrency_waits: u64,
    pub concurrency_refusals: u64,
    pub dropped_values: u64,
    pub json_skips: [u64; crate::transform::json_body::JsonSkip::LABELS.len()],
}

impl RouteTotals {
    /// Requests of every method with a status of class `class` (an index of
    /// [`STATUS_CLASSES`]).
    pub fn of_class(&self, class: usize) -> u64 {
        self.requests.iter().map(|row| row[class]).sum()
    }

    pub fn all(&self) -> u64 {
        self.requests.iter().flatten().sum()
    }
}

/// Every route's totals, by route id.
pub fn routes(metrics: &Metrics) -> BTreeMap<String, RouteTotals> {
    let mut out: BTreeMap<String, RouteTotals> = BTreeMap::new();
    for (_, worker) in metrics.workers() {
        for (route, r) in worker.routes() {
            let t = out.entry(route).or_default();
            for (m, row) in r.requests.iter().enumerate() {
                for (s, n) in row.iter().enumerate() {
                    t.requests[m][s] += n.get();
                }
            }
            t.bytes_in += r.bytes_in.get();
            t.bytes_out += r.bytes_out.get();
            for (i, n) in r.auth_failures.iter().enumerate() {
                t.auth_failures[i] += n.get();
            }
            t.concurrency_waits += r.concurrency_waits.get();
            t.concurrency_refusals += r.concurrency_refusals.get();
            t.dropped_values += r.dropped_values.get();
            for (i, n) in r.json_skips.iter().enumerate() {
                t.json_skips[i] += n.get();
            }
        }
    }
    out
}

/// Every upstream server's (requests, connect failures, timeouts), by (upstream, server).
pub fn servers(metrics: &Metrics) -> BTreeMap<(String, String), (u64, u64, u64)> {
    let mut out: BTreeMap<(String, String), (u64, u64, u64)> = BTreeMap::new();
    for (_, worker) in metrics.workers() {
        for (key, c) in worker.servers() {
            let e = out.entry(key).or_default();
            e.0 += c.requests.get();
            e.1 += c.connect_failures.get();
            e.2 += c.timeouts.get();
        }
    }
    out
}
