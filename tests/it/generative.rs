//! Generative tests for the parsers of untrusted input: whatever the bytes, none of them panics
//! or overflows the stack, and the properties that keep requests and configs honest hold.
//! Fixed case counts (128 each) so CI stays fast. What they found on the first run: a match rule
//! with an escaped multi-byte character panicked the parser, and a Subscription file with a YAML
//! syntax error made the loader loop forever (memory until the process was killed). Also
//! covered: cron schedules, the log agent's line parsing (JSON, plain, auto), `inject`'s YAML
//! (its output must read back as the same documents), Subscription `rules` nested deep, and
//! component metadata checked at preflight.

use proptest::prelude::*;

use outrigger::config::Document;
use outrigger::config::raw::RawConfig;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// YAML-looking text: keys the config knows, nesting, lists, scalars of every kind.
fn yamlish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("service: ".to_string()),
        Just("admin:\n  address: ".to_string()),
        Just("listeners:\n  - name: a\n    address: ".to_string()),
        Just("clusters:\n  c: { endpoints: [".to_string()),
        Just("runtime: { worker_threads: ".to_string()),
        Just("telemetry:\n  tracing:\n    otlp: ".to_string()),
        Just("bridge: { api_token: ".to_string()),
        Just("reload:\n  - watch: ".to_string()),
        Just("]".to_string()),
        Just("}".to_string()),
        Just("\n".to_string()),
        Just("  ".to_string()),
        Just("- ".to_string()),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        Just("<<: *a\n".to_string()),
        "[a-z0-9:./_{}\\[\\]\"' -]{0,12}",
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_config_loader_never_panics(text in yamlish()) {
        if let Ok(doc) = Document::parse(std::path::Path::new("g.yaml"), &text) {
            let (_, problems) = doc.deserialize_pruned::<RawConfig>();
            // Every problem is located somewhere and says something.
            for p in problems {
                prop_assert!(!p.message.is_empty());
            }
        }
    }

    #[test]
    fn the_config_loader_never_panics_on_any_text(text in "\\PC{0,200}") {
        if let Ok(doc) = Document::parse(std::path::Path::new("g.yaml"), &text) {
            let _ = doc.deserialize_pruned::<RawConfig>();
        }
    }

    /// The framing scanner sees every received byte of HTTP/1 connections, in whatever chunks
    /// the socket gives them.
    #[test]
    fn the_framing_scanner_never_panics(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..32),
        head in prop_oneof![
            Just(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()),
            Just(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello".to_vec()),
            Just(Vec::new()),
        ],
    ) {
        let alarm = outrigger::proxy::framing::Alarm::default();
        let mut scanner = outrigger::proxy::framing::Scanner::new(alarm.clone());
        scanner.feed(&head);
        for c in &chunks {
            scanner.feed(c);
        }
        let _ = alarm.raised();
    }

    /// A path with one spelling only has no dot segments, empty segments or backslashes.
    #[test]
    fn canonical_paths_have_one_spelling(path in "(/[a-zA-Z0-9._%~\\\\-]{0,6}){0,6}") {
        if outrigger::proxy::authz::canonical_path(&path) {
            prop_assert!(!path.contains("//"));
            prop_assert!(!path.contains('\\'));
            prop_assert!(path.split('/').all(|s| s != "." && s != ".."));
            prop_assert!(!path.to_ascii_lowercase().contains("%2f"));
        }
    }
}

#[cfg(feature = "bridge")]
mod bridge {
    use std::collections::BTreeMap;

    use outrigger::bridge::pubsub::{cel, cloudevent, subscription};
    use proptest::prelude::*;

    /// Rule text from the grammar's own tokens, deep and long ones included.
    fn rule() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            Just("("),
            Just(")"),
            Just("!"),
            Just(" && "),
            Just(" || "),
            Just(" == "),
            Just(" < "),
            Just("event.data.x"),
            Just("event.type"),
            Just(".startsWith(\"a\")"),
            Just("\"a\""),
            Just("1"),
            Just("true"),
            Just("null"),
        ];
        prop::collection::vec(token, 0..700).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(super::config())]

        /// No rule an app can send crashes the sidecar: deep nesting used to overflow the
        /// stack (issue 19).
        #[test]
        fn match_rules_parse_or_fail_but_never_crash(src in rule()) {
            if let Ok(expr) = cel::parse(&src) {
                let event = serde_json::json!({"type": "a", "data": {"x": 1}});
                let _ = expr.matches(&event);
            }
        }

        #[test]
        fn match_rules_of_any_text_never_crash(src in "\\PC{0,300}") {
            let _ = cel::parse(&src);
        }

        /// `GET /dapr/subscribe` answers come from the app, whatever it sends.
        #[test]
        fn programmatic_subscriptions_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = subscription::parse_programmatic(&body);
        }

        /// `bindings.cron`'s `schedule` and `timeZone` come from component files; a schedule
        /// that parses can compute its next wait without panicking.
        #[test]
        fn cron_schedules_parse_or_fail_but_never_crash(
            spec in prop_oneof![
                "\\PC{0,40}",
                prop::collection::vec(
                    prop_oneof![
                        Just("*"), Just("*/0"), Just("*/7"), Just("0-59"), Just("59-0"), Just("1,2,3"),
                        Just("L"), Just("W"), Just("#"), Just("?"), Just("JAN"), Just("SUN-SAT"),
                        Just("99999999999"), Just("-1"), Just("@every 0s"), Just("@every 1h"),
                        Just("@every 9999999999h"), Just("@yearly"), Just("CRON_TZ=Nowhere/X"),
                        Just("TZ=UTC"),
                    ],
                    0..8,
                ).prop_map(|v| v.join(" ")),
            ],
            zone in prop_oneof![Just(None), Just(Some("UTC")), Just(Some("Europe/Paris")), Just(Some("../../etc/passwd")), Just(Some(""))],
        ) {
            if let Ok(schedule) = outrigger::bridge::cron::Schedule::parse(&spec, zone) {
                let _ = schedule.wait_from(jiff::Timestamp::now());
            }
        }

        /// A Subscription's `routes.rules[].match` nested deep or long, in the file as an app
        /// would write it: an error located in the file, never a crash.
        #[test]
        fn subscription_rules_nested_deep_never_crash(depth in 0usize..20_000, rule in rule()) {
            let deep = format!("{}event.type == \"a\"{}", "(".repeat(depth), ")".repeat(depth));
            for m in [deep.as_str(), rule.as_str()] {
                // A single-quoted YAML scalar: only `'` is escaped (doubled).
                let text = format!(
                    "apiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {{name: s}}\nspec:\n  pubsubname: p\n  topic: t\n  routes:\n    rules:\n    - match: '{}'\n      path: /a\n    default: /d\n",
                    m.replace('\'', "''")
                );
                let _ = subscription::parse_declarative(&text, std::path::Path::new("s.yaml"));
            }
        }

        /// Component metadata (any type the bridge knows, any keys and values) is checked at
        /// preflight without panicking; every problem is located in the file.
        #[test]
        fn component_metadata_is_checked_never_crashes(
            kind in prop::sample::select(
                [
                    outrigger::bridge::components::STATE_TYPES,
                    outrigger::bridge::components::PUBSUB_TYPES,
                    outrigger::bridge::components::LOCK_TYPES,
                    outrigger::bridge::components::CONFIGURATION_TYPES,
                    outrigger::bridge::components::BINDING_TYPES,
                    outrigger::bridge::components::SECRET_TYPES,
                ]
                .concat(),
            ),
            metadata in prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "redisHost", "redisPassword", "connectionString", "natsURL", "url", "host",
                        "qos", "retain", "consumerID", "schedule", "timeZone", "maxLen",
                        "processingTimeout", "redeliverInterval", "queueDepth", "concurrency",
                        "tableName", "keyPrefix", "ttlInSeconds", "timeout", "durable", "prefetchCount",
                        "secretsFile", "nestedSeparator", "cleanupInterval", "enableTLS", "direction",
                    ]),
                    prop_oneof![
                        Just("".to_string()), Just("-1".to_string()), Just("0".to_string()),
                        Just("18446744073709551616".to_string()), Just("1h".to_string()),
                        Just("@every 1s".to_string()), Just("true".to_string()),
                        Just("localhost:1".to_string()), Just("nats://[::1".to_string()),
                        "\\PC{0,16}",
                    ],
                ),
                0..6,
            ),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut yaml = format!(
                "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: c}}\nspec:\n  type: {kind}\n  version: v1\n  metadata:\n"
            );
            for (k, v) in &metadata {
                yaml.push_str(&format!("  - name: {k}\n    value: {}\n", serde_json::to_string(v).unwrap()));
            }
            yaml.push_str("  - name: end\n    value: x\n");
            std::fs::write(dir.path().join("c.yaml"), &yaml).unwrap();
            let mut problems = Vec::new();
            let _ = outrigger::bridge::components::prepare(Some(dir.path()), "app", &mut problems);
            for p in &problems {
                prop_assert!(!p.message.is_empty());
            }
        }

        #[test]
        fn declarative_subscriptions_never_panic(text in "\\PC{0,300}") {
            let _ = subscription::parse_declarative(&text, std::path::Path::new("s.yaml"));
        }

        /// A published CloudEvent passes through with its fields checked, whatever the body.
        #[test]
        fn cloudevent_pass_through_never_panics(
            data in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..256),
                "\\{\"(id|source|type|specversion|data|data_base64)\": (\"[a-z]{0,4}\"|[0-9]{1,3}|null|\\[\\]|\\{\\})\\}"
                    .prop_map(String::into_bytes),
            ],
        ) {
            let metadata = BTreeMap::new();
            let p = cloudevent::Publish {
                app_id: "a",
                pubsub: "p",
                topic: "t",
                content_type: Some("application/cloudevents+json"),
                data: &data,
                traceparent: None,
                tracestate: None,
                metadata: &metadata,
            };
            let _ = cloudevent::pass_through(&p);
        }
    }
}

#[cfg(feature = "k8s")]
mod k8s {
    use proptest::prelude::*;

    use outrigger::k8s::inject::{inject_text, parse};
    use outrigger::k8s::sidecar::Options;

    /// Manifest-looking YAML: workload kinds and apiVersions, pod specs, annotations, lists,
    /// and scalars a YAML 1.1 reader could take for something else.
    fn manifest() -> impl Strategy<Value = String> {
        let scalar = prop_oneof![
            Just("a".to_string()),
            Just("\"on\"".to_string()),
            Just("\"0o755\"".to_string()),
            Just("\"1_000\"".to_string()),
            Just("\"2001-12-14\"".to_string()),
            Just("\"+0x1F\"".to_string()),
            Just("\"yes\"".to_string()),
            Just("3500".to_string()),
            Just("null".to_string()),
            Just("[]".to_string()),
            Just("{}".to_string()),
            "[a-z0-9\\-]{0,8}",
        ];
        let kind = prop_oneof![
            Just("apiVersion: v1\nkind: Pod\n"),
            Just("apiVersion: apps/v1\nkind: Deployment\n"),
            Just("apiVersion: batch/v1\nkind: CronJob\n"),
            Just("apiVersion: extensions/v1beta1\nkind: Deployment\n"),
            Just("apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n"),
            Just("apiVersion: x.io/v1\nkind: Rollout\n"),
            Just(""),
        ];
        let body = prop_oneof![
            Just("metadata:\n  name: "),
            Just("metadata:\n  annotations:\n    outrigger.dev/app-port: "),
            Just("metadata:\n  annotations:\n    outrigger.dev/identity: "),
            Just("spec:\n  containers:\n  - name: app\n    image: "),
            Just(
                "spec:\n  template:\n    spec:\n      containers:\n      - name: a\n        env: "
            ),
            Just(
                "spec:\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          containers: "
            ),
            Just("data:\n  k: "),
            Just("---\n"),
        ];
        prop::collection::vec((kind, prop::collection::vec((body, scalar), 0..4)), 1..4).prop_map(
            |docs| {
                docs.into_iter()
                    .map(|(k, parts)| {
                        let mut d = k.to_string();
                        for (b, v) in parts {
                            d.push_str(b);
                            d.push_str(&v);
                            d.push('\n');
                        }
                        d
                    })
                    .collect::<Vec<_>>()
                    .join("---\n")
            },
        )
    }

    proptest! {
        #![proptest_config(super::config())]

        /// Whatever the manifest, inject answers (YAML or a located error); what it writes
        /// reads back, and injecting it again changes nothing.
        #[test]
        fn inject_never_panics_and_its_output_reads_back(text in manifest()) {
            let options = Options::default();
            if let Ok((out, _)) = inject_text(&text, "g.yaml", &options) {
                let docs = parse(&out, "out");
                prop_assert!(docs.is_ok(), "{out}");
                let (again, _) = inject_text(&out, "out", &options).expect("injected output injects");
                prop_assert_eq!(parse(&again, "again").unwrap(), docs.unwrap());
            }
        }

        #[test]
        fn inject_never_panics_on_any_text(text in "\\PC{0,300}") {
            let _ = inject_text(&text, "g.yaml", &Options::default());
        }
    }
}

#[cfg(feature = "logs")]
mod logs {
    use std::time::SystemTime;

    use outrigger::config::logs::LineFormat;
    use outrigger::logs::parse::{Encoder, Meta, Origin, Tail};
    use proptest::prelude::*;

    /// JSON-looking lines: the keys the parser looks at, nesting, escapes, broken endings.
    fn line() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just("{".to_string()),
            Just("}".to_string()),
            Just("[".to_string()),
            Just("]".to_string()),
            Just(",".to_string()),
            Just(":".to_string()),
            Just("\"time\":".to_string()),
            Just("\"traceparent\":".to_string()),
            Just("\"trace_id\":".to_string()),
            Just("\"source\":".to_string()),
            Just("\"msg\":".to_string()),
            Just("\"\\u00e9\\ud800\"".to_string()),
            Just("\"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\"".to_string()),
            Just("1e999".to_string()),
            Just("null".to_string()),
            "[ -~]{0,10}",
        ];
        prop_oneof![
            prop::collection::vec(piece, 0..30).prop_map(|v| v.concat().into_bytes()),
            prop::collection::vec(any::<u8>(), 0..200),
        ]
    }

    proptest! {
        #![proptest_config(super::config())]

        /// Every line becomes exactly one record that is valid JSON, whichever format the
        /// source declares (logfmt and regex too) and whatever the line holds (invalid UTF-8
        /// included).
        #[test]
        fn every_line_becomes_one_json_record(
            line in line(),
            format in prop_oneof![
                Just(LineFormat::Auto),
                Just(LineFormat::Json),
                Just(LineFormat::Plain),
                Just(LineFormat::Logfmt),
                Just(LineFormat::Regex(regex::Regex::new(r"^(?P<level>[A-Z]+) (?P<message>.*)$").unwrap())),
            ],
        ) {
            let encoder = Encoder::new(vec![], vec![("env".into(), "g".into())]);
            let tail = Tail::new("app", Origin::Stream("stdout"));
            let mut out = Vec::new();
            let meta = Meta { stream: Some("stderr"), time: None };
            encoder.encode(&mut out, &line, &format, &tail, meta, SystemTime::now());
            prop_assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
            let record: Result<serde_json::Value, _> = serde_json::from_slice(&out);
            prop_assert!(record.is_ok(), "{}", String::from_utf8_lossy(&out));
            prop_assert!(record.unwrap().is_object());
        }
    }
}
