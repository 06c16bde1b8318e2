//! Encoding of the heads the gateway sends: responses rebuilt for the client, the gateway's own
//! answers, and the one checked field writer every head goes through (the upstream request head
//! is assembled from it in `proxy::upstream_head`). Every head is written fresh with CRLF line
//! ends; raw head bytes are never forwarded. Nothing here knows of routes or auth.

use std::io::Write;

use super::{
    fields::{is_hop_by_hop, FieldFate},
    response::ResponseHead,
    BodyFraming, Version,
};

/// The Via entry the gateway adds (RFC 9110 §7.6.3).
pub const VIA: &str = "1.1 portcullis";

/// A field value that would break the head it is written into (CR, LF or NUL): the head is
/// not sent. Names the field, never the value, which may be a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused to write field `{field}`: its value holds CR, LF or NUL")]
pub struct UnsafeFieldValue {
    pub field: String,
}

/// How the response is framed toward the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientFraming {
    /// The body is sent with chunked framing (passed through from the upstream).
    pub chunked: bool,
    /// The gateway keeps the client connection open afterwards.
    pub keep_alive: bool,
    /// The client speaks HTTP/1.0 (it needs an explicit keep-alive).
    pub client_version: Version,
}

/// Fields the gateway sets on every response itself; an upstream's copy is dropped.
const RESPONSE_OWNED: [&str; 1] = ["x-request-id"];

/// Writes the response head for the client from an upstream response head, with `extra` (the
/// gateway's own field lines, each ending in CRLF, already checked) before its end; refuses
/// (leaving `out` incomplete) a value with CR, LF or NUL. `fate` says what becomes of each
/// field the upstream sent that the gateway does not own (header rules).
pub fn write_client_response<'f>(
    out: &mut Vec<u8>,
    resp: &ResponseHead,
    framing: ClientFraming,
    extra: &[u8],
    fate: &dyn Fn(&str) -> FieldFate<'f>,
) -> Result<(), UnsafeFieldValue> {
    let upgrade = resp.status == 101;
    // The gateway's own Strict-Transport-Security replaces an upstream's.
    let own_hsts = memchr::memmem::find(extra, b"strict-transport-security:").is_some();
    write_status_and_fields(
        out,
        resp,
        |name| {
            if upgrade && name.eq_ignore_ascii_case("upgrade") {
                return Some(true);
            }
            (own_hsts && name.eq_ignore_ascii_case("strict-transport-security")).then_some(false)
        },
        fate,
    )?;
    match resp.body {
        BodyFraming::Length(n) => {
            write_content_length(out, n);
        }
        // A HEAD or 304 response keeps the length the full response would have had (already
        // validated as digits by the decoder); 1xx and 204 may not carry one.
        BodyFraming::None if resp.status >= 200 && resp.status != 204 => {
            if let Some(h) = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            {
                write_field(out, "content-length", h.value)?;
            }
        }
        _ => {}
    }
    if upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if resp.is_interim() {
        // Interim responses carry no connection options of their own.
    } else if framing.chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !upgrade && !resp.is_interim() {
        write_connection(out, framing.keep_alive, framing.client_version);
    }
    out.extend_from_slice(extra);
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// Writes the head a cache keeps of `resp`: its status line and the fields a client would get
/// (hop-by-hop, connection-nominated and per-request fields dropped, one Via with the
/// gateway's entry), without framing or `Age` (written when it is served), and without
/// `Set-Cookie` when `drop_set_cookie`.
pub fn write_storable_head(
    out: &mut Vec<u8>,
    resp: &ResponseHead,
    drop_set_cookie: bool,
) -> Result<(), UnsafeFieldValue> {
    write_status_and_fields(
        out,
        resp,
        |name| {
            let dropped = name.eq_ignore_ascii_case("age")
                || (drop_set_cookie && name.eq_ignore_ascii_case("set-cookie"));
            dropped.then_some(false)
        },
        &|_| FieldFate::Keep,
    )
}

/// The status line and the fields of `resp` a client may get: hop-by-hop, connection-nominated
/// and per-request fields dropped, every Via merged into one with the gateway's entry.
/// `decide` overrides for a field name: `Some(true)` keeps it, `Some(false)` drops it.
fn write_status_and_fields<'f>(
    out: &mut Vec<u8>,
    resp: &ResponseHead,
    decide: impl Fn(&str) -> Option<bool>,
    fate: &dyn Fn(&str) -> FieldFate<'f>,
) -> Result<(), UnsafeFieldValue> {
    // Status and length lines are written on every response: digits through `itoa`, bytes
    // appended directly, with no trip through the `fmt` machinery.
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(resp.status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut via_written = false;
    for h in resp.headers {
        let name = h.name;
        match decide(name) {
            Some(true) => {
                write_field(out, name, h.value)?;
                continue;
            }
            Some(false) => continue,
            None => {}
        }
        if name.eq_ignore_ascii_case("via") {
            if !via_written {
                via_written = true;
                write_via(out, resp.headers)?;
            }
            continue;
        }
        if is_hop_by_hop(name)
            || resp.connection.nominates(name)
            || RESPONSE_OWNED.iter().any(|o| name.eq_ignore_ascii_case(o))
        {
            continue;
        }
        match fate(name) {
            FieldFate::Keep => write_field(out, name, h.value)?,
            FieldFate::Rename(to) => write_field(out, to, h.value)?,
            FieldFate::Drop => {}
        }
    }
    if !via_written {
        write_own_via(out);
    }
    Ok(())
}

/// Ends a head of the gateway's own: the connection option, `extra` field lines, the blank line.
fn end_head(out: &mut Vec<u8>, keep_alive: bool, client_version: Version, extra: &[u8]) {
    write_connection(out, keep_alive, client_version);
    out.extend_from_slice(extra);
    out.extend_from_slice(b"\r\n");
}

fn write_connection(out: &mut Vec<u8>, keep_alive: bool, client_version: Version) {
    match (keep_alive, client_version) {
        (false, _) => out.extend_from_slice(b"connection: close\r\n"),
        (true, Version::Http10) => out.extend_from_slice(b"connection: keep-alive\r\n"),
        (true, Version::Http11) => {}
    }
}

/// Writes one `Via` field: every copy in `headers`, in order, then the gateway's own entry
/// (RFC 9110 §7.6.3).
pub fn write_via(out: &mut Vec<u8>, headers: &[httparse::Header]) -> Result<(), UnsafeFieldValue> {
    out.extend_from_slice(b"via: ");
    for x in headers
        .iter()
        .filter(|x| x.name.eq_ignore_ascii_case("via"))
    {
        out.extend_from_slice(checked("via", x.value)?);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(VIA.as_bytes());
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// `value`, unless it holds CR, LF or NUL (which would end the field or the head early).
pub fn checked<'v>(field: &str, value: &'v [u8]) -> Result<&'v [u8], UnsafeFieldValue> {
    match memchr::memchr3(b'\r', b'\n', 0, value) {
        None => Ok(value),
        Some(_) => Err(UnsafeFieldValue {
            field: field.to_owned(),
        }),
    }
}

/// Writes `content-length: n`.
pub fn write_content_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes `ip` as text. X-Forwarded-For carries the peer's address on every forwarded request,
/// so an IPv4 address's octets go through `itoa` rather than the formatter; IPv6 keeps its
/// `Display` (RFC 5952 compression).
pub fn write_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(digits.format(octet).as_bytes());
            }
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Writes a Via field holding only the gateway's own entry.
pub fn write_own_via(out: &mut Vec<u8>) {
    out.extend_from_slice(b"via: ");
    out.extend_from_slice(VIA.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes one field; the only way a value enters a head the gateway builds, so no source of
/// values can split a head.
pub fn write_field(out: &mut Vec<u8>, name: &str, value: &[u8]) -> Result<(), UnsafeFieldValue> {
    let value = checked(name, value)?;
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// The body of one of the gateway's own answers: a line of text, or a JSON document rendered
/// by the caller.
#[derive(Debug, Clone, Copy)]
pub enum Explanation<'a> {
    Text(&'a str),
    Json(&'a [u8]),
}

impl Explanation<'_> {
    /// `content-type` and `content-length` lines.
    fn write_fields(&self, out: &mut Vec<u8>) {
        match self {
            Explanation::Text(t) => {
                let _ = write!(
                    out,
                    "content-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
                    t.len() + 1
                );
            }
            Explanation::Json(j) => {
                let _ = write!(
                    out,
                    "content-type: application/json\r\ncontent-length: {}\r\n",
                    j.len()
                );
            }
        }
    }

    fn write_body(&self, out: &mut Vec<u8>) {
        match self {
            Explanation::Text(t) => {
                out.extend_from_slice(t.as_bytes());
                out.push(b'\n');
            }
            Explanation::Json(j) => out.extend_from_slice(j),
        }
    }
}

/// Writes one of the gateway's own answers, with a body naming the problem.
pub fn write_error(
    out: &mut Vec<u8>,
    status: u16,
    body: Explanation,
    keep_alive: bool,
    head_only: bool,
    extra: &[u8],
) {
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason(status));
    body.write_fields(out);
    end_head(out, keep_alive, Version::Http11, extra);
    if !head_only {
        body.write_body(out);
    }
}

/// Writes a 204 without a body (an allowed CORS preflight; its fields are in `extra`).
pub fn write_no_content(out: &mut Vec<u8>, keep_alive: bool, extra: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 204 No Content\r\n");
    end_head(out, keep_alive, Version::Http11, extra);
}

/// Writes one of the gateway's own answers with a JSON body (already rendered).
pub fn write_json(
    out: &mut Vec<u8>,
    status: u16,
    body: &str,
    keep_alive: bool,
    head_only: bool,
    extra: &[u8],
) {
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        reason(status),
        body.len()
    );
    end_head(out, keep_alive, Version::Http11, extra);
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
}

/// Writes a 429 with Retry-After and, for `limit`, the RateLimit-Policy and RateLimit fields
/// of the IETF httpapi rate-limit headers draft.
/// `policy` is (name, quota, window in seconds).
pub fn write_rate_limited(
    out: &mut Vec<u8>,
    retry_after_secs: u64,
    policy: Option<(&str, u64, u64)>,
    body: Explanation,
    keep_alive: bool,
    head_only: bool,
    extra: &[u8],
) {
    out.extend_from_slice(b"HTTP/1.1 429 Too Many Requests\r\n");
    body.write_fields(out);
    let _ = write!(out, "retry-after: {retry_after_secs}\r\n");
    if let Some((name, quota, window)) = policy {
        let _ = write!(out, "ratelimit-policy: \"{name}\";q={quota};w={window}\r\nratelimit: \"{name}\";r=0;t={retry_after_secs}\r\n");
    }
    end_head(out, keep_alive, Version::Http11, extra);
    if !head_only {
        body.write_body(out);
    }
}

/// Writes a refusal by an access policy: `status` (401 or 403), with `WWW-Authenticate` when
/// given (its value).
pub fn write_denied(
    out: &mut Vec<u8>,
    status: u16,
    www_authenticate: Option<&str>,
    body: Explanation,
    keep_alive: bool,
    head_only: bool,
    extra: &[u8],
) {
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason(status));
    body.write_fields(out);
    if let Some(challenge) = www_authenticate {
        let _ = write!(out, "www-authenticate: {challenge}\r\n");
    }
    end_head(out, keep_alive, Version::Http11, extra);
    if !head_only {
        body.write_body(out);
    }
}

/// Writes a 308 to `location` (already checked: it is built from a parsed target and host).
pub fn write_redirect(
    out: &mut Vec<u8>,
    location: &[u8],
    keep_alive: bool,
    head_only: bool,
    extra: &[u8],
) {
    let detail = "moved to https";
    let _ = write!(
        out,
        "HTTP/1.1 308 Permanent Redirect\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nlocation: ",
        detail.len() + 1
    );
    out.extend_from_slice(location);
    out.extend_from_slice(b"\r\n");
    end_head(out, keep_alive, Version::Http11, extra);
    if !head_only {
        out.extend_from_slice(detail.as_bytes());
        out.push(b'\n');
    }
}

/// Writes a route's fixed response.
pub fn write_static(
    out: &mut Vec<u8>,
    r: &StaticResponse,
    keep_alive: bool,
    client_version: Version,
    head_only: bool,
    extra: &[u8],
) {
    out.extend_from_slice(&r.head);
    let _ = write!(out, "content-length: {}\r\n", r.body.len());
    end_head(out, keep_alive, client_version, extra);
    if !head_only {
        out.extend_from_slice(&r.body);
    }
}

/// A fixed response, encoded once: the head without framing fields, and the body.
#[derive(Debug)]
pub struct StaticResponse {
    pub status: u16,
    /// `HTTP/1.1 NNN Reason\r\n` plus the given fields, each ending in CRLF.
    pub head: Vec<u8>,
    pub body: Vec<u8>,
}

/// Encodes a fixed response from its status, fields and body; fields with CR, LF or NUL are
/// refused (naming the first).
pub fn static_response<'f>(
    status: u16,
    fields: impl IntoIterator<Item = (&'f str, &'f str)> + Clone,
    body: &[u8],
) -> Result<StaticResponse, UnsafeFieldValue> {
    let mut head = Vec::new();
    let _ = write!(head, "HTTP/1.1 {status} {}\r\n", reason(status));
    if !fields
        .clone()
        .into_iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        head.extend_from_slice(b"content-type: text/plain\r\n");
    }
    for (name, value) in fields {
        write_field(&mut head, name, value.as_bytes())?;
    }
    Ok(StaticResponse {
        status,
        head,
        body: body.to_vec(),
    })
}

/// `HTTP/1.1 100 Continue`, sent before reading a body the client is holding back.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The reason phrase for a status code (the `http` crate's IANA registry table).
pub fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown")
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::write_ip;

    #[test]
    fn addresses_are_written_as_their_display() {
        for text in [
            "0.0.0.0",
            "127.0.0.1",
            "198.51.100.7",
            "255.255.255.255",
            "10.200.3.40",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:203.0.113.9",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            let mut out = b"x: ".to_vec();
            write_ip(&mut out, ip);
            assert_eq!(out, format!("x: {ip}").as_bytes(), "{text}");
        }
    }
}
