//! The configuration in force, and how it is replaced while the gateway runs. A reload parses
//! and validates the file first (an invalid one is refused and the running config keeps
//! serving), refuses changes to settings that need a restart (naming them), then builds a new
//! snapshot that keeps the live state of every name it still has, starts listening on added
//! addresses and stops accepting on removed ones, applies the XDP policy in place, and
//! publishes the snapshot. Workers take it at their next request boundary; requests in flight
//! finish on the old one.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use tracing::{error, info};

use super::listener::ListenerSet;
use crate::{
    config::{Config, ConfigError},
    proxy::snapshot::{ConfigSnapshot, Published},
    xdp::XdpGuard,
};

/// Why a reload was refused; the running config keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("these settings need a restart, not a reload: {}; the running config keeps serving", .0.join(", "))]
    NeedsRestart(Vec<&'static str>),
    #[error("the new config could not be applied: {0:#}")]
    Build(anyhow::Error),
    #[error("this process handed over to an upgraded one and is draining: reload that one")]
    Retired,
    #[error("the new listen addresses could not be bound, so nothing changed: {0}")]
    Listen(std::io::Error),
    #[error("the new config is in force, but the XDP policy could not be updated (the previous one stays in the kernel): {0:#}")]
    Xdp(anyhow::Error),
}

/// The configuration in force, shared by every worker.
pub struct Live {
    published: Arc<Published>,
    path: PathBuf,
    listeners: Arc<ListenerSet>,
    /// The attached XDP program, when there is one; its maps are updated on reload. Locked
    /// only by reloads and at exit.
    xdp: Mutex<Option<XdpGuard>>,
    /// One reload at a time (a signal and the control socket may ask together).
    reloading: Mutex<()>,
    /// Set once an upgrade handed everything to a new process.
    retired: std::sync::atomic::AtomicBool,
    /// Set when the last reload's XDP policy could not be written: the next reload writes it
    /// whether or not it changed.
    xdp_stale: std::sync::atomic::AtomicBool,
    /// Where reloads are counted, when metrics are on.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Live {
    pub fn new(
        path: PathBuf,
        snapshot: ConfigSnapshot,
        listeners: Arc<ListenerSet>,
        xdp: Option<XdpGuard>,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Arc<Live> {
        Arc::new(Live {
            published: Published::new(snapshot),
            path,
            listeners,
            xdp: Mutex::new(xdp),
            reloading: Mutex::new(()),
            retired: Default::default(),
            xdp_stale: Default::default(),
            metrics,
        })
    }

    /// The listening sockets (what an upgrade hands over).
    pub fn listeners(&self) -> &Arc<ListenerSet> {
        &self.listeners
    }

    /// Keeps reloads out while held (during an upgrade's hand-over).
    pub fn hold_reloads(&self) -> std::sync::MutexGuard<'_, ()> {
        self.reloading.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After a hand-over: reloads are refused (the new process serves the config), and the
    /// listening sockets are no longer held here.
    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Release);
        self.listeners.release();
    }

    /// Whether an upgrade handed everything to a new process.
    pub fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Takes the XDP program's guard back, at exit.
    pub fn take_xdp(&self) -> Option<XdpGuard> {
        self.xdp.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// What the workers read.
    pub fn published(&self) -> Arc<Published> {
        self.published.clone()
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> Arc<ConfigSnapshot> {
        self.published.snapshot()
    }

    /// Reads the config file again and, when it is valid and reloadable, puts it in force.
    /// Returns a one-line summary of what changed.
    pub fn reload(&self) -> Result<String, ReloadError> {
        let result = self.reload_once();
        if let Some(m) = &self.metrics {
            m.reloaded(result.is_ok());
        }
        result
    }

    fn reload_once(&self) -> Result<String, ReloadError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        if self.retired.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ReloadError::Retired);
        }
        let config = Config::load(&self.path)?;
        let old = self.snapshot();
        let fixed = needs_restart(&old.config, &config);
        if !fixed.is_empty() {
            return Err(ReloadError::NeedsRestart(fixed));
        }
        let mut summary = route_changes(&old.config, &config);
        let new = ConfigSnapshot::succeeding(config, &old).map_err(ReloadError::Build)?;
        let listen = new.config.server.listen.clone();
        let listen_changed = listen != old.config.server.listen;
        // Bound before anything is published, so a failure refuses the whole reload.
        let plan = if listen_changed {
            Some(
                self.listeners
                    .prepare(&listen)
                    .map_err(ReloadError::Listen)?,
            )
        } else {
            None
        };
        let xdp_policy = new.config.xdp.clone();
        let xdp_changed = new.config.xdp != old.config.xdp
            || listen_changed
            || self.xdp_stale.load(std::sync::atomic::Ordering::Acquire);
        // Published first: workers told of a new listener or mode find its profile in force.
        let generation = self.published.publish(new);
        if let Some(plan) = plan {
            let diff = self.listeners.commit(plan);
            let list = |a: &[std::net::SocketAddr]| {
                a.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            summary.push_str(&format!(
                "; listeners: {} added ({}), {} removed ({})",
                diff.added.len(),
                list(&diff.added),
                diff.removed.len(),
                list(&diff.removed)
            ));
        }
        info!(generation, "config reloaded: {summary}");
        if let (true, Some(policy)) = (xdp_changed, xdp_policy) {
            let mut xdp = self.xdp.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(guard) = xdp.as_mut() {
                let ports = crate::xdp::policed_ports(&policy, &self.listeners.bound());
                if let Err(e) = guard.apply(&policy, &ports) {
                    error!("cannot update the XDP policy: {e:#}");
                    self.xdp_stale
                        .store(true, std::sync::atomic::Ordering::Release);
                    return Err(ReloadError::Xdp(e));
                }
                self.xdp_stale
                    .store(false, std::sync::atomic::Ordering::Release);
                info!(?ports, "XDP policy updated in place");
                summary.push_str("; XDP policy updated in place");
            }
        }
        Ok(summary)
    }
}

/// The settings a running process cannot take over: its sockets and threads are built from
/// them, or its durable state lives under them.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut fixed = Vec::new();
    let (o, n) = (&old.server, &new.server);
    if o.workers != n.workers {
        fixed.push("server.workers");
    }
    if o.control_socket != n.control_socket {
        fixed.push("server.control_socket");
    }
    if o.max_connections_per_worker != n.max_connections_per_worker {
        fixed.push("server.max_connections_per_worker");
    }
    if old.quotas != new.quotas {
        fixed.push("quotas");
    }
    if old.cache != new.cache {
        fixed.push("cache");
    }
    if old.cluster != new.cluster {
        fixed.push("cluster");
    }
    if old.admin != new.admin {
        fixed.push("admin");
    }
    if old.access_log != new.access_log {
        fixed.push("access_log");
    }
    let master_key = |c: &Config| {
        c.vault
            .as_ref()
            .map(|v| (v.master_key_file.clone(), v.master_key_env.clone()))
    };
    if master_key(old) != master_key(new) {
        fixed.push("vault (its presence and master key)");
    }
    match (&old.xdp, &new.xdp) {
        (Some(o), Some(n)) => fixed.extend(crate::xdp::fixed_changes(o, n)),
        (None, None) => {}
        _ => fixed.push("xdp"),
    }
    fixed
}

/// "routes: 1 added (/new*), 1 removed (...), 2 changed" by stable id.
fn route_changes(old: &Config, new: &Config) -> String {
    use std::collections::BTreeMap;
    let describe = |c: &Config| -> BTreeMap<String, String> {
        c.routes
            .iter()
            .map(|r| (r.stable_id(), format!("{r:?}")))
            .collect()
    };
    let (before, after) = (describe(old), describe(new));
    let added: Vec<&str> = after
        .keys()
        .filter(|k| !before.contains_key(*k))
        .map(String::as_str)
        .collect();
    let removed: Vec<&str> = before
        .keys()
        .filter(|k| !after.contains_key(*k))
        .map(String::as_str)
        .collect();
    let changed: Vec<&str> = after
        .iter()
        .filter(|(k, v)| before.get(*k).is_some_and(|b| b != *v))
        .map(|(k, _)| k.as_str())
        .collect();
    let list = |names: &[&str]| {
        if names.is_empty() {
            String::new()
        } else {
            format!(" ({})", names.join(", "))
        }
    };
    format!(
        "routes: {} added{}, {} removed{}, {} changed{}",
        added.len(),
        list(&added),
        removed.len(),
        list(&removed),
        changed.len(),
        list(&changed)
    )
}
