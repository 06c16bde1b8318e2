//! A smuggling check with an outside arbiter: the upstream is h11 (Python), an independent
//! strict HTTP/1.1 implementation. Probes in the style of smuggler.py (CL.TE and TE.CL under
//! many Transfer-Encoding disguises) go through the gateway; h11 must never report a protocol
//! error or see a request the client did not send, and a victim connection must always get its
//! own response.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use support::*;

struct H11Upstream {
    child: Child,
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for H11Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_h11() -> Option<H11Upstream> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/conformance/h11_upstream.py"
    );
    let has_h11 = Command::new("python3")
        .args(["-c", "import h11"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has_h11 {
        if std::env::var_os("PORTCULLIS_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1") {
            panic!("python3 with h11 is required (pip install h11)");
        }
        eprintln!("\n*** SKIPPED smuggling check: python3 -m pip install h11 ***\n");
        return None;
    }
    let mut child = Command::new("python3")
        .arg(script)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3");
    let stdout = child.stdout.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = lines.clone();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(port) = line.split("\"port\": ").nth(1) {
                let _ = tx.send(port.trim_end_matches('}').trim().parse::<u16>().unwrap());
            }
            sink.lock().unwrap().push(line);
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("h11 upstream started");
    Some(H11Upstream { child, port, lines })
}

/// Transfer-Encoding disguises, after smuggler.py's mutation list.
fn te_mutations() -> Vec<Vec<u8>> {
    let mut m: Vec<Vec<u8>> = [
        &b"Transfer-Encoding: chunked"[..],
        b"Transfer-Encoding : chunked",
        b"Transfer-Encoding:chunked",
        b"Transfer-Encoding:\tchunked",
        b"Transfer-Encoding: \tchunked",
        b"Transfer-Encoding:\x0bchunked",
        b"Transfer-Encoding:\x0cchunked",
        b"Transfer-Encoding: chunked\x0b",
        b"Transfer-Encoding:\r\n chunked",
        b"Transfer-Encoding:\r\n\tchunked",
        b" Transfer-Encoding: chunked",
        b"X: y\nTransfer-Encoding: chunked",
        b"Transfer-Encoding: chunked\n",
        b"Transfer-Encoding\n: chunked",
        b"Transfer-Encoding: \"chunked\"",
        b"Transfer-Encoding: 'chunked'",
        b"Transfer-Encoding: chunk",
        b"Transfer-Encoding: xchunked",
        b"Transfer-Encoding: chunkedx",
        b"Transfer-Encoding: chunked, identity",
        b"Transfer-Encoding: identity, chunked",
        b"Transfer-Encoding: CHUNKED",
        b"TRANSFER-ENCODING: chunked",
        b"Transfer_Encoding: chunked",
        b"Transfer-Encoding\x00: chunked",
        b"Transfer-Encoding: \x00chunked",
        b"Transfer-Encoding: chunked\x00",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x",
        b"Transfer-Encoding: x\r\nTransfer-Encoding: chunked",
        b"Content-Encoding: chunked",
    ]
    .iter()
    .map(|v| v.to_vec())
    .collect();
    for b in [0x01u8, 0x7f, 0x80, 0xa0, 0xff] {
        m.push([&b"Transfer-Encoding: chunked"[..], &[b]].concat());
        m.push([&b"Transfer-Encoding:"[..], &[b], b"chunked"].concat());
        m.push([&b"Transfer-Encoding"[..], &[b], b": chunked"].concat());
    }
    m
}

fn probes() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, te) in te_mutations().into_iter().enumerate() {
        let cl_te = [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n"[..],
            &te,
            b"\r\n\r\n0\r\n\r\nG",
        ]
        .concat();
        let te_cl = [&b"POST / HTTP/1.1\r\nHost: a\r\n"[..], &te, b"\r\nContent-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 15\r\n\r\nx=1\r\n0\r\n\r\n"].concat();
        let te_only = [
            &b"POST /te HTTP/1.1\r\nHost: a\r\n"[..],
            &te,
            b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ]
        .concat();
        out.push((
            format!("CL.TE #{i} {:?}", String::from_utf8_lossy(&te)),
            cl_te,
        ));
        out.push((
            format!("TE.CL #{i} {:?}", String::from_utf8_lossy(&te)),
            te_cl,
        ));
        out.push((
            format!("TE #{i} {:?}", String::from_utf8_lossy(&te)),
            te_only,
        ));
    }
    out
}

#[test]
fn no_probe_desynchronises_an_h11_upstream() {
    let Some(h11) = start_h11() else { return };
    let gw = Gateway::start(&format!("[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n[upstreams.up]\nservers = [\"127.0.0.1:{}\"]\n\n{ROUTE_ALL}", h11.port));
    let probes = probes();
    let mut problems = Vec::new();
    for (name, raw) in &probes {
        let seen_before = h11.lines.lock().unwrap().len();
        let mut attacker = Client::connect(gw.addr);
        attacker.send(raw);
        // Read whatever comes back until the gateway closes or goes quiet.
        attacker
            .stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let answer = attacker.read_response(false).map(|r| r.status);
        drop(attacker);
        // A victim on its own connection must get exactly its own answer.
        let victim = request(gw.addr, "GET /victim HTTP/1.1\r\nHost: a\r\n\r\n");
        if victim.status != 200 || victim.text() != "/victim" {
            problems.push(format!(
                "{name}: victim got {} {:?}",
                victim.status,
                victim.text()
            ));
        }
        thread::sleep(Duration::from_millis(30));
        let seen: Vec<String> = h11.lines.lock().unwrap()[seen_before..]
            .iter()
            .filter(|l| !l.contains("\"target\": \"/victim\""))
            .cloned()
            .collect();
        // Refused: nothing may reach the upstream. Accepted: exactly one complete request.
        let allowed = if answer == Some(200) { 1 } else { 0 };
        if seen.len() != allowed || seen.iter().any(|l| !l.contains("\"kind\": \"request\"")) {
            problems.push(format!(
                "{name} (gateway answered {answer:?}): h11 saw {seen:?}"
            ));
        }
    }
    let lines = h11.lines.lock().unwrap().clone();
    let victims = lines
        .iter()
        .filter(|l| l.contains("\"target\": \"/victim\""))
        .count();
    assert_eq!(
        victims,
        probes.len(),
        "every victim request reached the upstream once"
    );
    assert!(
        problems.is_empty(),
        "{} problems over {} probes:\n{}",
        problems.len(),
        probes.len(),
        problems.join("\n")
    );
}
