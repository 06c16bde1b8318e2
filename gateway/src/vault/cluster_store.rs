//! The vault's document shared by the hosts of a `[cluster]` through Redis, so a key created,
//! rotated or revoked on one host holds on all of them. Redis keeps the newest document (what
//! `vault.json` holds: provider keys sealed under the master key every host shares, virtual
//! keys as hashes) with its revision; a change is published by a compare-and-set on that
//! revision (one Lua script), and a change that lost the race is applied again to the newer
//! document. Hosts poll the revision every `[cluster] sync_interval` and adopt a newer
//! document, so a revocation reaches every host within that interval and one Redis round trip
//! (the host that revoked waits for its own workers before it answers).
//!
//! The document is stored with an HMAC under a key derived from the master key, and a host
//! takes in only a document whose tag it verifies: whoever can write to Redis without the
//! master key cannot add keys, lift revocations or drop budgets.
//!
//! While Redis is unreachable, changes are refused (503) rather than made on one host alone;
//! the request path goes on with the last document each host has.

use std::{sync::Mutex, time::Duration};

/// The Redis hash holding `rev` and `doc`.
const DOCUMENT_KEY: &str = "portcullis:vault:document";

/// Publishes `ARGV[3]` (tagged `ARGV[4]`) as revision `ARGV[2]` if the stored revision is
/// `ARGV[1]`; returns -1, or the stored revision when it is not.
const PUBLISH_SCRIPT: &str = r#"
local current = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if current ~= tonumber(ARGV[1]) then return current end
redis.call('HSET', KEYS[1], 'rev', ARGV[2], 'doc', ARGV[3], 'mac', ARGV[4])
return -1
"#;

/// Why the shared document could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SharedStoreError {
    #[error("the cluster's Redis ({url}) is unreachable: {source}")]
    Unreachable {
        url: String,
        source: redis::RedisError,
    },
    #[error("the vault document in the cluster's Redis is not one: {0}")]
    Corrupt(String),
    #[error("the vault document in the cluster's Redis is not signed with this master key: refused (another cluster's, or written by someone without the key)")]
    Unsigned,
}

/// This host's link to the shared document.
pub struct SharedStore {
    client: redis::Client,
    url: String,
    conn: Mutex<Option<redis::Connection>>,
    pub poll_interval: Duration,
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("url", &self.url)
            .finish()
    }
}

impl SharedStore {
    pub fn new(redis_url: &str, poll_interval: Duration) -> Result<SharedStore, SharedStoreError> {
        let url = crate::log_throttle::redacted_url(redis_url);
        let client =
            redis::Client::open(redis_url).map_err(|source| SharedStoreError::Unreachable {
                url: url.clone(),
                source,
            })?;
        Ok(SharedStore {
            client,
            url,
            conn: Mutex::new(None),
            poll_interval,
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, SharedStoreError> {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let result = (|| {
            if slot.is_none() {
                *slot = Some(crate::cluster::connect(&self.client)?);
            }
            f(slot.as_mut().expect("connected above"))
        })();
        result.map_err(|source| {
            *slot = None;
            SharedStoreError::Unreachable {
                url: self.url.clone(),
                source,
            }
        })
    }

    /// The stored revision (0: none stored).
    pub fn revision(&self) -> Result<u64, SharedStoreError> {
        self.with(|c| {
            redis::cmd("HGET")
                .arg(DOCUMENT_KEY)
                .arg("rev")
                .query::<Option<u64>>(c)
        })
        .map(Option::unwrap_or_default)
    }

    /// The stored document, when there is one; refused unless `master` verifies its tag.
    pub fn fetch(
        &self,
        master: &super::sealed::MasterKey,
    ) -> Result<Option<super::store::Document>, SharedStoreError> {
        let (rev, doc, mac): (Option<u64>, Option<Vec<u8>>, Option<Vec<u8>>) = self.with(|c| {
            redis::cmd("HMGET")
                .arg(DOCUMENT_KEY)
                .arg("rev")
                .arg("doc")
                .arg("mac")
                .query(c)
        })?;
        let (Some(rev), Some(doc)) = (rev, doc) else {
            return Ok(None);
        };
        if !mac.is_some_and(|m| master.verify_document(&doc, &m)) {
            return Err(SharedStoreError::Unsigned);
        }
        let doc: super::store::Document =
            serde_json::from_slice(&doc).map_err(|e| SharedStoreError::Corrupt(e.to_string()))?;
        if doc.revision != rev {
            return Err(SharedStoreError::Corrupt(format!(
                "revision {rev} holds a document of revision {}",
                doc.revision
            )));
        }
        Ok(Some(doc))
    }

    /// The cluster's `(settled, reserved)` totals of the counters `keys` (see
    /// [`super::cluster_ledger::counter_key`]), for the admin API.
    pub fn counter_totals(&self, keys: &[String]) -> Result<Vec<(u64, u64)>, SharedStoreError> {
        self.with(|c| {
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.cmd("HMGET").arg(k).arg("settled").arg("reserved");
            }
            let totals: Vec<(Option<u64>, Option<u64>)> = pipe.query(c)?;
            Ok(totals
                .into_iter()
                .map(|(s, r)| (s.unwrap_or(0), r.unwrap_or(0)))
                .collect())
        })
    }

    /// Publishes `doc` if the stored revision is still `expected`; `Ok(false)` when another
    /// host changed it first.
    pub fn publish(
        &self,
        expected: u64,
        doc: &super::store::Document,
        master: &super::sealed::MasterKey,
    ) -> Result<bool, SharedStoreError> {
        let bytes = serde_json::to_vec(doc).expect("the document serialises");
        let mac = master.sign_document(&bytes);
        let answer: i64 = self.with(|c| {
            redis::cmd("EVAL")
                .arg(PUBLISH_SCRIPT)
                .arg(1)
                .arg(DOCUMENT_KEY)
                .arg(expected)
                .arg(doc.revision)
                .arg(&bytes)
                .arg(&mac)
                .query(c)
        })?;
        Ok(answer == -1)
    }
}
