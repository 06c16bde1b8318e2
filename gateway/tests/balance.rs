//! Load balancing end to end, with real upstream servers on loopback: least-request sends less
//! to a slow server than round robin does; weights are honoured; consistent hashing sends one
//! key to one server, the same after a restart, and moves between 0.5/N and 1.5/N of the keys
//! when one of N servers is removed.

mod support;

use std::{collections::HashMap, thread, time::Duration};

use support::*;

/// An upstream that answers with its own name, after `delay`.
fn named(name: &'static str, delay: Duration) -> Upstream {
    Upstream::start(move |_| {
        let body = name;
        let raw = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        if delay.is_zero() {
            Reply::Raw(raw)
        } else {
            Reply::Delayed(delay, raw)
        }
    })
}

fn gateway(servers: &[&Upstream], workers: usize, upstream_extra: &str) -> Gateway {
    let list: Vec<String> = servers.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = {workers}\n\n\
         [upstreams.up]\nservers = [{}]\n{upstream_extra}\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"up\"\n",
        list.join(", ")
    ))
}

/// Sends `per_thread` requests from each of `threads` keep-alive clients at once; returns how
/// many each upstream (by name) answered.
fn load(gw: &Gateway, threads: usize, per_thread: usize) -> HashMap<String, usize> {
    let addr = gw.addr;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut seen = Vec::new();
                for _ in 0..per_thread {
                    c.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
                    let r = c.read_response(false).expect("a response");
                    assert_eq!(r.status, 200, "{}", r.text());
                    seen.push(r.text());
                }
                seen
            })
        })
        .collect();
    let mut counts = HashMap::new();
    for h in handles {
        for name in h.join().unwrap() {
            *counts.entry(name).or_default() += 1;
        }
    }
    counts
}

#[test]
fn least_request_sends_less_to_a_slow_server_than_round_robin() {
    let slow = named("slow", Duration::from_millis(100));
    let fast = named("fast", Duration::ZERO);
    let round_robin = gateway(&[&slow, &fast], 1, "");
    let least = gateway(&[&slow, &fast], 1, "balance = \"least_request\"");
    let rr = load(&round_robin, 8, 12);
    let lr = load(&least, 8, 12);
    let share = |c: &HashMap<String, usize>| {
        *c.get("slow").unwrap_or(&0) as f64 / c.values().sum::<usize>() as f64
    };
    eprintln!(
        "slow server's share: round robin {:.2}, least request {:.2}",
        share(&rr),
        share(&lr)
    );
    assert!(
        (share(&rr) - 0.5).abs() < 0.05,
        "round robin alternates: {rr:?}"
    );
    assert!(
        share(&lr) < 0.25,
        "least request keeps most requests off the slow server: {lr:?}"
    );
}

#[test]
fn weights_are_honoured_in_smooth_order() {
    let a = named("a", Duration::ZERO);
    let b = named("b", Duration::ZERO);
    let gw = gateway(&[&a, &b], 1, "weights = [3, 1]");
    let mut c = Client::connect(gw.addr);
    let order: String = (0..8)
        .map(|_| {
            c.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
            c.read_response(false).unwrap().text()
        })
        .collect();
    assert_eq!(order, "aabaaaba");
}

/// Which server answered each of `keys` (sent as `X-User`), each asked twice.
fn mapping(gw: &Gateway, keys: &[String]) -> HashMap<String, String> {
    let mut c = Client::connect(gw.addr);
    let mut out = HashMap::new();
    for key in keys {
        let mut ask = || {
            c.send(format!("GET /x HTTP/1.1\r\nHost: t\r\nX-User: {key}\r\n\r\n").as_bytes());
            c.read_response(false).unwrap().text()
        };
        let first = ask();
        assert_eq!(ask(), first, "one key, one server: {key}");
        out.insert(key.clone(), first);
    }
    out
}

#[test]
fn consistent_hashing_keeps_keys_across_restarts_and_moves_few_when_a_server_goes() {
    let servers = [
        named("s0", Duration::ZERO),
        named("s1", Duration::ZERO),
        named("s2", Duration::ZERO),
        named("s3", Duration::ZERO),
    ];
    let all: Vec<&Upstream> = servers.iter().collect();
    let hash = "balance = \"hash\"\nhash_key = \"header:x-user\"\nhash_seed = 7";
    let keys: Vec<String> = (0..400).map(|k| format!("user-{k}")).collect();
    let before = mapping(&gateway(&all, 2, hash), &keys);
    // Every server has a share.
    for s in ["s0", "s1", "s2", "s3"] {
        let n = before.values().filter(|v| *v == s).count();
        assert!((60..=140).contains(&n), "{s}: {n} of 400");
    }
    // A restart (a new process, the other worker count) maps every key alike.
    assert_eq!(mapping(&gateway(&all, 1, hash), &keys), before);
    // One of the four removed: its keys move, and few others.
    let after = mapping(&gateway(&all[..3], 2, hash), &keys);
    let moved = keys.iter().filter(|k| before[*k] != after[*k]).count();
    let share = moved as f64 / keys.len() as f64;
    eprintln!("removing 1 of 4 servers moved {moved} of 400 keys ({share:.3}; 1/N = 0.25)");
    assert!((0.125..=0.375).contains(&share), "{share}");
    // Every key of the removed server moved; of the others, few did.
    let stayed_put = keys
        .iter()
        .filter(|k| before[*k] != "s3")
        .filter(|k| after[*k] == before[*k])
        .count();
    let others = keys.iter().filter(|k| before[*k] != "s3").count();
    assert!(
        stayed_put * 100 >= others * 90,
        "{stayed_put} of {others} stayed"
    );
}

#[test]
fn hash_keys_and_weights_are_checked_at_load() {
    for (extra, says) in [
        ("balance = \"hash\"", "needs `hash_key`"),
        (
            "hash_key = \"client\"",
            "only with `balance = \\\"hash\\\"`",
        ),
        ("balance = \"hash\"\nhash_key = \"ip\"", "is not a hash key"),
        ("weights = [1]", "1 weights for 2 servers"),
        ("weights = [1, 0]", "use 1 to 1000"),
        ("balance = \"fastest\"", "unknown variant"),
    ] {
        let (ok, text) = check_config(&format!(
            "[upstreams.up]\nservers = [\"127.0.0.1:9\", \"127.0.0.1:10\"]\n{extra}\n\n[[routes]]\nupstream = \"up\"\n"
        ));
        assert!(!ok, "{extra}: {text}");
        assert!(
            text.contains(&says.replace("\\\"", "\"")),
            "{extra}: {text}"
        );
    }
}

#[test]
fn a_failing_server_is_ejected_and_comes_back_after_its_time() {
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = failing.clone();
    let sick = Upstream::start(move |_| {
        let (status, body) = if flag.load(std::sync::atomic::Ordering::SeqCst) {
            ("503 Service Unavailable", "sick")
        } else {
            ("200 OK", "sick")
        };
        Reply::Raw(
            format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    });
    let well = named("well", Duration::ZERO);
    let gw = gateway(
        &[&sick, &well],
        1,
        "[upstreams.up.outlier]\nconsecutive_failures = 3\nbase_ejection = \"1s\"\nmax_ejected_percent = 50",
    );
    let mut c = Client::connect(gw.addr);
    let mut ask = || {
        c.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
        let r = c.read_response(false).unwrap();
        (r.status, r.text())
    };
    // Round robin alternates until the third 503 in a row ejects the sick server.
    let first: Vec<(u16, String)> = (0..6).map(|_| ask()).collect();
    assert_eq!(
        first.iter().filter(|(s, _)| *s == 503).count(),
        3,
        "{first:?}"
    );
    // While ejected, every request goes to the well one.
    for _ in 0..10 {
        assert_eq!(ask(), (200, "well".to_owned()));
    }
    // After its time it is asked again; healed, it keeps its share.
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    thread::sleep(Duration::from_millis(1100));
    let later: Vec<(u16, String)> = (0..6).map(|_| ask()).collect();
    assert_eq!(
        later.iter().filter(|(_, b)| b == "sick").count(),
        3,
        "{later:?}"
    );
    assert!(gw.log().contains("upstream server ejected"), "{}", gw.log());
}

#[test]
fn health_checks_take_a_server_out_and_back_within_the_thresholds_once_per_host() {
    use std::sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    };
    let sick = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicUsize::new(0));
    let (flag, counted) = (sick.clone(), checks.clone());
    let a = Upstream::start(move |r| {
        if r.target == "/healthz" {
            counted.fetch_add(1, Ordering::SeqCst);
            let status = if flag.load(Ordering::SeqCst) {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            return Reply::Raw(
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").into_bytes(),
            );
        }
        Reply::Raw(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na".to_vec())
    });
    let b = Upstream::start(|r| {
        let body = if r.target == "/healthz" { "" } else { "b" };
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    });
    let gw = gateway(
        &[&a, &b],
        2,
        "[upstreams.up.health_check]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"500ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 2",
    );
    let served = |n: usize| -> String {
        (0..n)
            .map(|_| {
                request(
                    gw.addr,
                    "GET /x HTTP/1.1\r\nHost: t\r\nconnection: close\r\n\r\n",
                )
                .text()
            })
            .collect()
    };
    assert!(served(10).contains('a'), "healthy at start: both serve");
    // Checked once per host, not once per worker: about ten checks a second, not twenty.
    let before = checks.load(Ordering::SeqCst);
    thread::sleep(Duration::from_secs(1));
    let per_second = checks.load(Ordering::SeqCst) - before;
    assert!(
        (6..=14).contains(&per_second),
        "{per_second} checks in one second"
    );
    // Two failed checks take it out (within about 2 intervals, allowed 1 s).
    sick.store(true, Ordering::SeqCst);
    thread::sleep(Duration::from_millis(1000));
    assert_eq!(served(10), "bbbbbbbbbb");
    assert!(gw.log().contains("fails its health checks"), "{}", gw.log());
    // Two good ones bring it back.
    sick.store(false, Ordering::SeqCst);
    thread::sleep(Duration::from_millis(1000));
    assert!(served(10).contains('a'), "back after passing again");
}

/// Sends one request from each of `n` threads at once; returns the statuses and how long the
/// quickest refusal took.
fn at_once(gw: &Gateway, n: usize) -> Vec<(u16, Duration)> {
    let addr = gw.addr;
    let handles: Vec<_> = (0..n)
        .map(|_| {
            thread::spawn(move || {
                let started = std::time::Instant::now();
                let r = request(
                    addr,
                    "GET /x HTTP/1.1\r\nHost: t\r\nconnection: close\r\n\r\n",
                );
                (r.status, started.elapsed())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn the_circuit_breaker_answers_503_at_once_beyond_its_limits() {
    let slow = named("slow", Duration::from_millis(600));
    for limit in ["max_requests = 2", "max_connections = 2"] {
        let gw = gateway(&[&slow], 2, &format!("circuit_breaker = {{ {limit} }}"));
        let results = at_once(&gw, 5);
        let ok = results.iter().filter(|(s, _)| *s == 200).count();
        let refused: Vec<Duration> = results
            .iter()
            .filter(|(s, _)| *s == 503)
            .map(|(_, t)| *t)
            .collect();
        assert_eq!(ok, 2, "{limit}: {results:?}");
        assert_eq!(refused.len(), 3, "{limit}: {results:?}");
        assert!(
            refused.iter().all(|t| *t < Duration::from_millis(400)),
            "{limit}: refused at once, not after the slow answers: {results:?}"
        );
    }
    // Connects that never complete (a full accept queue): two may be pending, the rest are
    // refused at once; the two end at their connect timeout.
    let (hole, _listener, _fillers) = blackhole();
    let gw = Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n\
         [upstreams.up]\nservers = [\"{hole}\"]\nconnect_timeout = \"800ms\"\n\
         circuit_breaker = {{ max_pending = 2 }}\n\n{ROUTE_ALL}"
    ));
    let results = at_once(&gw, 5);
    let timed_out = results.iter().filter(|(s, _)| *s == 504).count();
    let refused: Vec<Duration> = results
        .iter()
        .filter(|(s, _)| *s == 503)
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(
        (timed_out, refused.len()),
        (2, 3),
        "max_pending: {results:?}"
    );
    assert!(
        refused.iter().all(|t| *t < Duration::from_millis(500)),
        "max_pending: refused at once: {results:?}"
    );
}

fn gateway_with_route(servers: &[String], upstream_extra: &str, route_extra: &str) -> Gateway {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n\
         [upstreams.up]\nservers = [{}]\noutlier = {{ enabled = false }}\n{upstream_extra}\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"up\"\n{route_extra}\n",
        list.join(", ")
    ))
}

#[test]
fn retries_reach_another_server_but_never_resend_a_sent_post() {
    let refusing = refusing_addr();
    let dead = refusing.addr.to_string();
    let well = named("well", Duration::ZERO);
    // A connect failure is retried elsewhere, whatever the method.
    let gw = gateway_with_route(&[dead.clone(), well.addr.to_string()], "", "");
    for method in ["GET", "POST"] {
        for _ in 0..4 {
            let r = request(
                gw.addr,
                &format!("{method} /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nconnection: close\r\n\r\nhi"),
            );
            assert_eq!((r.status, r.text().as_str()), (200, "well"), "{method}");
        }
    }
    // A server that takes the request and resets: a GET goes to the other server, a POST
    // whose body was sent does not (unless the route opts in).
    let resets = Upstream::start(|_| Reply::Close);
    let well = named("well", Duration::ZERO);
    let servers = [resets.addr.to_string(), well.addr.to_string()];
    let gw = gateway_with_route(&servers, "", "");
    let send = |gw: &Gateway, method: &str| {
        // The first request of a fresh gateway goes to the first server (round robin).
        request(
            gw.addr,
            &format!("{method} /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nconnection: close\r\n\r\nhi"),
        )
    };
    assert_eq!(send(&gw, "GET").text(), "well");
    let gw = gateway_with_route(&servers, "", "");
    assert_eq!(send(&gw, "POST").status, 502);
    assert!(
        !well.requests().iter().any(|r| r.method == "POST"),
        "the POST reached one server only"
    );
    let gw = gateway_with_route(&servers, "", "retry_non_idempotent = true");
    assert_eq!(send(&gw, "POST").text(), "well");
    // A status the route retries.
    let busy = Upstream::start(|_| {
        Reply::Raw(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy".to_vec())
    });
    let gw = gateway_with_route(
        &[busy.addr.to_string(), well.addr.to_string()],
        "",
        "retry = { statuses = [503] }",
    );
    for _ in 0..4 {
        assert_eq!(send(&gw, "GET").text(), "well");
    }
}

#[test]
fn the_retry_budget_caps_retries_during_an_outage_of_every_server() {
    let hits = |budget: &str| {
        let down: Vec<Upstream> = (0..3)
            .map(|_| {
                Upstream::start(|_| {
                    Reply::Delayed(
                        Duration::from_millis(150),
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\ndown"
                            .to_vec(),
                    )
                })
            })
            .collect();
        let servers: Vec<String> = down.iter().map(|u| u.addr.to_string()).collect();
        let gw = gateway_with_route(
            &servers,
            budget,
            "retry = { retries = 3, statuses = [503], backoff = \"1ms\", max_backoff = \"2ms\" }",
        );
        let results = at_once(&gw, 10);
        assert!(results.iter().all(|(s, _)| *s == 503), "{results:?}");
        down.iter().map(|u| u.requests().len()).sum::<usize>()
    };
    let unbounded = hits("retry_budget = { percent = 100, min_concurrent = 100 }");
    let bounded = hits("retry_budget = { percent = 0, min_concurrent = 2 }");
    eprintln!(
        "upstream requests for 10 client requests: unbounded {unbounded}, budget of 2: {bounded}"
    );
    assert_eq!(unbounded, 40, "each request tried four times");
    assert!(bounded <= 10 + 2 * 3 + 2, "{bounded}");
}

#[test]
fn a_route_timeout_caps_every_try() {
    let slow = named("slow", Duration::from_millis(1500));
    let slow2 = named("slow", Duration::from_millis(1500));
    let gw = gateway_with_route(
        &[slow.addr.to_string(), slow2.addr.to_string()],
        "",
        "timeout = \"300ms\"",
    );
    let started = std::time::Instant::now();
    let r = request(
        gw.addr,
        "GET /x HTTP/1.1\r\nHost: t\r\nconnection: close\r\n\r\n",
    );
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(took < Duration::from_millis(1000), "{took:?}");
}

#[test]
fn a_backup_serves_only_while_no_primary_can() {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };
    let down = Arc::new(AtomicBool::new(false));
    let flag = down.clone();
    let primary = Upstream::start(move |_| {
        let status = if flag.load(Ordering::SeqCst) {
            "503 Service Unavailable"
        } else {
            "200 OK"
        };
        Reply::Raw(format!("HTTP/1.1 {status}\r\ncontent-length: 1\r\n\r\np").into_bytes())
    });
    let backup = named("b", Duration::ZERO);
    let gw = Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n\
         [upstreams.up]\nservers = [\"{p}\", \"{b}\"]\nbackups = [\"{b}\"]\n\
         outlier = {{ consecutive_failures = 1, base_ejection = \"10s\", max_ejected_percent = 100 }}\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"up\"\n",
        p = primary.addr,
        b = backup.addr
    ));
    let get = || {
        request(
            gw.addr,
            "GET /x HTTP/1.1\r\nHost: t\r\nconnection: close\r\n\r\n",
        )
    };
    for _ in 0..6 {
        assert_eq!(
            get().text(),
            "p",
            "the backup waits while the primary serves"
        );
    }
    down.store(true, Ordering::SeqCst);
    assert_eq!(get().status, 503, "the primary's failure ejects it");
    for _ in 0..6 {
        assert_eq!(get().text(), "b", "no primary left: the backup serves");
    }
}
