//! Telemetry used by every module: Outrigger's own logs ([`log`]), the metrics registry with
//! the self-metrics and the proxy's request metrics ([`metrics`]), trace-context propagation
//! on proxied requests ([`trace`]), and the record of each proxied request ([`record`]) that
//! feeds the access log ([`access_log`]) and span export over OTLP/HTTP ([`otlp`]).

#[cfg(feature = "proxy")]
pub mod access_log;
#[cfg(any(feature = "proxy", feature = "logs"))]
pub mod json;
pub mod log;
pub mod log_sinks;
pub mod metrics;
#[cfg(feature = "proxy")]
pub mod otlp;
#[cfg(feature = "proxy")]
pub mod record;
pub mod tls;
pub mod trace;
