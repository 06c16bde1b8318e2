//! Config of a route's transformations: header, query and JSON body rules, the path regex and
//! its rewrite, CORS, and the format of the gateway's own error answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{error::KeyPath, is_token_byte, ConfigDuration, Invalid};
use crate::transform::template::{Template, Variable};

/// Header rules for one direction (see [`crate::transform::headers`] for the order).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderRulesConfig {
    #[serde(default)]
    pub remove: Vec<String>,
    /// Old name to new name.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Replaces every copy (or adds the field).
    #[serde(default)]
    pub set: BTreeMap<String, Template>,
    /// Adds the field only when the message has none.
    #[serde(default)]
    pub add: BTreeMap<String, Template>,
    /// Adds one more copy.
    #[serde(default)]
    pub append: BTreeMap<String, Template>,
}

/// Query parameter rules.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRulesConfig {
    #[serde(default)]
    pub remove: Vec<String>,
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    #[serde(default)]
    pub set: BTreeMap<String, Template>,
    #[serde(default)]
    pub add: BTreeMap<String, Template>,
}

/// A value a JSON rule writes: a TOML string is a template (rendered to a JSON string); any
/// other TOML value is written as the JSON it maps to.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum JsonValueConfig {
    Template(Template),
    Literal(serde_json::Value),
}

impl<'de> Deserialize<'de> for JsonValueConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Not `untagged`: a string that is not a valid template is an error, never a literal.
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Template::parse(&s)
                .map(JsonValueConfig::Template)
                .map_err(|e| serde::de::Error::custom(format!("template `{s}`: {e}"))),
            other => Ok(JsonValueConfig::Literal(other)),
        }
    }
}

/// JSON body rules for one direction, keyed by JSON Pointer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JsonRulesConfig {
    #[serde(default)]
    pub remove: Vec<String>,
    #[serde(default)]
    pub set: BTreeMap<String, JsonValueConfig>,
    #[serde(default)]
    pub add: BTreeMap<String, JsonValueConfig>,
    /// Largest body buffered for the rules: a larger request gets 413, a larger response
    /// passes untouched (counted).
    #[serde(default = "default_json_max_bytes")]
    pub max_bytes: usize,
    /// Responses only: rewrite a gzip- or deflate-encoded body too (it is sent decoded);
    /// otherwise an encoded body passes untouched (counted).
    #[serde(default)]
    pub decompress: bool,
}

fn default_json_max_bytes() -> usize {
    1024 * 1024
}

/// Largest `max_bytes` a JSON rule may buffer.
pub const MAX_JSON_BODY_BYTES: usize = 64 * 1024 * 1024;

/// How the gateway's own answers carry their explanation.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ErrorFormat {
    /// `text/plain`: one line naming the problem.
    #[default]
    Text,
    /// `application/json`: `{"status", "code", "message", "request_id"}`.
    Json,
}

/// A route's CORS policy (answered by the gateway; see [`crate::cors`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// `https://app.example.com`, `https://*.example.com` (any subdomain, not the domain
    /// itself), or `*` (any origin; not with `credentials`).
    pub allow_origins: Vec<String>,
    /// Methods a preflight may ask for; default: GET, HEAD, POST.
    #[serde(default = "default_cors_methods")]
    pub allow_methods: Vec<String>,
    /// Request fields a preflight may ask for (case-insensitive); `["*"]` for any.
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response fields the browser lets scripts read.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Send `Access-Control-Allow-Credentials: true` (cookies and auth with the request).
    #[serde(default)]
    pub credentials: bool,
    /// How long a browser may keep a preflight's answer.
    pub max_age: Option<ConfigDuration>,
}

fn default_cors_methods() -> Vec<String> {
    ["GET", "HEAD", "POST"].map(String::from).to_vec()
}

/// Request fields rules may not touch: the gateway frames the message and writes these itself.
const REQUEST_FIELDS_OWNED: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
];

/// Response fields rules may not touch, for the same reason.
const RESPONSE_FIELDS_OWNED: [&str; 7] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "trailer",
    "keep-alive",
    "proxy-connection",
];

/// Which message a set of header rules edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

impl HeaderRulesConfig {
    pub fn validate(
        &self,
        at: &dyn Fn() -> KeyPath,
        direction: Direction,
        captures: &dyn Fn(&str) -> bool,
    ) -> Result<(), Invalid> {
        let owned: &[&str] = match direction {
            Direction::Request => &REQUEST_FIELDS_OWNED,
            Direction::Response => &RESPONSE_FIELDS_OWNED,
        };
        let check_name = |key: KeyPath, name: &str| {
            if name.is_empty() || !name.bytes().all(is_token_byte) {
                return Err(Invalid::new(
                    key,
                    format!("`{name}` is not a field name (letters, digits and !#$%&'*+-.^_`|~)"),
                ));
            }
            let lower = name.to_ascii_lowercase();
            let gateway_owned = owned.contains(&lower.as_str())
                || (direction == Direction::Request
                    && crate::proxy::upstream_head::written_by_gateway(&lower));
            if gateway_owned {
                return Err(Invalid::new(key, format!("`{name}` is written by the gateway itself (framing, connection, forwarding or identity); rules may not change it")));
            }
            Ok(())
        };
        for (j, name) in self.remove.iter().enumerate() {
            check_name(at().key("remove").index(j), name)?;
        }
        for (from, to) in &self.rename {
            check_name(at().key("rename").key(from), from)?;
            check_name(at().key("rename").key(from), to)?;
        }
        for (key, map) in [
            ("set", &self.set),
            ("add", &self.add),
            ("append", &self.append),
        ] {
            for (name, template) in map {
                check_name(at().key(key).key(name), name)?;
                check_template(at().key(key).key(name), template, captures)?;
            }
        }
        Ok(())
    }
}

/// Query names rules may use: RFC 3986 unreserved, so they go out as written.
fn is_query_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

impl QueryRulesConfig {
    pub fn validate(
        &self,
        at: &dyn Fn() -> KeyPath,
        captures: &dyn Fn(&str) -> bool,
    ) -> Result<(), Invalid> {
        let check_name = |key: KeyPath, name: &str| {
            if is_query_name(name) {
                Ok(())
            } else {
                Err(Invalid::new(
                    key,
                    format!("`{name}` is not a plain parameter name: use letters, digits and -._~"),
                ))
            }
        };
        for (j, name) in self.remove.iter().enumerate() {
            check_name(at().key("remove").index(j), name)?;
        }
        for (from, to) in &self.rename {
            check_name(at().key("rename").key(from), from)?;
            check_name(at().key("rename").key(from), to)?;
        }
        for (key, map) in [("set", &self.set), ("add", &self.add)] {
            for (name, template) in map {
                check_name(at().key(key).key(name), name)?;
                check_template(at().key(key).key(name), template, captures)?;
            }
        }
        Ok(())
    }
}

impl JsonRulesConfig {
    pub fn validate(
        &self,
        at: &dyn Fn() -> KeyPath,
        captures: &dyn Fn(&str) -> bool,
    ) -> Result<(), Invalid> {
        let check_pointer = |key: KeyPath, p: &str| {
            if p.starts_with('/') {
                Ok(())
            } else {
                Err(Invalid::new(key, format!("`{p}` is not a JSON Pointer (RFC 6901): write paths such as `/meta/source` or `/items/0/id`")))
            }
        };
        for (j, p) in self.remove.iter().enumerate() {
            check_pointer(at().key("remove").index(j), p)?;
        }
        for (key, map) in [("set", &self.set), ("add", &self.add)] {
            for (p, value) in map {
                check_pointer(at().key(key).key(p), p)?;
                if let JsonValueConfig::Template(t) = value {
                    check_template(at().key(key).key(p), t, captures)?;
                }
            }
        }
        let pointers: Vec<&str> = self
            .remove
            .iter()
            .chain(self.set.keys())
            .chain(self.add.keys())
            .map(String::as_str)
            .collect();
        if let Some((outer, inner)) = crate::transform::json_body::nested_pointers(&pointers) {
            return Err(Invalid::new(
                at(),
                format!("`{inner}` lies inside `{outer}`: one rule's path may not be inside another's (set the whole value at `{outer}` instead)"),
            ));
        }
        if self.max_bytes == 0 || self.max_bytes > MAX_JSON_BODY_BYTES {
            return Err(Invalid::new(
                at().key("max_bytes"),
                format!(
                    "{} is not valid: use 1 to {MAX_JSON_BODY_BYTES} bytes",
                    self.max_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// Refuses a template naming a capture the route's `path_regex` does not have.
pub fn check_template(
    key: KeyPath,
    template: &Template,
    captures: &dyn Fn(&str) -> bool,
) -> Result<(), Invalid> {
    for v in template.variables() {
        if let Variable::Capture(name) = v {
            if !captures(name) {
                return Err(Invalid::new(key, format!("`{}` uses `{{path.{name}}}`, but the route's `match.path_regex` has no such capture (name it with `(?<{name}>...)`, or use its number)", template.source())));
            }
        }
    }
    Ok(())
}

impl CorsConfig {
    pub fn validate(&self, at: &dyn Fn() -> KeyPath) -> Result<(), Invalid> {
        if self.allow_origins.is_empty() {
            return Err(Invalid::new(
                at().key("allow_origins"),
                "needs at least one origin, such as \"https://app.example.com\"",
            ));
        }
        for (j, origin) in self.allow_origins.iter().enumerate() {
            if let Err(e) = crate::cors::OriginRule::parse(origin) {
                return Err(Invalid::new(at().key("allow_origins").index(j), e));
            }
            if origin == "*" && self.credentials {
                return Err(Invalid::new(at().key("allow_origins").index(j), "`*` cannot be used with `credentials = true` (browsers refuse it): list the origins"));
            }
        }
        for (j, m) in self.allow_methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(is_token_byte) {
                return Err(Invalid::new(
                    at().key("allow_methods").index(j),
                    format!("`{m}` is not a method: use tokens such as \"GET\" or \"PUT\""),
                ));
            }
        }
        for (key, list) in [
            ("allow_headers", &self.allow_headers),
            ("expose_headers", &self.expose_headers),
        ] {
            for (j, h) in list.iter().enumerate() {
                let wildcard = h == "*" && key == "allow_headers";
                if !wildcard && (h.is_empty() || !h.bytes().all(is_token_byte)) {
                    return Err(Invalid::new(
                        at().key(key).index(j),
                        format!("`{h}` is not a field name"),
                    ));
                }
            }
        }
        Ok(())
    }
}
