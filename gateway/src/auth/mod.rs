//! Who is calling: consumers and their API keys, and each route's access policy.
//!
//! API keys are 256 random bits. At rest only their SHA-256 is kept: a slow password hash buys
//! nothing for high-entropy secrets and would cost the hot path. A presented key is hashed, the
//! first 8 bytes of the hash pick the candidates, and the full hash is compared in constant
//! time. Keys are never logged.

mod credentials;
mod jwks;
mod jwt;
mod keys;

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use credentials::{find_credential, Credential, CredentialSource};
pub use jwt::{parse_algorithm, Issuers, JwtError, TokenCache, TokenIdentity};
pub use keys::{new_key, parse_key_hash};

use crate::config::{Config, RouteAuthConfig};

/// A consumer as the request path needs it.
#[derive(Debug)]
pub struct Consumer {
    pub id: String,
    pub groups: Vec<String>,
    /// `groups` joined with `,`, ready for X-Consumer-Groups.
    pub groups_header: String,
}

/// Why a request was not admitted by a route's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// 401: no credential the route accepts.
    Missing,
    /// 401: a credential that matches no consumer.
    Invalid,
    /// 403: a valid consumer outside the route's groups.
    Forbidden,
}

impl AuthError {
    pub fn status(self) -> u16 {
        match self {
            AuthError::Missing | AuthError::Invalid => 401,
            AuthError::Forbidden => 403,
        }
    }
    pub fn detail(self) -> &'static str {
        match self {
            AuthError::Missing => "credentials required",
            AuthError::Invalid => "invalid credentials",
            AuthError::Forbidden => "not allowed for this consumer",
        }
    }
}

/// Every consumer, indexed by the first 8 bytes of each API key's hash.
#[derive(Debug, Default)]
pub struct Consumers {
    consumers: Vec<Consumer>,
    by_prefix: HashMap<u64, Vec<(usize, [u8; 32])>>,
    /// Client-certificate subjects and subject alternative names that identify a consumer.
    by_cert_subject: HashMap<String, usize>,
    by_cert_san: HashMap<String, usize>,
}

impl Consumers {
    pub fn new(config: &Config) -> Consumers {
        let mut table = Consumers::default();
        for (i, c) in config.consumers.iter().enumerate() {
            table.consumers.push(Consumer {
                id: c.id.clone(),
                groups: c.groups.clone(),
                groups_header: c.groups.join(","),
            });
            if let Some(m) = &c.client_certificate {
                for subject in &m.subjects {
                    table.by_cert_subject.insert(subject.clone(), i);
                }
                for san in &m.sans {
                    table.by_cert_san.insert(normalized_san(san), i);
                }
            }
            for hash in c.api_keys.iter().filter_map(|k| parse_key_hash(k)) {
                table
                    .by_prefix
                    .entry(prefix(&hash))
                    .or_default()
                    .push((i, hash));
            }
        }
        table
    }

    pub fn get(&self, index: usize) -> &Consumer {
        &self.consumers[index]
    }

    /// The consumer owning this API key, if any.
    pub fn by_api_key(&self, key: &[u8]) -> Option<usize> {
        let hash: [u8; 32] = Sha256::digest(key).into();
        let candidates = self.by_prefix.get(&prefix(&hash))?;
        // Compare every candidate in constant time, whichever matches.
        let mut found = None;
        for (consumer, stored) in candidates {
            if bool::from(stored.ct_eq(&hash)) {
                found = Some(*consumer);
            }
        }
        found
    }

    /// The consumer a verified client certificate identifies: by its subject, else by the
    /// first of its alternative names a consumer lists. (Certificates are public: no secret
    /// is compared here, the handshake proved possession of the key.)
    pub fn by_certificate(
        &self,
        identity: &crate::tls::client_identity::ClientIdentity,
    ) -> Option<usize> {
        self.by_cert_subject
            .get(&identity.subject)
            .copied()
            .or_else(|| {
                identity
                    .sans
                    .iter()
                    .find_map(|san| self.by_cert_san.get(&normalized_san(san)).copied())
            })
    }

    /// Applies a route's group policy to an identified consumer.
    pub fn admit_consumer(
        &self,
        policy: &RouteAuthConfig,
        consumer: usize,
    ) -> Result<usize, AuthError> {
        let groups = &self.consumers[consumer].groups;
        if !policy.groups.is_empty() && !policy.groups.iter().any(|g| groups.contains(g)) {
            return Err(AuthError::Forbidden);
        }
        Ok(consumer)
    }

    /// Applies a route's policy to the credential found (if any).
    pub fn admit(
        &self,
        policy: &RouteAuthConfig,
        credential: Option<&Credential>,
    ) -> Result<usize, AuthError> {
        let credential = credential.ok_or(AuthError::Missing)?;
        let consumer = self
            .by_api_key(credential.value)
            .ok_or(AuthError::Invalid)?;
        self.admit_consumer(policy, consumer)
    }
}

/// A subject alternative name as it is compared: DNS names and e-mail domains are
/// case-insensitive; URIs (SPIFFE ids among them) are compared as written.
pub fn normalized_san(san: &str) -> String {
    if san.contains("://") || san.starts_with("urn:") {
        san.to_owned()
    } else {
        san.to_ascii_lowercase()
    }
}

fn prefix(hash: &[u8; 32]) -> u64 {
    u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::AuthMethod;

    #[test]
    fn keys_verify_only_against_their_hash() {
        let (key, hash) = new_key();
        assert!(key.starts_with("pcl_") && key.len() == 68);
        let src = format!("[[consumers]]\nid = \"alice\"\ngroups = [\"admin\"]\napi_keys = [\"{hash}\"]\n[[consumers]]\nid = \"bob\"\n");
        let config = Config::parse(Path::new("t.toml"), &src).unwrap();
        let table = Consumers::new(&config);
        assert_eq!(table.by_api_key(key.as_bytes()), Some(0));
        assert_eq!(table.by_api_key(b"pcl_0000"), None);
        let mut wrong = key.clone().into_bytes();
        wrong[10] ^= 1;
        assert_eq!(table.by_api_key(&wrong), None);
        let policy = RouteAuthConfig {
            scopes: vec![],
            claims: Default::default(),
            methods: vec![AuthMethod::ApiKey],
            groups: vec!["ops".into()],
            keep_credentials: false,
        };
        let cred = Credential {
            value: key.as_bytes(),
            source: CredentialSource::Header,
        };
        assert_eq!(table.admit(&policy, Some(&cred)), Err(AuthError::Forbidden));
        assert_eq!(table.admit(&policy, None), Err(AuthError::Missing));
    }

    #[test]
    fn plain_keys_in_config_are_refused() {
        let e = Config::parse(
            Path::new("t.toml"),
            "[[consumers]]\nid = \"a\"\napi_keys = [\"pcl_secret\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`consumers[0].api_keys[0]`") && e.contains("never the key itself"),
            "{e}"
        );
    }
}
