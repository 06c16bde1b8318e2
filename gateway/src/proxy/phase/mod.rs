//! The phases every request passes, in this fixed order; this list is the one place to read
//! what happens to a request. Each phase owns one concern, lives in its own module and sees
//! only what it needs: the head borrowed from the read buffer, the snapshot, the route, and the
//! request's [`RequestContext`], where it leaves what later phases read.
//!
//! | # | phase | where |
//! |---|---|---|
//! | 1 | normalise: parse the head, normalise path and host (strict RFC 9112 framing) | [`crate::http::request::parse_request`] |
//! | 2 | CORS preflight answered at the edge, matched by the method it asks for | [`cors`] |
//! | 3 | route (regex captures kept in the context; CORS fields added) | [`route`] |
//! | 4 | pre-auth limit | [`pre_auth_limit`] |
//! | 5 | authenticate | [`authenticate`] |
//! | 6 | limits and quotas | [`limits_and_quotas`] |
//! | 7 | body limit (declared size) | [`body_limit`] |
//! | 8 | cache lookup | [`cache_lookup`] |
//! | 9 | `respond` routes answer here | [`run`] |
//! | 10 | choose the upstream server | [`choose_upstream`] |
//! | 11 | request head transforms (path rewrite, header and query rules): the upstream head is written | [`request_head`] |
//! | 12 | request body filters (opt-in, bounded): vault usage, JSON rules | [`crate::vault`], [`crate::proxy::json_exchange`] |
//! | 13 | send upstream: concurrency slot, connect, head and body | [`crate::proxy::forward`] |
//! | 14 | upstream response filters: framing, hop-by-hop fields, header rules, JSON rules | [`crate::proxy::forward`], [`crate::proxy::json_exchange`] |
//! | 15 | cache store: the response recorded while it streams | [`crate::proxy::forward`], [`crate::cache::record`] |
//! | 16 | client response filters: Via, Connection | [`crate::http::encode::write_client_response`] |
//! | 17 | log | [`log`] |
//!
//! Phases 2 to 11 run synchronously in [`run`]; a phase that ends the request returns an
//! [`Exit`]. Every gateway answer, from any phase or from the exchange with the upstream, is
//! written by the connection's one exit ([`crate::proxy::connection`]'s `answer`), and every
//! request, however it ended, reaches the log phase. Phases not built yet have a slot in this
//! order, not an empty module: a phase that does nothing is not called. Dispatch is static.

pub mod authenticate;
pub mod body_limit;
pub mod cache_lookup;
pub mod choose_upstream;
pub mod cors;
pub mod limits_and_quotas;
pub mod log;
pub mod pre_auth_limit;
pub mod request_head;
pub mod route;
mod traffic_subject;

use std::{
    net::IpAddr,
    sync::{atomic::AtomicUsize, Arc},
};

use super::{
    answer::Answer,
    context::RequestContext,
    worker::{Generation, Worker},
};
use crate::routing::Action;

/// How a request leaves the request phases early.
#[derive(Debug)]
pub enum Exit {
    /// The gateway answers itself.
    Answer(Answer),
    /// A JWT names a key issuer `0` does not have yet: wait for a refetch, then run the phases
    /// again (once).
    AwaitKeys(usize),
    /// The route judges the request by its body (a vault route reads the model): read until
    /// the buffer holds this many bytes of head and body, then run the phases again.
    AwaitBody(usize),
    /// A vault self-service request of the authenticated consumer, answered by the gateway
    /// off the worker's thread (it writes the store).
    SelfService,
}

impl From<Answer> for Exit {
    fn from(a: Answer) -> Exit {
        Exit::Answer(a)
    }
}

/// Where a request the phases let through goes; its upstream head is in the head buffer.
#[derive(Debug)]
pub struct Forward {
    /// Index of the upstream group in the generation's upstreams.
    pub group: usize,
    pub server: usize,
    /// The concurrency count this request is held against, when the route has a limit.
    pub in_flight: Option<Arc<AtomicUsize>>,
    /// The credential stripped from the upstream head (for writing it again).
    pub strip: Option<crate::auth::CredentialSource>,
    /// The route's JSON rules rewrite the body: read it whole, then write the head again.
    pub rewrite_json_body: bool,
}

/// Runs phases 2 to 11 for `req` from `peer`, with the part of its body already read in
/// `body`; on [`Forward`] the upstream head is in `out`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    req: &crate::http::request::RequestHead,
    body: &[u8],
    peer: IpAddr,
    worker: &Worker,
    generation: &Generation,
    ctx: &mut RequestContext,
    out: &mut Vec<u8>,
    may_await_keys: bool,
) -> Result<Forward, Exit> {
    let snapshot = &*generation.snapshot;
    cors::preflight(snapshot, req, ctx)?;
    let route = route::find(snapshot, req, ctx)?;
    cors::add_fields(route, req, ctx);
    // A vault route reads its (bounded) body whole before any phase counts the request, so
    // running the phases again once it is in counts nothing twice.
    // Only for a caller whose key works (a vault route), and within the route's body limit:
    // strangers cannot make the gateway hold megabytes for them.
    let unread_body = match req.body {
        crate::http::BodyFraming::Length(n) => usize::try_from(n).ok().filter(|n| body.len() < *n),
        _ => None,
    };
    // (The key is looked at only when there is a body to wait for: the authenticate phase
    // looks again in any case.)
    if let Some(n) = unread_body {
        let cap = match (&route.vault, &route.action) {
            (Some(provider), _) if authenticate::virtual_key_works(snapshot, provider, req) => {
                crate::vault::request::MAX_JUDGED_BODY_BYTES
            }
            (_, Action::VaultSelfService) => crate::vault::self_service::MAX_BODY_BYTES,
            _ => 0,
        };
        let cap = route.max_body_bytes.map_or(cap, |m| cap.min(m as usize));
        if n <= cap {
            return Err(Exit::AwaitBody(req.head_len + n));
        }
    }
    pre_auth_limit::check(snapshot, route, req, peer)?;
    let strip = authenticate::run(
        snapshot,
        &worker.tokens,
        route,
        req,
        body,
        ctx,
        may_await_keys,
    )?;
    limits_and_quotas::check(snapshot, route, req, peer, ctx)?;
    body_limit::check(route, req, ctx)?;
    cache_lookup::run(snapshot, route, req, ctx)?;
    let group_index = match &route.action {
        Action::Respond(_) => return Err(Answer::Static { route: route.index }.into()),
        Action::VaultSelfService => return Err(Exit::SelfService),
        Action::Upstream(group) => *group,
    };
    let group = &generation.upstreams[group_index];
    let server = choose_upstream::pick(
        snapshot,
        group,
        group_index,
        req,
        peer,
        ctx,
        &mut worker.rng.borrow_mut(),
        0,
    );
    let dropped =
        request_head::write_for_server(snapshot, route, req, peer, ctx, strip, group, server, out)?;
    ctx.dropped_values += dropped;
    let consumer = ctx.caller.as_ref().map(|c| c.identity(snapshot).0);
    Ok(Forward {
        group: group_index,
        server,
        in_flight: route.concurrency.as_ref().map(|c| c.counter(consumer)),
        strip,
        rewrite_json_body: body_limit::rewrites_json(route, req),
    })
}

/// The request phases without sockets: a decoded head in; the exit, the context and the
/// upstream head out.
#[cfg(test)]
mod tests {
    use std::mem::MaybeUninit;

    use super::*;
    use crate::{
        http::request::parse_request,
        proxy::{
            context::Caller,
            test_bench::{bench, Bench},
        },
    };

    /// Runs the phases for `raw` from 203.0.113.7; returns the flow, the context and the
    /// upstream head written.
    fn run_for(b: &Bench, raw: &str) -> (Result<Forward, Exit>, RequestContext, String) {
        let raw = raw.replace("KEY", &b.key);
        let mut headers = [const { MaybeUninit::uninit() }; 64];
        let mut normalized = Vec::new();
        let generation = b.worker.generation();
        let req = parse_request(
            raw.as_bytes(),
            &mut headers,
            &generation.snapshot.limits,
            &mut normalized,
        )
        .unwrap()
        .unwrap();
        let mut ctx = RequestContext::new(tokio::time::Instant::now());
        let mut out = Vec::new();
        let flow = run(
            &req,
            &[],
            "203.0.113.7".parse().unwrap(),
            &b.worker,
            &generation,
            &mut ctx,
            &mut out,
            true,
        );
        (flow, ctx, String::from_utf8(out).unwrap())
    }

    fn status(flow: &Result<Forward, Exit>) -> u16 {
        match flow {
            Ok(_) => 0,
            Err(Exit::Answer(Answer::Error { status, .. })) => *status,
            Err(Exit::Answer(Answer::Denied(e))) => e.status(),
            Err(Exit::Answer(Answer::TooMany { .. })) => 429,
            Err(Exit::Answer(Answer::Static { .. })) => 200,
            Err(Exit::Answer(Answer::RedirectHttps)) => 308,
            Err(Exit::Answer(Answer::Vault { refusal, .. })) => refusal.status(),
            Err(Exit::Answer(Answer::SelfService { status })) => *status,
            Err(Exit::AwaitKeys(_)) => 1,
            Err(Exit::AwaitBody(_)) => 2,
            Err(Exit::SelfService) => 3,
            Err(Exit::Answer(Answer::Cached)) => 4,
            Err(Exit::Answer(Answer::Preflight)) => 204,
        }
    }

    #[test]
    fn forwards_the_normalised_path_with_identity_and_without_the_key() {
        let b = bench("[[routes]]\nid = \"api\"\nmatch = { path_prefix = \"/api/\" }\nupstream = \"u\"\nstrip_prefix = true\nauth = { methods = [\"api_key\"] }\n");
        let (flow, ctx, head) = run_for(
            &b,
            "GET /api/./v1//%75sers?x=1 HTTP/1.1\r\nHost: a\r\nX-API-Key: KEY\r\nX-Consumer-Id: forged\r\n\r\n",
        );
        let forward = flow.expect("forwarded");
        assert_eq!((forward.group, forward.server), (0, 0));
        assert!(head.starts_with("GET /v1/users?x=1 HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("x-consumer-id: alice\r\n"), "{head}");
        assert!(
            !head.contains("forged") && !head.to_ascii_lowercase().contains("x-api-key"),
            "{head}"
        );
        assert!(head.contains("x-forwarded-for: 203.0.113.7\r\n"), "{head}");
        // What later phases read.
        let snapshot = b.worker.generation().snapshot.clone();
        assert_eq!(snapshot.routes.route(ctx.route.unwrap()).id, "api");
        assert!(matches!(ctx.caller, Some(Caller::Listed(_))));
        assert_eq!(ctx.caller.as_ref().unwrap().identity(&snapshot).0, "alice");
        assert_eq!(ctx.upstream, Some((0, 0)));
    }

    #[test]
    fn each_phase_answers_for_itself() {
        let b = bench(
            "[[routes]]\nmatch = { path_prefix = \"/open/\" }\nupstream = \"u\"\n\
             [[routes]]\nmatch = { path_prefix = \"/keyed/\" }\nupstream = \"u\"\nauth = { methods = [\"api_key\"] }\n\
             pre_auth_limits = [{ key = \"client\", rate = 2, per = \"1h\" }]\n\
             [[routes]]\nmatch = { path = \"/small\" }\nupstream = \"u\"\nmax_body_bytes = 4\n\
             [[routes]]\nmatch = { path = \"/hello\" }\nrespond = { status = 200, body = \"hi\" }\n",
        );
        let cases = [
            ("GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n", 404),
            ("GET /open/x HTTP/1.1\r\nHost: a\r\n\r\n", 0),
            ("GET /hello HTTP/1.1\r\nHost: a\r\n\r\n", 200),
            (
                "POST /small HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
                413,
            ),
            // The pre-auth limit counts before the key is looked at: 2, then refused.
            ("GET /keyed/x HTTP/1.1\r\nHost: a\r\n\r\n", 401),
            (
                "GET /keyed/x HTTP/1.1\r\nHost: a\r\nX-API-Key: wrong\r\n\r\n",
                401,
            ),
            (
                "GET /keyed/x HTTP/1.1\r\nHost: a\r\nX-API-Key: KEY\r\n\r\n",
                429,
            ),
        ];
        for (raw, want) in cases {
            let (flow, _, _) = run_for(&b, raw);
            assert_eq!(status(&flow), want, "{raw:?}: {flow:?}");
        }
    }

    #[test]
    fn quotas_are_taken_into_the_context_and_a_later_refusal_leaves_them_there() {
        let b = bench(
            "[[routes]]\nmatch = { path_prefix = \"/q/\" }\nupstream = \"u\"\nmax_body_bytes = 4\n\
             auth = { methods = [\"api_key\"] }\n\
             quotas = [{ name = \"daily\", key = \"consumer\", limit = 5, period = \"day\" }]\n",
        );
        let (flow, ctx, _) = run_for(&b, "GET /q/x HTTP/1.1\r\nHost: a\r\nX-API-Key: KEY\r\n\r\n");
        assert!(flow.is_ok(), "{flow:?}");
        assert!(!ctx.charges.is_empty());
        // The body limit refuses after the quota was taken: the charge stays in the context,
        // for the log phase to give back.
        let (flow, ctx, _) = run_for(
            &b,
            "POST /q/x HTTP/1.1\r\nHost: a\r\nX-API-Key: KEY\r\nContent-Length: 9\r\n\r\n",
        );
        assert_eq!(status(&flow), 413);
        assert!(!ctx.charges.is_empty());
    }
}
