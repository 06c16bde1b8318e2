//! One client connection: read a request head, plan it, answer or forward it, and repeat while
//! keep-alive allows. Requests on a connection are handled strictly one after another, so
//! pipelined requests are answered in order.

use std::{mem::take, net::SocketAddr, rc::Rc, time::Duration};

use tokio::time::Instant;
use tracing::debug;

use super::{
    answer::{Answer, TrafficPolicy},
    body::{relay_request_body, BodyDeadlines},
    context::{Outcome, RequestContext, RequestFacts},
    context_pool::{ConnectionFacts, ContextSlot},
    parking::Parked,
    phase::{self, Exit, Forward},
};
use crate::{
    auth::AuthError,
    config::MAX_HEADERS_CEILING,
    http::{
        encode,
        request::{incomplete_head_error, parse_request, RequestHead},
        BodyFraming, Version,
    },
    io::{read_before, readable_unless, write_before, IoFailure, Readable, Transport},
    proxy::{
        snapshot::UPSTREAM_BUFFER_BYTES,
        tracker::ConnHandle,
        worker::{Generation, Worker, HEAD_BUFFER_BYTES},
    },
    quotas::QuotaCharges,
    routing::Action,
};

/// Largest request body the gateway reads and discards to keep a connection open after
/// answering itself; a larger one closes the connection instead.
pub const DRAIN_LIMIT_BYTES: u64 = 64 * 1024;
/// The write buffer a connection keeps after an answer from the cache larger than this.
const KEPT_ANSWER_BUFFER_BYTES: usize = 64 * 1024;
/// What an idle TLS connection reads the start of its next request into (nginx's
/// `client_header_buffer_size`): most request heads fit; a longer one continues in the full
/// buffer. Plain TCP connections wait with no buffer at all.
const IDLE_READ_BYTES: usize = 1024;
/// How many times in a row an idle socket may report readable with nothing to read before the
/// connection is given up (the kernel does not do that; the bound keeps a loop finite).
const MAX_SPURIOUS_WAKEUPS: usize = 16;
/// After the last response on a connection, how long to keep reading (and discarding) what the
/// client still sends, so closing does not reset the connection before it read the response.
const LINGER: Duration = Duration::from_millis(500);
/// Reads made while lingering, at most.
const LINGER_READS: usize = 8;
/// How often a request waiting for an issuer's keys to be fetched again looks.
const KEY_REFETCH_POLL: Duration = Duration::from_millis(20);
/// How often a request queued for a concurrency slot looks again.
const CONCURRENCY_POLL: Duration = Duration::from_millis(2);

/// What the request head in the buffer says to do next.
enum HeadStep {
    /// Not whole yet: read on.
    Incomplete,
    /// Answer at once, by this deadline.
    Answer(Answer, Instant),
    /// Wait for the signing keys of this issuer, then decode again.
    AwaitKeys(usize),
    /// Serve a consumer's own request (its key, its usage).
    SelfService(Option<SelfServiceRequest>, Instant),
    /// Read the body whole (this many bytes with the head), then decode again.
    AwaitBody(usize, Instant),
    /// Forward, or answer what the phases decided.
    Run(Result<Forward, Exit>, Instant),
}

/// What happens to the connection after a request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Wait for the next request.
    KeepAlive,
    /// Send what is pending, then close gently.
    Close,
    /// The client is gone or the connection is unusable: drop it.
    Abort,
}

pub(super) struct Connection<'w, C: Transport> {
    pub(super) client: C,
    pub(super) peer: SocketAddr,
    pub(super) worker: &'w Worker,
    handle: &'w ConnHandle<'w>,
    /// Bytes read from the client; holds at least one whole request head. From the worker's
    /// pool while a request is served; empty, with no capacity, while the connection idles.
    pub(super) inbuf: Vec<u8>,
    /// What an idle TLS connection reads into (allocated on first use): small, so idling
    /// costs little memory; what it reads moves to `inbuf` when a request begins.
    idle_buf: Vec<u8>,
    /// Heads the gateway writes, to either side.
    pub(super) out: Vec<u8>,
    /// Bytes read from the upstream.
    pub(super) upbuf: Vec<u8>,
    /// The current request's normalised path and host.
    pub(super) normalized: Vec<u8>,
    /// The config generation the current request is served with.
    pub(super) generation: Rc<Generation>,
    /// The current request's context, reset for each request; from the worker's pool while a
    /// request is served, back in it while the connection idles.
    pub(super) ctx: ContextSlot,
    /// What every request's context takes from the connection.
    facts: ConnectionFacts,
}

/// Where serving a connection begins.
pub enum Start<'a> {
    /// Just accepted, with the bytes already read from the client (after a PROXY protocol
    /// header).
    Accepted(&'a [u8]),
    /// Back from the parking lot, reported readable: the connection was accepted at
    /// `accepted` and closes at `deadline` if no request begins.
    Resumed {
        accepted: Instant,
        deadline: Instant,
    },
}

/// How waiting for a request ended other than with its first bytes.
enum Quiet {
    /// End the connection this way.
    End(Next),
    /// Quiet long enough to park (see [`super::parking::PARK_AFTER`]): park it, to close at
    /// this deadline.
    Park(Instant),
}

/// Serves a client connection until it closes, or until it is quiet long enough to park
/// (then it is returned, to wait in the worker's [`super::parking::ParkingLot`]).
/// `client_cert`: the certificate the TLS handshake verified, if any.
///
/// A plain function returning the connection's future, not an `async fn`: an `async fn`
/// keeps its arguments in its state beside what it builds from them (rust-lang/rust#62958),
/// and this future is the largest part of what every idle connection holds. Built here, the
/// connection is the future's only capture.
pub fn serve<'w, C: Transport + 'w>(
    client: C,
    peer: SocketAddr,
    worker: &'w Worker,
    handle: &'w ConnHandle<'w>,
    start: Start<'_>,
    client_cert: Option<std::rc::Rc<super::context::ClientCert>>,
) -> impl std::future::Future<Output = Option<Parked<C>>> + 'w {
    let https = client.is_tls();
    let (accepted, mut resumed) = match start {
        Start::Accepted(_) => (Instant::now(), None),
        Start::Resumed { accepted, deadline } => (accepted, Some(deadline)),
    };
    let mut conn = Connection {
        client,
        peer,
        worker,
        handle,
        inbuf: Vec::new(),
        idle_buf: Vec::new(),
        out: Vec::new(),
        upbuf: Vec::new(),
        normalized: Vec::new(),
        generation: worker.generation(),
        ctx: ContextSlot::default(),
        facts: ConnectionFacts {
            accepted,
            https,
            client_cert,
        },
    };
    if let Start::Accepted(initial) = start {
        if !initial.is_empty() {
            conn.take_buffers();
            conn.inbuf.reserve(initial.len() + 1);
            conn.inbuf.extend_from_slice(initial);
        }
    }
    async move {
        let mut first = resumed.is_none();
        loop {
            if conn.inbuf.is_empty() {
                match conn.await_request(first, resumed.take()).await {
                    Ok(()) => {}
                    Err(Quiet::Park(deadline)) => {
                        return Some(Parked {
                            client: conn.client,
                            peer: conn.peer,
                            accepted: conn.facts.accepted,
                            deadline,
                        })
                    }
                    Err(Quiet::End(Next::Close)) => {
                        // Boxed (once per connection) so the idle task is not sized for it.
                        Box::pin(conn.linger()).await;
                        return None;
                    }
                    Err(Quiet::End(_)) => return None,
                }
            }
            // The request's own state (parsed fields, the exchange with the upstream: tens of
            // KiB) lives in its own allocation, freed when it ends, so an idle connection holds
            // only what it needs to wait.
            let next = Box::pin(conn.serve_one()).await;
            // A large body read whole (a vault route) leaves a large buffer: give it back.
            let keep = conn.generation.snapshot.client_buffer_bytes;
            if conn.inbuf.capacity() > keep.saturating_mul(4) && conn.inbuf.len() <= keep {
                conn.inbuf.shrink_to(keep);
            }
            match next {
                Next::KeepAlive => first = false,
                Next::Close => {
                    Box::pin(conn.linger()).await;
                    return None;
                }
                Next::Abort => return None,
            }
        }
    }
}

impl<C: Transport> Connection<'_, C> {
    /// One request, from waiting for its head to the log phase.
    async fn serve_one(&mut self) -> Next {
        let _in_flight = crate::io::RequestInFlight::new();
        // A context from the worker's pool was reset when it went back; only one kept for a
        // pipelined request still holds the last request's state.
        if self.ctx.started() {
            self.ctx.reset();
        }
        let next = self.exchange().await;
        // The exchange is over: the server no longer has the request in flight.
        self.ctx.server_load = None;
        if self.ctx.started() {
            let generation = self.generation.clone();
            phase::log::finish(&mut self.ctx, &generation, self.worker, self.peer);
        }
        next
    }

    /// Reads the rest of a request head (its first bytes are in `inbuf`), runs the request
    /// phases, then answers or forwards.
    async fn exchange(&mut self) -> Next {
        let worker = self.worker;
        let mut may_await_keys = true;
        let (flow, request_deadline) = loop {
            if !self.inbuf.is_empty() {
                if self.ctx.timings.head_started.is_none() {
                    // A request begins: take the newest config (a connection may have idled
                    // across reloads); this request keeps it to the end.
                    self.generation = worker.generation();
                    self.take_buffers();
                    self.ctx.timings.head_started = Some(Instant::now());
                    self.ctx.id = worker.request_ids.next();
                    let id = self.ctx.id;
                    self.ctx.correlation.assign(id);
                    add_hsts(self.handle, &mut self.ctx.correlation);
                }
                match self.decode_head(may_await_keys) {
                    HeadStep::Incomplete => {}
                    HeadStep::Answer(answer, deadline) => {
                        return self.answer(answer, deadline).await
                    }
                    HeadStep::AwaitKeys(issuer) => {
                        // The head stays in the buffer: wait for the keys, then run the
                        // phases again.
                        may_await_keys = false;
                        self.await_keys(issuer).await;
                        continue;
                    }
                    HeadStep::SelfService(request, deadline) => {
                        return self.self_service(request, deadline).await;
                    }
                    HeadStep::AwaitBody(total, deadline) => {
                        if let Err(answer) = self.buffer_body(total, deadline).await {
                            return match answer {
                                Some(answer) => self.answer(answer, deadline).await,
                                None => Next::Abort,
                            };
                        }
                        continue;
                    }
                    HeadStep::Run(flow, deadline) => break (flow, deadline),
                }
            }
            // The head is not whole yet ([`Self::await_request`] waited for its start).
            let started = self.ctx.timings.head_started.unwrap_or_else(Instant::now);
            let deadline = started + self.generation.snapshot.server().header_timeout.get();
            let (res, buf) = read_before(&self.client, take(&mut self.inbuf), deadline).await;
            self.inbuf = buf;
            match res {
                Ok(0) => return Next::Abort,
                Ok(_) => {}
                Err(e) => {
                    debug!(peer = %self.peer, error = %e, "client connection ended in a request head");
                    return Next::Abort;
                }
            }
        };
        let Forward {
            group,
            server,
            in_flight,
            strip,
            rewrite_json_body,
        } = match flow {
            Ok(forward) => forward,
            Err(Exit::Answer(answer)) => return self.answer(answer, request_deadline).await,
            Err(Exit::AwaitKeys(_) | Exit::AwaitBody(_) | Exit::SelfService) => {
                unreachable!("handled in the loop above")
            }
        };
        if rewrite_json_body {
            if let Err(answer) = self
                .rewrite_json_request(group, server, strip, request_deadline)
                .await
            {
                return match answer {
                    Some(answer) => self.answer(answer, request_deadline).await,
                    None => Next::Abort,
                };
            }
        }
        if let Some(answer) = self.shared_vault_admission().await {
            return self.answer(answer, request_deadline).await;
        }
        if let Some(answer) = self.await_cache_fill().await {
            return self.answer(answer, request_deadline).await;
        }
        if let Some(next) = self
            .serve_stale_and_refresh(group, server, request_deadline)
            .await
        {
            return next;
        }
        let Some(counter) = in_flight else {
            return self.forward(group, server, strip, request_deadline).await;
        };
        let generation = self.generation.clone();
        let snapshot = &*generation.snapshot;
        let route = self.ctx.route.expect("the route phase ran");
        let Some(limit) = &snapshot.routes.route(route).concurrency else {
            unreachable!("in_flight is set only for routes with a concurrency limit");
        };
        let Some(_slot) = self.concurrency_slot(limit, &counter).await else {
            let answer = Answer::error(503, "too many requests in flight for this route");
            return self.answer(answer, request_deadline).await;
        };
        self.forward(group, server, strip, request_deadline).await
    }

    /// With `[cluster]`, a vault request reserves in the shared counters too, after the host's
    /// own ledger let it through; refused there, it is answered as over its budget or limit.
    async fn shared_vault_admission(&mut self) -> Option<Answer> {
        use crate::vault::{
            cluster_ledger::{Measure, SharedAnswer},
            provider::VaultRefusal,
        };
        if self.ctx.vault.as_ref()?.shared_claim.is_empty() {
            return None;
        }
        let generation = self.generation.clone();
        let vault = generation.snapshot.vault.as_ref()?;
        let cluster = vault.cluster.as_ref()?;
        let request = self.ctx.vault.as_mut()?;
        let claim = std::mem::take(&mut request.shared_claim);
        let (answer, reservation) = cluster.ledger.reserve(claim).await;
        let refusal = match answer {
            SharedAnswer::Reserved | SharedAnswer::Unavailable => {
                request.shared = reservation;
                return None;
            }
            SharedAnswer::Refused(Measure::Spend) => VaultRefusal::BudgetExceeded,
            SharedAnswer::Refused(Measure::Requests | Measure::Tokens) => VaultRefusal::RateLimited,
        };
        let Some(crate::proxy::context::Caller::Virtual(caller)) = &self.ctx.caller else {
            return None;
        };
        vault.refusals[refusal.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(Answer::Vault {
            kind: caller.kind,
            refusal,
        })
    }

    /// A miss whose key another request is filling waits for it (up to the route's
    /// `lock_timeout`), then answers from what it stored, or goes upstream itself.
    async fn await_cache_fill(&mut self) -> Option<Answer> {
        let fill = self.ctx.cache.as_mut()?.wait.take()?;
        let limit = self.ctx.cache.as_ref()?.lock_timeout;
        fill.wait(limit).await;
        let generation = self.generation.clone();
        let cache = &generation.snapshot.cache;
        let head = &self.inbuf[..self.ctx.facts.head_len.min(self.inbuf.len())];
        let state = self.ctx.cache.as_mut()?;
        crate::cache::record::with_request_fields(head, |fields| {
            phase::cache_lookup::after_wait(cache, state, fields)
        })
        .err()
    }

    /// A slot of `limit`, waiting up to its queue timeout (without blocking the worker).
    async fn concurrency_slot(
        &self,
        limit: &crate::limits::ConcurrencyLimit,
        counter: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> Option<crate::limits::ConcurrencySlot> {
        if let Some(slot) = limit.try_acquire(counter) {
            return Some(slot);
        }
        let metrics = self.generation.metrics.as_ref().zip(self.ctx.route);
        let route_counters = metrics.map(|(m, r)| m.routes[r].counters.clone());
        if let Some(c) = &route_counters {
            c.concurrency_waits.inc();
        }
        let deadline = Instant::now() + limit.queue_timeout;
        while Instant::now() < deadline {
            tokio::time::sleep(CONCURRENCY_POLL).await;
            if let Some(slot) = limit.try_acquire(counter) {
                return Some(slot);
            }
        }
        if let Some(c) = &route_counters {
            c.concurrency_refusals.inc();
        }
        None
    }

    /// Asks issuer `issuer` to fetch its keys again and waits, without blocking the worker,
    /// until that fetch has run, for at most the issuer's `unknown_kid_wait`. When the next
    /// allowed refetch is further away than that, returns at once (the token is then refused).
    /// Reads until the buffer holds `total` bytes of head and body (a phase judges the body
    /// whole), saying 100 Continue first to a client that waits for it. `Err(None)`: the
    /// client left; `Err(Some(answer))`: the answer to give.
    pub(super) async fn buffer_body(
        &mut self,
        total: usize,
        deadline: Instant,
    ) -> Result<(), Option<Answer>> {
        let facts = self.ctx.facts;
        if facts.expect_continue
            && self.inbuf.len() == facts.head_len
            && facts.version == crate::http::Version::Http11
        {
            self.out.clear();
            self.out.extend_from_slice(encode::CONTINUE);
            if !self.send_out().await {
                return Err(None);
            }
        }
        if self.inbuf.capacity() < total {
            self.inbuf.reserve(total - self.inbuf.len());
        }
        let idle = self.generation.snapshot.server().body_timeout.get();
        while self.inbuf.len() < total {
            let until = deadline.min(Instant::now() + idle);
            let (res, buf) = read_before(&self.client, take(&mut self.inbuf), until).await;
            self.inbuf = buf;
            match res {
                Ok(0) => return Err(None),
                Ok(_) => {}
                Err(crate::io::IoFailure::TimedOut) => {
                    return Err(Some(Answer::error_and_close(
                        408,
                        "request body not received in time",
                    )))
                }
                Err(e) => {
                    debug!(peer = %self.peer, error = %e, "client left while sending a body");
                    return Err(None);
                }
            }
        }
        Ok(())
    }

    /// Runs a self-service request on a blocking thread (it writes the store, and a
    /// revocation waits for the workers) and answers with its JSON.
    async fn self_service(
        &mut self,
        request: Option<SelfServiceRequest>,
        deadline: Instant,
    ) -> Next {
        let Some(request) = request else {
            let answer = Answer::error(413, "self-service request body too large");
            return self.answer(answer, deadline).await;
        };
        let snapshot = self.generation.snapshot.clone();
        let done = tokio::task::spawn_blocking(move || {
            let (Some(vault), Some(config)) = (&snapshot.vault, &snapshot.config.vault) else {
                return (
                    404,
                    serde_json::json!({ "error": { "message": "no [vault]" } }),
                );
            };
            crate::vault::self_service::handle(
                vault,
                &config.self_service,
                config.rotation_grace.get(),
                &request.consumer,
                &request.method,
                &request.rest,
                &request.body,
            )
        })
        .await;
        let (status, body) = done.unwrap_or_else(|_| {
            (
                500,
                serde_json::json!({ "error": { "message": "self-service failed" } }),
            )
        });
        self.ctx.answer_body = serde_json::to_vec(&body).unwrap_or_default();
        self.answer(Answer::SelfService { status }, deadline).await
    }

    async fn await_keys(&self, issuer: usize) {
        let issuers = &self.generation.snapshot.issuers;
        let keys = issuers.keys(issuer);
        let wait = issuers.config(issuer).unknown_kid_wait.get();
        let asked = crate::sys::monotonic_ns();
        // Judged before asking: the fetcher, once asked, pushes the next allowed refetch out by
        // the minimum gap at once, and judging after would see that and give up on the very
        // fetch it asked for.
        let in_time = keys.refetch_delay() <= wait;
        keys.request_refetch();
        if !in_time {
            return;
        }
        let done = || {
            keys.last_fetch_started_ns
                .load(std::sync::atomic::Ordering::Acquire)
                >= asked
        };
        let deadline = Instant::now() + wait;
        while !done() && Instant::now() < deadline {
            tokio::time::sleep(KEY_REFETCH_POLL).await;
        }
    }

    /// The one exit for the gateway's own answers (a refusal by any phase, an error, a
    /// `respond` route): skips the request body when it is small enough, else closes after the
    /// answer, and records the answer in the context for the log phase.
    pub(super) async fn answer(&mut self, answer: Answer, request_deadline: Instant) -> Next {
        let facts = self.ctx.facts;
        let must_close = matches!(answer, Answer::Error { close: true, .. });
        let mut keep_alive = facts.keep_alive && !must_close && !self.winding_down();
        let mut consumed = facts.head_len;
        let has_body = !matches!(facts.body, BodyFraming::None | BodyFraming::Length(0));
        if has_body {
            let small_enough = match facts.body {
                BodyFraming::Length(n) => n <= DRAIN_LIMIT_BYTES,
                _ => true,
            };
            // With Expect: 100-continue the client may never send the body: do not wait for it.
            if keep_alive && small_enough && !facts.expect_continue {
                let deadlines = self.body_deadlines(request_deadline);
                let (res, buf) = relay_request_body::<C, crate::upstream::UpstreamTransport>(
                    &self.client,
                    None,
                    take(&mut self.inbuf),
                    facts.head_len,
                    facts.body,
                    Some(DRAIN_LIMIT_BYTES),
                    deadlines,
                )
                .await;
                self.inbuf = buf;
                match res {
                    Ok(end) => consumed = end,
                    Err(e) => {
                        debug!(peer = %self.peer, error = ?e, "could not skip a request body");
                        keep_alive = false;
                    }
                }
            } else {
                keep_alive = false;
            }
        }
        self.out.clear();
        let snapshot = &self.generation.snapshot;
        let json_errors = self
            .ctx
            .route
            .and_then(|r| snapshot.routes.route(r).error_format)
            .unwrap_or(snapshot.server().error_format)
            == crate::config::ErrorFormat::Json;
        // The explanation of an answer, in the route's (or the server's) format.
        let explain = |body: &'_ mut Vec<u8>, status: u16, text: &'static str, id: &[u8]| {
            if json_errors {
                super::error_body::render(body, status, text, id);
            }
            json_errors
        };
        // A cached body may be large: the buffer is not kept that large for an idle connection.
        let mut large_answer = false;
        let status = match answer {
            Answer::Error { status, detail, .. } => {
                let ctx = &mut *self.ctx;
                let json = explain(
                    &mut ctx.answer_body,
                    status,
                    detail,
                    ctx.correlation.request_id(),
                );
                encode::write_error(
                    &mut self.out,
                    status,
                    explanation(json, &self.ctx.answer_body, detail),
                    keep_alive,
                    facts.is_head,
                    &self.ctx.correlation.response_fields,
                );
                status
            }
            Answer::TooMany {
                route,
                policy,
                retry_after_secs,
                ..
            } => {
                let r = snapshot.routes.route(route);
                let fields = r.rate_limit_headers.then(|| match policy {
                    TrafficPolicy::PreAuthLimit(i) => (
                        r.pre_auth_limits[i].name.as_str(),
                        r.pre_auth_limits[i].quota,
                        r.pre_auth_limits[i].window.as_secs().max(1),
                    ),
                    TrafficPolicy::Limit(i) => (
                        r.limits[i].name.as_str(),
                        r.limits[i].quota,
                        r.limits[i].window.as_secs().max(1),
                    ),
                    TrafficPolicy::Quota(i) => (
                        r.quotas[i].name.as_str(),
                        r.quotas[i].limit,
                        r.quotas[i].window_secs(),
                    ),
                });
                let detail = "rate limit exceeded";
                let ctx = &mut *self.ctx;
                let json = explain(
                    &mut ctx.answer_body,
                    429,
                    detail,
                    ctx.correlation.request_id(),
                );
                encode::write_rate_limited(
                    &mut self.out,
                    retry_after_secs,
                    fields,
                    explanation(json, &self.ctx.answer_body, detail),
                    keep_alive,
                    facts.is_head,
                    &self.ctx.correlation.response_fields,
                );
                429
            }
            Answer::Denied(e) => {
                let realm = &snapshot.config.auth.realm;
                let challenge = match e {
                    AuthError::Missing => Some(format!("Bearer realm=\"{realm}\"")),
                    AuthError::Invalid => {
                        Some(format!("Bearer realm=\"{realm}\", error=\"invalid_token\""))
                    }
                    AuthError::Forbidden => None,
                };
                let ctx = &mut *self.ctx;
                let json = explain(
                    &mut ctx.answer_body,
                    e.status(),
                    e.detail(),
                    ctx.correlation.request_id(),
                );
                encode::write_denied(
                    &mut self.out,
                    e.status(),
                    challenge.as_deref(),
                    explanation(json, &self.ctx.answer_body, e.detail()),
                    keep_alive,
                    facts.is_head,
                    &self.ctx.correlation.response_fields,
                );
                e.status()
            }
            Answer::Vault { kind, refusal } => {
                let body = crate::vault::provider::error_body(kind, refusal);
                encode::write_json(
                    &mut self.out,
                    refusal.status(),
                    &body,
                    keep_alive,
                    facts.is_head,
                    &self.ctx.correlation.response_fields,
                );
                refusal.status()
            }
            Answer::SelfService { status } => {
                let body = std::str::from_utf8(&self.ctx.answer_body).unwrap_or("{}");
                encode::write_json(
                    &mut self.out,
                    status,
                    body,
                    keep_alive,
                    facts.is_head,
                    &self.ctx.correlation.response_fields,
                );
                status
            }
            Answer::Cached => {
                let Some(entry) = self.ctx.cache.as_ref().and_then(|s| s.entry.clone()) else {
                    unreachable!("the cache phase sets its entry before answering");
                };
                // The route's response rules and CORS apply to a hit as to a miss.
                let route = self.ctx.route.map(|r| snapshot.routes.route(r));
                let mark = self.ctx.correlation.response_fields.len();
                if let Some(route) = route {
                    super::json_exchange::add_rule_fields(
                        &mut self.ctx,
                        snapshot,
                        &self.inbuf,
                        &mut self.normalized,
                        self.peer.ip(),
                        route,
                        crate::cache::serve::field_names(&entry),
                    );
                }
                let Some(state) = &self.ctx.cache else {
                    unreachable!("the cache phase sets its state before answering");
                };
                let fate = |name: &str| super::json_exchange::response_fate(route, name);
                let params = crate::cache::serve::ServeParams {
                    fate: &fate,
                    status: state.status,
                    status_field: &snapshot.config.cache.status_header,
                    age_secs: entry.age(std::time::Instant::now()).as_secs(),
                    keep_alive,
                    http10: facts.version == crate::http::Version::Http10,
                    head_only: facts.is_head,
                    range: state.range,
                    extra: &self.ctx.correlation.response_fields,
                };
                let head = &self.inbuf[..facts.head_len.min(self.inbuf.len())];
                let out = &mut self.out;
                let status = crate::cache::record::with_request_fields(head, |fields| {
                    crate::cache::serve::write(out, &entry, fields, params)
                });
                self.ctx.correlation.response_fields.truncate(mark);
                // A hit is the service: the request's quotas count.
                self.ctx.charges = QuotaCharges::default();
                large_answer = true;
                status
            }
            Answer::Preflight => {
                encode::write_no_content(
                    &mut self.out,
                    keep_alive,
                    &self.ctx.correlation.response_fields,
                );
                204
            }
            Answer::RedirectHttps => {
                encode::write_redirect(
                    &mut self.out,
                    &self.ctx.redirect_location,
                    keep_alive,
                    facts.is_head,
                    &self.ctx.correlation.response_fields,
                );
                308
            }
            Answer::Static { route } => {
                let Action::Respond(response) = &snapshot.routes.route(route).action else {
                    unreachable!("Answer::Static is planned only for respond routes");
                };
                encode::write_static(
                    &mut self.out,
                    response,
                    keep_alive,
                    facts.version,
                    facts.is_head,
                    &self.ctx.correlation.response_fields,
                );
                // The route's answer is the service: its quotas count.
                self.ctx.charges = QuotaCharges::default();
                response.status
            }
        };
        self.ctx.status = status;
        self.ctx.outcome = Outcome::Answered(answer);
        self.ctx.bytes_in = self.ctx.bytes_in.max(consumed as u64);
        let sent = self.send_out().await;
        if large_answer && self.out.capacity() > KEPT_ANSWER_BUFFER_BYTES {
            self.out = Vec::with_capacity(KEPT_ANSWER_BUFFER_BYTES);
        }
        if !sent {
            return Next::Abort;
        }
        if keep_alive {
            self.inbuf.drain(..consumed);
            Next::KeepAlive
        } else {
            Next::Close
        }
    }

    /// True while every answer must say `Connection: close`: the worker is draining, or a
    /// reload removed the address this connection was accepted on.
    pub(super) fn winding_down(&self) -> bool {
        self.worker.draining.get() || self.handle.listener_removed()
    }

    /// Writes `self.out` to the client; false when the client is gone.
    pub(super) async fn send_out(&mut self) -> bool {
        let len = self.out.len();
        let (res, out) = write_before(
            &self.client,
            take(&mut self.out),
            0..len,
            self.client_write_deadline(),
        )
        .await;
        self.out = out;
        match &res {
            Ok(()) => self.ctx.bytes_out += len as u64,
            Err(e) => debug!(peer = %self.peer, error = %e, "could not write to client"),
        }
        res.is_ok()
    }

    pub(super) fn client_write_deadline(&self) -> Instant {
        Instant::now() + self.generation.snapshot.server().body_timeout.get()
    }

    pub(super) fn body_deadlines(&self, request_deadline: Instant) -> BodyDeadlines {
        BodyDeadlines {
            idle: self.generation.snapshot.server().body_timeout.get(),
            request: request_deadline,
            upstream_write: self.generation.snapshot.server().body_timeout.get(),
        }
    }

    /// Decodes the request head in `inbuf` and runs the request phases on it: what to do next.
    /// Not async, so the parsed fields (a stack array of up to `MAX_HEADERS_CEILING`) are not
    /// part of the connection's future.
    fn decode_head(&mut self, may_await_keys: bool) -> HeadStep {
        let worker = self.worker;
        let started = self.ctx.timings.head_started.unwrap_or_else(Instant::now);
        let generation = self.generation.clone();
        let snapshot = &*generation.snapshot;
        let server = snapshot.server();
        let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS_CEILING];
        match parse_request(
            &self.inbuf,
            &mut headers,
            &snapshot.limits,
            &mut self.normalized,
        ) {
            Ok(Some(req)) => {
                if !self.ctx.head_parsed {
                    self.ctx.head_parsed = true;
                    let id = self.ctx.id;
                    self.ctx.correlation.begin(
                        &req,
                        server.trust_request_id,
                        id,
                        &mut worker.rng.borrow_mut(),
                    );
                    add_hsts(self.handle, &mut self.ctx.correlation);
                    if let Some(log) = &worker.access_log {
                        phase::log::note_request(
                            &mut self.ctx,
                            &req,
                            log.include_query,
                            snapshot.config.auth.api_key_query.as_deref(),
                        );
                    }
                }
                if let Some(port) = self.handle.listener().redirect_https {
                    // A redirecting listener answers everything itself.
                    let answer = redirect_location(&mut self.ctx.redirect_location, &req, port);
                    return HeadStep::Run(
                        Err(Exit::Answer(answer)),
                        started + server.request_timeout.get(),
                    );
                }
                self.ctx.facts = RequestFacts::of(&req);
                self.ctx.method = crate::metrics::labels::method_index(req.method);
                let flow = phase::run(
                    &req,
                    &self.inbuf[req.head_len..],
                    self.peer.ip(),
                    worker,
                    &generation,
                    &mut self.ctx,
                    &mut self.out,
                    may_await_keys,
                );
                let deadline = started + server.request_timeout.get();
                match flow {
                    Err(Exit::AwaitKeys(issuer)) => HeadStep::AwaitKeys(issuer),
                    Err(Exit::SelfService) => HeadStep::SelfService(
                        self_service_request(&req, &self.inbuf, &self.ctx, snapshot),
                        deadline,
                    ),
                    Err(Exit::AwaitBody(total)) => HeadStep::AwaitBody(total, deadline),
                    flow => HeadStep::Run(flow, deadline),
                }
            }
            Ok(None) => match incomplete_head_error(&self.inbuf, &snapshot.limits) {
                Some(e) => HeadStep::Answer(
                    Answer::error_and_close(e.status(), e.detail()),
                    Instant::now(),
                ),
                None => HeadStep::Incomplete,
            },
            Err(e) => HeadStep::Answer(
                Answer::error_and_close(e.status(), e.detail()),
                Instant::now(),
            ),
        }
    }

    /// Waits for the first bytes of the next request (the first one's for `first`; for a
    /// connection just back from parking, `resumed` is its deadline). The large buffers go
    /// back to the worker's pools first; plain TCP then waits holding no buffer, TLS with the
    /// small idle one.
    async fn await_request(&mut self, first: bool, resumed: Option<Instant>) -> Result<(), Quiet> {
        let worker = self.worker;
        if worker.draining.get() && worker.closes_idle.get() {
            return Err(Quiet::End(Next::Close));
        }
        self.give_buffers();
        let deadline = resumed.unwrap_or_else(|| {
            let generation = worker.generation();
            let server = generation.snapshot.server();
            Instant::now()
                + if first {
                    server.header_timeout.get()
                } else {
                    server.keepalive_timeout.get()
                }
        });
        self.handle.set_idle(true);
        let outcome = match self.client.unbuffered_fd() {
            Some(fd) => {
                self.await_bytes_unbuffered(fd, deadline, resumed.is_some())
                    .await
            }
            // Boxed: a TLS connection's wait is a read whose future would otherwise size every
            // plain connection's idle task too.
            None => Box::pin(self.await_bytes_buffered(deadline))
                .await
                .map(Some),
        };
        let outcome = match outcome {
            // Parked, the connection stays idle for the tracker (a drain closes it).
            Ok(None) => return Err(Quiet::Park(deadline)),
            Ok(Some(n)) => Ok(n),
            Err(e) => Err(e),
        };
        self.handle.set_idle(false);
        match outcome {
            Ok(0) => Err(Quiet::End(Next::Abort)),
            Ok(_) => Ok(()),
            Err(e) => {
                debug!(peer = %self.peer, error = %e, "client connection ended while waiting for a request");
                Err(Quiet::End(Next::Abort))
            }
        }
    }

    /// Waits for the socket to be readable holding no buffer, then takes the pooled buffers
    /// and reads what arrived straight into `inbuf`. `Ok(None)`: quiet long enough to park
    /// (and parking is on): the connection is to park. `ready`: the socket was just reported
    /// readable, so it is read before any wait.
    async fn await_bytes_unbuffered(
        &mut self,
        fd: std::os::fd::RawFd,
        deadline: Instant,
        mut ready: bool,
    ) -> Result<Option<usize>, IoFailure> {
        let parks = self.worker.parking.is_open();
        let handle = self.handle;
        for _ in 0..MAX_SPURIOUS_WAKEUPS {
            if !ready {
                // Parking is asked for by the worker's park sweep (no timer of its own here:
                // each would wake the runtime's driver to re-arm its timer).
                let park_request = std::future::poll_fn(|cx| {
                    if parks {
                        handle.poll_park_request(cx)
                    } else {
                        std::task::Poll::Pending
                    }
                });
                match readable_unless(fd, deadline, park_request).await? {
                    Readable::Ready => {}
                    Readable::Interrupted => return Ok(None),
                }
            }
            ready = false;
            self.generation = self.worker.generation();
            self.take_buffers();
            match crate::sys::recv_ready(fd, &mut self.inbuf) {
                Ok(n) => return Ok(Some(n)),
                // Readiness without bytes (another reader cannot exist: a spurious wake-up).
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    self.give_buffers()
                }
                Err(e) => return Err(IoFailure::Io(e)),
            }
        }
        Err(IoFailure::Io(std::io::Error::other(
            "socket reported readable repeatedly with nothing to read",
        )))
    }

    /// Waits with a read into the small idle buffer (a transport that buffers above the
    /// socket), then moves what it read into the pooled `inbuf`.
    async fn await_bytes_buffered(&mut self, deadline: Instant) -> Result<usize, IoFailure> {
        if self.idle_buf.capacity() == 0 {
            self.idle_buf.reserve_exact(IDLE_READ_BYTES);
        }
        let (res, buf) = read_before(&self.client, take(&mut self.idle_buf), deadline).await;
        self.idle_buf = buf;
        let n = res?;
        if n > 0 {
            self.generation = self.worker.generation();
            self.take_buffers();
            self.inbuf.extend_from_slice(&self.idle_buf);
            self.idle_buf.clear();
        }
        Ok(n)
    }

    /// Takes the buffers and the context a request is served with from the worker's pools
    /// (those it does not hold already).
    fn take_buffers(&mut self) {
        let worker = self.worker;
        if self.ctx.is_empty() {
            self.ctx.fill(worker.contexts.take(&self.facts));
        }
        if self.inbuf.capacity() == 0 {
            self.inbuf = worker
                .client_buffers
                .take(self.generation.snapshot.client_buffer_bytes);
        }
        if self.out.capacity() == 0 {
            self.out = worker.head_buffers.take(HEAD_BUFFER_BYTES);
        }
        if self.upbuf.capacity() == 0 {
            self.upbuf = worker.upstream_buffers.take(UPSTREAM_BUFFER_BYTES);
        }
    }

    /// Gives the request buffers and context back to the worker's pools: the connection idles.
    fn give_buffers(&mut self) {
        let worker = self.worker;
        if let Some(ctx) = self.ctx.take() {
            worker.contexts.give(ctx);
        }
        if self.inbuf.capacity() > 0 {
            worker.client_buffers.give(take(&mut self.inbuf));
        }
        if self.out.capacity() > 0 {
            worker.head_buffers.give(take(&mut self.out));
        }
        if self.upbuf.capacity() > 0 {
            worker.upstream_buffers.give(take(&mut self.upbuf));
        }
    }

    /// Closes gently: stop sending, then read and discard what the client still sends for a
    /// short while, so the kernel does not reset the connection before the client read the
    /// last response.
    async fn linger(&mut self) {
        self.client.close_notify(Instant::now() + LINGER).await;
        let _ = self.client.shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + LINGER;
        // What is read is thrown away: the small buffer does.
        self.give_buffers();
        if self.idle_buf.capacity() == 0 {
            self.idle_buf.reserve_exact(IDLE_READ_BYTES);
        }
        for _ in 0..LINGER_READS {
            self.idle_buf.clear();
            let (res, buf) = read_before(&self.client, take(&mut self.idle_buf), deadline).await;
            self.idle_buf = buf;
            if !matches!(res, Ok(n) if n > 0) {
                return;
            }
        }
    }
}

/// Adds the listener's Strict-Transport-Security to every answer, when it has one.
/// The explanation to write: the JSON in `json_body` when it was rendered, else `text`.
fn explanation<'a>(json: bool, json_body: &'a [u8], text: &'a str) -> encode::Explanation<'a> {
    if json {
        encode::Explanation::Json(json_body)
    } else {
        encode::Explanation::Text(text)
    }
}

fn add_hsts(handle: &ConnHandle, correlation: &mut super::correlation::Correlation) {
    if let Some(hsts) = &handle.listener().hsts {
        let fields = &mut correlation.response_fields;
        fields.extend_from_slice(b"strict-transport-security: ");
        fields.extend_from_slice(hsts.as_bytes());
        fields.extend_from_slice(b"\r\n");
    }
}

/// The answer for a redirecting listener: a 308 to `https://HOST[:port]PATH[?QUERY]` (the
/// normalised host and path, the query as sent), written into `location`; a request without a
/// Host cannot be redirected (400).
fn redirect_location(location: &mut Vec<u8>, req: &RequestHead, port: u16) -> Answer {
    use std::io::Write;
    let Some(host) = req.route_host.filter(|h| !h.is_empty()) else {
        return Answer::error(400, "a redirect to https needs a Host");
    };
    location.clear();
    location.extend_from_slice(b"https://");
    location.extend_from_slice(host);
    if port != 443 {
        let _ = write!(location, ":{port}");
    }
    location.extend_from_slice(req.path);
    location.extend_from_slice(req.query);
    Answer::RedirectHttps
}

/// True when the client speaks HTTP/1.1 (and so understands chunked framing and 1xx).
pub(super) fn is_http11(v: Version) -> bool {
    v == Version::Http11
}

/// A self-service request, owned, for the blocking thread.
struct SelfServiceRequest {
    consumer: String,
    method: String,
    rest: String,
    body: Vec<u8>,
}

/// The self-service request in `req` (its body whole in `inbuf`: the phases waited for it),
/// or `None` when its body is too large.
fn self_service_request(
    req: &crate::http::request::RequestHead,
    inbuf: &[u8],
    ctx: &RequestContext,
    snapshot: &crate::proxy::snapshot::ConfigSnapshot,
) -> Option<SelfServiceRequest> {
    let n = match req.body {
        BodyFraming::Length(n) => usize::try_from(n).ok()?,
        BodyFraming::None => 0,
        _ => return None,
    };
    if n > crate::vault::self_service::MAX_BODY_BYTES {
        return None;
    }
    let route = snapshot.routes.route(ctx.route?);
    let consumer = ctx.caller.as_ref()?.identity(snapshot).0.to_owned();
    Some(SelfServiceRequest {
        consumer,
        method: req.method.to_owned(),
        rest: String::from_utf8_lossy(route.after_prefix(req.path)).into_owned(),
        body: inbuf.get(req.head_len..req.head_len + n)?.to_vec(),
    })
}
