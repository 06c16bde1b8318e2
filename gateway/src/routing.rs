//! The route table: compiled once from config, matched per request without allocation.
//!
//! Precedence, fixed: exact host over wildcard host over no host; then exact path over
//! `path_regex` routes (in file order among themselves) over the longest prefix over shorter
//! prefixes (over no path); then routes with `methods` over routes without; remaining ties go
//! to the first in the file.
//!
//! Routes match the normalised path and host (see [`crate::http::target`]), never the raw
//! target. Paths match case-sensitively (RFC 3986 §6.2.2.1) unless a route sets
//! `case_insensitive`.

use std::collections::HashMap;

use crate::config::{Config, RouteConfig};

/// What a matched route does.
#[derive(Debug)]
pub enum Action {
    /// Forward to the upstream group with this index (see [`RouteTable::upstream_names`]).
    Upstream(usize),
    /// Answer with a fixed response.
    Respond(StaticResponse),
    /// The vault's self-service for the authenticated consumer.
    VaultSelfService,
}

pub use crate::http::encode::StaticResponse;

#[derive(Debug)]
enum PathMatch {
    Any,
    Exact(Box<[u8]>),
    Regex(crate::transform::path_regex::PathRegex),
    Prefix(Box<[u8]>),
}

/// How a route changes the path it forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRewrite {
    Keep,
    /// Replace the matched prefix with this one (strip_prefix replaces it with `/`).
    ReplacePrefix {
        matched: Box<[u8]>,
        replacement: Box<[u8]>,
    },
    /// The path rendered from a template (`rewrite`), its captures from the route's regex.
    Template(crate::transform::template::Template),
}

/// Whether a byte of a rendered path is percent-encoded (see [`PATH_ENCODED`]).
fn needs_path_escape(b: u8) -> bool {
    !b.is_ascii_graphic()
        || matches!(
            b,
            b'"' | b'#'
                | b'<'
                | b'>'
                | b'?'
                | b'['
                | b'\\'
                | b']'
                | b'^'
                | b'`'
                | b'{'
                | b'|'
                | b'}'
        )
}

/// A rewritten path that cannot be sent: it would hold a `.` or `..` segment, or a value
/// from the request (a field, a claim) that is not one plain segment, which the upstream could
/// resolve to somewhere the route does not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the rewritten path would hold a dot-segment, or a value that is not one plain segment")]
pub struct UnsafeRewrite;

/// Bytes a rendered path keeps as they are (RFC 3986 pchar and `/`, `%` of escapes the
/// normalised path already holds); the rest are percent-encoded.
const PATH_ENCODED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

#[derive(Debug)]
pub struct Route {
    /// Position in the config file, for logs.
    pub index: usize,
    /// The stable id that names the route's state (see [`RouteConfig::stable_id`]).
    pub id: String,
    path: PathMatch,
    case_insensitive: bool,
    methods: Option<Vec<Box<[u8]>>>,
    pub action: Action,
    pub rewrite: PathRewrite,
    pub max_body_bytes: Option<u64>,
    /// The route's access policy; `None` for an open route.
    pub auth: Option<crate::config::RouteAuthConfig>,
    /// The vault provider whose keys replace the virtual keys callers present.
    pub vault: Option<String>,
    /// Rate limits counted before credentials are checked: the route's own, or the ones of
    /// `[server]` shared by every route that has none of its own.
    pub pre_auth_limits: std::sync::Arc<[crate::limits::Limit]>,
    /// Rate limits, checked in order.
    pub limits: Vec<crate::limits::Limit>,
    pub rate_limit_headers: bool,
    pub concurrency: Option<crate::limits::ConcurrencyLimit>,
    pub quotas: Vec<crate::quotas::Quota>,
    /// The route's caching rules, when it caches.
    pub cache: Option<crate::cache::policy::RouteCachePolicy>,
    /// Field rules for the request and the response (the route's, or its upstream's).
    pub request_headers: crate::transform::headers::HeaderRules,
    pub response_headers: crate::transform::headers::HeaderRules,
    pub query: crate::transform::query::QueryRules,
    pub request_json: Option<crate::transform::json_body::JsonRules>,
    pub response_json: Option<crate::transform::json_body::JsonRules>,
    /// Responses are never buffered.
    pub stream: bool,
    pub cors: Option<crate::cors::CorsPolicy>,
    /// The route's own format for the gateway's answers, when it sets one.
    pub error_format: Option<crate::config::ErrorFormat>,
    /// The longest the upstream may take to start answering, over every try.
    pub timeout: Option<std::time::Duration>,
    pub retry: crate::config::RetryConfig,
    pub retry_non_idempotent: bool,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    exact_host: HashMap<Box<[u8]>, Vec<usize>>,
    /// `[server] pre_auth_limits`, shared by every route that sets none of its own.
    server_pre_auth_limits: std::sync::Arc<[crate::limits::Limit]>,
    /// (suffix including the leading dot, route) in precedence order.
    wildcard_host: Vec<(Box<[u8]>, usize)>,
    any_host: Vec<usize>,
    upstream_names: Vec<String>,
}

/// What a new table keeps of the one before: limit buckets by the name of their state, and
/// concurrency counts by route id.
struct Carried<'p> {
    limits: HashMap<[u8; 8], crate::limits::LimitState>,
    concurrency: HashMap<&'p str, &'p crate::limits::ConcurrencyLimit>,
}

impl RouteTable {
    /// Whether a route caches.
    pub fn any_caches(&self) -> bool {
        self.routes.iter().any(|r| r.cache.is_some())
    }

    pub fn new(config: &Config) -> RouteTable {
        Self::succeeding(config, None)
    }

    /// Compiles `config`, keeping from `previous` the state of every limit and concurrency
    /// limit whose name it still has.
    pub fn succeeding(config: &Config, previous: Option<&RouteTable>) -> RouteTable {
        let carried = Carried {
            limits: previous
                .into_iter()
                .flat_map(|p| p.all_limits())
                .map(|l| l.state())
                .collect(),
            concurrency: previous
                .into_iter()
                .flat_map(|p| p.routes.iter())
                .filter_map(|r| Some((r.id.as_str(), r.concurrency.as_ref()?)))
                .collect(),
        };
        let carried_limit = |scope: &[u8; 8]| carried.limits.get(scope).cloned();
        let upstream_names: Vec<String> = config.upstreams.keys().cloned().collect();
        let max_keys = config.server.max_limit_keys;
        let server_pre_auth_limits: std::sync::Arc<[crate::limits::Limit]> = config
            .server
            .pre_auth_limits
            .iter()
            .map(|l| {
                crate::limits::Limit::new(
                    &["[server]", PRE_AUTH_SCOPE],
                    l,
                    max_keys,
                    &carried_limit,
                )
            })
            .collect();
        let routes: Vec<Route> = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                compile_route(
                    i,
                    r,
                    &config.upstreams,
                    &server_pre_auth_limits,
                    max_keys,
                    &carried_limit,
                    &carried.concurrency,
                )
            })
            .collect();
        let mut table = RouteTable {
            upstream_names,
            server_pre_auth_limits,
            ..RouteTable::default()
        };
        let mut order: Vec<usize> = (0..routes.len()).collect();
        order.sort_by_key(|&i| precedence_key(&routes[i]));
        for i in order {
            match config.routes[i]
                .matcher
                .host
                .as_deref()
                .map(str::to_ascii_lowercase)
            {
                None => table.any_host.push(i),
                Some(h) => match h.strip_prefix('*') {
                    Some(suffix) => table.wildcard_host.push((suffix.as_bytes().into(), i)),
                    None => table
                        .exact_host
                        .entry(h.into_bytes().into())
                        .or_default()
                        .push(i),
                },
            }
        }
        table.routes = routes;
        table
    }

    /// Every route, in file order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Every rate limit of the table, each once (for sweeping recovered entries).
    pub fn all_limits(&self) -> impl Iterator<Item = &crate::limits::Limit> {
        self.server_pre_auth_limits
            .iter()
            .chain(self.routes.iter().flat_map(|r| {
                let own_pre_auth =
                    !std::sync::Arc::ptr_eq(&r.pre_auth_limits, &self.server_pre_auth_limits);
                r.limits
                    .iter()
                    .chain(r.pre_auth_limits.iter().filter(move |_| own_pre_auth))
            }))
    }

    pub fn route(&self, index: usize) -> &Route {
        &self.routes[index]
    }

    /// How many routes there are.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Upstream group names, indexed as in [`Action::Upstream`].
    pub fn upstream_names(&self) -> &[String] {
        &self.upstream_names
    }

    /// Finds the route for a request. `host` is the normalised host (lower case, no port, see
    /// [`crate::http::target::normalize_host`]), `path` the normalised path without the query.
    pub fn find(&self, host: Option<&[u8]>, path: &[u8], method: &[u8]) -> Option<&Route> {
        if let Some(host) = host {
            if let Some(candidates) = self.exact_host.get(host) {
                if let Some(r) = self.first_match(candidates.iter().copied(), path, method) {
                    return Some(r);
                }
            }
            let wildcard = self
                .wildcard_host
                .iter()
                .filter(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix))
                .map(|(_, i)| *i);
            if let Some(r) = self.first_match(wildcard, path, method) {
                return Some(r);
            }
        }
        self.first_match(self.any_host.iter().copied(), path, method)
    }

    fn first_match(
        &self,
        candidates: impl Iterator<Item = usize>,
        path: &[u8],
        method: &[u8],
    ) -> Option<&Route> {
        candidates
            .map(|i| &self.routes[i])
            .find(|r| r.matches(path, method))
    }
}

impl Route {
    fn matches(&self, path: &[u8], method: &[u8]) -> bool {
        let path_ok = match (&self.path, self.case_insensitive) {
            (PathMatch::Any, _) => true,
            (PathMatch::Exact(p), false) => path == &p[..],
            (PathMatch::Exact(p), true) => path.eq_ignore_ascii_case(p),
            (PathMatch::Regex(r), _) => r.is_match(path),
            (PathMatch::Prefix(p), false) => path.starts_with(p) && self.at_boundary(path, p),
            (PathMatch::Prefix(p), true) => {
                path.len() >= p.len()
                    && path[..p.len()].eq_ignore_ascii_case(p)
                    && self.at_boundary(path, p)
            }
        };
        path_ok
            && self
                .methods
                .as_ref()
                .is_none_or(|ms| ms.iter().any(|m| &m[..] == method))
    }

    /// A route that rewrites its prefix matches only whole segments when the prefix does not
    /// end in `/`: `/v1` matches `/v1` and `/v1/x`, never `/v1../x`, whose rest (`../x`) would
    /// become a dot-segment once joined to the replacement.
    fn at_boundary(&self, path: &[u8], prefix: &[u8]) -> bool {
        self.rewrite == PathRewrite::Keep
            || prefix.ends_with(b"/")
            || matches!(path.get(prefix.len()), None | Some(b'/'))
    }

    /// Appends the path to forward for `path` (which this route matched) to `out`.
    /// What of `path` follows the route's matched prefix (all of it for other matches).
    pub fn after_prefix<'p>(&self, path: &'p [u8]) -> &'p [u8] {
        match &self.path {
            PathMatch::Prefix(p) => &path[p.len().min(path.len())..],
            PathMatch::Exact(_) | PathMatch::Regex(_) | PathMatch::Any => path,
        }
    }

    /// The route's path regex, on a regex route.
    pub fn path_regex(&self) -> Option<&crate::transform::path_regex::PathRegex> {
        match &self.path {
            PathMatch::Regex(r) => Some(r),
            _ => None,
        }
    }

    /// Appends the path to forward for `path` (which this route matched) to `out`; a
    /// template rewrite renders over `render`.
    pub fn write_path(
        &self,
        path: &[u8],
        render: &crate::transform::template::RenderContext,
        out: &mut Vec<u8>,
    ) -> Result<(), UnsafeRewrite> {
        match &self.rewrite {
            PathRewrite::Keep => out.extend_from_slice(path),
            PathRewrite::Template(t) => {
                let start = out.len();
                t.render_path(render, out).map_err(|_| UnsafeRewrite)?;
                if out[start..].iter().any(|b| needs_path_escape(*b)) {
                    // Only a path whose variables brought bytes a target may not hold is copied.
                    let raw = out.split_off(start);
                    for piece in percent_encoding::percent_encode(&raw, PATH_ENCODED) {
                        out.extend_from_slice(piece.as_bytes());
                    }
                }
                let has_dot_segment = out[start..]
                    .split(|b| *b == b'/')
                    .any(|seg| seg == b"." || seg == b"..");
                if has_dot_segment {
                    return Err(UnsafeRewrite);
                }
            }
            PathRewrite::ReplacePrefix {
                matched,
                replacement,
            } => {
                let rest = &path[matched.len().min(path.len())..];
                out.extend_from_slice(replacement);
                // Join with exactly one slash between the replacement and the rest.
                match (
                    replacement.last() == Some(&b'/'),
                    rest.first() == Some(&b'/'),
                ) {
                    (true, true) => out.extend_from_slice(&rest[1..]),
                    (false, false) if !rest.is_empty() => {
                        out.push(b'/');
                        out.extend_from_slice(rest);
                    }
                    _ => out.extend_from_slice(rest),
                }
            }
        }
        Ok(())
    }
}

/// Sort key: smaller sorts first. Host class is handled by the bucket the route lands in.
fn precedence_key(route: &Route) -> (u8, std::cmp::Reverse<usize>, u8, usize) {
    let (path_class, len) = match &route.path {
        PathMatch::Exact(p) => (0, p.len()),
        PathMatch::Regex(_) => (1, 0),
        PathMatch::Prefix(p) => (2, p.len()),
        PathMatch::Any => (3, 0),
    };
    // Regex routes keep file order among themselves, `methods` or not.
    let methods = match (&route.path, route.methods.is_some()) {
        (PathMatch::Regex(_), _) | (_, true) => 0,
        _ => 1,
    };
    (path_class, std::cmp::Reverse(len), methods, route.index)
}

/// Names pre-auth limits' state apart from a route's other limits of the same name.
const PRE_AUTH_SCOPE: &str = "pre-auth";

fn compile_route(
    index: usize,
    r: &RouteConfig,
    // In name order, as `RouteTable::upstream_names` indexes them.
    upstreams: &std::collections::BTreeMap<String, crate::config::UpstreamConfig>,
    server_pre_auth_limits: &std::sync::Arc<[crate::limits::Limit]>,
    max_keys: usize,
    carried_limit: &dyn Fn(&[u8; 8]) -> Option<crate::limits::LimitState>,
    carried_concurrency: &HashMap<&str, &crate::limits::ConcurrencyLimit>,
) -> Route {
    let id = r.stable_id();
    let m = &r.matcher;
    let path = match (&m.path, &m.path_prefix, &m.path_regex) {
        (Some(p), _, _) => PathMatch::Exact(p.as_bytes().into()),
        (None, Some(p), _) => PathMatch::Prefix(p.as_bytes().into()),
        (None, None, Some(pattern)) => PathMatch::Regex(
            crate::transform::path_regex::PathRegex::compile(pattern)
                .expect("validate() compiled the regex"),
        ),
        (None, None, None) => PathMatch::Any,
    };
    // Templates name captures by group index from here on.
    let regex = match &path {
        PathMatch::Regex(re) => Some(re),
        _ => None,
    };
    let resolve = |t: &crate::transform::template::Template| {
        t.resolved(&|name| regex.and_then(|re| re.group(name)))
            .expect("validate() checked every capture a template names")
    };
    let upstream_config = r.upstream.as_ref().and_then(|u| upstreams.get(u));
    let header_rules = |own: &Option<crate::config::HeaderRulesConfig>,
                        default: Option<&crate::config::HeaderRulesConfig>| {
        own.as_ref()
            .or(default)
            .map(|c| crate::transform::headers::HeaderRules::compile(c, &resolve))
            .unwrap_or_default()
    };
    let request_headers = header_rules(
        &r.request_headers,
        upstream_config.and_then(|u| u.request_headers.as_ref()),
    );
    let response_headers = header_rules(
        &r.response_headers,
        upstream_config.and_then(|u| u.response_headers.as_ref()),
    );
    let rewrite = match (&m.path_prefix, r.strip_prefix, &r.rewrite_prefix) {
        _ if r.rewrite.is_some() => {
            PathRewrite::Template(resolve(r.rewrite.as_ref().expect("checked just now")))
        }
        (Some(prefix), true, _) => PathRewrite::ReplacePrefix {
            matched: prefix.as_bytes().into(),
            replacement: b"/"[..].into(),
        },
        (Some(prefix), false, Some(to)) => PathRewrite::ReplacePrefix {
            matched: prefix.as_bytes().into(),
            replacement: to.as_bytes().into(),
        },
        _ => PathRewrite::Keep,
    };
    let query = r
        .query
        .as_ref()
        .map(|q| crate::transform::query::QueryRules::compile(q, &resolve))
        .unwrap_or_default();
    let request_json = r
        .request_json
        .as_ref()
        .map(|j| crate::transform::json_body::JsonRules::compile(j, &resolve));
    let response_json = r
        .response_json
        .as_ref()
        .map(|j| crate::transform::json_body::JsonRules::compile(j, &resolve));
    let action = match (&r.upstream, &r.respond) {
        _ if r.vault_self_service => Action::VaultSelfService,
        (Some(name), _) => Action::Upstream(
            upstreams
                .keys()
                .position(|n| n == name)
                .expect("validate() checked the upstream exists"),
        ),
        (None, Some(respond)) => Action::Respond(
            crate::http::encode::static_response(
                respond.status,
                respond
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
                respond.body.as_bytes(),
            )
            .expect("validate() refused control characters in respond headers"),
        ),
        (None, None) => unreachable!("validate() requires upstream or respond"),
    };
    Route {
        index,
        path,
        case_insensitive: r.case_insensitive,
        methods: m
            .methods
            .as_ref()
            .map(|ms| ms.iter().map(|s| s.as_bytes().into()).collect()),
        action,
        rewrite,
        max_body_bytes: r.max_body_bytes,
        auth: r.auth.clone(),
        vault: r.vault.clone(),
        cache: r
            .cache
            .as_ref()
            .map(|c| crate::cache::policy::RouteCachePolicy {
                default_ttl: c.default_ttl.map(|d| d.get()),
                key_headers: c
                    .key_headers
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
                key_consumer: c.key_consumer,
                sort_query: c.sort_query,
                strip_set_cookie: c.strip_set_cookie,
                stale_on_error: c
                    .stale_on_error
                    .map_or(std::time::Duration::ZERO, |d| d.get()),
                lock_timeout: c.lock_timeout.get(),
            }),
        pre_auth_limits: match &r.pre_auth_limits {
            Some(own) => own
                .iter()
                .map(|l| {
                    crate::limits::Limit::new(&[&id, PRE_AUTH_SCOPE], l, max_keys, carried_limit)
                })
                .collect(),
            None => server_pre_auth_limits.clone(),
        },
        limits: r
            .limits
            .iter()
            .map(|l| crate::limits::Limit::new(&[&id], l, max_keys, carried_limit))
            .collect(),
        rate_limit_headers: r.rate_limit_headers,
        request_headers,
        response_headers,
        query,
        request_json,
        response_json,
        stream: r.stream,
        cors: r.cors.as_ref().map(crate::cors::CorsPolicy::compile),
        error_format: r.error_format,
        timeout: r.timeout.map(|t| t.get()),
        retry: r.retry.clone(),
        retry_non_idempotent: r.retry_non_idempotent,
        concurrency: r.concurrency.as_ref().map(|c| {
            crate::limits::ConcurrencyLimit::new(c, carried_concurrency.get(id.as_str()).copied())
        }),
        quotas: r
            .quotas
            .iter()
            .map(|q| crate::quotas::Quota::new(&id, q))
            .collect(),
        id,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn table(routes: &str) -> RouteTable {
        let src = format!("[upstreams.u]\nservers = [\"127.0.0.1:9\"]\n{routes}");
        RouteTable::new(&Config::parse(Path::new("t.toml"), &src).unwrap())
    }

    fn found(t: &RouteTable, host: Option<&str>, path: &str, method: &str) -> Option<usize> {
        let mut host_buf = Vec::new();
        let host = host
            .is_some_and(|h| crate::http::target::normalize_host(h.as_bytes(), &mut host_buf))
            .then_some(&host_buf[..]);
        t.find(host, path.as_bytes(), method.as_bytes())
            .map(|r| r.index)
    }

    #[test]
    fn precedence_table() {
        let t = table(
            r#"
[[routes]]
upstream = "u"
[[routes]]
match = { path_prefix = "/v1/" }
upstream = "u"
[[routes]]
match = { path_prefix = "/v1/users/" }
upstream = "u"
[[routes]]
match = { path = "/v1/users/me" }
upstream = "u"
[[routes]]
match = { path_prefix = "/v1/", methods = ["POST"] }
upstream = "u"
[[routes]]
match = { host = "*.example.com" }
upstream = "u"
[[routes]]
match = { host = "api.example.com", path_prefix = "/" }
upstream = "u"
[[routes]]
id = "same match, later in the file"
match = { host = "api.example.com", path_prefix = "/" }
upstream = "u"
[[routes]]
id = "same as routes[1], later in the file"
match = { path_prefix = "/v1/" }
upstream = "u"
"#,
        );
        // (host, path, method, expected route index)
        let cases: &[(Option<&str>, &str, &str, Option<usize>)] = &[
            (None, "/", "GET", Some(0)),
            (None, "/v1/x", "GET", Some(1)),
            (None, "/v1", "GET", Some(0)),
            (None, "/v1/users/7", "GET", Some(2)),
            (None, "/v1/users/me", "GET", Some(3)),
            (None, "/v1/x", "POST", Some(4)),
            (Some("other.org"), "/v1/x", "GET", Some(1)),
            (Some("www.example.com"), "/v1/x", "GET", Some(5)),
            (Some("WWW.Example.COM:8443"), "/", "GET", Some(5)),
            (Some("example.com"), "/v1/x", "GET", Some(1)),
            (Some("api.example.com"), "/v1/users/me", "GET", Some(6)),
            (Some("API.EXAMPLE.COM:80"), "/", "GET", Some(6)),
            (Some("api.example.com."), "/", "GET", Some(6)),
        ];
        for (host, path, method, want) in cases {
            assert_eq!(
                found(&t, *host, path, method),
                *want,
                "{host:?} {method} {path}"
            );
        }
    }

    #[test]
    fn no_match_is_none() {
        let t = table("[[routes]]\nmatch = { path = \"/only\" }\nupstream = \"u\"\n");
        assert_eq!(found(&t, None, "/other", "GET"), None);
        assert_eq!(found(&t, None, "/only/", "GET"), None);
    }

    #[test]
    fn rewrites() {
        let t = table(
            r#"
[[routes]]
match = { path_prefix = "/v1/" }
upstream = "u"
strip_prefix = true
[[routes]]
match = { path_prefix = "/v2/" }
upstream = "u"
rewrite_prefix = "/api/"
[[routes]]
match = { path_prefix = "/v3" }
upstream = "u"
strip_prefix = true
"#,
        );
        let rewrite = |path: &str| {
            let r = t.find(None, path.as_bytes(), b"GET").unwrap();
            let mut out = Vec::new();
            r.write_path(
                path.as_bytes(),
                &crate::transform::template::RenderContext::for_tests(&[]),
                &mut out,
            )
            .unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(rewrite("/v1/users"), "/users");
        assert_eq!(rewrite("/v1/"), "/");
        assert_eq!(rewrite("/v2/users"), "/api/users");
        assert_eq!(rewrite("/v3/users"), "/users");
        assert_eq!(rewrite("/v3"), "/");
        // A rewriting prefix matches whole segments: the rest never becomes a dot-segment.
        assert!(t.find(None, b"/v3../admin", b"GET").is_none());
        assert!(t.find(None, b"/v3x", b"GET").is_none());
    }

    #[test]
    fn regex_routes_sit_between_exact_paths_and_prefixes_in_file_order() {
        let t = table(
            r#"
[[routes]]
match = { path_prefix = "/users/" }
upstream = "u"
[[routes]]
match = { path_regex = "/users/(?<id>[0-9]+)" }
upstream = "u"
rewrite = "/v2/accounts/{path.id}"
[[routes]]
match = { path_regex = "/users/(.+)", methods = ["GET"] }
upstream = "u"
rewrite = "/any/{path.1}"
[[routes]]
match = { path = "/users/7" }
upstream = "u"
"#,
        );
        let cases: &[(&str, &str, Option<usize>)] = &[
            ("/users/7", "GET", Some(3)),
            ("/users/42", "GET", Some(1)),
            ("/users/ab", "GET", Some(2)),
            ("/users/ab", "POST", Some(0)),
            ("/users/42/x", "POST", Some(0)),
        ];
        for (path, method, want) in cases {
            assert_eq!(found(&t, None, path, method), *want, "{method} {path}");
        }
        let rewrite = |path: &str| {
            let r = t.find(None, path.as_bytes(), b"GET").unwrap();
            let mut slots = Vec::new();
            assert!(r
                .path_regex()
                .unwrap()
                .captures(path.as_bytes(), &mut slots));
            let render = crate::transform::template::RenderContext {
                path: path.as_bytes(),
                captures: &slots,
                ..crate::transform::template::RenderContext::for_tests(&[])
            };
            let mut out = Vec::new();
            r.write_path(path.as_bytes(), &render, &mut out)
                .map(|()| String::from_utf8(out).unwrap())
        };
        assert_eq!(rewrite("/users/42").unwrap(), "/v2/accounts/42");
        assert_eq!(rewrite("/users/a%20b").unwrap(), "/any/a%20b");
        // A capture that would become a dot-segment upstream is refused.
        assert!(rewrite("/users/..").is_err());
    }
}
