//! Access-policy bypass attempts: `/admin/` needs an API key, `/` is open, each to its own real
//! upstream. Every obfuscation of the path must either be refused with 400, or land on the
//! route its normal form names, with the upstream of that route receiving exactly the normal
//! form: the upstream serves what the policy allowed, whatever it does with the raw target.

mod support;

use support::*;

/// Where a request must end up.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// 400, and no upstream sees anything.
    Refused,
    /// The protected route: 401 without a key; with one, its upstream receives this target.
    Admin(&'static str),
    /// The open route: 200, its upstream receives this target.
    Open(&'static str),
}

use Outcome::*;

const CASES: &[(&str, Outcome)] = &[
    // The reported bypasses.
    ("//admin/secret", Admin("/admin/secret")),
    ("/x/../admin/secret", Admin("/admin/secret")),
    ("/./admin/secret", Admin("/admin/secret")),
    ("/%61dmin/secret", Admin("/admin/secret")),
    ("/admin%2Fsecret", Refused),
    // Dot-segments, plain and encoded in any case.
    ("/x/y/../../admin/secret", Admin("/admin/secret")),
    ("/x/%2e%2e/admin/secret", Admin("/admin/secret")),
    ("/x/%2E%2E/admin/secret", Admin("/admin/secret")),
    ("/x/%2e%2E/admin/secret", Admin("/admin/secret")),
    ("/x/.%2e/admin/secret", Admin("/admin/secret")),
    ("/%2e/admin/secret", Admin("/admin/secret")),
    ("/admin/./secret/.", Admin("/admin/secret/")),
    ("/admin/secret/..", Admin("/admin/")),
    ("/x;/../admin/secret", Admin("/admin/secret")),
    ("/..", Refused),
    ("/../admin/secret", Refused),
    ("/admin/../../admin/secret", Refused),
    ("/%2e%2e/admin/secret", Refused),
    // Every letter encoded, in both cases of hex digit.
    ("/%61%64%6D%69%6E/secret", Admin("/admin/secret")),
    ("/%61%64%6d%69%6e/%73ecret", Admin("/admin/secret")),
    // Escapes of reserved characters keep their escape, upper-cased.
    ("/admin/a%2ab", Admin("/admin/a%2Ab")),
    // Double encoding is decoded once only: never a dot-segment, never the admin route.
    ("/%252e%252e/admin/secret", Open("/%252e%252e/admin/secret")),
    ("/x/%252e%252e/admin", Open("/x/%252e%252e/admin")),
    ("/%2561dmin/secret", Open("/%2561dmin/secret")),
    // Slashes: repeated, encoded, backslashes raw and encoded, mixed.
    ("///admin///secret", Admin("/admin/secret")),
    ("/admin%2fsecret", Refused),
    ("/x/..%2Fadmin/secret", Refused),
    ("/x\\..\\admin/secret", Refused),
    ("/x/..\\admin/secret", Refused),
    ("/x%5c..%5cadmin/secret", Refused),
    ("/admin%5Csecret", Refused),
    // Path parameters on dot-segments (the `..;/` of Tomcat behind a proxy).
    ("/x/..;/admin/secret", Refused),
    ("/x/..;jsessionid=1/admin/secret", Refused),
    ("/admin/.;/secret", Refused),
    ("/x/%2e%2e;/admin/secret", Refused),
    // Overlong UTF-8 and other invalid sequences.
    ("/%C0%AE%C0%AE/admin/secret", Refused),
    ("/x/%C0%AE%C0%AE/admin", Refused),
    ("/x/%E0%80%AE%E0%80%AE/admin", Refused),
    ("/%C0%AFadmin/secret", Refused),
    ("/admin/%FF", Refused),
    // Encoded controls and ill-formed escapes.
    ("/admin%00/secret", Refused),
    ("/admin/secret%00.json", Refused),
    ("/admin/secret%0d%0aX-Injected:%20yes", Refused),
    ("/admin/%zz", Refused),
    ("/admin/%2", Refused),
    ("/admin/secret#fragment", Refused),
    // Valid UTF-8 stays encoded; the query is forwarded untouched.
    ("/admin/caf%c3%a9", Admin("/admin/caf%C3%A9")),
    (
        "/admin/secret?next=/../x&y=%2F",
        Admin("/admin/secret?next=/../x&y=%2F"),
    ),
    ("/x/../public?a=%2e%2e", Open("/public?a=%2e%2e")),
    // Case: paths are case-sensitive (RFC 3986), so /ADMIN/ is another resource.
    ("/ADMIN/secret", Open("/ADMIN/secret")),
    // The case-insensitive route matches any case, after decoding.
    ("/Files/report", Admin("/Files/report")),
    ("/FILES/report", Admin("/FILES/report")),
    ("/%66iles/report", Admin("/files/report")),
    // Absolute-form targets carry the same tricks.
    ("http://a//admin/secret", Admin("/admin/secret")),
    ("http://a/x/../admin/secret", Admin("/admin/secret")),
    ("http://a/%61dmin/secret", Admin("/admin/secret")),
    ("http://a/x/%2E%2E/admin/secret", Admin("/admin/secret")),
    ("http://a/admin%2Fsecret", Refused),
    ("http://a/x/..;/admin/secret", Refused),
    ("http://a/%C0%AE%C0%AE/admin", Refused),
    ("HTTP://A/./admin/secret", Admin("/admin/secret")),
];

struct Fixture {
    gw: Gateway,
    admin: Upstream,
    open: Upstream,
    key: String,
}

fn fixture(server_extra: &str) -> Fixture {
    let admin = Upstream::echo_target();
    let open = Upstream::echo_target();
    let (key, hash) = mint("ops");
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n{server_extra}\n\
         [upstreams.admin]\nservers = [\"{}\"]\n[upstreams.open]\nservers = [\"{}\"]\n\
         [[consumers]]\nid = \"ops\"\napi_keys = [\"{hash}\"]\n\
         [[routes]]\nmatch = {{ path_prefix = \"/admin/\" }}\nupstream = \"admin\"\nauth = {{ methods = [\"api_key\"] }}\n\
         [[routes]]\nmatch = {{ path_prefix = \"/files/\" }}\ncase_insensitive = true\nupstream = \"admin\"\nauth = {{ methods = [\"api_key\"] }}\n\
         [[routes]]\nmatch = {{ path_prefix = \"/\" }}\nupstream = \"open\"\n",
        admin.addr, open.addr
    );
    Fixture {
        gw: Gateway::start(&config),
        admin,
        open,
        key,
    }
}

fn send(gw: &Gateway, target: &str, key: Option<&str>) -> Response {
    let key = key
        .map(|k| format!("X-API-Key: {k}\r\n"))
        .unwrap_or_default();
    let mut c = Client::connect(gw.addr);
    c.send(format!("GET {target} HTTP/1.1\r\nHost: a\r\n{key}\r\n").as_bytes());
    c.read_response(false).expect("a response")
}

/// Runs every case; returns the failures, so one run reports them all.
fn check(f: &Fixture, cases: &[(&str, Outcome)]) -> Vec<String> {
    let mut failures = Vec::new();
    for (target, want) in cases {
        let (admin_before, open_before) = (f.admin.requests().len(), f.open.requests().len());
        let anonymous = send(&f.gw, target, None);
        let keyed = send(&f.gw, target, Some(&f.key));
        let admin_seen: Vec<String> = f.admin.requests()[admin_before..]
            .iter()
            .map(|r| r.target.clone())
            .collect();
        let open_seen: Vec<String> = f.open.requests()[open_before..]
            .iter()
            .map(|r| r.target.clone())
            .collect();
        let got = (anonymous.status, keyed.status, admin_seen, open_seen);
        let expected = match want {
            Refused => (400, 400, vec![], vec![]),
            Admin(path) => (401, 200, vec![path.to_string()], vec![]),
            Open(path) => (200, 200, vec![], vec![path.to_string(), path.to_string()]),
        };
        if got != expected {
            failures.push(format!(
                "{target}: want {want:?} = {expected:?}, got {got:?}"
            ));
        }
    }
    failures
}

#[test]
fn no_obfuscation_reaches_past_the_policy() {
    let f = fixture("");
    let failures = check(&f, CASES);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Raw bytes above 0x7F are refused too (not expressible in a &str target above).
    let mut c = Client::connect(f.gw.addr);
    c.send(b"GET /admin/caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 400);
}

#[test]
fn server_options_change_slashes_only() {
    // `encoded_slash = "keep"`: %2F is forwarded untouched and never separates segments, so it
    // cannot reach the admin route's prefix either.
    let f = fixture("encoded_slash = \"keep\"\n");
    let failures = check(
        &f,
        &[
            ("/admin%2Fsecret", Open("/admin%2Fsecret")),
            ("/admin%2fsecret", Open("/admin%2Fsecret")),
            ("/admin/a%2Fb", Admin("/admin/a%2Fb")),
            ("/x%2F../admin/secret", Open("/x%2F../admin/secret")),
            ("/admin%5Csecret", Refused),
        ],
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // `merge_slashes = false`: `//admin` is a different path from `/admin`, kept as sent.
    let f = fixture("merge_slashes = false\n");
    let failures = check(
        &f,
        &[
            ("//admin/secret", Open("//admin/secret")),
            ("/admin//secret", Admin("/admin//secret")),
            ("/x/..//admin/secret", Open("//admin/secret")),
        ],
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn routes_that_are_not_normal_are_config_errors() {
    for (path, hint) in [
        ("/a/../b", "write it as `/b`"),
        ("//x", "write it as `/x`"),
        ("/%7euser", "write it as `/~user`"),
        ("/a%2Fb", "requests with it are refused"),
    ] {
        let src = format!(
            "[upstreams.u]\nservers = [\"127.0.0.1:9\"]\n[[routes]]\nmatch = {{ path_prefix = \"{path}\" }}\nupstream = \"u\"\n"
        );
        let e = portcullis::config::Config::parse(std::path::Path::new("gw.toml"), &src)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("gw.toml:4: `routes[0].match.path_prefix`")
                && e.contains("is not a normalised path")
                && e.contains(hint),
            "{path}: {e}"
        );
    }
}
