//! `[upstreams.NAME]`: servers by address or by host name, timeouts and pools, TLS to the
//! servers and the Host they are sent; `[resolver]`: how server host names are resolved.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use serde::{Deserialize, Serialize};

use super::{key_path, ConfigDuration, Invalid};

/// One server of a group: `"10.0.0.5:8080"`, or `"api.example.com:443"`, a host name resolved
/// off the request path (see [`ResolverConfig`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServerAddress {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

impl ServerAddress {
    /// The host name, for named servers.
    pub fn host_name(&self) -> Option<&str> {
        match self {
            ServerAddress::Ip(_) => None,
            ServerAddress::Name { host, .. } => Some(host),
        }
    }
}

impl fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddress::Ip(a) => a.fmt(f),
            ServerAddress::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Whether `host` is a DNS host name (RFC 1123 labels of letters, digits and inner hyphens).
pub fn is_host_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        // An all-numeric last label would be read as an IPv4 address by some resolvers.
        && !host.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

impl FromStr for ServerAddress {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const VALID: &str =
            "a server is \"IP:PORT\" or \"HOST:PORT\", such as \"10.0.0.5:8080\" or \"api.example.com:443\"";
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ServerAddress::Ip(addr));
        }
        let (host, port) = s.rsplit_once(':').ok_or(VALID)?;
        let port: u16 = port.parse().map_err(|_| VALID)?;
        // A fully qualified name's final dot is implied: the resolver asks fully qualified.
        let host = host.strip_suffix('.').unwrap_or(host);
        // Also what TLS accepts as a name to verify (which refuses a numeric-looking last
        // label such as `0x7f000001`, read by some resolvers as an address).
        let tls_name = matches!(
            rustls::pki_types::ServerName::try_from(host),
            Ok(rustls::pki_types::ServerName::DnsName(_))
        );
        if port == 0 || !is_host_name(host) || !tls_name {
            return Err(VALID);
        }
        Ok(ServerAddress::Name {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for ServerAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for ServerAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// TLS to an upstream's servers: `tls = true` for the defaults, or a table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM file of the certificate authorities to trust; default: the Mozilla roots
    /// (webpki-roots), as browsers trust them.
    pub ca: Option<PathBuf>,
    /// The name sent in SNI and verified against the certificate; default: the server's host
    /// name (for address servers, the IP address, which the certificate must then list).
    pub server_name: Option<String>,
    /// A client certificate chain presented to the servers (PEM), with `key`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The Host header sent upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum HostPolicy {
    /// The client's Host (the default for address servers).
    Client,
    /// The server's host name, with its port unless it is the scheme's default (the default for
    /// named servers: virtual-hosted APIs answer only their own name).
    Server,
    /// This value.
    Literal(String),
}

impl<'de> Deserialize<'de> for HostPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            value: String,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Word(String),
            Table(Table),
        }
        const VALID: &str =
            "host is \"client\", \"server\", or { value = \"api.example.com\" } for a literal";
        match Form::deserialize(d).map_err(|_| serde::de::Error::custom(VALID))? {
            Form::Word(w) if w == "client" => Ok(HostPolicy::Client),
            Form::Word(w) if w == "server" => Ok(HostPolicy::Server),
            Form::Word(_) => Err(serde::de::Error::custom(VALID)),
            Form::Table(t) => Ok(HostPolicy::Literal(t.value)),
        }
    }
}

fn deserialize_tls<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<UpstreamTlsConfig>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Switch(bool),
        Table(UpstreamTlsConfig),
    }
    match Form::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "tls is true, false, or a table with ca, server_name, cert and key (all optional)",
        )
    })? {
        Form::Switch(true) => Ok(Some(UpstreamTlsConfig::default())),
        Form::Switch(false) => Ok(None),
        Form::Table(t) => Ok(Some(t)),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub servers: Vec<ServerAddress>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: ConfigDuration,
    /// Longest wait for the response head, and between reads of a response body: beyond it, 504.
    #[serde(default = "default_upstream_read_timeout")]
    pub read_timeout: ConfigDuration,
    /// How long an idle pooled connection is kept.
    #[serde(default = "default_upstream_idle_timeout")]
    pub idle_timeout: ConfigDuration,
    /// Idle connections kept per server per worker.
    #[serde(default = "default_max_idle")]
    pub max_idle_per_server: usize,
    /// TLS to the servers, verified; a failed verification is a 502, never a plaintext retry.
    #[serde(default, deserialize_with = "deserialize_tls")]
    pub tls: Option<UpstreamTlsConfig>,
    /// The Host sent upstream; default: the client's for address servers, the server's name
    /// for named servers.
    pub host: Option<HostPolicy>,
    /// Request field rules for routes to this upstream that set none of their own.
    pub request_headers: Option<super::HeaderRulesConfig>,
    /// Response field rules for routes to this upstream that set none of their own.
    pub response_headers: Option<super::HeaderRulesConfig>,
    /// How a server is chosen (see [`crate::upstream::balance`]).
    #[serde(default)]
    pub balance: Balance,
    /// With `balance = "hash"`: what is hashed.
    pub hash_key: Option<HashKey>,
    /// The hash's key: hosts that share it map every key alike; a new seed remaps.
    #[serde(default)]
    pub hash_seed: u64,
    /// Each server's weight, in `servers` order (default 1 each).
    #[serde(default)]
    pub weights: Vec<u32>,
    /// Which of `servers` get requests only while no other server is usable.
    #[serde(default)]
    pub backups: Vec<ServerAddress>,
    /// A server back from an ejection or from failing its health checks takes its full share
    /// over this long, starting at a tenth; off unless set.
    pub slow_start: Option<ConfigDuration>,
    /// Passive health: servers that fail in a row are taken out for a while.
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// Active health: a path asked on an interval; off unless set.
    pub health_check: Option<HealthCheckConfig>,
    /// Limits over every route to this upstream, on this host: beyond them, 503 at once.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// How many retries may be under way to this upstream at once, on this host.
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
}

/// Envoy's retry budget: retries under way at most `percent` of the requests in flight, or
/// `min_concurrent` when that is more, so retries cannot multiply an outage.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetConfig {
    pub percent: u32,
    pub min_concurrent: usize,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            percent: 20,
            min_concurrent: 3,
        }
    }
}

/// An upstream's circuit breaker (Envoy's thresholds); each limit is off unless set.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Connections open to the upstream's servers, pooled ones included.
    pub max_connections: Option<usize>,
    /// Connects in progress to them.
    pub max_pending: Option<usize>,
    /// Requests in flight to them.
    pub max_requests: Option<usize>,
}

/// Active health checks of an upstream's servers, run once per host.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// The path (and query) asked with GET.
    pub path: String,
    #[serde(default = "default_check_interval")]
    pub interval: ConfigDuration,
    /// Longest a check may take, connect and answer together.
    #[serde(default = "default_check_timeout")]
    pub timeout: ConfigDuration,
    /// Good checks in a row that make an unhealthy server healthy again.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Failed checks in a row that make a server unhealthy.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Statuses that count as healthy; default: any 2xx or 3xx.
    #[serde(default)]
    pub expected_statuses: Vec<u16>,
}

fn default_check_interval() -> ConfigDuration {
    ConfigDuration::from_secs(5)
}
fn default_check_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(1)
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    3
}

impl HealthCheckConfig {
    /// Whether `status` counts as healthy.
    pub fn expects(&self, status: u16) -> bool {
        if self.expected_statuses.is_empty() {
            (200..400).contains(&status)
        } else {
            self.expected_statuses.contains(&status)
        }
    }
}

/// Outlier ejection (Envoy's consecutive-5xx detector, with its defaults).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    pub enabled: bool,
    /// Answers of 5xx, connect failures, resets and timeouts in a row that eject a server.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts; each further one lasts one more `base_ejection`,
    /// up to `max_ejection`.
    pub base_ejection: ConfigDuration,
    pub max_ejection: ConfigDuration,
    /// At most this share of the servers is ejected at once (at least one server always may
    /// be).
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            enabled: true,
            consecutive_failures: 5,
            base_ejection: ConfigDuration::from_secs(30),
            max_ejection: ConfigDuration::from_secs(300),
            max_ejected_percent: 10,
        }
    }
}

/// How an upstream chooses its server for a request.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round robin (nginx's).
    #[default]
    RoundRobin,
    /// The power of two choices on requests in flight (Envoy's least-request).
    LeastRequest,
    /// The power of two choices on peak-EWMA latency times requests in flight.
    PeakEwma,
    /// Consistent hashing (Maglev) of `hash_key`.
    Hash,
}

/// What `balance = "hash"` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client's address.
    Client,
    /// The authenticated consumer's id.
    Consumer,
    /// A request field (lower case).
    Header(String),
    /// A cookie, by name.
    Cookie(String),
}

impl std::str::FromStr for HashKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let invalid = || {
            format!("`{s}` is not a hash key: use \"client\", \"consumer\", \"header:NAME\" or \"cookie:NAME\"")
        };
        let token = |name: &str| !name.is_empty() && name.bytes().all(super::is_token_byte);
        match s.split_once(':') {
            None if s == "client" => Ok(HashKey::Client),
            None if s == "consumer" => Ok(HashKey::Consumer),
            Some(("header", name)) if token(name) => Ok(HashKey::Header(name.to_ascii_lowercase())),
            Some(("cookie", name)) if token(name) => Ok(HashKey::Cookie(name.to_owned())),
            _ => Err(invalid()),
        }
    }
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for HashKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HashKey::Client => s.serialize_str("client"),
            HashKey::Consumer => s.serialize_str("consumer"),
            HashKey::Header(n) => s.collect_str(&format_args!("header:{n}")),
            HashKey::Cookie(n) => s.collect_str(&format_args!("cookie:{n}")),
        }
    }
}

/// The most weight one server may have.
pub const MAX_SERVER_WEIGHT: u32 = 1000;

fn default_connect_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(5)
}
fn default_upstream_read_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(30)
}
/// Below Node's default keep-alive (5 s), the shortest common upstream idle close, so the
/// gateway is the side that closes; other servers keep connections longer (nginx 75 s).
fn default_upstream_idle_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(4)
}
fn default_max_idle() -> usize {
    64
}

impl UpstreamConfig {
    /// Server `i`'s weight.
    pub fn weight(&self, i: usize) -> u32 {
        self.weights.get(i).copied().unwrap_or(1)
    }

    pub fn validate(&self, name: &str) -> Result<(), Invalid> {
        let at = || key_path("upstreams").key(name);
        if !self.weights.is_empty() && self.weights.len() != self.servers.len() {
            return Err(Invalid::new(
                at().key("weights"),
                format!(
                    "lists {} weights for {} servers: give one per server, in the order of `servers`",
                    self.weights.len(),
                    self.servers.len()
                ),
            ));
        }
        if let Some(j) = self
            .weights
            .iter()
            .position(|w| *w == 0 || *w > MAX_SERVER_WEIGHT)
        {
            return Err(Invalid::new(
                at().key("weights").index(j),
                format!(
                    "{} is not valid: use 1 to {MAX_SERVER_WEIGHT}",
                    self.weights[j]
                ),
            ));
        }
        if let Some((j, b)) = self
            .backups
            .iter()
            .enumerate()
            .find(|(_, b)| !self.servers.contains(b))
        {
            return Err(Invalid::new(
                at().key("backups").index(j),
                format!("`{b}` is not one of `servers`: list backups there too"),
            ));
        }
        if !self.servers.is_empty() && self.servers.iter().all(|s| self.backups.contains(s)) {
            return Err(Invalid::new(
                at().key("backups"),
                "names every server: at least one must be a primary",
            ));
        }
        if let Some(h) = &self.health_check {
            let at = || at().key("health_check");
            if !h.path.starts_with('/')
                || h.path.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'#')
            {
                return Err(Invalid::new(
                    at().key("path"),
                    format!(
                        "`{}` must start with `/` and hold no spaces, controls or `#`",
                        h.path
                    ),
                ));
            }
            if h.interval.get().is_zero() || h.timeout.get().is_zero() {
                return Err(Invalid::new(
                    at().key("interval"),
                    "interval and timeout must be longer than zero, such as \"5s\" and \"1s\"",
                ));
            }
            if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
                return Err(Invalid::new(
                    at().key("healthy_threshold"),
                    "thresholds must be at least 1",
                ));
            }
            if let Some(s) = h
                .expected_statuses
                .iter()
                .find(|s| !(100..=599).contains(*s))
            {
                return Err(Invalid::new(
                    at().key("expected_statuses"),
                    format!("{s} is not an HTTP status (100 to 599)"),
                ));
            }
        }
        let o = &self.outlier;
        if o.consecutive_failures == 0 {
            return Err(Invalid::new(
                at().key("outlier").key("consecutive_failures"),
                "must be at least 1 (or set `enabled = false`)",
            ));
        }
        if o.base_ejection.get().is_zero() || o.max_ejection.get() < o.base_ejection.get() {
            return Err(Invalid::new(
                at().key("outlier").key("base_ejection"),
                "must be longer than zero and not longer than max_ejection",
            ));
        }
        if o.max_ejected_percent > 100 {
            return Err(Invalid::new(
                at().key("outlier").key("max_ejected_percent"),
                format!("{} is not valid: use 0 to 100", o.max_ejected_percent),
            ));
        }
        match (self.balance, &self.hash_key) {
            (Balance::Hash, None) => {
                return Err(Invalid::new(
                    at().key("hash_key"),
                    "`balance = \"hash\"` needs `hash_key`: \"client\", \"consumer\", \"header:NAME\" or \"cookie:NAME\"",
                ))
            }
            (Balance::Hash, Some(_)) | (_, None) => {}
            (_, Some(_)) => {
                return Err(Invalid::new(
                    at().key("hash_key"),
                    "is used only with `balance = \"hash\"`",
                ))
            }
        }
        for (key, rules, direction) in [
            (
                "request_headers",
                &self.request_headers,
                super::Direction::Request,
            ),
            (
                "response_headers",
                &self.response_headers,
                super::Direction::Response,
            ),
        ] {
            if let Some(rules) = rules {
                // An upstream's rules serve many routes: no route's captures.
                rules.validate(&|| at().key(key), direction, &|_| false)?;
            }
        }
        if self.servers.is_empty() {
            return Err(Invalid::new(
                at().key("servers"),
                "needs at least one server, such as \"127.0.0.1:9001\" or \"api.example.com:443\"",
            ));
        }
        for (key, d) in [
            ("connect_timeout", self.connect_timeout),
            ("read_timeout", self.read_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if d.get().is_zero() {
                return Err(Invalid::new(
                    at().key(key),
                    "must be longer than zero, such as \"5s\"",
                ));
            }
        }
        if let Some(tls) = &self.tls {
            if tls.cert.is_some() != tls.key.is_some() {
                return Err(Invalid::new(
                    at().key("tls")
                        .key(if tls.cert.is_some() { "key" } else { "cert" }),
                    "a client certificate needs both cert and key",
                ));
            }
            if let Some(n) = &tls.server_name {
                if rustls::pki_types::ServerName::try_from(n.as_str()).is_err() {
                    return Err(Invalid::new(
                        at().key("tls").key("server_name"),
                        format!("{n:?} is not a DNS name or an IP address"),
                    ));
                }
            }
        }
        if let Some(HostPolicy::Literal(v)) = &self.host {
            let ok = !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
            if !ok {
                return Err(Invalid::new(
                    at().key("host").key("value"),
                    format!("{v:?} is not a host such as \"api.example.com\" or \"api.example.com:8443\""),
                ));
            }
        }
        Ok(())
    }
}

/// `[resolver]`: how server host names are resolved. Off the request path, by one thread: the
/// addresses in use are swapped when an answer arrives, and kept when a resolution fails.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverConfig {
    /// DNS servers asked directly (UDP, TCP for long answers), honouring each answer's TTL
    /// within `min_ttl` and `max_ttl`. Empty: the system resolver (`getaddrinfo`, so
    /// `/etc/hosts` and `/etc/resolv.conf`) every `interval`.
    pub nameservers: Vec<SocketAddr>,
    /// How often names are resolved again with the system resolver.
    pub interval: ConfigDuration,
    /// Bounds on how long a DNS answer is used before asking again.
    pub min_ttl: ConfigDuration,
    pub max_ttl: ConfigDuration,
    /// How soon a failed resolution is tried again (the last good addresses serve meanwhile).
    pub retry: ConfigDuration,
    /// Longest wait for one answer.
    pub timeout: ConfigDuration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            nameservers: Vec::new(),
            interval: ConfigDuration::from_secs(30),
            min_ttl: ConfigDuration::from_secs(1),
            max_ttl: ConfigDuration::from_secs(300),
            retry: ConfigDuration::from_secs(5),
            timeout: ConfigDuration::from_secs(3),
        }
    }
}

impl ResolverConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        let at = || key_path("resolver");
        for (key, d) in [
            ("interval", self.interval),
            ("min_ttl", self.min_ttl),
            ("max_ttl", self.max_ttl),
            ("retry", self.retry),
            ("timeout", self.timeout),
        ] {
            if d.get().is_zero() {
                return Err(Invalid::new(
                    at().key(key),
                    "must be longer than zero, such as \"30s\"",
                ));
            }
        }
        if self.min_ttl.get() > self.max_ttl.get() {
            return Err(Invalid::new(
                at().key("min_ttl"),
                "must not be longer than max_ttl",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_are_addresses_or_host_names() {
        assert_eq!(
            "127.0.0.1:80".parse::<ServerAddress>(),
            Ok(ServerAddress::Ip("127.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:443".parse::<ServerAddress>(),
            Ok(ServerAddress::Ip("[::1]:443".parse().unwrap()))
        );
        assert_eq!(
            "api.example.com.:443".parse::<ServerAddress>(),
            "api.example.com:443".parse::<ServerAddress>(),
            "a final dot is implied"
        );
        assert_eq!(
            "API.Example.com:443".parse::<ServerAddress>(),
            Ok(ServerAddress::Name {
                host: "api.example.com".into(),
                port: 443
            })
        );
        for bad in [
            "api.example.com",
            "api.example.com:0",
            "api.example.com:99999",
            "-bad.example.com:80",
            "a..b:80",
            "exa mple.com:80",
            "10.0.0.300:80",
            "svc.0x7f:80",
            ":80",
        ] {
            assert!(bad.parse::<ServerAddress>().is_err(), "{bad}");
        }
    }
}
