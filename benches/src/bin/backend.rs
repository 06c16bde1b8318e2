//! `portcullis-backend`: the fixed upstream used by `cargo xtask run` and `cargo xtask bench`.

use std::net::SocketAddr;

use clap::Parser;

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
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    eprintln!("portcullis-backend listening on {}", args.listen);
    portcullis_benches::backend::run(args.listen, args.workers, args.pin_from_core)
}
