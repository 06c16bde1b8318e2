//! Rate limits: exact admission under a concurrent burst over all workers, per-key separation,
//! burst and refill, and the 429 fields.

mod support;

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::Duration,
};

use support::*;

fn gateway(up: &Upstream, routes: &str) -> Gateway {
    Gateway::start(&format!("[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n[upstreams.up]\nservers = [\"{}\"]\n\n{routes}", up.addr))
}

#[test]
fn admission_is_exact_under_a_concurrent_burst() {
    let up = Upstream::echo_target();
    let gw = gateway(
        &up,
        "[[routes]]\nupstream = \"up\"\nlimits = [{ key = \"route\", rate = 50, per = \"60s\" }]\n",
    );
    let (ok, limited) = (AtomicUsize::new(0), AtomicUsize::new(0));
    thread::scope(|s| {
        for _ in 0..20 {
            s.spawn(|| {
                for _ in 0..10 {
                    // A new connection each time, so the kernel spreads them over both workers.
                    match request(gw.addr, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n").status {
                        200 => ok.fetch_add(1, Ordering::SeqCst),
                        429 => limited.fetch_add(1, Ordering::SeqCst),
                        other => panic!("unexpected status {other}"),
                    };
                }
            });
        }
    });
    assert_eq!(
        (ok.into_inner(), limited.into_inner()),
        (50, 150),
        "exactly the limit is admitted"
    );
    assert_eq!(up.requests().len(), 50);
}

#[test]
fn keys_are_counted_separately_and_fields_describe_the_limit() {
    let up = Upstream::echo_target();
    let gw = gateway(
        &up,
        "[[routes]]\nmatch = { path_prefix = \"/quiet/\" }\nupstream = \"up\"\nrate_limit_headers = false\nlimits = [{ key = \"route\", rate = 1, per = \"60s\" }]\n\n[[routes]]\nupstream = \"up\"\nlimits = [{ key = \"header:X-Tenant\", rate = 3, per = \"60s\", name = \"tenant\" }]\n",
    );
    let tenant = |t: &str| {
        request(
            gw.addr,
            &format!("GET /t HTTP/1.1\r\nHost: a\r\nX-Tenant: {t}\r\n\r\n"),
        )
    };
    for _ in 0..3 {
        assert_eq!(tenant("acme").status, 200);
    }
    let r = tenant("acme");
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(r.header("ratelimit-policy"), Some("\"tenant\";q=3;w=60"));
    assert_eq!(
        r.header("ratelimit"),
        Some(format!("\"tenant\";r=0;t={retry}").as_str())
    );
    assert_eq!(
        tenant("globex").status,
        200,
        "another tenant has its own allowance"
    );
    // Headers can be turned off per route; Retry-After stays.
    assert_eq!(
        request(gw.addr, "GET /quiet/a HTTP/1.1\r\nHost: a\r\n\r\n").status,
        200
    );
    let r = request(gw.addr, "GET /quiet/a HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(
        (
            r.status,
            r.header("ratelimit"),
            r.header("ratelimit-policy")
        ),
        (429, None, None)
    );
    assert!(r.header("retry-after").is_some());
}

#[test]
fn burst_then_refill() {
    let up = Upstream::echo_target();
    let gw = gateway(&up, "[[routes]]\nupstream = \"up\"\nlimits = [{ key = \"client\", rate = 10, per = \"1s\", burst = 2 }]\n");
    let mut c = Client::connect(gw.addr);
    let mut status = || {
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        c.read_response(false).unwrap().status
    };
    assert_eq!(
        [status(), status(), status()],
        [200, 200, 429],
        "a burst of 2"
    );
    // 10/s: a new slot every 100 ms.
    thread::sleep(Duration::from_millis(150));
    assert_eq!([status(), status()], [200, 429]);
}

#[test]
fn concurrency_limit_refuses_or_queues() {
    let up = Upstream::start(|_| Reply::Delayed(Duration::from_millis(300), ok_response("slow")));
    let gw = gateway(
        &up,
        "[[routes]]\nmatch = { path_prefix = \"/queued/\" }\nupstream = \"up\"\nconcurrency = { max = 1, queue_timeout = \"2s\" }\n\n[[routes]]\nupstream = \"up\"\nconcurrency = { max = 2 }\n",
    );
    // Four at once against max = 2 without a queue: two served, two refused with 503.
    let statuses: Vec<u16> = thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| request(gw.addr, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n").status))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 503).count(),
        2,
        "{statuses:?}"
    );
    // With a queue, three at once against max = 1 are all served, one after another.
    let started = std::time::Instant::now();
    let statuses: Vec<u16> = thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| request(gw.addr, "GET /queued/x HTTP/1.1\r\nHost: a\r\n\r\n").status)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses, [200, 200, 200]);
    assert!(
        started.elapsed() >= Duration::from_millis(850),
        "served one at a time: {:?}",
        started.elapsed()
    );
    // Slots come back after every request, also after refusals.
    assert_eq!(
        request(gw.addr, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n").status,
        200
    );
}

#[test]
fn concurrency_per_consumer() {
    let up = Upstream::start(|_| Reply::Delayed(Duration::from_millis(300), ok_response("slow")));
    let (alice, alice_hash) = mint("alice");
    let (bob, bob_hash) = mint("bob");
    let gw = Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n[[consumers]]\nid = \"alice\"\napi_keys = [\"{alice_hash}\"]\n\n[[consumers]]\nid = \"bob\"\napi_keys = [\"{bob_hash}\"]\n\n[upstreams.up]\nservers = [\"{}\"]\n\n[[routes]]\nupstream = \"up\"\nauth = {{ methods = [\"api_key\"] }}\nconcurrency = {{ key = \"consumer\", max = 1 }}\n",
        up.addr
    ));
    let call = |key: &str| {
        request(
            gw.addr,
            &format!("GET / HTTP/1.1\r\nHost: a\r\nX-API-Key: {key}\r\n\r\n"),
        )
        .status
    };
    let statuses: Vec<(&str, u16)> = thread::scope(|s| {
        let handles: Vec<_> = [("alice", &alice), ("alice", &alice), ("bob", &bob)]
            .into_iter()
            .map(|(who, key)| s.spawn(move || (who, call(key))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let alice_ok = statuses
        .iter()
        .filter(|(w, s)| *w == "alice" && *s == 200)
        .count();
    let alice_refused = statuses
        .iter()
        .filter(|(w, s)| *w == "alice" && *s == 503)
        .count();
    assert_eq!((alice_ok, alice_refused), (1, 1), "{statuses:?}");
    assert!(
        statuses.contains(&("bob", 200)),
        "bob has his own slot: {statuses:?}"
    );
}
