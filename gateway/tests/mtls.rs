//! Client certificates for real: curl presenting certificates an openssl CA issued. A consumer
//! listed by subject or by alternative name is admitted on `auth.methods = ["mtls"]` routes and
//! named upstream with the verified subject; a certificate of another CA, a revoked one, or an
//! unlisted one is refused; `required` refuses clients without one at the handshake.

mod support;

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use support::{
    pki::{run, Leaf, Pki},
    *,
};

/// The server certificate, clients alice (listed by subject), bob (by SAN), carol (revoked),
/// dave (valid, listed by nobody), and mallory from another CA.
fn pki() -> (Pki, Pki) {
    let pki = Pki::new();
    pki.issue("server", &["gw.test"], "ec");
    let client = |name: &str, subject: &str, sans: &[&str]| {
        pki.issue_leaf(
            name,
            &Leaf {
                subject,
                sans,
                key: "ec",
                days: 2,
                usage: "clientAuth",
            },
        )
    };
    client("alice", "/O=Acme/CN=alice", &[]);
    client("bob", "/CN=bob-workload", &["URI:spiffe://acme/bob"]);
    client("carol", "/O=Acme/CN=carol", &[]);
    client("dave", "/O=Acme/CN=dave", &[]);
    pki.revoke(&["carol"]);
    let other = Pki::named("other", "Another CA");
    other.issue_leaf(
        "mallory",
        &Leaf {
            subject: "/O=Acme/CN=alice",
            sans: &[],
            key: "ec",
            days: 2,
            usage: "clientAuth",
        },
    );
    (pki, other)
}

fn config(pki: &Pki, upstream: std::net::SocketAddr, required: bool) -> String {
    config_with(pki, upstream, required, "")
}

fn config_with(
    pki: &Pki,
    upstream: std::net::SocketAddr,
    required: bool,
    consumers: &str,
) -> String {
    let p = |f: &str| pki.path(f).display().to_string();
    format!(
        "[server]\nlisten = [{{ address = \"127.0.0.1:0\", tls = \"public\" }}]\nworkers = 2\n\n\
         [tls.public]\ncertificates = [{{ cert = \"{}\", key = \"{}\", default = true }}]\n\
         client_certificates = {{ ca = \"{}\", crls = [\"{}\"], required = {required}, identity_header = \"X-Client-Subject\" }}\n\n\
         [[consumers]]\nid = \"alice\"\ngroups = [\"staff\"]\nclient_certificate = {{ subjects = [\"CN=alice,O=Acme\"] }}\n\n\
         [[consumers]]\nid = \"bob\"\nclient_certificate = {{ sans = [\"spiffe://acme/bob\"] }}\n\n{consumers}\n\
         [upstreams.up]\nservers = [\"{upstream}\"]\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/mtls\" }}\nupstream = \"up\"\nauth = {{ methods = [\"mtls\"] }}\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/staff\" }}\nupstream = \"up\"\nauth = {{ methods = [\"mtls\"], groups = [\"staff\"] }}\n\n\
         [[routes]]\nupstream = \"up\"\n",
        p("server.pem"),
        p("server.key"),
        p("ca.pem"),
        p("crl.pem"),
    )
}

/// curl to `https://gw.test:PORT/path` presenting `client` (files in `pki`), if any.
fn curl(
    gw: &Gateway,
    ca: &Pki,
    client: Option<(&Pki, &str)>,
    path: &str,
    extra: &[&str],
) -> Output {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "5",
        "-o",
        "/dev/stdout",
        "-w",
        "\n%{http_code}",
    ])
    .arg("--cacert")
    .arg(ca.path("ca.pem"))
    .arg("--resolve")
    .arg(format!("gw.test:{}:127.0.0.1", gw.addr.port()));
    if let Some((pki, name)) = client {
        cmd.arg("--cert")
            .arg(pki.path(&format!("{name}.pem")))
            .arg("--key")
            .arg(pki.path(&format!("{name}.key")));
    }
    cmd.args(extra)
        .arg(format!("https://gw.test:{}{path}", gw.addr.port()));
    run(&mut cmd)
}

/// The HTTP status curl got, or 0 when the handshake failed.
fn status(out: &Output) -> u16 {
    if !out.status.success() {
        return 0;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.rsplit('\n').next().unwrap().trim().parse().unwrap()
}

#[test]
fn listed_certificates_identify_consumers_and_others_are_refused() {
    let (pki, other) = pki();
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(&pki, up.addr, false));

    let out = curl(
        &gw,
        &pki,
        Some((&pki, "alice")),
        "/mtls/a",
        &["-H", "X-Client-Subject: CN=forged"],
    );
    assert_eq!(
        status(&out),
        200,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = up.requests().pop().unwrap();
    assert_eq!(seen.header("x-consumer-id"), Some("alice"));
    assert_eq!(
        seen.headers_named("x-client-subject"),
        vec!["CN=alice,O=Acme"],
        "the verified subject, and only it"
    );
    assert_eq!(
        status(&curl(&gw, &pki, Some((&pki, "alice")), "/staff", &[])),
        200
    );

    // By an alternative name; bob is not staff.
    assert_eq!(
        status(&curl(&gw, &pki, Some((&pki, "bob")), "/mtls/b", &[])),
        200
    );
    assert_eq!(
        up.requests().pop().unwrap().header("x-consumer-id"),
        Some("bob")
    );
    assert_eq!(
        status(&curl(&gw, &pki, Some((&pki, "bob")), "/staff", &[])),
        403
    );

    // A valid certificate no consumer lists; no certificate (optional here) on both kinds of
    // route; a client's own identity header never passes.
    assert_eq!(
        status(&curl(&gw, &pki, Some((&pki, "dave")), "/mtls/d", &[])),
        401
    );
    assert_eq!(status(&curl(&gw, &pki, None, "/mtls/n", &[])), 401);
    let before = up.requests().len();
    assert_eq!(
        status(&curl(
            &gw,
            &pki,
            None,
            "/open",
            &["-H", "X-Client-Subject: CN=alice,O=Acme"]
        )),
        200
    );
    let seen = up.requests();
    assert_eq!(seen.len(), before + 1);
    assert_eq!(seen.last().unwrap().header("x-client-subject"), None);

    // Revoked, and issued by a CA the listener does not trust (same subject as alice's): the
    // handshake fails.
    let out = curl(&gw, &pki, Some((&pki, "carol")), "/mtls/c", &[]);
    assert_eq!(status(&out), 0, "a revoked certificate was accepted");
    let out = curl(&gw, &pki, Some((&other, "mallory")), "/mtls/m", &[]);
    assert_eq!(status(&out), 0, "a certificate of another CA was accepted");
    assert!(
        up.requests()
            .iter()
            .all(|r| !r.target.starts_with("/mtls/c") && !r.target.starts_with("/mtls/m")),
        "refused clients reached the upstream"
    );
}

/// The identity is the connection's: every request on a kept-alive connection carries it
/// (each request's state comes fresh from the worker's pool, the certificate from the
/// connection), and a request on another connection without a certificate does not.
#[test]
fn every_request_on_a_kept_alive_connection_carries_its_identity() {
    let (pki, _) = pki();
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(&pki, up.addr, false));
    let port = gw.addr.port();
    let url = |n: u32| format!("https://gw.test:{port}/mtls/keep{n}");
    let out = run(Command::new("curl")
        .args(["-sS", "--max-time", "5", "-o", "/dev/null"])
        .args(["-w", "%{http_code} %{num_connects}\n"])
        .arg("--cacert")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path("alice.pem"))
        .arg("--key")
        .arg(pki.path("alice.key"))
        .arg("--resolve")
        .arg(format!("gw.test:{port}:127.0.0.1"))
        // Each URL with its own `-o`: curl's applies to one transfer.
        .args(
            [1, 2, 3]
                .iter()
                .flat_map(|&n| ["-o".to_string(), "/dev/null".to_string(), url(n)]),
        ));
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        report.lines().collect::<Vec<_>>(),
        ["200 1", "200 0", "200 0"],
        "three answers over one connection: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Vec<_> = up
        .requests()
        .into_iter()
        .filter(|r| r.target.starts_with("/mtls/keep"))
        .collect();
    assert_eq!(seen.len(), 3);
    for r in &seen {
        assert_eq!(r.header("x-consumer-id"), Some("alice"), "{}", r.target);
        assert_eq!(r.headers_named("x-client-subject"), vec!["CN=alice,O=Acme"]);
    }
    assert_eq!(status(&curl(&gw, &pki, None, "/mtls/after", &[])), 401);
}

#[test]
fn a_required_certificate_is_asked_for_at_the_handshake() {
    let (pki, _) = pki();
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(&pki, up.addr, true));
    let out = curl(&gw, &pki, None, "/open", &[]);
    assert_eq!(status(&out), 0, "served without a certificate");
    assert_eq!(
        status(&curl(&gw, &pki, Some((&pki, "alice")), "/open", &[])),
        200
    );
    assert_eq!(up.requests().len(), 1);
}

/// `openssl s_client` presenting `client`, sending `input` once connected; all it printed.
fn s_client(gw: &Gateway, pki: &Pki, client: &str, args: &[&str], input: &str) -> String {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &gw.addr.to_string(),
            "-servername",
            "gw.test",
        ])
        .arg("-cert")
        .arg(pki.path(&format!("{client}.pem")))
        .arg("-key")
        .arg(pki.path(&format!("{client}.key")))
        .args(["-ign_eof"])
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
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A session resumed after its certificate was revoked is refused: resumption restores the
/// chain verified when the session began, so the gateway verifies it again.
#[test]
fn a_resumed_session_is_verified_again_after_a_revocation() {
    let (pki, _) = pki();
    let up = Upstream::echo_target();
    let cfg = config(&pki, up.addr, false);
    let gw = Gateway::start_with(&cfg, &[("RUST_LOG", "portcullis::runtime=debug,info")]);
    let session = pki.path("alice-session.pem").display().to_string();
    let get = "GET /mtls/resumed HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n";
    let text = s_client(&gw, &pki, "alice", &["-tls1_2", "-sess_out", &session], get);
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    let text = s_client(&gw, &pki, "alice", &["-tls1_2", "-sess_in", &session], get);
    assert!(
        text.contains("Reused, TLSv1.2") && text.contains("HTTP/1.1 200"),
        "resumed and served before the revocation: {text}"
    );
    pki.revoke(&["carol", "alice"]);
    let (ok, out) = gw.reload_with(&cfg);
    assert!(ok, "{out}");
    let text = s_client(&gw, &pki, "alice", &["-tls1_2", "-sess_in", &session], get);
    assert!(
        !text.contains("HTTP/1.1 200"),
        "a revoked certificate was served through its old session: {text}"
    );
    // Refused after resuming (not by a full handshake the client fell back to).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !gw.log().contains("resumed session refused") {
        assert!(std::time::Instant::now() < deadline, "{text}\n{}", gw.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A new handshake is refused too.
    let out = curl(&gw, &pki, Some((&pki, "alice")), "/mtls/new", &[]);
    assert_eq!(status(&out), 0);
}

/// Subjects are matched, and sent upstream, as `openssl x509 -nameopt RFC2253` prints them,
/// also with attributes beyond CN/O (e-mail) and bytes beyond ASCII.
#[test]
fn subjects_are_written_as_openssl_prints_them() {
    let (pki, _) = pki();
    pki.issue_leaf(
        "erin",
        &Leaf {
            subject: "/C=DE/O=Acme, Inc./CN=J\u{f6}rg \u{dc}ber/emailAddress=erin@acme.test",
            sans: &[],
            key: "ec",
            days: 2,
            usage: "clientAuth",
        },
    );
    let out = run(Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in"])
        .arg(pki.path("erin.pem")));
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let subject = printed
        .strip_prefix("subject=")
        .unwrap_or(&printed)
        .to_owned();
    assert!(
        subject.contains("emailAddress=") && subject.contains("\\C3\\B6"),
        "{subject}"
    );
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config_with(
        &pki,
        up.addr,
        false,
        &format!(
            "[[consumers]]\nid = \"erin\"\nclient_certificate = {{ subjects = ['{subject}'] }}\n"
        ),
    ));
    let out = curl(
        &gw,
        &pki,
        Some((&pki, "erin")),
        "/mtls/e",
        &["-H", "X_Client_Subject: CN=forged"],
    );
    assert_eq!(
        status(&out),
        200,
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    let seen = up.requests().pop().unwrap();
    assert_eq!(seen.header("x-consumer-id"), Some("erin"));
    assert_eq!(seen.header("x-client-subject"), Some(subject.as_str()));
    assert!(
        seen.headers
            .iter()
            .all(|(n, _)| !n.eq_ignore_ascii_case("x_client_subject")),
        "an underscore spelling of the identity header passed: {:?}",
        seen.headers
    );
}

#[test]
fn identity_headers_that_http_or_the_gateway_own_are_refused() {
    let (pki, _) = pki();
    for bad in [
        "content-length",
        "Host",
        "x-consumer-id",
        "transfer_encoding",
    ] {
        let cfg = config(&pki, "127.0.0.1:9".parse().unwrap(), true).replace(
            "identity_header = \"X-Client-Subject\"",
            &format!("identity_header = \"{bad}\""),
        );
        let (ok, text) = check_config(&cfg);
        assert!(
            !ok && text.contains("identity_header") && text.contains("owns"),
            "{bad}: {text}"
        );
    }
}
