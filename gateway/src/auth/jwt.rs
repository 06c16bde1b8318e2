//! JWT validation: signature with the issuer's keys and explicitly listed algorithms (so
//! `none` and HS-with-an-RSA-public-key confusion cannot pass), `exp`, `nbf` and `iat` with a
//! leeway, `iss` and `aud`. Every identity value a token supplies (the consumer, groups, claim
//! headers) must be safe to write into a head, or the token is invalid. Verified tokens are
//! cached per worker until they expire, and refused ones for a while, so a hot or replayed
//! token costs a hash lookup, not a signature check.

use std::{
    hash::{BuildHasher, RandomState},
    num::NonZeroUsize,
    rc::Rc,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{decode, decode_header, errors::ErrorKind, Algorithm, Validation};
use lru::LruCache;
use serde_json::{Map, Value};

use super::jwks::{start as start_keys, IssuerKeys};
use crate::config::{AuthConfig, IssuerConfig, RouteAuthConfig};

/// `"RS256"` and friends; `None` for anything not accepted (including `none`).
pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    use Algorithm::*;
    Some(match name {
        "HS256" => HS256,
        "HS384" => HS384,
        "HS512" => HS512,
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        _ => return None,
    })
}

/// What a verified token establishes.
#[derive(Debug)]
pub struct TokenIdentity {
    pub consumer: String,
    pub groups: Vec<String>,
    /// `groups` joined with `,`.
    pub groups_header: String,
    pub scopes: Vec<String>,
    /// Claim headers to send upstream.
    pub claim_headers: Vec<(String, String)>,
    claims: Map<String, Value>,
    /// Seconds since the epoch after which the cached entry is stale.
    expires_at: u64,
}

impl TokenIdentity {
    /// One of the token's claims (for templates).
    pub fn claim(&self, name: &str) -> Option<&Value> {
        self.claims.get(name)
    }

    /// Checks a route's groups, scopes and claims.
    pub fn allowed_by(&self, policy: &RouteAuthConfig) -> bool {
        (policy.groups.is_empty() || policy.groups.iter().any(|g| self.groups.contains(g)))
            && policy.scopes.iter().all(|s| self.scopes.contains(s))
            && policy
                .claims
                .iter()
                .all(|(k, v)| self.claims.get(k).and_then(Value::as_str) == Some(v.as_str()))
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    /// Not a well-formed JWT, or an algorithm no issuer accepts.
    Malformed,
    /// Signed with a `kid` no issuer knows; issuer `0` can refetch its keys.
    UnknownKey(usize),
    /// `nbf` or `iat` lies in the future: the same token may be valid later.
    NotYetValid,
    /// Signature, expiry or issuer/audience checks failed.
    Invalid,
    /// Verified, but the consumer claim is missing or empty, or an identity value (consumer,
    /// group, claim header) holds a control character or cannot be written into a head.
    UnsafeIdentity,
}

impl JwtError {
    /// Whether the same token fails the same way until the keys change, so the refusal may be
    /// remembered.
    pub fn is_lasting(self) -> bool {
        matches!(
            self,
            JwtError::Malformed | JwtError::Invalid | JwtError::UnsafeIdentity
        )
    }
}

struct Issuer {
    config: IssuerConfig,
    algorithms: Vec<Algorithm>,
    keys: Arc<IssuerKeys>,
}

/// Every configured issuer; shared by the workers (keys are read without a lock).
#[derive(Default)]
pub struct Issuers {
    issuers: Vec<Issuer>,
    /// Every claim header name, so client copies can be removed.
    pub claim_header_names: Vec<String>,
}

impl std::fmt::Debug for Issuers {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Issuers")
            .field("count", &self.issuers.len())
            .finish()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Issuers {
    /// Loads every issuer's keys (starting fetchers for JWKS URLs).
    pub fn start(config: &AuthConfig) -> Result<Issuers, String> {
        let mut issuers = Vec::new();
        let mut claim_header_names = Vec::new();
        for c in &config.issuers {
            let algorithms: Vec<Algorithm> = c
                .algorithms
                .iter()
                .filter_map(|a| parse_algorithm(a))
                .collect();
            let keys =
                start_keys(c, algorithms[0]).map_err(|e| format!("issuer {}: {e}", c.issuer))?;
            claim_header_names.extend(c.claim_headers.values().map(|h| h.to_ascii_lowercase()));
            issuers.push(Issuer {
                config: c.clone(),
                algorithms,
                keys,
            });
        }
        Ok(Issuers {
            issuers,
            claim_header_names,
        })
    }

    pub fn keys(&self, issuer: usize) -> &IssuerKeys {
        &self.issuers[issuer].keys
    }

    /// Changes whenever any issuer's key set changes.
    pub fn keys_epoch(&self) -> u64 {
        self.issuers
            .iter()
            .map(|i| i.keys.version.load(Ordering::Acquire))
            .fold(0, u64::wrapping_add)
    }

    /// The configured issuer at `issuer`.
    pub fn config(&self, issuer: usize) -> &IssuerConfig {
        &self.issuers[issuer].config
    }

    /// Verifies `token` against every issuer whose algorithms allow its header.
    pub fn verify(&self, token: &[u8]) -> Result<TokenIdentity, JwtError> {
        let token = std::str::from_utf8(token).map_err(|_| JwtError::Malformed)?;
        let header = decode_header(token).map_err(|_| JwtError::Malformed)?;
        let mut unknown_key = None;
        let mut any_issuer = false;
        let mut not_yet_valid = false;
        for (index, issuer) in self.issuers.iter().enumerate() {
            if !issuer.algorithms.contains(&header.alg) {
                continue;
            }
            any_issuer = true;
            let keys = issuer.keys.current.load();
            let Some(key) = keys.find(header.kid.as_deref(), header.alg) else {
                if header.kid.as_deref().is_some_and(|k| !keys.has_kid(k))
                    && issuer.keys.can_refetch()
                {
                    unknown_key.get_or_insert(index);
                }
                continue;
            };
            let c = &issuer.config;
            let mut validation = Validation::new(header.alg);
            validation.leeway = c.leeway.get().as_secs();
            validation.validate_nbf = true;
            validation.set_issuer(&[&c.issuer]);
            validation.set_required_spec_claims(&["exp", "iss"]);
            if c.audiences.is_empty() {
                validation.validate_aud = false;
            } else {
                validation.set_audience(&c.audiences);
            }
            let data = match decode::<Map<String, Value>>(token, key, &validation) {
                Ok(data) => data,
                Err(e) => {
                    not_yet_valid |= matches!(e.kind(), ErrorKind::ImmatureSignature);
                    continue;
                }
            };
            let claims = data.claims;
            // jsonwebtoken does not check iat: a token issued in the future is refused.
            if claims
                .get("iat")
                .and_then(Value::as_u64)
                .is_some_and(|iat| iat > now_secs() + validation.leeway)
            {
                not_yet_valid = true;
                continue;
            }
            return identity(c, claims);
        }
        match (unknown_key, any_issuer) {
            (Some(i), _) => Err(JwtError::UnknownKey(i)),
            (None, false) => Err(JwtError::Malformed),
            (None, true) if not_yet_valid => Err(JwtError::NotYetValid),
            (None, true) => Err(JwtError::Invalid),
        }
    }
}

/// True for a value that may be written into a head as it is: no control characters (CR, LF
/// and NUL among them), not even tab.
fn is_safe_identity_value(v: &str) -> bool {
    !v.bytes().any(|b| b < b' ' || b == 0x7f)
}

fn identity(c: &IssuerConfig, claims: Map<String, Value>) -> Result<TokenIdentity, JwtError> {
    let string_list = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    };
    // One caller without a consumer claim must not share a bucket with every other such caller.
    let consumer = claims
        .get(&c.consumer_claim)
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty() && is_safe_identity_value(id))
        .ok_or(JwtError::UnsafeIdentity)?
        .to_owned();
    let groups = string_list(claims.get("groups"));
    // Groups travel as one comma-separated field: a comma would forge a second group.
    if groups
        .iter()
        .any(|g| g.is_empty() || g.contains(',') || !is_safe_identity_value(g))
    {
        return Err(JwtError::UnsafeIdentity);
    }
    let mut scopes = string_list(claims.get("scope"));
    scopes.extend(string_list(claims.get("scp")));
    let mut claim_headers = Vec::with_capacity(c.claim_headers.len());
    for (claim, header) in &c.claim_headers {
        let Some(value) = claims.get(claim) else {
            continue;
        };
        let v = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if !is_safe_identity_value(&v) {
            return Err(JwtError::UnsafeIdentity);
        }
        claim_headers.push((header.clone(), v));
    }
    let expires_at = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    Ok(TokenIdentity {
        groups_header: groups.join(","),
        consumer,
        groups,
        scopes,
        claim_headers,
        claims,
        expires_at,
    })
}

/// A token's key in the cache of refused tokens: a keyed hash, so the cache holds no token
/// and an attacker cannot aim collisions at it.
type TokenDigest = u64;

/// Verified and refused tokens, per worker. Both maps are bounded and evict the least recently
/// used entry when full.
pub struct TokenCache {
    verified: LruCache<Box<[u8]>, Rc<TokenIdentity>>,
    refused: LruCache<TokenDigest, (JwtError, Instant)>,
    refused_ttl: Duration,
    hasher: RandomState,
    /// The sum of every issuer's key-set version when `refused` was last valid.
    keys_epoch: u64,
}

impl TokenCache {
    pub fn new(config: &AuthConfig) -> TokenCache {
        let size = |n: usize| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        TokenCache {
            verified: LruCache::new(size(config.token_cache_entries)),
            refused: LruCache::new(size(config.invalid_token_cache_entries)),
            refused_ttl: config.invalid_token_cache_ttl.get(),
            hasher: RandomState::new(),
            keys_epoch: 0,
        }
    }

    /// A cached identity for `token`, unless it has expired since.
    pub fn get(&mut self, token: &[u8]) -> Option<Rc<TokenIdentity>> {
        let hit = self.verified.get(token)?;
        if hit.expires_at > now_secs() {
            return Some(hit.clone());
        }
        self.verified.pop(token);
        None
    }

    pub fn insert(&mut self, token: &[u8], identity: TokenIdentity) -> Rc<TokenIdentity> {
        let identity = Rc::new(identity);
        self.verified.put(token.into(), identity.clone());
        identity
    }

    /// The remembered refusal of `token`, if it is still fresh and the keys have not changed
    /// since (`keys_epoch` from [`Issuers::keys_epoch`]).
    pub fn refused(&mut self, token: &[u8], keys_epoch: u64) -> Option<JwtError> {
        if keys_epoch != self.keys_epoch {
            self.refused.clear();
            self.keys_epoch = keys_epoch;
            return None;
        }
        let digest = self.hasher.hash_one(token);
        let (error, at) = *self.refused.get(&digest)?;
        if at.elapsed() < self.refused_ttl {
            return Some(error);
        }
        self.refused.pop(&digest);
        None
    }

    /// Remembers a refusal that will not change until the keys do.
    pub fn remember_refusal(&mut self, token: &[u8], error: JwtError, keys_epoch: u64) {
        if !error.is_lasting() {
            return;
        }
        if keys_epoch != self.keys_epoch {
            self.refused.clear();
            self.keys_epoch = keys_epoch;
        }
        self.refused
            .put(self.hasher.hash_one(token), (error, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(verified: usize, refused: usize) -> AuthConfig {
        AuthConfig {
            token_cache_entries: verified,
            invalid_token_cache_entries: refused,
            ..AuthConfig::default()
        }
    }

    fn identity(expires_at: u64) -> TokenIdentity {
        TokenIdentity {
            consumer: "c".into(),
            groups: vec![],
            groups_header: String::new(),
            scopes: vec![],
            claim_headers: vec![],
            claims: Map::new(),
            expires_at,
        }
    }

    #[test]
    fn refusals_are_remembered_only_while_they_cannot_change() {
        let mut cache = TokenCache::new(&config(4, 4));
        cache.remember_refusal(b"bad", JwtError::Invalid, 1);
        cache.remember_refusal(b"later", JwtError::NotYetValid, 1);
        cache.remember_refusal(b"kid", JwtError::UnknownKey(0), 1);
        assert_eq!(cache.refused(b"bad", 1), Some(JwtError::Invalid));
        assert_eq!(cache.refused(b"later", 1), None, "nbf can pass");
        assert_eq!(cache.refused(b"kid", 1), None, "the key may arrive");
        // New keys: every remembered refusal is forgotten.
        assert_eq!(cache.refused(b"bad", 2), None);
        assert_eq!(cache.refused(b"bad", 2), None);
    }

    #[test]
    fn both_caches_evict_the_least_recently_used() {
        let mut cache = TokenCache::new(&config(2, 2));
        let far = now_secs() + 600;
        cache.insert(b"a", identity(far));
        cache.insert(b"b", identity(far));
        assert!(cache.get(b"a").is_some());
        cache.insert(b"c", identity(far));
        assert!(cache.get(b"b").is_none(), "b was least recently used");
        assert!(cache.get(b"a").is_some() && cache.get(b"c").is_some());
        cache.insert(b"old", identity(now_secs() - 1));
        assert!(
            cache.get(b"old").is_none(),
            "expired entries are not served"
        );

        for t in [&b"x"[..], b"y", b"z"] {
            cache.remember_refusal(t, JwtError::Malformed, 7);
        }
        assert_eq!(cache.refused(b"x", 7), None, "x was evicted");
        assert_eq!(cache.refused(b"z", 7), Some(JwtError::Malformed));
    }
}
