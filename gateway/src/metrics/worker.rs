//! One worker's metrics: counters the worker alone writes and the scrape reads, kept by stable
//! name (route id, upstream and server, policy name) so a reload keeps counting where it was.
//! The maps are locked when a worker builds a new config generation and when a scrape reads
//! them, never on the request path, which holds the counters themselves.

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    rc::Rc,
    sync::{Arc, Mutex},
};

use super::{
    counter::LocalCounter,
    labels::{AUTH_FAILURES, METHODS, STATUS_CLASSES},
    latency::{Buckets, Part, Recorded, Series, Subject},
};

/// The route label of requests that matched no route (or whose head never parsed).
pub const NO_ROUTE: &str = "(none)";

/// A route's counters in one worker.
#[derive(Debug, Default)]
pub struct RouteCounters {
    /// By method, then status class.
    pub requests: [[LocalCounter; STATUS_CLASSES.len()]; METHODS.len()],
    pub bytes_in: LocalCounter,
    pub bytes_out: LocalCounter,
    pub auth_failures: [LocalCounter; AUTH_FAILURES.len()],
    /// Requests that waited for a concurrency slot, and those refused after waiting.
    pub concurrency_waits: LocalCounter,
    pub concurrency_refusals: LocalCounter,
    /// Rendered rule values dropped because they held CR, LF or NUL.
    pub dropped_values: LocalCounter,
    /// Responses the route's JSON rules passed untouched, by reason (see
    /// [`crate::transform::json_body::JsonSkip::LABELS`]).
    pub json_skips: [LocalCounter; crate::transform::json_body::JsonSkip::LABELS.len()],
}

/// An upstream server's counters in one worker.
#[derive(Debug, Default)]
pub struct ServerCounters {
    pub requests: LocalCounter,
    pub connect_failures: LocalCounter,
    pub timeouts: LocalCounter,
}

/// Which kind of policy refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyKind {
    PreAuthLimit,
    Limit,
    Quota,
}

impl PolicyKind {
    pub fn label(self) -> &'static str {
        match self {
            PolicyKind::PreAuthLimit => "pre_auth_limit",
            PolicyKind::Limit => "limit",
            PolicyKind::Quota => "quota",
        }
    }
}

/// Key of a refusal counter: route id, kind, policy name.
pub type PolicyKey = (String, PolicyKind, String);

/// What the scrape reads of one worker.
#[derive(Default)]
pub struct WorkerCounters {
    pub connections_open: LocalCounter,
    pub connections_idle: LocalCounter,
    /// Idle connections parked outside a task (counted in `connections_idle` too).
    pub connections_parked: LocalCounter,
    /// Connections refused (503, closed) at `max_connections_per_worker`.
    pub connections_refused: LocalCounter,
    /// TLS handshakes that failed, by reason (see [`TLS_FAILURE_REASONS`]).
    pub tls_handshake_failures: [LocalCounter; TLS_FAILURE_REASONS.len()],
    routes: Mutex<BTreeMap<String, Arc<RouteCounters>>>,
    servers: Mutex<BTreeMap<(String, String), Arc<ServerCounters>>>,
    policies: Mutex<BTreeMap<PolicyKey, Arc<LocalCounter>>>,
    buckets: Mutex<BTreeMap<(Subject, Part), Arc<Buckets>>>,
    /// The worker's most refused keys, as last published.
    pub top_refused: Mutex<Vec<super::top_refused::RefusedKey>>,
}

fn get_or_make<K: Ord + Clone, V: Default>(map: &Mutex<BTreeMap<K, Arc<V>>>, key: &K) -> Arc<V> {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = map.get(key) {
        return v.clone();
    }
    let v = Arc::<V>::default();
    map.insert(key.clone(), v.clone());
    v
}

fn snapshot<K: Clone, V>(map: &Mutex<BTreeMap<K, Arc<V>>>) -> Vec<(K, Arc<V>)> {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Why TLS handshakes fail, as counted.
pub const TLS_FAILURE_REASONS: [&str; 9] = [
    "timeout",
    "closed",
    "no_application_protocol",
    "incompatible",
    "invalid_message",
    "no_certificate",
    "bad_certificate",
    "tls_error",
    "io",
];

impl WorkerCounters {
    /// Counts a failed handshake; `reason` is one of [`TLS_FAILURE_REASONS`].
    pub fn tls_handshake_failure(&self, reason: &str) {
        let i = TLS_FAILURE_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(TLS_FAILURE_REASONS.len() - 2);
        self.tls_handshake_failures[i].inc();
    }

    pub fn route(&self, id: &str) -> Arc<RouteCounters> {
        get_or_make(&self.routes, &id.to_owned())
    }

    pub fn server(&self, upstream: &str, server: &str) -> Arc<ServerCounters> {
        get_or_make(&self.servers, &(upstream.to_owned(), server.to_owned()))
    }

    pub fn policy(&self, route: &str, kind: PolicyKind, name: &str) -> Arc<LocalCounter> {
        get_or_make(&self.policies, &(route.to_owned(), kind, name.to_owned()))
    }

    pub fn routes(&self) -> Vec<(String, Arc<RouteCounters>)> {
        snapshot(&self.routes)
    }

    pub fn servers(&self) -> Vec<((String, String), Arc<ServerCounters>)> {
        snapshot(&self.servers)
    }

    pub fn policies(&self) -> Vec<(PolicyKey, Arc<LocalCounter>)> {
        snapshot(&self.policies)
    }

    pub fn buckets(&self) -> Vec<((Subject, Part), Arc<Buckets>)> {
        snapshot(&self.buckets)
    }
}

/// One worker's metrics as its thread holds them: the shared counters, and the latency series
/// (with their worker-local HDR histograms) by subject.
pub struct WorkerMetrics {
    pub counters: Arc<WorkerCounters>,
    /// The most refused keys, written on the refusal path.
    pub top_refused: Rc<super::top_refused::TopRefused>,
    series: RefCell<HashMap<(Subject, Part), Rc<Series>>>,
    collector: std::sync::mpsc::Sender<Recorded>,
}

impl WorkerMetrics {
    pub fn new(
        counters: Arc<WorkerCounters>,
        collector: std::sync::mpsc::Sender<Recorded>,
    ) -> Self {
        WorkerMetrics {
            counters,
            top_refused: Rc::default(),
            series: RefCell::default(),
            collector,
        }
    }

    /// The latency series of `subject` and `part`, made on first use.
    pub fn series(&self, subject: Subject, part: Part) -> Rc<Series> {
        let key = (subject, part);
        if let Some(s) = self.series.borrow().get(&key) {
            return s.clone();
        }
        let series = Rc::new(Series::new(key.0.clone(), part));
        self.counters
            .buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), series.buckets.clone());
        self.series.borrow_mut().insert(key, series.clone());
        series
    }

    /// Hands the histograms recorded since the last call to the collector (once a second, and
    /// when the worker stops).
    pub fn hand_over(&self) {
        for series in self.series.borrow().values() {
            series.hand_over(&self.collector);
        }
        self.top_refused.publish(&self.counters.top_refused);
    }
}
