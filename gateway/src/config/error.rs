//! Config errors that name the file, the line and the key, and say what would be valid.

use std::{fmt, path::PathBuf};

use toml_edit::{ImDocument, Item, Table, Value};

/// One step of a path to a key in the config document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySegment {
    Key(String),
    Index(usize),
}

/// A path to a config key, such as `routes[2].match.host`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<KeySegment>);

impl KeyPath {
    pub fn key(mut self, key: &str) -> Self {
        self.0.push(KeySegment::Key(key.to_owned()));
        self
    }
    pub fn index(mut self, index: usize) -> Self {
        self.0.push(KeySegment::Index(index));
        self
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                KeySegment::Key(k) if i == 0 => write!(f, "{k}")?,
                KeySegment::Key(k) => write!(f, ".{k}")?,
                KeySegment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Start a key path: `key_path("server").key("listen")`.
pub fn key_path(first: &str) -> KeyPath {
    KeyPath::default().key(first)
}

/// A validation failure before its position in the file is known.
#[derive(Debug)]
pub struct Invalid {
    pub key: KeyPath,
    pub message: String,
}

impl Invalid {
    pub fn new(key: KeyPath, message: impl Into<String>) -> Self {
        Invalid {
            key,
            message: message.into(),
        }
    }
}

/// A config file that cannot be used, located in the file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when the position is known.
    pub line: Option<usize>,
    /// The key at fault, when known.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The 1-based line holding byte `offset` of `source`.
pub fn line_of(source: &str, offset: usize) -> usize {
    source.as_bytes()[..offset.min(source.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Finds the line where `path` is written in `source`, or the deepest parent that exists.
pub fn locate(source: &str, path: &KeyPath) -> Option<usize> {
    let doc = ImDocument::parse(source).ok()?;
    let mut best: Option<usize> = None;
    let mut node = Node::Table(doc.as_table());
    for seg in &path.0 {
        let step = match (node, seg) {
            (Node::Table(t), KeySegment::Key(k)) => table_key(t, k),
            (Node::Value(Value::InlineTable(t)), KeySegment::Key(k)) => t
                .get_key_value(k)
                .and_then(|(key, item)| Some((key.span(), Node::from_item(item)?))),
            (Node::ArrayOfTables(a), KeySegment::Index(i)) => {
                a.get(*i).map(|t| (t.span(), Node::Table(t)))
            }
            (Node::Value(Value::Array(a)), KeySegment::Index(i)) => {
                a.get(*i).map(|v| (v.span(), Node::Value(v)))
            }
            _ => None,
        };
        let Some((span, next)) = step else {
            return best;
        };
        if let Some(span) = span {
            best = Some(line_of(source, span.start));
        }
        node = next;
    }
    best
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a Table),
    ArrayOfTables(&'a toml_edit::ArrayOfTables),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn from_item(item: &'a Item) -> Option<Self> {
        match item {
            Item::Table(t) => Some(Node::Table(t)),
            Item::ArrayOfTables(a) => Some(Node::ArrayOfTables(a)),
            Item::Value(v) => Some(Node::Value(v)),
            Item::None => None,
        }
    }
}

fn table_key<'a>(t: &'a Table, k: &str) -> Option<(Option<std::ops::Range<usize>>, Node<'a>)> {
    let (key, item) = t.get_key_value(k)?;
    let span = key.span().or_else(|| item.span());
    Some((span, Node::from_item(item)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_nested_keys() {
        let src = "[server]\nlisten = [\"a\"]\n\n[[routes]]\nupstream = \"x\"\n\n[[routes]]\nmatch = { host = \"h\" }\nupstream = \"y\"\n";
        assert_eq!(locate(src, &key_path("server").key("listen")), Some(2));
        assert_eq!(
            locate(src, &key_path("routes").index(1).key("upstream")),
            Some(9)
        );
        assert_eq!(
            locate(src, &key_path("routes").index(1).key("match").key("host")),
            Some(8)
        );
        // A missing key falls back to its deepest parent.
        assert_eq!(
            locate(src, &key_path("routes").index(0).key("respond")),
            Some(4)
        );
    }
}
