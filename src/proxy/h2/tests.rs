//! Tests of the HTTP/2 server: frames in, frames out over an in-memory pipe (every rule and
//! abuse guard), and real clients (curl, nghttp, h2load, the `h2` crate) over loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;

use super::frame::{self, Head, Reason, flag, kind};
use super::{RecvBody, Settings, Shutdown, serve};
use crate::proxy::body::{self, BoxError, ProxyBody};

fn settings() -> Settings {
    Settings {
        max_concurrent_streams: 100,
        max_header_list_size: 16 * 1024,
        initial_window_size: 1024 * 1024,
        connection_window_size: 4 * 1024 * 1024,
        max_frame_size: 16_384,
        stalled_stream_timeout: Duration::from_secs(30),
        on_stalled_stream: None,
    }
}

/// A body of `chunks` frames of `size` bytes each, yielded one at a time.
struct Chunks {
    left: usize,
    size: usize,
    trailers: bool,
    yield_first: bool,
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.yield_first {
            // A body that is not ready at once: the head goes alone.
            self.yield_first = false;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        if self.left == 0 {
            if self.trailers {
                self.trailers = false;
                let mut t = HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                return std::task::Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; self.size])))))
    }
}

/// The test service: `/echo` echoes the body (and its trailers' count in a header), `/big`
/// answers 1 MiB, `/trailers` a body and trailers, `/slow` a body that is not ready at once,
/// `/fail` a body that fails, `/headers` the request's URI and field names, anything else
/// "hello".
async fn service(req: Request<RecvBody>) -> Response<ProxyBody> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/echo" => {
            let len = req.headers().get("content-length").cloned();
            match req.into_body().collect().await {
                Ok(c) => {
                    let trailers = c.trailers().map_or(0, |t| t.len());
                    let mut r = Response::new(body::full(c.to_bytes()));
                    r.headers_mut().insert("x-trailers", trailers.into());
                    if let Some(len) = len {
                        r.headers_mut().insert("x-request-length", len);
                    }
                    r
                }
                Err(e) => {
                    let mut r = Response::new(body::full(e.to_string()));
                    *r.status_mut() = StatusCode::BAD_REQUEST;
                    r
                }
            }
        }
        "/big" => Response::new(body::full(vec![b'b'; 1024 * 1024])),
        "/trailers" => Response::new(
            Chunks {
                left: 3,
                size: 10,
                trailers: true,
                yield_first: false,
            }
            .boxed(),
        ),
        "/slow" => Response::new(
            Chunks {
                left: 20,
                size: 1000,
                trailers: false,
                yield_first: true,
            }
            .boxed(),
        ),
        "/fail" => {
            let body = http_body_util::StreamBody::new(futures_stream(vec![
                Ok(Frame::data(Bytes::from_static(b"part"))),
                Err::<Frame<Bytes>, BoxError>("broken".into()),
            ]));
            Response::new(body.boxed())
        }
        "/headers" => {
            let mut names: Vec<_> = req.headers().keys().map(|k| k.as_str()).collect();
            names.sort();
            let text = format!("{} {:?} {}", req.uri(), req.version(), names.join(","));
            Response::new(body::full(text))
        }
        _ => {
            let mut r = Response::new(body::full("hello"));
            r.headers_mut()
                .insert("content-type", "text/plain".parse().unwrap());
            r.headers_mut()
                .insert("connection", "keep-alive".parse().unwrap());
            r
        }
    }
}

/// A stream of ready items (no futures-util in the default build).
fn futures_stream<T: Send + Sync + 'static>(
    items: Vec<T>,
) -> impl futures_core::Stream<Item = T> + Send + Sync + 'static {
    struct Iter<T>(std::vec::IntoIter<T>);
    impl<T> futures_core::Stream for Iter<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    impl<T> Unpin for Iter<T> {}
    Iter(items.into_iter())
}

/// A loopback server running `serve` with the test service on every connection.
async fn server(settings: Settings) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let settings = settings.clone();
            tokio::spawn(async move {
                let _ = serve(tcp, Bytes::new(), settings, Shutdown::new(), service).await;
            });
        }
    });
    addr
}

fn have(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!(
            "!!!!! SKIPPED: `{tool}` is not installed (apt-get install nghttp2-client curl) !!!!!"
        );
    }
    found
}

async fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_get_post_head() {
    if !have("curl") {
        return;
    }
    let addr = server(settings()).await;
    let base = format!("http://{addr}");
    let out = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "60",
            "-i",
            "--http2-prior-knowledge",
            &format!("{base}/"),
        ],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/2 200"), "{text}");
    assert!(text.contains("content-type: text/plain"), "{text}");
    assert!(!text.contains("connection:"), "{text}");
    assert!(text.ends_with("hello"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    std::fs::write(&file, vec![b'p'; 1024 * 1024]).unwrap();
    let out = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "60",
            "--http2-prior-knowledge",
            "-D",
            "-",
            "--data-binary",
            &format!("@{}", file.display()),
            "-o",
            dir.path().join("echo").to_str().unwrap(),
            &format!("{base}/echo"),
        ],
    )
    .await;
    let head = String::from_utf8_lossy(&out.stdout);
    assert!(head.contains("x-request-length: 1048576"), "{head}");
    assert_eq!(
        std::fs::read(dir.path().join("echo")).unwrap(),
        vec![b'p'; 1024 * 1024]
    );

    let out = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "60",
            "-I",
            "--http2-prior-knowledge",
            &format!("{base}/big"),
        ],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/2 200"), "{text}");

    let out = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "60",
            "--http2-prior-knowledge",
            &format!("{base}/big"),
        ],
    )
    .await;
    assert_eq!(out.stdout.len(), 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nghttp_and_h2load() {
    if !have("nghttp") || !have("h2load") {
        return;
    }
    let addr = server(settings()).await;
    let base = format!("http://{addr}");
    let out = run("nghttp", &["-nv", &format!("{base}/trailers")]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("grpc-status: 0"), "{text}");
    assert!(text.contains("END_STREAM"), "{text}");
    let out = run(
        "h2load",
        &[
            "-n2000",
            "-c4",
            "-m10",
            &format!("{base}/"),
            &format!("{base}/slow"),
        ],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2000 succeeded, 0 failed, 0 errored"),
        "{text}"
    );
    assert!(text.contains("status codes: 2000 2xx"), "{text}");
}

async fn h2_client(
    addr: SocketAddr,
    builder: h2::client::Builder,
) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = builder.handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    client
}

async fn read_all(body: &mut h2::RecvStream) -> Vec<u8> {
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_client_concurrency_trailers_and_reset() {
    let addr = server(settings()).await;
    let client = h2_client(addr, h2::client::Builder::new()).await;
    let mut client = client.ready().await.unwrap();
    // Concurrent streams, each with a body and trailers.
    let mut waits = Vec::new();
    for i in 0..50 {
        let req = Request::post(format!("http://{addr}/echo"))
            .body(())
            .unwrap();
        let (resp, mut send) = client.send_request(req, false).unwrap();
        send.send_data(Bytes::from(format!("body {i}")), false)
            .unwrap();
        let mut t = HeaderMap::new();
        t.insert("x-t", "1".parse().unwrap());
        send.send_trailers(t).unwrap();
        waits.push(tokio::spawn(async move {
            let resp = resp.await.unwrap();
            assert_eq!(resp.headers()["x-trailers"], "1");
            let mut body = resp.into_body();
            assert_eq!(read_all(&mut body).await, format!("body {i}").into_bytes());
        }));
        client = client.ready().await.unwrap();
    }
    for w in waits {
        w.await.unwrap();
    }
    // Trailers of a response.
    let (resp, _) = client
        .send_request(
            Request::get(format!("http://{addr}/trailers"))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    let mut body = resp.await.unwrap().into_body();
    assert_eq!(read_all(&mut body).await.len(), 30);
    let trailers = body.trailers().await.unwrap().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
    // A failing body resets its stream.
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(
            Request::get(format!("http://{addr}/fail"))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    let mut body = resp.await.unwrap().into_body();
    let mut err = None;
    while let Some(chunk) = body.data().await {
        if let Err(e) = chunk {
            err = Some(e);
            break;
        }
    }
    assert_eq!(err.unwrap().reason(), Some(h2::Reason::INTERNAL_ERROR));
    // The request as h2 builds it.
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(
            Request::get(format!("http://{addr}/headers?q=1"))
                .header("x-b", "1")
                .header("accept", "*/*")
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    let mut body = resp.await.unwrap().into_body();
    let text = String::from_utf8(read_all(&mut body).await).unwrap();
    assert_eq!(
        text,
        format!("http://{addr}/headers?q=1 HTTP/2.0 accept,x-b")
    );
    // A client reset of a stream whose request is still coming: the connection goes on.
    let mut client = client.ready().await.unwrap();
    let (_resp, mut send) = client
        .send_request(
            Request::post(format!("http://{addr}/echo"))
                .body(())
                .unwrap(),
            false,
        )
        .unwrap();
    send.send_data(Bytes::from_static(b"part"), false).unwrap();
    send.send_reset(h2::Reason::CANCEL);
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(
            Request::get(format!("http://{addr}/")).body(()).unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_client_with_a_window_of_one_byte() {
    let addr = server(settings()).await;
    let mut b = h2::client::Builder::new();
    b.initial_window_size(1);
    let client = h2_client(addr, b).await;
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(
            Request::get(format!("http://{addr}/slow"))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    let mut body = resp.await.unwrap().into_body();
    assert_eq!(read_all(&mut body).await, vec![b'x'; 20_000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_has_its_stream_reset() {
    let stalled = Arc::new(AtomicUsize::new(0));
    let mut s = settings();
    s.stalled_stream_timeout = Duration::from_millis(200);
    let count = stalled.clone();
    s.on_stalled_stream = Some(Arc::new(move || {
        count.fetch_add(1, Ordering::SeqCst);
    }));
    let addr = server(s).await;
    let mut b = h2::client::Builder::new();
    b.initial_window_size(0);
    let client = h2_client(addr, b).await;
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(
            Request::get(format!("http://{addr}/big")).body(()).unwrap(),
            true,
        )
        .unwrap();
    let mut body = resp.await.unwrap().into_body();
    let err = body.data().await.unwrap().unwrap_err();
    assert_eq!(err.reason(), Some(h2::Reason::CANCEL));
    assert_eq!(stalled.load(Ordering::SeqCst), 1);
}

// ---- Frames in, frames out ----

/// A raw client on an in-memory pipe to `serve`.
struct Raw {
    io: DuplexStream,
    buf: BytesMut,
    enc: loona_hpack::Encoder<'static>,
    task: tokio::task::JoinHandle<Result<(), super::Error>>,
    shutdown: Shutdown,
}

#[derive(Debug)]
struct In {
    head: Head,
    payload: Bytes,
}

impl Raw {
    /// Connects, sends the preface (split in two, the first part as `prefix`) and empty
    /// SETTINGS, and reads the server's SETTINGS, WINDOW_UPDATE and the ACK.
    async fn start(settings: Settings) -> Raw {
        Self::start_with(settings, &[]).await
    }

    async fn start_with(settings: Settings, client_settings: &[(u16, u32)]) -> Raw {
        let (a, b) = tokio::io::duplex(1 << 20);
        let shutdown = Shutdown::new();
        let sd = shutdown.clone();
        let task = tokio::spawn(async move {
            serve(
                b,
                Bytes::from_static(&frame::PREFACE[..5]),
                settings,
                sd,
                service,
            )
            .await
        });
        let mut raw = Raw {
            io: a,
            buf: BytesMut::new(),
            enc: loona_hpack::Encoder::new(),
            task,
            shutdown,
        };
        raw.io.write_all(&frame::PREFACE[5..]).await.unwrap();
        let mut out = BytesMut::new();
        frame::put_settings(&mut out, client_settings);
        raw.io.write_all(&out).await.unwrap();
        let f = raw.next().await.unwrap();
        assert_eq!(f.head.kind, kind::SETTINGS);
        let f = raw.next().await.unwrap();
        assert_eq!(f.head.kind, kind::WINDOW_UPDATE);
        let f = raw.next().await.unwrap();
        assert_eq!((f.head.kind, f.head.flags), (kind::SETTINGS, flag::ACK));
        raw
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut out = BytesMut::new();
        frame::put_head(&mut out, payload.len(), kind, flags, stream);
        out.put_slice(payload);
        self.io.write_all(&out).await.unwrap();
    }

    fn block(&mut self, fields: &[(&str, &str)]) -> Vec<u8> {
        self.enc
            .encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    async fn get(&mut self, stream: u32, path: &str) {
        let b = self.block(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "x"),
        ]);
        self.send(
            kind::HEADERS,
            flag::END_HEADERS | flag::END_STREAM,
            stream,
            &b,
        )
        .await;
    }

    /// The next frame, or None at the end of the connection.
    async fn next(&mut self) -> Option<In> {
        loop {
            if self.buf.len() >= 9 {
                let head = Head::parse(&self.buf);
                let total = 9 + head.len as usize;
                if self.buf.len() >= total {
                    let mut f = self.buf.split_to(total);
                    let payload = f.split_off(9).freeze();
                    return Some(In { head, payload });
                }
            }
            let mut chunk = [0u8; 16384];
            let n = self.io.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next frame that is not a WINDOW_UPDATE.
    async fn next_skip_wu(&mut self) -> Option<In> {
        loop {
            let f = self.next().await?;
            if f.head.kind != kind::WINDOW_UPDATE {
                return Some(f);
            }
        }
    }

    /// Expects GOAWAY with `reason`, then the end of the connection.
    async fn expect_goaway(&mut self, reason: Reason) {
        loop {
            let f = self.next().await.expect("GOAWAY before the end");
            if f.head.kind == kind::GOAWAY {
                assert_eq!(
                    Reason(u32::from_be_bytes(f.payload[4..8].try_into().unwrap())),
                    reason
                );
                break;
            }
        }
        assert!(self.next().await.is_none(), "the connection ends");
    }

    /// Expects RST_STREAM on `stream` with `reason` (other frames skipped).
    async fn expect_rst(&mut self, stream: u32, reason: Reason) {
        loop {
            let f = self.next().await.expect("RST_STREAM before the end");
            if f.head.kind == kind::GOAWAY {
                panic!("GOAWAY instead of RST_STREAM: {f:?}");
            }
            if f.head.kind == kind::RST_STREAM {
                assert_eq!(f.head.stream, stream);
                assert_eq!(
                    Reason(u32::from_be_bytes(f.payload[..4].try_into().unwrap())),
                    reason
                );
                return;
            }
        }
    }

    /// Sends a PING and waits for its ACK: everything the server answered before is read.
    async fn sync(&mut self) -> Vec<In> {
        self.send(kind::PING, 0, 0, b"syncsync").await;
        let mut seen = Vec::new();
        loop {
            let f = self.next().await.expect("PING ACK");
            if f.head.kind == kind::PING && &f.payload[..] == b"syncsync" {
                return seen;
            }
            seen.push(f);
        }
    }

    fn decode(&self, block: &[u8]) -> Vec<(String, String)> {
        let mut d = loona_hpack::Decoder::new();
        let mut v = Vec::new();
        d.decode_with_cb(block, |n, val| {
            v.push((
                String::from_utf8_lossy(&n).into_owned(),
                String::from_utf8_lossy(&val).into_owned(),
            ))
        })
        .unwrap();
        v
    }
}

#[tokio::test]
async fn a_get_is_answered_with_headers_and_data() {
    let mut c = Raw::start(settings()).await;
    c.get(1, "/").await;
    let f = c.next().await.unwrap();
    assert_eq!((f.head.kind, f.head.stream), (kind::HEADERS, 1));
    assert_eq!(f.head.flags & flag::END_HEADERS, flag::END_HEADERS);
    let fields = c.decode(&f.payload);
    assert_eq!(fields[0], (":status".into(), "200".into()));
    assert!(!fields.iter().any(|(n, _)| n == "connection"));
    let f = c.next().await.unwrap();
    assert_eq!((f.head.kind, f.head.flags), (kind::DATA, flag::END_STREAM));
    assert_eq!(&f.payload[..], b"hello");
}
