//! The compiled, read-only configuration every worker shares behind an `Arc`, and how a new
//! one succeeds it on reload, keeping the live state of every name it still has.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use arc_swap::ArcSwap;

use crate::{
    config::{Config, ServerConfig},
    http::request::HeadRules,
    routing::RouteTable,
};

/// Size of each client connection's read buffer: it holds a whole request head, and streams
/// bodies through in pieces of this size.
pub const MIN_CLIENT_BUFFER_BYTES: usize = 32 * 1024;
/// Size of each upstream read buffer (grows to the response head limit only when needed).
/// Large enough that a 64 KiB response usually crosses in one read and one write (at 32 KiB
/// it took three of each, and 28% more CPU per response); buffers come from the worker's
/// pool while a response is relayed, so idle connections do not hold one.
pub const UPSTREAM_BUFFER_BYTES: usize = 128 * 1024;

/// Everything the request path reads from config, compiled once.
pub struct ConfigSnapshot {
    pub config: Config,
    pub consumers: crate::auth::Consumers,
    /// Kept across reloads while `[auth] issuers` is unchanged (keys, fetchers, caches).
    pub issuers: Arc<crate::auth::Issuers>,
    pub quota_store: Arc<crate::quotas::QuotaStore>,
    /// Limits and quotas shared through Redis, when `[cluster]` is set.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    pub routes: RouteTable,
    pub limits: HeadRules,
    pub client_buffer_bytes: usize,
    /// TLS profiles by name, compiled (certificates read) with the snapshot.
    pub tls: std::collections::BTreeMap<String, Arc<crate::tls::TlsProfile>>,
    /// Client-certificate identity headers of every profile (lower case): client copies are
    /// dropped on every listener.
    pub identity_headers: Vec<String>,
    /// Upstream parts workers build their groups from: resolved server names and TLS configs.
    pub upstream_parts: UpstreamParts,
    /// The LLM key vault, when `[vault]` is set; the same across reloads.
    pub vault: Option<Arc<crate::vault::Vault>>,
    /// The response cache (empty unless a route caches); the same across reloads.
    pub cache: Arc<crate::cache::ResponseCache>,
    /// With `[cluster]`: purges sent to and received from the other hosts.
    pub purge_bus: Option<Arc<crate::cache::broadcast::PurgeBus>>,
}

/// What every worker's upstream groups share: the resolver (kept across reloads), the entry
/// of each named server, and each TLS upstream's client config.
pub struct UpstreamParts {
    pub resolver: Arc<crate::upstream::resolve::NameResolver>,
    pub names: std::collections::BTreeMap<
        crate::config::ServerAddress,
        Arc<crate::upstream::resolve::ResolvedName>,
    >,
    pub tls: std::collections::BTreeMap<String, Arc<rustls::ClientConfig>>,
    /// Each upstream's server loads (kept across reloads that keep its servers) and Maglev
    /// table (when it hashes).
    pub balancing: std::collections::BTreeMap<
        String,
        (
            Arc<crate::upstream::balance::ServerLoads>,
            Option<Arc<crate::upstream::balance::Maglev>>,
        ),
    >,
    /// Each upstream's server labels, to tell whether a reload kept them.
    servers: std::collections::BTreeMap<String, Vec<String>>,
    /// The active health checkers of this config (stopped when it is dropped).
    _checkers: Vec<crate::upstream::health_check::HealthChecker>,
}

impl UpstreamParts {
    /// Reads the upstreams' TLS files and resolves (or finds) their server names.
    fn build(
        config: &Config,
        resolver: Arc<crate::upstream::resolve::NameResolver>,
        previous: Option<&UpstreamParts>,
    ) -> anyhow::Result<UpstreamParts> {
        resolver.configure(&config.resolver);
        let mut tls = std::collections::BTreeMap::new();
        let mut names = std::collections::BTreeMap::new();
        for (name, u) in &config.upstreams {
            if let Some(t) = &u.tls {
                tls.insert(name.clone(), crate::tls::client::build(name, t)?);
            }
            for s in &u.servers {
                if let crate::config::ServerAddress::Name { host, port } = s {
                    names
                        .entry(s.clone())
                        .or_insert_with(|| resolver.track(host, *port));
                }
            }
        }
        resolver.await_first_answers(&names.values().collect::<Vec<_>>());
        let balancing: std::collections::BTreeMap<String, (Arc<_>, Option<Arc<_>>)> = config
            .upstreams
            .iter()
            .map(|(name, u)| {
                let labels: Vec<String> = u.servers.iter().map(|s| s.to_string()).collect();
                // Requests in flight during a reload are still counted where they started.
                let loads = previous
                    .and_then(|p| {
                        p.balancing
                            .get(name)
                            .filter(|_| p.servers.get(name) == Some(&labels))
                    })
                    .map(|(l, _)| l.clone())
                    .unwrap_or_else(|| crate::upstream::balance::ServerLoads::new(labels.len()));
                let weights: Vec<u32> = (0..labels.len()).map(|i| u.weight(i)).collect();
                let maglev = (u.balance == crate::config::Balance::Hash).then(|| {
                    Arc::new(crate::upstream::balance::Maglev::new(
                        &labels,
                        &weights,
                        u.hash_seed,
                    ))
                });
                (name.clone(), (loads, maglev))
            })
            .collect();
        let servers = config
            .upstreams
            .iter()
            .map(|(name, u)| {
                (
                    name.clone(),
                    u.servers.iter().map(|s| s.to_string()).collect(),
                )
            })
            .collect();
        let mut checkers = Vec::new();
        for (name, u) in &config.upstreams {
            let loads = &balancing[name].0;
            // The newest config's checker is the one that counts: an older one, kept alive by
            // a connection on its generation, stops at its next look.
            let token = loads.new_checker();
            let Some(check) = &u.health_check else {
                // No checks any more: no server stays out on an old finding.
                loads.clear_health();
                continue;
            };
            let targets = u
                .servers
                .iter()
                .map(|s| crate::upstream::health_check::CheckTarget {
                    label: s.to_string(),
                    address: s.clone(),
                    name: names.get(s).cloned(),
                    host: crate::upstream::host_of(u, s).0,
                    tls: tls.get(name).cloned().zip(crate::upstream::tls_name(u, s)),
                })
                .collect();
            checkers.push(crate::upstream::health_check::HealthChecker::start(
                name,
                check,
                targets,
                loads.clone(),
                token,
            )?);
        }
        Ok(UpstreamParts {
            resolver,
            names,
            tls,
            balancing,
            servers,
            _checkers: checkers,
        })
    }

    /// What the group `name` needs from these parts.
    pub fn for_group(&self, name: &str) -> crate::upstream::GroupShared<'_> {
        crate::upstream::GroupShared {
            names: &self.names,
            tls: self.tls.get(name).map(|c| &**c),
            loads: self.balancing[name].0.clone(),
            maglev: self.balancing[name].1.clone(),
        }
    }
}

impl ConfigSnapshot {
    /// Compiles `config`; opens the quota store and loads JWT keys (starting JWKS fetchers),
    /// which can fail.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let quota_store = crate::quotas::QuotaStore::open(&config)?;
        let issuers =
            Arc::new(crate::auth::Issuers::start(&config.auth).map_err(anyhow::Error::msg)?);
        let cluster = config
            .cluster
            .as_ref()
            .map(crate::cluster::Cluster::start)
            .transpose()?;
        let tls = crate::tls::build_all(&config.tls, None)?;
        let resolver = Arc::new(crate::upstream::resolve::NameResolver::new(
            &config.resolver,
        ));
        let upstream_parts = UpstreamParts::build(&config, resolver, None)?;
        // After the quota store: it holds the data directory's lock.
        let vault = config
            .vault
            .as_ref()
            .map(|v| {
                crate::vault::open_configured(v, config.cluster.as_ref(), &config.quotas.data_dir)
                    .map(Arc::new)
            })
            .transpose()?;
        if let Some(v) = &vault {
            v.start_flusher()?;
            v.start_cluster_sync()?;
        }
        let mut snapshot = Self::assemble(
            config,
            None,
            issuers,
            quota_store,
            cluster,
            tls,
            upstream_parts,
        );
        snapshot.vault = vault;
        snapshot.purge_bus = snapshot
            .config
            .cluster
            .as_ref()
            .map(|c| crate::cache::broadcast::PurgeBus::start(&c.redis, snapshot.cache.clone()))
            .transpose()?
            .map(Arc::new);
        Ok(snapshot)
    }

    /// Compiles `config` to succeed `previous`: the quota store and the cluster link are the
    /// same (a reload cannot change them: the reloader refuses such configs); issuers are kept when
    /// their config is unchanged; limit buckets and concurrency counts are kept by name.
    pub fn succeeding(config: Config, previous: &ConfigSnapshot) -> anyhow::Result<Self> {
        let issuers = if config.auth.issuers == previous.config.auth.issuers {
            previous.issuers.clone()
        } else {
            Arc::new(crate::auth::Issuers::start(&config.auth).map_err(anyhow::Error::msg)?)
        };
        let tls = crate::tls::build_all(&config.tls, Some(&previous.tls))?;
        let upstream_parts = UpstreamParts::build(
            &config,
            previous.upstream_parts.resolver.clone(),
            Some(&previous.upstream_parts),
        )?;
        previous.quota_store.register_names(&config);
        if let (Some(vault), Some(v)) = (&previous.vault, &config.vault) {
            vault.set_providers(v.providers.keys().cloned().collect());
        }
        let mut snapshot = Self::assemble(
            config,
            Some(previous),
            issuers,
            previous.quota_store.clone(),
            previous.cluster.clone(),
            tls,
            upstream_parts,
        );
        snapshot.vault = previous.vault.clone();
        snapshot.cache = previous.cache.clone();
        snapshot.purge_bus = previous.purge_bus.clone();
        Ok(snapshot)
    }

    fn assemble(
        config: Config,
        previous: Option<&ConfigSnapshot>,
        issuers: Arc<crate::auth::Issuers>,
        quota_store: Arc<crate::quotas::QuotaStore>,
        cluster: Option<Arc<crate::cluster::Cluster>>,
        tls: std::collections::BTreeMap<String, Arc<crate::tls::TlsProfile>>,
        upstream_parts: UpstreamParts,
    ) -> Self {
        let s = &config.server;
        let limits = HeadRules {
            max_header_bytes: s.max_header_bytes,
            max_headers: s.max_headers,
            max_uri_bytes: s.max_uri_bytes,
            path: s.path_policy(),
        };
        ConfigSnapshot {
            routes: RouteTable::succeeding(&config, previous.map(|p| &p.routes)),
            consumers: crate::auth::Consumers::new(&config),
            issuers,
            quota_store,
            cluster,
            limits,
            client_buffer_bytes: s.max_header_bytes.max(MIN_CLIENT_BUFFER_BYTES),
            identity_headers: {
                let mut names: Vec<String> = tls
                    .values()
                    .filter_map(|p| p.identity_header.as_deref().map(str::to_owned))
                    .collect();
                names.sort();
                names.dedup();
                names
            },
            tls,
            upstream_parts,
            vault: None,
            cache: Arc::new(crate::cache::ResponseCache::new(
                config.cache.max_bytes,
                config.cache.max_entry_bytes as usize,
            )),
            purge_bus: None,
            config,
        }
    }

    pub fn server(&self) -> &ServerConfig {
        &self.config.server
    }

    /// `[vault.providers.NAME]`, when the vault is configured.
    pub fn vault_provider(&self, name: &str) -> Option<&crate::config::ProviderConfig> {
        self.config.vault.as_ref()?.providers.get(name)
    }
}

/// The snapshot in force, published to every worker: workers compare the generation at each
/// request boundary (one atomic load) and take the new snapshot when it changed.
pub struct Published {
    current: ArcSwap<ConfigSnapshot>,
    generation: AtomicU64,
}

impl Published {
    pub fn new(snapshot: ConfigSnapshot) -> Arc<Published> {
        Arc::new(Published {
            current: ArcSwap::from_pointee(snapshot),
            generation: AtomicU64::new(1),
        })
    }

    pub fn snapshot(&self) -> Arc<ConfigSnapshot> {
        self.current.load_full()
    }

    /// Changes whenever a new snapshot is published.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Puts `snapshot` in force; returns its generation.
    pub fn publish(&self, snapshot: ConfigSnapshot) -> u64 {
        self.current.store(Arc::new(snapshot));
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }
}
