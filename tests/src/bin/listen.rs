//! `listen PORT`: a TCP echo server on 127.0.0.1:PORT, for tests that need a program (a
//! supervised daemon, say) listening in a workspace. Prints `listening PORT` once it listens.

use std::io::{Read, Write};
use std::net::TcpListener;

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("usage: listen PORT");
            std::process::exit(2)
        });
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| {
        eprintln!("listen: cannot listen on 127.0.0.1:{port}: {e}");
        std::process::exit(1)
    });
    println!(
        "listening {}",
        l.local_addr().map(|a| a.port()).unwrap_or(port)
    );
    for conn in l.incoming().flatten() {
        std::thread::spawn(move || {
            let mut r = match conn.try_clone() {
                Ok(r) => r,
                Err(_) => return,
            };
            let mut w = conn;
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 || w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
    }
}
