//! `cargo xtask bench-xdp` (root): the XDP program's cost per packet on each path, then a flood
//! scenario: a legitimate client at a fixed rate from one network namespace while an attacker
//! floods from another, without the XDP program and with it.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context};

use crate::{is_root, run_checked, workspace_root};

const GATEWAY: &str = "203.0.113.1:19090";
const LEGIT_RATE: u32 = 2000;
/// Flooding processes; each sends as fast as it can, bounded by count and time.
const FLOODERS: usize = 2;
const FLOOD_PACKETS_EACH: u64 = 20_000_000;

struct Net {
    names: Vec<(String, String)>,
}

impl Net {
    fn sh(args: &[&str]) -> anyhow::Result<()> {
        run_checked(Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()))
    }

    fn create() -> anyhow::Result<Net> {
        let mut net = Net { names: Vec::new() };
        for (tag, host, peer) in [
            ("a", "203.0.113.1", "203.0.113.2"),
            ("l", "198.51.100.1", "198.51.100.2"),
        ] {
            let (ns, host_if, peer_if) = (
                format!("pcb-{tag}"),
                format!("pcb{tag}h"),
                format!("pcb{tag}p"),
            );
            let _ = Command::new("ip")
                .args(["link", "del", &host_if])
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
            net.names.push((ns.clone(), host_if.clone()));
            Net::sh(&["ip", "netns", "add", &ns])?;
            Net::sh(&[
                "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
            ])?;
            Net::sh(&["ip", "link", "set", &peer_if, "netns", &ns])?;
            Net::sh(&["ip", "addr", "add", &format!("{host}/24"), "dev", &host_if])?;
            Net::sh(&["ip", "link", "set", &host_if, "up"])?;
            let peer_cidr = format!("{peer}/24");
            let in_ns: [&[&str]; 4] = [
                &["ip", "addr", "add", &peer_cidr, "dev", &peer_if],
                &["ip", "link", "set", &peer_if, "up"],
                &["ip", "link", "set", "lo", "up"],
                &["ip", "route", "add", "default", "via", host],
            ];
            for cmd in in_ns {
                let mut full = vec!["ip", "netns", "exec", ns.as_str()];
                full.extend_from_slice(cmd);
                Net::sh(&full)?;
            }
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for (ns, host_if) in &self.names {
            let _ = Command::new("ip")
                .args(["link", "del", host_if])
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_port(addr: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {addr}")
}

/// One legitimate run: returns the loadgen summary line.
fn legit_run(bin: &Path, duration: f64) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", "pcb-l", "taskset", "-c", "1"])
        .arg(bin.join("loadgen"))
        .args([
            "--target",
            GATEWAY,
            "--path",
            "/1k",
            "--connections",
            "16",
            "--rate",
            &LEGIT_RATE.to_string(),
            "--duration",
            &duration.to_string(),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.starts_with("summary "))
        .map(str::to_owned)
        .with_context(|| format!("loadgen: {text}"))
}

fn field<'a>(summary: &'a str, key: &str) -> &'a str {
    summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or("?")
}

pub fn run(duration: f64) -> anyhow::Result<()> {
    if !is_root() {
        bail!("bench-xdp loads BPF programs and creates network namespaces: run it as root");
    }
    let object = crate::ebpf::build()?;
    let bin = crate::build_release()?;
    eprintln!("bench-xdp: cost per packet (BPF_PROG_TEST_RUN)");
    let per_packet = Command::new(bin.join("xdp_bench"))
        .arg("--object")
        .arg(&object)
        .output()?;
    if !per_packet.status.success() {
        bail!(
            "xdp_bench failed: {}",
            String::from_utf8_lossy(&per_packet.stderr)
        );
    }
    let per_packet = String::from_utf8_lossy(&per_packet.stdout).into_owned();

    let _net = Net::create()?;
    let dir = tempdir()?;
    let _backend = Killed(vec![Command::new("taskset")
        .args(["-c", "0"])
        .arg(bin.join("backend"))
        .args(["--listen", "127.0.0.1:19001"])
        .stderr(Stdio::null())
        .spawn()?]);
    wait_port("127.0.0.1:19001")?;
    let mut rows = Vec::new();
    for (label, xdp, flood) in [
        ("no flood, no XDP", false, false),
        ("flood, no XDP", false, true),
        ("flood, XDP attached", true, true),
    ] {
        let mut config = format!("[server]\nlisten = [\"{GATEWAY}\"]\nworkers = 1\n\n[upstreams.backend]\nservers = [\"127.0.0.1:19001\"]\n\n[[routes]]\nupstream = \"backend\"\n");
        if xdp {
            config.push_str(&format!("\n[xdp]\ninterface = [\"pcbah\", \"pcblh\"]\nmode = \"driver\"\npin_path = \"/sys/fs/bpf/portcullis-bench\"\nrate = 5000\nburst = 1000\nobject = \"{}\"\n", object.display()));
        }
        let path = dir.join(format!("{}.toml", rows.len()));
        std::fs::write(&path, config)?;
        let log = std::fs::File::create(dir.join(format!("gateway-{}.log", rows.len())))?;
        let mut gateway = Killed(vec![Command::new("taskset")
            .args(["-c", "0"])
            .arg(bin.join("portcullis"))
            .arg("--config")
            .arg(&path)
            .stderr(log)
            .spawn()?]);
        wait_port(GATEWAY)?;
        std::thread::sleep(Duration::from_millis(300));
        if let Some(status) = gateway.0[0].try_wait()? {
            bail!("the gateway exited ({status}); see {}", dir.display());
        }
        let port = GATEWAY.rsplit(':').next().unwrap_or("19090");
        // Flooders share the gateway's core, as a NIC's receive work would.
        let flood_script = format!("import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nend=time.time()+{}\nn=0\nwhile n<{FLOOD_PACKETS_EACH} and time.time()<end:\n    s.sendto(b'x'*64,('203.0.113.1',{port}))\n    n+=1\nprint(n)\n", duration + 1.0);
        let mut flooders = Killed(if flood {
            (0..FLOODERS)
                .map(|_| {
                    Command::new("ip")
                        .args([
                            "netns",
                            "exec",
                            "pcb-a",
                            "taskset",
                            "-c",
                            "0",
                            "python3",
                            "-c",
                            &flood_script,
                        ])
                        .stdout(Stdio::piped())
                        .spawn()
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        });
        std::thread::sleep(Duration::from_millis(500));
        eprintln!("bench-xdp: {label}");
        let summary = legit_run(&bin, duration)?;
        let mut sent = 0u64;
        for child in std::mem::take(&mut flooders.0) {
            let out = child.wait_with_output()?;
            sent += String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
        let dropped = if xdp {
            let cfg = dir.join("stats.toml");
            std::fs::write(
                &cfg,
                "[xdp]
interface = \"pcbah\"
pin_path = \"/sys/fs/bpf/portcullis-bench\"
",
            )?;
            let out = Command::new(bin.join("portcullis"))
                .args(["xdp", "stats", "--config"])
                .arg(&cfg)
                .output()?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("counter dropped_rate ").map(str::to_owned))
                .unwrap_or_default()
        } else {
            "-".into()
        };
        drop(gateway);
        let completed: f64 = field(&summary, "completed").parse().unwrap_or(0.0);
        let errors: f64 = field(&summary, "errors").parse().unwrap_or(0.0);
        let success = if completed + errors > 0.0 {
            100.0 * completed / (completed + errors)
        } else {
            0.0
        };
        rows.push(format!(
            "| {label} | {success:.2}% | {} | {} | {} | {} | {} |",
            field(&summary, "p50_us"),
            field(&summary, "p99_us"),
            field(&summary, "p99.9_us"),
            if flood { sent.to_string() } else { "-".into() },
            dropped
        ));
    }
    let mut md = format!("### Cost per packet\n\n{per_packet}\n### Flood\n\nA legitimate client at {LEGIT_RATE} req/s (open loop, 16 connections, 1 KiB responses through the gateway to the backend) from one network namespace, {duration}s per run; {FLOODERS} flooders send 64-byte UDP datagrams to the gateway's port from another, on the gateway's core. With XDP: rate = 5000, burst = 1000 per source.\n\n| scenario | legitimate success | p50 µs | p99 µs | p99.9 µs | flood packets sent | dropped by XDP |\n|---|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        md.push_str(&r);
        md.push('\n');
    }
    let out_dir = workspace_root().join("bench-results");
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("xdp.md"), &md)?;
    println!("{md}");
    Ok(())
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("portcullis-bench-xdp-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
