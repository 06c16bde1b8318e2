//! JSON body rules: fields removed, set and added where absent at JSON Pointer paths (RFC
//! 6901), with template values; applied to a body buffered whole, within the route's bound.
//!
//! Order: remove, set, add. `set` and `add` create missing parent objects; an array element
//! is named by its index, and `-` appends to an array. A path through a value that is neither
//! an object nor an array is left alone.

use serde_json::{Map, Value};

use super::template::{RenderContext, Template};
use crate::config::{JsonRulesConfig, JsonValueConfig};

/// What a rule writes at its path.
#[derive(Debug)]
pub enum JsonValue {
    /// A string rendered from a template.
    Template(Template),
    /// A literal JSON value (a TOML number, boolean, array or table).
    Literal(Value),
}

/// A route's rules for one direction.
#[derive(Debug)]
pub struct JsonRules {
    remove: Box<[Box<[String]>]>,
    set: Box<[(Box<[String]>, JsonValue)]>,
    add: Box<[(Box<[String]>, JsonValue)]>,
    /// Largest body buffered for the rules.
    pub max_bytes: usize,
    /// Also rewrite bodies with a `Content-Encoding` (decoded, sent unencoded).
    pub decompress: bool,
}

/// The reference tokens of a JSON Pointer (validation checked it starts with `/`).
pub fn pointer_tokens(pointer: &str) -> Box<[String]> {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// Why a response passed untouched by the route's JSON rules (counted per route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonSkip {
    /// Larger than `max_bytes`.
    TooLarge,
    /// Declared JSON but not parseable.
    NotJson,
    /// Content-Encoding, without `decompress` (or one the gateway cannot decode).
    Encoded,
}

impl JsonSkip {
    /// Every reason, in the order of [`JsonSkip::index`]; the metric's `reason` label.
    pub const LABELS: [&'static str; 3] = ["too_large", "not_json", "encoded"];

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why a body was not rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JsonBodyError {
    #[error("the body is not valid JSON")]
    NotJson,
}

impl JsonRules {
    pub fn compile(config: &JsonRulesConfig, resolve: &dyn Fn(&Template) -> Template) -> Self {
        let values = |m: &std::collections::BTreeMap<String, JsonValueConfig>| {
            m.iter()
                .map(|(p, v)| {
                    let value = match v {
                        JsonValueConfig::Template(t) => JsonValue::Template(resolve(t)),
                        JsonValueConfig::Literal(l) => JsonValue::Literal(l.clone()),
                    };
                    (pointer_tokens(p), value)
                })
                .collect::<Box<[_]>>()
        };
        JsonRules {
            remove: config.remove.iter().map(|p| pointer_tokens(p)).collect(),
            set: values(&config.set),
            add: values(&config.add),
            max_bytes: config.max_bytes,
            decompress: config.decompress,
        }
    }

    pub fn templates(&self) -> impl Iterator<Item = &Template> {
        self.set
            .iter()
            .chain(self.add.iter())
            .filter_map(|(_, v)| match v {
                JsonValue::Template(t) => Some(t),
                JsonValue::Literal(_) => None,
            })
    }

    /// The body with the rules applied.
    pub fn apply(&self, body: &[u8], ctx: &RenderContext) -> Result<Vec<u8>, JsonBodyError> {
        let mut doc: Value = serde_json::from_slice(body).map_err(|_| JsonBodyError::NotJson)?;
        for path in self.remove.iter() {
            remove(&mut doc, path);
        }
        let mut scratch = Vec::new();
        let mut render = |v: &JsonValue| match v {
            JsonValue::Literal(l) => l.clone(),
            JsonValue::Template(t) => {
                scratch.clear();
                t.render(ctx, &mut scratch);
                Value::String(String::from_utf8_lossy(&scratch).into_owned())
            }
        };
        for (path, value) in self.set.iter() {
            if let Some(slot) = slot(&mut doc, path, true) {
                slot.put(render(value));
            }
        }
        for (path, value) in self.add.iter() {
            if let Some(slot) = slot(&mut doc, path, false) {
                slot.put(render(value));
            }
        }
        serde_json::to_vec(&doc).map_err(|_| JsonBodyError::NotJson)
    }
}

/// Where a value goes: a key of an object or a place in an array.
enum Slot<'v> {
    Key(&'v mut Map<String, Value>, String),
    Index(&'v mut Vec<Value>, usize),
    Append(&'v mut Vec<Value>),
}

impl Slot<'_> {
    fn put(self, value: Value) {
        match self {
            Slot::Key(map, key) => {
                map.insert(key, value);
            }
            Slot::Index(items, i) => items[i] = value,
            Slot::Append(items) => items.push(value),
        }
    }
}

/// The slot `path` names, creating missing parent objects; with `replace` false, only a slot
/// that holds nothing yet.
fn slot<'v>(doc: &'v mut Value, path: &[String], replace: bool) -> Option<Slot<'v>> {
    let (last, parents) = path.split_last()?;
    let mut here = doc;
    for token in parents {
        here = match here {
            Value::Object(map) => map
                .entry(token.clone())
                .or_insert_with(|| Value::Object(Map::new())),
            Value::Array(items) => {
                let i: usize = token.parse().ok()?;
                items.get_mut(i)?
            }
            _ => return None,
        };
    }
    match here {
        Value::Object(map) => {
            (replace || !map.contains_key(last)).then(|| Slot::Key(map, last.clone()))
        }
        Value::Array(items) => {
            if last == "-" {
                return Some(Slot::Append(items));
            }
            let i: usize = last.parse().ok()?;
            (replace && i < items.len()).then_some(Slot::Index(items, i))
        }
        _ => None,
    }
}

fn remove(doc: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut here = doc;
    for token in parents {
        here = match here {
            Value::Object(map) => match map.get_mut(token) {
                Some(v) => v,
                None => return,
            },
            Value::Array(items) => match token.parse::<usize>().ok().and_then(|i| items.get_mut(i))
            {
                Some(v) => v,
                None => return,
            },
            _ => return,
        };
    }
    match here {
        Value::Object(map) => {
            map.remove(last);
        }
        Value::Array(items) => {
            if let Some(i) = last.parse::<usize>().ok().filter(|i| *i < items.len()) {
                items.remove(i);
            }
        }
        _ => {}
    }
}

/// Whether a `Content-Type` value names JSON (`application/json` or a `+json` type).
pub fn is_json_media_type(value: &[u8]) -> bool {
    let essence = value.split(|b| *b == b';').next().unwrap_or(b"");
    let essence = essence.trim_ascii();
    essence.eq_ignore_ascii_case(b"application/json")
        || (essence.len() > 5
            && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json")
            && essence.contains(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(src: &str) -> JsonRules {
        let config: JsonRulesConfig = toml::from_str(src).unwrap();
        JsonRules::compile(&config, &|t| t.clone())
    }

    fn apply(r: &JsonRules, body: &str) -> Value {
        let ctx = RenderContext {
            consumer: Some(("alice", "")),
            request_id: b"rid",
            ..RenderContext::for_tests(&[])
        };
        serde_json::from_slice(&r.apply(body.as_bytes(), &ctx).unwrap()).unwrap()
    }

    #[test]
    fn add_set_remove_nested() {
        let r = rules(
            r#"
remove = ["/secret", "/items/0/internal", "/a~1b"]
set = { "/meta/by" = "{consumer}", "/version" = 2, "/items/1" = "second", "/items/-" = { z = true } }
add = { "/meta/request" = "{request_id}", "/name" = "not added: present" }
"#,
        );
        let out = apply(
            &r,
            r#"{"name":"n","secret":1,"a/b":0,"items":[{"internal":1,"x":1},"old"]}"#,
        );
        assert_eq!(
            out,
            serde_json::json!({
                "name": "n",
                "version": 2,
                "meta": {"by": "alice", "request": "rid"},
                "items": [{"x": 1}, "second", {"z": true}]
            })
        );
    }

    #[test]
    fn not_json_is_an_error_and_scalars_are_left_alone() {
        let r = rules(r#"set = { "/a/b" = "x" }"#);
        let ctx_body = |b: &str| r.apply(b.as_bytes(), &RenderContext::for_tests(&[]));
        assert_eq!(ctx_body("{nope"), Err(JsonBodyError::NotJson));
        assert_eq!(ctx_body(r#"{"a":"scalar"}"#).unwrap(), br#"{"a":"scalar"}"#);
    }

    #[test]
    fn media_types() {
        for (v, want) in [
            (&b"application/json"[..], true),
            (b"Application/JSON; charset=utf-8", true),
            (b"application/problem+json", true),
            (b"text/plain", false),
            (b"+json", false),
        ] {
            assert_eq!(is_json_media_type(v), want, "{v:?}");
        }
    }
}
