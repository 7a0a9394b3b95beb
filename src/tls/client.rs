//! HTTP(S) clients of our own (the log agent's HTTP sinks): a hyper client whose connector
//! speaks plain HTTP to `http://` URLs and TLS to `https://` ones, with the rustls client
//! config built from a [`ClientTlsConfig`] by [`super::client_config`] — the same loader,
//! verifier (CA bundle or system roots, a required identity) and client certificate as a
//! cluster's origination; `hyper-rustls` only does the handshake on hyper's connections.
//!
//! In: what preflight built ([`LoadedClient`]), or nothing for a plain `http://` URL. Out: a
//! pooled [`HttpsClient`]. A failed handshake (unknown CA, wrong name) is an ordinary
//! connection error of the request.

use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;

use super::LoadedClient;

/// A pooled hyper client for `http://` and `https://` URLs.
pub type HttpsClient<B> = Client<hyper_rustls::HttpsConnector<HttpConnector>, B>;

/// A client for one endpoint. `tls`: the material for an `https://` URL (None: plain HTTP
/// only — an `https://` URL then fails every request rather than going out unverified);
/// `server_name`: the name to verify and send as SNI instead of the URL's host.
pub fn https_client<B>(
    tls: Option<&LoadedClient>,
    server_name: Option<&str>,
    idle: Duration,
) -> HttpsClient<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let mut config = match tls {
        Some(t) => (*t.config).clone(),
        None => no_roots(),
    };
    // hyper-rustls sets ALPN from the HTTP versions it is given (and refuses a config that
    // has some): HTTP/1.1 only, so none is offered.
    config.alpn_protocols.clear();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http();
    let builder = match server_name.and_then(|n| ServerName::try_from(n.to_string()).ok()) {
        Some(name) => {
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let connector = builder.enable_http1().wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(idle)
        .build(connector)
}

/// A client config that trusts nothing: for a client meant for `http://` URLs only.
fn no_roots() -> ClientConfig {
    ClientConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
}
