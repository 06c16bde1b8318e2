//! Normalisation of the request target's path and host before routing (RFC 3986 §6.2.2), so
//! the route is chosen on the same resource the upstream will serve and the upstream receives
//! exactly the path the policy allowed.
//!
//! Every escape is decoded to judge the path, but only unreserved characters are decoded in the
//! result; the rest keep their escape with upper-case hex digits, so nothing is ever decoded
//! twice (`%252e` stays `%252e`). Dot-segments are removed (also when encoded), repeated
//! slashes merged (optional), and anything an upstream could read as a different path is
//! refused: encoded slashes and backslashes, raw backslashes, encoded controls, `..;`
//! segments, ill-formed escapes, invalid or overlong UTF-8, raw bytes above 0x7F.

use serde::{Deserialize, Serialize};

/// What to do with `%2F` in a path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodedSlash {
    /// 400: an upstream that decodes it would see a different path than the one routed.
    #[default]
    Reject,
    /// Forward `%2F` untouched; routing treats it as an ordinary character, never a separator.
    Keep,
}

/// How paths are normalised (`[server] merge_slashes` and `encoded_slash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathPolicy {
    pub merge_slashes: bool,
    pub encoded_slash: EncodedSlash,
}

impl Default for PathPolicy {
    fn default() -> Self {
        PathPolicy {
            merge_slashes: true,
            encoded_slash: EncodedSlash::Reject,
        }
    }
}

/// Why a path was refused (each answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Raw bytes above 0x7F: the target must be percent-encoded ASCII.
    RawNonAscii,
    /// Some servers read a backslash as `/`.
    Backslash,
    /// A request target carries no fragment (RFC 9112 §3.2).
    Fragment,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%2F` under `encoded_slash = "reject"`.
    EncodedSlash,
    /// `%5C`.
    EncodedBackslash,
    /// `%00` to `%1F`, or `%7F`.
    EncodedControl,
    /// Decoded bytes that are not UTF-8 (overlong forms such as `%C0%AE` among them).
    InvalidUtf8,
    /// `.` or `..` once `;` parameters are stripped (`..;/`).
    DotSegmentParameters,
    /// A `..` with nothing left to remove.
    AboveRoot,
    /// A path that does not start with `/`.
    NotAbsolute,
}

impl PathError {
    /// A short explanation for the 400 answer.
    pub fn detail(self) -> &'static str {
        match self {
            PathError::RawNonAscii => "byte above 0x7F in the request target",
            PathError::Backslash => "backslash in the request path",
            PathError::Fragment => "fragment in the request target",
            PathError::BadEscape => "ill-formed percent escape in the request path",
            PathError::EncodedSlash => "encoded slash in the request path",
            PathError::EncodedBackslash => "encoded backslash in the request path",
            PathError::EncodedControl => "encoded control character in the request path",
            PathError::InvalidUtf8 => "invalid UTF-8 in the request path",
            PathError::DotSegmentParameters => "dot-segment with parameters in the request path",
            PathError::AboveRoot => "request path climbs above the root",
            PathError::NotAbsolute => "request path does not start with /",
        }
    }
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.detail())
    }
}

impl std::error::Error for PathError {}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

const UPPER_HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Checks the decoded bytes of a path form valid UTF-8 (RFC 3629: no overlong forms, no
/// surrogates, nothing above U+10FFFF), one byte at a time, without a decoded copy.
#[derive(Default)]
struct Utf8Check {
    /// Continuation bytes still expected.
    pending: u8,
    /// Allowed range of the next continuation byte.
    low: u8,
    high: u8,
}

impl Utf8Check {
    fn feed(&mut self, b: u8) -> Result<(), PathError> {
        if self.pending > 0 {
            if !(self.low..=self.high).contains(&b) {
                return Err(PathError::InvalidUtf8);
            }
            self.pending -= 1;
            (self.low, self.high) = (0x80, 0xBF);
            return Ok(());
        }
        (self.pending, self.low, self.high) = match b {
            0x00..=0x7F => return Ok(()),
            0xC2..=0xDF => (1, 0x80, 0xBF),
            0xE0 => (2, 0xA0, 0xBF),
            0xE1..=0xEC | 0xEE..=0xEF => (2, 0x80, 0xBF),
            0xED => (2, 0x80, 0x9F),
            0xF0 => (3, 0x90, 0xBF),
            0xF1..=0xF3 => (3, 0x80, 0xBF),
            0xF4 => (3, 0x80, 0x8F),
            _ => return Err(PathError::InvalidUtf8),
        };
        Ok(())
    }

    fn finish(&self) -> Result<(), PathError> {
        if self.pending == 0 {
            Ok(())
        } else {
            Err(PathError::InvalidUtf8)
        }
    }
}

/// Writes the normal form of `path` (a target's path, without the query) to `out`, which is
/// cleared first. `*` (asterisk-form) is kept as it is. The output is never longer than the
/// input.
pub fn normalize_path(path: &[u8], policy: PathPolicy, out: &mut Vec<u8>) -> Result<(), PathError> {
    out.clear();
    if path == b"*" {
        out.push(b'*');
        return Ok(());
    }
    let Some(rest) = path.strip_prefix(b"/") else {
        return Err(PathError::NotAbsolute);
    };
    out.push(b'/');
    // `out` always ends with `/` between segments: each input segment is appended after it.
    let mut segments = rest.split(|b| *b == b'/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        let start = out.len();
        write_segment(segment, policy, out)?;
        let written = &out[start..];
        let bare = match written.iter().position(|b| *b == b';') {
            Some(semicolon) => &written[..semicolon],
            None => written,
        };
        if written.is_empty() {
            // An empty segment (`//`); a segment that only starts with `;` is not empty.
            if !last && !policy.merge_slashes {
                out.push(b'/');
            }
        } else if bare == b"." || bare == b".." {
            if bare.len() != written.len() {
                // `..;x/` is `..` to servers that strip parameters (Tomcat) and a plain
                // name to others: refuse rather than guess.
                return Err(PathError::DotSegmentParameters);
            }
            let climbs = bare == b"..";
            out.truncate(start);
            if climbs {
                if start == 1 {
                    return Err(PathError::AboveRoot);
                }
                // Drop the previous segment: back to the `/` before it.
                let previous = out[..start - 1]
                    .iter()
                    .rposition(|b| *b == b'/')
                    .unwrap_or(0);
                out.truncate(previous + 1);
            }
        } else if !last {
            out.push(b'/');
        }
    }
    Ok(())
}

/// Appends one segment's normal form to `out`. A segment is followed by `/` or the end, so a
/// UTF-8 sequence cannot continue past it.
fn write_segment(segment: &[u8], policy: PathPolicy, out: &mut Vec<u8>) -> Result<(), PathError> {
    let mut utf8 = Utf8Check::default();
    let mut i = 0;
    while i < segment.len() {
        let b = segment[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    segment.get(i + 1).copied().and_then(hex_value),
                    segment.get(i + 2).copied().and_then(hex_value),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let decoded = hi << 4 | lo;
                match decoded {
                    b'/' if policy.encoded_slash == EncodedSlash::Reject => {
                        return Err(PathError::EncodedSlash)
                    }
                    b'\\' => return Err(PathError::EncodedBackslash),
                    0x00..=0x1F | 0x7F => return Err(PathError::EncodedControl),
                    _ => {}
                }
                utf8.feed(decoded)?;
                if is_unreserved(decoded) {
                    out.push(decoded);
                } else {
                    out.extend_from_slice(&[
                        b'%',
                        UPPER_HEX[usize::from(hi)],
                        UPPER_HEX[usize::from(lo)],
                    ]);
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            b'#' => return Err(PathError::Fragment),
            0x80..=0xFF => return Err(PathError::RawNonAscii),
            _ => {
                utf8.feed(b)?;
                out.push(b);
                i += 1;
            }
        }
    }
    utf8.finish()
}

/// True when `path` is already in normal form under `policy` (config paths must be).
pub fn is_normal_path(path: &str, policy: PathPolicy) -> bool {
    let mut out = Vec::with_capacity(path.len());
    normalize_path(path.as_bytes(), policy, &mut out).is_ok() && out == path.as_bytes()
}

/// Longest host name (RFC 1035) plus room for a port; longer Host values match no host route.
pub const MAX_HOST_BYTES: usize = 255;

/// Appends the routing form of a Host value to `out`: lower case, without its port and without
/// one trailing dot. Returns false when it cannot name a host (empty or too long); `out` is then
/// left as it was.
pub fn normalize_host(host: &[u8], out: &mut Vec<u8>) -> bool {
    let name = if host.first() == Some(&b'[') {
        // IPv6 literal: keep up to the closing bracket.
        match host.iter().position(|b| *b == b']') {
            Some(end) => &host[..=end],
            None => return false,
        }
    } else {
        match host.iter().rposition(|b| *b == b':') {
            Some(colon) => &host[..colon],
            None => host,
        }
    };
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > MAX_HOST_BYTES {
        return false;
    }
    out.extend(name.iter().map(u8::to_ascii_lowercase));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm_with(path: &str, policy: PathPolicy) -> Result<String, PathError> {
        let mut out = Vec::new();
        normalize_path(path.as_bytes(), policy, &mut out)?;
        assert!(out.len() <= path.len(), "{path}: output longer than input");
        Ok(String::from_utf8(out).unwrap())
    }

    fn norm(path: &str) -> Result<String, PathError> {
        norm_with(path, PathPolicy::default())
    }

    #[test]
    fn normal_forms() {
        let cases = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//admin/secret", "/admin/secret"),
            ("/a///b//", "/a/b/"),
            ("/x/../admin/secret", "/admin/secret"),
            ("/./admin/secret", "/admin/secret"),
            ("/a/./b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/b/../..", "/"),
            ("/%61dmin/secret", "/admin/secret"),
            ("/a/%2e%2E/", "/"),
            ("/a/%2e%2e/admin", "/admin"),
            ("/a/.%2e/admin", "/admin"),
            ("/%7Euser/%2d%5F", "/~user/-_"),
            ("/%2a%3b%3F", "/%2A%3B%3F"),
            ("/%252e%252e/admin", "/%252e%252e/admin"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/%F0%9F%A6%80", "/%F0%9F%A6%80"),
            ("/a;b=c/d", "/a;b=c/d"),
            ("/;a/;b", "/;a/;b"),
            ("/;..q;/x", "/;..q;/x"),
            ("/..a/a..", "/..a/a.."),
            ("/...", "/..."),
            ("*", "*"),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn refusals() {
        use PathError::*;
        let cases = [
            ("/..", AboveRoot),
            ("/a/../..", AboveRoot),
            ("/%2e%2e/%2e%2e/x", AboveRoot),
            ("/admin%2Fsecret", EncodedSlash),
            ("/admin%2fsecret", EncodedSlash),
            ("/a%5Cb", EncodedBackslash),
            ("/a\\b", Backslash),
            ("/a/..\\admin", Backslash),
            ("/a%00b", EncodedControl),
            ("/a%0d%0aX: y", EncodedControl),
            ("/a%7f", EncodedControl),
            ("/a%", BadEscape),
            ("/a%2", BadEscape),
            ("/a%zz", BadEscape),
            ("/%C0%AE%C0%AE/x", InvalidUtf8),
            ("/%E0%80%AE", InvalidUtf8),
            ("/%ED%A0%80", InvalidUtf8),
            ("/%C3", InvalidUtf8),
            ("/%C3/x", InvalidUtf8),
            ("/%C3/%A9", InvalidUtf8),
            ("/%80", InvalidUtf8),
            ("/%F4%90%80%80", InvalidUtf8),
            ("/a/..;/admin", DotSegmentParameters),
            ("/a/.;x/admin", DotSegmentParameters),
            ("/a/%2e%2e;/admin", DotSegmentParameters),
            ("/caf\u{e9}", RawNonAscii),
            ("/a#b", Fragment),
            ("a/b", NotAbsolute),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input), Err(want), "{input}");
        }
    }

    #[test]
    fn policies() {
        let keep_slashes = PathPolicy {
            merge_slashes: false,
            ..PathPolicy::default()
        };
        assert_eq!(norm_with("//a//b/", keep_slashes).as_deref(), Ok("//a//b/"));
        assert_eq!(norm_with("/a//..", keep_slashes).as_deref(), Ok("/a/"));
        let keep_encoded = PathPolicy {
            encoded_slash: EncodedSlash::Keep,
            ..PathPolicy::default()
        };
        assert_eq!(
            norm_with("/admin%2fsecret", keep_encoded).as_deref(),
            Ok("/admin%2Fsecret")
        );
        // An encoded slash never separates segments: `..` after it climbs over the whole name.
        assert_eq!(norm_with("/a%2Fb/../c", keep_encoded).as_deref(), Ok("/c"));
    }

    #[test]
    fn normalising_is_idempotent_on_the_table() {
        for input in ["/a/./b/../c//d/", "/%7e%2E%2e/x", "/%2A/./%41"] {
            let once = norm(input).unwrap();
            assert_eq!(norm(&once).unwrap(), once);
        }
        assert!(is_normal_path("/v1/", PathPolicy::default()));
        assert!(!is_normal_path("/a/../b", PathPolicy::default()));
        assert!(!is_normal_path("//x", PathPolicy::default()));
        assert!(!is_normal_path("/%7euser", PathPolicy::default()));
    }

    #[test]
    fn hosts() {
        let host = |h: &str| {
            let mut out = Vec::new();
            normalize_host(h.as_bytes(), &mut out).then(|| String::from_utf8(out).unwrap())
        };
        assert_eq!(
            host("API.Example.COM:8443").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(host("example.com.").as_deref(), Some("example.com"));
        assert_eq!(host("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(host(""), None);
        assert_eq!(host("[::1"), None);
        assert_eq!(host(&"a".repeat(300)), None);
    }
}
