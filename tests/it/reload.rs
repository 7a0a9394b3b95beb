//! Reloads: `reload:` entries acting on the app (a simulated Kubernetes ConfigMap `..data` swap,
//! webhooks, restarts) and Outrigger's own config applied live — under load without a failed
//! request, or refused whole when invalid.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::lifecycle::{APP, config, events};
use crate::support::{Sidecar, Spawn, client, eventually};

/// A ConfigMap volume as the kubelet lays it out: `..<ts>/app.yaml`, `..data -> ..<ts>`,
/// `app.yaml -> ..data/app.yaml`.
fn configmap(dir: &Path, version: u32, content: &str) {
    let ts = format!("..2026_11_27_00_00_0{version}.000");
    std::fs::create_dir_all(dir.join(&ts)).unwrap();
    std::fs::write(dir.join(&ts).join("app.yaml"), content).unwrap();
    if version == 1 {
        std::os::unix::fs::symlink(&ts, dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/app.yaml", dir.join("app.yaml")).unwrap();
        return;
    }
    // The update: new timestamped dir, a temp link swapped in by rename, old dir removed.
    std::os::unix::fs::symlink(&ts, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    let old = format!("..2026_11_27_00_00_0{}.000", version - 1);
    std::fs::remove_dir_all(dir.join(old)).unwrap();
}

fn count(sc: &Sidecar, event: &str) -> usize {
    events(sc).iter().filter(|(e, _)| e == event).count()
}

#[test]
fn a_configmap_swap_signals_the_app_exactly_once_per_change() {
    let backend = Backend::http();
    let cm = tempfile::tempdir().unwrap();
    configmap(cm.path(), 1, "color: red\n");
    let extra = format!(
        "reload:\n  - name: settings\n    watch: {}/app.yaml\n    action: {{ signal: SIGHUP }}\n    debounce: {{ quiet: 100ms, max: 1s }}\n",
        cm.path().display()
    );
    let sc = Spawn {
        config: &config(&backend, "", &extra),
        app: &["python3", APP],
        env: &[("APP_SOCKET", "app.sock")],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    let actions = "outrigger_reload_actions_total{reload=\"settings\",result=\"success\"}";
    for (version, want) in [(2, 1usize), (3, 2)] {
        configmap(cm.path(), version, &format!("color: v{version}\n"));
        eventually(Duration::from_secs(10), "the app's SIGHUP", || {
            (count(&sc, "hup") == want).then_some(())
        });
        assert_eq!(sc.metric(actions), want as f64);
    }
    // Nothing more comes of it (a bounded look: several debounce periods).
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(count(&sc, "hup"), 2, "{:?}", events(&sc));
    assert_eq!(
        sc.metric("outrigger_reload_changes_total{reload=\"settings\"}"),
        2.0
    );
    // The same content written again is no change.
    std::fs::write(cm.path().join("..data/app.yaml"), "color: v3\n").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(count(&sc, "hup"), 2, "{:?}", events(&sc));
}

#[test]
fn webhook_and_restart_actions() {
    let backend = Backend::http();
    let hook = Backend::http();
    let dir = tempfile::tempdir().unwrap();
    let watched = dir.path().join("conf");
    std::fs::create_dir(&watched).unwrap();
    std::fs::write(watched.join("a.conf"), "1").unwrap();
    std::fs::write(dir.path().join("restart.txt"), "1").unwrap();
    let extra = format!(
        "reload:\n  - name: hook\n    watch: {}\n    action:\n      webhook: {{ url: \"http://{}/-/reload\", expect: 200 }}\n  - name: bounce\n    watch: {}\n    action: {{ restart: true }}\n",
        watched.display(),
        hook.address(),
        dir.path().join("restart.txt").display()
    );
    let sc = Spawn {
        config: &config(&backend, "", &extra),
        app: &["python3", APP],
        env: &[("APP_SOCKET", "app.sock")],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    // An editor's rename-on-save inside the watched directory.
    std::fs::write(watched.join(".a.conf.tmp"), "2").unwrap();
    std::fs::rename(watched.join(".a.conf.tmp"), watched.join("a.conf")).unwrap();
    eventually(Duration::from_secs(10), "the webhook call", || {
        (hook.count() == 1).then_some(())
    });
    let seen = &hook.seen()[0];
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/-/reload")
    );

    std::fs::write(dir.path().join("restart.txt"), "2").unwrap();
    eventually(Duration::from_secs(15), "the app restarted", || {
        (count(&sc, "started") == 2 && count(&sc, "listening") == 2).then_some(())
    });
    sc.wait_ready();
    assert_eq!(
        count(&sc, "term"),
        1,
        "stopped gracefully: {:?}",
        events(&sc)
    );
    assert_eq!(sc.metric("outrigger_app_restarts_total"), 1.0);
    let r = client()
        .get(sc.listener_url("in", "/after"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hook.count(), 1, "one change, one call");
}

/// The outbound config with every request sent to `to` and a header naming it.
fn outbound(to: &str, a: &Backend, b: &Backend, extra: &str) -> String {
    format!(
        "runtime:\n  watch_config: false\nlisteners:\n  - name: out\n    address: 127.0.0.1:0\n    direction: outbound\n    routes:\n      - cluster: {to}\n        request_headers: {{ add: {{ x-generation: {to} }} }}\n{extra}clusters:\n  a:\n    endpoints: [{}]\n  b:\n    endpoints: [{}]\n",
        a.address(),
        b.address()
    )
}

#[test]
fn a_valid_reload_under_load_fails_no_request() {
    let (a, b) = (Backend::http(), Backend::http());
    let sc = Sidecar::start(&outbound("a", &a, &b, ""));
    sc.wait_ready();
    let url = sc.listener_url("out", "/load");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (url, stop, ok, failed) = (url.clone(), stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                // One keep-alive client per worker: reloads must reach open connections.
                let c = client();
                let deadline = Instant::now() + Duration::from_secs(30);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match c.get(&url).send() {
                        Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let reloads = "outrigger_config_reloads_total{result=\"success\"}";
    for (i, to) in ["b", "a", "b", "a", "b"].iter().enumerate() {
        std::fs::write(&sc.config_path, outbound(to, &a, &b, "")).unwrap();
        let r = client().post(sc.url("/reload")).send().unwrap();
        assert_eq!(r.status(), 202);
        eventually(Duration::from_secs(10), "the reload", || {
            (sc.metric(reloads) == (i + 1) as f64).then_some(())
        });
        std::thread::sleep(Duration::from_millis(150));
    }
    stop.store(true, Ordering::Relaxed);
    workers.into_iter().for_each(|w| w.join().unwrap());
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{ok} ok\n{}", sc.diagnostics());
    assert!(ok > 100, "too little load to mean anything: {ok}");
    assert!(a.count() > 0 && b.count() > 0);
    // The last config (b) is what the keep-alive connections now see.
    let last = a.count() + b.count();
    let c = client();
    for _ in 0..5 {
        c.get(&url).send().unwrap();
    }
    assert_eq!(a.count() + b.count(), last + 5);
    let newest = b.seen();
    assert_eq!(newest.last().unwrap().header("x-generation"), Some("b"));
    let config = sc.get_json("/config");
    assert_eq!(config["last_reload"]["result"], "success", "{config}");
}

#[test]
fn an_invalid_reload_keeps_serving_and_says_why() {
    let (a, b) = (Backend::http(), Backend::http());
    let sc = Sidecar::start(&outbound("a", &a, &b, ""));
    sc.wait_ready();
    let url = sc.listener_url("out", "/x");
    std::fs::write(
        &sc.config_path,
        outbound("nope", &a, &b, "    limits: { max_connections: 0 }\n"),
    )
    .unwrap();
    client().post(sc.url("/reload")).send().unwrap();
    eventually(Duration::from_secs(10), "the failed reload", || {
        (sc.metric("outrigger_config_reloads_total{result=\"failure\"}") == 1.0).then_some(())
    });
    let config = sc.get_json("/config");
    let errors = config["last_reload"]["errors"].to_string();
    assert!(errors.contains("outrigger.yaml:8:"), "{config}");
    assert!(errors.contains("no cluster named \\\"nope\\\""), "{config}");
    assert!(errors.contains("max_connections"), "{config}");
    // Still serving with the old config.
    assert_eq!(client().get(&url).send().unwrap().status(), 200);
    assert_eq!(a.count(), 1);
    assert!(sc.stderr().contains("config reload rejected"));
}

#[test]
fn a_changed_config_file_is_applied_and_restart_only_keys_are_named() {
    let (a, b) = (Backend::http(), Backend::http());
    // watch_config on (the default): the file change alone triggers the reload.
    let text = outbound("a", &a, &b, "").replace("runtime:\n  watch_config: false\n", "");
    let sc = Sidecar::start(&text);
    sc.wait_ready();
    let url = sc.listener_url("out", "/x");
    client().get(&url).send().unwrap();
    assert_eq!(a.count(), 1);
    let changed = outbound(
        "b",
        &a,
        &b,
        "    limits: { rate_limit: { requests_per_second: 1, burst: 1 } }\n",
    )
    .replace(
        "runtime:\n  watch_config: false\n",
        "runtime:\n  worker_threads: 2\n",
    )
    .replace(
        "address: 127.0.0.1:0\n    direction",
        "address: 127.0.0.1:2\n    direction",
    );
    std::fs::write(&sc.config_path, changed).unwrap();
    let config = eventually(Duration::from_secs(10), "the reload", || {
        let c = sc.get_json("/config");
        (c["last_reload"]["result"] == "success").then_some(c)
    });
    let restart = config["last_reload"]["needs_restart"].to_string();
    assert!(restart.contains("runtime.worker_threads"), "{config}");
    assert!(restart.contains("listeners[out].address"), "{config}");
    // Routes and limits changed live, on the listener's old address.
    let statuses: Vec<u16> = (0..3)
        .map(|_| client().get(&url).send().unwrap().status().as_u16())
        .collect();
    assert_eq!(statuses[0], 200);
    assert!(
        statuses.contains(&503),
        "the new rate limit applies: {statuses:?}"
    );
    assert_eq!(b.count(), 1, "the new route applies");
    assert_eq!(a.count(), 1);
}

#[test]
fn connection_limits_survive_reloads() {
    use std::io::{Read, Write};
    let app = Backend::http();
    let sc = Sidecar::start(&format!(
        "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    limits: {{ max_connections: 2 }}\n",
        app.address()
    ));
    sc.wait_ready();
    let addr = sc.listeners["public"].clone();
    let request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    let served = |s: &mut std::net::TcpStream| -> bool {
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        s.write_all(request).unwrap();
        let mut buf = [0u8; 512];
        matches!(s.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200"))
    };
    let mut held: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    for s in &mut held {
        assert!(served(s));
    }
    // Reloads of the unchanged file must not hand out a fresh set of slots.
    for i in 1..=3 {
        client().post(sc.url("/reload")).send().unwrap();
        eventually(Duration::from_secs(10), "the reload", || {
            (sc.metric("outrigger_config_reloads_total{result=\"success\"}") == i as f64)
                .then_some(())
        });
    }
    let mut third = std::net::TcpStream::connect(&addr).unwrap();
    assert!(
        !served(&mut third),
        "a third connection was served past max_connections: 2"
    );
    drop(held.pop());
    // Its request is answered once a slot is free.
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = third.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
}

#[test]
fn changing_reload_entries_keeps_the_unchanged_ones_watching() {
    let hook = Backend::http();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));
    std::fs::write(&a, "1").unwrap();
    std::fs::write(&b, "1").unwrap();
    let entry = |name: &str, path: &Path| {
        format!(
            "  - name: {name}\n    watch: {}\n    action: {{ webhook: {{ url: \"http://{}/{name}\" }} }}\n    debounce: {{ quiet: 300ms, max: 1s }}\n",
            path.display(),
            hook.address()
        )
    };
    let sc = Sidecar::start(&format!("reload:\n{}", entry("a", &a)));
    sc.wait_ready();
    // The app's file and the config (adding entry b) change together, as when one ConfigMap
    // holds both: a's pending change must not be lost when the entries are swapped.
    std::fs::write(&a, "2").unwrap();
    std::fs::write(
        &sc.config_path,
        format!("reload:\n{}{}", entry("a", &a), entry("b", &b)),
    )
    .unwrap();
    eventually(Duration::from_secs(10), "a's webhook", || {
        hook.seen().iter().any(|s| s.path == "/a").then_some(())
    });
    eventually(Duration::from_secs(10), "the reload", || {
        (sc.metric("outrigger_config_reloads_total{result=\"success\"}") == 1.0).then_some(())
    });
    std::fs::write(&b, "2").unwrap();
    eventually(Duration::from_secs(10), "b's webhook", || {
        hook.seen().iter().any(|s| s.path == "/b").then_some(())
    });
    assert_eq!(hook.seen().iter().filter(|s| s.path == "/a").count(), 1);
}

#[test]
fn an_https_webhook_is_called_with_the_given_ca() {
    // The HTTPS server is another sidecar terminating TLS in front of the hook backend.
    let pki = crate::tls::Pki::new();
    let hook = Backend::http();
    let (cert, key) = pki.issue("hook", &[]);
    let server = Sidecar::start(&format!(
        "app:\n  address: {}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n    tls: {{ cert: {}, key: {} }}\n",
        hook.address(),
        cert.display(),
        key.display()
    ));
    server.wait_ready();
    let port = server.listeners["public"]
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let watched = dir.path().join("conf.txt");
    std::fs::write(&watched, "1").unwrap();
    let sc = Sidecar::start(&format!(
        "reload:\n  - name: hook\n    watch: {}\n    action:\n      webhook: {{ url: \"https://localhost:{port}/-/reload\", ca: {} }}\n",
        watched.display(),
        pki.ca().display()
    ));
    sc.wait_ready();
    std::fs::write(&watched, "2").unwrap();
    eventually(Duration::from_secs(10), "the https webhook call", || {
        (hook.count() == 1).then_some(())
    });
    assert_eq!(hook.seen()[0].path, "/-/reload");
    assert_eq!(hook.seen()[0].header("x-forwarded-proto"), Some("https"));
    assert_eq!(
        sc.metric("outrigger_reload_actions_total{reload=\"hook\",result=\"success\"}"),
        1.0
    );
}

/// `http2_server` changes on reload like any listener setting: the listener gets a new
/// generation (nothing named for a restart); an HTTP/2 connection open across the reload keeps
/// the server it began with and takes the new routes; new connections get the new server; and
/// back.
#[test]
fn a_reload_switches_http2_server_for_new_connections() {
    let (a, b) = (Backend::http(), Backend::http());
    let config =
        |to: &str, server: &str| outbound(to, &a, &b, &format!("    http2_server: {server}\n"));
    let sc = Spawn {
        config: &config("a", "hyper"),
        // Our server logs each connection it takes.
        args: &["--log-level", "info,outrigger::proxy::accept=debug"],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    let ours = || {
        sc.stderr()
            .matches("HTTP/2 connection served by outrigger's own server")
            .count()
    };
    let url = sc.listener_url("out", "/x");
    let h2 = || {
        reqwest::blocking::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap()
    };
    let get = |c: &reqwest::blocking::Client| {
        let r = c.get(&url).send().unwrap();
        assert_eq!(r.status(), 200, "{}", sc.diagnostics());
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
    };
    let before = h2();
    get(&before);
    assert_eq!(a.count(), 1);
    assert_eq!(ours(), 0, "{}", sc.stderr());
    let reloads = "outrigger_config_reloads_total{result=\"success\"}";
    for (i, (to, server, served_by_ours)) in [("b", "outrigger", 1), ("a", "hyper", 1)]
        .into_iter()
        .enumerate()
    {
        std::fs::write(&sc.config_path, config(to, server)).unwrap();
        let r = client().post(sc.url("/reload")).send().unwrap();
        assert_eq!(r.status(), 202);
        eventually(Duration::from_secs(10), "the reload", || {
            (sc.metric(reloads) == (i + 1) as f64).then_some(())
        });
        let c = sc.get_json("/config");
        assert_eq!(c["config"]["listeners"][0]["http2_server"], server, "{c}");
        assert_eq!(
            c["last_reload"]["needs_restart"],
            serde_json::json!([]),
            "{c}"
        );
        // The connection from before the reloads: hyper's still, with the newest routes.
        let (seen_a, seen_b) = (a.count(), b.count());
        get(&before);
        let newest = if to == "a" { &a } else { &b };
        assert_eq!(a.count() + b.count(), seen_a + seen_b + 1);
        assert_eq!(
            newest.seen().last().unwrap().header("x-generation"),
            Some(to)
        );
        // A new connection: the new server.
        get(&h2());
        eventually(
            Duration::from_secs(5),
            "the new connection's server",
            || (ours() == served_by_ours).then_some(()),
        );
    }
    assert_eq!(ours(), 1, "{}", sc.stderr());
}
