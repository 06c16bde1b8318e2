//! The stages a decoded request passes through, in order: route, then the admission stages
//! (body limit now; authentication, rate limits and quotas, cache and transforms plug in here
//! in that order), then the choice of upstream server and the rebuilt upstream head.
//!
//! Every stage runs synchronously on the head borrowed from the read buffer, so no header value
//! is copied before the one copy into the upstream head.

use std::net::IpAddr;

use tracing::{debug, error};

use crate::{
    auth::{find_credential, AuthError, CredentialSource, JwtError},
    config::AuthMethod,
    http::{request::RequestHead, BodyFraming, Version},
    limits::{self, LimitSubject},
    log_throttle::Noisy,
    proxy::upstream_head::{write_upstream_request, Identity},
    proxy::worker::{Generation, Worker},
    quotas::{QuotaCharges, QuotaRefusal},
    routing::Action,
    throttled_warn,
};

/// What the connection does with a request.
#[derive(Debug)]
pub enum Plan {
    /// The gateway answers itself.
    Answer(Answer),
    /// Forward to `server` of upstream group `group` for route `route`; the upstream head was
    /// written to `out`.
    Forward {
        group: usize,
        server: usize,
        /// Quotas taken for the request: given back if it is refused before reaching the
        /// upstream.
        charges: QuotaCharges,
        /// The route, and the concurrency count this request is held against, when the route
        /// has a concurrency limit.
        in_flight: Option<(usize, std::sync::Arc<std::sync::atomic::AtomicUsize>)>,
    },
    /// A JWT names a key issuer `0` does not have yet: wait for a refetch, then plan again.
    AwaitKeys(usize),
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
    /// A rate limit or quota of route `route` refused the request: 429, retry after that many
    /// seconds.
    TooMany {
        route: usize,
        policy: TrafficPolicy,
        retry_after_secs: u64,
    },
}

/// Which of a route's traffic policies refused a request.
#[derive(Debug, Clone, Copy)]
pub enum TrafficPolicy {
    /// One of the route's pre-auth limits.
    PreAuthLimit(usize),
    Limit(usize),
    Quota(usize),
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
/// `may_await_keys`: whether a JWT naming an unknown key may make the connection wait for a
/// refetch (once per request).
pub fn plan(
    req: &RequestHead,
    facts: &mut RequestFacts,
    peer: IpAddr,
    worker: &Worker,
    generation: &Generation,
    out: &mut Vec<u8>,
    may_await_keys: bool,
) -> Plan {
    let snapshot = &generation.snapshot;
    // Stage 1: route.
    let Some(route) = snapshot
        .routes
        .find(req.route_host, req.path, req.method.as_bytes())
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

    // Stage 3: limits counted before credentials, so junk credentials cost no more than any
    // other request.
    if !route.pre_auth_limits.is_empty() {
        let header = |name: &str| find_header(req, name);
        let subject = LimitSubject {
            client: peer,
            consumer: None,
            header: &header,
            hasher: &snapshot.quota_store.hasher,
        };
        if let Err(refusal) = limits::check(
            &route.pre_auth_limits,
            &subject,
            snapshot.cluster.as_deref(),
        ) {
            return Plan::Answer(too_many(route, &route.pre_auth_limits, refusal, true));
        }
    }

    // Stage 4: who is calling. (Rate limits and quotas, then cache and transforms, follow here.)
    let mut identity = Identity {
        replaced: &snapshot.issuers.claim_header_names,
        ..Identity::default()
    };
    // Keeps a verified token's identity alive while the upstream head borrows from it.
    let token_identity;
    if let Some(policy) = &route.auth {
        let credential = find_credential(req, &snapshot.config.auth);
        let accepts = |m| policy.methods.contains(&m);
        match credential {
            None => return Plan::Answer(Answer::Denied(AuthError::Missing)),
            Some(c)
                if accepts(AuthMethod::Jwt)
                    && c.source == CredentialSource::Bearer
                    && looks_like_jwt(c.value) =>
            {
                let mut tokens = worker.tokens.borrow_mut();
                let keys_epoch = snapshot.issuers.keys_epoch();
                token_identity = match tokens.get(c.value) {
                    Some(t) => t,
                    None if tokens.refused(c.value, keys_epoch).is_some() => {
                        return Plan::Answer(Answer::Denied(AuthError::Invalid))
                    }
                    None => match snapshot.issuers.verify(c.value) {
                        Ok(t) => tokens.insert(c.value, t),
                        Err(JwtError::UnknownKey(issuer)) if may_await_keys => {
                            return Plan::AwaitKeys(issuer)
                        }
                        Err(e) => {
                            tokens.remember_refusal(c.value, e, keys_epoch);
                            debug!(error = ?e, "token refused");
                            return Plan::Answer(Answer::Denied(AuthError::Invalid));
                        }
                    },
                };
                drop(tokens);
                if !token_identity.allowed_by(policy) {
                    return Plan::Answer(Answer::Denied(AuthError::Forbidden));
                }
                identity.consumer = Some((&token_identity.consumer, &token_identity.groups_header));
                identity.claim_headers = &token_identity.claim_headers;
                identity.strip = (!policy.keep_credentials).then_some(c.source);
            }
            Some(c) if accepts(AuthMethod::ApiKey) => {
                match snapshot.consumers.admit(policy, Some(&c)) {
                    Ok(consumer) => {
                        let consumer = snapshot.consumers.get(consumer);
                        identity.consumer = Some((&consumer.id, &consumer.groups_header));
                        identity.strip = (!policy.keep_credentials).then_some(c.source);
                    }
                    Err(e) => return Plan::Answer(Answer::Denied(e)),
                }
            }
            Some(_) => return Plan::Answer(Answer::Denied(AuthError::Invalid)),
        }
    }

    // Stage 5: rate limits, then quotas (cache and transforms follow here).
    let mut charges = QuotaCharges::default();
    if !route.limits.is_empty() || !route.quotas.is_empty() {
        let header = |name: &str| find_header(req, name);
        let subject = LimitSubject {
            client: peer,
            consumer: identity.consumer.map(|(id, _)| id),
            header: &header,
            hasher: &snapshot.quota_store.hasher,
        };
        let cluster = snapshot.cluster.as_deref();
        if let Err(refusal) = limits::check(&route.limits, &subject, cluster) {
            return Plan::Answer(too_many(route, &route.limits, refusal, false));
        }
        for (i, quota) in route.quotas.iter().enumerate() {
            match snapshot.quota_store.take(quota, &subject, cluster) {
                Ok(charge) => charges.push(charge),
                Err(refusal) => {
                    // Refused here: the quotas taken so far are given back.
                    charges.refund(&snapshot.quota_store, cluster);
                    return Plan::Answer(match refusal {
                        QuotaRefusal::Spent(retry_after_secs) => Answer::TooMany {
                            route: route.index,
                            policy: TrafficPolicy::Quota(i),
                            retry_after_secs,
                        },
                        QuotaRefusal::HandedOver => Answer::Error {
                            status: 503,
                            detail: "the gateway is being upgraded: try again",
                            close: true,
                        },
                        QuotaRefusal::Full => {
                            throttled_warn!(Noisy::StateFull, route = %route.id, quota = %quota.name, "quota store full: a new key was refused");
                            Answer::Error {
                                status: 429,
                                detail: "quota capacity reached: new callers are refused until the period ends",
                                close: false,
                            }
                        }
                    });
                }
            }
        }
    }

    // Stage 6: act.
    match &route.action {
        Action::Respond(_) => Plan::Answer(Answer::Static { route: route.index }),
        Action::Upstream(group_index) => {
            let group = &generation.upstreams[*group_index];
            let server = group.pick();
            out.clear();
            if let Err(e) = write_upstream_request(
                out,
                req,
                route,
                &identity,
                &snapshot.config.auth,
                peer,
                "http",
                group.host_value(server),
            ) {
                // A bug upstream of the encoder, never the client's doing: say which field.
                error!(route = %route.id, field = e.field, "{e}");
                charges.refund(&snapshot.quota_store, snapshot.cluster.as_deref());
                return Plan::Answer(Answer::Error {
                    status: 500,
                    detail: "the gateway could not build the upstream request",
                    close: false,
                });
            }
            Plan::Forward {
                group: *group_index,
                server,
                charges,
                in_flight: route
                    .concurrency
                    .as_ref()
                    .map(|c| (route.index, c.counter(identity.consumer.map(|(id, _)| id)))),
            }
        }
    }
}

fn find_header<'b>(req: &RequestHead<'b, '_>, name: &str) -> Option<&'b [u8]> {
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The 429 for `refusal` by one of `limits` (the route's pre-auth limits or its limits).
fn too_many(
    route: &crate::routing::Route,
    limits: &[limits::Limit],
    refusal: limits::Refusal,
    pre_auth: bool,
) -> Answer {
    let index = limits
        .iter()
        .position(|l| std::ptr::eq(l, refusal.limit))
        .unwrap_or(0);
    let retry = refusal.retry_after.as_secs() + u64::from(refusal.retry_after.subsec_nanos() > 0);
    Answer::TooMany {
        route: route.index,
        policy: if pre_auth {
            TrafficPolicy::PreAuthLimit(index)
        } else {
            TrafficPolicy::Limit(index)
        },
        retry_after_secs: retry.max(1),
    }
}

/// A JWT is three base64url parts; API keys never contain a dot.
fn looks_like_jwt(token: &[u8]) -> bool {
    token.iter().filter(|b| **b == b'.').count() == 2
}

/// The stages without sockets: a decoded head in, a plan (and the upstream head) out.
#[cfg(test)]
mod tests {
    use std::{mem::MaybeUninit, path::Path, sync::Arc};

    use super::*;
    use crate::{
        config::Config,
        http::request::parse_request,
        proxy::snapshot::{ConfigSnapshot, Published},
    };

    struct Bench {
        worker: Worker,
        /// alice's API key.
        key: String,
        _data: tempfile::TempDir,
    }

    fn bench(routes: &str) -> Bench {
        let data = tempfile::tempdir().unwrap();
        let (key, hash) = crate::auth::new_key();
        let src = format!(
            "[quotas]\ndata_dir = \"{}\"\n[upstreams.u]\nservers = [\"127.0.0.1:9\"]\n[[consumers]]\nid = \"alice\"\napi_keys = [\"{hash}\"]\n{routes}",
            data.path().display()
        );
        let config = Config::parse(Path::new("t.toml"), &src).unwrap();
        let published: Arc<Published> = Published::new(ConfigSnapshot::new(config).unwrap());
        Bench {
            worker: Worker::new(0, published, None),
            key,
            _data: data,
        }
    }

    /// Plans `raw` from 203.0.113.7; returns the plan and the upstream head written.
    fn plan_for(b: &Bench, raw: &str) -> (Plan, String) {
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
        let mut facts = RequestFacts::of(&req);
        let mut out = Vec::new();
        let plan = plan(
            &req,
            &mut facts,
            "203.0.113.7".parse().unwrap(),
            &b.worker,
            &generation,
            &mut out,
            true,
        );
        (plan, String::from_utf8(out).unwrap())
    }

    fn status(plan: &Plan) -> u16 {
        match plan {
            Plan::Forward { .. } => 0,
            Plan::Answer(Answer::Error { status, .. }) => *status,
            Plan::Answer(Answer::Denied(e)) => e.status(),
            Plan::Answer(Answer::TooMany { .. }) => 429,
            Plan::Answer(Answer::Static { .. }) => 200,
            Plan::AwaitKeys(_) => 1,
        }
    }

    #[test]
    fn forwards_the_normalised_path_with_identity_and_without_the_key() {
        let b = bench("[[routes]]\nmatch = { path_prefix = \"/api/\" }\nupstream = \"u\"\nstrip_prefix = true\nauth = { methods = [\"api_key\"] }\n");
        let (plan, head) = plan_for(
            &b,
            "GET /api/./v1//%75sers?x=1 HTTP/1.1\r\nHost: a\r\nX-API-Key: KEY\r\nX-Consumer-Id: forged\r\n\r\n",
        );
        assert!(matches!(plan, Plan::Forward { .. }), "{plan:?}");
        assert!(head.starts_with("GET /v1/users?x=1 HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("x-consumer-id: alice\r\n"), "{head}");
        assert!(
            !head.contains("forged") && !head.to_ascii_lowercase().contains("x-api-key"),
            "{head}"
        );
        assert!(head.contains("x-forwarded-for: 203.0.113.7\r\n"), "{head}");
    }

    #[test]
    fn each_stage_answers_for_itself() {
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
            let (plan, _) = plan_for(&b, raw);
            assert_eq!(status(&plan), want, "{raw:?}: {plan:?}");
        }
    }
}
