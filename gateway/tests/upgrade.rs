//! Zero-downtime binary upgrade: `portcullis --upgrade` takes the listening sockets and the data
//! directory from the running gateway over its control socket; the old one drains and exits.
//! Under load from keep-alive and new-connection clients no request fails, and quota counts
//! carry over.

mod support;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use support::*;

fn metered(addr: std::net::SocketAddr) -> u16 {
    request(addr, "GET /metered/x HTTP/1.1\r\nHost: a\r\n\r\n").status
}

#[test]
fn two_upgrades_under_load_fail_no_request_and_keep_quota_counts() {
    let up = Upstream::echo_target();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\ndrain_timeout = \"2s\"\n\n[upstreams.up]\nservers = [\"{}\"]\n\n[[routes]]\nmatch = {{ path_prefix = \"/metered/\" }}\nupstream = \"up\"\nquotas = [{{ key = \"route\", limit = 5, period = \"day\" }}]\n\n{ROUTE_ALL}",
        up.addr
    );
    let mut first = Gateway::start(&config);
    let addr = first.addr;
    // The port is fixed now: the upgraded processes take the same sockets.
    let fixed = config.replace("127.0.0.1:0", &addr.to_string());
    std::fs::write(first.dir().join("gateway.toml"), &fixed).unwrap();
    for _ in 0..3 {
        assert_eq!(metered(addr), 200);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
            thread::spawn(move || {
                let keep_alive = i % 2 == 0;
                let mut c = Client::connect(addr);
                let deadline = Instant::now() + Duration::from_secs(30);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if !keep_alive {
                        c = Client::connect(addr);
                    }
                    c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
                    sent.fetch_add(1, Ordering::Relaxed);
                    match c.read_response(false) {
                        Some(r) if r.status == 200 => {
                            // A draining gateway says so; the client then reconnects.
                            if r.header("connection") == Some("close") {
                                c = Client::connect(addr);
                            }
                        }
                        other => {
                            eprintln!("client {i}: {:?}", other.map(|r| r.status));
                            failed.fetch_add(1, Ordering::Relaxed);
                            c = Client::connect(addr);
                        }
                    }
                    thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(500));
    let second = upgrade(first.dir(), &[]);
    assert!(exited(&mut first.child, Duration::from_secs(10)).success());
    thread::sleep(Duration::from_millis(500));
    let mut second = second;
    let third = upgrade(first.dir(), &[]);
    assert!(exited(&mut second.child, Duration::from_secs(10)).success());
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("upgrade under load: {sent} requests, {failed} failed, 2 upgrades");
    assert!(sent > 500, "only {sent} requests");
    assert_eq!(failed, 0, "requests failed during the upgrades");
    // The quota count went along: 3 of 5 were spent before.
    assert_eq!(metered(addr), 200, "4th of 5");
    assert_eq!(metered(addr), 200, "5th of 5");
    assert_eq!(metered(addr), 429, "spent");
    assert!(third
        .log
        .lock()
        .unwrap()
        .contains("took over 2 listening sockets"));
}

#[test]
fn an_upgrade_with_the_admin_api_on_a_fixed_port_completes_and_keeps_it_answering() {
    const TOKEN: &str = "upgrade-admin-token-0123456789";
    let admin_port = free_port();
    let up = Upstream::echo_target();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\ndrain_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken_env = \"PORTCULLIS_TEST_ADMIN_TOKEN\"\n\n[upstreams.up]\nservers = [\"{}\"]\n\n{ROUTE_ALL}",
        up.addr
    );
    let mut first = Gateway::start_with(&config, &[("PORTCULLIS_TEST_ADMIN_TOKEN", TOKEN)]);
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    assert_eq!(
        admin_request(admin, "GET", "/readyz", Some(TOKEN), "").0,
        200
    );
    let fixed = config.replace("127.0.0.1:0", &first.addr.to_string());
    std::fs::write(first.dir().join("gateway.toml"), &fixed).unwrap();

    // The new process binds the admin port beside the old one (SO_REUSEPORT) once the old
    // one has confirmed, so the upgrade goes through.
    let _next = upgrade(first.dir(), &[("PORTCULLIS_TEST_ADMIN_TOKEN", TOKEN)]);
    let status = first
        .wait_exit(Duration::from_secs(20))
        .expect("the old process hands over and exits");
    assert!(status.success(), "{}", first.log());
    // Only the new process answers now: ready, with its own (short) uptime.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = admin_request(admin, "GET", "/status", Some(TOKEN), "");
        if code == 200 && body.contains("\"draining\": false") {
            break;
        }
        assert!(Instant::now() < deadline, "{code} {body}");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        request(first.addr, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n").status,
        200
    );
}
