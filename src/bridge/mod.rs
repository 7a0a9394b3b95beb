//! The Dapr-compatible bridge: the HTTP API apps call for pub/sub (and, from the other half of
//! issue 7, state, invocation and secrets). Components come from Dapr Component YAML
//! ([`components`]); each building block lives in its own module and exposes an axum router.

pub mod components;
pub mod pubsub;
