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
//! 3. bytes copied both ways until either side closes (then the other is closed too, and
//!    rumqttc's error starts the component's reconnect, which makes a new relay).
//!
//! The relay costs one more socket pair and a copy per message, nothing per connection beyond
//! one task.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::{TcpStream, UnixListener};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The TCP connection and TLS handshake together, and the wait for rumqttc to dial the relay:
/// a broker that accepts and then says nothing fails the attempt instead of hanging it.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a TLS connection to `host:port` and a relay to it; returns the unix socket address
/// for rumqttc (its `broker_addr` with `Transport::Unix`).
pub(crate) async fn connect(
    host: &str,
    port: u16,
    config: Arc<ClientConfig>,
) -> Result<String, String> {
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
    tokio::spawn(relay(listener, address.clone(), tls));
    Ok(address)
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

/// Takes the one connection from this process, then copies until either side is done.
async fn relay(listener: UnixListener, address: String, mut tls: TlsStream<TcpStream>) {
    let me = std::process::id() as i32;
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            let (s, _) = listener.accept().await.ok()?;
            if s.peer_cred().ok().and_then(|c| c.pid()) == Some(me) {
                return Some(s);
            }
            tracing::warn!("mqtt TLS relay: a connection from another process refused");
        }
    })
    .await
    .ok()
    .flatten();
    drop(listener);
    if !address.starts_with('\0') {
        let _ = std::fs::remove_file(&address);
    }
    let Some(mut local) = accepted else {
        return;
    };
    // Either side's end (or error) ends both: rumqttc sees its socket close and reconnects.
    let _ = tokio::io::copy_bidirectional(&mut local, &mut tls).await;
}
