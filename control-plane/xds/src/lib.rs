//! Knarr's xDS server: the ADS transport.
//!
//! Data comes in as [`Snapshot`]s (from `knarr-snapshot`, re-exported here) that the control
//! plane publishes to the [`SnapshotCache`] (one per node group); it goes out to Envoys over ADS,
//! state-of-the-world or delta, as decided per stream by the sans-I/O machines in [`protocol`];
//! the tonic service in [`server`] only moves messages, tracks [`Clients`] and counts
//! [`XdsMetrics`]. This crate knows Envoy's protos and gRPC, and nothing about Kubernetes or
//! Knative objects, nor about Knarr's activator: further gRPC services on the same port, and the
//! node clusters that are not gateways, are the caller's ([`XdsServerConfig`]).

pub mod metrics;
pub mod protocol;
pub mod server;

pub use knarr_snapshot::{
    NodeGrouping, Resource, ResourceType, Snapshot, SnapshotBuilder, SnapshotCache, XdsResource,
    DEFAULT_GROUP,
};
pub use metrics::XdsMetrics;
pub use protocol::{DeltaStream, SotwStream, StreamEvent};
pub use server::{ClientStatus, Clients, Mode, XdsServerConfig, XdsService};
