//! The app's lifecycle with real child processes (tests/fixtures/lifecycle_app.py and shell
//! one-liners): start order, probes and `/ready`, inbound held until ready, the stop order read
//! from timestamps, restart policies, signal forwarding, `outrigger wait`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;

use crate::backend::{Backend, dead_port};
use crate::support::{BIN, Sidecar, Spawn, client, eventually, run_to_end};

pub const APP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/lifecycle_app.py"
);

/// A config with the app on a unix socket (probed over HTTP), an inbound listener `in`, and an
/// outbound listener `out` whose every request goes to `backend`.
pub fn config(backend: &Backend, app_extra: &str, extra: &str) -> String {
    format!(
        "app:\n  address: unix:app.sock\n  probe:\n    http: /healthz\n{app_extra}\
         listeners:\n  - name: in\n    address: 127.0.0.1:0\n  - name: out\n    address: 127.0.0.1:0\n    direction: outbound\n    routes:\n      - cluster: backend\n\
         clusters:\n  backend:\n    endpoints: [{}]\n{extra}",
        backend.address()
    )
}

/// The app's events.txt as (event, unix time) pairs.
pub fn events(sc: &Sidecar) -> Vec<(String, f64)> {
    std::fs::read_to_string(sc.path("events.txt"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (e, t) = l.rsplit_once(' ')?;
            Some((e.to_string(), t.parse().ok()?))
        })
        .collect()
}

pub fn event_time(sc: &Sidecar, name: &str) -> Option<f64> {
    events(sc)
        .into_iter()
        .find(|(e, _)| e == name)
        .map(|(_, t)| t)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn start_order_first_outbound_call_succeeds_ready_and_inbound_wait_for_the_app() {
    let backend = Backend::http();
    let sc = Spawn {
        config: &config(&backend, "", ""),
        app: &["python3", APP],
        env: &[
            ("APP_SOCKET", "app.sock"),
            ("CALL_AT_START", "/first"),
            ("START_DELAY", "1"),
        ],
        ..Spawn::default()
    }
    .start();
    // Listeners are bound: the sidecar is up, the app is not listening yet.
    let early = sc.get_json("/ready");
    assert_eq!(early["ready"], false, "{early}");
    assert_eq!(early["components"]["app"]["state"], "starting", "{early}");
    let outbound = sc.get_json("/ready/outbound");
    assert!(outbound["components"].get("app").is_none(), "{outbound}");
    // An inbound request now is held until the app is ready, then served.
    let url = sc.listener_url("in", "/hello");
    let held = std::thread::spawn(move || {
        let r = client().get(url).send().unwrap();
        (r.status().as_u16(), r.text().unwrap(), now())
    });
    let (status, body, answered) = held.join().unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "app\n"),
        "{}",
        sc.diagnostics()
    );
    let listening = event_time(&sc, "listening").expect("the app listened");
    assert!(
        answered >= listening,
        "answered before the app listened\n{}",
        sc.diagnostics()
    );
    sc.wait_ready();
    // The app's very first outbound call, made before it listened, went through.
    assert!(
        event_time(&sc, "start-call-200").is_some(),
        "{:?}\n{}",
        events(&sc),
        sc.diagnostics()
    );
    assert_eq!(backend.seen()[0].path, "/first");
    assert_eq!(sc.metric("outrigger_app_ready"), 1.0);
}

#[test]
fn inbound_gets_503_when_the_app_is_not_ready_within_hold_timeout() {
    let backend = Backend::http();
    let sc = Spawn {
        config: &config(&backend, "  hold_timeout: 300ms\n", ""),
        app: &["sleep", "30"],
        ..Spawn::default()
    }
    .start();
    let started = Instant::now();
    let r = client().get(sc.listener_url("in", "/x")).send().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-outrigger-error"], "app-not-ready");
    assert_eq!(r.headers()["retry-after"], "1");
    let ready = sc.get_json("/ready");
    assert_eq!(ready["ready"], false);
    assert!(
        ready["components"]["app"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("app.sock"),
        "{ready}"
    );
}

#[test]
fn sigterm_drains_inbound_then_stops_the_app_while_outbound_still_serves_it() {
    let backend = Backend::http();
    let mut sc = Spawn {
        config: &config(&backend, "", ""),
        app: &["python3", APP],
        env: &[("APP_SOCKET", "app.sock"), ("CALL_ON_TERM", "/on-term")],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    let url = sc.listener_url("in", "/slow/800");
    let inflight = std::thread::spawn(move || {
        let r = client().get(url).send().map(|r| r.status().as_u16());
        (r, now())
    });
    // The request is at the app once the sidecar has an open inbound connection to it; give
    // the request a moment to be read by the app (no event for "started serving").
    eventually(Duration::from_secs(5), "the in-flight request", || {
        (sc.metric("outrigger_connections_open{direction=\"inbound\",listener=\"in\"}") >= 1.0)
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(100));
    sc.signal(Signal::SIGTERM);
    let (status, finished) = inflight.join().unwrap();
    assert_eq!(status.unwrap(), 200, "{}", sc.diagnostics());
    let code = sc.wait_exit(Duration::from_secs(20));
    assert_eq!(code.code(), Some(0), "{}", sc.diagnostics());
    let term = event_time(&sc, "term").expect("the app got SIGTERM");
    // 1. Inbound drained before the app was signalled (a small allowance for the client
    //    thread noting the time after the response arrived).
    assert!(
        term + 0.05 >= finished,
        "the app got SIGTERM at {term} before the in-flight request finished at {finished}\n{:?}\n{}",
        events(&sc),
        sc.diagnostics()
    );
    // 2. The app's outbound call while stopping still went through.
    assert!(
        event_time(&sc, "term-call-200").is_some(),
        "{:?}\n{}",
        events(&sc),
        sc.diagnostics()
    );
    assert!(backend.seen().iter().any(|s| s.path == "/on-term"));
    let stderr = sc.stderr();
    let drained = stderr.find("inbound drained").expect("logged");
    let stopping = stderr.find("stopping the app").expect("logged");
    assert!(drained < stopping, "{stderr}");
}

#[test]
fn on_failure_restarts_until_a_clean_exit() {
    let mut sc = Spawn {
        config: "app:\n  restart: on-failure\n",
        app: &[
            "sh",
            "-c",
            "echo run >> runs; if [ -f ran ]; then exit 0; fi; touch ran; exit 1",
        ],
        ..Spawn::default()
    }
    .start();
    let status = sc.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", sc.diagnostics());
    let runs = std::fs::read_to_string(sc.path("runs")).unwrap();
    assert_eq!(runs.lines().count(), 2, "{}", sc.diagnostics());
    assert!(
        sc.stderr().contains("restarting it"),
        "{}",
        sc.diagnostics()
    );
}

/// A request that passed the gate just before the app died finds its socket gone (connect
/// refused) while the supervisor has not seen the exit yet: it is held for the restarted app
/// like a request at start-up, not answered 502 (issue 19: 94 of 38,458 requests under load).
#[test]
fn requests_during_an_app_restart_wait_for_it_instead_of_502() {
    let backend = Backend::http();
    let sc = Spawn {
        config: &config(&backend, "  restart: always\n", ""),
        app: &["python3", APP],
        env: &[("APP_SOCKET", "app.sock")],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    for round in 0..2 {
        let r = client()
            .get(sc.listener_url("in", "/die-soon"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "round {round}\n{}", sc.diagnostics());
        // The socket file is gone and the app still runs: the next requests are refused by
        // the app's address until it has exited, restarted and passed its probe.
        // The first is a POST (its body came with its head, on the fast path like the GETs):
        // the resent request keeps its headers and body.
        let r = client()
            .post(sc.listener_url("in", "/echo"))
            .header("x-probe", "kept")
            .body("payload")
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "round {round}\n{}", sc.diagnostics());
        assert_eq!(r.text().unwrap(), "kept:payload", "round {round}");
        for i in 0..3 {
            let r = client().get(sc.listener_url("in", "/x")).send().unwrap();
            assert_eq!(
                (
                    r.status().as_u16(),
                    r.headers().get("x-outrigger-error").cloned()
                ),
                (200, None),
                "round {round}, request {i}\n{}",
                sc.diagnostics()
            );
        }
    }
    let started = events(&sc).iter().filter(|(e, _)| e == "started").count();
    assert_eq!(started, 3, "{:?}\n{}", events(&sc), sc.diagnostics());
}

#[test]
fn always_restarts_until_max_restarts_then_exits_with_the_apps_code() {
    let mut sc = Spawn {
        config: "app:\n  restart: always\n  max_restarts: 2\n",
        app: &["sh", "-c", "echo run >> runs; exit 5"],
        ..Spawn::default()
    }
    .start();
    let status = sc.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(5), "{}", sc.diagnostics());
    let runs = std::fs::read_to_string(sc.path("runs")).unwrap();
    assert_eq!(runs.lines().count(), 3, "{}", sc.diagnostics());
    assert!(sc.stderr().contains("giving up"), "{}", sc.diagnostics());
}

#[test]
fn never_restart_exits_with_the_apps_code_and_a_missing_program_is_127() {
    let mut sc = Spawn {
        config: "",
        app: &["sh", "-c", "exit 4"],
        ..Spawn::default()
    }
    .start();
    assert_eq!(sc.wait_exit(Duration::from_secs(10)).code(), Some(4));
    let mut sc = Spawn {
        config: "",
        app: &["/nonexistent/program"],
        ..Spawn::default()
    }
    .start();
    assert_eq!(sc.wait_exit(Duration::from_secs(10)).code(), Some(127));
}

#[test]
fn forwarded_signals_reach_the_app() {
    let backend = Backend::http();
    let sc = Spawn {
        config: &config(&backend, "  forward_signals: [SIGHUP, usr1]\n", ""),
        app: &["python3", APP],
        env: &[("APP_SOCKET", "app.sock")],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    sc.signal(Signal::SIGUSR1);
    eventually(Duration::from_secs(5), "usr1 at the app", || {
        event_time(&sc, "usr1")
    });
    // SIGHUP reloads Outrigger's config and, as listed, reaches the app too.
    sc.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(5), "hup at the app", || {
        event_time(&sc, "hup")
    });
    eventually(Duration::from_secs(5), "the config reload", || {
        (sc.metric("outrigger_config_reloads_total{result=\"success\"}") == 1.0).then_some(())
    });
}

#[test]
fn wait_shutdown_runs_the_command_then_stops_the_sidecar() {
    let backend = Backend::http();
    let mut sc = Sidecar::start(&format!(
        "listeners:\n  - name: out\n    address: 127.0.0.1:0\n    direction: outbound\n    routes:\n      - cluster: backend\nclusters:\n  backend:\n    endpoints: [{}]\n",
        backend.address()
    ));
    let script = format!(
        "curl -s -o /dev/null -w '%{{http_code}}' http://{}/from-job > code.txt; exit 7",
        sc.listeners["out"]
    );
    let admin = sc.admin.to_string();
    let (code, _, stderr) = run_to_end(
        &[
            "wait",
            "--shutdown",
            "--admin",
            &admin,
            "--",
            "sh",
            "-c",
            &script,
        ],
        &[],
        sc.dir.path(),
    );
    assert_eq!(code, 7, "{stderr}");
    assert_eq!(std::fs::read_to_string(sc.path("code.txt")).unwrap(), "200");
    let status = sc.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", sc.diagnostics());
    assert!(sc.stderr().contains("stopping"), "{}", sc.diagnostics());
}

#[test]
fn wait_without_a_sidecar_times_out_with_69() {
    let dir = tempfile::tempdir().unwrap();
    let admin = dead_port().to_string();
    let started = Instant::now();
    let (code, _, stderr) = run_to_end(
        &[
            "wait",
            "--timeout",
            "300ms",
            "--admin",
            &admin,
            "--",
            "true",
        ],
        &[],
        dir.path(),
    );
    assert_eq!(code, 69, "{stderr}");
    assert!(stderr.contains("was not ready within 300ms"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Plain `wait -- CMD` execs the command once ready: its exit code is the process's.
    let sc = Sidecar::start("");
    sc.wait_ready();
    let (code, _, stderr) = run_to_end(
        &[
            "wait",
            "--admin",
            &sc.admin.to_string(),
            "--",
            "sh",
            "-c",
            "exit 9",
        ],
        &[],
        dir.path(),
    );
    assert_eq!(code, 9, "{stderr}");
    let _ = BIN;
}

#[test]
fn kubernetes_mode_ready_follows_the_app_probe() {
    let app = Backend::http();
    let failing = Sidecar::start(&format!(
        "app:\n  address: {}\n  probe:\n    http: /status/503\n",
        app.address()
    ));
    // /ready waits for the app; /ready/outbound (what `outrigger wait` polls) does not.
    eventually(Duration::from_secs(5), "the app probed", || {
        (app.count() >= 2).then_some(())
    });
    let (status, body) = failing.get("/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("answered 503"), "{body}");
    assert_eq!(failing.get("/ready/outbound").0, 200);
    let passing = Sidecar::start(&format!(
        "app:\n  address: {}\n  probe:\n    http: /healthz\n",
        app.address()
    ));
    passing.wait_ready();
    assert!(
        app.seen()
            .iter()
            .any(|s| s.path == "/healthz" && s.header("user-agent") == Some("outrigger"))
    );
}

fn app_pid(sc: &Sidecar) -> i32 {
    events(sc)
        .iter()
        .find_map(|(e, _)| e.strip_prefix("pid-")?.parse().ok())
        .expect("the app wrote its pid")
}

#[test]
fn a_fast_stop_signals_the_app_at_once_even_with_inbound_in_flight() {
    let backend = Backend::http();
    let mut sc = Spawn {
        config: &config(&backend, "", ""),
        app: &["python3", APP],
        env: &[("APP_SOCKET", "app.sock")],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    let url = sc.listener_url("in", "/slow/5000");
    let _inflight = std::thread::spawn(move || client().get(url).send().map(|r| r.status()));
    eventually(Duration::from_secs(5), "the in-flight request", || {
        (sc.metric("outrigger_connections_open{direction=\"inbound\",listener=\"in\"}") >= 1.0)
            .then_some(())
    });
    let started = Instant::now();
    sc.signal(Signal::SIGINT);
    let status = sc.wait_exit(Duration::from_secs(10));
    // The app got SIGINT and exited 0 on its own; not SIGKILLed (137) at an expired deadline.
    assert_eq!(status.code(), Some(0), "{}", sc.diagnostics());
    assert!(event_time(&sc, "int").is_some(), "{:?}", events(&sc));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a fast stop took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_stop_during_restart_backoff_exits_with_the_apps_last_code() {
    let mut sc = Spawn {
        config: "app:\n  restart: always\n",
        app: &["sh", "-c", "echo run >> runs; exit 3"],
        ..Spawn::default()
    }
    .start();
    eventually(Duration::from_secs(10), "the first restart wait", || {
        sc.stderr().contains("restarting it").then_some(())
    });
    sc.signal(Signal::SIGTERM);
    let status = sc.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(3), "{}", sc.diagnostics());
    let runs = std::fs::read_to_string(sc.path("runs")).unwrap();
    assert_eq!(
        runs.lines().count(),
        1,
        "restarted while stopping\n{}",
        sc.diagnostics()
    );
}

#[test]
fn an_app_that_dies_during_the_inbound_drain_is_not_restarted() {
    let backend = Backend::http();
    let mut sc = Spawn {
        config: &config(&backend, "  restart: on-failure\n", ""),
        app: &["python3", APP],
        env: &[("APP_SOCKET", "app.sock")],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    let url = sc.listener_url("in", "/slow/3000");
    let inflight =
        std::thread::spawn(move || client().get(url).send().map(|r| r.status().as_u16()));
    eventually(Duration::from_secs(5), "the in-flight request", || {
        (sc.metric("outrigger_connections_open{direction=\"inbound\",listener=\"in\"}") >= 1.0)
            .then_some(())
    });
    sc.signal(Signal::SIGTERM);
    eventually(Duration::from_secs(5), "the inbound drain", || {
        (sc.get("/ready").0 == 503).then_some(())
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(app_pid(&sc)), Signal::SIGKILL).unwrap();
    let status = sc.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(137), "{}", sc.diagnostics());
    let started = events(&sc).iter().filter(|(e, _)| e == "started").count();
    assert_eq!(started, 1, "restarted while stopping\n{}", sc.diagnostics());
    // The client sees the app's connection die: a 502, not a hang.
    assert_eq!(inflight.join().unwrap().unwrap(), 502);
}

#[test]
fn drain_delay_keeps_accepting_with_ready_503() {
    let backend = Backend::http();
    let mut sc = Spawn {
        config: &format!("runtime:\n  drain_delay: 1s\n{}", config(&backend, "", "")),
        app: &["python3", APP],
        env: &[("APP_SOCKET", "app.sock")],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    sc.signal(Signal::SIGTERM);
    eventually(Duration::from_secs(5), "/ready 503", || {
        (sc.get("/ready").0 == 503).then_some(())
    });
    // A new connection during the delay is still served.
    let r = client().get(sc.listener_url("in", "/late")).send().unwrap();
    assert_eq!(r.status(), 200, "{}", sc.diagnostics());
    assert_eq!(sc.wait_exit(Duration::from_secs(20)).code(), Some(0));
    assert!(
        sc.stderr().contains("still accepting"),
        "{}",
        sc.diagnostics()
    );
}

#[test]
fn a_probe_failing_after_ready_turns_ready_503_while_traffic_flows() {
    let backend = Backend::http();
    let sc = Spawn {
        config: &config(&backend, "    interval: 100ms\n", ""),
        app: &["python3", APP],
        env: &[("APP_SOCKET", "app.sock")],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    std::fs::write(sc.path("unhealthy"), "").unwrap();
    let report = eventually(Duration::from_secs(10), "/ready 503", || {
        let r = sc.get_json("/ready");
        (r["ready"] == false).then_some(r)
    });
    assert_eq!(
        report["components"]["app"]["state"], "unhealthy",
        "{report}"
    );
    assert_eq!(sc.metric("outrigger_app_ready"), 0.0);
    let r = client()
        .get(sc.listener_url("in", "/still"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    std::fs::remove_file(sc.path("unhealthy")).unwrap();
    sc.wait_ready();
}

#[test]
fn an_exec_probe_gates_ready() {
    let sc = Spawn {
        config: "app:\n  probe:\n    exec: [test, -f, ready-flag]\n    interval: 100ms\n",
        app: &["sleep", "30"],
        ..Spawn::default()
    }
    .start();
    eventually(Duration::from_secs(5), "a failed probe", || {
        (sc.metric("outrigger_app_probe_failures_total") >= 1.0).then_some(())
    });
    assert_eq!(sc.get("/ready").0, 503);
    std::fs::write(sc.path("ready-flag"), "").unwrap();
    sc.wait_ready();
}

#[test]
fn as_pid_1_orphans_are_reaped() {
    // A PID namespace makes Outrigger PID 1, as in a container. Needs root (CI runs as root).
    let out = std::process::Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            BIN,
            "run",
            "--set",
            "admin.address=127.0.0.1:0",
            "--",
        ])
        .args([
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do (sleep 0.1 &); done; sleep 1.5; ps -eo stat=,comm=",
        ])
        .output()
        .expect("unshare (util-linux) runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("outrigger"),
        "ps ran in the namespace: {stdout}\n{stderr}"
    );
    let zombies: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with('Z'))
        .collect();
    assert!(
        zombies.is_empty(),
        "zombies left: {zombies:?}\n{stdout}\n{stderr}"
    );
    assert!(stderr.contains("reaping orphaned processes"), "{stderr}");
}
