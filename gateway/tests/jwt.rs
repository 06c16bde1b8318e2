//! The JWT token matrix, against a real JWKS server on loopback: valid, expired, not yet valid,
//! issued in the future, wrong iss, wrong aud, bad signature, `alg: none`, HS256 signed with the
//! RSA public key, missing scope; unknown kid then success after the provider rotates; the
//! provider down or answering garbage keeps the last good keys; random kids cannot hammer it.

mod support;

use std::{
    io::{Read, Write},
    net::TcpListener,
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use support::*;

const ISS: &str = "https://idp.test/";

#[derive(Clone)]
enum Jwks {
    Serve(String),
    Down,
    Garbage,
}

struct Provider {
    url: String,
    state: Arc<Mutex<Jwks>>,
    fetches: Arc<AtomicUsize>,
}

fn provider(initial: Jwks) -> Provider {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let state = Arc::new(Mutex::new(initial));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (s, f) = (state.clone(), fetches.clone());
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            f.fetch_add(1, Ordering::SeqCst);
            let body = match s.lock().unwrap().clone() {
                Jwks::Down => continue,
                Jwks::Garbage => "<html>this is not a key set</html>".to_owned(),
                Jwks::Serve(b) => b,
            };
            let _ = stream.write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes());
        }
    });
    Provider {
        url,
        state,
        fetches,
    }
}

struct RsaKey {
    private_pem: Vec<u8>,
    public_pem: Vec<u8>,
    modulus_b64: String,
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn rsa_key(dir: &std::path::Path, name: &str) -> RsaKey {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    assert!(Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&private)
        .arg("2048")
        .output()
        .unwrap()
        .status
        .success());
    assert!(Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .output()
        .unwrap()
        .status
        .success());
    let modulus = Command::new("openssl")
        .args(["rsa", "-noout", "-modulus", "-in"])
        .arg(&private)
        .output()
        .unwrap();
    let hex = String::from_utf8(modulus.stdout)
        .unwrap()
        .trim()
        .trim_start_matches("Modulus=")
        .to_owned();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    RsaKey {
        private_pem: std::fs::read(private).unwrap(),
        public_pem: std::fs::read(public).unwrap(),
        modulus_b64: b64url(&bytes),
    }
}

fn jwks(keys: &[(&str, &RsaKey)]) -> String {
    let keys: Vec<_> = keys.iter().map(|(kid, k)| json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": k.modulus_b64, "e": "AQAB"})).collect();
    json!({ "keys": keys }).to_string()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(extra: serde_json::Value) -> serde_json::Value {
    let mut c = json!({"iss": ISS, "aud": "api", "sub": "user-42", "exp": now() + 600, "iat": now(), "email": "u42@example.com", "scope": "read", "jti": format!("{:?}", std::time::Instant::now())});
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn rs256(key: &RsaKey, kid: &str, claims: &serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(&key.private_pem).unwrap(),
    )
    .unwrap()
}

struct Fixture {
    up: support::Upstream,
    gw: Gateway,
    idp: Provider,
    key1: RsaKey,
    key2: RsaKey,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    fixture_with("refetch_min_interval = \"300ms\"\n", "")
}

/// `issuer_extra` goes into the issuer's table, `jwt_route_extra` into the `/jwt/` route.
fn fixture_with(issuer_extra: &str, jwt_route_extra: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let key1 = rsa_key(dir.path(), "k1");
    let key2 = rsa_key(dir.path(), "k2");
    let idp = provider(Jwks::Serve(jwks(&[("kid-1", &key1)])));
    let up = support::Upstream::echo_target();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n[[auth.issuers]]\nissuer = \"{ISS}\"\naudiences = [\"api\"]\nalgorithms = [\"RS256\"]\njwks_url = \"{}\"\nrefresh_interval = \"1h\"\n{issuer_extra}leeway = \"5s\"\nclaim_headers = {{ email = \"X-User-Email\" }}\n\n[upstreams.up]\nservers = [\"{}\"]\n\n[[routes]]\nmatch = {{ path_prefix = \"/scoped/\" }}\nupstream = \"up\"\nauth = {{ methods = [\"jwt\"], scopes = [\"write\"] }}\n\n[[routes]]\nmatch = {{ path_prefix = \"/jwt/\" }}\nupstream = \"up\"\nauth = {{ methods = [\"jwt\"] }}\n{jwt_route_extra}\n[[routes]]\nupstream = \"up\"\n",
        idp.url, up.addr
    );
    let gw = Gateway::start(&config);
    // The fetcher loads the first key set off the request path.
    for _ in 0..100 {
        if idp.fetches.load(Ordering::SeqCst) > 0 {
            break;
        }
        thread::sleep(std::time::Duration::from_millis(20));
    }
    thread::sleep(std::time::Duration::from_millis(100));
    Fixture {
        up,
        gw,
        idp,
        key1,
        key2,
        _dir: dir,
    }
}

/// 401 with `error="invalid_token"`.
fn assert_invalid_token(r: &Response, case: &str) {
    assert_eq!(
        (r.status, r.header("www-authenticate")),
        (
            401,
            Some("Bearer realm=\"portcullis\", error=\"invalid_token\"")
        ),
        "{case}"
    );
}

fn call(f: &Fixture, path: &str, token: &str) -> Response {
    request(f.gw.addr, &format!("GET {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nX-User-Email: spoofed@evil\r\n\r\n"))
}

#[test]
fn token_matrix() {
    let f = fixture();
    let good = rs256(&f.key1, "kid-1", &claims(json!({})));
    let r = call(&f, "/jwt/a", &good);
    assert_eq!(r.status, 200, "valid token");
    let seen = f.up.requests().pop().unwrap();
    assert_eq!(seen.header("x-consumer-id"), Some("user-42"));
    assert_eq!(
        seen.headers_named("x-user-email"),
        ["u42@example.com"],
        "claim header set, client copy removed"
    );
    assert_eq!(seen.header("authorization"), None, "the token is stripped");

    let refused: Vec<(&str, String)> = vec![
        (
            "expired",
            rs256(&f.key1, "kid-1", &claims(json!({"exp": now() - 60}))),
        ),
        (
            "not yet valid",
            rs256(&f.key1, "kid-1", &claims(json!({"nbf": now() + 600}))),
        ),
        (
            "issued in the future",
            rs256(&f.key1, "kid-1", &claims(json!({"iat": now() + 600}))),
        ),
        (
            "wrong iss",
            rs256(
                &f.key1,
                "kid-1",
                &claims(json!({"iss": "https://evil.test/"})),
            ),
        ),
        (
            "wrong aud",
            rs256(&f.key1, "kid-1", &claims(json!({"aud": "other"}))),
        ),
        (
            "no exp",
            rs256(&f.key1, "kid-1", &claims(json!({"exp": null}))),
        ),
        ("bad signature", rs256(&f.key2, "kid-1", &claims(json!({})))),
        ("tampered payload", {
            let parts: Vec<&str> = good.split('.').collect();
            let forged = b64url(claims(json!({"sub": "admin"})).to_string().as_bytes());
            format!("{}.{}.{}", parts[0], forged, parts[2])
        }),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64url(br#"{"alg":"none","typ":"JWT"}"#),
                b64url(claims(json!({})).to_string().as_bytes())
            ),
        ),
        ("HS256 with the RSA public key", {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some("kid-1".into());
            encode(
                &header,
                &claims(json!({})),
                &EncodingKey::from_secret(&f.key1.public_pem),
            )
            .unwrap()
        }),
        ("garbage", "eyJ.not-a.token".to_owned()),
    ];
    for (name, token) in &refused {
        let r = call(&f, "/jwt/a", token);
        assert_invalid_token(&r, name);
    }
    assert_eq!(
        request(f.gw.addr, "GET /jwt/a HTTP/1.1\r\nHost: a\r\n\r\n").status,
        401,
        "missing"
    );
    // Valid but without the route's scope: 403; with it: 200.
    assert_eq!(call(&f, "/scoped/x", &good).status, 403);
    assert_eq!(
        call(
            &f,
            "/scoped/x",
            &rs256(&f.key1, "kid-1", &claims(json!({"scope": "read write"})))
        )
        .status,
        200
    );
    // Spoofed claim headers are removed on open routes too.
    assert_eq!(call(&f, "/open", "x").status, 200);
    assert_eq!(f.up.requests().pop().unwrap().header("x-user-email"), None);
}

#[test]
fn key_rotation_outage_and_garbage() {
    let f = fixture();
    // The provider rotates to key 2; a token with the new kid succeeds on its first try.
    *f.idp.state.lock().unwrap() = Jwks::Serve(jwks(&[("kid-2", &f.key2)]));
    let rotated = rs256(&f.key2, "kid-2", &claims(json!({})));
    assert_eq!(
        call(&f, "/jwt/r", &rotated).status,
        200,
        "unknown kid triggers a refetch"
    );
    // The provider goes down: the last good keys stay in use.
    *f.idp.state.lock().unwrap() = Jwks::Down;
    thread::sleep(std::time::Duration::from_millis(350));
    let unknown = rs256(&f.key1, "kid-9", &claims(json!({})));
    assert_eq!(
        call(&f, "/jwt/r", &unknown).status,
        401,
        "an unknown kid while the provider is down"
    );
    assert_eq!(
        call(&f, "/jwt/r", &rs256(&f.key2, "kid-2", &claims(json!({})))).status,
        200,
        "last good keys kept while down"
    );
    // The provider answers garbage: still the last good keys.
    *f.idp.state.lock().unwrap() = Jwks::Garbage;
    thread::sleep(std::time::Duration::from_millis(350));
    assert_eq!(
        call(&f, "/jwt/r", &rs256(&f.key1, "kid-8", &claims(json!({})))).status,
        401
    );
    assert_eq!(
        call(&f, "/jwt/r", &rs256(&f.key2, "kid-2", &claims(json!({})))).status,
        200,
        "last good keys kept after garbage"
    );
    // Random kids do not hammer the provider: fetches are rate-limited (one per 300 ms).
    *f.idp.state.lock().unwrap() = Jwks::Serve(jwks(&[("kid-2", &f.key2)]));
    let before = f.idp.fetches.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    for i in 0..10 {
        call(
            &f,
            "/jwt/r",
            &rs256(&f.key1, &format!("random-{i}"), &claims(json!({}))),
        );
    }
    let fetched = f.idp.fetches.load(Ordering::SeqCst) - before;
    let allowed = started.elapsed().as_millis() / 300 + 2;
    assert!(
        fetched as u128 <= allowed,
        "{fetched} fetches for 10 random kids in {:?}",
        started.elapsed()
    );
}

/// An identity value a token supplies must be safe to write into a head, and a consumer must be
/// named: otherwise the token is invalid and nothing reaches the upstream.
#[test]
fn identity_values_cannot_inject() {
    let f = fixture();
    let cases = [
        ("CR LF in sub", json!({"sub": "alice\r\nX-Injected: yes"})),
        ("LF in sub", json!({"sub": "alice\nX-Injected: yes"})),
        ("NUL in sub", json!({"sub": "alice\0"})),
        ("tab in sub", json!({"sub": "alice\tbob"})),
        ("missing sub", json!({"sub": null})),
        ("empty sub", json!({"sub": ""})),
        ("sub not a string", json!({"sub": 42})),
        (
            "CR LF in a group",
            json!({"groups": ["ops\r\nX-Injected: yes"]}),
        ),
        ("comma in a group", json!({"groups": ["ops,admin"]})),
        (
            "LF in a claim header",
            json!({"email": "a@b\nX-Injected: yes"}),
        ),
        ("NUL in a claim header", json!({"email": "a@b\0"})),
    ];
    let before = f.up.requests().len();
    for (name, extra) in cases {
        let token = rs256(&f.key1, "kid-1", &claims(extra));
        let r = call(&f, "/jwt/i", &token);
        assert_invalid_token(&r, name);
    }
    assert_eq!(
        f.up.requests().len(),
        before,
        "nothing reached the upstream"
    );
    // A clean token with groups and a claim header still passes, with its values intact.
    let good = rs256(
        &f.key1,
        "kid-1",
        &claims(json!({"groups": ["ops", "dev"], "sub": "alice"})),
    );
    assert_eq!(call(&f, "/jwt/i", &good).status, 200);
    let seen = f.up.requests().pop().unwrap();
    assert_eq!(seen.header("x-consumer-id"), Some("alice"));
    assert_eq!(seen.header("x-consumer-groups"), Some("ops,dev"));
    assert_eq!(seen.header("x-injected"), None);
}

/// A flood of distinct junk tokens from one client is limited before any signature check,
/// while another client with a valid token is served.
#[test]
fn junk_token_flood_meets_the_pre_auth_limit() {
    let f = fixture_with(
        "refetch_min_interval = \"300ms\"\n",
        "pre_auth_limits = [{ key = \"client\", rate = 20, per = \"1s\", burst = 20 }]\n",
    );
    let attacker: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let good = rs256(&f.key1, "kid-1", &claims(json!({})));
    // Well-formed tokens with a forged signature, each different: each needs a full check.
    let (head_and_claims, signature) = good.rsplit_once('.').unwrap();
    let junk: Vec<String> = (0..120)
        .map(|i| format!("{head_and_claims}.{:04}{}", i, &signature[4..]))
        .collect();
    let started = std::time::Instant::now();
    let (mut unauthorized, mut limited) = (0u32, 0u32);
    for (i, junk) in junk.iter().enumerate() {
        let mut c = Client::connect_from(f.gw.addr, attacker);
        c.send(
            format!("GET /jwt/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {junk}\r\n\r\n")
                .as_bytes(),
        );
        match c.read_response(false).unwrap().status {
            401 => unauthorized += 1,
            429 => limited += 1,
            s => panic!("junk token answered {s}"),
        }
        if i % 20 == 0 {
            assert_eq!(
                call(&f, "/jwt/ok", &good).status,
                200,
                "the legitimate client"
            );
        }
    }
    let refill = (started.elapsed().as_secs_f64() * 20.0).ceil() as u32;
    assert!(
        (20..=20 + refill).contains(&unauthorized),
        "{unauthorized} junk tokens were checked (burst 20, refill {refill})"
    );
    assert_eq!(unauthorized + limited, 120);
    assert!(limited > 0);
    let r = request(f.gw.addr, "GET /jwt/x HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.status, 401, "the loopback client keeps its own count");
}

/// A key rotated one second after the start-up fetch is fetched at once: scheduled and start-up
/// fetches do not count towards `refetch_min_interval`. A second rotation right after a
/// kid-triggered fetch waits for the next allowed refetch when it is within
/// `unknown_kid_wait`, and is refused at once when it is further away.
#[test]
fn rotation_right_after_a_scheduled_fetch() {
    let f = fixture_with(
        "refetch_min_interval = \"1500ms\"\nunknown_kid_wait = \"8s\"\n",
        "",
    );
    thread::sleep(std::time::Duration::from_secs(1));
    *f.idp.state.lock().unwrap() = Jwks::Serve(jwks(&[("kid-1", &f.key1), ("kid-2", &f.key2)]));
    let rotated = rs256(&f.key2, "kid-2", &claims(json!({})));
    assert_eq!(call(&f, "/jwt/r", &rotated).status, 200, "first rotation");
    // That was a kid-triggered fetch: the next may start 1.5 s later, within the 8 s bound,
    // so a token with yet another new kid waits for it instead of failing.
    let dir = tempfile::tempdir().unwrap();
    let key3 = rsa_key(dir.path(), "k3");
    *f.idp.state.lock().unwrap() = Jwks::Serve(jwks(&[("kid-2", &f.key2), ("kid-3", &key3)]));
    let third = rs256(&key3, "kid-3", &claims(json!({})));
    let started = std::time::Instant::now();
    assert_eq!(call(&f, "/jwt/r", &third).status, 200, "second rotation");
    assert!(started.elapsed() < std::time::Duration::from_secs(8));
}

#[test]
fn unknown_kid_beyond_the_wait_bound_is_refused_at_once() {
    let f = fixture_with(
        "refetch_min_interval = \"30s\"\nunknown_kid_wait = \"5s\"\n",
        "",
    );
    *f.idp.state.lock().unwrap() = Jwks::Serve(jwks(&[("kid-2", &f.key2)]));
    let rotated = rs256(&f.key2, "kid-2", &claims(json!({})));
    assert_eq!(
        call(&f, "/jwt/r", &rotated).status,
        200,
        "right after start-up"
    );
    // The next kid-triggered refetch is 30 s away, beyond the 5 s bound: refused without
    // waiting out the bound (a generous margin: this machine may be busy with other tests).
    let started = std::time::Instant::now();
    let unknown = rs256(&f.key1, "kid-7", &claims(json!({})));
    assert_eq!(call(&f, "/jwt/r", &unknown).status, 401);
    assert!(
        started.elapsed() < std::time::Duration::from_millis(2500),
        "did not wait: {:?}",
        started.elapsed()
    );
}
