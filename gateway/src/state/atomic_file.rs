//! Replacing a state file so that a crash (`kill -9`, power loss) leaves the old contents or
//! the new, never a torn file: written to a temporary file of this process's own (two
//! processes may write a moment apart during an upgrade), fsynced, renamed over the old one,
//! and the directory fsynced so the rename itself is durable.

use std::{io::Write, os::unix::fs::OpenOptionsExt, path::Path};

/// Replaces `dir/name` with `bytes`; a new file gets `mode` (less the umask).
pub fn replace(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.{}.tmp", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Makes the directory's entries (a create, a rename) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
