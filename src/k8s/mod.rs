//! Putting Outrigger into Kubernetes pods: `outrigger inject` rewrites manifests
//! ([`inject`]: documents and workload kinds; [`sidecar`]: the change to one pod spec;
//! [`annotations`]: what a pod asks for), and `outrigger injector` is the admission webhook
//! doing the same to pods as they are created ([`admission`]: review in, JSONPatch out;
//! [`injector`]: the HTTPS server). Nothing here runs inside the sidecar itself.
//! User docs: `docs/kubernetes.md`.

pub mod admission;
pub mod annotations;
pub mod inject;
pub mod injector;
pub mod sidecar;
