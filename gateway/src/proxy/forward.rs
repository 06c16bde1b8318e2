//! The exchange with an upstream: send the rebuilt head and the body, read the response head
//! (relaying interim 1xx), then stream the response back. An upstream connection returns to the
//! pool only when both messages were completely framed and consumed.

use std::mem::take;

use tokio::time::Instant;
use tracing::debug;

use super::{
    answer::Answer,
    body::{
        relay_request_body, relay_response_body, RequestBodyError, ResponseBodyError, ResponseRelay,
    },
    connection::{is_http11, Connection, Next},
    context::{Outcome, RequestFacts, Side},
    tunnel::tunnel,
};
use crate::{
    http::{
        chunked::ChunkedDecoder,
        encode::{self, ClientFraming},
        response::{parse_response, ResponseError, MAX_RESPONSE_HEADERS, MAX_RESPONSE_HEAD_BYTES},
        BodyFraming,
    },
    io::{read_before, write_and_read_before, write_before, IoFailure, Transport},
    log_throttle::Noisy,
    proxy::snapshot::UPSTREAM_BUFFER_BYTES,
    quotas::QuotaCharges,
    throttled_warn,
    upstream::{ConnectError, UpstreamConn, UpstreamGroup},
};

/// Why no usable response head came from the upstream.
enum HeadFailure {
    /// The upstream closed or reset before sending a byte of response.
    ClosedEarly,
    TimedOut,
    Io(IoFailure),
    Invalid(ResponseError),
    /// The client went away while interim responses were relayed.
    ClientGone,
}

/// A request's retries so far.
struct RetryState {
    /// Retries the route still allows.
    left: u32,
    /// The servers tried (by index, modulo 64).
    tried: u64,
    done: u32,
    /// The budget's count of this request's retry, held to its end.
    _budget: Option<crate::upstream::balance::Counted>,
}

/// What is known of the final response once its head went to the client.
struct FinalResponse {
    status: u16,
    head_len: usize,
    body: BodyFraming,
    upstream_keep_alive: bool,
    client: ClientFraming,
    /// The cache answers instead of this response (nothing of it was sent to the client).
    cached_instead: bool,
}

impl<C: Transport> Connection<'_, C> {
    /// Phases 13 to 16 for a request the request phases let through: send it to `server` of
    /// upstream group `group_index`, then relay the response.
    pub(super) async fn forward(
        &mut self,
        group_index: usize,
        server: usize,
        strip: Option<crate::auth::CredentialSource>,
        request_deadline: Instant,
    ) -> Next {
        let mut server = server;
        // From here to the exchange's end the request is in flight to its server. Counted
        // first and checked after, so workers admitting at once cannot pass the limit together.
        {
            let generation = self.generation.clone();
            let group = &generation.upstreams[group_index];
            self.ctx.server_load = Some(group.start_request(server));
            let limit = group.config().circuit_breaker.max_requests;
            if limit.is_some_and(|m| group.loads().requests() > m) {
                group.loads().count_circuit_refusal();
                self.ctx.server_load = None;
                // Every route to the upstream together: beyond its limit, at once.
                let answer = Answer::error(
                    503,
                    "the upstream is at its circuit breaker's limit of requests in flight",
                );
                return self.answer(answer, request_deadline).await;
            }
        }
        let generation = self.generation.clone();
        let snapshot = &*generation.snapshot;
        let facts = self.ctx.facts;
        // Quotas count once the upstream has received the request; until then they stay in the
        // context, and the log phase gives them back.
        let charges = self.ctx.charges;
        let group = &generation.upstreams[group_index];
        let counters_of = |server: usize| {
            generation
                .metrics
                .as_ref()
                .map(|m| &m.upstreams[group_index].servers[server])
        };
        let mut server_counters = counters_of(server);
        let mut has_body = !matches!(facts.body, BodyFraming::None | BodyFraming::Length(0));
        let mut consumed = facts.head_len;
        if let Some((client_len, _)) = self.ctx.replaced_body() {
            // The body went with the head, rewritten; the client's, buffered whole, is consumed.
            has_body = false;
            consumed += client_len;
        }
        let mut retried = false;
        // Retries to another server: what may be sent again, and until when.
        let route = snapshot
            .routes
            .route(self.ctx.route.expect("the route phase ran"));
        // Read the clock only for a route with a timeout: most have none.
        let head_deadline = route.timeout.map(|t| Instant::now() + t);
        let body_held = match facts.body {
            BodyFraming::None | BodyFraming::Length(0) => true,
            BodyFraming::Length(n) => self.inbuf.len() >= facts.head_len + n as usize,
            _ => false,
        } || self.ctx.replaced_body().is_some();
        // A provider bills what it received: a vault request is sent again only if it was not.
        let may_resend = (facts.idempotent || route.retry_non_idempotent)
            && body_held
            && self.ctx.vault.is_none();
        let mut outcome_counted = false;
        let mut retry = RetryState {
            left: route.retry.retries,
            tried: 1u64 << (server % 64),
            done: 0,
            _budget: None,
        };
        if facts.body == BodyFraming::Chunked {
            // Judge the part of a chunked body already received before anything goes upstream:
            // a message refused half-way would reach the upstream truncated.
            let buffered = &self.inbuf[facts.head_len..];
            if let Err(e) = ChunkedDecoder::new().decode(buffered, |_| {}) {
                debug!(peer = %self.peer, error = %e, "invalid chunked request body");
                return self
                    .close_with(400, "invalid chunked body", request_deadline)
                    .await;
            }
        }
        self.add_revalidation_fields();
        let (conn, response) = loop {
            let attempt = if retried {
                group.connect(server).await
            } else {
                group.checkout(server).await
            };
            let conn = match attempt {
                Ok(c) => c,
                Err(ConnectError::CircuitOpen(limit)) => {
                    // The gateway's own limit, not the server's failure.
                    debug!(upstream = %group.name, limit, "circuit breaker open");
                    let answer =
                        Answer::error(503, "the upstream is at its circuit breaker's limit");
                    return self.answer(answer, request_deadline).await;
                }
                Err(e) => {
                    if let Some(c) = server_counters {
                        c.connect_failures.inc();
                        if matches!(e, ConnectError::TimedOut) {
                            c.timeouts.inc();
                        }
                    }
                    self.server_outcome(group, server, false);
                    // Nothing of the request was sent: another server may always have it.
                    if let Some(next) = self
                        .retry_elsewhere(group_index, strip, &mut retry, head_deadline, true)
                        .await
                    {
                        server = next;
                        server_counters = counters_of(server);
                        retried = false;
                        continue;
                    }
                    return self
                        .upstream_unavailable(group, server, e, request_deadline)
                        .await;
                }
            };
            // One clock read for the connected time and the head write's deadline.
            let connected = Instant::now();
            self.ctx.timings.upstream_connected = Some(connected);
            if let Some(c) = server_counters {
                c.requests.inc();
            }
            let len = self.out.len();
            let write_deadline = connected + group.read_timeout;
            // Without a body to relay, the response's first read is submitted with the head,
            // and the try's time runs from the connected time. Over plain TCP only: see
            // `write_and_read_before`.
            let mut read_with_head = None;
            let res = if has_body || conn.transport.is_tls() {
                let (res, out) =
                    write_before(&conn.transport, take(&mut self.out), 0..len, write_deadline)
                        .await;
                self.out = out;
                res
            } else {
                self.upbuf.clear();
                let try_deadline = try_deadline_from(route, head_deadline, connected);
                let read_deadline = try_deadline.map_or(write_deadline, |d| d.min(write_deadline));
                let ((res, out), (read, upbuf)) = write_and_read_before(
                    &conn.transport,
                    take(&mut self.out),
                    0..len,
                    write_deadline,
                    take(&mut self.upbuf),
                    read_deadline,
                )
                .await;
                self.out = out;
                self.upbuf = upbuf;
                // The try's deadline passed while the head was still going out: the read's
                // timer shut the socket down, which failed the write. That is the upstream
                // timing out (504, counted as such), as when the write completes just before.
                let res = match (res, &read) {
                    (Err(_), Err(IoFailure::TimedOut)) => Ok(()),
                    (res, _) => res,
                };
                read_with_head = Some((read, try_deadline));
                res
            };
            if let Err(e) = res {
                if conn.reused && !retried {
                    retried = true;
                    continue;
                }
                // The head could not be written: the upstream did not get the request.
                throttled_warn!(Noisy::Upstream, upstream = %group.name, server = %group.server_label(server), error = %e, "could not send request upstream");
                let answer = Answer::error(502, "upstream connection failed");
                return self.answer(answer, request_deadline).await;
            }
            self.ctx.charges = QuotaCharges::default();
            if let Some(v) = &mut self.ctx.vault {
                // The provider has the request: it is billed whatever happens next.
                v.sent = true;
            }
            if has_body {
                if facts.expect_continue
                    && self.inbuf.len() == facts.head_len
                    && is_http11(facts.version)
                {
                    self.out.clear();
                    self.out.extend_from_slice(encode::CONTINUE);
                    if !self.send_out().await {
                        self.ctx.outcome = Outcome::Cut(Side::Client);
                        return Next::Abort;
                    }
                }
                let deadlines = self.body_deadlines(request_deadline);
                let (res, buf) = relay_request_body(
                    &self.client,
                    Some(&conn.transport),
                    take(&mut self.inbuf),
                    facts.head_len,
                    facts.body,
                    facts.max_body_bytes,
                    deadlines,
                )
                .await;
                self.inbuf = buf;
                match res {
                    Ok(end) => consumed = end,
                    Err(RequestBodyError::Client(e)) => {
                        debug!(peer = %self.peer, error = %e, "client stopped sending the request body");
                        self.ctx.outcome = Outcome::Cut(Side::Client);
                        return Next::Abort;
                    }
                    Err(RequestBodyError::Framing(e)) => {
                        debug!(peer = %self.peer, error = %e, "invalid chunked request body");
                        return self
                            .close_with(400, "invalid chunked body", request_deadline)
                            .await;
                    }
                    Err(RequestBodyError::TooLarge) => {
                        debug!(peer = %self.peer, "request body over the route's limit");
                        let detail = "request body exceeds the route's limit";
                        return self.close_with(413, detail, request_deadline).await;
                    }
                    Err(RequestBodyError::Upstream(e)) => {
                        throttled_warn!(Noisy::Upstream, upstream = %group.name, server = %group.server_label(server), error = %e, "upstream stopped reading the request body");
                        let detail = "upstream connection failed";
                        return self.close_with(502, detail, request_deadline).await;
                    }
                }
            }
            let (first_read, try_deadline) = match read_with_head {
                Some((read, try_deadline)) => (Some(read), try_deadline),
                // The try's time starts once the request went, body and all.
                None => (
                    None,
                    try_deadline_from(route, head_deadline, Instant::now()),
                ),
            };
            match self
                .read_response_head(&conn, &facts, group, try_deadline, first_read)
                .await
            {
                Ok(r)
                    if may_resend
                        && !r.cached_instead
                        && route.retry.statuses.contains(&r.status) =>
                {
                    // A status the route retries: the answer is dropped with its connection.
                    self.server_outcome(group, server, r.status < 500);
                    if let Some(next) = self
                        .retry_elsewhere(group_index, strip, &mut retry, head_deadline, false)
                        .await
                    {
                        // The quotas count when a try is received, not for each try.
                        self.ctx.charges = charges;
                        drop(conn);
                        server = next;
                        server_counters = counters_of(server);
                        retried = false;
                        continue;
                    }
                    // No retry left: this answer is the client's after all (its outcome is
                    // counted).
                    outcome_counted = true;
                    break (conn, r);
                }
                Ok(r) => break (conn, r),
                Err(HeadFailure::ClosedEarly)
                    if conn.reused && !retried && !has_body && facts.idempotent =>
                {
                    // The pooled connection had been closed by the server while idle: the
                    // request never reached it.
                    self.ctx.charges = charges;
                    retried = true;
                    continue;
                }
                Err(HeadFailure::ClientGone) => {
                    self.ctx.outcome = Outcome::Cut(Side::Client);
                    return Next::Abort;
                }
                Err(failure) => {
                    if let (HeadFailure::TimedOut, Some(c)) = (&failure, server_counters) {
                        c.timeouts.inc();
                    }
                    self.server_outcome(group, server, false);
                    // No response byte came: an idempotent request whose body is still here
                    // may go to another server.
                    let before_any_byte = matches!(
                        failure,
                        HeadFailure::ClosedEarly | HeadFailure::TimedOut | HeadFailure::Io(_)
                    ) && self.ctx.timings.first_response_byte.is_none();
                    if let (HeadFailure::TimedOut, Some(load), Some(connected)) = (
                        &failure,
                        &self.ctx.server_load,
                        self.ctx.timings.upstream_connected,
                    ) {
                        // A timeout is a latency too: peak-EWMA takes it as the peak it is.
                        load.observe(connected.elapsed());
                    }
                    if may_resend && before_any_byte {
                        if let Some(next) = self
                            .retry_elsewhere(group_index, strip, &mut retry, head_deadline, false)
                            .await
                        {
                            self.ctx.charges = charges;
                            server = next;
                            server_counters = counters_of(server);
                            retried = false;
                            continue;
                        }
                    }
                    let (status, detail) = match &failure {
                        HeadFailure::TimedOut => (504, "upstream timed out"),
                        HeadFailure::Invalid(_) => (502, "invalid response from upstream"),
                        _ => (502, "upstream connection failed"),
                    };
                    match &failure {
                        HeadFailure::Invalid(e) => {
                            throttled_warn!(Noisy::Upstream, upstream = %group.name, server = %group.server_label(server), error = %e, "invalid upstream response")
                        }
                        HeadFailure::Io(e) => {
                            throttled_warn!(Noisy::Upstream, upstream = %group.name, server = %group.server_label(server), error = %e, "upstream failed")
                        }
                        _ => {
                            throttled_warn!(Noisy::Upstream, upstream = %group.name, server = %group.server_label(server), status, "{detail}")
                        }
                    }
                    if self.stale_instead_of_error() {
                        return self.answer(Answer::Cached, request_deadline).await;
                    }
                    let answer = Answer::error_and_close(status, detail);
                    return self.answer(answer, request_deadline).await;
                }
            }
        };

        // What passive health counts: a 5xx is the server failing, anything else is not.
        if !outcome_counted {
            self.server_outcome(group, server, response.status < 500);
        }
        if response.cached_instead {
            // A 304 to the gateway's own revalidation, or an error a stale entry answers for.
            if response.status == 304
                && response.upstream_keep_alive
                && self.upbuf.len() == response.head_len
            {
                group.release(conn);
            }
            if let Some(c) = &mut self.ctx.cache {
                c.fill = None;
            }
            return self.answer(Answer::Cached, request_deadline).await;
        }
        self.ctx.status = response.status;
        // A JSON body the route's rules rewrite is read whole and sent with its new length.
        // That path's state is large and most routes have no such rules: it is allocated
        // only for those that do.
        let json_rules = self.ctx.route.is_some_and(|r| {
            self.generation
                .snapshot
                .routes
                .route(r)
                .response_json
                .is_some()
        });
        let conn = if json_rules {
            match Box::pin(self.relay_json_response(conn, group, &facts, consumed)).await {
                Ok(next) => return next,
                Err(conn) => conn,
            }
        } else {
            conn
        };
        // The response head is in `self.out`; it leaves with the start of the body.
        self.inbuf.drain(..consumed);
        self.ctx.bytes_in = consumed as u64;
        if response.status == 101 {
            if !self.send_out().await {
                self.ctx.outcome = Outcome::Cut(Side::Client);
                return Next::Abort;
            }
            self.ctx.outcome = Outcome::Tunnelled;
            self.upbuf.drain(..response.head_len);
            let client_pending = take(&mut self.inbuf);
            let upstream_pending = take(&mut self.upbuf);
            tunnel(
                &self.client,
                &conn.transport,
                client_pending,
                upstream_pending,
            )
            .await;
            return Next::Abort;
        }
        let dechunk = response.body == BodyFraming::Chunked && !response.client.chunked;
        let server_config = snapshot.server();
        let mut sent = 0;
        let ctx = &mut *self.ctx;
        let (meter, usage_filter) = match ctx.vault.as_mut() {
            Some(v) => (Some(&mut v.meter), v.usage_filter.as_mut()),
            None => (None, None),
        };
        let recorder = ctx.cache.as_mut().and_then(|c| c.recorder.as_mut());
        let (res, buf, head) = relay_response_body(
            &conn.transport,
            &self.client,
            take(&mut self.upbuf),
            response.head_len,
            take(&mut self.out),
            ResponseRelay {
                framing: response.body,
                dechunk,
                read_timeout: group.read_timeout,
                write_timeout: server_config.body_timeout.get(),
            },
            &mut sent,
            meter,
            usage_filter,
            recorder,
        )
        .await;
        if let (Some(c), cache) = (&mut self.ctx.cache, &snapshot.cache) {
            // Stored only when the body's framing completed; never in part.
            if let Some(r) = c.recorder.take() {
                match &res {
                    Ok(_) => r.finish(cache),
                    Err(_) => r.abandon(cache),
                }
            }
            c.fill = None;
        }
        self.upbuf = buf;
        self.out = head;
        self.ctx.bytes_out += sent;
        match res {
            Ok(clean) => {
                self.ctx.outcome = Outcome::Relayed;
                if let Some(v) = &mut self.ctx.vault {
                    v.complete = true;
                }
                if clean && response.upstream_keep_alive {
                    group.release(conn);
                }
                // The client was told keep-alive: a drain that began meanwhile closes the
                // connection at the next request boundary (at once when stopping, after one more
                // answer saying `Connection: close` after an upgrade), never here unannounced.
                if response.client.keep_alive {
                    Next::KeepAlive
                } else {
                    Next::Close
                }
            }
            Err(ResponseBodyError::UpstreamFramingBeforeHead) => {
                throttled_warn!(Noisy::Upstream, upstream = %group.name, server = %group.server_label(server), "invalid chunked response body");
                let answer = Answer::error_and_close(502, "invalid response from upstream");
                self.answer(answer, request_deadline).await
            }
            Err(e) => {
                debug!(peer = %self.peer, upstream = %group.name, error = ?e, "response body relay ended early");
                self.ctx.outcome = Outcome::Cut(match e {
                    ResponseBodyError::Client(_) => Side::Client,
                    _ => Side::Upstream,
                });
                Next::Abort
            }
        }
    }

    /// Reads the final response head into `self.upbuf`, relaying interim responses, and writes
    /// the client's response head to `self.out`. `first_read`: the result of the first read
    /// into `self.upbuf` when it was made already, submitted with the request.
    async fn read_response_head(
        &mut self,
        conn: &UpstreamConn,
        facts: &RequestFacts,
        group: &UpstreamGroup,
        deadline: Option<Instant>,
        mut first_read: Option<Result<usize, IoFailure>>,
    ) -> Result<FinalResponse, HeadFailure> {
        if first_read.is_none() {
            self.upbuf.clear();
        }
        let mut received_any = false;
        loop {
            let res = match first_read.take() {
                Some(res) => res,
                None => {
                    if self.upbuf.len() == self.upbuf.capacity() {
                        // A head larger than the usual buffer: grow, up to the head limit.
                        self.upbuf.reserve(
                            (MAX_RESPONSE_HEAD_BYTES + 1)
                                .saturating_sub(self.upbuf.len())
                                .min(UPSTREAM_BUFFER_BYTES),
                        );
                    }
                    let until = Instant::now() + group.read_timeout;
                    let (res, buf) = read_before(
                        &conn.transport,
                        take(&mut self.upbuf),
                        deadline.map_or(until, |d| d.min(until)),
                    )
                    .await;
                    self.upbuf = buf;
                    res
                }
            };
            match res {
                Ok(0) | Err(IoFailure::Closed) if !received_any => {
                    return Err(HeadFailure::ClosedEarly)
                }
                Err(IoFailure::Io(e))
                    if !received_any && e.kind() == std::io::ErrorKind::ConnectionReset =>
                {
                    return Err(HeadFailure::ClosedEarly)
                }
                Ok(0) => return Err(HeadFailure::Io(IoFailure::Closed)),
                Ok(_) => {
                    if !received_any {
                        let now = Instant::now();
                        self.ctx.timings.first_response_byte = Some(now);
                        if let (Some(load), Some(connected)) =
                            (&self.ctx.server_load, self.ctx.timings.upstream_connected)
                        {
                            load.observe(now.duration_since(connected));
                        }
                    }
                    received_any = true;
                }
                Err(IoFailure::TimedOut) => return Err(HeadFailure::TimedOut),
                Err(e) => return Err(HeadFailure::Io(e)),
            }
            loop {
                // The parsed fields' array ends with this block, before an interim answer is
                // relayed: it is not held in this future's state across that write.
                let relay_interim = {
                    let mut headers =
                        [const { std::mem::MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
                    let resp = match parse_response(&self.upbuf, &mut headers, facts.is_head) {
                        Ok(Some(r)) => r,
                        Ok(None) => break,
                        Err(e) => return Err(HeadFailure::Invalid(e)),
                    };
                    if resp.status == 101 && !facts.upgrade {
                        return Err(HeadFailure::Invalid(ResponseError::Malformed(
                            "101 without an upgrade request",
                        )));
                    }
                    if resp.is_interim() {
                        let head_len = resp.head_len;
                        // 100 Continue is the gateway's own business (it answered Expect itself);
                        // other 1xx go to HTTP/1.1 clients only.
                        let relay = resp.status != 100 && is_http11(facts.version);
                        if relay {
                            self.out.clear();
                            encode::write_client_response(
                                &mut self.out,
                                &resp,
                                ClientFraming {
                                    chunked: false,
                                    keep_alive: true,
                                    client_version: facts.version,
                                },
                                b"",
                                &|_| crate::http::fields::FieldFate::Keep,
                            )
                            .map_err(|_| {
                                HeadFailure::Invalid(ResponseError::Malformed(
                                    "unsafe field value in an interim response",
                                ))
                            })?;
                        }
                        self.upbuf.drain(..head_len);
                        relay
                    } else {
                        if resp.status == 429 {
                            if let Some(crate::proxy::context::Caller::Virtual(v)) =
                                &self.ctx.caller
                            {
                                // This provider key is over its provider's limit: the other keys serve
                                // while it rests.
                                v.provider_key
                                    .rest_for(crate::vault::provider::retry_after(resp.headers));
                            }
                        }
                        // The worker's own handle (not the shared Arc, whose count every core touches).
                        let generation = self.generation.clone();
                        let snapshot = &*generation.snapshot;
                        if super::cache_store::cache_response(
                            &mut self.ctx,
                            snapshot,
                            &self.inbuf,
                            &resp,
                            facts,
                        ) {
                            return Ok(FinalResponse {
                                status: resp.status,
                                head_len: resp.head_len,
                                body: resp.body,
                                upstream_keep_alive: resp.keep_alive,
                                client: ClientFraming {
                                    chunked: false,
                                    keep_alive: false,
                                    client_version: facts.version,
                                },
                                cached_instead: true,
                            });
                        }
                        let client_chunked =
                            resp.body == BodyFraming::Chunked && is_http11(facts.version);
                        // While draining every answer says `Connection: close`, so closing afterwards
                        // never cuts a request the client sent next.
                        let keep_alive = facts.keep_alive
                            && !self.winding_down()
                            && resp.status != 101
                            && resp.body != BodyFraming::UntilClose
                            && (resp.body != BodyFraming::Chunked || client_chunked);
                        let client = ClientFraming {
                            chunked: client_chunked,
                            keep_alive,
                            client_version: facts.version,
                        };
                        // On a cached route the answer says what the cache did (MISS, BYPASS); the
                        // route's field rules and CORS apply.
                        let written = super::json_exchange::write_client_head(
                            &mut self.out,
                            &mut self.ctx,
                            snapshot,
                            &self.inbuf,
                            &mut self.normalized,
                            self.peer.ip(),
                            &resp,
                            client,
                            false,
                        );
                        written.map_err(|_| {
                            HeadFailure::Invalid(ResponseError::Malformed("unsafe field value"))
                        })?;
                        return Ok(FinalResponse {
                            status: resp.status,
                            head_len: resp.head_len,
                            body: resp.body,
                            upstream_keep_alive: resp.keep_alive,
                            client,
                            cached_instead: false,
                        });
                    }
                };
                if relay_interim && !self.send_out().await {
                    return Err(HeadFailure::ClientGone);
                }
                if self.upbuf.is_empty() {
                    break;
                }
            }
        }
    }

    async fn upstream_unavailable(
        &mut self,
        group: &UpstreamGroup,
        server: usize,
        e: ConnectError,
        request_deadline: Instant,
    ) -> Next {
        let (status, detail) = match &e {
            ConnectError::TimedOut => (504, "upstream connect timed out"),
            ConnectError::Failed(_) | ConnectError::Unresolved => (502, "upstream unavailable"),
            ConnectError::Tls(_) => (502, "upstream TLS handshake failed"),
            ConnectError::CircuitOpen(_) => (503, "the upstream is at its circuit breaker's limit"),
        };
        // The certificate's fault (expired, wrong name, unknown issuer) is named in the line.
        throttled_warn!(Noisy::Upstream, upstream = %group.name, server = %group.server_label(server), error = %e, status, "cannot connect upstream");
        if self.stale_instead_of_error() {
            return self.answer(Answer::Cached, request_deadline).await;
        }
        self.answer(Answer::error(status, detail), request_deadline)
            .await
    }

    /// Gets ready to send the request to another server of the group: when the route has a
    /// retry left, the upstream's budget allows one more and the deadline is not past, picks a
    /// server not tried yet, writes the upstream head for it again and waits the backoff
    /// (not `at_once`, after a failed connect).
    async fn retry_elsewhere(
        &mut self,
        group_index: usize,
        strip: Option<crate::auth::CredentialSource>,
        retry: &mut RetryState,
        head_deadline: Option<Instant>,
        at_once: bool,
    ) -> Option<usize> {
        // In its own allocation: the retry's state is large (9 KiB) and retries are rare, so
        // the request's future does not carry it.
        Box::pin(async move {
            let generation = self.generation.clone();
            let snapshot = &*generation.snapshot;
            let route = snapshot.routes.route(self.ctx.route?);
            let group = &generation.upstreams[group_index];
            if retry.left == 0 || group.len() < 2 {
                return None;
            }
            // This request's previous retry is over: its count is the new one's.
            retry._budget = None;
            let budget = group.loads().try_retry(&group.config().retry_budget)?;
            // Random, up to the backoff doubled per retry (full jitter), within the deadline.
            let cap = route
                .retry
                .backoff
                .get()
                .saturating_mul(1 << retry.done.min(16))
                .min(route.retry.max_backoff.get());
            // A connect that failed sent nothing and the next try goes elsewhere: no wait.
            let wait = if at_once {
                std::time::Duration::ZERO
            } else {
                cap.mul_f64(self.worker.rng.borrow_mut().f64())
            };
            if head_deadline.is_some_and(|d| Instant::now() + wait >= d) {
                return None;
            }
            // Another server than those tried, if one is left.
            let mut headers =
                [const { std::mem::MaybeUninit::uninit() }; crate::config::MAX_HEADERS_CEILING];
            let req = match crate::http::request::parse_request(
                &self.inbuf,
                &mut headers,
                &snapshot.limits,
                &mut self.normalized,
            ) {
                Ok(Some(req)) => req,
                _ => return None,
            };
            let next = super::phase::choose_upstream::pick(
                snapshot,
                group,
                group_index,
                &req,
                self.peer.ip(),
                &mut self.ctx,
                &mut self.worker.rng.borrow_mut(),
                retry.tried,
            );
            retry.tried |= 1u64 << (next % 64);
            self.out.clear();
            super::phase::request_head::write_for_server(
                snapshot,
                route,
                &req,
                self.peer.ip(),
                &self.ctx,
                strip,
                group,
                next,
                &mut self.out,
            )
            .ok()?;
            self.add_revalidation_fields();
            retry.left -= 1;
            retry.done += 1;
            // The next try's own first byte decides whether it may be retried in turn.
            self.ctx.timings.first_response_byte = None;
            retry._budget = Some(budget);
            group.loads().count_retry_sent();
            self.ctx.server_load = Some(group.start_request(next));
            debug!(upstream = %group.name, server = %group.server_label(next), "retrying on another server");
            tokio::time::sleep(wait).await;
            Some(next)
        })
        .await
    }

    /// Counts how `server` did for outlier ejection, and logs when that ejects it or it
    /// returns.
    fn server_outcome(&self, group: &UpstreamGroup, server: usize, ok: bool) {
        use crate::upstream::balance::Verdict;
        let Some(load) = &self.ctx.server_load else {
            return;
        };
        match load.outcome(ok) {
            Verdict::Unchanged => {}
            Verdict::Ejected(time) => {
                tracing::warn!(upstream = %group.name, server = %group.server_label(server), seconds = time.as_secs_f64(), "upstream server ejected after failures in a row");
            }
            Verdict::Returned => {
                tracing::info!(upstream = %group.name, server = %group.server_label(server), "ejected upstream server answers again");
            }
        }
    }

    /// Answers after part of the request body was consumed: the rest cannot be skipped.
    async fn close_with(&mut self, status: u16, detail: &'static str, deadline: Instant) -> Next {
        self.answer(Answer::error_and_close(status, detail), deadline)
            .await
    }
}

/// When a try's wait for the response head ends: the route's per-try timeout from `start`,
/// capped by its overall timeout's deadline; `None` for neither. `start` is when the request
/// went, or, for a request whose head goes out with the first read of the answer, when its
/// connection was ready: that try's time includes the head's write.
fn try_deadline_from(
    route: &crate::routing::Route,
    head_deadline: Option<Instant>,
    start: Instant,
) -> Option<Instant> {
    match (route.retry.per_try_timeout, head_deadline) {
        (Some(t), Some(d)) => Some(d.min(start + t.get())),
        (Some(t), None) => Some(start + t.get()),
        (None, d) => d,
    }
}
