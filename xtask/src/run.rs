//! `cargo xtask run`: the demo, end to end.

use std::{
    path::PathBuf,
    process::{Child, Command},
};

use anyhow::Context;

use crate::workspace_root;

/// Where the demo upstream listens (config/gateway.toml points there).
const DEMO_UPSTREAM: &str = "127.0.0.1:9001";

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    // The default config does not use XDP, so a missing eBPF toolchain only disables it.
    if let Err(e) = crate::ebpf::build() {
        eprintln!("xtask: warning: the XDP object was not built ({e:#}); configs with [xdp] will need `xdp.object`");
    }
    let bin = crate::build_release()?;
    let config = config.unwrap_or_else(|| workspace_root().join("config/gateway.toml"));
    let mut upstream = KillOnDrop(
        Command::new(bin.join("backend"))
            .args(["--listen", DEMO_UPSTREAM])
            .spawn()
            .context("cannot start the demo upstream")?,
    );
    // The backend exits at once when it cannot listen (say, the port is taken): stop here
    // rather than run a gateway in front of whatever else answers there.
    std::thread::sleep(std::time::Duration::from_millis(300));
    if let Some(status) = upstream.0.try_wait()? {
        anyhow::bail!(
            "the demo upstream could not start on {DEMO_UPSTREAM} ({status}); is the port in use?"
        );
    }
    eprintln!(
        "xtask: gateway on http://127.0.0.1:8080/ (config {}); Ctrl-C stops it",
        config.display()
    );
    let status = Command::new(bin.join("portcullis"))
        .arg("--config")
        .arg(&config)
        .status()
        .context("cannot start the gateway")?;
    if !status.success() {
        anyhow::bail!("the gateway exited with {status}");
    }
    Ok(())
}
