//! The app's lifecycle settings (probe, restart policy, signals) and the `reload:` entries,
//! validated from their raw form. Defaults are named consts with their reason;
//! `docs/configuration.md` lists the same values.

use std::path::PathBuf;

use nix::sys::signal::Signal;
use serde::{Serialize, Serializer};

use super::document::{Document, Problem};
pub use super::raw::RestartPolicy;
use super::raw::{RawApp, RawProbe, RawReload};
use super::types::{Address, Duration};

/// Probing often enough that a starting app is seen ready within a second, without load.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Three misses in a row: one slow answer does not take the app out of service.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
pub const DEFAULT_SUCCESS_THRESHOLD: u32 = 1;
/// Kubernetes' `terminationGracePeriodSeconds` is 30 s; a third of it stays for the app after
/// inbound has drained.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Long enough for a typical app to start, short enough that a client is not left hanging.
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(10);
/// Signals with no meaning to Outrigger: whoever sends them to the sidecar means the app.
/// (SIGUSR2 starts a hot restart, as for nginx and HAProxy, unless listed here.)
pub const DEFAULT_FORWARD_SIGNALS: [Signal; 1] = [Signal::SIGUSR1];
/// Signals that can be forwarded (SIGTERM and SIGINT stop the sidecar and reach the app
/// through `stop_signal`; SIGKILL and SIGSTOP cannot be caught).
pub const FORWARDABLE: [Signal; 5] = [
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGQUIT,
];
/// Editors and ConfigMap updates touch files in bursts; act once the burst is over.
pub const DEFAULT_DEBOUNCE_QUIET: Duration = Duration::from_millis(200);
/// …but never wait longer than this for a quiet moment.
pub const DEFAULT_DEBOUNCE_MAX: Duration = Duration::from_secs(2);
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_WEBHOOK_RETRIES: u32 = 3;

/// A POSIX signal, written `SIGHUP` (or `HUP`, any case) in the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalName(pub Signal);

impl Serialize for SignalName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

/// Parses `SIGHUP`, `HUP` or `hup`.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let upper = s.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>()
        .map_err(|_| format!("expected a signal name like SIGHUP or SIGUSR1, found {s:?}"))
}

/// How the app is checked.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeCheck {
    /// GET `path` at `address`; 2xx or 3xx passes.
    Http { address: Address, path: String },
    /// A connect to the address succeeds.
    Tcp(Address),
    /// The command exits 0.
    Exec(Vec<String>),
    /// A gRPC health call at `address` answers OK (and, for `grpc.health.v1`, SERVING).
    Grpc {
        address: Address,
        service: GrpcHealth,
    },
}

/// Which gRPC health service a probe calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GrpcHealth {
    /// `dapr.proto.runtime.v1.AppCallbackHealthCheck/HealthCheck` (Dapr's app health check).
    Dapr,
    /// `grpc.health.v1.Health/Check` for the whole server (kubelet's gRPC probe).
    Health,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProbeConfig {
    pub check: ProbeCheck,
    pub interval: Duration,
    pub timeout: Duration,
    pub initial_delay: Duration,
    pub failure_threshold: u32,
    pub success_threshold: u32,
}

/// The lifecycle part of `app:`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AppLifecycle {
    /// None: the app counts as ready once started (or always, when not supervised).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeConfig>,
    pub restart: RestartPolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<u32>,
    pub stop_signal: SignalName,
    pub stop_timeout: Duration,
    pub forward_signals: Vec<SignalName>,
    pub hold_timeout: Duration,
}

/// What a `reload:` entry does when its watched content changes.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReloadAction {
    Signal(SignalName),
    Webhook(WebhookConfig),
    /// Stop the app gracefully and start it again.
    Restart,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WebhookConfig {
    pub url: String,
    /// host:port taken from the URL.
    #[serde(skip)]
    pub authority: String,
    pub method: String,
    /// None: any 2xx.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect: Option<u16>,
    pub retries: u32,
    pub timeout: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReloadConfig {
    pub name: String,
    pub watch: PathBuf,
    pub action: ReloadAction,
    pub quiet: Duration,
    pub max_delay: Duration,
}

fn check_duration(
    at: &str,
    d: Duration,
    min: std::time::Duration,
    doc: &Document,
    problems: &mut Vec<Problem>,
) {
    if d.get() < min || d.get() > std::time::Duration::from_secs(86_400) {
        problems.push(doc.problem(
            at,
            format!(
                "expected a duration from {} to 24h, found {d}",
                humantime::format_duration(min)
            ),
        ));
    }
}

/// Validates the lifecycle keys of `app:`.
pub fn app(
    raw: &RawApp,
    address: Option<&Address>,
    supervised: bool,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> AppLifecycle {
    let probe = probe(raw.probe.as_ref(), address, doc, problems);
    let signal = |at: &str, s: &str, problems: &mut Vec<Problem>| match parse_signal(s) {
        Ok(sig) => Some(SignalName(sig)),
        Err(e) => {
            problems.push(doc.problem(at, e));
            None
        }
    };
    let stop_signal = raw
        .stop_signal
        .as_deref()
        .and_then(|s| signal("app.stop_signal", s, problems))
        .unwrap_or(SignalName(Signal::SIGTERM));
    if matches!(stop_signal.0, Signal::SIGKILL | Signal::SIGSTOP) {
        problems.push(doc.problem(
            "app.stop_signal",
            format!(
                "{} gives the app no chance to finish; SIGKILL is sent anyway when stop_timeout ends",
                stop_signal.0
            ),
        ));
    }
    let forward_signals = match &raw.forward_signals {
        None => DEFAULT_FORWARD_SIGNALS.iter().map(|s| SignalName(*s)).collect(),
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let at = format!("app.forward_signals[{i}]");
                let sig = signal(&at, s, problems)?;
                if !FORWARDABLE.contains(&sig.0) {
                    problems.push(doc.problem(
                        &at,
                        format!(
                            "{} cannot be forwarded; expected one of SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH, SIGQUIT (SIGTERM and SIGINT stop the sidecar, which then sends app.stop_signal)",
                            sig.0
                        ),
                    ));
                    return None;
                }
                Some(sig)
            })
            .collect(),
    };
    let stop_timeout = raw.stop_timeout.unwrap_or(DEFAULT_STOP_TIMEOUT);
    check_duration(
        "app.stop_timeout",
        stop_timeout,
        std::time::Duration::ZERO,
        doc,
        problems,
    );
    let hold_timeout = raw.hold_timeout.unwrap_or(DEFAULT_HOLD_TIMEOUT);
    check_duration(
        "app.hold_timeout",
        hold_timeout,
        std::time::Duration::ZERO,
        doc,
        problems,
    );
    let restart = raw.restart.unwrap_or_default();
    if !supervised {
        for (key, set) in [
            ("app.restart", raw.restart.is_some()),
            ("app.max_restarts", raw.max_restarts.is_some()),
            ("app.stop_signal", raw.stop_signal.is_some()),
            ("app.forward_signals", raw.forward_signals.is_some()),
        ] {
            if set {
                problems.push(doc.problem(
                    key,
                    "set, but there is no app.command (or `-- CMD`) to supervise",
                ));
            }
        }
    }
    AppLifecycle {
        probe,
        restart,
        max_restarts: raw.max_restarts,
        stop_signal,
        stop_timeout,
        forward_signals,
        hold_timeout,
    }
}

fn probe(
    raw: Option<&RawProbe>,
    address: Option<&Address>,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Option<ProbeConfig> {
    let default = RawProbe::default();
    let raw = raw.unwrap_or(&default);
    if raw.enabled == Some(false) {
        return None;
    }
    let set = [
        raw.http.is_some(),
        raw.tcp.is_some(),
        raw.exec.is_some(),
        raw.grpc.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if set > 1 {
        problems.push(doc.problem(
            "app.probe",
            "expected one of http, tcp, exec or grpc, found several",
        ));
        return None;
    }
    let check = if let Some(path) = &raw.http {
        if !path.starts_with('/') {
            problems.push(doc.problem(
                "app.probe.http",
                format!("expected a path starting with '/', found {path:?}"),
            ));
            return None;
        }
        let Some(address) = address else {
            problems.push(doc.problem(
                "app.probe.http",
                "an HTTP probe needs app.address (where to send it)",
            ));
            return None;
        };
        ProbeCheck::Http {
            address: address.clone(),
            path: path.clone(),
        }
    } else if let Some(kind) = &raw.grpc {
        let service = match kind.as_str() {
            "dapr" => GrpcHealth::Dapr,
            "health" => GrpcHealth::Health,
            other => {
                problems.push(doc.problem(
                    "app.probe.grpc",
                    format!("expected dapr (AppCallbackHealthCheck) or health (grpc.health.v1), found {other:?}"),
                ));
                return None;
            }
        };
        let Some(address) = address else {
            problems.push(doc.problem(
                "app.probe.grpc",
                "a gRPC probe needs app.address (where to send it)",
            ));
            return None;
        };
        ProbeCheck::Grpc {
            address: address.clone(),
            service,
        }
    } else if let Some(a) = &raw.tcp {
        ProbeCheck::Tcp(a.clone())
    } else if let Some(cmd) = &raw.exec {
        if cmd.is_empty() || cmd[0].is_empty() {
            problems.push(doc.problem(
                "app.probe.exec",
                "expected a program and its arguments, found an empty list",
            ));
            return None;
        }
        ProbeCheck::Exec(cmd.clone())
    } else {
        match address {
            // The default: the app is ready once it accepts connections.
            Some(a) => ProbeCheck::Tcp(a.clone()),
            None if raw.enabled == Some(true) => {
                problems.push(doc.problem(
                    "app.probe",
                    "expected http, tcp, exec or grpc (or app.address for the default TCP probe)",
                ));
                return None;
            }
            None => return None,
        }
    };
    let interval = raw.interval.unwrap_or(DEFAULT_PROBE_INTERVAL);
    let timeout = raw.timeout.unwrap_or(DEFAULT_PROBE_TIMEOUT);
    let initial_delay = raw.initial_delay.unwrap_or(Duration::from_secs(0));
    let ms = std::time::Duration::from_millis(10);
    check_duration("app.probe.interval", interval, ms, doc, problems);
    check_duration("app.probe.timeout", timeout, ms, doc, problems);
    check_duration(
        "app.probe.initial_delay",
        initial_delay,
        std::time::Duration::ZERO,
        doc,
        problems,
    );
    let threshold = |at: &str, v: Option<u32>, default: u32, problems: &mut Vec<Problem>| {
        let v = v.unwrap_or(default);
        if v == 0 || v > 1000 {
            problems.push(doc.problem(at, format!("expected 1 to 1000, found {v}")));
        }
        v
    };
    Some(ProbeConfig {
        check,
        interval,
        timeout,
        initial_delay,
        failure_threshold: threshold(
            "app.probe.failure_threshold",
            raw.failure_threshold,
            DEFAULT_FAILURE_THRESHOLD,
            problems,
        ),
        success_threshold: threshold(
            "app.probe.success_threshold",
            raw.success_threshold,
            DEFAULT_SUCCESS_THRESHOLD,
            problems,
        ),
    })
}

/// Validates the `reload:` entries.
pub fn reloads(
    raw: Vec<RawReload>,
    supervised: bool,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Vec<ReloadConfig> {
    let mut out = Vec::new();
    let mut names = std::collections::BTreeMap::new();
    for (i, r) in raw.into_iter().enumerate() {
        let at = format!("reload[{i}]");
        let name = r.name.clone().unwrap_or_else(|| i.to_string());
        if let Some(prev) = names.insert(name.clone(), i) {
            problems.push(doc.problem(
                &format!("{at}.name"),
                format!("the name {name:?} is already used by reload[{prev}]"),
            ));
        }
        let watch = r.watch.clone();
        if watch.as_os_str().is_empty() || !watch.is_absolute() && watch.parent().is_none() {
            problems.push(doc.problem(&format!("{at}.watch"), "expected a file or directory"));
        } else {
            let parent = match watch.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !watch.is_dir() && !parent.is_dir() {
                problems.push(doc.problem(
                    &format!("{at}.watch"),
                    format!(
                        "neither {} nor its directory {} exists",
                        watch.display(),
                        parent.display()
                    ),
                ));
            }
        }
        let a = &r.action;
        let set = [a.signal.is_some(), a.webhook.is_some(), a.restart.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
        let action_at = format!("{at}.action");
        let action = if set != 1 {
            problems.push(doc.problem(
                &action_at,
                format!("expected exactly one of signal, webhook or restart, found {set}"),
            ));
            None
        } else if let Some(s) = &a.signal {
            match parse_signal(s) {
                Ok(sig)
                    if matches!(
                        sig,
                        Signal::SIGKILL | Signal::SIGSTOP | Signal::SIGTERM | Signal::SIGINT
                    ) =>
                {
                    problems.push(doc.problem(
                        &format!("{action_at}.signal"),
                        format!("{sig} would stop the app rather than reload it; use {{ restart: true }} for a restart"),
                    ));
                    None
                }
                Ok(sig) => Some(ReloadAction::Signal(SignalName(sig))),
                Err(e) => {
                    problems.push(doc.problem(&format!("{action_at}.signal"), e));
                    None
                }
            }
        } else if let Some(w) = &a.webhook {
            webhook(w, &format!("{action_at}.webhook"), doc, problems).map(ReloadAction::Webhook)
        } else if a.restart == Some(true) {
            Some(ReloadAction::Restart)
        } else {
            problems.push(doc.problem(
                &format!("{action_at}.restart"),
                "expected true (leave the entry out to do nothing)",
            ));
            None
        };
        if !supervised
            && matches!(
                action,
                Some(ReloadAction::Signal(_) | ReloadAction::Restart)
            )
        {
            problems.push(doc.problem(
                &action_at,
                "signal and restart act on the supervised app, and there is no app.command (or `-- CMD`); use a webhook",
            ));
        }
        let quiet = r.debounce.quiet.unwrap_or(DEFAULT_DEBOUNCE_QUIET);
        let max_delay = r.debounce.max.unwrap_or(DEFAULT_DEBOUNCE_MAX);
        check_duration(
            &format!("{at}.debounce.quiet"),
            quiet,
            std::time::Duration::ZERO,
            doc,
            problems,
        );
        if max_delay < quiet {
            problems.push(doc.problem(
                &format!("{at}.debounce.max"),
                format!("expected at least debounce.quiet ({quiet}), found {max_delay}"),
            ));
        }
        if let Some(action) = action {
            out.push(ReloadConfig {
                name,
                watch,
                action,
                quiet,
                max_delay,
            });
        }
    }
    out
}

fn webhook(
    raw: &super::raw::RawWebhook,
    at: &str,
    doc: &Document,
    problems: &mut Vec<Problem>,
) -> Option<WebhookConfig> {
    let uri: http::Uri = match raw.url.parse() {
        Ok(u) => u,
        Err(e) => {
            problems.push(doc.problem(
                &format!("{at}.url"),
                format!("expected an http:// URL, found {:?}: {e}", raw.url),
            ));
            return None;
        }
    };
    let authority = match (uri.scheme_str(), uri.authority()) {
        (Some(scheme @ ("http" | "https")), Some(a)) => {
            let port = a
                .port_u16()
                .unwrap_or(if scheme == "https" { 443 } else { 80 });
            format!("{}:{port}", a.host())
        }
        _ => {
            problems.push(doc.problem(
                &format!("{at}.url"),
                format!(
                    "expected an http:// or https:// URL with a host, found {:?}",
                    raw.url
                ),
            ));
            return None;
        }
    };
    let method = raw
        .method
        .clone()
        .unwrap_or_else(|| "POST".to_string())
        .to_ascii_uppercase();
    if http::Method::from_bytes(method.as_bytes()).is_err() {
        problems.push(doc.problem(
            &format!("{at}.method"),
            format!("expected an HTTP method, found {method:?}"),
        ));
    }
    if let Some(code) = raw.expect
        && !(100..=599).contains(&code)
    {
        problems.push(doc.problem(
            &format!("{at}.expect"),
            format!("expected an HTTP status from 100 to 599, found {code}"),
        ));
    }
    let retries = raw.retries.unwrap_or(DEFAULT_WEBHOOK_RETRIES);
    if retries > 100 {
        problems.push(doc.problem(
            &format!("{at}.retries"),
            format!("expected 0 to 100, found {retries}"),
        ));
    }
    let timeout = raw.timeout.unwrap_or(DEFAULT_WEBHOOK_TIMEOUT);
    check_duration(
        &format!("{at}.timeout"),
        timeout,
        std::time::Duration::from_millis(1),
        doc,
        problems,
    );
    Some(WebhookConfig {
        url: raw.url.clone(),
        authority,
        method,
        expect: raw.expect,
        retries,
        timeout,
        ca: raw.ca.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        assert_eq!(parse_signal("SIGHUP"), Ok(Signal::SIGHUP));
        assert_eq!(parse_signal("usr1"), Ok(Signal::SIGUSR1));
        assert_eq!(parse_signal(" term "), Ok(Signal::SIGTERM));
        assert!(parse_signal("SIGNOPE").is_err());
    }
}
