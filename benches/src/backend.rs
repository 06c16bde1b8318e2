//! A fixed HTTP/1.1 backend: thread per core on io_uring, keep-alive, precomputed responses.
//!
//! Paths: `/1k` and `/64k` answer bodies of that size; `/json/4096` answers a JSON object of
//! exactly 4096 bytes with `content-type: application/json` (see [`json_body`]; for
//! `cargo xtask bench-transform`); a path ending in `/sse` or `/sse/chat/completions` (such as
//! `/sse` or `/vault/v1/sse`) answers a stream of server-sent events, OpenAI-style (see
//! [`SSE_EVENTS`]); any other path answers a short greeting. Request bodies framed by
//! Content-Length are read and discarded. It is deliberately minimal so that it is never the
//! bottleneck of a benchmark.
//!
//! [`Options`] (both off by default, and then nothing changes) name the server in an
//! `x-backend` response field and make it slow, for `cargo xtask bench-balance`.

use std::{net::SocketAddr, rc::Rc, time::Duration};

use tokio_uring::{buf::BoundedBuf, net::TcpListener};

const READ_BUFFER_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// The stream a `/sse` path answers, one event per entry (one chunk each), as an OpenAI chat
/// completion streams, in three writes: the head with the first event; [`SSE_EVENT_GAP`] later
/// the other three content events; another gap later the final usage event, `[DONE]` and the
/// end of the chunked body.
pub const SSE_EVENTS: [&str; 6] = [
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hello\"}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" from\"}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" the\"}}]}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" bench\"},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":20}}\n\n",
    "data: [DONE]\n\n",
];

/// The pause before each write of a `/sse` stream after the first (at least this; the timer
/// may add up to a millisecond).
pub const SSE_EVENT_GAP: Duration = Duration::from_millis(1);

/// What sets one backend apart from another.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Adds `x-backend: NAME` to every response, so a client behind a balancer can tell which
    /// server answered.
    pub name: Option<String>,
    /// Waits this long before writing the answers to what one read brought (one request,
    /// unless the client pipelines), every connection on its own: a slow server.
    pub delay: Duration,
}

/// The precomputed responses.
pub struct Responses {
    greeting: Vec<u8>,
    one_k: Vec<u8>,
    sixty_four_k: Vec<u8>,
    json_4k: Vec<u8>,
    /// The `/sse` stream: the head with the first event, then each later write.
    sse: Vec<Vec<u8>>,
}

fn chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

fn sse_writes(extra: &str) -> Vec<Vec<u8>> {
    let mut first = format!("HTTP/1.1 200 OK\r\n{extra}content-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n").into_bytes();
    first.extend_from_slice(&chunk(SSE_EVENTS[0]));
    let middle: Vec<u8> = SSE_EVENTS[1..4].iter().flat_map(|e| chunk(e)).collect();
    let mut last = chunk(SSE_EVENTS[4]);
    last.extend_from_slice(&chunk(SSE_EVENTS[5]));
    last.extend_from_slice(b"0\r\n\r\n");
    vec![first, middle, last]
}

fn is_sse(path: &str) -> bool {
    {
        let p = path.split('?').next().unwrap_or(path);
        p.ends_with("/sse") || p.ends_with("/sse/chat/completions")
    }
}

/// A 200 with `body`; `extra` is header lines (each ending in CRLF) put first.
fn typed_response(extra: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\n{extra}content-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// The body of `/json/<size>`: `{"items":[{"id":0,"name":"item-0000","active":true,"score":0},
/// ...],"pad":"xx..."}`, as many items as fit and a `pad` string that makes it exactly `size`
/// bytes (at least 21). Compact, ASCII, no whitespace.
pub fn json_body(size: usize) -> Vec<u8> {
    const HEAD: &str = "{\"items\":[";
    const TAIL: &str = "],\"pad\":\"\"}";
    assert!(
        size >= HEAD.len() + TAIL.len(),
        "a JSON body needs at least 21 bytes"
    );
    let mut s = String::from(HEAD);
    for id in 0usize.. {
        let item = format!(
            "{}{{\"id\":{id},\"name\":\"item-{id:04}\",\"active\":{},\"score\":{}}}",
            if id == 0 { "" } else { "," },
            id % 2 == 0,
            id * 37 % 100
        );
        if s.len() + item.len() + TAIL.len() > size {
            break;
        }
        s.push_str(&item);
    }
    let pad = size - s.len() - TAIL.len();
    s.push_str("],\"pad\":\"");
    s.push_str(&"x".repeat(pad));
    s.push_str("\"}");
    s.into_bytes()
}

impl Default for Responses {
    fn default() -> Self {
        Responses::new(None)
    }
}

impl Responses {
    /// The responses, each with `x-backend: NAME` when `name` is given.
    pub fn new(name: Option<&str>) -> Self {
        let extra = name
            .map(|n| format!("x-backend: {n}\r\n"))
            .unwrap_or_default();
        let text = |body: &[u8]| typed_response(&extra, "text/plain", body);
        Responses {
            greeting: text(b"Hello from the Portcullis demo upstream.\n"),
            one_k: text(&[b'a'; 1024]),
            sixty_four_k: text(&vec![b'b'; 64 * 1024]),
            json_4k: typed_response(&extra, "application/json", &json_body(4096)),
            sse: sse_writes(&extra),
        }
    }

    fn for_path(&self, path: &str) -> &[u8] {
        match path {
            "/1k" => &self.one_k,
            "/64k" => &self.sixty_four_k,
            "/json/4096" => &self.json_4k,
            _ => &self.greeting,
        }
    }
}

/// Binds one SO_REUSEPORT listener per worker thread and serves forever.
pub fn run(
    addr: SocketAddr,
    workers: usize,
    pin_from_core: Option<usize>,
    options: Options,
) -> std::io::Result<()> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut handles = Vec::new();
    for i in 0..workers {
        let listener = bind(addr)?;
        let core =
            pin_from_core.and_then(|first| cores.get((first + i) % cores.len().max(1)).copied());
        let options = options.clone();
        handles.push(std::thread::spawn(move || {
            if let Some(core) = core {
                core_affinity::set_for_current(core);
            }
            tokio_uring::start(async move {
                let responses = Rc::new(Responses::new(options.name.as_deref()));
                let listener = TcpListener::from_std(listener);
                while let Ok((stream, _)) = listener.accept().await {
                    let _ = stream.set_nodelay(true);
                    tokio_uring::spawn(serve(stream, responses.clone(), options.delay));
                }
            })
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

async fn serve(stream: tokio_uring::net::TcpStream, responses: Rc<Responses>, delay: Duration) {
    let mut buf = Vec::with_capacity(READ_BUFFER_BYTES);
    let mut out: Vec<u8> = Vec::with_capacity(64 * 1024 + 256);
    let mut skip_body: u64 = 0;
    // False after a stream: requests may wait in `buf` already, parsed before the next read.
    let mut need_read = true;
    loop {
        if need_read {
            if buf.len() == buf.capacity() {
                return;
            }
            let start = buf.len();
            let (res, slice) = stream.read(buf.slice(start..)).await;
            buf = slice.into_inner();
            match res {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        need_read = true;
        out.clear();
        let mut pos = 0;
        // Set when a `/sse` request was parsed: its head and first event end `out`, the rest
        // is written paced, and parsing goes on after it.
        let mut streaming = false;
        loop {
            if skip_body > 0 {
                let take = (buf.len() - pos).min(skip_body as usize);
                pos += take;
                skip_body -= take as u64;
                if skip_body > 0 {
                    break;
                }
            }
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf[pos..]) {
                Ok(httparse::Status::Complete(n)) => {
                    let length = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<u64>().ok())
                        .unwrap_or(0);
                    let path = req.path.unwrap_or("/");
                    pos += n;
                    skip_body = length;
                    if is_sse(path) {
                        out.extend_from_slice(&responses.sse[0]);
                        streaming = true;
                        break;
                    }
                    out.extend_from_slice(responses.for_path(path));
                }
                Ok(httparse::Status::Partial) => break,
                Err(_) => return,
            }
        }
        buf.drain(..pos);
        if !out.is_empty() {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let (res, o) = stream.write_all(out).await;
            out = o;
            if res.is_err() {
                return;
            }
        }
        if streaming {
            for write in &responses.sse[1..] {
                tokio::time::sleep(SSE_EVENT_GAP).await;
                let (res, _) = stream.write_all(write.clone()).await;
                if res.is_err() {
                    return;
                }
            }
            need_read = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_body_is_exactly_its_size_and_valid_json() {
        for size in [21, 100, 4096] {
            let body = json_body(size);
            assert_eq!(body.len(), size);
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(v["items"].is_array());
        }
        let v: serde_json::Value = serde_json::from_slice(&json_body(4096)).unwrap();
        assert_eq!(v["items"][0]["name"], "item-0000");
        assert!(v["items"].as_array().unwrap().len() > 50);
    }

    #[test]
    fn json_path_is_served_as_json() {
        let r = Responses::default();
        let head = String::from_utf8_lossy(r.for_path("/json/4096"));
        assert!(head.contains("content-type: application/json\r\ncontent-length: 4096\r\n\r\n"));
        assert!(!head.contains("x-backend"));
    }

    #[test]
    fn a_named_backend_says_its_name_in_every_response() {
        let r = Responses::new(Some("b2"));
        for path in ["/1k", "/64k", "/json/4096", "/other"] {
            let head = String::from_utf8_lossy(r.for_path(path));
            assert!(
                head.starts_with("HTTP/1.1 200 OK\r\nx-backend: b2\r\n"),
                "{path}"
            );
        }
        assert!(String::from_utf8_lossy(&r.sse[0]).contains("\r\nx-backend: b2\r\n"));
    }
}
