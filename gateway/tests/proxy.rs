//! End-to-end proxying through the real gateway binary, a real upstream and real clients.

mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    sync::atomic::Ordering,
    thread,
    time::Duration,
};

use support::*;

fn gateway_for(up: &Upstream, routes: &str) -> Gateway {
    Gateway::start(&config_with(up.addr, "", routes))
}

#[test]
fn curl_reaches_the_upstream_and_headers_are_forwarded() {
    let up = Upstream::echo_target();
    let gw = gateway_for(&up, ROUTE_ALL);
    let out = Command::new("curl")
        .args([
            "-sS",
            "-H",
            "X-Forwarded-For: 10.9.8.7",
            "-H",
            "Host: app.example",
        ])
        .arg(format!("http://{}/hello?x=1", gw.addr))
        .output()
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "/hello?x=1");
    let r = &up.requests()[0];
    assert_eq!(r.header("host"), Some("app.example"), "Host kept");
    assert_eq!(r.header("x-forwarded-for"), Some("10.9.8.7, 127.0.0.1"));
    assert_eq!(r.header("x-forwarded-proto"), Some("http"));
    assert_eq!(r.header("via"), Some("1.1 portcullis"));
    assert!(
        r.raw_head.windows(2).filter(|w| w == b"\r\n").count() >= r.headers.len() + 2,
        "CRLF heads"
    );
}

#[test]
fn keep_alive_is_reused_on_both_sides() {
    let up = Upstream::echo_target();
    // One worker, so every request meets the same upstream pool.
    let gw =
        Gateway::start(&config_with(up.addr, "", ROUTE_ALL).replace("workers = 2", "workers = 1"));
    let mut c = Client::connect(gw.addr);
    for i in 0..5 {
        c.send(format!("GET /r{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
        let r = c.read_response(false).unwrap();
        assert_eq!((r.status, r.text()), (200, format!("/r{i}")));
        assert_eq!(r.header("connection"), None, "kept alive");
    }
    // A second client connection reuses the same pooled upstream connection.
    let r = request(gw.addr, "GET /other HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "one upstream connection for all requests"
    );
    assert_eq!(up.requests().len(), 6);
}

#[test]
fn http10_client_gets_close_unless_it_asks_for_keep_alive() {
    let up = Upstream::echo_target();
    let gw = gateway_for(&up, ROUTE_ALL);
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /a HTTP/1.0\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed());
    // HTTP/1.0 has no Host: the gateway supplies one for its HTTP/1.1 upstream request.
    assert_eq!(
        up.requests()[0].header("host"),
        Some(up.addr.to_string().as_str())
    );
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.header("connection"), Some("keep-alive"));
    c.send(b"GET /c HTTP/1.0\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().text(), "/c");
}

#[test]
fn chunked_bodies_both_ways() {
    let up = Upstream::start(|r| {
        let body = String::from_utf8_lossy(&r.body).to_uppercase();
        let half = body.len() / 2;
        Reply::Raw(format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n", half, &body[..half], body.len() - half, &body[half..]).into_bytes())
    });
    let gw = gateway_for(&up, ROUTE_ALL);
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(
        (r.status, r.chunked, r.text().as_str()),
        (200, true, "HELLO, WORLD")
    );
    let got = &up.requests()[0];
    assert!(got.chunked, "request stays chunked upstream");
    assert_eq!(got.body, b"hello, world");
    // The connection is still usable after a chunked exchange.
    c.send(b"POST /again HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok");
    assert_eq!(c.read_response(false).unwrap().text(), "OK");
}

#[test]
fn http10_client_gets_a_dechunked_body() {
    let up = Upstream::start(|_| {
        Reply::Raw(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n".to_vec())
    });
    let gw = gateway_for(&up, ROUTE_ALL);
    let mut c = Client::connect(gw.addr);
    c.send(b"GET / HTTP/1.0\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(
        (r.chunked, r.text().as_str(), r.header("connection")),
        (false, "abcde", Some("close"))
    );
}

#[test]
fn a_64_mib_body_streams_both_ways_with_bounded_memory() {
    const SIZE: usize = 64 << 20;
    let up = Upstream::start(|r| {
        if r.method == "POST" {
            Reply::Raw(ok_response("stored"))
        } else {
            let mut resp =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {SIZE}\r\n\r\n").into_bytes();
            resp.resize(resp.len() + SIZE, b'z');
            Reply::Raw(resp)
        }
    });
    let gw = gateway_for(&up, ROUTE_ALL);
    let before = gw.peak_rss_kib();
    let mut c = Client::connect(gw.addr);
    c.send(format!("POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: {SIZE}\r\n\r\n").as_bytes());
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..64 {
        c.stream.write_all(&chunk).unwrap();
    }
    let r = c.read_response(false).unwrap();
    assert_eq!(r.text(), "stored");
    assert_eq!(up.body_bytes.load(Ordering::SeqCst), SIZE);
    c.send(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.body.len(), SIZE);
    let after = gw.peak_rss_kib();
    assert!(
        after < before + 16 * 1024,
        "gateway peak RSS grew from {before} KiB to {after} KiB for a 64 MiB body"
    );
}

#[test]
fn slow_upstream_gives_504_and_dead_upstream_gives_502() {
    let slow = Upstream::start(|_| Reply::Delayed(Duration::from_secs(3), ok_response("late")));
    let dead = refusing_addr();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n[upstreams.slow]\nservers = [\"{}\"]\nread_timeout = \"300ms\"\n[upstreams.dead]\nservers = [\"{dead}\"]\n[[routes]]\nmatch = {{ path = \"/slow\" }}\nupstream = \"slow\"\n[[routes]]\nmatch = {{ path = \"/dead\" }}\nupstream = \"dead\"\n",
        slow.addr
    );
    let gw = Gateway::start(&config);
    let r = request(gw.addr, "GET /slow HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 504);
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /dead HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 502);
    // The worker survives and the connection stays usable.
    c.send(b"GET /dead HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 502);
    assert_eq!(
        request(gw.addr, "GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n").status,
        404
    );
}

#[test]
fn routing_precedence_and_rewrites_end_to_end() {
    let up = Upstream::echo_target();
    let routes = r#"
[[routes]]
match = { path_prefix = "/" }
respond = { status = 200, body = "catch-all" }
[[routes]]
match = { path_prefix = "/v1/" }
upstream = "up"
strip_prefix = true
[[routes]]
match = { path_prefix = "/v1/admin/" }
respond = { status = 403, body = "admin" }
[[routes]]
match = { path = "/v1/exact" }
respond = { status = 200, body = "exact", headers = { "content-type" = "application/json", "x-route" = "exact" } }
[[routes]]
match = { path_prefix = "/v1/", methods = ["DELETE"] }
respond = { status = 405, body = "no deletes" }
[[routes]]
match = { host = "*.example.com", path_prefix = "/" }
respond = { status = 200, body = "wildcard" }
[[routes]]
match = { host = "api.example.com", path_prefix = "/v2/" }
upstream = "up"
rewrite_prefix = "/api/"
"#;
    let gw = gateway_for(&up, routes);
    let get = |host: &str, method: &str, path: &str| {
        let r = request(
            gw.addr,
            &format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        );
        (r.status, r.text())
    };
    assert_eq!(get("x", "GET", "/"), (200, "catch-all".into()));
    assert_eq!(get("x", "GET", "/v1/users/7"), (200, "/users/7".into()));
    assert_eq!(get("x", "GET", "/v1/admin/x"), (403, "admin".into()));
    assert_eq!(get("x", "GET", "/v1/exact"), (200, "exact".into()));
    assert_eq!(get("x", "DELETE", "/v1/users"), (405, "no deletes".into()));
    assert_eq!(
        get("www.example.com", "GET", "/v1/users"),
        (200, "wildcard".into())
    );
    assert_eq!(
        get("API.example.com:8080", "GET", "/v2/users?q=1"),
        (200, "/api/users?q=1".into())
    );
    assert_eq!(
        get("api.example.com", "GET", "/v3/"),
        (200, "wildcard".into())
    );
    assert_eq!(
        get("example.com", "GET", "/v1/users"),
        (200, "/users".into())
    );
    let r = request(gw.addr, "GET /v1/exact HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        (r.header("content-type"), r.header("x-route")),
        (Some("application/json"), Some("exact"))
    );
    let r = request(gw.addr, "HEAD /v1/exact HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        (r.status, r.header("content-length"), r.body.len()),
        (200, Some("5"), 0)
    );
}

#[test]
fn hop_by_hop_fields_are_removed_both_ways() {
    let up = Upstream::start(|_| {
        Reply::Raw(b"HTTP/1.1 200 OK\r\nconnection: x-internal\r\nx-internal: secret\r\nkeep-alive: timeout=5\r\nproxy-connection: keep-alive\r\nx-kept: yes\r\ncontent-length: 2\r\n\r\nok".to_vec())
    });
    let gw = gateway_for(&up, ROUTE_ALL);
    let r = request(
        gw.addr,
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Drop-Me, Host\r\nX-Drop-Me: 1\r\nKeep-Alive: timeout=9\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nTrailer: X-T\r\nX-Keep: 2\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let got = &up.requests()[0];
    for gone in [
        "x-drop-me",
        "keep-alive",
        "te",
        "proxy-connection",
        "upgrade",
        "trailer",
    ] {
        assert_eq!(got.header(gone), None, "{gone} must not be forwarded");
    }
    assert_eq!(got.headers_named("connection"), Vec::<&str>::new());
    assert_eq!(got.header("x-keep"), Some("2"));
    assert_eq!(
        got.header("host"),
        Some("a"),
        "Connection cannot remove Host"
    );
    for gone in ["x-internal", "keep-alive", "proxy-connection"] {
        assert_eq!(r.header(gone), None, "{gone} must not reach the client");
    }
    assert_eq!(r.header("x-kept"), Some("yes"));
    assert_eq!(r.header("via"), Some("1.1 portcullis"));
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let up = Upstream::start(|r| {
        // Make the first answer the slowest, to catch any reordering.
        let delay = if r.target == "/p0" {
            Duration::from_millis(200)
        } else {
            Duration::ZERO
        };
        Reply::Delayed(delay, ok_response(&r.target))
    });
    let gw = gateway_for(&up, &("[[routes]]\nmatch = { path = \"/local\" }\nrespond = { status = 200, body = \"local\" }\n".to_owned() + ROUTE_ALL));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /p0 HTTP/1.1\r\nHost: a\r\n\r\nGET /local HTTP/1.1\r\nHost: a\r\n\r\nPOST /p2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /p3 HTTP/1.1\r\nHost: a\r\n\r\n");
    let bodies: Vec<String> = (0..4)
        .map(|_| c.read_response(false).unwrap().text())
        .collect();
    assert_eq!(bodies, ["/p0", "local", "/p2", "/p3"]);
    let reqs = up.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[1].body, b"abc");
}

#[test]
fn head_204_304_and_1xx_are_framed() {
    let up = Upstream::start(|r| {
        match r.target.as_str() {
        "/204" => Reply::Raw(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()),
        "/304" => Reply::Raw(b"HTTP/1.1 304 Not Modified\r\netag: \"x\"\r\n\r\n".to_vec()),
        "/103" => Reply::Raw(b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody".to_vec()),
        _ => Reply::Raw(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n".to_vec()),
    }
    });
    let gw = gateway_for(&up, ROUTE_ALL);
    let mut c = Client::connect(gw.addr);
    c.send(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n");
    let r = c.read_response(true).unwrap();
    assert_eq!((r.status, r.header("content-length")), (200, Some("4")));
    c.send(b"GET /204 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 204);
    c.send(b"GET /304 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 304);
    c.send(b"GET /103 HTTP/1.1\r\nHost: a\r\n\r\n");
    let interim = c.read_response(false).unwrap();
    assert_eq!(
        (interim.status, interim.header("link")),
        (103, Some("</s.css>"))
    );
    let last = c.read_response(false).unwrap();
    assert_eq!((last.status, last.text().as_str()), (200, "body"));
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let up = Upstream::start(|r| Reply::Raw(ok_response(&format!("{} bytes", r.body.len()))));
    let gw = gateway_for(&up, ROUTE_ALL);
    let mut c = Client::connect(gw.addr);
    c.send(b"PUT /f HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    let cont = c.read_response(false).unwrap();
    assert_eq!(cont.status, 100);
    c.send(b"hello");
    assert_eq!(c.read_response(false).unwrap().text(), "5 bytes");
    assert_eq!(up.requests()[0].header("expect"), None);
}

#[test]
fn upgrade_is_tunnelled_only_after_101() {
    let up = Upstream::start(|r| {
        if r.header("upgrade") == Some("websocket") {
            Reply::SwitchAndEcho
        } else {
            Reply::Raw(ok_response("plain"))
        }
    });
    let gw = gateway_for(&up, ROUTE_ALL);
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!((r.status, r.header("upgrade")), (101, Some("websocket")));
    let got = &up.requests()[0];
    assert_eq!(
        (got.header("upgrade"), got.header("connection")),
        (Some("websocket"), Some("upgrade"))
    );
    for msg in [&b"ping"[..], b"second message"] {
        c.send(msg);
        let mut back = vec![0u8; msg.len()];
        c.stream.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    }
    // Upgrade without `Connection: upgrade` is not an upgrade.
    let r = request(
        gw.addr,
        "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
    );
    assert_eq!(r.text(), "plain");
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let up =
        Upstream::start(|_| Reply::Delayed(Duration::from_millis(700), ok_response("finished")));
    let mut gw = gateway_for(&up, ROUTE_ALL);
    let addr = gw.addr;
    let idle = TcpStream::connect(addr).unwrap();
    let in_flight = thread::spawn(move || request(addr, "GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"));
    thread::sleep(Duration::from_millis(200));
    gw.signal(libc::SIGTERM);
    let r = in_flight.join().unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "finished"));
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .expect("gateway exits after draining");
    assert!(status.success(), "exit status {status}; log:\n{}", gw.log());
    // The idle keep-alive connection was closed, and nothing accepts any more.
    let mut idle = idle;
    idle.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(matches!(idle.read(&mut [0u8; 1]), Ok(0) | Err(_)));
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn check_command_reports_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[[routes]]\nmatch = { path = \"/\" }\nupstream = \"missing\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:6: `routes[0].upstream`: no upstream named `missing`",
            path.display()
        )),
        "{err}"
    );
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[routes]]\nrespond = { status = 204 }\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("check")
        .arg("--config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
