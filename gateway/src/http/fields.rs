//! Field-level rules shared by the request and response codecs: strict Content-Length and
//! Transfer-Encoding parsing, Connection tokens, and the hop-by-hop set of RFC 9110 §7.6.1.

/// Longest Content-Length value accepted, in digits (leading zeros included): enough for any
/// u64, short enough that a huge value is refused before arithmetic.
pub const MAX_CONTENT_LENGTH_DIGITS: usize = 19;
/// Connection options remembered per message; more are refused as malformed.
pub const MAX_CONNECTION_TOKENS: usize = 16;

/// Fields that describe one hop and are never forwarded as received (RFC 9110 §7.6.1).
/// Content-Length and Transfer-Encoding are rebuilt by the gateway from the framing it decided.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "trailer",
    "content-length",
];

/// Fields a `Connection` option may not remove: the gateway itself depends on them.
const NOT_NOMINATABLE: [&str; 3] = ["host", "content-length", "transfer-encoding"];

/// Parses one Content-Length field value: `1*DIGIT`, nothing else.
pub fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty()
        || value.len() > MAX_CONTENT_LENGTH_DIGITS
        || !value.iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    value.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// A field value that breaks its field's grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidField;

/// Accumulates Content-Length fields: several are accepted only when identical.
#[derive(Default)]
pub struct ContentLengthFields {
    value: Option<u64>,
}

impl ContentLengthFields {
    /// Adds one field; `Err` when it is malformed or differs from an earlier one.
    pub fn add(&mut self, raw: &[u8]) -> Result<(), InvalidField> {
        let n = parse_content_length(raw).ok_or(InvalidField)?;
        match self.value {
            Some(prev) if prev != n => Err(InvalidField),
            _ => {
                self.value = Some(n);
                Ok(())
            }
        }
    }
    pub fn get(&self) -> Option<u64> {
        self.value
    }
}

/// What a set of Transfer-Encoding fields says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferCoding {
    /// Exactly `chunked`.
    Chunked,
    /// Names a coding other than chunked (or chunked with others): not implemented.
    Unsupported,
    /// Not a valid list of codings.
    Invalid,
}

/// Classifies Transfer-Encoding field values (all of them, in order).
pub fn classify_transfer_encoding<'a>(values: impl Iterator<Item = &'a [u8]>) -> TransferCoding {
    let mut codings = 0usize;
    let mut only_chunked = true;
    for value in values {
        for item in value.split(|b| *b == b',') {
            let item = trim_ows(item);
            if item.is_empty() {
                return TransferCoding::Invalid;
            }
            // A coding is a token, optionally with parameters after ';'.
            let name = trim_ows(item.split(|b| *b == b';').next().unwrap_or(item));
            if name.is_empty() || !name.iter().all(|b| super::is_token_byte(*b)) {
                return TransferCoding::Invalid;
            }
            codings += 1;
            if !name.eq_ignore_ascii_case(b"chunked") || name.len() != item.len() {
                only_chunked = false;
            }
        }
    }
    match (codings, only_chunked) {
        (1, true) => TransferCoding::Chunked,
        (0, _) => TransferCoding::Invalid,
        // `chunked, chunked` is as malformed as it is suspicious.
        (_, true) => TransferCoding::Invalid,
        _ => TransferCoding::Unsupported,
    }
}

/// Trims optional whitespace (SP, HTAB) from both ends.
pub fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The options of Connection fields, collected without allocation.
#[derive(Default, Debug)]
pub struct ConnectionOptions<'b> {
    tokens: [&'b [u8]; MAX_CONNECTION_TOKENS],
    len: usize,
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
}

impl<'b> ConnectionOptions<'b> {
    /// Adds one Connection field value; `Err` when it holds too many or malformed options.
    pub fn add(&mut self, value: &'b [u8]) -> Result<(), InvalidField> {
        for token in value.split(|b| *b == b',') {
            let token = trim_ows(token);
            if token.is_empty() {
                continue;
            }
            if !token.iter().all(|b| super::is_token_byte(*b)) {
                return Err(InvalidField);
            }
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else {
                if self.len == MAX_CONNECTION_TOKENS {
                    return Err(InvalidField);
                }
                self.tokens[self.len] = token;
                self.len += 1;
            }
        }
        Ok(())
    }

    /// True when a Connection option names this field (so it is hop-by-hop for this message).
    pub fn nominates(&self, name: &str) -> bool {
        !NOT_NOMINATABLE.iter().any(|n| name.eq_ignore_ascii_case(n))
            && self.tokens[..self.len]
                .iter()
                .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// Whether field `name` is `owned` (lower case) as CGI-style backends read names: case
/// ignored and `_` taken for `-` (`X_Consumer_Id` is `HTTP_X_CONSUMER_ID`, as is
/// `X-Consumer-Id`). Fields the gateway owns are dropped in either spelling.
pub fn same_cgi_name(name: &str, owned: &str) -> bool {
    name.len() == owned.len()
        && name
            .bytes()
            .zip(owned.bytes())
            .all(|(n, o)| n.to_ascii_lowercase() == o || (n == b'_' && o == b'-'))
}

/// What becomes of one field of a head being rebuilt, as a rule decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldFate<'n> {
    Keep,
    Drop,
    /// Kept under this name (lower case).
    Rename(&'n str),
}

pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b"0042"), Some(42));
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b" 1",
            b"1 2",
            b"0x10",
            b"1,1",
            b"99999999999999999999",
            b"1e3",
        ] {
            assert_eq!(
                parse_content_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut cl = ContentLengthFields::default();
        assert!(cl.add(b"5").is_ok() && cl.add(b"05").is_ok());
        assert!(cl.add(b"6").is_err());
    }

    #[test]
    fn transfer_encoding_classes() {
        let c = |vals: &[&str]| classify_transfer_encoding(vals.iter().map(|v| v.as_bytes()));
        assert_eq!(c(&["chunked"]), TransferCoding::Chunked);
        assert_eq!(c(&["ChUnKeD"]), TransferCoding::Chunked);
        assert_eq!(c(&[" chunked\t"]), TransferCoding::Chunked);
        assert_eq!(c(&["gzip, chunked"]), TransferCoding::Unsupported);
        assert_eq!(c(&["gzip"]), TransferCoding::Unsupported);
        assert_eq!(c(&["chunked;q=1"]), TransferCoding::Unsupported);
        assert_eq!(c(&["chunked", "chunked"]), TransferCoding::Invalid);
        assert_eq!(c(&["chunked,"]), TransferCoding::Invalid);
        assert_eq!(c(&[""]), TransferCoding::Invalid);
        assert_eq!(c(&["chunked\u{b}"]), TransferCoding::Invalid);
        assert_eq!(c(&["\"chunked\""]), TransferCoding::Invalid);
    }

    #[test]
    fn connection_options() {
        let mut c = ConnectionOptions::default();
        c.add(b"Keep-Alive, X-Secret , upgrade").unwrap();
        assert!(c.keep_alive && c.upgrade && !c.close);
        assert!(c.nominates("x-secret"));
        assert!(!c.nominates("host"));
        assert!(c.add(b"bad token").is_err());
    }
}
