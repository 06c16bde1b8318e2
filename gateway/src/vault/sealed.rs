//! Provider keys sealed at rest: AES-256-GCM (ring) under the vault's master key, a random
//! nonce per seal, and the provider's name and the key's id as associated data, so a sealed
//! key cannot be moved to another provider or entry unnoticed. The master key comes from a
//! file (mode 0600) or an environment variable, never from the config file.

use std::path::Path;

use ring::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN},
    rand::{SecureRandom, SystemRandom},
};
use sha2::{Digest, Sha256};

/// Why the master key cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error("the vault master key: {0}")]
    File(#[from] crate::state::owner_only::OwnerOnlyError),
    #[error("the vault master key {source_name} must be 64 hex digits (openssl rand -hex 32)")]
    Malformed { source_name: String },
    #[error("the environment variable {0} that should hold the vault master key is not set")]
    Unset(String),
}

impl MasterKey {
    /// The tag (hex) that proves `document` was written by a holder of this master key.
    pub fn sign_document(&self, document: &[u8]) -> String {
        hex::encode(ring::hmac::sign(&self.document_mac, document))
    }

    /// Whether `tag` (hex) proves `document` (compared in constant time).
    pub fn verify_document(&self, document: &[u8], tag: &[u8]) -> bool {
        let mut raw = [0u8; 32];
        hex::decode_to_slice(tag, &mut raw).is_ok()
            && ring::hmac::verify(&self.document_mac, document, &raw).is_ok()
    }
}

/// Why a sealed value does not open.
#[derive(Debug, thiserror::Error)]
pub enum UnsealError {
    #[error("not a sealed value (hex of nonce and ciphertext expected)")]
    Malformed,
    #[error("does not open with this master key (another key, or altered)")]
    WrongKeyOrAltered,
}

/// The master key; never printed.
pub struct MasterKey {
    key: LessSafeKey,
    /// Authenticates the document hosts share through Redis (derived from the master key).
    document_mac: ring::hmac::Key,
    random: SystemRandom,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// From 64 hex digits.
    pub fn from_hex(hex_digits: &str, source_name: &str) -> Result<MasterKey, MasterKeyError> {
        let mut secret = [0u8; 32];
        hex::decode_to_slice(hex_digits.trim(), &mut secret).map_err(|_| {
            MasterKeyError::Malformed {
                source_name: source_name.to_owned(),
            }
        })?;
        let document_mac = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"portcullis vault")
            .extract(&secret)
            .expand(&[b"shared document mac"], ring::hmac::HMAC_SHA256)
            .expect("one block of output")
            .into();
        Ok(MasterKey {
            key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &secret).expect("32-byte key")),
            document_mac,
            random: SystemRandom::new(),
        })
    }

    /// From a file of 64 hex digits that only its owner may read.
    pub fn from_file(path: &Path) -> Result<MasterKey, MasterKeyError> {
        let text = crate::state::owner_only::read_owner_only(path)?;
        let shown = path.display().to_string();
        MasterKey::from_hex(&text, &shown)
    }

    /// From the environment variable `name`.
    pub fn from_env(name: &str) -> Result<MasterKey, MasterKeyError> {
        let value = std::env::var(name).map_err(|_| MasterKeyError::Unset(name.to_owned()))?;
        MasterKey::from_hex(&value, &format!("in ${name}"))
    }

    /// Seals `plain`, bound to `context`; hex of nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, plain: &[u8], context: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .expect("the system random generator works");
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut buf,
            )
            .expect("AES-GCM seals any length the vault stores");
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        hex::encode(out)
    }

    /// Opens what [`MasterKey::seal`] sealed under the same `context`.
    pub fn open(&self, sealed: &str, context: &str) -> Result<Vec<u8>, UnsealError> {
        let bytes = hex::decode(sealed).map_err(|_| UnsealError::Malformed)?;
        if bytes.len() < NONCE_LEN + 16 {
            return Err(UnsealError::Malformed);
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| UnsealError::Malformed)?;
        let mut buf = sealed.to_vec();
        let n = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut buf)
            .map_err(|_| UnsealError::WrongKeyOrAltered)?
            .len();
        buf.truncate(n);
        Ok(buf)
    }
}

/// A short public fingerprint of a secret (the first 12 hex digits of its SHA-256): enough to
/// tell keys apart in lists and logs, nothing to recover them from.
pub fn fingerprint(secret: &[u8]) -> String {
    let digest = Sha256::digest(secret);
    format!("sha256:{}", hex::encode(&digest[..6]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let key = MasterKey::from_hex(KEY, "test").unwrap();
        let sealed = key.seal(b"sk-live-secret", "openai/pk_1");
        assert!(!sealed.contains("sk-live"));
        assert_eq!(key.open(&sealed, "openai/pk_1").unwrap(), b"sk-live-secret");
        assert!(matches!(
            key.open(&sealed, "anthropic/pk_1"),
            Err(UnsealError::WrongKeyOrAltered)
        ));
        let other = MasterKey::from_hex(&KEY.replace('0', "1"), "test").unwrap();
        assert!(matches!(
            other.open(&sealed, "openai/pk_1"),
            Err(UnsealError::WrongKeyOrAltered)
        ));
        assert!(matches!(key.open("zz", "x"), Err(UnsealError::Malformed)));
        assert_ne!(
            key.seal(b"same", "c"),
            key.seal(b"same", "c"),
            "fresh nonces"
        );
    }

    #[test]
    fn fingerprints_are_short_and_stable() {
        assert_eq!(fingerprint(b"abc"), "sha256:ba7816bf8f01");
    }
}
