//! JSON body rules: fields removed, set and added where absent at JSON Pointer paths (RFC
//! 6901), with template values; applied to a body buffered whole, within the route's bound.
//!
//! The document is not rebuilt as a tree: it is scanned once, and only the objects and arrays
//! on a rule's path are taken apart; every other value is copied as it came, bytes, order and
//! all. For one path: `set` writes its value (replacing what is there, creating missing parent
//! objects), otherwise `remove` drops it, and `add` writes only where nothing is left. An array
//! element is named by its index in the document as it came; `-` appends to an array. A path
//! through a value that is neither an object nor an array is left alone. One rule's path may
//! not lie inside another's (validation refuses it), so rules never depend on each other's
//! order.

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{value::RawValue, Value};

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

/// What the rules do at one path.
#[derive(Debug, Default)]
struct Leaf {
    remove: bool,
    set: Option<JsonValue>,
    add: Option<JsonValue>,
}

/// One reference token of the rules' paths, with what lies below it.
#[derive(Debug)]
struct Node {
    token: String,
    /// `token` as an array index, when it is one.
    index: Option<usize>,
    /// The rules at this path (a path is either a leaf or leads to others, never both).
    leaf: Option<Leaf>,
    children: Vec<Node>,
}

impl Node {
    /// Whether a rule below writes something (so a missing parent is worth creating).
    fn writes(&self) -> bool {
        self.leaf
            .as_ref()
            .is_some_and(|l| l.set.is_some() || l.add.is_some())
            || self.children.iter().any(Node::writes)
    }
}

/// A route's rules for one direction.
#[derive(Debug)]
pub struct JsonRules {
    /// The first tokens of every path.
    root: Vec<Node>,
    /// Largest body buffered for the rules.
    pub max_bytes: usize,
    /// Also rewrite bodies with a `Content-Encoding` (decoded, sent unencoded).
    pub decompress: bool,
}

/// The reference tokens of a JSON Pointer (validation checked it starts with `/`).
pub fn pointer_tokens(pointer: &str) -> Vec<String> {
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

/// The leaf of `path` under `nodes`, created with its parents.
fn leaf_at<'n>(nodes: &'n mut Vec<Node>, path: &[String]) -> &'n mut Leaf {
    let (first, rest) = path
        .split_first()
        .expect("validation refused empty pointers");
    let i = match nodes.iter().position(|n| n.token == *first) {
        Some(i) => i,
        None => {
            nodes.push(Node {
                token: first.clone(),
                index: first.parse().ok().filter(|_| !first.starts_with('+')),
                leaf: None,
                children: Vec::new(),
            });
            nodes.len() - 1
        }
    };
    let node = &mut nodes[i];
    if rest.is_empty() {
        node.leaf.get_or_insert_with(Leaf::default)
    } else {
        leaf_at(&mut node.children, rest)
    }
}

impl JsonRules {
    pub fn compile(config: &JsonRulesConfig, resolve: &dyn Fn(&Template) -> Template) -> Self {
        let value = |v: &JsonValueConfig| match v {
            JsonValueConfig::Template(t) => JsonValue::Template(resolve(t)),
            JsonValueConfig::Literal(l) => JsonValue::Literal(l.clone()),
        };
        let mut root = Vec::new();
        for p in &config.remove {
            leaf_at(&mut root, &pointer_tokens(p)).remove = true;
        }
        for (p, v) in &config.set {
            leaf_at(&mut root, &pointer_tokens(p)).set = Some(value(v));
        }
        for (p, v) in &config.add {
            leaf_at(&mut root, &pointer_tokens(p)).add = Some(value(v));
        }
        JsonRules {
            root,
            max_bytes: config.max_bytes,
            decompress: config.decompress,
        }
    }

    /// The body with the rules applied.
    pub fn apply(&self, body: &[u8], ctx: &RenderContext) -> Result<Vec<u8>, JsonBodyError> {
        let bad = |_| JsonBodyError::NotJson;
        let mut out = Vec::with_capacity(body.len() + 256);
        let mut writer = Writer {
            ctx,
            scratch: Vec::new(),
        };
        // The document is scanned once at the top (which also checks all of it is JSON), then
        // again only inside the values the rules' paths enter.
        match body.trim_ascii_start().first() {
            Some(b'{') => {
                let members: Members = serde_json::from_slice(body).map_err(bad)?;
                writer.object(&members.0, &self.root, &mut out)?;
            }
            Some(b'[') => {
                let items: Elements = serde_json::from_slice(body).map_err(bad)?;
                writer.array(&items.0, &self.root, &mut out)?;
            }
            _ => {
                serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(bad)?;
                out.extend_from_slice(body);
            }
        }
        Ok(out)
    }
}

/// An object member's name, borrowed from the document unless it held escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// An object's members in document order, their values unparsed.
struct Members<'a>(Vec<(Key<'a>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    members.push(entry);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(MembersVisitor)
    }
}

/// An array's elements, unparsed.
struct Elements<'a>(Vec<&'a RawValue>);

impl<'de> Deserialize<'de> for Elements<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ElementsVisitor;
        impl<'de> Visitor<'de> for ElementsVisitor {
            type Value = Elements<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Elements<'de>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(16));
                while let Some(item) = seq.next_element::<&'de RawValue>()? {
                    items.push(item);
                }
                Ok(Elements(items))
            }
        }
        d.deserialize_seq(ElementsVisitor)
    }
}

/// Writes the edited document.
struct Writer<'c, 'r> {
    ctx: &'c RenderContext<'r>,
    scratch: Vec<u8>,
}

/// Writes `,` before every item but the first.
fn separate(out: &mut Vec<u8>, first: &mut bool) {
    if !*first {
        out.push(b',');
    }
    *first = false;
}

fn write_key(out: &mut Vec<u8>, key: &str) {
    let _ = serde_json::to_writer(&mut *out, key);
    out.push(b':');
}

impl Writer<'_, '_> {
    fn value(&mut self, v: &JsonValue, out: &mut Vec<u8>) {
        match v {
            JsonValue::Literal(l) => {
                let _ = serde_json::to_writer(&mut *out, l);
            }
            JsonValue::Template(t) => {
                self.scratch.clear();
                t.render(self.ctx, &mut self.scratch);
                let text = String::from_utf8_lossy(&self.scratch);
                let _ = serde_json::to_writer(&mut *out, &*text);
            }
        }
    }

    /// Writes `raw` with the rules of `nodes` (the tokens below it) applied.
    fn edit(
        &mut self,
        raw: &RawValue,
        nodes: &[Node],
        out: &mut Vec<u8>,
    ) -> Result<(), JsonBodyError> {
        let text = raw.get();
        let bad = |_| JsonBodyError::NotJson;
        match text.trim_start().as_bytes().first() {
            _ if nodes.is_empty() => out.extend_from_slice(text.as_bytes()),
            Some(b'{') => {
                let members: Members = serde_json::from_str(text).map_err(bad)?;
                self.object(&members.0, nodes, out)?;
            }
            Some(b'[') => {
                let items: Elements = serde_json::from_str(text).map_err(bad)?;
                self.array(&items.0, nodes, out)?;
            }
            _ => out.extend_from_slice(text.as_bytes()),
        }
        Ok(())
    }

    fn object(
        &mut self,
        members: &[(Key, &RawValue)],
        nodes: &[Node],
        out: &mut Vec<u8>,
    ) -> Result<(), JsonBodyError> {
        out.push(b'{');
        let mut first = true;
        for (i, (key, raw)) in members.iter().enumerate() {
            let key = &*key.0;
            let Some(node) = nodes.iter().find(|n| n.token == key) else {
                separate(out, &mut first);
                write_key(out, key);
                out.extend_from_slice(raw.get().as_bytes());
                continue;
            };
            // A repeated name: the first copy is the one the rules act on.
            let repeat = members[..i].iter().any(|(k, _)| k.0 == key);
            match &node.leaf {
                None => {
                    separate(out, &mut first);
                    write_key(out, key);
                    self.edit(raw, &node.children, out)?;
                }
                Some(leaf) if repeat => {
                    if leaf.set.is_none() && !leaf.remove {
                        separate(out, &mut first);
                        write_key(out, key);
                        out.extend_from_slice(raw.get().as_bytes());
                    }
                }
                Some(leaf) => match (&leaf.set, leaf.remove, &leaf.add) {
                    (Some(v), _, _) | (None, true, Some(v)) => {
                        separate(out, &mut first);
                        write_key(out, key);
                        self.value(v, out);
                    }
                    (None, true, None) => {}
                    (None, false, _) => {
                        separate(out, &mut first);
                        write_key(out, key);
                        out.extend_from_slice(raw.get().as_bytes());
                    }
                },
            }
        }
        for node in nodes {
            if members.iter().any(|(k, _)| k.0 == node.token) {
                continue;
            }
            match &node.leaf {
                None if node.writes() => {
                    separate(out, &mut first);
                    write_key(out, &node.token);
                    self.object(&[], &node.children, out)?;
                }
                None => {}
                Some(leaf) => {
                    if let Some(v) = leaf.set.as_ref().or(leaf.add.as_ref()) {
                        separate(out, &mut first);
                        write_key(out, &node.token);
                        self.value(v, out);
                    }
                }
            }
        }
        out.push(b'}');
        Ok(())
    }

    fn array(
        &mut self,
        items: &[&RawValue],
        nodes: &[Node],
        out: &mut Vec<u8>,
    ) -> Result<(), JsonBodyError> {
        out.push(b'[');
        let mut first = true;
        for (i, raw) in items.iter().enumerate() {
            let Some(node) = nodes.iter().find(|n| n.index == Some(i)) else {
                separate(out, &mut first);
                out.extend_from_slice(raw.get().as_bytes());
                continue;
            };
            match &node.leaf {
                None => {
                    separate(out, &mut first);
                    self.edit(raw, &node.children, out)?;
                }
                Some(leaf) => match (&leaf.set, leaf.remove) {
                    (Some(v), _) => {
                        separate(out, &mut first);
                        self.value(v, out);
                    }
                    (None, true) => {}
                    (None, false) => {
                        separate(out, &mut first);
                        out.extend_from_slice(raw.get().as_bytes());
                    }
                },
            }
        }
        for node in nodes.iter().filter(|n| n.token == "-") {
            if let Some(v) = node
                .leaf
                .as_ref()
                .and_then(|l| l.set.as_ref().or(l.add.as_ref()))
            {
                separate(out, &mut first);
                self.value(v, out);
            }
        }
        out.push(b']');
        Ok(())
    }
}

/// The first pair of pointers where one lies inside the other, if any.
pub fn nested_pointers<'p>(pointers: &[&'p str]) -> Option<(&'p str, &'p str)> {
    for a in pointers {
        let ta = pointer_tokens(a);
        for b in pointers {
            let tb = pointer_tokens(b);
            if tb.len() > ta.len() && tb[..ta.len()] == ta[..] {
                return Some((a, b));
            }
        }
    }
    None
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
    fn untouched_values_keep_their_bytes_and_order() {
        let r = rules(
            r#"
remove = ["/drop", "/list/1"]
set = { "/b/x" = true }
add = { "/fresh/deep/er" = 1, "/a" = "not added" }
"#,
        );
        let body = r#"{ "z" : [1, 2.50, "\u00e9"], "a":null, "drop":{"big":[1,2,3]}, "b":{"y":"k\"q"}, "list":[0,1,2], "drop":2 }"#;
        let out = r
            .apply(body.as_bytes(), &RenderContext::for_tests(&[]))
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"z":[1, 2.50, "\u00e9"],"a":null,"b":{"y":"k\"q","x":true},"list":[0,2],"fresh":{"deep":{"er":1}}}"#
        );
    }

    #[test]
    fn nested_pointers_are_found() {
        assert_eq!(
            nested_pointers(&["/a", "/b/c", "/a/x"]),
            Some(("/a", "/a/x"))
        );
        assert_eq!(nested_pointers(&["/a", "/ab", "/b/c", "/b/d", "/a"]), None);
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
