//! The disk buffer of the app's stdout/stderr (`logs.buffer`): the app's lines wait in spool
//! files while the sink is down, survive a `kill -9` of Outrigger, and past the cap are dropped
//! and counted.

use std::path::Path;
use std::sync::atomic::Ordering;

use super::{AppGuard, Receiver, WAIT, assert_once};
use crate::support::{Spawn, eventually};

fn config(rx: &Receiver, dir: &Path, extra: &str) -> String {
    format!(
        "logs:\n  sources: [{{app: stdio, format: plain}}]\n  sinks: [{{http: {}}}]\n  buffer:\n    dir: {}\n{extra}  poll: 50ms\n  batch:\n    max_lines: 100\n    max_wait: 50ms\n    retry_max: 200ms\n",
        rx.url,
        dir.join("spool").display()
    )
}

/// Everything the spool files hold now.
fn spooled(dir: &Path) -> String {
    let mut text = String::new();
    for e in std::fs::read_dir(dir.join("spool")).into_iter().flatten() {
        let path = e.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("spool-")
        {
            text.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    text
}

/// An app that writes `seq 1 N` once (not again after a restart: a marker in `dir`), then
/// sleeps with its pid in `dir/app.pid`.
fn app_script(dir: &Path, n: usize) -> String {
    format!(
        "echo $$ > {d}/app.pid; if [ ! -f {d}/ran ]; then touch {d}/ran; seq 1 {n}; fi; exec sleep 600",
        d = dir.display()
    )
}

/// How many spool files there are.
fn spool_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("spool"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("spool-")
        })
        .count()
}

fn numbers(n: usize) -> Vec<String> {
    (1..=n).map(|i| i.to_string()).collect()
}

#[test]
fn the_apps_lines_wait_on_disk_while_the_sink_is_down_then_arrive_once() {
    let rx = Receiver::start();
    rx.failing.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let _app = AppGuard(dir.path().join("app.pid"));
    // 1 MiB of spool in 256 KiB files; 20k lines are ~830 KiB with their CRI prefix: several
    // files, none dropped.
    let config = config(&rx, dir.path(), "    max_bytes: 1MiB\n");
    let script = app_script(dir.path(), 20_000);
    let mut sc = Spawn {
        config: &config,
        app: &["sh", "-c", &script],
        ..Spawn::default()
    }
    .start();
    eventually(WAIT, "every line on disk and the sink refusing", || {
        (spooled(dir.path()).contains(" stdout F 20000\n")
            && rx.refused.load(Ordering::SeqCst) >= 3)
            .then_some(())
    });
    // Echoed all the same (the echo is written after the line is queued for the disk), and
    // the buffer's fill shown.
    eventually(WAIT, "every line echoed", || {
        sc.stdout().contains("\n20000\n").then_some(())
    });
    let full = sc.metric("outrigger_logs_disk_buffer_bytes");
    assert!(full > 800_000.0, "{full}");
    assert_eq!(
        sc.metric("outrigger_logs_disk_buffer_max_bytes"),
        (1 << 20) as f64
    );
    assert!(spool_files(dir.path()) >= 3, "{}", spool_files(dir.path()));
    assert!(rx.records().is_empty());
    rx.failing.store(false, Ordering::SeqCst);
    let want = numbers(20_000);
    let counts = rx.wait_for(&want);
    assert_once(&counts, &want, &sc);
    for r in rx.records() {
        assert_eq!(
            (&r["source"], &r["stream"]),
            (&"app".into(), &"stdout".into()),
            "{r}"
        );
        assert!(r.get("file").is_none(), "{r}");
    }
    // Shipped spool files are deleted (the one being written stays), and the fill drops.
    eventually(WAIT, "shipped spool files deleted", || {
        (spool_files(dir.path()) <= 1
            && sc.metric("outrigger_logs_disk_buffer_bytes") <= (256 << 10) as f64)
            .then_some(())
    });
    assert_eq!(
        sc.metric("outrigger_logs_dropped_lines_total{source=\"app\",reason=\"buffer_full\"}"),
        0.0
    );
    sc.signal(nix::sys::signal::Signal::SIGTERM);
    sc.wait_exit(WAIT);
}

#[test]
fn the_apps_spooled_lines_survive_a_kill_of_the_sidecar() {
    let rx = Receiver::start();
    rx.failing.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let app = AppGuard(dir.path().join("app.pid"));
    let config = config(&rx, dir.path(), "");
    let script = app_script(dir.path(), 20_000);
    let spawn = || {
        Spawn {
            config: &config,
            app: &["sh", "-c", &script],
            ..Spawn::default()
        }
        .start()
    };
    let mut sc = spawn();
    eventually(WAIT, "every line on disk", || {
        spooled(dir.path())
            .contains(" stdout F 20000\n")
            .then_some(())
    });
    // The sink back: kill -9 as soon as the first batch arrived (mid-stream: no drain, no
    // last checkpoint).
    rx.failing.store(false, Ordering::SeqCst);
    eventually(WAIT, "the first batch", || {
        (!rx.records.lock().unwrap().is_empty()).then_some(())
    });
    sc.signal(nix::sys::signal::Signal::SIGKILL);
    sc.wait_exit(WAIT);
    // The app is orphaned by the SIGKILL: stopped here, as a pod's restart would.
    app.kill();
    let before = rx.records().len();
    // Killed before everything was shipped: the restart has lines to ship from the spool.
    assert!(before < 20_000, "{before} received before the kill");
    let sc = spawn();
    let want = numbers(20_000);
    let counts = rx.wait_for(&want);
    let missing = want.iter().filter(|e| !counts.contains_key(*e)).count();
    let doubled: usize = counts.values().map(|n| n - 1).sum();
    eprintln!("received before the kill: {before}, doubled after the restart: {doubled}");
    assert_eq!(missing, 0, "{}", sc.diagnostics());
    // At-least-once: at most the one batch in flight at the kill (and the one being filled)
    // is sent again.
    assert!(
        doubled <= 200,
        "{doubled} lines doubled ({before} received before the kill)\n{}",
        sc.diagnostics()
    );
    assert_eq!(counts.len(), want.len());
}

#[test]
fn past_the_buffers_cap_the_apps_lines_are_dropped_and_counted_and_the_rest_arrive() {
    let rx = Receiver::start();
    rx.failing.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let _app = AppGuard(dir.path().join("app.pid"));
    // 1 MiB of spool: ~25k lines of ~45 bytes (CRI prefix included); 60k are written.
    let config = config(&rx, dir.path(), "    max_bytes: 1MiB\n");
    // Once `go` is there (the buffer emptied), one more line.
    let script = format!(
        "echo $$ > {d}/app.pid; seq 1 60000; while [ ! -f {d}/go ]; do sleep 0.05; done; echo after; exec sleep 600",
        d = dir.path().display()
    );
    let mut sc = Spawn {
        config: &config,
        app: &["sh", "-c", &script],
        ..Spawn::default()
    }
    .start();
    let series = "outrigger_logs_dropped_lines_total{source=\"app\",reason=\"buffer_full\"}";
    // The echo is written after the line was queued for the buffer's writer.
    eventually(WAIT, "the app's lines all taken", || {
        sc.stdout().contains("\n60000\n").then_some(())
    });
    let (dropped, on_disk) = eventually(WAIT, "every line spooled or dropped", || {
        let dropped = sc.metric(series) as usize;
        let on_disk = spooled(dir.path()).lines().count();
        (dropped > 0 && dropped + on_disk == 60_000).then_some((dropped, on_disk))
    });
    assert!(sc.metric("outrigger_logs_disk_buffer_bytes") <= (1 << 20) as f64);
    rx.failing.store(false, Ordering::SeqCst);
    // The first `on_disk` lines were kept (the buffer filled up, then refused the rest).
    let want = numbers(on_disk);
    let counts = rx.wait_for(&want);
    assert_once(&counts, &want, &sc);
    eprintln!("kept {on_disk}, dropped {dropped}");
    // The buffer gives its room back: the shipped files are deleted (the one being written
    // when the buffer filled up too), and the app's next line is taken and arrives.
    eventually(WAIT, "the shipped spool files deleted", || {
        (sc.metric("outrigger_logs_disk_buffer_bytes") < (256 << 10) as f64).then_some(())
    });
    std::fs::write(dir.path().join("go"), "").unwrap();
    let counts = rx.wait_for(&["after".to_string()]);
    assert_eq!(counts.get("after"), Some(&1), "{}", sc.diagnostics());
    assert_eq!(sc.metric(series) as usize, dropped);
    sc.signal(nix::sys::signal::Signal::SIGTERM);
    sc.wait_exit(WAIT);
}

#[test]
fn a_buffer_dir_that_cannot_be_written_or_without_the_apps_stdio_is_located() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "").unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        format!(
            "logs:\n  sources: [{{files: /var/log/*.log}}]\n  sinks: [{{stdout: true}}]\n  buffer:\n    dir: {}/file/spool\n    max_bytes: 1KiB\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let (code, _, err) =
        crate::support::run_to_end(&["check", "-c", path.to_str().unwrap()], &[], dir.path());
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("bad.yaml:5:") && err.contains("expected a directory Outrigger can write"),
        "{err}"
    );
    assert!(
        err.contains("bad.yaml:6:") && err.contains("at least 1MiB"),
        "{err}"
    );
    assert!(err.contains("add the source {app: stdio}"), "{err}");
}

#[test]
fn an_apps_line_longer_than_a_spool_line_arrives_whole_in_its_pieces() {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let _app = AppGuard(dir.path().join("app.pid"));
    let config = config(&rx, dir.path(), "");
    // 300 KiB: the capture cuts it at 256 KiB, the spool at 256 KiB less its CRI prefix.
    let script = format!(
        "echo $$ > {d}/app.pid; head -c 307200 /dev/zero | tr '\\0' a; echo; echo end; exec sleep 600",
        d = dir.path().display()
    );
    let mut sc = Spawn {
        config: &config,
        app: &["sh", "-c", &script],
        ..Spawn::default()
    }
    .start();
    rx.wait_for(&["end".to_string()]);
    let records = rx.records();
    let mut text = String::new();
    let mut pieces = Vec::new();
    for r in &records {
        // Every piece a record of the app's stdout, none the broken-off end of a spool line.
        assert_eq!(
            (&r["source"], &r["stream"]),
            (&"app".into(), &"stdout".into()),
            "{}",
            &r.to_string()[..200.min(r.to_string().len())]
        );
        let m = r["message"].as_str().unwrap();
        if m != "end" {
            text.push_str(m);
        }
        pieces.push(m.len());
    }
    // The capture's two pieces (256 KiB and the rest), as without the buffer, wherever the
    // pipe's reads split the line (a read holding its end and crossing 256 KiB once made it
    // one piece of 300 KiB). One batch is in flight at a time, so "end" arrives last.
    assert_eq!(pieces, [262_144, 45_056, 3], "{}", sc.diagnostics());
    assert_eq!(text.len(), 307_200);
    assert!(text.bytes().all(|b| b == b'a'));
    assert_eq!(
        sc.metric("outrigger_logs_unparsed_lines_total{source=\"app\",reason=\"container\"}"),
        0.0
    );
    sc.signal(nix::sys::signal::Signal::SIGTERM);
    sc.wait_exit(WAIT);
}
