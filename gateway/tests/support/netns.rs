//! Privileged test fixtures: a veth pair with one end in a network namespace the test creates,
//! addresses from 203.0.113.0/24 (TEST-NET-3), unique names, removed on drop (also on panic).
//! Privileged tests serialise on [`PRIVILEGED`].

use std::{process::Command, sync::Mutex};

/// Held by every privileged test: they run one at a time.
pub static PRIVILEGED: Mutex<()> = Mutex::new(());

/// Whether privileged tests can run here. When they cannot: under
/// `PORTCULLIS_REQUIRE_PRIVILEGED=1` (set by `cargo xtask test` as root) the test fails; otherwise
/// it says loudly that it was skipped.
pub fn privileged_or_skip(test: &str) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false);
    let object = std::env::var_os("PORTCULLIS_EBPF_OBJECT")
        .is_some_and(|p| std::path::Path::new(&p).is_file());
    let required = std::env::var_os("PORTCULLIS_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1");
    let missing = match (root, object) {
        (true, true) => return true,
        (false, _) => "root",
        (true, false) => "the XDP object ($PORTCULLIS_EBPF_OBJECT; run `cargo xtask test`)",
    };
    if required {
        panic!("{test}: needs {missing}, and PORTCULLIS_REQUIRE_PRIVILEGED=1");
    }
    eprintln!("\n*** SKIPPED {test}: needs {missing} ***\n");
    false
}

pub fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

pub fn sh_ok(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A veth pair: `host_if` (203.0.113.1) stays in this namespace, `peer_if` (203.0.113.2) lives
/// in namespace `ns`.
pub struct VethNamespace {
    pub ns: String,
    pub host_if: String,
    pub peer_if: String,
    pub host_ip: &'static str,
    pub peer_ip: &'static str,
}

impl VethNamespace {
    /// 203.0.113.1 (host) <-> 203.0.113.2 (namespace).
    pub fn create(tag: &str) -> VethNamespace {
        Self::create_on(tag, ("203.0.113.1", "203.0.113.2"))
    }

    /// A pair on `/24` addresses `(host, peer)`; the namespace routes everything via the host.
    pub fn create_on(tag: &str, (host_ip, peer_ip): (&'static str, &'static str)) -> VethNamespace {
        let id = format!("{}{}", tag, std::process::id() % 100_000);
        let v = VethNamespace {
            ns: format!("pcl-{id}"),
            host_if: format!("pg{id}"),
            peer_if: format!("pp{id}"),
            host_ip,
            peer_ip,
        };
        v.remove();
        sh_ok(&["ip", "netns", "add", &v.ns]);
        sh_ok(&[
            "ip", "link", "add", &v.host_if, "type", "veth", "peer", "name", &v.peer_if,
        ]);
        sh_ok(&["ip", "link", "set", &v.peer_if, "netns", &v.ns]);
        sh_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            &v.host_if,
        ]);
        sh_ok(&["ip", "link", "set", &v.host_if, "up"]);
        v.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{peer_ip}/24"),
            "dev",
            &v.peer_if,
        ]);
        v.exec_ok(&["ip", "link", "set", &v.peer_if, "up"]);
        v.exec_ok(&["ip", "link", "set", "lo", "up"]);
        v.exec_ok(&["ip", "route", "add", "default", "via", host_ip]);
        v
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        let mut full = vec!["ip", "netns", "exec", &self.ns];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed: {}",
            self.ns,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn remove(&self) {
        let _ = sh(&["ip", "link", "del", &self.host_if]);
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}

impl Drop for VethNamespace {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A bpffs mount on a temporary directory, unmounted on drop.
pub struct BpffsDir {
    pub dir: tempfile::TempDir,
}

impl BpffsDir {
    pub fn new() -> BpffsDir {
        let dir = tempfile::tempdir().unwrap();
        sh_ok(&["mount", "-t", "bpf", "bpf", dir.path().to_str().unwrap()]);
        BpffsDir { dir }
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = sh(&["umount", self.dir.path().to_str().unwrap()]);
    }
}
