//! JWT validation: signature with the issuer's keys and explicitly listed algorithms (so
//! `none` and HS-with-an-RSA-public-key confusion cannot pass), `exp`, `nbf` and `iat` with a
//! leeway, `iss` and `aud`. Verified tokens are cached per worker until they expire, so a hot
//! token costs a hash lookup, not a signature check.

use std::{
    collections::HashMap,
    rc::Rc,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{decode, decode_header, Algorithm, Validation};
use serde_json::{Map, Value};

use super::jwks::{start as start_keys, IssuerKeys};
use crate::config::{AuthConfig, IssuerConfig, RouteAuthConfig};

/// Verified tokens kept per worker, at most; the cache is cleared when full.
const TOKEN_CACHE_ENTRIES: usize = 10_000;

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
    /// Signature, time or issuer/audience checks failed.
    Invalid,
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

    /// Verifies `token` against every issuer whose algorithms allow its header.
    pub fn verify(&self, token: &[u8]) -> Result<TokenIdentity, JwtError> {
        let token = std::str::from_utf8(token).map_err(|_| JwtError::Malformed)?;
        let header = decode_header(token).map_err(|_| JwtError::Malformed)?;
        let mut unknown_key = None;
        let mut any_issuer = false;
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
            let Ok(data) = decode::<Map<String, Value>>(token, key, &validation) else {
                continue;
            };
            let claims = data.claims;
            // jsonwebtoken does not check iat: a token issued in the future is refused.
            if claims
                .get("iat")
                .and_then(Value::as_u64)
                .is_some_and(|iat| iat > now_secs() + validation.leeway)
            {
                continue;
            }
            return Ok(identity(c, claims));
        }
        match (unknown_key, any_issuer) {
            (Some(i), _) => Err(JwtError::UnknownKey(i)),
            (None, false) => Err(JwtError::Malformed),
            (None, true) => Err(JwtError::Invalid),
        }
    }
}

fn identity(c: &IssuerConfig, claims: Map<String, Value>) -> TokenIdentity {
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
    let consumer = claims
        .get(&c.consumer_claim)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let groups = string_list(claims.get("groups"));
    let mut scopes = string_list(claims.get("scope"));
    scopes.extend(string_list(claims.get("scp")));
    let claim_headers = c
        .claim_headers
        .iter()
        .filter_map(|(claim, header)| {
            let v = match claims.get(claim)? {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            // Never let a claim value break the head it is written into.
            (!v.bytes().any(|b| b < b' ' && b != b'\t')).then(|| (header.clone(), v))
        })
        .collect();
    let expires_at = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    TokenIdentity {
        groups_header: groups.join(","),
        consumer,
        groups,
        scopes,
        claim_headers,
        claims,
        expires_at,
    }
}

/// Verified tokens, per worker.
#[derive(Default)]
pub struct TokenCache {
    entries: HashMap<Box<[u8]>, Rc<TokenIdentity>>,
}

impl TokenCache {
    /// A cached identity for `token`, unless it has expired since.
    pub fn get(&mut self, token: &[u8]) -> Option<Rc<TokenIdentity>> {
        let hit = self.entries.get(token)?;
        if hit.expires_at > now_secs() {
            return Some(hit.clone());
        }
        self.entries.remove(token);
        None
    }

    pub fn insert(&mut self, token: &[u8], identity: TokenIdentity) -> Rc<TokenIdentity> {
        if self.entries.len() >= TOKEN_CACHE_ENTRIES {
            self.entries.clear();
        }
        let identity = Rc::new(identity);
        self.entries.insert(token.into(), identity.clone());
        identity
    }
}
