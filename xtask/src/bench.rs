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
//!
//! The target set runs in phases: in front of the benches' own backend, in front of an nginx
//! serving static files (so the ratios can be set beside published ones, which mostly use such a
//! backend), and with 2 workers each on the same two cores as a 2-thread client. Every
//! measurement is repeated, the targets' order rotated each round, and reported as the median
//! and the min–max. Last, each proxy's resident memory per idle keep-alive connection, and its
//! figures while that many are open.

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
/// The nginx serving static files, the second phase's backend.
const STATIC_PORT: u16 = 19002;
const PORTCULLIS_PORT: u16 = 19080;
const NGINX_PORT: u16 = 19081;
const HAPROXY_PORT: u16 = 19082;
/// Connections for the maximum-throughput runs.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// Connections for the fixed-rate runs.
const RATE_CONNECTIONS: usize = 32;
/// The fixed rates of the latency runs: a rate every target sustains, and half of nginx's
/// maximum (also the plot's). 25% and 75% are left out to bound the run time.
const LOADS: [FixedRate; 2] = [FixedRate::Absolute(5000.0), FixedRate::OfNginx(0.50)];
/// The rate of the latency run with idle connections open.
const IDLE_RATE: f64 = 5000.0;
/// Seconds per measured run with `--quick`.
const QUICK_DURATION: f64 = 3.0;
/// Repeats of a full run and of a `--quick` one.
const REPEATS: usize = 5;
const QUICK_REPEATS: usize = 1;
/// Idle connections of a full run and of a `--quick` one.
const IDLE: usize = 10_000;
const QUICK_IDLE: usize = 2_000;
/// Connections a proxy may hold beyond the idle ones (the load generator's, and slack).
const CONNECTION_SLACK: usize = 1000;
/// The file-descriptor limit asked for before anything starts (the children inherit it).
const NOFILE: u64 = 65_536;
/// Keep-alive timeout of every proxy: longer than the idle connections stay open.
const KEEPALIVE_SECS: u32 = 300;

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

#[derive(Clone, Debug)]
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
        // SIGTERM first so nginx and haproxy clean up (nginx's master stops its workers: a
        // SIGKILL to it would leave them running); then make sure.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
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
pub(crate) fn framed_end(raw: &[u8]) -> Option<usize> {
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
pub(crate) fn process_tree(root: u32) -> anyhow::Result<Vec<(u32, u64)>> {
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

/// What a phase's configs depend on.
struct ConfigSet<'a> {
    /// Where the configs, pid files and logs go.
    dir: &'a Path,
    workers: usize,
    cores: &'a [usize],
    /// The port of the backend the proxies forward to.
    backend_port: u16,
    /// Client connections one proxy worker may hold (the idle ones and the load's).
    max_connections: usize,
}

impl ConfigSet<'_> {
    /// Writes `portcullis.toml`, `nginx.conf` and `haproxy.cfg`.
    fn write_proxies(&self) -> anyhow::Result<()> {
        let Self {
            dir,
            workers,
            cores,
            backend_port,
            max_connections,
        } = *self;
        let backend = format!("127.0.0.1:{backend_port}");
        std::fs::write(
            dir.join("portcullis.toml"),
            format!(
                "[server]\nlisten = [\"127.0.0.1:{PORTCULLIS_PORT}\"]\nworkers = {workers}\nmax_connections_per_worker = {max_connections}\nkeepalive_timeout = \"{KEEPALIVE_SECS}s\"\n\n[upstreams.backend]\nservers = [\"{backend}\"]\nmax_idle_per_server = 256\n\n[[routes]]\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"backend\"\n"
            ),
        )?;
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "worker_processes {workers};\nworker_cpu_affinity {};\nworker_rlimit_nofile {};\npid {}/nginx.pid;\nerror_log {}/nginx-error.log warn;\nevents {{ worker_connections {max_connections}; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout {KEEPALIVE_SECS}s;\n  upstream backend {{ server {backend}; keepalive 256; keepalive_requests 1000000; }}\n  server {{\n    listen 127.0.0.1:{NGINX_PORT} reuseport;\n    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering on; }}\n  }}\n}}\n",
                nginx_cpu_affinity(cores),
                2 * max_connections + CONNECTION_SLACK,
                dir.display(),
                dir.display()
            ),
        )?;
        // `no strict-limits`: haproxy wants two descriptors per connection (22,000 for 10,000
        // idle ones) and would refuse to start above a hard RLIMIT_NOFILE it cannot raise
        // (20,000 on the development VM); idle client connections need one each.
        std::fs::write(
            dir.join("haproxy.cfg"),
            format!(
                "global\n  nbthread {workers}\n  cpu-map auto:1/1-{workers} {}\n  maxconn {max_connections}\n  no strict-limits\n\ndefaults\n  mode http\n  maxconn {max_connections}\n  timeout connect 5s\n  timeout client {KEEPALIVE_SECS}s\n  timeout server 60s\n  timeout http-keep-alive {KEEPALIVE_SECS}s\n  option http-keep-alive\n  http-reuse always\n\nfrontend fe\n  bind 127.0.0.1:{HAPROXY_PORT}\n  default_backend be\n\nbackend be\n  server s1 {backend}\n",
                cpu_list(cores).replace(',', " ")
            ),
        )?;
        Ok(())
    }

    /// Writes `nginx-static.conf`: an nginx serving the files of `root` on [`STATIC_PORT`],
    /// set up as such a backend usually is (sendfile, cached file descriptors, long
    /// keep-alive, no access log).
    fn write_static(&self, root: &Path) -> anyhow::Result<PathBuf> {
        let path = self.dir.join("nginx-static.conf");
        std::fs::write(
            &path,
            format!(
                "worker_processes {};\nworker_cpu_affinity {};\npid {}/nginx-static.pid;\nerror_log {}/nginx-static-error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 1000000;\n  keepalive_timeout {KEEPALIVE_SECS}s;\n  open_file_cache max=64 inactive=600s;\n  open_file_cache_valid 600s;\n  default_type application/octet-stream;\n  server {{\n    listen 127.0.0.1:{STATIC_PORT} reuseport;\n    root {};\n    location / {{ }}\n  }}\n}}\n",
                self.workers,
                nginx_cpu_affinity(self.cores),
                self.dir.display(),
                self.dir.display(),
                root.display()
            ),
        )?;
        Ok(path)
    }
}

/// Writes the static backend's files `1k` and `64k` (1024 and 65536 bytes) into `dir`.
fn write_static_files(dir: &Path) -> anyhow::Result<()> {
    for (name, len) in [("1k", 1024), ("64k", 64 * 1024)] {
        let body: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        std::fs::write(dir.join(name), body).with_context(|| format!("cannot write {name}"))?;
    }
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

/// What `cargo xtask bench` was asked for (see its flags in main.rs).
pub struct Options {
    pub duration: f64,
    pub quick: bool,
    pub repeats: Option<usize>,
    pub two_workers: bool,
    pub idle: Option<usize>,
}

/// The settings a run follows: the options with their `--quick` defaults filled in.
struct Plan {
    duration: f64,
    repeats: usize,
    two_workers: bool,
    /// Idle connections per proxy; 0 skips that measurement.
    idle: usize,
}

impl Plan {
    fn new(o: &Options) -> anyhow::Result<Self> {
        let repeats = o
            .repeats
            .unwrap_or(if o.quick { QUICK_REPEATS } else { REPEATS });
        if repeats == 0 {
            bail!("--repeats must be at least 1");
        }
        Ok(Self {
            duration: if o.quick {
                o.duration.min(QUICK_DURATION)
            } else {
                o.duration
            },
            repeats,
            two_workers: o.two_workers || !o.quick,
            idle: o.idle.unwrap_or(if o.quick { QUICK_IDLE } else { IDLE }),
        })
    }

    /// Client connections one proxy worker must be allowed: the idle ones and the load's.
    fn max_connections(&self) -> usize {
        (self.idle + CONNECTION_SLACK).max(4096)
    }

    /// About how many seconds the run takes with `phases` phases: the measured runs, warm-ups,
    /// perf counts, the wrk comparison and the idle-connection runs, with a guess at the cost
    /// of starting each load generator and each phase's servers.
    fn planned_secs(&self, phases: usize) -> f64 {
        const TARGETS: f64 = 4.0;
        const PROXIES: f64 = 3.0;
        const RUN_OVERHEAD: f64 = 0.3;
        const PHASE_OVERHEAD: f64 = 5.0;
        let run = self.duration + RUN_OVERHEAD;
        let measurements = (2 + LOADS.len()) as f64;
        let phase = TARGETS * (1.0 + RUN_OVERHEAD)
            + self.repeats as f64 * TARGETS * measurements * run
            + TARGETS * (run + 0.3)
            + PHASE_OVERHEAD;
        let wrk = 2.0 * run;
        let idle = if self.idle > 0 {
            // Fresh servers, then per proxy a warm-up, two runs, a second's settling and the
            // connections' setup (~0.1 ms each).
            PHASE_OVERHEAD + PROXIES * (2.0 * run + 2.8 + self.idle as f64 * 1e-4)
        } else {
            0.0
        };
        phases as f64 * phase + wrk + idle
    }
}

/// `1234` seconds as `20 min 34 s`.
fn minutes(secs: f64) -> String {
    let secs = secs.round() as u64;
    format!("{} min {} s", secs / 60, secs % 60)
}

/// Which backend a phase's proxies forward to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Upstream {
    /// The benches' own backend binary.
    Own,
    /// nginx serving the files `1k` and `64k`.
    NginxStatic,
}

impl Upstream {
    fn port(self) -> u16 {
        match self {
            Self::Own => BACKEND_PORT,
            Self::NginxStatic => STATIC_PORT,
        }
    }
}

/// One pass of every measurement over the target set.
struct Phase {
    /// Its results subdirectory.
    tag: &'static str,
    /// Its table's heading.
    title: String,
    upstream: Upstream,
    workers: usize,
    layout: Layout,
    /// Whether the wrk comparison and the idle connections run in this phase.
    extras: bool,
}

/// The phases a run goes through: own backend, nginx static backend, and (when planned) 2
/// workers each on the same two cores as a 2-thread client.
fn phases(plan: &Plan) -> Vec<Phase> {
    let layout = layout();
    let workers = layout.server_cores.len();
    let mut phases = vec![
        Phase {
            tag: "own-backend",
            title: "In front of the benches' own backend".into(),
            upstream: Upstream::Own,
            workers,
            layout: layout.clone(),
            extras: true,
        },
        Phase {
            tag: "nginx-static",
            title:
                "In front of an nginx static backend (files 1k and 64k, sendfile, open_file_cache)"
                    .into(),
            upstream: Upstream::NginxStatic,
            workers,
            layout,
            extras: false,
        },
    ];
    if plan.two_workers {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cores: Vec<usize> = (0..n.min(2)).collect();
        phases.push(Phase {
            tag: "two-workers",
            title: format!(
                "2 workers each on core(s) {cores:?}, the 2-thread load generator competing on the same cores (own backend)"
            ),
            upstream: Upstream::Own,
            workers: 2,
            layout: Layout {
                server_cores: cores.clone(),
                load_cores: cores,
            },
            extras: false,
        });
    }
    phases
}

/// Fails when something already listens on `port`: the benchmark would measure it instead of
/// what it starts.
fn ensure_port_free(port: u16) -> anyhow::Result<()> {
    if TcpStream::connect(("127.0.0.1", port)).is_ok() {
        bail!("port {port} is already in use by another process; stop it first");
    }
    Ok(())
}

/// A phase's processes and its targets; the processes are stopped when this is dropped.
struct Servers {
    targets: Vec<Target>,
    /// Held to be stopped on drop, also when the phase fails half-way.
    _procs: Vec<Proc>,
}

/// Writes a phase's configs into `dir` and starts its backend and the three proxies, pinned
/// to the phase's server cores. `root` holds the static backend's files.
fn start_servers(
    runner: &Runner,
    phase: &Phase,
    plan: &Plan,
    root: &Path,
    dir: &Path,
) -> anyhow::Result<Servers> {
    let backend_port = phase.upstream.port();
    for port in [backend_port, PORTCULLIS_PORT, NGINX_PORT, HAPROXY_PORT] {
        ensure_port_free(port)?;
    }
    let cores = &phase.layout.server_cores;
    let configs = ConfigSet {
        dir,
        workers: phase.workers,
        cores,
        backend_port,
        max_connections: plan.max_connections(),
    };
    configs.write_proxies()?;
    let nginx = which("nginx").context("nginx")?;
    let path = |p: &Path| p.to_str().map(str::to_owned).context("non-UTF-8 path");
    let mut procs = Vec::new();
    let backend = match phase.upstream {
        Upstream::Own => spawn_pinned(
            "backend",
            cores,
            &runner.bin.join("backend"),
            &[
                "--listen",
                &format!("127.0.0.1:{backend_port}"),
                "--workers",
                &phase.workers.to_string(),
            ],
            &dir.join("backend.log"),
        )?,
        Upstream::NginxStatic => spawn_pinned(
            "nginx static backend",
            cores,
            &nginx,
            &[
                "-c",
                &path(&configs.write_static(root)?)?,
                "-g",
                "daemon off;",
            ],
            &dir.join("nginx-static.log"),
        )?,
    };
    let backend_pid = backend.id();
    procs.push(backend);
    wait_for_port(backend_port, "the backend")?;
    let portcullis = spawn_pinned(
        "portcullis",
        cores,
        &runner.bin.join("portcullis"),
        &["--config", &path(&dir.join("portcullis.toml"))?],
        &dir.join("portcullis.log"),
    )?;
    let portcullis_pid = portcullis.id();
    procs.push(portcullis);
    let nginx = spawn_pinned(
        "nginx",
        cores,
        &nginx,
        &["-c", &path(&dir.join("nginx.conf"))?, "-g", "daemon off;"],
        &dir.join("nginx.log"),
    )?;
    let nginx_pid = nginx.id();
    procs.push(nginx);
    let haproxy = spawn_pinned(
        "haproxy",
        cores,
        &which("haproxy").context("haproxy")?,
        &["-f", &path(&dir.join("haproxy.cfg"))?, "-db"],
        &dir.join("haproxy.log"),
    )?;
    let haproxy_pid = haproxy.id();
    procs.push(haproxy);
    let targets = vec![
        Target {
            name: "direct backend",
            port: backend_port,
            pid: backend_pid,
        },
        Target {
            name: "portcullis",
            port: PORTCULLIS_PORT,
            pid: portcullis_pid,
        },
        Target {
            name: "nginx",
            port: NGINX_PORT,
            pid: nginx_pid,
        },
        Target {
            name: "haproxy",
            port: HAPROXY_PORT,
            pid: haproxy_pid,
        },
    ];
    for t in &targets {
        wait_for_port(t.port, t.name)?;
    }
    Ok(Servers {
        targets,
        _procs: procs,
    })
}

/// `items` starting at `round` (modulo their number), so that over the rounds each one comes
/// first as often as the others: none is always measured on a cold or a tired machine.
fn rotated<T>(items: &[T], round: usize) -> impl Iterator<Item = &T> {
    let n = items.len().max(1);
    items.iter().cycle().skip(round % n).take(items.len())
}

/// The median, smallest and largest of some repeats' values.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    /// Of `values`, which must not be empty.
    fn of(values: &[f64]) -> Self {
        Self {
            median: median(values.to_vec()),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }

    /// `median (min–max)` with `decimals` decimals; the median alone when the repeats agree
    /// exactly (as one repeat does).
    fn cell(self, decimals: usize) -> String {
        if self.min == self.max {
            return format!("{:.*}", decimals, self.median);
        }
        format!(
            "{:.*} ({:.*}–{:.*})",
            decimals, self.median, decimals, self.min, decimals, self.max
        )
    }
}

/// Everything one phase's table shows, over its repeats.
struct Results {
    /// Target names in table order.
    names: Vec<&'static str>,
    /// One run per repeat, by target.
    max_1k: BTreeMap<&'static str, Vec<Run>>,
    max_64k: BTreeMap<&'static str, Vec<Run>>,
    /// Fixed-rate runs by target and index into [`LOADS`], one per repeat.
    at_load: BTreeMap<(&'static str, usize), Vec<Run>>,
    /// Syscalls and io_uring submissions per request, by target (one run each).
    counts: BTreeMap<&'static str, [Option<f64>; 2]>,
    /// The median of nginx's maximum 1 KiB throughput, which the relative rates are of.
    nginx_max: f64,
}

/// The spread of `f` over `runs`.
fn spread(runs: &[Run], f: impl Fn(&Run) -> f64) -> Spread {
    Spread::of(&runs.iter().map(f).collect::<Vec<_>>())
}

impl Results {
    /// The median of `f` over `target`'s runs in `m`.
    fn median_of(
        m: &BTreeMap<&'static str, Vec<Run>>,
        target: &str,
        f: impl Fn(&Run) -> f64,
    ) -> f64 {
        spread(&m[target], f).median
    }

    /// The markdown table, one row per target.
    fn table(&self) -> String {
        let mut md = String::new();
        let _ = write!(md, "| target | max req/s 1 KiB | vs nginx | vs direct | max req/s 64 KiB | vs nginx | CPU µs/req 1 KiB | CPU µs/req 64 KiB | CPU/req vs nginx 1 KiB / 64 KiB | softirq µs/req (machine-wide) 1 KiB / 64 KiB | syscalls/req 1 KiB | io_uring submissions/req 1 KiB |");
        for load in LOADS {
            let _ = write!(md, " p50 / p99 / p99.9 @{} |", load.label());
        }
        let _ = writeln!(md, " errors |");
        let _ = writeln!(md, "|---|{}", "---:|".repeat(11 + LOADS.len() + 1));
        let rps = |r: &Run| r.rps;
        let cpu = |r: &Run| r.cpu_us;
        let softirq = |r: &Run| r.softirq_us;
        let (m1, m64) = (&self.max_1k, &self.max_64k);
        for &name in &self.names {
            let [syscalls, submissions] = self.counts[name];
            let mut row = format!(
                "| {name} | {} | {:.2} | {:.2} | {} | {:.2} | {} | {} | {:.2} / {:.2} | {} / {} | {} | {} |",
                spread(&m1[name], rps).cell(0),
                Self::median_of(m1, name, rps) / Self::median_of(m1, "nginx", rps),
                Self::median_of(m1, name, rps) / Self::median_of(m1, "direct backend", rps),
                spread(&m64[name], rps).cell(0),
                Self::median_of(m64, name, rps) / Self::median_of(m64, "nginx", rps),
                spread(&m1[name], cpu).cell(1),
                spread(&m64[name], cpu).cell(1),
                Self::median_of(m1, name, cpu) / Self::median_of(m1, "nginx", cpu),
                Self::median_of(m64, name, cpu) / Self::median_of(m64, "nginx", cpu),
                spread(&m1[name], softirq).cell(1),
                spread(&m64[name], softirq).cell(1),
                count_cell(syscalls),
                count_cell(submissions),
            );
            let mut errors: u64 = m1[name].iter().chain(&m64[name]).map(|r| r.errors).sum();
            for i in 0..LOADS.len() {
                let runs = &self.at_load[&(name, i)];
                errors += runs.iter().map(|r| r.errors).sum::<u64>();
                let p = |q: &str| spread(runs, |r| r.percentiles[q] as f64).cell(0);
                let _ = write!(row, " {} / {} / {} µs |", p("p50"), p("p99"), p("p99.9"));
            }
            let _ = write!(row, " {errors} |");
            let _ = writeln!(md, "{row}");
        }
        md
    }

    /// One sentence: Portcullis's CPU per request against nginx's, from the medians.
    fn cpu_ratio(&self) -> String {
        let ratio = |m: &BTreeMap<&'static str, Vec<Run>>| {
            Self::median_of(m, "portcullis", |r| r.cpu_us)
                / Self::median_of(m, "nginx", |r| r.cpu_us)
        };
        format!(
            "Portcullis used {:.2}× nginx's CPU time per request at maximum throughput with 1 KiB responses and {:.2}× with 64 KiB ones (medians).",
            ratio(&self.max_1k),
            ratio(&self.max_64k)
        )
    }

    /// One sentence: the fixed rates of this phase.
    fn rates(&self) -> String {
        let rates: Vec<String> = LOADS
            .iter()
            .map(|l| format!("{:.0}", l.rps(self.nginx_max)))
            .collect();
        let kinds: Vec<String> = LOADS
            .iter()
            .map(|l| match l {
                FixedRate::Absolute(_) => "fixed".to_owned(),
                FixedRate::OfNginx(_) => {
                    format!("{} of nginx's median maximum in this phase", l.label())
                }
            })
            .collect();
        format!(
            "Fixed rates: {} req/s ({}).",
            rates.join(" / "),
            kinds.join(", ")
        )
    }
}

/// The histogram file of a fixed-rate run.
fn hgrm_path(dir: &Path, target: &str, load: FixedRate, repeat: usize) -> PathBuf {
    dir.join(format!(
        "{}-{}-r{repeat}.hgrm",
        target.replace(' ', "-"),
        load.file_tag()
    ))
}

/// Every measurement of a phase, `plan.repeats` times with the targets' order rotated each
/// round. All maximum-throughput rounds come first, so that the relative fixed rate is of
/// nginx's median maximum and the same in every round; then the fixed-rate rounds; then one
/// perf-counted run per target.
fn measure(
    runner: &Runner,
    targets: &[Target],
    plan: &Plan,
    tag: &str,
    dir: &Path,
) -> anyhow::Result<Results> {
    let mut results = Results {
        names: targets.iter().map(|t| t.name).collect(),
        max_1k: BTreeMap::new(),
        max_64k: BTreeMap::new(),
        at_load: BTreeMap::new(),
        counts: BTreeMap::new(),
        nginx_max: 0.0,
    };
    for r in 0..plan.repeats {
        eprintln!(
            "bench: {tag}: round {}/{}: maximum throughput",
            r + 1,
            plan.repeats
        );
        for (path, into) in [("/1k", &mut results.max_1k), ("/64k", &mut results.max_64k)] {
            for t in rotated(targets, r) {
                let run = measured(runner, t, max_load(t.port, path, plan.duration))
                    .with_context(|| format!("{}: {path}", t.name))?;
                into.entry(t.name).or_default().push(run);
            }
        }
    }
    results.nginx_max = Results::median_of(&results.max_1k, "nginx", |r| r.rps);
    for r in 0..plan.repeats {
        for (i, &load) in LOADS.iter().enumerate() {
            let rate = load.rps(results.nginx_max);
            eprintln!(
                "bench: {tag}: round {}/{}: {rate:.0} req/s ({})",
                r + 1,
                plan.repeats,
                load.label()
            );
            for t in rotated(targets, r) {
                let hgrm = hgrm_path(dir, t.name, load, r + 1);
                let run = loadgen(
                    runner,
                    Load {
                        port: t.port,
                        path: "/1k",
                        connections: RATE_CONNECTIONS,
                        rate: Some(rate),
                        duration: plan.duration,
                        hgrm: Some(&hgrm),
                    },
                )
                .with_context(|| format!("{}: {rate:.0} req/s", t.name))?;
                results.at_load.entry((t.name, i)).or_default().push(run);
            }
        }
    }
    results.counts = perf_counts(runner, targets, plan.duration, dir);
    Ok(results)
}

/// [`counted`] for every target, or nothing where perf cannot count.
fn perf_counts(
    runner: &Runner,
    targets: &[Target],
    duration: f64,
    dir: &Path,
) -> BTreeMap<&'static str, [Option<f64>; 2]> {
    let perf = perf_usable();
    if !perf {
        eprintln!("bench: perf or its tracepoints ({PERF_EVENTS:?}) unavailable: no syscall or io_uring counts");
    }
    targets
        .iter()
        .map(|t| {
            let c = if perf {
                eprintln!(
                    "bench: {}: syscalls and io_uring submissions (perf stat)",
                    t.name
                );
                counted(runner, t, duration, dir).unwrap_or_else(|e| {
                    eprintln!("bench: {}: no perf counts: {e:#}", t.name);
                    [None, None]
                })
            } else {
                [None, None]
            };
            (t.name, c)
        })
        .collect()
}

/// Starts a phase's servers, warms every target up, measures, runs `extras` while the servers
/// still run, and stops them (also on failure).
fn run_phase<T>(
    runner: &Runner,
    phase: &Phase,
    plan: &Plan,
    root: &Path,
    extras: impl FnOnce(&Runner, &[Target]) -> anyhow::Result<T>,
) -> anyhow::Result<(Results, T)> {
    let dir = root.join(phase.tag);
    std::fs::create_dir_all(&dir)?;
    eprintln!(
        "bench: phase {}: server core(s) {:?} with {} worker(s) each, load generator core(s) {:?}",
        phase.tag, phase.layout.server_cores, phase.workers, phase.layout.load_cores
    );
    let servers = start_servers(runner, phase, plan, root, &dir)?;
    for t in &servers.targets {
        warm_up(runner, t)?;
    }
    let results = measure(runner, &servers.targets, plan, phase.tag, &dir)?;
    let extra = extras(runner, &servers.targets)?;
    drop(servers);
    Ok((results, extra))
}

/// A second of closed-loop 1 KiB load on `target`: its connections and caches warm.
fn warm_up(runner: &Runner, target: &Target) -> anyhow::Result<()> {
    loadgen(runner, max_load(target.port, "/1k", 1.0))
        .with_context(|| format!("{}: warm-up", target.name))?;
    Ok(())
}

/// Our load generator's and wrk's closed-loop 1 KiB rates against the direct backend.
fn compare_wrk(runner: &Runner, duration: f64) -> anyhow::Result<(f64, f64)> {
    eprintln!("bench: load generator against wrk, closed loop on the direct backend");
    let ours = loadgen(runner, max_load(BACKEND_PORT, "/1k", duration))?;
    let wrk = wrk_rps(&runner.layout, BACKEND_PORT, "/1k", duration)?;
    Ok((ours.rps, wrk))
}

/// One proxy's figures with idle keep-alive connections open.
struct Idle {
    name: &'static str,
    /// Resident KiB of its processes before the idle connections and with them.
    rss_before: u64,
    rss_after: u64,
    connections: usize,
    /// Closed-loop 1 KiB run, and a [`IDLE_RATE`] one, with them open.
    max_1k: Run,
    at_rate: Run,
    /// How many the proxy still held open at the end.
    still_open: usize,
}

impl Idle {
    fn kib_per_connection(&self) -> f64 {
        (self.rss_after as f64 - self.rss_before as f64) / self.connections.max(1) as f64
    }
}

/// [`idle_one`] for each proxy of `phase`, on servers started afresh and warmed up as for the
/// measured runs. Fresh, because memory a process freed after the load runs is reused by the
/// idle connections without growing its RSS: measured on the phase's servers, Portcullis's
/// per-connection figure came out at a quarter of what a fresh process shows.
fn idle_phase(
    runner: &Runner,
    phase: &Phase,
    plan: &Plan,
    root: &Path,
) -> anyhow::Result<Vec<Idle>> {
    let dir = root.join(phase.tag).join("idle");
    std::fs::create_dir_all(&dir)?;
    let servers = start_servers(runner, phase, plan, root, &dir)?;
    let proxies = servers
        .targets
        .iter()
        .filter(|t| t.name != "direct backend");
    let mut rows = Vec::new();
    for t in proxies {
        warm_up(runner, t)?;
        rows.push(
            idle_one(runner, t, plan).with_context(|| format!("{}: idle connections", t.name))?,
        );
    }
    Ok(rows)
}

/// Opens `plan.idle` keep-alive connections to `target`, each used once, reads its memory
/// before and a second after, measures its maximum 1 KiB rate and its latency at
/// [`IDLE_RATE`] while they stay open, and closes them.
fn idle_one(runner: &Runner, target: &Target, plan: &Plan) -> anyhow::Result<Idle> {
    eprintln!(
        "bench: {}: {} idle keep-alive connections",
        target.name, plan.idle
    );
    let rss_before = crate::bench_idle::tree_rss_kib(target.pid)?;
    let conns = crate::bench_idle::open_idle(target.port, plan.idle)?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = crate::bench_idle::tree_rss_kib(target.pid)?;
    let max_1k = measured(runner, target, max_load(target.port, "/1k", plan.duration))?;
    let at_rate = loadgen(
        runner,
        Load {
            port: target.port,
            path: "/1k",
            connections: RATE_CONNECTIONS,
            rate: Some(IDLE_RATE),
            duration: plan.duration,
            hgrm: None,
        },
    )?;
    let still_open = crate::bench_idle::still_open(&conns);
    drop(conns);
    // Let the proxy take the closes in before the next one is measured.
    std::thread::sleep(Duration::from_millis(500));
    Ok(Idle {
        name: target.name,
        rss_before,
        rss_after,
        connections: plan.idle,
        max_1k,
        at_rate,
        still_open,
    })
}

/// The idle-connection table, one row per proxy.
fn idle_table(rows: &[Idle]) -> String {
    let n = rows.first().map_or(0, |r| r.connections);
    let mut md = format!("| proxy | RSS before | RSS after | KiB per idle connection | vs nginx | max req/s 1 KiB with {n} idle | p50 / p99 @{IDLE_RATE:.0}/s with {n} idle | errors | idle connections still open at the end |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let nginx = rows
        .iter()
        .find(|r| r.name == "nginx")
        .map(Idle::kib_per_connection);
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    for r in rows {
        let per = r.kib_per_connection();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {per:.2} | {} | {:.0} | {} / {} µs | {} | {} |",
            r.name,
            mib(r.rss_before),
            mib(r.rss_after),
            nginx.map_or_else(|| "–".into(), |n| format!("{:.2}", per / n)),
            r.max_1k.rps,
            r.at_rate.percentiles.get("p50").copied().unwrap_or(0),
            r.at_rate.percentiles.get("p99").copied().unwrap_or(0),
            r.max_1k.errors + r.at_rate.errors,
            r.still_open,
        );
    }
    md
}

/// The directory of the release binaries: `PORTCULLIS_BENCH_BIN` when set (prebuilt ones, so
/// a benchmark can run without a release build of its own), else a fresh release build.
pub(crate) fn bench_bin() -> anyhow::Result<PathBuf> {
    let Some(dir) = std::env::var_os("PORTCULLIS_BENCH_BIN") else {
        return crate::build_release();
    };
    let dir = PathBuf::from(dir);
    for bin in ["portcullis", "backend", "loadgen"] {
        if !dir.join(bin).is_file() {
            bail!("PORTCULLIS_BENCH_BIN={}: no {bin} there", dir.display());
        }
    }
    eprintln!("bench: binaries from {} (not built)", dir.display());
    Ok(dir)
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let plan = Plan::new(&options)?;
    let phases = phases(&plan);
    eprintln!(
        "bench: planned run time about {}: {} phase(s) ({}), {} round(s) of {}s runs, {} idle connections",
        minutes(plan.planned_secs(phases.len())),
        phases.len(),
        phases.iter().map(|p| p.tag).collect::<Vec<_>>().join(", "),
        plan.repeats,
        plan.duration,
        plan.idle
    );
    let started = Instant::now();
    ensure_tools()?;
    // Before anything is spawned: the proxies inherit it (nginx and haproxy raise their own
    // from there as root).
    let nofile = crate::bench_idle::raise_nofile(NOFILE.max(2 * plan.idle as u64 + 4096))?;
    if plan.idle > 0 && nofile < plan.max_connections() as u64 {
        bail!(
            "RLIMIT_NOFILE is {nofile}, too low for {} idle connections (run as root, or lower --idle)",
            plan.idle
        );
    }
    let bin = bench_bin()?;
    let clock_ticks = clock_ticks_per_sec();
    let stamp = timestamp()?;
    let dir = workspace_root().join("bench-results").join(&stamp);
    std::fs::create_dir_all(&dir)?;
    write_static_files(&dir)?;
    eprintln!("bench: results in {}", dir.display());

    let mut sections = Vec::new();
    let mut wrk = None;
    let mut idle = Vec::new();
    for phase in &phases {
        let runner = Runner {
            bin: bin.clone(),
            layout: phase.layout.clone(),
            clock_ticks,
        };
        let (results, ()) = run_phase(&runner, phase, &plan, &dir, |runner, _| {
            if phase.extras {
                wrk = Some(compare_wrk(runner, plan.duration)?);
            }
            Ok(())
        })
        .with_context(|| format!("phase {}", phase.tag))?;
        if phase.extras && plan.idle > 0 {
            idle = idle_phase(&runner, phase, &plan, &dir)
                .with_context(|| format!("phase {}: idle connections", phase.tag))?;
        }
        sections.push((phase, results));
    }

    let md = report(&stamp, &plan, &sections, wrk, &idle, clock_ticks)?;
    std::fs::write(dir.join("results.md"), &md)?;
    let (own_phase, own) = &sections[0];
    let svg = crate::plot::percentile_svg(
        &own.names
            .iter()
            .map(|&name| {
                (
                    name,
                    hgrm_path(&dir.join(own_phase.tag), name, LOADS[1], plan.repeats),
                )
            })
            .collect::<Vec<_>>(),
        &format!(
            "Latency by percentile at {:.0} req/s (50% of nginx's maximum, own backend)",
            LOADS[1].rps(own.nginx_max)
        ),
    )?;
    std::fs::write(dir.join("latency.svg"), svg)?;
    let latest = workspace_root().join("bench-results/latest");
    let _ = std::fs::remove_file(&latest);
    let _ = std::os::unix::fs::symlink(&stamp, &latest);
    println!("{md}");
    println!(
        "bench: table {}, plot {}; took {} (planned {})",
        dir.join("results.md").display(),
        dir.join("latency.svg").display(),
        minutes(started.elapsed().as_secs_f64()),
        minutes(plan.planned_secs(phases.len()))
    );
    Ok(())
}

/// results.md: a table per phase, the idle-connection table, and how it was all measured.
fn report(
    stamp: &str,
    plan: &Plan,
    sections: &[(&Phase, Results)],
    wrk: Option<(f64, f64)>,
    idle: &[Idle],
    clock_ticks: f64,
) -> anyhow::Result<String> {
    let (cpu, kernel) = machine()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut md = String::new();
    let _ = writeln!(md, "Measured {stamp} on {cores} core(s) ({cpu}), Linux {kernel}; {}s per run, {} round(s); keep-alive to the upstream, access logs off.", plan.duration, plan.repeats);
    let _ = writeln!(md, "\nEach cell is the median over the rounds with the min–max in parentheses (a single number where they agree, as with one round); the ratios are of medians. In each round every target runs once per measurement, the targets' order rotated from round to round so that none is always first. All maximum-throughput rounds run before the fixed-rate ones, so the relative rate is of nginx's median maximum. Errors are summed over the rounds.");
    for (phase, results) in sections {
        let _ = writeln!(md, "\n## {}\n", phase.title);
        let _ = writeln!(md, "Proxies and backend pinned to core(s) {:?} with {} worker(s) each, the load generator on core(s) {:?} with {} thread(s). The direct backend row is {}.\n", phase.layout.server_cores, phase.workers, phase.layout.load_cores, phase.layout.load_cores.len(), match phase.upstream { Upstream::Own => "the benches' backend", Upstream::NginxStatic => "the nginx static backend" });
        md.push_str(&results.table());
        let _ = writeln!(md, "\n{} {}", results.rates(), results.cpu_ratio());
    }
    if !idle.is_empty() {
        let _ = writeln!(md, "\n## Idle keep-alive connections (own backend)\n");
        md.push_str(&idle_table(idle));
        let _ = writeln!(md, "\nOn the phase's servers started afresh (memory a process freed after the load runs would otherwise take idle connections without growing its RSS), for each proxy in turn: a 1 s closed-loop warm-up, the resident memory of its processes (the sum of `Rss` in /proc/PID/smaps_rollup over the process started and its descendants, each process once), then {} connections opened from the benchmark, each sent one `GET /1k` and read to its end so that it sits idle in keep-alive, and the memory again a second later; KiB per idle connection is the difference over their number (user-space memory only: the kernel's socket buffers are not in it). With them open, one closed-loop 1 KiB run and one at {IDLE_RATE:.0} req/s; then they are closed. RLIMIT_NOFILE was raised before anything started, Portcullis's `max_connections_per_worker`, nginx's `worker_connections` and haproxy's `maxconn` set to {}.", plan.idle, plan.max_connections());
    }
    let _ = writeln!(md, "\n## How these were measured\n");
    let _ = writeln!(md, "Fixed rates are open loop over {RATE_CONNECTIONS} connections, latency counted from each request's due time. Maximum throughput is closed loop over {MAX_CONNECTIONS} connections.");
    let _ = writeln!(md, "\nCPU µs/req is the user and system time of the target's own processes (the one started and all its descendants; for the direct backend, the backend) from /proc/PID/stat across each maximum-throughput run, over the requests it completed ({clock_ticks} clock ticks per second). softirq µs/req is the softirq column of /proc/stat's `cpu` line over the same run, machine-wide (the load generator's and the backend's network work included).");
    let _ = writeln!(md, "\nSyscalls and io_uring submissions per request are the tracepoints {PERF_EVENTS:?} counted by `perf stat` on the target's processes over one closed-loop 1 KiB run of their own per phase, not repeated (enabled tracepoints slow every syscall, so not during the measured runs); `unavailable` where perf or a tracepoint was missing.");
    if let Some((ours, wrk)) = wrk {
        let _ = writeln!(md, "\nThe load generator drove {ours:.0} req/s against the direct (own) backend where wrk drove {wrk:.0} req/s in the same run (ratio {:.2}).", ours / wrk);
    }
    Ok(md)
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
    fn rotation_starts_each_round_at_the_next() {
        let order = |r| rotated(&[1, 2, 3], r).copied().collect::<Vec<_>>();
        assert_eq!(order(0), [1, 2, 3]);
        assert_eq!(order(1), [2, 3, 1]);
        assert_eq!(order(4), [2, 3, 1]);
    }

    #[test]
    fn cells_show_the_median_and_the_range() {
        assert_eq!(Spread::of(&[3.0, 1.0, 2.0]).cell(0), "2 (1–3)");
        assert_eq!(Spread::of(&[5.25]).cell(1), "5.2");
    }

    #[test]
    fn quick_defaults_and_full_ones() {
        let options = |quick| Options {
            duration: 10.0,
            quick,
            repeats: None,
            two_workers: false,
            idle: None,
        };
        let quick = Plan::new(&options(true)).unwrap();
        assert_eq!(
            (quick.repeats, quick.idle, quick.two_workers),
            (1, 2000, false)
        );
        let full = Plan::new(&options(false)).unwrap();
        assert_eq!(
            (full.repeats, full.idle, full.two_workers),
            (5, 10_000, true)
        );
        assert_eq!(full.max_connections(), 11_000);
    }

    #[test]
    fn perf_counts_by_event() {
        let text = "# started on ...\n\n1234,,raw_syscalls:sys_enter,1000,100.00,,\n<not counted>,,io_uring:io_uring_submit_req,0,0.00,,\n";
        assert_eq!(perf_count(text, "raw_syscalls:sys_enter"), Some(1234));
        assert_eq!(perf_count(text, "io_uring:io_uring_submit_req"), None);
    }
}
