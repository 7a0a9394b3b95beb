//! Request bodies on the HTTP/1 fast path (one `Content-Length`): they arrive whole, stream as
//! the client sends them, stop at an early answer, and a body that stops or trickles never
//! leaves its upstream connection in the pool. The upstream here reads each body by its
//! `Content-Length` and answers with its length and checksum; it keeps the heads it saw, whose
//! header names in the client's case (hyper would have lowercased them) show that the fast path
//! forwarded the request. Bodies over 64 KiB are streamed full duplex: `/stream` answers as it
//! reads (an echo), so the response comes back while the body still goes up.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{Sidecar, eventually, or_panic, written_whole_then_read};

/// FNV-1a: the checksum both sides compute.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An upstream that reads bodies by their `Content-Length`. `/early` answers 413 with
/// `Connection: close` right after the head, before it reads any of the body (then reads and
/// drops what comes, until the proxy closes, as nginx's lingering close does); `/refuse` the
/// same without `Connection: close`; `/echo10` answers as `/stream` does with an HTTP/1.0
/// head and closes; `/stall` reads 64 KiB of the body and then stops reading; `/stream` answers
/// 200 with the body's length at once and echoes the body as it reads it; `/abort` reads 64 KiB
/// of the body and closes without a word; every other path answers 200 with `x-len` and
/// `x-sum` of the body. `/quick` answers 200 at once and reads the body after.
struct EchoApp {
    address: String,
    heads: Arc<Mutex<Vec<String>>>,
    accepted: Arc<AtomicUsize>,
    /// Connections that ended in the middle of a body.
    cut: Arc<AtomicUsize>,
}

impl EchoApp {
    fn start() -> EchoApp {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let cut = Arc::new(AtomicUsize::new(0));
        let (h, a, c) = (heads.clone(), accepted.clone(), cut.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                a.fetch_add(1, Ordering::SeqCst);
                let (h, c) = (h.clone(), c.clone());
                std::thread::spawn(move || serve(conn, &h, &c));
            }
        });
        EchoApp {
            address,
            heads,
            accepted,
            cut,
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// Asserts that the first request came by the fast path, which forwards header names as
    /// the client sent them.
    #[track_caller]
    fn first_came_by_the_fast_path(&self) {
        assert!(
            self.heads()[0].contains("\r\nHost: a\r\n"),
            "the fast path's"
        );
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn serve(mut conn: TcpStream, heads: &Mutex<Vec<String>>, cut: &AtomicUsize) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
        buf.drain(..end + 4);
        heads.lock().unwrap().push(head.clone());
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let path = head.split(' ').nth(1).unwrap_or("");
        if path == "/refuse" {
            let _ = conn
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo long");
            while matches!(conn.read(&mut chunk), Ok(n) if n > 0) {}
            return;
        }
        if path == "/quick" {
            // Answers at once, then reads the body (as nginx's `return` does).
            if conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .is_err()
            {
                return;
            }
            while buf.len() < length {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => {
                        cut.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..length);
            continue;
        }
        if path == "/echo10" {
            // Python's http.server: an HTTP/1.0 answer at once, then the echo as the body is
            // read, then the close.
            let answer = format!("HTTP/1.0 200 OK\r\nContent-Length: {length}\r\n\r\n");
            if conn.write_all(answer.as_bytes()).is_err() {
                return;
            }
            let mut echoed = 0;
            while echoed < length {
                let n = buf.len().min(length - echoed);
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
                buf.clear();
                echoed += n;
                if echoed < length {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            }
            return;
        }
        if path == "/stall" {
            // Reads 64 KiB of the body, then stops reading (a hung app) until the proxy
            // gives up on it.
            while buf.len() < 64 * 1024 {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            std::thread::sleep(Duration::from_secs(15));
            return;
        }
        if path == "/abort" {
            while buf.len() < 64 * 1024 {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            return;
        }
        if path == "/stream" {
            let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n");
            if conn.write_all(answer.as_bytes()).is_err() {
                return;
            }
            let mut echoed = 0;
            loop {
                let n = buf.len().min(length - echoed);
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
                buf.drain(..n);
                echoed += n;
                if echoed == length {
                    break;
                }
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => {
                        cut.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            continue;
        }
        if head.starts_with("POST /early ") || head.starts_with("PUT /early ") {
            let _ = conn.write_all(
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo long",
            );
            // Lingers (as nginx does) so that the proxy reads the answer before any reset.
            while matches!(conn.read(&mut chunk), Ok(n) if n > 0) {}
            return;
        }
        while buf.len() < length {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    cut.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        let answer = format!(
            "HTTP/1.1 200 OK\r\nx-len: {}\r\nx-sum: {:x}\r\nContent-Length: 2\r\n\r\nok",
            body.len(),
            fnv(&body)
        );
        if conn.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn sidecar(app: &EchoApp, limits: &str, telemetry: &str) -> Sidecar {
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    limits: {{ {limits} }}\n    routes:\n      - timeout: 30s\n{telemetry}",
        app.address
    ));
    sc.wait_ready();
    sc
}

fn connect(sc: &Sidecar) -> TcpStream {
    let s = TcpStream::connect(&sc.listeners["public"]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads one response (its head and a `Content-Length` body) from `s`, keeping what follows in
/// `rest`.
fn response(s: &mut TcpStream, rest: &mut Vec<u8>) -> String {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&rest[..end + 4]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if rest.len() >= end + 4 + length {
                let whole: Vec<u8> = rest.drain(..end + 4 + length).collect();
                return String::from_utf8_lossy(&whole).into_owned();
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return String::from_utf8_lossy(rest).into_owned(),
            Ok(n) => rest.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Everything `s` receives until the connection ends (or its read timeout), as text.
fn to_the_end(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A sidecar with `min_body_rate` (1000 bytes a second after a second's grace) in front of
/// `app`, its answer to a POST of `length` bytes whose client sends 20,000 and stops, and the
/// client's connection, still open on our side (so that what the sidecar does next is its own
/// doing, not an answer to the client leaving). The answer must end with the sidecar's close,
/// not with the client's read timeout.
fn stopped_body(app: &EchoApp, length: usize) -> (Sidecar, TcpStream, String) {
    let sc = sidecar(
        app,
        "min_body_rate: { bytes_per_second: 1000, grace: 1s }",
        "",
    );
    let mut s = connect(&sc);
    s.write_all(
        format!("POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: {length}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    s.write_all(&body(20_000)).unwrap();
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the sidecar never closed the connection after its answer: {}\n{}",
            String::from_utf8_lossy(&out),
            sc.diagnostics()
        );
    }
    (sc, s, String::from_utf8_lossy(&out).into_owned())
}

fn body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// POST and PUT bodies of 0, 1, 64 KiB and 1 MiB arrive intact, one after another on one
/// keep-alive connection (and on one upstream connection); then a 64 KiB body written in 100
/// byte pieces.
#[test]
fn bodies_of_every_size_arrive_intact_on_the_fast_path() {
    let app = EchoApp::start();
    let sc = sidecar(&app, "", "");
    let mut s = connect(&sc);
    let mut rest = Vec::new();
    let mut sent = 0;
    for method in ["POST", "PUT"] {
        for len in [0, 1, 64 * 1024, 1 << 20] {
            let data = body(len);
            let mut req =
                format!("{method} /echo HTTP/1.1\r\nHost: a\r\nContent-Length: {len}\r\n\r\n")
                    .into_bytes();
            req.extend_from_slice(&data);
            s.write_all(&req).unwrap();
            let out = response(&mut s, &mut rest);
            assert!(out.starts_with("HTTP/1.1 200"), "{method} {len}: {out}");
            assert!(
                out.contains(&format!("x-len: {len}\r\n"))
                    && out.contains(&format!("x-sum: {:x}\r\n", fnv(&data))),
                "{method} {len}: {out}"
            );
            sent += 1;
        }
    }
    // Written in small pieces, the first with the head.
    let data = body(64 * 1024);
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 65536\r\n\r\n")
        .unwrap();
    for (i, piece) in data.chunks(100).enumerate() {
        s.write_all(piece).unwrap();
        if i.is_multiple_of(64) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let out = response(&mut s, &mut rest);
    assert!(
        out.contains(&format!("x-sum: {:x}\r\n", fnv(&data))),
        "{out}"
    );
    sent += 1;
    let heads = app.heads();
    assert_eq!(heads.len(), sent, "{heads:?}");
    assert!(
        heads
            .iter()
            .all(|h| h.contains("\r\nHost: a\r\n") && h.contains("\r\nContent-Length: ")),
        "forwarded by the fast path (names as sent): {heads:?}"
    );
    assert_eq!(app.accepted(), 1, "one upstream connection, reused");
    // Counted as hyper's path counts them.
    let (_, metrics) = sc.get("/metrics");
    let counted: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("outrigger_http_request_body_bytes_total{")
                && l.contains("listener=\"public\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        counted,
        (2 * (1 + 64 * 1024 + (1 << 20)) + 64 * 1024) as f64,
        "{metrics}"
    );
}

/// A POST and a GET written together: the GET's bytes after the body wait for their turn.
#[test]
fn a_request_pipelined_after_a_body_is_served_next() {
    let app = EchoApp::start();
    let sc = sidecar(&app, "", "");
    let mut s = connect(&sc);
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello worldGET /echo HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .unwrap();
    let mut rest = Vec::new();
    let first = response(&mut s, &mut rest);
    let second = response(&mut s, &mut rest);
    assert!(
        first.starts_with("HTTP/1.1 200")
            && first.contains(&format!("x-sum: {:x}\r\n", fnv(b"hello world"))),
        "{first}"
    );
    assert!(
        second.starts_with("HTTP/1.1 200") && second.contains("x-len: 0\r\n"),
        "{second}"
    );
    let heads = app.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(heads[0].starts_with("POST /echo") && heads[1].starts_with("GET /echo"));
    assert!(
        heads.iter().all(|h| h.contains("\r\nHost: a\r\n")),
        "{heads:?}"
    );
}

/// An upstream that answers 413 before reading the body: the client, still sending its 4 MiB,
/// gets the 413 (with `connection: close`: the rest of its body is not read), and the next
/// request goes on a new upstream connection.
#[test]
fn an_early_answer_reaches_a_client_still_sending() {
    let app = EchoApp::start();
    let sc = sidecar(&app, "", "");
    let mut s = connect(&sc);
    s.write_all(b"POST /early HTTP/1.1\r\nHost: a\r\nContent-Length: 4194304\r\n\r\n")
        .unwrap();
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let data = body(4 << 20);
        for piece in data.chunks(16 * 1024) {
            if writer.write_all(piece).is_err() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    });
    let out = to_the_end(&mut s);
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(
        out.contains("connection: close\r\n") && out.ends_with("too long"),
        "{out}"
    );
    let _ = sender.join();
    let mut s = connect(&sc);
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        .unwrap();
    let out = response(&mut s, &mut Vec::new());
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(
        app.accepted(),
        2,
        "the first upstream connection was not reused"
    );
}

/// A client that stops sending mid-body is cut by `min_body_rate` (408, connection closed), and
/// its upstream connection is not reused: the upstream sees it end mid-body, and the next
/// request goes on a new one.
#[test]
fn a_body_that_stops_gets_408_and_its_upstream_connection_is_dropped() {
    let app = EchoApp::start();
    let (sc, _client, out) = stopped_body(&app, 100_000);
    assert!(
        out.starts_with("HTTP/1.1 408"),
        "{out}\n{}",
        sc.diagnostics()
    );
    assert!(
        out.contains("min_body_rate") && out.contains("connection: close\r\n"),
        "{out}"
    );
    eventually(
        Duration::from_secs(5),
        "the upstream connection closed",
        || (app.cut.load(Ordering::SeqCst) == 1).then_some(()),
    );
    app.first_came_by_the_fast_path();
    let mut s = connect(&sc);
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        .unwrap();
    let out = response(&mut s, &mut Vec::new());
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(app.accepted(), 2);
}

/// A body shorter than its `Content-Length`, then the client's close: the upstream connection
/// is dropped (never pooled with half a body in it), and the access log says 400 `bad-request`
/// with the length the client stated, as hyper's path does.
#[test]
fn a_body_cut_short_by_its_client_is_logged_and_its_upstream_connection_dropped() {
    let app = EchoApp::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let sc = sidecar(
        &app,
        "",
        &format!("telemetry:\n  access_log: {{ to: {} }}\n", log.display()),
    );
    let mut s = connect(&sc);
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")
        .unwrap();
    s.write_all(&body(30_000)).unwrap();
    eventually(Duration::from_secs(5), "the head upstream", || {
        (!app.heads().is_empty()).then_some(())
    });
    s.shutdown(Shutdown::Write).unwrap();
    let out = to_the_end(&mut s);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    eventually(
        Duration::from_secs(5),
        "the upstream connection closed",
        || (app.cut.load(Ordering::SeqCst) == 1).then_some(()),
    );
    let line: serde_json::Value = eventually(Duration::from_secs(5), "a log line", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .next()
            .map(|l| serde_json::from_str(l).unwrap())
    });
    assert_eq!(line["status"], 400, "{line}");
    assert_eq!(line["error"], "bad-request", "{line}");
    assert_eq!(line["bytes_in"], 100000, "{line}");
    let mut s = connect(&sc);
    s.write_all(b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        .unwrap();
    let out = response(&mut s, &mut Vec::new());
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(app.accepted(), 2);
}

/// `Connection: content-length` must not strip the header that frames the body: the upstream
/// sees one POST with its whole body (which reads like a request of its own), never the body as
/// a second request (request smuggling).
#[test]
fn a_connection_header_naming_content_length_smuggles_nothing() {
    let app = EchoApp::start();
    let sc = sidecar(&app, "", "");
    let mut s = connect(&sc);
    let smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    for token in [
        "content-length",
        "Content-Length, keep-alive",
        "host",
        "transfer-encoding",
    ] {
        let mut req = format!(
            "POST /echo HTTP/1.1\r\nHost: a\r\nConnection: {token}\r\nContent-Length: {}\r\n\r\n",
            smuggled.len()
        )
        .into_bytes();
        req.extend_from_slice(smuggled);
        s.write_all(&req).unwrap();
        let out = response(&mut s, &mut Vec::new());
        assert!(
            out.starts_with("HTTP/1.1 200")
                && out.contains(&format!("x-sum: {:x}\r\n", fnv(smuggled))),
            "{token}: {out}\n{}",
            sc.diagnostics()
        );
    }
    let heads = app.heads();
    assert_eq!(heads.len(), 4, "{heads:?}");
    assert!(
        heads.iter().all(|h| h.starts_with("POST /echo ")),
        "{heads:?}"
    );
}

/// A body of up to 64 KiB is read whole before anything goes upstream: one that stops gets 408
/// from `min_body_rate` and the upstream never saw its head (nor a connection); one that comes
/// slowly but in time arrives in one piece.
#[test]
fn a_small_body_is_read_whole_before_the_upstream_sees_it() {
    let app = EchoApp::start();
    let (sc, _client, out) = stopped_body(&app, 60_000);
    assert!(
        out.starts_with("HTTP/1.1 408") && out.contains("connection: close\r\n"),
        "{out}\n{}",
        sc.diagnostics()
    );
    assert!(app.heads().is_empty(), "{:?}", app.heads());
    assert_eq!(
        app.accepted(),
        0,
        "no upstream connection for a body not read"
    );
    // In three pieces, 300 ms apart: the upstream gets it whole, with the fast path's head.
    let mut s = connect(&sc);
    let data = body(3000);
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3000\r\n\r\n")
        .unwrap();
    for piece in data.chunks(1000) {
        std::thread::sleep(Duration::from_millis(300));
        assert!(app.heads().is_empty(), "sent before the body was whole");
        s.write_all(piece).unwrap();
    }
    let out = response(&mut s, &mut Vec::new());
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains(&format!("x-sum: {:x}\r\n", fnv(&data))),
        "{out}\n{}",
        sc.diagnostics()
    );
    app.first_came_by_the_fast_path();
}

/// The route's timeout while a small body is still coming: 408, nothing upstream.
#[test]
fn a_small_body_later_than_the_route_timeout_gets_408() {
    let app = EchoApp::start();
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    routes:\n      - timeout: 500ms\n",
        app.address
    ));
    sc.wait_ready();
    let mut s = connect(&sc);
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
        .unwrap();
    let out = to_the_end(&mut s);
    assert!(
        out.starts_with("HTTP/1.1 408") && out.contains("did not arrive within"),
        "{out}\n{}",
        sc.diagnostics()
    );
    assert_eq!(app.accepted(), 0);
}

/// The connection's read buffer does not grow with the requests it carries: 1000 POSTs of
/// 256 KiB pipelined on one connection (so that every read finds the socket full) leave the
/// proxy's resident memory about where the first ones did (the buffer grew 8 KiB a request).
#[test]
fn many_large_bodies_on_one_connection_do_not_grow_its_buffer() {
    fn rss_kib(pid: i32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    }
    let app = EchoApp::start();
    let sc = sidecar(&app, "", "");
    let mut s = connect(&sc);
    let data = body(256 * 1024);
    let mut req = format!(
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        data.len()
    )
    .into_bytes();
    req.extend_from_slice(&data);
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for _ in 0..1000 {
            writer.write_all(&req).unwrap();
        }
    });
    let mut rest = Vec::new();
    let mut before = 0;
    for i in 0..1000 {
        let out = response(&mut s, &mut rest);
        assert!(
            out.starts_with("HTTP/1.1 200"),
            "{i}: {out}\n{}",
            sc.diagnostics()
        );
        if i == 49 {
            before = rss_kib(sc.pid());
        }
    }
    sender.join().unwrap();
    let after = rss_kib(sc.pid());
    assert!(
        after < before + 512,
        "resident memory grew from {before} KiB to {after} KiB\n{}",
        sc.diagnostics()
    );
}

/// Writes the request `method_path` (`POST /echo`) with `data` as its body (its length the
/// `Content-Length`) to `s` from a thread (so that the test reads meanwhile); the thread says
/// whether all of it was written.
fn send_in_background(
    s: &TcpStream,
    method_path: &str,
    data: Vec<u8>,
) -> std::thread::JoinHandle<bool> {
    let head = format!(
        "{method_path} HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        data.len()
    );
    let mut writer = s.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::thread::spawn(move || {
        writer.write_all(head.as_bytes()).is_ok()
            && data
                .chunks(64 * 1024)
                .all(|piece| writer.write_all(piece).is_ok())
    })
}

/// Reads a response head from `s`; returns it and the body bytes read with it.
fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end + 4]).into_owned();
            return (head, got.split_off(end + 4));
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return (String::from_utf8_lossy(&got).into_owned(), Vec::new()),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An upstream that echoes the body as it reads it, 8 MiB (more than the socket buffers on
/// either side hold): the response comes back while the body still goes up, the exchange
/// completes, and both connections stay open for the next request.
#[test]
fn an_echo_of_8_mib_streams_both_ways_at_once() {
    let app = EchoApp::start();
    let sc = sidecar(&app, "", "");
    let mut s = connect(&sc);
    let data = body(8 << 20);
    let sender = send_in_background(&s, "POST /stream", data.clone());
    let (head, mut echoed) = read_head(&mut s);
    assert!(
        head.starts_with("HTTP/1.1 200") && !head.contains("connection: close"),
        "{head}\n{}",
        sc.diagnostics()
    );
    let mut chunk = vec![0u8; 64 * 1024];
    while echoed.len() < data.len() {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => echoed.extend_from_slice(&chunk[..n]),
        }
    }
    assert_eq!(echoed.len(), data.len(), "{}", sc.diagnostics());
    assert!(echoed == data, "the echo differs");
    assert!(sender.join().unwrap(), "the body was written whole");
    // The same client and upstream connections go on.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        .unwrap();
    let out = response(&mut s, &mut Vec::new());
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(app.accepted(), 1, "the upstream connection was reused");
    assert!(
        app.heads()
            .iter()
            .all(|h| h.contains("\r\nHost: a\r\nContent-Length: ")),
        "forwarded by the fast path: {:?}",
        app.heads()
    );
}

/// An upstream that answers 413 (without `Connection: close`) to a large body it does not
/// read: the client hears the 413 with `connection: close` while it still sends, and the
/// upstream connection, which did not get the body, is not reused. 32 MiB: loopback sockets'
/// buffers (two hops, autotuned to a few MiB each) could take a 1 MiB body whole before the
/// upstream answers, and then the answer rightly keeps the connection (this test flaked so
/// under load with 1 MiB).
#[test]
fn an_early_413_on_a_large_body_reaches_the_client() {
    let app = EchoApp::start();
    let sc = sidecar(&app, "", "");
    let mut s = connect(&sc);
    let sender = send_in_background(&s, "PUT /refuse", body(32 << 20));
    let out = to_the_end(&mut s);
    assert!(
        out.starts_with("HTTP/1.1 413") && out.contains("connection: close\r\n"),
        "{out}\n{}",
        sc.diagnostics()
    );
    assert!(out.ends_with("too long"), "{out}");
    let _ = sender.join();
    app.first_came_by_the_fast_path();
    let mut s = connect(&sc);
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        .unwrap();
    let out = response(&mut s, &mut Vec::new());
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(app.accepted(), 2, "a new upstream connection");
}

/// A client that goes away in the middle of its body while the echo comes back: the upstream
/// sees its connection end mid-body (nothing hangs), the access log says `client-closed`, and
/// the proxy serves the next client on a new upstream connection.
#[test]
fn a_client_that_aborts_mid_body_ends_the_upstream_exchange() {
    let app = EchoApp::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let sc = sidecar(
        &app,
        "",
        &format!("telemetry:\n  access_log: {{ to: {} }}\n", log.display()),
    );
    let mut s = connect(&sc);
    s.write_all(b"POST /stream HTTP/1.1\r\nHost: a\r\nContent-Length: 1048576\r\n\r\n")
        .unwrap();
    s.write_all(&body(100_000)).unwrap();
    let (head, _) = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(s);
    eventually(
        Duration::from_secs(5),
        "the upstream connection closed mid-body",
        || (app.cut.load(Ordering::SeqCst) == 1).then_some(()),
    );
    let line: serde_json::Value = eventually(Duration::from_secs(5), "a log line", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .next()
            .map(|l| serde_json::from_str(l).unwrap())
    });
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["error"], "client-closed", "{line}");
    assert_eq!(line["bytes_in"], 1048576, "{line}");
    app.first_came_by_the_fast_path();
    let mut s = connect(&sc);
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        .unwrap();
    let out = response(&mut s, &mut Vec::new());
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(app.accepted(), 2);
}

/// An upstream that closes after 64 KiB of a 1 MiB body, without an answer: the client gets
/// 502 `upstream-reset` (read by its length: the connection closes only if the client still
/// owed some of its body).
#[test]
fn an_upstream_that_aborts_mid_body_gets_the_client_a_502() {
    let app = EchoApp::start();
    let sc = sidecar(&app, "", "");
    let mut s = connect(&sc);
    let sender = send_in_background(&s, "POST /abort", body(1 << 20));
    // `connection: close` only if the client still owed some of its body when the upstream
    // broke off (the socket buffers may have taken all of it by then).
    let out = response(&mut s, &mut Vec::new());
    assert!(
        out.starts_with("HTTP/1.1 502") && out.contains("x-outrigger-error: upstream-reset\r\n"),
        "{out}\n{}",
        sc.diagnostics()
    );
    let _ = sender.join();
    app.first_came_by_the_fast_path();
}

/// How the tests here tell the paths apart: the fast path forwards header lines as they came
/// (`Host`, `Content-Length`), hyper's path writes names in lower case. A 1 MiB body takes the
/// fast path; the same request with `Expect: 100-continue` (which the fast path leaves to
/// hyper) arrives with hyper's names.
#[test]
fn a_large_body_takes_the_fast_path() {
    let app = EchoApp::start();
    let sc = sidecar(&app, "", "");
    let data = body(1 << 20);
    for expect in ["", "Expect: 100-continue\r\n"] {
        let mut s = connect(&sc);
        let mut req = format!(
            "POST /echo HTTP/1.1\r\nHost: a\r\n{expect}Content-Length: {}\r\n\r\n",
            data.len()
        )
        .into_bytes();
        req.extend_from_slice(&data);
        s.write_all(&req).unwrap();
        let mut rest = Vec::new();
        let mut out = response(&mut s, &mut rest);
        if out.starts_with("HTTP/1.1 100") {
            out = response(&mut s, &mut rest);
        }
        assert!(
            out.starts_with("HTTP/1.1 200")
                && out.contains(&format!("x-sum: {:x}\r\n", fnv(&data))),
            "{expect}: {out}"
        );
    }
    let heads = app.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(
        heads[0].contains("\r\nHost: a\r\nContent-Length: 1048576\r\n"),
        "the fast path's: {}",
        heads[0]
    );
    assert!(
        heads[1].contains("\r\nhost: a\r\n")
            && heads[1].contains("\r\ncontent-length: 1048576\r\n"),
        "hyper's: {}",
        heads[1]
    );
}

/// An upstream that answers at once and reads the 1 MiB body after (as nginx's `return`): the
/// rest of the body still goes up after the answer, and both connections go on.
#[test]
fn an_answer_before_the_body_lets_the_body_finish() {
    let app = EchoApp::start();
    let sc = sidecar(&app, "", "");
    let mut s = connect(&sc);
    let sender = send_in_background(&s, "POST /quick", body(1 << 20));
    let mut rest = Vec::new();
    let out = response(&mut s, &mut rest);
    assert!(
        out.starts_with("HTTP/1.1 200") && !out.contains("connection: close"),
        "{out}\n{}",
        sc.diagnostics()
    );
    assert!(sender.join().unwrap(), "the body was written whole");
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        .unwrap();
    let out = response(&mut s, &mut rest);
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "{out}\n{}",
        sc.diagnostics()
    );
    assert_eq!(app.accepted(), 1, "the upstream connection was reused");
    assert_eq!(app.cut.load(Ordering::SeqCst), 0);
    app.first_came_by_the_fast_path();
}

/// An HTTP/1.0 upstream (Python's http.server) that answers 200 with the length at once and
/// echoes the 8 MiB body (more than the socket buffers hold) as it reads it: the body keeps going up after that answer (an
/// HTTP/1.0 answer is no error), the echo comes back whole, and the client is told its
/// connection closes only if it still owed some of its body.
#[test]
fn an_http_1_0_echo_gets_the_whole_body() {
    let app = EchoApp::start();
    let sc = sidecar(&app, "", "");
    let mut s = connect(&sc);
    let data = body(8 << 20);
    let sender = send_in_background(&s, "POST /echo10", data.clone());
    let (head, mut echoed) = read_head(&mut s);
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "{head}\n{}",
        sc.diagnostics()
    );
    let mut chunk = vec![0u8; 64 * 1024];
    while echoed.len() < data.len() {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => echoed.extend_from_slice(&chunk[..n]),
        }
    }
    assert_eq!(echoed.len(), data.len(), "{}", sc.diagnostics());
    assert!(echoed == data, "the echo differs");
    assert!(sender.join().unwrap(), "the body was written whole");
    app.first_came_by_the_fast_path();
}

/// An upstream that stops reading in the middle of an 8 MiB body (a hung app): the route's
/// timeout gets the client 504 (the upstream's fault, not the client's 408), and the client's
/// connection closes.
#[test]
fn an_upstream_that_stops_reading_mid_body_gets_504() {
    let app = EchoApp::start();
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    routes:\n      - timeout: 1s\n",
        app.address
    ));
    sc.wait_ready();
    let mut s = connect(&sc);
    let sender = send_in_background(&s, "POST /stall", body(8 << 20));
    let (head, _) = read_head(&mut s);
    assert!(
        head.starts_with("HTTP/1.1 504") && head.contains("connection: close\r\n"),
        "{head}\n{}",
        sc.diagnostics()
    );
    let _ = sender.join();
    app.first_came_by_the_fast_path();
}

/// A `Content-Length` over `limits.max_request_body` is answered 413 `body-too-large` by the
/// fast path, which then reads and drops the body the client still sends (its lingering
/// close): a client that writes its whole 64 MiB body before it reads gets its 413, every time,
/// where a close at once would meet it with a reset. 64 MiB: more than loopback's socket
/// buffers take (`net.ipv4.tcp_rmem` lets one grow to 32 MiB), which would otherwise swallow it
/// all before the close. The upstream never sees the request; the answer is counted, and its
/// access log line is field for field the one hyper's path writes (a listener with a rate limit
/// is hyper's).
#[test]
fn a_body_over_max_request_body_written_whole_before_reading_gets_its_413() {
    let app = EchoApp::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let routes = "    limits: { max_request_body: 1MiB }\n    routes:\n      - timeout: 30s\n";
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n{routes}  - name: hyper\n    address: 127.0.0.1:0\n    limits: {{ max_request_body: 1MiB, rate_limit: {{ requests_per_second: 100000, burst: 100000 }} }}\n    routes:\n      - timeout: 30s\ntelemetry:\n  access_log: {{ to: {} }}\n",
        app.address,
        log.display()
    ));
    sc.wait_ready();
    let data = body(64 << 20);
    let head =
        b"PUT /echo HTTP/1.1\r\nHost: a\r\nx-request-id: big\r\nContent-Length: 67108864\r\n\r\n";
    for i in 0..5 {
        let out = or_panic(
            written_whole_then_read(&sc.listeners["public"], head, &data),
            || format!("attempt {i}\n{}", sc.diagnostics()),
        );
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
        assert!(
            out.contains("\r\nx-outrigger-error: body-too-large\r\n")
                && out.contains("\r\nconnection: close\r\n")
                && out.ends_with("limits.max_request_body)\n"),
            "{out}"
        );
    }
    assert_eq!(app.accepted(), 0, "the upstream saw {:?}", app.heads());
    assert_eq!(
        sc.metric("outrigger_http_responses_total{direction=\"inbound\",listener=\"public\",route=\"0\",cluster=\"app\",class=\"4xx\",error=\"body-too-large\"}"),
        5.0,
        "{}",
        sc.diagnostics()
    );
    assert_eq!(
        sc.metric("outrigger_http_requests_total{direction=\"inbound\",listener=\"public\",route=\"0\",cluster=\"app\"}"),
        5.0
    );
    // hyper's path, for its record: the head alone (its answer comes before any body).
    let mut s = TcpStream::connect(&sc.listeners["hyper"]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(out.starts_with(b"HTTP/1.1 413"));
    let lines: Vec<serde_json::Value> = eventually(Duration::from_secs(5), "6 log lines", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        (lines.len() == 6).then_some(lines)
    });
    let same = |v: &serde_json::Value| {
        let mut v = v.clone();
        let o = v.as_object_mut().unwrap();
        for k in ["time", "duration_ms", "listener", "span_id", "trace_id"] {
            o.remove(k);
        }
        v
    };
    assert_eq!(
        (
            &lines[0]["status"],
            &lines[0]["error"],
            &lines[0]["bytes_in"]
        ),
        (&413.into(), &"body-too-large".into(), &(64u64 << 20).into()),
        "{}",
        lines[0]
    );
    assert_eq!(lines[5]["listener"], "hyper");
    assert_eq!(
        same(&lines[0]),
        same(&lines[5]),
        "fast path: {}\nhyper: {}",
        lines[0],
        lines[5]
    );
}
