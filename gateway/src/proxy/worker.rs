//! One worker's per-thread context as the request path sees it: the config generation it
//! serves requests with (taken anew at a request boundary once a reload has published one), its
//! upstream pools, connection registry, token caches and ban reporter. Owned by its thread.

use std::{
    cell::{Cell, RefCell},
    rc::Rc,
    sync::Arc,
};

use super::{
    buffer_pool::BufferPool,
    route_metrics::GenerationMetrics,
    snapshot::{ConfigSnapshot, Published, MIN_CLIENT_BUFFER_BYTES, UPSTREAM_BUFFER_BYTES},
    tracker::ConnTracker,
};
use crate::{upstream::UpstreamGroup, xdp::BanReporter};

/// What one request is served with: a config snapshot and this worker's upstream groups for
/// it. A request holds its generation to the end, so a reload never changes a request midway.
pub struct Generation {
    number: u64,
    pub snapshot: Arc<ConfigSnapshot>,
    /// Indexed like [`crate::routing::RouteTable::upstream_names`].
    pub upstreams: Vec<UpstreamGroup>,
    /// What requests record into, when metrics are on.
    pub metrics: Option<super::route_metrics::GenerationMetrics>,
}

/// One worker's state, owned by its thread.
pub struct Worker {
    pub id: usize,
    published: Arc<Published>,
    current: RefCell<Rc<Generation>>,
    pub tracker: ConnTracker,
    /// Set once this worker saw the drain begin: connections close after their current request.
    pub draining: Cell<bool>,
    /// While draining: whether idle keep-alive connections close at once (stopping) or wait for
    /// one more request to answer with `Connection: close` (after an upgrade).
    pub closes_idle: Cell<bool>,
    /// Where the gateway's own error answers are reported for XDP bans, when configured.
    pub bans: Option<BanReporter>,
    /// JWTs this worker verified, until they expire.
    pub tokens: RefCell<crate::auth::TokenCache>,
    /// Ids for this worker's requests.
    pub request_ids: super::context::RequestIds,
    /// Draws trace and span ids (and access-log samples).
    pub rng: RefCell<fastrand::Rng>,
    /// This worker's counters and latency series, when metrics are on.
    pub metrics: Option<crate::metrics::worker::WorkerMetrics>,
    /// This worker's access-log buffer, when the access log is on.
    pub access_log: Option<crate::access_log::WorkerLog>,
    /// Client read buffers of connections serving a request.
    pub client_buffers: BufferPool,
    /// Head buffers (what the gateway writes) of connections serving a request.
    pub head_buffers: BufferPool,
    /// Upstream read buffers of connections serving a request.
    pub upstream_buffers: BufferPool,
    /// Request contexts of connections serving a request.
    pub contexts: super::context_pool::ContextPool,
    /// Keep-alive connections quiet long enough to wait outside a task.
    pub parking: super::parking::ParkingLot,
}

/// Free buffers of each kind (and request contexts) a worker keeps for its next requests: about the connections it
/// serves at once under load; more are freed when they come back.
const POOLED_BUFFERS: usize = 128;
/// The size of a head buffer.
pub const HEAD_BUFFER_BYTES: usize = 4096;

fn upstream_groups(snapshot: &ConfigSnapshot, previous: Option<&Generation>) -> Vec<UpstreamGroup> {
    snapshot
        .routes
        .upstream_names()
        .iter()
        .map(|name| {
            let config = &snapshot.config.upstreams[name];
            let group = UpstreamGroup::new(name, config, &snapshot.upstream_parts.for_group(name));
            // An unchanged group keeps its pooled connections.
            if let Some(old) = previous.and_then(|p| {
                p.upstreams
                    .iter()
                    .find(|g| g.name == *name && g.config() == config)
            }) {
                group.take_idle_from(old);
            }
            group
        })
        .collect()
}

impl Worker {
    /// The context of worker `id`, serving the snapshot `published` holds now.
    pub fn new(
        id: usize,
        published: Arc<Published>,
        bans: Option<BanReporter>,
        metrics: Option<crate::metrics::worker::WorkerMetrics>,
        access_log: Option<crate::access_log::WorkerLog>,
    ) -> Worker {
        let number = published.generation();
        let snapshot = published.snapshot();
        let upstreams = upstream_groups(&snapshot, None);
        let tokens = RefCell::new(crate::auth::TokenCache::new(&snapshot.config.auth));
        let generation_metrics = metrics
            .as_ref()
            .map(|m| GenerationMetrics::new(&snapshot.routes, &upstreams, m));
        Worker {
            id,
            published,
            current: RefCell::new(Rc::new(Generation {
                number,
                snapshot,
                upstreams,
                metrics: generation_metrics,
            })),
            tracker: ConnTracker::new(metrics.as_ref().map(|m| m.counters.clone())),
            draining: Cell::new(false),
            closes_idle: Cell::new(true),
            bans,
            tokens,
            request_ids: super::context::RequestIds::new(id),
            rng: RefCell::new(fastrand::Rng::new()),
            metrics,
            access_log,
            client_buffers: BufferPool::new(MIN_CLIENT_BUFFER_BYTES, POOLED_BUFFERS),
            head_buffers: BufferPool::new(HEAD_BUFFER_BYTES, POOLED_BUFFERS),
            upstream_buffers: BufferPool::new(UPSTREAM_BUFFER_BYTES, POOLED_BUFFERS),
            contexts: super::context_pool::ContextPool::new(POOLED_BUFFERS),
            parking: super::parking::ParkingLot::default(),
        }
    }

    /// The generation to serve the next request with: the newest snapshot, taken here, at a
    /// request boundary (one atomic load when nothing changed).
    pub fn generation(&self) -> Rc<Generation> {
        let latest = self.published.generation();
        if self.current.borrow().number != latest {
            let snapshot = self.published.snapshot();
            let old = self.current.borrow().clone();
            if !Arc::ptr_eq(&old.snapshot.issuers, &snapshot.issuers) {
                // Tokens verified by issuers that changed must be verified again.
                *self.tokens.borrow_mut() = crate::auth::TokenCache::new(&snapshot.config.auth);
            }
            let upstreams = upstream_groups(&snapshot, Some(&old));
            let metrics = self
                .metrics
                .as_ref()
                .map(|m| GenerationMetrics::new(&snapshot.routes, &upstreams, m));
            *self.current.borrow_mut() = Rc::new(Generation {
                number: latest,
                snapshot,
                upstreams,
                metrics,
            });
        }
        self.current.borrow().clone()
    }

    /// Notes an answer the gateway gave itself (never an upstream's), for the ban hook.
    #[inline]
    pub fn answered(&self, peer: std::net::IpAddr, status: u16) {
        if let Some(b) = &self.bans {
            b.report(peer, status);
        }
    }
}
