//! Query rules: parameters of the forwarded query removed, renamed, set and added where
//! absent. Names are compared percent-decoded, so `d%65bug` is `debug`; values the rules write
//! are percent-encoded.

use percent_encoding::{percent_decode, AsciiSet, NON_ALPHANUMERIC};

use super::template::{RenderContext, Template};
use crate::config::QueryRulesConfig;

/// Bytes a rendered value may keep as they are: RFC 3986 unreserved.
const VALUE_ENCODED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A route's query rules.
#[derive(Debug, Default)]
pub struct QueryRules {
    remove: Box<[Box<str>]>,
    rename: Box<[(Box<str>, Box<str>)]>,
    set: Box<[(Box<str>, Template)]>,
    add: Box<[(Box<str>, Template)]>,
}

/// Whether a parameter name (as sent) decodes to `name`.
fn named(raw: &[u8], name: &str) -> bool {
    percent_decode(raw).eq(name.bytes())
}

impl QueryRules {
    pub fn compile(config: &QueryRulesConfig, resolve: &dyn Fn(&Template) -> Template) -> Self {
        let templates = |m: &std::collections::BTreeMap<String, Template>| {
            m.iter()
                .map(|(k, t)| (k.as_str().into(), resolve(t)))
                .collect::<Box<[_]>>()
        };
        QueryRules {
            remove: config.remove.iter().map(|n| n.as_str().into()).collect(),
            rename: config
                .rename
                .iter()
                .map(|(a, b)| (a.as_str().into(), b.as_str().into()))
                .collect(),
            set: templates(&config.set),
            add: templates(&config.add),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.rename.is_empty()
            && self.set.is_empty()
            && self.add.is_empty()
    }

    /// The name a parameter `raw` leaves with: `None` when it is dropped (removed, set anew,
    /// or `strip`, the API-key parameter).
    fn fate<'s>(&'s self, raw: &[u8], strip: Option<&str>) -> Option<Option<&'s str>> {
        if strip.is_some_and(|s| named(raw, s))
            || self.remove.iter().any(|n| named(raw, n))
            || self.set.iter().any(|(n, _)| named(raw, n))
        {
            return None;
        }
        match self.rename.iter().find(|(from, _)| named(raw, from)) {
            // Renamed onto a name that is set, removed or stripped: gone as that name would be.
            Some((_, to))
                if self.set.iter().any(|(n, _)| n == to)
                    || self.remove.iter().any(|n| n == to)
                    || strip == Some(&**to) =>
            {
                None
            }
            Some((_, to)) => Some(Some(to)),
            None => Some(None),
        }
    }

    /// Writes `query` (`?a=1`, or empty) with the rules applied, without parameter `strip`.
    pub fn write(&self, out: &mut Vec<u8>, query: &[u8], strip: Option<&str>, ctx: &RenderContext) {
        let pairs = query.strip_prefix(b"?").unwrap_or(b"");
        let pairs = || pairs.split(|b| *b == b'&').filter(|p| !p.is_empty());
        let mut first = true;
        let mut separator = |out: &mut Vec<u8>| {
            out.push(if first { b'?' } else { b'&' });
            first = false;
        };
        for pair in pairs() {
            let (key, value) = match memchr::memchr(b'=', pair) {
                Some(i) => (&pair[..i], Some(&pair[i..])),
                None => (pair, None),
            };
            match self.fate(key, strip) {
                None => continue,
                Some(None) => {
                    separator(out);
                    out.extend_from_slice(pair);
                }
                Some(Some(to)) => {
                    separator(out);
                    out.extend_from_slice(to.as_bytes());
                    out.extend_from_slice(value.unwrap_or(b""));
                }
            }
        }
        let present = |name: &str| {
            self.set.iter().any(|(n, _)| &**n == name)
                || pairs().any(|pair| {
                    let key = pair.split(|b| *b == b'=').next().unwrap_or(pair);
                    match self.fate(key, strip) {
                        None => false,
                        Some(None) => named(key, name),
                        Some(Some(to)) => to == name,
                    }
                })
        };
        let chosen = self
            .set
            .iter()
            .chain(self.add.iter().filter(|(n, _)| !present(n)));
        for (name, template) in chosen {
            separator(out);
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
            write_encoded(out, template, ctx);
        }
    }
}

/// Appends `template` rendered and percent-encoded.
fn write_encoded(out: &mut Vec<u8>, template: &Template, ctx: &RenderContext) {
    let start = out.len();
    template.render(ctx, out);
    let plain = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
    if out[start..].iter().all(plain) {
        return;
    }
    // Only a value needing escapes is copied.
    let raw = out.split_off(start);
    for piece in percent_encoding::percent_encode(&raw, VALUE_ENCODED) {
        out.extend_from_slice(piece.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(rules: &str, query: &str, strip: Option<&str>) -> String {
        let config: QueryRulesConfig = toml::from_str(rules).unwrap();
        let rules = QueryRules::compile(&config, &|t| t.clone());
        let ctx = RenderContext {
            consumer: Some(("al ice", "")),
            ..RenderContext::for_tests(&[])
        };
        let mut out = Vec::new();
        rules.write(&mut out, query.as_bytes(), strip, &ctx);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn each_kind() {
        let rules = r#"
remove = ["debug"]
rename = { "q" = "search" }
set = { "who" = "{consumer}" }
add = { "page" = "1", "search" = "none" }
"#;
        assert_eq!(
            apply(rules, "?q=rust&d%65bug=1&who=forged&x", None),
            "?search=rust&x&who=al%20ice&page=1"
        );
        // Added where absent: `search` is, without a `q` to rename.
        assert_eq!(apply(rules, "", None), "?who=al%20ice&page=1&search=none");
        assert_eq!(
            apply(rules, "?page=3&key=secret", Some("key")),
            "?page=3&who=al%20ice&search=none"
        );
        // A rename onto a removed (or stripped) name does not bring it back.
        let onto_removed =
            "remove = [\"debug\"]\nrename = { \"dbg\" = \"debug\", \"k\" = \"key\" }";
        assert_eq!(apply(onto_removed, "?dbg=1&k=s&x=1", Some("key")), "?x=1");
    }
}
