//! The metrics registry behind the admin `/metrics`, and Outrigger's self-metrics: build info,
//! uptime, process resources, module state and config reloads.
//!
//! Every metric name is registered here or in a module's `metrics` type and listed in
//! `docs/metrics.md`. The registry is built once at start-up (modules add theirs), then shared
//! read-only; values are atomics updated on the data path.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// `Content-Type` of the Prometheus text format (the default).
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// `Content-Type` of OpenMetrics text (when the scraper's `Accept` asks for it).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleLabels {
    pub module: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleStateLabels {
    pub module: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    features: String,
}

/// Metrics the runtime itself updates.
#[derive(Clone, Default)]
pub struct RuntimeMetrics {
    /// 1 for the module's current state, 0 for the others.
    pub module_state: Family<ModuleStateLabels, Gauge>,
    pub module_restarts: Family<ModuleLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub config_last_reload_success: Gauge<f64, AtomicU64>,
    /// 1 while the app's probe passes (or the app runs, without a probe).
    pub app_ready: Gauge,
    pub app_restarts: Counter,
    pub app_probe_failures: Counter,
    /// Probes the sidecar could not run (out of descriptors or processes): not failures.
    pub app_probe_skipped: Counter,
    /// Effective content changes seen by each `reload:` entry.
    pub reload_changes: Family<ReloadLabels, Counter>,
    pub reload_actions: Family<ReloadResultLabels, Counter>,
    pub reload_last_success: Family<ReloadLabels, Gauge<f64, AtomicU64>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub reload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadResultLabels {
    pub reload: String,
    /// `success` or `failure`.
    pub result: &'static str,
}

/// A label value shared by many series (listener, route and cluster names): cheap to clone.
pub type Name = Arc<String>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub direction: &'static str,
    pub listener: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GuardLabels {
    pub direction: &'static str,
    pub listener: Name,
    /// Which abuse guard (`rapid_reset`, `cancelled_streams`, `stream_errors`,
    /// `empty_frames`, `header_block`).
    pub guard: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub direction: &'static str,
    pub listener: Name,
    /// `received` (from the downstream peer) or `sent` (to it).
    pub flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub direction: &'static str,
    pub listener: Name,
    pub route: Name,
    pub cluster: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub direction: &'static str,
    pub listener: Name,
    pub route: Name,
    pub cluster: Name,
    /// `1xx` … `5xx`.
    pub class: &'static str,
    /// Why Outrigger answered itself (`connect`, `timeout`, `overload`, …), or empty.
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: &'static str,
    pub listener: Name,
    pub cluster: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub cluster: Name,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    pub listener: Name,
    /// `rate_limit`, `concurrency`, `breaker`.
    pub reason: &'static str,
}

/// Latency buckets: 0.5 ms to 10 s, dense where a sidecar hop lives.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The proxy's metrics (`docs/metrics.md` lists each).
#[derive(Clone)]
pub struct ProxyMetrics {
    pub requests: Family<RouteLabels, Counter>,
    pub responses: Family<ResponseLabels, Counter>,
    pub latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    pub duration: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    pub request_bytes: Family<RouteLabels, Counter>,
    pub response_bytes: Family<RouteLabels, Counter>,
    pub connections_opened: Family<ListenerLabels, Counter>,
    pub connections_closed: Family<ListenerLabels, Counter>,
    /// Connections cut because their client read nothing for the idle timeout.
    pub client_stalls: Family<ListenerLabels, Counter>,
    /// HTTP/2 streams reset because their client took none of their response for the idle
    /// timeout.
    pub client_stream_stalls: Family<ListenerLabels, Counter>,
    /// HTTP/2 connections closed by an abuse guard of our server (GOAWAY ENHANCE_YOUR_CALM).
    pub client_abuse_closes: Family<GuardLabels, Counter>,
    /// Connections closed because the client sent no byte within `header_read_timeout`.
    pub client_silent: Family<ListenerLabels, Counter>,
    pub connections_open: Family<ListenerLabels, Gauge>,
    pub bytes: Family<FlowLabels, Counter>,
    pub retries: Family<OutcomeLabels, Counter>,
    pub ejections: Family<ClusterLabels, Counter>,
    pub shed: Family<ShedLabels, Counter>,
    pub endpoints: Family<ClusterLabels, Gauge>,
    pub discovery: Family<OutcomeLabels, Counter>,
    pub tls: super::tls::TlsMetrics,
    pub access_log_dropped: Counter,
    #[cfg(feature = "proxy")]
    pub spans: crate::telemetry::otlp::SpanMetrics,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            duration: Family::new_with_constructor(latency_histogram),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            client_stalls: Family::default(),
            client_stream_stalls: Family::default(),
            client_abuse_closes: Family::default(),
            client_silent: Family::default(),
            connections_open: Family::default(),
            bytes: Family::default(),
            retries: Family::default(),
            ejections: Family::default(),
            shed: Family::default(),
            endpoints: Family::default(),
            discovery: Family::default(),
            tls: super::tls::TlsMetrics::default(),
            access_log_dropped: Counter::default(),
            #[cfg(feature = "proxy")]
            spans: Default::default(),
        }
    }
}

/// `outrigger_retries_total{outcome}`: a retry the budget let through (`Cluster::withdraw_retry`).
pub const RETRY_ATTEMPTED: &str = "attempted";
/// `outrigger_retries_total{outcome}`: a retry the budget refused.
pub const RETRY_BUDGET_EXHAUSTED: &str = "budget_exhausted";
/// Every `outcome` of a cluster's `outrigger_retries_total` series ([`ProxyMetrics::remove_cluster`]).
pub const RETRY_OUTCOMES: [&str; 2] = [RETRY_ATTEMPTED, RETRY_BUDGET_EXHAUSTED];
/// `outrigger_discovery_updates_total{outcome}`: a refresh that changed the endpoints
/// (`Cluster::refresh`).
pub const DISCOVERY_CHANGED: &str = "changed";
/// `outrigger_discovery_updates_total{outcome}`: a refresh that found the same endpoints.
pub const DISCOVERY_UNCHANGED: &str = "unchanged";
/// `outrigger_discovery_updates_total{outcome}`: a refresh that failed or found none (the last
/// endpoints kept).
pub const DISCOVERY_FAILED: &str = "failed";
/// Every `outcome` of a cluster's `outrigger_discovery_updates_total` series
/// ([`ProxyMetrics::remove_cluster`]).
pub const DISCOVERY_OUTCOMES: [&str; 3] =
    [DISCOVERY_CHANGED, DISCOVERY_UNCHANGED, DISCOVERY_FAILED];

impl ProxyMetrics {
    /// Removes every series of a cluster that is gone for good (an app id's cluster evicted
    /// unused by name resolution, made again on its next call): its endpoints, ejections,
    /// retries and discovery updates. Without it each app id ever called would keep its
    /// series for the sidecar's life. A cluster replaced by a config reload keeps them: its
    /// successor has the same name.
    pub fn remove_cluster(&self, cluster: &Name) {
        let labels = ClusterLabels {
            cluster: cluster.clone(),
        };
        self.endpoints.remove(&labels);
        self.ejections.remove(&labels);
        for outcome in RETRY_OUTCOMES {
            self.retries.remove(&OutcomeLabels {
                cluster: cluster.clone(),
                outcome,
            });
        }
        for outcome in DISCOVERY_OUTCOMES {
            self.discovery.remove(&OutcomeLabels {
                cluster: cluster.clone(),
                outcome,
            });
        }
    }

    fn register(&self, r: &mut Registry) {
        self.tls.register(r);
        r.register(
            "access_log_dropped",
            "Access log lines dropped because the destination could not keep up",
            self.access_log_dropped.clone(),
        );
        #[cfg(feature = "proxy")]
        {
            r.register(
                "spans_exported",
                "Spans the OTLP collector accepted",
                self.spans.exported.clone(),
            );
            r.register(
                "spans_dropped",
                "Spans not exported: the queue was full (queue_full) or the collector failed (export_failed)",
                self.spans.dropped.clone(),
            );
        }
        r.register(
            "http_requests",
            "HTTP requests received, by direction, listener, route and cluster",
            self.requests.clone(),
        );
        r.register(
            "http_responses",
            "HTTP responses sent downstream, by status class and, when Outrigger answered itself, the error",
            self.responses.clone(),
        );
        r.register(
            "http_response_latency_seconds",
            "Time from the request's arrival to the response headers, in seconds",
            self.latency.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time from the request's arrival to the end of the response body, in seconds",
            self.duration.clone(),
        );
        r.register(
            "http_request_body_bytes",
            "Request body bytes received from downstream, by route",
            self.request_bytes.clone(),
        );
        r.register(
            "http_response_body_bytes",
            "Response body bytes sent downstream, by route",
            self.response_bytes.clone(),
        );
        r.register(
            "connections_opened",
            "Downstream connections accepted",
            self.connections_opened.clone(),
        );
        r.register(
            "connections_closed",
            "Downstream connections closed",
            self.connections_closed.clone(),
        );
        r.register(
            "client_stalls",
            "Downstream connections cut because the client read nothing for the idle timeout (a write waited that long)",
            self.client_stalls.clone(),
        );
        r.register(
            "client_stream_stalls",
            "HTTP/2 streams reset because the client took none of their response for the idle timeout (flow control kept the socket writable)",
            self.client_stream_stalls.clone(),
        );
        r.register(
            "client_abuse_closes",
            "HTTP/2 connections closed (GOAWAY ENHANCE_YOUR_CALM) by an abuse guard of outrigger's HTTP/2 server, by guard",
            self.client_abuse_closes.clone(),
        );
        r.register(
            "client_silent_closes",
            "Downstream connections on HTTP listeners closed because the client sent no byte within header_read_timeout (a bare connect, or silence after the TLS handshake)",
            self.client_silent.clone(),
        );
        r.register(
            "connections_open",
            "Downstream connections open now",
            self.connections_open.clone(),
        );
        r.register(
            "bytes",
            "Bytes on downstream connections, received from and sent to the peer",
            self.bytes.clone(),
        );
        r.register(
            "retries",
            "Retries by outcome: attempted, or skipped because the retry budget was spent",
            self.retries.clone(),
        );
        r.register(
            "endpoint_ejections",
            "Endpoints ejected after consecutive failures",
            self.ejections.clone(),
        );
        r.register(
            "shed_requests",
            "Requests refused with 503 by a local limit",
            self.shed.clone(),
        );
        r.register(
            "cluster_endpoints",
            "Endpoints currently known for each cluster",
            self.endpoints.clone(),
        );
        r.register(
            "discovery_updates",
            "Endpoint discovery (dns, file) refreshes by outcome: changed, unchanged, failed",
            self.discovery.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PubSubPublishLabels {
    /// The pubsub component's name (configured, so bounded).
    pub pubsub: Name,
    /// `success` or `failure`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PubSubComponentLabels {
    /// The component's name (a pubsub or a binding).
    pub pubsub: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PubSubDeliveryLabels {
    pub pubsub: Name,
    /// A subscribed topic (bounded by the subscriptions; published topics are not labelled).
    pub topic: Name,
    /// `success`, `retry`, `drop` or `dead_letter`.
    pub result: &'static str,
}

/// The bridge pub/sub's metrics (`docs/metrics.md` lists each). Families stay empty, and cost
/// nothing, until a pubsub component is used.
#[derive(Clone, Default)]
pub struct PubSubMetrics {
    pub published: Family<PubSubPublishLabels, Counter>,
    pub delivered: Family<PubSubDeliveryLabels, Counter>,
    /// QoS 0 MQTT messages dropped because the subscription's queue for the app was full.
    pub mqtt_dropped: Family<PubSubComponentLabels, Counter>,
}

impl PubSubMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "pubsub_published",
            "Messages published through the bridge, by pubsub component and result (success, failure, timeout)",
            self.published.clone(),
        );
        r.register(
            "pubsub_delivered",
            "Delivery attempts to the app by pubsub, subscribed topic and result (success, retry, drop, dead_letter)",
            self.delivered.clone(),
        );
        r.register(
            "pubsub_mqtt_dropped",
            "QoS 0 MQTT messages dropped by pubsub.mqtt3 or bindings.mqtt3 component because its queue for the app was full",
            self.mqtt_dropped.clone(),
        );
    }

    /// The dropped-message counter of an MQTT component (created at 0).
    pub fn mqtt_dropped_counter(&self, component: &str) -> Counter {
        self.mqtt_dropped
            .get_or_create(&PubSubComponentLabels {
                pubsub: Arc::new(component.to_string()),
            })
            .clone()
    }

    /// `result`: success, failure, or timeout (no answer within the publish timeout).
    pub fn publish(&self, pubsub: &Name, result: &'static str) {
        self.published
            .get_or_create(&PubSubPublishLabels {
                pubsub: pubsub.clone(),
                result,
            })
            .inc();
    }

    pub fn delivery(&self, pubsub: &Name, topic: &Name, result: &'static str) {
        self.delivered
            .get_or_create(&PubSubDeliveryLabels {
                pubsub: pubsub.clone(),
                topic: topic.clone(),
                result,
            })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BridgeRequestLabels {
    /// `state`, `publish`, `invoke`, `secrets`, `lock`, `configuration`, `bindings`, `metadata`, `healthz`, `shutdown`, `other`.
    pub api: &'static str,
    /// `1xx` … `5xx`.
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BridgeApiLabels {
    pub api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LogSourceLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LogDropLabels {
    pub source: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LogSinkLabels {
    pub sink: String,
}

/// The log agent's metrics (`docs/metrics.md` lists each). Series appear on first use only.
#[derive(Clone)]
pub struct LogsMetrics {
    pub read: Family<LogSourceLabels, Counter>,
    pub read_bytes: Family<LogSourceLabels, Counter>,
    pub dropped: Family<LogDropLabels, Counter>,
    pub shipped: Family<LogSinkLabels, Counter>,
    pub retries: Family<LogSinkLabels, Counter>,
    pub batch_duration: Family<LogSinkLabels, Histogram, fn() -> Histogram>,
    /// Bytes read from files but not yet acknowledged by the sink (what a restart re-reads).
    pub checkpoint_lag: Gauge,
    /// Bytes of the app's lines waiting for the sink.
    pub app_buffer: Gauge,
    /// Bytes of the disk buffer's spool files (`logs.buffer`), and its cap.
    pub disk_buffer: Gauge,
    pub disk_buffer_max: Gauge,
    /// The app's lines not echoed to our own stdout/stderr (it did not keep up).
    pub echo_dropped: Counter,
    /// Bytes of files lost to truncation before they were read (copytruncate).
    pub truncated_bytes: Family<LogSourceLabels, Counter>,
    /// Lines shipped as plain `message` because they were not in their source's format
    /// (`reason`: `format` for json/logfmt/regex, `container` for a runtime's format).
    pub unparsed: Family<LogDropLabels, Counter>,
    /// 1 while a sink's last attempt was answered, 0 while it fails.
    pub sink_up: Family<LogSinkLabels, Gauge>,
    /// Each sink's state for `/ready` and `/status`.
    pub sinks: crate::telemetry::log_sinks::SinkStates,
}

impl Default for LogsMetrics {
    fn default() -> Self {
        LogsMetrics {
            read: Family::default(),
            read_bytes: Family::default(),
            dropped: Family::default(),
            shipped: Family::default(),
            retries: Family::default(),
            batch_duration: Family::new_with_constructor(latency_histogram),
            checkpoint_lag: Gauge::default(),
            app_buffer: Gauge::default(),
            disk_buffer: Gauge::default(),
            disk_buffer_max: Gauge::default(),
            echo_dropped: Counter::default(),
            truncated_bytes: Family::default(),
            unparsed: Family::default(),
            sink_up: Family::default(),
            sinks: Default::default(),
        }
    }
}

impl LogsMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "logs_read_lines",
            "Log lines read, by source",
            self.read.clone(),
        );
        r.register(
            "logs_read_bytes",
            "Bytes of log lines read, by source",
            self.read_bytes.clone(),
        );
        r.register(
            "logs_dropped_lines",
            "Log lines not shipped, by source and reason (rate_limit, buffer_full, buffer_error, shutdown, rejected)",
            self.dropped.clone(),
        );
        r.register(
            "logs_shipped_lines",
            "Log lines the sink acknowledged, by sink (http, file, stdout)",
            self.shipped.clone(),
        );
        r.register(
            "logs_sink_retries",
            "Batches sent again after the sink failed or refused them, by sink",
            self.retries.clone(),
        );
        r.register(
            "logs_batch_duration_seconds",
            "Time from a batch's first attempt to the sink's acknowledgement, retries included, in seconds",
            self.batch_duration.clone(),
        );
        r.register(
            "logs_checkpoint_lag_bytes",
            "Bytes read from files and not yet acknowledged by the sink (re-read after a restart)",
            self.checkpoint_lag.clone(),
        );
        r.register(
            "logs_app_buffer_bytes",
            "Bytes of the app's stdout/stderr lines waiting for the sink",
            self.app_buffer.clone(),
        );
        r.register(
            "logs_disk_buffer_bytes",
            "Bytes of the app's stdout/stderr lines in the disk buffer's spool files (logs.buffer), shipped or not",
            self.disk_buffer.clone(),
        );
        r.register(
            "logs_disk_buffer_max_bytes",
            "The disk buffer's cap (logs.buffer.max_bytes): past it the app's new lines are dropped, reason=buffer_full",
            self.disk_buffer_max.clone(),
        );
        r.register(
            "logs_echo_dropped_lines",
            "The app's stdout/stderr lines not echoed to Outrigger's own because it did not keep up (still shipped)",
            self.echo_dropped.clone(),
        );
        r.register(
            "logs_truncated_lost_bytes",
            "Bytes of a file lost unread when it was truncated (copytruncate while behind), by source",
            self.truncated_bytes.clone(),
        );
        r.register(
            "logs_unparsed_lines",
            "Log lines not in their source's format (reason: format, container), shipped as a plain message",
            self.unparsed.clone(),
        );
        r.register(
            "logs_sink_up",
            "1 while a log sink's last attempt was answered, 0 while its attempts fail, by sink",
            self.sink_up.clone(),
        );
    }
}

/// The bridge's metrics (`docs/metrics.md` lists each). Series appear on first use only.
#[derive(Clone)]
pub struct BridgeMetrics {
    pub requests: Family<BridgeRequestLabels, Counter>,
    pub duration: Family<BridgeApiLabels, Histogram, fn() -> Histogram>,
    /// Connections the bridge closed on its own: `silent` (no byte within the header
    /// timeout), `read_nothing` (a write waited the idle timeout).
    pub cut: Family<CutLabels, Counter>,
    /// Input binding events sent to the app, by binding and result.
    pub binding_events: Family<BindingEventLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BindingEventLabels {
    pub binding: Name,
    /// `success` (the app answered 2xx) or `failure` (any other answer, or none).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CutLabels {
    /// `silent` or `read_nothing`.
    pub reason: &'static str,
}

impl Default for BridgeMetrics {
    fn default() -> Self {
        BridgeMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            cut: Family::default(),
            binding_events: Family::default(),
        }
    }
}

impl BridgeMetrics {
    /// A connection closed by the bridge for `reason` (`silent`, `read_nothing`).
    pub fn cut(&self, reason: &'static str) {
        self.cut.get_or_create(&CutLabels { reason }).inc();
    }

    /// An input binding event sent to the app: `success` or `failure`.
    pub fn binding_event(&self, binding: &Name, result: &'static str) {
        self.binding_events
            .get_or_create(&BindingEventLabels {
                binding: binding.clone(),
                result,
            })
            .inc();
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "bridge_requests",
            "Dapr API calls answered by the bridge, by API and status class",
            self.requests.clone(),
        );
        r.register(
            "bridge_request_duration_seconds",
            "Time from a Dapr API call's arrival to its response headers, in seconds",
            self.duration.clone(),
        );
        r.register(
            "bridge_connections_cut",
            "Bridge connections closed by the bridge: silent (no byte within 10 s) or read_nothing (a write waited 60 s)",
            self.cut.clone(),
        );
        r.register(
            "bindings_input_events",
            "Input binding events sent to the app, by binding and result (success, failure)",
            self.binding_events.clone(),
        );
    }
}

/// The registry being built: modules register their metrics before the sidecar starts.
pub struct Metrics {
    pub registry: Registry,
    pub runtime: RuntimeMetrics,
    pub proxy: ProxyMetrics,
    pub pubsub: PubSubMetrics,
    pub bridge: BridgeMetrics,
    pub logs: LogsMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector {
            started: Instant::now(),
        }));
        let runtime = RuntimeMetrics::default();
        let ours = registry.sub_registry_with_prefix("outrigger");
        ours.register(
            "build",
            "Outrigger version and compiled-in features",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                features: crate::FEATURES.join(","),
            }),
        );
        ours.register(
            "module_state",
            "1 for the state each module is in (starting, ready, backoff, stopping, stopped)",
            runtime.module_state.clone(),
        );
        ours.register(
            "module_restarts",
            "Times a module was restarted after it failed or panicked",
            runtime.module_restarts.clone(),
        );
        ours.register(
            "config_reloads",
            "Config reload attempts by result (success, failure)",
            runtime.config_reloads.clone(),
        );
        ours.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config reload (0: none yet)",
            runtime.config_last_reload_success.clone(),
        );
        ours.register(
            "app_ready",
            "1 while the app's probe passes (or, without a probe, while it runs)",
            runtime.app_ready.clone(),
        );
        ours.register(
            "app_restarts",
            "Times the supervised app was started again (restart policy or a reload action)",
            runtime.app_restarts.clone(),
        );
        ours.register(
            "app_probe_failures",
            "App probes that failed",
            runtime.app_probe_failures.clone(),
        );
        ours.register(
            "app_probe_skipped",
            "App probes the sidecar could not run (out of descriptors or processes); the app's state was kept",
            runtime.app_probe_skipped.clone(),
        );
        ours.register(
            "reload_changes",
            "Content changes seen by each reload entry (after debounce; unchanged content is not counted)",
            runtime.reload_changes.clone(),
        );
        ours.register(
            "reload_actions",
            "Reload actions run, by entry and result (success, failure)",
            runtime.reload_actions.clone(),
        );
        ours.register(
            "reload_last_success_timestamp_seconds",
            "Unix time of each reload entry's last successful action",
            runtime.reload_last_success.clone(),
        );
        // Both results exist from the start, so a scrape can tell "no failures" from "unknown".
        for result in ["success", "failure"] {
            let _ = runtime
                .config_reloads
                .get_or_create(&ResultLabels { result });
        }
        let proxy = ProxyMetrics::default();
        proxy.register(ours);
        let pubsub = PubSubMetrics::default();
        if cfg!(feature = "bridge") {
            pubsub.register(ours);
        }
        let bridge = BridgeMetrics::default();
        if cfg!(feature = "bridge") {
            bridge.register(ours);
        }
        let logs = LogsMetrics::default();
        if cfg!(feature = "logs") {
            logs.register(ours);
        }
        Metrics {
            registry,
            runtime,
            proxy,
            pubsub,
            bridge,
            logs,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Encodes the registry in the Prometheus text format, or OpenMetrics when asked.
pub fn encode(registry: &Registry, openmetrics: bool) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let res = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
    };
    // Writing to a String cannot fail; a collector error would be a bug we want to see.
    if let Err(e) = res {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    out
}

/// Unix time now, in seconds.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Heap allocations so far, counted by the bench build's global allocator (`alloc-count`
/// feature, in `main.rs`); exported as `outrigger_heap_allocations_total`.
#[cfg(feature = "alloc-count")]
pub static HEAP_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// Reads the process's resources from `/proc` at scrape time, under the standard `process_*`
/// names that Prometheus client libraries use. Written by hand: prometheus-client has no
/// process collector, and reading three `/proc` files does not justify another dependency.
#[derive(Debug)]
struct ProcessCollector {
    started: Instant,
}

#[derive(Default)]
struct ProcessStats {
    cpu_seconds: f64,
    threads: i64,
    start_time: f64,
    virtual_bytes: i64,
    resident_bytes: i64,
}

fn read_process_stats() -> Option<ProcessStats> {
    use nix::unistd::{SysconfVar, sysconf};
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
    let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let page = sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as f64;
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
    Some(ProcessStats {
        cpu_seconds: (field(14)? + field(15)?) / ticks,
        threads: field(20)? as i64,
        start_time: boot + field(22)? / ticks,
        virtual_bytes: field(23)? as i64,
        resident_bytes: (field(24)? * page) as i64,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        fn gauge<T: prometheus_client::encoding::EncodeGaugeValue>(
            encoder: &mut DescriptorEncoder,
            name: &str,
            help: &str,
            value: T,
        ) -> Result<(), std::fmt::Error> {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
        }
        gauge(
            &mut encoder,
            "outrigger_uptime_seconds",
            "Seconds since Outrigger started",
            self.started.elapsed().as_secs_f64(),
        )?;
        #[cfg(feature = "alloc-count")]
        {
            let n = ConstCounter::new(HEAP_ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed));
            n.encode(encoder.encode_descriptor(
                "outrigger_heap_allocations",
                "Heap allocations since start (bench builds with the alloc-count feature only)",
                None,
                n.metric_type(),
            )?)?;
        }
        if let Some(s) = read_process_stats() {
            let cpu = ConstCounter::new(s.cpu_seconds);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                cpu.metric_type(),
            )?)?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes,
            )?;
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                s.start_time,
            )?;
            gauge(
                &mut encoder,
                "process_threads",
                "Number of OS threads in the process",
                s.threads,
            )?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle itself is one of the entries.
            let open = dir.count().saturating_sub(1) as i64;
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                open,
            )?;
        }
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                soft as i64,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_stats_are_read() {
        let s = read_process_stats().expect("/proc is readable");
        assert!(s.resident_bytes > 0);
        assert!(s.threads >= 1);
        assert!(s.start_time > 1_600_000_000.0);
    }

    #[test]
    fn both_formats_encode_self_metrics() {
        let m = Metrics::new();
        m.runtime
            .module_restarts
            .get_or_create(&ModuleLabels { module: "x".into() })
            .inc();
        let text = encode(&m.registry, false);
        assert!(
            text.contains("# TYPE outrigger_module_restarts_total counter"),
            "{text}"
        );
        assert!(
            text.contains("outrigger_module_restarts_total{module=\"x\"} 1"),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        let om = encode(&m.registry, true);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE outrigger_build info"), "{om}");
    }
}
