//! The key vault end to end: the real gateway, provider keys added and virtual keys created
//! through the admin API, requests to mock providers on loopback (real sockets). The virtual
//! key is swapped for the provider's key in each provider's header and never reaches the
//! provider; refusals come in each provider's error shape; rotation keeps the old secret for
//! exactly its grace; revocation holds when its call returns; the provider key is in no log
//! and no file on disk; the store needs its master key and survives `kill -9`.

mod support;

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::*;

const TOKEN: &str = "admin-token-for-vault-tests-0123456789";
const OPENAI_KEY: &str = "sk-test-openai-5f3c9a0d7e21b4c8";
const ANTHROPIC_KEY: &str = "sk-ant-test-91e2d4c6b8a03f57";

struct Setup {
    dir: tempfile::TempDir,
    up: Upstream,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        std::fs::write(&key, format!("{}\n", "3c".repeat(32))).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        Setup {
            dir,
            up: Upstream::echo_target(),
        }
    }

    fn config(&self) -> String {
        let d = self.dir.path();
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"PORTCULLIS_TEST_ADMIN_TOKEN\"\n\n\
             [quotas]\ndata_dir = \"{}\"\n\n\
             [vault]\nmaster_key_file = \"{}\"\nrotation_grace = \"1h\"\n\n\
             [vault.providers.openai]\nkind = \"openai\"\n\n\
             [vault.providers.anthropic]\nkind = \"anthropic\"\n\n\
             [vault.providers.azure]\nkind = \"azure\"\n\n\
             [vault.prices.gpt-test]\ninput = 1000000\noutput = 2000000\n\n\
             [vault.prices.claude-test]\ninput = 1000000\noutput = 2000000\n\n\
             [upstreams.mock]\nservers = [\"{}\"]\n\n\
             [[routes]]\nmatch = {{ path_prefix = \"/openai/\" }}\nupstream = \"mock\"\nvault = \"openai\"\n\n\
             [[routes]]\nmatch = {{ path_prefix = \"/anthropic/\" }}\nupstream = \"mock\"\nvault = \"anthropic\"\n\n\
             [[routes]]\nmatch = {{ path_prefix = \"/azure/\" }}\nupstream = \"mock\"\nvault = \"azure\"\n",
            d.join("data").display(),
            d.join("master.key").display(),
            self.up.addr
        )
    }

    fn start(&self) -> Gateway {
        Gateway::start_with(&self.config(), &[("PORTCULLIS_TEST_ADMIN_TOKEN", TOKEN)])
    }

    /// A gateway whose providers are `up` instead of the echoing upstream.
    fn start_against(&self, up: &Upstream) -> Gateway {
        let cfg = self
            .config()
            .replace(&self.up.addr.to_string(), &up.addr.to_string());
        Gateway::start_with(&cfg, &[("PORTCULLIS_TEST_ADMIN_TOKEN", TOKEN)])
    }
}

fn admin(gw: &Gateway, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = admin_request(gw.admin_addr(), method, path, Some(TOKEN), body);
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")),
    )
}

fn call(gw: &Gateway, path: &str, header: &str) -> Response {
    request(
        gw.addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\n{header}content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
        ),
    )
}

fn bearer(key: &str) -> String {
    format!("Authorization: Bearer {key}\r\n")
}

/// Adds the provider keys and a key for alice allowed on openai and anthropic; its secret.
fn provision(gw: &Gateway) -> (String, String) {
    for (provider, key) in [("openai", OPENAI_KEY), ("anthropic", ANTHROPIC_KEY)] {
        let (status, body) = admin(
            gw,
            "POST",
            &format!("/vault/providers/{provider}/keys"),
            &format!("{{\"key\": \"{key}\"}}"),
        );
        assert_eq!(status, 201, "{body}");
        assert!(body["fingerprint"].as_str().unwrap().starts_with("sha256:"));
    }
    let (status, body) = admin(
        gw,
        "POST",
        "/vault/keys",
        r#"{"owner": {"consumer": "alice"}, "providers": ["openai", "anthropic"], "metadata": {"team": "search"}}"#,
    );
    assert_eq!(status, 201, "{body}");
    (
        body["id"].as_str().unwrap().to_owned(),
        body["key"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn virtual_keys_are_swapped_for_provider_keys_in_each_providers_header() {
    let s = Setup::new();
    let gw = s.start();
    let (_, key) = provision(&gw);
    assert!(key.starts_with("pcvk_") && key.len() == 69, "{key}");

    let r = call(&gw, "/openai/v1/chat/completions", &bearer(&key));
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = s.up.requests().pop().unwrap();
    assert_eq!(
        seen.headers_named("authorization"),
        vec![format!("Bearer {OPENAI_KEY}").as_str()]
    );
    let raw = String::from_utf8_lossy(&seen.raw_head).into_owned();
    assert!(
        !raw.contains(&key),
        "the virtual key reached the provider: {raw}"
    );
    assert!(
        seen.header("x-consumer-id").is_none(),
        "the provider is not told who called"
    );

    // Anthropic: x-api-key and the required version; the client's Authorization is dropped.
    let r = call(
        &gw,
        "/anthropic/v1/messages",
        &format!("x-api-key: {key}\r\nAuthorization: Bearer something-else\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = s.up.requests().pop().unwrap();
    assert_eq!(seen.headers_named("x-api-key"), vec![ANTHROPIC_KEY]);
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert!(seen.header("authorization").is_none(), "{:?}", seen.headers);
}

#[test]
fn refusals_come_in_the_providers_error_shape() {
    let s = Setup::new();
    let gw = s.start();
    let (_, key) = provision(&gw);
    let before = s.up.requests().len();

    let r = call(&gw, "/openai/v1/chat/completions", "");
    assert_eq!(r.status, 401);
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    assert_eq!(r.header("content-type"), Some("application/json"));

    let forged = format!("pcvk_{}", "0".repeat(64));
    assert_eq!(
        call(&gw, "/openai/v1/chat/completions", &bearer(&forged)).status,
        401
    );
    assert_eq!(
        call(&gw, "/openai/v1/chat/completions", &bearer(OPENAI_KEY)).status,
        401
    );

    // Not allowed on azure: 403 in Azure's shape.
    let r = call(
        &gw,
        "/azure/openai/deployments/d/chat/completions",
        &format!("api-key: {key}\r\n"),
    );
    assert_eq!(r.status, 403);
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["error"]["code"], "403", "{body}");

    let r = call(&gw, "/anthropic/v1/messages", "x-api-key: nope\r\n");
    assert_eq!(r.status, 401);
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["error"]["type"], "authentication_error", "{body}");
    assert_eq!(
        s.up.requests().len(),
        before,
        "a refused request reached the provider"
    );
}

#[test]
fn rotation_grace_is_exact_and_revocation_holds_when_it_returns() {
    let s = Setup::new();
    let gw = s.start();
    let (id, old) = provision(&gw);
    let (status, body) = admin(
        &gw,
        "POST",
        &format!("/vault/keys/{id}/rotate"),
        r#"{"rotation_id": "deploy-42", "grace_secs": 2}"#,
    );
    assert_eq!(status, 200, "{body}");
    let new = body["key"].as_str().unwrap().to_owned();
    let until_ms = body["previous_valid_until_ms"].as_u64().unwrap();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    // Both work during the grace.
    assert_eq!(
        call(&gw, "/openai/v1/chat/completions", &bearer(&old)).status,
        200
    );
    assert_eq!(
        call(&gw, "/openai/v1/chat/completions", &bearer(&new)).status,
        200
    );
    // A retried rotation changes nothing, and answers with the same secret (the client may
    // have lost the first answer).
    let (status, body) = admin(
        &gw,
        "POST",
        &format!("/vault/keys/{id}/rotate"),
        r#"{"rotation_id": "deploy-42", "grace_secs": 2}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(body["key"].as_str(), Some(new.as_str()), "{body}");
    assert_eq!(body["previous_valid_until_ms"].as_u64(), Some(until_ms));
    assert_eq!(
        call(&gw, "/openai/v1/chat/completions", &bearer(&new)).status,
        200
    );
    // The old secret works until the grace's end and not after it.
    while now_ms() + 300 < until_ms {
        assert_eq!(
            call(&gw, "/openai/v1/chat/completions", &bearer(&old)).status,
            200
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    while now_ms() <= until_ms {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        call(&gw, "/openai/v1/chat/completions", &bearer(&old)).status,
        401
    );
    assert_eq!(
        call(&gw, "/openai/v1/chat/completions", &bearer(&new)).status,
        200
    );

    // Revocation: the first request after the call returns is refused.
    let (status, _) = admin(&gw, "POST", &format!("/vault/keys/{id}/revoke"), "");
    assert_eq!(status, 200);
    assert_eq!(
        call(&gw, "/openai/v1/chat/completions", &bearer(&new)).status,
        401
    );
    let (_, list) = admin(&gw, "GET", "/vault/keys", "");
    assert!(list["keys"][0]["revoked_at_ms"].is_u64(), "{list}");
    let audit = std::fs::read_to_string(s.dir.path().join("data/vault-audit.log")).unwrap();
    for action in ["provider_key.add", "key.create", "key.rotate", "key.revoke"] {
        assert!(audit.contains(action), "{audit}");
    }
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() {
            out.extend(files(&p));
        } else if kind.is_file() {
            // (Sockets, such as the control socket, hold nothing.)
            out.push(p);
        }
    }
    out
}

#[test]
fn provider_keys_never_reach_logs_or_disk_and_the_store_needs_its_master_key() {
    let s = Setup::new();
    let mut gw = s.start();
    let (_, key) = provision(&gw);
    assert_eq!(
        call(&gw, "/openai/v1/chat/completions", &bearer(&key)).status,
        200
    );
    let (_, listed) = admin(&gw, "GET", "/vault/providers", "");
    let (_, keys) = admin(&gw, "GET", "/vault/keys", "");
    let (_, config) = admin_request(gw.admin_addr(), "GET", "/config", Some(TOKEN), "");
    for text in [listed.to_string(), keys.to_string(), config, gw.log()] {
        for secret in [OPENAI_KEY, ANTHROPIC_KEY, key.as_str()] {
            assert!(!text.contains(secret), "{secret} shown in: {text}");
        }
    }
    // kill -9, then the files on disk: no provider key, no virtual key.
    gw.signal(libc::SIGKILL);
    assert!(gw.wait_exit(Duration::from_secs(5)).is_some());
    for file in files(s.dir.path()) {
        let bytes = std::fs::read(&file).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for secret in [OPENAI_KEY, ANTHROPIC_KEY, key.as_str()] {
            assert!(!text.contains(secret), "{secret} in {}", file.display());
        }
    }

    // Restarted after kill -9: the keys still work.
    let gw = s.start();
    assert_eq!(
        call(&gw, "/openai/v1/chat/completions", &bearer(&key)).status,
        200
    );
    drop(gw);

    // Another master key: the gateway refuses to start, saying why.
    let other = s.dir.path().join("other.key");
    std::fs::write(&other, "4d".repeat(32)).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = s.config().replace("master.key", "other.key");
    let path = s.dir.path().join("other.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&path)
        .env("PORTCULLIS_TEST_ADMIN_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "started with the wrong master key"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("does not open with this master key"), "{err}");
}

/// A provider key that gets a 429 rests for its Retry-After while the other key serves, and
/// is used again once the rest is over.
#[test]
fn a_provider_key_answered_429_rests_while_the_others_serve() {
    let s = Setup::new();
    let limited = Upstream::start(|r| {
        if r.header("authorization") == Some("Bearer sk-test-limited-aaaa") {
            Reply::Raw(
                b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 2\r\ncontent-length: 0\r\n\r\n"
                    .to_vec(),
            )
        } else {
            Reply::Raw(ok_response("served"))
        }
    });
    let gw = s.start_against(&limited);
    for key in ["sk-test-limited-aaaa", "sk-test-free-bbbb"] {
        let (status, body) = admin(
            &gw,
            "POST",
            "/vault/providers/openai/keys",
            &format!("{{\"key\": \"{key}\"}}"),
        );
        assert_eq!(status, 201, "{body}");
    }
    let (_, body) = admin(
        &gw,
        "POST",
        "/vault/keys",
        r#"{"owner": {"group": "search"}, "providers": ["openai"]}"#,
    );
    let key = body["key"].as_str().unwrap().to_owned();
    let mut tries = 0;
    while call(&gw, "/openai/v1/chat/completions", &bearer(&key)).status != 429 {
        tries += 1;
        assert!(tries < 60, "the limited key was never chosen");
    }
    let rested_at = Instant::now();
    let mut served = 0;
    while rested_at.elapsed() < Duration::from_millis(1500) {
        let r = call(&gw, "/openai/v1/chat/completions", &bearer(&key));
        assert_eq!(r.status, 200, "a resting key was chosen");
        served += 1;
    }
    assert!(served >= 10, "{served}");
    std::thread::sleep(Duration::from_millis(700));
    let mut again = false;
    for _ in 0..60 {
        if call(&gw, "/openai/v1/chat/completions", &bearer(&key)).status == 429 {
            again = true;
            break;
        }
    }
    assert!(again, "the rested key never came back");
    assert!(
        gw.log().contains("provider key answered 429: resting it"),
        "{}",
        gw.log()
    );
}

fn call_body(gw: &Gateway, path: &str, header: &str, body: &str) -> Response {
    request(
        gw.addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\n{header}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// A key restricted to some models: the model is read from the body (also when the body
/// arrives after the head, or after 100 Continue) or from Azure's deployment path.
#[test]
fn models_outside_a_keys_list_are_refused_with_403() {
    let s = Setup::new();
    let gw = s.start();
    provision(&gw);
    let (_, body) = admin(
        &gw,
        "POST",
        "/vault/keys",
        r#"{"owner": {"consumer": "bob"}, "providers": ["openai", "azure"], "models": ["gpt-4o-mini", "mini-prod"]}"#,
    );
    let key = body["key"].as_str().unwrap().to_owned();
    let (status, _) = admin(
        &gw,
        "POST",
        "/vault/providers/azure/keys",
        r#"{"key": "azure-test-key-77aa"}"#,
    );
    assert_eq!(status, 201);
    let chat = |model: &str| {
        format!(r#"{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}]}}"#)
    };
    let r = call_body(
        &gw,
        "/openai/v1/chat/completions",
        &bearer(&key),
        &chat("gpt-4o-mini"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call_body(
        &gw,
        "/openai/v1/chat/completions",
        &bearer(&key),
        &chat("gpt-4o"),
    );
    assert_eq!(r.status, 403);
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["error"]["code"], "model_not_allowed", "{body}");
    assert_eq!(
        call_body(&gw, "/openai/v1/chat/completions", &bearer(&key), "{}").status,
        403
    );

    // The body after the head, in two pieces; and after 100 Continue.
    let body = chat("gpt-4o-mini");
    let head = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut c = Client::connect(gw.addr);
    c.send(head.as_bytes());
    std::thread::sleep(Duration::from_millis(150));
    c.send(&body.as_bytes()[..10]);
    std::thread::sleep(Duration::from_millis(150));
    c.send(&body.as_bytes()[10..]);
    assert_eq!(c.read_response(false).unwrap().status, 200);
    let mut c = Client::connect(gw.addr);
    c.send(
        head.replace("\r\n\r\n", "\r\nExpect: 100-continue\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(c.read_response(false).unwrap().status, 100);
    c.send(body.as_bytes());
    assert_eq!(c.read_response(false).unwrap().status, 200);
    let seen = s.up.requests().pop().unwrap();
    assert_eq!(
        seen.body,
        body.as_bytes(),
        "the body reached the provider whole"
    );

    // Chunked cannot be judged before forwarding: 411.
    let r = request(
        gw.addr,
        &format!("POST /openai/v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"),
    );
    assert_eq!(r.status, 411);

    // Azure: the deployment in the path.
    let azure = |deployment: &str| {
        call_body(
            &gw,
            &format!("/azure/openai/deployments/{deployment}/chat/completions"),
            &format!("api-key: {key}\r\n"),
            "{}",
        )
        .status
    };
    assert_eq!(azure("mini-prod"), 200);
    assert_eq!(azure("gpt4-prod"), 403);
    assert_eq!(
        s.up.requests().pop().unwrap().header("api-key"),
        Some("azure-test-key-77aa")
    );
}

/// The key's spend as the admin API reports it, once nothing is reserved any more.
fn settled_spend(gw: &Gateway, scope: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = admin(gw, "GET", "/vault/spend", "");
        let found = body["spend"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["scope"] == scope)
            .map(|c| {
                (
                    c["spent_micros"].as_u64().unwrap(),
                    c["reserved_micros"].as_u64().unwrap(),
                )
            });
        if let Some((spent, 0)) = found {
            return spent;
        }
        assert!(Instant::now() < deadline, "still reserved: {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 50 requests at once against a budget that allows 10: exactly 10 are admitted (each
/// reservation equals its real cost here, so the bound of overspend is zero).
#[test]
fn fifty_concurrent_requests_against_a_budget_for_ten_admit_ten() {
    let s = Setup::new();
    let body = r#"{"model": "gpt-test", "max_tokens": 10, "messages": [{"role": "user", "content": "count to ten"}]}"#;
    let prompt = (body.len() as u64).div_ceil(4);
    let each = prompt + 10 * 2;
    let up = Upstream::start(move |_| usage_reply(Duration::from_millis(300), prompt, 10));
    let gw = s.start_against(&up);
    let (id, key) = provision(&gw);
    let (status, b) = admin(
        &gw,
        "POST",
        &format!("/vault/keys/{id}/budget"),
        &format!("{{\"period\": \"day\", \"limit_micros\": {}}}", each * 10),
    );
    assert_eq!(status, 200, "{b}");
    let barrier = std::sync::Barrier::new(50);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..50)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    call_body(&gw, "/openai/v1/chat/completions", &bearer(&key), body).status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    eprintln!("budget for 10: {admitted} admitted, {refused} refused of 50 concurrent");
    assert_eq!((admitted, refused), (10, 40), "{statuses:?}");
    assert_eq!(settled_spend(&gw, &format!("key:{id}")), each * 10);
    // Spent: the next one is refused too, in OpenAI's shape.
    let r = call_body(&gw, "/openai/v1/chat/completions", &bearer(&key), body);
    assert_eq!(r.status, 429);
    let err: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(err["error"]["code"], "insufficient_quota", "{err}");
}

/// Usage settles at its real cost from a JSON answer and from Anthropic's stream (the final
/// cumulative figures, once), also for a stream the client left (the gateway reads on for
/// the usage); an answer without usage costs its reservation, never zero; spend survives
/// kill -9.
#[test]
fn usage_settles_once_from_json_and_streams_and_never_at_zero() {
    let s = Setup::new();
    let sse = |parts: &[(u64, &str)]| {
        let mut out = vec![(
            Duration::ZERO,
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
        )];
        for (ms, event) in parts {
            out.push((
                Duration::from_millis(*ms),
                format!("{:x}\r\n{event}\r\n", event.len()).into_bytes(),
            ));
        }
        out.push((Duration::ZERO, b"0\r\n\r\n".to_vec()));
        Reply::Paced(out)
    };
    let up = Upstream::start(move |r| {
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-test\",\"usage\":{\"input_tokens\":30,\"output_tokens\":1}}}\n\n";
        let delta = |n: u64| {
            format!("event: message_delta\ndata: {{\"type\":\"message_delta\",\"usage\":{{\"output_tokens\":{n}}}}}\n\n")
        };
        match r.target.as_str() {
            "/openai/json/chat/completions" => usage_reply(Duration::ZERO, 100, 50),
            "/openai/nousage/chat/completions" => Reply::Raw(ok_response("{\"choices\":[]}")),
            "/anthropic/stream/messages" => sse(&[(0, start), (10, &delta(20)), (10, &delta(40))]),
            _ => sse(&[(0, start), (1500, &delta(20)), (300, &delta(55))]),
        }
    });
    let start = || s.start_against(&up);
    let mut gw = start();
    let (id, key) = provision(&gw);
    let (status, _) = admin(
        &gw,
        "POST",
        &format!("/vault/keys/{id}/budget"),
        r#"{"period": "total", "limit_micros": 100000000}"#,
    );
    assert_eq!(status, 200);
    let scope = format!("key:{id}");
    let openai = r#"{"model": "gpt-test", "max_tokens": 64}"#;
    let reservation = (openai.len() as u64).div_ceil(4) + 64 * 2;

    assert_eq!(
        call_body(&gw, "/openai/json/chat/completions", &bearer(&key), openai).status,
        200
    );
    let mut spent = settled_spend(&gw, &scope);
    assert_eq!(
        spent,
        100 + 50 * 2,
        "the reported usage, not the reservation"
    );

    let anthropic = r#"{"model": "claude-test", "max_tokens": 100, "stream": true}"#;
    let r = call_body(
        &gw,
        "/anthropic/stream/messages",
        &format!("x-api-key: {key}\r\n"),
        anthropic,
    );
    assert_eq!(r.status, 200);
    assert!(r.text().contains("message_delta"), "streamed through");
    let now = settled_spend(&gw, &scope);
    assert_eq!(
        now - spent,
        30 + 40 * 2,
        "the last cumulative figures, counted once"
    );
    spent = now;

    assert_eq!(
        call_body(
            &gw,
            "/openai/nousage/chat/completions",
            &bearer(&key),
            openai
        )
        .status,
        200
    );
    let now = settled_spend(&gw, &scope);
    assert_eq!(
        now - spent,
        reservation,
        "no usage reported: the reservation"
    );
    spent = now;

    // The client leaves after the first event of a stream.
    let head = format!(
        "POST /anthropic/cut/messages HTTP/1.1\r\nHost: gw\r\nx-api-key: {key}\r\ncontent-length: {}\r\n\r\n{anthropic}",
        anthropic.len()
    );
    let mut c = Client::connect(gw.addr);
    c.send(head.as_bytes());
    let mut first = [0u8; 64];
    let _ = std::io::Read::read(&mut c.stream, &mut first);
    drop(c);
    let now = settled_spend(&gw, &scope);
    let cut = now - spent;
    eprintln!("a stream the client left after its first event was billed {cut} micro-units (its final usage: 30 in, 55 out)");
    assert_eq!(
        cut,
        30 + 55 * 2,
        "the final usage, read on after the client left"
    );
    spent = now;

    // Settled spend is written within a second; kill -9 keeps it.
    std::thread::sleep(Duration::from_millis(1500));
    gw.signal(libc::SIGKILL);
    assert!(gw.wait_exit(Duration::from_secs(5)).is_some());
    let gw = start();
    assert_eq!(settled_spend(&gw, &scope), spent);
}

/// The vault's metrics: spend per budget scope, usage per key id, refusals by reason; and
/// owner names that would break them are refused.
#[test]
fn metrics_report_spend_usage_and_refusals_per_key() {
    let s = Setup::new();
    let up = Upstream::start(|_| usage_reply(Duration::ZERO, 11, 7));
    let gw = s.start_against(&up);
    let (id, key) = provision(&gw);
    let (status, _) = admin(
        &gw,
        "POST",
        "/vault/owners/budget",
        r#"{"owner": {"consumer": "alice"}, "period": "month", "limit_micros": 1000000}"#,
    );
    assert_eq!(status, 200);
    let body = r#"{"model": "gpt-test", "max_tokens": 8}"#;
    assert_eq!(
        call_body(&gw, "/openai/v1/chat/completions", &bearer(&key), body).status,
        200
    );
    assert_eq!(call(&gw, "/openai/v1/chat/completions", "").status, 401);
    let owner_spend = settled_spend(&gw, "consumer:alice");
    assert_eq!(owner_spend, 11 + 7 * 2);
    let (status, text) = admin_request(gw.admin_addr(), "GET", "/metrics", Some(TOKEN), "");
    assert_eq!(status, 200);
    for line in [
        format!("portcullis_vault_spend_micros{{scope=\"consumer:alice\",period=\"Month\"}} {owner_spend}"),
        format!("portcullis_vault_input_tokens_total{{key=\"{id}\"}} 11"),
        format!("portcullis_vault_output_tokens_total{{key=\"{id}\"}} 7"),
        "portcullis_vault_refusals_total{reason=\"missing_key\"} 1".to_owned(),
    ] {
        assert!(text.contains(&line), "no `{line}` in:\n{text}");
    }
    let (status, body) = admin(
        &gw,
        "POST",
        "/vault/keys",
        r#"{"owner": {"consumer": "bad\"name"}, "providers": ["openai"]}"#,
    );
    assert_eq!(status, 400, "{body}");
}

/// `portcullis vault` with `config`, `stdin` fed; (success, stdout and stderr).
fn cli(config: &Path, args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(config)
        .arg("vault")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The CLI on the store of a stopped gateway (under its lock), then through the control
/// socket of the running one, whose workers see the change at once.
#[test]
fn the_vault_cli_works_on_a_stopped_gateway_and_through_a_running_one() {
    let s = Setup::new();
    let config = s.dir.path().join("gateway.toml");
    std::fs::write(&config, s.config()).unwrap();
    let (ok, out) = cli(
        &config,
        &["provider-add", "openai"],
        &format!("{OPENAI_KEY}\n"),
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("sha256:") && !out.contains(OPENAI_KEY),
        "{out}"
    );
    let (ok, out) = cli(
        &config,
        &[
            "key-create",
            "--owner",
            "consumer:carol",
            "--provider",
            "openai",
        ],
        "",
    );
    assert!(ok, "{out}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let (id, key) = (
        created["id"].as_str().unwrap().to_owned(),
        created["key"].as_str().unwrap().to_owned(),
    );
    let gw = s.start();
    assert_eq!(
        call(&gw, "/openai/v1/chat/completions", &bearer(&key)).status,
        200
    );
    let seen = s.up.requests().pop().unwrap();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );

    // Running: through the control socket; the revocation holds at once.
    let (ok, out) = cli(&config, &["key-revoke", &id], "");
    assert!(ok, "{out}");
    assert_eq!(
        call(&gw, "/openai/v1/chat/completions", &bearer(&key)).status,
        401
    );
    let (ok, out) = cli(&config, &["key-list"], "");
    assert!(
        ok && out.contains("revoked_at_ms") && !out.contains(&key),
        "{out}"
    );
    let (ok, out) = cli(
        &config,
        &["key-create", "--owner", "nobody", "--provider", "openai"],
        "",
    );
    assert!(!ok && out.contains("consumer:ID or group:NAME"), "{out}");
    let (ok, out) = cli(&config, &["key-revoke", "vk_0000000000000000"], "");
    assert!(!ok && out.contains("no virtual key"), "{out}");
    let audit = std::fs::read_to_string(s.dir.path().join("data/vault-audit.log")).unwrap();
    assert!(
        audit
            .lines()
            .filter(|l| l.contains("\"actor\":\"cli\""))
            .count()
            >= 3,
        "{audit}"
    );
    assert!(!audit.contains(OPENAI_KEY) && !audit.contains(&key));
}

/// Requests and tokens per minute: a key's fixed one-minute windows, counted across workers.
#[test]
fn requests_and_tokens_per_minute_are_limited_per_key() {
    let s = Setup::new();
    let up = Upstream::start(|_| usage_reply(Duration::ZERO, 10, 10));
    let gw = s.start_against(&up);
    let (id, key) = provision(&gw);
    // Far from a minute's end, so the window cannot turn during the test.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if secs % 60 > 45 {
        std::thread::sleep(Duration::from_secs(61 - secs % 60));
    }
    let (status, b) = admin(
        &gw,
        "POST",
        &format!("/vault/keys/{id}/limits"),
        r#"{"rpm": 3, "tpm": null}"#,
    );
    assert_eq!(status, 200, "{b}");
    let statuses: Vec<u16> = (0..5)
        .map(|_| call(&gw, "/openai/v1/chat/completions", &bearer(&key)).status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let r = call(&gw, "/openai/v1/chat/completions", &bearer(&key));
    let err: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(err["error"]["code"], "rate_limit_exceeded", "{err}");

    // Tokens: each request reserves a token per 4 body bytes plus max_tokens, then settles at
    // the 20 tokens it used.
    let (status, _) = admin(
        &gw,
        "POST",
        &format!("/vault/keys/{id}/limits"),
        r#"{"rpm": null, "tpm": 100}"#,
    );
    assert_eq!(status, 200);
    let body = r#"{"model": "gpt-test", "max_tokens": 40}"#;
    let reserve = (body.len() as u64).div_ceil(4) + 40;
    let mut admitted = 0;
    for _ in 0..10 {
        match call_body(&gw, "/openai/v1/chat/completions", &bearer(&key), body).status {
            200 => admitted += 1,
            429 => break,
            other => panic!("{other}"),
        }
        // Each settles at the 20 tokens it used before the next is judged.
        assert_eq!(settled_spend(&gw, &format!("tpm:key:{id}")), 20 * admitted);
    }
    // Admitted while what was used plus the next reservation fits in 100.
    let expected = (0..).take_while(|k| 20 * k + reserve <= 100).count() as u64;
    assert_eq!(
        admitted, expected,
        "tokens per minute admitted {admitted} (reserving {reserve})"
    );
}

/// Consumers manage their own keys on a self-service route, within the allowance: they see
/// and touch only their own, get the per-key budget, and cannot ask for more.
#[test]
fn consumers_manage_their_own_keys_within_their_allowance() {
    let s = Setup::new();
    let (dana_key, dana_hash) = mint("dana");
    let (erik_key, erik_hash) = mint("erik");
    let cfg = s.config()
        + &format!(
            "\n[vault.self_service]\nproviders = [\"openai\"]\nmodels = [\"gpt-test\"]\nkey_budget = {{ period = \"month\", limit_micros = 5000 }}\nmax_keys = 2\n\n\
             [[consumers]]\nid = \"dana\"\napi_keys = [\"{dana_hash}\"]\n\n\
             [[consumers]]\nid = \"erik\"\napi_keys = [\"{erik_hash}\"]\n\n\
             [[routes]]\nmatch = {{ path_prefix = \"/self/\" }}\nvault_self_service = true\nauth = {{ methods = [\"api_key\"] }}\n"
        );
    let gw = Gateway::start_with(&cfg, &[("PORTCULLIS_TEST_ADMIN_TOKEN", TOKEN)]);
    provision(&gw);
    let me = |key: &str, method: &str, path: &str, body: &str| {
        let r = request(
            gw.addr,
            &format!(
                "{method} /self/{path} HTTP/1.1\r\nHost: gw\r\nX-API-Key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        let json: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, json)
    };
    // Without credentials: the route's auth refuses.
    let r = request(
        gw.addr,
        "GET /self/keys HTTP/1.1\r\nHost: gw\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 401);

    let (status, created) = me(&dana_key, "POST", "keys", "{}");
    assert_eq!(status, 201, "{created}");
    let (id, vkey) = (
        created["id"].as_str().unwrap().to_owned(),
        created["key"].as_str().unwrap().to_owned(),
    );
    assert_eq!(
        call_body(
            &gw,
            "/openai/v1/chat/completions",
            &bearer(&vkey),
            r#"{"model": "gpt-test", "max_tokens": 1}"#
        )
        .status,
        200
    );
    // The allowance: other providers, other models, more keys than allowed.
    let (status, _) = me(&dana_key, "POST", "keys", r#"{"providers": ["anthropic"]}"#);
    assert_eq!(status, 403);
    let (status, _) = me(&dana_key, "POST", "keys", r#"{"models": ["gpt-4o"]}"#);
    assert_eq!(status, 403);
    assert_eq!(me(&dana_key, "POST", "keys", "{}").0, 201);
    assert_eq!(me(&dana_key, "POST", "keys", "{}").0, 409, "max_keys");

    // Each sees only their own; erik cannot touch dana's key.
    let (_, list) = me(&dana_key, "GET", "keys", "");
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| k["owner"]["consumer"] == "dana"));
    assert_eq!(keys[0]["budgets"][0]["limit_micros"], 5000, "{list}");
    let (_, list) = me(&erik_key, "GET", "keys", "");
    assert_eq!(list["keys"].as_array().unwrap().len(), 0);
    assert_eq!(
        me(&erik_key, "POST", &format!("keys/{id}/revoke"), "").0,
        404
    );
    assert_eq!(
        call_body(
            &gw,
            "/openai/v1/chat/completions",
            &bearer(&vkey),
            r#"{"model": "gpt-test", "max_tokens": 1}"#
        )
        .status,
        200
    );

    // Dana rotates (within the grace cap) and revokes her own key.
    let (status, rotated) = me(
        &dana_key,
        "POST",
        &format!("keys/{id}/rotate"),
        r#"{"rotation_id": "r1"}"#,
    );
    assert_eq!(status, 200, "{rotated}");
    let (status, _) = me(&dana_key, "POST", &format!("keys/{id}/revoke"), "");
    assert_eq!(status, 200);
    assert_eq!(
        call(&gw, "/openai/v1/chat/completions", &bearer(&vkey)).status,
        401
    );
    let audit = std::fs::read_to_string(s.dir.path().join("data/vault-audit.log")).unwrap();
    assert!(audit.contains("\"actor\":\"consumer:dana\""), "{audit}");
    assert!(
        !audit.contains("consumer:erik"),
        "erik changed nothing: {audit}"
    );
}

/// A vault route opens the inference endpoints only: not the provider's files, batches or
/// stored responses of the shared account, nor protocol upgrades; and the provider gets
/// `Accept-Encoding: identity` (a compressed body would hide its usage) and no client choice
/// of organisation.
#[test]
fn vault_routes_open_only_inference_endpoints() {
    let s = Setup::new();
    let gw = s.start();
    let (_, key) = provision(&gw);
    let before = s.up.requests().len();
    for (method, path) in [
        ("GET", "/openai/v1/files"),
        ("GET", "/openai/v1/responses/resp_123"),
        ("POST", "/openai/v1/batches"),
        ("POST", "/openai/v1/realtime/sessions"),
        ("DELETE", "/openai/v1/chat/completions"),
        ("GET", "/anthropic/v1/messages/batches/x/results"),
    ] {
        let r = request(
            gw.addr,
            &format!("{method} {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nx-api-key: {key}\r\nconnection: close\r\n\r\n"),
        );
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
    }
    let r = request(
        gw.addr,
        &format!("GET /openai/v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
    );
    assert_eq!(r.status, 404);
    assert_eq!(
        s.up.requests().len(),
        before,
        "refused requests reached the provider"
    );
    let r = call(
        &gw,
        "/openai/v1/chat/completions",
        &format!(
            "{}Accept-Encoding: gzip, br\r\nOpenAI-Organization: org-other\r\n",
            bearer(&key)
        ),
    );
    assert_eq!(r.status, 200);
    let seen = s.up.requests().pop().unwrap();
    assert_eq!(seen.headers_named("accept-encoding"), vec!["identity"]);
    assert!(seen.header("openai-organization").is_none());
    assert_eq!(
        call(&gw, "/openai/v1/models", &bearer(&key)).status,
        404,
        "GET-only endpoint asked with POST"
    );
}

/// A budgeted key reserves for every choice and the largest output allowance, and a body it
/// cannot read those from is refused rather than guessed at.
#[test]
fn reservations_count_choices_and_refuse_unreadable_bodies() {
    let s = Setup::new();
    let gw = s.start();
    let (id, key) = provision(&gw);
    let body = r#"{"model": "gpt-test", "max_tokens": 100, "n": 3}"#;
    let reserve = (body.len() as u64).div_ceil(4) + 100 * 3 * 2;
    // A budget for exactly one such reservation: the second cannot be admitted.
    let (status, _) = admin(
        &gw,
        "POST",
        &format!("/vault/keys/{id}/budget"),
        &format!(
            "{{\"period\": \"day\", \"limit_micros\": {}}}",
            reserve + reserve / 2
        ),
    );
    assert_eq!(status, 200);
    let r = call_body(
        &gw,
        "/openai/v1/chat/completions",
        &bearer(&key),
        r#"{"model": "gpt-test", "max_tokens": 1, "max_tokens": 90000}"#,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let err: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(err["error"]["code"], "invalid_request", "{err}");
    // The mock answers without usage: the first settles at its reservation (3 choices), so
    // the second no longer fits.
    assert_eq!(
        call_body(&gw, "/openai/v1/chat/completions", &bearer(&key), body).status,
        200
    );
    assert_eq!(settled_spend(&gw, &format!("key:{id}")), reserve);
    assert_eq!(
        call_body(&gw, "/openai/v1/chat/completions", &bearer(&key), body).status,
        429
    );
}

/// An OpenAI stream whose client did not ask for usage is sent upstream with
/// `stream_options.include_usage` (so it settles at what it used), and the usage event that
/// adds is withheld from that client; a client that asked for it gets it.
#[test]
fn streams_get_usage_asked_for_and_the_extra_event_withheld() {
    let s = Setup::new();
    let up = Upstream::start(|r| {
        let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let asked = body["stream_options"]["include_usage"] == true;
        let chunk = |event: &str| format!("{:x}\r\n{event}\r\n", event.len()).into_bytes();
        let mut parts = vec![(
            Duration::ZERO,
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
        )];
        let usage = if asked { "null" } else { "absent" };
        for word in ["one", "two"] {
            let event = format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{word}\"}}}}],\"usage\":{usage}}}\n\n"
            )
            .replace(",\"usage\":absent", "");
            parts.push((Duration::from_millis(5), chunk(&event)));
        }
        if asked {
            // Split across two chunks, as a provider may.
            let event = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n";
            // Split across chunks arriving apart, as a provider may.
            let end = event.len() - 1;
            for piece in [&event[..20], &event[20..21], &event[21..end], &event[end..]] {
                parts.push((Duration::from_millis(5), chunk(piece)));
            }
        }
        parts.push((Duration::ZERO, chunk("data: [DONE]\n\n")));
        parts.push((Duration::ZERO, b"0\r\n\r\n".to_vec()));
        Reply::Paced(parts)
    });
    let gw = s.start_against(&up);
    let (id, key) = provision(&gw);
    let (status, _) = admin(
        &gw,
        "POST",
        &format!("/vault/keys/{id}/budget"),
        r#"{"period": "total", "limit_micros": 100000000}"#,
    );
    assert_eq!(status, 200);
    let scope = format!("key:{id}");
    let path = "/openai/v1/chat/completions";

    let plain = r#"{"model": "gpt-test", "stream": true, "max_tokens": 100}"#;
    let r = call_body(&gw, path, &bearer(&key), plain);
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(
        text.contains("\"one\"") && text.contains("\"two\"") && text.contains("[DONE]"),
        "{text}"
    );
    assert!(
        !text.contains("prompt_tokens"),
        "the added usage event was withheld: {text}"
    );
    let sent: Value = serde_json::from_slice(&up.requests().last().unwrap().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true, "{sent}");
    assert_eq!(
        sent["model"], "gpt-test",
        "the rest of the body as the client wrote it"
    );
    assert_eq!(
        settled_spend(&gw, &scope),
        7 + 2 * 2,
        "billed at the reported usage, not the reservation"
    );

    // Twice on one kept-alive connection (the reframed body ends where it should, and the
    // upstream connection is reused), then over HTTP/1.0 (the body framed by the close).
    let mut c = Client::connect(gw.addr);
    for _ in 0..2 {
        c.send(
            format!(
                "POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\ncontent-length: {}\r\n\r\n{plain}",
                plain.len()
            )
            .as_bytes(),
        );
        let r = c
            .read_response(false)
            .expect("an answer on the same connection");
        assert_eq!(r.status, 200);
        assert!(r.chunked);
        let text = r.text();
        assert!(
            text.ends_with("data: [DONE]\n\n") && !text.contains("prompt_tokens"),
            "{text}"
        );
    }
    drop(c);
    let r = request(
        gw.addr,
        &format!(
            "POST {path} HTTP/1.0\r\nHost: gw\r\nAuthorization: Bearer {key}\r\ncontent-length: {}\r\n\r\n{plain}",
            plain.len()
        ),
    );
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(
        text.ends_with("data: [DONE]\n\n") && !text.contains("prompt_tokens"),
        "HTTP/1.0: {text}"
    );

    let asked =
        r#"{"model": "gpt-test", "stream": true, "stream_options": {"include_usage": true}}"#;
    let r = call_body(&gw, path, &bearer(&key), asked);
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("prompt_tokens"),
        "asked for, so relayed: {}",
        r.text()
    );
    assert_eq!(
        up.requests().last().unwrap().body,
        asked.as_bytes(),
        "a body that asks already goes as it is"
    );
}
