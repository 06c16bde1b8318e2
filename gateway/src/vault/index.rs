//! What the request path reads of the vault: virtual keys by the hash of each secret that
//! works (the current one, and earlier ones until their grace ends), and the opened provider
//! keys. Rebuilt and published whole on every change; lookups take no lock.

use std::{collections::HashMap, sync::Arc};

use subtle::ConstantTimeEq;

use super::{
    store::{Document, Owner},
    VaultError,
};

/// A provider key in memory; never printed.
pub struct ProviderSecret {
    pub id: String,
    pub fingerprint: String,
    secret: String,
    /// Not chosen before this instant (ms since the epoch) while another key is free: the
    /// provider answered 429 with it. Shared by every worker; written only on a 429.
    rested_until_ms: std::sync::atomic::AtomicU64,
}

impl ProviderSecret {
    pub fn expose(&self) -> &str {
        &self.secret
    }

    /// Rests this key for `wait` (from now).
    pub fn rest_for(&self, wait: std::time::Duration) {
        let until = super::now_ms().saturating_add(wait.as_millis() as u64);
        self.rested_until_ms
            .fetch_max(until, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(key = %self.id, fingerprint = %self.fingerprint, rest_ms = wait.as_millis() as u64, "provider key answered 429: resting it");
    }

    fn rested_until(&self) -> u64 {
        self.rested_until_ms
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A key of `keys` to use now: at random among those not resting (balanced without shared
/// counters), else the one whose rest ends first. `keys` is not empty.
pub fn choose(keys: &[Arc<ProviderSecret>], now_ms: u64) -> &Arc<ProviderSecret> {
    // One pass (another worker may rest a key meanwhile): each free key replaces the choice
    // with probability 1/n, n counting the free keys seen, which picks uniformly.
    let mut chosen = None;
    let mut free = 0;
    for k in keys {
        if k.rested_until() <= now_ms {
            free += 1;
            if fastrand::usize(..free) == 0 {
                chosen = Some(k);
            }
        }
    }
    chosen
        .or_else(|| keys.iter().min_by_key(|k| k.rested_until()))
        .unwrap_or(&keys[0])
}

impl std::fmt::Debug for ProviderSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProviderSecret({} {})", self.id, self.fingerprint)
    }
}

/// A virtual key as admission needs it.
#[derive(Debug)]
pub struct KeyEntry {
    pub id: String,
    pub owner: Owner,
    /// The owning consumer's id, or the owning group's name: what limits, quotas and logs
    /// count the key's requests under.
    pub owner_label: String,
    pub providers: Vec<String>,
    pub models: Vec<String>,
    pub expires_at_ms: Option<u64>,
    /// `key:ID`, as the ledger names the key's counters.
    pub scope: String,
    /// `consumer:NAME` or `group:NAME`.
    pub owner_scope: String,
    pub budgets: Vec<(crate::config::BudgetPeriod, u64)>,
    /// The owner's budgets, over all its keys.
    pub owner_budgets: Vec<(crate::config::BudgetPeriod, u64)>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    /// The ledger scopes of the key's per-minute counts (made once, not per request).
    pub rpm_scope: String,
    pub tpm_scope: String,
}

impl KeyEntry {
    /// Whether any budget applies to the key's requests.
    pub fn has_budget(&self) -> bool {
        !self.budgets.is_empty() || !self.owner_budgets.is_empty()
    }
}

/// Why a presented virtual key is not admitted (all answered 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    /// No key has this secret (never had, revoked, or a rotated secret past its grace).
    Unknown,
    Expired,
}

struct Secret {
    entry: usize,
    hash: [u8; 32],
    /// Works before this instant (ms since the epoch) only: a rotated secret in its grace.
    until_ms: Option<u64>,
}

#[derive(Debug, Default)]
pub struct VaultIndex {
    entries: Vec<Arc<KeyEntry>>,
    by_prefix: HashMap<u64, Vec<Secret>>,
    /// Provider name -> its opened keys.
    pub provider_keys: HashMap<String, Vec<Arc<ProviderSecret>>>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(entry {})", self.entry)
    }
}

fn prefix(hash: &[u8; 32]) -> u64 {
    u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"))
}

fn parse_hash(hex_digits: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut out).ok()?;
    Some(out)
}

impl VaultIndex {
    pub fn build(
        doc: &Document,
        master: &super::sealed::MasterKey,
    ) -> Result<VaultIndex, VaultError> {
        let mut index = VaultIndex::default();
        for key in doc.keys.values().filter(|k| k.revoked_at_ms.is_none()) {
            let entry = index.entries.len();
            index.entries.push(Arc::new(KeyEntry {
                id: key.id.clone(),
                owner_label: match &key.owner {
                    Owner::Consumer(c) | Owner::Group(c) => c.clone(),
                },
                owner: key.owner.clone(),
                providers: key.providers.clone(),
                models: key.models.clone(),
                expires_at_ms: key.expires_at_ms,
                scope: format!("key:{}", key.id),
                owner_scope: key.owner.scope(),
                budgets: key
                    .budgets
                    .iter()
                    .map(|b| (b.period, b.limit_micros))
                    .collect(),
                owner_budgets: doc
                    .owner_budgets
                    .get(&key.owner.scope())
                    .map(|list| list.iter().map(|b| (b.period, b.limit_micros)).collect())
                    .unwrap_or_default(),
                rpm: key.rpm,
                tpm: key.tpm,
                rpm_scope: format!("rpm:key:{}", key.id),
                tpm_scope: format!("tpm:key:{}", key.id),
            }));
            let secrets = std::iter::once((key.hash.as_str(), None)).chain(
                key.previous
                    .iter()
                    .map(|p| (p.hash.as_str(), Some(p.until_ms))),
            );
            for (hash, until_ms) in secrets {
                // A hash that does not parse admits nothing (the file was edited by hand).
                if let Some(hash) = parse_hash(hash) {
                    index
                        .by_prefix
                        .entry(prefix(&hash))
                        .or_default()
                        .push(Secret {
                            entry,
                            hash,
                            until_ms,
                        });
                }
            }
        }
        for (provider, keys) in &doc.providers {
            let opened = keys
                .iter()
                .map(|k| {
                    let plain = master
                        .open(&k.sealed, &format!("{provider}/{}", k.id))
                        .map_err(|reason| VaultError::Unseal {
                            provider: provider.clone(),
                            id: k.id.clone(),
                            reason,
                        })?;
                    Ok(Arc::new(ProviderSecret {
                        id: k.id.clone(),
                        fingerprint: k.fingerprint.clone(),
                        secret: String::from_utf8_lossy(&plain).into_owned(),
                        rested_until_ms: std::sync::atomic::AtomicU64::new(0),
                    }))
                })
                .collect::<Result<Vec<_>, VaultError>>()?;
            index.provider_keys.insert(provider.clone(), opened);
        }
        Ok(index)
    }

    /// The key whose secret `presented` is, at `now_ms`. Every candidate with the same hash
    /// prefix is compared in constant time.
    pub fn admit(&self, presented: &[u8], now_ms: u64) -> Result<&Arc<KeyEntry>, KeyRefusal> {
        let hash = super::virtual_key::hash(presented);
        let candidates = self
            .by_prefix
            .get(&prefix(&hash))
            .ok_or(KeyRefusal::Unknown)?;
        let mut found = None;
        for s in candidates {
            if bool::from(s.hash.ct_eq(&hash)) {
                found = Some(s);
            }
        }
        let secret = found.ok_or(KeyRefusal::Unknown)?;
        // The grace ends exactly at `until_ms`: from that millisecond on, the old secret is no
        // secret of this key.
        if secret.until_ms.is_some_and(|until| now_ms >= until) {
            return Err(KeyRefusal::Unknown);
        }
        let entry = &self.entries[secret.entry];
        if entry.expires_at_ms.is_some_and(|at| now_ms >= at) {
            return Err(KeyRefusal::Expired);
        }
        Ok(entry)
    }
}
