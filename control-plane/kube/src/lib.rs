//! `knarr-kube`: Knarr on Kubernetes, the only crate that depends on kube and k8s-openapi.
//!
//! | module | one job |
//! |---|---|
//! | [`source`] | watches of KIngresses (of Knarr's classes), Services, Endpoints, EndpointSlices and the TLS Secrets ingresses name → the same `Batch`es the file source makes |
//! | [`status`] | KIngress status (conditions, `observedGeneration`, load balancers) written back by server-side apply, by the leader |
//! | [`config`] | `config-knarr`: the flags' knobs from a ConfigMap, classes and status names applied live |
//! | [`gateways`] | the gateway pods (ready addresses of the gateway Service's EndpointSlices) the leader probes |
//! | [`leader`] | the `coordination.k8s.io` Lease that picks the replica that writes |
//! | [`serve`] | `knarr serve --source kube`: the above around `knarr-control`'s control plane |
//!
//! Everything between (the ingress index, the translation, the xDS server, ACK and probe
//! readiness) is the code `knarr serve --source file:` runs: this crate only moves objects in
//! and statuses out.

pub mod config;
pub mod gateways;
pub mod leader;
pub mod serve;
pub mod source;
pub mod status;

pub use knarr_translate::reconcile::ClassFilter;
pub use leader::LeaseConfig;
pub use serve::{KubeConfig, KubeControlPlane};
