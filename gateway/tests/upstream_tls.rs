//! Upstreams over TLS and by host name, for real: Python's ssl behind http.server as the
//! upstream, certificates from an openssl CA, names answered by a DNS server on loopback the
//! test controls. A certificate that does not verify (wrong name, expired, unknown CA) is a
//! 502 with the reason in the log, never a plaintext retry; a client certificate is presented
//! when configured; names follow DNS and keep their last good addresses when it fails.

mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, TcpListener},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use support::{
    dns::DnsServer,
    pki::{Leaf, Pki},
    *,
};

/// The Python TLS upstream; killed on drop.
struct TlsUpstream {
    child: Child,
    port: u16,
}

impl TlsUpstream {
    /// Serves with `pki`'s `name.pem`/`name.key`; requires client certificates of
    /// `client_ca` when given.
    fn start(pki: &Pki, name: &str, client_ca: Option<&Pki>) -> TlsUpstream {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/tls_upstream.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .arg(pki.path(&format!("{name}.pem")))
            .arg(pki.path(&format!("{name}.key")));
        if let Some(ca) = client_ca {
            cmd.arg(ca.ca());
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the upstream prints its port");
        TlsUpstream { child, port }
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn p(pki: &Pki, f: &str) -> String {
    pki.path(f).display().to_string()
}

fn pki() -> Pki {
    let pki = Pki::new();
    pki.issue("up", &["up.test"], "ec");
    pki.issue_leaf(
        "expired",
        &Leaf {
            subject: "/CN=up.test",
            sans: &["DNS:up.test"],
            key: "ec",
            days: 0,
            usage: "serverAuth",
        },
    );
    pki.issue_leaf(
        "gateway",
        &Leaf {
            subject: "/CN=gateway-client",
            sans: &[],
            key: "ec",
            days: 2,
            usage: "clientAuth",
        },
    );
    pki
}

fn json(r: &Response) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("not JSON: {}", r.text()))
}

fn get(gw: &Gateway, path: &str) -> Response {
    request(
        gw.addr,
        &format!("GET {path} HTTP/1.1\r\nHost: client.example\r\nConnection: close\r\n\r\n"),
    )
}

#[test]
fn tls_upstreams_are_verified_and_sent_the_chosen_host() {
    let pki = pki();
    let up = TlsUpstream::start(&pki, "up", None);
    let ca = p(&pki, "ca.pem");
    let port = up.port;
    let gw = Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n\
         [upstreams.client_host]\nservers = [\"127.0.0.1:{port}\"]\ntls = {{ ca = \"{ca}\", server_name = \"up.test\" }}\n\n\
         [upstreams.literal_host]\nservers = [\"127.0.0.1:{port}\"]\ntls = {{ ca = \"{ca}\", server_name = \"up.test\" }}\nhost = {{ value = \"api.up.test\" }}\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/client\" }}\nupstream = \"client_host\"\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/literal\" }}\nupstream = \"literal_host\"\n"
    ));
    // Twice: the second request rides the pooled TLS connection.
    for _ in 0..2 {
        let r = get(&gw, "/client/x");
        assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.log());
        let seen = json(&r);
        assert_eq!(seen["sni"], "up.test");
        assert_eq!(
            seen["host"], "client.example",
            "address servers keep the client's Host"
        );
        assert_eq!(seen["path"], "/client/x");
    }
    let seen = json(&get(&gw, "/literal/y"));
    assert_eq!(seen["host"], "api.up.test");
}

#[test]
fn certificates_that_do_not_verify_are_502_and_never_plaintext() {
    let pki = pki();
    let good = TlsUpstream::start(&pki, "up", None);
    let expired = TlsUpstream::start(&pki, "expired", None);
    // The expired certificate's end is the second it was issued.
    std::thread::sleep(Duration::from_millis(1100));
    let ca = p(&pki, "ca.pem");
    let gw = Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n\
         [upstreams.wrong_name]\nservers = [\"127.0.0.1:{}\"]\ntls = {{ ca = \"{ca}\", server_name = \"other.test\" }}\n\n\
         [upstreams.expired]\nservers = [\"127.0.0.1:{}\"]\ntls = {{ ca = \"{ca}\", server_name = \"up.test\" }}\n\n\
         [upstreams.unknown_ca]\nservers = [\"127.0.0.1:{}\"]\ntls = {{ server_name = \"up.test\" }}\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/wrong-name\" }}\nupstream = \"wrong_name\"\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/expired\" }}\nupstream = \"expired\"\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/unknown-ca\" }}\nupstream = \"unknown_ca\"\n",
        good.port, expired.port, good.port
    ));
    for (path, reason) in [
        (
            "/wrong-name",
            "certificate not valid for name \"other.test\"",
        ),
        ("/expired", "expired"),
        ("/unknown-ca", "UnknownIssuer"),
    ] {
        let r = get(&gw, path);
        assert_eq!(r.status, 502, "{path}: {}", r.text());
        assert!(
            r.text().contains("upstream TLS handshake failed"),
            "{}",
            r.text()
        );
        // The log is written off the workers' threads: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        let named = || {
            gw.log()
                .lines()
                .any(|l| l.contains("cannot connect upstream") && l.contains(reason))
        };
        while !named() {
            assert!(
                Instant::now() < deadline,
                "{path}: no log line naming {reason}:\n{}",
                gw.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn a_client_certificate_is_presented_when_configured() {
    let pki = pki();
    let up = TlsUpstream::start(&pki, "up", Some(&pki));
    let ca = p(&pki, "ca.pem");
    let (cert, key) = (p(&pki, "gateway.pem"), p(&pki, "gateway.key"));
    let port = up.port;
    let gw = Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n\
         [upstreams.with_cert]\nservers = [\"127.0.0.1:{port}\"]\ntls = {{ ca = \"{ca}\", server_name = \"up.test\", cert = \"{cert}\", key = \"{key}\" }}\n\n\
         [upstreams.without]\nservers = [\"127.0.0.1:{port}\"]\ntls = {{ ca = \"{ca}\", server_name = \"up.test\" }}\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/with\" }}\nupstream = \"with_cert\"\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/without\" }}\nupstream = \"without\"\n"
    ));
    let r = get(&gw, "/with");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.log());
    assert_eq!(json(&r)["client"], "commonName=gateway-client");
    // Python's server refuses the handshake without one; TLS 1.3 reports that after the
    // handshake, on the first read, so either way it is a 502.
    assert_eq!(get(&gw, "/without").status, 502);
}

#[test]
fn a_bad_upstream_ca_file_refuses_the_config() {
    let (ok, text) = check_config(
        "[upstreams.u]\nservers = [\"api.example.com:443\"]\ntls = { ca = \"/nonexistent/ca.pem\" }\n\n\
         [[routes]]\nupstream = \"u\"\n",
    );
    assert!(!ok);
    assert!(
        text.contains("upstreams.u.tls.ca") && text.contains("/nonexistent/ca.pem"),
        "{text}"
    );
    let (ok, text) = check_config(
        "[upstreams.u]\nservers = [\"api.example.com\"]\n\n[[routes]]\nupstream = \"u\"\n",
    );
    assert!(!ok && text.contains("HOST:PORT"), "{text}");
}

/// A plain HTTP server on `ip:port` answering `name` and the Host it was sent, then closing.
fn named_server(ip: Ipv4Addr, port: u16, name: &'static str) -> (Arc<Mutex<Vec<String>>>, u16) {
    let listener = TcpListener::bind((ip, port)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let hosts = Arc::new(Mutex::new(Vec::new()));
    let seen = hosts.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_string();
            if let Some(h) = head.lines().find_map(|l| {
                l.strip_prefix("host: ")
                    .or_else(|| l.strip_prefix("Host: "))
            }) {
                seen.lock().unwrap().push(h.to_owned());
            }
            let _ = stream.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                    name.len()
                )
                .as_bytes(),
            );
        }
    });
    (hosts, port)
}

#[test]
fn named_servers_follow_dns_and_keep_the_last_good_addresses() {
    let dns = DnsServer::start();
    let (hosts_one, port) = named_server(Ipv4Addr::new(127, 0, 0, 1), 0, "one");
    let (_hosts_two, _) = named_server(Ipv4Addr::new(127, 0, 0, 2), port, "two");
    dns.set("svc.test", &[Ipv4Addr::new(127, 0, 0, 1)], 1);
    let gw = Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\n\
         [resolver]\nnameservers = [\"{}\"]\nmin_ttl = \"1s\"\nretry = \"300ms\"\ntimeout = \"500ms\"\n\n\
         [upstreams.svc]\nservers = [\"svc.test:{port}\"]\n\n\
         [upstreams.missing]\nservers = [\"missing.test:{port}\"]\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/missing\" }}\nupstream = \"missing\"\n\n\
         [[routes]]\nupstream = \"svc\"\n",
        dns.addr
    ));
    let r = get(&gw, "/a");
    assert_eq!(r.text(), "one", "{}", gw.log());
    assert_eq!(
        hosts_one.lock().unwrap().last().map(String::as_str),
        Some(format!("svc.test:{port}").as_str()),
        "named servers are sent their own name"
    );
    // A name nobody answers: the gateway started anyway, and says 502.
    assert_eq!(get(&gw, "/missing").status, 502);

    // The record moves; the gateway follows within its TTL.
    dns.set("svc.test", &[Ipv4Addr::new(127, 0, 0, 2)], 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&gw, "/b").text() != "two" {
        assert!(
            Instant::now() < deadline,
            "still the old address:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // DNS fails: the last good address keeps serving, past several TTLs and retries.
    let asked = dns.queries();
    dns.fail(true);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(dns.queries() > asked, "the resolver kept asking");
    for _ in 0..4 {
        assert_eq!(get(&gw, "/c").text(), "two");
    }
    assert!(
        gw.log().contains("keeping the last good addresses"),
        "{}",
        gw.log()
    );
}

#[test]
fn a_named_tls_upstream_gets_sni_and_host_from_its_name() {
    let pki = pki();
    let up = TlsUpstream::start(&pki, "up", None);
    let dns = DnsServer::start();
    dns.set("up.test", &[Ipv4Addr::new(127, 0, 0, 1)], 30);
    let gw = Gateway::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n\
         [resolver]\nnameservers = [\"{}\"]\n\n\
         [upstreams.api]\nservers = [\"up.test:{}\"]\ntls = {{ ca = \"{}\" }}\n\n\
         [[routes]]\nupstream = \"api\"\n",
        dns.addr,
        up.port,
        p(&pki, "ca.pem")
    ));
    let r = get(&gw, "/v1/models");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.log());
    let seen = json(&r);
    assert_eq!(seen["sni"], "up.test");
    assert_eq!(seen["host"], format!("up.test:{}", up.port));
}
