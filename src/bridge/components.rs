//! A loaded Dapr `Component` resource: its name, type (`pubsub.redis`, …), version and flat
//! metadata. Stand-in for the bridge's component loader, which reads these from the resources
//! directory (the integrator keeps one definition).

use std::collections::BTreeMap;
use std::path::PathBuf;

/// One Dapr `Component` document, metadata resolved to plain strings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Component {
    /// `metadata.name`: what the API calls it (`/v1.0/publish/{name}/…`).
    pub name: String,
    /// `spec.type`, e.g. `pubsub.redis`.
    pub kind: String,
    /// `spec.version`, e.g. `v1`.
    pub version: String,
    /// `spec.metadata` as name → value.
    pub metadata: BTreeMap<String, String>,
    /// The file it came from, for error messages.
    pub file: PathBuf,
}
