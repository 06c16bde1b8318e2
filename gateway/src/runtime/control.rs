//! Asking a running gateway to act: the control socket (a Unix socket, owner-only, at
//! `[server] control_socket`, default `control.sock` in the data directory) that
//! `portcullis reload` talks to, and SIGHUP. One command per connection, one line each way:
//! `reload` is answered `ok: <what changed>` or `error: <why, with file:line>`.
//!
//! `upgrade` hands the process over to a new one (`portcullis --upgrade`), in this order:
//! 1. the old process sends every listening socket (each worker's, in order) with SCM_RIGHTS,
//!    after a line `listeners WORKERS PER_WORKER`;
//! 2. it hands over the quota store (final flush, lock released; it charges no more quotas)
//!    and says `handed-over`;
//! 3. the new process opens the store, starts its workers on the same sockets and says
//!    `listening`; both accept on the same sockets meanwhile, so no connection waits;
//! 4. the old process stops accepting (its pending accepts are cancelled, the sockets stay
//!    open for the new one), says `ok`, drains and exits. Its answers carry
//!    `Connection: close` and idle connections stay until their next answer or the drain's end.
//!
//! If the new process never says `listening`, the old one takes the data directory back and
//! keeps serving.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use signal_hook::{consts::SIGHUP, iterator::Signals};
use tracing::{debug, warn};

use super::{
    live::Live,
    shutdown::{DrainFlag, DrainMode},
};
use crate::config::Config;

/// How long the old process waits for the new one to start listening.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the control socket needs to hand the process over.
pub struct Handover {
    /// Every worker's listening sockets, as reloads left them.
    pub listeners: Arc<super::listener::ListenerSet>,
    pub drain: DrainFlag,
    pub data_dir: PathBuf,
}

/// Longest command line read from a control connection (a vault command carries a JSON body).
const MAX_COMMAND_BYTES: u64 = 64 * 1024;
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
        "upgrade" => "error: upgrade needs the control socket, not a signal".into(),
        "reload" => match live.reload() {
            Ok(summary) => format!("ok: {summary}"),
            Err(e) => {
                warn!("reload refused: {e}");
                format!("error: {e}")
            }
        },
        other if other.starts_with("vault ") => vault_command(live, &other["vault ".len()..]),
        other if other.starts_with("cache purge ") => {
            let snapshot = live.snapshot();
            let body = &other["cache purge ".len()..];
            let answer =
                super::admin::cache_api::dispatch(&snapshot, "POST", &["purge"], body.as_bytes());
            format!("{} {}", answer.status, answer.compact_body())
        }
        other => format!("error: unknown command {other:?}; known: reload, vault, cache purge"),
    }
}

/// `vault METHOD PATH [JSON]` from `portcullis vault` (the socket is its owner's only): the
/// admin API's vault operation, done as `cli`. The answer is `STATUS JSON` on one line.
fn vault_command(live: &Live, command: &str) -> String {
    let mut parts = command.splitn(3, ' ');
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return "400 {\"error\":{\"message\":\"expected: vault METHOD PATH [JSON]\"}}".into();
    };
    let body = parts.next().unwrap_or("");
    let snapshot = live.snapshot();
    let (Some(vault), Some(config)) = (&snapshot.vault, &snapshot.config.vault) else {
        return "404 {\"error\":{\"message\":\"no [vault] is configured\"}}".into();
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let answer = super::admin::vault_api::dispatch(
        vault,
        config.rotation_grace.get(),
        method,
        &segments,
        body.as_bytes(),
        "cli",
    );
    format!("{} {}", answer.status, answer.compact_body())
}

/// Starts listening on the control socket. A stale socket file (no process behind it) is
/// replaced; a live one means another gateway uses the path, which is an error.
pub fn serve(path: &Path, live: Arc<Live>, handover: Handover) -> std::io::Result<()> {
    serve_at(path, live, handover, false)
}

/// Like [`serve`], for the new process of an upgrade: the old one still answers on the path
/// (it is finishing the hand-over on its open connection), so the path is taken over.
pub fn serve_replacing(path: &Path, live: Arc<Live>, handover: Handover) -> std::io::Result<()> {
    serve_at(path, live, handover, true)
}

fn serve_at(
    path: &Path,
    live: Arc<Live>,
    handover: Handover,
    replace: bool,
) -> std::io::Result<()> {
    let listener = super::unix_socket::bind_owner_only(
        path,
        replace,
        "another gateway answers on this control socket",
    )?;
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
                if line.trim() == "upgrade" {
                    match hand_over(&stream, &live, &handover) {
                        Ok(()) => return,
                        Err(e) => {
                            warn!("upgrade failed, this process keeps serving: {e}");
                            let _ = (&stream).write_all(format!("error: {e}\n").as_bytes());
                            continue;
                        }
                    }
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

/// The old side of an upgrade, on the new process's control connection.
fn hand_over(stream: &UnixStream, live: &Live, handover: &Handover) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // No reload may change the sockets or the state while they are handed over.
    let _no_reload = live.hold_reloads();
    let listeners = handover.listeners.per_worker()?;
    let workers = listeners.len();
    let per_worker = listeners.first().map_or(0, Vec::len);
    let fds: Vec<std::os::fd::RawFd> = listeners.iter().flatten().map(|l| l.as_raw_fd()).collect();
    crate::sys::send_fds(
        stream.as_raw_fd(),
        format!("listeners {workers} {per_worker}\n").as_bytes(),
        &fds,
    )?;
    let snapshot = live.snapshot();
    let store = snapshot.quota_store.clone();
    // The vault first: its spend written for the new process to load, and no more changes
    // or writes from this one.
    if let Some(vault) = &snapshot.vault {
        vault.hand_over().map_err(std::io::Error::other)?;
    }
    if let Err(e) = store.hand_over() {
        if let Some(vault) = &snapshot.vault {
            vault.take_back();
        }
        return Err(e);
    }
    // From here on, any failure takes the data directory back before giving up.
    let listening = (|| -> std::io::Result<bool> {
        (&*stream).write_all(b"handed-over\n")?;
        stream.set_read_timeout(Some(UPGRADE_TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(stream.take(MAX_COMMAND_BYTES)).read_line(&mut line)?;
        Ok(line.trim() == "listening")
    })();
    if !matches!(listening, Ok(true)) {
        // The new process may still be letting go of the lock: wait for it, bounded.
        let deadline = std::time::Instant::now() + UPGRADE_TIMEOUT;
        loop {
            match store.take_back(&handover.data_dir) {
                Ok(()) => {
                    if let Some(vault) = &snapshot.vault {
                        vault.take_back();
                    }
                    break;
                }
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(std::io::Error::other(format!(
                        "the new process did not start listening, and the data directory could not be taken back: {e}"
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        return Err(std::io::Error::other(
            "the new process did not start listening; the data directory was taken back",
        ));
    }
    tracing::info!("upgrade: the new process is listening; draining");
    handover.drain.set(DrainMode::Upgrade);
    // The new process owns the config from here: this one refuses reloads and lets go of its
    // copies of the sockets.
    live.retire();
    (&*stream).write_all(b"ok\n")?;
    Ok(())
}

/// The new side of an upgrade: the sockets and the connection to finish the hand-over on.
pub struct TakeOver {
    /// Each worker's listening sockets, in the old process's order.
    pub listeners: Vec<Vec<std::net::TcpListener>>,
    stream: BufReader<UnixStream>,
}

impl TakeOver {
    /// Asks the gateway behind `path` for its sockets, and waits until it has handed over its
    /// data directory.
    pub fn request(path: &Path) -> std::io::Result<TakeOver> {
        use std::os::fd::AsRawFd;
        let mut stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        stream.write_all(b"upgrade\n")?;
        let (header, fds) = crate::sys::receive_fds(stream.as_raw_fd())?;
        let header = String::from_utf8_lossy(&header).into_owned();
        let mut words = header.split_whitespace();
        let (Some("listeners"), Some(workers), Some(per_worker)) =
            (words.next(), words.next(), words.next())
        else {
            return Err(std::io::Error::other(format!(
                "unexpected answer from the running gateway: {header:?}"
            )));
        };
        let workers: usize = workers.parse().map_err(std::io::Error::other)?;
        let per_worker: usize = per_worker.parse().map_err(std::io::Error::other)?;
        if fds.len() != workers * per_worker || workers == 0 {
            return Err(std::io::Error::other(format!(
                "received {} sockets for {workers} workers of {per_worker}",
                fds.len()
            )));
        }
        let mut all = fds.into_iter();
        let listeners = (0..workers)
            .map(|_| all.by_ref().take(per_worker).collect())
            .collect();
        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        stream.read_line(&mut line)?;
        if line.trim() != "handed-over" {
            return Err(std::io::Error::other(format!(
                "the running gateway did not hand over: {}",
                line.trim()
            )));
        }
        Ok(TakeOver { listeners, stream })
    }

    /// Tells the old process this one is listening; returns once it has begun to drain.
    pub fn listening(mut self) -> std::io::Result<()> {
        self.stream.get_mut().write_all(b"listening\n")?;
        let mut line = String::new();
        self.stream.read_line(&mut line)?;
        if line.trim() != "ok" {
            return Err(std::io::Error::other(format!(
                "the old process answered {:?}",
                line.trim()
            )));
        }
        Ok(())
    }
}
