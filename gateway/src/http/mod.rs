//! HTTP/1.1 codec, sans-IO: decoding of request and response heads with strict RFC 9112
//! framing, normalisation of request targets, the chunked body decoder, and encoding of the
//! heads the gateway sends.
//!
//! Bare-LF policy: httparse accepts a bare LF as a line end in the head; the gateway accepts it
//! there too but never forwards raw head bytes: every head it sends is rebuilt with CRLF, so no
//! peer can read a different message boundary than the gateway did. Inside chunked framing
//! (size lines, chunk ends, trailers) only CRLF is accepted.

pub mod chunked;
pub mod encode;
pub mod fields;
pub mod request;
pub mod response;
pub mod target;

/// RFC 9110 `tchar`: the bytes of a token (methods, field names, coding names).
pub fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The protocol version of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body at all.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}
