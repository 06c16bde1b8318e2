//! Fuzz harnesses for the HTTP codec. Each checks properties, not only the absence of panics.
//! The fuzz targets call them under libFuzzer; `gateway/tests/fuzz_corpus.rs` replays the
//! committed corpus through the same functions in every test run.

use std::{mem::MaybeUninit, net::IpAddr, path::Path};

use portcullis::{
    config::{AuthConfig, Config},
    http::{
        chunked::{ChunkedDecoder, ChunkedError},
        encode::{self, ClientFraming, Identity},
        request::{incomplete_head_error, parse_request, HeadLimits},
        response::parse_response,
        BodyFraming, Version,
    },
    routing::RouteTable,
};

const LIMITS: HeadLimits = HeadLimits {
    max_header_bytes: 16 * 1024,
    max_headers: 64,
    max_uri_bytes: 4096,
};

fn catch_all() -> RouteTable {
    let src = "[upstreams.u]\nservers = [\"127.0.0.1:9\"]\n[[routes]]\nupstream = \"u\"\n";
    RouteTable::new(&Config::parse(Path::new("fuzz.toml"), src).expect("valid"))
}

/// Request heads: never panic; whatever is accepted is re-encoded into a head that the decoder
/// accepts again with the same method, path, query and framing.
pub fn request_head(data: &[u8]) {
    let mut headers = [const { MaybeUninit::uninit() }; 64];
    let req = match parse_request(data, &mut headers, &LIMITS) {
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
        .find(req.host, req.path, req.method.as_bytes())
        .expect("catch-all route");
    let mut out = Vec::new();
    encode::write_upstream_request(
        &mut out,
        &req,
        route,
        &Identity::default(),
        &AuthConfig::default(),
        IpAddr::from([203, 0, 113, 7]),
        "http",
        "127.0.0.1:9",
    );
    let mut again_headers = [const { MaybeUninit::uninit() }; 128];
    let limits = HeadLimits {
        max_header_bytes: 64 * 1024,
        max_headers: 128,
        max_uri_bytes: 64 * 1024,
    };
    let again = parse_request(&out, &mut again_headers, &limits)
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
    assert_eq!(again.query, req.query);
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
    encode::write_client_response(&mut out, &resp, framing);
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
