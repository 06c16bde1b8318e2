//! `portcullis-backend`: the fixed upstream used by `cargo xtask run` and `cargo xtask bench`.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use portcullis_benches::backend::Options;

#[derive(Parser)]
#[command(
    about = "A fixed HTTP/1.1 backend: /1k and /64k bodies, a 4096-byte JSON object on /json/4096, server-sent events on paths ending in /sse, a greeting elsewhere"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Pin worker i to core (first + i).
    #[arg(long)]
    pin_from_core: Option<usize>,
    /// Add `x-backend: NAME` to every response (to tell servers apart behind a balancer).
    #[arg(long)]
    name: Option<String>,
    /// Wait this many milliseconds before each answer (a slow server); 0: answer at once.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    eprintln!("portcullis-backend listening on {}", args.listen);
    let options = Options {
        name: args.name,
        delay: Duration::from_millis(args.delay_ms),
    };
    portcullis_benches::backend::run(args.listen, args.workers, args.pin_from_core, options)
}
