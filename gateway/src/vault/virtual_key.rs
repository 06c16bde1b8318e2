//! Virtual keys: what clients hold instead of provider keys. 256 random bits after the
//! recognisable prefix `pcvk_` (64 hex digits), so secret scanners and people can tell one;
//! stored only as their SHA-256 (high-entropy secrets need no slow hash), compared in constant
//! time. A key id (`vk_` and 16 hex digits) names the key stably across rotations.

use sha2::{Digest, Sha256};

pub const PREFIX: &str = "pcvk_";
const SECRET_HEX: usize = 64;

/// A new secret and its hash.
pub fn new_secret() -> (String, [u8; 32]) {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the system random generator works");
    let secret = format!("{PREFIX}{}", hex::encode(bytes));
    let hash = hash(secret.as_bytes());
    (secret, hash)
}

/// A new key id.
pub fn new_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the system random generator works");
    format!("vk_{}", hex::encode(bytes))
}

pub fn hash(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Whether `value` has the shape of a virtual key (so other credentials are not hashed and
/// looked up for nothing).
pub fn looks_like(value: &[u8]) -> bool {
    value.len() == PREFIX.len() + SECRET_HEX
        && value.starts_with(PREFIX.as_bytes())
        && value[PREFIX.len()..].iter().all(u8::is_ascii_hexdigit)
}

/// Whether `id` has the shape of a key id.
pub fn is_id(id: &str) -> bool {
    id.len() == 19 && id.starts_with("vk_") && id[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_recognisable_and_distinct() {
        let (a, ha) = new_secret();
        let (b, _) = new_secret();
        assert!(looks_like(a.as_bytes()) && a != b);
        assert_eq!(hash(a.as_bytes()), ha);
        assert!(!looks_like(b"pcvk_short"));
        assert!(!looks_like(b"sk-0123"));
        assert!(is_id(&new_id()));
        assert!(!is_id("vk_../../etc"));
    }
}
