//! The compiled, read-only configuration every worker shares behind an `Arc`.

use crate::{
    config::{Config, ServerConfig},
    http::request::HeadRules,
    routing::RouteTable,
};

/// Size of each client connection's read buffer: it holds a whole request head, and streams
/// bodies through in pieces of this size.
pub const MIN_CLIENT_BUFFER_BYTES: usize = 32 * 1024;
/// Size of each upstream read buffer (grows to the response head limit only when needed).
pub const UPSTREAM_BUFFER_BYTES: usize = 32 * 1024;

/// Everything the request path reads from config, compiled once.
pub struct ConfigSnapshot {
    pub config: Config,
    pub consumers: crate::auth::Consumers,
    pub issuers: crate::auth::Issuers,
    pub quota_store: std::sync::Arc<crate::quotas::QuotaStore>,
    /// Limits and quotas shared through Redis, when `[cluster]` is set.
    pub cluster: Option<std::sync::Arc<crate::cluster::Cluster>>,
    pub routes: RouteTable,
    pub limits: HeadRules,
    pub client_buffer_bytes: usize,
}

impl ConfigSnapshot {
    /// Compiles `config`; loads JWT keys (starting JWKS fetchers), which can fail.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let s = &config.server;
        let limits = HeadRules {
            max_header_bytes: s.max_header_bytes,
            max_headers: s.max_headers,
            max_uri_bytes: s.max_uri_bytes,
            path: s.path_policy(),
        };
        Ok(ConfigSnapshot {
            routes: RouteTable::new(&config),
            consumers: crate::auth::Consumers::new(&config),
            issuers: crate::auth::Issuers::start(&config.auth).map_err(anyhow::Error::msg)?,
            quota_store: crate::quotas::QuotaStore::open(&config)?,
            cluster: config
                .cluster
                .as_ref()
                .map(crate::cluster::Cluster::start)
                .transpose()?,
            limits,
            client_buffer_bytes: s.max_header_bytes.max(MIN_CLIENT_BUFFER_BYTES),
            config,
        })
    }

    pub fn server(&self) -> &ServerConfig {
        &self.config.server
    }
}
