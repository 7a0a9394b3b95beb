//! Outrigger's own diagnostics: tracing to stderr, human or JSON, with a filter that the admin
//! API can change at run time (`PUT /log-level`).
//!
//! stderr, not stdout: in supervision mode the app's stdout passes through ours, and access
//! logs (later) go where they are configured.

use std::sync::{Arc, Mutex};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

pub use crate::config::parse_log_filter as parse_filter;

/// Changes the active log filter; cheap to clone.
#[derive(Clone)]
pub struct LogLevel {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
    current: Arc<Mutex<String>>,
}

impl LogLevel {
    /// The active filter, as it was given.
    pub fn get(&self) -> String {
        self.current.lock().expect("not poisoned").clone()
    }

    /// Replaces the filter; the old one stays when `spec` is invalid.
    pub fn set(&self, spec: &str) -> Result<(), String> {
        let filter = parse_filter(spec)?;
        if let Some(h) = &self.handle {
            h.reload(filter).map_err(|e| e.to_string())?;
        }
        *self.current.lock().expect("not poisoned") = spec.trim().to_string();
        Ok(())
    }

    /// A handle that only records the level (tests, or when a subscriber was already set).
    pub fn detached(spec: &str) -> Self {
        LogLevel {
            handle: None,
            current: Arc::new(Mutex::new(spec.to_string())),
        }
    }
}

/// Installs the global subscriber. The config was validated, so `level` parses; if another
/// subscriber is already installed (tests), the returned handle only records changes.
pub fn init(level: &str, format: LogFormat) -> LogLevel {
    let filter = parse_filter(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Human => tracing_subscriber::registry()
            .with(filter)
            .with(fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
    };
    LogLevel {
        handle: installed.is_ok().then_some(handle),
        current: Arc::new(Mutex::new(level.trim().to_string())),
    }
}
