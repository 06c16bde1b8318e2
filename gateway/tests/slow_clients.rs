//! Slow and greedy clients: every server limit, set short so the tests run fast.

mod support;

use std::{
    io::Write,
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use support::*;

fn config(upstream: std::net::SocketAddr, server: &str) -> String {
    format!("[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n{server}\n\n[upstreams.up]\nservers = [\"{upstream}\"]\n\n{ROUTE_ALL}")
}

/// Waits until the gateway closes `c`, failing if it takes longer than `limit`.
fn closed_within(c: &mut Client, limit: Duration) -> Duration {
    let start = Instant::now();
    c.stream
        .set_read_timeout(Some(limit + Duration::from_secs(2)))
        .unwrap();
    assert!(c.is_closed(), "connection still open");
    let took = start.elapsed();
    assert!(
        took <= limit + Duration::from_secs(1),
        "closed after {took:?}, limit {limit:?}"
    );
    took
}

#[test]
fn slowloris_head_is_cut_at_header_timeout() {
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(up.addr, "header_timeout = \"300ms\""));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n");
    let start = Instant::now();
    // Trickle a byte at a time: activity does not extend the head deadline.
    for _ in 0..5 {
        thread::sleep(Duration::from_millis(100));
        if c.stream.write_all(b"X").is_err() {
            break;
        }
    }
    closed_within(
        &mut c,
        Duration::from_millis(300).saturating_sub(start.elapsed()) + Duration::from_millis(300),
    );
    assert!(up.requests().is_empty());
}

#[test]
fn a_silent_connection_is_closed_at_header_timeout_also_once_parked() {
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(up.addr, "header_timeout = \"400ms\""));
    let mut c = Client::connect(gw.addr);
    // Quiet from the start: it parks after 100 ms and is closed there at its deadline.
    let took = closed_within(&mut c, Duration::from_millis(400));
    assert!(
        took >= Duration::from_millis(350),
        "closed early, after {took:?}"
    );
}

#[test]
fn stalled_body_is_cut_at_body_timeout() {
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(up.addr, "body_timeout = \"300ms\""));
    let mut c = Client::connect(gw.addr);
    c.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello");
    closed_within(&mut c, Duration::from_millis(300));
    thread::sleep(Duration::from_millis(50));
    assert!(
        up.requests().is_empty(),
        "the upstream never saw a complete request"
    );
}

#[test]
fn request_timeout_bounds_a_trickled_body() {
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(
        up.addr,
        "body_timeout = \"5s\"\nrequest_timeout = \"500ms\"",
    ));
    let mut c = Client::connect(gw.addr);
    c.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n");
    let start = Instant::now();
    // Each byte arrives well within body_timeout, but the whole request takes too long.
    while start.elapsed() < Duration::from_secs(3) {
        if c.stream.write_all(b"x").is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the gateway kept reading past request_timeout"
    );
    assert!(up.requests().is_empty());
}

#[test]
fn idle_keep_alive_is_closed_at_keepalive_timeout() {
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(up.addr, "keepalive_timeout = \"300ms\""));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 200);
    closed_within(&mut c, Duration::from_millis(300));
}

#[test]
fn connections_beyond_the_limit_get_503() {
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(up.addr, "max_connections_per_worker = 2"));
    let held: Vec<Client> = (0..2)
        .map(|_| {
            let mut c = Client::connect(gw.addr);
            c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
            assert_eq!(c.read_response(false).unwrap().status, 200);
            c
        })
        .collect();
    let mut extra = Client::connect(gw.addr);
    let r = extra.read_response(false).expect("a clean refusal");
    assert_eq!((r.status, r.header("connection")), (503, Some("close")));
    assert!(extra.is_closed());
    drop(held);
    // Capacity comes back once connections close.
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        request(gw.addr, "GET / HTTP/1.1\r\nHost: a\r\n\r\n").status,
        200
    );
}

#[test]
fn answered_requests_have_their_bodies_skipped_or_the_connection_closed() {
    let up = Upstream::echo_target();
    let gw = Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n[upstreams.up]\nservers = [\"{}\"]\n\n[[routes]]\nmatch = {{ path = \"/local\" }}\nrespond = {{ status = 200, body = \"local\" }}\n\n{ROUTE_ALL}",
        up.addr
    ));
    // A small body whose bytes look like a request: skipped, never interpreted.
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /local HTTP/1.1\r\nHost: a\r\nContent-Length: 35\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().text(), "local");
    c.send(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().text(), "/next");
    // The same as chunked.
    c.send(b"POST /local HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n23\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n\r\n0\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().text(), "local");
    c.send(b"GET /next2 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().text(), "/next2");
    // A body too large to skip: answered, then the connection closes.
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /local HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert!(c.is_closed());
    let targets: Vec<String> = up.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(targets, ["/next", "/next2"]);
    let _ = TcpStream::connect(gw.addr);
}
