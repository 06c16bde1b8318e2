//! The request head sent upstream: rebuilt from the client's, with the route's path rewrite,
//! hop-by-hop and gateway-owned fields removed, identity fields and X-Forwarded-* set. Every
//! value goes through the codec's checked field writer.

use std::net::IpAddr;

use crate::{
    auth::CredentialSource,
    config::AuthConfig,
    http::{
        encode::{
            checked, write_content_length, write_field, write_ip, write_own_via, write_via,
            UnsafeFieldValue,
        },
        fields::{is_hop_by_hop, same_cgi_name, FieldFate},
        request::RequestHead,
        BodyFraming,
    },
    routing::Route,
};

/// Fields the gateway sets itself on forwarded requests; client copies are merged or dropped.
/// The identity fields are always dropped, so a client cannot claim to be a consumer.
const REQUEST_REPLACED: [&str; 9] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "via",
    "expect",
    "x-consumer-id",
    "x-consumer-groups",
    "x-request-id",
    "traceparent",
    "tracestate",
];

/// Whether the gateway writes request field `name` (lower case) itself on every forwarded
/// request, whatever the client sent: forwarding, identity and correlation fields.
pub fn written_by_gateway(name: &str) -> bool {
    REQUEST_REPLACED.contains(&name) || name.starts_with("x-consumer-")
}

/// Whether the gateway sets or replaces request field `name` (lower case) itself, so what the
/// upstream saw is not what the client sent: a response may not vary on it in the cache.
pub fn gateway_owned_field(
    name: &str,
    claim_headers: &[String],
    identity_headers: &[String],
) -> bool {
    written_by_gateway(name)
        || claim_headers
            .iter()
            .chain(identity_headers)
            .any(|h| h == name)
        || crate::cache::key::UNKEYED_FIELDS.contains(&name)
}

/// Who called, as the authenticate phase established it, and which credential to strip.
#[derive(Debug, Default, Clone, Copy)]
pub struct Identity<'a> {
    /// The consumer id and its groups (comma-separated), when the caller authenticated.
    pub consumer: Option<(&'a str, &'a str)>,
    /// Claims passed upstream as headers.
    pub claim_headers: &'a [(String, String)],
    /// Further field names (lower case) whose client copies are dropped: the claim headers.
    pub replaced: &'a [String],
    pub strip: Option<CredentialSource>,
    /// Client-certificate identity headers (lower case): client copies are always dropped.
    pub identity_headers: &'a [String],
    /// The verified client certificate's subject, and the header that carries it.
    pub client_cert: Option<(&'a str, &'a str)>,
    /// On a vault route: the provider's credential, which replaces every client credential.
    pub provider: Option<ProviderAuth<'a>>,
    /// The length of the body the gateway sends instead of the client's (a vault route's with
    /// `stream_options.include_usage` added, or one rewritten by JSON rules), when it does.
    pub replaced_body_length: Option<usize>,
}

/// Why no upstream head could be written.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamHeadError {
    /// A bug upstream of the encoder, never the client's doing: a value with CR, LF or NUL.
    #[error(transparent)]
    Field(#[from] UnsafeFieldValue),
    /// The route's rewrite made a path with a dot-segment, or a value that is not a plain
    /// segment, out of what the client sent.
    #[error(transparent)]
    Path(#[from] crate::routing::UnsafeRewrite),
}

/// A provider key as it goes upstream. Its `Debug` never shows the key.
#[derive(Clone, Copy)]
pub struct ProviderAuth<'a> {
    /// The field (lower case) and the text before the key (`Bearer `).
    pub header: &'static str,
    pub prefix: &'static str,
    pub secret: &'a str,
    /// Sent as `anthropic-version` when the client sent none (Anthropic).
    pub anthropic_version: Option<&'a str>,
}

impl std::fmt::Debug for ProviderAuth<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderAuth")
            .field("header", &self.header)
            .field("anthropic_version", &self.anthropic_version)
            .finish_non_exhaustive()
    }
}

/// The Host sent upstream: `value` when the client sent none, or always when `fixed` (the
/// upstream's `host` policy names the server or a literal).
#[derive(Debug, Clone, Copy)]
pub struct UpstreamHost<'a> {
    pub value: &'a str,
    pub fixed: bool,
}

/// Writes the request to send upstream for `req`, matched by `route`.
///
/// `peer` is appended to X-Forwarded-For; `proto` becomes X-Forwarded-Proto; `host` is used
/// when the client sent no Host (HTTP/1.0, since the upstream request is HTTP/1.1) or when the
/// upstream's policy fixes it;
/// `correlation` holds the request id and trace context field lines.
/// The route's request field rules are applied to the client's fields (never to the ones the
/// gateway owns), and its query rules to the query; `render` is what their templates see.
/// Every value is checked for CR, LF and NUL whatever its source; on such a value the head
/// in `out` is incomplete and must not be sent, except for a rule's rendered value, which is
/// dropped (and counted in the returned number) instead.
#[allow(clippy::too_many_arguments)]
pub fn write_upstream_request(
    out: &mut Vec<u8>,
    req: &RequestHead,
    route: &Route,
    identity: &Identity,
    auth: &AuthConfig,
    peer: IpAddr,
    proto: &str,
    host: UpstreamHost,
    correlation: &[u8],
    render: &crate::transform::template::RenderContext,
) -> Result<u64, UpstreamHeadError> {
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    // `OPTIONS *` (asterisk-form) names the server, not a resource: no path or query to edit.
    let asterisk = req.path == b"*";
    if asterisk {
        out.push(b'*');
    } else {
        route.write_path(req.path, render, out)?;
    }
    let strip_query = match (identity.strip, auth.api_key_query.as_deref()) {
        (Some(CredentialSource::Query), Some(name)) => Some(name),
        _ => None,
    };
    match strip_query {
        _ if asterisk => out.extend_from_slice(req.query),
        _ if !route.query.is_empty() => route.query.write(out, req.query, strip_query, render),
        Some(name) => write_query_without(out, req.query, name),
        None => out.extend_from_slice(req.query),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");

    // The client's fields the gateway never forwards (the rules see the others).
    let dropped_by_gateway = |name: &str| {
        if is_hop_by_hop(name)
            || req.connection.nominates(name)
            || REQUEST_REPLACED.iter().any(|r| same_cgi_name(name, r))
        {
            return true;
        }
        // On a cached route, what could change the answer without being in the key.
        if route.cache.is_some()
            && crate::cache::key::UNKEYED_FIELDS
                .iter()
                .any(|u| same_cgi_name(name, u))
        {
            return true;
        }
        // Identity fields the gateway writes: never a client's copy, in any spelling, also
        // the header a connection's certificate was given before a reload renamed it.
        if identity.provider.is_some()
            && crate::vault::provider::CREDENTIAL_HEADERS
                .iter()
                .any(|c| same_cgi_name(name, c))
        {
            return true;
        }
        if identity
            .replaced
            .iter()
            .chain(identity.identity_headers)
            .any(|r| same_cgi_name(name, r))
            || identity
                .client_cert
                .is_some_and(|(header, _)| same_cgi_name(name, header))
        {
            return true;
        }
        match identity.strip {
            Some(CredentialSource::Header) => name.eq_ignore_ascii_case(&auth.api_key_header),
            Some(CredentialSource::Bearer) => name.eq_ignore_ascii_case("authorization"),
            _ => false,
        }
    };
    let mut forwarded_for_written = false;
    let mut via_written = false;
    let mut host_written = false;
    for h in req.headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            // An absolute-form target's authority wins (RFC 9112 §3.2.2); they were checked equal.
            if !host_written {
                host_written = true;
                let value = match host.fixed {
                    true => host.value.as_bytes(),
                    false => req.host.unwrap_or(h.value),
                };
                write_field(out, "host", value)?;
            }
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            // Merge every client copy into one field, then append the peer, as nginx's
            // $proxy_add_x_forwarded_for does.
            if !forwarded_for_written {
                forwarded_for_written = true;
                out.extend_from_slice(b"x-forwarded-for: ");
                let mut first = true;
                for x in req
                    .headers
                    .iter()
                    .filter(|x| x.name.eq_ignore_ascii_case("x-forwarded-for"))
                {
                    if !first {
                        out.extend_from_slice(b", ");
                    }
                    first = false;
                    out.extend_from_slice(checked("x-forwarded-for", x.value)?);
                }
                out.extend_from_slice(b", ");
                write_ip(out, peer);
                out.extend_from_slice(b"\r\n");
            }
            continue;
        }
        if name.eq_ignore_ascii_case("via") {
            if !via_written {
                via_written = true;
                write_via(out, req.headers)?;
            }
            continue;
        }
        if dropped_by_gateway(name) {
            continue;
        }
        match route.request_headers.fate(name) {
            FieldFate::Keep => write_field(out, name, h.value)?,
            FieldFate::Rename(to) => write_field(out, to, h.value)?,
            FieldFate::Drop => {}
        }
    }
    let dropped = route.request_headers.write_added(
        req.headers
            .iter()
            .map(|h| h.name)
            .filter(|n| !dropped_by_gateway(n)),
        render,
        out,
    );
    if !host_written {
        let value = match host.fixed {
            true => host.value.as_bytes(),
            false => req.host.unwrap_or(host.value.as_bytes()),
        };
        write_field(out, "host", value)?;
    }
    if !forwarded_for_written {
        out.extend_from_slice(b"x-forwarded-for: ");
        write_ip(out, peer);
        out.extend_from_slice(b"\r\n");
    }
    if !via_written {
        write_own_via(out);
    }
    write_field(out, "x-forwarded-proto", proto.as_bytes())?;
    if let Some((id, groups)) = identity.consumer {
        write_field(out, "x-consumer-id", id.as_bytes())?;
        write_field(out, "x-consumer-groups", groups.as_bytes())?;
    }
    for (name, value) in identity.claim_headers {
        write_field(out, name, value.as_bytes())?;
    }
    if let Some((name, subject)) = identity.client_cert {
        write_field(out, name, subject.as_bytes())?;
    }
    if let Some(p) = identity.provider {
        out.extend_from_slice(b"accept-encoding: identity\r\n");
        let secret = checked(p.header, p.secret.as_bytes())?;
        out.extend_from_slice(p.header.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(p.prefix.as_bytes());
        out.extend_from_slice(secret);
        out.extend_from_slice(b"\r\n");
        if let Some(version) = p.anthropic_version {
            if !req
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("anthropic-version"))
            {
                write_field(out, "anthropic-version", version.as_bytes())?;
            }
        }
    }
    match (req.body, identity.replaced_body_length) {
        (BodyFraming::Length(n), replaced) => {
            write_content_length(out, replaced.map_or(n, |r| r as u64))
        }
        (BodyFraming::Chunked, _) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        (BodyFraming::None | BodyFraming::UntilClose, _) => {}
    }
    if let Some(upgrade) = req.upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
        write_field(out, "upgrade", upgrade)?;
    }
    // X-Request-Id and traceparent, rendered by the gateway from checked values.
    out.extend_from_slice(correlation);
    out.extend_from_slice(b"\r\n");
    Ok(dropped)
}

/// Writes `query` (`?a=1&b=2`, or empty) without parameter `name`.
pub(crate) fn write_query_without(out: &mut Vec<u8>, query: &[u8], name: &str) {
    let Some(pairs) = query.strip_prefix(b"?") else {
        return;
    };
    let mut first = true;
    for pair in pairs.split(|b| *b == b'&') {
        let key = pair.split(|b| *b == b'=').next().unwrap_or(pair);
        if key == name.as_bytes() {
            continue;
        }
        out.push(if first { b'?' } else { b'&' });
        first = false;
        out.extend_from_slice(pair);
    }
}
