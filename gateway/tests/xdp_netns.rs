//! The XDP program for real: loaded by the gateway, attached to a veth in driver mode, counting
//! per-source packets from a client in another network namespace. Root only.

mod support;

use std::time::Duration;

use support::{netns::*, Gateway};

#[test]
fn xdp_attaches_counts_per_source_and_detaches() {
    let _serial = PRIVILEGED.lock().unwrap_or_else(|e| e.into_inner());
    if !privileged_or_skip("xdp_attaches_counts_per_source_and_detaches") {
        return;
    }
    let net = VethNamespace::create("a");
    let pins = BpffsDir::new();
    let pin_path = pins.dir.path().join("portcullis");
    let config = format!(
        "[server]\nlisten = [\"{}:0\"]\nworkers = 2\n\n[xdp]\ninterface = \"{}\"\nmode = \"driver\"\npin_path = \"{}\"\n\n[[routes]]\nrespond = {{ status = 200, body = \"through xdp\" }}\n",
        net.host_ip,
        net.host_if,
        pin_path.display()
    );
    let mut gw = Gateway::start(&config);
    let log = gw.log();
    assert!(
        log.contains("XDP program attached") && log.contains("mode=\"driver\""),
        "{log}"
    );
    let link = sh_ok(&["ip", "link", "show", &net.host_if]);
    assert!(
        link.contains("xdp"),
        "the interface shows an XDP program: {link}"
    );

    let url = format!("http://{}/", gw.addr);
    for _ in 0..5 {
        let body = net.exec_ok(&["curl", "-sS", "--max-time", "5", &url]);
        assert_eq!(body, "through xdp");
    }
    // Traffic to a port the gateway does not listen on is not counted per source.
    let other = format!("http://{}:{}/", net.host_ip, gw.addr.port() + 1);
    let _ = net.exec(&["curl", "-sS", "--max-time", "2", &other]);

    let scratch = tempfile::tempdir().unwrap();
    let config_path = scratch.path().join("stats.toml");
    std::fs::write(&config_path, &config).unwrap();
    let stats = sh_ok(&[
        env!("CARGO_BIN_EXE_portcullis"),
        "xdp",
        "stats",
        "--config",
        config_path.to_str().unwrap(),
    ]);
    let source_packets: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("source {} packets=", net.peer_ip)))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no count for {}: {stats}", net.peer_ip))
        .parse()
        .unwrap();
    // Five HTTP exchanges are at least 5 x (SYN, ACK, request, ACK of response, FIN) packets.
    assert!(source_packets >= 25, "{stats}");
    let counter = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("counter {name} ")))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(counter("passed") >= source_packets, "{stats}");
    assert!(
        counter("not_protected") >= 1,
        "the SYN to the other port: {stats}"
    );
    assert_eq!(
        stats.lines().filter(|l| l.starts_with("source ")).count(),
        1,
        "only the client's address: {stats}"
    );

    gw.signal(libc::SIGTERM);
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .expect("gateway exits");
    assert!(status.success(), "{}", gw.log());
    let link = sh_ok(&["ip", "link", "show", &net.host_if]);
    assert!(!link.contains("xdp"), "detached on exit: {link}");
    assert!(!pin_path.join("COUNTERS").exists(), "pins removed on exit");
}

#[test]
fn xdp_failure_is_fatal_unless_optional() {
    let _serial = PRIVILEGED.lock().unwrap_or_else(|e| e.into_inner());
    if !privileged_or_skip("xdp_failure_is_fatal_unless_optional") {
        return;
    }
    let pins = BpffsDir::new();
    let base = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n[xdp]\ninterface = \"pcl-nonexist0\"\npin_path = \"{}\"\n",
        pins.dir.path().join("p").display()
    );
    let route = "\n[[routes]]\nrespond = { status = 200 }\n";
    let dir = tempfile::tempdir().unwrap();
    let fatal = dir.path().join("fatal.toml");
    std::fs::write(&fatal, format!("{base}{route}")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&fatal)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pcl-nonexist0") && err.contains("optional"),
        "{err}"
    );

    let gw = Gateway::start(&format!("{base}optional = true\n{route}"));
    assert!(gw.log().contains("running without it"), "{}", gw.log());
    assert_eq!(
        support::request(gw.addr, "GET / HTTP/1.1\r\nHost: a\r\n\r\n").status,
        200
    );
}

/// A binary upgrade leaves the program attached: the new process adopts its pinned links and
/// maps, so a ban set before the upgrade still holds after it; the new process detaches on its
/// own stop.
#[test]
fn xdp_and_bans_survive_a_binary_upgrade() {
    let _serial = PRIVILEGED.lock().unwrap_or_else(|e| e.into_inner());
    if !privileged_or_skip("xdp_and_bans_survive_a_binary_upgrade") {
        return;
    }
    let net = VethNamespace::create("u");
    let pins = BpffsDir::new();
    let pin_path = pins.dir.path().join("portcullis");
    let config = format!(
        "[server]\nlisten = [\"{}:0\"]\nworkers = 2\ndrain_timeout = \"2s\"\n\n[xdp]\ninterface = \"{}\"\nmode = \"driver\"\npin_path = \"{}\"\nban_after = 100\n\n[[routes]]\nrespond = {{ status = 200, body = \"through xdp\" }}\n",
        net.host_ip,
        net.host_if,
        pin_path.display()
    );
    let mut old = Gateway::start(&config);
    let fixed = config.replace(&format!("{}:0", net.host_ip), &old.addr.to_string());
    let config_path = old.dir().join("gateway.toml");
    std::fs::write(&config_path, &fixed).unwrap();
    let banned = "198.51.100.77";
    sh_ok(&[
        env!("CARGO_BIN_EXE_portcullis"),
        "xdp",
        "ban",
        "add",
        banned,
        "--duration",
        "10m",
        "--config",
        config_path.to_str().unwrap(),
    ]);
    let url = format!("http://{}/", old.addr);
    assert_eq!(
        net.exec_ok(&["curl", "-sS", "--max-time", "5", &url]),
        "through xdp"
    );

    let mut new = support::upgrade(old.dir(), &[]);
    let status = old
        .wait_exit(Duration::from_secs(15))
        .expect("the old process exits");
    assert!(status.success(), "{}", old.log());
    assert!(old.log().contains("left attached"), "{}", old.log());
    let link = sh_ok(&["ip", "link", "show", &net.host_if]);
    assert!(
        link.contains("xdp"),
        "still attached after the upgrade: {link}"
    );
    let bans = sh_ok(&[
        env!("CARGO_BIN_EXE_portcullis"),
        "xdp",
        "ban",
        "list",
        "--config",
        config_path.to_str().unwrap(),
    ]);
    assert!(bans.contains(banned), "the ban survived: {bans}");
    assert_eq!(
        net.exec_ok(&["curl", "-sS", "--max-time", "5", &url]),
        "through xdp",
        "served by the new process through the same program"
    );
    // The new process owns the program now: it detaches on its own stop.
    unsafe {
        libc::kill(new.child.id() as i32, libc::SIGTERM);
    }
    let status = support::exited(&mut new.child, Duration::from_secs(15));
    assert!(status.success());
    let link = sh_ok(&["ip", "link", "show", &net.host_if]);
    assert!(!link.contains("xdp"), "detached by the new process: {link}");
}

/// The id of the XDP program attached to `iface`, from `ip link`.
fn attached_program(iface: &str) -> Option<String> {
    let link = sh_ok(&["ip", "-details", "link", "show", iface]);
    let at = link.find("prog/xdp id ")?;
    link[at + "prog/xdp id ".len()..]
        .split_whitespace()
        .next()
        .map(str::to_owned)
}

#[test]
fn xdp_policy_is_reloaded_in_place() {
    let _serial = PRIVILEGED.lock().unwrap_or_else(|e| e.into_inner());
    if !privileged_or_skip("xdp_policy_is_reloaded_in_place") {
        return;
    }
    let net = VethNamespace::create("r");
    let pins = BpffsDir::new();
    let pin_path = pins.dir.path().join("portcullis");
    let config = |deny: &str, iface: &str| {
        format!(
            "[server]\nlisten = [\"{}:0\"]\nworkers = 2\n\n[xdp]\ninterface = \"{iface}\"\nmode = \"driver\"\npin_path = \"{}\"\ndeny = [{deny}]\n\n[[routes]]\nrespond = {{ status = 200, body = \"through xdp\" }}\n",
            net.host_ip,
            pin_path.display()
        )
    };
    let gw = Gateway::start(&config("", &net.host_if));
    let program = attached_program(&net.host_if).expect("an XDP program is attached");
    let url = format!("http://{}/", gw.addr);
    let fetch = || net.exec(&["curl", "-sS", "--max-time", "2", &url]);
    assert!(fetch().status.success());

    // Deny the client's address: its packets are dropped, by the same program.
    let (ok, out) = gw.reload_with(&config(&format!("\"{}/32\"", net.peer_ip), &net.host_if));
    assert!(ok && out.contains("XDP policy updated in place"), "{out}");
    assert!(!fetch().status.success(), "a denied source gets through");
    assert_eq!(
        attached_program(&net.host_if).as_deref(),
        Some(program.as_str())
    );

    // Lift it: traffic passes again, still the same program.
    let (ok, out) = gw.reload_with(&config("", &net.host_if));
    assert!(ok, "{out}");
    assert!(fetch().status.success(), "{}", gw.log());
    assert_eq!(
        attached_program(&net.host_if).as_deref(),
        Some(program.as_str())
    );

    // Moving the program to another interface needs a restart, and says so.
    let (ok, out) = gw.reload_with(&config("", "portcullis-none0"));
    assert!(!ok && out.contains("xdp.interface"), "{out}");
}

fn admin_call(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    support::admin_request(addr, method, path, Some(ADMIN_TOKEN), body)
}

const ADMIN_TOKEN: &str = "xdp-admin-token-0123456789abcdef";

#[test]
fn the_admin_api_bans_through_xdp_and_exports_its_counters() {
    let _serial = PRIVILEGED.lock().unwrap_or_else(|e| e.into_inner());
    if !privileged_or_skip("the_admin_api_bans_through_xdp_and_exports_its_counters") {
        return;
    }
    let net = VethNamespace::create("m");
    let pins = BpffsDir::new();
    let pin_path = pins.dir.path().join("portcullis");
    let config = format!(
        "[server]\nlisten = [\"{}:0\"]\nworkers = 2\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"PORTCULLIS_TEST_ADMIN_TOKEN\"\n\n[xdp]\ninterface = \"{}\"\nmode = \"driver\"\npin_path = \"{}\"\n\n[[routes]]\nrespond = {{ status = 200, body = \"through xdp\" }}\n",
        net.host_ip,
        net.host_if,
        pin_path.display()
    );
    let gw = Gateway::start_with(&config, &[("PORTCULLIS_TEST_ADMIN_TOKEN", ADMIN_TOKEN)]);
    let admin = gw.admin_addr();
    let url = format!("http://{}/", gw.addr);
    let fetch = || net.exec(&["curl", "-sS", "--max-time", "2", &url]);
    assert!(fetch().status.success());

    let (status, body) = admin_call(
        admin,
        "POST",
        "/xdp/bans",
        &format!("{{\"address\": \"{}\", \"seconds\": 60}}", net.peer_ip),
    );
    assert_eq!(status, 201, "{body}");
    assert!(
        !fetch().status.success(),
        "a banned source is dropped in the kernel"
    );
    let (_, list) = admin_call(admin, "GET", "/xdp/bans", "");
    assert!(list.contains(&net.peer_ip.to_string()), "{list}");
    let (_, metrics) = admin_call(admin, "GET", "/metrics", "");
    let drops: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "portcullis_xdp_top_source_drops{{source=\"{}\"}} ",
                net.peer_ip
            ))
        })
        .unwrap_or_else(|| panic!("no drops for the banned source:\n{metrics}"))
        .parse()
        .unwrap();
    assert!(drops >= 1.0, "{metrics}");
    assert!(
        metrics.contains("portcullis_xdp_packets_total{counter=\"passed\"}"),
        "{metrics}"
    );

    let (status, body) = admin_call(admin, "DELETE", &format!("/xdp/bans/{}", net.peer_ip), "");
    assert_eq!(status, 200, "{body}");
    assert!(fetch().status.success(), "the ban is lifted");
    let (status, _) = admin_call(admin, "DELETE", &format!("/xdp/bans/{}", net.peer_ip), "");
    assert_eq!(status, 404, "no longer banned");
    let (status, _) = admin_call(admin, "DELETE", "/xdp/bans/not-an-address", "");
    assert_eq!(status, 400);
}
