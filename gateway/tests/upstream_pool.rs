//! Upstream connections that fail cleanly: a connect to a blackholed upstream is cancelled at
//! its timeout (no socket left behind), and a pooled connection the upstream closed while idle
//! is noticed before reuse, so requests that cannot be retried (POSTs) still succeed.

mod support;

use std::{sync::atomic::Ordering, thread, time::Duration};

use support::*;

#[test]
fn blackholed_upstream_leaks_no_descriptors() {
    let (addr, _listener, _fillers) = blackhole();
    let gw = Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n[upstreams.up]\nservers = [\"{addr}\"]\nconnect_timeout = \"100ms\"\n\n{ROUTE_ALL}"
    ));
    // Let the workers settle, then take the baseline.
    assert_eq!(
        request(gw.addr, "GET /warm HTTP/1.1\r\nHost: a\r\n\r\n").status,
        504
    );
    thread::sleep(Duration::from_millis(200));
    let baseline = gw.open_fds();
    // 500 requests from 50 clients at once, each waiting out a 100 ms connect timeout.
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let addr = gw.addr;
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut statuses = Vec::new();
                for _ in 0..10 {
                    c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
                    statuses.push(c.read_response(false).map(|r| r.status));
                }
                statuses
            })
        })
        .collect();
    for c in clients {
        for status in c.join().unwrap() {
            assert_eq!(status, Some(504), "each request times out connecting");
        }
    }
    // The clients have closed; give the gateway a moment to close its side of them.
    let mut after = gw.open_fds();
    for _ in 0..20 {
        if after <= baseline + 10 {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        after = gw.open_fds();
    }
    eprintln!("open descriptors: {baseline} before, {after} after 500 blackholed requests");
    assert!(
        after <= baseline + 10,
        "{after} descriptors open after 500 requests (baseline {baseline}): connects leak sockets"
    );
}

#[test]
fn posts_survive_an_upstream_that_closes_idle_connections() {
    let up = Upstream::start_with_keep_alive(Duration::from_secs(1), |_| {
        Reply::Raw(ok_response("stored"))
    });
    // The gateway would keep the connection 10 s: the upstream closes first, every time.
    let gw = Gateway::start(&config_with(up.addr, "idle_timeout = \"10s\"\n", ROUTE_ALL));
    let mut ok = 0;
    for i in 0..5 {
        let r = request(
            gw.addr,
            &format!("POST /items HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nitem{i}"),
        );
        if r.status == 200 {
            ok += 1;
        }
        thread::sleep(Duration::from_millis(1300));
    }
    assert_eq!(ok, 5, "POSTs after the upstream's idle close");
    assert_eq!(up.requests().len(), 5);
    assert!(
        up.connections.load(Ordering::SeqCst) >= 5,
        "each POST needed a fresh connection"
    );
}
