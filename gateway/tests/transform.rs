//! Transformation end to end: the real gateway between real clients and a real upstream on
//! loopback. Header rules of every kind on requests and responses, templates over each source
//! of the request context, CR/LF refused at load and dropped (and counted) at run time, regex
//! routes and rewrites with captures, query edits, JSON body rules on requests and responses
//! (nested paths, the size bound, encodings, streams), CORS preflights and simple requests
//! from allowed and disallowed origins (also in a real browser), and JSON error bodies.

mod support;

use std::io::Write;

use support::*;

const TOKEN: &str = "admin-token-for-transform-tests-01";
const HMAC_SECRET: &str = "transform-tests-hmac-secret-0123456789abcdef";
const ISS: &str = "https://idp.transform.test/";

/// A 200 with `fields` and `body`.
fn answer(fields: &str, body: &str) -> Reply {
    Reply::Raw(
        format!(
            "HTTP/1.1 200 OK\r\n{fields}content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// A gateway with `[admin]` (for the metrics), one upstream `up` and `rest` (routes and more).
fn gateway(up: &Upstream, rest: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap().keep();
    let secret = dir.join("hmac.secret");
    std::fs::write(&secret, HMAC_SECRET).unwrap();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"PORTCULLIS_TEST_ADMIN_TOKEN\"\n\n\
         [[auth.issuers]]\nissuer = \"{ISS}\"\nalgorithms = [\"HS256\"]\npem_file = \"{}\"\n\n\
         [upstreams.up]\nservers = [\"{}\"]\n\n{rest}",
        secret.display(),
        up.addr
    );
    Gateway::start_with(&config, &[("PORTCULLIS_TEST_ADMIN_TOKEN", TOKEN)])
}

/// An HS256 token for `sub` with `claims` added.
fn token(sub: &str, claims: serde_json::Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut body = serde_json::json!({"iss": ISS, "sub": sub, "iat": now, "exp": now + 600});
    for (k, v) in claims.as_object().unwrap() {
        body[k] = v.clone();
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &body,
        &jsonwebtoken::EncodingKey::from_secret(HMAC_SECRET.as_bytes()),
    )
    .unwrap()
}

fn metric(gw: &Gateway, line_start: &str) -> u64 {
    let (status, body) = admin_request(gw.admin_addr(), "GET", "/metrics", Some(TOKEN), "");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `{line_start}` in the metrics:\n{body}"))
}

/// A counter's value once it has reached `want`, or its value after two seconds: the log phase
/// counts a request just after its response has gone, so a client can ask before that.
fn metric_reaching(gw: &Gateway, line_start: &str, want: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let value = metric(gw, line_start);
        if value >= want || std::time::Instant::now() >= deadline {
            return value;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn header_rules_of_every_kind_on_requests_and_responses() {
    let up = Upstream::start(|_| {
        answer(
            "content-type: text/plain\r\nx-internal: secret\r\nx-upstream-old: kept\r\nx-list: 1\r\nx-present: upstream\r\n",
            "ok",
        )
    });
    let (key, hash) = mint("alice");
    let gw = gateway(
        &up,
        &format!(
            r#"[[consumers]]
id = "alice"
groups = ["admins", "ops"]
api_keys = ["{hash}"]

[[routes]]
id = "users"
match = {{ path_regex = "/users/(?<id>[0-9]+)(?<rest>/.*)?" }}
upstream = "up"
rewrite = "/v2/accounts/{{path.id}}{{path.rest}}"
auth = {{ methods = ["api_key"] }}
request_headers = {{ remove = ["x-debug"], rename = {{ "x-old" = "x-new" }}, set = {{ "x-user" = "{{path.id}}", "x-consumer" = "{{consumer}}", "x-groups" = "{{consumer_groups}}", "x-client" = "{{client_ip}}", "x-rid" = "{{request_id}}", "x-route" = "{{route}}", "x-orig" = "{{method}} {{host}}{{path}}", "x-when" = "{{time_unix}}", "x-tenant-copy" = "t={{header.x-tenant}}" }}, add = {{ "x-default" = "d", "x-present" = "not added" }}, append = {{ "x-list" = "2" }} }}
response_headers = {{ remove = ["x-internal"], rename = {{ "x-upstream-old" = "x-renamed" }}, set = {{ "x-served-by" = "portcullis {{route}}" }}, add = {{ "x-present" = "not added", "x-stamp" = "{{time}}" }}, append = {{ "x-list" = "2" }} }}
"#
        ),
    );
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let r = request(
        gw.addr,
        &format!(
            "GET /users/42/posts?x=1 HTTP/1.1\r\nHost: Api.Test:8080\r\nX-API-Key: {key}\r\nX-Debug: 1\r\nX-Old: renamed\r\nX-Present: client\r\nX-List: 1\r\nX-Tenant: t7\r\nX-User: forged\r\nconnection: close\r\n\r\n"
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = &up.requests()[0];
    assert_eq!(seen.target, "/v2/accounts/42/posts?x=1");
    let field = |n: &str| seen.header(n).unwrap_or("(none)").to_owned();
    assert_eq!(field("x-debug"), "(none)", "removed");
    assert_eq!(
        (field("x-old"), field("x-new")),
        ("(none)".into(), "renamed".into())
    );
    assert_eq!(
        seen.headers_named("x-user"),
        ["42"],
        "set replaces the client's copy"
    );
    assert_eq!(field("x-consumer"), "alice");
    assert_eq!(field("x-groups"), "admins,ops");
    assert_eq!(field("x-client"), "127.0.0.1");
    assert_eq!(field("x-rid"), field("x-request-id"));
    assert_eq!(r.header("x-request-id"), Some(field("x-rid").as_str()));
    assert_eq!(field("x-route"), "users");
    assert_eq!(field("x-orig"), "GET Api.Test:8080/users/42/posts");
    let when: u64 = field("x-when").parse().unwrap();
    assert!(when >= before && when < before + 60, "{when}");
    assert_eq!(field("x-tenant-copy"), "t=t7");
    assert_eq!(field("x-default"), "d", "added where absent");
    assert_eq!(
        seen.headers_named("x-present"),
        ["client"],
        "not added: present"
    );
    assert_eq!(seen.headers_named("x-list"), ["1", "2"], "appended");
    // The response's rules.
    assert_eq!(r.header("x-internal"), None);
    assert_eq!(r.header("x-upstream-old"), None);
    assert_eq!(r.header("x-renamed"), Some("kept"));
    assert_eq!(r.header("x-served-by"), Some("portcullis users"));
    let present: Vec<&str> = r
        .headers
        .iter()
        .filter(|(n, _)| n == "x-present")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(present, ["upstream"]);
    let stamp = r.header("x-stamp").unwrap();
    assert!(
        stamp.len() == 20 && stamp.ends_with('Z'),
        "RFC 3339: {stamp}"
    );
    let list: Vec<&str> = r
        .headers
        .iter()
        .filter(|(n, _)| n == "x-list")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(list, ["1", "2"]);
}

#[test]
fn upstream_rules_are_the_default_and_a_route_of_its_own_replaces_them() {
    let up = Upstream::start(|_| answer("content-type: text/plain\r\n", "ok"));
    // Upstream defaults live in the upstream's own table.
    let gw = {
        let config = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n\
             [upstreams.up]\nservers = [\"{}\"]\n\
             request_headers = {{ set = {{ \"x-from\" = \"upstream default\" }} }}\n\
             response_headers = {{ set = {{ \"x-default\" = \"yes\" }} }}\n\n\
             [[routes]]\nmatch = {{ path_prefix = \"/plain/\" }}\nupstream = \"up\"\n\n\
             [[routes]]\nmatch = {{ path_prefix = \"/own/\" }}\nupstream = \"up\"\n\
             request_headers = {{ set = {{ \"x-from\" = \"route\" }} }}\n",
            up.addr
        );
        Gateway::start(&config)
    };
    let plain = request(
        gw.addr,
        "GET /plain/a HTTP/1.1\r\nHost: t\r\nconnection: close\r\n\r\n",
    );
    let own = request(
        gw.addr,
        "GET /own/a HTTP/1.1\r\nHost: t\r\nconnection: close\r\n\r\n",
    );
    let seen = up.requests();
    assert_eq!(seen[0].header("x-from"), Some("upstream default"));
    assert_eq!(plain.header("x-default"), Some("yes"));
    assert_eq!(seen[1].header("x-from"), Some("route"));
    assert_eq!(
        own.header("x-default"),
        Some("yes"),
        "the route set only request rules: the upstream's response rules stay"
    );
}

#[test]
fn claims_in_templates_and_cr_lf_refused_at_load_and_dropped_at_run_time() {
    // At load: a template holding CR or LF is refused, naming the file, line and key.
    let (ok, text) = check_config(
        "[upstreams.up]\nservers = [\"127.0.0.1:9\"]\n\n[[routes]]\nupstream = \"up\"\nrequest_headers = { set = { \"x-a\" = \"one\\r\\nx-injected: 1\" } }\n",
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("gateway.toml:6") && text.contains("CR, LF or NUL"),
        "{text}"
    );
    // A capture the regex does not have, a field the gateway owns, a bad pointer.
    for (rules, says) in [
        (
            "match = { path_regex = \"/a/(?<id>[0-9]+)\" }\nrewrite = \"/b/{path.nope}\"\n",
            "no such capture",
        ),
        (
            "request_headers = { set = { \"content-length\" = \"1\" } }\n",
            "written by the gateway",
        ),
        (
            "request_headers = { remove = [\"x-forwarded-for\"] }\n",
            "written by the gateway",
        ),
        (
            "response_json = { set = { \"a/b\" = 1 } }\n",
            "JSON Pointer",
        ),
        (
            "match = { path_regex = \"(unclosed\" }\n",
            "not a valid regex",
        ),
        (
            "request_headers = { set = { \"x-a\" = \"{nope}\" } }\n",
            "unknown variable",
        ),
    ] {
        let (ok, text) = check_config(&format!(
            "[upstreams.up]\nservers = [\"127.0.0.1:9\"]\n\n[[routes]]\nupstream = \"up\"\n{rules}"
        ));
        assert!(!ok && text.contains(says), "{rules}: {text}");
    }

    // At run time: a claim's value holding CR LF is dropped, the request goes on, it is counted.
    let up = Upstream::start(|_| answer("content-type: text/plain\r\n", "ok"));
    let gw = gateway(
        &up,
        r#"[[routes]]
id = "claims"
match = { path_prefix = "/" }
upstream = "up"
auth = { methods = ["jwt"] }
request_headers = { set = { "x-tenant" = "{claim.tenant}", "x-level" = "{claim.level}", "x-note" = "{claim.note}", "x-missing" = "[{claim.missing}]" } }
"#,
    );
    let jwt = token(
        "svc-1",
        serde_json::json!({"tenant": "acme", "level": 3, "note": "a\r\nx-evil: 1"}),
    );
    let r = request(
        gw.addr,
        &format!("GET /x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {jwt}\r\nconnection: close\r\n\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = &up.requests()[0];
    assert_eq!(seen.header("x-tenant"), Some("acme"));
    assert_eq!(seen.header("x-level"), Some("3"), "non-strings as JSON");
    assert_eq!(seen.header("x-missing"), Some("[]"));
    assert_eq!(seen.header("x-note"), None, "dropped, not written");
    assert_eq!(seen.header("x-evil"), None, "and nothing injected");
    assert_eq!(
        metric_reaching(
            &gw,
            "portcullis_transform_dropped_values_total{route=\"claims\"}",
            1
        ),
        1
    );
}

#[test]
fn regex_routes_rank_between_exact_paths_and_prefixes_and_rewrite_with_captures() {
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config_with(
        up.addr,
        "",
        r#"[[routes]]
id = "prefix"
match = { path_prefix = "/users/" }
upstream = "up"

[[routes]]
id = "by-id"
match = { path_regex = "/users/(?<id>[0-9]+)" }
upstream = "up"
rewrite = "/v2/accounts/{path.id}"

[[routes]]
id = "by-name"
match = { path_regex = "/users/([a-z]+)/(.*)" }
upstream = "up"
rewrite = "/people/{path.2}/{path.1}"

[[routes]]
id = "exact"
match = { path = "/users/7" }
upstream = "up"
rewrite = "/exact"
"#,
    ));
    let target = |path: &str| {
        request(
            gw.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\nconnection: close\r\n\r\n"),
        )
    };
    for (path, upstream_saw) in [
        ("/users/7", "/exact"),
        ("/users/42", "/v2/accounts/42"),
        ("/users/42?full=1", "/v2/accounts/42?full=1"),
        ("/users/bob/posts/3", "/people/posts/3/bob"),
        // The regex sees the normalised path: dot-segments are gone before it matches.
        ("/users/x/../42", "/v2/accounts/42"),
        ("/users/%34%32", "/v2/accounts/42"),
        // No regex matches: the prefix takes it, untouched.
        ("/users/42/more", "/users/42/more"),
    ] {
        let r = target(path);
        assert_eq!(
            (r.status, r.text()),
            (200, upstream_saw.to_owned()),
            "{path}"
        );
    }
    // A capture that would leave a dot-segment in the rewritten path is refused, not sent.
    let before = up.requests().len();
    let r = target("/users/abc/..%2F");
    assert!(r.status == 400, "{} {}", r.status, r.text());
    assert_eq!(up.requests().len(), before);
}

#[test]
fn query_parameters_are_removed_renamed_set_and_added() {
    let (key, hash) = mint("bob");
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config_with(
        up.addr,
        "",
        &format!(
            r#"[auth]
api_key_query = "key"

[[consumers]]
id = "bob"
api_keys = ["{hash}"]

[[routes]]
match = {{ path_prefix = "/" }}
upstream = "up"
auth = {{ methods = ["api_key"] }}
query = {{ remove = ["debug"], rename = {{ "q" = "search" }}, set = {{ "who" = "{{consumer}} (via gw)" }}, add = {{ "page" = "1" }} }}
"#
        ),
    ));
    let r = request(
        gw.addr,
        &format!("GET /find?q=rust&d%65bug=1&who=forged&key={key}&page=3 HTTP/1.1\r\nHost: t\r\nconnection: close\r\n\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // The API key is stripped, `debug` goes however it is spelled, `who` is the gateway's.
    assert_eq!(
        r.text(),
        "/find?search=rust&page=3&who=bob%20%28via%20gw%29"
    );
    let r = request(
        gw.addr,
        &format!("GET /find HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\nconnection: close\r\n\r\n"),
    );
    assert_eq!(r.text(), "/find?who=bob%20%28via%20gw%29&page=1");
}

/// An upstream that answers with the JSON body it received, and its content type.
fn json_echo() -> Upstream {
    Upstream::start(|r| {
        let body = String::from_utf8_lossy(&r.body).into_owned();
        answer(
            &format!(
                "content-type: {}\r\n",
                r.header("content-type").unwrap_or("text/plain")
            ),
            &body,
        )
    })
}

fn post(gw: &Gateway, path: &str, content_type: &str, body: &str) -> Response {
    request(
        gw.addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

#[test]
fn json_request_bodies_add_set_and_remove_nested_fields_within_a_bound() {
    let up = json_echo();
    let gw = gateway(
        &up,
        r#"[[routes]]
id = "orders"
match = { path_prefix = "/orders" }
upstream = "up"
request_json = { max_bytes = 256, remove = ["/internal", "/items/0/cost"], set = { "/meta/route" = "{route}", "/meta/client" = "{client_ip}", "/version" = 2 }, add = { "/meta/source" = "gateway", "/name" = "not added" } }
"#,
    );
    let r = post(
        &gw,
        "/orders",
        "application/json; charset=utf-8",
        r#"{"name":"n","internal":true,"items":[{"id":1,"cost":5}],"meta":{"source":"client"}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = &up.requests()[0];
    let sent: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(
        sent,
        serde_json::json!({"name": "n", "items": [{"id": 1}], "version": 2,
            "meta": {"source": "client", "route": "orders", "client": "127.0.0.1"}})
    );
    assert_eq!(
        seen.header("content-length"),
        Some(seen.body.len().to_string().as_str()),
        "the length is the rewritten body's"
    );
    // Over the bound: 413 before anything reaches the upstream.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(300));
    let r = post(&gw, "/orders", "application/json", &big);
    assert_eq!(r.status, 413, "{}", r.text());
    // Not JSON after all: 400.
    let r = post(&gw, "/orders", "application/json", "{not json");
    assert_eq!(r.status, 400, "{}", r.text());
    // A chunked JSON body cannot be rewritten before its length is known: 411.
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /orders HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nconnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 411);
    // Other media types, and encoded bodies, pass untouched.
    let r = post(&gw, "/orders", "text/plain", "{\"internal\":true}");
    assert_eq!(r.text(), "{\"internal\":true}");
    // An encoded JSON body cannot be rewritten, nor may it skip the rules: 415.
    let r = request(
        gw.addr,
        "POST /orders HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Encoding: br\r\nContent-Length: 4\r\nconnection: close\r\n\r\nzzzz",
    );
    assert_eq!(r.status, 415, "{}", r.text());
    assert_eq!(
        up.requests().len(),
        2,
        "only the first and the text body went upstream"
    );
    // Expect: 100-continue is honoured while the body is read whole.
    let mut c = Client::connect(gw.addr);
    let body = "{\"internal\":1}";
    c.send(format!("POST /orders HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\nconnection: close\r\n\r\n", body.len()).as_bytes());
    let interim = c.read_response(false).unwrap();
    assert_eq!(interim.status, 100);
    c.send(body.as_bytes());
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("internal"), "{}", r.text());
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn json_responses_are_rewritten_with_a_new_length_or_passed_untouched_and_counted() {
    let doc = r#"{"items":[{"id":1,"name":"a"},{"id":2,"name":"b"}],"secret":"s"}"#;
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2000));
    let (doc2, big2) = (doc.to_owned(), big.clone());
    let up = Upstream::start(move |r| {
        let json = "content-type: application/json\r\n";
        match r.target.as_str() {
            "/doc" => answer(json, &doc2),
            "/big" => answer(json, &big2),
            "/chunked" => Reply::Raw(
                format!(
                    "HTTP/1.1 200 OK\r\n{json}transfer-encoding: chunked\r\n\r\n{:x}\r\n{doc2}\r\n0\r\n\r\n",
                    doc2.len()
                )
                .into_bytes(),
            ),
            "/gzip" => {
                let body = gzip(doc2.as_bytes());
                let mut raw = format!(
                    "HTTP/1.1 200 OK\r\n{json}content-encoding: gzip\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                raw.extend_from_slice(&body);
                Reply::Raw(raw)
            }
            "/broken" => answer(json, "{\"cut"),
            "/events" => Reply::Raw(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\na\r\ndata: {}\n\n\r\n0\r\n\r\n".to_vec(),
            ),
            _ => answer("content-type: text/plain\r\n", "plain"),
        }
    });
    let rules = r#"remove = ["/secret", "/items/0/name"], set = { "/meta/route" = "{route}", "/meta/request_id" = "{request_id}" }, add = { "/items/-" = { id = 3 } }, max_bytes = 1024"#;
    let gw = gateway(
        &up,
        &format!(
            "[[routes]]\nid = \"json\"\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"up\"\nresponse_json = {{ {rules} }}\n\n\
             [[routes]]\nid = \"decoded\"\nmatch = {{ path_prefix = \"/decoded/\" }}\nupstream = \"up\"\nstrip_prefix = true\n\
             response_json = {{ {rules}, decompress = true }}\n"
        ),
    );
    let get = |path: &str, fields: &str| {
        request(
            gw.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\n{fields}connection: close\r\n\r\n"),
        )
    };
    let expect_on = |r: &Response, route: &str| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"items": [{"id": 1}, {"id": 2, "name": "b"}, {"id": 3}],
                "meta": {"route": route, "request_id": r.header("x-request-id").unwrap()}})
        );
        assert_eq!(
            r.header("content-length"),
            Some(r.body.len().to_string().as_str())
        );
        assert!(!r.chunked);
    };
    let expect = |r: &Response| expect_on(r, "json");
    let r = get("/doc", "");
    assert_eq!(r.status, 200);
    expect(&r);
    // A chunked upstream answer is read whole and sent with its length.
    expect(&get("/chunked", ""));
    // Over the bound: untouched, counted.
    let r = get("/big", "");
    assert_eq!(r.text(), big);
    // Encoded without `decompress`: untouched, counted; with it, decoded and rewritten.
    let r = get("/gzip", "");
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(r.body, gzip(doc.as_bytes()));
    let r = get("/decoded/gzip", "");
    assert_eq!(r.header("content-encoding"), None);
    expect_on(&r, "decoded");
    // Declared JSON but not: untouched, counted.
    assert_eq!(get("/broken", "").text(), "{\"cut");
    // Streams are never buffered; HEAD has no body to rewrite; other types pass.
    assert_eq!(get("/events", "").text(), "data: {}\n\n");
    assert_eq!(get("/other", "").text(), "plain");
    let h = request(
        gw.addr,
        "HEAD /doc HTTP/1.1\r\nHost: t\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(h.status, 200);
    // Keep-alive holds across a rewritten answer, and the upstream connection is reused.
    let mut c = Client::connect(gw.addr);
    for _ in 0..3 {
        c.send(b"GET /doc HTTP/1.1\r\nHost: t\r\n\r\n");
        expect(&c.read_response(false).unwrap());
    }
    for (reason, n) in [("too_large", 1), ("encoded", 1), ("not_json", 1)] {
        assert_eq!(
            metric_reaching(
                &gw,
                &format!(
                    "portcullis_json_transform_skipped_total{{route=\"json\",reason=\"{reason}\"}}"
                ),
                n
            ),
            n,
            "{reason}"
        );
    }
}

#[test]
fn cors_preflights_are_answered_at_the_edge_before_authentication() {
    let (key, hash) = mint("carol");
    let up = Upstream::start(|_| {
        answer(
            "content-type: text/plain\r\naccess-control-allow-origin: https://upstream-says.example\r\n",
            "ok",
        )
    });
    let gw = Gateway::start(&config_with(
        up.addr,
        "",
        &format!(
            r#"[[consumers]]
id = "carol"
api_keys = ["{hash}"]

[[routes]]
match = {{ path_prefix = "/api/", methods = ["PUT"] }}
upstream = "up"
auth = {{ methods = ["api_key"] }}
cors = {{ allow_origins = ["https://app.example.com", "https://*.partner.example"], allow_methods = ["GET", "PUT"], allow_headers = ["Content-Type", "X-API-Key"], expose_headers = ["X-Request-Id"], credentials = true, max_age = "10m" }}

[[routes]]
match = {{ path_prefix = "/api/" }}
upstream = "up"
cors = {{ allow_origins = ["*"] }}
"#
        ),
    ));
    let preflight = |origin: &str, method: &str, fields: &str| {
        request(
            gw.addr,
            &format!("OPTIONS /api/x HTTP/1.1\r\nHost: t\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: {method}\r\nAccess-Control-Request-Headers: {fields}\r\nconnection: close\r\n\r\n"),
        )
    };
    // Matched to the PUT route by the method asked for (the route's methods do not list
    // OPTIONS), answered without credentials and without the upstream.
    let r = preflight("https://app.example.com", "PUT", "content-type, x-api-key");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(r.header("access-control-allow-methods"), Some("GET, PUT"));
    assert_eq!(r.header("access-control-max-age"), Some("600"));
    assert!(r.header("vary").unwrap().contains("origin"));
    let r = preflight("https://eu.partner.example", "PUT", "");
    assert_eq!(r.status, 204);
    // Disallowed origin, method or field: 403 with no CORS fields.
    for (origin, method, fields) in [
        ("https://evil.example", "PUT", ""),
        ("https://app.example.com.evil.example", "PUT", ""),
        ("https://app.example.com", "PUT", "x-secret"),
    ] {
        let r = preflight(origin, method, fields);
        assert_eq!(r.status, 403, "{origin} {method} {fields}");
        assert_eq!(r.header("access-control-allow-origin"), None);
        assert_eq!(r.header("vary"), Some("origin"));
    }
    // GET is another route here: `*`, no credentials.
    let r = preflight("https://anyone.example", "GET", "");
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("access-control-allow-credentials"), None);
    assert!(
        up.requests().is_empty(),
        "no preflight reached the upstream"
    );

    // Simple (actual) requests: an allowed origin gets the fields (the upstream's own CORS
    // fields are replaced), a disallowed one only Vary; a refusal carries them too.
    let put = |origin: &str, key: &str| {
        request(
            gw.addr,
            &format!("PUT /api/x HTTP/1.1\r\nHost: t\r\nOrigin: {origin}\r\nX-API-Key: {key}\r\nContent-Length: 0\r\nconnection: close\r\n\r\n"),
        )
    };
    let r = put("https://app.example.com", &key);
    assert_eq!(r.status, 200);
    let allow: Vec<&str> = r
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("access-control-allow-origin"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(allow, ["https://app.example.com"]);
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("X-Request-Id")
    );
    assert_eq!(r.header("vary"), Some("origin"));
    let r = put("https://evil.example", &key);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert_eq!(r.header("vary"), Some("origin"));
    let r = put("https://app.example.com", "wrong");
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com"),
        "a browser can read the refusal"
    );
    // An OPTIONS without Access-Control-Request-Method is an ordinary request.
    let r = request(
        gw.addr,
        "OPTIONS /api/x HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example.com\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Runs headless Chromium on `url`; returns the DOM after its scripts ran.
fn chromium_dom(url: &str) -> Option<String> {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=8000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn cors_in_a_real_browser() {
    if std::process::Command::new("chromium")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var_os("CI").is_some() || unsafe_is_root() {
            panic!("chromium is missing: `cargo xtask test` installs Debian's chromium package");
        }
        eprintln!("SKIPPED LOUDLY: chromium is not installed; `cargo xtask test` installs it");
        return;
    }
    let port = free_port();
    let up = Upstream::start(|r| {
        answer(
            "content-type: text/plain\r\nx-exposed: yes\r\nx-hidden: no\r\n",
            &format!("{} {}", r.method, r.header("x-trace").unwrap_or("-")),
        )
    });
    // The page is served from 127.0.0.1; it calls the API at localhost, another origin.
    let page = format!(
        r#"<!doctype html><html><body><pre id="out">pending</pre><script>
const api = 'http://localhost:{port}';
const call = (path, name) => fetch(api + path, {{method: 'PUT', headers: {{'x-trace': 't1', 'content-type': 'application/json'}}, body: '{{}}', credentials: 'include'}})
  .then(r => r.text().then(t => name + '=' + r.status + ',' + r.headers.get('x-exposed') + ',' + r.headers.get('x-hidden') + ',' + t))
  .catch(() => name + '=blocked');
Promise.all([call('/allowed/x', 'allowed'), call('/denied/x', 'denied')])
  .then(rs => {{ document.getElementById('out').textContent = rs.join(' '); }});
</script></body></html>"#
    );
    let page_toml = toml::Value::String(page).to_string();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\nworkers = 1\n\n[upstreams.up]\nservers = [\"{}\"]\n\n\
         [[routes]]\nmatch = {{ path = \"/page\" }}\nrespond = {{ status = 200, headers = {{ \"content-type\" = \"text/html\" }}, body = {page_toml} }}\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/allowed/\" }}\nupstream = \"up\"\n\
         cors = {{ allow_origins = [\"http://127.0.0.1:{port}\"], allow_methods = [\"PUT\"], allow_headers = [\"x-trace\", \"content-type\"], expose_headers = [\"x-exposed\"], credentials = true }}\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/denied/\" }}\nupstream = \"up\"\n\
         cors = {{ allow_origins = [\"https://somewhere-else.example\"], allow_methods = [\"PUT\"], allow_headers = [\"x-trace\", \"content-type\"] }}\n",
        up.addr
    );
    let _gw = Gateway::start(&config);
    let dom = chromium_dom(&format!("http://127.0.0.1:{port}/page")).expect("chromium ran");
    assert!(
        dom.contains("allowed=200,yes,null,PUT t1"),
        "the browser made the preflight and the PUT, and let the script read the exposed field only:\n{dom}"
    );
    assert!(
        dom.contains("denied=blocked"),
        "the browser refused the disallowed origin:\n{dom}"
    );
    let seen = up.requests();
    assert_eq!(
        seen.iter().filter(|r| r.method == "OPTIONS").count(),
        0,
        "preflights were answered by the gateway"
    );
    assert_eq!(
        seen.iter().filter(|r| r.target == "/allowed/x").count(),
        1,
        "the allowed PUT reached the upstream once"
    );
    assert!(
        !seen.iter().any(|r| r.target == "/denied/x"),
        "the refused preflight kept the PUT from being sent"
    );
}

/// Root runs the CI: there a missing browser is a failure, not a skip.
fn unsafe_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn gateway_answers_in_json_where_configured() {
    let up = Upstream::echo_target();
    let gw = Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\nerror_format = \"json\"\n\n\
         [upstreams.up]\nservers = [\"{}\"]\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/keyed/\" }}\nupstream = \"up\"\nauth = {{ methods = [\"api_key\"] }}\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/limited/\" }}\nupstream = \"up\"\nlimits = [{{ key = \"client\", rate = 1, per = \"1h\" }}]\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/text/\" }}\nupstream = \"up\"\nerror_format = \"text\"\nmax_body_bytes = 1\n",
        up.addr
    ));
    let get = |path: &str| {
        request(
            gw.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\nconnection: close\r\n\r\n"),
        )
    };
    let json = |r: &Response| -> serde_json::Value {
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{}",
            r.text()
        );
        serde_json::from_slice(&r.body).unwrap()
    };
    // Before a route is known: `[server] error_format`.
    let r = get("/nowhere");
    let v = json(&r);
    assert_eq!(
        (v["status"].as_u64(), v["code"].as_str()),
        (Some(404), Some("not_found"))
    );
    assert_eq!(v["message"], "no route matches this request");
    assert_eq!(v["request_id"].as_str(), r.header("x-request-id"));
    let v = json(&get("/keyed/x"));
    assert_eq!(
        (v["status"].as_u64(), v["code"].as_str()),
        (Some(401), Some("unauthorized"))
    );
    assert!(get("/limited/x").status == 200);
    let v = json(&get("/limited/x"));
    assert_eq!(v["code"], "too_many_requests");
    // A route may keep plain text.
    let r = request(
        gw.addr,
        "POST /text/x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nconnection: close\r\n\r\nhello",
    );
    assert_eq!(r.status, 413);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    // An unparseable request gets JSON too.
    let r = request(gw.addr, "GET / HTTP/1.1\r\nHost: t\r\nBad Field: x\r\n\r\n");
    assert_eq!(json(&r)["status"], 400);
}

#[test]
fn review_fixes_rules_see_the_request_after_its_body_and_values_stay_in_their_place() {
    let (key, hash) = mint("dora");
    let up = Upstream::start(|r| {
        let body = if r.target.starts_with("/json") {
            "{\"a\":1}".to_owned()
        } else {
            r.target.clone()
        };
        answer(
            "content-type: application/json\r\nserver: upstream/1.0\r\naccess-control-allow-origin: *\r\ncache-control: max-age=60\r\n",
            &body,
        )
    });
    let gw = gateway(
        &up,
        &format!(
            r#"[[consumers]]
id = "dora"
api_keys = ["{hash}"]

[[routes]]
id = "json"
match = {{ path_prefix = "/json" }}
upstream = "up"
response_json = {{ set = {{ "/tag" = "{{header.x-tag}}" }} }}
response_headers = {{ set = {{ "x-seen" = "{{method}} {{header.x-tag}}" }} }}

[[routes]]
id = "tenant"
match = {{ path_prefix = "/t/" }}
upstream = "up"
rewrite = "/tenants/{{header.x-tenant}}/data"

[[routes]]
id = "cached"
match = {{ path_prefix = "/c/" }}
upstream = "up"
cache = {{}}
response_headers = {{ remove = ["server"], set = {{ "x-rid" = "{{request_id}}" }} }}
cors = {{ allow_origins = ["https://app.example.com"] }}

[[routes]]
id = "ident"
match = {{ path_prefix = "/i/" }}
upstream = "up"
auth = {{ methods = ["api_key"] }}
request_headers = {{ set = {{ "x-user-id" = "{{consumer}}" }}, add = {{ "x-source" = "gateway" }} }}
"#
        ),
    );
    // A body that arrives after the head (here after 100 Continue): the response rules still
    // see the request, and the JSON response is rewritten.
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /json HTTP/1.1\r\nHost: t\r\nX-Tag: late\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 100);
    std::thread::sleep(std::time::Duration::from_millis(50));
    c.send(b"hello");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-seen"), Some("POST late"));
    assert_eq!(r.text(), "{\"a\":1,\"tag\":\"late\"}");
    // A field value in a path rewrite must be one plain segment.
    let tenant = |value: &str| {
        request(
            gw.addr,
            &format!(
                "GET /t/x HTTP/1.1\r\nHost: t\r\nX-Tenant: {value}\r\nconnection: close\r\n\r\n"
            ),
        )
    };
    assert_eq!(tenant("acme").text(), "/tenants/acme/data");
    for bad in ["%2e%2e", "..", "a/../../admin", "..;x", "a%2Fb"] {
        assert_eq!(tenant(bad).status, 400, "{bad}");
    }
    // Cache hits get the route's response rules and CORS as misses do.
    let get = |origin: &str| {
        request(
            gw.addr,
            &format!(
                "GET /c/a HTTP/1.1\r\nHost: t\r\nOrigin: {origin}\r\nconnection: close\r\n\r\n"
            ),
        )
    };
    for (round, origin) in [
        ("miss", "https://app.example.com"),
        ("hit", "https://app.example.com"),
        ("hit, other origin", "https://evil.example"),
    ] {
        let r = get(origin);
        assert_eq!(r.header("server"), None, "{round}");
        assert_eq!(r.header("x-rid"), r.header("x-request-id"), "{round}");
        let allow: Vec<&str> = r
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("access-control-allow-origin"))
            .map(|(_, v)| v.as_str())
            .collect();
        let want: &[&str] = if origin == "https://evil.example" {
            &[]
        } else {
            &["https://app.example.com"]
        };
        assert_eq!(allow, want, "{round}");
    }
    assert_eq!(
        up.requests().iter().filter(|r| r.target == "/c/a").count(),
        1
    );
    // Rules compare names as CGI does, and `add` sees only what is forwarded.
    let r = request(
        gw.addr,
        &format!("GET /i/x HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\nX_User_Id: forged\r\nX-Source: x\r\nConnection: x-source\r\nconnection: close\r\n\r\n"),
    );
    assert_eq!(r.status, 200);
    let seen = up
        .requests()
        .into_iter()
        .find(|r| r.target == "/i/x")
        .unwrap();
    assert_eq!(seen.headers_named("x-user-id"), ["dora"]);
    assert_eq!(seen.header("x_user_id"), None);
    assert_eq!(seen.headers_named("x-source"), ["gateway"]);
    // A JSON rule's value that is not a valid template is refused, not sent as text.
    let (ok, text) = check_config(
        "[upstreams.up]\nservers = [\"127.0.0.1:9\"]\n\n[[routes]]\nupstream = \"up\"\nresponse_json = { set = { \"/a\" = \"{consumr}\" } }\n",
    );
    assert!(!ok && text.contains("unknown variable"), "{text}");
}
