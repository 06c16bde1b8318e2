//! The PROXY protocol behind an L4 balancer: a trusted source's v1 or v2 header names the
//! client that X-Forwarded-For (and limits, bans, logs) see; a malformed header closes the
//! connection; an untrusted source cannot claim an address.

mod support;

use std::net::SocketAddr;

use support::*;

fn config(upstream: SocketAddr, extra_listen: &str) -> String {
    format!(
        "[server]\nlisten = [{{ address = \"127.0.0.1:0\", proxy_protocol = true{extra_listen} }}]\nworkers = 2\ntrusted_proxies = [\"127.0.0.1/32\"]\n\n\
         [upstreams.up]\nservers = [\"{upstream}\"]\n\n[[routes]]\nupstream = \"up\"\n"
    )
}

fn v2_header(client: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[198, 51, 100, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&80u16.to_be_bytes());
    h
}

#[test]
fn a_trusted_balancer_names_the_client_in_v1_or_v2() {
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(up.addr, ""));
    let mut c = Client::connect(gw.addr);
    c.send(
        b"PROXY TCP4 203.0.113.50 198.51.100.1 40000 80\r\nGET /one HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert_eq!(c.read_response(false).unwrap().status, 200);
    // The rest of the connection is plain HTTP: a second request needs no header.
    c.send(b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 200);
    let mut v2 = Client::connect(gw.addr);
    let mut bytes = v2_header([203, 0, 113, 51], 40001);
    bytes.extend_from_slice(b"GET /three HTTP/1.1\r\nHost: a\r\n\r\n");
    v2.send(&bytes);
    assert_eq!(v2.read_response(false).unwrap().status, 200);
    let seen: Vec<String> = up
        .requests()
        .iter()
        .map(|r| r.header("x-forwarded-for").unwrap_or("").to_owned())
        .collect();
    assert_eq!(seen, ["203.0.113.50", "203.0.113.50", "203.0.113.51"]);
}

#[test]
fn a_malformed_header_closes_and_an_untrusted_source_cannot_claim_an_address() {
    let up = Upstream::echo_target();
    let gw = Gateway::start(&config(up.addr, ""));
    let mut bad = Client::connect(gw.addr);
    bad.send(b"PROXY TCP4 not-an-address 198.51.100.1 1 2\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(
        bad.read_raw_until_close().is_empty(),
        "closed without an answer"
    );
    let mut missing = Client::connect(gw.addr);
    missing.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(
        missing.read_raw_until_close().is_empty(),
        "a trusted source must send the header"
    );
    // 127.0.0.2 is not trusted: its bytes are HTTP, so "PROXY ..." is no request line.
    let mut other = Client::connect_from(gw.addr, "127.0.0.2".parse().unwrap());
    other.send(
        b"PROXY TCP4 203.0.113.66 198.51.100.1 40000 80\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    let r = other.read_response(false).unwrap();
    assert_eq!(r.status, 400);
    let mut plain = Client::connect_from(gw.addr, "127.0.0.2".parse().unwrap());
    plain.send(b"GET /direct HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(plain.read_response(false).unwrap().status, 200);
    assert!(up
        .requests()
        .iter()
        .all(|r| r.header("x-forwarded-for") != Some("203.0.113.66")));
    assert_eq!(
        up.requests().last().unwrap().header("x-forwarded-for"),
        Some("127.0.0.2")
    );
}

#[test]
fn a_config_with_proxy_protocol_but_no_trusted_source_is_refused() {
    let (ok, text) = check_config(
        "[server]\nlisten = [{ address = \"127.0.0.1:0\", proxy_protocol = true }]\n\n[[routes]]\nrespond = { status = 200 }\n",
    );
    assert!(
        !ok && text.contains("proxy_protocol") && text.contains("trusted_proxies"),
        "{text}"
    );
}
