//! Test support: the real `portcullis` binary started on a temporary config, a real upstream
//! HTTP server on a loopback socket, and a raw HTTP client.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

pub mod dns;
pub mod netns;
pub mod pki;
pub mod redis_server;

pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A running gateway process.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<String>>,
    /// The admin listener's TCP address, when the config has one.
    admin: Arc<Mutex<Option<SocketAddr>>>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts the gateway on `config` (TOML). `{listen}` in it is replaced by `127.0.0.1:0`
    /// unless the config sets its own `[server]`.
    pub fn start(config: &str) -> Gateway {
        Self::start_with(config, &[])
    }

    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
        // Each gateway gets its own working directory, so the default (relative) data
        // directory is its own and parallel tests never contend for its lock.
        cmd.current_dir(dir.path())
            .arg("--config")
            .arg(&path)
            // PORTCULLIS_TEST_GATEWAY_LOG=debug shows more when a test needs looking into.
            .env(
                "RUST_LOG",
                std::env::var("PORTCULLIS_TEST_GATEWAY_LOG").unwrap_or("info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start portcullis");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log_writer = log.clone();
        let admin = Arc::new(Mutex::new(None));
        let admin_writer = admin.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("admin API listening on ").nth(1) {
                    *admin_writer.lock().unwrap() =
                        rest.split_whitespace().next().and_then(|a| a.parse().ok());
                } else if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(addr);
                }
                let mut l = log_writer.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                thread::sleep(Duration::from_millis(100));
                panic!("gateway did not start; log:\n{}", log.lock().unwrap());
            }
        };
        Gateway {
            child,
            addr,
            log,
            admin,
            _dir: dir,
        }
    }

    /// The admin listener's address (it is bound before the proxy's listeners are logged).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .lock()
            .unwrap()
            .unwrap_or_else(|| panic!("no admin listener in the log:\n{}", self.log()))
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The gateway's working directory, which holds its config file `gateway.toml` (and its
    /// data directory, unless the config names another).
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Replaces the config file and runs `portcullis reload` against this gateway; returns
    /// (success, what the command printed).
    pub fn reload_with(&self, config: &str) -> (bool, String) {
        std::fs::write(self.dir().join("gateway.toml"), config).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .current_dir(self.dir())
            .args(["reload", "--config", "gateway.toml"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Open file descriptors of the gateway process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Peak resident memory of the gateway, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Raw head bytes as received.
    pub raw_head: Vec<u8>,
    /// Which upstream connection (accept order) carried it.
    pub connection: usize,
    /// The body came chunked.
    pub chunked: bool,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_field(&self.headers, name)
    }
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What the upstream does with a request.
pub enum Reply {
    /// Writes these raw bytes, then keeps the connection.
    Raw(Vec<u8>),
    /// Writes these raw bytes, then closes.
    RawThenClose(Vec<u8>),
    /// Waits, then writes the bytes.
    Delayed(Duration, Vec<u8>),
    /// Writes each part after its pause (a stream of events), then keeps the connection.
    Paced(Vec<(Duration, Vec<u8>)>),
    /// Answers 101 and then echoes every byte back until the peer closes.
    SwitchAndEcho,
    /// Closes without answering.
    Close,
}

pub fn ok_response(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

type Handler = dyn Fn(&Received) -> Reply + Send + Sync;

/// A real HTTP/1.1 upstream on a loopback socket that records what it receives.
pub struct Upstream {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub connections: Arc<AtomicUsize>,
    /// Body bytes received in total (bodies larger than `KEEP_BODY_BYTES` are counted, not kept).
    pub body_bytes: Arc<AtomicUsize>,
}

/// Bodies up to this size are kept for assertions; larger ones are only counted.
pub const KEEP_BODY_BYTES: usize = 1 << 20;

impl Upstream {
    pub fn start(handler: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Upstream {
        Self::start_with_keep_alive(Duration::from_secs(30), handler)
    }

    /// An upstream that closes a connection once it has been idle for `keep_alive` (as Node's
    /// default of 5 s does).
    pub fn start_with_keep_alive(
        keep_alive: Duration,
        handler: impl Fn(&Received) -> Reply + Send + Sync + 'static,
    ) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let body_bytes = Arc::new(AtomicUsize::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        let (r, c, b) = (received.clone(), connections.clone(), body_bytes.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let id = c.fetch_add(1, Ordering::SeqCst);
                let (r, h, b) = (r.clone(), handler.clone(), b.clone());
                thread::spawn(move || serve_upstream(stream, id, r, h, b, keep_alive));
            }
        });
        Upstream {
            addr,
            received,
            connections,
            body_bytes,
        }
    }

    /// An upstream that answers 200 with the request target as the body.
    pub fn echo_target() -> Upstream {
        Upstream::start(|r| Reply::Raw(ok_response(&r.target)))
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

fn serve_upstream(
    stream: TcpStream,
    id: usize,
    received: Arc<Mutex<Vec<Received>>>,
    handler: Arc<Handler>,
    body_bytes: Arc<AtomicUsize>,
    keep_alive: Duration,
) {
    stream.set_read_timeout(Some(keep_alive)).unwrap();
    let mut reader = BufReader::with_capacity(64 * 1024, stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let Some(req) = read_request(&mut reader, id, &body_bytes) else {
            return;
        };
        received.lock().unwrap().push(req.clone());
        match handler(&req) {
            Reply::Raw(bytes) => {
                if writer.write_all(&bytes).is_err() {
                    return;
                }
            }
            Reply::RawThenClose(bytes) => {
                let _ = writer.write_all(&bytes);
                let _ = writer.shutdown(Shutdown::Both);
                return;
            }
            Reply::Delayed(d, bytes) => {
                thread::sleep(d);
                if writer.write_all(&bytes).is_err() {
                    return;
                }
            }
            Reply::Paced(parts) => {
                for (d, bytes) in parts {
                    thread::sleep(d);
                    if writer
                        .write_all(&bytes)
                        .and_then(|()| writer.flush())
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Reply::SwitchAndEcho => {
                let _ = writer.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n");
                let mut buf = [0u8; 4096];
                loop {
                    let buffered = reader.buffer().to_vec();
                    if !buffered.is_empty() {
                        reader.consume(buffered.len());
                        if writer.write_all(&buffered).is_err() {
                            return;
                        }
                        continue;
                    }
                    match reader.get_mut().read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if writer.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            Reply::Close => return,
        }
    }
}

/// Fields as owned (name, value) pairs.
fn owned_fields(headers: &[httparse::Header]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// The first field named `name` (any case).
fn find_field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Reads a message head up to and including its empty line (CRLF or bare LF).
fn read_head(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut raw_head = Vec::new();
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line).ok()? == 0 {
            return None;
        }
        raw_head.extend_from_slice(&line);
        if line == b"\r\n" || line == b"\n" {
            return Some(raw_head);
        }
    }
}

/// Reads a chunked body and its trailers, passing the data to `sink`.
fn read_chunked(reader: &mut impl BufRead, mut sink: impl FnMut(&[u8])) -> Option<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let size = usize::from_str_radix(line.trim_end().split(';').next()?, 16).ok()?;
        if size == 0 {
            loop {
                let mut trailer = String::new();
                reader.read_line(&mut trailer).ok()?;
                if trailer == "\r\n" || trailer.is_empty() {
                    return Some(());
                }
            }
        }
        let mut remaining = size;
        while remaining > 0 {
            let n = remaining.min(buf.len());
            reader.read_exact(&mut buf[..n]).ok()?;
            sink(&buf[..n]);
            remaining -= n;
        }
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf).ok()?;
    }
}

/// Reads one request (head and body) from `reader`.
fn read_request(
    reader: &mut BufReader<TcpStream>,
    id: usize,
    body_bytes: &AtomicUsize,
) -> Option<Received> {
    let raw_head = read_head(reader)?;
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(&raw_head).ok()?;
    let method = req.method?.to_owned();
    let target = req.path?.to_owned();
    let headers = owned_fields(req.headers);
    let find = |n: &str| find_field(&headers, n).map(str::to_owned);
    let mut body = Vec::new();
    let chunked = find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let keep = |data: &[u8], body: &mut Vec<u8>| {
        body_bytes.fetch_add(data.len(), Ordering::SeqCst);
        if body.len() + data.len() <= KEEP_BODY_BYTES {
            body.extend_from_slice(data);
        }
    };
    if chunked {
        read_chunked(reader, |data| keep(data, &mut body))?;
    } else if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut remaining = len;
        let mut buf = vec![0u8; 64 * 1024];
        while remaining > 0 {
            let n = remaining.min(buf.len());
            reader.read_exact(&mut buf[..n]).ok()?;
            keep(&buf[..n], &mut body);
            remaining -= n;
        }
    }
    Some(Received {
        method,
        target,
        headers,
        body,
        raw_head,
        connection: id,
        chunked,
    })
}

/// A response as the client read it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub chunked: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_field(&self.headers, name)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw HTTP/1.1 client connection.
pub struct Client {
    reader: BufReader<TcpStream>,
    pub stream: TcpStream,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Self::from_stream(TcpStream::connect(addr).unwrap())
    }

    /// Connects from `source` (another loopback address, such as 127.0.0.2), so the gateway
    /// sees a different client.
    pub fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> Client {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
        socket.connect(&addr.into()).unwrap();
        Self::from_stream(socket.into())
    }

    fn from_stream(stream: TcpStream) -> Client {
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).unwrap();
    }

    /// Reads one response; `head_request` for responses to HEAD.
    pub fn read_response(&mut self, head_request: bool) -> Option<Response> {
        let raw_head = read_head(&mut self.reader)?;
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(&raw_head)
            .expect("gateway sent a valid response head");
        let status = resp.code?;
        let headers = owned_fields(resp.headers);
        let find = |n: &str| find_field(&headers, n).map(str::to_owned);
        let chunked = find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let mut body = Vec::new();
        if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        } else if chunked {
            read_chunked(&mut self.reader, |data| body.extend_from_slice(data))?;
        } else if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(len, 0);
            self.reader.read_exact(&mut body).ok()?;
        } else {
            self.reader.read_to_end(&mut body).ok()?;
        }
        Some(Response {
            status,
            headers,
            body,
            chunked,
        })
    }

    /// True when the gateway closed the connection (reads end of stream).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0) | Err(_))
    }

    /// Reads whatever the peer sends until it closes or `limit` passes.
    pub fn read_raw_until_close(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = self.reader.read_to_end(&mut out);
        out
    }
}

/// One request on a fresh connection.
pub fn request(addr: SocketAddr, raw: &str) -> Response {
    let mut c = Client::connect(addr);
    c.send(raw.as_bytes());
    c.read_response(raw.starts_with("HEAD "))
        .expect("a response")
}

/// A config with one upstream group `up` pointing at `upstream` and the given routes.
pub fn config_with(upstream: SocketAddr, extra_upstream: &str, routes: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n[upstreams.up]\nservers = [\"{upstream}\"]\n{extra_upstream}\n{routes}"
    )
}

/// The default catch-all route to `up`.
pub const ROUTE_ALL: &str = "[[routes]]\nmatch = { path_prefix = \"/\" }\nupstream = \"up\"\n";

/// A fresh API key and its stored hash, from the real `portcullis keys new` command.
pub fn mint(consumer: &str) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["keys", "new", "--consumer", consumer])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .lines()
        .find(|l| l.starts_with("pcl_"))
        .unwrap()
        .to_owned();
    let hash = text
        .lines()
        .find_map(|l| l.strip_prefix("api_keys = [\""))
        .unwrap()
        .trim_end_matches("\"]")
        .to_owned();
    (key, hash)
}

/// A loopback address that refuses connections for as long as this lives: its port is bound,
/// so no server started alongside can take it, but not listening, so a connect gets
/// ECONNREFUSED. A listener bound and dropped frees its port for the next bind: a test's
/// "dead" upstream once became another test's gateway that way.
pub struct Refusing {
    pub addr: SocketAddr,
    _socket: socket2::Socket,
}

impl std::fmt::Display for Refusing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

/// A [`Refusing`] address on 127.0.0.1.
pub fn refusing_addr() -> Refusing {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    Refusing {
        addr,
        _socket: socket,
    }
}

/// A loopback port nothing listens on now (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One request to a gateway's admin listener, with the bearer `token` when given; returns the
/// status and the body (the admin API closes after each answer).
pub fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Runs `portcullis check` on `config` written as `gateway.toml`; returns whether it passed and
/// what it printed.
pub fn check_config(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), text)
}

/// A process started with `--upgrade` in `dir`, with its log.
pub struct Upgraded {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
}

impl Drop for Upgraded {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `portcullis --upgrade` on the config in `dir` (with `env` set) and waits until the
/// old process has begun to drain.
pub fn upgrade(dir: &std::path::Path, env: &[(&str, &str)]) -> Upgraded {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .current_dir(dir)
        .args(["--upgrade", "--config", "gateway.toml"])
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let writer = log.clone();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("upgrade: the old process is draining") {
                let _ = tx.send(());
            }
            let mut l = writer.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let up = Upgraded { child, log };
    assert!(
        rx.recv_timeout(Duration::from_secs(20)).is_ok(),
        "the upgrade did not complete:\n{}",
        up.log.lock().unwrap()
    );
    up
}

/// Waits for `child` to exit; its status.
pub fn exited(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not exit");
        thread::sleep(Duration::from_millis(20));
    }
}

/// An OpenAI-shaped JSON answer with usage (a mock provider), after `delay`.
pub fn usage_reply(delay: Duration, prompt: u64, completion: u64) -> Reply {
    let body = format!(
        "{{\"id\":\"chatcmpl-1\",\"choices\":[{{\"message\":{{\"content\":\"ok\"}}}}],\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":{completion}}}}}"
    );
    Reply::Delayed(
        delay,
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// A listener whose accept queue is full and never drained: further SYNs are dropped, so a
/// connect to it never completes. Returns the address and what keeps the queue full.
pub fn blackhole() -> (SocketAddr, socket2::Socket, Vec<TcpStream>) {
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    // Fill the queue (a backlog of 0 still takes one, the kernel compares with `>`).
    let mut fillers = Vec::new();
    for _ in 0..4 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fillers.push(s),
            Err(_) => break,
        }
    }
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
        "the blackhole still completes handshakes"
    );
    (addr, listener, fillers)
}
