//! `[cluster]`: two gateway processes share a quota through a real redis-server that the test
//! starts on a free port with persistence off. The combined admitted count stays within the
//! documented bound; a Redis outage falls back to local limits, and recovery resumes sharing.

mod support;

use std::{
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use support::*;

const LIMIT: usize = 40;
const BATCH: usize = 4;
const HOSTS: usize = 2;

struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(port: u16) -> Option<Redis> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            thread::sleep(Duration::from_millis(20));
        }
        Some(Redis { child, port })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn gateway(up: &Upstream, redis_port: u16, data: &std::path::Path) -> Gateway {
    Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n[cluster]\nredis = \"redis://127.0.0.1:{redis_port}\"\nbatch = {BATCH}\nsync_interval = \"50ms\"\n\n[quotas]\ndata_dir = \"{}\"\n\n[upstreams.up]\nservers = [\"{}\"]\n\n[[routes]]\nmatch = {{ path_prefix = \"/limited/\" }}\nupstream = \"up\"\nlimits = [{{ key = \"route\", rate = {LIMIT}, per = \"1h\" }}]\n\n[[routes]]\nupstream = \"up\"\nquotas = [{{ key = \"header:X-Tenant\", limit = {LIMIT}, period = \"day\" }}]\n",
        data.display(),
        up.addr
    ))
}

fn call(gw: &Gateway, tenant: &str) -> u16 {
    request(
        gw.addr,
        &format!("GET / HTTP/1.1\r\nHost: a\r\nX-Tenant: {tenant}\r\n\r\n"),
    )
    .status
}

#[test]
fn two_hosts_share_a_quota_through_redis() {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var_os("PORTCULLIS_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1") {
            panic!("redis-server is required (apt-get install redis-server)");
        }
        eprintln!("\n*** SKIPPED cluster test: redis-server is not installed ***\n");
        return;
    }
    let port = free_port();
    let redis = Redis::start(port).unwrap();
    let up = Upstream::echo_target();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let hosts = [
        gateway(&up, redis.port, d1.path()),
        gateway(&up, redis.port, d2.path()),
    ];
    thread::sleep(Duration::from_millis(200));

    // 160 requests for one tenant, from 8 clients spread over both hosts.
    let admitted = AtomicUsize::new(0);
    thread::scope(|s| {
        for client in 0..8 {
            let (gw, admitted) = (&hosts[client % 2], &admitted);
            s.spawn(move || {
                for _ in 0..20 {
                    if call(gw, "acme") == 200 {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                    thread::sleep(Duration::from_millis(5));
                }
            });
        }
    });
    let admitted = admitted.into_inner();
    let bound = LIMIT + (HOSTS - 1) * BATCH;
    assert!(
        (LIMIT..=bound).contains(&admitted),
        "admitted {admitted}, allowed {LIMIT}, bound {bound}"
    );
    eprintln!(
        "cluster: admitted {admitted} of {LIMIT} allowed across {HOSTS} hosts (bound {bound})"
    );

    // A rate limit is shared the same way (a window of `rate` per `per` across hosts).
    let limited = AtomicUsize::new(0);
    thread::scope(|s| {
        for client in 0..8 {
            let (gw, limited) = (&hosts[client % 2], &limited);
            s.spawn(move || {
                for _ in 0..20 {
                    if request(gw.addr, "GET /limited/x HTTP/1.1\r\nHost: a\r\n\r\n").status == 200
                    {
                        limited.fetch_add(1, Ordering::SeqCst);
                    }
                    thread::sleep(Duration::from_millis(5));
                }
            });
        }
    });
    let limited = limited.into_inner();
    assert!(
        (LIMIT..=bound).contains(&limited),
        "rate limit admitted {limited}, allowed {LIMIT}, bound {bound}"
    );
    eprintln!(
        "cluster: rate limit admitted {limited} of {LIMIT} across {HOSTS} hosts (bound {bound})"
    );

    // Redis goes away: each host falls back to its local quota and says so.
    drop(redis);
    thread::sleep(Duration::from_millis(300));
    for gw in &hosts {
        assert_eq!(
            call(gw, "globex"),
            200,
            "served from local limits during the outage"
        );
    }
    thread::sleep(Duration::from_millis(200));
    for gw in &hosts {
        assert!(
            gw.log().contains("falling back to local limits"),
            "{}",
            gw.log()
        );
    }
    // Redis comes back on the same port: sharing resumes, and the log says so.
    let _redis = Redis::start(port).unwrap();
    thread::sleep(Duration::from_millis(300));
    call(&hosts[0], "initech");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !hosts[0].log().contains("Redis reachable again") {
        assert!(Instant::now() < deadline, "{}", hosts[0].log());
        call(&hosts[0], "initech");
        thread::sleep(Duration::from_millis(50));
    }
}
