//! TLS termination for real: certificates made by openssl, clients curl and `openssl
//! s_client`: SNI (exact, wildcard, default), versions refused and accepted, ALPN (an `h2`-only
//! client is refused), X-Forwarded-Proto, session resumption, the handshake timeout, and a bad
//! certificate refused on reload while the old one keeps serving.

mod support;

use std::{
    io::Write,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use support::{
    pki::{run, Pki},
    *,
};

fn config(pki: &Pki, upstream: std::net::SocketAddr, extra: &str) -> String {
    let p = |f: &str| pki.path(f).display().to_string();
    format!(
        "[server]\nlisten = [{{ address = \"127.0.0.1:0\", tls = \"public\" }}]\nworkers = 2\n\n\
         [tls.public]\nhandshake_timeout = \"500ms\"\n{extra}\n\
         certificates = [\n\
           {{ cert = \"{}\", key = \"{}\", names = [\"a.test\"] }},\n\
           {{ cert = \"{}\", key = \"{}\", names = [\"*.b.test\"] }},\n\
           {{ cert = \"{}\", key = \"{}\", default = true }},\n]\n\n\
         [upstreams.up]\nservers = [\"{upstream}\"]\n\n\
         [[routes]]\nmatch = {{ path = \"/hello\" }}\nrespond = {{ status = 200, body = \"hello over tls\" }}\n\n\
         [[routes]]\nupstream = \"up\"\n",
        p("a.pem"), p("a.key"), p("b.pem"), p("b.key"), p("default.pem"), p("default.key")
    )
}

fn pki() -> Pki {
    let pki = Pki::new();
    pki.issue("a", &["a.test"], "ec");
    pki.issue("b", &["*.b.test"], "rsa");
    pki.issue("default", &["default.test"], "ed25519");
    pki
}

/// curl to `https://NAME:PORT/path` resolved to the gateway, verifying against the test CA.
fn curl(gw: &Gateway, pki: &Pki, name: &str, path: &str) -> Output {
    run(Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(pki.path("ca.pem"))
        .arg("--resolve")
        .arg(format!("{name}:{}:127.0.0.1", gw.addr.port()))
        .arg(format!("https://{name}:{}{path}", gw.addr.port())))
}

/// `openssl s_client` with `args`, stdin closed at once; its combined output.
fn s_client(gw: &Gateway, args: &[&str]) -> (bool, String) {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &gw.addr.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"").unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn sni_picks_exact_wildcard_and_default_certificates() {
    let pki = pki();
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(&pki, up.addr, ""));
    for name in ["a.test", "x.b.test"] {
        let out = curl(&gw, &pki, name, "/hello");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello over tls");
    }
    // A name no certificate lists gets the default one (so curl, checking the name, refuses).
    let out = curl(&gw, &pki, "c.test", "/hello");
    assert!(!out.status.success());
    let (_, text) = s_client(&gw, &["-servername", "c.test"]);
    assert!(
        text.contains("CN=default.test") || text.contains("CN = default.test"),
        "{text}"
    );
    // Forwarded requests say they came over https.
    let out = curl(&gw, &pki, "a.test", "/api");
    assert!(out.status.success());
    assert_eq!(up.requests()[0].header("x-forwarded-proto"), Some("https"));
}

#[test]
fn old_protocols_are_refused_and_alpn_is_http11_only() {
    let pki = pki();
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(&pki, up.addr, ""));
    let (ok12, text) = s_client(&gw, &["-servername", "a.test", "-tls1_2"]);
    assert!(ok12 && text.contains("TLSv1.2"), "{text}");
    let (ok13, text) = s_client(&gw, &["-servername", "a.test", "-tls1_3"]);
    assert!(ok13 && text.contains("TLSv1.3"), "{text}");
    // SECLEVEL=0 so this client really offers TLS 1.1: the refusal is the server's.
    let (ok11, text) = s_client(
        &gw,
        &[
            "-servername",
            "a.test",
            "-tls1_1",
            "-cipher",
            "DEFAULT@SECLEVEL=0",
        ],
    );
    // An alert from the server, not a client that never offered it.
    assert!(
        !ok11 && text.contains("SSL alert number"),
        "TLS 1.1 not refused by the server: {text}"
    );
    let (_, text) = s_client(&gw, &["-servername", "a.test", "-alpn", "http/1.1"]);
    assert!(text.contains("ALPN protocol: http/1.1"), "{text}");
    let (ok, text) = s_client(&gw, &["-servername", "a.test", "-alpn", "h2"]);
    assert!(
        !ok && text
            .to_ascii_lowercase()
            .contains("no application protocol"),
        "an h2-only client gets no_application_protocol: {text}"
    );
}

#[test]
fn sessions_resume_with_tickets() {
    let pki = pki();
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(&pki, up.addr, ""));
    let session = pki.path("session.pem");
    let s = session.display().to_string();
    let (ok, text) = s_client(&gw, &["-servername", "a.test", "-tls1_2", "-sess_out", &s]);
    assert!(ok, "{text}");
    let (ok, text) = s_client(&gw, &["-servername", "a.test", "-tls1_2", "-sess_in", &s]);
    assert!(ok && text.contains("Reused, TLSv1.2"), "{text}");
}

#[test]
fn a_slow_handshake_is_cut_off() {
    let pki = pki();
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(&pki, up.addr, ""));
    let mut c = Client::connect(gw.addr);
    let started = Instant::now();
    // Nothing sent: the gateway closes once handshake_timeout (500 ms) passes.
    assert!(c.is_closed());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_bad_certificate_is_refused_on_reload_and_the_old_one_keeps_serving() {
    let pki = pki();
    let up = Upstream::echo_target();
    let cfg = config(&pki, up.addr, "");
    let gw = Gateway::start(&cfg);
    assert!(curl(&gw, &pki, "a.test", "/hello").status.success());
    // A new chain that is not PEM.
    let broken = pki.path("broken.pem");
    std::fs::write(&broken, "not a certificate\n").unwrap();
    let (ok, out) = gw.reload_with(&cfg.replace(
        &pki.path("a.pem").display().to_string(),
        &broken.display().to_string(),
    ));
    assert!(!ok, "{out}");
    assert!(
        out.contains("tls.public") && out.contains("broken.pem"),
        "{out}"
    );
    for _ in 0..4 {
        let r = curl(&gw, &pki, "a.test", "/hello");
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    // A good new certificate is taken by reload.
    pki.issue("a2", &["a.test"], "rsa");
    let (ok, out) = gw.reload_with(&cfg.replace("a.pem", "a2.pem").replace("a.key", "a2.key"));
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, text) = s_client(&gw, &["-servername", "a.test"]);
        if text.contains("rsaEncryption") || text.contains("RSA") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still the old certificate: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn hsts_on_tls_answers_and_a_plain_listener_that_redirects() {
    let pki = pki();
    let up = Upstream::start(|_| {
        Reply::Raw(b"HTTP/1.1 200 OK\r\nstrict-transport-security: max-age=1\r\ncontent-length: 2\r\n\r\nup".to_vec())
    });
    let cfg = config(
        &pki,
        up.addr,
        "hsts = \"max-age=31536000; includeSubDomains\"\n",
    );
    let gw = Gateway::start(&cfg);
    let head = |path: &str| {
        let out = run(Command::new("curl")
            .args([
                "-sS",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                "--cacert",
            ])
            .arg(pki.path("ca.pem"))
            .arg("--resolve")
            .arg(format!("a.test:{}:127.0.0.1", gw.addr.port()))
            .arg(format!("https://a.test:{}{path}", gw.addr.port())));
        String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
    };
    for path in ["/hello", "/nowhere-upstream"] {
        let h = head(path);
        assert_eq!(
            h.matches("strict-transport-security: max-age=31536000; includesubdomains")
                .count(),
            1,
            "{path}: one, the gateway's: {h}"
        );
    }

    // A plain listener that only redirects.
    let redirect = Gateway::start(
        "[server]\nlisten = [{ address = \"127.0.0.1:0\", redirect_https = 8443 }]\n\n[[routes]]\nrespond = { status = 200, body = \"never\" }\n",
    );
    let r = request(
        redirect.addr,
        "GET /a/../b/c?x=1 HTTP/1.1\r\nHost: Shop.Example\r\n\r\n",
    );
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some("https://shop.example:8443/b/c?x=1")
    );
    let r = request(redirect.addr, "GET / HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 400, "no Host, no redirect");
}

#[test]
fn renewed_certificate_files_are_picked_up_without_a_reload() {
    let pki = pki();
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(&pki, up.addr, ""));
    let (_, before) = s_client(&gw, &["-servername", "a.test"]);
    assert!(before.contains("ECDSA"), "{before}");
    // An ACME client would write new files in place: an RSA certificate for the same name.
    pki.issue("renewed", &["a.test"], "rsa");
    std::fs::copy(pki.path("renewed.key"), pki.path("a.key")).unwrap();
    std::fs::copy(pki.path("renewed.pem"), pki.path("a.pem")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, text) = s_client(&gw, &["-servername", "a.test"]);
        if text.contains("RSA") && !text.contains("ECDSA") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still the old certificate:\n{text}\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        gw.log().contains("certificate or key files changed"),
        "{}",
        gw.log()
    );
    assert!(curl(&gw, &pki, "a.test", "/hello").status.success());
}

/// testssl.sh (Debian's package) against the TLS listener: protocols, cipher categories and
/// forward secrecy only, bounded to 3 minutes; no weak protocol or suite may be offered.
#[test]
fn testssl_finds_no_weak_protocol_or_suite() {
    let pki = pki();
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(&pki, up.addr, ""));
    let report = pki.path("testssl.json");
    let out = run(Command::new("timeout")
        .args([
            "180",
            "testssl",
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
        ])
        .args(["--protocols", "--std", "--fs", "--sneaky"])
        .arg("--jsonfile")
        .arg(&report)
        .arg(format!("127.0.0.1:{}", gw.addr.port())));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let findings: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&report).unwrap_or_else(|_| panic!("no testssl report: {text}")),
    )
    .unwrap();
    let findings = findings
        .as_array()
        .expect("testssl writes a list of findings");
    let by_id = |id: &str| {
        findings
            .iter()
            .find(|f| f["id"] == id)
            .and_then(|f| f["finding"].as_str())
            .unwrap_or_else(|| panic!("no {id} in the report:\n{text}"))
            .to_owned()
    };
    for old in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert!(
            by_id(old).starts_with("not offered"),
            "{old}: {}",
            by_id(old)
        );
    }
    assert!(
        by_id("TLS1_2").starts_with("offered"),
        "{}",
        by_id("TLS1_2")
    );
    assert!(
        by_id("TLS1_3").starts_with("offered"),
        "{}",
        by_id("TLS1_3")
    );
    // Weak cipher categories: NULL, anonymous, export, LOW (DES, RC4), 3DES and IDEA.
    for weak in [
        "cipherlist_NULL",
        "cipherlist_aNULL",
        "cipherlist_EXPORT",
        "cipherlist_LOW",
        "cipherlist_3DES_IDEA",
    ] {
        assert!(
            by_id(weak).starts_with("not offered"),
            "{weak}: {}",
            by_id(weak)
        );
    }
    let bad: Vec<&serde_json::Value> = findings
        .iter()
        .filter(|f| matches!(f["severity"].as_str(), Some("HIGH" | "CRITICAL")))
        .collect();
    assert!(bad.is_empty(), "testssl found: {bad:?}");
    eprintln!(
        "testssl: {}",
        findings
            .iter()
            .filter(|f| f["id"]
                .as_str()
                .is_some_and(|i| i.starts_with("TLS") || i.starts_with("SSL") || i == "FS"))
            .map(|f| format!(
                "{}={}",
                f["id"].as_str().unwrap_or(""),
                f["finding"].as_str().unwrap_or("")
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
}

#[test]
fn a_tls_listener_behind_a_balancer_reads_the_proxy_header_first() {
    let pki = pki();
    let up = Upstream::echo_target();
    let cfg = config(&pki, up.addr, "")
        .replace(
            "tls = \"public\" }",
            "tls = \"public\", proxy_protocol = true }",
        )
        .replace(
            "workers = 2\n",
            "workers = 2\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
        );
    let gw = Gateway::start(&cfg);
    let with_header = run(Command::new("curl")
        .args(["-sS", "--max-time", "5", "--haproxy-protocol", "--cacert"])
        .arg(pki.path("ca.pem"))
        .arg("--resolve")
        .arg(format!("a.test:{}:127.0.0.1", gw.addr.port()))
        .arg(format!("https://a.test:{}/api", gw.addr.port())));
    assert!(
        with_header.status.success(),
        "{}",
        String::from_utf8_lossy(&with_header.stderr)
    );
    assert_eq!(up.requests()[0].header("x-forwarded-proto"), Some("https"));
    // A trusted source that starts the handshake without the header is closed.
    assert!(!curl(&gw, &pki, "a.test", "/api").status.success());
}

#[test]
fn large_bodies_cross_tls_intact_both_ways() {
    let pki = pki();
    // Uploads are counted by the upstream; the download is a 4 MiB body from it.
    let big: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let body = big.clone();
    let up = Upstream::start(move |r| {
        if r.target == "/download" {
            let mut reply =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
            reply.extend_from_slice(&body);
            Reply::Raw(reply)
        } else {
            Reply::Raw(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
        }
    });
    let gw = Gateway::start(&config(&pki, up.addr, ""));
    let file = pki.path("upload.bin");
    std::fs::write(&file, &big).unwrap();
    let curl_to = |path: &str, extra: &[&str]| {
        run(Command::new("curl")
            .args(["-sS", "--max-time", "30", "--cacert"])
            .arg(pki.path("ca.pem"))
            .arg("--resolve")
            .arg(format!("a.test:{}:127.0.0.1", gw.addr.port()))
            .args(extra)
            .arg(format!("https://a.test:{}{path}", gw.addr.port())))
    };
    let out = curl_to(
        "/upload",
        &["--data-binary", &format!("@{}", file.display())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        up.body_bytes.load(std::sync::atomic::Ordering::SeqCst),
        big.len()
    );
    let out = curl_to("/download", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == big,
        "the download came back altered ({} bytes)",
        out.stdout.len()
    );
}

/// Python's `ssl` module as the client: what it negotiates when it allows TLS 1.2 only, 1.3
/// only, and 1.1 at most (refused).
#[test]
fn python_ssl_clients_negotiate_tls12_and_tls13_and_are_refused_tls11() {
    let pki = pki();
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(&pki, up.addr, ""));
    let script = r#"
import socket, ssl, sys
port, ca, version = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
v = {"1.1": ssl.TLSVersion.TLSv1_1, "1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[version]
if version == "1.1":
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")
else:
    ctx.minimum_version = v
ctx.maximum_version = v
ctx.set_alpn_protocols(["http/1.1"])
try:
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="a.test")
except ssl.SSLError as e:
    print("refused", e.reason)
    sys.exit(0)
s.sendall(b"GET /hello HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
print(s.version(), s.selected_alpn_protocol(), data.split(b"\r\n")[0].decode(), data.endswith(b"hello over tls"))
"#;
    let py = |version: &str| {
        let out = run(Command::new("python3")
            .args(["-c", script])
            .arg(gw.addr.port().to_string())
            .arg(pki.path("ca.pem"))
            .arg(version));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(py("1.2"), "TLSv1.2 http/1.1 HTTP/1.1 200 OK True");
    assert_eq!(py("1.3"), "TLSv1.3 http/1.1 HTTP/1.1 200 OK True");
    let refused = py("1.1");
    assert!(refused.starts_with("refused"), "{refused}");
}

/// Two gateways reading one ticket key file: a session from one resumes on the other (as
/// behind a balancer); a gateway with another key makes a new session.
#[test]
fn ticket_keys_from_a_shared_file_resume_across_gateways() {
    use std::os::unix::fs::PermissionsExt;
    let pki = pki();
    let up = Upstream::echo_target();
    let key_file = |name: &str, key: &str| {
        let path = pki.path(name);
        std::fs::write(&path, format!("{key}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        format!("ticket_keys = \"{}\"", path.display())
    };
    let shared = key_file("shared.keys", &"ab".repeat(32));
    let other = key_file("other.keys", &"cd".repeat(32));
    let one = Gateway::start(&config(&pki, up.addr, &shared));
    let two = Gateway::start(&config(&pki, up.addr, &shared));
    let three = Gateway::start(&config(&pki, up.addr, &other));
    let session = pki.path("shared-session.pem").display().to_string();
    let (ok, text) = s_client(
        &one,
        &["-servername", "a.test", "-tls1_2", "-sess_out", &session],
    );
    assert!(ok, "{text}");
    let (ok, text) = s_client(
        &two,
        &["-servername", "a.test", "-tls1_2", "-sess_in", &session],
    );
    assert!(
        ok && text.contains("Reused, TLSv1.2"),
        "not resumed on the second gateway: {text}"
    );
    let (ok, text) = s_client(
        &three,
        &["-servername", "a.test", "-tls1_2", "-sess_in", &session],
    );
    assert!(
        ok && text.contains("New, TLSv1.2"),
        "resumed without the key: {text}"
    );
    // A key file others can read is refused, naming the file.
    let exposed = pki.path("exposed.keys");
    std::fs::write(&exposed, format!("{}\n", "ef".repeat(32))).unwrap();
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out) = one.reload_with(&config(
        &pki,
        up.addr,
        &format!("ticket_keys = \"{}\"", exposed.display()),
    ));
    assert!(
        !ok && out.contains("exposed.keys") && out.contains("0600"),
        "{out}"
    );
}

/// Python clients on new and kept-alive TLS connections while the certificate is renewed on
/// disk and the config reloaded: every request is answered.
#[test]
fn certificate_reloads_under_load_drop_no_request() {
    let pki = pki();
    let up = Upstream::echo_target();
    let cfg = config(&pki, up.addr, "");
    let gw = Gateway::start(&cfg);
    let script = r#"
import http.client, socket, ssl, sys, threading, time
port, ca, duration = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
ctx = ssl.create_default_context(cafile=ca)
counts = {"ok": 0, "failed": 0}
errors = []
lock = threading.Lock()
def client():
    end = time.time() + duration
    while time.time() < end:
        try:
            c = http.client.HTTPSConnection("a.test", port, context=ctx, timeout=5)
            c.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="a.test")
            for _ in range(5):
                c.request("GET", "/hello")
                r = c.getresponse()
                body = r.read()
                with lock:
                    if r.status == 200 and body == b"hello over tls":
                        counts["ok"] += 1
                    else:
                        counts["failed"] += 1
                        errors.append(f"{r.status} {body[:60]!r}")
            c.close()
        except Exception as e:
            with lock:
                counts["failed"] += 1
                errors.append(repr(e))
threads = [threading.Thread(target=client) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(counts["ok"], counts["failed"], errors[:5])
"#;
    let load = Command::new("python3")
        .args(["-c", script])
        .arg(gw.addr.port().to_string())
        .arg(pki.path("ca.pem"))
        .arg("6")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Renewals on disk (the watcher reloads) and explicit reloads, alternating.
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(700));
        let key = if i % 2 == 0 { "rsa" } else { "ec" };
        pki.issue(&format!("renewed{i}"), &["a.test"], key);
        std::fs::copy(pki.path(&format!("renewed{i}.key")), pki.path("a.key")).unwrap();
        std::fs::copy(pki.path(&format!("renewed{i}.pem")), pki.path("a.pem")).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let (ok, out) = gw.reload_with(&cfg);
        assert!(ok, "{out}");
    }
    let out = load.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut parts = text.splitn(3, ' ');
    let ok: u64 = parts
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{text}"));
    let failed: u64 = parts.next().unwrap().parse().unwrap();
    assert_eq!(
        failed,
        0,
        "requests failed during reloads: {text}\n{}",
        gw.log()
    );
    assert!(ok >= 100, "too little load to mean anything: {text}");
    assert!(
        gw.log().contains("certificate or key files changed"),
        "{}",
        gw.log()
    );
}
