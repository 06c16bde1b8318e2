//! Cache-Control (RFC 9111 §5.2) as a shared cache reads it, from requests and responses, and
//! the freshness lifetime it gives a response (§4.2.1). Directive names are case-insensitive;
//! several fields combine; a malformed or repeated `max-age` counts as the smallest value
//! given, and one that is not a number as 0 (stale), as §4.2.1 asks.

use std::time::{Duration, SystemTime};

use httparse::Header;

/// What a response's Cache-Control, Expires and Date say.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResponseDirectives {
    pub no_store: bool,
    /// Stored, but revalidated before every use.
    pub no_cache: bool,
    /// For one user only: never in a shared cache.
    pub private: bool,
    pub public: bool,
    /// Never served stale.
    pub must_revalidate: bool,
    /// Never served stale by a shared cache; unlike `must-revalidate`, it does not let an
    /// answer to a request with credentials be stored (RFC 9111 §3.5).
    pub proxy_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    /// Seconds from Date to Expires (0 for an Expires in the past or not a date).
    pub expires_in: Option<u64>,
}

impl ResponseDirectives {
    /// Reads every Cache-Control, Expires and Date field of `headers`.
    pub fn of(headers: &[Header]) -> ResponseDirectives {
        let mut d = ResponseDirectives::default();
        for (name, value) in directives(headers) {
            match name.to_ascii_lowercase().as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = true,
                "must-revalidate" => d.must_revalidate = true,
                "proxy-revalidate" => d.proxy_revalidate = true,
                "max-age" => d.max_age = smallest(d.max_age, seconds(value)),
                "s-maxage" => d.s_maxage = smallest(d.s_maxage, seconds(value)),
                "stale-while-revalidate" => {
                    d.stale_while_revalidate = smallest(d.stale_while_revalidate, seconds(value))
                }
                "stale-if-error" => d.stale_if_error = smallest(d.stale_if_error, seconds(value)),
                _ => {}
            }
        }
        if let Some(expires) = field(headers, "expires") {
            let date = field(headers, "date")
                .and_then(http_date)
                .unwrap_or_else(SystemTime::now);
            d.expires_in = Some(
                http_date(expires)
                    .and_then(|e| e.duration_since(date).ok())
                    .map_or(0, |d| d.as_secs()),
            );
        }
        d
    }

    /// How long the response is fresh in a shared cache (§4.2.1): `s-maxage`, else `max-age`,
    /// else Expires minus Date; `None` when it says nothing (a route default may then apply).
    /// `no-cache` makes it stale at once.
    pub fn freshness(&self) -> Option<Duration> {
        let secs = self.s_maxage.or(self.max_age).or(self.expires_in)?;
        Some(if self.no_cache {
            Duration::ZERO
        } else {
            Duration::from_secs(secs)
        })
    }
}

/// What a request's Cache-Control (and `Pragma: no-cache`) says.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RequestDirectives {
    /// Neither served from nor stored in the cache.
    pub no_store: bool,
    /// Served only after the upstream confirmed it (`no-cache`, `max-age=0`).
    pub revalidate: bool,
}

impl RequestDirectives {
    pub fn of(headers: &[Header]) -> RequestDirectives {
        let mut d = RequestDirectives::default();
        for (name, value) in directives(headers) {
            match name.to_ascii_lowercase().as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.revalidate = true,
                "max-age" if seconds(value) == Some(0) => d.revalidate = true,
                _ => {}
            }
        }
        let pragma_no_cache = headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("pragma")
                && h.value
                    .split(|b| *b == b',')
                    .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"no-cache"))
        });
        let has_cache_control = headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("cache-control"));
        // Pragma counts only without Cache-Control (RFC 9111 §5.4 is obsolete, caches still
        // honour it so).
        if pragma_no_cache && !has_cache_control {
            d.revalidate = true;
        }
        d
    }
}

/// Every `name[=value]` of the Cache-Control fields, values unquoted.
fn directives<'a>(headers: &'a [Header<'a>]) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("cache-control"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .filter_map(|d| {
            let d = d.trim();
            if d.is_empty() {
                return None;
            }
            Some(match d.split_once('=') {
                Some((n, v)) => (n.trim(), v.trim().trim_matches('"')),
                None => (d, ""),
            })
        })
}

/// A delta-seconds value; 0 (stale) for anything else, as §1.2.2 and §4.2.1 ask.
fn seconds(value: &str) -> Option<u64> {
    if value.is_empty() {
        return Some(0);
    }
    Some(if value.bytes().all(|b| b.is_ascii_digit()) {
        // Beyond 2^31 is "infinity" (§1.2.2): a year is as good.
        value.parse::<u64>().unwrap_or(u64::MAX).min(365 * 86_400)
    } else {
        0
    })
}

fn smallest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The first field `name` of `headers`.
pub fn field<'a>(headers: &'a [Header<'a>], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// An HTTP date (RFC 9110 §5.6.7, all three forms).
pub fn http_date(value: &[u8]) -> Option<SystemTime> {
    httpdate::parse_http_date(std::str::from_utf8(value).ok()?.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cache::test_field as h;

    #[test]
    fn freshness_prefers_s_maxage_then_max_age_then_expires() {
        let d = ResponseDirectives::of(&[h("Cache-Control", "max-age=60, S-MAXAGE=\"120\"")]);
        assert_eq!(d.freshness(), Some(Duration::from_secs(120)));
        let d = ResponseDirectives::of(&[
            h("cache-control", "public"),
            h("cache-control", "max-age=30"),
        ]);
        assert!(d.public);
        assert_eq!(d.freshness(), Some(Duration::from_secs(30)));
        let d = ResponseDirectives::of(&[
            h("Date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            h("Expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
        ]);
        assert_eq!(d.freshness(), Some(Duration::from_secs(60)));
        let d = ResponseDirectives::of(&[h("Expires", "0")]);
        assert_eq!(
            d.freshness(),
            Some(Duration::ZERO),
            "an invalid Expires is stale"
        );
        assert_eq!(ResponseDirectives::of(&[]).freshness(), None);
        let d = ResponseDirectives::of(&[h("Cache-Control", "max-age=abc")]);
        assert_eq!(d.freshness(), Some(Duration::ZERO));
        let d = ResponseDirectives::of(&[h("Cache-Control", "max-age=60, no-cache")]);
        assert_eq!(d.freshness(), Some(Duration::ZERO));
        let d = ResponseDirectives::of(&[h("Cache-Control", "max-age=60, max-age=5")]);
        assert_eq!(d.freshness(), Some(Duration::from_secs(5)), "the smallest");
        let d = ResponseDirectives::of(&[h(
            "Cache-Control",
            "private, no-store, stale-while-revalidate=10, stale-if-error=20, proxy-revalidate",
        )]);
        assert!(d.private && d.no_store && d.proxy_revalidate && !d.must_revalidate);
        assert_eq!(
            (d.stale_while_revalidate, d.stale_if_error),
            (Some(10), Some(20))
        );
    }

    #[test]
    fn requests_ask_to_skip_or_revalidate() {
        assert!(RequestDirectives::of(&[h("Cache-Control", "no-store")]).no_store);
        assert!(RequestDirectives::of(&[h("Cache-Control", "no-cache")]).revalidate);
        assert!(RequestDirectives::of(&[h("Cache-Control", "max-age=0")]).revalidate);
        assert!(RequestDirectives::of(&[h("Pragma", "no-cache")]).revalidate);
        assert!(!RequestDirectives::of(&[h("Cache-Control", "max-age=10")]).revalidate);
    }
}
