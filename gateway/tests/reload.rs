//! Hot reload: `portcullis reload` (over the control socket) and SIGHUP put a new config in
//! force without a restart; an invalid or unreloadable one is refused and the old one keeps
//! serving; limit and quota state survives a reload that keeps their names; a reload under
//! load fails no request.

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

const HEAD: &str = "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n";

fn respond(path_prefix: &str, body: &str) -> String {
    format!("[[routes]]\nmatch = {{ path_prefix = \"{path_prefix}\" }}\nrespond = {{ status = 200, body = \"{body}\" }}\n\n")
}

fn get(gw: &Gateway, path: &str) -> Response {
    request(gw.addr, &format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n"))
}

/// Waits until `path` answers `body` (a worker takes a new config at its next request).
fn eventually(gw: &Gateway, path: &str, status: u16, body: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(gw, path);
        if r.status == status && r.text() == body {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: {} {:?}, expected {status} {body:?}",
            r.status,
            r.text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reload_adds_changes_and_removes_routes() {
    let gw = Gateway::start(&format!(
        "{HEAD}{}{}",
        respond("/a/", "a1"),
        respond("/b/", "b")
    ));
    assert_eq!(get(&gw, "/a/x").text(), "a1");
    assert_eq!(get(&gw, "/b/x").text(), "b");
    let (ok, out) = gw.reload_with(&format!(
        "{HEAD}{}{}",
        respond("/a/", "a2"),
        respond("/c/", "c")
    ));
    assert!(ok, "{out}");
    assert!(
        out.contains("1 added (/c/*)")
            && out.contains("1 removed (/b/*)")
            && out.contains("1 changed (/a/*)"),
        "{out}"
    );
    // Both workers: several fresh connections each.
    for _ in 0..6 {
        eventually(&gw, "/a/x", 200, "a2");
        eventually(&gw, "/c/x", 200, "c");
        eventually(&gw, "/b/x", 404, "no route matches this request\n");
    }
    assert!(
        gw.log().contains("config reloaded: routes: 1 added"),
        "{}",
        gw.log()
    );
}

#[test]
fn invalid_or_unreloadable_configs_are_refused_and_the_old_one_serves() {
    let good = format!("{HEAD}{}", respond("/", "old"));
    let gw = Gateway::start(&good);
    let (ok, out) = gw.reload_with(&format!(
        "{HEAD}{}[[routes]]\nmatch = {{ path_prefix = \"/x/\" }}\nupstream = \"nowhere\"\n",
        respond("/", "new")
    ));
    assert!(!ok, "{out}");
    assert!(
        out.contains("gateway.toml:")
            && out.contains("`routes[1].upstream`")
            && out.contains("no upstream named `nowhere`"),
        "{out}"
    );
    let (ok, out) = gw.reload_with(
        &format!("{HEAD}{}", respond("/", "new")).replace("workers = 2", "workers = 1"),
    );
    assert!(
        !ok && out.contains("server.workers") && out.contains("need a restart"),
        "{out}"
    );
    for _ in 0..4 {
        assert_eq!(
            get(&gw, "/x").text(),
            "old",
            "the running config keeps serving"
        );
    }
    // SIGHUP reloads too, and a good file is then taken.
    std::fs::write(
        gw.dir().join("gateway.toml"),
        format!("{HEAD}{}", respond("/", "hup")),
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    for _ in 0..4 {
        eventually(&gw, "/x", 200, "hup");
    }
}

#[test]
fn limit_and_quota_state_survives_a_reload_that_keeps_their_names() {
    let up = Upstream::echo_target();
    let routes = format!(
        "[upstreams.up]\nservers = [\"{}\"]\n\n[[routes]]\nmatch = {{ path_prefix = \"/limited/\" }}\nupstream = \"up\"\nlimits = [{{ key = \"route\", rate = 3, per = \"1h\", name = \"hourly\" }}]\n\n[[routes]]\nmatch = {{ path_prefix = \"/metered/\" }}\nupstream = \"up\"\nquotas = [{{ key = \"route\", limit = 3, period = \"day\", name = \"daily\" }}]\n\n",
        up.addr
    );
    let gw = Gateway::start(&format!("{HEAD}{routes}"));
    for _ in 0..2 {
        assert_eq!(get(&gw, "/limited/x").status, 200);
        assert_eq!(get(&gw, "/metered/x").status, 200);
    }
    // An unrelated route in front, and the limit's rate raised: the names stay, so do the
    // counts (the limit applies its new rate to the same bucket).
    let reloaded = format!(
        "{HEAD}{}{}",
        respond("/health", "ok"),
        routes.replace("rate = 3,", "rate = 4,")
    );
    let (ok, out) = gw.reload_with(&reloaded);
    assert!(ok, "{out}");
    eventually(&gw, "/health", 200, "ok");
    let limited: Vec<u16> = (0..3).map(|_| get(&gw, "/limited/x").status).collect();
    // GCRA keeps time, not counts: 2 requests at 3 an hour left 40 minutes of debt; at 4 an
    // hour the allowance is 45 minutes (3 intervals of 15), so exactly one more fits. A fresh
    // bucket would have admitted all three.
    assert_eq!(
        limited,
        [200, 429, 429],
        "the bucket survived with the new rate"
    );
    let metered: Vec<u16> = (0..2).map(|_| get(&gw, "/metered/x").status).collect();
    assert_eq!(metered, [200, 429], "2 of 3 were used before the reload");
}

#[test]
fn a_reload_under_load_fails_no_request() {
    let up = Upstream::echo_target();
    let config = |body: &str| {
        format!(
            "{HEAD}[upstreams.up]\nservers = [\"{}\"]\n\n[[routes]]\nmatch = {{ path_prefix = \"/up/\" }}\nupstream = \"up\"\n\n{}",
            up.addr,
            respond("/static/", body)
        )
    };
    let gw = Gateway::start(&config("one"));
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let (stop, sent, failed, addr) = (stop.clone(), sent.clone(), failed.clone(), gw.addr);
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                let path = if i % 2 == 0 { "/up/x" } else { "/static/x" };
                let deadline = Instant::now() + Duration::from_secs(20);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    c.send(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
                    sent.fetch_add(1, Ordering::Relaxed);
                    match c.read_response(false) {
                        Some(r) if r.status == 200 => {}
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            c = Client::connect(addr);
                        }
                    }
                }
            })
        })
        .collect();
    for i in 0..8 {
        thread::sleep(Duration::from_millis(250));
        let (ok, out) = gw.reload_with(&config(if i % 2 == 0 { "two" } else { "one" }));
        assert!(ok, "{out}");
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("reload under load: {sent} requests, {failed} failed, 8 reloads");
    assert!(sent > 1000, "only {sent} requests");
    assert_eq!(failed, 0, "requests failed during reloads");
}

#[test]
fn reload_starts_added_listeners_and_winds_down_removed_ones() {
    let gw = Gateway::start(&format!("{HEAD}{}", respond("/", "one")));
    let first = gw.addr;
    // A keep-alive connection on the first address, kept across the reloads.
    let mut kept = Client::connect(first);
    kept.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(kept.read_response(false).unwrap().text(), "one");

    let port = free_port();
    let second: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let both = HEAD.replace(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"127.0.0.1:0\", \"{second}\"]"),
    );
    let (ok, out) = gw.reload_with(&format!("{both}{}", respond("/", "two")));
    assert!(ok && out.contains("listeners: 1 added"), "{out}");
    // Every worker accepts on the new address (several fresh connections), the old one too.
    for _ in 0..6 {
        assert_eq!(
            request(second, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n").text(),
            "two"
        );
        eventually(&gw, "/x", 200, "two");
    }

    // Now only the second: the first stops accepting, and its open connection is told to
    // close with its next answer, never cut.
    let only_second = HEAD.replace(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"{second}\"]"),
    );
    let (ok, out) = gw.reload_with(&format!("{only_second}{}", respond("/", "three")));
    assert!(ok && out.contains("1 removed"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(first).is_ok() {
        assert!(
            Instant::now() < deadline,
            "{first} still accepts after its removal"
        );
        thread::sleep(Duration::from_millis(20));
    }
    kept.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
    let last = kept
        .read_response(false)
        .expect("an answer on the removed listener's connection");
    assert_eq!(last.text(), "three");
    assert_eq!(last.header("connection"), Some("close"));
    assert!(kept.is_closed());
    assert_eq!(
        request(second, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n").text(),
        "three"
    );

    // An address that cannot be bound refuses the whole reload; the running config stays.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = HEAD.replace(
        "listen = [\"127.0.0.1:0\"]",
        &format!(
            "listen = [\"{second}\", \"{}\"]",
            taken.local_addr().unwrap()
        ),
    );
    let (ok, out) = gw.reload_with(&format!("{busy}{}", respond("/", "four")));
    assert!(!ok && out.contains("could not be bound"), "{out}");
    assert_eq!(
        request(second, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n").text(),
        "three"
    );
}
