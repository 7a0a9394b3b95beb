//! Telemetry used by every module: Outrigger's own logs ([`log`]), the metrics registry with
//! the self-metrics and the proxy's request metrics ([`metrics`]), and trace-context
//! propagation on proxied requests ([`trace`]), access logs (`access_log`). Span export is still to come.

#[cfg(feature = "proxy")]
pub mod access_log;
pub mod log;
pub mod metrics;
pub mod trace;
