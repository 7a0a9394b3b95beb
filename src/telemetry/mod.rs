//! Telemetry used by every module: Outrigger's own logs ([`log`]), the metrics registry with
//! the self-metrics and the proxy's request metrics ([`metrics`]), and trace-context
//! propagation on proxied requests ([`trace`]). Span export and access logs are still to come.

pub mod log;
pub mod metrics;
pub mod trace;
