//! Accept: TLS termination on an accepted connection (`listeners[].tls`), within the
//! listener's `header_read_timeout`. Plain HTTP sent to a TLS port of an HTTP listener gets a
//! 400 that says so; a connection closed without a byte (a TCP health check) is counted, not
//! logged.
//!
//! In: the accepted stream and the listener's [`ServerTls`] (its current material). Out: the
//! TLS stream and the verified client certificate's identity (for `authz` and
//! `x-forwarded-client-cert`), or nothing; every outcome is counted in
//! `outrigger_tls_handshakes_total` (side `server`).

use std::fmt::Debug;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::{PeerIdentity, ServerTls};

/// An accepted connection: a TCP one can be peeked at for plain text before the handshake.
pub trait Accepted: AsyncRead + AsyncWrite + Unpin {
    /// The TCP socket under it, if it is one (a unix socket is not peeked at).
    fn tcp(&self) -> Option<&TcpStream>;
}

/// TLS on an accepted connection, within the header read timeout. Plain HTTP sent to a TLS
/// port gets a 400 that says so. Returns the TLS stream and the client certificate's identity;
/// None (logged and counted) when the handshake fails.
pub async fn handshake<S: Accepted>(
    tls: &ServerTls,
    stream: S,
    listener: &str,
    peer: &impl Debug,
    timeout: Duration,
    http: bool,
) -> Option<(TlsStream<S>, Option<PeerIdentity>)> {
    use tokio::io::AsyncWriteExt;
    // One deadline for the first byte and the whole handshake: a slow client holds its
    // connection slot for at most this long before any HTTP timer starts.
    let deadline = tokio::time::Instant::now() + timeout;
    let metrics = tls.metrics();
    let mut stream = stream;
    // A TLS connection starts with a handshake record (0x16); anything else on an HTTP
    // listener is a client speaking plain HTTP to an HTTPS port.
    if let (Some(tcp), true) = (stream.tcp(), http) {
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] != 0x16 => {
                tracing::warn!(listener = %listener, peer = ?peer, "plain text on a TLS listener; answered 400");
                metrics.handshake("server", listener, "not_tls");
                let _ = stream
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: 51\r\n\r\noutrigger: this port speaks TLS; use https:// here\n")
                    .await;
                let _ = stream.shutdown().await;
                return None;
            }
            // Closed without a byte: a TCP health check (kubelet, load balancers). Not worth
            // a warning every few seconds.
            Ok(Ok(0)) => {
                metrics.handshake("server", listener, "eof");
                return None;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                metrics.handshake("server", listener, "io");
                tracing::debug!(listener = %listener, peer = ?peer, error = %e, "connection failed before the TLS handshake");
                return None;
            }
            Err(_) => {
                metrics.handshake("server", listener, "timeout");
                tracing::warn!(listener = %listener, peer = ?peer, "no TLS handshake within the header read timeout; closed");
                return None;
            }
        }
    }
    let accepted = tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await;
    let tls_stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = super::classify(&e);
            metrics.handshake("server", listener, reason);
            if reason == "eof" {
                tracing::debug!(listener = %listener, peer = ?peer, "connection closed during the TLS handshake");
            } else {
                tracing::warn!(listener = %listener, peer = ?peer, reason, error = %e, "TLS handshake failed");
            }
            return None;
        }
        Err(_) => {
            metrics.handshake("server", listener, "timeout");
            tracing::warn!(listener = %listener, peer = ?peer, "TLS handshake did not finish within the header read timeout; closed");
            return None;
        }
    };
    metrics.handshake("server", listener, "ok");
    let (_, conn) = tls_stream.get_ref();
    let own = tls.own_identity.load();
    let identity = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| PeerIdentity::of(c, own.as_deref()));
    Some((tls_stream, identity))
}
