//! Embeds the XDP object when `cargo xtask build-ebpf` has produced it, so the `portcullis`
//! binary is self-contained. Without it the gateway still builds, and loads the object from
//! `xdp.object` or `$PORTCULLIS_EBPF_OBJECT` at run time (or says how to build it).

use std::{env, fs, path::PathBuf};

const OBJECT_NAME: &str = "portcullis-xdp";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(portcullis_ebpf_embedded)");
    println!("cargo::rerun-if-env-changed=PORTCULLIS_EBPF_OBJECT");
    println!("cargo::rerun-if-env-changed=CARGO_TARGET_DIR");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let candidate = match env::var_os("PORTCULLIS_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            // OUT_DIR is <target>/<profile>/build/<pkg>/out (one more level with --target).
            let target_dir = env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    out_dir
                        .ancestors()
                        .find(|a| {
                            a.join("bpfel-unknown-none").is_dir()
                                || a.file_name().is_some_and(|n| n == "target")
                        })
                        .map(PathBuf::from)
                        .unwrap_or_else(|| out_dir.clone())
                });
            target_dir
                .join("bpfel-unknown-none/release")
                .join(OBJECT_NAME)
        }
    };
    // Watching a missing path would rerun this script, and rebuild the crate, on every build.
    // So: the object when it exists; else the directory `cargo xtask build-ebpf` creates, when
    // that exists; else nothing (xtask passes PORTCULLIS_EBPF_OBJECT, which reruns this script).
    if candidate.is_file() {
        println!("cargo::rerun-if-changed={}", candidate.display());
    } else if let Some(dir) = candidate
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "bpfel-unknown-none"))
        .filter(|d| d.is_dir())
    {
        println!("cargo::rerun-if-changed={}", dir.display());
    }
    let embedded = out_dir.join("portcullis-xdp.o");
    match fs::read(&candidate) {
        Ok(bytes) => {
            fs::write(&embedded, bytes).expect("write the embedded object");
            println!("cargo::rustc-cfg=portcullis_ebpf_embedded");
        }
        Err(_) => {
            let _ = fs::remove_file(&embedded);
            println!(
                "cargo::warning=XDP object not found at {}: the gateway is built without it (run `cargo xtask build-ebpf` to embed it)",
                candidate.display()
            );
        }
    }
}
