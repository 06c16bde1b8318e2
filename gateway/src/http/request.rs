//! Decoding of request heads: httparse for the syntax, then the RFC 9112 rules that decide
//! where the message ends and whether the gateway may forward it at all.

use std::mem::MaybeUninit;

use httparse::Header;

use super::{
    fields::{classify_transfer_encoding, ConnectionOptions, ContentLengthFields, TransferCoding},
    target::{normalize_host, normalize_path, PathError, PathPolicy},
    BodyFraming, Version,
};

/// The request-size limits and the path policy of `[server]`.
#[derive(Clone, Copy, Debug)]
pub struct HeadRules {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    pub path: PathPolicy,
}

/// Why a request was refused before routing. Every one of them closes the connection: once
/// framing is in doubt, nothing after it on the connection can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// 400: malformed syntax or framing; the text says which rule.
    BadRequest(&'static str),
    /// 400: a path that cannot be normalised safely.
    BadPath(PathError),
    /// 414: the target is longer than `max_uri_bytes`.
    UriTooLong,
    /// 431: the head is larger than `max_header_bytes`.
    HeadersTooLarge,
    /// 431: more fields than `max_headers`.
    TooManyHeaders,
    /// 417: an Expect value other than 100-continue.
    ExpectationFailed,
    /// 501: a transfer coding or method the gateway does not implement.
    NotImplemented(&'static str),
    /// 505: an HTTP version other than 1.0 and 1.1.
    VersionNotSupported,
}

impl RequestError {
    pub fn status(&self) -> u16 {
        match self {
            RequestError::BadRequest(_) | RequestError::BadPath(_) => 400,
            RequestError::UriTooLong => 414,
            RequestError::HeadersTooLarge | RequestError::TooManyHeaders => 431,
            RequestError::ExpectationFailed => 417,
            RequestError::NotImplemented(_) => 501,
            RequestError::VersionNotSupported => 505,
        }
    }

    pub fn detail(&self) -> &'static str {
        match self {
            RequestError::BadRequest(why) | RequestError::NotImplemented(why) => why,
            RequestError::BadPath(e) => e.detail(),
            RequestError::UriTooLong => "request target too long",
            RequestError::HeadersTooLarge => "request header section too large",
            RequestError::TooManyHeaders => "too many request header fields",
            RequestError::ExpectationFailed => "unsupported expectation",
            RequestError::VersionNotSupported => "HTTP version not supported",
        }
    }
}

/// A decoded request head; every slice borrows the connection's read buffer, or its
/// normalisation buffer for `path` and `route_host`.
#[derive(Debug)]
pub struct RequestHead<'b, 'h> {
    pub method: &'b str,
    /// The target as received.
    pub target: &'b str,
    /// The target's path in normal form, without the query: what routes match and what the
    /// upstream receives.
    pub path: &'b [u8],
    /// `?` and the query, or empty.
    pub query: &'b [u8],
    pub version: Version,
    pub headers: &'h [Header<'b>],
    /// Length of the head in the buffer, up to and including the empty line.
    pub head_len: usize,
    pub body: BodyFraming,
    /// The Host field, or the authority of an absolute-form target, as received.
    pub host: Option<&'b [u8]>,
    /// `host` as routes match it: lower case, without port or trailing dot; `None` when there
    /// is no host or it cannot name one.
    pub route_host: Option<&'b [u8]>,
    pub connection: ConnectionOptions<'b>,
    /// The client asked to keep the connection open after this exchange.
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// The Upgrade field, when the request asks for a protocol upgrade.
    pub upgrade: Option<&'b [u8]>,
}

impl RequestHead<'_, '_> {
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
    pub fn has_body(&self) -> bool {
        !matches!(self.body, BodyFraming::None | BodyFraming::Length(0))
    }
}

impl From<PathError> for RequestError {
    fn from(e: PathError) -> Self {
        RequestError::BadPath(e)
    }
}

/// Decodes a request head from the start of `buf`. `Ok(None)` means more bytes are needed; the
/// caller then checks [`incomplete_head_error`] before reading more. The normalised path and
/// host are written to `normalized` (the connection's buffer, reused: no allocation once it
/// has grown to the longest target).
pub fn parse_request<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut [MaybeUninit<Header<'b>>],
    limits: &HeadRules,
    normalized: &'b mut Vec<u8>,
) -> Result<Option<RequestHead<'b, 'h>>, RequestError> {
    let max_headers = limits.max_headers.min(headers.len());
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut headers[..max_headers]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(classify_parse_error(e, buf)),
    };
    if head_len > limits.max_header_bytes {
        return Err(RequestError::HeadersTooLarge);
    }
    let httparse::Request {
        method,
        path,
        version,
        headers,
    } = req;
    let (method, target, version) = match (method, path, version) {
        (Some(m), Some(t), Some(0)) => (m, t, Version::Http10),
        (Some(m), Some(t), Some(1)) => (m, t, Version::Http11),
        _ => return Err(RequestError::BadRequest("incomplete request line")),
    };
    if target.len() > limits.max_uri_bytes {
        return Err(RequestError::UriTooLong);
    }
    let headers: &'h [Header<'b>] = headers;

    let mut content_length = ContentLengthFields::default();
    let mut has_content_length = false;
    let mut has_transfer_encoding = false;
    let mut host: Option<&'b [u8]> = None;
    let mut connection = ConnectionOptions::default();
    let mut expect_continue = false;
    let mut upgrade: Option<&'b [u8]> = None;
    for h in headers {
        let name = h.name;
        let value: &'b [u8] = h.value;
        if name.eq_ignore_ascii_case("content-length") {
            has_content_length = true;
            content_length
                .add(value)
                .map_err(|_| RequestError::BadRequest("invalid or conflicting Content-Length"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            has_transfer_encoding = true;
        } else if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(RequestError::BadRequest("more than one Host field"));
            }
            if !valid_host_value(value) {
                return Err(RequestError::BadRequest("invalid Host field"));
            }
            host = Some(value);
        } else if name.eq_ignore_ascii_case("connection") {
            connection
                .add(value)
                .map_err(|_| RequestError::BadRequest("invalid Connection field"))?;
        } else if name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
            } else {
                return Err(RequestError::ExpectationFailed);
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = Some(value);
        } else if is_framing_lookalike(name) {
            // Some servers read `_` as `-`: they would frame this request differently.
            return Err(RequestError::BadRequest(
                "field name imitates a framing field",
            ));
        }
    }

    let body = if has_transfer_encoding {
        if has_content_length {
            return Err(RequestError::BadRequest(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if version == Version::Http10 {
            return Err(RequestError::BadRequest(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        let values = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
            .map(|h| h.value);
        match classify_transfer_encoding(values) {
            TransferCoding::Chunked => BodyFraming::Chunked,
            TransferCoding::Unsupported => {
                return Err(RequestError::NotImplemented("unsupported transfer coding"))
            }
            TransferCoding::Invalid => {
                return Err(RequestError::BadRequest("invalid Transfer-Encoding"))
            }
        }
    } else {
        match content_length.get() {
            Some(n) => BodyFraming::Length(n),
            None => BodyFraming::None,
        }
    };

    if method == "CONNECT" {
        return Err(RequestError::NotImplemented("CONNECT is not supported"));
    }
    let SplitTarget {
        path,
        query,
        authority,
    } = split_target(target, method)?;
    let host = match (authority, host) {
        (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => {
            return Err(RequestError::BadRequest(
                "Host disagrees with the request target",
            ))
        }
        (Some(a), _) => Some(a),
        (None, h) => h,
    };
    if host.is_none() && version == Version::Http11 {
        return Err(RequestError::BadRequest("missing Host field"));
    }
    normalize_path(path, limits.path, normalized)?;
    let path_len = normalized.len();
    let has_route_host = host.is_some_and(|h| normalize_host(h, normalized));
    let normalized: &'b [u8] = normalized;
    let (path, route_host) = normalized.split_at(path_len);
    let route_host = has_route_host.then_some(route_host);
    let keep_alive = match version {
        Version::Http11 => !connection.close,
        Version::Http10 => connection.keep_alive && !connection.close,
    };
    let upgrade = if connection.upgrade && version == Version::Http11 {
        upgrade
    } else {
        None
    };
    Ok(Some(RequestHead {
        method,
        target,
        path,
        query,
        version,
        headers,
        head_len,
        body,
        host,
        route_host,
        connection,
        keep_alive,
        expect_continue: expect_continue && version == Version::Http11,
        upgrade,
    }))
}

/// True for names such as `Transfer_Encoding` or `content_length`: equal to a framing field
/// once `_` is read as `-`, but not the field itself.
fn is_framing_lookalike(name: &str) -> bool {
    name.contains('_')
        && ["transfer-encoding", "content-length"].iter().any(|f| {
            f.len() == name.len()
                && f.bytes()
                    .zip(name.bytes())
                    .all(|(a, b)| a == b.to_ascii_lowercase() || (a == b'-' && b == b'_'))
        })
}

/// For a head that is still incomplete: the error to answer when it can no longer become valid.
pub fn incomplete_head_error(buf: &[u8], limits: &HeadRules) -> Option<RequestError> {
    let line_end = buf.iter().position(|b| *b == b'\n');
    let first_line = line_end.unwrap_or(buf.len());
    // Method (<= 32) + two spaces + version (8) around the target.
    if first_line > limits.max_uri_bytes + 48 {
        return Some(RequestError::UriTooLong);
    }
    if buf.len() >= limits.max_header_bytes {
        return Some(RequestError::HeadersTooLarge);
    }
    None
}

fn classify_parse_error(e: httparse::Error, buf: &[u8]) -> RequestError {
    match e {
        httparse::Error::TooManyHeaders => RequestError::TooManyHeaders,
        httparse::Error::Version if looks_like_other_version(buf) => {
            RequestError::VersionNotSupported
        }
        httparse::Error::HeaderName => RequestError::BadRequest("invalid header field name"),
        httparse::Error::HeaderValue => RequestError::BadRequest("invalid header field value"),
        httparse::Error::NewLine => RequestError::BadRequest("invalid line ending"),
        httparse::Error::Token => RequestError::BadRequest("invalid method"),
        _ => RequestError::BadRequest("malformed request line"),
    }
}

/// True when the request line is well formed but names a version other than 1.0 or 1.1.
fn looks_like_other_version(buf: &[u8]) -> bool {
    let line = buf.split(|b| *b == b'\n').next().unwrap_or(buf);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !method.is_empty()
        && method.iter().all(|b| super::is_token_byte(*b))
        && !target.is_empty()
        && matches!(version, [b'H', b'T', b'T', b'P', b'/', major, b'.', minor] if major.is_ascii_digit() && minor.is_ascii_digit())
}

/// A request target taken apart.
struct SplitTarget<'b> {
    path: &'b [u8],
    /// `?` and the query, or empty.
    query: &'b [u8],
    /// The authority of an absolute-form target.
    authority: Option<&'b [u8]>,
}

fn split_target<'b>(target: &'b str, method: &str) -> Result<SplitTarget<'b>, RequestError> {
    let t = target.as_bytes();
    if t.first() == Some(&b'/') {
        let (path, query) = split_query(t);
        return Ok(SplitTarget {
            path,
            query,
            authority: None,
        });
    }
    if t == b"*" {
        if method == "OPTIONS" {
            return Ok(SplitTarget {
                path: t,
                query: b"",
                authority: None,
            });
        }
        return Err(RequestError::BadRequest(
            "asterisk-form target outside OPTIONS",
        ));
    }
    let rest = strip_prefix_ignore_case(t, b"http://")
        .or_else(|| strip_prefix_ignore_case(t, b"https://"));
    let Some(rest) = rest else {
        return Err(RequestError::BadRequest(
            "request target is not origin-form or absolute-form",
        ));
    };
    let authority_end = rest
        .iter()
        .position(|b| *b == b'/' || *b == b'?')
        .unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if authority.is_empty() || authority.contains(&b'@') || !valid_host_value(authority) {
        return Err(RequestError::BadRequest(
            "invalid authority in request target",
        ));
    }
    let (path, query) = split_query(&rest[authority_end..]);
    let path: &'b [u8] = if path.is_empty() { b"/" } else { path };
    Ok(SplitTarget {
        path,
        query,
        authority: Some(authority),
    })
}

fn split_query(t: &[u8]) -> (&[u8], &[u8]) {
    match t.iter().position(|b| *b == b'?') {
        Some(q) => (&t[..q], &t[q..]),
        None => (t, &t[t.len()..]),
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

/// `uri-host [ ":" port ]`: reg-name, IPv4 or a bracketed IP literal. Empty is allowed (RFC 9112
/// §3.2 permits an empty Host when the target has no authority).
fn valid_host_value(v: &[u8]) -> bool {
    v.len() <= 1024
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadRules = HeadRules {
        max_header_bytes: 8192,
        max_headers: 32,
        max_uri_bytes: 256,
        path: PathPolicy {
            merge_slashes: true,
            encoded_slash: super::super::target::EncodedSlash::Reject,
        },
    };

    /// (framing, keep-alive, host, path) of a parsed request.
    type Summary = (BodyFraming, bool, Option<String>, String);

    fn parse(raw: &str) -> Result<Option<Summary>, RequestError> {
        let mut headers = [const { MaybeUninit::uninit() }; 64];
        let mut normalized = Vec::new();
        parse_request(raw.as_bytes(), &mut headers, &LIMITS, &mut normalized).map(|r| {
            r.map(|h| {
                (
                    h.body,
                    h.keep_alive,
                    h.host.map(|h| String::from_utf8_lossy(h).into_owned()),
                    String::from_utf8_lossy(h.path).into_owned(),
                )
            })
        })
    }

    fn status(raw: &str) -> u16 {
        parse(raw).unwrap_err().status()
    }

    #[test]
    fn accepts_plain_requests() {
        let (body, ka, host, path) = parse("GET /a?b HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (body, ka, host.as_deref(), path.as_str()),
            (BodyFraming::None, true, Some("x"), "/a")
        );
        let (body, ka, ..) = parse("POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!((body, ka), (BodyFraming::Length(3), false));
        let (body, ..) = parse("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(body, BodyFraming::Chunked);
        let (_, _, host, path) =
            parse("GET http://Example.com:8080 HTTP/1.1\r\nHost: example.com:8080\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(
            (host.as_deref(), path.as_str()),
            (Some("Example.com:8080"), "/")
        );
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn refuses_framing_attacks() {
        assert_eq!(status("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"),
            501
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"),
            501
        );
        assert_eq!(
            status("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(status("GET / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET http://a/ HTTP/1.1\r\nHost: b\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(status("GET / HTTP/1.1\r\nHost : a\r\n\r\n"), 400);
        assert_eq!(
            status("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n"),
            400
        );
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n"), 400);
        assert_eq!(
            status("GET / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n"),
            417
        );
    }

    #[test]
    fn enforces_size_limits() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(300));
        assert_eq!(status(&long), 414);
        let many: String = (0..40).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")),
            431
        );
        assert_eq!(
            incomplete_head_error(&[b'a'; 400], &LIMITS),
            Some(RequestError::UriTooLong)
        );
        let big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(9000));
        assert_eq!(
            incomplete_head_error(big.as_bytes(), &LIMITS),
            Some(RequestError::HeadersTooLarge)
        );
    }
}
