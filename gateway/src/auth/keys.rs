//! API key generation and the stored form of a key (`sha256:<hex>`).

use sha2::{Digest, Sha256};

/// The prefix of a stored key hash.
pub const KEY_HASH_PREFIX: &str = "sha256:";
/// Prefix of generated keys, so a leaked one is recognisable in a scan.
const KEY_PREFIX: &str = "pcl_";
/// Random bytes in a key.
const KEY_BYTES: usize = 32;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh key (256 random bits, hex) and its stored form.
pub fn new_key() -> (String, String) {
    let mut secret = [0u8; KEY_BYTES];
    getrandom::fill(&mut secret).expect("the OS random source works");
    let key = format!("{KEY_PREFIX}{}", hex(&secret));
    let hash = format!("{KEY_HASH_PREFIX}{}", hex(&Sha256::digest(key.as_bytes())));
    (key, hash)
}

/// Parses `sha256:<64 hex digits>`.
pub fn parse_key_hash(stored: &str) -> Option<[u8; 32]> {
    let digits = stored.strip_prefix(KEY_HASH_PREFIX)?.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}
