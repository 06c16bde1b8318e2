//! Header rules: fields of a request or response removed, renamed, set, added where absent and
//! appended, compiled once from config and applied while the head is rebuilt, so applying them
//! costs no allocation beyond the head itself.
//!
//! Order, as Kong's transformers: remove, rename, set (replaces every copy), add (only when no
//! copy is left), append (one more copy).

use crate::{
    config::HeaderRulesConfig,
    http::{
        encode::checked,
        fields::{same_cgi_name, FieldFate},
    },
};

use super::template::{RenderContext, Template};

/// A route's (or an upstream's) rules for one direction.
#[derive(Debug, Default)]
pub struct HeaderRules {
    /// Lower-case names.
    remove: Box<[Box<str>]>,
    rename: Box<[(Box<str>, Box<str>)]>,
    set: Box<[(Box<str>, Template)]>,
    add: Box<[(Box<str>, Template)]>,
    append: Box<[(Box<str>, Template)]>,
}

/// A lower-case copy of a field name.
fn lower(name: &str) -> Box<str> {
    name.to_ascii_lowercase().into()
}

impl HeaderRules {
    /// Compiles `config`; `resolve` gives the templates their route's capture groups
    /// (validation already refused captures the route does not have).
    pub fn compile(
        config: &HeaderRulesConfig,
        resolve: &dyn Fn(&Template) -> Template,
    ) -> HeaderRules {
        let templates = |m: &std::collections::BTreeMap<String, Template>| {
            m.iter()
                .map(|(k, t)| (lower(k), resolve(t)))
                .collect::<Box<[_]>>()
        };
        HeaderRules {
            remove: config.remove.iter().map(|n| lower(n)).collect(),
            rename: config
                .rename
                .iter()
                .map(|(from, to)| (lower(from), lower(to)))
                .collect(),
            set: templates(&config.set),
            add: templates(&config.add),
            append: templates(&config.append),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.rename.is_empty()
            && self.set.is_empty()
            && self.add.is_empty()
            && self.append.is_empty()
    }

    // Names compare as CGI does (`X_User_Id` is `x-user-id`): a copy under another spelling
    // would reach a CGI, WSGI or Rack upstream as the same variable.
    fn sets(&self, name: &str) -> bool {
        self.set.iter().any(|(n, _)| same_cgi_name(name, n))
    }

    fn removes(&self, name: &str) -> bool {
        self.remove.iter().any(|n| same_cgi_name(name, n))
    }

    /// What becomes of a field `name` that arrived.
    pub fn fate(&self, name: &str) -> FieldFate<'_> {
        if self.removes(name) || self.sets(name) {
            return FieldFate::Drop;
        }
        match self
            .rename
            .iter()
            .find(|(from, _)| same_cgi_name(name, from))
        {
            // A copy renamed onto a name that is removed or set goes the way of that name.
            Some((_, to)) if self.removes(to) || self.sets(to) => FieldFate::Drop,
            Some((_, to)) => FieldFate::Rename(to),
            None => FieldFate::Keep,
        }
    }

    /// Writes the rules' own fields after the arrived ones (`arrived`: the names of those the
    /// message keeps, as they came): set, add where no copy is left after remove and rename,
    /// append. A rendered value holding CR, LF or NUL is not written; returns how many were
    /// dropped so.
    pub fn write_added<'n>(
        &self,
        arrived: impl Iterator<Item = &'n str> + Clone,
        ctx: &RenderContext,
        out: &mut Vec<u8>,
    ) -> u64 {
        let mut dropped = 0;
        let present = |name: &str| {
            self.sets(name)
                || arrived.clone().any(|a| match self.fate(a) {
                    FieldFate::Keep => same_cgi_name(a, name),
                    FieldFate::Rename(to) => same_cgi_name(to, name),
                    FieldFate::Drop => false,
                })
        };
        let chosen = self
            .set
            .iter()
            .chain(self.add.iter().filter(|(name, _)| !present(name)))
            .chain(self.append.iter());
        for (name, template) in chosen {
            if !write_rendered(out, name, template, ctx) {
                dropped += 1;
            }
        }
        dropped
    }
}

/// Writes `name: value` with `template` rendered as the value; false (and nothing written)
/// when the value holds CR, LF or NUL.
pub fn write_rendered(
    out: &mut Vec<u8>,
    name: &str,
    template: &Template,
    ctx: &RenderContext,
) -> bool {
    let mark = out.len();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    let value_start = out.len();
    template.render(ctx, out);
    if checked(name, &out[value_start..]).is_err() {
        out.truncate(mark);
        return false;
    }
    out.extend_from_slice(b"\r\n");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml_src: &str) -> HeaderRules {
        let config: HeaderRulesConfig = toml::from_str(toml_src).unwrap();
        HeaderRules::compile(&config, &|t| t.clone())
    }

    fn ctx<'a>(headers: &'a [httparse::Header<'a>]) -> RenderContext<'a> {
        RenderContext::for_tests(headers)
    }

    #[test]
    fn each_kind_in_order() {
        let r = rules(
            r#"
remove = ["X-Debug"]
rename = { "x-old" = "x-new", "x-gone" = "x-debug" }
set = { "x-set" = "s" }
add = { "x-new" = "not added: a renamed copy is there", "x-fresh" = "f" }
append = { "x-list" = "2" }
"#,
        );
        assert_eq!(r.fate("x-debug"), FieldFate::Drop);
        assert_eq!(r.fate("X-Set"), FieldFate::Drop);
        assert_eq!(r.fate("X-OLD"), FieldFate::Rename("x-new"));
        assert_eq!(r.fate("x-gone"), FieldFate::Drop);
        assert_eq!(r.fate("x-list"), FieldFate::Keep);
        let mut out = Vec::new();
        let dropped = r.write_added(["X-Old", "x-list"].into_iter(), &ctx(&[]), &mut out);
        assert_eq!(dropped, 0);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "x-set: s\r\nx-fresh: f\r\nx-list: 2\r\n"
        );
    }

    #[test]
    fn a_value_that_would_split_the_head_is_dropped() {
        let r = rules(r#"set = { "x-copy" = "{header.x-in}", "x-ok" = "ok" }"#);
        let headers = [httparse::Header {
            name: "x-in",
            value: b"a\r\nx-evil: 1",
        }];
        let mut out = Vec::new();
        let dropped = r.write_added(std::iter::empty(), &ctx(&headers), &mut out);
        assert_eq!(dropped, 1);
        assert_eq!(out, b"x-ok: ok\r\n");
    }
}
