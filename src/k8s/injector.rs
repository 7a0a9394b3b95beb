//! `outrigger injector`: the mutating admission webhook. HTTPS only (rustls, the files of
//! `--cert`/`--key`, re-read when they change, as a listener's are); `POST /inject` takes an
//! AdmissionReview and answers with [`super::admission::answer`]; `GET /healthz` is for the
//! webhook Deployment's probes. SIGTERM or SIGINT stops it (reviews in flight are short; the API
//! server retries by the webhook's `failurePolicy`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use tracing::Instrument;

use super::admission;
use super::sidecar::Options;
use crate::config::tls::{CertFiles, ServerTlsConfig, TlsVersion};
use crate::tls::rotation::ServerTls;

/// The largest AdmissionReview read: the API server's own request limit is 3 MiB, and a review
/// carries the object twice at most (object, oldObject).
const MAX_REVIEW_BYTES: usize = 8 << 20;

/// How to run the injector.
pub struct InjectorOptions {
    pub address: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub inject: Options,
    /// Written as `{"injector": "ADDRESS"}` once bound (port 0 in tests).
    pub listeners_file: Option<PathBuf>,
}

/// Serves until SIGTERM or SIGINT.
pub fn run(o: InjectorOptions) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(o))
}

async fn serve(o: InjectorOptions) -> anyhow::Result<()> {
    let config = ServerTlsConfig {
        default: CertFiles {
            cert: o.cert.clone(),
            key: o.key.clone(),
            identity: None,
        },
        sni: vec![],
        client_ca: None,
        client_cert: Default::default(),
        min_version: TlsVersion::V1_2,
        alpn: vec!["h2".into(), "http/1.1".into()],
    };
    let tls = ServerTls::new("injector", config, None, Default::default())
        .context("the injector's certificate")?;
    // Before anything says "ready" (the listeners file): a SIGTERM right after must stop it
    // gracefully, not find the default action (killed by the signal, not exit 0).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let listener = tokio::net::TcpListener::bind(o.address)
        .await
        .with_context(|| format!("bind {}", o.address))?;
    let bound = listener.local_addr()?;
    if let Some(path) = &o.listeners_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::json!({"injector": bound.to_string()}).to_string(),
        )?;
        std::fs::rename(&tmp, path)?;
    }
    tracing::info!(address = %bound, image = %o.inject.image, legacy = o.inject.legacy, "injector listening on https");
    let options = Arc::new(o.inject);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = term.recv() => break,
            _ = interrupt.recv() => break,
        };
        let acceptor = tls.acceptor();
        let options = options.clone();
        tokio::spawn(
            async move {
                let stream = match acceptor.accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                };
                let service = hyper::service::service_fn(move |req| {
                    let options = options.clone();
                    async move { Ok::<_, Infallible>(route(req, &options).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                if let Err(e) = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            .instrument(tracing::info_span!("injector", peer.addr = %peer)),
        );
    }
    tracing::info!("injector stopped");
    Ok(())
}

async fn route(req: Request<hyper::body::Incoming>, options: &Options) -> Response<Full<Bytes>> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/healthz") => text(StatusCode::OK, "ok\n"),
        ("POST", "/inject") => {
            let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    let a = admission::answer(format!("unreadable body: {e}").as_bytes(), options);
                    return json(a.status, &a.review);
                }
            };
            let a = admission::answer(&body, options);
            if a.status == 200 {
                tracing::info!(result = %a.summary, "review answered");
            } else {
                tracing::warn!(result = %a.summary, "review refused");
            }
            json(a.status, &a.review)
        }
        (_, "/inject") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST an AdmissionReview to /inject\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "no such endpoint; try POST /inject or GET /healthz\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("a valid response")
}

fn json(status: u16, value: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("a valid response")
}
