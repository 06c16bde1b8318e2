//! `cargo xtask bench`: Portcullis beside nginx, haproxy and the direct backend, on the same
//! machine in the same run, each pinned the same way.
//!
//! Layout: the load generator gets the upper half of the cores (at least one), the proxy under
//! test and the backend share the others, one proxy worker per core. On two cores: proxy and
//! backend on core 0, load generator alone on core 1, one worker each.

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
/// Fixed rates, as fractions of nginx's maximum.
const LOADS: [f64; 3] = [0.25, 0.50, 0.75];

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
    errors: u64,
    percentiles: BTreeMap<String, u64>,
}

struct Target {
    name: &'static str,
    port: u16,
}

/// What every load run shares.
struct Runner {
    bin: PathBuf,
    layout: Layout,
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
    let Runner { bin, layout } = runner;
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
            "completed" => {}
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

pub fn run(duration: f64) -> anyhow::Result<()> {
    ensure_tools()?;
    let runner = Runner {
        bin: crate::build_release()?,
        layout: layout(),
    };
    let (bin, layout) = (&runner.bin, &runner.layout);
    let workers = layout.server_cores.len();
    let stamp = timestamp()?;
    let dir = workspace_root().join("bench-results").join(&stamp);
    std::fs::create_dir_all(&dir)?;
    write_configs(&dir, workers, &layout.server_cores)?;
    eprintln!("bench: {} server core(s) {:?}, load generator core(s) {:?}, {workers} worker(s) each; results in {}", workers, layout.server_cores, layout.load_cores, dir.display());

    let _backend = spawn_pinned(
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
    let _portcullis = spawn_pinned(
        "portcullis",
        &layout.server_cores,
        &bin.join("portcullis"),
        &["--config", portcullis_toml.to_str().unwrap()],
        &dir.join("portcullis.log"),
    )?;
    let _nginx = spawn_pinned(
        "nginx",
        &layout.server_cores,
        &which("nginx").context("nginx")?,
        &["-c", nginx_conf.to_str().unwrap(), "-g", "daemon off;"],
        &dir.join("nginx.log"),
    )?;
    let _haproxy = spawn_pinned(
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
        },
        Target {
            name: "portcullis",
            port: 19080,
        },
        Target {
            name: "nginx",
            port: 19081,
        },
        Target {
            name: "haproxy",
            port: 19082,
        },
    ];
    for t in &targets {
        wait_for_port(t.port, t.name)?;
        // Warm up connections and caches.
        loadgen(
            &runner,
            Load {
                port: t.port,
                path: "/1k",
                connections: MAX_CONNECTIONS,
                rate: None,
                duration: 1.0,
                hgrm: None,
            },
        )?;
    }

    eprintln!("bench: load generator against wrk, closed loop on the direct backend");
    let ours = loadgen(
        &runner,
        Load {
            port: BACKEND_PORT,
            path: "/1k",
            connections: MAX_CONNECTIONS,
            rate: None,
            duration,
            hgrm: None,
        },
    )?;
    let wrk = wrk_rps(layout, BACKEND_PORT, "/1k", duration)?;

    let mut max_1k = BTreeMap::new();
    let mut max_64k = BTreeMap::new();
    for t in &targets {
        eprintln!("bench: {}: maximum throughput", t.name);
        max_1k.insert(
            t.name,
            loadgen(
                &runner,
                Load {
                    port: t.port,
                    path: "/1k",
                    connections: MAX_CONNECTIONS,
                    rate: None,
                    duration,
                    hgrm: None,
                },
            )?,
        );
        max_64k.insert(
            t.name,
            loadgen(
                &runner,
                Load {
                    port: t.port,
                    path: "/64k",
                    connections: MAX_CONNECTIONS,
                    rate: None,
                    duration,
                    hgrm: None,
                },
            )?,
        );
    }
    let nginx_max = max_1k["nginx"].rps;
    let mut at_load: BTreeMap<(&str, usize), Run> = BTreeMap::new();
    for (i, load) in LOADS.iter().enumerate() {
        let rate = nginx_max * load;
        for t in &targets {
            eprintln!(
                "bench: {}: {:.0} req/s ({:.0}% of nginx's maximum)",
                t.name,
                rate,
                load * 100.0
            );
            let hgrm = dir.join(format!(
                "{}-{:.0}pct.hgrm",
                t.name.replace(' ', "-"),
                load * 100.0
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

    let (cpu, kernel) = machine()?;
    let mut md = String::new();
    let _ = writeln!(md, "Measured {stamp} on {} core(s) ({cpu}), Linux {kernel}. Proxies and backend pinned to core(s) {:?} with {workers} worker(s) each, the load generator alone on core(s) {:?}; {duration}s per run; keep-alive to the upstream, access logs off.\n", layout.server_cores.len() + layout.load_cores.len(), layout.server_cores, layout.load_cores);
    let _ = writeln!(md, "| target | max req/s 1 KiB | vs nginx | vs direct | max req/s 64 KiB | vs nginx | p50 / p99 / p99.9 @25% | p50 / p99 / p99.9 @50% | p50 / p99 / p99.9 @75% | errors |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for t in &targets {
        let m1 = &max_1k[t.name];
        let m64 = &max_64k[t.name];
        let mut row = format!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} |",
            t.name,
            m1.rps,
            m1.rps / nginx_max,
            m1.rps / max_1k["direct backend"].rps,
            m64.rps,
            m64.rps / max_64k["nginx"].rps
        );
        let mut errors = m1.errors + m64.errors;
        for i in 0..LOADS.len() {
            let r = &at_load[&(t.name, i)];
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
    let _ = writeln!(md, "\nFixed rates are {} req/s (25%, 50%, 75% of nginx's maximum), open loop over {RATE_CONNECTIONS} connections, latency counted from each request's due time. Maximum throughput is closed loop over {MAX_CONNECTIONS} connections.", LOADS.iter().map(|l| format!("{:.0}", nginx_max * l)).collect::<Vec<_>>().join(" / "));
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
