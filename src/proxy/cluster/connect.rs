//! Connecting to an endpoint: the [`Connector`] (a `tower::Service` hyper-util's client calls
//! for each new pooled connection) and the client built around it. The endpoint is fixed per
//! client, whatever URI the request carries; the connect timeout covers the TLS handshake
//! (origination, see [`crate::tls::origination`]) too.
//!
//! In: the endpoint's address and the cluster's `connect_timeout`, `http2`, `pool_idle_timeout`
//! and `tls`. Out: a connected [`Stream`] for hyper, or the I/O error that becomes a 502.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::config::Address;
use crate::config::proxy::ClusterConfig;
use crate::proxy::body::ProxyBody;
use crate::proxy::listener::{self, Stream};
use crate::tls::origination::Origination;

/// Idle pooled connections kept per endpoint.
const POOL_MAX_IDLE: usize = 256;

pub type HttpClient = Client<Connector, ProxyBody>;

/// Connects to one endpoint, whatever URI the client asks for: the URI carries the request's
/// authority (for `Host` and the pool key), the endpoint is fixed.
#[derive(Clone)]
pub struct Connector {
    address: Address,
    timeout: Duration,
    tls: Option<(Arc<Origination>, rustls_pki_types::ServerName<'static>)>,
    /// TLS offers only `http/1.1` (an `http2` cluster's connections for upgrade requests).
    http1: bool,
}

/// The connection pool of one endpoint.
pub(super) fn client(
    address: &Address,
    config: &ClusterConfig,
    tls: Option<&Arc<Origination>>,
) -> HttpClient {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(config.pool_idle_timeout.get())
        .pool_max_idle_per_host(POOL_MAX_IDLE)
        .set_host(false)
        .http2_only(config.http2);
    builder.build(Connector::new(address, config, tls))
}

impl Connector {
    /// For `address`, with the cluster's connect timeout and TLS.
    pub(super) fn new(
        address: &Address,
        config: &ClusterConfig,
        tls: Option<&Arc<Origination>>,
    ) -> Connector {
        Connector {
            address: address.clone(),
            timeout: config.connect_timeout.get(),
            tls: tls.map(|o| (o.clone(), o.server_name(address))),
            http1: false,
        }
    }

    /// For an `http2` cluster's upgrade requests (WebSocket): HTTP/1.1, which TLS then
    /// negotiates by ALPN too.
    pub(super) fn http1(mut self) -> Connector {
        self.http1 = true;
        self
    }

    /// A new connection to the endpoint (TLS included), within the connect timeout.
    pub(super) fn connect(
        &self,
    ) -> impl Future<Output = std::io::Result<TokioIo<Stream>>> + Send + 'static {
        let (address, timeout, tls, http1) = (
            self.address.clone(),
            self.timeout,
            self.tls.clone(),
            self.http1,
        );
        async move {
            // The connect timeout covers the TLS handshake too.
            let connect = async {
                let stream = listener::connect(&address).await?;
                let Some((origination, name)) = tls else {
                    return Ok(stream);
                };
                let s = origination.connect(name, stream, &address, http1).await?;
                Ok(Stream::TlsClient(Box::new(s)))
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(s)) => Ok(TokioIo::new(s)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                )),
            }
        }
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<Stream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        Box::pin(self.connect())
    }
}
