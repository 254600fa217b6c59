//! Knarr's control-plane shells: everything that moves data between the pure cores
//! (`knarr-translate`'s ingress index, `knarr-serving`'s serving core) and the world.
//!
//! | module | one job |
//! |---|---|
//! | [`source`] | the source seam: [`source::Batch`]es of object changes, errors located by file or by object |
//! | [`file_source`] | watched YAML folders and files → batches of object changes, errors by file and line |
//! | [`store`] | the file world's store of applied Knative objects: generations, update checks |
//! | [`ingress_controller`] | object changes → the incremental ingress index → the xDS snapshot; ACK and probe readiness |
//! | [`serving_controller`] | the event loop around the serving core: source, runtime, gateways, plans carried out |
//! | [`prober`] | Knative's hash probes of every gateway |
//! | [`status`] | KIngress status from ACKs and probes |
//! | [`table`] | kubectl's columns, computed beside the objects (`?as=table`) |
//! | [`api`] | the loopback status API `knarr get/apply/delete/describe/logs` talks to |
//! | [`admin`] | `/healthz`, `/readyz`, `/metrics`, `/clients` |
//! | [`activator_stats`] | the activators' `ReportStats` gRPC service, served on the xDS port |
//! | [`app`] | `knarr serve` (and `knarr up`'s control plane): builds all of the above and binds its sockets |
//! | [`bootstrap`] | the Envoy bootstrap that points a gateway at the xDS server |
//!
//! Where the Kubernetes modes plug in: a kube source (KIngresses, Services, EndpointSlices and
//! Secrets from the API server) feeds the ingress controller the same [`source::Batch`]es,
//! and, for Knative's own objects, the serving shell the same upserts and deletes the store does;
//! a status sink writes [`knarr_serving::Plan::statuses`] back; a Deployment runtime implements
//! `knarr_runtime::Runtime`. Those live in their own crate (the only one depending on kube), so
//! nothing here changes for them.

pub mod activator_stats;
pub mod admin;
pub mod api;
pub mod app;
pub mod bootstrap;
pub mod file_source;
pub mod ingress_controller;
pub mod prober;
pub mod routes_file;
pub mod serving_controller;
pub mod source;
pub mod status;
pub mod store;
pub mod table;

pub use app::{ControlPlane, ServeConfig};
