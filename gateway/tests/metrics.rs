//! Metrics and the admin API for real: the gateway's counters and histograms against the
//! traffic a test sent, `promtool check metrics` on the exposition, a real Prometheus server
//! scraping the admin endpoint with the token, and the admin API's authentication and errors.

mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::*;

const TOKEN: &str = "admin-token-for-tests-0123456789";

fn config(upstream: SocketAddr) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"PORTCULLIS_TEST_ADMIN_TOKEN\"\npercentile_window = \"30s\"\n\n\
         [upstreams.slow]\nservers = [\"{upstream}\"]\n\n\
         [[routes]]\nid = \"hello\"\nmatch = {{ path = \"/hello\" }}\nrespond = {{ status = 200, body = \"hi\" }}\n\n\
         [[routes]]\nid = \"slow\"\nmatch = {{ path_prefix = \"/slow/\" }}\nupstream = \"slow\"\n\n\
         [[routes]]\nid = \"keyed\"\nmatch = {{ path = \"/keyed\" }}\nrespond = {{ status = 200, body = \"in\" }}\nauth = {{ methods = [\"api_key\"] }}\n\n\
         [[routes]]\nid = \"limited\"\nmatch = {{ path = \"/limited\" }}\nrespond = {{ status = 200, body = \"ok\" }}\nlimits = [{{ name = \"twice\", key = \"route\", rate = 2, per = \"1h\" }}]\n"
    )
}

fn start(upstream: SocketAddr) -> Gateway {
    Gateway::start_with(&config(upstream), &[("PORTCULLIS_TEST_ADMIN_TOKEN", TOKEN)])
}

/// One request to the gateway's admin listener; returns (status, body).
fn admin(gw: &Gateway, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    admin_request(gw.admin_addr(), method, path, token, body)
}

fn scrape(gw: &Gateway) -> String {
    let (status, body) = admin(gw, "GET", "/metrics", Some(TOKEN), "");
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the sample whose name and labels are exactly `series` (`name{a="b",...}`).
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn get(gw: &Gateway, path: &str, extra: &str) -> u16 {
    request(
        gw.addr,
        &format!("GET {path} HTTP/1.1\r\nHost: a\r\n{extra}\r\n"),
    )
    .status
}

/// An upstream that answers after 30 ms.
fn slow_upstream() -> Upstream {
    Upstream::start(|_| Reply::Delayed(Duration::from_millis(30), ok_response("slow")))
}

#[test]
fn counters_and_histograms_match_the_traffic_sent() {
    let up = slow_upstream();
    let gw = start(up.addr);
    for _ in 0..7 {
        assert_eq!(get(&gw, "/hello", ""), 200);
    }
    for _ in 0..4 {
        assert_eq!(get(&gw, "/slow/x", ""), 200);
    }
    for _ in 0..3 {
        assert_eq!(get(&gw, "/keyed", ""), 401);
    }
    assert_eq!(get(&gw, "/keyed", "X-API-Key: wrong\r\n"), 401);
    let limited: Vec<u16> = (0..5).map(|_| get(&gw, "/limited", "")).collect();
    assert_eq!(limited, [200, 200, 429, 429, 429]);
    for _ in 0..2 {
        assert_eq!(get(&gw, "/nowhere", ""), 404);
    }
    let mut c = Client::connect(gw.addr);
    c.send(b"BREW /hello HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 200);

    let m = scrape(&gw);
    let count = |s: &str| sample(&m, s).unwrap_or_else(|| panic!("no {s} in\n{m}"));
    assert_eq!(
        count(r#"portcullis_requests_total{route="hello",method="GET",class="2xx"}"#),
        7.0
    );
    assert_eq!(
        count(r#"portcullis_requests_total{route="hello",method="OTHER",class="2xx"}"#),
        1.0
    );
    assert_eq!(
        count(r#"portcullis_requests_total{route="slow",method="GET",class="2xx"}"#),
        4.0
    );
    assert_eq!(
        count(r#"portcullis_requests_total{route="keyed",method="GET",class="4xx"}"#),
        4.0
    );
    assert_eq!(
        count(r#"portcullis_requests_total{route="(none)",method="GET",class="4xx"}"#),
        2.0
    );
    assert_eq!(
        count(r#"portcullis_auth_failures_total{route="keyed",reason="missing"}"#),
        3.0
    );
    assert_eq!(
        count(r#"portcullis_auth_failures_total{route="keyed",reason="invalid"}"#),
        1.0
    );
    assert_eq!(
        count(r#"portcullis_refusals_total{route="limited",kind="limit",name="twice"}"#),
        3.0
    );
    assert_eq!(
        count(&format!(
            r#"portcullis_upstream_requests_total{{upstream="slow",server="{}"}}"#,
            up.addr
        )),
        4.0
    );
    // Bytes: every answer of the hello route carried a head and the 2-byte body.
    assert!(count(r#"portcullis_sent_bytes_total{route="hello"}"#) > 8.0 * 40.0);
    // The upstream waited 30 ms each time: all four in le=0.05, none in le=0.025.
    let bucket = |le: &str| {
        count(&format!(
            r#"portcullis_request_duration_seconds_bucket{{route="slow",part="upstream",le="{le}"}}"#
        ))
    };
    assert_eq!(bucket("0.025"), 0.0, "{m}");
    assert_eq!(bucket("0.05"), 4.0, "{m}");
    assert_eq!(bucket("+Inf"), 4.0);
    assert_eq!(
        count(r#"portcullis_request_duration_seconds_count{route="slow",part="upstream"}"#),
        4.0
    );
    // The gateway's own share of those requests is far below the upstream's 30 ms.
    assert_eq!(
        count(
            r#"portcullis_request_duration_seconds_bucket{route="slow",part="gateway",le="0.025"}"#
        ),
        4.0,
        "{m}"
    );
    // Percentiles over the window, once the workers have handed their histograms over.
    let deadline = Instant::now() + Duration::from_secs(10);
    let p99 = loop {
        let m = scrape(&gw);
        if let Some(v) = sample(
            &m,
            r#"portcullis_latency_quantile_seconds{route="slow",part="upstream",quantile="0.99"}"#,
        ) {
            break v;
        }
        assert!(Instant::now() < deadline, "no percentile gauge:\n{m}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!((0.029..0.05).contains(&p99), "p99 {p99}");
    assert_eq!(count("portcullis_build_info{version=\"0.1.0\"}"), 1.0);
    // The most refused keys, once the workers have published them (once a second).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = admin(&gw, "GET", "/limits/top", Some(TOKEN), "");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let refused: u64 = v["top"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["route"] == "limited" && e["name"] == "twice" && e["key"] == "route")
            .map(|e| e["refused"].as_u64().unwrap())
            .sum();
        if refused == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The sum over both workers of `portcullis_connections` in `state`.
fn connections(gw: &Gateway, state: &str) -> f64 {
    let exposition = scrape(gw);
    (0..2)
        .filter_map(|w| {
            sample(
                &exposition,
                &format!("portcullis_connections{{worker=\"{w}\",state=\"{state}\"}}"),
            )
        })
        .sum()
}

/// Scrapes until `state` reads `want` (bounded), returning the last reading.
fn connections_reach(gw: &Gateway, state: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = connections(gw, state);
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn quiet_keep_alive_connections_park_and_come_back_for_their_next_request() {
    let up = slow_upstream();
    let gw = start(up.addr);
    let mut clients: Vec<Client> = (0..3).map(|_| Client::connect(gw.addr)).collect();
    for round in 0..3 {
        for c in &mut clients {
            c.send(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n");
            let r = c
                .read_response(false)
                .expect("an answer on the kept-alive connection");
            assert_eq!((round, r.status), (round, 200));
        }
        // Quiet past the parking delay: each connection waits outside its task.
        assert_eq!(connections_reach(&gw, "parked", 3.0), 3.0, "round {round}");
        assert_eq!(connections(&gw, "idle"), 3.0);
        assert_eq!(connections(&gw, "open"), 3.0);
    }
    // A parked connection forwards too, and its client sees its close.
    let c = &mut clients[0];
    c.send(b"GET /slow/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    assert_eq!(c.read_response(false).expect("forwarded").status, 200);
    assert!(c.is_closed());
    // Clients closing parked connections release them.
    drop(clients);
    assert_eq!(connections_reach(&gw, "open", 0.0), 0.0);
    assert_eq!(connections(&gw, "parked"), 0.0);
    assert_eq!(connections(&gw, "idle"), 0.0);
}

#[test]
fn promtool_accepts_the_exposition() {
    let up = slow_upstream();
    let gw = start(up.addr);
    get(&gw, "/hello", "");
    get(&gw, "/slow/x", "");
    get(&gw, "/keyed", "");
    get(&gw, "/nowhere", "");
    let m = scrape(&gw);
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; `cargo xtask test` installs it)");
    child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{m}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw GET to `addr`; the body.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    Some(text.split_once("\r\n\r\n")?.1.to_owned())
}

#[test]
fn a_real_prometheus_scrapes_the_gateway_with_the_token() {
    let up = slow_upstream();
    let gw = start(up.addr);
    for _ in 0..5 {
        get(&gw, "/hello", "");
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: portcullis\n    authorization:\n      credentials: {TOKEN}\n    static_configs:\n      - targets: [\"{}\"]\n",
            gw.admin_addr()
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prometheus (Debian's prometheus package; `cargo xtask test` installs it)");
    let _kill = KillOnDrop(&mut prometheus);
    let addr: SocketAddr = listen.parse().unwrap();
    let query = "/api/v1/query?query=sum(portcullis_requests_total%7Broute%3D%22hello%22%7D)";
    let deadline = Instant::now() + Duration::from_secs(45);
    let answer = loop {
        if let Some(body) = http_get(addr, query) {
            if body.contains("\"result\":[{") {
                break body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had the gateway's counter; targets: {:?}",
            http_get(addr, "/api/v1/targets")
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["data"]["result"][0]["value"][1], "5", "{answer}");
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_admin_api_needs_the_token_and_answers_errors_in_json() {
    let up = slow_upstream();
    let gw = start(up.addr);
    let (status, body) = admin(&gw, "GET", "/metrics", None, "");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let (status, _) = admin(
        &gw,
        "GET",
        "/metrics",
        Some("not-the-admin-token-at-all"),
        "",
    );
    assert_eq!(status, 401);
    let (status, _) = admin(&gw, "GET", "/status", None, "");
    assert_eq!(status, 401);
    // The page itself is static and carries no data: served without the token.
    let (status, page) = admin(&gw, "GET", "/", None, "");
    assert_eq!(status, 200);
    assert!(page.contains("<title>Portcullis status</title>"));

    let (status, body) = admin(&gw, "GET", "/status", Some(TOKEN), "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["workers"], 2);
    assert_eq!(v["routes"], 4);
    assert_eq!(v["config_sha256"].as_str().unwrap().len(), 64);
    let (status, _) = admin(&gw, "GET", "/readyz", Some(TOKEN), "");
    assert_eq!(status, 200);
    let (status, body) = admin(&gw, "GET", "/nope", Some(TOKEN), "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no such admin endpoint"));
    let (status, _) = admin(&gw, "DELETE", "/metrics", Some(TOKEN), "");
    assert_eq!(status, 405);
    let (status, body) = admin(
        &gw,
        "POST",
        "/xdp/bans",
        Some(TOKEN),
        "{\"address\": \"nonsense\"}",
    );
    assert!(status == 400 || status == 404, "{status} {body}");
    // Reload through the API, counted in the metrics.
    let (status, body) = admin(&gw, "POST", "/reload", Some(TOKEN), "");
    assert_eq!(status, 200, "{body}");
    let m = scrape(&gw);
    assert_eq!(
        sample(&m, r#"portcullis_config_reloads_total{result="accepted"}"#),
        Some(1.0)
    );
    // The effective config: defaults filled in.
    let (status, body) = admin(&gw, "GET", "/config", Some(TOKEN), "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["config"]["server"]["workers"], 2);
    assert_eq!(v["config"]["server"]["header_timeout"], "10s", "a default");
    assert_eq!(v["config"]["routes"][0]["id"], "hello");
    assert_eq!(v["sha256"].as_str().map(str::len), Some(64));
    // Upstream servers with their counts.
    get(&gw, "/slow/x", "");
    let (_, body) = admin(&gw, "GET", "/upstreams", Some(TOKEN), "");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["upstreams"][0]["servers"][0]["requests"], 1, "{body}");
}

#[test]
fn a_tcp_admin_listener_without_a_token_is_refused_at_load() {
    let (ok, text) = check_config(
        "[admin]\nlisten = \"127.0.0.1:9901\"\n\n[[routes]]\nrespond = { status = 200 }\n",
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("gateway.toml:2") && text.contains("admin.listen") && text.contains("token"),
        "{text}"
    );
}

/// Runs headless Chromium (Debian's `chromium`) on `url` with `args`; returns its stdout.
fn chromium(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,900",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium (Debian's chromium package; `cargo xtask test` installs it)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_status_page_renders_live_numbers_in_a_real_browser() {
    let up = slow_upstream();
    let gw = start(up.addr);
    for _ in 0..12 {
        assert_eq!(get(&gw, "/hello", ""), 200);
    }
    for _ in 0..3 {
        assert_eq!(get(&gw, "/slow/x", ""), 200);
    }
    let url = format!("http://{}/#token={TOKEN}", gw.admin_addr());
    let dom = chromium(&url, &["--dump-dom"]);
    // The rows the script built from /stats: the counts the test sent.
    let row = |route: &str| {
        let start = dom
            .find(&format!("<tr data-route=\"{route}\">"))
            .unwrap_or_else(|| panic!("no row for {route} in the rendered page:\n{dom}"));
        &dom[start..start + dom[start..].find("</tr>").unwrap()]
    };
    assert!(
        row("hello").contains("<td class=\"requests\">12</td>"),
        "{}",
        row("hello")
    );
    assert!(
        row("slow").contains("<td class=\"requests\">3</td>"),
        "{}",
        row("slow")
    );
    assert!(dom.contains("2 workers"), "the status line rendered");
    assert!(
        dom.contains(&format!("slow / {}", up.addr)),
        "the upstream server is listed"
    );
    assert!(
        dom.contains("<span id=\"error\"></span>"),
        "no error shown: {dom}"
    );
    // Without the token the page says what to do instead of showing numbers.
    let bare = chromium(&format!("http://{}/", gw.admin_addr()), &["--dump-dom"]);
    assert!(
        bare.contains("<span id=\"error\">the admin token is missing or wrong"),
        "{bare}"
    );
    // A screenshot, kept as a test artifact.
    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    chromium(&url, &[&format!("--screenshot={}", png.display())]);
    let bytes = std::fs::read(&png).expect("a screenshot");
    assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
}

#[test]
fn a_unix_socket_admin_listener_may_go_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let gw = Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n[admin]\nlisten = \"unix:{}\"\n\n[[routes]]\nid = \"hello\"\nrespond = {{ status = 200, body = \"hi\" }}\n",
        socket.display()
    ));
    assert_eq!(get(&gw, "/", ""), 200);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "owner-only");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--unix-socket"])
        .arg(&socket)
        .arg("http://admin/metrics")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sample(
            &text,
            r#"portcullis_requests_total{route="hello",method="GET",class="2xx"}"#
        ),
        Some(1.0),
        "{text}"
    );
}
