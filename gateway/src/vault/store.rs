//! The vault's durable state: provider keys (sealed) and virtual keys (hashes only), one JSON
//! document in the data directory, replaced crash-safely on every change (written to a
//! temporary file, fsynced, renamed over the old one, the directory fsynced): after `kill -9`
//! the file holds the state before or after the last change, never a torn one. A file that
//! cannot be parsed is refused with its path and the position of the fault, never half-read.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub const FILE_NAME: &str = "vault.json";
pub const FORMAT_VERSION: u32 = 1;
/// Earlier secrets of a key still in their grace period, at most.
pub const MAX_PREVIOUS_SECRETS: usize = 4;
/// Rotation ids remembered per key, for idempotent retries.
pub const MAX_ROTATION_IDS: usize = 16;

/// Why the store cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a vault file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path}: written by a newer Portcullis (format {found}, this one reads {FORMAT_VERSION})"
    )]
    NewerFormat { path: PathBuf, found: u32 },
}

/// Who owns a virtual key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Owner {
    Consumer(String),
    Group(String),
}

/// A provider key, sealed under the master key with `provider/id` as context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderKeyRecord {
    pub id: String,
    pub fingerprint: String,
    pub sealed: String,
    pub added_at_ms: u64,
}

/// An earlier secret of a rotated key, valid until `until_ms` (exclusive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousSecret {
    pub hash: String,
    pub until_ms: u64,
}

/// A rotation a client asked for, by its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationRecord {
    pub rotation_id: String,
    pub at_ms: u64,
    /// Until when the secret this rotation replaced works.
    #[serde(default)]
    pub previous_until_ms: u64,
    /// The new secret sealed under the master key, for a retry of the newest rotation within
    /// [`super::ROTATION_RETRY_WINDOW`]; dropped by the next rotation or a revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_secret: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualKeyRecord {
    pub id: String,
    pub owner: Owner,
    /// SHA-256 of the current secret, hex.
    pub hash: String,
    #[serde(default)]
    pub previous: Vec<PreviousSecret>,
    /// Providers the key may call; empty: none.
    pub providers: Vec<String>,
    /// Models the key may ask for; empty: every model of its providers.
    #[serde(default)]
    pub models: Vec<String>,
    pub expires_at_ms: Option<u64>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub created_at_ms: u64,
    pub revoked_at_ms: Option<u64>,
    #[serde(default)]
    pub rotations: Vec<RotationRecord>,
    #[serde(default)]
    pub budgets: Vec<BudgetRecord>,
    /// Requests per minute, and tokens (prompt and output) per minute.
    #[serde(default)]
    pub rpm: Option<u64>,
    #[serde(default)]
    pub tpm: Option<u64>,
}

/// A spend budget: at most `limit_micros` per `period`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetRecord {
    pub period: crate::config::BudgetPeriod,
    pub limit_micros: u64,
}

impl Owner {
    /// `consumer:alice` or `group:search`: how budgets and the ledger name the owner.
    pub fn scope(&self) -> String {
        match self {
            Owner::Consumer(c) => format!("consumer:{c}"),
            Owner::Group(g) => format!("group:{g}"),
        }
    }
}

/// Everything the vault keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    pub version: u32,
    /// Counts the changes; with `[cluster]`, the higher revision is the newer document.
    #[serde(default)]
    pub revision: u64,
    /// A random id given at the first change: documents of one history share it, so a host
    /// can tell another cluster's document from a newer revision of its own.
    #[serde(default)]
    pub lineage: String,
    /// Provider name -> its keys.
    #[serde(default)]
    pub providers: BTreeMap<String, Vec<ProviderKeyRecord>>,
    /// Key id -> key.
    #[serde(default)]
    pub keys: BTreeMap<String, VirtualKeyRecord>,
    /// Owner scope (see [`Owner::scope`]) -> budgets over all its keys.
    #[serde(default)]
    pub owner_budgets: BTreeMap<String, Vec<BudgetRecord>>,
}

impl Document {
    /// Reads the store in `dir`; an absent file is an empty vault.
    pub fn load(dir: &Path) -> Result<Document, StoreError> {
        let path = dir.join(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Document {
                    version: FORMAT_VERSION,
                    ..Document::default()
                })
            }
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let doc: Document = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if doc.version > FORMAT_VERSION {
            return Err(StoreError::NewerFormat {
                path,
                found: doc.version,
            });
        }
        Ok(doc)
    }

    /// Replaces the store in `dir` with this document, crash-safely.
    pub fn save(&self, dir: &Path) -> Result<(), StoreError> {
        self.save_as(dir, FILE_NAME)
    }

    /// Writes this document to `dir/name`, crash-safely.
    pub fn save_as(&self, dir: &Path, name: &str) -> Result<(), StoreError> {
        let text = serde_json::to_vec_pretty(self).expect("the document serialises");
        write_atomically(dir, name, &text)
    }
}

/// Replaces `dir/name` with `bytes` crash-safely (see [`crate::state::atomic_file`]), mode
/// 0600: only the gateway's user reads the vault's files.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    crate::state::atomic_file::replace(dir, name, bytes, 0o600).map_err(|source| StoreError::Io {
        path: dir.join(name),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_survive_a_round_trip_and_corruption_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = Document::load(dir.path()).unwrap();
        assert!(empty.keys.is_empty());
        let mut doc = empty.clone();
        doc.keys.insert(
            "vk_0011223344556677".into(),
            VirtualKeyRecord {
                id: "vk_0011223344556677".into(),
                owner: Owner::Consumer("alice".into()),
                hash: "ab".repeat(32),
                previous: vec![],
                providers: vec!["openai".into()],
                models: vec![],
                expires_at_ms: None,
                metadata: BTreeMap::new(),
                created_at_ms: 1,
                revoked_at_ms: None,
                rotations: vec![],
                budgets: vec![],
                rpm: None,
                tpm: None,
            },
        );
        doc.save(dir.path()).unwrap();
        assert_eq!(Document::load(dir.path()).unwrap(), doc);
        std::fs::write(dir.path().join(FILE_NAME), "{\"version\": 1, \"keys\": [").unwrap();
        let e = Document::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("vault.json") && e.contains("line 1"), "{e}");
        std::fs::write(dir.path().join(FILE_NAME), "{\"version\": 99}").unwrap();
        let e = Document::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("newer"), "{e}");
    }
}
