//! TLS to PostgreSQL for `state.postgresql`, `bindings.postgresql` and
//! `configuration.postgresql`: the connection string's `sslmode`, `sslrootcert`, `sslcert` and
//! `sslkey` (libpq's names, as daprd's pgx reads them) taken out before tokio-postgres parses
//! the rest, and a tokio-postgres [`MakeTlsConnect`] over tokio-rustls with the rustls config
//! of [`crate::tls::stores`].
//!
//! Hand-written rather than `tokio-postgres-rustls`: that crate enables rustls' default
//! features (ring), and the whole connector is the few lines below.
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | if the server offers it and the handshake succeeds (else plain, as libpq) | not checked; the chain when `sslrootcert` is set |
//! | `require` | always | not checked; the chain when `sslrootcert` is set |
//! | `verify-ca` | always | the chain (`sslrootcert`, required) |
//! | `verify-full` | always | the chain and the host name |
//!
//! `sslrootcert=system` is the system's roots and makes `verify-full` the default (a weaker mode
//! with it is refused, as libpq does). The SCRAM channel binding (`tls-server-end-point`) is
//! offered on TLS connections.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use crate::tls::stores::{Pem, StoreTls, Verify, store_client_config};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Result<SslMode, String> {
        Ok(match v {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` tries plain first: a server that accepts both would never be
            // reached over TLS, so it is not offered.
            other => {
                return Err(format!(
                    "expected sslmode disable, prefer, require, verify-ca or verify-full, found {other:?}"
                ));
            }
        })
    }

    /// tokio-postgres knows whether to use TLS; how much to check is ours.
    fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as T;
        match self {
            SslMode::Disable => T::Disable,
            SslMode::Prefer => T::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => T::Require,
        }
    }
}

/// The TLS keys of a connection string.
#[derive(Default, Debug)]
struct SslKeys {
    mode: Option<String>,
    rootcert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl SslKeys {
    /// Takes `key`'s value when it is one of ours (true), leaves it otherwise.
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.rootcert,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// Splits the TLS keys out of a connection string (a `postgres://` URL's query or `key=value`
/// pairs, already normalised): what is left is for tokio-postgres.
fn split(s: &str) -> (String, SslKeys) {
    let mut keys = SslKeys::default();
    if let Some((base, query)) = s.split_once('?')
        && (s.starts_with("postgres://") || s.starts_with("postgresql://"))
    {
        let rest: Vec<&str> = query
            .split('&')
            .filter(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                let v = percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned();
                !keys.take(k, v)
            })
            .collect();
        let text = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        return (text, keys);
    }
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        return (s.to_string(), keys);
    }
    let rest: Vec<&str> = s
        .split_whitespace()
        .filter(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            !keys.take(k, v.trim_matches('\'').to_string())
        })
        .collect();
    (rest.join(" "), keys)
}

/// The TLS connector a connection string describes, its files read (a bad path or PEM is an
/// error here, at preflight), and the connection string without its TLS keys.
pub(crate) fn from_connection_string(s: &str) -> Result<(String, SslMode, PgTls), String> {
    let (rest, keys) = split(s);
    let system = keys.rootcert.as_deref() == Some("system");
    let mode = match keys.mode.as_deref() {
        Some(m) => SslMode::parse(m)?,
        None if system => SslMode::VerifyFull,
        None => SslMode::Prefer,
    };
    if system && mode != SslMode::VerifyFull {
        return Err(format!(
            "sslrootcert=system needs sslmode=verify-full (the system's roots vouch for names), found sslmode={}",
            keys.mode.as_deref().unwrap_or_default()
        ));
    }
    let client = match (keys.cert, keys.key) {
        (Some(c), Some(k)) => Some((Pem::File(c.into()), Pem::File(k.into()))),
        (None, None) => None,
        (Some(_), None) => return Err("sslcert needs sslkey (the client certificate's key)".into()),
        (None, Some(_)) => return Err("sslkey needs sslcert (the client certificate)".into()),
    };
    if mode == SslMode::VerifyCa && keys.rootcert.is_none() {
        // The system's roots vouch for names, not for this server: any publicly trusted
        // certificate would pass. libpq refuses it too.
        return Err(
            "sslmode=verify-ca needs sslrootcert=FILE (the CA that signed the server's certificate); with the system's roots use sslmode=verify-full"
                .into(),
        );
    }
    let ca = keys
        .rootcert
        .filter(|r| r != "system")
        .map(|r| Pem::File(r.into()));
    let verify = match mode {
        SslMode::Disable => return Ok((rest, mode, PgTls(None))),
        // As libpq and pgx: a root certificate given is a root certificate used.
        SslMode::Prefer | SslMode::Require if ca.is_some() => Verify::Chain,
        SslMode::Prefer | SslMode::Require => Verify::Nothing,
        SslMode::VerifyCa => Verify::Chain,
        SslMode::VerifyFull => Verify::Full,
    };
    let config = store_client_config(&StoreTls {
        ca,
        client,
        verify,
        // PostgreSQL 17's direct TLS requires it; older servers ignore it.
        alpn: vec![b"postgresql".to_vec()],
    })
    .map_err(|e| format!("TLS to PostgreSQL (sslmode={mode}): {e}"))?;
    Ok((rest, mode, PgTls(Some(config))))
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// Sets what tokio-postgres needs of `mode` on `config`.
pub(crate) fn apply(config: &mut tokio_postgres::Config, mode: SslMode) {
    config.ssl_mode(mode.negotiation());
}

/// tokio-postgres' TLS connector on tokio-rustls (None: `sslmode=disable`, never used).
#[derive(Clone)]
pub(crate) struct PgTls(Option<Arc<ClientConfig>>);

impl MakeTlsConnect<tokio_postgres::Socket> for PgTls {
    type Stream = PgTlsStream<tokio_postgres::Socket>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    /// tokio-postgres asks for a connector on every connection, whatever the mode and the
    /// host (a unix socket or `hostaddr` alone give ""), before it knows whether TLS is used:
    /// this never fails, and [`PgTlsConnect::connect`] (reached only when the server offers
    /// TLS) says what is missing.
    fn make_tls_connect(&mut self, domain: &str) -> io::Result<PgTlsConnect> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|e| format!("TLS to PostgreSQL needs a host name, found {domain:?}: {e}"));
        Ok(PgTlsConnect {
            config: self.0.clone(),
            name,
        })
    }
}

/// One connection's handshake: the config (None: `sslmode=disable`) and the server's name.
pub(crate) struct PgTlsConnect {
    config: Option<Arc<ClientConfig>>,
    name: Result<ServerName<'static>, String>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self
                .config
                .ok_or_else(|| io::Error::other("TLS with sslmode=disable"))?;
            let name = self
                .name
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map(PgTlsStream)
                .map_err(|e| io::Error::new(e.kind(), HandshakeFailed(e)))
        })
    }
}

/// A TLS handshake that failed (the certificate, the protocol): what `sslmode=prefer` retries
/// without TLS, told apart from the other errors tokio-postgres reports as TLS errors.
#[derive(Debug)]
struct HandshakeFailed(io::Error);

impl std::fmt::Display for HandshakeFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for HandshakeFailed {}

/// tokio-postgres' TLS error holds our io::Error (whose `source` skips its payload).
fn handshake_failed(e: &tokio_postgres::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<io::Error>())
        .and_then(|io| io.get_ref())
        .is_some_and(|inner| inner.is::<HandshakeFailed>())
}

/// One connection by `config` over `tls`. With `sslmode=prefer` a server that offers TLS but
/// whose handshake fails is tried again without TLS, as libpq does (tokio-postgres alone gives
/// up); the server's own pg_hba then decides.
pub(crate) async fn connect(
    config: &tokio_postgres::Config,
    tls: &PgTls,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, PgTlsStream<tokio_postgres::Socket>>,
    ),
    tokio_postgres::Error,
> {
    match config.connect(tls.clone()).await {
        Err(e)
            if config.get_ssl_mode() == tokio_postgres::config::SslMode::Prefer
                && handshake_failed(&e) =>
        {
            tracing::debug!(error = %e, "postgresql: TLS failed with sslmode=prefer, trying without");
            let mut plain = config.clone();
            plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
            plain.connect(tls.clone()).await
        }
        r => r,
    }
}

/// The pool's way to connect: [`connect`], its connection driven by a task of its own (as
/// deadpool's default does).
pub(crate) struct PgConnect(pub(crate) PgTls);

impl deadpool_postgres::Connect for PgConnect {
    fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> Pin<
        Box<
            dyn Future<
                    Output = Result<
                        (tokio_postgres::Client, tokio::task::JoinHandle<()>),
                        tokio_postgres::Error,
                    >,
                > + Send
                + '_,
        >,
    > {
        let config = config.clone();
        Box::pin(async move {
            let (client, connection) = connect(&config, &self.0).await?;
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "postgresql: connection error");
                }
            });
            Ok((client, task))
        })
    }
}

/// A TLS connection to PostgreSQL.
pub(crate) struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| crate::tls::stores::tls_server_end_point(c))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_keys_leave_the_connection_string() {
        let (rest, k) = split(
            "host=db user=u sslmode=verify-full sslrootcert=/ca.pem sslcert=/c.pem sslkey=/k.pem dbname=x",
        );
        assert_eq!(rest, "host=db user=u dbname=x");
        assert_eq!(k.mode.as_deref(), Some("verify-full"));
        assert_eq!(k.rootcert.as_deref(), Some("/ca.pem"));
        assert_eq!(k.cert.as_deref(), Some("/c.pem"));
        assert_eq!(k.key.as_deref(), Some("/k.pem"));
        let (rest, k) =
            split("postgres://u@db:5432/x?sslmode=require&connect_timeout=3&sslrootcert=%2Fa%20b");
        assert_eq!(rest, "postgres://u@db:5432/x?connect_timeout=3");
        assert_eq!(k.rootcert.as_deref(), Some("/a b"));
        let (rest, _) = split("postgresql://u@db/x?sslmode=disable");
        assert_eq!(rest, "postgresql://u@db/x");
    }

    #[test]
    fn modes_as_libpq() {
        let mode = |s: &str| from_connection_string(s).map(|(_, m, _)| m);
        assert_eq!(mode("host=db"), Ok(SslMode::Prefer));
        assert_eq!(mode("host=db sslmode=disable"), Ok(SslMode::Disable));
        assert_eq!(mode("host=db sslmode=require"), Ok(SslMode::Require));
        let e = mode("host=db sslmode=allow").unwrap_err();
        assert!(e.contains("verify-full") && e.contains("\"allow\""), "{e}");
        let e = mode("host=db sslmode=require sslrootcert=system").unwrap_err();
        assert!(e.contains("verify-full"), "{e}");
        let e = mode("host=db sslcert=/c.pem").unwrap_err();
        assert!(e.contains("sslkey"), "{e}");
        let e = mode("host=db sslmode=verify-ca sslrootcert=/nowhere/ca.pem").unwrap_err();
        assert!(e.contains("/nowhere/ca.pem"), "{e}");
        let e = mode("host=db sslmode=verify-ca").unwrap_err();
        assert!(e.contains("sslrootcert=FILE"), "{e}");
        // disable reads no file.
        assert_eq!(
            mode("host=db sslmode=disable sslrootcert=/nowhere/ca.pem"),
            Ok(SslMode::Disable)
        );
    }

    /// A unix socket or `hostaddr` alone gives tokio-postgres no host name: the connector is
    /// still made (TLS may not even be offered), under every mode.
    #[test]
    fn no_host_name_is_no_error_until_tls() {
        for s in [
            "host=/run/postgresql",
            "host=db sslmode=disable",
            "host=db sslmode=require",
        ] {
            let (_, _, mut tls) = from_connection_string(s).unwrap();
            let c = tls.make_tls_connect("").unwrap();
            assert!(c.name.is_err(), "{s}");
        }
    }
}
