//! Integration tests: one binary, one file per module. Each test spawns the real `outrigger`
//! binary on port 0 (see `support`).

/// An HTTP/2 test of a proxy listener, run once with each `http2_server` (hyper's HTTP/2
/// server and Outrigger's own): `on_both_http2_servers!(name)` after `fn name(server: &str)`
/// makes the tests `name::hyper` and `name::outrigger`, so `cargo test --test it name` runs both.
macro_rules! on_both_http2_servers {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn hyper() {
                    super::$name("hyper")
                }
                #[test]
                fn outrigger() {
                    super::$name("outrigger")
                }
            }
        )+
    };
}

mod admin;
mod app;
mod backend;
#[cfg(feature = "bridge")]
mod bridge;
#[cfg(feature = "bridge")]
mod broker_tls;
mod certs;
mod config;
// The dashboard test runs the bridge too (a subscription's deliveries).
#[cfg(feature = "bridge")]
mod dashboard;
mod fast_body;
mod generative;
#[cfg(feature = "bridge")]
mod grpc;
mod h2_abuse;
mod h2_conformance;
#[cfg(feature = "k8s")]
mod k8s;
mod lifecycle;
mod limits;
#[cfg(feature = "logs")]
mod logs;
mod memory;
#[cfg(all(feature = "bridge", feature = "proxy"))]
mod mesh;
mod proxy;
#[cfg(feature = "bridge")]
mod pubsub;
mod reload;
#[cfg(feature = "bridge")]
mod servers;
#[cfg(feature = "bridge")]
mod store_tls;
mod support;
mod telemetry;
mod tls;
mod upgrade;
