//! `cargo xtask bench-auth-flood`: what a legitimate client gets from a JWT-protected route
//! while another client floods it with distinct forged tokens, with and without a pre-auth
//! limit, as ratios of the same client's rate without the flood, all in one run.
//!
//! Layout on two cores: the gateway (one worker) and the backend share the first core; both
//! load generators run on the other. The legitimate traffic is closed loop from 64 clients
//! (256 addresses from 127.0.1.1, one connection each) with a valid, cached token. The flood is
//! open loop at a fixed rate from one client, 127.0.0.2; every token differs (the loadgen's
//! `{n}` counter sits inside the signature), so no cache can answer for it and each costs a
//! full RS256 check unless a limit stops it first. The pre-auth limit (per client) sits above
//! what each legitimate client sends, so it bites the flood only.

use std::process::Command;

use anyhow::{bail, Context};

use crate::{
    bench::{layout, load_summary, start_backend, start_gateway},
    workspace_root,
};

const BACKEND_PORT: u16 = 19101;
const GATEWAY_PORT: u16 = 19180;
/// Legitimate clients (one connection each), and the flood's connections and rate.
const CLIENTS: usize = 256;
const FLOOD_CONNECTIONS: usize = 64;
const FLOOD_RATE: u32 = 5_000;
/// The pre-auth limit per client on the limited route: above what each of the legitimate
/// clients sends (their total over 256), far below the flood.
const PRE_AUTH_RATE: u32 = 500;

/// base64url without padding (RFC 7515), for the token's parts.
fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs `header.claims` with openssl (RS256) and returns the token.
fn sign(private_pem: &std::path::Path, claims: &str) -> anyhow::Result<String> {
    let signing_input = format!(
        "{}.{}",
        b64url(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64url(claims.as_bytes())
    );
    let dir = private_pem.parent().context("key directory")?;
    let input = dir.join("signing-input");
    std::fs::write(&input, &signing_input)?;
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(private_pem)
        .arg(&input)
        .output()
        .context("cannot run openssl")?;
    if !out.status.success() {
        bail!("openssl dgst failed");
    }
    Ok(format!("{signing_input}.{}", b64url(&out.stdout)))
}

fn loadgen(
    bin: &std::path::Path,
    core: usize,
    path: &str,
    connections: usize,
    duration: f64,
    extra: &[&str],
) -> anyhow::Result<std::process::Child> {
    crate::bench::LoadgenRun {
        port: GATEWAY_PORT,
        path,
        connections,
        rate: None,
        duration,
        core,
        extra,
    }
    .spawn(bin)
}

pub fn run(duration: f64) -> anyhow::Result<()> {
    let bin = crate::build_release()?;
    let layout = layout();
    let server = &layout.server_cores[..1];
    let load = *layout.load_cores.first().context("no core for the load")?;
    let dir = workspace_root().join("bench-results").join("auth-flood");
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("issuer.pem");
    let public = dir.join("issuer.pub.pem");
    crate::run_checked(
        Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(std::process::Stdio::null()),
    )?;
    crate::run_checked(
        Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public)
            .stderr(std::process::Stdio::null()),
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = format!(
        r#"{{"iss":"https://idp.bench/","sub":"bench-client","exp":{},"iat":{now}}}"#,
        now + 3600
    );
    let good = sign(&key, &claims)?;
    // The same head and claims with a signature that differs per request in its middle: valid
    // base64url of the right length, still below the modulus (the leading bytes are kept) and
    // with the trailing bits intact, so each forged token costs the full RSA check.
    let (signed, signature) = good.rsplit_once('.').context("token")?;
    let forged = format!("{signed}.{}{{n}}{}", &signature[..100], &signature[110..]);
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:{GATEWAY_PORT}\"]\nworkers = 1\n\n\
         [[auth.issuers]]\nissuer = \"https://idp.bench/\"\nalgorithms = [\"RS256\"]\npem_file = \"{}\"\n\n\
         [upstreams.backend]\nservers = [\"127.0.0.1:{BACKEND_PORT}\"]\nmax_idle_per_server = 256\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/open/\" }}\nupstream = \"backend\"\nauth = {{ methods = [\"jwt\"] }}\n\n\
         [[routes]]\nmatch = {{ path_prefix = \"/limited/\" }}\nupstream = \"backend\"\nauth = {{ methods = [\"jwt\"] }}\n\
         pre_auth_limits = [{{ key = \"client\", rate = {PRE_AUTH_RATE}, per = \"1s\" }}]\n",
        public.display()
    );
    let config_path = dir.join("portcullis.toml");
    std::fs::write(&config_path, config)?;
    let _backend = start_backend(&bin, server, BACKEND_PORT, &dir)?;
    let _gateway = start_gateway(&bin, server, &config_path, &dir, GATEWAY_PORT)?;
    let bearer = format!("Authorization: Bearer {good}");
    let junk = format!("Authorization: Bearer {forged}");
    let mut client_args = vec!["--header".to_owned(), bearer];
    for i in 0..CLIENTS {
        client_args.extend([
            "--source".to_owned(),
            format!("127.0.{}.{}", 1 + i / 250, 1 + i % 250),
        ]);
    }
    let client_args: Vec<&str> = client_args.iter().map(String::as_str).collect();
    let client = |route: &str| {
        loadgen(
            &bin,
            load,
            &format!("/{route}/1k"),
            CLIENTS,
            duration,
            &client_args,
        )
    };
    let rate = FLOOD_RATE.to_string();
    let flood = |route: &str| {
        loadgen(
            &bin,
            load,
            &format!("/{route}/1k"),
            FLOOD_CONNECTIONS,
            duration,
            &[
                "--header",
                &junk,
                "--source",
                "127.0.0.2",
                "--any-status",
                "--rate",
                &rate,
            ],
        )
    };
    let mut rows = Vec::new();
    for route in ["open", "limited"] {
        let alone = load_summary(client(route)?)?;
        let (alone, errors) = (alone.rps, alone.errors);
        if errors > 0 {
            bail!("the legitimate clients got {errors} errors without a flood on /{route}/");
        }
        let flooder = flood(route)?;
        let flooded = load_summary(client(route)?)?.rps;
        let flood_rps = load_summary(flooder)?.rps;
        rows.push((route, alone, flooded, flood_rps));
    }
    let mut table = format!(
        "Legitimate clients: {CLIENTS}, closed loop, valid token. Flood: {FLOOD_RATE} distinct forged tokens/s offered from one client.\n\n| route | clients alone (req/s) | clients during flood (req/s) | ratio | flood answered (req/s) |\n|---|---:|---:|---:|---:|\n",
    );
    for (route, alone, flooded, flood_rps) in &rows {
        let name = if *route == "open" {
            "JWT route, no pre-auth limit"
        } else {
            "JWT route, pre-auth limit 500/s per client"
        };
        table.push_str(&format!(
            "| {name} | {alone:.0} | {flooded:.0} | {:.2}x | {flood_rps:.0} |\n",
            flooded / alone
        ));
    }
    println!("{table}");
    std::fs::write(dir.join("results.md"), &table)?;
    Ok(())
}
