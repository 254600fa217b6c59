//! Knarr's xDS server.
//!
//! Data comes in as [`Snapshot`]s that the control plane publishes to the [`SnapshotCache`] (one
//! per node group); it goes out to Envoys over ADS, state-of-the-world or delta, as decided per
//! stream by the sans-I/O machines in [`protocol`]. This crate knows Envoy's protos and gRPC, and
//! nothing about Kubernetes or Knative objects.

pub mod activator;
pub mod metrics;
pub mod protocol;
pub mod resource;
pub mod server;
pub mod snapshot;

pub use metrics::XdsMetrics;
pub use protocol::{DeltaStream, SotwStream, StreamEvent};
pub use resource::{Resource, ResourceType, XdsResource};
pub use server::{ClientStatus, Clients, Mode, XdsServerConfig, XdsService};
pub use snapshot::{NodeGrouping, Snapshot, SnapshotBuilder, SnapshotCache, DEFAULT_GROUP};
