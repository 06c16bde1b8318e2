//! API-key authentication end to end: keys minted by `portcullis keys new`, presented in the
//! header, as a Bearer token and in the query; 401 versus 403; credentials stripped; identity
//! headers set, and never taken from the client.

mod support;

use support::*;

struct Fixture {
    up: Upstream,
    gw: Gateway,
    alice: String,
    bob: String,
}

fn fixture(query: bool) -> Fixture {
    let up = Upstream::echo_target();
    let (alice, alice_hash) = mint("alice");
    let (bob, bob_hash) = mint("bob");
    let query = if query {
        "api_key_query = \"api_key\"\n"
    } else {
        ""
    };
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n[auth]\n{query}\n[[consumers]]\nid = \"alice\"\ngroups = [\"admin\", \"beta\"]\napi_keys = [\"{alice_hash}\"]\n\n[[consumers]]\nid = \"bob\"\ngroups = [\"users\"]\napi_keys = [\"{bob_hash}\"]\n\n[upstreams.up]\nservers = [\"{}\"]\n\n[[routes]]\nmatch = {{ path_prefix = \"/admin/\" }}\nupstream = \"up\"\nauth = {{ groups = [\"admin\"] }}\n\n[[routes]]\nmatch = {{ path_prefix = \"/keep/\" }}\nupstream = \"up\"\nauth = {{ keep_credentials = true }}\n\n[[routes]]\nmatch = {{ path_prefix = \"/api/\" }}\nupstream = \"up\"\nauth = {{ methods = [\"api_key\"] }}\n\n[[routes]]\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"up\"\n",
        up.addr
    );
    let gw = Gateway::start(&config);
    Fixture { up, gw, alice, bob }
}

fn get(f: &Fixture, target: &str, fields: &str) -> Response {
    request(
        f.gw.addr,
        &format!("GET {target} HTTP/1.1\r\nHost: a\r\n{fields}\r\n"),
    )
}

#[test]
fn api_key_matrix() {
    let f = fixture(false);
    // Valid, in the header.
    let r = get(&f, "/api/x", &format!("X-API-Key: {}\r\n", f.alice));
    assert_eq!(r.status, 200);
    let seen = f.up.requests().pop().unwrap();
    assert_eq!(
        (
            seen.header("x-consumer-id"),
            seen.header("x-consumer-groups")
        ),
        (Some("alice"), Some("admin,beta"))
    );
    assert_eq!(seen.header("x-api-key"), None, "the credential is stripped");
    // Valid, as a Bearer token.
    let r = get(
        &f,
        "/api/y",
        &format!("Authorization: Bearer {}\r\n", f.bob),
    );
    assert_eq!(r.status, 200);
    let seen = f.up.requests().pop().unwrap();
    assert_eq!(
        (seen.header("x-consumer-id"), seen.header("authorization")),
        (Some("bob"), None)
    );
    // Missing: 401 with a challenge.
    let r = get(&f, "/api/x", "");
    assert_eq!(
        (r.status, r.header("www-authenticate")),
        (401, Some("Bearer realm=\"portcullis\""))
    );
    // Invalid: 401 naming the error; a near miss of a real key too.
    let mut near = f.alice.clone().into_bytes();
    near[20] = if near[20] == b'0' { b'1' } else { b'0' };
    for bad in [
        "pcl_nope".to_owned(),
        String::from_utf8(near).unwrap(),
        format!("{} ", f.alice) + "x",
    ] {
        let r = get(&f, "/api/x", &format!("X-API-Key: {bad}\r\n"));
        assert_eq!(
            (r.status, r.header("www-authenticate")),
            (
                401,
                Some("Bearer realm=\"portcullis\", error=\"invalid_token\"")
            ),
            "{bad:?}"
        );
    }
    // In the query, while query keys are off: not a credential.
    assert_eq!(
        get(&f, &format!("/api/x?api_key={}", f.alice), "").status,
        401
    );
    // Valid but outside the route's groups: 403.
    assert_eq!(
        get(&f, "/admin/panel", &format!("X-API-Key: {}\r\n", f.bob)).status,
        403
    );
    assert_eq!(
        get(&f, "/admin/panel", &format!("X-API-Key: {}\r\n", f.alice)).status,
        200
    );
    // keep_credentials forwards the header.
    assert_eq!(
        get(&f, "/keep/x", &format!("X-API-Key: {}\r\n", f.alice)).status,
        200
    );
    assert_eq!(
        f.up.requests().pop().unwrap().header("x-api-key"),
        Some(f.alice.as_str())
    );
    // A 401 keeps the connection usable (the gateway answered cleanly).
    let mut c = Client::connect(f.gw.addr);
    c.send(b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 401);
    c.send(
        format!(
            "GET /api/x HTTP/1.1\r\nHost: a\r\nX-API-Key: {}\r\n\r\n",
            f.alice
        )
        .as_bytes(),
    );
    assert_eq!(c.read_response(false).unwrap().status, 200);
}

#[test]
fn api_key_in_the_query_when_configured() {
    let f = fixture(true);
    let r = get(
        &f,
        &format!("/api/list?page=2&api_key={}&sort=asc", f.bob),
        "",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        "/api/list?page=2&sort=asc",
        "the key is removed from the forwarded target"
    );
    assert_eq!(
        f.up.requests().pop().unwrap().header("x-consumer-id"),
        Some("bob")
    );
    assert_eq!(get(&f, "/api/list?api_key=pcl_wrong", "").status, 401);
}

#[test]
fn identity_headers_cannot_be_spoofed() {
    let f = fixture(false);
    let spoof = "X-Consumer-Id: admin\r\nX-Consumer-Groups: admin\r\nx-consumer-id: root\r\n";
    // On an open route they are removed.
    assert_eq!(get(&f, "/open", spoof).status, 200);
    let seen = f.up.requests().pop().unwrap();
    assert_eq!(
        (
            seen.header("x-consumer-id"),
            seen.header("x-consumer-groups")
        ),
        (None, None)
    );
    // On a protected route they are replaced by the real identity.
    assert_eq!(
        get(&f, "/api/x", &format!("{spoof}X-API-Key: {}\r\n", f.bob)).status,
        200
    );
    let seen = f.up.requests().pop().unwrap();
    assert_eq!(seen.headers_named("x-consumer-id"), ["bob"]);
    assert_eq!(seen.headers_named("x-consumer-groups"), ["users"]);
    // And they never authenticate anyone.
    assert_eq!(get(&f, "/admin/x", spoof).status, 401);
}
