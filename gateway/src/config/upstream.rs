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
}

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
    pub fn validate(&self, name: &str) -> Result<(), Invalid> {
        let at = || key_path("upstreams").key(name);
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
