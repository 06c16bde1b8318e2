//! Verification keys for each JWT issuer: from a PEM file, a JWKS file, or a JWKS URL that a
//! background thread fetches off the request path. Workers read the current set without a lock
//! (`ArcSwap`). A failed or garbled fetch keeps the last good set. A token naming an unknown
//! `kid` asks for a refetch; those refetches happen at most once per `refetch_min_interval`, so
//! a flood of random kids cannot hammer the identity provider. Scheduled and start-up fetches do
//! not count towards that interval: a key rotated just after one is fetched at once.

use std::{
    hash::{BuildHasher, RandomState},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender},
        Arc,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use jsonwebtoken::{
    jwk::{AlgorithmParameters, JwkSet},
    Algorithm, DecodingKey,
};
use tracing::{info, warn};

use crate::{config::IssuerConfig, sys::monotonic_ns};

/// Longest a JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: u64 = 1 << 20;

/// One verification key.
pub struct VerificationKey {
    pub kid: Option<String>,
    pub key: DecodingKey,
    /// The algorithm family the key belongs to (RSA keys serve RS* and PS*).
    pub family: jsonwebtoken::AlgorithmFamily,
}

/// An issuer's current keys.
#[derive(Default)]
pub struct KeySet {
    pub keys: Vec<VerificationKey>,
}

impl KeySet {
    /// The key for `kid` (or the only key, for tokens without one) usable with `alg`.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&DecodingKey> {
        self.keys
            .iter()
            .find(|k| k.family == alg.family() && (kid.is_none() || k.kid.as_deref() == kid))
            .map(|k| &k.key)
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// An issuer's keys as the workers see them, and how to ask for a refetch.
pub struct IssuerKeys {
    pub current: ArcSwap<KeySet>,
    /// Bumped whenever the key set changes; caches of refused tokens are cleared then.
    pub version: AtomicU64,
    /// When (on `CLOCK_MONOTONIC`) the last completed fetch attempt started, changed keys or
    /// not. A request waiting for a refetch waits for one that started after it asked: a fetch
    /// already under way may have read the old document.
    pub last_fetch_started_ns: AtomicU64,
    /// When the next refetch asked for by an unknown `kid` may start, on `CLOCK_MONOTONIC`.
    next_kid_fetch_ns: AtomicU64,
    /// Holds one pending request at most: more would say nothing new, and a flood of
    /// unknown kids must not grow a queue.
    refetch: Option<SyncSender<()>>,
}

impl IssuerKeys {
    /// Asks the fetcher for a fresh set (no-op for keys from files).
    pub fn request_refetch(&self) {
        if let Some(tx) = &self.refetch {
            // Full means a request is already pending, which is the same request.
            let _ = tx.try_send(());
        }
    }

    pub fn can_refetch(&self) -> bool {
        self.refetch.is_some()
    }

    /// How long until a refetch asked for now may start (zero: at once).
    pub fn refetch_delay(&self) -> Duration {
        Duration::from_nanos(
            self.next_kid_fetch_ns
                .load(Ordering::Acquire)
                .saturating_sub(monotonic_ns()),
        )
    }
}

/// Parses a JWKS document. Keys of unknown types are skipped; an empty result is an error.
pub fn parse_jwks(body: &[u8]) -> Result<KeySet, String> {
    let set: JwkSet =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => jsonwebtoken::AlgorithmFamily::Rsa,
            AlgorithmParameters::EllipticCurve(_) => jsonwebtoken::AlgorithmFamily::Ec,
            AlgorithmParameters::OctetKeyPair(_) => jsonwebtoken::AlgorithmFamily::Ed,
            AlgorithmParameters::OctetKey(_) => jsonwebtoken::AlgorithmFamily::Hmac,
        };
        if let Ok(key) = DecodingKey::from_jwk(jwk) {
            keys.push(VerificationKey {
                kid: jwk.common.key_id.clone(),
                key,
                family,
            });
        }
    }
    if keys.is_empty() {
        return Err("the JWKS holds no usable key".into());
    }
    Ok(KeySet { keys })
}

/// Reads a PEM public key (or, for HS algorithms, a secret) for `alg`'s family.
fn load_pem(bytes: &[u8], alg: Algorithm) -> Result<KeySet, String> {
    use jsonwebtoken::AlgorithmFamily::*;
    let key = match alg.family() {
        Rsa => DecodingKey::from_rsa_pem(bytes),
        Ec => DecodingKey::from_ec_pem(bytes),
        Ed => DecodingKey::from_ed_pem(bytes),
        Hmac => Ok(DecodingKey::from_secret(bytes.trim_ascii())),
    }
    .map_err(|e| format!("cannot read the key: {e}"))?;
    Ok(KeySet {
        keys: vec![VerificationKey {
            kid: None,
            key,
            family: alg.family(),
        }],
    })
}

/// Fetches and parses a JWKS; returns the body too, so an unchanged document can be told apart.
fn fetch(url: &str) -> Result<(KeySet, Vec<u8>), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .build()
        .into();
    let mut response = agent
        .get(url)
        .call()
        .map_err(|e| format!("fetch failed: {e}"))?;
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_JWKS_BYTES)
        .read_to_vec()
        .map_err(|e| format!("read failed: {e}"))?;
    Ok((parse_jwks(&body)?, body))
}

/// Loads an issuer's keys; for a JWKS URL starts the fetcher thread. A URL that cannot be
/// fetched at start leaves the set empty (tokens are refused) until a fetch succeeds.
pub fn start(config: &IssuerConfig, first_alg: Algorithm) -> Result<Arc<IssuerKeys>, String> {
    let (initial, refetch_rx) = if let Some(path) = &config.pem_file {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        (
            load_pem(&bytes, first_alg).map_err(|e| format!("{}: {e}", path.display()))?,
            None,
        )
    } else if let Some(path) = &config.jwks_file {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        (
            parse_jwks(&bytes).map_err(|e| format!("{}: {e}", path.display()))?,
            None,
        )
    } else {
        let (tx, rx) = sync_channel(1);
        (KeySet::default(), Some((tx, rx)))
    };
    let keys = Arc::new(IssuerKeys {
        current: ArcSwap::from_pointee(initial),
        version: AtomicU64::new(1),
        last_fetch_started_ns: AtomicU64::new(0),
        next_kid_fetch_ns: AtomicU64::new(0),
        refetch: refetch_rx.as_ref().map(|(tx, _)| tx.clone()),
    });
    if let (Some(url), Some((_, rx))) = (&config.jwks_url, refetch_rx) {
        let fetcher = Fetcher {
            url: url.clone(),
            logged_url: crate::log_throttle::redacted_url(url),
            issuer: config.issuer.clone(),
            keys: Arc::downgrade(&keys),
            refresh: config.refresh_interval.get(),
            min_gap: config.refetch_min_interval.get(),
        };
        std::thread::Builder::new()
            .name("portcullis-jwks".into())
            .spawn(move || fetcher.run(rx))
            .map_err(|e| e.to_string())?;
    }
    Ok(keys)
}

/// Fetches one issuer's keys until the keys are dropped (a reload that removes or changes the
/// issuer): it holds them weakly, and their refetch channel closing ends it.
struct Fetcher {
    url: String,
    /// `url` without credentials or query, for logs.
    logged_url: String,
    issuer: String,
    keys: std::sync::Weak<IssuerKeys>,
    refresh: Duration,
    min_gap: Duration,
}

impl Fetcher {
    fn run(self, requests: Receiver<()>) {
        // Tells a changed document from the same one fetched again.
        let hasher = RandomState::new();
        let mut last_document: Option<u64> = None;
        let mut next_refresh = Instant::now();
        loop {
            let Some(keys) = self.keys.upgrade() else {
                return;
            };
            if Instant::now() >= next_refresh {
                // Scheduled (or start-up) fetch: does not delay a kid-triggered one.
                self.fetch_once(&keys, &hasher, &mut last_document);
                next_refresh = Instant::now() + self.refresh;
            }
            drop(keys);
            match requests.recv_timeout(next_refresh.saturating_duration_since(Instant::now())) {
                Ok(()) => {
                    let Some(keys) = self.keys.upgrade() else {
                        return;
                    };
                    // A token named an unknown kid: wait out the gap since the last such
                    // fetch (requests arriving meanwhile are deferred, never dropped), then
                    // collapse the burst into one fetch.
                    std::thread::sleep(keys.refetch_delay());
                    while requests.try_recv().is_ok() {}
                    keys.next_kid_fetch_ns.store(
                        monotonic_ns() + self.min_gap.as_nanos() as u64,
                        Ordering::Release,
                    );
                    self.fetch_once(&keys, &hasher, &mut last_document);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn fetch_once(&self, keys: &IssuerKeys, hasher: &RandomState, last_document: &mut Option<u64>) {
        let started = monotonic_ns();
        match fetch(&self.url) {
            Ok((set, body)) => {
                let digest = hasher.hash_one(&body);
                if *last_document != Some(digest) {
                    *last_document = Some(digest);
                    let count = set.keys.len();
                    keys.current.store(Arc::new(set));
                    keys.version.fetch_add(1, Ordering::Release);
                    info!(issuer = %self.issuer, url = %self.logged_url, keys = count, "JWKS loaded");
                }
            }
            // Keep the last good set.
            Err(e) => {
                warn!(issuer = %self.issuer, url = %self.logged_url, "JWKS fetch failed, keeping the previous keys: {e}")
            }
        }
        keys.last_fetch_started_ns
            .fetch_max(started, Ordering::AcqRel);
    }
}
