//! Knarr's xDS resources and snapshots, the vocabulary between the translation and the xDS
//! server.
//!
//! [`resource`]: the resource types Knarr serves (Envoy's, plus its own `ActivatorRevision` for
//! activators), in make-before-break push order, and [`Resource`]s whose versions are content
//! hashes over a canonical encoding. [`snapshot`]: immutable [`Snapshot`]s on persistent maps,
//! built with a [`SnapshotBuilder`] and published through the [`SnapshotCache`] (one per node
//! group, swapped atomically).
//!
//! Pure data: no gRPC service, no sockets, no Kubernetes. `knarr-translate` builds snapshots with
//! only this crate and the model; `knarr-xds` serves them. (`envoy-types` still brings `tonic`
//! into the dependency tree, for the servers it generates; nothing here uses them.)

pub mod resource;
pub mod snapshot;

pub use resource::{Resource, ResourceType, XdsResource};
pub use snapshot::{NodeGrouping, Snapshot, SnapshotBuilder, SnapshotCache, DEFAULT_GROUP};
