//! `cargo xtask`: the project's build, run and test entry points.
//!
//! - `build-ebpf`: checks for (and installs where it can) rust-src, a bpf-linker built against
//!   the LLVM major that rustc uses, and that LLVM's dev files; then builds the XDP object.
//! - `run`: builds everything and runs the gateway with `config/gateway.toml` in front of the
//!   bundled demo upstream.
//! - `test`: the whole suite, privileged tests included when run as root.
//! - `bench`: Portcullis beside nginx, haproxy and the direct backend.
//! - `bench-auth-flood`: a legitimate client's rate during a flood of forged tokens.
//! - `bench-reload`: failed requests and p99 while reloading; throughput against a baseline.
//! - `bench-observability`: the throughput and p99 cost of metrics and of the access log.
//! - `bench-tls`: full and resumed handshakes per second and the server's CPU per handshake, and
//!   1 KiB keep-alive requests per second over TLS, beside nginx.
//! - `bench-vault`: the time to first byte the LLM key vault adds to a streamed (SSE) response,
//!   a vault route against a plain route to the same upstream.
//! - `bench-transform`: the throughput cost of header rules with a regex rewrite, and of a JSON
//!   body transform, against plain routes to the same backend resources.
//! - `bench-balance`: p50, p99 and failed requests per balancing policy, with and without
//!   outlier ejection, while one of three servers is slow and then killed; and the keys that
//!   consistent hashing moves when one of four servers is removed.

mod bench;
mod bench_auth;
mod bench_balance;
mod bench_idle;
mod bench_observability;
mod bench_reload;
mod bench_tls;
mod bench_transform;
mod bench_vault;
mod bench_xdp;
mod ebpf;
mod plot;
mod prerequisites;
mod run;
mod test;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the XDP object (installing the toolchain pieces it needs where possible).
    BuildEbpf,
    /// Build and run the gateway with config/gateway.toml and the demo upstream.
    Run {
        /// Config file to run instead of config/gateway.toml.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Benchmark Portcullis beside nginx, haproxy and the direct backend.
    Bench {
        /// Seconds per measured run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// A short run for iteration: at most 3 s per measured run, one repeat, 2,000 idle
        /// connections, and no 2-worker scenario unless --two-workers asks for it.
        #[arg(long)]
        quick: bool,
        /// Measured rounds, each running every target once per measurement in a rotated
        /// order; the tables have the median and the min–max (default 5, with --quick 1).
        #[arg(long)]
        repeats: Option<usize>,
        /// Run the 2-worker scenario (2 workers each and a 2-thread client on the same two
        /// cores); always part of a full run, skipped by --quick without this flag.
        #[arg(long)]
        two_workers: bool,
        /// Idle keep-alive connections held open against each proxy for its memory per idle
        /// connection and its figures under them (default 10000, with --quick 2000; 0 skips).
        #[arg(long)]
        idle: Option<usize>,
    },
    /// (root) XDP cost per packet on each path, and a flood with and without XDP.
    BenchXdp {
        /// Seconds per flood run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// A legitimate client's rate on a JWT route during a flood of distinct forged tokens,
    /// with and without a pre-auth limit.
    BenchAuthFlood {
        /// Seconds per measured run.
        #[arg(long, default_value_t = 8.0)]
        duration: f64,
    },
    /// Failed requests and p99 under a steady load while the config is reloaded every second;
    /// with --baseline-bin, throughput against another build of the gateway.
    BenchReload {
        /// Seconds per measured run.
        #[arg(long, default_value_t = 20.0)]
        duration: f64,
        /// Another `portcullis` binary (such as the previous commit's release build).
        #[arg(long)]
        baseline_bin: Option<std::path::PathBuf>,
    },
    /// Throughput and p99 with metrics, and with metrics and the access log, against neither.
    BenchObservability {
        /// Seconds per measured run.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
    },
    /// Full and resumed TLS handshakes per second with the server's CPU time per handshake, and
    /// 1 KiB keep-alive requests per second over TLS, beside nginx with the same certificate.
    BenchTls {
        /// Seconds per measured run.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
    },
    /// The time to first byte that the LLM key vault adds to a streamed (server-sent events)
    /// response: a vault route against a plain route to the same upstream, and the backend
    /// directly, interleaved in one run.
    BenchVault {
        /// Seconds of measured rounds (all three targets together, after a warm-up).
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
    },
    /// Throughput of a plain route against one with five header rules and a regex rewrite, and
    /// of a 4 KiB JSON response untouched against the same enriched by a JSON body transform,
    /// interleaved in one run.
    BenchTransform {
        /// Seconds per measured run.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Measured rounds (each runs every target once); the table has the median.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Load generator connections (closed loop).
        #[arg(long, default_value_t = bench::MAX_CONNECTIONS)]
        connections: usize,
    },
    /// p50, p99 and failed requests under an open-loop load for round robin and least-request,
    /// each with and without outlier ejection, while one of three backends answers 50 ms late
    /// and then after it is killed; and the share of keys consistent hashing moves when one of
    /// four servers is removed.
    BenchBalance {
        /// Seconds per measured run.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Requests per second of the open-loop load (over 64 connections).
        #[arg(long, default_value_t = 2000)]
        rate: u32,
        /// Rounds (each runs every policy in both phases once); the table has the median.
        #[arg(long, default_value_t = 1)]
        repeats: usize,
    },
    /// Run every test (as root: the privileged XDP tests too).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::BuildEbpf => ebpf::build().map(|_| ()),
        Task::Run { config } => run::run(config),
        Task::Test { cargo_args } => test::run(&cargo_args),
        Task::Bench {
            duration,
            quick,
            repeats,
            two_workers,
            idle,
        } => bench::run(bench::Options {
            duration,
            quick,
            repeats,
            two_workers,
            idle,
        }),
        Task::BenchXdp { duration } => bench_xdp::run(duration),
        Task::BenchAuthFlood { duration } => bench_auth::run(duration),
        Task::BenchReload {
            duration,
            baseline_bin,
        } => bench_reload::run(duration, baseline_bin),
        Task::BenchObservability { duration } => bench_observability::run(duration),
        Task::BenchTls { duration } => bench_tls::run(duration),
        Task::BenchVault { duration } => bench_vault::run(duration),
        Task::BenchTransform {
            duration,
            repeats,
            connections,
        } => bench_transform::run(duration, repeats, connections),
        Task::BenchBalance {
            duration,
            rate,
            repeats,
        } => bench_balance::run(duration, rate, repeats),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The target directory, honouring CARGO_TARGET_DIR.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// `cargo`, as the one running xtask. When the XDP object exists its path is passed on, so the
/// gateway's build script embeds it (and notices when it appears).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    let object = ebpf::object_path();
    if object.is_file() {
        c.env("PORTCULLIS_EBPF_OBJECT", object);
    }
    c
}

/// Builds the gateway and the bench binaries (backend, loadgen, xdp_bench) in release mode.
pub fn build_release() -> anyhow::Result<PathBuf> {
    run_checked(cargo().args([
        "build",
        "--release",
        "--package",
        "portcullis",
        "--package",
        "portcullis-benches",
    ]))?;
    Ok(target_dir().join("release"))
}

/// Runs a command, failing with its name when it does not succeed.
pub fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("cannot start {:?}: {e}", cmd.get_program()))?;
    if !status.success() {
        anyhow::bail!("{:?} failed ({status})", cmd);
    }
    Ok(())
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}
