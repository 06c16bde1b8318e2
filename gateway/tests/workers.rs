//! The process shape the architecture promises: one worker thread per configured worker, each
//! pinned to its own core, each with its own io_uring instance.

mod support;

use support::*;

#[test]
fn one_pinned_worker_per_core_each_with_an_io_uring() {
    let cores = std::thread::available_parallelism().unwrap().get();
    let gw = Gateway::start("[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = \"auto\"\n\n[[routes]]\nrespond = { status = 200 }\n");
    assert_eq!(
        request(gw.addr, "GET / HTTP/1.1\r\nHost: a\r\n\r\n").status,
        200
    );
    let mut pinned = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", gw.pid())).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap()
        };
        if field("Name:").starts_with("portcullis-w") {
            pinned.push(field("Cpus_allowed_list:"));
        }
    }
    pinned.sort();
    let expected: Vec<String> = (0..cores).map(|c| c.to_string()).collect();
    assert_eq!(
        pinned, expected,
        "one worker per core, each allowed on exactly its own core"
    );
    let rings = std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
        .filter(|target| target.to_string_lossy().contains("io_uring"))
        .count();
    assert!(
        rings >= cores,
        "expected an io_uring per worker, found {rings}"
    );
}
