//! CORS (the Fetch standard's CORS protocol) answered by the gateway: a route's policy,
//! compiled once, judges preflights and writes the response fields; the upstream is not asked.
//!
//! Every answer of a CORS route carries `Vary: Origin`, allowed or not, so a cache between the
//! gateway and the browser never serves one origin's answer to another. A disallowed origin
//! gets no CORS fields at all (the browser then refuses the response); a disallowed preflight
//! gets 403.

use std::io::Write;

use crate::config::CorsConfig;

/// One entry of `allow_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginRule {
    Any,
    /// `scheme://host[:port]`, lower case.
    Exact(Box<str>),
    /// `scheme://*.domain[:port]`: `scheme://` and `.domain[:port]` around one or more labels.
    Subdomains {
        scheme: Box<str>,
        suffix: Box<str>,
    },
}

impl OriginRule {
    /// Parses an `allow_origins` entry; the error says what is valid.
    pub fn parse(text: &str) -> Result<OriginRule, String> {
        if text == "*" {
            return Ok(OriginRule::Any);
        }
        let invalid = || {
            format!("`{text}` is not an origin: use `https://app.example.com` (scheme, host and port only), `https://*.example.com`, or `*`")
        };
        let lower = text.to_ascii_lowercase();
        let (scheme, rest) = lower.split_once("://").ok_or_else(invalid)?;
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']')
                })
        };
        if scheme.is_empty()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+')
        {
            return Err(invalid());
        }
        match rest.strip_prefix("*.") {
            Some(domain) if plain(domain) && !domain.contains('*') => Ok(OriginRule::Subdomains {
                scheme: format!("{scheme}://").into(),
                suffix: format!(".{domain}").into(),
            }),
            Some(_) => Err(invalid()),
            None if plain(rest) => Ok(OriginRule::Exact(lower.into())),
            None => Err(invalid()),
        }
    }

    fn allows(&self, origin: &[u8]) -> bool {
        match self {
            OriginRule::Any => true,
            OriginRule::Exact(o) => origin.eq_ignore_ascii_case(o.as_bytes()),
            OriginRule::Subdomains { scheme, suffix } => {
                let (scheme, suffix) = (scheme.as_bytes(), suffix.as_bytes());
                origin.len() > scheme.len() + suffix.len()
                    && origin[..scheme.len()].eq_ignore_ascii_case(scheme)
                    && origin[origin.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                    && origin[scheme.len()..origin.len() - suffix.len()]
                        .iter()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
            }
        }
    }
}

/// A route's compiled CORS policy.
#[derive(Debug)]
pub struct CorsPolicy {
    origins: Vec<OriginRule>,
    methods: Vec<Box<str>>,
    /// Lower case; empty with `any_header`.
    headers: Vec<Box<str>>,
    any_header: bool,
    credentials: bool,
    /// `access-control-allow-methods: ...\r\n` and the other fixed preflight lines.
    preflight_fixed: Vec<u8>,
    /// `access-control-expose-headers: ...\r\n`, when any.
    expose_line: Vec<u8>,
}

/// A preflight's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preflight {
    Allowed,
    Refused,
}

impl CorsPolicy {
    pub fn compile(config: &CorsConfig) -> CorsPolicy {
        let origins = config
            .allow_origins
            .iter()
            .map(|o| OriginRule::parse(o).expect("validate() checked the origins"))
            .collect();
        let any_header = config.allow_headers.iter().any(|h| h == "*");
        let mut preflight_fixed = Vec::new();
        let _ = write!(
            preflight_fixed,
            "access-control-allow-methods: {}\r\n",
            config.allow_methods.join(", ")
        );
        if !any_header && !config.allow_headers.is_empty() {
            let _ = write!(
                preflight_fixed,
                "access-control-allow-headers: {}\r\n",
                config.allow_headers.join(", ")
            );
        }
        if let Some(age) = config.max_age {
            let _ = write!(
                preflight_fixed,
                "access-control-max-age: {}\r\n",
                age.get().as_secs()
            );
        }
        let mut expose_line = Vec::new();
        if !config.expose_headers.is_empty() {
            let _ = write!(
                expose_line,
                "access-control-expose-headers: {}\r\n",
                config.expose_headers.join(", ")
            );
        }
        CorsPolicy {
            origins,
            methods: config
                .allow_methods
                .iter()
                .map(|m| m.as_str().into())
                .collect(),
            headers: config
                .allow_headers
                .iter()
                .filter(|h| *h != "*")
                .map(|h| h.to_ascii_lowercase().into())
                .collect(),
            any_header,
            credentials: config.credentials,
            preflight_fixed,
            expose_line,
        }
    }

    pub fn allows_origin(&self, origin: &[u8]) -> bool {
        self.origins.iter().any(|r| r.allows(origin))
    }

    /// Judges a preflight from `origin` asking for `method` and the comma-separated
    /// `headers` (`Access-Control-Request-Headers`).
    pub fn judge_preflight(&self, origin: &[u8], method: &[u8], headers: &[u8]) -> Preflight {
        let method_ok = self.methods.iter().any(|m| m.as_bytes() == method);
        let headers_ok = self.any_header
            || headers
                .split(|b| *b == b',')
                .map(|h| h.trim_ascii())
                .filter(|h| !h.is_empty())
                .all(|h| {
                    self.headers
                        .iter()
                        .any(|a| h.eq_ignore_ascii_case(a.as_bytes()))
                });
        if self.allows_origin(origin) && method_ok && headers_ok {
            Preflight::Allowed
        } else {
            Preflight::Refused
        }
    }

    /// The fields every answer of the route carries for a request from `origin` (none when
    /// the request has no Origin): `Vary: Origin`, and for an allowed origin the allow fields.
    /// `origin` was checked for CR, LF and NUL by the request parser (it is a field value).
    pub fn write_response_fields(&self, origin: Option<&[u8]>, out: &mut Vec<u8>) {
        out.extend_from_slice(b"vary: origin\r\n");
        let Some(origin) = origin.filter(|o| self.allows_origin(o)) else {
            return;
        };
        self.write_allow_origin(origin, out);
        out.extend_from_slice(&self.expose_line);
    }

    /// The fields of an allowed preflight's 204.
    pub fn write_preflight_fields(
        &self,
        origin: &[u8],
        requested_headers: &[u8],
        out: &mut Vec<u8>,
    ) {
        out.extend_from_slice(
            b"vary: origin, access-control-request-method, access-control-request-headers\r\n",
        );
        self.write_allow_origin(origin, out);
        out.extend_from_slice(&self.preflight_fixed);
        if self.any_header && !requested_headers.trim_ascii().is_empty() {
            out.extend_from_slice(b"access-control-allow-headers: ");
            out.extend_from_slice(requested_headers.trim_ascii());
            out.extend_from_slice(b"\r\n");
        }
    }

    fn write_allow_origin(&self, origin: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(b"access-control-allow-origin: ");
        // `*` only without credentials; with them the browser needs the origin itself.
        if !self.credentials && self.origins.contains(&OriginRule::Any) {
            out.push(b'*');
        } else {
            out.extend_from_slice(origin);
        }
        out.extend_from_slice(b"\r\n");
        if self.credentials {
            out.extend_from_slice(b"access-control-allow-credentials: true\r\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(src: &str) -> CorsPolicy {
        let config: CorsConfig = toml::from_str(src).unwrap();
        config
            .validate(&|| crate::config::key_path("cors"))
            .unwrap();
        CorsPolicy::compile(&config)
    }

    #[test]
    fn origin_rules() {
        let p = policy(r#"allow_origins = ["https://app.example.com", "https://*.example.org"]"#);
        for (origin, want) in [
            ("https://app.example.com", true),
            ("HTTPS://APP.example.com", true),
            ("http://app.example.com", false),
            ("https://app.example.com.evil.net", false),
            ("https://a.b.example.org", true),
            ("https://example.org", false),
            ("https://evil.net/.example.org", false),
            ("https://evilexample.org", false),
            ("null", false),
        ] {
            assert_eq!(p.allows_origin(origin.as_bytes()), want, "{origin}");
        }
        for bad in [
            "example.com",
            "https://",
            "https://a/b",
            "https://*.*.x",
            "*.x",
        ] {
            assert!(OriginRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn preflights() {
        let p = policy(
            r#"allow_origins = ["https://app.example.com"]
allow_methods = ["GET", "PUT"]
allow_headers = ["Content-Type", "X-Trace"]
credentials = true
max_age = "10m""#,
        );
        let o = b"https://app.example.com";
        assert_eq!(
            p.judge_preflight(o, b"PUT", b"content-type, x-trace"),
            Preflight::Allowed
        );
        assert_eq!(p.judge_preflight(o, b"DELETE", b""), Preflight::Refused);
        assert_eq!(p.judge_preflight(o, b"PUT", b"x-other"), Preflight::Refused);
        assert_eq!(
            p.judge_preflight(b"https://evil.net", b"GET", b""),
            Preflight::Refused
        );
        let mut out = Vec::new();
        p.write_preflight_fields(o, b"content-type", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("access-control-allow-origin: https://app.example.com\r\n"),
            "{text}"
        );
        assert!(
            text.contains("access-control-allow-credentials: true\r\n"),
            "{text}"
        );
        assert!(
            text.contains("access-control-allow-methods: GET, PUT\r\n"),
            "{text}"
        );
        assert!(text.contains("access-control-max-age: 600\r\n"), "{text}");
        let mut out = Vec::new();
        p.write_response_fields(Some(b"https://evil.net"), &mut out);
        assert_eq!(out, b"vary: origin\r\n");
    }
}
