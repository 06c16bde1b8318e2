//! How the thing a limit or quota counts becomes key bytes. Header values (possibly credentials)
//! are never stored or sent to Redis as they are: they become an HMAC-SHA256 under a secret
//! kept in the data directory (or a file every host of a cluster shares), so keys survive
//! restarts and agree across hosts without revealing the value.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the keyed hash kept per header value: collisions stay out of reach (2^-64 per pair
/// at 2^32 keys) while keys stay short.
pub const HASHED_SUBJECT_BYTES: usize = 16;
const SECRET_BYTES: usize = 32;
const SECRET_FILE: &str = "state.key";

/// Why the secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: holds {len} bytes; a state key is exactly {SECRET_BYTES} (delete it to make a new one, which restarts header-keyed counts)")]
    WrongLength { path: PathBuf, len: usize },
}

/// The keyed hash for header-derived subjects.
#[derive(Clone)]
pub struct SubjectHasher {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for SubjectHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("SubjectHasher(..)")
    }
}

impl SubjectHasher {
    /// Reads the secret from `key_file`, or from (creating it on first start) the data
    /// directory's `state.key`.
    pub fn load(key_file: Option<&Path>, data_dir: &Path) -> Result<SubjectHasher, SecretError> {
        let path = key_file
            .map(Path::to_owned)
            .unwrap_or_else(|| data_dir.join(SECRET_FILE));
        let io = |source| SecretError::Io {
            path: path.clone(),
            source,
        };
        let secret = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && key_file.is_none() => {
                let mut secret = [0u8; SECRET_BYTES];
                getrandom::fill(&mut secret)
                    .map_err(|e| io(std::io::Error::other(e.to_string())))?;
                std::fs::create_dir_all(data_dir).map_err(io)?;
                write_secret(&path, &secret).map_err(io)?;
                secret.to_vec()
            }
            Err(e) => return Err(io(e)),
        };
        if secret.len() != SECRET_BYTES {
            return Err(SecretError::WrongLength {
                path,
                len: secret.len(),
            });
        }
        Ok(SubjectHasher::from_secret(&secret))
    }

    pub fn from_secret(secret: &[u8]) -> SubjectHasher {
        SubjectHasher {
            mac: Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length"),
        }
    }

    /// The keyed hash of a header value.
    pub fn hash(&self, value: &[u8]) -> [u8; HASHED_SUBJECT_BYTES] {
        let mut mac = self.mac.clone();
        mac.update(value);
        let full = mac.finalize().into_bytes();
        full[..HASHED_SUBJECT_BYTES]
            .try_into()
            .expect("SHA-256 is longer")
    }
}

/// Writes a new secret readable by the owner only, durably.
fn write_secret(path: &Path, secret: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(secret)?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
