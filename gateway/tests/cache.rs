//! The response cache end to end: the real gateway in front of a real upstream on loopback,
//! real requests. Each known bug class of shared caches is a case that would fail without its
//! protection: a HEAD answer served to a GET, a POST answered from a GET, Set-Cookie and
//! authenticated answers replayed, Vary ignored, a gzip body sent to a client that did not
//! accept it, a truncated body stored, unkeyed X-Forwarded-Host reaching the upstream, a GET's
//! body desynchronising the connection. Then coalescing, revalidation with 304, stale-if-error,
//! ranges and Age.

mod support;

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    sync::Arc,
    time::Duration,
};

use support::*;

fn cached_route(extra: &str) -> String {
    format!(
        "[[routes]]\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"up\"\ncache = {{ {extra} }}\n"
    )
}

fn gateway(up: &Upstream, extra: &str) -> Gateway {
    Gateway::start(&config_with(up.addr, "", &cached_route(extra)))
}

fn get(gw: &Gateway, path: &str, fields: &str) -> Response {
    request(
        gw.addr,
        &format!("GET {path} HTTP/1.1\r\nHost: cache.test\r\n{fields}connection: close\r\n\r\n"),
    )
}

/// A 200 with `fields` and `body`.
fn answer(fields: &str, body: &str) -> Reply {
    Reply::Raw(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n{fields}content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

fn x_cache(r: &Response) -> &str {
    r.header("x-cache").unwrap_or("(none)")
}

#[test]
fn fresh_answers_are_served_from_memory_with_age_and_status() {
    let up = Upstream::start(|r| {
        answer(
            "cache-control: max-age=60\r\n",
            &format!("body of {}", r.target),
        )
    });
    let gw = gateway(&up, "");
    let first = get(&gw, "/a?x=1", "");
    assert_eq!((first.status, x_cache(&first)), (200, "MISS"));
    let second = get(&gw, "/a?x=1", "");
    assert_eq!((second.status, x_cache(&second)), (200, "HIT"));
    assert_eq!(second.text(), "body of /a?x=1");
    assert!(second.header("age").is_some());
    assert_eq!(up.requests().len(), 1, "the hit never reached the upstream");
    // Another query is another resource.
    assert_eq!(x_cache(&get(&gw, "/a?x=2", "")), "MISS");
    // The request id is the request's own, not the one of the request that filled it.
    assert_ne!(first.header("x-request-id"), second.header("x-request-id"));
    // A single range is answered from the whole entry.
    let r = get(&gw, "/a?x=1", "Range: bytes=0-3\r\n");
    assert_eq!((r.status, r.text().as_str()), (206, "body"));
    assert_eq!(r.header("content-range"), Some("bytes 0-3/14"));
    assert_eq!(up.requests().len(), 2);
}

#[test]
fn head_answers_never_fill_gets_and_gets_answer_heads() {
    let up = Upstream::start(|r| match r.method.as_str() {
        // A HEAD answer that a buggy cache would store as the GET's (empty body).
        "HEAD" => Reply::Raw(
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 9\r\n\r\n".to_vec(),
        ),
        _ => answer("cache-control: max-age=60\r\n", "full body"),
    });
    let gw = gateway(&up, "");
    let head = request(
        gw.addr,
        "HEAD /h HTTP/1.1\r\nHost: cache.test\r\nconnection: close\r\n\r\n",
    );
    assert_eq!((head.status, x_cache(&head)), (200, "BYPASS"));
    let r = get(&gw, "/h", "");
    assert_eq!(
        (x_cache(&r), r.text().as_str()),
        ("MISS", "full body"),
        "the HEAD answer was not stored"
    );
    let head = request(
        gw.addr,
        "HEAD /h HTTP/1.1\r\nHost: cache.test\r\nconnection: close\r\n\r\n",
    );
    assert_eq!((head.status, x_cache(&head)), (200, "HIT"));
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some("9"));
}

#[test]
fn unsafe_methods_pass_and_invalidate() {
    let up = Upstream::start(|r| {
        answer(
            "cache-control: max-age=60\r\n",
            &format!("{} answer", r.method),
        )
    });
    let gw = gateway(&up, "");
    assert_eq!(x_cache(&get(&gw, "/p", "")), "MISS");
    assert_eq!(x_cache(&get(&gw, "/p", "")), "HIT");
    let post = request(
        gw.addr,
        "POST /p HTTP/1.1\r\nHost: cache.test\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi",
    );
    assert_eq!(
        (x_cache(&post), post.text().as_str()),
        ("BYPASS", "POST answer"),
        "never the GET's entry"
    );
    let r = get(&gw, "/p", "");
    assert_eq!(x_cache(&r), "MISS", "the POST invalidated the resource");
}

#[test]
fn cookies_and_credentials_are_never_replayed_to_others() {
    let up = Upstream::start(|r| match r.target.as_str() {
        "/cookie" => answer(
            "cache-control: max-age=60\r\nset-cookie: session=alice\r\n",
            "hello alice",
        ),
        "/private" => answer("cache-control: private, max-age=60\r\n", "alice's"),
        "/authed" => answer("cache-control: max-age=60\r\n", "for the bearer"),
        _ => answer("cache-control: public, max-age=60\r\n", "public"),
    });
    let gw = gateway(&up, "");
    for path in ["/cookie", "/private"] {
        get(&gw, path, "");
        let again = get(&gw, path, "");
        assert_eq!(x_cache(&again), "MISS", "{path} was stored");
    }
    get(&gw, "/authed", "Authorization: Bearer alice-token\r\n");
    assert_eq!(
        x_cache(&get(&gw, "/authed", "")),
        "MISS",
        "an authenticated answer was stored"
    );
    get(&gw, "/public", "Authorization: Bearer alice-token\r\n");
    assert_eq!(
        x_cache(&get(&gw, "/public", "")),
        "HIT",
        "public may be shared"
    );

    // A route that strips cookies stores the answer without them.
    let up = Upstream::start(|_| {
        answer(
            "cache-control: max-age=60\r\nset-cookie: session=alice\r\n",
            "hello",
        )
    });
    let gw = gateway(&up, "strip_set_cookie = true");
    let first = get(&gw, "/c", "");
    assert_eq!(
        first.header("set-cookie"),
        Some("session=alice"),
        "the filler gets its cookie"
    );
    let again = get(&gw, "/c", "");
    assert_eq!(x_cache(&again), "HIT");
    assert_eq!(again.header("set-cookie"), None, "nobody else does");
}

#[test]
fn vary_and_encodings_select_variants() {
    let up = Upstream::start(|r| {
        let gzip = r
            .header("accept-encoding")
            .is_some_and(|v| v.contains("gzip"));
        match (r.target.as_str(), gzip) {
            // No Vary, as some upstreams do: a compressed body must still not reach others.
            ("/novary", true) => answer(
                "cache-control: max-age=60\r\ncontent-encoding: gzip\r\n",
                "GZIPPED",
            ),
            ("/novary", false) => answer("cache-control: max-age=60\r\n", "plain"),
            ("/star", _) => answer("cache-control: max-age=60\r\nvary: *\r\n", "star"),
            (_, true) => answer(
                "cache-control: max-age=60\r\nvary: Accept-Encoding\r\ncontent-encoding: gzip\r\n",
                "GZIPPED",
            ),
            (_, false) => answer(
                "cache-control: max-age=60\r\nvary: Accept-Encoding\r\n",
                "plain",
            ),
        }
    });
    let gw = gateway(&up, "");
    for path in ["/vary", "/novary"] {
        assert_eq!(
            get(&gw, path, "Accept-Encoding: gzip, br\r\n").text(),
            "GZIPPED"
        );
        let plain = get(&gw, path, "");
        assert_eq!(
            (x_cache(&plain), plain.text().as_str()),
            ("MISS", "plain"),
            "{path}: gzip to a client without it"
        );
        let again = get(&gw, path, "Accept-Encoding: br;q=1.0, GZIP\r\n");
        assert_eq!(
            (x_cache(&again), again.text().as_str()),
            ("HIT", "GZIPPED"),
            "{path}: one variant for one normalised value"
        );
    }
    get(&gw, "/star", "");
    assert_eq!(
        x_cache(&get(&gw, "/star", "")),
        "MISS",
        "Vary: * is never stored"
    );
}

#[test]
fn truncated_bodies_are_never_stored() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let up = Upstream::start(move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            // Promises 20 bytes, sends 5, closes.
            Reply::RawThenClose(
                b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 20\r\n\r\nshort"
                    .to_vec(),
            )
        } else {
            answer("cache-control: max-age=60\r\n", "the whole twenty b!!")
        }
    });
    let gw = gateway(&up, "");
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /t HTTP/1.1\r\nHost: cache.test\r\n\r\n");
    let cut = c.read_raw_until_close();
    assert!(cut.ends_with(b"short"), "{}", String::from_utf8_lossy(&cut));
    let r = get(&gw, "/t", "");
    assert_eq!(
        (x_cache(&r), r.text().as_str()),
        ("MISS", "the whole twenty b!!"),
        "the cut body was not stored"
    );
    assert_eq!(x_cache(&get(&gw, "/t", "")), "HIT");
}

#[test]
fn unkeyed_fields_never_reach_the_upstream() {
    let up = Upstream::start(|r| {
        let host = r.header("x-forwarded-host").unwrap_or("-").to_owned();
        answer("cache-control: max-age=60\r\n", &format!("link to {host}"))
    });
    let gw = gateway(&up, "");
    let poisoned = get(&gw, "/page", "X-Forwarded-Host: evil.example\r\n");
    assert_eq!(poisoned.text(), "link to -");
    assert!(up
        .requests()
        .iter()
        .all(|r| r.header("x-forwarded-host").is_none()));
    // A keyed field does reach it, and selects its own entries.
    let up = Upstream::start(|r| {
        answer(
            "cache-control: max-age=60\r\n",
            r.header("x-tenant").unwrap_or("-"),
        )
    });
    let gw = gateway(&up, "key_headers = [\"X-Tenant\"]");
    assert_eq!(get(&gw, "/t", "X-Tenant: acme\r\n").text(), "acme");
    let other = get(&gw, "/t", "X-Tenant: globex\r\n");
    assert_eq!((x_cache(&other), other.text().as_str()), ("MISS", "globex"));
    assert_eq!(x_cache(&get(&gw, "/t", "X-Tenant: acme\r\n")), "HIT");
}

#[test]
fn a_get_with_a_body_cannot_desynchronise_the_connection() {
    let up = Upstream::start(|r| {
        answer(
            "cache-control: max-age=60\r\n",
            &format!("answer to {}", r.target),
        )
    });
    let gw = gateway(&up, "");
    assert_eq!(x_cache(&get(&gw, "/x", "")), "MISS");
    // The body looks like a request: answered from the cache without reading it, it would be.
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: cache.test\r\n\r\n";
    let mut c = Client::connect(gw.addr);
    c.send(
        format!(
            "GET /x HTTP/1.1\r\nHost: cache.test\r\ncontent-length: {}\r\n\r\n{smuggled}GET /y HTTP/1.1\r\nHost: cache.test\r\nconnection: close\r\n\r\n",
            smuggled.len()
        )
        .as_bytes(),
    );
    let first = c.read_response(false).unwrap();
    assert_eq!(first.text(), "answer to /x");
    assert_eq!(
        x_cache(&first),
        "BYPASS",
        "a request with a body is not answered from the cache"
    );
    let second = c.read_response(false).unwrap();
    assert_eq!(
        second.text(),
        "answer to /y",
        "the body was taken as a request"
    );
    assert!(up.requests().iter().all(|r| r.target != "/smuggled"));
    let with_body = up
        .requests()
        .into_iter()
        .filter(|r| r.target == "/x")
        .count();
    assert_eq!(
        with_body, 2,
        "the GET with a body went upstream, body and all"
    );
}

#[test]
fn a_hundred_concurrent_misses_make_one_upstream_request() {
    let up = Upstream::start(|_| {
        Reply::Delayed(
            Duration::from_millis(300),
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 4\r\n\r\nonce"
                .to_vec(),
        )
    });
    let gw = gateway(&up, "");
    let barrier = std::sync::Barrier::new(100);
    let answers: Vec<(u16, String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..100)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let r = get(&gw, "/hot", "");
                    (r.status, r.text(), x_cache(&r).to_owned())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        answers.iter().all(|(s, b, _)| *s == 200 && b == "once"),
        "{answers:?}"
    );
    let misses = answers.iter().filter(|(_, _, x)| x == "MISS").count();
    eprintln!(
        "100 concurrent misses: {} upstream request(s), {misses} MISS answers",
        up.requests().len()
    );
    assert_eq!(
        up.requests().len(),
        1,
        "coalesced into one upstream request"
    );
}

#[test]
fn stale_entries_are_revalidated_with_304_and_serve_on_errors() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let up = Upstream::start(move |r| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        match (r.target.as_str(), n) {
            ("/etag", _) if r.header("if-none-match") == Some("\"v1\"") => Reply::Raw(
                b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncache-control: max-age=60\r\n\r\n"
                    .to_vec(),
            ),
            ("/etag", _) => answer(
                "cache-control: max-age=1\r\netag: \"v1\"\r\n",
                "version one",
            ),
            ("/flaky", 0..=1) => answer(
                "cache-control: max-age=1, stale-if-error=60\r\n",
                "good copy",
            ),
            ("/flaky", _) => Reply::Raw(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\ndown".to_vec(),
            ),
            _ => answer("cache-control: max-age=1\r\n", "no stale allowed"),
        }
    });
    let gw = gateway(&up, "");
    assert_eq!(get(&gw, "/etag", "").text(), "version one");
    get(&gw, "/flaky", "");
    std::thread::sleep(Duration::from_millis(2100));
    let r = get(&gw, "/etag", "");
    assert_eq!(
        (r.status, x_cache(&r), r.text().as_str()),
        (200, "HIT", "version one"),
        "revalidated"
    );
    let asked = up
        .requests()
        .into_iter()
        .filter(|q| q.target == "/etag")
        .collect::<Vec<_>>();
    assert_eq!(asked.len(), 2);
    assert_eq!(
        asked[1].header("if-none-match"),
        Some("\"v1\""),
        "the gateway's own conditional"
    );
    assert_eq!(
        x_cache(&get(&gw, "/etag", "")),
        "HIT",
        "fresh again for the 304's max-age"
    );
    let r = get(&gw, "/flaky", "");
    assert_eq!(
        (r.status, x_cache(&r), r.text().as_str()),
        (200, "STALE", "good copy"),
        "stale-if-error"
    );
    // A client's own conditional gets a 304 from the cache.
    let r = get(&gw, "/etag", "If-None-Match: \"v1\"\r\n");
    assert_eq!((r.status, x_cache(&r)), (304, "HIT"));
}

#[test]
fn routes_without_a_default_store_only_what_says_how_long() {
    let up = Upstream::start(|_| answer("", "no freshness"));
    let gw = gateway(&up, "");
    get(&gw, "/n", "");
    assert_eq!(x_cache(&get(&gw, "/n", "")), "MISS");
    let gw = gateway(&up, "default_ttl = \"30s\"");
    get(&gw, "/n", "");
    assert_eq!(
        x_cache(&get(&gw, "/n", "")),
        "HIT",
        "the route's default applies"
    );
}

#[test]
fn stale_while_revalidate_answers_at_once_and_refreshes_in_the_background() {
    let version = Arc::new(AtomicUsize::new(0));
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (v, go) = (version.clone(), released.clone());
    let up = Upstream::start(move |r| {
        let n = v.fetch_add(1, Ordering::SeqCst) + 1;
        if n > 1 {
            // The refresh waits until the test has seen the stale answers (bounded).
            let until = std::time::Instant::now() + Duration::from_secs(10);
            while !go.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert!(
            r.header("if-none-match").is_none(),
            "no client conditional reaches the refresh"
        );
        Reply::Raw(
            format!(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=1, stale-while-revalidate=30\r\ncontent-length: 2\r\n\r\nv{n}"
            )
            .into_bytes(),
        )
    });
    let gw = gateway(&up, "");
    assert_eq!(get(&gw, "/swr", "").text(), "v1");
    std::thread::sleep(Duration::from_millis(1100));
    // The client's own conditional (which the upstream would answer 304) is not the refresh's.
    let r = get(&gw, "/swr", "If-None-Match: *\r\n");
    assert_eq!(
        (x_cache(&r), r.text().as_str()),
        ("STALE", "v1"),
        "answered from the stale entry"
    );
    // Meanwhile others are answered stale too, not sent upstream; a HEAD starts no refresh.
    assert_eq!(x_cache(&get(&gw, "/swr", "")), "STALE");
    let head = request(
        gw.addr,
        "HEAD /swr HTTP/1.1\r\nHost: cache.test\r\nconnection: close\r\n\r\n",
    );
    assert_eq!((head.status, x_cache(&head)), (200, "STALE"));
    released.store(true, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(&gw, "/swr", "");
        if r.text() == "v2" {
            assert_eq!(x_cache(&r), "HIT", "refreshed in the background");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never refreshed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(up.requests().len(), 2, "one refresh");
}

const ADMIN_TOKEN: &str = "cache-admin-token-0123456789abcdef";

fn admin_gateway(up: &Upstream, cluster: &str) -> Gateway {
    let config = config_with(up.addr, "", &cached_route("")).replace(
        "[upstreams.up]",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"PORTCULLIS_TEST_ADMIN_TOKEN\"\n\n{cluster}[upstreams.up]"),
    );
    Gateway::start_with(&config, &[("PORTCULLIS_TEST_ADMIN_TOKEN", ADMIN_TOKEN)])
}

fn purge(gw: &Gateway, body: &str) -> serde_json::Value {
    let (status, text) = admin_request(
        gw.admin_addr(),
        "POST",
        "/cache/purge",
        Some(ADMIN_TOKEN),
        body,
    );
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn tagged_upstream() -> Upstream {
    Upstream::start(|r| {
        let tags = if r.target.starts_with("/img/") {
            "images product-1"
        } else {
            "pages"
        };
        answer(
            &format!("cache-control: max-age=60\r\nsurrogate-key: {tags}\r\n"),
            &r.target,
        )
    })
}

#[test]
fn purges_go_by_key_prefix_and_tag_through_the_api_and_the_cli() {
    let up = tagged_upstream();
    let gw = admin_gateway(&up, "");
    let paths = ["/a", "/b?x=1", "/img/1.png", "/img/2.png"];
    let fill = |gw: &Gateway| {
        for p in paths {
            get(gw, p, "");
            assert_eq!(x_cache(&get(gw, p, "")), "HIT", "{p}");
        }
    };
    fill(&gw);
    assert_eq!(
        purge(&gw, r#"{"key": "http://cache.test/b?x=1"}"#)["purged"],
        1
    );
    assert_eq!(x_cache(&get(&gw, "/b?x=1", "")), "MISS");
    assert_eq!(x_cache(&get(&gw, "/a", "")), "HIT", "only that resource");
    assert_eq!(
        purge(&gw, r#"{"prefix": "http://cache.test/img/"}"#)["purged"],
        2
    );
    assert_eq!(x_cache(&get(&gw, "/img/1.png", "")), "MISS");
    get(&gw, "/img/2.png", "");
    assert_eq!(purge(&gw, r#"{"tag": "product-1"}"#)["purged"], 2);
    assert_eq!(x_cache(&get(&gw, "/img/2.png", "")), "MISS");
    assert_eq!(x_cache(&get(&gw, "/a", "")), "HIT", "untagged entries stay");
    let (status, text) = admin_request(
        gw.admin_addr(),
        "POST",
        "/cache/purge",
        Some(ADMIN_TOKEN),
        r#"{"url": "x"}"#,
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("expected"), "{text}");
    let (status, _) = admin_request(
        gw.admin_addr(),
        "POST",
        "/cache/purge",
        None,
        r#"{"tag": "pages"}"#,
    );
    assert_eq!(status, 401, "the admin token is needed");

    // The CLI, through the running gateway's control socket.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .current_dir(gw.dir())
        .args([
            "cache",
            "purge",
            "--tag",
            "pages",
            "--config",
            "gateway.toml",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("\"purged\":2"),
        "/a and /b?x=1 (filled again): {text}"
    );
    assert_eq!(x_cache(&get(&gw, "/a", "")), "MISS");

    // Metrics count what happened.
    let (_, metrics) = admin_request(gw.admin_addr(), "GET", "/metrics", Some(ADMIN_TOKEN), "");
    for line in [
        "portcullis_cache_requests_total{result=\"hit\"}",
        "portcullis_cache_purged_total 7",
        "portcullis_cache_entries",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

#[test]
fn purges_reach_every_host_of_a_cluster() {
    if !support::redis_server::redis_available("cache cluster purge test") {
        return;
    }
    let redis = support::redis_server::Redis::start(free_port()).unwrap();
    let up = tagged_upstream();
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), [9u8; 32]).unwrap();
    let cluster = format!(
        "[cluster]\nredis = \"redis://127.0.0.1:{}\"\n\n[quotas]\ndata_dir = \"DATA\"\nkey_file = \"{}\"\n\n",
        redis.port,
        key.path().display()
    );
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = admin_gateway(&up, &cluster.replace("DATA", d1.path().to_str().unwrap()));
    let b = admin_gateway(&up, &cluster.replace("DATA", d2.path().to_str().unwrap()));
    for gw in [&a, &b] {
        get(gw, "/img/1.png", "");
        assert_eq!(x_cache(&get(gw, "/img/1.png", "")), "HIT");
    }
    // Both hosts subscribed to the purge channel.
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port))
        .unwrap()
        .get_connection()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("portcullis:cache:purge")
            .query(&mut conn)
            .unwrap();
        if n >= 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "both hosts subscribe");
        std::thread::sleep(Duration::from_millis(20));
    }
    let answer = purge(&a, r#"{"tag": "images"}"#);
    assert_eq!(answer["sent_to_cluster"], true, "{answer}");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while x_cache(&get(&b, "/img/1.png", "")) == "HIT" {
        assert!(std::time::Instant::now() < deadline, "host b never purged");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_route_may_serve_stale_when_the_upstream_fails() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let up = Upstream::start(move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            answer("cache-control: max-age=1\r\n", "last good")
        } else {
            Reply::Raw(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 3\r\n\r\nbad".to_vec())
        }
    });
    let gw = gateway(&up, "stale_on_error = \"60s\"");
    assert_eq!(get(&gw, "/s", "").text(), "last good");
    std::thread::sleep(Duration::from_millis(1100));
    let r = get(&gw, "/s", "");
    assert_eq!(
        (r.status, x_cache(&r), r.text().as_str()),
        (200, "STALE", "last good"),
        "the route's stale_on_error"
    );
    // Without it, the error goes through.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let up = Upstream::start(move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            answer("cache-control: max-age=1\r\n", "last good")
        } else {
            Reply::Raw(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 3\r\n\r\nbad".to_vec())
        }
    });
    let gw = gateway(&up, "");
    get(&gw, "/s", "");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(get(&gw, "/s", "").status, 502);
}

#[test]
fn no_cache_answers_are_revalidated_whatever_the_route_default() {
    let up = Upstream::start(|r| match r.header("if-none-match") {
        Some(_) => Reply::Raw(
            b"HTTP/1.1 304 Not Modified\r\netag: \"e1\"\r\ncache-control: no-cache\r\n\r\n"
                .to_vec(),
        ),
        None => answer(
            "cache-control: no-cache\r\netag: \"e1\"\r\n",
            "checked every time",
        ),
    });
    let gw = gateway(&up, "default_ttl = \"30s\"");
    assert_eq!(get(&gw, "/nc", "").text(), "checked every time");
    let r = get(&gw, "/nc", "");
    assert_eq!((r.status, r.text().as_str()), (200, "checked every time"));
    let asked = up.requests();
    assert_eq!(asked.len(), 2, "the second use went to the upstream first");
    assert_eq!(asked[1].header("if-none-match"), Some("\"e1\""));
}

#[test]
fn keying_by_consumer_needs_an_auth_policy() {
    let config = config_with(
        "127.0.0.1:9".parse().unwrap(),
        "",
        &cached_route("key_consumer = true"),
    );
    let (ok, text) = check_config(&config);
    assert!(!ok);
    assert!(
        text.contains("routes[0].cache.key_consumer") && text.contains("auth"),
        "{text}"
    );
}
