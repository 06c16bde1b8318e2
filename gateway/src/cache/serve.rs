//! Answers from a stored entry: its head, `Age`, the cache status field, the framing and the
//! gateway's own fields, then the body (or the one byte range asked for, or nothing for a HEAD
//! or a 304 to a client whose validator matches).

use std::io::Write;

use httparse::Header;

use super::{CacheStatus, Entry};

/// One byte range of a `Range: bytes=...` request (RFC 9110 §14.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `first-last` or `first-`.
    From { first: u64, last: Option<u64> },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

/// What a request's Range field asks of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    None,
    One(ByteRange),
    /// Several ranges, another unit, or a Range the gateway does not read: passed through.
    Other,
}

/// Reads the Range field of `headers`. With `If-Range` the whole entry is served (allowed by
/// RFC 9110 §13.1.5, and never wrong).
pub fn range_of(headers: &[Header]) -> RangeAsk {
    let mut ranges = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("range"));
    let Some(range) = ranges.next() else {
        return RangeAsk::None;
    };
    if ranges.next().is_some() {
        return RangeAsk::Other;
    }
    if headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("if-range"))
    {
        return RangeAsk::None;
    }
    let Some(spec) = std::str::from_utf8(range.value)
        .ok()
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return RangeAsk::Other;
    };
    if spec.contains(',') {
        return RangeAsk::Other;
    }
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    match spec.trim().split_once('-') {
        Some(("", n)) => number(n).map_or(RangeAsk::Other, |n| RangeAsk::One(ByteRange::Suffix(n))),
        Some((first, "")) => number(first).map_or(RangeAsk::Other, |first| {
            RangeAsk::One(ByteRange::From { first, last: None })
        }),
        Some((first, last)) => match (number(first), number(last)) {
            (Some(first), Some(last)) if first <= last => RangeAsk::One(ByteRange::From {
                first,
                last: Some(last),
            }),
            _ => RangeAsk::Other,
        },
        None => RangeAsk::Other,
    }
}

/// The part of a body of `len` bytes a range selects, `None` when unsatisfiable.
fn select(range: ByteRange, len: u64) -> Option<(u64, u64)> {
    match range {
        ByteRange::Suffix(0) => None,
        ByteRange::Suffix(n) => (len > 0).then(|| (len.saturating_sub(n), len - 1)),
        ByteRange::From { first, last } => {
            (first < len).then(|| (first, last.map_or(len - 1, |l| l.min(len - 1))))
        }
    }
}

/// How the client's conditional fields meet the entry: a matching `If-None-Match` (or,
/// without one, an `If-Modified-Since` no older than `Last-Modified`) is answered 304.
fn not_modified(entry: &Entry, headers: &[Header]) -> bool {
    if let Some(inm) = super::directives::field(headers, "if-none-match") {
        let Some(etag) = &entry.etag else {
            return false;
        };
        // Weak comparison (RFC 9110 §13.1.2): W/ prefixes do not matter.
        let weak = |t: &[u8]| t.strip_prefix(b"W/").unwrap_or(t).to_vec();
        let ours = weak(etag.trim_ascii());
        return inm
            .split(|b| *b == b',')
            .map(|t| t.trim_ascii())
            .any(|t| t == b"*" || weak(t) == ours);
    }
    match (
        super::directives::field(headers, "if-modified-since")
            .and_then(super::directives::http_date),
        entry
            .last_modified
            .as_deref()
            .and_then(super::directives::http_date),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// How an answer from the cache is framed.
pub struct ServeParams<'a> {
    pub status: CacheStatus,
    /// The name of the status field (`X-Cache`).
    pub status_field: &'a str,
    pub age_secs: u64,
    pub keep_alive: bool,
    pub http10: bool,
    pub head_only: bool,
    pub range: RangeAsk,
    /// The gateway's own field lines (request id, HSTS, the route's rule fields), each
    /// ending in CRLF.
    pub extra: &'a [u8],
    /// What becomes of each stored field (the route's response rules and CORS).
    pub fate: &'a dyn Fn(&str) -> crate::http::fields::FieldFate<'a>,
}

/// The names of the fields an entry's head stores.
pub fn field_names(entry: &Entry) -> impl Iterator<Item = &str> + Clone {
    let fields_at = entry
        .head
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(0, |i| i + 2);
    entry.head[fields_at..]
        .split(|b| *b == b'\n')
        .filter_map(|line| std::str::from_utf8(line.split(|b| *b == b':').next()?).ok())
        .filter(|name| !name.is_empty() && !name.starts_with('\r'))
}

/// Writes the answer from `entry` to `out`; returns its status.
pub fn write(out: &mut Vec<u8>, entry: &Entry, request: &[Header], p: ServeParams) -> u16 {
    let len = entry.body.len() as u64;
    let (status, body): (u16, &[u8]) = if entry.status == 200 && not_modified(entry, request) {
        (304, &[])
    } else {
        match p.range {
            RangeAsk::One(r) if entry.status == 200 => match select(r, len) {
                Some((first, last)) => (206, &entry.body[first as usize..=last as usize]),
                None => (416, &[]),
            },
            _ => (entry.status, &entry.body[..]),
        }
    };
    // The stored status line is replaced for 206, 304 and 416.
    let fields_at = entry
        .head
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(0, |i| i + 2);
    match status {
        206 => out.extend_from_slice(b"HTTP/1.1 206 Partial Content\r\n"),
        304 => out.extend_from_slice(b"HTTP/1.1 304 Not Modified\r\n"),
        416 => out.extend_from_slice(b"HTTP/1.1 416 Range Not Satisfiable\r\n"),
        _ => out.extend_from_slice(&entry.head[..fields_at]),
    }
    // The stored fields, but for what this answer sets itself: the status field, and the
    // gateway's own Strict-Transport-Security when it sends one.
    let own_hsts = memchr::memmem::find(p.extra, b"strict-transport-security:").is_some();
    for line in entry.head[fields_at..].split_inclusive(|b| *b == b'\n') {
        let name = line.split(|b| *b == b':').next().unwrap_or_default();
        if name.eq_ignore_ascii_case(p.status_field.as_bytes())
            || (own_hsts && name.eq_ignore_ascii_case(b"strict-transport-security"))
        {
            continue;
        }
        match std::str::from_utf8(name).map(|n| (p.fate)(n)) {
            Ok(crate::http::fields::FieldFate::Drop) => continue,
            Ok(crate::http::fields::FieldFate::Rename(to)) => {
                out.extend_from_slice(to.as_bytes());
                out.extend_from_slice(&line[name.len()..]);
            }
            _ => out.extend_from_slice(line),
        }
    }
    let _ = write!(out, "age: {}\r\n", p.age_secs);
    let _ = write!(out, "{}: {}\r\n", p.status_field, p.status.as_str());
    match status {
        206 => {
            let first = body.as_ptr() as usize - entry.body.as_ptr() as usize;
            let _ = write!(
                out,
                "content-range: bytes {first}-{}/{len}\r\ncontent-length: {}\r\n",
                first + body.len() - 1,
                body.len()
            );
        }
        416 => {
            let _ = write!(out, "content-range: bytes */{len}\r\ncontent-length: 0\r\n");
        }
        304 | 204 => {}
        _ => {
            let _ = write!(out, "content-length: {}\r\n", body.len());
        }
    }
    if !p.keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if p.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(p.extra);
    out.extend_from_slice(b"\r\n");
    if !p.head_only {
        out.extend_from_slice(body);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cache::test_field as h;

    #[test]
    fn ranges_are_read_and_selected() {
        assert_eq!(range_of(&[]), RangeAsk::None);
        assert_eq!(
            range_of(&[h("Range", "bytes=0-9")]),
            RangeAsk::One(ByteRange::From {
                first: 0,
                last: Some(9)
            })
        );
        assert_eq!(
            range_of(&[h("Range", "bytes=-5")]),
            RangeAsk::One(ByteRange::Suffix(5))
        );
        assert_eq!(range_of(&[h("Range", "bytes=0-1,4-5")]), RangeAsk::Other);
        assert_eq!(range_of(&[h("Range", "items=0-1")]), RangeAsk::Other);
        assert_eq!(range_of(&[h("Range", "bytes=5-2")]), RangeAsk::Other);
        assert_eq!(select(ByteRange::Suffix(5), 3), Some((0, 2)));
        assert_eq!(
            select(
                ByteRange::From {
                    first: 3,
                    last: None
                },
                3
            ),
            None
        );
        assert_eq!(
            select(
                ByteRange::From {
                    first: 1,
                    last: Some(99)
                },
                3
            ),
            Some((1, 2))
        );
    }
}
