//! The parts of an exchange a route's rules rewrite: the client's response head with the
//! route's field rules and CORS, a JSON request body read whole and sent rewritten, and a JSON
//! response body read whole (within its bound) and sent rewritten with its new length.
//!
//! A response the rules cannot take (larger than `max_bytes`, encoded without `decompress`,
//! not JSON after all) passes untouched, counted by reason: what was read of it stays in the
//! upstream buffer and the ordinary relay sends it.

use std::{io::Read, mem::take, net::IpAddr};

use tokio::time::Instant;
use tracing::debug;

use super::{
    answer::Answer,
    connection::{Connection, Next},
    context::{Outcome, RequestContext, RequestFacts},
    phase::request_head,
    snapshot::ConfigSnapshot,
};
use crate::{
    config::MAX_HEADERS_CEILING,
    http::{
        chunked::ChunkedDecoder,
        encode::{self, ClientFraming, UnsafeFieldValue},
        fields::FieldFate,
        request::parse_request,
        response::{parse_response, ResponseHead, MAX_RESPONSE_HEADERS},
        BodyFraming,
    },
    io::{read_before, IoFailure, Transport},
    routing::Route,
    transform::json_body::{is_json_media_type, JsonRules, JsonSkip},
    upstream::{UpstreamConn, UpstreamGroup},
};

/// Whether a CORS route drops an upstream's field: it answers CORS itself.
fn is_cors_field(name: &str) -> bool {
    name.len() > 15 && name[..15].eq_ignore_ascii_case("access-control-")
}

/// What becomes of an upstream response field on `route`.
pub(super) fn response_fate<'r>(route: Option<&'r Route>, name: &str) -> FieldFate<'r> {
    match route {
        Some(r) if r.cors.is_some() && is_cors_field(name) => FieldFate::Drop,
        Some(r) => r.response_headers.fate(name),
        None => FieldFate::Keep,
    }
}

/// Writes the client's response head for `resp`: the route's response field rules (their
/// templates see the request, decoded again from `inbuf`, where its head still is) and CORS,
/// with the context's response fields. `drop_encoding` drops `Content-Encoding` (the body
/// goes out decoded).
#[allow(clippy::too_many_arguments)]
pub(super) fn write_client_head(
    out: &mut Vec<u8>,
    ctx: &mut RequestContext,
    snapshot: &ConfigSnapshot,
    inbuf: &[u8],
    normalized: &mut Vec<u8>,
    peer: IpAddr,
    resp: &ResponseHead,
    client: ClientFraming,
    drop_encoding: bool,
) -> Result<(), UnsafeFieldValue> {
    let route = ctx.route.map(|r| snapshot.routes.route(r));
    let mark = ctx.correlation.response_fields.len();
    super::cache_store::write_cache_status_field(ctx, snapshot);
    if let Some(route) = route {
        add_rule_fields(
            ctx,
            snapshot,
            inbuf,
            normalized,
            peer,
            route,
            resp.headers.iter().map(|h| h.name),
        );
    }
    let fate = |name: &str| {
        if drop_encoding && name.eq_ignore_ascii_case("content-encoding") {
            return FieldFate::Drop;
        }
        response_fate(route, name)
    };
    out.clear();
    let written =
        encode::write_client_response(out, resp, client, &ctx.correlation.response_fields, &fate);
    ctx.correlation.response_fields.truncate(mark);
    written
}

/// Adds the route's response rule fields (set, add, append) for a response that arrived with
/// the fields named by `arrived` to the context's response fields. Their templates see the
/// request, decoded again from `inbuf`, where its head still is.
pub(super) fn add_rule_fields<'n>(
    ctx: &mut RequestContext,
    snapshot: &ConfigSnapshot,
    inbuf: &[u8],
    normalized: &mut Vec<u8>,
    peer: IpAddr,
    route: &Route,
    arrived: impl Iterator<Item = &'n str> + Clone,
) {
    if route.response_headers.is_empty() {
        return;
    }
    let mut fields = take(&mut ctx.correlation.response_fields);
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS_CEILING];
    if let Ok(Some(req)) = parse_request(inbuf, &mut headers, &snapshot.limits, normalized) {
        let render = ctx.render_context(snapshot, &route.id, &req, peer);
        let dropped = route
            .response_headers
            .write_added(arrived, &render, &mut fields);
        ctx.dropped_values += dropped;
    }
    ctx.correlation.response_fields = fields;
}

/// How a response body is decoded before the rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Identity,
    Gzip,
    Deflate,
}

/// Whether the route's JSON rules take this response; `Err` says why they pass it untouched.
fn plan<'r>(
    route: &'r Route,
    resp: &ResponseHead,
    facts: &RequestFacts,
) -> Option<Result<(&'r JsonRules, Coding), JsonSkip>> {
    let rules = route.response_json.as_ref()?;
    if route.stream
        || facts.is_head
        || resp.status < 200
        || matches!(resp.status, 204 | 304)
        || resp.body == BodyFraming::None
    {
        return None;
    }
    let field = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    // `text/event-stream` and everything else not JSON pass as they are, uncounted.
    if !field("content-type").is_some_and(is_json_media_type) {
        return None;
    }
    let coding = match field("content-encoding").map(|v| v.trim_ascii()) {
        None => Coding::Identity,
        Some(v) if v.is_empty() || v.eq_ignore_ascii_case(b"identity") => Coding::Identity,
        Some(v) if rules.decompress && v.eq_ignore_ascii_case(b"gzip") => Coding::Gzip,
        Some(v) if rules.decompress && v.eq_ignore_ascii_case(b"deflate") => Coding::Deflate,
        Some(_) => return Some(Err(JsonSkip::Encoded)),
    };
    if let BodyFraming::Length(n) = resp.body {
        if n > rules.max_bytes as u64 {
            return Some(Err(JsonSkip::TooLarge));
        }
    }
    Some(Ok((rules, coding)))
}

/// A response body read whole.
enum Buffered {
    /// Where the body's framing ended in the upstream buffer, and its bytes: decoded from
    /// chunks when chunked, else `head_len..end` of the buffer.
    Complete {
        dechunked: Option<Vec<u8>>,
        end: usize,
    },
    /// Over the bound: pass it on untouched.
    TooLarge,
    /// The upstream failed; the response cannot be given.
    Failed(IoFailure),
}

/// Reads the body after `head_len` in `buf` until its framing completes or its bytes exceed
/// `max_bytes`.
async fn read_whole<T: Transport>(
    upstream: &T,
    buf: &mut Vec<u8>,
    head_len: usize,
    framing: BodyFraming,
    max_bytes: usize,
    read_timeout: std::time::Duration,
) -> Buffered {
    let mut decoder = ChunkedDecoder::new();
    let mut decoded = Vec::new();
    let mut scanned = head_len;
    loop {
        match framing {
            BodyFraming::Length(n) => {
                let end = head_len + n as usize;
                if buf.len() >= end {
                    return Buffered::Complete {
                        dechunked: None,
                        end,
                    };
                }
            }
            BodyFraming::Chunked => {
                let input = &buf[scanned..];
                match decoder.decode(input, |r| decoded.extend_from_slice(&input[r])) {
                    Ok(p) if p.done => {
                        return Buffered::Complete {
                            dechunked: Some(decoded),
                            end: scanned + p.consumed,
                        }
                    }
                    Ok(p) => scanned += p.consumed,
                    Err(e) => {
                        return Buffered::Failed(IoFailure::Io(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            e.to_string(),
                        )))
                    }
                }
                if decoded.len() > max_bytes {
                    return Buffered::TooLarge;
                }
            }
            BodyFraming::UntilClose | BodyFraming::None => {}
        }
        if buf.len() - head_len > max_bytes.saturating_mul(2).max(max_bytes + 64 * 1024) {
            // Chunk framing costs a few bytes per chunk; far beyond the bound it is data.
            return Buffered::TooLarge;
        }
        if framing == BodyFraming::UntilClose && buf.len() - head_len > max_bytes {
            return Buffered::TooLarge;
        }
        if buf.len() == buf.capacity() {
            buf.reserve(64 * 1024);
        }
        let (res, b) = read_before(upstream, take(buf), Instant::now() + read_timeout).await;
        *buf = b;
        match res {
            Ok(0) | Err(IoFailure::Closed) if framing == BodyFraming::UntilClose => {
                return Buffered::Complete {
                    dechunked: None,
                    end: buf.len(),
                }
            }
            Ok(0) => return Buffered::Failed(IoFailure::Closed),
            Ok(_) => {}
            Err(e) => return Buffered::Failed(e),
        }
    }
}

/// `body` decoded from `coding`, within `max_bytes`; `None` when it cannot be (or is larger).
fn decode(body: &[u8], coding: Coding, max_bytes: usize) -> Option<std::borrow::Cow<'_, [u8]>> {
    let mut out = Vec::new();
    let limit = max_bytes as u64 + 1;
    let read = match coding {
        Coding::Identity => return Some(std::borrow::Cow::Borrowed(body)),
        Coding::Gzip => flate2::read::GzDecoder::new(body)
            .take(limit)
            .read_to_end(&mut out),
        // RFC 9110 `deflate` is zlib; some servers send raw deflate.
        Coding::Deflate => match flate2::read::ZlibDecoder::new(body)
            .take(limit)
            .read_to_end(&mut out)
        {
            Ok(n) => Ok(n),
            Err(_) => {
                out.clear();
                flate2::read::DeflateDecoder::new(body)
                    .take(limit)
                    .read_to_end(&mut out)
            }
        },
    };
    (read.is_ok() && out.len() <= max_bytes).then_some(std::borrow::Cow::Owned(out))
}

impl<C: Transport> Connection<'_, C> {
    /// Reads a JSON request body the route's rules rewrite, whole, and writes the upstream
    /// head again with the rewritten body after it. `Err(None)`: the client left.
    pub(super) async fn rewrite_json_request(
        &mut self,
        group_index: usize,
        server: usize,
        strip: Option<crate::auth::CredentialSource>,
        deadline: Instant,
    ) -> Result<(), Option<Answer>> {
        let facts = self.ctx.facts;
        let BodyFraming::Length(n) = facts.body else {
            unreachable!("the body limit phase refused JSON bodies without a length");
        };
        let total = facts.head_len + n as usize;
        self.buffer_body(total, deadline).await?;
        let generation = self.generation.clone();
        let snapshot = &*generation.snapshot;
        let route = snapshot
            .routes
            .route(self.ctx.route.expect("the route phase ran"));
        let rules = route
            .request_json
            .as_ref()
            .expect("planned for routes with request_json");
        let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS_CEILING];
        let Ok(Some(req)) = parse_request(
            &self.inbuf,
            &mut headers,
            &snapshot.limits,
            &mut self.normalized,
        ) else {
            // The head was decoded from these bytes once; not again would be a bug here.
            return Err(Some(Answer::error_and_close(
                500,
                "the gateway lost the request head",
            )));
        };
        let render = self
            .ctx
            .render_context(snapshot, &route.id, &req, self.peer.ip());
        let rewritten = rules
            .apply(&self.inbuf[facts.head_len..total], &render)
            .map_err(|e| {
                debug!(peer = %self.peer, route = %route.id, "{e}");
                Some(Answer::error(400, "the request body is not valid JSON"))
            })?;
        self.ctx.rewritten_body = Some((n as usize, rewritten));
        // Rule values dropped were counted when the head was first written.
        request_head::write_for_server(
            snapshot,
            route,
            &req,
            self.peer.ip(),
            &self.ctx,
            strip,
            &generation.upstreams[group_index],
            server,
            &mut self.out,
        )
        .map(|_| ())
        .map_err(Some)
    }

    /// Sends the response whose head is in the upstream buffer rewritten by the route's JSON
    /// rules, when they take it; `Err(conn)`: they do not (or passed it untouched), and the
    /// ordinary relay goes on with what was read.
    pub(super) async fn relay_json_response(
        &mut self,
        conn: UpstreamConn,
        group: &UpstreamGroup,
        facts: &RequestFacts,
        consumed: usize,
    ) -> Result<Next, UpstreamConn> {
        let generation = self.generation.clone();
        let snapshot = &*generation.snapshot;
        let Some(route) = self.ctx.route.map(|r| snapshot.routes.route(r)) else {
            return Err(conn);
        };
        let (head_len, framing, upstream_keep_alive, rules, coding) = {
            let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
            let Ok(Some(resp)) = parse_response(&self.upbuf, &mut fields, facts.is_head) else {
                return Err(conn);
            };
            match plan(route, &resp, facts) {
                None => return Err(conn),
                Some(Ok((rules, coding))) => {
                    (resp.head_len, resp.body, resp.keep_alive, rules, coding)
                }
                Some(Err(skip)) => {
                    self.ctx.json_skip = Some(skip);
                    return Err(conn);
                }
            }
        };
        let mut buf = take(&mut self.upbuf);
        let buffered = read_whole(
            &conn.transport,
            &mut buf,
            head_len,
            framing,
            rules.max_bytes,
            group.read_timeout,
        )
        .await;
        self.upbuf = buf;
        let (dechunked, end) = match buffered {
            Buffered::Complete { dechunked, end } => (dechunked, end),
            Buffered::TooLarge => {
                self.ctx.json_skip = Some(JsonSkip::TooLarge);
                return Err(conn);
            }
            Buffered::Failed(e) => {
                // Nothing of the response reached the client: it gets a 502.
                debug!(upstream = %group.name, error = %e, "upstream failed during a JSON response body");
                let answer = Answer::error_and_close(502, "upstream failed during the response");
                return Ok(self.answer(answer, Instant::now()).await);
            }
        };
        let body = match &dechunked {
            Some(b) => &b[..],
            None => &self.upbuf[head_len..end],
        };
        let Some(decoded) = decode(body, coding, rules.max_bytes) else {
            self.ctx.json_skip = Some(JsonSkip::Encoded);
            return Err(conn);
        };
        let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS_CEILING];
        let rewritten = {
            let Ok(Some(req)) = parse_request(
                &self.inbuf,
                &mut headers,
                &snapshot.limits,
                &mut self.normalized,
            ) else {
                // Not the request's head any more (a bug): pass the response untouched.
                return Err(conn);
            };
            let render = self
                .ctx
                .render_context(snapshot, &route.id, &req, self.peer.ip());
            rules.apply(&decoded, &render)
        };
        let Ok(rewritten) = rewritten else {
            self.ctx.json_skip = Some(JsonSkip::NotJson);
            return Err(conn);
        };
        let keep_alive = facts.keep_alive && !self.winding_down();
        let client = ClientFraming {
            chunked: false,
            keep_alive,
            client_version: facts.version,
        };
        let mut out = take(&mut self.out);
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
        // The head is written again: its rule values were counted the first time.
        let dropped_before = self.ctx.dropped_values;
        let written = match parse_response(&self.upbuf, &mut fields, facts.is_head) {
            Ok(Some(mut resp)) => {
                resp.body = BodyFraming::Length(rewritten.len() as u64);
                write_client_head(
                    &mut out,
                    &mut self.ctx,
                    snapshot,
                    &self.inbuf,
                    &mut self.normalized,
                    self.peer.ip(),
                    &resp,
                    client,
                    coding != Coding::Identity,
                )
            }
            _ => Err(UnsafeFieldValue {
                field: "(the response head, decoded once already)".into(),
            }),
        };
        self.ctx.dropped_values = dropped_before;
        self.out = out;
        if written.is_err() {
            let answer = Answer::error_and_close(502, "invalid response from upstream");
            return Ok(self.answer(answer, Instant::now()).await);
        }
        self.out.extend_from_slice(&rewritten);
        self.inbuf.drain(..consumed);
        self.ctx.bytes_in = consumed as u64;
        // (send_out counts the bytes written.)
        if !self.send_out().await {
            self.ctx.outcome = Outcome::Cut(super::context::Side::Client);
            return Ok(Next::Abort);
        }
        self.ctx.outcome = Outcome::Relayed;
        let whole_framed = framing != BodyFraming::UntilClose && end == self.upbuf.len();
        if upstream_keep_alive && whole_framed {
            group.release(conn);
        }
        Ok(if keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        })
    }
}
