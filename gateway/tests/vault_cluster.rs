//! The key vault across two hosts of a `[cluster]`: two gateway processes with their own data
//! directories and the same master key, sharing a real redis-server the test starts. A key
//! created, rotated or revoked on one host holds on the other within the sync interval; 50
//! concurrent requests spread over both hosts against a budget for 10 admit exactly 10; while
//! Redis is away each host admits on its own ledger and changes are refused.

mod support;

use std::{
    os::unix::fs::PermissionsExt,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{redis_server::*, *};

const TOKEN: &str = "admin-token-for-vault-cluster-tests-42";
const OPENAI_KEY: &str = "sk-test-openai-cluster-8d2e6f1a0b";
const SYNC_MS: u64 = 50;

struct Cluster {
    dir: tempfile::TempDir,
    redis: Redis,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        std::fs::write(&key, format!("{}\n", "5a".repeat(32))).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        Cluster {
            dir,
            redis: Redis::start(free_port()).unwrap(),
        }
    }

    /// Host `n`, its providers answered by `up`.
    fn host(&self, n: usize, up: &Upstream) -> Gateway {
        let d = self.dir.path();
        let data = d.join(format!("data-{n}"));
        std::fs::create_dir_all(&data).unwrap();
        let config = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"PORTCULLIS_TEST_ADMIN_TOKEN\"\n\n\
             [cluster]\nredis = \"redis://127.0.0.1:{}\"\nsync_interval = \"{SYNC_MS}ms\"\n\n\
             [quotas]\ndata_dir = \"{}\"\n\n\
             [vault]\nmaster_key_file = \"{}\"\nrotation_grace = \"1h\"\n\n\
             [vault.providers.openai]\nkind = \"openai\"\n\n\
             [vault.prices.gpt-test]\ninput = 1000000\noutput = 2000000\n\n\
             [upstreams.mock]\nservers = [\"{}\"]\n\n\
             [[routes]]\nmatch = {{ path_prefix = \"/openai/\" }}\nupstream = \"mock\"\nvault = \"openai\"\n",
            self.redis.port,
            data.display(),
            d.join("master.key").display(),
            up.addr
        );
        Gateway::start_with(&config, &[("PORTCULLIS_TEST_ADMIN_TOKEN", TOKEN)])
    }

    fn redis(&self) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.redis.port))
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

fn admin(gw: &Gateway, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = admin_request(gw.admin_addr(), method, path, Some(TOKEN), body);
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")),
    )
}

fn call(gw: &Gateway, key: &str, body: &str) -> u16 {
    request(
        gw.addr,
        &format!(
            "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .status
}

/// Adds the provider key on `gw` and creates a key for alice; its id and secret.
fn provision(gw: &Gateway) -> (String, String) {
    let (status, body) = admin(
        gw,
        "POST",
        "/vault/providers/openai/keys",
        &format!("{{\"key\": \"{OPENAI_KEY}\"}}"),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = admin(
        gw,
        "POST",
        "/vault/keys",
        r#"{"owner": {"consumer": "alice"}, "providers": ["openai"]}"#,
    );
    assert_eq!(status, 201, "{body}");
    (
        body["id"].as_str().unwrap().to_owned(),
        body["key"].as_str().unwrap().to_owned(),
    )
}

/// Waits until `check` holds, for at most `within`; how long it took.
fn until(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < within, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    started.elapsed()
}

#[test]
fn keys_made_rotated_and_revoked_on_one_host_hold_on_the_other() {
    if !redis_available("vault cluster test") {
        return;
    }
    let c = Cluster::new();
    let up = Upstream::start(|_| usage_reply(Duration::ZERO, 3, 2));
    let (a, b) = (c.host(1, &up), c.host(2, &up));
    let (id, key) = provision(&a);
    let body = r#"{"model": "gpt-test", "max_tokens": 8}"#;
    let took = until(Duration::from_secs(3), "host b knows the new key", || {
        call(&b, &key, body) == 200
    });
    eprintln!("a key created on host a worked on host b after {took:?}");
    let seen = up.requests();
    assert!(!seen.is_empty());
    let swapped = format!("Bearer {OPENAI_KEY}");
    assert!(
        seen.iter()
            .all(|r| r.header("authorization") == Some(swapped.as_str())),
        "host b swapped in the provider key it never saw added"
    );

    // A rotation retried on the other host (the first answer lost) gives the same secret.
    let rotate = r#"{"rotation_id": "deploy-7", "grace_secs": 60}"#;
    let (status, first) = admin(&a, "POST", &format!("/vault/keys/{id}/rotate"), rotate);
    assert_eq!(status, 200, "{first}");
    let (status, again) = admin(&b, "POST", &format!("/vault/keys/{id}/rotate"), rotate);
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        first["key"], again["key"],
        "a retried rotation answers with the same secret"
    );
    let new_key = first["key"].as_str().unwrap().to_owned();
    until(
        Duration::from_secs(3),
        "host b takes the new secret",
        || call(&b, &new_key, body) == 200,
    );
    assert_eq!(call(&b, &key, body), 200, "the old secret is in its grace");
    // The shared document holds hashes and sealed keys only (the rotation's secret too).
    let stored = |c: &Cluster| -> (u64, String) {
        let (rev, doc): (u64, Vec<u8>) = redis::cmd("HMGET")
            .arg("portcullis:vault:document")
            .arg("rev")
            .arg("doc")
            .query(&mut c.redis())
            .unwrap();
        (rev, String::from_utf8(doc).unwrap())
    };
    let (_, doc) = stored(&c);
    assert!(doc.contains(&id));
    for secret in [OPENAI_KEY, &key, &new_key] {
        assert!(!doc.contains(secret), "a secret in Redis");
    }

    // Revoked on b: refused by b when the call returns, and by a within the stated bound.
    let (status, _) = admin(&b, "POST", &format!("/vault/keys/{id}/revoke"), "");
    assert_eq!(status, 200);
    assert_eq!(call(&b, &new_key, body), 401);
    let took = until(
        Duration::from_secs(2),
        "host a refuses the revoked key",
        || call(&a, &new_key, body) == 401,
    );
    eprintln!(
        "a key revoked on host b was refused by host a after {took:?} (sync interval {SYNC_MS} ms)"
    );
    assert_eq!(call(&a, &key, body), 401, "every secret of it");

    // Someone who can write to Redis but lacks the master key lifts the revocation: refused.
    let (rev, doc) = stored(&c);
    let mut forged: Value = serde_json::from_str(&doc).unwrap();
    forged["keys"][&id]["revoked_at_ms"] = Value::Null;
    forged["revision"] = (rev + 10).into();
    let _: () = redis::cmd("HSET")
        .arg("portcullis:vault:document")
        .arg("rev")
        .arg(rev + 10)
        .arg("doc")
        .arg(forged.to_string())
        .query(&mut c.redis())
        .unwrap();
    std::thread::sleep(Duration::from_millis(10 * SYNC_MS));
    assert_eq!(
        call(&a, &new_key, body),
        401,
        "a forged document is not taken in"
    );
    assert_eq!(call(&b, &new_key, body), 401);
    assert!(
        a.log().contains("not signed with this master key"),
        "and the log says why"
    );
}

/// 50 requests at once, 25 on each host, against a budget that allows 10: exactly 10 are
/// admitted (each reservation equals its real cost here, so the bound of overspend is zero),
/// and the shared counter holds their spend.
#[test]
fn fifty_concurrent_requests_on_two_hosts_against_a_budget_for_ten_admit_ten() {
    if !redis_available("vault cluster test") {
        return;
    }
    let c = Cluster::new();
    let body = r#"{"model": "gpt-test", "max_tokens": 10, "messages": [{"role": "user", "content": "count to ten"}]}"#;
    let prompt = (body.len() as u64).div_ceil(4);
    let each = prompt + 10 * 2;
    let up = Upstream::start(move |_| usage_reply(Duration::from_millis(300), prompt, 10));
    let (a, b) = (c.host(1, &up), c.host(2, &up));
    let (id, key) = provision(&a);
    let (status, answer) = admin(
        &a,
        "POST",
        &format!("/vault/keys/{id}/budget"),
        &format!("{{\"period\": \"day\", \"limit_micros\": {}}}", each * 10),
    );
    assert_eq!(status, 200, "{answer}");
    // Host b has the key and its budget once its view says so.
    until(Duration::from_secs(3), "host b has the budget", || {
        let (_, keys) = admin(&b, "GET", "/vault/keys", "");
        keys["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == id.as_str() && !k["budgets"].as_array().unwrap().is_empty())
    });
    // Each host's link connects to Redis and loads its scripts on its first reservation:
    // done with another key first, so the burst is decided by Redis alone (no fallback).
    let (status, warm) = admin(
        &a,
        "POST",
        "/vault/keys",
        r#"{"owner": {"consumer": "carol"}, "providers": ["openai"]}"#,
    );
    assert_eq!(status, 201, "{warm}");
    let (warm_id, warm_key) = (warm["id"].as_str().unwrap(), warm["key"].as_str().unwrap());
    let (status, _) = admin(
        &a,
        "POST",
        &format!("/vault/keys/{warm_id}/budget"),
        r#"{"period": "day", "limit_micros": 1000000000}"#,
    );
    assert_eq!(status, 200);
    for host in [&a, &b] {
        until(Duration::from_secs(3), "the warm-up key works", || {
            call(host, warm_key, body) == 200
        });
    }
    let barrier = std::sync::Barrier::new(50);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let (host, barrier, key) = (if i % 2 == 0 { &a } else { &b }, &barrier, &key);
                scope.spawn(move || {
                    barrier.wait();
                    call(host, key, body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    eprintln!("two hosts, budget for 10: {admitted} admitted, {refused} refused of 50 concurrent");
    assert_eq!((admitted, refused), (10, 40), "{statuses:?}");
    for gw in [&a, &b] {
        let (_, metrics) = admin_request(gw.admin_addr(), "GET", "/metrics", Some(TOKEN), "");
        assert!(
            metrics.contains("portcullis_vault_cluster_fallbacks_total 0"),
            "every admission was Redis's: {metrics}"
        );
    }
    // The shared counter: the spend of the ten, nothing reserved once they settled.
    let mut conn = c.redis();
    let pattern = format!("portcullis:vault:key:{id}:Day:*");
    until(Duration::from_secs(3), "the shared spend settles", || {
        let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(&mut conn).unwrap();
        let Some(counter) = keys
            .iter()
            .find(|k| !k.ends_with(":r") && !k.ends_with(":e"))
        else {
            return false;
        };
        let (settled, reserved): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(counter)
            .arg("settled")
            .arg("reserved")
            .query(&mut conn)
            .unwrap();
        settled == Some(each * 10) && reserved.unwrap_or(0) == 0
    });
    // Each host's admin API reports the cluster's spend beside its own share of it.
    let day = |gw: &Gateway| {
        let (_, spend) = admin(gw, "GET", "/vault/spend", "");
        spend["spend"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["scope"] == format!("key:{id}") && c["period"] == "day")
            .cloned()
            .unwrap_or_else(|| panic!("{spend}"))
    };
    let (on_a, on_b) = (day(&a), day(&b));
    assert_eq!(
        on_b["cluster"]["spent_micros"].as_u64(),
        Some(each * 10),
        "{on_b}"
    );
    assert_eq!(
        on_a["spent_micros"].as_u64().unwrap() + on_b["spent_micros"].as_u64().unwrap(),
        each * 10,
        "the hosts' shares: {on_a} {on_b}"
    );
    // Spent across the cluster: the next one is refused on either host.
    assert_eq!(call(&a, &key, body), 429);
    assert_eq!(call(&b, &key, body), 429);
}

/// Redis away: requests are admitted by each host's own ledger (counted as fallbacks), key
/// changes are refused rather than made on one host alone; back, changes go through again.
#[test]
fn without_redis_hosts_admit_on_their_own_ledger_and_refuse_changes() {
    if !redis_available("vault cluster test") {
        return;
    }
    let mut c = Cluster::new();
    let up = Upstream::start(|_| usage_reply(Duration::ZERO, 3, 2));
    let a = c.host(1, &up);
    let (id, key) = provision(&a);
    let (status, _) = admin(
        &a,
        "POST",
        &format!("/vault/keys/{id}/budget"),
        r#"{"period": "day", "limit_micros": 1000000}"#,
    );
    assert_eq!(status, 200);
    let body = r#"{"model": "gpt-test", "max_tokens": 8}"#;
    assert_eq!(call(&a, &key, body), 200);
    let port = c.redis.port;
    drop(std::mem::replace(
        &mut c.redis,
        Redis::start(free_port()).unwrap(),
    ));
    assert_eq!(call(&a, &key, body), 200, "admitted on the host's ledger");
    let (status, answer) = admin(
        &a,
        "POST",
        "/vault/keys",
        r#"{"owner": {"consumer": "bob"}, "providers": ["openai"]}"#,
    );
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer.to_string().contains("unreachable"),
        "the answer says why: {answer}"
    );
    let (_, metrics) = admin_request(a.admin_addr(), "GET", "/metrics", Some(TOKEN), "");
    let fallbacks: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_vault_cluster_fallbacks_total "))
        .expect("the fallback counter")
        .parse()
        .unwrap();
    assert!(fallbacks >= 1, "{metrics}");
    // Redis back on its port, empty (no persistence): the host gives it its document, the
    // spend it made meanwhile is counted there, and changes go through again.
    let _back = Redis::start(port).unwrap();
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_connection()
        .unwrap();
    until(Duration::from_secs(5), "the host refills Redis", || {
        let rev: Option<u64> = redis::cmd("HGET")
            .arg("portcullis:vault:document")
            .arg("rev")
            .query(&mut conn)
            .unwrap();
        rev.is_some_and(|r| r > 0)
    });
    until(
        Duration::from_secs(5),
        "the fallback's spend reaches Redis",
        || {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("portcullis:vault:key:{id}:Day:*"))
                .query(&mut conn)
                .unwrap();
            keys.iter().any(|k| {
                let settled: Option<u64> = redis::cmd("HGET")
                    .arg(k)
                    .arg("settled")
                    .query(&mut conn)
                    .unwrap_or(None);
                settled.is_some_and(|s| s > 0)
            })
        },
    );
    until(Duration::from_secs(5), "changes go through again", || {
        admin(
            &a,
            "POST",
            "/vault/keys",
            r#"{"owner": {"consumer": "bob"}, "providers": ["openai"]}"#,
        )
        .0 == 201
    });
    assert_eq!(call(&a, &key, body), 200, "the key made before still works");
}
