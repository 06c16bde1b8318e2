//! The XDP program on crafted frames through BPF_PROG_TEST_RUN: each case asserts the verdict
//! and the map state. Root only (loading BPF programs); no interface is touched.

mod support;

use std::{collections::BTreeMap, net::IpAddr, thread, time::Duration};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, PerCpuArray,
    },
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use portcullis::xdp::{settings, source_key};
use portcullis_common::{Counter, Settings, SourceKey, SourceState};
use support::netns::{privileged_or_skip, PRIVILEGED};

const PASS: u32 = 2;
const DROP: u32 = 1;
const PORT: u16 = 8080;

struct Program {
    ebpf: Ebpf,
}

impl Program {
    fn load(xdp_toml: &str) -> Program {
        let object = std::fs::read(std::env::var_os("PORTCULLIS_EBPF_OBJECT").unwrap()).unwrap();
        let mut ebpf = EbpfLoader::new().load(&object).expect("load object");
        let prog: &mut Xdp = ebpf.program_mut("portcullis").unwrap().try_into().unwrap();
        prog.load().expect("verifier accepts the program");
        let config = portcullis::config::Config::parse(
            std::path::Path::new("t.toml"),
            &format!("[xdp]\ninterface = \"none\"\n{xdp_toml}\n"),
        )
        .unwrap();
        let xdp = config.xdp.unwrap();
        let mut p = Program { ebpf };
        let mut s: Array<_, Settings> =
            Array::try_from(p.ebpf.map_mut("SETTINGS").unwrap()).unwrap();
        s.set(0, settings(&xdp), 0).unwrap();
        let mut ports: HashMap<_, u16, u8> =
            HashMap::try_from(p.ebpf.map_mut("PORTS").unwrap()).unwrap();
        ports.insert(PORT, 1, 0).unwrap();
        for (name, list) in [("DENY_V4", &xdp.deny), ("ALLOW_V4", &xdp.allow)] {
            let mut trie: LpmTrie<_, [u8; 4], u8> =
                LpmTrie::try_from(p.ebpf.map_mut(name).unwrap()).unwrap();
            for cidr in list {
                if let Some(ipnet::IpNet::V4(n)) = portcullis::xdp::parse_cidr(cidr) {
                    trie.insert(
                        &Key::new(u32::from(n.prefix_len()), n.network().octets()),
                        1,
                        0,
                    )
                    .unwrap();
                }
            }
        }
        p
    }

    fn run(&self, frame: &[u8]) -> u32 {
        self.run_repeat(frame, 1)
    }

    fn run_repeat(&self, frame: &[u8], repeat: u32) -> u32 {
        let prog: &Xdp = self.ebpf.program("portcullis").unwrap().try_into().unwrap();
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        };
        prog.test_run(opts).expect("test run").return_value
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        let c: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("COUNTERS").unwrap()).unwrap();
        Counter::ALL
            .iter()
            .map(|k| (k.name(), c.get(&(*k as u32), 0).unwrap().iter().sum()))
            .collect()
    }

    fn source(&self, ip: &str) -> Option<SourceState> {
        let m: HashMap<_, SourceKey, SourceState> =
            HashMap::try_from(self.ebpf.map("SOURCES").unwrap()).unwrap();
        m.get(&source_key(ip.parse::<IpAddr>().unwrap(), 64), 0)
            .ok()
    }

    fn ban(&mut self, ip: &str, for_ns: u64) {
        let mut m: HashMap<_, SourceKey, u64> =
            HashMap::try_from(self.ebpf.map_mut("BANS").unwrap()).unwrap();
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        m.insert(source_key(ip.parse().unwrap(), 64), now + for_ns, 0)
            .unwrap();
    }
}

/// Frame builders.
fn eth(ethertype: u16, vlans: &[u16]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for (i, vid) in vlans.iter().enumerate() {
        f.extend_from_slice(
            &(if i == 0 && vlans.len() == 2 {
                0x88a8u16
            } else {
                0x8100u16
            })
            .to_be_bytes(),
        );
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn tcp(dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t
}

fn udp(dport: u16) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&8u16.to_be_bytes());
    u
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn ipv4(src: [u8; 4], proto: u8, fragment_offset: u16, options: usize, payload: &[u8]) -> Vec<u8> {
    let ihl = 5 + options / 4;
    let mut h = vec![0u8; ihl * 4];
    h[0] = 0x40 | ihl as u8;
    let total = (h.len() + payload.len()) as u16;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6..8].copy_from_slice(&fragment_offset.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&[203, 0, 113, 1]);
    h.extend_from_slice(payload);
    h
}

fn ipv6(src: [u8; 16], first_next: u8, ext: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&((ext.len() + payload.len()) as u16).to_be_bytes());
    h[6] = first_next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src);
    h[24..40].copy_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    h.extend_from_slice(ext);
    h.extend_from_slice(payload);
    h
}

fn v4_frame(src: [u8; 4], transport: Vec<u8>, proto: u8) -> Vec<u8> {
    [eth(0x0800, &[]), ipv4(src, proto, 0, 0, &transport)].concat()
}

fn guard() -> Option<std::sync::MutexGuard<'static, ()>> {
    let g = PRIVILEGED.lock().unwrap_or_else(|e| e.into_inner());
    privileged_or_skip("xdp TestRun suite").then_some(g)
}

#[test]
fn parsing_verdicts_and_counters() {
    let Some(_g) = guard() else { return };
    let p = Program::load("");
    let src = [198, 51, 100, 7];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "IPv4 TCP to a protected port",
            v4_frame(src, tcp(PORT, ACK), 6),
            "passed",
        ),
        (
            "IPv4 TCP to another port",
            v4_frame(src, tcp(22, ACK), 6),
            "not_protected",
        ),
        (
            "IPv4 UDP to a protected port",
            v4_frame(src, udp(PORT), 17),
            "passed",
        ),
        (
            "ICMP",
            v4_frame(src, vec![8, 0, 0, 0, 0, 0, 0, 0], 1),
            "not_protected",
        ),
        (
            "ARP",
            [eth(0x0806, &[]), vec![0u8; 28]].concat(),
            "not_protected",
        ),
        (
            "IPv4 with options",
            [eth(0x0800, &[]), ipv4(src, 6, 0, 8, &tcp(PORT, ACK))].concat(),
            "passed",
        ),
        (
            "one VLAN tag",
            [eth(0x0800, &[10]), ipv4(src, 6, 0, 0, &tcp(PORT, ACK))].concat(),
            "passed",
        ),
        (
            "two VLAN tags",
            [eth(0x0800, &[10, 20]), ipv4(src, 6, 0, 0, &tcp(PORT, ACK))].concat(),
            "passed",
        ),
        (
            "non-first fragment",
            [eth(0x0800, &[]), ipv4(src, 6, 185, 0, &[0u8; 24])].concat(),
            "fragment",
        ),
        (
            "truncated TCP header",
            v4_frame(src, vec![0x9c, 0x40, 0x1f], 6),
            "unparsed",
        ),
        (
            "truncated IPv4 header",
            [eth(0x0800, &[]), vec![0x45, 0, 0, 40, 0, 0]].concat(),
            "unparsed",
        ),
        (
            "IPv4 header length below 20",
            [eth(0x0800, &[]), {
                let mut h = ipv4(src, 6, 0, 0, &tcp(PORT, ACK));
                h[0] = 0x44;
                h
            }]
            .concat(),
            "unparsed",
        ),
    ];
    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    for (name, frame, counter) in &cases {
        assert_eq!(p.run(frame), PASS, "{name}: everything here passes");
        *expected.entry(counter).or_default() += 1;
        let got = p.counters();
        for (k, v) in &expected {
            assert_eq!(got[k], *v, "{name}: counter {k}");
        }
    }
    // Only packets for the protected port (TCP, UDP, options, VLANs) count for the source.
    assert_eq!(
        p.source("198.51.100.7").unwrap().packets,
        expected["passed"]
    );
}

#[test]
fn ipv6_extension_headers_and_prefix_keys() {
    let Some(_g) = guard() else { return };
    let p = Program::load("ipv6_prefix = 64");
    let a: std::net::Ipv6Addr = "2001:db8:aaaa:1::10".parse().unwrap();
    let b: std::net::Ipv6Addr = "2001:db8:aaaa:1:ffff::20".parse().unwrap();
    // Hop-by-hop (8 bytes) -> destination options (16 bytes) -> fragment (first) -> TCP.
    let mut ext = vec![60, 0, 1, 4, 0, 0, 0, 0];
    ext.extend_from_slice(&[44, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    ext.extend_from_slice(&[6, 0, 0, 1, 0, 0, 0, 7]);
    let frame = |src: std::net::Ipv6Addr| {
        [
            eth(0x86dd, &[]),
            ipv6(src.octets(), 0, &ext, &tcp(PORT, ACK)),
        ]
        .concat()
    };
    assert_eq!(p.run(&frame(a)), PASS);
    assert_eq!(p.run(&frame(b)), PASS);
    assert_eq!(
        p.source("2001:db8:aaaa:1::").unwrap().packets,
        2,
        "both addresses share their /64"
    );
    // A non-first fragment.
    let frag = [
        eth(0x86dd, &[]),
        ipv6(a.octets(), 44, &[6, 0, 0, 8, 0, 0, 0, 1], &[0u8; 16]),
    ]
    .concat();
    assert_eq!(p.run(&frag), PASS);
    assert_eq!(p.counters()["fragment"], 1);
    // Seven chained extension headers: more than the parser follows, so it fails open.
    let mut long = Vec::new();
    for _ in 0..7 {
        long.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    }
    let deep = [
        eth(0x86dd, &[]),
        ipv6(a.octets(), 60, &long, &tcp(PORT, ACK)),
    ]
    .concat();
    assert_eq!(p.run(&deep), PASS);
    assert_eq!(p.counters()["unparsed"], 1);
}

#[test]
fn deny_and_allow_lists() {
    let Some(_g) = guard() else { return };
    let p = Program::load(
        "rate = 1\nburst = 1\ndeny = [\"203.0.113.0/24\"]\nallow = [\"198.51.100.0/28\"]",
    );
    assert_eq!(p.run(&v4_frame([203, 0, 113, 77], tcp(PORT, ACK), 6)), DROP);
    assert_eq!(p.counters()["dropped_deny"], 1);
    // Denied traffic to other ports is not the gateway's business.
    assert_eq!(p.run(&v4_frame([203, 0, 113, 77], tcp(22, ACK), 6)), PASS);
    // The allow list bypasses the 1 packet/s limit.
    for _ in 0..5 {
        assert_eq!(p.run(&v4_frame([198, 51, 100, 3], tcp(PORT, ACK), 6)), PASS);
    }
    assert_eq!(p.counters()["allowed"], 5);
    // Outside the allowed /28 the limit applies.
    assert_eq!(
        p.run(&v4_frame([198, 51, 100, 30], tcp(PORT, ACK), 6)),
        PASS
    );
    assert_eq!(
        p.run(&v4_frame([198, 51, 100, 30], tcp(PORT, ACK), 6)),
        DROP
    );
}

#[test]
fn packet_bucket_bursts_then_refills() {
    let Some(_g) = guard() else { return };
    let p = Program::load("rate = 100\nburst = 3");
    let frame = v4_frame([198, 51, 100, 9], tcp(PORT, ACK), 6);
    let verdicts: Vec<u32> = (0..4).map(|_| p.run(&frame)).collect();
    assert_eq!(
        verdicts,
        [PASS, PASS, PASS, DROP],
        "a burst of 3, then the limit"
    );
    let s = p.source("198.51.100.9").unwrap();
    assert_eq!((s.packets, s.drops), (4, 1));
    // 100/s: one more packet after 10 ms.
    thread::sleep(Duration::from_millis(15));
    assert_eq!(p.run(&frame), PASS);
    assert_eq!(p.run(&frame), DROP);
    assert_eq!(p.counters()["dropped_rate"], 2);
}

#[test]
fn syn_bucket_limits_new_connections_only() {
    let Some(_g) = guard() else { return };
    let p = Program::load("syn_rate = 10\nsyn_burst = 2");
    let syn = v4_frame([198, 51, 100, 10], tcp(PORT, SYN), 6);
    let ack = v4_frame([198, 51, 100, 10], tcp(PORT, ACK), 6);
    let synack = v4_frame([198, 51, 100, 10], tcp(PORT, SYN | ACK), 6);
    assert_eq!([p.run(&syn), p.run(&syn), p.run(&syn)], [PASS, PASS, DROP]);
    assert_eq!(
        [p.run(&ack), p.run(&synack), p.run(&ack)],
        [PASS, PASS, PASS],
        "established traffic is not a new connection"
    );
    assert_eq!(p.counters()["dropped_syn_rate"], 1);
}

#[test]
fn bans_drop_until_they_expire() {
    let Some(_g) = guard() else { return };
    let mut p = Program::load("");
    let frame = v4_frame([198, 51, 100, 11], tcp(PORT, ACK), 6);
    p.ban("198.51.100.11", 150_000_000);
    assert_eq!(p.run(&frame), DROP);
    assert_eq!(
        p.run(&v4_frame([198, 51, 100, 12], tcp(PORT, ACK), 6)),
        PASS,
        "only the banned source"
    );
    thread::sleep(Duration::from_millis(200));
    assert_eq!(p.run(&frame), PASS, "the ban expired by itself");
    assert_eq!(p.counters()["dropped_ban"], 1);
    assert_eq!(p.source("198.51.100.11").unwrap().drops, 1);
}

#[test]
fn admission_is_exact_across_cpus() {
    let Some(_g) = guard() else { return };
    let cpus = std::thread::available_parallelism().unwrap().get();
    // A burst of 3000 and a refill too slow to matter: exactly 3000 packets may pass.
    let p = Program::load("rate = 1\nburst = 3000");
    let frame = v4_frame([198, 51, 100, 13], tcp(PORT, ACK), 6);
    let per_thread = 4000u32;
    let threads = cpus.max(2);
    thread::scope(|s| {
        for cpu in 0..threads {
            let (p, frame) = (&p, &frame);
            s.spawn(move || {
                core_affinity::set_for_current(core_affinity::CoreId { id: cpu % cpus });
                p.run_repeat(frame, per_thread);
            });
        }
    });
    let c = p.counters();
    let total = u64::from(per_thread) * threads as u64;
    let state = p.source("198.51.100.13").unwrap();
    assert_eq!(state.packets, total, "no lost counts: {c:?}");
    assert_eq!(c["passed"], 3000, "exactly the burst is admitted: {c:?}");
    assert_eq!(
        c["passed"] + c["dropped_rate"] + c["contended"],
        total,
        "{c:?}"
    );
    assert_eq!(state.drops, c["dropped_rate"]);
}
