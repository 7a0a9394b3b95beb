//! Generative tests for the parsers of untrusted input: whatever the bytes, none of them panics
//! or overflows the stack, and the properties that keep requests and configs honest hold.
//! Fixed case counts (128 each) so CI stays fast. What they found on the first run: a match rule
//! with an escaped multi-byte character panicked the parser, and a Subscription file with a YAML
//! syntax error made the loader loop forever (memory until the process was killed).

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
