//! Cache keys. The primary key names the resource: `scheme://host/path?query` (the host as
//! routes match it, lower case, without port; the path normalised; the query as sent, or its
//! parameters sorted when the route says so), then one line per configured extra part
//! (`header:NAME=VALUE`, `consumer:ID`). GET and HEAD share it. A response's `Vary` names
//! request fields that select among variants of one resource: the entry key is the primary
//! key, a NUL, and each varying field's value (`Accept-Encoding` normalised), so requests
//! that differ in them never share an answer. Nothing else of a request reaches the answer:
//! fields a poisoner could vary unkeyed (`X-Forwarded-Host` and its kin) are dropped before
//! the upstream sees them.

use httparse::Header;

/// Request fields never sent upstream on a cached route: each can change what an upstream
/// answers (links, redirects) without being part of the key.
pub const UNKEYED_FIELDS: [&str; 12] = [
    "forwarded",
    "x-forwarded-prefix",
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
    "x-forwarded-host",
    "x-forwarded-server",
    "x-forwarded-port",
    "x-forwarded-scheme",
    "x-original-url",
    "x-rewrite-url",
    "x-host",
];

/// Writes the primary key of a request to `out` (cleared first).
#[allow(clippy::too_many_arguments)]
pub fn primary(
    out: &mut Vec<u8>,
    https: bool,
    host: &[u8],
    path: &[u8],
    query: &[u8],
    sort_query: bool,
    key_headers: &[String],
    headers: &[Header],
    consumer: Option<&str>,
) {
    out.clear();
    out.extend_from_slice(if https { b"https://" } else { b"http://" });
    // The Host as forwarded, port included (case does not matter).
    out.extend(host.iter().map(u8::to_ascii_lowercase));
    out.extend_from_slice(path);
    if sort_query && query.len() > 1 {
        let mut params: Vec<&[u8]> = query[1..].split(|b| *b == b'&').collect();
        // By name only, stable: repeated parameters keep their order (`a=1&a=2` differs from
        // `a=2&a=1` for an upstream that takes the first).
        params.sort_by_key(|p| p.split(|c| *c == b'=').next().unwrap_or_default());
        out.push(b'?');
        for (i, p) in params.iter().enumerate() {
            if i > 0 {
                out.push(b'&');
            }
            out.extend_from_slice(p);
        }
    } else {
        out.extend_from_slice(query);
    }
    for name in key_headers {
        out.extend_from_slice(b"\nheader:");
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        write_field_values(out, headers, name);
    }
    if let Some(c) = consumer {
        out.extend_from_slice(b"\nconsumer:");
        out.extend_from_slice(c.as_bytes());
    }
}

/// Appends to `primary` (in `out`) the variant part for `vary` (lower-case field names).
pub fn variant(out: &mut Vec<u8>, vary: &[Box<str>], headers: &[Header]) {
    if vary.is_empty() {
        return;
    }
    out.push(0);
    for name in vary {
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        if &**name == "accept-encoding" {
            write_accept_encoding(out, headers);
        } else {
            write_field_values(out, headers, name);
        }
        out.push(b'\n');
    }
}

/// Every value of field `name`, trimmed, comma-joined.
fn write_field_values(out: &mut Vec<u8>, headers: &[Header], name: &str) {
    let mut first = true;
    for h in headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)) {
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(h.value.trim_ascii());
    }
}

/// Accept-Encoding as the codings it accepts (q above 0), lower case, sorted: `gzip, br` and
/// `br;q=1.0,GZIP` are one variant.
fn write_accept_encoding(out: &mut Vec<u8>, headers: &[Header]) {
    let mut codings: Vec<Vec<u8>> = Vec::new();
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("accept-encoding"))
    {
        for item in h.value.split(|b| *b == b',') {
            let mut parts = item.split(|b| *b == b';');
            let coding = parts.next().unwrap_or_default().trim_ascii();
            if coding.is_empty() {
                continue;
            }
            let refused = parts.any(|p| {
                let p = p.trim_ascii();
                p.len() >= 2
                    && p[..2].eq_ignore_ascii_case(b"q=")
                    && std::str::from_utf8(&p[2..])
                        .ok()
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
            });
            if !refused {
                let mut c = coding.to_ascii_lowercase();
                if c == b"x-gzip" {
                    c = b"gzip".to_vec();
                }
                codings.push(c);
            }
        }
    }
    codings.sort();
    codings.dedup();
    for (i, c) in codings.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(c);
    }
}

/// The field names a response varies on (lower case, sorted, without duplicates); `None` for
/// `Vary: *`, which no request can match. A response with a Content-Encoding varies on
/// Accept-Encoding even when it does not say so: a compressed body must never reach a client
/// that did not accept it.
pub fn vary_names(headers: &[Header]) -> Option<Vec<Box<str>>> {
    let mut names: Vec<Box<str>> = Vec::new();
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("vary"))
    {
        for name in h.value.split(|b| *b == b',') {
            let name = name.trim_ascii();
            if name == b"*" {
                return None;
            }
            if !name.is_empty() {
                names.push(String::from_utf8_lossy(name).to_ascii_lowercase().into());
            }
        }
    }
    let encoded = headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("content-encoding")
            && !h.value.trim_ascii().eq_ignore_ascii_case(b"identity")
    });
    if encoded {
        names.push("accept-encoding".into());
    }
    names.sort();
    names.dedup();
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cache::test_field as h;

    #[test]
    fn primary_keys_name_the_resource_and_the_configured_parts() {
        let mut out = Vec::new();
        primary(
            &mut out,
            true,
            b"API.example:8443",
            b"/a",
            b"?b=2&a=1",
            true,
            &[],
            &[],
            None,
        );
        assert_eq!(out, b"https://api.example:8443/a?a=1&b=2");
        primary(
            &mut out,
            true,
            b"h",
            b"/",
            b"?a=2&b=1&a=1",
            true,
            &[],
            &[],
            None,
        );
        assert_eq!(
            out, b"https://h/?a=2&a=1&b=1",
            "repeated names keep their order"
        );
        primary(
            &mut out,
            false,
            b"h",
            b"/a",
            b"?b=2&a=1",
            false,
            &["x-tenant".into()],
            &[h("X-Tenant", " acme ")],
            Some("alice"),
        );
        assert_eq!(
            out,
            b"http://h/a?b=2&a=1\nheader:x-tenant=acme\nconsumer:alice"
        );
    }

    #[test]
    fn variants_normalise_accept_encoding() {
        let vary: Vec<Box<str>> = vec!["accept-encoding".into()];
        let key = |ae: &str| {
            let mut out = b"k".to_vec();
            variant(&mut out, &vary, &[h("Accept-Encoding", ae)]);
            out
        };
        assert_eq!(key("gzip, br"), key("br;q=1.0,GZIP"));
        assert_eq!(key("gzip, br;q=0"), key("gzip"));
        assert_ne!(key("gzip"), key("identity"));
    }

    #[test]
    fn vary_star_and_encoded_bodies() {
        assert_eq!(vary_names(&[h("Vary", "Accept, *")]), None);
        assert_eq!(
            vary_names(&[h("Vary", "Accept"), h("Content-Encoding", "gzip")]).unwrap(),
            vec![Box::from("accept"), Box::from("accept-encoding")]
        );
        assert!(vary_names(&[]).unwrap().is_empty());
    }
}
