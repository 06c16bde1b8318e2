//! The byte tunnel after a protocol upgrade (101 Switching Protocols): both directions are
//! copied until each side has finished sending.

use std::net::Shutdown;

use crate::io::Transport;

/// Copies `a -> b` and `b -> a` until both directions reach end of stream. `a_pending` and
/// `b_pending` hold bytes already read from `a` and `b` that must be delivered first.
pub async fn tunnel<A: Transport, B: Transport>(
    a: &A,
    b: &B,
    a_pending: Vec<u8>,
    b_pending: Vec<u8>,
) {
    tokio::join!(pump(a, b, a_pending), pump(b, a, b_pending));
}

async fn pump<R: Transport, W: Transport>(from: &R, to: &W, mut buf: Vec<u8>) {
    loop {
        if !buf.is_empty() {
            let len = buf.len();
            let (res, b) = to.write_all(buf, 0..len).await;
            buf = b;
            if res.is_err() {
                let _ = from.shutdown(Shutdown::Read);
                return;
            }
            buf.clear();
        }
        let (res, b) = from.read(buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => {
                // Pass the end of stream on; the other direction may still be sending.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(_) => {}
        }
    }
}
