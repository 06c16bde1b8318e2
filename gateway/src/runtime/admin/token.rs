//! The admin API's bearer token: read once from a file or an environment variable, kept only
//! as its SHA-256, and compared in constant time (digests of equal length, so neither the
//! content nor the length leaks through timing).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AdminConfig;

/// Shortest token accepted: guessing one must be hopeless.
pub const MIN_TOKEN_BYTES: usize = 16;

/// Why the token could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the admin token file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("the environment variable {0} holding the admin token is not set")]
    Unset(String),
    #[error("the admin token is {0} bytes long: it needs at least {MIN_TOKEN_BYTES}")]
    Short(usize),
}

pub struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    /// The token `config` names, or `None` when it names none (a Unix-socket listener).
    pub fn load(config: &AdminConfig) -> Result<Option<AdminToken>, TokenError> {
        let text = if let Some(path) = &config.token_file {
            let text = std::fs::read_to_string(path).map_err(|source| TokenError::File {
                path: path.display().to_string(),
                source,
            })?;
            text.lines().next().unwrap_or_default().trim().to_owned()
        } else if let Some(var) = &config.token_env {
            std::env::var(var)
                .map_err(|_| TokenError::Unset(var.clone()))?
                .trim()
                .to_owned()
        } else {
            return Ok(None);
        };
        if text.len() < MIN_TOKEN_BYTES {
            return Err(TokenError::Short(text.len()));
        }
        Ok(Some(AdminToken {
            digest: Sha256::digest(text.as_bytes()).into(),
        }))
    }

    /// Whether `presented` is the token.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest.ct_eq(&self.digest).into()
    }
}
