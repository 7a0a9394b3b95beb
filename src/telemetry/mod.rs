//! Telemetry used by every module: Outrigger's own logs ([`log`]) and the metrics registry with
//! the self-metrics ([`metrics`]). Request metrics, trace context and access logs arrive with
//! the proxy.

pub mod log;
pub mod metrics;
