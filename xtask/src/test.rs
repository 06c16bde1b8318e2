//! `cargo xtask test`: checks and installs the test prerequisites and the eBPF toolchain, then
//! runs the whole suite, closing with one line that totals every test binary.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
};

use anyhow::bail;

use crate::{cargo, is_root};

pub fn run(extra: &[String]) -> anyhow::Result<()> {
    let root = is_root();
    crate::prerequisites::ensure()?;
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
    cmd.args(["test", "--no-fail-fast"])
        .args(extra)
        .stdout(Stdio::piped());
    if let Some(object) = &object {
        cmd.env("PORTCULLIS_EBPF_OBJECT", object);
    }
    if root {
        // Privileged tests fail instead of skipping when something they need is missing.
        cmd.env("PORTCULLIS_REQUIRE_PRIVILEGED", "1");
    } else {
        eprintln!("xtask: not root: privileged XDP tests will report themselves skipped");
    }
    let mut child = cmd.spawn()?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                summary
                    .split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(word).map(|n| {
                            n.trim()
                                .trim_start_matches("ok. ")
                                .trim_start_matches("FAILED. ")
                        })
                    })
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
            ignored += count("ignored");
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() || failed > 0 {
        bail!("tests failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}
