//! The metric handles one config generation records into, by route and upstream index, so the
//! request path never looks a name up: built when a worker takes a new generation, from its
//! counters kept by name (a reload keeps counting where it was).

use std::{rc::Rc, sync::Arc};

use crate::{
    metrics::{
        counter::LocalCounter,
        latency::{Part, Series, Subject},
        worker::{PolicyKind, RouteCounters, ServerCounters, WorkerMetrics, NO_ROUTE},
    },
    routing::RouteTable,
    upstream::UpstreamGroup,
};

/// One route's handles.
pub struct RouteMetrics {
    pub counters: Arc<RouteCounters>,
    pub gateway_time: Rc<Series>,
    pub upstream_time: Rc<Series>,
    /// Refusal counters, in the order of the route's pre-auth limits, limits and quotas.
    pub pre_auth_limits: Vec<Arc<LocalCounter>>,
    pub limits: Vec<Arc<LocalCounter>>,
    pub quotas: Vec<Arc<LocalCounter>>,
}

/// One upstream group's handles.
pub struct UpstreamMetrics {
    /// By server index.
    pub servers: Vec<Arc<ServerCounters>>,
    pub wait: Rc<Series>,
}

/// Everything a generation records into.
pub struct GenerationMetrics {
    /// By route index.
    pub routes: Vec<RouteMetrics>,
    /// Requests that matched no route (or whose head never parsed).
    pub unrouted: Arc<RouteCounters>,
    /// By upstream group index.
    pub upstreams: Vec<UpstreamMetrics>,
    /// The worker's most refused keys (kept across generations).
    pub top_refused: Rc<crate::metrics::top_refused::TopRefused>,
}

impl GenerationMetrics {
    pub fn new(routes: &RouteTable, upstreams: &[UpstreamGroup], m: &WorkerMetrics) -> Self {
        let counters = &m.counters;
        let routes = (0..routes.len())
            .map(|i| {
                let r = routes.route(i);
                let id = r.id.as_str();
                let policy = |kind, name: &str| counters.policy(id, kind, name);
                RouteMetrics {
                    counters: counters.route(id),
                    gateway_time: m.series(Subject::Route(id.to_owned()), Part::Gateway),
                    upstream_time: m.series(Subject::Route(id.to_owned()), Part::Upstream),
                    pre_auth_limits: r
                        .pre_auth_limits
                        .iter()
                        .map(|l| policy(PolicyKind::PreAuthLimit, &l.name))
                        .collect(),
                    limits: r
                        .limits
                        .iter()
                        .map(|l| policy(PolicyKind::Limit, &l.name))
                        .collect(),
                    quotas: r
                        .quotas
                        .iter()
                        .map(|q| policy(PolicyKind::Quota, &q.name))
                        .collect(),
                }
            })
            .collect();
        let upstreams = upstreams
            .iter()
            .map(|g| UpstreamMetrics {
                servers: (0..g.len())
                    .map(|s| counters.server(&g.name, g.server_label(s)))
                    .collect(),
                wait: m.series(Subject::Upstream(g.name.clone()), Part::Upstream),
            })
            .collect();
        GenerationMetrics {
            routes,
            unrouted: counters.route(NO_ROUTE),
            upstreams,
            top_refused: m.top_refused.clone(),
        }
    }
}
