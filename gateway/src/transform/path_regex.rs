//! Regex routes: a route's `path_regex`, compiled once and anchored at both ends, matched
//! against the normalised path; its captures are written into a buffer the request context
//! keeps, so matching a regex route allocates nothing once that buffer has grown.
//!
//! The `regex` crate's own engine (`regex_automata::meta`, which `regex` wraps) is used
//! directly for its caller-owned capture slots.

use regex_automata::{meta::Regex, util::primitives::NonMaxUsize, Input, PatternID};

/// Most bytes a compiled path regex may take: a route is an operator's, but a pattern like
/// `(a{1000}){1000}` should fail at load, not exhaust memory.
pub const MAX_REGEX_BYTES: usize = 1 << 20;

/// A route's compiled path regex.
#[derive(Debug, Clone)]
pub struct PathRegex {
    regex: Regex,
}

impl PathRegex {
    /// Compiles `pattern`, anchored at both ends; the error says what is wrong with it.
    pub fn compile(pattern: &str) -> Result<PathRegex, String> {
        let regex = Regex::builder()
            .configure(
                Regex::config()
                    .nfa_size_limit(Some(MAX_REGEX_BYTES))
                    .hybrid_cache_capacity(MAX_REGEX_BYTES),
            )
            .build(&format!("^(?:{pattern})$"))
            .map_err(|e| e.to_string())?;
        Ok(PathRegex { regex })
    }

    pub fn is_match(&self, path: &[u8]) -> bool {
        self.regex.is_match(Input::new(path))
    }

    /// The group a template's `{path.NAME}` or `{path.N}` names, if the regex has it.
    pub fn group(&self, name: &str) -> Option<usize> {
        let info = self.regex.group_info();
        match name.parse::<usize>() {
            Ok(n) => (n < info.group_len(PatternID::ZERO)).then_some(n),
            Err(_) => info.to_index(PatternID::ZERO, name),
        }
    }

    /// Writes the capture spans of `path` into `slots` (resized to fit); false when the path
    /// does not match.
    pub fn captures(&self, path: &[u8], slots: &mut Vec<Option<NonMaxUsize>>) -> bool {
        slots.clear();
        slots.resize(self.regex.group_info().slot_len(), None);
        self.regex.search_slots(&Input::new(path), slots).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchored_with_named_and_numbered_groups() {
        let r = PathRegex::compile(r"/users/(?<id>\d+)(/.*)?").unwrap();
        assert!(r.is_match(b"/users/42"));
        assert!(r.is_match(b"/users/42/posts"));
        assert!(!r.is_match(b"/x/users/42"), "anchored at the start");
        assert!(!r.is_match(b"/users/42x"), "anchored at the end");
        assert_eq!(r.group("id"), Some(1));
        assert_eq!(r.group("2"), Some(2));
        assert_eq!(r.group("3"), None);
        assert_eq!(r.group("nope"), None);
        let mut slots = Vec::new();
        assert!(r.captures(b"/users/42/posts", &mut slots));
        let span = |g: usize| (slots[2 * g].unwrap().get(), slots[2 * g + 1].unwrap().get());
        assert_eq!(span(1), (7, 9));
        assert_eq!(span(2), (9, 15));
        assert!(PathRegex::compile("(unclosed").is_err());
        assert!(PathRegex::compile("(a{1000}){1000}").is_err());
    }
}
