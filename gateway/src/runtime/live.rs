//! The configuration in force, and how it is replaced while the gateway runs. A reload parses
//! and validates the file first (an invalid one is refused and the running config keeps
//! serving), refuses changes to settings that need a restart (naming them), then builds a new
//! snapshot that keeps the live state of every name it still has and publishes it. Workers take
//! it at their next request boundary; requests in flight finish on the old one.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use tracing::info;

use crate::{
    config::{Config, ConfigError},
    proxy::snapshot::{ConfigSnapshot, Published},
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
}

/// The configuration in force, shared by every worker.
pub struct Live {
    published: Arc<Published>,
    path: PathBuf,
    /// One reload at a time (a signal and the control socket may ask together).
    reloading: Mutex<()>,
}

impl Live {
    pub fn new(path: PathBuf, snapshot: ConfigSnapshot) -> Arc<Live> {
        Arc::new(Live {
            published: Published::new(snapshot),
            path,
            reloading: Mutex::new(()),
        })
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
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let config = Config::load(&self.path)?;
        let old = self.snapshot();
        let fixed = needs_restart(&old.config, &config);
        if !fixed.is_empty() {
            return Err(ReloadError::NeedsRestart(fixed));
        }
        let summary = route_changes(&old.config, &config);
        let new = ConfigSnapshot::succeeding(config, &old).map_err(ReloadError::Build)?;
        let generation = self.published.publish(new);
        info!(generation, "config reloaded: {summary}");
        Ok(summary)
    }
}

/// The settings a running process cannot take over: its sockets and threads are built from
/// them, or its durable state lives under them.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut fixed = Vec::new();
    let (o, n) = (&old.server, &new.server);
    if o.listen != n.listen {
        fixed.push("server.listen");
    }
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
    if old.cluster != new.cluster {
        fixed.push("cluster");
    }
    if old.xdp != new.xdp {
        fixed.push("xdp");
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
