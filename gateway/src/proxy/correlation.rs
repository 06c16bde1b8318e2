//! Request ids and W3C trace context for one request: the `X-Request-Id` the gateway assigns
//! (a client's is kept only with `server.trust_request_id`), and the `traceparent` it sends
//! upstream (the client's trace continued with the gateway's own span id, or a new trace).
//! `tracestate` passes through untouched. The field lines are rendered once per request into
//! buffers the connection keeps, so nothing is allocated per request.

use crate::http::request::RequestHead;

/// Longest client request id kept (with `trust_request_id`); a longer one is replaced.
pub const MAX_CLIENT_REQUEST_ID_BYTES: usize = 128;

/// What one request is correlated by.
#[derive(Debug, Default)]
pub struct Correlation {
    /// The request id as sent on: ours (32 hex digits) or the trusted client's.
    request_id: Vec<u8>,
    /// `x-request-id` and `traceparent` lines for the upstream head.
    pub upstream_fields: Vec<u8>,
    /// The `x-request-id` line for the client's response.
    pub response_fields: Vec<u8>,
    /// The W3C trace id, 32 hex digits; `None` until a head was parsed.
    pub trace_id: Option<[u8; 32]>,
}

/// Longest `tracestate` passed on (W3C: at least 512 characters must be kept; a longer one may
/// be dropped whole).
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// A client request id is kept only if it is short, visible ASCII, and could not break a
/// field or a JSON log line.
fn acceptable_client_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= MAX_CLIENT_REQUEST_ID_BYTES
        && v.iter()
            .all(|b| (0x21..=0x7e).contains(b) && !matches!(b, b'"' | b'\\' | b','))
}

/// A valid `traceparent` (W3C Trace Context level 1): `VV-TRACEID-PARENTID-FLAGS`, lowercase
/// hex, trace and parent ids not all zero, version not `ff`. Returns (trace id, flags).
fn parse_traceparent(v: &[u8]) -> Option<([u8; 32], [u8; 2])> {
    let lower_hex = |s: &[u8]| {
        s.iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let (version, trace, parent, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    if !lower_hex(version)
        || version == b"ff"
        || !lower_hex(trace)
        || !lower_hex(parent)
        || !lower_hex(flags)
    {
        return None;
    }
    // Version 00 is exactly 55 bytes; later versions may append fields after a dash.
    if (version == b"00" && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    if trace.iter().all(|b| *b == b'0') || parent.iter().all(|b| *b == b'0') {
        return None;
    }
    Some((trace.try_into().ok()?, flags.try_into().ok()?))
}

impl Correlation {
    /// Sets the request's id and trace context from its head. `generated` is the gateway's
    /// id for it; `rng` draws new span and trace ids.
    pub fn begin(
        &mut self,
        req: &RequestHead,
        trust_client_id: bool,
        generated: super::context::RequestId,
        rng: &mut fastrand::Rng,
    ) {
        let mut client_id = None;
        let mut traceparent = None;
        let mut tracestate: Option<&[u8]> = None;
        let mut tracestate_fields = 0;
        for h in req.headers {
            if h.name.eq_ignore_ascii_case("x-request-id") {
                client_id = client_id.or(Some(h.value));
            } else if h.name.eq_ignore_ascii_case("tracestate") {
                tracestate_fields += 1;
                tracestate = Some(h.value);
            } else if h.name.eq_ignore_ascii_case("traceparent") {
                // Two traceparent fields are invalid: start a new trace.
                traceparent = match traceparent {
                    None => Some(Some(h.value)),
                    Some(_) => Some(None),
                };
            }
        }
        self.request_id.clear();
        match client_id.filter(|v| trust_client_id && acceptable_client_id(v)) {
            Some(v) => self.request_id.extend_from_slice(v),
            None => self.request_id.extend_from_slice(&generated.hex()),
        }
        let continued = traceparent.flatten().and_then(parse_traceparent);
        // Only the sampled bit is carried into a version-00 header: the other bits are
        // reserved there, whatever version the client spoke.
        let (trace_id, flags) = match continued {
            Some((id, flags)) => {
                let sampled = u8::from_str_radix(std::str::from_utf8(&flags).unwrap_or("00"), 16)
                    .unwrap_or(0)
                    & 1;
                (id, if sampled == 1 { *b"01" } else { *b"00" })
            }
            None => {
                let mut id = [0u8; 32];
                let _ = hex::encode_to_slice(rng.u128(1..).to_be_bytes(), &mut id);
                // A trace the gateway starts is marked sampled, so services behind it record it.
                (id, *b"01")
            }
        };
        self.trace_id = Some(trace_id);
        let mut span = [0u8; 16];
        let _ = hex::encode_to_slice(rng.u64(1..).to_be_bytes(), &mut span);

        self.write_response_fields();
        self.upstream_fields.clear();
        self.upstream_fields
            .extend_from_slice(&self.response_fields);
        self.upstream_fields.extend_from_slice(b"traceparent: 00-");
        self.upstream_fields.extend_from_slice(&trace_id);
        self.upstream_fields.push(b'-');
        self.upstream_fields.extend_from_slice(&span);
        self.upstream_fields.push(b'-');
        self.upstream_fields.extend_from_slice(&flags);
        self.upstream_fields.extend_from_slice(b"\r\n");
        // tracestate belongs to the trace it came with: passed on only when that trace goes on
        // (one field, within the length W3C asks to keep; the parser refused CR, LF and NUL).
        if let (Some(_), Some(state), 1) = (continued, tracestate, tracestate_fields) {
            if !state.is_empty() && state.len() <= MAX_TRACESTATE_BYTES {
                self.upstream_fields.extend_from_slice(b"tracestate: ");
                self.upstream_fields.extend_from_slice(state);
                self.upstream_fields.extend_from_slice(b"\r\n");
            }
        }
    }

    /// Gives a request whose head could not be parsed the gateway's id (no trace context).
    pub fn assign(&mut self, generated: super::context::RequestId) {
        self.clear();
        self.request_id.extend_from_slice(&generated.hex());
        self.write_response_fields();
    }

    /// The client's field lines: the request id.
    fn write_response_fields(&mut self) {
        self.response_fields.clear();
        self.response_fields.extend_from_slice(b"x-request-id: ");
        self.response_fields.extend_from_slice(&self.request_id);
        self.response_fields.extend_from_slice(b"\r\n");
    }

    /// The request id as sent on (visible ASCII).
    pub fn request_id(&self) -> &[u8] {
        &self.request_id
    }

    /// Forgets the previous request's fields (their buffers are kept).
    pub fn clear(&mut self) {
        self.request_id.clear();
        self.upstream_fields.clear();
        self.response_fields.clear();
        self.trace_id = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_rules() {
        let ok = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(ok).map(|(t, f)| (t.to_vec(), f)),
            Some((b"4bf92f3577b34da6a3ce929d0e0e4736".to_vec(), *b"01"))
        );
        for bad in [
            &b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"[..],
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"",
        ] {
            assert!(
                parse_traceparent(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A later version may carry more fields.
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
    }

    #[test]
    fn client_ids_that_could_break_a_field_or_a_log_are_replaced() {
        assert!(acceptable_client_id(b"req-123_abc.DEF:9"));
        assert!(!acceptable_client_id(b""));
        assert!(!acceptable_client_id(b"has space"));
        assert!(!acceptable_client_id(b"quote\"d"));
        assert!(!acceptable_client_id(&[b'a'; 129]));
    }
}
