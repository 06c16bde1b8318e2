//! `cargo xtask test`: the whole suite.

use crate::{cargo, is_root, run_checked};

pub fn run(extra: &[String]) -> anyhow::Result<()> {
    let root = is_root();
    let object = match crate::ebpf::build() {
        Ok(object) => Some(object),
        // As root (and so in CI) the XDP tests must run: a missing object is a failure.
        Err(e) if root => {
            return Err(e.context("the XDP object is needed for the privileged tests"))
        }
        Err(e) => {
            eprintln!("xtask: warning: XDP object not built ({e:#}); XDP tests will report themselves skipped");
            None
        }
    };
    let mut cmd = cargo();
    cmd.args(["test", "--no-fail-fast"]).args(extra);
    if let Some(object) = &object {
        cmd.env("PORTCULLIS_EBPF_OBJECT", object);
    }
    if root {
        // Privileged tests fail instead of skipping when something they need is missing.
        cmd.env("PORTCULLIS_REQUIRE_PRIVILEGED", "1");
    } else {
        eprintln!("xtask: not root: privileged XDP tests will report themselves skipped");
    }
    run_checked(&mut cmd)
}
