//! The gateway's configuration: TOML parsed into serde structs (`deny_unknown_fields`), with
//! defaults and one `validate()` that names the bad key.

mod cache;
mod duration;
mod error;
mod names;
mod observability;
mod tls;
mod transform;
mod upstream;
mod validate;
mod vault;
pub use cache::{CacheConfig, RouteCacheConfig};
pub use names::valid_route_id;
pub use observability::{AccessLogConfig, AccessLogTarget, AdminConfig, AdminListen};
pub use tls::{
    CertificateConfig, ClientCertificatesConfig, Listen, ListenMode, TlsConfig, TlsVersion,
};
pub use transform::{
    check_template, CorsConfig, Direction, ErrorFormat, HeaderRulesConfig, JsonRulesConfig,
    JsonValueConfig, QueryRulesConfig, MAX_JSON_BODY_BYTES,
};
pub use upstream::{
    is_host_name, Balance, CircuitBreakerConfig, HashKey, HealthCheckConfig, HostPolicy,
    OutlierConfig, ResolverConfig, RetryBudgetConfig, ServerAddress, UpstreamConfig,
    UpstreamTlsConfig, MAX_SERVER_WEIGHT,
};
pub use validate::is_token_byte;
pub use vault::{
    BudgetPeriod, ModelPrice, ProviderConfig, ProviderKind, SelfServiceBudget, SelfServiceConfig,
    VaultConfig,
};

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

pub use duration::{parse_duration, ConfigDuration};
pub use error::{key_path, line_of, locate, ConfigError, Invalid, KeyPath, KeySegment};

/// Largest header section accepted by any configuration (`server.max_header_bytes`).
pub const MAX_HEADER_BYTES_CEILING: usize = 256 * 1024;
/// Most header fields any configuration may allow (`server.max_headers`); sizes the stack array
/// the parser fills.
pub const MAX_HEADERS_CEILING: usize = 256;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub xdp: Option<XdpConfig>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// How upstream server host names are resolved.
    #[serde(default)]
    pub resolver: ResolverConfig,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub consumers: Vec<ConsumerConfig>,
    #[serde(default)]
    pub quotas: QuotasConfig,
    /// Share limits and quotas with other hosts through Redis.
    pub cluster: Option<ClusterConfig>,
    /// Metrics, the admin API and the status page; off unless set.
    pub admin: Option<AdminConfig>,
    /// One JSON line per request; off unless set.
    pub access_log: Option<AccessLogConfig>,
    /// TLS profiles that listen entries name.
    #[serde(default)]
    pub tls: BTreeMap<String, TlsConfig>,
    /// The LLM key vault; off unless set.
    pub vault: Option<VaultConfig>,
    /// The response cache routes with `cache` store in.
    #[serde(default)]
    pub cache: CacheConfig,
    /// SHA-256 of the file's text, in hex (set by [`Config::parse`]; compares hosts' configs).
    #[serde(skip)]
    pub source_sha256: String,
    /// The file's text (set by [`Config::parse`]); shown redacted by the admin API.
    #[serde(skip)]
    pub source: String,
}

/// `[cluster]`: limits and quotas shared through Redis, synchronised in batches.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://host:port/db`.
    pub redis: String,
    /// Admissions a host leases from Redis at a time, per shared counter, ahead of need. The
    /// combined count never exceeds a limit; unused leases (at most `hosts * lease`) are what a
    /// cluster may admit below it. `batch` is accepted as its old name.
    #[serde(default = "default_cluster_lease", alias = "batch")]
    pub lease: u64,
    /// How often pending counts are pushed and totals read back (sooner at half a batch).
    #[serde(default = "default_cluster_sync")]
    pub sync_interval: ConfigDuration,
}

fn default_cluster_lease() -> u64 {
    20
}
fn default_cluster_sync() -> ConfigDuration {
    ConfigDuration::from_millis(100)
}

/// Where quota counters are kept, and how often they are written.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QuotasConfig {
    /// Directory of the quota file (`quotas.state`), created if missing.
    pub data_dir: PathBuf,
    /// Counters that changed are appended (and fsynced) this often: a `kill -9` loses at most
    /// this much counting.
    pub flush_interval: ConfigDuration,
    /// Most quota counters kept (one per quota, period and key); beyond it a new key is
    /// refused (429), never a live count dropped.
    pub max_keys: usize,
    /// The secret that keys header-derived counts (HMAC-SHA256), so raw header values are never
    /// stored or sent to Redis; default `data_dir/state.key`, created on first start. Hosts of
    /// a cluster must share one.
    pub key_file: Option<PathBuf>,
}

impl Default for QuotasConfig {
    fn default() -> Self {
        QuotasConfig {
            data_dir: PathBuf::from("portcullis-data"),
            flush_interval: ConfigDuration::from_secs(1),
            max_keys: 1_000_000,
            key_file: None,
        }
    }
}

/// A calendar period (UTC).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    Day,
    Month,
}

/// A quota: at most `limit` requests per calendar `period`, per key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// "consumer" (else the client address), "client", "route" or "header:NAME".
    #[serde(default = "default_quota_key")]
    pub key: String,
    pub limit: u64,
    pub period: QuotaPeriod,
    pub name: Option<String>,
}

fn default_quota_key() -> String {
    "consumer".into()
}

/// Where credentials are looked for.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Header carrying an API key (also accepted as `Authorization: Bearer`).
    pub api_key_header: String,
    /// Query parameter carrying an API key; off unless set (keys in URLs end up in logs).
    pub api_key_query: Option<String>,
    /// The realm named in `WWW-Authenticate`.
    pub realm: String,
    /// JWT issuers whose tokens are accepted.
    pub issuers: Vec<IssuerConfig>,
    /// Tokens that failed their checks, remembered per worker so a replay costs a hash lookup.
    pub invalid_token_cache_entries: usize,
    /// How long a failed token is remembered.
    pub invalid_token_cache_ttl: ConfigDuration,
    /// Verified tokens kept per worker (least recently used evicted first).
    pub token_cache_entries: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            api_key_header: "x-api-key".into(),
            api_key_query: None,
            realm: "portcullis".into(),
            issuers: Vec::new(),
            invalid_token_cache_entries: 4096,
            invalid_token_cache_ttl: ConfigDuration::from_secs(60),
            token_cache_entries: 10_000,
        }
    }
}

/// A JWT issuer: where its keys come from and how its tokens are validated.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The `iss` claim tokens must carry.
    pub issuer: String,
    /// Accepted `aud` values; empty: `aud` is not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accepted algorithms, explicitly (`none` is never accepted): "RS256", "ES256", "EdDSA"...
    pub algorithms: Vec<String>,
    /// Exactly one key source: a PEM public key (or an HMAC secret file for HS*), a JWKS file,
    /// or a JWKS URL fetched off the request path.
    pub pem_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    pub jwks_url: Option<String>,
    /// How often a JWKS URL is fetched again.
    #[serde(default = "default_jwks_refresh")]
    pub refresh_interval: ConfigDuration,
    /// Least time between fetches triggered by tokens naming an unknown `kid` (scheduled and
    /// start-up fetches do not count).
    #[serde(default = "default_jwks_refetch")]
    pub refetch_min_interval: ConfigDuration,
    /// Longest a request whose token names an unknown `kid` waits for the refetch it asked
    /// for; when the next allowed refetch is further away, it is refused at once.
    #[serde(default = "default_unknown_kid_wait")]
    pub unknown_kid_wait: ConfigDuration,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    #[serde(default = "default_jwt_leeway")]
    pub leeway: ConfigDuration,
    /// The claim naming the consumer.
    #[serde(default = "default_consumer_claim")]
    pub consumer_claim: String,
    /// Claims passed upstream as headers: claim name -> header name.
    #[serde(default)]
    pub claim_headers: BTreeMap<String, String>,
}

fn default_jwks_refresh() -> ConfigDuration {
    ConfigDuration::from_secs(300)
}
fn default_jwks_refetch() -> ConfigDuration {
    ConfigDuration::from_secs(10)
}
fn default_unknown_kid_wait() -> ConfigDuration {
    ConfigDuration::from_secs(2)
}
fn default_jwt_leeway() -> ConfigDuration {
    ConfigDuration::from_secs(30)
}
fn default_consumer_claim() -> String {
    "sub".into()
}

/// A caller known to the gateway.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    pub id: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// API keys, stored only as `sha256:<64 hex digits>` (`portcullis keys new` prints them).
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Verified client certificates that identify this consumer (`auth.methods = ["mtls"]`).
    pub client_certificate: Option<ClientCertificateMatch>,
}

/// A consumer's client certificates, by subject (RFC 4514, as `openssl x509 -noout -subject
/// -nameopt RFC2253` prints it: `CN=client-a,O=Acme`) or by a subject alternative name (a DNS
/// name, URI, e-mail address or IP address).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientCertificateMatch {
    #[serde(default)]
    pub subjects: Vec<String>,
    #[serde(default)]
    pub sans: Vec<String>,
}

/// Credential kinds a route accepts.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    ApiKey,
    Jwt,
    /// A verified client certificate a consumer lists (`client_certificate`).
    Mtls,
}

/// A route's access policy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAuthConfig {
    #[serde(default = "default_auth_methods")]
    pub methods: Vec<AuthMethod>,
    /// The consumer must be in at least one of these groups; empty: any consumer.
    #[serde(default)]
    pub groups: Vec<String>,
    /// JWT: every one of these scopes must be granted (`scope`, space-separated, or `scp`).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// JWT: claims that must hold exactly these string values.
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
    /// Forward the credential to the upstream (default: stripped).
    #[serde(default)]
    pub keep_credentials: bool,
}

fn default_auth_methods() -> Vec<AuthMethod> {
    vec![AuthMethod::ApiKey]
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Addresses to listen on, plain or with a TLS profile; port 0 picks a free port (logged
    /// at start).
    pub listen: Vec<Listen>,
    pub workers: Workers,
    /// Longest wait for a complete request head once it has started (slowloris defence).
    pub header_timeout: ConfigDuration,
    /// Longest idle gap between two reads of a request body.
    pub body_timeout: ConfigDuration,
    /// Longest idle wait for the next request on a kept-alive client connection.
    pub keepalive_timeout: ConfigDuration,
    /// Longest time to receive a whole request, head and body.
    pub request_timeout: ConfigDuration,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    pub drain_timeout: ConfigDuration,
    /// Client connections one worker holds at most; beyond it new ones get 503 and are closed.
    pub max_connections_per_worker: usize,
    /// Largest request head (request line and fields), in bytes: beyond it, 431.
    pub max_header_bytes: usize,
    /// Most header fields in a request: beyond it, 431.
    pub max_headers: usize,
    /// Longest request target, in bytes: beyond it, 414.
    pub max_uri_bytes: usize,
    /// Merge repeated slashes in request paths before routing (`//a` is `/a`).
    pub merge_slashes: bool,
    /// `%2F` in a request path: "reject" (400) or "keep" (forwarded untouched, never a
    /// separator for routing).
    pub encoded_slash: crate::http::target::EncodedSlash,
    /// Rate limits counted before credentials are checked, for every route that does not set
    /// its own `pre_auth_limits`; keyed by "client" or "header:NAME".
    pub pre_auth_limits: Vec<LimitConfig>,
    /// Most keys one rate limit tracks; when full, recovered entries go first, then the least
    /// recently active (an evicted key starts afresh).
    pub max_limit_keys: usize,
    /// The control socket `portcullis reload` talks to; default `control.sock` in
    /// `[quotas] data_dir`.
    pub control_socket: Option<PathBuf>,
    /// Keep a client's `X-Request-Id` (when short and plain) instead of assigning one; only
    /// behind a proxy that sets it.
    pub trust_request_id: bool,
    /// Source networks whose PROXY protocol headers are believed, on listeners with
    /// `proxy_protocol = true` (connections from elsewhere are served as they come).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The format of the gateway's own answers before a route is known, and on routes that
    /// set none: "text" or "json".
    pub error_format: ErrorFormat,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec![Listen::from(
                "127.0.0.1:8080"
                    .parse::<SocketAddr>()
                    .expect("valid literal address"),
            )],
            workers: Workers::Auto,
            header_timeout: ConfigDuration::from_secs(10),
            body_timeout: ConfigDuration::from_secs(30),
            keepalive_timeout: ConfigDuration::from_secs(60),
            request_timeout: ConfigDuration::from_secs(300),
            drain_timeout: ConfigDuration::from_secs(10),
            max_connections_per_worker: 10_000,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            merge_slashes: true,
            encoded_slash: crate::http::target::EncodedSlash::Reject,
            pre_auth_limits: Vec::new(),
            max_limit_keys: 100_000,
            control_socket: None,
            trust_request_id: false,
            trusted_proxies: Vec::new(),
            error_format: ErrorFormat::Text,
        }
    }
}

impl ServerConfig {
    /// The listen addresses, in order.
    pub fn listen_addresses(&self) -> Vec<SocketAddr> {
        self.listen.iter().map(|l| l.address).collect()
    }

    /// How request paths are normalised before routing.
    pub fn path_policy(&self) -> crate::http::target::PathPolicy {
        crate::http::target::PathPolicy {
            merge_slashes: self.merge_slashes,
            encoded_slash: self.encoded_slash,
        }
    }
}

/// `workers = "auto"` (one per available core) or an integer >= 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workers {
    Auto,
    Count(usize),
}

impl Serialize for Workers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Auto => s.serialize_str("auto"),
            Workers::Count(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Workers;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"auto\" or an integer >= 1")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Workers, E> {
                if v == "auto" {
                    Ok(Workers::Auto)
                } else {
                    Err(E::custom(format!(
                        "`{v}` is not valid: use \"auto\" or an integer >= 1"
                    )))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Workers, E> {
                if v >= 1 {
                    Ok(Workers::Count(v as usize))
                } else {
                    Err(E::custom(format!(
                        "{v} is not valid: use \"auto\" or an integer >= 1"
                    )))
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Workers {
    /// The number of worker threads to run on this host.
    pub fn resolve(self) -> usize {
        match self {
            Workers::Count(n) => n,
            Workers::Auto => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The route's stable id, which names its persisted and shared counts; default: derived
    /// from `match` (see [`RouteConfig::stable_id`]).
    pub id: Option<String>,
    #[serde(rename = "match", default)]
    pub matcher: MatchConfig,
    pub upstream: Option<String>,
    pub respond: Option<RespondConfig>,
    #[serde(default)]
    pub strip_prefix: bool,
    pub rewrite_prefix: Option<String>,
    /// Largest request body accepted on this route: beyond it, 413.
    pub max_body_bytes: Option<u64>,
    /// Match the path without regard to ASCII case, for upstreams that are case-insensitive
    /// (IIS, some object stores). Default: case-sensitive, as RFC 3986 says.
    #[serde(default)]
    pub case_insensitive: bool,
    /// Who may call this route; omit for an open route.
    pub auth: Option<RouteAuthConfig>,
    /// Callers present virtual keys of the vault, swapped for a key of this provider
    /// (`[vault.providers.NAME]`) on the way upstream.
    pub vault: Option<String>,
    /// The gateway answers this route itself: authenticated consumers manage their own
    /// virtual keys under it (`keys`, `keys/ID/rotate`, `keys/ID/revoke`).
    #[serde(default)]
    pub vault_self_service: bool,
    /// Rate limits counted before credentials are checked (keyed by "client" or
    /// "header:NAME"); default: `[server] pre_auth_limits`; `[]` for none.
    pub pre_auth_limits: Option<Vec<LimitConfig>>,
    /// Rate limits, all applied to every request of the route.
    #[serde(default)]
    pub limits: Vec<LimitConfig>,
    /// Send the RateLimit and RateLimit-Policy fields (IETF httpapi draft) with 429s.
    #[serde(default = "default_true")]
    pub rate_limit_headers: bool,
    /// At most this many requests of the route in flight to the upstream, on this host.
    pub concurrency: Option<ConcurrencyConfig>,
    /// Quotas over calendar periods, persisted under `[quotas].data_dir`.
    #[serde(default)]
    pub quotas: Vec<QuotaConfig>,
    /// Cache the upstream's GET and HEAD answers (RFC 9111); off unless set.
    pub cache: Option<RouteCacheConfig>,
    /// The path sent upstream, as a template (`/v2/accounts/{path.id}`, captures of
    /// `match.path_regex`); instead of `strip_prefix` and `rewrite_prefix`.
    pub rewrite: Option<crate::transform::template::Template>,
    /// Rules for the request's fields; default: the upstream's `request_headers`.
    pub request_headers: Option<HeaderRulesConfig>,
    /// Rules for the response's fields; default: the upstream's `response_headers`.
    pub response_headers: Option<HeaderRulesConfig>,
    /// Rules for the forwarded query.
    pub query: Option<QueryRulesConfig>,
    /// Rules for JSON request bodies (buffered whole, up to `max_bytes`).
    pub request_json: Option<JsonRulesConfig>,
    /// Rules for JSON response bodies (buffered whole, up to `max_bytes`).
    pub response_json: Option<JsonRulesConfig>,
    /// The route streams its responses: never buffered, whatever their type.
    #[serde(default)]
    pub stream: bool,
    /// CORS answered by the gateway: preflights before authentication, fields on every answer.
    pub cors: Option<CorsConfig>,
    /// The format of the gateway's own answers on this route; default: `[server] error_format`.
    pub error_format: Option<ErrorFormat>,
    /// The longest the upstream may take to start answering, over every try together
    /// (`[server] request_timeout` is the time to receive the client's request).
    pub timeout: Option<ConfigDuration>,
    /// Retries to another server (see [`RetryConfig`]).
    #[serde(default)]
    pub retry: RetryConfig,
    /// Also retry requests that are not idempotent, once sent (their body must still be held).
    #[serde(default)]
    pub retry_non_idempotent: bool,
}

/// What may be sent again, to another server.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Tries after the first; 0 for none.
    pub retries: u32,
    /// Upstream statuses that are tried again (idempotent requests, or with
    /// `retry_non_idempotent`); connect failures and resets before any response byte always
    /// are.
    pub statuses: Vec<u16>,
    /// Longest wait for one try's response head; default: the upstream's `read_timeout`.
    pub per_try_timeout: Option<ConfigDuration>,
    /// Wait before a retry: random, up to this doubled per retry, at most `max_backoff`.
    pub backoff: ConfigDuration,
    pub max_backoff: ConfigDuration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            retries: 1,
            statuses: Vec::new(),
            per_try_timeout: None,
            backoff: ConfigDuration::from_millis(25),
            max_backoff: ConfigDuration::from_millis(250),
        }
    }
}

/// A route's in-flight limit: beyond `max`, wait up to `queue_timeout` for a slot, then 503.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyConfig {
    /// "route" (one count for the route) or "consumer" (one per consumer).
    #[serde(default = "default_concurrency_key")]
    pub key: String,
    pub max: usize,
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout: ConfigDuration,
}

fn default_concurrency_key() -> String {
    "route".into()
}

fn default_queue_timeout() -> ConfigDuration {
    ConfigDuration::from_millis(0)
}

fn default_true() -> bool {
    true
}

/// One rate limit: `rate` requests per `per`, with bursts of up to `burst`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// What is counted separately: "client" (address), "consumer" (else the address),
    /// "route" (everyone together), or "header:NAME" (else the address).
    pub key: String,
    pub rate: u64,
    #[serde(default = "default_limit_window")]
    pub per: ConfigDuration,
    /// Requests at once; default: `rate`.
    pub burst: Option<u64>,
    /// Name in the RateLimit fields; default: `limit<N>`.
    pub name: Option<String>,
}

fn default_limit_window() -> ConfigDuration {
    ConfigDuration::from_secs(1)
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    pub host: Option<String>,
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    /// A regular expression (the `regex` crate's syntax) the whole normalised path must match;
    /// after exact paths and before prefixes, in file order among themselves.
    pub path_regex: Option<String>,
    pub methods: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RespondConfig {
    #[serde(default = "default_respond_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_respond_status() -> u16 {
    200
}

/// One interface name or a list of them.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Driver (native) mode where the driver supports it, else generic SKB mode.
    #[default]
    Auto,
    Driver,
    Skb,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct XdpConfig {
    pub interface: OneOrMany,
    #[serde(default)]
    pub mode: XdpMode,
    /// When true, a failure to load or attach is logged and the gateway runs without XDP.
    #[serde(default)]
    pub optional: bool,
    /// Destination ports the program polices; default: the listen ports.
    pub ports: Option<Vec<u16>>,
    /// Packets per second one source may send to the protected ports; omit for no limit.
    pub rate: Option<u64>,
    /// Packets a source may send at once above `rate`; default: one second's worth.
    pub burst: Option<u64>,
    /// New TCP connections (SYN) per second per source; omit for no limit.
    pub syn_rate: Option<u64>,
    /// SYNs at once above `syn_rate`; default: one second's worth.
    pub syn_burst: Option<u64>,
    /// IPv6 sources are limited and banned per prefix of this length.
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u32,
    /// CIDRs whose packets are dropped.
    #[serde(default)]
    pub deny: Vec<String>,
    /// CIDRs that bypass every limit and ban.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Ban a source after this many gateway answers with a status in `ban_statuses` within
    /// `ban_window`; omit to never ban automatically.
    pub ban_after: Option<u32>,
    #[serde(default = "default_ban_window")]
    pub ban_window: ConfigDuration,
    #[serde(default = "default_ban_statuses")]
    pub ban_statuses: Vec<u16>,
    #[serde(default = "default_ban_duration")]
    pub ban_duration: ConfigDuration,
    /// Capacity of the per-source LRU map.
    #[serde(default = "default_max_sources")]
    pub max_sources: u32,
    /// bpffs directory where the maps are pinned (mounted if needed).
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// The BPF object to load; default: the one embedded at build time, or
    /// `$PORTCULLIS_EBPF_OBJECT`.
    pub object: Option<PathBuf>,
}

fn default_ipv6_prefix() -> u32 {
    64
}
fn default_ban_window() -> ConfigDuration {
    ConfigDuration::from_secs(10)
}
fn default_ban_statuses() -> Vec<u16> {
    vec![400, 401, 403, 429]
}
fn default_ban_duration() -> ConfigDuration {
    ConfigDuration::from_secs(600)
}

fn default_max_sources() -> u32 {
    portcullis_common::DEFAULT_MAX_SOURCES
}
fn default_pin_path() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/portcullis")
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: None,
            key: None,
            message: format!("cannot read the file: {e}"),
        })?;
        Config::parse(path, &source)
    }

    /// Parses and validates config text; `path` names the file in errors.
    pub fn parse(path: &Path, source: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(source).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: e.span().map(|s| line_of(source, s.start)),
            key: None,
            message: e.message().trim_end().to_owned(),
        })?;
        config.validate().map_err(|invalid| ConfigError {
            file: path.to_owned(),
            line: locate(source, &invalid.key),
            key: Some(invalid.key.to_string()),
            message: invalid.message,
        })?;
        use sha2::Digest;
        config.source_sha256 = hex::encode(sha2::Sha256::digest(source.as_bytes()));
        config.source = source.to_owned();
        Ok(config)
    }
}
