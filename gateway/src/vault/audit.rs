//! The vault's append-only audit log: one JSON line per key operation (when, who, what, on
//! which key), fsynced before the operation's answer; never a secret (provider keys appear by
//! fingerprint, virtual keys by id).

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::Path,
    sync::Mutex,
};

use tracing::warn;

use super::store::StoreError;

pub const FILE_NAME: &str = "vault-audit.log";

pub struct AuditLog {
    file: Mutex<File>,
}

impl AuditLog {
    pub fn open(dir: &Path) -> Result<AuditLog, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| StoreError::Io { path, source })?;
        Ok(AuditLog {
            file: Mutex::new(file),
        })
    }

    /// Appends one line. The change it records is already durable, so a failure to write the
    /// line is logged, not undone.
    pub fn record(&self, actor: &str, action: &str, subject: &str) {
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "actor": actor,
            "action": action,
            "subject": subject,
        });
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let written = writeln!(file, "{line}").and_then(|()| file.sync_data());
        if let Err(e) = written {
            warn!(error = %e, action, subject, "cannot write the vault audit log");
        }
    }
}
