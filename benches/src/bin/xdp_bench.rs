//! `xdp_bench` (root): nanoseconds per packet of the XDP program on each path, measured with
//! BPF_PROG_TEST_RUN and a large repeat count. Prints a markdown table.

use std::{net::IpAddr, path::PathBuf};

use anyhow::Context;
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap,
    },
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use clap::Parser;
use portcullis_common::{Settings, SourceKey};

#[derive(Parser)]
struct Args {
    /// The XDP object.
    #[arg(long)]
    object: PathBuf,
    /// Runs per path.
    #[arg(long, default_value_t = 2_000_000)]
    repeat: u32,
}

const PORT: u16 = 8080;

fn frame(src: [u8; 4], dport: u16, tcp_flags: u8) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&[203, 0, 113, 1]);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = tcp_flags;
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn load(object: &[u8], settings: Settings) -> anyhow::Result<Ebpf> {
    let mut ebpf = EbpfLoader::new().load(object)?;
    let prog: &mut Xdp = ebpf
        .program_mut("portcullis")
        .context("program")?
        .try_into()?;
    prog.load()?;
    let mut s: Array<_, Settings> = Array::try_from(ebpf.map_mut("SETTINGS").context("SETTINGS")?)?;
    s.set(0, settings, 0)?;
    let mut ports: HashMap<_, u16, u8> =
        HashMap::try_from(ebpf.map_mut("PORTS").context("PORTS")?)?;
    ports.insert(PORT, 1, 0)?;
    Ok(ebpf)
}

fn ns_per_packet(ebpf: &Ebpf, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, f64)> {
    let prog: &Xdp = ebpf.program("portcullis").context("program")?.try_into()?;
    // Warm the maps (first packets insert state), then measure.
    prog.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat: 16,
        ..Default::default()
    })?;
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    })?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let object =
        std::fs::read(&args.object).with_context(|| format!("read {}", args.object.display()))?;
    let no_limits = Settings {
        ipv6_prefix_len: 64,
        ..Default::default()
    };
    // Limits so loose that a repeated source never reaches them: the full pass path.
    let loose = Settings {
        packet_interval_ns: 1,
        packet_tolerance_ns: u64::MAX / 4,
        syn_interval_ns: 1,
        syn_tolerance_ns: u64::MAX / 4,
        ipv6_prefix_len: 64,
        _reserved: 0,
    };
    let strict = Settings {
        packet_interval_ns: 1_000_000_000,
        packet_tolerance_ns: 0,
        syn_interval_ns: 0,
        syn_tolerance_ns: 0,
        ipv6_prefix_len: 64,
        _reserved: 0,
    };
    let strict_syn = Settings {
        packet_interval_ns: 0,
        packet_tolerance_ns: 0,
        syn_interval_ns: 1_000_000_000,
        syn_tolerance_ns: 0,
        ipv6_prefix_len: 64,
        _reserved: 0,
    };
    let src = [198, 51, 100, 20];
    let mut rows: Vec<(&str, u32, f64)> = Vec::new();

    let e = load(&object, no_limits)?;
    let (v, ns) = ns_per_packet(&e, &frame(src, 22, 0x10), args.repeat)?;
    rows.push(("pass: not a protected port", v, ns));
    let e = load(&object, loose)?;
    let (v, ns) = ns_per_packet(&e, &frame(src, PORT, 0x10), args.repeat)?;
    rows.push(("pass: protected port, under the limits", v, ns));
    let (v, ns) = ns_per_packet(&e, &frame(src, PORT, 0x02), args.repeat)?;
    rows.push(("pass: protected port, SYN under the limits", v, ns));

    let mut e = load(&object, no_limits)?;
    let mut deny: LpmTrie<_, [u8; 4], u8> =
        LpmTrie::try_from(e.map_mut("DENY_V4").context("DENY_V4")?)?;
    for i in 0..1000u32 {
        // A realistic list: a thousand /24s, the source's among them.
        deny.insert(&Key::new(24, [10, (i >> 8) as u8, i as u8, 0]), 1, 0)?;
    }
    deny.insert(&Key::new(24, [198, 51, 100, 0]), 1, 0)?;
    let (v, ns) = ns_per_packet(&e, &frame(src, PORT, 0x10), args.repeat)?;
    rows.push(("drop: deny list (1001 CIDRs)", v, ns));

    let mut e = load(&object, no_limits)?;
    let mut bans: HashMap<_, SourceKey, u64> =
        HashMap::try_from(e.map_mut("BANS").context("BANS")?)?;
    bans.insert(
        portcullis::xdp::source_key(IpAddr::from(src), 64),
        monotonic_ns() + 600_000_000_000,
        0,
    )?;
    let (v, ns) = ns_per_packet(&e, &frame(src, PORT, 0x10), args.repeat)?;
    rows.push(("drop: ban", v, ns));

    let e = load(&object, strict)?;
    let (v, ns) = ns_per_packet(&e, &frame(src, PORT, 0x10), args.repeat)?;
    rows.push(("drop: packet rate", v, ns));
    let e = load(&object, strict_syn)?;
    let (v, ns) = ns_per_packet(&e, &frame(src, PORT, 0x02), args.repeat)?;
    rows.push(("drop: SYN rate", v, ns));

    println!("| path | verdict | ns/packet |\n|---|---|---:|");
    for (name, verdict, ns) in rows {
        let verdict = match verdict {
            1 => "XDP_DROP",
            2 => "XDP_PASS",
            _ => "other",
        };
        println!("| {name} | {verdict} | {ns:.1} |");
    }
    println!(
        "\n{} runs per path with BPF_PROG_TEST_RUN (the kernel's average per run).",
        args.repeat
    );
    Ok(())
}
