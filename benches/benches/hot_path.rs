//! Microbenchmarks of the request hot path: head decoding plus route lookup, and the rebuild
//! of the upstream head (header rewrite). Run with `cargo bench -p portcullis-benches`.

use std::{hint::black_box, net::IpAddr, path::Path};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use portcullis::{
    config::{AuthConfig, Config, MAX_HEADERS_CEILING},
    http::{
        request::parse_request,
        target::{normalize_path, PathPolicy},
    },
    routing::RouteTable,
};

const REQUEST: &[u8] = b"GET /v1/users/42?fields=name,email HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\r\nAccept: application/json\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-GB,en;q=0.9\r\nAuthorization: Bearer eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl\r\nX-Request-Id: 7b0c1b1e-7a57-4a3c-9d5e-0b8d0f5f2a11\r\nX-Forwarded-For: 198.51.100.7\r\nConnection: keep-alive\r\n\r\n";

fn table() -> RouteTable {
    let mut src = String::from("[upstreams.api]\nservers = [\"127.0.0.1:9001\"]\n");
    // A realistic table: many hosts and prefixes, the matching route neither first nor last.
    for i in 0..50 {
        src.push_str(&format!("[[routes]]\nmatch = {{ host = \"svc{i}.example.com\", path_prefix = \"/v1/\" }}\nupstream = \"api\"\n"));
        src.push_str(&format!(
            "[[routes]]\nmatch = {{ path_prefix = \"/internal/{i}/\" }}\nupstream = \"api\"\n"
        ));
    }
    src.push_str("[[routes]]\nmatch = { host = \"api.example.com\", path_prefix = \"/v1/\" }\nupstream = \"api\"\nstrip_prefix = true\n");
    src.push_str("[[routes]]\nmatch = { host = \"*.example.com\" }\nupstream = \"api\"\n");
    RouteTable::new(&Config::parse(Path::new("bench.toml"), &src).expect("valid bench config"))
}

/// The upstream head for `req` on `route`, rebuilt into `out` as the request head phase does.
fn rebuild_head(
    out: &mut Vec<u8>,
    req: &portcullis::http::request::RequestHead,
    route: &portcullis::routing::Route,
    peer: IpAddr,
    render: &portcullis::transform::template::RenderContext,
) {
    out.clear();
    portcullis::proxy::upstream_head::write_upstream_request(
        out,
        req,
        route,
        &portcullis::proxy::upstream_head::Identity::default(),
        &AuthConfig::default(),
        peer,
        "http",
        portcullis::proxy::upstream_head::UpstreamHost {
            value: "127.0.0.1:9001",
            fixed: false,
        },
        b"x-request-id: 0123456789abcdef0123456789abcdef\r\n",
        render,
    )
    .unwrap();
}

fn bench(c: &mut Criterion) {
    let routes = table();
    let config = Config::parse(Path::new("b.toml"), "").unwrap();
    let limits = portcullis::proxy::snapshot::ConfigSnapshot::new(config)
        .expect("valid snapshot")
        .limits;
    let mut group = c.benchmark_group("hot_path");
    let mut normalized = Vec::with_capacity(256);
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_head_and_route", |b| {
        b.iter(|| {
            let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS_CEILING];
            let req = parse_request(black_box(REQUEST), &mut headers, &limits, &mut normalized)
                .unwrap()
                .unwrap();
            black_box(
                routes
                    .find(req.route_host, req.path, req.method.as_bytes())
                    .map(|r| r.index),
            )
        })
    });
    // The cost of normalisation alone, inside the figure above: a clean path, and one that
    // needs every rule (dot-segments, double slashes, escapes of unreserved characters).
    let mut path_out = Vec::with_capacity(256);
    for (name, path) in [
        ("normalize_path_clean", &b"/v1/users/42"[..]),
        (
            "normalize_path_dirty",
            &b"/v1/./users//x/..//%34%32/%7Euser%2a"[..],
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                normalize_path(black_box(path), PathPolicy::default(), &mut path_out).unwrap();
                black_box(path_out.len())
            })
        });
    }
    let peer: IpAddr = "203.0.113.9".parse().unwrap();
    let mut out = Vec::with_capacity(4096);
    group.bench_function("parse_route_and_rewrite_head", |b| {
        b.iter(|| {
            let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS_CEILING];
            let req = parse_request(black_box(REQUEST), &mut headers, &limits, &mut normalized)
                .unwrap()
                .unwrap();
            let route = routes
                .find(req.route_host, req.path, req.method.as_bytes())
                .unwrap();
            let render = portcullis::transform::template::RenderContext::of_request(
                &req,
                peer,
                &route.id,
                b"0123456789abcdef0123456789abcdef",
            );
            rebuild_head(&mut out, &req, route, peer, &render);
            black_box(out.len())
        })
    });
    // The same with a regex route, its rewrite and five header rules (issue 17's figure).
    let rules_routes = RouteTable::new(
        &Config::parse(
            Path::new("rules.toml"),
            "[upstreams.api]\nservers = [\"127.0.0.1:9001\"]\n[[routes]]\n\
             match = { path_regex = \"/v1/users/(?<id>[0-9]+)\" }\nupstream = \"api\"\n\
             rewrite = \"/accounts/{path.id}\"\n\
             request_headers = { set = { \"x-user-id\" = \"{path.id}\", \"x-route\" = \"{route}\" }, add = { \"x-rid\" = \"{request_id}\" }, remove = [\"x-debug\"], rename = { \"accept-language\" = \"x-lang\" } }\n",
        )
        .expect("valid bench config"),
    );
    let mut slots = Vec::new();
    group.bench_function("parse_route_and_rewrite_head_with_rules", |b| {
        b.iter(|| {
            let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS_CEILING];
            let req = parse_request(black_box(REQUEST), &mut headers, &limits, &mut normalized)
                .unwrap()
                .unwrap();
            let route = rules_routes
                .find(req.route_host, req.path, req.method.as_bytes())
                .unwrap();
            route
                .path_regex()
                .expect("a regex route")
                .captures(req.path, &mut slots);
            let render = portcullis::transform::template::RenderContext {
                captures: &slots,
                ..portcullis::transform::template::RenderContext::of_request(
                    &req,
                    peer,
                    &route.id,
                    b"0123456789abcdef0123456789abcdef",
                )
            };
            rebuild_head(&mut out, &req, route, peer, &render);
            black_box(out.len())
        })
    });
    // API-key authentication: hash the presented key and compare in constant time.
    let (key, hash) = portcullis::auth::new_key();
    let consumers_config = Config::parse(
        Path::new("c.toml"),
        &format!("[[consumers]]\nid = \"alice\"\napi_keys = [\"{hash}\"]\n"),
    )
    .unwrap();
    let consumers = portcullis::auth::Consumers::new(&consumers_config);
    group.bench_function("api_key_verify", |b| {
        b.iter(|| black_box(consumers.by_api_key(black_box(key.as_bytes()))))
    });
    jwt_benches(&mut group);
    group.finish();
}

/// JWT: signature verification (uncached) and the per-worker cache hit, for RS256 and ES256.
/// Keys come from openssl.
fn jwt_benches(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let dir = std::env::temp_dir().join(format!("portcullis-bench-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let openssl = |args: &[&str]| {
        assert!(std::process::Command::new("openssl")
            .args(args)
            .status()
            .expect("openssl is needed")
            .success())
    };
    for (alg, algorithm) in [("RS256", Algorithm::RS256), ("ES256", Algorithm::ES256)] {
        let private = dir.join(format!("{alg}.pem"));
        let public = dir.join(format!("{alg}.pub.pem"));
        let (private_s, public_s) = (private.to_str().unwrap(), public.to_str().unwrap());
        if alg == "RS256" {
            openssl(&["genrsa", "-out", private_s, "2048"]);
            openssl(&["rsa", "-pubout", "-in", private_s, "-out", public_s]);
        } else {
            // PKCS#8, which jsonwebtoken reads for EC keys.
            openssl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                private_s,
            ]);
            openssl(&["pkey", "-pubout", "-in", private_s, "-out", public_s]);
        }
        let src = format!("[[auth.issuers]]\nissuer = \"bench\"\nalgorithms = [\"{alg}\"]\npem_file = \"{public_s}\"\n");
        let issuers = portcullis::auth::Issuers::start(
            &Config::parse(Path::new("j.toml"), &src).unwrap().auth,
        )
        .unwrap();
        let pem = std::fs::read(&private).unwrap();
        let key = if alg == "RS256" {
            EncodingKey::from_rsa_pem(&pem)
        } else {
            EncodingKey::from_ec_pem(&pem)
        }
        .unwrap();
        let claims = serde_json::json!({"iss": "bench", "sub": "user-1", "exp": 4_000_000_000u64, "scope": "read"});
        let token = encode(&Header::new(algorithm), &claims, &key).unwrap();
        group.bench_function(format!("jwt_{alg}_uncached"), |b| {
            b.iter(|| black_box(issuers.verify(black_box(token.as_bytes())).is_ok()))
        });
        let mut cache = portcullis::auth::TokenCache::new(&AuthConfig::default());
        cache.insert(token.as_bytes(), issuers.verify(token.as_bytes()).unwrap());
        group.bench_function(format!("jwt_{alg}_cached"), |b| {
            b.iter(|| black_box(cache.get(black_box(token.as_bytes())).is_some()))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
