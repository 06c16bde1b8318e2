//! Hostile requests: each case asserts the exact status, whether the gateway closed the
//! connection, and what the upstream received (nothing, or exactly one well-formed request).

mod support;

use std::{thread, time::Duration};

use support::*;

/// What the upstream must have seen for a case.
#[derive(Debug, Clone, Copy)]
enum Upstream {
    Nothing,
    /// Exactly one request, with this body.
    One(&'static [u8]),
}

struct Case {
    name: &'static str,
    raw: &'static [u8],
    status: u16,
    closed: bool,
    upstream: Upstream,
}

const fn refused(name: &'static str, raw: &'static [u8], status: u16) -> Case {
    Case {
        name,
        raw,
        status,
        closed: true,
        upstream: Upstream::Nothing,
    }
}

const fn accepted(name: &'static str, raw: &'static [u8], body: &'static [u8]) -> Case {
    Case {
        name,
        raw,
        status: 200,
        closed: false,
        upstream: Upstream::One(body),
    }
}

const CASES: &[Case] = &[
    // Content-Length together with Transfer-Encoding, in several disguises.
    refused("CL.TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG", 400),
    refused("TE.CL", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n", 400),
    refused("CL.TE upper case", b"POST / HTTP/1.1\r\nHost: a\r\nCONTENT-LENGTH: 6\r\nTRANSFER-ENCODING: CHUNKED\r\n\r\n0\r\n\r\nG", 400),
    refused("CL.TE tab", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\nG", 400),
    refused("TE space before colon", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\nG", 400),
    refused("TE underscore", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer_Encoding: chunked\r\n\r\n0\r\n\r\nG", 400),
    refused("CL underscore", b"POST / HTTP/1.1\r\nHost: a\r\nContent_Length: 6\r\n\r\nabcdef", 400),
    refused("TE vertical tab", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\x0b\r\n\r\n0\r\n\r\n", 400),
    refused("TE form feed", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0cchunked\r\n\r\n0\r\n\r\n", 400),
    refused("TE obs-fold", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    refused("TE twice", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    refused("TE list with empty item", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n", 400),
    refused("TE quoted", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n0\r\n\r\n", 400),
    refused("TE gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    refused("TE gzip, chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    refused("TE chunked, identity", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n", 501),
    refused("TE prefix xchunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
    refused("TE suffix chunkedx", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunkedx\r\n\r\n0\r\n\r\n", 501),
    refused("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    // Content-Length values.
    refused("CL two values", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    refused("CL list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    refused("CL plus sign", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc", 400),
    refused("CL minus", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -3\r\n\r\nabc", 400),
    refused("CL hex", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\nabc", 400),
    refused("CL inner space", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 2\r\n\r\nabcdefghijkl", 400),
    refused("CL empty", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", 400),
    refused("CL huge", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400),
    refused("CL vertical tab", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\x0b\r\n\r\nabc", 400),
    accepted("CL leading zeros", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 003\r\n\r\nabc", b"abc"),
    accepted("CL identical twice", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", b"abc"),
    accepted("TE with whitespace and case", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \t ChUnKeD \r\n\r\n3\r\nabc\r\n0\r\n\r\n", b"abc"),
    // Chunk framing.
    refused("chunk size hex prefix", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n", 400),
    refused("chunk size negative", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n", 400),
    refused("chunk size overflow", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000003\r\nabc\r\n0\r\n\r\n", 400),
    refused("chunk size bare LF", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", 400),
    refused("chunk size trailing space", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
    refused("chunk size leading space", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n 3\r\nabc\r\n0\r\n\r\n", 400),
    refused("chunk data too long", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n", 400),
    refused("chunk end bare CR", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\rX0\r\n\r\n", 400),
    refused("chunk extension control byte", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;a=\x01\r\nabc\r\n0\r\n\r\n", 400),
    refused("trailer obs-fold", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: a\r\n b\r\n\r\n", 400),
    accepted("chunk extension", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;name=\"v\"\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n", b"abc"),
    accepted("chunk size leading zeros", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0003\r\nabc\r\n0\r\n\r\n", b"abc"),
    // Field syntax.
    refused("bare CR in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    refused("NUL in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    refused("DEL in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n", 400),
    refused("escape in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x1bb\r\n\r\n", 400),
    refused("space before colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-Thing : b\r\n\r\n", 400),
    refused("tab before colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-Thing\t: b\r\n\r\n", 400),
    refused("empty field name", b"GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n", 400),
    refused("field without colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-Thing b\r\n\r\n", 400),
    refused("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n", 400),
    refused("space before first field", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),
    refused("bare CR line end", b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400),
    // Request line and Host.
    refused("double space", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    refused("lower-case version", b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    refused("version without dot", b"GET / HTTP/11\r\nHost: a\r\n\r\n", 400),
    refused("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    refused("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
    refused("HTTP/0.9 style", b"GET /\r\n\r\n", 400),
    refused("missing Host", b"GET / HTTP/1.1\r\nX: a\r\n\r\n", 400),
    refused("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    refused("two identical Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", 400),
    refused("Host disagrees with target", b"GET http://a/ HTTP/1.1\r\nHost: b\r\n\r\n", 400),
    refused("Host with userinfo target", b"GET http://x@a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    refused("Host with space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    refused("Host with slash", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    refused("target not origin-form", b"GET a/b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    refused("CONNECT", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
    refused("unknown expectation", b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\na", 417),
    accepted("absolute-form agrees", b"GET http://A:80/x HTTP/1.1\r\nHost: a:80\r\n\r\n", b""),
    accepted("HTTP/1.0 without Host", b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", b""),
];

/// Limits cases (need the size limits set in `limited_config`).
const LIMIT_CASES: &[Case] = &[
    refused("target too long", b"GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    refused("too many fields", b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\nE: 1\r\nF: 1\r\nG: 1\r\nH: 1\r\nI: 1\r\n\r\n", 431),
    refused("body over the route limit", b"POST /small HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world", 413),
    refused("chunked body over the route limit", b"POST /small HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n", 413),
    accepted("body at the route limit", b"POST /small HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhelloworld", b"helloworld"),
];

fn limited_config(upstream: std::net::SocketAddr) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\nmax_uri_bytes = 64\nmax_headers = 8\nmax_header_bytes = 1024\n\n[upstreams.up]\nservers = [\"{upstream}\"]\n\n[[routes]]\nmatch = {{ path_prefix = \"/small\" }}\nupstream = \"up\"\nmax_body_bytes = 10\n\n{ROUTE_ALL}"
    )
}

fn run_cases(gw: &Gateway, up: &support::Upstream, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let started = std::time::Instant::now();
        let before = up.requests().len();
        let mut c = Client::connect(gw.addr);
        c.send(case.raw);
        let r = c.read_response(false);
        let status = r.as_ref().map(|r| r.status);
        let closed = if case.closed { c.is_closed() } else { false };
        if !case.closed {
            // The connection must still serve a request.
            c.send(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n");
            if c.read_response(false).map(|r| r.status) != Some(200) {
                failures.push(format!(
                    "{}: connection not reusable after an accepted request",
                    case.name
                ));
            }
        }
        // Give the upstream a moment to record anything it might have received.
        thread::sleep(Duration::from_millis(20));
        let got: Vec<_> = up.requests()[before..]
            .iter()
            .filter(|r| r.target != "/after")
            .cloned()
            .collect();
        if started.elapsed() > Duration::from_secs(2) {
            failures.push(format!("{}: took {:?}", case.name, started.elapsed()));
        }
        if status != Some(case.status) {
            failures.push(format!(
                "{}: status {status:?}, expected {}",
                case.name, case.status
            ));
        }
        if case.closed && !closed {
            failures.push(format!("{}: connection left open", case.name));
        }
        match (case.upstream, got.as_slice()) {
            (Upstream::Nothing, []) => {}
            (Upstream::One(body), [one]) if one.body == body => {}
            (want, got) => failures.push(format!(
                "{}: upstream expected {want:?}, received {:?}",
                case.name,
                got.iter()
                    .map(|r| (
                        r.method.clone(),
                        r.target.clone(),
                        String::from_utf8_lossy(&r.body).into_owned()
                    ))
                    .collect::<Vec<_>>()
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn hostile_request_table() {
    let up = support::Upstream::echo_target();
    let gw = Gateway::start(&config_with(up.addr, "", ROUTE_ALL));
    run_cases(&gw, &up, CASES);
}

#[test]
fn limits_table() {
    let up = support::Upstream::echo_target();
    let gw = Gateway::start(&limited_config(up.addr));
    run_cases(&gw, &up, LIMIT_CASES);
}
