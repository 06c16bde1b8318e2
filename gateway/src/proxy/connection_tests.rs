//! The connection loop and its one exit, driven through an in-memory transport: what a client
//! sees, in order, without sockets on the client side.

use crate::io::memory::MemoryTransport;

use super::{connection::serve, test_bench::bench, test_bench::Bench};

/// Serves a connection whose client sends `chunks` (with `KEY` replaced by alice's key) and
/// then closes; returns everything the gateway wrote back.
fn exchange(b: &Bench, chunks: &[&str]) -> String {
    let chunks: Vec<String> = chunks.iter().map(|c| c.replace("KEY", &b.key)).collect();
    let client = MemoryTransport::sending(&chunks);
    let written = client.written();
    tokio_uring::start(async {
        let handle = b.worker.tracker.register(-1, Default::default());
        serve(
            client,
            "203.0.113.7:40000".parse().unwrap(),
            &b.worker,
            &handle,
            super::connection::Start::Accepted(&[]),
            None,
        )
        .await;
    });
    let out = written.borrow();
    String::from_utf8_lossy(&out).into_owned()
}

/// The status lines in `out`, in order (the bodies here never contain `HTTP/1.`).
fn status_lines(out: &str) -> Vec<&str> {
    out.match_indices("HTTP/1.")
        .map(|(i, _)| &out[i..i + out[i..].find("\r\n").unwrap_or(out.len() - i)])
        .collect()
}

const ROUTES: &str = "[[routes]]\nmatch = { path = \"/hello\" }\nrespond = { status = 200, body = \"hi\" }\n\
     [[routes]]\nmatch = { path = \"/keyed\" }\nrespond = { status = 200, body = \"in\" }\nauth = { methods = [\"api_key\"] }\n";

#[test]
fn pipelined_requests_are_answered_in_order_and_bodies_skipped() {
    let b = bench(ROUTES);
    let out = exchange(
        &b,
        &["GET /hello HTTP/1.1\r\nHost: a\r\n\r\n\
           GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n\
           POST /hello HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
           GET /keyed HTTP/1.1\r\nHost: a\r\n\r\n\
           GET /keyed HTTP/1.1\r\nHost: a\r\nX-API-Key: KEY\r\nConnection: close\r\n\r\n\
           GET /hello HTTP/1.1\r\nHost: a\r\n\r\n"],
    );
    assert_eq!(
        status_lines(&out),
        [
            "HTTP/1.1 200 OK",
            "HTTP/1.1 404 Not Found",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 401 Unauthorized",
            "HTTP/1.1 200 OK",
        ],
        "{out}"
    );
    // The body of the POST was skipped, not taken for the next request; the request after
    // `Connection: close` was not answered.
    assert!(out.ends_with("in"), "{out}");
}

#[test]
fn a_head_arriving_a_byte_at_a_time_is_read_whole() {
    let b = bench(ROUTES);
    let raw = "GET /hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let bytes: Vec<String> = raw.chars().map(String::from).collect();
    let chunks: Vec<&str> = bytes.iter().map(String::as_str).collect();
    let out = exchange(&b, &chunks);
    assert_eq!(status_lines(&out), ["HTTP/1.1 200 OK"], "{out}");
}

#[test]
fn ambiguous_framing_is_refused_and_the_connection_closes() {
    let b = bench(ROUTES);
    let out = exchange(
        &b,
        &[
            "POST /hello HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab\
           GET /hello HTTP/1.1\r\nHost: a\r\n\r\n",
        ],
    );
    assert_eq!(status_lines(&out), ["HTTP/1.1 400 Bad Request"], "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
}

#[test]
fn a_quota_is_given_back_when_the_upstream_never_got_the_request() {
    // Limit 1: served requests would be refused from the second on.
    let quota = "quotas = [{ key = \"client\", limit = 1, period = \"day\", name = \"one\" }]\n";
    let b = bench(&format!(
        "[[routes]]\nmatch = {{ path = \"/down\" }}\nupstream = \"u\"\n{quota}\
         [[routes]]\nmatch = {{ path = \"/up\" }}\nrespond = {{ status = 200, body = \"ok\" }}\n{quota}"
    ));
    let twice = |path: &str| {
        let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
        exchange(&b, &[&format!("{req}{req}")])
    };
    // Nothing listens upstream: each attempt fails to connect and is not charged.
    let down = twice("/down");
    assert_eq!(
        status_lines(&down),
        ["HTTP/1.1 502 Bad Gateway", "HTTP/1.1 502 Bad Gateway"],
        "{down}"
    );
    // An answered request is charged: the second is over the quota.
    let up = twice("/up");
    assert_eq!(
        status_lines(&up),
        ["HTTP/1.1 200 OK", "HTTP/1.1 429 Too Many Requests"],
        "{up}"
    );
}
