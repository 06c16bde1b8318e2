//! Files of secrets (the vault's master key, shared ticket keys) are read only when nobody but
//! their owner can read them, as ssh does with private keys: a key others can read is a key
//! already given away.

use std::{os::unix::fs::PermissionsExt, path::Path};

/// Why a secret file was not read.
#[derive(Debug, thiserror::Error)]
pub enum OwnerOnlyError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} is readable by group or others (mode {mode:o}); make it 0600")]
    Exposed { path: String, mode: u32 },
}

/// The text of `path`, if only its owner may read it.
pub fn read_owner_only(path: &Path) -> Result<String, OwnerOnlyError> {
    let read_err = |e: std::io::Error| OwnerOnlyError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let mode = std::fs::metadata(path)
        .map_err(read_err)?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(OwnerOnlyError::Exposed {
            path: path.display().to_string(),
            mode: mode & 0o777,
        });
    }
    std::fs::read_to_string(path).map_err(read_err)
}
