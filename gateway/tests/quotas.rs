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
    // The state file is whole (written to a temporary file, fsynced, renamed).
    let state = std::fs::read_to_string(data.path().join("quotas.state")).unwrap();
    assert!(state.starts_with("portcullis-quotas 1\n"), "{state}");
    assert!(!data.path().join("quotas.state.tmp").exists());
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
