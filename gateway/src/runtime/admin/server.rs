//! The admin listener: a TCP or Unix socket served by its own threads (never a worker's), one
//! request per connection, heads and bodies bounded, slow clients cut off.

use std::{
    io::{Read, Write},
    net::TcpListener,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tracing::{debug, info, warn};

use super::api::{handle, AdminRequest, AdminResponse, AdminState};
use crate::config::AdminListen;

/// Admin connections served at once; more are answered 503.
const MAX_CONNECTIONS: usize = 16;
/// Largest request head.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest request body (ban and reload requests are small).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest a whole exchange may take: the request sent and the answer read, together, so a
/// client trickling bytes cannot hold one of the few admin slots.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream the admin server reads and writes (TCP or Unix).
trait AdminStream: Read + Write + Send + 'static {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()>;
    fn peer(&self) -> String;
}

/// Where one exchange must end; each read and write gets what is left of it.
struct Deadline(std::time::Instant);

impl Deadline {
    fn arm<S: AdminStream>(&self, stream: &S) -> std::io::Result<()> {
        let left = self.0.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_timeouts(left)
    }
}

/// An admin slot, given back however the exchange ends (a panic included).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AdminStream for std::net::TcpStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
    fn peer(&self) -> String {
        self.peer_addr().map(|a| a.to_string()).unwrap_or_default()
    }
}

impl AdminStream for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
    fn peer(&self) -> String {
        "unix".to_owned()
    }
}

/// Binds the admin listener and serves it on a thread; returns the TCP address bound (for a
/// port of 0), if TCP. The TCP socket is bound with SO_REUSEPORT, so the new process of an
/// upgrade can bind beside the old one, which keeps answering (readiness: draining) until it
/// exits; `replace` takes a Unix socket path over from the old process.
pub fn start(
    listen: &AdminListen,
    state: Arc<AdminState>,
    replace: bool,
) -> std::io::Result<Option<std::net::SocketAddr>> {
    let active = Arc::new(AtomicUsize::new(0));
    match listen {
        AdminListen::Tcp(addr) => {
            let listener = bind_reusable(*addr).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr} for the admin API: {e}"),
                )
            })?;
            let bound = listener.local_addr()?;
            info!("admin API listening on {bound}");
            spawn_accept_loop(listener, |l| l.accept().map(|(s, _)| s), state, active)?;
            Ok(Some(bound))
        }
        AdminListen::Unix(path) => {
            let listener = crate::runtime::unix_socket::bind_owner_only(
                path,
                replace,
                "another process answers on this admin socket",
            )?;
            info!("admin API listening on unix:{}", path.display());
            spawn_accept_loop(listener, |l| l.accept().map(|(s, _)| s), state, active)?;
            Ok(None)
        }
    }
}

/// Accepts on `listener` with `accept_one` on its own thread, for the process's life.
fn spawn_accept_loop<L: Send + 'static, S: AdminStream>(
    listener: L,
    accept_one: fn(&L) -> std::io::Result<S>,
    state: Arc<AdminState>,
    active: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("portcullis-admin".into())
        .spawn(move || loop {
            match accept_one(&listener) {
                Ok(stream) => accept(stream, &state, &active),
                // Such as EMFILE: pause rather than spin.
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })?;
    Ok(())
}

fn bind_reusable(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = crate::runtime::listener::reuse_port_socket(addr)?;
    socket.bind(&addr.into())?;
    socket.listen(64)?;
    Ok(socket.into())
}

fn accept<S: AdminStream>(mut stream: S, state: &Arc<AdminState>, active: &Arc<AtomicUsize>) {
    let deadline = Deadline(std::time::Instant::now() + EXCHANGE_TIMEOUT);
    if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
        let _slot = Slot(active.clone());
        let _ = deadline.arm(&stream);
        let _ = write_response(
            &mut stream,
            &AdminResponse::error(503, "too many admin connections"),
            &deadline,
        );
        return;
    }
    let slot = Slot(active.clone());
    let state = state.clone();
    let spawned = std::thread::Builder::new()
        .name("portcullis-admin-conn".into())
        .spawn(move || {
            let _slot = slot;
            serve_one(stream, &state, &deadline);
        });
    if let Err(e) = spawned {
        warn!("cannot start an admin connection thread: {e}");
    }
}

fn serve_one<S: AdminStream>(mut stream: S, state: &AdminState, deadline: &Deadline) {
    let response = match read_request(&mut stream, deadline) {
        Ok(req) => handle(state, &req),
        Err(response) => response,
    };
    if let Err(e) = write_response(&mut stream, &response, deadline) {
        debug!(peer = stream.peer(), error = %e, "admin client went away");
    }
}

/// Reads one request: its head (bounded) and a Content-Length body (bounded), all before
/// `deadline`.
fn read_request<S: AdminStream>(
    stream: &mut S,
    deadline: &Deadline,
) -> Result<AdminRequest, AdminResponse> {
    let timed_out = || AdminResponse::error(408, "the request took too long");
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(AdminResponse::error(431, "request head too large"));
        }
        deadline.arm(stream).map_err(|_| timed_out())?;
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Err(AdminResponse::error(400, "incomplete request")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(AdminResponse::error(400, "malformed request head")),
    }
    let method = parsed.method.unwrap_or_default().to_owned();
    let target = parsed.path.unwrap_or_default().to_owned();
    let mut authorization = None;
    let mut content_length = 0usize;
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("authorization") {
            authorization = Some(h.value.to_vec());
        } else if h.name.eq_ignore_ascii_case("content-length") {
            content_length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| AdminResponse::error(400, "invalid Content-Length"))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(AdminResponse::error(
                411,
                "send the body with a Content-Length",
            ));
        }
    }
    if content_length > MAX_BODY_BYTES {
        return Err(AdminResponse::error(413, "request body too large"));
    }
    let mut body = buf[head_len..].to_vec();
    while body.len() < content_length {
        deadline.arm(stream).map_err(|_| timed_out())?;
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Err(AdminResponse::error(400, "incomplete request body")),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(content_length);
    Ok(AdminRequest {
        method,
        target,
        authorization,
        body,
    })
}

fn write_response<S: AdminStream>(
    stream: &mut S,
    r: &AdminResponse,
    deadline: &Deadline,
) -> std::io::Result<()> {
    let reason = crate::http::encode::reason(r.status);
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    if r.status == 401 {
        head.push_str("www-authenticate: Bearer realm=\"portcullis-admin\"\r\n");
    }
    head.push_str("\r\n");
    deadline.arm(stream)?;
    stream.write_all(head.as_bytes())?;
    // A large answer (the metrics) is written in pieces, each within what is left.
    for piece in r.body.chunks(64 * 1024) {
        deadline.arm(stream)?;
        stream.write_all(piece)?;
    }
    stream.flush()
}
