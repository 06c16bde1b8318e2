//! Logging cannot block the workers or flood the log: with stderr a pipe nobody reads and an
//! upstream outage failing every request, requests keep being answered; once the pipe is read
//! again, the count of what was held back or dropped appears. Credentials in URLs never show.

mod support;

use std::{
    io::{BufRead, BufReader, Read},
    net::TcpListener,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use support::*;

#[test]
fn a_stalled_stderr_blocks_nothing_and_the_count_appears_later() {
    // An upstream address that refuses connections: every request fails fast with 502.
    let dead = refusing_addr();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gw.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n[upstreams.up]\nservers = [\"{dead}\"]\n\n{ROUTE_ALL}"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .current_dir(dir.path())
        .arg("--config")
        .arg(&config)
        // Debug lines (not throttled) fill the pipe quickly.
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "gateway exited");
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    // Nobody reads stderr from here on. 8 clients send 4000 requests each (one debug line each: more than the
    // pipe and the log queue hold).
    let started = Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut answered = 0;
                for _ in 0..4000 {
                    c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
                    if c.read_response(false).is_some_and(|r| r.status == 502) {
                        answered += 1;
                    }
                }
                answered
            })
        })
        .collect();
    let answered: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert_eq!(
        answered, 32_000,
        "every request answered while stderr is stalled"
    );
    eprintln!(
        "32000 requests answered in {:?} with stderr stalled",
        started.elapsed()
    );
    // Read the pipe again: the reports of held-back and dropped lines arrive.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            match stderr.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
                }
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = String::new();
    while Instant::now() < deadline
        && !(seen.contains("log lines dropped since start")
            && seen.contains("log lines of this kind held back"))
    {
        if let Ok(s) = rx.recv_timeout(Duration::from_millis(200)) {
            seen = s;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.contains("log lines dropped since start"),
        "no count of dropped lines once the pipe was read; {} lines seen, last: {:?}",
        seen.lines().count(),
        seen.lines().last()
    );
    assert!(
        seen.contains("log lines of this kind held back") && seen.contains("upstream failure"),
        "no count of held-back upstream failures"
    );
}

#[test]
fn urls_are_logged_without_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let idp = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let up = Upstream::echo_target();
    // The JWKS URL carries userinfo and a query; the provider is down, so the failure is logged.
    let gw = Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n[[auth.issuers]]\nissuer = \"i\"\nalgorithms = [\"RS256\"]\njwks_url = \"http://alice:s3cret@{idp}/jwks.json?api_key=topsecret\"\n\n[upstreams.up]\nservers = [\"{}\"]\n\n{ROUTE_ALL}",
        up.addr
    ));
    drop(dir);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !gw.log().contains("JWKS fetch failed") {
        thread::sleep(Duration::from_millis(50));
    }
    let log = gw.log();
    assert!(log.contains("JWKS fetch failed"), "{log}");
    assert!(log.contains(&format!("http://{idp}/jwks.json")), "{log}");
    assert!(
        !log.contains("s3cret") && !log.contains("topsecret") && !log.contains("alice"),
        "{log}"
    );
}
