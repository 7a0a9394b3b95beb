//! TLS to an MQTT broker (`ssl://`, `mqtts://`, `tcps://`, `tls://` URLs) for rumqttc, which
//! is built without its TLS features.
//!
//! Why not rumqttc's own TLS: every TLS feature of rumqttc 0.25 (even `use-rustls-no-provider`,
//! given our own `ClientConfig` through `Transport::tls_with_config`) pulls rustls-webpki 0.102
//! with its default `ring` feature, a second crypto provider beside aws-lc-rs (DESIGN: never
//! ring); and rumqttc takes no connection made elsewhere (its `Network` type is private). So the
//! connection is ours, and rumqttc reads and writes it through a relay:
//!
//! 1. a TCP connection to the broker and a tokio-rustls handshake with the component's config
//!    ([`super::broker_tls`]): a failure is the connection's error, with rustls' reason (an
//!    unknown CA, a certificate for another name), in the log and the component's health;
//! 2. a unix socket for one connection, which rumqttc dials (`Transport::Unix`): an abstract
//!    name on Linux (nothing on disk, so a read-only root is fine), taken only from this
//!    process (its peer credentials' pid), given up after [`HANDSHAKE_TIMEOUT`] if no one came;
//! 3. bytes copied both ways until either direction ends (a close, or an error: logged with the
//!    broker's address, e.g. the broker's `CertificateRequired` alert when it wants a client
//!    certificate, which TLS 1.3 sends after the handshake), or the component drops the
//!    connection's [`Relay`]: then both sides are closed. Not `copy_bidirectional`, which waits
//!    for both directions: a broker that stops answering (rumqttc's keep-alive gives up and
//!    closes its side) would keep the task and its TLS connection for good, one per reconnect.
//!
//! The relay costs one more socket pair and a copy per message, nothing per connection beyond
//! one task.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::{TcpStream, UnixListener};
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The TCP connection and TLS handshake together, and the wait for rumqttc to dial the relay:
/// a broker that accepts and then says nothing fails the attempt instead of hanging it.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A relay to one TLS connection: rumqttc dials `address`; dropping the relay closes the TLS
/// connection (the component holds it while it uses that connection).
pub(crate) struct Relay {
    pub address: String,
    _stop: oneshot::Sender<()>,
}

/// Opens a TLS connection to `host:port` and a relay to it, whose unix socket address is
/// rumqttc's `broker_addr` with `Transport::Unix`.
pub(crate) async fn connect(
    host: &str,
    port: u16,
    config: Arc<ClientConfig>,
) -> Result<Relay, String> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} is not a host name for TLS: {e}"))?;
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake failed: {}", crate::errors::chain(&e)))
    })
    .await
    .map_err(|_| format!("no TLS connection within {}s", HANDSHAKE_TIMEOUT.as_secs()))??;
    let (address, listener) =
        bind().map_err(|e| format!("cannot make the relay socket for TLS: {e}"))?;
    let (stop, stopped) = oneshot::channel();
    let broker = format!("{host}:{port}");
    let socket = address.clone();
    tokio::spawn(async move {
        // Whichever comes first: the relay's end, or the component giving up the connection.
        tokio::select! {
            () = relay(listener, socket, tls, &broker) => {}
            _ = stopped => {}
        }
    });
    Ok(Relay {
        address,
        _stop: stop,
    })
}

/// A unix listener at a fresh address of this process.
fn bind() -> std::io::Result<(String, UnixListener)> {
    let name = format!(
        "outrigger-mqtt-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    );
    // Abstract (a leading NUL): tokio binds and connects these on Linux.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let address = format!("\0{name}");
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let address = std::env::temp_dir().join(name).display().to_string();
    let listener = UnixListener::bind(&address)?;
    Ok((address, listener))
}

/// Takes the one connection from this process, then copies until either direction is done.
async fn relay(listener: UnixListener, address: String, tls: TlsStream<TcpStream>, broker: &str) {
    let me = std::process::id() as i32;
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            let (s, _) = listener.accept().await.ok()?;
            if s.peer_cred().ok().and_then(|c| c.pid()) == Some(me) {
                return Some(s);
            }
            // Anyone on the host can dial an abstract name; not worth a warning each.
            tracing::debug!("mqtt TLS relay: a connection from another process refused");
        }
    })
    .await
    .ok()
    .flatten();
    drop(listener);
    if !address.starts_with('\0') {
        let _ = std::fs::remove_file(&address);
    }
    let Some(local) = accepted else {
        return;
    };
    let (mut from_rumqttc, mut to_rumqttc) = tokio::io::split(local);
    let (mut from_broker, mut to_broker) = tokio::io::split(tls);
    // Either direction's end ends both (both streams drop here): rumqttc sees its socket close
    // and reconnects; the broker sees the TCP connection close.
    let (direction, result) = tokio::select! {
        r = async {
            let r = tokio::io::copy(&mut from_rumqttc, &mut to_broker).await;
            // rumqttc is done (its DISCONNECT is sent): close TLS properly, best effort.
            if r.is_ok() {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut to_broker).await;
            }
            r
        } => ("from rumqttc", r),
        r = tokio::io::copy(&mut from_broker, &mut to_rumqttc) => ("from the broker", r),
    };
    if let Err(e) = result {
        tracing::warn!(broker, error = %crate::errors::chain(&e), "mqtt TLS relay: the connection failed reading {direction}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, UnixStream};

    /// A TLS broker that takes connections and never says anything (a hung broker), and a
    /// client config that trusts it.
    async fn silent_broker() -> (
        u16,
        Arc<ClientConfig>,
        TcpListener,
        tokio_rustls::TlsAcceptor,
    ) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = c.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        (port, Arc::new(client), listener, acceptor)
    }

    /// Waits (bounded, as a failsafe only) for the broker's side to see the connection end.
    async fn closed(mut broker: tokio_rustls::server::TlsStream<TcpStream>) {
        let mut buf = [0u8; 64];
        let end = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match broker.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(end.is_ok(), "the relay kept the TLS connection open");
    }

    #[tokio::test]
    async fn rumqttc_closing_ends_the_relay_even_if_the_broker_never_answers() {
        let (port, config, listener, acceptor) = silent_broker().await;
        let (relay, accepted) = tokio::join!(connect("localhost", port, config), async {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.unwrap()
        });
        let mut relay = relay.unwrap();
        let local = UnixStream::connect(&relay.address).await.unwrap();
        // rumqttc gives up (its keep-alive), closing its socket; the broker stays silent and
        // keeps its side open, yet the relay's task ends (its end of the channel is dropped).
        drop(local);
        let ended = tokio::time::timeout(Duration::from_secs(30), relay._stop.closed()).await;
        assert!(ended.is_ok(), "the relay waited for the silent broker");
        closed(accepted).await;
    }

    #[tokio::test]
    async fn dropping_the_relay_closes_its_tls_connection() {
        let (port, config, listener, acceptor) = silent_broker().await;
        let (relay, accepted) = tokio::join!(connect("localhost", port, config), async {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.unwrap()
        });
        let relay = relay.unwrap();
        let _local = UnixStream::connect(&relay.address).await.unwrap();
        drop(relay);
        closed(accepted).await;
    }
}
