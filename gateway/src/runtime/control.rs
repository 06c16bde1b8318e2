//! Asking a running gateway to act: the control socket (a Unix socket, owner-only, at
//! `[server] control_socket`, default `control.sock` in the data directory) that
//! `portcullis reload` talks to, and SIGHUP. One command per connection, one line each way:
//! `reload` is answered `ok: <what changed>` or `error: <why, with file:line>`.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use signal_hook::{consts::SIGHUP, iterator::Signals};
use tracing::{debug, warn};

use super::live::Live;
use crate::config::Config;

/// Longest command line read from a control connection.
const MAX_COMMAND_BYTES: u64 = 256;
/// How long a control connection may take to send its command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `portcullis reload` waits for the answer (a reload that starts JWKS fetchers may
/// take a moment).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the control socket of a gateway running `config` lives.
pub fn socket_path(config: &Config) -> PathBuf {
    config
        .server
        .control_socket
        .clone()
        .unwrap_or_else(|| config.quotas.data_dir.join("control.sock"))
}

fn answer(live: &Live, command: &str) -> String {
    match command {
        "reload" => match live.reload() {
            Ok(summary) => format!("ok: {summary}"),
            Err(e) => {
                warn!("reload refused: {e}");
                format!("error: {e}")
            }
        },
        other => format!("error: unknown command {other:?}; known: reload"),
    }
}

/// Starts listening on the control socket. A stale socket file (no process behind it) is
/// replaced; a live one means another gateway uses the path, which is an error.
pub fn serve(path: &Path, live: Arc<Live>) -> std::io::Result<()> {
    if UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "{}: another gateway answers on this control socket",
                path.display()
            ),
        ));
    }
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("portcullis-control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(COMMAND_TIMEOUT));
                let mut line = String::new();
                let read = BufReader::new((&stream).take(MAX_COMMAND_BYTES)).read_line(&mut line);
                if read.is_err() {
                    debug!("control connection sent no command");
                    continue;
                }
                let reply = answer(&live, line.trim());
                let _ = (&stream).write_all(format!("{reply}\n").as_bytes());
            }
        })?;
    Ok(())
}

/// Reloads on SIGHUP; the outcome goes to the log.
pub fn reload_on_hangup(live: Arc<Live>) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGHUP])?;
    std::thread::Builder::new()
        .name("portcullis-sighup".into())
        .spawn(move || {
            for _ in signals.forever() {
                tracing::info!("SIGHUP: reloading the config");
                let _ = answer(&live, "reload");
            }
        })?;
    Ok(())
}

/// Sends `command` to the gateway behind `path` and returns its answer line.
pub fn send(path: &Path, command: &str) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    Ok(reply.trim_end().to_owned())
}
