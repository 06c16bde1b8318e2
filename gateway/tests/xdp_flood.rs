//! End to end as root: an attacker namespace floods the gateway's port while a legitimate
//! namespace keeps getting 200s; the drops show in the counters; repeated 401s get a source
//! banned in the kernel until the ban expires; an operator bans and unbans from the CLI.

mod support;

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use support::{netns::*, Gateway};

/// The flood: a bounded loop of UDP datagrams to the protected port, at most this many...
const FLOOD_PACKETS: u32 = 400_000;
/// ...and for at most this long.
const FLOOD_SECONDS: f64 = 4.0;

fn stats(config: &std::path::Path) -> String {
    sh_ok(&[
        env!("CARGO_BIN_EXE_portcullis"),
        "xdp",
        "stats",
        "--config",
        config.to_str().unwrap(),
    ])
}

fn counter(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("counter {name} ")))
        .unwrap_or("0")
        .parse()
        .unwrap()
}

fn source_drops(stats: &str, ip: &str) -> Option<u64> {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("source {ip} packets=")))
        .map(|rest| rest.split("drops=").nth(1).unwrap().trim().parse().unwrap())
}

/// One HTTP request from inside `net`; the status, or 0 when it failed (timed out).
fn curl_status(net: &VethNamespace, url: &str, max_time: &str) -> u16 {
    let out = net.exec(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        max_time,
        url,
    ]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn flood_is_dropped_in_the_kernel_and_bans_follow_401s() {
    let _serial = PRIVILEGED.lock().unwrap_or_else(|e| e.into_inner());
    if !privileged_or_skip("flood_is_dropped_in_the_kernel_and_bans_follow_401s") {
        return;
    }
    let attacker = VethNamespace::create_on("f", ("203.0.113.1", "203.0.113.2"));
    let legit = VethNamespace::create_on("l", ("198.51.100.1", "198.51.100.2"));
    let pins = BpffsDir::new();
    let scratch = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nlisten = [\"203.0.113.1:0\"]\nworkers = 2\n\n[xdp]\ninterface = [\"{}\", \"{}\"]\nmode = \"driver\"\npin_path = \"{}\"\nrate = 2000\nburst = 400\nban_after = 3\nban_window = \"10s\"\nban_duration = \"2s\"\n\n[[routes]]\nmatch = {{ path = \"/login\" }}\nrespond = {{ status = 401, body = \"no\" }}\n\n[[routes]]\nrespond = {{ status = 200, body = \"ok\" }}\n",
        attacker.host_if,
        legit.host_if,
        pins.dir.path().join("p").display()
    );
    let config_path = scratch.path().join("gw.toml");
    std::fs::write(&config_path, &config).unwrap();
    let gw = Gateway::start(&config);
    let port = gw.addr.port();
    let url = format!("http://203.0.113.1:{port}/");

    // The flood, from the attacker's namespace, bounded in count and time.
    let flood = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nend=time.time()+{FLOOD_SECONDS}\nn=0\nwhile n<{FLOOD_PACKETS} and time.time()<end:\n    s.sendto(b'x'*64,('203.0.113.1',{port}))\n    n+=1\nprint(n)\n"
    );
    let flooder = Command::new("ip")
        .args(["netns", "exec", &attacker.ns, "python3", "-c", &flood])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut ok = 0;
    let mut tries = 0;
    while started.elapsed() < Duration::from_secs(3) && tries < 30 {
        tries += 1;
        if curl_status(&legit, &url, "2") == 200 {
            ok += 1;
        }
    }
    let sent: u64 = String::from_utf8_lossy(&flooder.wait_with_output().unwrap().stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert_eq!(
        ok, tries,
        "every legitimate request succeeded during the flood"
    );
    let s = stats(&config_path);
    let dropped = source_drops(&s, attacker.peer_ip).expect("the attacker is tracked");
    assert!(sent > 10_000, "the flood sent {sent} packets");
    assert!(
        counter(&s, "dropped_rate") >= dropped && dropped > sent / 2,
        "most of the flood was dropped: sent {sent}\n{s}"
    );
    assert_eq!(
        source_drops(&s, legit.peer_ip),
        Some(0),
        "nothing legitimate dropped\n{s}"
    );
    assert!(
        s.lines()
            .take_while(|l| !l.starts_with("ban "))
            .find(|l| l.starts_with("source "))
            .unwrap()
            .contains(attacker.peer_ip),
        "the top dropped source is the attacker\n{s}"
    );

    // Three gateway-issued 401s within the window: banned in the kernel.
    thread::sleep(Duration::from_millis(300));
    let login = format!("http://203.0.113.1:{port}/login");
    for _ in 0..3 {
        assert_eq!(curl_status(&attacker, &login, "2"), 401);
    }
    thread::sleep(Duration::from_millis(200));
    let s = stats(&config_path);
    assert!(
        s.contains(&format!("ban {} ", attacker.peer_ip)),
        "banned after three 401s\n{s}\n{}",
        gw.log()
    );
    assert_eq!(
        curl_status(&attacker, &url, "1"),
        0,
        "a banned source's SYNs are dropped"
    );
    assert_eq!(
        curl_status(&legit, &url, "2"),
        200,
        "others are not affected"
    );
    assert!(counter(&stats(&config_path), "dropped_ban") > 0);
    // The ban expires by itself.
    thread::sleep(Duration::from_millis(2200));
    assert_eq!(curl_status(&attacker, &url, "2"), 200, "the ban expired");

    // An operator bans and unbans from the CLI.
    let cli = |args: &[&str]| {
        let mut full = vec![env!("CARGO_BIN_EXE_portcullis"), "xdp", "ban"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--config", config_path.to_str().unwrap()]);
        sh_ok(&full)
    };
    cli(&["add", legit.peer_ip, "--duration", "1m"]);
    assert!(cli(&["list"]).contains(legit.peer_ip));
    assert_eq!(curl_status(&legit, &url, "1"), 0, "banned by the operator");
    cli(&["remove", legit.peer_ip]);
    assert_eq!(curl_status(&legit, &url, "2"), 200, "unbanned");
    assert!(gw.log().contains("source banned"), "{}", gw.log());
}
