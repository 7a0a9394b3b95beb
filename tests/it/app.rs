//! The supervised app (`outrigger run -- CMD`) with real child processes: environment, stop
//! signal, exit code propagation.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::{Spawn, eventually};

#[test]
fn exit_code_of_the_app_is_the_sidecars() {
    let mut sc = Spawn {
        config: "",
        app: &["sh", "-c", "exit 3"],
        ..Spawn::default()
    }
    .start();
    let status = sc.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(3), "{}", sc.diagnostics());
}

#[test]
fn sigterm_reaches_the_app_which_sees_the_sidecar() {
    // env.txt is written after the trap is set: once it exists, SIGTERM is handled.
    let script = "trap 'echo term > got-term; exit 0' TERM; \
                  echo \"$OUTRIGGER_ADMIN_ADDRESS $OUTRIGGER_SERVICE $GREETING $OUTRIGGER_LISTENER_PUBLIC_IN\" > env.txt; \
                  echo app-output; while :; do sleep 0.05; done";
    let mut sc = Spawn {
        config: "service: shop\napp:\n  address: 127.0.0.1:1\n  probe:\n    enabled: false\n  env:\n    GREETING: hello\nlisteners:\n  - name: public-in\n    address: 127.0.0.1:0\n",
        app: &["sh", "-c", script],
        ..Spawn::default()
    }
    .start();
    sc.wait_ready();
    let ready = sc.get_json("/ready");
    assert_eq!(ready["components"]["app"]["state"], "ready", "{ready}");
    let env = eventually(Duration::from_secs(10), "the app's env file", || {
        std::fs::read_to_string(sc.path("env.txt")).ok()
    });
    assert_eq!(
        env.trim(),
        format!("{} shop hello {}", sc.admin, sc.listeners["public-in"])
    );

    sc.signal(Signal::SIGTERM);
    let status = sc.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", sc.diagnostics());
    assert!(
        sc.path("got-term").exists(),
        "the app never got SIGTERM\n{}",
        sc.diagnostics()
    );
    assert!(
        sc.stdout().contains("app-output"),
        "app stdout passes through\n{}",
        sc.diagnostics()
    );
}

#[test]
fn an_app_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let mut sc = app_ignoring_sigterm("1s");
    sc.signal(Signal::SIGTERM);
    let status = sc.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(128 + 9), "{}", sc.diagnostics());
    assert!(sc.stderr().contains("killing it"), "{}", sc.diagnostics());
}

#[test]
fn a_missing_program_exits_127() {
    let mut sc = Spawn {
        config: "",
        app: &["/no/such/program"],
        ..Spawn::default()
    }
    .start();
    let status = sc.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(127), "{}", sc.diagnostics());
    assert!(
        sc.stderr().contains("cannot start the app"),
        "{}",
        sc.diagnostics()
    );
}

#[test]
fn a_fast_stop_cuts_a_graceful_one_short() {
    let mut sc = app_ignoring_sigterm("60s");
    sc.signal(Signal::SIGTERM);
    eventually(Duration::from_secs(10), "the graceful stop", || {
        sc.stderr().contains("stopping the app").then_some(())
    });
    sc.signal(Signal::SIGINT);
    // Well before the 60 s grace: SIGINT reached the app (sh dies of it: 128 + 2).
    let status = sc.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(130), "{}", sc.diagnostics());
    assert!(
        sc.stderr().contains("cutting the graceful stop short"),
        "{}",
        sc.diagnostics()
    );
}

/// A sidecar whose app ignores SIGTERM, once the app has set that up.
fn app_ignoring_sigterm(grace: &str) -> crate::support::Sidecar {
    let config = format!("runtime:\n  shutdown_grace: {grace}\n");
    let sc = Spawn {
        config: &config,
        app: &[
            "sh",
            "-c",
            "trap '' TERM; touch trapped; while :; do sleep 0.05; done",
        ],
        ..Spawn::default()
    }
    .start();
    eventually(Duration::from_secs(10), "the app's trap", || {
        sc.path("trapped").exists().then_some(())
    });
    sc
}
