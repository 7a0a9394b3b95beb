//! HTTP(S) clients of our own (the log agent's HTTP sinks): a hyper client whose connector
//! speaks plain HTTP to `http://` URLs and TLS to `https://` ones, with the rustls client
//! config built from a [`ClientTlsConfig`] by [`super::client_config`] — the same loader,
//! verifier (CA bundle or system roots, a required identity) and client certificate as a
//! cluster's origination; `hyper-rustls` only does the handshake on hyper's connections.
//!
//! In: what preflight built ([`LoadedClient`]), or nothing for a plain `http://` URL. Out: a
//! pooled [`HttpsClient`], or a [`ReloadingClient`] whose material follows its files (watched
//! like a cluster's, so short-lived workload certificates rotate without a restart). A failed
//! handshake (unknown CA, wrong name) is an ordinary connection error of the request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;

use super::{LoadedClient, Reloadable, TlsMetrics};
use crate::config::tls::ClientTlsConfig;

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

/// An HTTPS client whose TLS material is read again when its files change (CA bundle, client
/// certificate and key): a new pooled client is swapped in whole, so the next request opens a
/// connection with the new material (the old pool goes with the old client). Its certificates
/// are in `outrigger_tls_cert_expiry_seconds` and /status under `owner` (`logs/NAME`).
pub struct ReloadingClient<B> {
    current: ArcSwap<HttpsClient<B>>,
    tls: ClientTlsConfig,
    owner: String,
    metrics: TlsMetrics,
    idle: Duration,
    /// The files' content the current client was built from (empty: not built yet).
    fingerprints: Mutex<Vec<u64>>,
}

impl<B> ReloadingClient<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    /// The client for `tls`, with the material preflight built (`None`: the watcher's first
    /// look builds it; requests fail until then, never sent unverified). Watched from now on
    /// (needs a tokio runtime); the watch ends with the last holder.
    pub fn new(
        owner: String,
        tls: ClientTlsConfig,
        built: Option<LoadedClient>,
        metrics: TlsMetrics,
        idle: Duration,
    ) -> Arc<Self> {
        let c = Arc::new(ReloadingClient {
            current: ArcSwap::from_pointee(https_client(None, None, idle)),
            tls,
            owner,
            metrics,
            idle,
            fingerprints: Mutex::new(Vec::new()),
        });
        if let Some(loaded) = built {
            c.install(loaded);
        }
        super::spawn_watch(&c);
        c
    }

    /// The client to send the next request with.
    pub fn client(&self) -> Arc<HttpsClient<B>> {
        self.current.load_full()
    }

    fn install(&self, loaded: LoadedClient) {
        self.metrics.track(&self.owner, &loaded.certs);
        let client = https_client(Some(&loaded), self.tls.server_name.as_deref(), self.idle);
        self.current.store(Arc::new(client));
        *self.fingerprints.lock().expect("not poisoned") = loaded.fingerprints;
    }
}

impl<B> Reloadable for ReloadingClient<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    fn files(&self) -> Vec<std::path::PathBuf> {
        super::client_files(&self.tls)
    }

    fn reload_files(&self) -> Result<(), super::TlsError> {
        let now = super::fingerprints(&self.files());
        if *self.fingerprints.lock().expect("not poisoned") == now {
            return Ok(());
        }
        match super::client_config_from(&self.tls, false, now) {
            Ok(loaded) => {
                self.install(loaded);
                tracing::info!(owner = %self.owner, "TLS client material reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!(owner = %self.owner, error = %e, "TLS client material not reloaded; keeping the old one");
                Err(e)
            }
        }
    }

    fn retired(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::certs::{CaOptions, IssueOptions, KeyKind, create_ca, issue};
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use std::path::{Path, PathBuf};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn leaf(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let files = issue(&IssueOptions {
            ca_dir: dir.into(),
            out: dir.into(),
            name: name.into(),
            spiffe: None,
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            days: 1,
            expired: false,
            key: KeyKind::Ecdsa,
        })
        .unwrap();
        (files[0].clone(), files[1].clone())
    }

    fn first_cert(path: &Path) -> CertificateDer<'static> {
        CertificateDer::pem_file_iter(path)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
    }

    /// A TLS server requiring a client certificate from the CA in `dir`: answers each request
    /// 200 (connection: close) and reports the client's certificate.
    async fn receiver(
        dir: &Path,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<CertificateDer<'static>>,
    ) {
        let (cert, key) = leaf(dir, "server");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(first_cert(&dir.join("ca.crt"))).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let chain = CertificateDer::pem_file_iter(&cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                tx.send(peer.into_owned()).unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = tls.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the request broke off");
                    head.extend_from_slice(&buf[..n]);
                }
                tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tls.shutdown().await;
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn a_replaced_client_certificate_is_used_by_the_next_connection() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        create_ca(&CaOptions {
            out: d.into(),
            trust_domain: "example.org".into(),
            days: 1,
        })
        .unwrap();
        let (addr, mut seen) = receiver(d).await;
        let (old_cert, old_key) = leaf(d, "old");
        let (new_cert, new_key) = leaf(d, "new");
        let (cert, key) = (d.join("client.crt"), d.join("client.key"));
        std::fs::copy(&old_cert, &cert).unwrap();
        std::fs::copy(&old_key, &key).unwrap();
        let tls = ClientTlsConfig {
            ca: Some(d.join("ca.crt")),
            server_name: None,
            client: Some(crate::config::tls::CertFiles {
                cert: cert.clone(),
                key: key.clone(),
                identity: None,
            }),
            identity: None,
            min_version: crate::config::tls::TlsVersion::V1_2,
        };
        let metrics = TlsMetrics::default();
        let built = super::super::client_config(&tls, false).unwrap();
        let client: Arc<ReloadingClient<http_body_util::Full<bytes::Bytes>>> =
            ReloadingClient::new("logs/test".into(), tls, Some(built), metrics.clone(), IDLE);
        let url: http::Uri = format!("https://127.0.0.1:{}/ingest", addr.port())
            .parse()
            .unwrap();
        let send = || async {
            let req = http::Request::post(url.clone())
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    b"{}\n",
                )))
                .unwrap();
            let resp = client.client().request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
        };
        send().await;
        assert_eq!(seen.recv().await.unwrap(), first_cert(&old_cert));
        assert!(
            metrics
                .certificates()
                .iter()
                .any(|c| c.owner == "logs/test" && c.path == cert.display().to_string()),
            "the sink's certificate is tracked"
        );

        // Rotated (as a secret volume would): read again (the watcher calls this on a change).
        std::fs::copy(&new_cert, &cert).unwrap();
        std::fs::copy(&new_key, &key).unwrap();
        client.reload_files().unwrap();
        send().await;
        assert_eq!(seen.recv().await.unwrap(), first_cert(&new_cert));
    }

    const IDLE: Duration = Duration::from_secs(30);
}
