//! `cargo xtask build-ebpf`: one line per step, installing what is missing where it can.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context};

use crate::{cargo, is_root, run_checked, target_dir};

/// The bpf-linker release this project builds with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM majors bpf-linker 0.13 has a feature for.
const SUPPORTED_LLVM: [u32; 3] = [21, 22, 23];
/// Debian/Ubuntu packages bpf-linker needs to build against LLVM `NN`.
const LLVM_PACKAGES: [&str; 7] = [
    "llvm-NN-dev",
    "libpolly-NN-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "libxml2-dev",
    "libffi-dev",
    "libncurses-dev",
];

/// Path of the built object.
pub fn object_path() -> PathBuf {
    target_dir().join("bpfel-unknown-none/release/portcullis-xdp")
}

fn step(msg: &str) {
    eprintln!("build-ebpf: {msg}");
}

/// The LLVM major version of the active rustc.
fn rustc_llvm_major() -> anyhow::Result<u32> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("cannot run `rustc -vV`")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc -vV` does not report an LLVM version")?;
    version
        .split('.')
        .next()
        .unwrap_or("")
        .parse()
        .context("unreadable LLVM version")
}

fn has_rust_src() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
        })
        .unwrap_or(false)
}

/// The LLVM major bpf-linker is linked against, if it is installed.
fn bpf_linker_llvm_major() -> Option<Option<u32>> {
    let path = which("bpf-linker")?;
    let out = Command::new("ldd").arg(&path).output().ok();
    let major = out.and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .find_map(|w| w.strip_prefix("libLLVM").map(str::to_owned))
            .and_then(|rest| {
                rest.trim_start_matches(['-', '.', 's', 'o'])
                    .split(['.', '-'])
                    .find_map(|p| p.parse::<u32>().ok())
            })
    });
    Some(major)
}

/// The path of `bin` on PATH or in cargo's bin directory.
pub fn which(bin: &str) -> Option<PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        })
        .join("bin");
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([cargo_bin])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

fn llvm_prefix(major: u32) -> PathBuf {
    PathBuf::from(format!("/usr/lib/llvm-{major}"))
}

fn ensure_llvm_dev(major: u32) -> anyhow::Result<()> {
    let prefix = llvm_prefix(major);
    if prefix.join("bin/llvm-config").is_file() && prefix.join("include/llvm").is_dir() {
        step(&format!(
            "ok: LLVM {major} development files at {}",
            prefix.display()
        ));
        return Ok(());
    }
    let packages: Vec<String> = LLVM_PACKAGES
        .iter()
        .map(|p| p.replace("NN", &major.to_string()))
        .collect();
    let command = format!(
        "apt-get update && apt-get install -y {}",
        packages.join(" ")
    );
    if !is_root() || which("apt-get").is_none() {
        bail!("LLVM {major} development files are missing; install them with:\n    sudo {command}");
    }
    step(&format!(
        "installing LLVM {major} development files: {command}"
    ));
    run_checked(Command::new("apt-get").arg("update").arg("-qq"))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn install_bpf_linker(major: u32) -> anyhow::Result<()> {
    if !SUPPORTED_LLVM.contains(&major) {
        bail!("rustc uses LLVM {major}, but bpf-linker {BPF_LINKER_VERSION} supports LLVM {SUPPORTED_LLVM:?}; use a rustc whose `rustc -vV` reports one of those");
    }
    ensure_llvm_dev(major)?;
    let prefix = llvm_prefix(major);
    step(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} against LLVM {major}: LLVM_PREFIX={} cargo install bpf-linker --version {BPF_LINKER_VERSION} --locked --no-default-features --features llvm-{major} --force",
        prefix.display()
    ));
    let path = format!(
        "{}:{}",
        prefix.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run_checked(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .arg("--force")
            .env("LLVM_PREFIX", &prefix)
            .env("PATH", path)
            // The workspace's target dir is not meant for tools.
            .env_remove("CARGO_TARGET_DIR"),
    )
}

/// Checks the toolchain, installs what is missing, builds the object and returns its path.
pub fn build() -> anyhow::Result<PathBuf> {
    let major = rustc_llvm_major()?;
    step(&format!("ok: rustc uses LLVM {major}"));
    if has_rust_src() {
        step("ok: rust-src component");
    } else {
        step("installing the rust-src component: rustup component add rust-src");
        run_checked(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    match bpf_linker_llvm_major() {
        Some(Some(m)) if m == major => step(&format!("ok: bpf-linker (LLVM {m})")),
        Some(Some(m)) => {
            step(&format!(
                "bpf-linker is built against LLVM {m}, rustc uses {major}: rebuilding it"
            ));
            install_bpf_linker(major)?;
        }
        Some(None) => {
            step("bpf-linker found but its LLVM version is unknown: rebuilding it");
            install_bpf_linker(major)?;
        }
        None => {
            step("bpf-linker is missing");
            install_bpf_linker(major)?;
        }
    }
    step("building ebpf/ for bpfel-unknown-none");
    let cargo_bin = which("bpf-linker").and_then(|p| p.parent().map(PathBuf::from));
    let mut path = std::env::var("PATH").unwrap_or_default();
    if let Some(dir) = cargo_bin {
        path = format!("{}:{path}", dir.display());
    }
    run_checked(
        cargo()
            .args([
                "build",
                "--package",
                "portcullis-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
            ])
            .env("RUSTC_BOOTSTRAP", "1")
            // v3 has the atomics the rate limiter needs (BPF_CMPXCHG, fetch-and-op); kernels
            // since 5.12 run it.
            .env(
                "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
                "-C target-cpu=v3",
            )
            .env("PATH", path),
    )?;
    let object = object_path();
    if !object.is_file() {
        bail!("the build succeeded but {} is missing", object.display());
    }
    step(&format!("ok: {}", object.display()));
    Ok(object)
}
