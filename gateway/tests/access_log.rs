//! The access log, request ids and trace context for real: JSON lines with the fields, no
//! credentials, sampling, reopening on SIGUSR1; X-Request-Id and traceparent on the way up and
//! back.

mod support;

use std::time::{Duration, Instant};

use support::*;

fn config(dir: &std::path::Path, upstream: std::net::SocketAddr, log: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n\
         [access_log]\npath = \"{}\"\n{log}\n\n\
         [auth]\napi_key_query = \"api_key\"\n\n\
         [upstreams.up]\nservers = [\"{upstream}\"]\n\n\
         [[routes]]\nid = \"hello\"\nmatch = {{ path = \"/hello\" }}\nrespond = {{ status = 200, body = \"hi\" }}\n\n\
         [[routes]]\nid = \"keyed\"\nmatch = {{ path = \"/keyed\" }}\nupstream = \"up\"\nauth = {{ methods = [\"api_key\"] }}\n\n\
         [[routes]]\nid = \"up\"\nmatch = {{ path_prefix = \"/up/\" }}\nupstream = \"up\"\n",
        dir.join("access.log").display()
    )
}

/// The JSON lines in `path` once there are at least `n` (bounded wait).
fn lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} lines of {n}:\n{text}",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn access_log_lines_carry_the_fields_and_no_credentials() {
    let up = Upstream::echo_target();
    let dir = tempfile::tempdir().unwrap();
    let (key, hash) = mint("alice");
    let cfg = config(dir.path(), up.addr, "")
        + &format!("\n[[consumers]]\nid = \"alice\"\napi_keys = [\"{hash}\"]\n");
    let gw = Gateway::start(&cfg);
    let r = request(gw.addr, "GET /hello?secret=1 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 200);
    let r = request(
        gw.addr,
        &format!("GET /keyed?api_key={key}&x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
    );
    assert_eq!(r.status, 200);
    let r = request(
        gw.addr,
        "GET /keyed HTTP/1.1\r\nHost: a\r\nX-API-Key: wrong-key\r\n\r\n",
    );
    assert_eq!(r.status, 401);
    let r = request(gw.addr, "GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 404);
    // A head that never parses is logged too, as valid JSON, with no trace.
    let r = request(
        gw.addr,
        "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    );
    assert_eq!(r.status, 400);
    let log = lines(&dir.path().join("access.log"), 5);
    let refused = log
        .iter()
        .find(|l| l["status"] == 400)
        .expect("the refused head's line");
    assert!(refused["trace_id"].is_null() && refused["request_id"].as_str().unwrap().len() == 32);
    let raw = std::fs::read_to_string(dir.path().join("access.log")).unwrap();
    assert!(
        !raw.contains(&key) && !raw.contains("wrong-key") && !raw.contains("secret"),
        "{raw}"
    );
    let by_route = |route: &str, status: u16| {
        log.iter()
            .find(|l| l["route"] == route && l["status"] == status)
            .unwrap_or_else(|| panic!("no {route} {status} in {log:?}"))
    };
    let hello = by_route("hello", 200);
    assert_eq!(hello["method"], "GET");
    assert_eq!(hello["path"], "/hello", "the query is left out by default");
    assert_eq!(hello["client"], "127.0.0.1");
    assert_eq!(hello["outcome"], "answered");
    assert!(hello["bytes_in"].as_u64().unwrap() > 20);
    assert!(hello["bytes_out"].as_u64().unwrap() > 20);
    assert!(hello["duration_ms"].as_f64().is_some());
    assert_eq!(hello["request_id"].as_str().unwrap().len(), 32);
    assert!(hello["time"].as_str().unwrap().ends_with('Z'));
    let keyed = by_route("keyed", 200);
    assert_eq!(keyed["consumer"], "alice");
    assert_eq!(keyed["outcome"], "relayed");
    assert_eq!(keyed["upstream"], up.addr.to_string());
    assert!(keyed["upstream_ms"].as_f64().is_some());
    let denied = by_route("keyed", 401);
    assert_eq!(denied["refused_by"], "auth:invalid");
    let unrouted = log.iter().find(|l| l["status"] == 404).unwrap();
    assert!(unrouted["route"].is_null());
}

#[test]
fn the_query_is_logged_only_when_asked_and_never_its_credential() {
    let up = Upstream::echo_target();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(dir.path(), up.addr, "include_query = true"));
    request(
        gw.addr,
        "GET /up/x?api_key=SECRETKEY&page=2 HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    let log = lines(&dir.path().join("access.log"), 1);
    assert_eq!(log[0]["path"], "/up/x?page=2", "{log:?}");
}

#[test]
fn sampling_logs_a_share_of_requests() {
    let up = Upstream::echo_target();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(dir.path(), up.addr, "sample = 0.5"));
    let mut c = Client::connect(gw.addr);
    for _ in 0..400 {
        c.send(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read_response(false).unwrap().status, 200);
    }
    // Flushed within 200 ms; wait for the writer, then count.
    std::thread::sleep(Duration::from_millis(600));
    let n = std::fs::read_to_string(dir.path().join("access.log"))
        .unwrap_or_default()
        .lines()
        .count();
    // 400 draws at 1/2: the mean is 200, the standard deviation 10.
    assert!(
        (140..=260).contains(&n),
        "{n} of 400 logged at sample = 0.5"
    );
}

#[test]
fn sigusr1_reopens_the_log_after_it_was_moved() {
    let up = Upstream::echo_target();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(dir.path(), up.addr, ""));
    let path = dir.path().join("access.log");
    request(gw.addr, "GET /hello HTTP/1.1\r\nHost: a\r\n\r\n");
    lines(&path, 1);
    std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
    gw.signal(libc::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        // Each request's line goes to the new file once the writer reopened.
        request(gw.addr, "GET /hello HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(
            Instant::now() < deadline,
            "no new file after SIGUSR1:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    request(gw.addr, "GET /hello HTTP/1.1\r\nHost: a\r\n\r\n");
    lines(&path, 1);
    let old = std::fs::read_to_string(dir.path().join("access.log.1")).unwrap();
    assert!(old.lines().count() >= 1);
}

#[test]
fn request_ids_and_trace_context_pass_through() {
    let up = Upstream::echo_target();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(dir.path(), up.addr, ""));
    // A client's traceparent: the trace goes on, with the gateway's span as the parent.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = request(
        gw.addr,
        &format!("GET /up/a HTTP/1.1\r\nHost: a\r\nX-Request-Id: client-chosen\r\ntraceparent: 00-{trace}-00f067aa0ba902b7-01\r\ntracestate: vendor=x\r\n\r\n"),
    );
    assert_eq!(r.status, 200);
    let id = r
        .header("x-request-id")
        .expect("a request id on the response")
        .to_owned();
    assert_eq!(
        id.len(),
        32,
        "a client's id is not trusted by default: {id}"
    );
    let got = &up.requests()[0];
    assert_eq!(got.headers_named("x-request-id"), [id.as_str()]);
    let parent = got.header("traceparent").unwrap();
    assert!(
        parent.starts_with(&format!("00-{trace}-")) && parent.ends_with("-01"),
        "{parent}"
    );
    assert!(
        !parent.contains("00f067aa0ba902b7"),
        "the gateway's own span: {parent}"
    );
    assert_eq!(got.header("tracestate"), Some("vendor=x"));
    // Without one, a new trace starts (and a tracestate, which belongs to another trace, is
    // dropped); every answer carries the id, the gateway's own too.
    request(
        gw.addr,
        "GET /up/b HTTP/1.1\r\nHost: a\r\ntracestate: vendor=orphan\r\n\r\n",
    );
    assert_eq!(up.requests()[1].header("tracestate"), None);
    let fresh = up.requests()[1].header("traceparent").unwrap().to_owned();
    assert_eq!(fresh.len(), 55, "{fresh}");
    assert!(!fresh.contains(trace));
    let r = request(gw.addr, "GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.header("x-request-id").map(str::len), Some(32));
    // The access log names the same request id and trace.
    let log = lines(&dir.path().join("access.log"), 3);
    let first = log.iter().find(|l| l["path"] == "/up/a").unwrap();
    assert_eq!(first["request_id"], id.as_str());
    assert_eq!(first["trace_id"], trace);
}

#[test]
fn a_trusted_request_id_is_kept() {
    let up = Upstream::echo_target();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), up.addr, "")
        .replace("workers = 2\n", "workers = 2\ntrust_request_id = true\n");
    let gw = Gateway::start(&cfg);
    let r = request(
        gw.addr,
        "GET /up/a HTTP/1.1\r\nHost: a\r\nX-Request-Id: edge-42\r\n\r\n",
    );
    assert_eq!(r.header("x-request-id"), Some("edge-42"));
    assert_eq!(up.requests()[0].headers_named("x-request-id"), ["edge-42"]);
    // One that could break a field or a log line is replaced.
    let r = request(
        gw.addr,
        "GET /up/a HTTP/1.1\r\nHost: a\r\nX-Request-Id: has\"quote\r\n\r\n",
    );
    assert_eq!(r.header("x-request-id").map(str::len), Some(32));
}
