//! `Config::validate`: every rule that serde's types cannot express, each failure naming the key.

use super::{
    key_path, Config, Invalid, KeyPath, LimitConfig, MAX_HEADERS_CEILING, MAX_HEADER_BYTES_CEILING,
};
use crate::{
    http::target::{is_normal_path, normalize_path},
    limits::LimitKey,
};

/// Field names a `respond` action may not set: the gateway frames its own responses.
const RESPOND_RESERVED_HEADERS: [&str; 5] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "x-request-id",
];

/// Most retries a route may ask for.
const MAX_RETRIES: u32 = 10;
impl Config {
    /// Checks the rules that serde cannot; the error names the first key at fault.
    pub fn validate(&self) -> Result<(), Invalid> {
        self.cache.validate()?;
        if let Some(admin) = &self.admin {
            admin.validate()?;
        }
        if let Some(log) = &self.access_log {
            log.validate()?;
        }
        for (name, profile) in &self.tls {
            profile.validate(name)?;
        }
        for (i, l) in self.server.listen.iter().enumerate() {
            if l.proxy_protocol && self.server.trusted_proxies.is_empty() {
                return Err(Invalid::new(
                    key_path("server").key("listen").index(i).key("proxy_protocol"),
                    "needs `server.trusted_proxies`, the balancers' networks, such as [\"10.0.0.0/8\"]: a PROXY header from anywhere else is not believed",
                ));
            }
            if l.tls.is_some() && l.redirect_https.is_some() {
                return Err(Invalid::new(
                    key_path("server").key("listen").index(i).key("redirect_https"),
                    "a TLS listener does not redirect to HTTPS: set `redirect_https` on a plain one",
                ));
            }
            if let Some(profile) = &l.tls {
                if !self.tls.contains_key(profile) {
                    return Err(Invalid::new(
                        key_path("server").key("listen").index(i).key("tls"),
                        format!(
                            "no TLS profile named `{profile}`; defined: {:?}",
                            self.tls.keys().collect::<Vec<_>>()
                        ),
                    ));
                }
            }
        }
        let s = &self.server;
        let server = || key_path("server");
        if s.listen.is_empty() {
            return Err(Invalid::new(
                server().key("listen"),
                "needs at least one address, such as \"127.0.0.1:8080\"",
            ));
        }
        for (name, d) in [
            ("header_timeout", s.header_timeout),
            ("body_timeout", s.body_timeout),
            ("keepalive_timeout", s.keepalive_timeout),
            ("request_timeout", s.request_timeout),
            ("drain_timeout", s.drain_timeout),
        ] {
            if d.get().is_zero() {
                return Err(Invalid::new(
                    server().key(name),
                    "must be longer than zero, such as \"10s\"",
                ));
            }
        }
        if let super::Workers::Count(n) = s.workers {
            if n > 4096 {
                return Err(Invalid::new(
                    server().key("workers"),
                    format!("{n} is too many: use \"auto\" or an integer from 1 to 4096"),
                ));
            }
        }
        in_range(
            server().key("max_header_bytes"),
            s.max_header_bytes,
            1024,
            MAX_HEADER_BYTES_CEILING,
        )?;
        in_range(
            server().key("max_headers"),
            s.max_headers,
            1,
            MAX_HEADERS_CEILING,
        )?;
        in_range(
            server().key("max_uri_bytes"),
            s.max_uri_bytes,
            16,
            s.max_header_bytes,
        )?;
        in_range(
            server().key("max_connections_per_worker"),
            s.max_connections_per_worker,
            1,
            1_000_000,
        )?;

        for (j, limit) in s.pre_auth_limits.iter().enumerate() {
            validate_limit(server().key("pre_auth_limits").index(j), limit, false)?;
        }

        for (name, upstream) in &self.upstreams {
            upstream.validate(name)?;
        }
        self.resolver.validate()?;
        if let Some(v) = &self.vault {
            v.validate()?;
        }

        for (i, route) in self.routes.iter().enumerate() {
            self.validate_route(i, route)?;
        }
        // Route ids name persisted and shared counts: they must be unique.
        let mut ids = std::collections::HashMap::new();
        for (i, route) in self.routes.iter().enumerate() {
            if let Some(id) = &route.id {
                if !super::valid_route_id(id) {
                    return Err(Invalid::new(
                        key_path("routes").index(i).key("id"),
                        "must be 1 to 200 printable ASCII characters",
                    ));
                }
            }
            if let Some(first) = ids.insert(route.stable_id(), i) {
                let key = if route.id.is_some() { "id" } else { "match" };
                return Err(Invalid::new(
                    key_path("routes").index(i).key(key),
                    format!("the route id `{}` is also that of routes[{first}] (ids name the routes' counts; without `id` it is derived from `match`): give one of them an explicit `id`, or a different match", route.stable_id()),
                ));
            }
        }
        in_range(
            server().key("max_limit_keys"),
            s.max_limit_keys,
            16,
            100_000_000,
        )?;
        in_range(
            key_path("quotas").key("max_keys"),
            self.quotas.max_keys,
            1,
            100_000_000,
        )?;
        self.validate_auth()?;
        if let Some(c) = &self.cluster {
            if !c.redis.starts_with("redis://") {
                return Err(Invalid::new(
                    key_path("cluster").key("redis"),
                    "must be a redis:// URL, such as \"redis://127.0.0.1:6379\"",
                ));
            }
            if c.lease == 0 || c.lease > 1_000_000 {
                return Err(Invalid::new(
                    key_path("cluster").key("lease"),
                    "must be from 1 to 1000000 (admissions reserved at a time)",
                ));
            }
            if c.sync_interval.get().is_zero() {
                return Err(Invalid::new(
                    key_path("cluster").key("sync_interval"),
                    "must be longer than zero, such as \"100ms\"",
                ));
            }
        }

        if let Some(xdp) = &self.xdp {
            let at = || key_path("xdp");
            let interfaces = xdp.interface.to_vec();
            if interfaces.is_empty() || interfaces.iter().any(|i| i.is_empty() || i.len() > 15) {
                return Err(Invalid::new(at().key("interface"), "needs an interface name (1 to 15 characters) or a list of them, such as \"eth0\""));
            }
            if let Some(ports) = &xdp.ports {
                if ports.is_empty() || ports.contains(&0) {
                    return Err(Invalid::new(at().key("ports"), "needs a list of ports from 1 to 65535; omit it to protect the listen ports"));
                }
                if ports.len() > portcullis_common::MAX_PORTS as usize {
                    return Err(Invalid::new(
                        at().key("ports"),
                        format!("lists more than {} ports", portcullis_common::MAX_PORTS),
                    ));
                }
            }
            for (key, value) in [
                ("rate", xdp.rate),
                ("burst", xdp.burst),
                ("syn_rate", xdp.syn_rate),
                ("syn_burst", xdp.syn_burst),
            ] {
                if value == Some(0) || value.is_some_and(|v| v > 1_000_000_000) {
                    return Err(Invalid::new(
                        at().key(key),
                        "must be from 1 to 1000000000 (packets); omit it for no limit",
                    ));
                }
            }
            if xdp.burst.is_some() && xdp.rate.is_none() {
                return Err(Invalid::new(
                    at().key("burst"),
                    "needs `rate`: a burst is the allowance above a rate",
                ));
            }
            if xdp.syn_burst.is_some() && xdp.syn_rate.is_none() {
                return Err(Invalid::new(at().key("syn_burst"), "needs `syn_rate`"));
            }
            if !(1..=128).contains(&xdp.ipv6_prefix) {
                return Err(Invalid::new(
                    at().key("ipv6_prefix"),
                    format!(
                        "{} is out of range: use 1 to 128, such as 64",
                        xdp.ipv6_prefix
                    ),
                ));
            }
            for (key, list) in [("deny", &xdp.deny), ("allow", &xdp.allow)] {
                for (i, cidr) in list.iter().enumerate() {
                    if crate::xdp::parse_cidr(cidr).is_none() {
                        return Err(Invalid::new(at().key(key).index(i), format!("`{cidr}` is not an address or CIDR, such as \"203.0.113.0/24\" or \"2001:db8::/32\"")));
                    }
                }
            }
            if xdp.ban_after == Some(0) {
                return Err(Invalid::new(
                    at().key("ban_after"),
                    "must be at least 1; omit it to never ban",
                ));
            }
            for (i, status) in xdp.ban_statuses.iter().enumerate() {
                if !(400..=599).contains(status) {
                    return Err(Invalid::new(
                        at().key("ban_statuses").index(i),
                        format!("{status} is not an error status: use 400 to 599"),
                    ));
                }
            }
            for (key, d) in [
                ("ban_window", xdp.ban_window),
                ("ban_duration", xdp.ban_duration),
            ] {
                if d.get().is_zero() {
                    return Err(Invalid::new(
                        at().key(key),
                        "must be longer than zero, such as \"10s\"",
                    ));
                }
            }
            if xdp.max_sources == 0 {
                return Err(Invalid::new(
                    at().key("max_sources"),
                    "must be at least 1, such as 65536",
                ));
            }
            if !xdp.pin_path.is_absolute() {
                return Err(Invalid::new(
                    at().key("pin_path"),
                    "must be an absolute path, such as \"/sys/fs/bpf/portcullis\"",
                ));
            }
        }
        Ok(())
    }

    fn validate_route(&self, i: usize, route: &super::RouteConfig) -> Result<(), Invalid> {
        let at = || key_path("routes").index(i);
        if let Some(cache) = &route.cache {
            cache.validate(|| at().key("cache"))?;
            if cache.key_consumer && route.auth.is_none() {
                return Err(Invalid::new(
                    at().key("cache").key("key_consumer"),
                    "keys by the consumer the route's `auth` establishes: set `auth`",
                ));
            }
            if route.upstream.is_none() || route.vault.is_some() {
                return Err(Invalid::new(
                    at().key("cache"),
                    "caches the answers of an `upstream` (not of `respond`, self-service or vault routes)",
                ));
            }
        }
        if route.vault_self_service {
            if route.upstream.is_some() || route.respond.is_some() || route.vault.is_some() {
                return Err(Invalid::new(
                    at().key("vault_self_service"),
                    "a self-service route is answered by the gateway: no upstream, respond or vault",
                ));
            }
            if route.auth.is_none() {
                return Err(Invalid::new(
                    at().key("auth"),
                    "a self-service route needs `auth`: consumers manage their own keys",
                ));
            }
            if self.vault.is_none() {
                return Err(Invalid::new(
                    at().key("vault_self_service"),
                    "needs a [vault]",
                ));
            }
        }
        match (&route.upstream, &route.respond) {
            _ if route.vault_self_service => {}
            (Some(_), Some(_)) => return Err(Invalid::new(at().key("respond"), "a route has exactly one of `upstream` and `respond`, not both")),
            (None, None) => return Err(Invalid::new(at(), "a route needs exactly one of `upstream = \"NAME\"` and `respond = { status = 200 }`")),
            (Some(name), None) if !self.upstreams.contains_key(name) => {
                let known: Vec<&str> = self.upstreams.keys().map(String::as_str).collect();
                return Err(Invalid::new(at().key("upstream"), format!("no upstream named `{name}`; defined: {known:?}")));
            }
            _ => {}
        }
        if let Some(provider) = &route.vault {
            let providers = self.vault.as_ref().map(|v| &v.providers);
            if !providers.is_some_and(|p| p.contains_key(provider)) {
                let known: Vec<&str> = providers
                    .map(|p| p.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                return Err(Invalid::new(
                    at().key("vault"),
                    format!(
                        "no provider named `{provider}` in [vault.providers]; defined: {known:?}"
                    ),
                ));
            }
            if route.upstream.is_none() {
                return Err(Invalid::new(
                    at().key("upstream"),
                    "a vault route forwards to the provider's upstream: set `upstream`",
                ));
            }
            if route.auth.is_some() {
                return Err(Invalid::new(
                    at().key("auth"),
                    "a vault route is authenticated by its virtual keys; remove `auth`",
                ));
            }
        }
        let m = &route.matcher;
        let matcher = || at().key("match");
        if let Some(host) = &m.host {
            if !valid_host_pattern(host) {
                return Err(Invalid::new(
                    matcher().key("host"),
                    format!(
                        "`{host}` is not a host name; use `api.example.com` or `*.example.com`"
                    ),
                ));
            }
        }
        if m.path.is_some() && m.path_prefix.is_some() {
            return Err(Invalid::new(
                matcher().key("path_prefix"),
                "use either `path` or `path_prefix`, not both",
            ));
        }
        for (key, value) in [("path", &m.path), ("path_prefix", &m.path_prefix)] {
            if let Some(p) = value {
                if !p.starts_with('/')
                    || p.bytes()
                        .any(|b| b <= b' ' || b == 0x7f || b == b'?' || b == b'#')
                {
                    return Err(Invalid::new(
                        matcher().key(key),
                        format!(
                            "`{p}` must start with `/` and hold no spaces, controls, `?` or `#`"
                        ),
                    ));
                }
                // Requests are routed on their normal form: a route that is not normal would
                // never match (or match something else than it says).
                let policy = self.server.path_policy();
                if !is_normal_path(p, policy) {
                    let mut normal = Vec::new();
                    let hint = match normalize_path(p.as_bytes(), policy, &mut normal) {
                        Ok(()) => format!("write it as `{}`", String::from_utf8_lossy(&normal)),
                        Err(e) => format!("requests with it are refused ({e})"),
                    };
                    return Err(Invalid::new(
                        matcher().key(key),
                        format!("`{p}` is not a normalised path (no `.` or `..` segments, no `//`, no escapes of letters, digits or `-._~`, upper-case hex): {hint}"),
                    ));
                }
            }
        }
        if let Some(methods) = &m.methods {
            if methods.is_empty() {
                return Err(Invalid::new(
                    matcher().key("methods"),
                    "needs at least one method, such as [\"GET\"]; omit it to match any",
                ));
            }
            for (j, method) in methods.iter().enumerate() {
                if method.is_empty()
                    || !method
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
                {
                    return Err(Invalid::new(matcher().key("methods").index(j), format!("`{method}` is not a method: use upper-case tokens such as \"GET\" or \"POST\"")));
                }
            }
        }
        if (route.strip_prefix || route.rewrite_prefix.is_some()) && m.path_prefix.is_none() {
            let key = if route.strip_prefix {
                "strip_prefix"
            } else {
                "rewrite_prefix"
            };
            return Err(Invalid::new(
                at().key(key),
                "needs `match.path_prefix`: there is no prefix to replace",
            ));
        }
        if route.strip_prefix && route.rewrite_prefix.is_some() {
            return Err(Invalid::new(
                at().key("rewrite_prefix"),
                "use either `strip_prefix = true` or `rewrite_prefix`, not both",
            ));
        }
        if let Some(p) = &route.rewrite_prefix {
            if !p.starts_with('/')
                || p.bytes()
                    .any(|b| b <= b' ' || b == 0x7f || b == b'?' || b == b'#')
            {
                return Err(Invalid::new(
                    at().key("rewrite_prefix"),
                    format!("`{p}` must start with `/` and hold no spaces, controls, `?` or `#`"),
                ));
            }
        }
        self.validate_route_transforms(i, route)?;
        let r = &route.retry;
        if r.retries > MAX_RETRIES {
            return Err(Invalid::new(
                at().key("retry").key("retries"),
                format!("{} is not valid: use 0 to {MAX_RETRIES}", r.retries),
            ));
        }
        if let Some(s) = r.statuses.iter().find(|s| !(400..=599).contains(*s)) {
            return Err(Invalid::new(
                at().key("retry").key("statuses"),
                format!("{s} is not an error status (400 to 599)"),
            ));
        }
        if r.backoff.get() > r.max_backoff.get() {
            return Err(Invalid::new(
                at().key("retry").key("backoff"),
                "must not be longer than max_backoff",
            ));
        }
        for (key, d) in [
            ("timeout", route.timeout),
            ("retry.per_try_timeout", r.per_try_timeout),
        ] {
            if d.is_some_and(|d| d.get().is_zero()) {
                return Err(Invalid::new(
                    at().key(key),
                    "must be longer than zero, such as \"10s\"",
                ));
            }
        }
        for (j, limit) in route.limits.iter().enumerate() {
            validate_limit(at().key("limits").index(j), limit, true)?;
        }
        for (j, limit) in route.pre_auth_limits.iter().flatten().enumerate() {
            validate_limit(at().key("pre_auth_limits").index(j), limit, false)?;
        }
        if route.quotas.len() > crate::quotas::MAX_QUOTAS_PER_ROUTE {
            return Err(Invalid::new(
                at().key("quotas"),
                format!(
                    "lists {} quotas; a route has at most {}",
                    route.quotas.len(),
                    crate::quotas::MAX_QUOTAS_PER_ROUTE
                ),
            ));
        }
        for (list, key) in [
            (&route.limits, "limits"),
            (
                route.pre_auth_limits.as_ref().unwrap_or(&Vec::new()),
                "pre_auth_limits",
            ),
        ] {
            let mut names = std::collections::HashSet::new();
            for (j, l) in list.iter().enumerate() {
                if !names.insert(l.stable_name()) {
                    return Err(Invalid::new(at().key(key).index(j), format!("the name `{}` is used by an earlier limit of this route (names key their counts): set `name`", l.stable_name())));
                }
            }
        }
        let mut quota_names = std::collections::HashSet::new();
        for (j, q) in route.quotas.iter().enumerate() {
            if !quota_names.insert(q.stable_name()) {
                return Err(Invalid::new(at().key("quotas").index(j), format!("the name `{}` is used by an earlier quota of this route (names key their counts): set `name`", q.stable_name())));
            }
        }
        for (j, q) in route.quotas.iter().enumerate() {
            let at_q = || at().key("quotas").index(j);
            if let Some(name) = &q.name {
                if name.is_empty() || !name.bytes().all(is_token_byte) {
                    return Err(Invalid::new(
                        at_q().key("name"),
                        "must be a token, such as \"daily\"",
                    ));
                }
            }
            if crate::limits::LimitKey::parse(&q.key).is_none() {
                return Err(Invalid::new(at_q().key("key"), format!("`{}` is not a quota key: use \"consumer\", \"client\", \"route\" or \"header:NAME\"", q.key)));
            }
            if q.limit == 0 {
                return Err(Invalid::new(at_q().key("limit"), "must be at least 1"));
            }
        }
        if let Some(c) = &route.concurrency {
            if c.key != "route" && c.key != "consumer" {
                return Err(Invalid::new(
                    at().key("concurrency").key("key"),
                    format!("`{}` is not valid: use \"route\" or \"consumer\"", c.key),
                ));
            }
            if c.max == 0 {
                return Err(Invalid::new(
                    at().key("concurrency").key("max"),
                    "must be at least 1",
                ));
            }
            if route.upstream.is_none() {
                return Err(Invalid::new(
                    at().key("concurrency"),
                    "limits requests in flight to an upstream; a `respond` route has none",
                ));
            }
        }
        if let Some(respond) = &route.respond {
            let r = || at().key("respond");
            if !(200..=599).contains(&respond.status) {
                return Err(Invalid::new(
                    r().key("status"),
                    format!("{} is not a final status: use 200 to 599", respond.status),
                ));
            }
            for (name, value) in &respond.headers {
                let lower = name.to_ascii_lowercase();
                if name.is_empty() || !name.bytes().all(is_token_byte) {
                    return Err(Invalid::new(
                        r().key("headers").key(name),
                        "is not a valid field name (letters, digits and !#$%&'*+-.^_`|~)",
                    ));
                }
                if RESPOND_RESERVED_HEADERS.contains(&lower.as_str()) {
                    return Err(Invalid::new(
                        r().key("headers").key(name),
                        "is set by the gateway itself; remove it",
                    ));
                }
                if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
                    return Err(Invalid::new(
                        r().key("headers").key(name),
                        "holds a control character; field values may not",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Config {
    /// The route's regex, rewrite, header, query and JSON rules, and CORS.
    fn validate_route_transforms(
        &self,
        i: usize,
        route: &super::RouteConfig,
    ) -> Result<(), Invalid> {
        use super::Direction;
        let at = || key_path("routes").index(i);
        let m = &route.matcher;
        let regex = match &m.path_regex {
            None => None,
            Some(_) if m.path.is_some() || m.path_prefix.is_some() => {
                return Err(Invalid::new(
                    at().key("match").key("path_regex"),
                    "use one of `path`, `path_prefix` and `path_regex`",
                ))
            }
            Some(pattern) => match crate::transform::path_regex::PathRegex::compile(pattern) {
                Ok(r) => Some(r),
                Err(e) => {
                    return Err(Invalid::new(
                        at().key("match").key("path_regex"),
                        format!(
                            "`{pattern}` is not a valid regex (the `regex` crate's syntax): {e}"
                        ),
                    ))
                }
            },
        };
        let captures = |name: &str| regex.as_ref().is_some_and(|r| r.group(name).is_some());
        if let Some(rewrite) = &route.rewrite {
            if route.strip_prefix || route.rewrite_prefix.is_some() {
                return Err(Invalid::new(
                    at().key("rewrite"),
                    "use one of `rewrite`, `strip_prefix` and `rewrite_prefix`",
                ));
            }
            let literal = rewrite.literal_prefix();
            if !literal.starts_with('/')
                || literal
                    .bytes()
                    .any(|b| b <= b' ' || b == 0x7f || b == b'?' || b == b'#')
            {
                return Err(Invalid::new(
                    at().key("rewrite"),
                    format!("`{}` must start with `/` (before any variable) and hold no spaces, controls, `?` or `#`", rewrite.source()),
                ));
            }
            super::check_template(at().key("rewrite"), rewrite, &captures)?;
        }
        for (key, rules, direction) in [
            (
                "request_headers",
                &route.request_headers,
                Direction::Request,
            ),
            (
                "response_headers",
                &route.response_headers,
                Direction::Response,
            ),
        ] {
            if let Some(rules) = rules {
                rules.validate(&|| at().key(key), direction, &captures)?;
            }
        }
        if let Some(q) = &route.query {
            q.validate(&|| at().key("query"), &captures)?;
        }
        for (key, rules) in [
            ("request_json", &route.request_json),
            ("response_json", &route.response_json),
        ] {
            let Some(rules) = rules else { continue };
            rules.validate(&|| at().key(key), &captures)?;
            if route.upstream.is_none() || route.vault.is_some() {
                return Err(Invalid::new(
                    at().key(key),
                    "rewrites the bodies an `upstream` route exchanges (a vault route rewrites its own)",
                ));
            }
            if key == "response_json" && route.cache.is_some() {
                return Err(Invalid::new(
                    at().key(key),
                    "a cached route stores the upstream's answer as it is: use either `cache` or `response_json`",
                ));
            }
            if key == "response_json" && route.stream {
                return Err(Invalid::new(
                    at().key(key),
                    "a `stream = true` route is never buffered: remove one of them",
                ));
            }
            if key == "request_json" && rules.decompress {
                return Err(Invalid::new(
                    at().key(key).key("decompress"),
                    "applies to responses only",
                ));
            }
        }
        if let Some(cors) = &route.cors {
            cors.validate(&|| at().key("cors"))?;
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), Invalid> {
        let a = &self.auth;
        if a.api_key_header.is_empty() || !a.api_key_header.bytes().all(is_token_byte) {
            return Err(Invalid::new(
                key_path("auth").key("api_key_header"),
                "is not a field name, such as \"X-API-Key\"",
            ));
        }
        if let Some(q) = &a.api_key_query {
            if q.is_empty()
                || !q
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
            {
                return Err(Invalid::new(
                    key_path("auth").key("api_key_query"),
                    "use letters, digits, `_`, `-` or `.`, such as \"api_key\"",
                ));
            }
        }
        for (key, value) in [
            ("invalid_token_cache_entries", a.invalid_token_cache_entries),
            ("token_cache_entries", a.token_cache_entries),
        ] {
            in_range(key_path("auth").key(key), value, 1, 10_000_000)?;
        }
        if a.invalid_token_cache_ttl.get().is_zero() {
            return Err(Invalid::new(
                key_path("auth").key("invalid_token_cache_ttl"),
                "must be longer than zero, such as \"60s\"",
            ));
        }
        for (i, iss) in a.issuers.iter().enumerate() {
            let at = || key_path("auth").key("issuers").index(i);
            if iss.issuer.is_empty() {
                return Err(Invalid::new(
                    at().key("issuer"),
                    "needs the `iss` value tokens carry",
                ));
            }
            if iss.algorithms.is_empty() {
                return Err(Invalid::new(
                    at().key("algorithms"),
                    "needs an explicit list, such as [\"RS256\"]",
                ));
            }
            for (j, alg) in iss.algorithms.iter().enumerate() {
                if crate::auth::parse_algorithm(alg).is_none() {
                    return Err(Invalid::new(at().key("algorithms").index(j), format!("`{alg}` is not accepted: use HS256/384/512, RS256/384/512, PS256/384/512, ES256/384 or EdDSA")));
                }
            }
            let sources = [
                iss.pem_file.is_some(),
                iss.jwks_file.is_some(),
                iss.jwks_url.is_some(),
            ]
            .iter()
            .filter(|s| **s)
            .count();
            if sources != 1 {
                return Err(Invalid::new(
                    at(),
                    "needs exactly one of `pem_file`, `jwks_file` and `jwks_url`",
                ));
            }
            if let Some(url) = &iss.jwks_url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(Invalid::new(
                        at().key("jwks_url"),
                        "must be an http:// or https:// URL",
                    ));
                }
            }
            for (claim, header) in &iss.claim_headers {
                if header.is_empty() || !header.bytes().all(is_token_byte) {
                    return Err(Invalid::new(
                        at().key("claim_headers").key(claim),
                        format!("`{header}` is not a field name"),
                    ));
                }
            }
        }
        let mut ids = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        let mut cert_names = std::collections::HashSet::new();
        for (i, c) in self.consumers.iter().enumerate() {
            let at = || key_path("consumers").index(i);
            if c.id.is_empty() || !c.id.bytes().all(is_token_byte) {
                return Err(Invalid::new(
                    at().key("id"),
                    format!(
                        "`{}` is not a valid id: use letters, digits and !#$%&'*+-.^_`|~",
                        c.id
                    ),
                ));
            }
            if !ids.insert(c.id.as_str()) {
                return Err(Invalid::new(
                    at().key("id"),
                    format!("`{}` is used by an earlier consumer", c.id),
                ));
            }
            for (j, g) in c.groups.iter().enumerate() {
                if g.is_empty() || !g.bytes().all(is_token_byte) || g.contains(',') {
                    return Err(Invalid::new(
                        at().key("groups").index(j),
                        format!("`{g}` is not a valid group name"),
                    ));
                }
            }
            for (j, k) in c.api_keys.iter().enumerate() {
                if crate::auth::parse_key_hash(k).is_none() {
                    return Err(Invalid::new(at().key("api_keys").index(j), "must be \"sha256:\" and 64 hex digits (run `portcullis keys new --consumer ID`); never the key itself"));
                }
                if !hashes.insert(k.to_ascii_lowercase()) {
                    return Err(Invalid::new(
                        at().key("api_keys").index(j),
                        "this key hash is listed twice",
                    ));
                }
            }
            if let Some(m) = &c.client_certificate {
                for (key, list) in [("subjects", &m.subjects), ("sans", &m.sans)] {
                    for (j, v) in list.iter().enumerate() {
                        if v.is_empty() {
                            return Err(Invalid::new(
                                at().key("client_certificate").key(key).index(j),
                                "must not be empty",
                            ));
                        }
                        let normalized = match key {
                            "sans" => crate::auth::normalized_san(v),
                            _ => v.clone(),
                        };
                        if !cert_names.insert((key, normalized)) {
                            return Err(Invalid::new(
                                at().key("client_certificate").key(key).index(j),
                                format!("`{v}` identifies an earlier consumer too"),
                            ));
                        }
                    }
                }
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            if let Some(auth) = &route.auth {
                if auth.methods.is_empty() {
                    return Err(Invalid::new(
                        key_path("routes").index(i).key("auth").key("methods"),
                        "needs at least one method, such as [\"api_key\"]",
                    ));
                }
                if auth.methods.contains(&crate::config::AuthMethod::Mtls)
                    && !self.tls.values().any(|t| t.client_certificates.is_some())
                {
                    return Err(Invalid::new(
                        key_path("routes").index(i).key("auth").key("methods"),
                        "accepts \"mtls\" but no [tls.NAME.client_certificates] is configured",
                    ));
                }
                if auth.methods.contains(&crate::config::AuthMethod::Jwt)
                    && self.auth.issuers.is_empty()
                {
                    return Err(Invalid::new(
                        key_path("routes").index(i).key("auth").key("methods"),
                        "accepts \"jwt\" but no [[auth.issuers]] is configured",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One rate limit; `after_auth`: whether it may key on the consumer (pre-auth limits run
/// before anyone is known).
fn validate_limit(l: KeyPath, limit: &LimitConfig, after_auth: bool) -> Result<(), Invalid> {
    let key = || l.clone().key("key");
    match LimitKey::parse(&limit.key) {
        None if after_auth => return Err(Invalid::new(key(), format!("`{}` is not a limit key: use \"client\", \"consumer\", \"route\" or \"header:NAME\"", limit.key))),
        None | Some(LimitKey::Consumer) | Some(LimitKey::Route) if !after_auth => return Err(Invalid::new(key(), format!("`{}` is not valid before authentication: use \"client\" or \"header:NAME\" (no consumer is known yet, and one count for everyone would let a flood lock legitimate callers out)", limit.key))),
        _ => {}
    }
    if limit.rate == 0 || limit.rate > 1_000_000_000 {
        return Err(Invalid::new(
            l.clone().key("rate"),
            "must be from 1 to 1000000000",
        ));
    }
    if limit.burst == Some(0) {
        return Err(Invalid::new(l.clone().key("burst"), "must be at least 1"));
    }
    if limit.per.get().is_zero() {
        return Err(Invalid::new(
            l.clone().key("per"),
            "must be longer than zero, such as \"1s\" or \"24h\"",
        ));
    }
    if let Some(name) = &limit.name {
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(Invalid::new(
                l.clone().key("name"),
                "must be a token, such as \"per-minute\"",
            ));
        }
    }
    Ok(())
}

fn in_range(key: KeyPath, value: usize, min: usize, max: usize) -> Result<(), Invalid> {
    if value < min || value > max {
        return Err(Invalid::new(
            key,
            format!("{value} is out of range: use {min} to {max}"),
        ));
    }
    Ok(())
}

pub use crate::http::is_token_byte;

fn valid_host_pattern(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn error(src: &str) -> String {
        Config::parse(Path::new("gw.toml"), src)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn names_file_line_and_key() {
        let src = "[upstreams.api]\nservers = [\"127.0.0.1:9\"]\n\n[[routes]]\nmatch = { path = \"/x\" }\nupstream = \"apx\"\n";
        let e = error(src);
        assert!(
            e.starts_with("gw.toml:6: `routes[0].upstream`: no upstream named `apx`"),
            "{e}"
        );
    }

    #[test]
    fn unknown_field_is_located() {
        let e = error("[server]\nlisten = [\"127.0.0.1:1\"]\nworkerz = 2\n");
        assert!(e.starts_with("gw.toml:3:"), "{e}");
        assert!(e.contains("unknown field `workerz`"), "{e}");
        assert!(e.contains("workers"), "names the valid fields: {e}");
    }

    #[test]
    fn bad_values_say_what_is_valid() {
        let e = error("[server]\nworkers = 0\n");
        assert!(e.contains("\"auto\" or an integer >= 1"), "{e}");
        let e = error("[server]\nheader_timeout = \"5 parsecs\"\n");
        assert!(
            e.starts_with("gw.toml:2:") && e.contains("\"250ms\""),
            "{e}"
        );
        let e = error("[[routes]]\nrespond = { status = 200 }\nupstream = \"x\"\n");
        assert!(e.contains("exactly one of `upstream` and `respond`"), "{e}");
        let e = error("[[routes]]\nmatch = { host = \"a..b\" }\nrespond = { status = 200 }\n");
        assert!(e.contains("`routes[0].match.host`"), "{e}");
        let e = error("[[routes]]\nstrip_prefix = true\nrespond = { status = 200 }\n");
        assert!(e.contains("needs `match.path_prefix`"), "{e}");
        let e = error("[server]\npre_auth_limits = [{ key = \"consumer\", rate = 5 }]\n");
        assert!(
            e.starts_with("gw.toml:2: `server.pre_auth_limits[0].key`")
                && e.contains("not valid before authentication"),
            "{e}"
        );
        let e = error("[[routes]]\npre_auth_limits = [{ key = \"header:X-Real-IP\", rate = 0 }]\nrespond = { status = 200 }\n");
        assert!(e.contains("`routes[0].pre_auth_limits[0].rate`"), "{e}");
        let e = error("[server]\nencoded_slash = \"decode\"\n");
        assert!(e.contains("`reject`") && e.contains("`keep`"), "{e}");
    }

    #[test]
    fn example_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(
            seen >= 2,
            "expected the example configs in {}",
            dir.display()
        );
    }
}
