//! A real redis-server on a free loopback port, persistence off, killed when dropped.

use std::{
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start(port: u16) -> Option<Redis> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            thread::sleep(Duration::from_millis(20));
        }
        Some(Redis { child, port })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether redis-server can run here; without it the test says so loudly, and fails where
/// privileged prerequisites are required (CI).
pub fn redis_available(test: &str) -> bool {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    if std::env::var_os("PORTCULLIS_REQUIRE_PRIVILEGED").is_some_and(|v| v == "1") {
        panic!("redis-server is required (apt-get install redis-server)");
    }
    eprintln!("\n*** SKIPPED {test}: redis-server is not installed ***\n");
    false
}
