//! Quotas: spent after `limit` requests in the calendar period, and the count survives a clean
//! restart and a `kill -9` (counters are saved every flush interval).

mod support;

use std::{thread, time::Duration};

use support::*;

fn config(up: &Upstream, data_dir: &std::path::Path) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n[quotas]\ndata_dir = \"{}\"\nflush_interval = \"100ms\"\n\n[upstreams.up]\nservers = [\"{}\"]\n\n[[routes]]\nmatch = {{ path_prefix = \"/metered/\" }}\nupstream = \"up\"\nquotas = [{{ key = \"header:X-Tenant\", limit = 5, period = \"day\", name = \"daily\" }}]\n\n[[routes]]\nupstream = \"up\"\n",
        data_dir.display(),
        up.addr
    )
}

fn call(gw: &Gateway, tenant: &str) -> Response {
    request(
        gw.addr,
        &format!("GET /metered/x HTTP/1.1\r\nHost: a\r\nX-Tenant: {tenant}\r\n\r\n"),
    )
}

#[test]
fn quota_is_spent_and_survives_restart_and_kill() {
    let up = Upstream::echo_target();
    let data = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(&config(&up, data.path()));
    for _ in 0..3 {
        assert_eq!(call(&gw, "acme").status, 200);
    }
    // A clean stop saves the counters.
    gw.signal(libc::SIGTERM);
    assert!(gw.wait_exit(Duration::from_secs(10)).unwrap().success());
    let gw = Gateway::start(&config(&up, data.path()));
    assert_eq!(call(&gw, "acme").status, 200, "4th of 5");
    // Killed without warning, after a flush interval: nothing is lost.
    thread::sleep(Duration::from_millis(400));
    drop(gw); // SIGKILL
    let gw = Gateway::start(&config(&up, data.path()));
    assert_eq!(call(&gw, "acme").status, 200, "5th of 5");
    let r = call(&gw, "acme");
    assert_eq!(r.status, 429, "spent for the day");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry), "until midnight UTC: {retry}");
    assert_eq!(r.header("ratelimit-policy"), Some("\"daily\";q=5;w=86400"));
    assert_eq!(
        call(&gw, "globex").status,
        200,
        "another tenant has its own quota"
    );
    // The journal holds the counts under the route id and quota name, and the tenant only as
    // a keyed hash: never the raw header value.
    let journal = std::fs::read_to_string(data.path().join("quotas.journal")).unwrap();
    assert!(
        journal.starts_with("portcullis-quotas-journal 2\n"),
        "{journal}"
    );
    assert!(journal.contains("/metered/*\tdaily\td\t"), "{journal}");
    let raw_hex: String = b"acme".iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        !journal.contains("acme") && !journal.contains(&raw_hex),
        "{journal}"
    );
}

#[test]
fn quota_admission_is_exact_under_concurrency() {
    let up = Upstream::echo_target();
    let data = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&up, data.path()));
    let ok = std::sync::atomic::AtomicUsize::new(0);
    thread::scope(|s| {
        for _ in 0..10 {
            s.spawn(|| {
                for _ in 0..4 {
                    if call(&gw, "burst").status == 200 {
                        ok.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(ok.into_inner(), 5, "exactly the quota over both workers");
}

/// Runs the gateway binary expecting it to refuse to start; returns its stderr.
fn refused_start(config: &str, dir: &std::path::Path) -> String {
    let path = dir.join("refused.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .current_dir(dir)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the gateway started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn reordering_routes_keeps_quota_counts() {
    let up = Upstream::echo_target();
    let data = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(&config(&up, data.path()));
    for _ in 0..3 {
        assert_eq!(call(&gw, "acme").status, 200);
    }
    gw.signal(libc::SIGTERM);
    assert!(gw.wait_exit(Duration::from_secs(10)).unwrap().success());
    // A new route in front moves the metered route from position 0 to 1; its id (derived
    // from its match) stays, and so does its count.
    let reordered = config(&up, data.path()).replacen(
        "[[routes]]",
        "[[routes]]\nmatch = { path = \"/healthz\" }\nrespond = { status = 200 }\n\n[[routes]]",
        1,
    );
    let gw = Gateway::start(&reordered);
    assert_eq!(call(&gw, "acme").status, 200, "4th of 5");
    assert_eq!(call(&gw, "acme").status, 200, "5th of 5");
    assert_eq!(
        call(&gw, "acme").status,
        429,
        "spent: the count moved with the route"
    );
}

#[test]
fn a_second_process_on_the_same_data_dir_is_refused() {
    let up = Upstream::echo_target();
    let data = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(&up, data.path()));
    let work = tempfile::tempdir().unwrap();
    let err = refused_start(&config(&up, data.path()), work.path());
    assert!(
        err.contains("is in use by another Portcullis process")
            && err.contains(&format!("pid {}", gw.pid())),
        "{err}"
    );
}

#[test]
fn corrupt_state_files_are_clear_errors_or_skipped_lines() {
    let up = Upstream::echo_target();
    let work = tempfile::tempdir().unwrap();
    // Random bytes where the snapshot should be: refused, naming the file.
    let data = tempfile::tempdir().unwrap();
    std::fs::write(
        data.path().join("quotas.state"),
        [0x8f, 0x00, 0xff, 0x13, 0x37],
    )
    .unwrap();
    let err = refused_start(&config(&up, data.path()), work.path());
    assert!(
        err.contains("quotas.state") && err.contains("not a Portcullis quota file"),
        "{err}"
    );
    // A journal with a corrupt line and a torn last line: the good records load.
    let data = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(&config(&up, data.path()));
    for _ in 0..4 {
        assert_eq!(call(&gw, "acme").status, 200);
    }
    gw.signal(libc::SIGTERM);
    assert!(gw.wait_exit(Duration::from_secs(10)).unwrap().success());
    let path = data.path().join("quotas.journal");
    let mut journal = std::fs::read(&path).unwrap();
    journal.extend_from_slice(b"/metered/*\tdaily\td\t1\tzz\t9\t00000000\n");
    journal.extend_from_slice(b"/metered/*\tdaily\td\t");
    std::fs::write(&path, journal).unwrap();
    let gw = Gateway::start(&config(&up, data.path()));
    assert_eq!(call(&gw, "acme").status, 200, "5th of 5");
    assert_eq!(call(&gw, "acme").status, 429);
    let log = gw.log();
    assert!(
        log.contains("skipped an unreadable quota record") && log.contains("checksum"),
        "{log}"
    );
    // The format that keyed counts by route position, with a key too short to read and one
    // good count of 3 for route 0, quota 0, today: migrated once, no panic.
    let data = tempfile::tempdir().unwrap();
    let today = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400) as u32;
    let mut key = vec![0u8, 0, 0, 0];
    key.extend_from_slice(&today.to_le_bytes());
    key.extend_from_slice(b"acme");
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(
        data.path().join("quotas.state"),
        format!("portcullis-quotas 1\n00 5\n{hex} 3\n"),
    )
    .unwrap();
    let gw = Gateway::start(&config(&up, data.path()));
    assert!(
        gw.log().contains("migrated quota counters from format 1"),
        "{}",
        gw.log()
    );
    assert_eq!(call(&gw, "acme").status, 200, "4th of 5");
    assert_eq!(call(&gw, "acme").status, 200, "5th of 5");
    assert_eq!(call(&gw, "acme").status, 429, "the migrated count held");
}

#[test]
fn a_request_that_never_reached_the_upstream_is_not_charged() {
    // The upstream is down: every request fails before any byte reaches it.
    let dead = refusing_addr();
    let data = tempfile::tempdir().unwrap();
    let up = Upstream::echo_target();
    let gw = Gateway::start(
        &config(&up, data.path()).replace(&up.addr.to_string(), &dead.addr.to_string()),
    );
    for i in 0..8 {
        assert_eq!(
            call(&gw, "acme").status,
            502,
            "request {i}: refunded, so never 429"
        );
    }
}

#[test]
fn a_flood_of_distinct_keys_stays_within_capacity() {
    let up = Upstream::echo_target();
    let data = tempfile::tempdir().unwrap();
    let config = config(&up, data.path())
        .replace("flush_interval = \"100ms\"", "flush_interval = \"100ms\"\nmax_keys = 1000")
        .replace("workers = 2", "workers = 2\nmax_limit_keys = 1000")
        .replace(
            "quotas = [{ key = \"header:X-Tenant\", limit = 5",
            "limits = [{ key = \"header:X-Tenant\", rate = 1 }]\nquotas = [{ key = \"header:X-Tenant\", limit = 5",
        );
    let gw = Gateway::start(&config);
    let mut c = Client::connect(gw.addr);
    let (mut ok, mut full) = (0, 0);
    for i in 0..3000 {
        c.send(format!("GET /metered/x HTTP/1.1\r\nHost: a\r\nX-Tenant: t{i}\r\n\r\n").as_bytes());
        let r = c.read_response(false).unwrap();
        match r.status {
            200 => ok += 1,
            429 if r.text().contains("quota capacity reached") => full += 1,
            s => panic!("tenant {i}: {s} {}", r.text()),
        }
    }
    assert_eq!(
        (ok, full),
        (1000, 2000),
        "the first 1000 keys fit, later new keys are refused"
    );
    // The rate limit, keyed by the same header, never refused: it evicts instead.
    thread::sleep(Duration::from_millis(300));
    let journal = std::fs::read_to_string(data.path().join("quotas.journal")).unwrap();
    assert_eq!(journal.lines().count(), 1 + 1000, "one record per live key");
}
