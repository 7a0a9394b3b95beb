//! Hot restart: `outrigger run --upgrade` (and SIGUSR2, `POST /upgrade`) takes over the running
//! process's listening sockets and app with no refused connection and no failed request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::support::{BIN, Sidecar, Spawn, client, eventually};

/// A backend, a temp dir holding the upgrade socket, and the config joining them: an inbound
/// listener to the backend, with that upgrade socket.
fn setup() -> (Backend, tempfile::TempDir, String) {
    let backend = Backend::http();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "app:\n  address: {}\nlisteners:\n  - name: in\n    address: 127.0.0.1:0\nruntime:\n  shutdown_grace: 10s\n  upgrade_socket: {}\n",
        backend.address(),
        dir.path().join("upgrade.sock").display()
    );
    (backend, dir, config)
}

fn server_info(sc: &Sidecar) -> serde_json::Value {
    sc.get_json("/server_info")
}

/// Starts a successor with `config` and waits until it has taken over (the admin socket, now
/// shared, answers with its pid) and the old process has exited 0.
fn take_over(old: &mut Sidecar, config: &str, app: &[&str]) -> Sidecar {
    let new = Spawn {
        config,
        args: &["--upgrade"],
        app,
        ..Spawn::default()
    }
    .start();
    assert_eq!(new.admin, old.admin, "the admin port is kept");
    assert_eq!(
        new.listeners, old.listeners,
        "the listeners' ports are kept"
    );
    let mut new = new;
    let pid = new.pid();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = new.child.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "the new process exited ({s})\n{}\n--- the old one\n{}",
                new.diagnostics(),
                old.diagnostics()
            );
        }
        if let Some(s) = old.child.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the old process never exited\n{}",
            old.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        status.success(),
        "the old process: {status}\n{}",
        old.diagnostics()
    );
    eventually(
        Duration::from_secs(10),
        "the new process answers admin",
        || (server_info(&new)["pid"] == pid).then_some(()),
    );
    new
}

/// Requests on new connections (each one accepted by whichever process holds the socket) and
/// on a keep-alive connection, until `stop`: (succeeded, failed, first failure).
fn load(
    url: String,
    keep_alive: bool,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64, Option<String>)> {
    std::thread::spawn(move || {
        let builder = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10));
        let c = if keep_alive {
            builder.build().unwrap()
        } else {
            builder.pool_max_idle_per_host(0).build().unwrap()
        };
        let (mut ok, mut failed, mut first) = (0u64, 0u64, None);
        // Bounded in count and time, whatever happens.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && ok + failed < 200_000 && Instant::now() < deadline {
            match c.get(&url).send().map(|r| r.status().as_u16()) {
                Ok(200) => ok += 1,
                other => {
                    failed += 1;
                    first.get_or_insert(format!("{other:?}"));
                }
            }
        }
        (ok, failed, first)
    })
}

#[test]
fn three_upgrades_in_a_row_under_load_refuse_nothing() {
    let (backend, _dir, config) = setup();
    let mut sc = Sidecar::start(&config);
    sc.wait_ready();
    let first_pid = sc.pid();
    assert_eq!(server_info(&sc)["generation"], 0);
    let url = sc.listener_url("in", "/status/200");
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = [false, false, true]
        .into_iter()
        .map(|keep_alive| load(url.clone(), keep_alive, stop.clone()))
        .collect();
    let served = || backend.count();
    let mut parents = vec![first_pid];
    for round in 1..=3 {
        // Some traffic on this process first.
        let before = served();
        eventually(
            Duration::from_secs(10),
            "traffic before the upgrade",
            || (served() > before + 50).then_some(()),
        );
        let new = take_over(&mut sc, &config, &[]);
        let info = server_info(&new);
        assert_eq!(info["generation"], round, "{info}");
        assert_eq!(info["parent_pid"], *parents.last().unwrap(), "{info}");
        parents.push(new.pid());
        sc = new;
    }
    let before = served();
    eventually(
        Duration::from_secs(10),
        "traffic after the upgrades",
        || (served() > before + 50).then_some(()),
    );
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for (i, l) in loads.into_iter().enumerate() {
        let (ok, failed, first) = l.join().unwrap();
        eprintln!("load {i}: {ok} succeeded, {failed} failed ({first:?})");
        assert_eq!(
            failed,
            0,
            "load {i}: first failure {first:?}\n{}",
            sc.diagnostics()
        );
        total += ok;
    }
    assert!(total > 200, "{total} requests");
}

#[test]
fn a_websocket_and_a_slow_upload_finish_on_the_old_process() {
    let (_backend, _dir, config) = setup();
    let mut old = Sidecar::start(&config);
    old.wait_ready();
    let addr = old.listeners["in"].clone();

    // A WebSocket (an upgraded connection, spliced) …
    let mut ws = TcpStream::connect(&addr).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    ws.write_all(b"GET /upgrade HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ws.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    // … and an upload that has sent half its body.
    let mut upload = TcpStream::connect(&addr).unwrap();
    upload
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    upload
        .write_all(b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nhello")
        .unwrap();
    eventually(Duration::from_secs(5), "both connections open", || {
        (old.metric("outrigger_connections_open{direction=\"inbound\",listener=\"in\"}") >= 2.0)
            .then_some(())
    });

    let new = Spawn {
        config: &config,
        args: &["--upgrade"],
        ..Spawn::default()
    }
    .start();
    let new_pid = new.pid();
    eventually(Duration::from_secs(10), "the new process took over", || {
        (server_info(&new)["pid"] == new_pid).then_some(())
    });
    // New connections go to the new process now; the old one still has ours.
    assert_eq!(
        client()
            .get(new.listener_url("in", "/status/200"))
            .send()
            .unwrap()
            .status(),
        200
    );
    assert!(
        old.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the old process waits for its connections"
    );
    ws.write_all(b"still there?").unwrap();
    let mut buf = [0u8; 12];
    ws.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still there?");
    upload.write_all(b"world").unwrap();
    let mut response = String::new();
    let mut chunk = [0u8; 4096];
    while !response.contains("helloworld") {
        let n = upload.read(&mut chunk).unwrap();
        assert!(n > 0, "closed early: {response}");
        response.push_str(&String::from_utf8_lossy(&chunk[..n]));
    }
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    drop(ws);
    drop(upload);
    let status = old.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status}\n{}", old.diagnostics());
    let stderr = old.stderr();
    assert!(stderr.contains("a new Outrigger took over"), "{stderr}");
}

#[test]
fn a_new_process_that_fails_leaves_the_old_one_serving() {
    let (_backend, dir, good) = setup();
    let mut old = Sidecar::start(&good);
    old.wait_ready();
    let old_pid = old.pid();
    let url = old.listener_url("in", "/status/200");

    // A broken config: refused before it even asks (exit 78, nothing started).
    let broken_path = dir.path().join("broken.yaml");
    std::fs::write(&broken_path, format!("{good}bogus_key: 1\n")).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--upgrade", "-c"])
        .arg(&broken_path)
        .env("OUTRIGGER_ADMIN_ADDRESS", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus_key"));

    // A config that is valid but cannot start: a new listener on a port that is taken. It has
    // the sockets already; it fails, goes away, and the old process carries on.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unstartable_path = dir.path().join("unstartable.yaml");
    // The extra listener goes under `listeners:` (before `runtime:`).
    let with_extra = good.replace(
        "runtime:\n",
        &format!(
            "  - name: extra\n    address: {}\nruntime:\n",
            taken.local_addr().unwrap()
        ),
    );
    std::fs::write(&unstartable_path, &with_extra).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--upgrade", "-c"])
        .arg(&unstartable_path)
        .env("OUTRIGGER_ADMIN_ADDRESS", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot bind listener `extra`"), "{stderr}");
    eventually(Duration::from_secs(5), "the old process notices", || {
        old.stderr()
            .contains("upgrade failed; still serving")
            .then_some(())
    });
    assert_eq!(server_info(&old)["pid"], old_pid);
    assert_eq!(client().get(&url).send().unwrap().status(), 200);
    assert!(old.child.as_mut().unwrap().try_wait().unwrap().is_none());

    // And a good successor still takes over afterwards.
    let new = take_over(&mut old, &good, &[]);
    assert_eq!(server_info(&new)["generation"], 1);
    assert_eq!(client().get(&url).send().unwrap().status(), 200);
}

#[test]
fn sigusr2_and_post_upgrade_start_a_successor_from_the_same_binary() {
    let (_backend, _dir, config) = setup();
    let mut sc = Sidecar::start(&config);
    sc.wait_ready();
    let url = sc.listener_url("in", "/status/200");
    let first = sc.pid();
    // The successor is our child, started with our arguments plus --upgrade.
    sc.signal(nix::sys::signal::Signal::SIGUSR2);
    let status = sc.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}\n{}", sc.diagnostics());
    let info = server_info(&sc);
    assert_eq!(info["generation"], 1, "{info}");
    assert_eq!(info["parent_pid"], first, "{info}");
    let second = info["pid"].as_u64().unwrap();
    assert_eq!(client().get(&url).send().unwrap().status(), 200);

    // POST /upgrade on the second one: a third.
    let r = client().post(sc.url("/upgrade")).send().unwrap();
    assert_eq!(r.status(), 202);
    let info = eventually(Duration::from_secs(20), "the third process", || {
        let info = server_info(&sc);
        (info["generation"] == 2).then_some(info)
    });
    assert_eq!(info["parent_pid"], second, "{info}");
    assert_eq!(client().get(&url).send().unwrap().status(), 200);
    // Neither is our child any more: stop the last one through its admin API.
    let third = info["pid"].as_i64().unwrap() as i32;
    let r = client().post(sc.url("/shutdown")).send().unwrap();
    assert_eq!(r.status(), 202);
    eventually(Duration::from_secs(15), "the third process exits", || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(third), None)
            .is_err()
            .then_some(())
    });
}

#[test]
fn the_supervised_app_keeps_running_across_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("upgrade.sock");
    let pids = dir.path().join("pids");
    let config = format!(
        "runtime:\n  shutdown_grace: 10s\n  upgrade_socket: {}\napp:\n  restart: never\n",
        socket.display()
    );
    let script = format!("echo $$ >> {}; exec sleep 600", pids.display());
    let app = ["sh", "-c", script.as_str()];
    let mut old = Spawn {
        config: &config,
        app: &app,
        ..Spawn::default()
    }
    .start();
    old.wait_ready();
    let app_pid: i32 = eventually(Duration::from_secs(5), "the app's pid", || {
        std::fs::read_to_string(&pids).ok()?.trim().parse().ok()
    });
    let mut new = take_over(&mut old, &config, &app);
    new.wait_ready();
    // The same process, started once.
    assert_eq!(
        std::fs::read_to_string(&pids).unwrap().trim(),
        app_pid.to_string()
    );
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(app_pid), None).is_ok());
    let stderr = new.stderr();
    assert!(stderr.contains("adopted the app"), "{stderr}");
    // The new process supervises it: when it ends (restart: never), so does the sidecar.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(app_pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = new.wait_exit(Duration::from_secs(15));
    // 143 (SIGTERM) when the orphaned app was reaped by init; where init does not reap
    // orphans (this sandbox's does not), the kernel cannot tell its status: 1, and a warning.
    match status.code() {
        Some(143) => {}
        Some(1) => assert!(
            new.stderr().contains("its exit status is unknown"),
            "{}",
            new.diagnostics()
        ),
        other => panic!("{other:?}\n{}", new.diagnostics()),
    }
}

#[test]
fn server_info_and_upgrade_without_a_socket() {
    let sc = Sidecar::start("runtime:\n  upgrade_socket: off\n");
    sc.wait_ready();
    let info = server_info(&sc);
    assert_eq!(info["generation"], 0);
    assert_eq!(info["pid"], sc.pid());
    assert!(info["parent_pid"].is_null());
    assert!(info["start_time"].as_str().unwrap().ends_with('Z'));
    let r = client().post(sc.url("/upgrade")).send().unwrap();
    assert_eq!(r.status(), 409);
}

#[test]
fn systemd_is_told_the_new_main_pid() {
    let (_backend, dir, config) = setup();
    let notify = dir.path().join("notify.sock");
    let receiver = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let notify_env = notify.to_str().unwrap();
    let mut old = Spawn {
        config: &config,
        env: &[("NOTIFY_SOCKET", notify_env)],
        ..Spawn::default()
    }
    .start();
    let mut buf = [0u8; 256];
    let n = receiver.recv(&mut buf).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&buf[..n]),
        format!("READY=1\nMAINPID={}\n", old.pid())
    );
    let new = Spawn {
        config: &config,
        args: &["--upgrade"],
        env: &[("NOTIFY_SOCKET", notify_env)],
        ..Spawn::default()
    }
    .start();
    // The new process says it is ready and the main process; the old one, as it hands over,
    // names the new one too (in either order).
    let mut said = Vec::new();
    for _ in 0..2 {
        let n = receiver.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "{e} after {said:?}\n{}\n--- the old one\n{}",
                new.diagnostics(),
                old.diagnostics()
            )
        });
        said.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    said.sort();
    assert_eq!(
        said,
        [
            format!("MAINPID={}\n", new.pid()),
            format!("READY=1\nMAINPID={}\n", new.pid())
        ]
    );
    assert!(old.wait_exit(Duration::from_secs(20)).success());
}

/// A subscriber app: `/dapr/subscribe` names topic `t` of `ps`; every delivery's `data.n` is
/// recorded and acknowledged.
#[cfg(feature = "bridge")]
fn subscriber() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<u64>>>) {
    use axum::routing::{get, post};
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = axum::Router::new()
                .route(
                    "/dapr/subscribe",
                    get(|| async { r#"[{"pubsubname":"ps","topic":"t","route":"/t"}]"# }),
                )
                .route(
                    "/t",
                    post(move |body: axum::body::Bytes| {
                        let record = record.clone();
                        async move {
                            let event: serde_json::Value =
                                serde_json::from_slice(&body).unwrap_or_default();
                            if let Some(n) = event["data"]["n"].as_u64() {
                                record.lock().unwrap().push(n);
                            }
                            r#"{"status":"SUCCESS"}"#
                        }
                    }),
                );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (addr, seen)
}

#[cfg(feature = "bridge")]
#[test]
fn bridge_publishes_and_deliveries_go_on_across_an_upgrade() {
    let redis = crate::servers::RedisServer::start();
    let (app, seen) = subscriber();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("upgrade.sock");
    let resources = dir.path().join("resources");
    std::fs::create_dir(&resources).unwrap();
    std::fs::write(
        resources.join("ps.yaml"),
        format!(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: ps\nspec:\n  type: pubsub.redis\n  version: v1\n  metadata:\n  - name: redisHost\n    value: 127.0.0.1:{}\n  - name: processingTimeout\n    value: 2s\n  - name: redeliverInterval\n    value: 1s\n",
            redis.port
        ),
    )
    .unwrap();
    let config = format!(
        "app:\n  address: {app}\nbridge:\n  address: 127.0.0.1:0\n  resources: {}\nruntime:\n  shutdown_grace: 10s\n  upgrade_socket: {}\n",
        resources.display(),
        socket.display()
    );
    let mut old = Sidecar::start(&config);
    old.wait_ready();
    let url = format!("http://{}/v1.0/publish/ps/t", old.bridge.clone().unwrap());
    const N: u64 = 400;
    let publisher = std::thread::spawn(move || {
        let c = client();
        let mut failed = Vec::new();
        for n in 0..N {
            match c.post(&url).json(&serde_json::json!({ "n": n })).send() {
                Ok(r) if r.status() == 204 => {}
                other => failed.push(format!("{n}: {other:?}")),
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        failed
    });
    eventually(
        Duration::from_secs(10),
        "deliveries before the upgrade",
        || (seen.lock().unwrap().len() > 20).then_some(()),
    );
    let new = take_over(&mut old, &config, &[]);
    assert_eq!(new.bridge, old.bridge, "the bridge's port is kept");
    let failed = publisher.join().unwrap();
    assert!(
        failed.is_empty(),
        "failed publishes: {failed:?}\n{}",
        new.diagnostics()
    );
    // Every message delivered, at least once.
    let missing = eventually(Duration::from_secs(20), "every message delivered", || {
        let seen = seen.lock().unwrap();
        let missing: Vec<u64> = (0..N).filter(|n| !seen.contains(n)).collect();
        if !missing.is_empty() {
            eprintln!("missing {} (first {:?})", missing.len(), missing.first());
        }
        missing.is_empty().then_some(missing)
    });
    assert!(missing.is_empty());
    let seen = seen.lock().unwrap();
    eprintln!(
        "{N} published, {} deliveries ({} redelivered)",
        seen.len(),
        seen.len() as u64 - N
    );
}

/// The log agent captures the app's stdout through a pipe: the pipe is handed over with the
/// app, so the app is not killed by SIGPIPE when the old process exits, and its lines keep
/// reaching the sink from the new process.
#[cfg(feature = "logs")]
#[test]
fn captured_app_output_keeps_flowing_across_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("upgrade.sock");
    let sink = dir.path().join("shipped.ndjson");
    let pids = dir.path().join("pids");
    let config = format!(
        "runtime:\n  shutdown_grace: 10s\n  upgrade_socket: {}\nlogs:\n  sources: [{{app: stdio, format: plain}}]\n  sinks: [{{file: {}}}]\n",
        socket.display(),
        sink.display()
    );
    let script = format!(
        "echo $$ >> {}; i=0; while true; do echo line $i; i=$((i+1)); sleep 0.01; done",
        pids.display()
    );
    let app = ["sh", "-c", script.as_str()];
    let mut old = Spawn {
        config: &config,
        app: &app,
        ..Spawn::default()
    }
    .start();
    old.wait_ready();
    let shipped = || std::fs::read_to_string(&sink).unwrap_or_default();
    eventually(Duration::from_secs(10), "lines shipped", || {
        (shipped().lines().count() > 10).then_some(())
    });
    let new = take_over(&mut old, &config, &app);
    let after = shipped().lines().count();
    eventually(
        Duration::from_secs(10),
        "lines shipped by the new process",
        || (shipped().lines().count() > after + 50).then_some(()),
    );
    // Started once: the app was neither killed nor restarted.
    assert_eq!(std::fs::read_to_string(&pids).unwrap().lines().count(), 1);
    let stderr = new.stderr();
    assert!(stderr.contains("adopted the app"), "{stderr}");
    // The numbers go on (a line being read at the switch may be cut in two; none other lost).
    let numbers: Vec<u64> = shipped()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["message"].as_str()?.strip_prefix("line ")?.parse().ok()
        })
        .collect();
    let max = *numbers.iter().max().unwrap();
    let missing = (0..max).filter(|n| !numbers.contains(n)).count();
    assert!(missing <= 2, "{missing} of {max} lines missing");
}

/// A unix-socket listener is handed over like a TCP one (same file, no rebind), and takes the
/// new config's `socket_mode`.
#[test]
fn a_unix_socket_listener_is_handed_over_with_the_new_mode() {
    use std::os::unix::fs::PermissionsExt;
    let backend = Backend::http();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("upgrade.sock");
    let listener = dir.path().join("in.sock");
    let config = |mode: &str| {
        format!(
            "app:\n  address: {}\nlisteners:\n  - name: in\n    address: unix:{}\n    socket_mode: \"{mode}\"\nruntime:\n  shutdown_grace: 10s\n  upgrade_socket: {}\n",
            backend.address(),
            listener.display(),
            socket.display()
        )
    };
    let get = || {
        let mut s = std::os::unix::net::UnixStream::connect(&listener).unwrap();
        s.write_all(b"GET /status/200 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let mode = || std::fs::metadata(&listener).unwrap().permissions().mode() & 0o777;
    let mut old = Sidecar::start(&config("0600"));
    old.wait_ready();
    assert!(get().starts_with("HTTP/1.1 200"));
    assert_eq!(mode(), 0o600);
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&listener).unwrap());
    let _new = take_over(&mut old, &config("0660"), &[]);
    assert!(get().starts_with("HTTP/1.1 200"));
    assert_eq!(mode(), 0o660);
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&listener).unwrap()),
        inode,
        "the same socket file, not a new bind"
    );
}
