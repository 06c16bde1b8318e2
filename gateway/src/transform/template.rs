//! Value templates: text with `{variable}` placeholders over the request context, parsed and
//! checked once at load, rendered per request straight into the buffer being built.
//!
//! Variables: `client_ip`, `consumer`, `consumer_groups`, `claim.NAME` (a verified JWT's
//! claim), `request_id`, `route`, `path.NAME` or `path.N` (a capture of the route's
//! `path_regex`), `host` (as the client sent it), `path` (normalised, without the query),
//! `method`, `header.NAME` (the client's field), `time` (RFC 3339, UTC) and `time_unix`.
//! `{{` and `}}` stand for literal braces. A variable with no value (no consumer, no such
//! claim) renders as nothing.

use std::{fmt, io::Write, net::IpAddr};

use serde::{Deserialize, Serialize};

/// Most parts one template may have; templates are written by operators, not clients, but a
/// bound keeps a typo from making a huge one.
pub const MAX_TEMPLATE_PARTS: usize = 64;

/// Why a template was refused at load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("`{{` opens a variable that is never closed (write `{{{{` for a literal brace)")]
    Unclosed,
    #[error("`}}` without `{{` (write `}}}}` for a literal brace)")]
    StrayClose,
    #[error("unknown variable `{0}`: use client_ip, consumer, consumer_groups, claim.NAME, request_id, route, path.NAME, host, path, method, header.NAME, time or time_unix")]
    UnknownVariable(String),
    #[error("the template holds CR, LF or NUL, which would split a head")]
    ControlCharacter,
    #[error("more than {MAX_TEMPLATE_PARTS} parts")]
    TooLong,
}

/// A variable of a path template rendered as more (or less) than one plain segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a value in the rewritten path is not one plain path segment")]
pub struct NotASegment;

/// One variable of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Variable {
    ClientIp,
    Consumer,
    ConsumerGroups,
    Claim(Box<str>),
    RequestId,
    Route,
    /// A capture of the route's path regex, by name (or number) as written.
    Capture(Box<str>),
    /// The same capture, resolved to its group index when the route was compiled.
    Group(usize),
    Host,
    Path,
    Method,
    /// A field of the client's request (name in lower case).
    Header(Box<str>),
    Time,
    TimeUnix,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Box<str>),
    Variable(Variable),
}

/// A parsed template.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    source: Box<str>,
    parts: Box<[Part]>,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Template({:?})", self.source)
    }
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        if source.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err(TemplateError::ControlCharacter);
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = source;
        while let Some(i) = rest.find(['{', '}']) {
            literal.push_str(&rest[..i]);
            let brace = rest.as_bytes()[i];
            let after = &rest[i + 1..];
            if after.as_bytes().first() == Some(&brace) {
                literal.push(brace as char);
                rest = &after[1..];
                continue;
            }
            if brace == b'}' {
                return Err(TemplateError::StrayClose);
            }
            let end = after.find('}').ok_or(TemplateError::Unclosed)?;
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal).into()));
            }
            parts.push(Part::Variable(Variable::parse(&after[..end])?));
            rest = &after[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal.into()));
        }
        if parts.len() > MAX_TEMPLATE_PARTS {
            return Err(TemplateError::TooLong);
        }
        Ok(Template {
            source: source.into(),
            parts: parts.into(),
        })
    }

    /// The text as written in the config.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Every variable, in order.
    pub fn variables(&self) -> impl Iterator<Item = &Variable> {
        self.parts.iter().filter_map(|p| match p {
            Part::Variable(v) => Some(v),
            Part::Literal(_) => None,
        })
    }

    /// The literal text before the first variable.
    pub fn literal_prefix(&self) -> &str {
        match self.parts.first() {
            Some(Part::Literal(l)) => l,
            _ => "",
        }
    }

    /// This template with its captures resolved to group indexes by `group` (a name or a
    /// number to an index); `None` names the first capture that does not exist.
    pub fn resolved(&self, group: &dyn Fn(&str) -> Option<usize>) -> Result<Template, Box<str>> {
        let parts = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Variable(Variable::Capture(name)) => group(name)
                    .map(|i| Part::Variable(Variable::Group(i)))
                    .ok_or_else(|| name.clone()),
                other => Ok(other.clone()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Template {
            source: self.source.clone(),
            parts: parts.into(),
        })
    }

    /// Appends the template rendered as a path to `out`. `{path}` and captures come from the
    /// normalised path as they are; every other variable must render as one plain segment
    /// (RFC 3986 unreserved characters, sub-delimiters but `;`, `:` and `@`; not `.` or
    /// `..`), since an upstream that decodes `%2F` or `%2e` or splits at `;` would otherwise
    /// see segments no route matched. `Err` (with `out` holding part of it) when one does not.
    pub fn render_path(&self, ctx: &RenderContext, out: &mut Vec<u8>) -> Result<(), NotASegment> {
        for part in self.parts.iter() {
            match part {
                Part::Literal(l) => out.extend_from_slice(l.as_bytes()),
                Part::Variable(v @ (Variable::Path | Variable::Group(_))) => ctx.write(v, out),
                Part::Variable(v) => {
                    let start = out.len();
                    ctx.write(v, out);
                    let value = &out[start..];
                    let plain = value.iter().all(|b| {
                        b.is_ascii_alphanumeric()
                            || matches!(
                                b,
                                b'-' | b'.'
                                    | b'_'
                                    | b'~'
                                    | b'!'
                                    | b'$'
                                    | b'&'
                                    | b'\''
                                    | b'('
                                    | b')'
                                    | b'*'
                                    | b'+'
                                    | b','
                                    | b'='
                                    | b':'
                                    | b'@'
                            )
                    });
                    if !plain || value == b"." || value == b".." {
                        return Err(NotASegment);
                    }
                }
            }
        }
        Ok(())
    }

    /// Appends the rendered value to `out`. The caller checks what was appended for CR, LF
    /// and NUL where it goes into a head (a client's field or claim may hold them).
    pub fn render(&self, ctx: &RenderContext, out: &mut Vec<u8>) {
        for part in self.parts.iter() {
            match part {
                Part::Literal(l) => out.extend_from_slice(l.as_bytes()),
                Part::Variable(v) => ctx.write(v, out),
            }
        }
    }
}

impl Variable {
    fn parse(name: &str) -> Result<Variable, TemplateError> {
        let unknown = || TemplateError::UnknownVariable(name.to_owned());
        let named = |rest: &str| -> Result<Box<str>, TemplateError> {
            if rest.is_empty() || rest.bytes().any(|b| b.is_ascii_whitespace()) {
                Err(unknown())
            } else {
                Ok(rest.into())
            }
        };
        Ok(match name {
            "client_ip" => Variable::ClientIp,
            "consumer" => Variable::Consumer,
            "consumer_groups" => Variable::ConsumerGroups,
            "request_id" => Variable::RequestId,
            "route" => Variable::Route,
            "host" => Variable::Host,
            "path" => Variable::Path,
            "method" => Variable::Method,
            "time" => Variable::Time,
            "time_unix" => Variable::TimeUnix,
            _ => match name.split_once('.') {
                Some(("claim", rest)) => Variable::Claim(named(rest)?),
                Some(("path", rest)) => Variable::Capture(named(rest)?),
                Some(("header", rest)) => {
                    let rest = named(rest)?;
                    if !rest.bytes().all(crate::config::is_token_byte) {
                        return Err(unknown());
                    }
                    Variable::Header(rest.to_ascii_lowercase().into())
                }
                _ => return Err(unknown()),
            },
        })
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Template::parse(&s).map_err(|e| serde::de::Error::custom(format!("template `{s}`: {e}")))
    }
}

impl Serialize for Template {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

/// What templates are rendered over: one request's context, borrowed.
#[derive(Clone, Copy)]
pub struct RenderContext<'a> {
    pub client_ip: IpAddr,
    /// The consumer id and its groups joined with `,`.
    pub consumer: Option<(&'a str, &'a str)>,
    pub token: Option<&'a crate::auth::TokenIdentity>,
    /// The request id as sent upstream and to the client.
    pub request_id: &'a [u8],
    pub route: &'a str,
    /// The normalised path, and the capture spans of the route's regex over it
    /// (`2 * group` is a group's start, `2 * group + 1` its end).
    pub path: &'a [u8],
    pub captures: &'a [Option<regex_automata::util::primitives::NonMaxUsize>],
    pub host: &'a [u8],
    pub method: &'a str,
    pub headers: &'a [httparse::Header<'a>],
    pub now: std::time::SystemTime,
}

impl<'a> RenderContext<'a> {
    /// What templates see of `req` from `client_ip` on route `route`, before any caller is
    /// known (no consumer, no claims, no captures).
    pub fn of_request(
        req: &'a crate::http::request::RequestHead<'a, 'a>,
        client_ip: IpAddr,
        route: &'a str,
        request_id: &'a [u8],
    ) -> RenderContext<'a> {
        RenderContext {
            client_ip,
            consumer: None,
            token: None,
            request_id,
            route,
            path: req.path,
            captures: &[],
            host: req.host.unwrap_or(b""),
            method: req.method,
            headers: req.headers,
            now: std::time::SystemTime::now(),
        }
    }

    /// A context for tests: client 198.51.100.4, no consumer, route `r`, path `/`, `headers`.
    #[cfg(test)]
    pub fn for_tests(headers: &'a [httparse::Header<'a>]) -> RenderContext<'a> {
        RenderContext {
            client_ip: "198.51.100.4".parse().expect("literal address"),
            consumer: None,
            token: None,
            request_id: b"id",
            route: "r",
            path: b"/",
            captures: &[],
            host: b"",
            method: "GET",
            headers,
            now: std::time::UNIX_EPOCH,
        }
    }

    fn write(&self, v: &Variable, out: &mut Vec<u8>) {
        match v {
            Variable::ClientIp => {
                let _ = write!(out, "{}", self.client_ip);
            }
            Variable::Consumer => {
                if let Some((id, _)) = self.consumer {
                    out.extend_from_slice(id.as_bytes());
                }
            }
            Variable::ConsumerGroups => {
                if let Some((_, groups)) = self.consumer {
                    out.extend_from_slice(groups.as_bytes());
                }
            }
            Variable::Claim(name) => match self.token.and_then(|t| t.claim(name)) {
                Some(serde_json::Value::String(s)) => out.extend_from_slice(s.as_bytes()),
                Some(other) => {
                    let _ = serde_json::to_writer(&mut *out, other);
                }
                None => {}
            },
            Variable::RequestId => out.extend_from_slice(self.request_id),
            Variable::Route => out.extend_from_slice(self.route.as_bytes()),
            Variable::Group(i) => {
                let start = self.captures.get(2 * i).copied().flatten();
                let end = self.captures.get(2 * i + 1).copied().flatten();
                if let (Some(s), Some(e)) = (start, end) {
                    if let Some(text) = self.path.get(s.get()..e.get()) {
                        out.extend_from_slice(text);
                    }
                }
            }
            // Validation resolves every capture of a route's templates; one left means the
            // template is not a route's (no captures to give).
            Variable::Capture(_) => {}
            Variable::Host => out.extend_from_slice(self.host),
            Variable::Path => out.extend_from_slice(self.path),
            Variable::Method => out.extend_from_slice(self.method.as_bytes()),
            Variable::Header(name) => {
                let mut first = true;
                for h in self
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(name))
                {
                    if !first {
                        out.extend_from_slice(b", ");
                    }
                    first = false;
                    out.extend_from_slice(h.value);
                }
            }
            Variable::Time => {
                let _ = write!(out, "{}", humantime::format_rfc3339_seconds(self.now));
            }
            Variable::TimeUnix => {
                let secs = self
                    .now
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let _ = write!(out, "{secs}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(headers: &'a [httparse::Header<'a>]) -> RenderContext<'a> {
        RenderContext {
            client_ip: "203.0.113.9".parse().unwrap(),
            consumer: Some(("alice", "admins,ops")),
            token: None,
            request_id: b"00ff",
            route: "api",
            path: b"/users/42",
            captures: &[],
            host: b"Example.com:8080",
            method: "GET",
            headers,
            now: std::time::UNIX_EPOCH + std::time::Duration::from_secs(86_400),
        }
    }

    fn render(t: &str, c: &RenderContext) -> String {
        let mut out = Vec::new();
        Template::parse(t).unwrap().render(c, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn renders_each_source() {
        let headers = [
            httparse::Header {
                name: "X-Tenant",
                value: b"t1",
            },
            httparse::Header {
                name: "x-tenant",
                value: b"t2",
            },
        ];
        let c = ctx(&headers);
        assert_eq!(
            render(
                "{client_ip}|{consumer}|{consumer_groups}|{request_id}|{route}",
                &c
            ),
            "203.0.113.9|alice|admins,ops|00ff|api"
        );
        assert_eq!(
            render("{method} {host}{path} {header.X-Tenant}", &c),
            "GET Example.com:8080/users/42 t1, t2"
        );
        assert_eq!(
            render("{time} {time_unix}", &c),
            "1970-01-02T00:00:00Z 86400"
        );
        assert_eq!(render("{{literal}} {claim.sub}!", &c), "{literal} !");
    }

    #[test]
    fn refuses_what_cannot_be_a_template() {
        for (bad, want) in [
            ("a{consumer", TemplateError::Unclosed),
            ("a}b", TemplateError::StrayClose),
            ("{nope}", TemplateError::UnknownVariable("nope".into())),
            ("{claim.}", TemplateError::UnknownVariable("claim.".into())),
            ("x\r\nInjected: 1", TemplateError::ControlCharacter),
        ] {
            assert_eq!(Template::parse(bad).unwrap_err(), want, "{bad:?}");
        }
    }

    #[test]
    fn captures_resolve_by_name() {
        let t = Template::parse("/v2/accounts/{path.id}").unwrap();
        assert!(t.resolved(&|_| None).is_err());
        let t = t.resolved(&|n| (n == "id").then_some(1)).unwrap();
        let slots = [
            regex_automata::util::primitives::NonMaxUsize::new(0),
            regex_automata::util::primitives::NonMaxUsize::new(9),
            regex_automata::util::primitives::NonMaxUsize::new(7),
            regex_automata::util::primitives::NonMaxUsize::new(9),
        ];
        let mut c = ctx(&[]);
        c.captures = &slots;
        let mut out = Vec::new();
        t.render(&c, &mut out);
        assert_eq!(out, b"/v2/accounts/42");
    }
}
