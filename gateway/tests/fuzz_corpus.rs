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

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 4000, failure_persistence: None, ..Default::default() })]

    /// The path harness's properties over generated paths built from the pieces that matter
    /// (slashes, dots, escapes in both cases, semicolons, backslashes, non-ASCII), beyond the
    /// committed corpus.
    #[test]
    fn path_properties_hold_for_generated_paths(
        flags in 0u8..4,
        pieces in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::strategy::Just("/".to_owned()),
                proptest::strategy::Just(".".to_owned()),
                proptest::strategy::Just("..".to_owned()),
                proptest::strategy::Just(";".to_owned()),
                proptest::strategy::Just("\\".to_owned()),
                "%[0-9A-Fa-f]{2}",
                "%[0-9A-Fa-fg-z]{0,2}",
                "[a-zA-Z0-9~_-]{1,3}",
                "%[cCdDeE][0-9a-f]%[89aAbB][0-9a-f]",
                proptest::strategy::Just("é".to_owned()),
            ],
            0..24,
        ),
    ) {
        let mut input = vec![flags, b'/'];
        for p in &pieces {
            input.extend_from_slice(p.as_bytes());
        }
        harness::path(&input);
    }
}
