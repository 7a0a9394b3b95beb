//! Hold: on an inbound listener, while the app is starting or restarting (its probe has not
//! passed yet), a request waits for it up to `app.hold_timeout`, then gets 503 with
//! `retry-after: 1` and `x-outrigger-error: app-not-ready`. A stop that begins meanwhile ends
//! the wait at once.
//!
//! In: the listener's [`AppGate`](crate::runtime::AppGate) and the connection's drain signal.
//! Out: nothing when the app is ready (no future, no await on the common path), or the wait.
//! Held requests were admitted first, so they count against the listener's limits.

use std::future::Future;
use std::time::Instant;

use http::Response;

use super::body::ProxyBody;
use super::failure::Failure;
use super::http::{Downstream, HttpListener};

impl HttpListener {
    /// Phase: wait for the app, if this listener holds for it and it is not ready. `None`
    /// when there is nothing to wait for.
    pub(super) fn hold(
        &self,
        down: &Downstream,
        started: Instant,
    ) -> Option<impl Future<Output = Result<(), Response<ProxyBody>>>> {
        let (gate, limit) = self.hold.as_ref()?;
        if gate.is_open() {
            return None;
        }
        let mut drain = down.drain.clone();
        Some(async move {
            let open = tokio::select! {
                open = gate.wait(*limit) => open,
                _ = drain.signaled() => false,
            };
            if open {
                return Ok(());
            }
            tracing::debug!(listener = %self.name, "the app is not ready; request refused");
            Err(self.refuse(
                Failure::AppNotReady,
                "the app is not ready yet; retry shortly",
                started,
            ))
        })
    }
}
