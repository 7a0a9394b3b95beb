//! OS signals into [`Control`] values: SIGTERM → graceful stop, SIGINT → fast stop, SIGHUP →
//! reload of our own config (and passed on to the app when `app.forward_signals` names it);
//! the other signals in `app.forward_signals` are only passed on to the app. SIGUSR2 starts a
//! hot restart (unless `app.forward_signals` gives it to the app).

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::info;

use super::Control;
use crate::config::lifecycle::SignalName;

/// Installs the handlers (before the app starts, so none is missed) and spawns the tasks that
/// turn signals into [`Control`] values on `control`.
pub fn spawn(control: mpsc::Sender<Control>, forward: &[SignalName]) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let forward_hup = forward.iter().any(|s| s.0 == Signal::SIGHUP);
    if !forward.iter().any(|s| s.0 == Signal::SIGUSR2) {
        let mut usr2 = signal(SignalKind::user_defined2()).context("cannot handle SIGUSR2")?;
        let control = control.clone();
        tokio::spawn(async move {
            while usr2.recv().await.is_some() {
                info!(
                    signal = "SIGUSR2",
                    "signal received; starting a new Outrigger to take over"
                );
                if control.send(Control::Upgrade).await.is_err() {
                    return;
                }
            }
        });
    }
    {
        let control = control.clone();
        tokio::spawn(async move {
            loop {
                let (name, c) = tokio::select! {
                    _ = term.recv() => ("SIGTERM", Control::Shutdown { graceful: true }),
                    _ = int.recv() => ("SIGINT", Control::Shutdown { graceful: false }),
                    _ = hup.recv() => ("SIGHUP", Control::Reload),
                };
                info!(signal = name, "signal received");
                if control.send(c).await.is_err() {
                    return;
                }
                if name == "SIGHUP"
                    && forward_hup
                    && control
                        .send(Control::Forward(Signal::SIGHUP))
                        .await
                        .is_err()
                {
                    return;
                }
            }
        });
    }
    // The others are only passed on.
    for s in forward.iter().filter(|s| s.0 != Signal::SIGHUP) {
        let sig = s.0;
        let mut stream = signal(SignalKind::from_raw(sig as i32))
            .with_context(|| format!("cannot handle {sig}"))?;
        let control = control.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                info!(signal = %sig, "signal received; passing it to the app");
                if control.send(Control::Forward(sig)).await.is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}
