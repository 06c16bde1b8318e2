//! The stages a decoded request passes through, in order: route, then the admission stages
//! (body limit now; authentication, rate limits and quotas, cache and transforms plug in here
//! in that order), then the choice of upstream server and the rebuilt upstream head.
//!
//! Every stage runs synchronously on the head borrowed from the read buffer, so no header value
//! is copied before the one copy into the upstream head.

use std::net::IpAddr;

use crate::{
    auth::find_credential,
    http::{
        encode::{self, Identity},
        request::RequestHead,
        BodyFraming, Version,
    },
    routing::Action,
    runtime::worker::Worker,
};

/// What the connection does with a request.
#[derive(Debug)]
pub enum Plan {
    /// The gateway answers itself.
    Answer(Answer),
    /// Forward to `server` of upstream group `group`; the upstream head was written to `out`.
    Forward { group: usize, server: usize },
}

/// One of the gateway's own answers.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// An error with a short plain-text explanation. `close` means the request's framing cannot
    /// be trusted or its body cannot be skipped, so the connection ends after the answer.
    Error {
        status: u16,
        detail: &'static str,
        close: bool,
    },
    /// The `respond` action of the route with this index.
    Static { route: usize },
    /// The route's access policy refused the request (401 with WWW-Authenticate, or 403).
    Denied(crate::auth::AuthError),
}

/// What the connection loop needs to remember of a request once its head is no longer
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
}

/// Runs the stages for `req`; writes the upstream head to `out` when the plan is to forward.
pub fn plan(
    req: &RequestHead,
    facts: &mut RequestFacts,
    peer: IpAddr,
    worker: &Worker,
    out: &mut Vec<u8>,
) -> Plan {
    let snapshot = &worker.snapshot;
    // Stage 1: route.
    let Some(route) = snapshot
        .routes
        .find(req.host, req.path, req.method.as_bytes())
    else {
        return Plan::Answer(Answer::Error {
            status: 404,
            detail: "no route matches this request",
            close: false,
        });
    };
    facts.max_body_bytes = route.max_body_bytes;

    // Stage 2: admission. The declared body size is checked before any of it is read.
    if let (Some(limit), BodyFraming::Length(n)) = (route.max_body_bytes, req.body) {
        if n > limit {
            return Plan::Answer(Answer::Error {
                status: 413,
                detail: "request body exceeds the route's limit",
                close: true,
            });
        }
    }

    // Stage 3: who is calling. (Rate limits and quotas, then cache and transforms, follow here.)
    let mut identity = Identity::default();
    if let Some(policy) = &route.auth {
        let credential = find_credential(req, &snapshot.config.auth);
        match snapshot.consumers.admit(policy, credential.as_ref()) {
            Ok(consumer) => {
                identity.consumer = Some(snapshot.consumers.get(consumer));
                if !policy.keep_credentials {
                    identity.strip = credential.map(|c| c.source);
                }
            }
            Err(e) => return Plan::Answer(Answer::Denied(e)),
        }
    }

    // Stage 4: act.
    match &route.action {
        Action::Respond(_) => Plan::Answer(Answer::Static { route: route.index }),
        Action::Upstream(group_index) => {
            let group = &worker.upstreams[*group_index];
            let server = group.pick();
            out.clear();
            encode::write_upstream_request(
                out,
                req,
                route,
                &identity,
                &snapshot.config.auth,
                peer,
                "http",
                group.host_value(server),
            );
            Plan::Forward {
                group: *group_index,
                server,
            }
        }
    }
}
