//! Session-ticket keys from a file several hosts share, so a client resumes on whichever host
//! the balancer picks. The file holds one key per line, 64 hex digits (`openssl rand -hex 32`);
//! the first encrypts new tickets, the others only decrypt, so keys rotate without breaking
//! tickets in flight: add the new key on top on every host, drop the oldest later. The file is
//! read at start, on reload and when it changes (the certificate watcher); it must not be
//! readable by group or others.
//!
//! A ticket is `key id (8) ‖ issued (8) ‖ nonce (12) ‖ ChaCha20-Poly1305(state)`: the key id
//! (the first 8 bytes of the key's SHA-256) names the key that opens it, and the issue time
//! (Unix seconds) bounds its age; both are associated data, so neither can be altered. A
//! ticket older than its lifetime is refused whatever key it used (rustls itself does not
//! check a ticket's age). Nonces are random (96 bits): a key should seal well under 2^32
//! tickets across all hosts sharing it, which rotating keys daily keeps far away.

use std::path::Path;

use ring::{
    aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN},
    rand::{SecureRandom, SystemRandom},
};
use sha2::{Digest, Sha256};

/// How long a ticket may be used (the lifetime hint clients get); rustls's own ticketer uses
/// the same six hours.
const TICKET_LIFETIME_SECS: u32 = 6 * 60 * 60;
const KEY_ID_LEN: usize = 8;
const ISSUED_LEN: usize = 8;
/// How far ahead of this host's clock another host's issue time may be.
const CLOCK_SKEW_SECS: u64 = 60;
/// Keys a file may hold (the current and those still decrypting).
const MAX_KEYS: usize = 16;

/// Why a ticket key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TicketKeyError {
    #[error("{0}")]
    File(#[from] crate::state::owner_only::OwnerOnlyError),
    #[error("{path}, line {line}: a key is 64 hex digits (openssl rand -hex 32)")]
    Malformed { path: String, line: usize },
    #[error("{path} holds no key; put 64 hex digits (openssl rand -hex 32) on the first line")]
    Empty { path: String },
    #[error("{path} holds more than {MAX_KEYS} keys")]
    TooMany { path: String },
}

struct TicketKey {
    id: [u8; KEY_ID_LEN],
    key: LessSafeKey,
}

/// The keys of one file, as rustls's ticket producer.
pub struct FileTicketer {
    /// The first encrypts; all decrypt.
    keys: Vec<TicketKey>,
    random: SystemRandom,
}

impl std::fmt::Debug for FileTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("FileTicketer")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl FileTicketer {
    pub fn load(path: &Path) -> Result<FileTicketer, TicketKeyError> {
        let shown = || path.display().to_string();
        let text = crate::state::owner_only::read_owner_only(path)?;
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut secret = [0u8; 32];
            hex::decode_to_slice(line, &mut secret).map_err(|_| TicketKeyError::Malformed {
                path: shown(),
                line: i + 1,
            })?;
            let digest = Sha256::digest(secret);
            let mut id = [0u8; KEY_ID_LEN];
            id.copy_from_slice(&digest[..KEY_ID_LEN]);
            let key = LessSafeKey::new(
                UnboundKey::new(&CHACHA20_POLY1305, &secret).expect("32-byte ChaCha20 key"),
            );
            keys.push(TicketKey { id, key });
        }
        if keys.is_empty() {
            return Err(TicketKeyError::Empty { path: shown() });
        }
        if keys.len() > MAX_KEYS {
            return Err(TicketKeyError::TooMany { path: shown() });
        }
        Ok(FileTicketer {
            keys,
            random: SystemRandom::new(),
        })
    }
}

impl rustls::server::ProducesTickets for FileTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(plain, now_secs())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(cipher, now_secs())
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

type Aad16 = [u8; KEY_ID_LEN + ISSUED_LEN];

impl FileTicketer {
    fn seal(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let current = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let mut aad: Aad16 = [0; KEY_ID_LEN + ISSUED_LEN];
        aad[..KEY_ID_LEN].copy_from_slice(&current.id);
        aad[KEY_ID_LEN..].copy_from_slice(&now.to_be_bytes());
        let mut out = Vec::with_capacity(aad.len() + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&aad);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        current
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut sealed,
            )
            .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn open(&self, cipher: &[u8], now: u64) -> Option<Vec<u8>> {
        let aad: Aad16 = cipher.get(..KEY_ID_LEN + ISSUED_LEN)?.try_into().ok()?;
        let rest = &cipher[aad.len()..];
        if rest.len() < NONCE_LEN {
            return None;
        }
        let (id, issued) = aad.split_at(KEY_ID_LEN);
        let issued = u64::from_be_bytes(issued.try_into().ok()?);
        let too_old = now.saturating_sub(issued) > u64::from(TICKET_LIFETIME_SECS);
        if too_old || issued > now + CLOCK_SKEW_SECS {
            return None;
        }
        let key = self.keys.iter().find(|k| k.id == id)?;
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let n = key
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .ok()?
            .len();
        buf.truncate(n);
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use rustls::server::ProducesTickets;

    use super::*;

    fn file(text: &str, mode: u32) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    const A: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    #[test]
    fn tickets_open_on_every_host_holding_the_key_and_only_there() {
        let host1 = FileTicketer::load(file(&format!("{A}\n"), 0o600).path()).unwrap();
        let ticket = host1.encrypt(b"session state").unwrap();
        // Another host after rotation: B encrypts, A still decrypts.
        let host2 =
            FileTicketer::load(file(&format!("# rotated\n{B}\n{A}\n"), 0o600).path()).unwrap();
        assert_eq!(host2.decrypt(&ticket).unwrap(), b"session state");
        let newer = host2.encrypt(b"newer").unwrap();
        assert_eq!(host1.decrypt(&newer), None, "host1 lacks key B");
        let mut forged = ticket.clone();
        *forged.last_mut().unwrap() ^= 1;
        assert_eq!(host1.decrypt(&forged), None);
        assert_eq!(host1.decrypt(&ticket[..10]), None);
        // The issue time cannot be moved, and an old ticket does not open.
        let mut younger = ticket.clone();
        younger[KEY_ID_LEN + ISSUED_LEN - 1] ^= 1;
        assert_eq!(host1.decrypt(&younger), None);
        let old = host1
            .seal(b"old", now_secs() - u64::from(TICKET_LIFETIME_SECS) - 1)
            .unwrap();
        assert_eq!(host1.decrypt(&old), None);
        let recent = host1.seal(b"recent", now_secs() - 60).unwrap();
        assert_eq!(host1.decrypt(&recent).unwrap(), b"recent");
    }

    #[test]
    fn bad_files_are_refused_with_their_reason() {
        let e = FileTicketer::load(file(&format!("{A}\n"), 0o644).path()).unwrap_err();
        assert!(e.to_string().contains("make it 0600"), "{e}");
        let e = FileTicketer::load(file("# nothing\n\n", 0o600).path()).unwrap_err();
        assert!(e.to_string().contains("holds no key"), "{e}");
        let e = FileTicketer::load(file(&format!("{A}\nxyz\n"), 0o600).path()).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
