//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same harnesses the
//! fuzz targets run, so every test run re-checks what fuzzing found.

#[path = "../../fuzz/src/harness.rs"]
mod harness;

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| run(&data));
        assert!(result.is_ok(), "{} fails on {}", target, path.display());
        count += 1;
    }
    assert!(count > 0, "empty corpus for {target}");
}

#[test]
fn request_head_corpus() {
    replay("request_head", harness::request_head);
}

#[test]
fn chunked_corpus() {
    replay("chunked", harness::chunked);
}

#[test]
fn response_head_corpus() {
    replay("response_head", harness::response_head);
}

#[test]
fn path_corpus() {
    replay("path", harness::path);
}
