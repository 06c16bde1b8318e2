//! Owner-only Unix listening sockets (the control socket, a `unix:` admin listener): a path
//! another live process answers on is an error unless it is being taken over (an upgrade); a
//! stale file is replaced.

use std::{io, os::unix::net::UnixListener, path::Path};

/// Binds `path` with mode 0600; `busy` is the error's text (after the path) when another
/// process answers on it and `replace` is false.
pub fn bind_owner_only(path: &Path, replace: bool, busy: &str) -> io::Result<UnixListener> {
    if !replace && std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: {busy}", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}
