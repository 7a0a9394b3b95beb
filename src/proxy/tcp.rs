//! `tcp` listeners: each accepted connection is paired with a connection to an endpoint of the
//! listener's cluster and bytes are copied both ways, opaquely (databases, unknown protocols).
//! No protocol detection, so no first-byte stall. A failed connect tries the next endpoint.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::cluster::Cluster;
use super::listener::{self, Peer};

/// Connect attempts per accepted connection (each to a freshly picked endpoint).
const CONNECT_ATTEMPTS: usize = 3;

/// Serves one downstream connection until either side closes.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut downstream: S,
    peer: Peer,
    cluster: Arc<Cluster>,
    listener: &str,
) {
    let mut last_error = String::from("the cluster has no endpoints");
    for _ in 0..CONNECT_ATTEMPTS {
        let Some(attempt) = cluster.pick() else { break };
        let connect = tokio::time::timeout(
            cluster.config.connect_timeout.get(),
            listener::connect(&attempt.endpoint.address),
        )
        .await;
        match connect {
            Ok(Ok(mut upstream)) => {
                cluster.succeeded(&attempt);
                match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
                    Ok((up, down)) => {
                        tracing::debug!(listener, peer = ?peer, endpoint = %attempt.endpoint.address, bytes_up = up, bytes_down = down, "tcp connection closed")
                    }
                    Err(e) => {
                        tracing::debug!(listener, peer = ?peer, error = %e, "tcp connection ended with an error")
                    }
                }
                return;
            }
            Ok(Err(e)) => {
                cluster.failed(&attempt);
                last_error = format!("cannot connect to {}: {e}", attempt.endpoint.address);
            }
            Err(_) => {
                cluster.failed(&attempt);
                last_error = format!("connecting to {} timed out", attempt.endpoint.address);
            }
        }
    }
    tracing::warn!(listener, cluster = %cluster.name, peer = ?peer, error = %last_error, "tcp connection refused: no upstream");
}
