//! Property: for arbitrary valid requests, what the upstream receives parses to the same method,
//! end-to-end fields and body that the client sent, and to the normal form of its target (the
//! path normalised, the query untouched), whether the body was framed by Content-Length or
//! chunked (in arbitrary chunk sizes).

mod support;

use std::rc::Rc;

use portcullis::http::target::{normalize_path, PathPolicy};
use proptest::prelude::*;
use support::*;

/// Fields the gateway owns or rewrites; every other field must arrive unchanged.
const GATEWAY_FIELDS: [&str; 9] = [
    "x-request-id",
    "traceparent",
    "host",
    "content-length",
    "transfer-encoding",
    "x-forwarded-for",
    "x-forwarded-proto",
    "via",
    "connection",
];

struct Fixture {
    upstream: support::Upstream,
    gateway: Gateway,
}

/// The gateway and upstream every case of this thread's test shares. Thread-local rather than
/// static: a thread's locals are dropped when it ends, and with them the gateway process (a
/// static is never dropped, so its gateway outlived the test binary).
fn fixture() -> Rc<Fixture> {
    thread_local! {
        static FIXTURE: Rc<Fixture> = Rc::new({
            let upstream = support::Upstream::echo_target();
            let gateway = Gateway::start(&config_with(upstream.addr, "", ROUTE_ALL));
            Fixture { upstream, gateway }
        });
    }
    FIXTURE.with(Rc::clone)
}

#[derive(Debug, Clone)]
struct Req {
    method: String,
    target: String,
    fields: Vec<(String, String)>,
    body: Vec<u8>,
    /// Chunk sizes to split the body into; `None` sends Content-Length.
    chunks: Option<Vec<usize>>,
}

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,15}"
}

fn request() -> impl Strategy<Value = Req> {
    let method = prop_oneof![
        Just("GET"),
        Just("POST"),
        Just("PUT"),
        Just("PATCH"),
        Just("DELETE"),
        Just("OPTIONS"),
        Just("X-CUSTOM")
    ];
    // Segments that normalisation changes (dot-segments, escapes of unreserved and reserved
    // characters in either case, empty segments) among plain ones.
    let segment = prop_oneof![
        4 => "[A-Za-z0-9._~!$&'()*+,=:@-]{0,12}",
        1 => Just(".".to_owned()),
        1 => Just("..".to_owned()),
        1 => "(%2[aAeE]|%4[1fF]|%7[eE]|%3[bB]|%25|%C3%A9|[a-z]){1,4}",
    ];
    let target = (
        proptest::collection::vec(segment, 1..5),
        proptest::option::of("[A-Za-z0-9=&%._/-]{0,24}"),
    )
        .prop_map(|(segments, query)| {
            let path: String = segments.iter().map(|s| format!("/{s}")).collect();
            match query {
                Some(q) => format!("{path}?{q}"),
                None => path,
            }
        })
        // Paths that climb above the root are refused (tests/bypass.rs); keep the valid ones.
        .prop_filter("normalisable", |t| normalized(t).is_some());
    let field = (token(), "[ -~]{0,40}")
        .prop_map(|(name, value)| (format!("x-{name}"), value.trim().to_owned()));
    let fields = proptest::collection::vec(field, 0..12);
    let body = proptest::collection::vec(any::<u8>(), 0..3000);
    let chunks = proptest::option::of(proptest::collection::vec(1usize..700, 1..8));
    (method, target, fields, body, chunks).prop_map(|(method, target, fields, body, chunks)| Req {
        method: method.to_owned(),
        target,
        fields,
        body,
        chunks,
    })
}

/// The target the upstream must receive: the path in normal form, the query as sent.
fn normalized(target: &str) -> Option<String> {
    let (path, query) = target.split_at(target.find('?').unwrap_or(target.len()));
    let mut out = Vec::new();
    normalize_path(path.as_bytes(), PathPolicy::default(), &mut out).ok()?;
    Some(String::from_utf8(out).unwrap() + query)
}

fn encode(r: &Req) -> Vec<u8> {
    let mut out = format!(
        "{} {} HTTP/1.1\r\nHost: roundtrip.test\r\n",
        r.method, r.target
    )
    .into_bytes();
    for (n, v) in &r.fields {
        out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    match &r.chunks {
        None => {
            out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", r.body.len()).as_bytes());
            out.extend_from_slice(&r.body);
        }
        Some(sizes) => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            let mut rest = &r.body[..];
            let mut sizes = sizes.iter().cycle();
            while !rest.is_empty() {
                let n = (*sizes.next().unwrap()).min(rest.len());
                out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                out.extend_from_slice(&rest[..n]);
                out.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            out.extend_from_slice(b"0\r\n\r\n");
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn upstream_receives_what_the_client_sent(reqs in proptest::collection::vec(request(), 1..4)) {
        let f = fixture();
        // Several requests on one connection, sent pipelined in one write.
        let mut c = Client::connect(f.gateway.addr);
        let mut wire = Vec::new();
        for r in &reqs {
            wire.extend_from_slice(&encode(r));
        }
        c.send(&wire);
        for r in &reqs {
            let resp = c.read_response(false).expect("a response");
            prop_assert_eq!(resp.status, 200);
            prop_assert_eq!(resp.text(), normalized(&r.target).unwrap());
        }
        let received = f.upstream.requests();
        let mine: Vec<_> = received.iter().rev().take(reqs.len()).rev().collect();
        for (sent, got) in reqs.iter().zip(mine) {
            prop_assert_eq!(&got.method, &sent.method);
            prop_assert_eq!(&got.target, &normalized(&sent.target).unwrap());
            prop_assert_eq!(&got.body, &sent.body);
            prop_assert_eq!(got.header("host"), Some("roundtrip.test"));
            let end_to_end: Vec<(String, String)> = got
                .headers
                .iter()
                .filter(|(n, _)| !GATEWAY_FIELDS.iter().any(|g| n.eq_ignore_ascii_case(g)))
                .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
                .collect();
            let expected: Vec<(String, String)> = sent.fields.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect();
            prop_assert_eq!(end_to_end, expected);
        }
    }
}
