//! Fuzz harnesses for the HTTP codec. Each checks properties, not only the absence of panics.
//! The fuzz targets call them under libFuzzer; `gateway/tests/fuzz_corpus.rs` replays the
//! committed corpus through the same functions in every test run.

use std::{mem::MaybeUninit, net::IpAddr, path::Path};

use portcullis::{
    config::{AuthConfig, Config},
    http::{
        chunked::{ChunkedDecoder, ChunkedError},
        encode::{self, ClientFraming},
        request::{incomplete_head_error, parse_request, HeadRules},
        response::parse_response,
        target::{normalize_path, EncodedSlash, PathPolicy},
        BodyFraming, Version,
    },
    routing::RouteTable,
};

const LIMITS: HeadRules = HeadRules {
    max_header_bytes: 16 * 1024,
    max_headers: 64,
    max_uri_bytes: 4096,
    path: PathPolicy {
        merge_slashes: true,
        encoded_slash: EncodedSlash::Reject,
    },
};

fn catch_all() -> RouteTable {
    // With rules whose templates copy what the client sent, so hostile values reach them.
    let src = "[upstreams.u]\nservers = [\"127.0.0.1:9\"]\n[[routes]]\nupstream = \"u\"\n\
               request_headers = { set = { \"x-copy\" = \"{header.x-in}{path}\" }, rename = { \"x-old\" = \"x-new\" }, add = { \"x-host\" = \"{host}\" } }\n\
               query = { set = { \"p\" = \"{header.x-in}\" }, remove = [\"drop\"] }\n";
    RouteTable::new(&Config::parse(Path::new("fuzz.toml"), src).expect("valid"))
}

/// Request heads: never panic; whatever is accepted is re-encoded into a head that the decoder
/// accepts again with the same method, path, query and framing.
pub fn request_head(data: &[u8]) {
    let mut headers = [const { MaybeUninit::uninit() }; 64];
    let mut normalized = Vec::new();
    let req = match parse_request(data, &mut headers, &LIMITS, &mut normalized) {
        Ok(Some(req)) => req,
        Ok(None) => {
            let _ = incomplete_head_error(data, &LIMITS);
            return;
        }
        Err(e) => {
            assert!(matches!(e.status(), 400 | 414 | 417 | 431 | 501 | 505));
            return;
        }
    };
    assert!(req.head_len <= data.len());
    let routes = catch_all();
    let route = routes
        .find(req.route_host, req.path, req.method.as_bytes())
        .expect("catch-all route");
    let mut out = Vec::new();
    let written = portcullis::proxy::upstream_head::write_upstream_request(
        &mut out,
        &req,
        route,
        &portcullis::proxy::upstream_head::Identity::default(),
        &AuthConfig::default(),
        IpAddr::from([203, 0, 113, 7]),
        "http",
        portcullis::proxy::upstream_head::UpstreamHost {
            value: "127.0.0.1:9",
            fixed: false,
        },
        b"x-request-id: 0123456789abcdef0123456789abcdef\r\n",
        &portcullis::transform::template::RenderContext::of_request(
            &req,
            IpAddr::from([203, 0, 113, 7]),
            &route.id,
            b"0123456789abcdef0123456789abcdef",
        ),
    );
    // Every value came through the decoder, which refuses CR, LF and NUL.
    assert!(written.is_ok(), "{written:?}");
    let mut again_headers = [const { MaybeUninit::uninit() }; 128];
    let limits = HeadRules {
        max_header_bytes: 64 * 1024,
        max_headers: 128,
        max_uri_bytes: 64 * 1024,
        ..LIMITS
    };
    let mut again_normalized = Vec::new();
    let again = parse_request(&out, &mut again_headers, &limits, &mut again_normalized)
        .unwrap_or_else(|e| {
            panic!(
                "re-encoded head refused ({e:?}): {:?}",
                String::from_utf8_lossy(&out)
            )
        })
        .expect("re-encoded head is complete");
    assert_eq!(again.head_len, out.len());
    assert_eq!(again.method, req.method);
    assert_eq!(again.path, req.path);
    // The query rules ran: `p` is set once, `drop` is gone; the rest is the client's.
    let names: Vec<&[u8]> = again
        .query
        .strip_prefix(b"?")
        .unwrap_or(b"")
        .split(|b| *b == b'&')
        .map(|pair| pair.split(|b| *b == b'=').next().unwrap_or(pair))
        .collect();
    let expected_p = usize::from(req.path != b"*");
    assert_eq!(
        names.iter().filter(|n| **n == b"p").count(),
        expected_p,
        "{names:?}"
    );
    assert!(!names.contains(&&b"drop"[..]), "{names:?}");
    assert_eq!(again.version, Version::Http11);
    match (req.body, again.body) {
        (BodyFraming::None, BodyFraming::None | BodyFraming::Length(0)) => {}
        (a, b) => assert_eq!(a, b),
    }
}

/// The chunked decoder gives the same answer whichever way the input is split.
pub fn chunked(data: &[u8]) {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(split).max(1);
    let whole = decode_in_steps(input, input.len().max(1));
    let pieces = decode_in_steps(input, step);
    assert_eq!(whole, pieces, "split every {step} bytes");
    if let Ok((consumed, _, done, _)) = whole {
        assert!(consumed <= input.len());
        assert!(
            done || consumed == input.len(),
            "an unfinished body consumes all it is given"
        );
    }
}

type Decoded = Result<(usize, Vec<u8>, bool, u64), ChunkedError>;

fn decode_in_steps(input: &[u8], step: usize) -> Decoded {
    let mut d = ChunkedDecoder::new();
    let mut data = Vec::new();
    let mut consumed = 0;
    for piece in input.chunks(step) {
        let p = d.decode(piece, |r| data.extend_from_slice(&piece[r]))?;
        consumed += p.consumed;
        if p.done {
            return Ok((consumed, data, true, d.data_bytes()));
        }
    }
    Ok((consumed, data, false, d.data_bytes()))
}

/// Response heads: never panic; an accepted head is re-encoded for the client into a head that
/// parses again with the same status and framing.
pub fn response_head(data: &[u8]) {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let is_head = flags & 1 == 1;
    let mut headers = [const { MaybeUninit::uninit() }; 128];
    let Ok(Some(resp)) = parse_response(input, &mut headers, is_head) else {
        return;
    };
    assert!(resp.head_len <= input.len());
    let framing = ClientFraming {
        chunked: resp.body == BodyFraming::Chunked,
        keep_alive: flags & 2 == 0,
        client_version: Version::Http11,
    };
    let mut out = Vec::new();
    encode::write_client_response(&mut out, &resp, framing, b"x-request-id: fuzz\r\n", &|_| {
        portcullis::http::fields::FieldFate::Keep
    })
    .expect("decoded values are safe");
    let mut again_headers = [const { MaybeUninit::uninit() }; 256];
    let again = parse_response(&out, &mut again_headers, is_head)
        .unwrap_or_else(|e| {
            panic!(
                "re-encoded response refused ({e}): {:?}",
                String::from_utf8_lossy(&out)
            )
        })
        .expect("complete");
    assert_eq!(again.head_len, out.len());
    assert_eq!(again.status, resp.status);
    // Read-to-close stays read-to-close: the gateway adds no length it does not know.
    assert_eq!(again.body, resp.body);
}

/// Path normalisation: never panics; the normal form is a fixed point (normalising it again
/// gives it back), never longer than the input, and holds no dot-segment, no empty segment
/// (slashes merged), no escape of an unreserved character and no lower-case hex digit.
pub fn path(data: &[u8]) {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let policy = PathPolicy {
        merge_slashes: flags & 1 == 0,
        encoded_slash: if flags & 2 == 0 {
            EncodedSlash::Reject
        } else {
            EncodedSlash::Keep
        },
    };
    let mut once = Vec::new();
    if normalize_path(input, policy, &mut once).is_err() {
        return;
    }
    assert!(once.len() <= input.len());
    let mut twice = Vec::new();
    normalize_path(&once, policy, &mut twice).expect("a normal form is accepted again");
    assert_eq!(once, twice, "normalising twice changes the path");
    if once == b"*" {
        return;
    }
    assert_eq!(once.first(), Some(&b'/'));
    let segments: Vec<&[u8]> = once[1..].split(|b| *b == b'/').collect();
    for (i, segment) in segments.iter().enumerate() {
        assert!(
            *segment != b"." && *segment != b"..",
            "dot-segment left in {:?}",
            String::from_utf8_lossy(&once)
        );
        if policy.merge_slashes && i + 1 < segments.len() {
            assert!(!segment.is_empty(), "empty segment left");
        }
    }
    for escape in once.windows(3).filter(|w| w[0] == b'%') {
        let hex = std::str::from_utf8(&escape[1..]).expect("ASCII");
        assert!(
            hex.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()),
            "lower-case escape {hex}"
        );
        let decoded = u8::from_str_radix(hex, 16).expect("two hex digits");
        assert!(
            !(decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded)),
            "escaped unreserved character %{hex}"
        );
    }
    assert!(once.iter().all(|b| b.is_ascii() && *b != b'\\'));
}
