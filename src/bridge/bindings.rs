//! Output bindings behind `POST|PUT /v1.0/bindings/{name}` and `InvokeBinding`:
//! `bindings.http` (components-contrib `bindings/http`): the operation is the HTTP method
//! (`create` is POST), `path` metadata is appended to the component's `url`, the other request
//! metadata goes as headers, and the answer's status (`statusCode`, `status`) and headers come
//! back as response metadata. A non-2xx answer is an error unless `errorIfNot2XX` is false.
//! An `https://` url is verified as daprd's: against `MTLSRootCA` alone when it is given, else
//! the system's roots, and for the url's host; `MTLSClientCert`/`MTLSClientKey` answer a
//! server that asks for a client certificate. Each of the three is PEM text or a file holding
//! it (as daprd: text that holds a PEM block is the text, anything else a path), read when the
//! component is built; only `MTLSRenegotiation: RenegotiateNever` is taken (rustls never
//! renegotiates).
//! `bindings.mqtt3` (`create`): publishes the data to the component's `topic` (or the request's
//! `topic` metadata) through the same MQTT connection its input side reads with.
//! `bindings.postgresql`, `bindings.redis` and `bindings.rabbitmq` live in their own files
//! (`binding_postgresql.rs`, `binding_redis.rs`, `binding_rabbitmq.rs`).
//!
//! An invocation answers `Some(response)` (HTTP 200, even with no data) or `None` (HTTP 204),
//! as daprd answers a component's `InvokeResponse` or its nil.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::components::Component;
use super::pubsub::broker::{Broker, Meta};
use super::pubsub::mqtt::Mqtt;

/// contrib's default `responseTimeout` is none; a call must end some day.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest answer read back (bytes).
const MAX_RESPONSE: usize = 16 << 20;

/// What a binding answered.
#[derive(Debug, Default)]
pub struct BindingResponse {
    pub data: Bytes,
    pub metadata: BTreeMap<String, String>,
}

/// An output binding component.
pub enum OutputBinding {
    Http(Box<HttpBinding>),
    /// `bindings.mqtt3`: the component's connection (shared with its input side) and topic.
    Mqtt {
        broker: std::sync::Arc<Mqtt>,
        topic: String,
    },
    Postgres(Box<super::binding_postgresql::PostgresBinding>),
    Redis(Box<super::binding_redis::RedisBinding>),
    /// `bindings.rabbitmq`: shared with its input side.
    Rabbit(std::sync::Arc<super::binding_rabbitmq::RabbitBinding>),
}

/// The output binding types with a component of their own here (`bindings.mqtt3` and
/// `bindings.rabbitmq` are built with their input side in `BridgeState::new`).
pub const POSTGRES_TYPES: &[&str] = &["bindings.postgresql", "bindings.postgres"];

/// `bindings.mqtt3`'s connection and topic: built once per component, for its output and
/// input sides (two connections with one client id would push each other off the broker).
pub fn mqtt_parts(c: &Component, app_id: &str) -> Result<(std::sync::Arc<Mqtt>, String), String> {
    let meta = Meta::new(c);
    let topic = meta
        .required("topic", "the MQTT topic to publish to and read from")?
        .to_string();
    let broker = Mqtt::new(&meta)?;
    broker.set_app_id(app_id);
    Ok((std::sync::Arc::new(broker), topic))
}

impl OutputBinding {
    /// Checks the metadata without connecting (preflight).
    pub fn check(c: &Component) -> Result<(), String> {
        match c.kind.as_str() {
            "bindings.mqtt3" => mqtt_parts(c, "check").map(drop),
            "bindings.rabbitmq" => super::binding_rabbitmq::RabbitBinding::open(c).map(drop),
            _ => OutputBinding::open(c).map(drop),
        }
    }

    /// Opens a `bindings.http`, `bindings.postgresql` or `bindings.redis` component
    /// (`bindings.mqtt3`: [`mqtt_parts`]; `bindings.rabbitmq`: with its input side).
    pub fn open(c: &Component) -> Result<OutputBinding, String> {
        match c.kind.as_str() {
            k if POSTGRES_TYPES.contains(&k) => super::binding_postgresql::PostgresBinding::open(c)
                .map(|b| OutputBinding::Postgres(Box::new(b))),
            "bindings.redis" => super::binding_redis::RedisBinding::open(c)
                .map(|b| OutputBinding::Redis(Box::new(b))),
            _ => HttpBinding::open(c).map(|h| OutputBinding::Http(Box::new(h))),
        }
    }

    /// The health probe ([`super::health`]); None for `bindings.http` (its server is the
    /// request's, each call says whether it answers).
    pub fn ping(&self) -> Option<super::pubsub::broker::BoxFuture<'_, Result<(), String>>> {
        match self {
            OutputBinding::Http(_) => None,
            OutputBinding::Postgres(p) => Some(Box::pin(p.ping())),
            OutputBinding::Redis(r) => Some(Box::pin(r.ping())),
            OutputBinding::Rabbit(r) => Some(Box::pin(r.ping())),
            OutputBinding::Mqtt { broker, .. } => broker.ping(),
        }
    }

    /// Sends `data` with `operation`.
    pub async fn invoke(
        &self,
        operation: &str,
        data: Bytes,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Option<BindingResponse>, String> {
        match self {
            OutputBinding::Http(h) => h.invoke(operation, data, metadata).await.map(Some),
            OutputBinding::Postgres(p) => p.invoke(operation, metadata).await,
            OutputBinding::Redis(r) => r.invoke(operation, data, metadata).await,
            OutputBinding::Rabbit(r) => {
                if operation != "create" {
                    return Err(format!("invalid operation {operation:?}: expected create"));
                }
                match tokio::time::timeout(
                    super::pubsub::PUBLISH_TIMEOUT,
                    r.create(&data, metadata),
                )
                .await
                {
                    Ok(Ok(())) => Ok(None),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(format!(
                        "rabbitmq did not take the message within {}s",
                        super::pubsub::PUBLISH_TIMEOUT.as_secs()
                    )),
                }
            }
            OutputBinding::Mqtt { broker, topic } => {
                if !operation.eq_ignore_ascii_case("create") {
                    return Err(format!("invalid operation {operation:?}: expected create"));
                }
                let topic = metadata
                    .get("topic")
                    .filter(|t| !t.is_empty())
                    .unwrap_or(topic);
                let publish = broker.publish(topic, data, metadata);
                match tokio::time::timeout(super::pubsub::PUBLISH_TIMEOUT, publish).await {
                    Ok(Ok(())) => Ok(None),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!(
                        "mqtt did not take the message within {}s",
                        super::pubsub::PUBLISH_TIMEOUT.as_secs()
                    )),
                }
            }
        }
    }
}

/// `bindings.http`.
pub struct HttpBinding {
    url: String,
    error_if_not_2xx: bool,
    timeout: Duration,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// daprd's TLS keys of `bindings.http`, in the order a problem is reported.
const MTLS_KEYS: [&str; 3] = ["MTLSRootCA", "MTLSClientCert", "MTLSClientKey"];

/// The rustls config for an `https://` url from the component's `MTLS*` keys (None for
/// `http://`, where they are refused).
fn http_tls(c: &Component, https: bool) -> Result<Option<rustls::ClientConfig>, String> {
    use crate::tls::stores::{StoreTls, Verify, store_client_config};
    use crate::tls::{Pem, pem_certified_key, pem_certs};
    // daprd matches metadata keys in any case; we read them as written, so another spelling
    // is refused rather than ignored (which would quietly drop the CA or client certificate).
    if let Some((k, want)) = c.metadata.keys().find_map(|k| {
        MTLS_KEYS
            .iter()
            .chain(&["MTLSRenegotiation"])
            .find(|want| k.eq_ignore_ascii_case(want) && k != *want)
            .map(|want| (k, want))
    }) {
        return Err(format!("expected the key spelled {want}, found {k}"));
    }
    let [ca, cert, key] = MTLS_KEYS.map(|k| c.meta(k).map(str::trim).filter(|v| !v.is_empty()));
    if !https {
        if let Some(k) = MTLS_KEYS
            .iter()
            .zip([ca, cert, key])
            .find_map(|(k, v)| v.map(|_| k))
        {
            return Err(format!(
                "expected {k} only with an https:// url (TLS only), found it with http://"
            ));
        }
        return Ok(None);
    }
    match c.meta("MTLSRenegotiation") {
        None | Some("RenegotiateNever") => {}
        Some(v) => {
            return Err(format!(
                "expected MTLSRenegotiation RenegotiateNever (rustls never renegotiates), found {v:?}"
            ));
        }
    }
    // daprd's rule: a value holding a PEM block is the PEM, anything else a file name.
    let pem = |key: &'static str, v: &str| {
        if v.contains("-----BEGIN ") {
            Pem::Text {
                pem: v.to_string(),
                key,
            }
        } else {
            Pem::File(v.into())
        }
    };
    let ca = match ca {
        None => None,
        Some(v) => {
            let p = pem("MTLSRootCA", v);
            pem_certs(&p).map_err(|e| {
                format!("expected MTLSRootCA as PEM CA certificates or a file of them: {e}")
            })?;
            Some(p)
        }
    };
    let client = match (cert, key) {
        (None, None) => None,
        (Some(_), None) => {
            return Err("expected MTLSClientCert together with its key, found no key".into());
        }
        (None, Some(_)) => {
            return Err(
                "expected MTLSClientKey together with its certificate, found no certificate".into(),
            );
        }
        (Some(cert), Some(key)) => {
            let (cert, key) = (pem("MTLSClientCert", cert), pem("MTLSClientKey", key));
            pem_certs(&cert).map_err(|e| {
                format!("expected MTLSClientCert as a PEM certificate or a file holding one: {e}")
            })?;
            // The message names the key's origin (a path, or the metadata key), never its text.
            pem_certified_key(&cert, &key).map_err(|e| match e {
                crate::tls::TlsError::KeyMismatch { .. } => {
                    "expected MTLSClientKey as the private key of the client certificate, found another key".to_string()
                }
                crate::tls::TlsError::NoKey { path, .. } => format!(
                    "expected MTLSClientKey as a PEM private key or a file holding one, found none in {}",
                    path.display()
                ),
                e => format!("expected MTLSClientKey as the client certificate's key: {e}"),
            })?;
            Some((cert, key))
        }
    };
    let config = store_client_config(&StoreTls {
        ca,
        client,
        verify: Verify::Full,
        alpn: Vec::new(),
    })
    .map_err(|e| format!("cannot make the TLS client for the https:// url: {e}"))?;
    Ok(Some((*config).clone()))
}

impl HttpBinding {
    pub fn open(c: &Component) -> Result<HttpBinding, String> {
        if c.kind != "bindings.http" {
            return Err(format!("{} is not an output binding type", c.kind));
        }
        let url = c
            .meta("url")
            .ok_or("expected metadata url (http://host:port/path), found none")?
            .trim_end_matches('/')
            .to_string();
        let uri: http::Uri = url.parse().map_err(|e| {
            format!("expected url as an http:// or https:// URL, found {url:?}: {e}")
        })?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(format!(
                    "expected url as an http:// or https:// URL, found {url:?}"
                ));
            }
        };
        if uri.host().is_none() {
            return Err(format!("expected url with a host, found {url:?}"));
        }
        let tls = http_tls(c, https)?;
        // Go's spellings (contrib reads it with `IsTruthy`, so anything else would be false;
        // a typo is refused here rather than silently turning the check off).
        // Empty is unset (the default, true), as for a request's: daprd reads "" as false, but
        // an empty value is a template's placeholder far more often than a wish to ignore
        // errors, and `check` refused it outright before.
        let error_if_not_2xx = match c.meta("errorIfNot2XX").filter(|v| !v.trim().is_empty()) {
            None => true,
            Some(v) => truthy(v).ok_or_else(|| {
                format!(
                    "expected errorIfNot2XX true or false (or 1/0, yes/no, on/off), found {v:?}"
                )
            })?,
        };
        let timeout = match c.meta("responseTimeout") {
            None => DEFAULT_TIMEOUT,
            Some(v) => humantime::parse_duration(v).map_err(|_| {
                format!("expected responseTimeout as a duration (like 10s), found {v:?}")
            })?,
        };
        Ok(HttpBinding {
            url,
            error_if_not_2xx,
            timeout,
            client: https_client(tls),
        })
    }

    /// Sends `data` with `operation`.
    pub async fn invoke(
        &self,
        operation: &str,
        data: Bytes,
        metadata: &BTreeMap<String, String>,
    ) -> Result<BindingResponse, String> {
        let method = match operation.to_ascii_lowercase().as_str() {
            "create" | "post" => http::Method::POST,
            "get" => http::Method::GET,
            "head" => http::Method::HEAD,
            "put" => http::Method::PUT,
            "patch" => http::Method::PATCH,
            "delete" => http::Method::DELETE,
            "options" => http::Method::OPTIONS,
            "trace" => http::Method::TRACE,
            other => {
                return Err(format!(
                    "invalid operation {other:?}: expected one of create, get, head, post, put, patch, delete, options, trace"
                ));
            }
        };
        // A request's `errorIfNot2XX` overrides the component's (contrib's `IsTruthy`).
        let error_if_not_2xx = match metadata.get("errorIfNot2XX").filter(|v| !v.is_empty()) {
            Some(v) => truthy(v) == Some(true),
            None => self.error_if_not_2xx,
        };
        let mut url = self.url.clone();
        if let Some(path) = metadata.get("path").filter(|p| !p.is_empty()) {
            if !path.starts_with('/') {
                url.push('/');
            }
            url.push_str(path);
        }
        let mut req = http::Request::builder().method(method).uri(&url);
        for (k, v) in metadata {
            // Metadata becomes headers, but never the ones that pick the target or frame the
            // body (Go's client, which daprd uses, ignores those too).
            if k == "path"
                || k == "errorIfNot2XX"
                || matches!(
                    k.to_ascii_lowercase().as_str(),
                    "host"
                        | "content-length"
                        | "transfer-encoding"
                        | "connection"
                        | "te"
                        | "upgrade"
                        | "keep-alive"
                        | "trailer"
                )
                || k.to_ascii_lowercase().starts_with("proxy-")
            {
                continue;
            }
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::try_from(k.as_str()),
                http::HeaderValue::from_str(v),
            ) {
                req = req.header(k, v);
            }
        }
        let req = req
            .body(Full::new(data))
            .map_err(|e| format!("cannot build the request to {url}: {e}"))?;
        let call = async {
            let res = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("error invoking {url}: {}", crate::errors::chain(&e)))?;
            let status = res.status();
            let mut out = BindingResponse::default();
            out.metadata
                .insert("statusCode".into(), status.as_u16().to_string());
            out.metadata.insert("status".into(), status.to_string());
            for (k, v) in res.headers() {
                if let Ok(v) = v.to_str() {
                    out.metadata
                        .entry(canonical(k.as_str()))
                        .and_modify(|e| {
                            e.push_str(", ");
                            e.push_str(v);
                        })
                        .or_insert_with(|| v.to_string());
                }
            }
            out.data = http_body_util::Limited::new(res.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| format!("reading the answer of {url}: {e}"))?
                .to_bytes();
            if error_if_not_2xx && !status.is_success() {
                return Err(format!(
                    "received status code {}: {}",
                    status.as_u16(),
                    String::from_utf8_lossy(&out.data[..out.data.len().min(512)])
                ));
            }
            Ok(out)
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| Err(format!("no answer from {url} within {:?}", self.timeout)))
    }
}

/// A pooled client for the url: plain HTTP, or TLS with `tls` (HTTP/1.1; hyper-rustls offers
/// it by ALPN). Without `tls` an `https://` url cannot occur (`open` refused it).
fn https_client(
    tls: Option<rustls::ClientConfig>,
) -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let connector = match tls {
        Some(config) => builder
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .wrap_connector(http),
        // A config that trusts nothing: never used, as nothing but http:// reaches it.
        None => builder
            .with_tls_config(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::aws_lc_rs::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("aws-lc-rs has the default versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            )
            .https_or_http()
            .enable_http1()
            .wrap_connector(http),
    };
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A boolean as Go spells one: `Some(true)` for contrib's `IsTruthy` set (`true`, `1`, `yes`,
/// `on`, `y`, `t`), `Some(false)` for their opposites, `None` for anything else.
fn truthy(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "1" | "yes" | "y" | "on" => Some(true),
        "false" | "f" | "0" | "no" | "n" | "off" => Some(false),
        _ => None,
    }
}

/// A header name as Go's `http.Header` spells it (`Content-Type`), as contrib reports them.
fn canonical(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(error_if_not_2xx: Option<&str>) -> Result<HttpBinding, String> {
        let mut metadata = BTreeMap::from([("url".to_string(), "http://127.0.0.1:1".to_string())]);
        if let Some(v) = error_if_not_2xx {
            metadata.insert("errorIfNot2XX".into(), v.into());
        }
        HttpBinding::open(&Component {
            name: "h".into(),
            kind: "bindings.http".into(),
            version: "v1".into(),
            metadata,
            scopes: Vec::new(),
            ignore_errors: false,
            file: "h.yaml".into(),
            line: 1,
            lines: BTreeMap::new(),
        })
    }

    #[test]
    fn an_empty_error_if_not_2xx_is_the_default() {
        assert!(http(None).unwrap().error_if_not_2xx);
        assert!(http(Some("")).unwrap().error_if_not_2xx);
        assert!(!http(Some("false")).unwrap().error_if_not_2xx);
        assert!(http(Some("maybe")).is_err());
    }
}
