//! One request's context: everything the phases learn about a request across its life (route,
//! caller, upstream server, timings, status, bytes, outcome), read by the later phases and by
//! the log phase. One context lives per connection and is reset for each request, so keeping it
//! allocates nothing per request.

use std::{fmt, rc::Rc};

use tokio::time::Instant;

use super::answer::Answer;
use crate::{
    auth::TokenIdentity,
    http::{request::RequestHead, BodyFraming, Version},
    proxy::snapshot::ConfigSnapshot,
    quotas::QuotaCharges,
};

/// A request's id: unique per process run (a random per-worker base plus a counter), shown as
/// 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestId(pub u128);

impl RequestId {
    /// The id as 32 lowercase hex digits. Every request writes its id into its fields, so this
    /// goes through `hex`'s table rather than the formatter's padded-integer path.
    pub fn hex(self) -> [u8; 32] {
        let mut digits = [0u8; 32];
        // 16 bytes always fit 32 digits: the call cannot fail.
        let _ = hex::encode_to_slice(self.0.to_be_bytes(), &mut digits);
        digits
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hex digits are ASCII.
        f.write_str(std::str::from_utf8(&self.hex()).unwrap_or_default())
    }
}

/// Hands out a worker's request ids: a random 64-bit base per worker, then a counter, so ids
/// from different workers and different runs do not collide and making one costs an add.
pub struct RequestIds {
    base: u64,
    next: std::cell::Cell<u64>,
}

impl RequestIds {
    pub fn new(worker: usize) -> RequestIds {
        let mut seed = [0u8; 8];
        // Without the OS's randomness ids are still unique within the run: the worker number
        // keeps workers apart.
        let _ = getrandom::fill(&mut seed);
        RequestIds {
            base: u64::from_le_bytes(seed) ^ (worker as u64).rotate_right(8),
            next: std::cell::Cell::new(0),
        }
    }

    pub fn next(&self) -> RequestId {
        let n = self.next.get();
        self.next.set(n.wrapping_add(1));
        RequestId((u128::from(self.base) << 64) | u128::from(n))
    }
}

/// Who the authenticate phase established the caller to be.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A consumer of the config's list (an API key), by its index in the snapshot's table.
    Listed(usize),
    /// A verified JWT's subject, shared with the worker's token cache.
    Token(Rc<TokenIdentity>),
    /// A virtual key of the vault, and the provider key chosen to replace it upstream.
    Virtual(VirtualCaller),
}

pub use crate::vault::VaultRequest;

/// A caller admitted by a virtual key on a vault route.
#[derive(Debug, Clone)]
pub struct VirtualCaller {
    pub key: std::sync::Arc<crate::vault::index::KeyEntry>,
    pub provider_key: std::sync::Arc<crate::vault::index::ProviderSecret>,
    pub kind: crate::config::ProviderKind,
}

impl Caller {
    /// The consumer id and its groups joined with `,`.
    pub fn identity<'a>(&'a self, snapshot: &'a ConfigSnapshot) -> (&'a str, &'a str) {
        match self {
            Caller::Listed(i) => {
                let c = snapshot.consumers.get(*i);
                (&c.id, &c.groups_header)
            }
            Caller::Token(t) => (&t.consumer, &t.groups_header),
            Caller::Virtual(v) => (&v.key.owner_label, ""),
        }
    }
}

/// A connection's verified client certificate, and the header its subject goes upstream in.
#[derive(Debug)]
pub struct ClientCert {
    pub identity: crate::tls::client_identity::ClientIdentity,
    pub header: std::sync::Arc<str>,
}

/// What a request's framing tells the connection loop, kept once its head is no longer
/// borrowed.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts {
    pub head_len: usize,
    pub body: BodyFraming,
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub is_head: bool,
    pub version: Version,
    /// Safe to send again on a fresh connection if a pooled one turns out to be dead.
    pub idempotent: bool,
    pub upgrade: bool,
    pub max_body_bytes: Option<u64>,
}

impl RequestFacts {
    pub fn of(req: &RequestHead) -> Self {
        RequestFacts {
            head_len: req.head_len,
            body: req.body,
            keep_alive: req.keep_alive,
            expect_continue: req.expect_continue,
            is_head: req.is_head(),
            version: req.version,
            idempotent: matches!(
                req.method,
                "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
            ),
            upgrade: req.upgrade.is_some(),
            max_body_bytes: None,
        }
    }

    /// For a head that could not be parsed: nothing is known, nothing is kept.
    pub fn unparsed() -> Self {
        RequestFacts {
            head_len: 0,
            body: BodyFraming::None,
            keep_alive: false,
            expect_continue: false,
            is_head: false,
            version: Version::Http11,
            idempotent: false,
            upgrade: false,
            max_body_bytes: None,
        }
    }
}

/// Which side ended an exchange early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// How a request ended, for the phases after the exchange and for the log.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// Still in the phases.
    Pending,
    /// The gateway answered itself (a refusal, an error, a `respond` route).
    Answered(Answer),
    /// The upstream's response was relayed completely.
    Relayed,
    /// The response was cut short: `Side` stopped before its end.
    Cut(Side),
    /// The connection became a tunnel (101 Switching Protocols).
    Tunnelled,
}

/// When each step of a request happened. `accepted` is the connection's accept.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub accepted: Instant,
    /// The first byte of this request's head was in the buffer.
    pub head_started: Option<Instant>,
    pub upstream_connected: Option<Instant>,
    pub first_response_byte: Option<Instant>,
    pub done: Option<Instant>,
}

/// One request's context.
#[derive(Debug)]
pub struct RequestContext {
    pub id: RequestId,
    pub timings: Timings,
    /// The head has been parsed once and the request's correlation and log fields set from
    /// it: a head decoded again (after keys or a body arrive) does not set them twice.
    pub head_parsed: bool,
    pub facts: RequestFacts,
    /// The client reached the gateway over TLS.
    pub https: bool,
    /// The connection's verified client certificate, when it presented one.
    pub client_cert: Option<Rc<ClientCert>>,
    /// A vault request: its reservations, price and usage, settled by the log phase.
    pub vault: Option<VaultRequest>,
    /// What the cache does with the request, on a route that caches.
    pub cache: Option<crate::cache::CacheRequest>,
    /// The buffer cache keys are built in (kept from one request to the next).
    pub cache_key: Vec<u8>,
    /// The JSON body of a self-service answer.
    pub answer_body: Vec<u8>,
    /// The method, as an index into [`crate::metrics::labels::METHODS`].
    pub method: usize,
    /// The matched route's index in the request's snapshot.
    pub route: Option<usize>,
    pub caller: Option<Caller>,
    /// The upstream group (index in the snapshot's upstream names) and server.
    pub upstream: Option<(usize, usize)>,
    /// Quotas taken for the request; the log phase gives them back unless the upstream
    /// received the request or a `respond` route answered it.
    pub charges: QuotaCharges,
    /// The request id and trace context, and their field lines.
    pub correlation: super::correlation::Correlation,
    /// The method and path (and query, when the access log keeps it) as logged; filled only
    /// when the access log is on.
    pub log_method: Vec<u8>,
    pub log_target: Vec<u8>,
    /// Where a redirecting listener sends the request (`https://host/path?query`).
    pub redirect_location: Vec<u8>,
    /// The status sent to the client (0 until one was).
    pub status: u16,
    /// Request bytes consumed from the client (head and body as framed).
    pub bytes_in: u64,
    /// Response bytes written to the client (heads and body).
    pub bytes_out: u64,
    pub outcome: Outcome,
    /// The capture spans of a regex route's match (kept from one request to the next).
    pub captures: Vec<Option<regex_automata::util::primitives::NonMaxUsize>>,
    /// The body sent upstream instead of the client's, rewritten by the route's JSON rules:
    /// the client body's length, and the new body.
    pub rewritten_body: Option<(usize, Vec<u8>)>,
    /// Rendered rule values dropped because they held CR, LF or NUL.
    pub dropped_values: u64,
    /// Why the route's response JSON rules left the response untouched, when they did.
    pub json_skip: Option<crate::transform::json_body::JsonSkip>,
    /// The route's CORS fields are in the response fields already (phases may run twice).
    pub cors_fields_added: bool,
    /// The request counted in flight to its upstream server, until its exchange ends.
    pub server_load: Option<crate::upstream::balance::InFlight>,
}

impl RequestContext {
    pub fn new(accepted: Instant) -> RequestContext {
        RequestContext {
            id: RequestId::default(),
            head_parsed: false,
            timings: Timings {
                accepted,
                head_started: None,
                upstream_connected: None,
                first_response_byte: None,
                done: None,
            },
            facts: RequestFacts::unparsed(),
            https: false,
            client_cert: None,
            vault: None,
            cache: None,
            cache_key: Vec::new(),
            answer_body: Vec::new(),
            method: crate::metrics::labels::METHODS.len() - 1,
            route: None,
            caller: None,
            upstream: None,
            charges: QuotaCharges::default(),
            correlation: Default::default(),
            log_method: Vec::new(),
            log_target: Vec::new(),
            redirect_location: Vec::new(),
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            outcome: Outcome::Pending,
            captures: Vec::new(),
            rewritten_body: None,
            dropped_values: 0,
            json_skip: None,
            cors_fields_added: false,
            server_load: None,
        }
    }

    /// Clears what the previous request on the connection left, keeping the connection's
    /// accept time. Charges left over were settled by the log phase.
    pub fn reset(&mut self) {
        debug_assert!(self.charges.is_empty(), "charges settled by the log phase");
        debug_assert!(
            self.vault.is_none(),
            "vault reservations settled by the log phase"
        );
        // The buffers keep their capacity from one request to the next.
        let mut correlation = std::mem::take(&mut self.correlation);
        let mut log_method = std::mem::take(&mut self.log_method);
        let mut log_target = std::mem::take(&mut self.log_target);
        let mut redirect_location = std::mem::take(&mut self.redirect_location);
        let captures = std::mem::take(&mut self.captures);
        // The key buffer comes back from the cache state, if it took it.
        let mut cache_key = match self.cache.take() {
            Some(c) => c.key,
            None => std::mem::take(&mut self.cache_key),
        };
        cache_key.clear();
        redirect_location.clear();
        correlation.clear();
        log_method.clear();
        log_target.clear();
        let https = self.https;
        let client_cert = self.client_cert.take();
        *self = RequestContext::new(self.timings.accepted);
        self.https = https;
        self.client_cert = client_cert;
        self.correlation = correlation;
        self.log_method = log_method;
        self.log_target = log_target;
        self.redirect_location = redirect_location;
        self.cache_key = cache_key;
        self.captures = captures;
    }

    /// The body sent upstream instead of the client's, when the gateway rewrote it: the
    /// client body's length, and the new body.
    pub fn replaced_body(&self) -> Option<(usize, &[u8])> {
        self.vault
            .as_ref()
            .and_then(|v| v.upstream_body.as_ref())
            .or(self.rewritten_body.as_ref())
            .map(|(n, body)| (*n, &body[..]))
    }

    /// What templates see of this request; `req` is its head (the path the route matched).
    pub fn render_context<'a>(
        &'a self,
        snapshot: &'a ConfigSnapshot,
        route_id: &'a str,
        req: &'a RequestHead,
        peer: std::net::IpAddr,
    ) -> crate::transform::template::RenderContext<'a> {
        crate::transform::template::RenderContext {
            consumer: self.caller.as_ref().map(|c| c.identity(snapshot)),
            token: match &self.caller {
                Some(Caller::Token(t)) => Some(t),
                _ => None,
            },
            captures: &self.captures,
            ..crate::transform::template::RenderContext::of_request(
                req,
                peer,
                route_id,
                self.correlation.request_id(),
            )
        }
    }

    /// True once a request began arriving (an idle connection closing is no request).
    pub fn started(&self) -> bool {
        self.timings.head_started.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::RequestId;

    #[test]
    fn request_id_is_32_lowercase_hex_digits_most_significant_first() {
        for id in [0, 1, 0xabc, u128::from(u64::MAX) << 64 | 7, u128::MAX] {
            let shown = RequestId(id).to_string();
            assert_eq!(shown, format!("{id:032x}"));
            assert_eq!(&RequestId(id).hex()[..], shown.as_bytes());
        }
    }
}
