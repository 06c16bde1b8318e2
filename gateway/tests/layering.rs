//! The modules of the request path import one another in one direction only:
//! `http` (the codec) <- `routing` <- `proxy` <- `runtime`. The codec imports nothing of the
//! crate at all, so it knows nothing of routes, auth or config. Checked by reading the sources:
//! every `crate::NAME` path and every first segment of a `use crate::{...}` list outside test
//! modules.

use std::{collections::BTreeSet, path::Path};

const ORDER: [&str; 4] = ["http", "routing", "proxy", "runtime"];

/// Top-level crate modules `text` refers to.
fn references(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(list) = rest.strip_prefix('{') {
            // A `use crate::{a::b, c, d::{e, f}}` list: the first segment of each item.
            let (mut depth, mut item) = (1, String::new());
            for c in list.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 || (c == ',' && depth == 1) {
                    let first: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !first.is_empty() {
                        out.insert(first);
                    }
                    item.clear();
                    if depth == 0 {
                        break;
                    }
                } else {
                    item.push(c);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

fn sources(module: &str) -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let dir = src.join(module);
    let mut files = Vec::new();
    if dir.is_dir() {
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    files.push(p);
                }
            }
        }
    } else {
        files.push(src.join(format!("{module}.rs")));
    }
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            // Test modules may reach anywhere.
            let code = text.split("#[cfg(test)]").next().unwrap_or("").to_owned();
            (p.display().to_string(), code)
        })
        .collect()
}

#[test]
fn request_path_modules_import_in_one_direction() {
    let mut seen = 0;
    for (rank, module) in ORDER.iter().enumerate() {
        for (file, code) in sources(module) {
            seen += 1;
            let refs = references(&code);
            for later in &ORDER[rank + 1..] {
                assert!(
                    !refs.contains(*later),
                    "{file} ({module}) imports `{later}`, which builds on it"
                );
            }
        }
    }
    assert!(seen > 20, "read only {seen} files");
    for (file, code) in sources("http") {
        let refs = references(&code);
        assert!(refs.is_empty(), "{file}: the codec imports {refs:?}");
    }
    // The checker itself sees what it must.
    let sample =
        "use crate::{\n    http::encode,\n    proxy::{a, b},\n};\nlet x = crate::runtime::f();";
    assert_eq!(
        references(sample).into_iter().collect::<Vec<_>>(),
        ["http", "proxy", "runtime"]
    );
}
