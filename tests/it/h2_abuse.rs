//! The abuse guards of Outrigger's own HTTP/2 server (`http2_server: outrigger`) seen from
//! outside: a client that abuses its connection gets GOAWAY ENHANCE_YOUR_CALM and a close,
//! counted once in `outrigger_client_abuse_closes_total` under its guard (not as a stall);
//! the app behind it is not flooded, and another client on another connection is served.
//! Raw frames over a `TcpStream` (h2c with prior knowledge), written and read with
//! `h2_conformance`'s client.

use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::h2_conformance::{
    Client, END_HEADERS, END_STREAM, ENHANCE_YOUR_CALM, GOAWAY, Got, HEADERS, PATIENCE, RST_STREAM,
    block, frame, get,
};
use crate::support::{Sidecar, eventually, or_panic, with_http2_server};

/// The rapid resets the guard allows per 10 s at the default 100 max concurrent streams
/// (max(200, 2 × 100)): the one after them closes the connection.
const RESET_LIMIT: usize = 200;

/// Rapid reset (CVE-2023-44487): 1,000 HEADERS + RST_STREAM(CANCEL) pairs in one burst. The
/// connection is closed with GOAWAY ENHANCE_YOUR_CALM after the guard's 200; the close is
/// counted once under `guard="rapid_reset"` and not as a stall; a well-behaved client on a
/// second connection then gets its 200 over HTTP/2. The GOAWAY is what tells a missing guard:
/// the count of requests that reached the app is only a sanity bound (see there).
#[test]
fn a_rapid_reset_client_is_closed_counted_and_others_served() {
    let app = Backend::http();
    let sc = Sidecar::start(&with_http2_server(
        "outrigger",
        &format!(
            "app:\n  address: {}\n  probe: {{ enabled: false }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n",
            app.address()
        ),
    ));
    sc.wait_ready();
    let addr = sc.listeners["public"].clone();
    let abuse = "outrigger_client_abuse_closes_total{direction=\"inbound\",listener=\"public\",guard=\"rapid_reset\"}";
    let stalls = "outrigger_client_stalls_total{direction=\"inbound\",listener=\"public\"}";
    assert_eq!(sc.metric(abuse), 0.0, "{}", sc.diagnostics());

    let mut c = or_panic(Client::open(&addr, &[]), || sc.diagnostics());
    let head = block(&get("/status/200"));
    let mut burst = Vec::new();
    for i in 0..1000u32 {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &head));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    // The server stops reading at its close: the end of the burst may find the socket shut.
    let wrote = c.write(&burst);
    let deadline = Instant::now() + PATIENCE;
    let goaway = loop {
        match c.next(deadline) {
            Got::Frame(f) if f.kind == GOAWAY => break f,
            Got::Frame(_) => {}
            Got::Closed(e) => panic!(
                "closed without GOAWAY ({e}; burst write: {wrote:?})\n{}",
                sc.diagnostics()
            ),
            Got::Timeout => panic!(
                "no GOAWAY within {PATIENCE:?} (burst write: {wrote:?})\n{}",
                sc.diagnostics()
            ),
        }
    };
    assert_eq!(
        goaway.code(),
        ENHANCE_YOUR_CALM,
        "{}\n{}",
        goaway.describe(),
        sc.diagnostics()
    );
    or_panic(c.closes_after(&goaway.describe()), || sc.diagnostics());

    // Counted once the connection's task has ended, which the client may see just before.
    eventually(Duration::from_secs(10), "the abuse close counted", || {
        (sc.metric(abuse) >= 1.0).then_some(())
    });
    assert_eq!(sc.metric(abuse), 1.0, "one close, one count");
    assert_eq!(sc.metric(stalls), 0.0, "an abuse close is no stall");
    let reached = app.count();
    println!(
        "{} after the burst; {reached} requests reached the app",
        goaway.describe()
    );
    // A sanity bound, not the guard's test: each stream's RST_STREAM comes in the same read
    // as its HEADERS and is processed before the stream's task runs, so about none of the
    // burst reaches the app, guard or no guard (0 were seen). Past the bound, the resets
    // would no longer cancel requests before they leave.
    assert!(
        reached <= RESET_LIMIT + 1,
        "{reached} of the 1,000 reset requests reached the app"
    );

    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .timeout(PATIENCE)
        .no_proxy()
        .build()
        .unwrap();
    let r = h2
        .get(sc.listener_url("public", "/status/200"))
        .send()
        .unwrap_or_else(|e| panic!("a well-behaved client: {e}\n{}", sc.diagnostics()));
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(
        sc.metric(abuse),
        1.0,
        "the well-behaved client is not counted"
    );
}
