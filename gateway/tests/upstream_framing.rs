//! Responses from upstreams whose framing cannot be trusted: 502 to the client, and that
//! upstream connection is closed, never reused.

mod support;

use std::sync::atomic::Ordering;

use support::*;

#[test]
fn bad_upstream_framing_gives_502_and_the_connection_is_not_reused() {
    let cases: &[(&str, &[u8])] = &[
        (
            "CL and TE",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "two CLs",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        ),
        (
            "negative CL",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        ),
        (
            "TE gzip",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        ),
        ("garbage", b"HTTP/1.1 two hundred\r\n\r\n"),
        (
            "NUL in field",
            b"HTTP/1.1 200 OK\r\nX: a\x00\r\nContent-Length: 0\r\n\r\n",
        ),
        // Invalid chunked framing in the same read as the head: nothing was sent to the
        // client yet, so it gets a 502, not an empty reply.
        (
            "bad chunk size in the first read",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "chunk without CRLF in the first read",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n",
        ),
    ];
    for (name, raw) in cases {
        let raw = raw.to_vec();
        let up = Upstream::start(move |r| {
            if r.target == "/bad" {
                Reply::Raw(raw.clone())
            } else {
                Reply::Raw(ok_response("good"))
            }
        });
        let gw = Gateway::start(
            &config_with(up.addr, "", ROUTE_ALL).replace("workers = 2", "workers = 1"),
        );
        let r = request(gw.addr, "GET /bad HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.status, 502, "{name}");
        let r = request(gw.addr, "GET /good HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.text(), "good", "{name}");
        assert_eq!(
            up.connections.load(Ordering::SeqCst),
            2,
            "{name}: the bad connection must not be reused"
        );
    }
}

#[test]
fn chunked_body_broken_midway_closes_both_sides() {
    let up = Upstream::start(|r| {
        if r.target == "/broken" {
            Reply::RawThenClose(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel".to_vec(),
            )
        } else {
            Reply::Raw(ok_response("good"))
        }
    });
    let gw =
        Gateway::start(&config_with(up.addr, "", ROUTE_ALL).replace("workers = 2", "workers = 1"));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /broken HTTP/1.1\r\nHost: a\r\n\r\n");
    let raw = c.read_raw_until_close();
    assert!(
        raw.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "the head was already sent"
    );
    assert!(
        !raw.ends_with(b"0\r\n\r\n"),
        "the body must not look complete"
    );
    assert_eq!(
        request(gw.addr, "GET /good HTTP/1.1\r\nHost: a\r\n\r\n").text(),
        "good"
    );
}

#[test]
fn response_without_length_is_read_to_close_and_not_reused() {
    let up = Upstream::start(|r| {
        if r.target == "/eof" {
            Reply::RawThenClose(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end".to_vec(),
            )
        } else {
            Reply::Raw(ok_response("good"))
        }
    });
    let gw =
        Gateway::start(&config_with(up.addr, "", ROUTE_ALL).replace("workers = 2", "workers = 1"));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /eof HTTP/1.1\r\nHost: a\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(
        (r.text().as_str(), r.header("connection")),
        ("until the end", Some("close"))
    );
    assert_eq!(
        request(gw.addr, "GET /good HTTP/1.1\r\nHost: a\r\n\r\n").text(),
        "good"
    );
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
}

#[test]
fn extra_bytes_after_a_response_make_the_connection_unreusable() {
    let up = Upstream::start(|r| {
        if r.target == "/extra" {
            Reply::Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\npoisoned".to_vec())
        } else {
            Reply::Raw(ok_response("good"))
        }
    });
    let gw =
        Gateway::start(&config_with(up.addr, "", ROUTE_ALL).replace("workers = 2", "workers = 1"));
    assert_eq!(
        request(gw.addr, "GET /extra HTTP/1.1\r\nHost: a\r\n\r\n").text(),
        "ok"
    );
    // Another client must never see the stray response.
    assert_eq!(
        request(gw.addr, "GET /good HTTP/1.1\r\nHost: a\r\n\r\n").text(),
        "good"
    );
}
