//! `[cluster]`: two gateway processes share a quota through a real redis-server that the test
//! starts on a free port with persistence off. The combined admitted count stays within the
//! documented bound; a Redis outage falls back to local limits, and recovery resumes sharing.

mod support;

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use support::{redis_server::*, *};

const LIMIT: usize = 40;
/// Admissions a host leases at a time.
const LEASE: usize = 4;
const HOSTS: usize = 2;

/// The secret every host of the test cluster shares, so header-keyed counts agree.
fn shared_key_file() -> &'static std::path::Path {
    static FILE: std::sync::OnceLock<tempfile::NamedTempFile> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), [7u8; 32]).unwrap();
        f
    })
    .path()
}

const ADMIN_TOKEN: &str = "cluster-admin-token-0123456789";

fn gateway(up: &Upstream, redis_port: u16, data: &std::path::Path) -> Gateway {
    Gateway::start_with(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"PORTCULLIS_TEST_ADMIN_TOKEN\"\n\n[cluster]\nredis = \"redis://127.0.0.1:{redis_port}\"\nlease = {LEASE}\nsync_interval = \"50ms\"\n\n[quotas]\ndata_dir = \"{}\"\nkey_file = \"{}\"\n\n[upstreams.up]\nservers = [\"{}\"]\n\n[[routes]]\nmatch = {{ path_prefix = \"/limited/\" }}\nupstream = \"up\"\nlimits = [{{ key = \"route\", rate = {LIMIT}, per = \"1h\" }}]\n\n[[routes]]\nupstream = \"up\"\nquotas = [{{ key = \"header:X-Tenant\", limit = {LIMIT}, period = \"day\" }}]\n",
        data.display(),
        shared_key_file().display(),
        up.addr
    ), &[("PORTCULLIS_TEST_ADMIN_TOKEN", ADMIN_TOKEN)])
}

/// The gateway's `portcullis_cluster_up` gauge.
fn cluster_up(gw: &Gateway) -> Option<String> {
    let (_, metrics) = admin_request(gw.admin_addr(), "GET", "/metrics", Some(ADMIN_TOKEN), "");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_cluster_up "))
        .map(str::to_owned)
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
    if !redis_available("cluster test") {
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
    // Leases: at most one lease per host beyond the limit (first contact only), at least
    // the limit less the unused leases.
    let (low, bound) = (LIMIT - HOSTS * LEASE, LIMIT + HOSTS * LEASE);
    assert!(
        (low..=bound).contains(&admitted),
        "admitted {admitted}, allowed {LIMIT}, bounds {low}..={bound}"
    );
    eprintln!(
        "cluster: admitted {admitted} of {LIMIT} allowed across {HOSTS} hosts (bounds {low}..={bound})"
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
        (low..=bound).contains(&limited),
        "rate limit admitted {limited}, allowed {LIMIT}, bounds {low}..={bound}"
    );
    eprintln!(
        "cluster: rate limit admitted {limited} of {LIMIT} across {HOSTS} hosts (bounds {low}..={bound})"
    );

    assert_eq!(
        cluster_up(&hosts[0]).as_deref(),
        Some("1"),
        "the link is up in the metrics"
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
        assert_eq!(
            cluster_up(gw).as_deref(),
            Some("0"),
            "the outage shows in the metrics"
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

/// Sends `total` requests to `path` over both hosts at about `rate` per second from 8
/// keep-alive clients; returns (admitted, refused with 429).
fn steady(hosts: &[Gateway; 2], path: &str, total: usize, rate: f64) -> (usize, usize) {
    let (ok, limited) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let per_client = total / 8;
    let gap = Duration::from_secs_f64(8.0 / rate);
    thread::scope(|s| {
        for client in 0..8 {
            let (gw, ok, limited) = (&hosts[client % 2], &ok, &limited);
            s.spawn(move || {
                let mut c = Client::connect(gw.addr);
                let start = Instant::now();
                for i in 0..per_client {
                    // Paced from the start, so a slow answer does not slow the schedule.
                    let due = start + gap * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    c.send(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
                    match c.read_response(false).map(|r| r.status) {
                        Some(200) => ok.fetch_add(1, Ordering::SeqCst),
                        Some(429) => limited.fetch_add(1, Ordering::SeqCst),
                        other => panic!("unexpected answer {other:?}"),
                    };
                }
            });
        }
    });
    (ok.into_inner(), limited.into_inner())
}

/// The two scenarios: a steady 3,000 req/s over two hosts never meets a false 429
/// far below the limit, and against a small limit the combined count stays in its bounds.
#[test]
fn leases_admit_steady_traffic_and_hold_the_bound() {
    if !redis_available("cluster lease test") {
        return;
    }
    const STEADY_LEASE: usize = 100;
    let redis = Redis::start(free_port()).unwrap();
    let up = Upstream::echo_target();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let config = |data: &std::path::Path| {
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n[cluster]\nredis = \"redis://127.0.0.1:{}\"\nlease = {STEADY_LEASE}\nsync_interval = \"50ms\"\n\n[quotas]\ndata_dir = \"{}\"\nkey_file = \"{}\"\n\n[upstreams.up]\nservers = [\"{}\"]\n\n[[routes]]\nmatch = {{ path_prefix = \"/big/\" }}\nupstream = \"up\"\nlimits = [{{ key = \"route\", rate = 100000, per = \"1m\" }}]\n\n[[routes]]\nmatch = {{ path_prefix = \"/small/\" }}\nupstream = \"up\"\nlimits = [{{ key = \"route\", rate = 1000, per = \"1m\" }}]\n",
            redis.port,
            data.display(),
            shared_key_file().display(),
            up.addr
        )
    };
    let hosts = [
        Gateway::start(&config(d1.path())),
        Gateway::start(&config(d2.path())),
    ];
    thread::sleep(Duration::from_millis(200));
    let (ok, limited) = steady(&hosts, "/big/x", 6000, 3000.0);
    eprintln!("cluster leases: limit 100000/min, 6000 requests at 3000/s: {ok} admitted, {limited} refused");
    assert_eq!(limited, 0, "false refusals far below the limit");
    let (ok, limited) = steady(&hosts, "/small/x", 3000, 3000.0);
    let (low, high) = (1000 - 2 * STEADY_LEASE, 1000 + 2 * STEADY_LEASE);
    eprintln!("cluster leases: limit 1000/min, 3000 requests at 3000/s: {ok} admitted, {limited} refused (bounds {low}..={high})");
    assert!(
        (low..=high).contains(&ok),
        "admitted {ok}, bounds {low}..={high}"
    );
}
