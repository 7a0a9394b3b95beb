//! A small HTTP/1.1 keep-alive load generator that can use a unix socket as well as TCP, for
//! `bench/uds.sh`. Standard library only, built with `rustc -O bench/uds-load.rs -o /tmp/uds-load`.
//! `bench/uds.sh` now measures with h2load (`--base-uri=unix:PATH` reaches a unix socket) and
//! runs this one only as a cross-check: a thread per connection costs a context switch per
//! request on the generator's core, which capped it below h2load (docs/BENCHMARKS.md).
//!
//!     uds-load ADDRESS CONNECTIONS SECONDS      ADDRESS: 127.0.0.1:PORT or unix:/path
//!
//! One thread per connection, each sending `GET /` and reading the response (Content-Length
//! bodies only) before the next; prints `req/s p50_ms p99_ms`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

fn connect(address: &str) -> Box<dyn Conn> {
    match address.strip_prefix("unix:") {
        Some(path) => Box::new(UnixStream::connect(path).expect("connect unix")),
        None => {
            let s = TcpStream::connect(address).expect("connect tcp");
            s.set_nodelay(true).unwrap();
            Box::new(s)
        }
    }
}

/// One request's response read whole; false when the connection ended.
fn exchange(conn: &mut dyn Conn, buf: &mut [u8]) -> bool {
    if conn
        .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut have = 0;
    loop {
        let n = match conn.read(&mut buf[have..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        have += n;
        let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..end]).unwrap_or("");
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let total = end + 4 + len;
        while have < total {
            match conn.read(&mut buf[have..total]) {
                Ok(0) | Err(_) => return false,
                Ok(n) => have += n,
            }
        }
        return true;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let address = args.get(1).expect("ADDRESS").clone();
    let conns: usize = args.get(2).map_or(32, |c| c.parse().unwrap());
    let secs: u64 = args.get(3).map_or(5, |s| s.parse().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (address, stop) = (address.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut conn = connect(&address);
                let mut buf = vec![0u8; 64 * 1024];
                let mut latencies = Vec::with_capacity(1 << 20);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if !exchange(&mut *conn, &mut buf) {
                        break;
                    }
                    latencies.push(t.elapsed().as_micros() as u32);
                }
                latencies
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<u32> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort_unstable();
    let pct = |p: f64| all.get((all.len() as f64 * p) as usize).copied().unwrap_or(0) as f64 / 1000.0;
    println!(
        "{:.0} {:.3} {:.3}",
        all.len() as f64 / secs as f64,
        pct(0.5),
        pct(0.99)
    );
}
