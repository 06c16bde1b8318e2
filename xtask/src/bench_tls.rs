//! `cargo xtask bench-tls`: what terminating TLS costs, Portcullis beside nginx with the same
//! certificate (ECDSA P-256) and the same worker count, in the same run: full and resumed
//! (TLS 1.3 ticket) handshakes per second with the server's CPU time per handshake, and 1 KiB
//! keep-alive requests per second over TLS.
//!
//! Layout as `bench`: on two cores the server under test (one worker) and the backend on core 0,
//! the clients alone on core 1. Both servers run for the whole benchmark; only the one under load
//! is busy. A client does more work per full handshake than a server (besides the same key
//! exchange it verifies the signature the server makes), so on two cores the clients may set the
//! handshake rate. The server's CPU time per handshake (its user and system time from /proc
//! across the run, over the handshakes done) compares the servers whoever is the bottleneck.
//!
//! Clients: `openssl s_time` for handshakes, several at once, so the client core keeps working
//! while one waits for the server; `h2load --h1` for the keep-alive load.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context};

use crate::{
    bench::{
        clock_ticks_per_sec, cpu_list, ensure_commands, layout, machine, nginx_cpu_affinity,
        spawn_pinned, start_backend, timestamp, tree_cpu_ticks, wait_for_port, which, Layout,
    },
    workspace_root,
};

const BACKEND_PORT: u16 = 19401;
const PORTCULLIS_PORT: u16 = 19480;
const NGINX_PORT: u16 = 19481;
/// `openssl s_time` processes per client core: one alone leaves the core idle for every round
/// trip to the server.
const HANDSHAKE_CLIENTS_PER_CORE: usize = 4;
/// Keep-alive connections, as many as `bench`'s maximum-throughput runs.
const KEEP_ALIVE_CONNECTIONS: usize = 64;
/// Rounds, each server going first in turn, so drift on a shared machine hits both alike.
const ROUNDS: usize = 2;
/// Answered by each server itself (2 bytes), so a handshake run measures TLS, not proxying.
/// s_time needs a request: a TLS 1.3 ticket arrives after the handshake, and only reading the
/// answer takes it in.
const HANDSHAKE_PATH: &str = "/hs";
/// Seconds a client may run past its own duration before `timeout` ends it: a server that stops
/// answering must not hang the benchmark.
const CLIENT_GRACE_SECS: u64 = 20;

struct Server {
    name: &'static str,
    port: u16,
    pid: u32,
}

/// Handshake runs of one kind against one server, summed over the rounds.
#[derive(Default)]
struct Handshakes {
    /// Connections s_time made without resuming a session.
    full: u64,
    resumed: u64,
    wall_secs: f64,
    server_cpu_secs: f64,
}

impl Handshakes {
    fn count(&self) -> u64 {
        self.full + self.resumed
    }

    fn per_sec(&self) -> f64 {
        self.count() as f64 / self.wall_secs
    }

    fn cpu_us_each(&self) -> f64 {
        self.server_cpu_secs * 1e6 / self.count() as f64
    }

    /// The server's use of its cores over the runs: below 100% it was waiting for the clients.
    fn busy_percent(&self, cores: usize) -> f64 {
        100.0 * self.server_cpu_secs / self.wall_secs / cores as f64
    }
}

/// One h2load run's figures.
struct KeepAlive {
    rps: f64,
    failed: u64,
    not_2xx: u64,
    /// Protocol, suite and key exchange group as h2load reports them.
    negotiated: String,
}

#[derive(Default)]
struct Results {
    /// Protocol, suite and group of one `openssl s_client` handshake.
    negotiated: String,
    full: Handshakes,
    resumed: Handshakes,
    keep_alive: Vec<KeepAlive>,
}

struct Ctx {
    dir: PathBuf,
    layout: Layout,
    duration: f64,
    clock_ticks: f64,
}

fn certificate(dir: &Path) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(["req", "-x509", "-newkey", "ec"])
        .args([
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
        ])
        .args(["-subj", "/CN=bench.test"])
        .args(["-addext", "subjectAltName=DNS:bench.test"])
        .args(["-keyout", "key.pem", "-out", "cert.pem"])
        .output()
        .context("cannot run openssl")?;
    if !out.status.success() {
        bail!(
            "openssl could not make the certificate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn portcullis_config(dir: &Path, workers: usize) -> String {
    format!(
        "[server]\nlisten = [{{ address = \"127.0.0.1:{PORTCULLIS_PORT}\", tls = \"bench\" }}]\nworkers = {workers}\n\n\
         [quotas]\ndata_dir = \"{}\"\n\n\
         [tls.bench]\ncertificates = [{{ cert = \"{}\", key = \"{}\", default = true }}]\n\n\
         [upstreams.backend]\nservers = [\"127.0.0.1:{BACKEND_PORT}\"]\nmax_idle_per_server = 256\n\n\
         [[routes]]\nmatch = {{ path = \"{HANDSHAKE_PATH}\" }}\nrespond = {{ status = 200, body = \"ok\" }}\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"backend\"\n",
        dir.join("data").display(),
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
    )
}

/// As `bench`'s nginx (keep-alive upstream, no access log), with TLS as nginx is usually
/// deployed for resumption: a shared session cache and tickets.
fn nginx_config(dir: &Path, workers: usize, cores: &[usize]) -> String {
    format!(
        "worker_processes {workers};\nworker_cpu_affinity {};\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  \
         upstream backend {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 256; keepalive_requests 1000000; }}\n  \
         server {{\n    listen 127.0.0.1:{NGINX_PORT} ssl reuseport;\n    \
         ssl_certificate {dir}/cert.pem;\n    ssl_certificate_key {dir}/key.pem;\n    \
         ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_session_cache shared:SSL:10m;\n    ssl_session_tickets on;\n    \
         location = {HANDSHAKE_PATH} {{ return 200 \"ok\"; }}\n    \
         location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering on; }}\n  \
         }}\n}}\n",
        nginx_cpu_affinity(cores),
        dir = dir.display(),
    )
}

/// A client command on the client cores, ended by `timeout` if it runs `limit_secs`.
fn client(limit_secs: u64, cores: &[usize]) -> Command {
    let mut c = Command::new("timeout");
    c.args(["--kill-after=2", &limit_secs.to_string()])
        .args(["taskset", "-c", &cpu_list(cores)]);
    c
}

/// `(full, resumed)` from s_time's output: one character per connection, `*` for a new session,
/// `r` for a resumed one, on lines of their own.
fn count_connections(text: &str) -> (u64, u64) {
    let mut counts = (0, 0);
    for line in text.lines() {
        if line.is_empty() || !line.bytes().all(|b| b == b'*' || b == b'r') {
            continue;
        }
        counts.0 += line.bytes().filter(|&b| b == b'*').count() as u64;
        counts.1 += line.bytes().filter(|&b| b == b'r').count() as u64;
    }
    counts
}

/// One handshake run: s_time clients for `secs` against `server`, `-new` (full handshakes) or
/// `-reuse` (each client resumes the session of its first connection). Adds to `into`. With
/// `-reuse` s_time leaves that first, full handshake out of its output: one per client, against
/// thousands counted, in the server's CPU time but not in the count.
fn handshakes(
    ctx: &Ctx,
    server: &Server,
    resume: bool,
    secs: u64,
    label: &str,
    into: &mut Handshakes,
) -> anyhow::Result<()> {
    let clients = HANDSHAKE_CLIENTS_PER_CORE * ctx.layout.load_cores.len();
    let target = format!("127.0.0.1:{}", server.port);
    let before = tree_cpu_ticks(server.pid)?;
    let start = Instant::now();
    let mut running = Vec::new();
    for i in 0..clients {
        // To a file, not a pipe: one character per connection would fill a pipe nobody reads
        // until the end.
        let path = ctx
            .dir
            .join(format!("s_time-{}-{label}-{i}.txt", server.name));
        let out = File::create(&path)?;
        let child = client(secs + CLIENT_GRACE_SECS, &ctx.layout.load_cores)
            .args(["openssl", "s_time", "-connect", &target])
            .arg(if resume { "-reuse" } else { "-new" })
            .args(["-time", &secs.to_string(), "-www", HANDSHAKE_PATH])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("cannot run openssl s_time")?;
        running.push((child, path));
    }
    let mut done = Vec::new();
    for (mut child, path) in running {
        done.push((child.wait()?, path));
    }
    // s_time stops at a whole second of the wall clock (time(2)): the run's own length counts.
    let wall = start.elapsed().as_secs_f64();
    let after = tree_cpu_ticks(server.pid)?;
    let (mut full, mut resumed) = (0, 0);
    for (status, path) in done {
        if !status.success() {
            bail!(
                "{}: openssl s_time failed ({status}), see {}",
                server.name,
                path.display()
            );
        }
        let (f, r) = count_connections(&std::fs::read_to_string(&path)?);
        full += f;
        resumed += r;
    }
    if full + resumed == 0 {
        bail!("{}: no handshake completed in {label}", server.name);
    }
    into.full += full;
    into.resumed += resumed;
    into.wall_secs += wall;
    into.server_cpu_secs += after.saturating_sub(before) as f64 / ctx.clock_ticks;
    Ok(())
}

/// The `count` before `what` in h2load's `a total, b started, ...` lists.
fn h2load_count(list: &str, what: &str) -> Option<u64> {
    list.split(", ")
        .find_map(|part| part.trim().strip_suffix(what))
        .and_then(|n| n.trim().parse().ok())
}

fn parse_h2load(text: &str) -> Option<KeepAlive> {
    let after = |prefix: &str| text.lines().find_map(|l| l.strip_prefix(prefix));
    // `finished in 6.00s, 13499.00 req/s, 1.93MB/s`: the rate is over the main duration only,
    // the warm-up excluded.
    let rps = after("finished in ")?
        .split(", ")
        .nth(1)?
        .strip_suffix(" req/s")?
        .parse()
        .ok()?;
    let requests = after("requests: ")?;
    let done = h2load_count(requests, " done")?;
    let failed = h2load_count(requests, " failed")?;
    let ok = h2load_count(after("status codes: ")?, " 2xx")?;
    let negotiated = format!(
        "{} {} {}",
        after("TLS Protocol: ").unwrap_or("?").trim(),
        after("Cipher: ").unwrap_or("?").trim(),
        after("Server Temp Key: ")
            .and_then(|k| k.split_whitespace().next())
            .unwrap_or("?"),
    );
    Some(KeepAlive {
        rps,
        failed,
        not_2xx: done.saturating_sub(ok),
        negotiated,
    })
}

/// Closed loop over keep-alive connections for the run's duration after a second's warm-up,
/// 1 KiB responses through the server to the backend.
fn keep_alive(ctx: &Ctx, server: &Server, label: &str) -> anyhow::Result<KeepAlive> {
    let millis = (ctx.duration * 1000.0).round().max(1.0) as u64;
    let threads = ctx.layout.load_cores.len().min(KEEP_ALIVE_CONNECTIONS);
    let path = ctx.dir.join(format!("h2load-{}-{label}.txt", server.name));
    let out = File::create(&path)?;
    // Portcullis offers ALPN http/1.1 only; --h1 makes h2load offer and speak it.
    let status = client(
        1 + ctx.duration.ceil() as u64 + CLIENT_GRACE_SECS,
        &ctx.layout.load_cores,
    )
    .args(["h2load", "--h1", "--warm-up-time", "1s"])
    .args(["-c", &KEEP_ALIVE_CONNECTIONS.to_string()])
    .args(["-t", &threads.to_string(), "-D", &format!("{millis}ms")])
    .arg(format!("https://127.0.0.1:{}/1k", server.port))
    .stdin(Stdio::null())
    .stdout(out.try_clone()?)
    .stderr(out)
    .status()
    .context("cannot run h2load")?;
    let text = std::fs::read_to_string(&path)?;
    if !status.success() {
        bail!(
            "{}: h2load failed ({status}), see {}",
            server.name,
            path.display()
        );
    }
    parse_h2load(&text).with_context(|| format!("{}: h2load printed no rate: {text}", server.name))
}

/// `TLSv1.3 TLS_AES_256_GCM_SHA384 X25519`: what one `openssl s_client` handshake negotiated.
fn negotiated(port: u16) -> anyhow::Result<String> {
    let out = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .output()
        .context("cannot run openssl s_client")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let (protocol, suite) = text
        .lines()
        .find_map(|l| l.strip_prefix("New, ")?.split_once(", Cipher is "))
        .with_context(|| format!("s_client made no handshake with port {port}: {text}"))?;
    let group = text
        .lines()
        .find_map(|l| l.strip_prefix("Server Temp Key: "))
        .and_then(|k| k.split(',').next())
        .unwrap_or("?");
    Ok(format!("{protocol} {} {}", suite.trim(), group.trim()))
}

fn version(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

fn ratio(ours: f64, theirs: f64) -> String {
    if theirs > 0.0 && ours.is_finite() {
        format!("{:.2}x", ours / theirs)
    } else {
        "-".into()
    }
}

pub fn run(duration: f64) -> anyhow::Result<()> {
    ensure_commands(&[
        ("nginx", "nginx-light"),
        ("openssl", "openssl"),
        ("h2load", "nghttp2-client"),
        ("taskset", "util-linux"),
        ("timeout", "coreutils"),
    ])?;
    let bin = crate::build_release()?;
    let layout = layout();
    let workers = layout.server_cores.len();
    let dir = workspace_root().join("bench-results").join("tls");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    certificate(&dir)?;
    let portcullis_toml = dir.join("portcullis.toml");
    let nginx_conf = dir.join("nginx.conf");
    std::fs::write(&portcullis_toml, portcullis_config(&dir, workers))?;
    std::fs::write(
        &nginx_conf,
        nginx_config(&dir, workers, &layout.server_cores),
    )?;
    let stamp = timestamp()?;
    eprintln!(
        "bench-tls: servers and backend on core(s) {:?} with {workers} worker(s) each, clients on core(s) {:?}; logs in {}",
        layout.server_cores,
        layout.load_cores,
        dir.display()
    );

    let _backend = start_backend(&bin, &layout.server_cores, BACKEND_PORT, &dir)?;
    let nginx = spawn_pinned(
        "nginx",
        &layout.server_cores,
        &which("nginx").context("nginx")?,
        &[
            "-c",
            nginx_conf.to_str().context("path")?,
            "-g",
            "daemon off;",
        ],
        &dir.join("nginx.log"),
    )?;
    let portcullis = spawn_pinned(
        "portcullis",
        &layout.server_cores,
        &bin.join("portcullis"),
        &["--config", portcullis_toml.to_str().context("path")?],
        &dir.join("portcullis.log"),
    )?;
    let servers = [
        Server {
            name: "nginx",
            port: NGINX_PORT,
            pid: nginx.id(),
        },
        Server {
            name: "portcullis",
            port: PORTCULLIS_PORT,
            pid: portcullis.id(),
        },
    ];
    let ctx = Ctx {
        dir: dir.clone(),
        duration,
        clock_ticks: clock_ticks_per_sec(),
        layout,
    };
    let secs = duration.ceil().max(1.0) as u64;
    let mut results: Vec<Results> = servers.iter().map(|_| Results::default()).collect();
    for (server, r) in servers.iter().zip(&mut results) {
        wait_for_port(server.port, server.name)?;
        r.negotiated = negotiated(server.port)?;
        // Warm-up: code paths, caches, the session cache's first entries.
        handshakes(&ctx, server, false, 1, "warmup", &mut Handshakes::default())?;
    }

    for round in 0..ROUNDS {
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1]
        } else {
            vec![1, 0]
        };
        for (resume, kind) in [(false, "full"), (true, "resumed")] {
            for &i in &order {
                eprintln!(
                    "bench-tls: round {}/{ROUNDS}: {}: {kind} handshakes",
                    round + 1,
                    servers[i].name
                );
                let into = if resume {
                    &mut results[i].resumed
                } else {
                    &mut results[i].full
                };
                handshakes(
                    &ctx,
                    &servers[i],
                    resume,
                    secs,
                    &format!("{kind}-{round}"),
                    into,
                )?;
            }
        }
        for &i in &order {
            eprintln!(
                "bench-tls: round {}/{ROUNDS}: {}: 1 KiB keep-alive",
                round + 1,
                servers[i].name
            );
            let run = keep_alive(&ctx, &servers[i], &format!("{round}"))?;
            results[i].keep_alive.push(run);
        }
    }

    let cores = ctx.layout.server_cores.len();
    let (cpu, kernel) = machine()?;
    let mean_rps = |r: &Results| {
        r.keep_alive.iter().map(|k| k.rps).sum::<f64>() / r.keep_alive.len().max(1) as f64
    };
    let clients = HANDSHAKE_CLIENTS_PER_CORE * ctx.layout.load_cores.len();
    let mut md = format!(
        "Measured {stamp} on {} core(s) ({cpu}), Linux {kernel}; {}, {}, {}. Each server and the backend pinned to core(s) {:?} with {workers} worker(s), the clients alone on core(s) {:?}; one self-signed ECDSA P-256 certificate for both; {duration}s per run, {ROUNDS} rounds (each server first in turn), summed.\n\n",
        cores + ctx.layout.load_cores.len(),
        version("openssl", "version"),
        version(&which("nginx").context("nginx")?.display().to_string(), "-v"),
        version("h2load", "--version"),
        ctx.layout.server_cores,
        ctx.layout.load_cores,
    );
    md.push_str("| server | full handshakes/s | server CPU µs per full handshake | resumed handshakes/s | server CPU µs per resumed handshake | 1 KiB keep-alive req/s over TLS |\n|---|---:|---:|---:|---:|---:|\n");
    for (s, r) in servers.iter().zip(&results) {
        md.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            s.name,
            r.full.per_sec(),
            r.full.cpu_us_each(),
            r.resumed.per_sec(),
            r.resumed.cpu_us_each(),
            mean_rps(r),
        ));
    }
    let (ng, pc) = (&results[0], &results[1]);
    md.push_str(&format!(
        "| portcullis / nginx | {} | {} | {} | {} | {} |\n",
        ratio(pc.full.per_sec(), ng.full.per_sec()),
        ratio(pc.full.cpu_us_each(), ng.full.cpu_us_each()),
        ratio(pc.resumed.per_sec(), ng.resumed.per_sec()),
        ratio(pc.resumed.cpu_us_each(), ng.resumed.cpu_us_each()),
        ratio(mean_rps(pc), mean_rps(ng)),
    ));
    md.push_str(&format!(
        "\nHandshakes: {clients} `openssl s_time` clients at once, each one connection at a time: a handshake, `GET {HANDSHAKE_PATH} HTTP/1.0` answered by the server itself (2 bytes), close. Full: no session offered; resumed (`-reuse`): TLS 1.3 session tickets, with a fresh key exchange. Server CPU is its user and system time over the run (nginx: master and workers) divided by the handshakes completed; a lower ratio is cheaper. A server that used less than all of its core(s) was waiting for the clients: then the rate is the clients' limit, and CPU per handshake is the comparable figure.\n\nKeep-alive: `h2load --h1`, {KEEP_ALIVE_CONNECTIONS} connections, `GET /1k` through the server to the backend (keep-alive upstream), 1 s warm-up; the mean of the rounds.\n\n"
    ));
    md.push_str("| server | s_client negotiated | h2load negotiated | server core use, full / resumed runs | connections resumed in resumed runs | h2load failed / not 2xx |\n|---|---|---|---:|---:|---:|\n");
    for (s, r) in servers.iter().zip(&results) {
        md.push_str(&format!(
            "| {} | {} | {} | {:.0}% / {:.0}% | {} of {} | {} / {} |\n",
            s.name,
            r.negotiated,
            r.keep_alive
                .first()
                .map(|k| k.negotiated.as_str())
                .unwrap_or("?"),
            r.full.busy_percent(cores),
            r.resumed.busy_percent(cores),
            r.resumed.resumed,
            r.resumed.count(),
            r.keep_alive.iter().map(|k| k.failed).sum::<u64>(),
            r.keep_alive.iter().map(|k| k.not_2xx).sum::<u64>(),
        ));
    }
    let mut warnings = Vec::new();
    for (s, r) in servers.iter().zip(&results) {
        if r.resumed.full > 0 {
            warnings.push(format!("{}: {} of the {} connections of the resumed runs did not resume, so its resumed figures mix in full handshakes", s.name, r.resumed.full, r.resumed.count()));
        }
        if r.full.resumed > 0 {
            warnings.push(format!(
                "{}: {} connections of the full runs resumed",
                s.name, r.full.resumed
            ));
        }
        if r.keep_alive.iter().any(|k| k.failed + k.not_2xx > 0) {
            warnings.push(format!("{}: keep-alive requests failed", s.name));
        }
    }
    if ng.negotiated != pc.negotiated {
        warnings.push(format!(
            "the servers negotiated differently with the same client: nginx {}, portcullis {}",
            ng.negotiated, pc.negotiated
        ));
    }
    for w in &warnings {
        md.push_str(&format!("\n**Warning:** {w}.\n"));
    }
    let out = workspace_root().join("benches/results/tls.md");
    std::fs::create_dir_all(out.parent().context("path")?)?;
    std::fs::write(&out, &md)?;
    std::fs::write(dir.join("results.md"), &md)?;
    println!("{md}");
    println!("bench-tls: table {}, logs {}", out.display(), dir.display());
    // nginx, portcullis and the backend stop here, as they do on any error above (Proc's Drop).
    Ok(())
}
