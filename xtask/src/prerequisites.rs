//! What the test suite needs on the machine besides Rust: checked one line per step, and
//! installed when missing (as root, from Debian's packages and PyPI), or the exact command
//! printed when not root.

use std::process::Command;

use anyhow::bail;

use crate::{ebpf::which, is_root, run_checked};

/// Commands the tests run, and the Debian package that provides each.
const COMMANDS: [(&str, &str, &str); 10] = [
    ("curl", "curl", "the real HTTP client in end-to-end tests"),
    ("ip", "iproute2", "network namespaces and veth pairs"),
    ("mount", "mount", "mounting bpffs for pinned maps"),
    ("openssl", "openssl", "test keys and certificates"),
    (
        "redis-server",
        "redis-server",
        "the cluster tests' shared store",
    ),
    ("python3", "python3", "the h11 conformance upstream"),
    (
        "promtool",
        "prometheus",
        "checking the metrics exposition (promtool check metrics)",
    ),
    (
        "prometheus",
        "prometheus",
        "a real Prometheus server scraping the admin endpoint",
    ),
    (
        "chromium",
        "chromium",
        "a real headless browser rendering the status page",
    ),
    (
        "testssl",
        "testssl.sh",
        "an outside scanner checking the TLS listener's protocols and suites",
    ),
];

/// Packaged services the tests start themselves on free ports: stopped if the package started
/// them, so they hold no port and write nothing.
const SERVICES: [&str; 2] = ["redis-server", "prometheus"];

/// Python modules the tests import: (module, PyPI package, Debian package, why).
const PYTHON_MODULES: [(&str, &str, &str, &str); 1] = [(
    "h11",
    "h11",
    "python3-h11",
    "the independent HTTP/1.1 parser the smuggling test uses as its arbiter",
)];

fn step(msg: &str) {
    eprintln!("test: {msg}");
}

fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn apt_install(packages: &[&str], updated: &mut bool) -> anyhow::Result<()> {
    if !*updated {
        run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
        *updated = true;
    }
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Checks every prerequisite; installs what is missing, or fails naming the command to run.
pub fn ensure() -> anyhow::Result<()> {
    let root = is_root() && which("apt-get").is_some();
    let mut apt_updated = false;
    let mut missing = Vec::new();
    for (command, package, why) in COMMANDS {
        if which(command).is_some() {
            step(&format!("ok: {command} ({why})"));
        } else {
            missing.push(package);
        }
    }
    missing.dedup();
    if !missing.is_empty() {
        let command = format!("apt-get update && apt-get install -y {}", missing.join(" "));
        if !root {
            bail!("missing test prerequisites; install them with:\n    sudo {command}");
        }
        step(&format!("installing {}: {command}", missing.join(", ")));
        apt_install(&missing, &mut apt_updated)?;
    }
    // The packaged services are not what the tests use (they start their own on free ports).
    for service in SERVICES {
        if which("systemctl").is_some()
            && Command::new("systemctl")
                .args(["is-active", "--quiet", service])
                .output()
                .is_ok_and(|o| o.status.success())
        {
            step(&format!(
                "stopping the packaged {service} service: systemctl stop {service}"
            ));
            let _ = Command::new("systemctl").args(["stop", service]).output();
        }
    }
    for (module, pypi, debian, why) in PYTHON_MODULES {
        if python_has(module) {
            step(&format!("ok: python3 module {module} ({why})"));
            continue;
        }
        let pip = format!("python3 -m pip install {pypi}");
        if !root {
            bail!("python3 module {module} is missing; install it with:\n    {pip}");
        }
        step(&format!("installing python3 module {module}: {pip}"));
        let via_pip = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--root-user-action=ignore",
                pypi,
            ])
            .status()
            .is_ok_and(|s| s.success());
        if !via_pip || !python_has(module) {
            step(&format!(
                "pip did not provide {module}: apt-get install -y {debian}"
            ));
            apt_install(&[debian], &mut apt_updated)?;
        }
        if !python_has(module) {
            bail!("python3 still cannot import {module} after installing it");
        }
    }
    Ok(())
}
