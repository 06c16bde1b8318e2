//! `cargo xtask bench`: Portcullis beside nginx, haproxy and the direct backend, on the same
//! machine in the same run, each pinned the same way.
//!
//! Layout: the load generator gets the upper half of the cores (at least one), the proxy under
//! test and the backend share the others, one proxy worker per core. On two cores: proxy and
//! backend on core 0, load generator alone on core 1, one worker each.
//!
//! Besides rates and latencies: CPU time per request of each target's own processes (from
//! /proc/PID/stat around each maximum-throughput run), machine-wide softirq time per request, and,
//! where `perf` can, syscalls and io_uring submissions per request.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{is_root, run_checked, workspace_root};

const BACKEND_PORT: u16 = 19001;
/// Connections for the maximum-throughput runs.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// Connections for the fixed-rate runs.
const RATE_CONNECTIONS: usize = 32;
/// The fixed rates of the latency runs.
const LOADS: [FixedRate; 4] = [
    FixedRate::Absolute(5000.0),
    FixedRate::OfNginx(0.25),
    FixedRate::OfNginx(0.50),
    FixedRate::OfNginx(0.75),
];
/// The fixed rates of a `--quick` run (50% of nginx's for the plot).
const QUICK_LOADS: [FixedRate; 2] = [FixedRate::Absolute(5000.0), FixedRate::OfNginx(0.50)];
/// Seconds per measured run with `--quick`.
const QUICK_DURATION: f64 = 3.0;

/// The rate of a fixed-rate latency run.
#[derive(Clone, Copy, Debug)]
enum FixedRate {
    /// This many requests per second.
    Absolute(f64),
    /// This fraction of nginx's maximum 1 KiB throughput in the same run.
    OfNginx(f64),
}

impl FixedRate {
    /// Requests per second, given nginx's maximum.
    fn rps(self, nginx_max: f64) -> f64 {
        match self {
            Self::Absolute(r) => r,
            Self::OfNginx(f) => nginx_max * f,
        }
    }

    /// How the table's header names it: `5000/s` or `50%`.
    fn label(self) -> String {
        match self {
            Self::Absolute(r) => format!("{r:.0}/s"),
            Self::OfNginx(f) => format!("{:.0}%", f * 100.0),
        }
    }

    /// How its histogram file is named: `5000rps` or `50pct`.
    fn file_tag(self) -> String {
        match self {
            Self::Absolute(r) => format!("{r:.0}rps"),
            Self::OfNginx(f) => format!("{:.0}pct", f * 100.0),
        }
    }
}

pub(crate) struct Layout {
    /// Cores for the proxy and the backend.
    pub(crate) server_cores: Vec<usize>,
    /// Cores for the load generator.
    pub(crate) load_cores: Vec<usize>,
}

pub(crate) fn layout() -> Layout {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if n == 1 {
        return Layout {
            server_cores: vec![0],
            load_cores: vec![0],
        };
    }
    let load = (n / 2).max(1);
    Layout {
        server_cores: (0..n - load).collect(),
        load_cores: (n - load..n).collect(),
    }
}

pub(crate) fn cpu_list(cores: &[usize]) -> String {
    cores
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A process the benchmark started, stopped when dropped.
pub(crate) struct Proc(Child, &'static str);

impl Proc {
    /// Its process id (the program's own: taskset execs it).
    pub(crate) fn id(&self) -> u32 {
        self.0.id()
    }

    /// Kills it at once with SIGKILL, as a crash would (no chance to clean up or to close its
    /// connections in order), and reaps it.
    pub(crate) fn kill(&mut self) -> anyhow::Result<()> {
        eprintln!("bench: killing {} (SIGKILL)", self.1);
        self.0
            .kill()
            .with_context(|| format!("cannot kill {}", self.1))?;
        self.0.wait()?;
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Gone already (by `kill`, or exited): nothing to stop, and its pid may be another's.
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        eprintln!("bench: stopping {}", self.1);
        // SIGTERM first so nginx and haproxy clean up; then make sure.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        std::thread::sleep(Duration::from_millis(200));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn spawn_pinned(
    name: &'static str,
    cores: &[usize],
    program: &Path,
    args: &[&str],
    log: &Path,
) -> anyhow::Result<Proc> {
    let log_file = std::fs::File::create(log)?;
    let child = Command::new("taskset")
        .arg("-c")
        .arg(cpu_list(cores))
        .arg(program)
        .args(args)
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Proc(child, name))
}

/// One single-threaded loadgen run against `127.0.0.1:port`, pinned to `core`, its summary on
/// a piped stdout (read it with [`load_summary`]).
pub(crate) struct LoadgenRun<'a> {
    pub port: u16,
    pub path: &'a str,
    pub connections: usize,
    /// Open loop at this many requests per second; closed loop when `None`.
    pub rate: Option<u32>,
    pub duration: f64,
    pub core: usize,
    pub extra: &'a [&'a str],
}

impl LoadgenRun<'_> {
    pub(crate) fn spawn(&self, bin: &Path) -> anyhow::Result<Child> {
        let mut cmd = Command::new(bin.join("loadgen"));
        cmd.args([
            "--target",
            &format!("127.0.0.1:{}", self.port),
            "--path",
            self.path,
        ])
        .args([
            "--connections",
            &self.connections.to_string(),
            "--threads",
            "1",
        ])
        .args(["--duration", &self.duration.to_string()])
        .args(["--pin-from-core", &self.core.to_string()]);
        if let Some(rate) = self.rate {
            cmd.args(["--rate", &rate.to_string()]);
        }
        cmd.args(self.extra)
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot run loadgen")
    }
}

/// What a finished loadgen printed on its `summary` line.
pub(crate) struct LoadSummary {
    pub rps: f64,
    /// Requests answered with a 2xx (or any status, with `--any-status`).
    pub completed: u64,
    /// Requests that failed: connection errors, and other statuses without `--any-status`.
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// Waits for a loadgen started with piped stdout and reads its summary line.
pub(crate) fn load_summary(child: Child) -> anyhow::Result<LoadSummary> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("summary "))
        .context("loadgen printed no summary")?;
    let field = |name: &str| -> String {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=').map(str::to_owned))
            .unwrap_or_default()
    };
    Ok(LoadSummary {
        rps: field("rps").parse().context("rps")?,
        completed: field("completed").parse().unwrap_or(0),
        errors: field("errors").parse().unwrap_or(0),
        p50_us: field("p50_us").parse().unwrap_or(0),
        p99_us: field("p99_us").parse().unwrap_or(0),
    })
}

/// The answer to one request sent on a fresh connection, read to its end.
pub(crate) struct Reply {
    pub status: u16,
    /// The status line and header lines.
    pub head: String,
    /// Everything after the head, as received (framing included when chunked).
    pub body: String,
}

impl Reply {
    /// The first value of header `name` (case-insensitive), trimmed.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.head, name)
    }
}

/// The first value of header `name` (case-insensitive, trimmed) in a response head.
fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Where a response in `raw` ends, once all of it is there and it has a Content-Length.
fn framed_end(raw: &[u8]) -> Option<usize> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&raw[..head_end]).ok()?;
    let length: usize = header_value(head, "content-length")?.parse().ok()?;
    (raw.len() >= head_end + length).then_some(head_end + length)
}

/// Sends `request` (whole, asking for `Connection: close`) to `127.0.0.1:port` and reads the
/// answer: to its Content-Length, or else until the server closes.
pub(crate) fn http_once(port: u16, request: &str) -> anyhow::Result<Reply> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("cannot connect to 127.0.0.1:{port}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = framed_end(&raw) {
            raw.truncate(end);
            break;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok(Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// Starts the benchmark backend with one worker on `cores`, listening on `port`.
pub(crate) fn start_backend(
    bin: &Path,
    cores: &[usize],
    port: u16,
    dir: &Path,
) -> anyhow::Result<Proc> {
    start_backend_with(bin, cores, port, &[], &dir.join("backend.log"))
}

/// [`start_backend`] with more backend flags (such as `--name` or `--delay-ms`), logging to
/// `log`.
pub(crate) fn start_backend_with(
    bin: &Path,
    cores: &[usize],
    port: u16,
    extra: &[&str],
    log: &Path,
) -> anyhow::Result<Proc> {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--listen", &listen, "--workers", "1"];
    args.extend_from_slice(extra);
    let backend = spawn_pinned("backend", cores, &bin.join("backend"), &args, log)?;
    wait_for_port(port, "the backend")?;
    Ok(backend)
}

/// The median of `v` (the mean of the middle two when even); `v` must not be empty.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Starts the gateway pinned to `cores` on `config` (its log in `dir/portcullis.log`) and
/// waits until it listens on `port`.
pub(crate) fn start_gateway(
    bin: &Path,
    cores: &[usize],
    config: &Path,
    dir: &Path,
    port: u16,
) -> anyhow::Result<Proc> {
    let gateway = spawn_pinned(
        "portcullis",
        cores,
        &bin.join("portcullis"),
        &["--config", config.to_str().context("config path")?],
        &dir.join("portcullis.log"),
    )?;
    wait_for_port(port, "portcullis")?;
    Ok(gateway)
}

pub(crate) fn wait_for_port(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not start listening on port {port}")
}

pub(crate) fn which(bin: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Clock ticks per second of the times in /proc (`getconf CLK_TCK`; Linux's usual 100 if that
/// cannot be asked).
pub(crate) fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// `(ppid, utime + stime)` from a /proc/PID/stat line. The command name in parentheses may
/// hold spaces, so fields count from its closing one: state, ppid, ..., utime, stime (the
/// line's 14th and 15th fields).
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// `(pid, utime + stime)` of `root` and of every process under it, found by scanning
/// /proc/*/stat for parent ids: nginx's and haproxy's workers are their master's children;
/// Portcullis's workers are threads, already counted in its own line.
fn process_tree(root: u32) -> anyhow::Result<Vec<(u32, u64)>> {
    let mut procs: Vec<(u32, u32, u64)> = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // A process may end between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((ppid, ticks)) = parse_stat(&stat) {
            procs.push((pid, ppid, ticks));
        }
    }
    let Some(&(_, _, root_ticks)) = procs.iter().find(|p| p.0 == root) else {
        bail!("process {root} is gone");
    };
    let mut tree = vec![(root, root_ticks)];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i].0;
        tree.extend(
            procs
                .iter()
                .filter(|p| p.1 == parent)
                .map(|&(pid, _, ticks)| (pid, ticks)),
        );
        i += 1;
    }
    Ok(tree)
}

/// CPU time, in clock ticks, of `root` and every process under it (see [`process_tree`]).
pub(crate) fn tree_cpu_ticks(root: u32) -> anyhow::Result<u64> {
    Ok(process_tree(root)?.iter().map(|p| p.1).sum())
}

/// Machine-wide softirq time, in clock ticks: the seventh number of the `cpu` line of
/// /proc/stat (user, nice, system, idle, iowait, irq, softirq, ...).
fn softirq_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    stat.lines()
        .find(|l| l.starts_with("cpu "))
        .and_then(|l| l.split_whitespace().nth(7)?.parse().ok())
        .context("no softirq column in /proc/stat")
}

/// CPU counters read just before and just after a measured run.
#[derive(Clone, Copy)]
struct CpuSample {
    /// User and system ticks of the target's processes.
    target: u64,
    /// Machine-wide softirq ticks.
    softirq: u64,
}

impl CpuSample {
    /// Reads the counters of the process tree under `root` and the machine's softirq time.
    fn take(root: u32) -> anyhow::Result<Self> {
        Ok(Self {
            target: tree_cpu_ticks(root)?,
            softirq: softirq_ticks()?,
        })
    }

    /// `(target, softirq)` µs of CPU per request from `self` (before) to `after`, over
    /// `requests` completed.
    fn per_request(self, after: Self, requests: u64, ticks_per_sec: f64) -> (f64, f64) {
        let us = |from: u64, to: u64| {
            to.saturating_sub(from) as f64 * 1e6 / ticks_per_sec / requests.max(1) as f64
        };
        (
            us(self.target, after.target),
            us(self.softirq, after.softirq),
        )
    }
}

/// The tracepoints `perf stat` counts for syscalls and io_uring submissions.
const PERF_EVENTS: [&str; 2] = ["raw_syscalls:sys_enter", "io_uring:io_uring_submit_req"];

/// Whether `perf` is installed and may count [`PERF_EVENTS`] here (a short trial count).
fn perf_usable() -> bool {
    let mut cmd = Command::new("perf");
    cmd.args(["stat", "-x", ","]);
    for e in PERF_EVENTS {
        cmd.args(["-e", e]);
    }
    cmd.args(["--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A `perf stat` attached to some processes, counting [`PERF_EVENTS`] until [`stop`]ped.
///
/// [`stop`]: PerfStat::stop
struct PerfStat {
    child: Child,
    out: PathBuf,
}

impl PerfStat {
    /// Attaches to every thread of `pids`, writing the counts to `out` when stopped.
    fn start(pids: &[u32], out: &Path) -> anyhow::Result<Self> {
        let mut cmd = Command::new("perf");
        cmd.args(["stat", "-x", ",", "-o"]).arg(out);
        for e in PERF_EVENTS {
            cmd.args(["-e", e]);
        }
        let child = cmd
            .arg("-p")
            .arg(
                pids.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run perf")?;
        // perf opens its counters after it starts; give it that time before the load.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self {
            child,
            out: out.to_owned(),
        })
    }

    /// Stops it with SIGINT (so it prints its counts) and reads one count per [`PERF_EVENTS`],
    /// `None` where it counted nothing readable.
    fn stop(mut self) -> anyhow::Result<[Option<u64>; 2]> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        self.child.wait()?;
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        Ok(PERF_EVENTS.map(|event| perf_count(&text, event)))
    }
}

/// The count of `event` in `perf stat -x ,` output (`count,unit,event,...` lines).
fn perf_count(text: &str, event: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut f = l.split(',');
        let count = f.next()?;
        (f.nth(1)? == event).then(|| count.parse().ok())?
    })
}

fn ensure_tools() -> anyhow::Result<()> {
    ensure_commands(&[
        ("nginx", "nginx-light"),
        ("haproxy", "haproxy"),
        ("wrk", "wrk"),
        ("taskset", "util-linux"),
    ])
}

/// Installs (as root) the Debian packages of whichever `(command, package)` are missing, or
/// fails naming the command to run.
pub(crate) fn ensure_commands(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| which(bin).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing {missing:?}; install with: sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    eprintln!("bench: installing {}", missing.join(" "));
    run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    // The packages start their system services; the benchmark runs its own instances.
    for service in ["nginx", "haproxy"] {
        let _ = Command::new("systemctl").args(["stop", service]).status();
    }
    Ok(())
}

/// One measured run, parsed from the load generator's summary line.
#[derive(Clone, Debug, Default)]
struct Run {
    rps: f64,
    completed: u64,
    errors: u64,
    percentiles: BTreeMap<String, u64>,
    /// User and system µs of the target's own processes per completed request (set by
    /// [`measured`]).
    cpu_us: f64,
    /// Machine-wide softirq µs per completed request (set by [`measured`]).
    softirq_us: f64,
}

struct Target {
    name: &'static str,
    port: u16,
    /// The process the benchmark started for it (its workers are this one's threads or
    /// children).
    pid: u32,
}

/// What every load run shares.
struct Runner {
    bin: PathBuf,
    layout: Layout,
    clock_ticks: f64,
}

/// One load run: closed loop when `rate` is `None`.
struct Load<'a> {
    port: u16,
    path: &'a str,
    connections: usize,
    rate: Option<f64>,
    duration: f64,
    hgrm: Option<&'a Path>,
}

fn loadgen(runner: &Runner, load: Load) -> anyhow::Result<Run> {
    let Runner { bin, layout, .. } = runner;
    let Load {
        port,
        path,
        connections,
        rate,
        duration,
        hgrm,
    } = load;
    let mut cmd = Command::new(bin.join("loadgen"));
    cmd.args(["--target", &format!("127.0.0.1:{port}"), "--path", path])
        .args([
            "--connections",
            &connections.to_string(),
            "--threads",
            &layout.load_cores.len().min(connections).to_string(),
        ])
        .args([
            "--duration",
            &duration.to_string(),
            "--pin-from-core",
            &layout.load_cores[0].to_string(),
        ]);
    if let Some(rate) = rate {
        cmd.args(["--rate", &format!("{rate:.0}")]);
    }
    if let Some(h) = hgrm {
        cmd.arg("--hgrm").arg(h);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run loadgen")?;
    if !out.status.success() {
        bail!("loadgen failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("summary "))
        .context("loadgen printed no summary")?;
    let mut run = Run::default();
    for kv in line.split_whitespace().skip(1) {
        let (k, v) = kv.split_once('=').context("bad summary")?;
        match k {
            "rps" => run.rps = v.parse()?,
            "errors" => run.errors = v.parse()?,
            "completed" => run.completed = v.parse()?,
            _ => {
                run.percentiles
                    .insert(k.trim_end_matches("_us").to_owned(), v.parse()?);
            }
        }
    }
    Ok(run)
}

fn wrk_rps(layout: &Layout, port: u16, path: &str, duration: f64) -> anyhow::Result<f64> {
    let out = Command::new("taskset")
        .args([
            "-c",
            &cpu_list(&layout.load_cores),
            "wrk",
            "-t",
            &layout.load_cores.len().to_string(),
            "-c",
            &MAX_CONNECTIONS.to_string(),
        ])
        .arg(format!("-d{}s", duration.ceil() as u64))
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .context("cannot run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("wrk printed no rate: {text}"))
}

fn write_configs(dir: &Path, workers: usize, cores: &[usize]) -> anyhow::Result<()> {
    let backend = format!("127.0.0.1:{BACKEND_PORT}");
    std::fs::write(
        dir.join("portcullis.toml"),
        format!(
            "[server]\nlisten = [\"127.0.0.1:19080\"]\nworkers = {workers}\n\n[upstreams.backend]\nservers = [\"{backend}\"]\nmax_idle_per_server = 256\n\n[[routes]]\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"backend\"\n"
        ),
    )?;
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes {workers};\nworker_cpu_affinity {};\npid {}/nginx.pid;\nerror_log {}/nginx-error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  upstream backend {{ server {backend}; keepalive 256; keepalive_requests 1000000; }}\n  server {{\n    listen 127.0.0.1:19081 reuseport;\n    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering on; }}\n  }}\n}}\n",
            nginx_cpu_affinity(cores),
            dir.display(),
            dir.display()
        ),
    )?;
    std::fs::write(
        dir.join("haproxy.cfg"),
        format!(
            "global\n  nbthread {workers}\n  cpu-map auto:1/1-{workers} {}\n  maxconn 4096\n\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n  http-reuse always\n\nfrontend fe\n  bind 127.0.0.1:19082\n  default_backend be\n\nbackend be\n  server s1 {backend}\n",
            cpu_list(cores).replace(',', " ")
        ),
    )?;
    Ok(())
}

/// nginx's `worker_cpu_affinity` value: one worker per core of `cores`, in order.
pub(crate) fn nginx_cpu_affinity(cores: &[usize]) -> String {
    cores
        .iter()
        .map(|c| {
            let mut mask = vec!['0'; cores.iter().max().copied().unwrap_or(0) + 1];
            let len = mask.len();
            mask[len - 1 - c] = '1';
            mask.into_iter().collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Local time as `20250101-120000`, naming a run.
pub(crate) fn timestamp() -> anyhow::Result<String> {
    Ok(Command::new("date")
        .arg("+%Y%m%d-%H%M%S")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())?)
}

/// The CPU model and the kernel release, for a results header.
pub(crate) fn machine() -> anyhow::Result<(String, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())?;
    Ok((cpu, kernel))
}

/// A closed-loop load of `path` over [`MAX_CONNECTIONS`] for `duration` seconds.
fn max_load(port: u16, path: &str, duration: f64) -> Load<'_> {
    Load {
        port,
        path,
        connections: MAX_CONNECTIONS,
        rate: None,
        duration,
        hgrm: None,
    }
}

/// [`loadgen`] with the CPU time of `target`'s processes, and the machine's softirq time,
/// sampled just before and just after the run, per request completed.
fn measured(runner: &Runner, target: &Target, load: Load) -> anyhow::Result<Run> {
    let before = CpuSample::take(target.pid)?;
    let mut run = loadgen(runner, load)?;
    let after = CpuSample::take(target.pid)?;
    (run.cpu_us, run.softirq_us) = before.per_request(after, run.completed, runner.clock_ticks);
    Ok(run)
}

/// Syscalls and io_uring submissions per request of `target`'s processes, counted by
/// `perf stat` over a closed-loop 1 KiB run of its own (tracepoints slow every syscall, so not
/// during the measured runs); `None` for a count perf did not give.
fn counted(
    runner: &Runner,
    target: &Target,
    duration: f64,
    dir: &Path,
) -> anyhow::Result<[Option<f64>; 2]> {
    let pids: Vec<u32> = process_tree(target.pid)?.iter().map(|p| p.0).collect();
    let out = dir.join(format!("{}-perf.csv", target.name.replace(' ', "-")));
    let perf = PerfStat::start(&pids, &out)?;
    let run = loadgen(runner, max_load(target.port, "/1k", duration));
    let counts = perf.stop()?;
    let completed = run?.completed.max(1) as f64;
    Ok(counts.map(|c| c.map(|c| c as f64 / completed)))
}

/// A per-request count for the table, or `unavailable`.
fn count_cell(count: Option<f64>) -> String {
    count.map_or_else(|| "unavailable".into(), |c| format!("{c:.2}"))
}

/// Everything the results table shows, gathered over one run of the benchmark.
struct Results<'a> {
    targets: &'a [Target],
    max_1k: BTreeMap<&'static str, Run>,
    max_64k: BTreeMap<&'static str, Run>,
    /// Fixed-rate runs by target and index into `loads`.
    at_load: BTreeMap<(&'static str, usize), Run>,
    loads: &'a [FixedRate],
    /// Syscalls and io_uring submissions per request, by target.
    counts: BTreeMap<&'static str, [Option<f64>; 2]>,
}

impl Results<'_> {
    /// The markdown table, one row per target.
    fn table(&self) -> String {
        let mut md = String::new();
        let _ = write!(md, "| target | max req/s 1 KiB | vs nginx | vs direct | max req/s 64 KiB | vs nginx | CPU µs/req 1 KiB | CPU µs/req 64 KiB | CPU/req vs nginx 1 KiB / 64 KiB | softirq µs/req (machine-wide) 1 KiB / 64 KiB | syscalls/req 1 KiB | io_uring submissions/req 1 KiB |");
        for load in self.loads {
            let _ = write!(md, " p50 / p99 / p99.9 @{} |", load.label());
        }
        let _ = writeln!(md, " errors |");
        let _ = writeln!(md, "|---|{}", "---:|".repeat(11 + self.loads.len() + 1));
        let (nginx_1k, nginx_64k) = (&self.max_1k["nginx"], &self.max_64k["nginx"]);
        for t in self.targets {
            let m1 = &self.max_1k[t.name];
            let m64 = &self.max_64k[t.name];
            let [syscalls, submissions] = self.counts[t.name];
            let mut row = format!(
                "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} / {:.2} | {:.1} / {:.1} | {} | {} |",
                t.name,
                m1.rps,
                m1.rps / nginx_1k.rps,
                m1.rps / self.max_1k["direct backend"].rps,
                m64.rps,
                m64.rps / nginx_64k.rps,
                m1.cpu_us,
                m64.cpu_us,
                m1.cpu_us / nginx_1k.cpu_us,
                m64.cpu_us / nginx_64k.cpu_us,
                m1.softirq_us,
                m64.softirq_us,
                count_cell(syscalls),
                count_cell(submissions),
            );
            let mut errors = m1.errors + m64.errors;
            for i in 0..self.loads.len() {
                let r = &self.at_load[&(t.name, i)];
                errors += r.errors;
                let _ = write!(
                    row,
                    " {} / {} / {} µs |",
                    r.percentiles["p50"], r.percentiles["p99"], r.percentiles["p99.9"]
                );
            }
            let _ = write!(row, " {errors} |");
            let _ = writeln!(md, "{row}");
        }
        md
    }

    /// One sentence: Portcullis's CPU per request against nginx's, in the same run.
    fn cpu_ratio(&self) -> String {
        let ratio = |m: &BTreeMap<&str, Run>| m["portcullis"].cpu_us / m["nginx"].cpu_us;
        format!(
            "Portcullis used {:.2}× nginx's CPU time per request at maximum throughput with 1 KiB responses and {:.2}× with 64 KiB ones.",
            ratio(&self.max_1k),
            ratio(&self.max_64k)
        )
    }
}

pub fn run(duration: f64, quick: bool) -> anyhow::Result<()> {
    let (duration, loads): (f64, &[FixedRate]) = if quick {
        (duration.min(QUICK_DURATION), &QUICK_LOADS)
    } else {
        (duration, &LOADS)
    };
    ensure_tools()?;
    let runner = Runner {
        bin: crate::build_release()?,
        layout: layout(),
        clock_ticks: clock_ticks_per_sec(),
    };
    let (bin, layout) = (&runner.bin, &runner.layout);
    let workers = layout.server_cores.len();
    let stamp = timestamp()?;
    let dir = workspace_root().join("bench-results").join(&stamp);
    std::fs::create_dir_all(&dir)?;
    write_configs(&dir, workers, &layout.server_cores)?;
    eprintln!("bench: {} server core(s) {:?}, load generator core(s) {:?}, {workers} worker(s) each; results in {}", workers, layout.server_cores, layout.load_cores, dir.display());

    let backend = spawn_pinned(
        "backend",
        &layout.server_cores,
        &bin.join("backend"),
        &[
            "--listen",
            &format!("127.0.0.1:{BACKEND_PORT}"),
            "--workers",
            &workers.to_string(),
        ],
        &dir.join("backend.log"),
    )?;
    wait_for_port(BACKEND_PORT, "the backend")?;
    let nginx_conf = dir.join("nginx.conf");
    let haproxy_cfg = dir.join("haproxy.cfg");
    let portcullis_toml = dir.join("portcullis.toml");
    let portcullis = spawn_pinned(
        "portcullis",
        &layout.server_cores,
        &bin.join("portcullis"),
        &["--config", portcullis_toml.to_str().unwrap()],
        &dir.join("portcullis.log"),
    )?;
    let nginx = spawn_pinned(
        "nginx",
        &layout.server_cores,
        &which("nginx").context("nginx")?,
        &["-c", nginx_conf.to_str().unwrap(), "-g", "daemon off;"],
        &dir.join("nginx.log"),
    )?;
    let haproxy = spawn_pinned(
        "haproxy",
        &layout.server_cores,
        &which("haproxy").context("haproxy")?,
        &["-f", haproxy_cfg.to_str().unwrap(), "-db"],
        &dir.join("haproxy.log"),
    )?;
    let targets = [
        Target {
            name: "direct backend",
            port: BACKEND_PORT,
            pid: backend.id(),
        },
        Target {
            name: "portcullis",
            port: 19080,
            pid: portcullis.id(),
        },
        Target {
            name: "nginx",
            port: 19081,
            pid: nginx.id(),
        },
        Target {
            name: "haproxy",
            port: 19082,
            pid: haproxy.id(),
        },
    ];
    for t in &targets {
        wait_for_port(t.port, t.name)?;
        // Warm up connections and caches.
        loadgen(&runner, max_load(t.port, "/1k", 1.0))?;
    }

    eprintln!("bench: load generator against wrk, closed loop on the direct backend");
    let ours = loadgen(&runner, max_load(BACKEND_PORT, "/1k", duration))?;
    let wrk = wrk_rps(layout, BACKEND_PORT, "/1k", duration)?;

    let mut max_1k = BTreeMap::new();
    let mut max_64k = BTreeMap::new();
    for t in &targets {
        eprintln!("bench: {}: maximum throughput", t.name);
        max_1k.insert(
            t.name,
            measured(&runner, t, max_load(t.port, "/1k", duration))?,
        );
        max_64k.insert(
            t.name,
            measured(&runner, t, max_load(t.port, "/64k", duration))?,
        );
    }
    let perf = perf_usable();
    if !perf {
        eprintln!("bench: perf or its tracepoints ({PERF_EVENTS:?}) unavailable: no syscall or io_uring counts");
    }
    let mut counts = BTreeMap::new();
    for t in &targets {
        let c = if perf {
            eprintln!(
                "bench: {}: syscalls and io_uring submissions (perf stat)",
                t.name
            );
            counted(&runner, t, duration, &dir).unwrap_or_else(|e| {
                eprintln!("bench: {}: no perf counts: {e:#}", t.name);
                [None, None]
            })
        } else {
            [None, None]
        };
        counts.insert(t.name, c);
    }
    let nginx_max = max_1k["nginx"].rps;
    let mut at_load: BTreeMap<(&str, usize), Run> = BTreeMap::new();
    for (i, load) in loads.iter().enumerate() {
        let rate = load.rps(nginx_max);
        for t in &targets {
            eprintln!("bench: {}: {rate:.0} req/s ({})", t.name, load.label());
            let hgrm = dir.join(format!(
                "{}-{}.hgrm",
                t.name.replace(' ', "-"),
                load.file_tag()
            ));
            at_load.insert(
                (t.name, i),
                loadgen(
                    &runner,
                    Load {
                        port: t.port,
                        path: "/1k",
                        connections: RATE_CONNECTIONS,
                        rate: Some(rate),
                        duration,
                        hgrm: Some(&hgrm),
                    },
                )?,
            );
        }
    }

    let results = Results {
        targets: &targets,
        max_1k,
        max_64k,
        at_load,
        loads,
        counts,
    };
    let (cpu, kernel) = machine()?;
    let mut md = String::new();
    let _ = writeln!(md, "Measured {stamp} on {} core(s) ({cpu}), Linux {kernel}. Proxies and backend pinned to core(s) {:?} with {workers} worker(s) each, the load generator alone on core(s) {:?}; {duration}s per run; keep-alive to the upstream, access logs off.\n", layout.server_cores.len() + layout.load_cores.len(), layout.server_cores, layout.load_cores);
    md.push_str(&results.table());
    let _ = writeln!(md, "\nFixed rates are {} req/s ({}), open loop over {RATE_CONNECTIONS} connections, latency counted from each request's due time. Maximum throughput is closed loop over {MAX_CONNECTIONS} connections.", loads.iter().map(|l| format!("{:.0}", l.rps(nginx_max))).collect::<Vec<_>>().join(" / "), loads.iter().map(|l| match l { FixedRate::Absolute(_) => "fixed".to_owned(), FixedRate::OfNginx(_) => format!("{} of nginx's maximum", l.label()) }).collect::<Vec<_>>().join(", "));
    let _ = writeln!(md, "\nCPU µs/req is the user and system time of the target's own processes (the one started and all its descendants; for the direct backend, the backend) from /proc/PID/stat across each maximum-throughput run, over the requests it completed ({} clock ticks per second). softirq µs/req is the softirq column of /proc/stat's `cpu` line over the same run, machine-wide (the load generator's and the backend's network work included). {}", runner.clock_ticks, results.cpu_ratio());
    let _ = writeln!(md, "\nSyscalls and io_uring submissions per request are the tracepoints {PERF_EVENTS:?} counted by `perf stat` on the target's processes over a closed-loop 1 KiB run of their own (enabled tracepoints slow every syscall, so not during the measured runs); `unavailable` where perf or a tracepoint was missing.");
    let _ = writeln!(md, "\nThe load generator drove {:.0} req/s against the direct backend where wrk drove {:.0} req/s in the same run (ratio {:.2}).", ours.rps, wrk, ours.rps / wrk);
    std::fs::write(dir.join("results.md"), &md)?;
    let svg = crate::plot::percentile_svg(
        &targets
            .iter()
            .map(|t| {
                (
                    t.name,
                    dir.join(format!("{}-50pct.hgrm", t.name.replace(' ', "-"))),
                )
            })
            .collect::<Vec<_>>(),
        &format!(
            "Latency by percentile at {:.0} req/s (50% of nginx's maximum)",
            nginx_max * 0.5
        ),
    )?;
    std::fs::write(dir.join("latency.svg"), svg)?;
    let latest = workspace_root().join("bench-results/latest");
    let _ = std::fs::remove_file(&latest);
    let _ = std::os::unix::fs::symlink(&stamp, &latest);
    println!("{md}");
    println!(
        "bench: table {}, plot {}",
        dir.join("results.md").display(),
        dir.join("latency.svg").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_command_name() {
        let line = "42 (a (b) c) S 7 42 42 0 -1 4194560 100 0 0 0 30 12 0 0 20 0 3 0";
        assert_eq!(parse_stat(line), Some((7, 42)));
    }

    #[test]
    fn perf_counts_by_event() {
        let text = "# started on ...\n\n1234,,raw_syscalls:sys_enter,1000,100.00,,\n<not counted>,,io_uring:io_uring_submit_req,0,0.00,,\n";
        assert_eq!(perf_count(text, "raw_syscalls:sys_enter"), Some(1234));
        assert_eq!(perf_count(text, "io_uring:io_uring_submit_req"), None);
    }
}
