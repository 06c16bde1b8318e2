//! Decoding of upstream response heads. Any framing the gateway cannot be sure of is an
//! upstream error (502) and the upstream connection is closed, never reused.

use std::mem::MaybeUninit;

use httparse::Header;

use super::{
    fields::{classify_transfer_encoding, ConnectionOptions, ContentLengthFields, TransferCoding},
    BodyFraming, Version,
};

/// Largest response head accepted from an upstream.
pub const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields accepted in an upstream response.
pub const MAX_RESPONSE_HEADERS: usize = 128;

/// Why an upstream response head was refused (answered 502 downstream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseError {
    Malformed(&'static str),
    TooLarge,
}

impl std::fmt::Display for ResponseError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            ResponseError::Malformed(why) => f.write_str(why),
            ResponseError::TooLarge => f.write_str("response head too large"),
        }
    }
}

#[derive(Debug)]
pub struct ResponseHead<'b, 'h> {
    pub status: u16,
    pub reason: &'b str,
    pub version: Version,
    pub headers: &'h [Header<'b>],
    pub head_len: usize,
    pub body: BodyFraming,
    pub connection: ConnectionOptions<'b>,
    /// The upstream allows this connection to carry another request.
    pub keep_alive: bool,
}

impl ResponseHead<'_, '_> {
    /// 1xx other than 101: informational, a final response follows.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// Decodes a response head. `request_is_head` tells whether the request was HEAD, which has no
/// response body whatever the fields say.
pub fn parse_response<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut [MaybeUninit<Header<'b>>],
    request_is_head: bool,
) -> Result<Option<ResponseHead<'b, 'h>>, ResponseError> {
    let mut resp = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, headers)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_RESPONSE_HEAD_BYTES {
                Err(ResponseError::TooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooLarge),
        Err(_) => return Err(ResponseError::Malformed("malformed response head")),
    };
    let httparse::Response {
        version,
        code,
        reason,
        headers,
    } = resp;
    let (version, status) = match (version, code) {
        (Some(0), Some(c)) => (Version::Http10, c),
        (Some(1), Some(c)) => (Version::Http11, c),
        _ => return Err(ResponseError::Malformed("malformed status line")),
    };
    if !(100..=599).contains(&status) {
        return Err(ResponseError::Malformed("status code out of range"));
    }
    let headers: &'h [Header<'b>] = headers;
    let mut content_length = ContentLengthFields::default();
    let mut has_content_length = false;
    let mut has_transfer_encoding = false;
    let mut connection = ConnectionOptions::default();
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            has_content_length = true;
            content_length
                .add(h.value)
                .map_err(|_| ResponseError::Malformed("invalid or conflicting Content-Length"))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            has_transfer_encoding = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            connection
                .add(h.value)
                .map_err(|_| ResponseError::Malformed("invalid Connection field"))?;
        }
    }
    if has_transfer_encoding && has_content_length {
        return Err(ResponseError::Malformed(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    let body = if request_is_head || (100..200).contains(&status) || status == 204 || status == 304
    {
        BodyFraming::None
    } else if has_transfer_encoding {
        if version == Version::Http10 {
            return Err(ResponseError::Malformed(
                "Transfer-Encoding in an HTTP/1.0 response",
            ));
        }
        let values = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
            .map(|h| h.value);
        match classify_transfer_encoding(values) {
            TransferCoding::Chunked => BodyFraming::Chunked,
            _ => return Err(ResponseError::Malformed("unsupported Transfer-Encoding")),
        }
    } else {
        match content_length.get() {
            Some(n) => BodyFraming::Length(n),
            None => BodyFraming::UntilClose,
        }
    };
    let keep_alive = body != BodyFraming::UntilClose
        && match version {
            Version::Http11 => !connection.close,
            Version::Http10 => connection.keep_alive && !connection.close,
        };
    Ok(Some(ResponseHead {
        status,
        reason: reason.unwrap_or(""),
        version,
        headers,
        head_len,
        body,
        connection,
        keep_alive,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str, head: bool) -> Result<Option<(u16, BodyFraming, bool)>, ResponseError> {
        let mut headers = [const { MaybeUninit::uninit() }; 32];
        parse_response(raw.as_bytes(), &mut headers, head)
            .map(|r| r.map(|h| (h.status, h.body, h.keep_alive)))
    }

    #[test]
    fn framing() {
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false).unwrap(),
            Some((200, BodyFraming::Length(5), true))
        );
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).unwrap(),
            Some((200, BodyFraming::None, true))
        );
        assert_eq!(
            parse("HTTP/1.1 204 No Content\r\n\r\n", false).unwrap(),
            Some((204, BodyFraming::None, true))
        );
        assert_eq!(
            parse(
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false
            )
            .unwrap(),
            Some((304, BodyFraming::None, true))
        );
        assert_eq!(
            parse(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            )
            .unwrap(),
            Some((200, BodyFraming::Chunked, true))
        );
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\n\r\n", false).unwrap(),
            Some((200, BodyFraming::UntilClose, false))
        );
        assert_eq!(
            parse("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).unwrap(),
            Some((200, BodyFraming::Length(1), false))
        );
        assert_eq!(
            parse(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                false
            )
            .unwrap(),
            Some((200, BodyFraming::Length(1), false))
        );
    }

    #[test]
    fn refuses_bad_framing() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 99 Odd\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\0\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(parse(raw, false).is_err(), "{raw:?}");
        }
    }
}
