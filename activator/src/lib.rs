//! knarr-activator: holds requests for revisions that have no ready pods, pokes the autoscaler,
//! waits for pods, then forwards with capacity-aware load balancing (Knative's activator).
//!
//! Data in: the control plane's `Revision` resources (container concurrency, timeouts, ready pod
//! addresses), which its client applies to the [`Revisions`] table. Requests arrive from Envoy
//! on one port (HTTP/1.1 and h2c) naming their revision in `Knative-Serving-Namespace` /
//! `Knative-Serving-Revision`; each revision's throttler ([`throttler`]) probes new pods, holds
//! requests until one has room, and [`proxy`] forwards them to the pod's queue-proxy.
//!
//! Data out: per-revision [`RevisionStats`](knarr_proto::activator::RevisionStats) every second,
//! and an immediate poke when a request finds no ready pod, on the channel from
//! [`stats_channel`]; the control-plane client streams them to the autoscaler. People read
//! Prometheus metrics on the admin port. [`app::Running`] wires it all; [`drain`] handles
//! SIGTERM.

pub mod app;
pub mod config;
pub mod drain;
mod metrics;
pub mod probe;
pub mod proxy;
pub mod revisions;
pub mod stats;
pub mod throttler;
pub mod xds_client;

pub use app::Running;
pub use config::Config;
pub use revisions::{validate, RevisionError, Revisions};
pub use stats::stats_channel;
pub use throttler::RevisionState;
