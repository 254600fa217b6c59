//! Pure translation from Knarr's routing model to Envoy resources.
//!
//! Input: plain values describing gateways, virtual hosts, routes with weighted splits, and
//! backends with their endpoints. Output: Envoy `Listener`, `RouteConfiguration`, `Cluster` and
//! `ClusterLoadAssignment` protos, ready for a [`knarr_xds::Snapshot`]. No I/O, no clocks; the
//! same input always gives byte-identical output, so unchanged resources keep their versions.
//!
//! Conventions Envoy sees:
//! - every backend cluster is an EDS cluster over ADS whose ClusterLoadAssignment has the same
//!   name, so an endpoint change touches one small resource and nothing else;
//! - listeners fetch their routes over RDS (ADS), one route configuration per listener;
//! - routes have no timeout and no retries (Knative semantics), and allow websocket upgrades.

pub mod model;

mod envoy;

pub use envoy::{cluster, http_listener, load_assignment, route_configuration};
pub use model::{Backend, Endpoint, Gateway, HeaderMatch, Route, Split, VirtualHost};

use knarr_xds::{Snapshot, SnapshotBuilder};

/// Translates a whole config: gateways (each a listener with its own route configuration) and
/// the backends they route to.
pub fn snapshot(gateways: &[Gateway], backends: &[Backend]) -> Snapshot {
    let mut builder = SnapshotBuilder::default();
    add_to(&mut builder, gateways, backends);
    builder.build()
}

/// Adds the translation of `gateways` and `backends` to `builder`.
pub fn add_to(builder: &mut SnapshotBuilder, gateways: &[Gateway], backends: &[Backend]) {
    for gateway in gateways {
        builder.insert(&http_listener(gateway));
        builder.insert(&route_configuration(&gateway.route_config_name(), &gateway.virtual_hosts));
    }
    for backend in backends {
        builder.insert(&cluster(backend));
        builder.insert(&load_assignment(&backend.name, &backend.endpoints));
    }
}
