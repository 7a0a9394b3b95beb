//! The process's own memory (src/memory.rs): start-up's code pages leave the resident set once
//! start-up is over.

use std::time::Duration;

use crate::support::{Sidecar, Spawn};

/// Resident KiB of the sidecar binary's executable mappings (its `.text`).
fn text_rss_kib(sc: &Sidecar) -> u64 {
    let exe = std::fs::read_link(format!("/proc/{}/exe", sc.pid())).unwrap();
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", sc.pid())).unwrap();
    let mut ours = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let mut words = line.split_ascii_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let perms = words.next().unwrap_or("");
            ours = perms.contains('x') && line.ends_with(exe.to_str().unwrap());
        } else if ours && first == "Rss:" {
            kib += words.next().unwrap().parse::<u64>().unwrap();
        }
    }
    kib
}

/// The environment under which a sidecar logs its code-pages release (at debug).
const SAYS_RELEASED: (&str, &str) = ("OUTRIGGER_LOG_LEVEL", "info,outrigger::memory=debug");

/// Waits for the start-up code pages' release ([`SAYS_RELEASED`]'s log line), 2 s after
/// start-up: its log line, not a drop of the resident set, which what runs after it brings back.
fn released(sc: &Sidecar) {
    crate::support::eventually(Duration::from_secs(15), "the code-pages release", || {
        sc.stderr()
            .contains("start-up code pages released")
            .then_some(())
    });
}

#[test]
fn start_up_code_pages_leave_the_resident_set() {
    let app = crate::backend::Backend::http();
    let config = &format!(
        "app: {{ address: \"{}\" }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n",
        app.address()
    );
    let kept = Spawn {
        config,
        env: &[("OUTRIGGER_CODE_PAGES", "keep")],
        ..Spawn::default()
    }
    .start();
    kept.wait_ready();
    let released = Spawn {
        config,
        ..Spawn::default()
    }
    .start();
    released.wait_ready();
    let get = |sc: &Sidecar| {
        crate::support::client()
            .get(sc.listener_url("public", "/"))
            .send()
            .map(|r| r.status().as_u16())
            .unwrap()
    };
    for sc in [&kept, &released] {
        assert_eq!(get(sc), 200, "{}", sc.diagnostics());
    }
    // Start-up's code (and a request's) mapped in both; 2 s after start-up, the default gives
    // it back: at least a quarter of what `keep` holds is gone. Not "half": what steady state
    // runs comes back (a request, the runtime's timers, fault-around and whole page-cache
    // folios with it), ~10 MiB in a debug build whichever features it has, and the proxy-only
    // build keeps only ~20 MiB (CI saw 10,984 KiB against 20,004; the full build: ~10 against
    // ~31 MiB).
    let kept_kib = text_rss_kib(&kept);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while text_rss_kib(&released) * 4 > kept_kib * 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "code pages not released: {} KiB, kept {kept_kib} KiB\n{}",
            text_rss_kib(&released),
            released.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // `keep` kept them.
    assert!(
        text_rss_kib(&kept) >= kept_kib / 2,
        "{}",
        kept.diagnostics()
    );
    // And runs on: what a request needs faults back in.
    assert_eq!(get(&released), 200, "{}", released.diagnostics());
}

#[test]
fn an_unknown_code_pages_mode_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["false", "off", "Keep"] {
        let (code, _, stderr) =
            crate::support::run_to_end(&["check"], &[("OUTRIGGER_CODE_PAGES", bad)], dir.path());
        assert_eq!(code, 78, "{bad}: {stderr}");
        assert!(stderr.contains("runtime.code_pages"), "{bad}: {stderr}");
    }
}

#[test]
fn the_trimmer_unmaps_the_code_a_load_mapped() {
    let app = crate::backend::Backend::http();
    let config = &format!(
        "app: {{ address: \"{}\" }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n",
        app.address()
    );
    let sc = Spawn {
        config,
        env: &[SAYS_RELEASED],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    released(&sc);
    // The trimmer samples the resident set once a second and trims only what grew above the
    // lowest it saw: let it see the released one first (no log line tells when it has).
    std::thread::sleep(Duration::from_millis(1500));
    let released = text_rss_kib(&sc);
    // A load over several paths: their code comes back (more than the trimmer's 2 MiB of growth
    // in a debug build).
    let client = crate::support::client();
    for _ in 0..50 {
        for url in [
            sc.listener_url("public", "/"),
            sc.url("/metrics"),
            sc.url("/config"),
            sc.url("/ready"),
        ] {
            let _ = client.get(url).send().and_then(|r| r.bytes());
        }
    }
    let loaded = text_rss_kib(&sc);
    assert!(
        loaded > released + 2048,
        "released {released} KiB, loaded {loaded} KiB"
    );
    // Quiet for two 1 s samples: the trimmer runs and unmaps them: at least half of what the
    // load mapped is gone again (not "half of the loaded total": with a large resident base,
    // as the proxy-only debug build has, that could stay out of reach after a full unmap).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while text_rss_kib(&sc) > released + (loaded - released) / 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "not unmapped after the load: {} KiB (loaded {loaded}, released {released})\n{}",
            text_rss_kib(&sc),
            sc.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// glibc's malloc arenas other than the main one (the `[heap]`): each is an anonymous read-write
/// mapping at a 64 MiB boundary, its heap, followed up to the next 64 MiB boundary by the
/// inaccessible rest of its reservation (unless the heap fills it).
fn malloc_arenas(sc: &Sidecar) -> usize {
    const SIZE: usize = 64 << 20;
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", sc.pid())).unwrap();
    let maps: Vec<(usize, usize, &str, bool)> = maps
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_ascii_whitespace().collect();
            let (s, e) = f[0].split_once('-').unwrap();
            let s = usize::from_str_radix(s, 16).unwrap();
            let e = usize::from_str_radix(e, 16).unwrap();
            (s, e, f[1], f.len() == 5 && f[4] == "0")
        })
        .collect();
    maps.iter()
        .enumerate()
        .filter(|&(i, &(s, e, perms, anon))| {
            anon && perms == "rw-p"
                && s % SIZE == 0
                && (e - s == SIZE
                    || maps
                        .get(i + 1)
                        .is_some_and(|&(ns, ne, np, _)| ns == e && ne == s + SIZE && np == "---p"))
        })
        .count()
}

#[test]
fn with_one_worker_every_thread_allocates_from_one_malloc_arena() {
    let app = crate::backend::Backend::http();
    let config = |workers: usize| {
        format!(
            "runtime: {{ worker_threads: {workers} }}\napp: {{ address: \"{}\" }}\nlisteners:\n  - name: public\n    address: 127.0.0.1:0\n",
            app.address()
        )
    };
    let (one, two) = (config(1), config(2));
    // Says when it released its code pages (at debug).
    let single = Spawn {
        config: &one,
        env: &[SAYS_RELEASED],
        ..Spawn::default()
    }
    .start();
    let several = Spawn {
        config: &two,
        ..Spawn::default()
    }
    .start();
    single.wait_ready();
    // One worker with the limit left to glibc (`OUTRIGGER_MALLOC_ARENA_MAX=default`, the A/B
    // switch): the other threads' arenas come back.
    let glibc = Spawn {
        config: &one,
        env: &[("OUTRIGGER_MALLOC_ARENA_MAX", "default")],
        ..Spawn::default()
    }
    .start();
    several.wait_ready();
    glibc.wait_ready();
    let client = crate::support::client();
    for sc in [&single, &several, &glibc] {
        // Requests (the workers allocate), and files written beside the config (the config
        // watcher's notify thread allocates for each event).
        let mut answered = 0;
        for i in 0..50 {
            let ok = client
                .get(sc.listener_url("public", "/"))
                .send()
                .and_then(|r| r.error_for_status())
                .and_then(|r| r.bytes());
            answered += usize::from(ok.is_ok());
            std::fs::write(sc.path(&format!("beside-{i}.log")), "x").unwrap();
        }
        assert!(answered > 0, "no request answered 2xx through {}", sc.pid());
    }
    // Several workers: glibc gives them arenas of their own (what the count below sees).
    crate::support::eventually(Duration::from_secs(10), "an arena per worker", || {
        (malloc_arenas(&several) > 0).then_some(())
    });
    crate::support::eventually(Duration::from_secs(10), "glibc's arenas", || {
        (malloc_arenas(&glibc) > 0).then_some(())
    });
    // One worker: once the code pages are released (a blocking-pool thread, 2 s after start-up)
    // and the file events handled, still no arena but the main one.
    released(&single);
    assert_eq!(
        malloc_arenas(&single),
        0,
        "{}\n{}",
        std::fs::read_to_string(format!("/proc/{}/maps", single.pid())).unwrap(),
        single.diagnostics()
    );
}
