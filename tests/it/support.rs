//! Test support: spawn the real `outrigger` binary with a config in a temp dir, on port 0, wait
//! for it to report its bound addresses and to be ready, and print everything useful (command,
//! config, stdout, stderr) when an assertion fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_outrigger");
/// Generous: CI machines are slow; a healthy start takes milliseconds.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Sidecar {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub admin: SocketAddr,
    /// Bound proxy listeners by name (`127.0.0.1:PORT` or `unix:/path`).
    pub listeners: std::collections::BTreeMap<String, String>,
    /// The bridge's bound address, when it runs.
    pub bridge: Option<String>,
    /// The bridge's gRPC address (`bridge.address` again when it has no socket of its own).
    pub bridge_grpc: Option<String>,
    pub config_path: PathBuf,
    command: String,
}

/// How to start a sidecar.
#[derive(Default)]
pub struct Spawn<'a> {
    pub config: &'a str,
    pub args: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
    pub app: &'a [&'a str],
    /// Run under this descriptor limit (soft and hard `RLIMIT_NOFILE`, set by `prlimit`).
    pub nofile: Option<u64>,
}

impl Spawn<'_> {
    pub fn start(self) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("outrigger.yaml");
        std::fs::write(&config_path, self.config).unwrap();
        let listeners = dir.path().join("listeners.json");
        let mut cmd = match self.nofile {
            None => Command::new(BIN),
            Some(n) => {
                // prlimit execs the binary: the child's pid is the sidecar's.
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(BIN);
                c
            }
        };
        cmd.arg("run")
            .arg("-c")
            .arg(&config_path)
            .arg("--listeners-file")
            .arg(&listeners)
            .args(self.args)
            // Port 0 unless the test says otherwise (a later --set wins).
            .env("OUTRIGGER_ADMIN_ADDRESS", "127.0.0.1:0")
            .envs(self.env.iter().copied())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap());
        if !self.app.is_empty() {
            cmd.arg("--").args(self.app);
        }
        let command = format!("{cmd:?}");
        let child = cmd.spawn().expect("spawn outrigger");
        let mut sc = Sidecar {
            child: Some(child),
            dir,
            admin: "127.0.0.1:0".parse().unwrap(),
            listeners: Default::default(),
            bridge: None,
            bridge_grpc: None,
            config_path,
            command,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&listeners) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                sc.admin = v["admin"].as_str().unwrap().parse().unwrap();
                if let Some(m) = v["listeners"].as_object() {
                    sc.listeners = m
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                        .collect();
                }
                sc.bridge = v["bridge"].as_str().map(str::to_string);
                sc.bridge_grpc = v["bridge_grpc"].as_str().map(str::to_string);
                return sc;
            }
            if let Some(status) = sc.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "outrigger exited before binding ({status})\n{}",
                    sc.diagnostics()
                );
            }
            assert!(
                Instant::now() < deadline,
                "outrigger never bound its listeners\n{}",
                sc.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Sidecar {
    /// Starts with `config` and nothing else.
    pub fn start(config: &str) -> Sidecar {
        Spawn {
            config,
            ..Spawn::default()
        }
        .start()
    }

    /// `http://ADDRESS` of the named TCP listener.
    pub fn listener_url(&self, name: &str, path: &str) -> String {
        format!("http://{}{path}", self.listeners[name])
    }

    /// The value of a metric sample (exact series text before the value), or 0.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// `http://ADDRESS{path}` of the bridge.
    #[cfg(feature = "bridge")]
    pub fn bridge_url(&self, path: &str) -> String {
        let address = self
            .bridge
            .as_ref()
            .unwrap_or_else(|| panic!("the bridge is not running\n{}", self.diagnostics()));
        format!("http://{address}{path}")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Polls `/ready` until it answers 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(r) = client().get(self.url("/ready")).send()
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never ready\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let r = client()
            .get(self.url(path))
            .send()
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.diagnostics()));
        (r.status().as_u16(), r.text().unwrap())
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path);
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path} ({status}) is not JSON: {e}: {body}"))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "outrigger did not exit within {timeout:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The command, the config, and what the sidecar printed.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- command\n{}\n--- config ({})\n{}\n--- stdout\n{}\n--- stderr\n{}",
            self.command,
            self.config_path.display(),
            std::fs::read_to_string(&self.config_path).unwrap_or_default(),
            self.stdout(),
            self.stderr()
        )
    }
}

impl Drop for Sidecar {
    /// SIGTERM first, so a supervised app is stopped too (SIGKILL would orphan it), then
    /// SIGKILL if the sidecar has not exited within a few seconds.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                let pid = nix::unistd::Pid::from_raw(c.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap()
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the binary to completion with `args`; returns (exit code, stdout, stderr).
pub fn run_to_end(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `outrigger check` of `config`, written as `file` in a temp dir: it fails (exit 78) and its
/// stderr holds each of `errors`.
#[track_caller]
pub fn check_finds(file: &str, config: &str, errors: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(file), config).unwrap();
    let (code, _, stderr) = run_to_end(&["check", "-c", file], &[], dir.path());
    assert_eq!(code, 78, "{stderr}");
    for e in errors {
        assert!(stderr.contains(e), "missing `{e}` in:\n{stderr}");
    }
}

/// Runs `cmd` (stdout and stderr captured) and waits for it at most `timeout`; past that it is
/// killed and what it wrote so far is returned (the caller's assertion then shows it).
#[cfg(feature = "bridge")]
pub fn output_within(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// `DIR/.venv/bin/python` (DIR relative to the package) with `DIR/requirements.txt` installed,
/// made on first use; None (after a loud message naming `what` as skipped) only when pip
/// cannot reach PyPI. `.ci/run` makes the same venvs ahead of the tests.
#[cfg(any(feature = "bridge", feature = "k8s"))]
pub fn venv_python(dir: &str, what: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let python = dir.join(".venv/bin/python");
    let ready = dir.join(".venv/.installed");
    // Several tests may ask at once: one makes the venv, the others wait for it.
    let lock_name = format!(
        "outrigger-venv-{}.lock",
        dir.file_name().unwrap().to_string_lossy()
    );
    let lock = std::fs::File::create(std::env::temp_dir().join(lock_name)).unwrap();
    lock.lock().expect("lock the venv");
    // The marker holds the requirements it was made from: a change installs again.
    let wanted = std::fs::read_to_string(dir.join("requirements.txt")).unwrap();
    if std::fs::read_to_string(&ready).ok().as_deref() == Some(wanted.as_str()) {
        return Some(python);
    }
    if !python.is_file() {
        let venv = Command::new("python3")
            .args(["-m", "venv"])
            .arg(dir.join(".venv"))
            .status()
            .unwrap_or_else(|e| panic!("python3 must be installed for {what}: {e}"));
        assert!(venv.success(), "python3 -m venv failed");
    }
    let out = Command::new(&python)
        .args(["-m", "pip", "install", "-q", "-r"])
        .arg(dir.join("requirements.txt"))
        .output()
        .unwrap();
    if out.status.success() {
        std::fs::write(&ready, wanted).unwrap();
        return Some(python);
    }
    eprintln!(
        "\n\n!!!!!!!! SKIPPED: {what}: pip install failed (is PyPI reachable?)\n{}\n!!!!!!!!\n",
        String::from_utf8_lossy(&out.stderr)
    );
    None
}

/// `r`'s value, or a panic with its error and `diagnostics` (the sidecars' output).
pub fn or_panic<T>(r: Result<T, String>, diagnostics: impl FnOnce() -> String) -> T {
    r.unwrap_or_else(|e| panic!("{e}\n{}", diagnostics()))
}

/// Writes `head`, then all of `body`, and only then reads: the answer up to the close, or what
/// failed (a reset while writing or reading).
pub fn written_whole_then_read(address: &str, head: &[u8], body: &[u8]) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head)
        .map_err(|e| format!("writing the head: {e}"))?;
    s.write_all(body)
        .map_err(|e| format!("writing the body: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| {
        format!(
            "reading the answer: {e} (read {:?})",
            String::from_utf8_lossy(&out)
        )
    })?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `payload` as one gRPC message: the 5-byte prefix (uncompressed, its length), then it.
#[cfg(feature = "bridge")]
pub fn grpc_message(payload: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8];
    m.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    m.extend_from_slice(payload);
    m
}

type Frames =
    tokio::sync::mpsc::Sender<Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>>;

/// One gRPC-shaped stream over HTTP/2 cleartext (the test backend's `…/Stream` echoes each
/// message as it comes, then ends with `grpc-status` trailers), message by message: each
/// echo is read before the next message is sent, so nothing on the way may buffer the
/// stream. Failures are `Err` with what went wrong, for the caller to add its sidecars'
/// diagnostics; its own runtime runs the connection between calls.
pub struct GrpcStream {
    rt: tokio::runtime::Runtime,
    tx: Option<Frames>,
    body: hyper::body::Incoming,
    pub status: u16,
    /// The answer's headers (a trailers-only answer's `grpc-status` is there).
    headers: http::HeaderMap,
}

const GRPC_WAIT: Duration = Duration::from_secs(20);

impl GrpcStream {
    /// `POST http://{authority}/echo.v1.Echo/Stream` to `address` with `headers`, `first`
    /// sent and its echo read (when the answer is 200).
    pub fn open(
        address: &str,
        authority: &str,
        headers: &[(&str, &str)],
        first: &[u8],
    ) -> Result<GrpcStream, String> {
        Self::start(
            address,
            authority,
            "/echo.v1.Echo/Stream",
            headers,
            first,
            false,
        )
    }

    /// `POST http://{authority}{path}` with `headers`, `msg` sent and the request ended at
    /// once (a unary or server-streaming call); nothing of the answer is read yet.
    #[cfg(feature = "bridge")]
    pub fn call(
        address: &str,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
        msg: &[u8],
    ) -> Result<GrpcStream, String> {
        Self::start(address, authority, path, headers, msg, true)
    }

    fn start(
        address: &str,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
        first: &[u8],
        end: bool,
    ) -> Result<GrpcStream, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let first = bytes::Bytes::copy_from_slice(first);
        let answer = rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(address)
                .await
                .map_err(|e| format!("connect to {address}: {e}"))?;
            let (mut send, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tcp),
            )
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
            tokio::spawn(conn);
            let mut req = http::Request::post(format!("http://{authority}{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let req = req
                .body(http_body_util::StreamBody::new(
                    crate::backend::ReceiverStream(rx),
                ))
                .map_err(|e| e.to_string())?;
            tx.send(Ok(hyper::body::Frame::data(first.clone())))
                .await
                .map_err(|_| "the request body closed".to_string())?;
            let tx = (!end).then_some(tx);
            let res = tokio::time::timeout(GRPC_WAIT, send.send_request(req))
                .await
                .map_err(|_| format!("no response headers within {GRPC_WAIT:?}"))?
                .map_err(|e| format!("the request failed: {e}"))?;
            let (parts, body) = res.into_parts();
            Ok::<_, String>((parts.status.as_u16(), parts.headers, body, tx))
        })?;
        let (status, headers, body, tx) = answer;
        let mut s = GrpcStream {
            rt,
            tx,
            body,
            status,
            headers,
        };
        if status == 200 && !end {
            let echoed = s.echo(first.len())?;
            if echoed != first {
                return Err(format!("echoed {echoed:?} for {first:?}"));
            }
        }
        Ok(s)
    }

    /// Sends `msg` and reads its echo.
    pub fn exchange(&mut self, msg: &[u8]) -> Result<(), String> {
        self.send(msg)?;
        let echoed = self.echo(msg.len())?;
        if echoed != msg {
            return Err(format!("echoed {echoed:?} for {msg:?}"));
        }
        Ok(())
    }

    /// Sends `msg` without waiting for anything.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), String> {
        let tx = self.tx.clone().ok_or("the stream is finished")?;
        let msg = bytes::Bytes::copy_from_slice(msg);
        self.rt.block_on(async {
            tx.send(Ok(hyper::body::Frame::data(msg)))
                .await
                .map_err(|_| "the request body closed".to_string())
        })
    }

    /// The next `n` bytes of the response body.
    #[cfg(feature = "bridge")]
    pub fn read(&mut self, n: usize) -> Result<Vec<u8>, String> {
        self.echo(n)
    }

    /// The next `n` bytes of the response body (frames may be split or merged on the way).
    fn echo(&mut self, n: usize) -> Result<Vec<u8>, String> {
        use http_body_util::BodyExt;
        let body = &mut self.body;
        self.rt.block_on(async {
            let mut got = Vec::new();
            while got.len() < n {
                let frame = tokio::time::timeout(GRPC_WAIT, body.frame())
                    .await
                    .map_err(|_| format!("no echo within {GRPC_WAIT:?} (got {got:?})"))?
                    .ok_or_else(|| format!("the response ended before the echo (got {got:?})"))?
                    .map_err(|e| format!("the response body failed: {e}"))?;
                match frame.into_data() {
                    Ok(d) => got.extend_from_slice(&d),
                    Err(_) => return Err(format!("trailers before the echo (got {got:?})")),
                }
            }
            Ok(got)
        })
    }

    /// Ends the request and reads the rest: the trailers' `grpc-status`.
    pub fn finish(mut self) -> Result<Option<String>, String> {
        self.tx = None;
        Ok(self.trailers()?.0)
    }

    /// Reads the rest of the answer (the request stays open): the trailers' `grpc-status`
    /// and `grpc-message` (a trailers-only answer's, from its headers).
    pub fn trailers(&mut self) -> Result<(Option<String>, Option<String>), String> {
        use http_body_util::BodyExt;
        let body = &mut self.body;
        let head = |k| {
            self.headers
                .get(k)
                .map(|v: &http::HeaderValue| v.to_str().unwrap_or("").to_string())
        };
        let only = (head("grpc-status"), head("grpc-message"));
        self.rt.block_on(async {
            loop {
                let frame = tokio::time::timeout(GRPC_WAIT, body.frame())
                    .await
                    .map_err(|_| format!("no trailers within {GRPC_WAIT:?}"))?;
                match frame {
                    None => return Ok(only),
                    Some(Err(e)) => return Err(format!("the response body failed: {e}")),
                    Some(Ok(f)) => {
                        if let Ok(t) = f.into_trailers() {
                            let get = |k| t.get(k).map(|v| v.to_str().unwrap_or("").to_string());
                            return Ok((get("grpc-status"), get("grpc-message")));
                        }
                    }
                }
            }
        })
    }
}

/// `config` with `http2_server: SERVER` on each of its listeners (every `  - name:` entry of a
/// top-level `listeners:` list): an HTTP/2 test run with hyper's server and with ours.
pub fn with_http2_server(server: &str, config: &str) -> String {
    let mut out = String::with_capacity(config.len() + 64);
    let mut in_listeners = false;
    for line in config.split_inclusive('\n') {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_listeners = line.starts_with("listeners:");
        }
        out.push_str(line);
        if in_listeners && line.starts_with("  - name: ") {
            out.push_str(&format!("    http2_server: {server}\n"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The bridge's components: certificates, component files, a bridge on them, `outrigger check`

/// POSTs `body` as JSON to the bridge's `path`: the status and the answer's text.
#[cfg(feature = "bridge")]
pub fn post(sc: &Sidecar, path: &str, body: serde_json::Value) -> (u16, String) {
    let r = client()
        .post(sc.bridge_url(path))
        .json(&body)
        .send()
        .unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

/// Runs `outrigger certs ARGS` in `dir`.
#[cfg(feature = "bridge")]
pub fn certs(dir: &Path, args: &[&str]) {
    let args: Vec<&str> = ["certs"].iter().chain(args).copied().collect();
    let (code, stdout, stderr) = run_to_end(&args, &[], dir);
    assert_eq!(code, 0, "outrigger {args:?}\n{stdout}\n{stderr}");
}

/// A CA in `dir/NAME/` (trust domain example.org) with `leaves`: each a leaf's name and its
/// names (`--dns …`, `--ip …`).
#[cfg(feature = "bridge")]
pub fn ca_with(dir: &Path, name: &str, leaves: &[(&str, &[&str])]) {
    certs(dir, &["ca", "--out", name, "--trust-domain", "example.org"]);
    for (leaf, names) in leaves {
        let mut args = vec!["issue", "--ca", name, "--out", name, "--name", leaf];
        args.extend_from_slice(names);
        certs(dir, &args);
    }
}

/// A component with metadata (name, value) pairs; a value with line breaks (PEM) goes as a
/// block scalar.
#[cfg(feature = "bridge")]
pub fn component_with(name: &str, kind: &str, meta: &[(&str, &str)]) -> String {
    let mut s = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: {kind}\n  version: v1\n  metadata:\n"
    );
    for (k, v) in meta {
        if v.contains('\n') {
            s.push_str(&format!("  - name: {k}\n    value: |\n"));
            for line in v.lines() {
                s.push_str(&format!("      {line}\n"));
            }
        } else {
            s.push_str(&format!("  - name: {k}\n    value: \"{v}\"\n"));
        }
    }
    s
}

/// The line of `key`'s value in a [`component_with`] (a block scalar's: its text's first line).
#[cfg(feature = "bridge")]
pub fn value_line(component: &str, key: &str) -> usize {
    let lines: Vec<&str> = component.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == format!("- name: {key}"))
        .unwrap();
    if lines[at + 1].ends_with('|') {
        at + 3
    } else {
        at + 2
    }
}

/// Writes `components` (file name, text) to `dir/components` and starts a bridge (service
/// `orders`) on them, after `head` (config of its own, such as `app:`), with `env`; ready.
#[cfg(feature = "bridge")]
pub fn bridge_on<F: AsRef<Path>, T: AsRef<[u8]>>(
    dir: &Path,
    components: &[(F, T)],
    head: &str,
    env: &[(&str, &str)],
) -> Sidecar {
    let resources = dir.join("components");
    std::fs::create_dir(&resources).unwrap();
    for (file, text) in components {
        std::fs::write(resources.join(file), text).unwrap();
    }
    let config = format!(
        "{head}bridge:\n  address: 127.0.0.1:0\n  resources: {}\nservice: orders\n",
        resources.display()
    );
    let sc = Spawn {
        config: &config,
        env,
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    sc
}

/// A config (`DIR/outrigger.yaml`) whose bridge reads its components from `DIR/components`,
/// to write component files into and run `outrigger check` (or `run`) on.
#[cfg(feature = "bridge")]
pub struct ComponentsDir {
    dir: PathBuf,
    resources: PathBuf,
    config: PathBuf,
}

#[cfg(feature = "bridge")]
impl ComponentsDir {
    /// `head` is the config up to the bridge's `resources:` line, which is added: it ends with
    /// `bridge:\n` and the bridge's other keys.
    pub fn new(dir: &Path, head: &str) -> Self {
        let resources = dir.join("components");
        std::fs::create_dir(&resources).unwrap();
        let config = dir.join("outrigger.yaml");
        std::fs::write(
            &config,
            format!("{head}  resources: {}\n", resources.display()),
        )
        .unwrap();
        ComponentsDir {
            dir: dir.to_path_buf(),
            resources,
            config,
        }
    }

    /// Writes (or replaces) the component file `file`.
    pub fn write(&self, file: &str, text: impl AsRef<[u8]>) {
        std::fs::write(self.resources.join(file), text).unwrap();
    }

    /// The component file `file`'s text.
    pub fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.resources.join(file)).unwrap()
    }

    /// `outrigger CMD -c CONFIG MORE…` in the dir, to its end: (exit code, stdout, stderr).
    pub fn run(&self, cmd: &str, more: &[&str]) -> (i32, String, String) {
        let mut args = vec![cmd, "-c", self.config.to_str().unwrap()];
        args.extend_from_slice(more);
        run_to_end(&args, &[], &self.dir)
    }

    /// `outrigger check -c CONFIG`: see [`ComponentsDir::run`].
    pub fn check(&self) -> (i32, String, String) {
        self.run("check", &[])
    }
}
