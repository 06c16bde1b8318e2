//! The LLM key vault: provider keys kept sealed at rest and handed to upstreams in place of
//! the virtual keys clients hold. Clients never see a provider key; the gateway never stores
//! a virtual key's secret, only its hash.
//!
//! Changes (admin API, `portcullis vault`) go through [`Vault`]: one at a time, each written
//! to the store crash-safely before it counts, then published to the workers as a new
//! [`index::VaultIndex`] (one lock-free load per request), then written to the audit log.
//! A revocation returns only once no worker still holds an index that admits the key.

pub mod audit;
pub mod cluster_ledger;
pub mod cluster_store;
pub mod index;
pub mod ledger;
pub mod metrics;
pub mod provider;
pub mod request;
pub mod sealed;
pub mod self_service;
pub mod store;
pub mod usage;
pub mod usage_event;
pub mod virtual_key;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;

use index::VaultIndex;
use sealed::{fingerprint, MasterKey};
use store::{
    Document, Owner, PreviousSecret, ProviderKeyRecord, RotationRecord, StoreError,
    VirtualKeyRecord, MAX_PREVIOUS_SECRETS, MAX_ROTATION_IDS,
};

/// Longest a revocation waits for workers to let go of the index it replaced; requests hold
/// it for one phase, microseconds.
const REVOKE_SETTLE: Duration = Duration::from_secs(2);
/// Times a change is tried again on a newer document another host published meanwhile.
const MAX_CHANGE_ATTEMPTS: usize = 8;
/// How long a retried rotation (same `rotation_id`) answers with the same new secret.
pub const ROTATION_RETRY_WINDOW: Duration = Duration::from_secs(10 * 60);

/// Why a vault operation was refused; the admin API answers with its status.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("stored provider key {provider}/{id} does not open: {reason}")]
    Unseal {
        provider: String,
        id: String,
        reason: sealed::UnsealError,
    },
    #[error("no provider named {0:?} in [vault.providers]")]
    UnknownProvider(String),
    #[error("no virtual key {0}")]
    UnknownKey(String),
    #[error("virtual key {0} is revoked")]
    Revoked(String),
    #[error("{0}")]
    Invalid(String),
    #[error("this process handed the vault to the new process of an upgrade; ask again")]
    HandedOver,
    #[error("{0}")]
    Cluster(#[from] cluster_store::SharedStoreError),
    #[error("other hosts kept changing the vault meanwhile; ask again")]
    Contended,
    #[error("at most {0} keys at once; revoke one first")]
    TooManyKeys(usize),
    /// Internal: a rotation another host applied first (its position in the key's rotations).
    #[error("rotation already applied")]
    AlreadyRotated(usize),
    /// Internal: a revocation of a key revoked already.
    #[error("key already revoked")]
    AlreadyRevoked,
}

impl VaultError {
    pub fn status(&self) -> u16 {
        match self {
            VaultError::UnknownProvider(_) | VaultError::Invalid(_) => 400,
            VaultError::UnknownKey(_) => 404,
            VaultError::Revoked(_) | VaultError::TooManyKeys(_) => 409,
            VaultError::HandedOver | VaultError::Cluster(_) | VaultError::Contended => 503,
            VaultError::AlreadyRotated(_) | VaultError::AlreadyRevoked => 409,
            VaultError::Store(_) | VaultError::Unseal { .. } => 500,
        }
    }
}

/// A key as it may be shown (never a secret or its hash).
pub fn view(k: &store::VirtualKeyRecord) -> serde_json::Value {
    use serde_json::json;
    let (kind, name) = match &k.owner {
        Owner::Consumer(c) => ("consumer", c),
        Owner::Group(g) => ("group", g),
    };
    json!({
        "id": k.id,
        "owner": { kind: name },
        "providers": k.providers,
        "models": k.models,
        "expires_at_ms": k.expires_at_ms,
        "metadata": k.metadata,
        "created_at_ms": k.created_at_ms,
        "revoked_at_ms": k.revoked_at_ms,
        "previous_secrets_valid_until_ms": k.previous.iter().map(|p| p.until_ms).collect::<Vec<_>>(),
        "budgets": k.budgets.iter().map(|b| json!({ "period": b.period, "limit_micros": b.limit_micros })).collect::<Vec<_>>(),
        "rpm": k.rpm,
        "tpm": k.tpm,
    })
}

fn set_budget(
    list: &mut Vec<store::BudgetRecord>,
    period: crate::config::BudgetPeriod,
    limit_micros: Option<u64>,
) {
    list.retain(|b| b.period != period);
    if let Some(limit_micros) = limit_micros {
        list.push(store::BudgetRecord {
            period,
            limit_micros,
        });
    }
}

/// What a vault request carries to its settlement.
#[derive(Debug, Default)]
pub struct VaultRequest {
    pub reservation: ledger::Reservation,
    /// The model's price, when it has one (a key under a budget always does).
    pub price: Option<crate::config::ModelPrice>,
    pub model: Box<str>,
    pub meter: usage::UsageMeter,
    /// The provider received the request (from then on it is billed).
    pub sent: bool,
    /// The whole response was relayed: its usage is final.
    pub complete: bool,
    /// Prompt (a token per 4 body bytes) and output tokens the request may use.
    pub estimated_tokens: u64,
    /// Held against the key's requests and tokens per minute.
    pub rpm: Option<ledger::Reservation>,
    pub tpm: Option<ledger::Reservation>,
    /// With `[cluster]`: what to reserve in the shared counters once the phases let the
    /// request through, then what was reserved there.
    pub shared_claim: Vec<cluster_ledger::SharedItem>,
    pub shared: Option<cluster_ledger::SharedReservation>,
    /// The body sent instead of the client's (which was `.0` bytes long): a stream the client
    /// asked for without usage, with `stream_options.include_usage` added.
    pub upstream_body: Option<(usize, Vec<u8>)>,
    /// Then the usage event that adds, withheld from the client.
    pub usage_filter: Option<usage_event::UsageEventFilter>,
}

/// Settles a vault request at its end: its real cost when the whole response was relayed
/// and reported usage; its reservation when the provider had the request but reported none;
/// at least its reservation when the response was cut short (the client left, the upstream
/// failed), since the provider bills what it generated past the cut, which the gateway did
/// not see: never zero. Nothing when the provider never had it. One usage line in the log
/// per settled request.
pub fn settle(
    vault: &Vault,
    request: VaultRequest,
    key: Option<&index::KeyEntry>,
    status: u16,
    latency: Duration,
) {
    let usage = request.meter.usage();
    let reserved = request.reservation.amount;
    let reported = usage
        .zip(request.price.as_ref())
        .map(|(u, price)| ledger::cost_of(price, u.input, u.output, u.cache_read, u.cache_write));
    // Read to its end (relayed whole, or read on after the client left): the usage is final.
    let complete = request.complete || request.meter.complete();
    // A refusal the provider answered itself (4xx, 5xx) with no usage is not billed by it.
    let refused_by_provider = complete && reported.is_none() && status >= 400;
    let cost = match (request.sent, complete, reported) {
        (false, _, _) => None,
        (true, true, None) if refused_by_provider => Some(0),
        (true, true, Some(cost)) => Some(cost),
        (true, true, None) => Some(reserved),
        (true, false, seen) => Some(seen.unwrap_or(0).max(reserved)),
    };
    vault.ledger.settle(request.reservation, cost);
    // A request the provider had counts for its minute; one it never had does not.
    let counted = request.sent.then_some(1);
    if let Some(rpm) = request.rpm {
        vault.ledger.settle(rpm, counted);
    }
    let reported_tokens = usage.map(|u| {
        u.input
            .saturating_add(u.cache_read)
            .saturating_add(u.cache_write)
            .saturating_add(u.output)
    });
    let tokens = match (request.sent, complete, reported_tokens) {
        (false, _, _) => None,
        (true, true, None) if refused_by_provider => Some(0),
        (true, true, Some(t)) => Some(t),
        (true, true, None) => Some(request.estimated_tokens),
        (true, false, seen) => Some(seen.unwrap_or(0).max(request.estimated_tokens)),
    };
    if let Some(tpm) = request.tpm {
        vault.ledger.settle(tpm, tokens);
    }
    if let Some(shared) = request.shared {
        shared.settle(cost, counted, tokens);
    }
    if let Some(cost) = cost {
        let u = usage.unwrap_or_default();
        if let Some(k) = key {
            vault.ledger.record_usage(&k.id, u.input, u.output, cost);
        }
        tracing::info!(
            target: "portcullis::vault::usage",
            key = key.map_or("", |k| k.id.as_str()),
            owner = key.map_or("", |k| k.owner_scope.as_str()),
            // As the client wrote it, so escaped and cut short.
            model = ?request.model.chars().take(64).collect::<String>(),
            input_tokens = u.input,
            output_tokens = u.output,
            cache_read_tokens = u.cache_read,
            cache_write_tokens = u.cache_write,
            usage_reported = usage.is_some(),
            cost_micros = cost,
            reserved_micros = reserved,
            latency_ms = latency.as_millis() as u64,
            status,
            "usage"
        );
    }
}

/// Opens the vault `config` describes in `data_dir` (which the caller holds the lock of).
pub fn open_configured(
    config: &crate::config::VaultConfig,
    cluster: Option<&crate::config::ClusterConfig>,
    data_dir: &Path,
) -> Result<Vault, VaultError> {
    let master = match (&config.master_key_file, &config.master_key_env) {
        (Some(file), _) => MasterKey::from_file(file),
        (None, Some(var)) => MasterKey::from_env(var),
        (None, None) => return Err(VaultError::Invalid("vault: no master key source".into())),
    }
    .map_err(|e| VaultError::Invalid(e.to_string()))?;
    let vault = Vault::open(data_dir, master, config.providers.keys().cloned().collect())?;
    match cluster {
        Some(cluster) => vault.join(cluster),
        None => Ok(vault),
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a new virtual key is for.
#[derive(Debug, Clone)]
pub struct KeySpec {
    pub owner: Owner,
    pub providers: Vec<String>,
    pub models: Vec<String>,
    pub expires_at_ms: Option<u64>,
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Budgets the key is created with (one change with the key: never a key without them).
    pub budgets: Vec<store::BudgetRecord>,
}

/// A rotation's outcome.
#[derive(Debug)]
pub enum Rotated {
    /// The new secret (shown once), and until when the previous one works.
    New {
        secret: String,
        previous_until_ms: u64,
    },
    /// This rotation id was already applied (at that time); nothing changed.
    Already { at_ms: u64 },
}

/// The vault of a running gateway (or of `portcullis vault` working on a stopped one's data
/// directory).
pub struct Vault {
    dir: PathBuf,
    master: MasterKey,
    /// The configured provider names (a reload may change them).
    providers: Mutex<Vec<String>>,
    doc: Mutex<Document>,
    index: ArcSwap<VaultIndex>,
    audit: audit::AuditLog,
    /// Spend against budgets.
    pub ledger: Arc<ledger::Ledger>,
    /// Requests refused, by [`provider::VaultRefusal::index`].
    pub refusals: [std::sync::atomic::AtomicU64; provider::VaultRefusal::ALL.len()],
    /// Set once a binary upgrade handed the data directory to the new process: this one
    /// changes and writes nothing of the vault any more.
    handed_over: std::sync::atomic::AtomicBool,
    /// The other hosts, with `[cluster]`.
    pub cluster: Option<VaultCluster>,
}

/// The vault's links to the hosts of a `[cluster]`: the shared document and shared counters.
#[derive(Debug)]
pub struct VaultCluster {
    pub store: cluster_store::SharedStore,
    pub ledger: cluster_ledger::SharedLedger,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("dir", &self.dir).finish()
    }
}

impl Vault {
    /// Opens the store in `dir`, opening every provider key with `master` (a wrong master key
    /// is refused here, not at the first request). `providers`: the configured provider names.
    pub fn open(
        dir: &Path,
        master: MasterKey,
        providers: Vec<String>,
    ) -> Result<Vault, VaultError> {
        let doc = Document::load(dir)?;
        let index = VaultIndex::build(&doc, &master)?;
        Ok(Vault {
            dir: dir.to_owned(),
            audit: audit::AuditLog::open(dir)?,
            ledger: Arc::new(ledger::Ledger::open(dir)?),
            refusals: Default::default(),
            handed_over: Default::default(),
            master,
            providers: Mutex::new(providers),
            doc: Mutex::new(doc),
            index: ArcSwap::from_pointee(index),
            cluster: None,
        })
    }

    /// Shares this vault with the other hosts of `cluster`: its document (taken in when newer,
    /// published when not) and its budget counters.
    pub fn join(mut self, cluster: &crate::config::ClusterConfig) -> Result<Vault, VaultError> {
        self.cluster = Some(VaultCluster {
            store: cluster_store::SharedStore::new(&cluster.redis, cluster.sync_interval.get())?,
            ledger: cluster_ledger::SharedLedger::start(&cluster.redis)
                .map_err(|e| VaultError::Invalid(e.to_string()))?,
        });
        self.join_cluster()?;
        Ok(self)
    }

    /// The index the request path reads.
    pub fn index(&self) -> arc_swap::Guard<Arc<VaultIndex>> {
        self.index.load()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Document> {
        self.doc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands the vault to the new process of an upgrade: writes the spend settled so far and
    /// stops changing or writing anything. Requests still draining here settle in memory only
    /// (the new process counts from the written spend).
    pub fn hand_over(&self) -> Result<(), StoreError> {
        let _one_change_at_a_time = self.lock();
        self.flush_spend()?;
        self.handed_over
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// After an upgrade that failed: this process owns the vault again.
    pub fn take_back(&self) {
        self.handed_over
            .store(false, std::sync::atomic::Ordering::Release);
    }

    fn is_handed_over(&self) -> bool {
        self.handed_over.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Makes one change: `edit` changes a copy of the newest document (and names the audit
    /// line's subject), which is then published to the cluster (when there is one), saved, and
    /// handed to the workers as a new index, then audited: in that order, so what the workers
    /// admit is always what the disk holds. With a cluster, a change another host made first
    /// is taken in and `edit` runs again on it; a Redis that holds an older document (or none,
    /// after a restart without persistence) is first given this host's. Returns `edit`'s value
    /// and the index replaced.
    fn change<T>(
        &self,
        actor: &str,
        action: &str,
        mut edit: impl FnMut(&mut Document) -> Result<(T, String), VaultError>,
    ) -> Result<(T, Arc<VaultIndex>), VaultError> {
        let mut doc = self.lock();
        for _ in 0..MAX_CHANGE_ATTEMPTS {
            if self.is_handed_over() {
                return Err(VaultError::HandedOver);
            }
            // The revision Redis holds: the change replaces exactly that one.
            let mut stored = 0;
            if let Some(cluster) = &self.cluster {
                let shared = cluster.store.fetch(&self.master)?;
                stored = shared.as_ref().map_or(0, |s| s.revision);
                match shared {
                    Some(shared) if shared.revision >= doc.revision => {
                        self.adopt(&mut doc, shared)?;
                    }
                    // Behind this host: Redis gets this host's document first.
                    _ => {
                        cluster.store.publish(stored, &doc, &self.master)?;
                        continue;
                    }
                }
            }
            let mut next = doc.clone();
            let (value, subject) = edit(&mut next)?;
            next.version = store::FORMAT_VERSION;
            next.revision = doc.revision.max(stored) + 1;
            if next.lineage.is_empty() {
                next.lineage = virtual_key::new_id()[3..].to_owned();
            }
            let index = VaultIndex::build(&next, &self.master)?;
            if let Some(cluster) = &self.cluster {
                match cluster.store.publish(stored, &next, &self.master) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    // The answer was lost: it went through if Redis holds this very document.
                    Err(e) => match cluster.store.fetch(&self.master) {
                        Ok(Some(shared)) if shared == next => {}
                        _ => return Err(e.into()),
                    },
                }
                // Published: the change holds on the cluster, so it holds here whatever the
                // disk says (the file is written again at the next change or sync).
                if let Err(e) = next.save(&self.dir) {
                    tracing::warn!("vault: the change is in effect but not saved here: {e}");
                }
            } else {
                next.save(&self.dir)?;
            }
            *doc = next;
            let old = self.index.swap(Arc::new(index));
            self.audit.record(actor, action, &subject);
            return Ok((value, old));
        }
        Err(VaultError::Contended)
    }

    /// Takes in `shared`, the cluster's document, when it differs from `doc` and is not older:
    /// checked (every provider key opens with this host's master key), saved, handed to the
    /// workers. A key revoked here stays revoked whatever `shared` says. A document of another
    /// history (this host's vault predates joining the cluster) replaces this host's only
    /// after a copy of the file is kept beside it. Returns the index it replaced.
    fn adopt(
        &self,
        doc: &mut Document,
        mut shared: Document,
    ) -> Result<Option<Arc<VaultIndex>>, VaultError> {
        if shared.revision < doc.revision || shared == *doc {
            return Ok(None);
        }
        for (id, key) in &doc.keys {
            if let (Some(at), Some(theirs)) = (key.revoked_at_ms, shared.keys.get_mut(id)) {
                theirs.revoked_at_ms.get_or_insert(at);
            }
        }
        let index = VaultIndex::build(&shared, &self.master)?;
        let foreign = !doc.lineage.is_empty() && doc.lineage != shared.lineage;
        let had_keys = !doc.keys.is_empty() || !doc.providers.is_empty();
        if (foreign || doc.lineage.is_empty()) && had_keys {
            let kept = format!("{}.before-cluster-{}", store::FILE_NAME, now_ms());
            doc.save_as(&self.dir, &kept)?;
            tracing::warn!(
                "vault: this host's keys were replaced by the cluster's document; its own are kept in {}",
                self.dir.join(&kept).display()
            );
        }
        if let Err(e) = shared.save(&self.dir) {
            tracing::warn!("vault: the cluster's document is in effect but not saved here: {e}");
        }
        *doc = shared;
        Ok(Some(self.index.swap(Arc::new(index))))
    }

    /// Joins the cluster's shared document: takes it when it is newer than this host's, or
    /// publishes this host's when Redis has none or an older one (the higher revision wins).
    /// Redis unreachable: goes on with this host's document, and the sync thread joins later.
    fn join_cluster(&self) -> Result<(), VaultError> {
        match self.sync_from_cluster() {
            Ok(_) => {}
            Err(VaultError::Cluster(e)) => {
                tracing::warn!("vault: {e}; going on with this host's keys until it answers")
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Takes in a newer document another host published, if there is one, or gives Redis this
    /// host's when it holds an older one or none (the sync thread, and joining).
    pub fn sync_from_cluster(&self) -> Result<bool, VaultError> {
        let Some(cluster) = &self.cluster else {
            return Ok(false);
        };
        if self.is_handed_over() {
            return Ok(false);
        }
        let revision = cluster.store.revision()?;
        let mut doc = self.lock();
        if revision == doc.revision && revision > 0 {
            return Ok(false);
        }
        match cluster.store.fetch(&self.master)? {
            Some(shared) if shared.revision >= doc.revision => {
                Ok(self.adopt(&mut doc, shared)?.is_some())
            }
            shared => {
                let stored = shared.map_or(0, |s| s.revision);
                if doc.revision > 0 || !doc.keys.is_empty() || !doc.providers.is_empty() {
                    if doc.lineage.is_empty() {
                        doc.lineage = virtual_key::new_id()[3..].to_owned();
                    }
                    doc.revision = doc.revision.max(stored + 1);
                    if cluster.store.publish(stored, &doc, &self.master)? {
                        if let Err(e) = doc.save(&self.dir) {
                            tracing::warn!("vault: cannot save the document here: {e}");
                        }
                    }
                }
                Ok(false)
            }
        }
    }

    /// Clears the sealed secrets of rotations past [`ROTATION_RETRY_WINDOW`] (the flusher
    /// thread): from then on only hashes of them are kept.
    pub fn expire_rotation_secrets(&self) -> Result<(), VaultError> {
        let now = now_ms();
        let expired = |r: &RotationRecord| {
            r.sealed_secret.is_some()
                && now
                    >= r.at_ms
                        .saturating_add(ROTATION_RETRY_WINDOW.as_millis() as u64)
        };
        let any = self
            .lock()
            .keys
            .values()
            .any(|k| k.rotations.iter().any(expired));
        if !any || self.is_handed_over() {
            return Ok(());
        }
        self.change("gateway", "key.rotation_secret_dropped", |next| {
            let mut ids = Vec::new();
            for k in next.keys.values_mut() {
                for r in k.rotations.iter_mut().filter(|r| expired(r)) {
                    r.sealed_secret = None;
                    ids.push(k.id.clone());
                }
            }
            Ok(((), ids.join(" ")))
        })?;
        Ok(())
    }

    /// Starts the thread that takes in other hosts' changes every `[cluster] sync_interval`;
    /// it ends with the vault.
    pub fn start_cluster_sync(self: &Arc<Self>) -> std::io::Result<()> {
        let Some(interval) = self.cluster.as_ref().map(|c| c.store.poll_interval) else {
            return Ok(());
        };
        let vault = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("vault-sync".into())
            .spawn(move || {
                let mut failing = false;
                loop {
                    std::thread::sleep(interval);
                    let Some(vault) = vault.upgrade() else { return };
                    match vault.sync_from_cluster() {
                        Ok(_) if failing => {
                            failing = false;
                            tracing::info!("vault: the cluster's document is read again");
                        }
                        Ok(_) => {}
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!("vault: cannot take in other hosts' changes: {e}");
                        }
                        Err(_) => {}
                    }
                }
            })?;
        Ok(())
    }

    /// Takes the provider names of a reloaded config.
    pub fn set_providers(&self, names: Vec<String>) {
        *self.providers.lock().unwrap_or_else(|e| e.into_inner()) = names;
    }

    /// An owner's name is a consumer id or group name: token characters, as the config
    /// allows them (it names metrics labels and ledger scopes).
    fn check_owner(owner: &Owner) -> Result<(), VaultError> {
        let (Owner::Consumer(name) | Owner::Group(name)) = owner;
        let ok = !name.is_empty()
            && name.len() <= 128
            && name.bytes().all(crate::config::is_token_byte)
            && !name.contains(',');
        if ok {
            Ok(())
        } else {
            Err(VaultError::Invalid(format!(
                "owner {name:?}: a consumer id or group name (letters, digits and !#$%&'*+-.^_`|~)"
            )))
        }
    }

    fn check_providers(&self, names: &[String]) -> Result<(), VaultError> {
        let known = self.providers.lock().unwrap_or_else(|e| e.into_inner());
        match names.iter().find(|p| !known.contains(p)) {
            Some(p) => Err(VaultError::UnknownProvider(p.clone())),
            None => Ok(()),
        }
    }

    /// Adds a real key of `provider`; returns its id and fingerprint.
    pub fn add_provider_key(
        &self,
        provider: &str,
        secret: &str,
        actor: &str,
    ) -> Result<(String, String), VaultError> {
        self.check_providers(&[provider.to_owned()])?;
        let secret = secret.trim();
        if secret.is_empty() || !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(VaultError::Invalid(
                "a provider key is printable ASCII without spaces".into(),
            ));
        }
        let fp = fingerprint(secret.as_bytes());
        let id = format!("pk_{}", &virtual_key::new_id()[3..]);
        let sealed = self
            .master
            .seal(secret.as_bytes(), &format!("{provider}/{id}"));
        let (_, _) = self.change(actor, "provider_key.add", |next| {
            let keys = next.providers.entry(provider.to_owned()).or_default();
            if keys.iter().any(|k| k.fingerprint == fp) {
                return Err(VaultError::Invalid(format!(
                    "{provider} already has the key {fp}"
                )));
            }
            keys.push(ProviderKeyRecord {
                id: id.clone(),
                fingerprint: fp.clone(),
                sealed: sealed.clone(),
                added_at_ms: now_ms(),
            });
            Ok(((), format!("{provider}/{id} {fp}")))
        })?;
        Ok((id, fp))
    }

    /// Removes a provider key.
    pub fn remove_provider_key(
        &self,
        provider: &str,
        id: &str,
        actor: &str,
    ) -> Result<(), VaultError> {
        self.change(actor, "provider_key.remove", |next| {
            let keys = next
                .providers
                .get_mut(provider)
                .ok_or_else(|| VaultError::UnknownProvider(provider.to_owned()))?;
            let before = keys.len();
            keys.retain(|k| k.id != id);
            if keys.len() == before {
                return Err(VaultError::UnknownKey(format!("{provider}/{id}")));
            }
            Ok(((), format!("{provider}/{id}")))
        })?;
        Ok(())
    }

    /// Provider keys as they may be shown: id and fingerprint, never the key.
    pub fn provider_keys(&self) -> Vec<(String, String, String)> {
        let doc = self.lock();
        doc.providers
            .iter()
            .flat_map(|(p, keys)| {
                keys.iter()
                    .map(move |k| (p.clone(), k.id.clone(), k.fingerprint.clone()))
            })
            .collect()
    }

    /// Creates a virtual key; returns its id and its secret (shown this once). With
    /// `max_held`, refused (409) when its owner already holds that many unrevoked keys: checked
    /// in the same change that creates it, so concurrent creations cannot pass it.
    pub fn create_key(
        &self,
        spec: KeySpec,
        max_held: Option<usize>,
        actor: &str,
    ) -> Result<(String, String), VaultError> {
        if spec.providers.is_empty() {
            return Err(VaultError::Invalid(
                "a key needs at least one provider".into(),
            ));
        }
        Self::check_owner(&spec.owner)?;
        self.check_providers(&spec.providers)?;
        let (secret, hash) = virtual_key::new_secret();
        let id = virtual_key::new_id();
        self.change(actor, "key.create", |next| {
            if let Some(max) = max_held {
                let held = next
                    .keys
                    .values()
                    .filter(|k| k.owner == spec.owner && k.revoked_at_ms.is_none())
                    .count();
                if held >= max {
                    return Err(VaultError::TooManyKeys(max));
                }
            }
            next.keys.insert(
                id.clone(),
                VirtualKeyRecord {
                    id: id.clone(),
                    owner: spec.owner.clone(),
                    hash: hex::encode(hash),
                    previous: Vec::new(),
                    providers: spec.providers.clone(),
                    models: spec.models.clone(),
                    expires_at_ms: spec.expires_at_ms,
                    metadata: spec.metadata.clone(),
                    created_at_ms: now_ms(),
                    revoked_at_ms: None,
                    rotations: Vec::new(),
                    budgets: spec.budgets.clone(),
                    rpm: None,
                    tpm: None,
                },
            );
            let budgets = spec
                .budgets
                .iter()
                .map(|b| format!(" {:?}={}", b.period, b.limit_micros))
                .collect::<String>();
            Ok(((), format!("{id}{budgets}")))
        })?;
        Ok((id, secret))
    }

    /// Gives key `id` a new secret; the current one keeps working for `grace` (both work during
    /// it, the old one not from its end on). A `rotation_id` already applied changes nothing:
    /// retried within [`ROTATION_RETRY_WINDOW`] while it is the key's latest rotation, it
    /// answers with the same secret (kept sealed under the master key for that window), so a
    /// client whose answer was lost is not locked out; later, [`Rotated::Already`].
    pub fn rotate(
        &self,
        id: &str,
        rotation_id: &str,
        grace: Duration,
        actor: &str,
    ) -> Result<Rotated, VaultError> {
        if rotation_id.is_empty() || rotation_id.len() > 128 {
            return Err(VaultError::Invalid(
                "rotation_id: 1 to 128 characters, the client's own id for this rotation".into(),
            ));
        }
        // A retry changes nothing: answered from the document as it is (the cluster's newest,
        // when this host can read it).
        if self.cluster.is_some() {
            let _ = self.sync_from_cluster();
        }
        {
            let doc = self.lock();
            let key = doc
                .keys
                .get(id)
                .ok_or_else(|| VaultError::UnknownKey(id.to_owned()))?;
            if let Some(pos) = key
                .rotations
                .iter()
                .position(|r| r.rotation_id == rotation_id)
            {
                return Ok(self.replay(key, pos));
            }
        }
        let context = format!("rotation/{id}/{rotation_id}");
        let (rotated, _) = self
            .change(actor, "key.rotate", |next| {
                let key = next
                    .keys
                    .get_mut(id)
                    .ok_or_else(|| VaultError::UnknownKey(id.to_owned()))?;
                if key.revoked_at_ms.is_some() {
                    return Err(VaultError::Revoked(id.to_owned()));
                }
                if let Some(pos) = key
                    .rotations
                    .iter()
                    .position(|r| r.rotation_id == rotation_id)
                {
                    // Applied by another host meanwhile.
                    return Err(VaultError::AlreadyRotated(pos));
                }
                let now = now_ms();
                let until =
                    now.saturating_add(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
                let (secret, hash) = virtual_key::new_secret();
                key.previous.retain(|p| p.until_ms > now);
                key.previous.push(PreviousSecret {
                    hash: std::mem::replace(&mut key.hash, hex::encode(hash)),
                    until_ms: until,
                });
                if key.previous.len() > MAX_PREVIOUS_SECRETS {
                    let excess = key.previous.len() - MAX_PREVIOUS_SECRETS;
                    key.previous.drain(..excess);
                }
                // Only the newest rotation may be answered again.
                for r in &mut key.rotations {
                    r.sealed_secret = None;
                }
                key.rotations.push(RotationRecord {
                    rotation_id: rotation_id.to_owned(),
                    at_ms: now,
                    previous_until_ms: until,
                    sealed_secret: Some(self.master.seal(secret.as_bytes(), &context)),
                });
                if key.rotations.len() > MAX_ROTATION_IDS {
                    key.rotations.remove(0);
                }
                Ok((
                    Rotated::New {
                        secret,
                        previous_until_ms: until,
                    },
                    id.to_owned(),
                ))
            })
            .or_else(|e| match e {
                VaultError::AlreadyRotated(pos) => {
                    let doc = self.lock();
                    let key = doc
                        .keys
                        .get(id)
                        .ok_or_else(|| VaultError::UnknownKey(id.to_owned()))?;
                    Ok((self.replay(key, pos), self.index.load_full()))
                }
                e => Err(e),
            })?;
        Ok(rotated)
    }

    /// The answer to a retried rotation: its secret again while it may be shown, else when it
    /// was applied.
    fn replay(&self, key: &VirtualKeyRecord, pos: usize) -> Rotated {
        let r = &key.rotations[pos];
        let latest = pos + 1 == key.rotations.len();
        let fresh = now_ms()
            < r.at_ms
                .saturating_add(ROTATION_RETRY_WINDOW.as_millis() as u64);
        let context = format!("rotation/{}/{}", key.id, r.rotation_id);
        match &r.sealed_secret {
            Some(sealed) if latest && fresh && key.revoked_at_ms.is_none() => {
                match self.master.open(sealed, &context) {
                    Ok(secret) => Rotated::New {
                        secret: String::from_utf8_lossy(&secret).into_owned(),
                        previous_until_ms: r.previous_until_ms,
                    },
                    Err(_) => Rotated::Already { at_ms: r.at_ms },
                }
            }
            _ => Rotated::Already { at_ms: r.at_ms },
        }
    }

    /// Revokes key `id` (every secret of it). Returns once no worker of this host can admit it
    /// any more; other hosts of a cluster take it in within their sync interval.
    pub fn revoke(&self, id: &str, actor: &str) -> Result<(), VaultError> {
        let (changed, old) = self
            .change(actor, "key.revoke", |next| {
                let key = next
                    .keys
                    .get_mut(id)
                    .ok_or_else(|| VaultError::UnknownKey(id.to_owned()))?;
                if key.revoked_at_ms.is_some() {
                    return Err(VaultError::AlreadyRevoked);
                }
                key.revoked_at_ms = Some(now_ms());
                for r in &mut key.rotations {
                    r.sealed_secret = None;
                }
                Ok((true, id.to_owned()))
            })
            .or_else(|e| match e {
                VaultError::AlreadyRevoked => Ok((false, self.index.load_full())),
                e => Err(e),
            })?;
        if !changed {
            return Ok(());
        }
        // The swap turned every worker's outstanding view of the old index into a counted
        // reference; once only ours is left, no request can be admitted by it.
        let until = std::time::Instant::now() + REVOKE_SETTLE;
        while Arc::strong_count(&old) > 1 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// Changes key `id` with `change` in a copy of the store and commits it as `action`
    /// (the audit line's subject: the key id and `detail`).
    fn change_key(
        &self,
        id: &str,
        actor: &str,
        action: &str,
        detail: &str,
        change: impl Fn(&mut VirtualKeyRecord),
    ) -> Result<(), VaultError> {
        self.change(actor, action, |next| {
            let key = next
                .keys
                .get_mut(id)
                .ok_or_else(|| VaultError::UnknownKey(id.to_owned()))?;
            change(key);
            Ok(((), format!("{id} {detail}")))
        })?;
        Ok(())
    }

    /// Sets (or with `None` removes) key `id`'s budget for `period`.
    pub fn set_key_budget(
        &self,
        id: &str,
        period: crate::config::BudgetPeriod,
        limit_micros: Option<u64>,
        actor: &str,
    ) -> Result<(), VaultError> {
        let detail = format!("{period:?} {limit_micros:?}");
        self.change_key(id, actor, "key.budget", &detail, |key| {
            set_budget(&mut key.budgets, period, limit_micros)
        })
    }

    /// Sets key `id`'s requests- and tokens-per-minute limits (`None`: no limit).
    pub fn set_key_limits(
        &self,
        id: &str,
        rpm: Option<u64>,
        tpm: Option<u64>,
        actor: &str,
    ) -> Result<(), VaultError> {
        let detail = format!("rpm={rpm:?} tpm={tpm:?}");
        self.change_key(id, actor, "key.limits", &detail, |key| {
            key.rpm = rpm;
            key.tpm = tpm;
        })
    }

    /// Sets (or removes) the budget for `period` over all keys of `owner`.
    pub fn set_owner_budget(
        &self,
        owner: &Owner,
        period: crate::config::BudgetPeriod,
        limit_micros: Option<u64>,
        actor: &str,
    ) -> Result<(), VaultError> {
        Self::check_owner(owner)?;
        let scope = owner.scope();
        self.change(actor, "owner.budget", |next| {
            set_budget(
                next.owner_budgets.entry(scope.clone()).or_default(),
                period,
                limit_micros,
            );
            next.owner_budgets.retain(|_, b| !b.is_empty());
            Ok(((), format!("{scope} {period:?} {limit_micros:?}")))
        })?;
        Ok(())
    }

    /// Writes settled spend (the flusher thread, and a clean stop).
    pub fn flush_spend(&self) -> Result<(), StoreError> {
        if self.is_handed_over() {
            return Ok(());
        }
        self.ledger.flush(now_ms() / 1000)
    }

    /// Starts the thread that writes settled spend every [`ledger::FLUSH_INTERVAL`]; it ends
    /// with the vault.
    pub fn start_flusher(self: &Arc<Self>) -> std::io::Result<()> {
        let vault = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("vault-spend".into())
            .spawn(move || loop {
                std::thread::sleep(ledger::FLUSH_INTERVAL);
                let Some(vault) = vault.upgrade() else { return };
                if let Err(e) = vault.flush_spend() {
                    tracing::warn!("cannot save vault spend (retried): {e}");
                }
                if let Err(e) = vault.expire_rotation_secrets() {
                    tracing::warn!("cannot drop expired rotation secrets (retried): {e}");
                }
            })?;
        Ok(())
    }

    /// The virtual keys, as they may be shown (never a secret or its hash).
    pub fn keys(&self) -> Vec<VirtualKeyRecord> {
        self.lock()
            .keys
            .values()
            .map(|k| VirtualKeyRecord {
                hash: String::new(),
                previous: k
                    .previous
                    .iter()
                    .map(|p| PreviousSecret {
                        hash: String::new(),
                        until_ms: p.until_ms,
                    })
                    .collect(),
                ..k.clone()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASTER: &str = "8899aabbccddeeff00112233445566778899aabbccddeeff0011223344556677";

    fn vault(dir: &Path) -> Vault {
        let master = MasterKey::from_hex(MASTER, "test").unwrap();
        Vault::open(dir, master, vec!["openai".into(), "anthropic".into()]).unwrap()
    }

    fn spec() -> KeySpec {
        KeySpec {
            owner: Owner::Consumer("alice".into()),
            providers: vec!["openai".into()],
            models: vec!["gpt-4o-mini".into()],
            expires_at_ms: None,
            metadata: Default::default(),
            budgets: Vec::new(),
        }
    }

    #[test]
    fn provider_keys_are_sealed_on_disk_and_open_only_with_the_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path());
        let (id, fp) = v
            .add_provider_key("openai", "sk-live-0123456789abcdef", "admin")
            .unwrap();
        assert!(fp.starts_with("sha256:"));
        assert_eq!(
            v.index().provider_keys["openai"][0].expose(),
            "sk-live-0123456789abcdef"
        );
        for file in [store::FILE_NAME, audit::FILE_NAME] {
            let text = std::fs::read_to_string(dir.path().join(file)).unwrap();
            assert!(!text.contains("sk-live"), "{file} holds the key");
        }
        assert!(std::fs::read_to_string(dir.path().join(audit::FILE_NAME))
            .unwrap()
            .contains(&id));
        drop(v);
        let wrong = MasterKey::from_hex(&MASTER.replace('8', "9"), "test").unwrap();
        let e = Vault::open(dir.path(), wrong, vec!["openai".into()]).unwrap_err();
        assert!(e.to_string().contains("does not open"), "{e}");
        assert!(matches!(
            vault(dir.path()).add_provider_key("mistral", "k", "admin"),
            Err(VaultError::UnknownProvider(_))
        ));
    }

    #[test]
    fn rotation_keeps_the_old_secret_exactly_for_its_grace_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path());
        let (id, old) = v.create_key(spec(), None, "admin").unwrap();
        let Rotated::New {
            secret: new,
            previous_until_ms: until,
        } = v
            .rotate(&id, "r-1", Duration::from_secs(60), "admin")
            .unwrap()
        else {
            panic!("a first rotation rotates")
        };
        let index = v.index();
        assert_eq!(index.admit(old.as_bytes(), until - 1).unwrap().id, id);
        assert_eq!(
            index.admit(old.as_bytes(), until).unwrap_err(),
            index::KeyRefusal::Unknown,
            "the old secret stops at the grace's end, exactly"
        );
        assert_eq!(index.admit(new.as_bytes(), until + 1).unwrap().id, id);
        // A retried rotation changes nothing and answers with the same secret; once another
        // rotation followed, only when it was applied.
        match v
            .rotate(&id, "r-1", Duration::from_secs(60), "admin")
            .unwrap()
        {
            Rotated::New { secret, .. } => assert_eq!(secret, new),
            other => panic!("{other:?}"),
        }
        assert!(v.index().admit(new.as_bytes(), now_ms()).is_ok());
        let Rotated::New { secret: newer, .. } = v
            .rotate(&id, "r-2", Duration::from_secs(60), "admin")
            .unwrap()
        else {
            panic!("a new rotation id rotates")
        };
        assert!(matches!(
            v.rotate(&id, "r-1", Duration::from_secs(60), "admin")
                .unwrap(),
            Rotated::Already { .. }
        ));
        let text = std::fs::read_to_string(dir.path().join(store::FILE_NAME)).unwrap();
        assert!(
            !text.contains(&newer) && !text.contains(&new),
            "secrets sealed on disk"
        );
        assert!(v.index().admit(new.as_bytes(), now_ms()).is_ok());
        // The store round-trips through a restart.
        drop(index);
        drop(v);
        let v = vault(dir.path());
        assert!(v.index().admit(new.as_bytes(), now_ms()).is_ok());
        assert!(v.index().admit(old.as_bytes(), until - 1).is_ok());
        assert!(v.keys().iter().all(|k| k.hash.is_empty()));
    }

    #[test]
    fn revoked_and_expired_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path());
        let (id, secret) = v.create_key(spec(), None, "admin").unwrap();
        v.revoke(&id, "admin").unwrap();
        assert_eq!(
            v.index().admit(secret.as_bytes(), now_ms()).unwrap_err(),
            index::KeyRefusal::Unknown
        );
        assert!(matches!(
            v.rotate(&id, "r", Duration::ZERO, "admin"),
            Err(VaultError::Revoked(_))
        ));
        let (_, secret) = v
            .create_key(
                KeySpec {
                    expires_at_ms: Some(now_ms() - 1),
                    ..spec()
                },
                None,
                "admin",
            )
            .unwrap();
        assert_eq!(
            v.index().admit(secret.as_bytes(), now_ms()).unwrap_err(),
            index::KeyRefusal::Expired
        );
    }
}
