//! Pure translation from Knarr's routing model to Envoy resources.
//!
//! Input: plain values describing gateways, virtual hosts, routes with weighted splits, and
//! backends with their endpoints. Output: Envoy `Listener`, `RouteConfiguration`, `Cluster` and
//! `ClusterLoadAssignment` protos, ready for a [`knarr_snapshot::Snapshot`]. No I/O, no clocks,
//! no gRPC service (only the model and `knarr-snapshot`); the same input always gives
//! byte-identical output, so unchanged resources keep their versions.
//!
//! Conventions Envoy sees:
//! - every backend cluster is an EDS cluster over ADS whose ClusterLoadAssignment has the same
//!   name, so an endpoint change touches one small resource and nothing else;
//! - listeners fetch their routes over RDS (ADS), one route configuration per listener;
//! - routes have no timeout and no retries (Knative semantics), and allow websocket upgrades.

pub mod kingress;
pub mod model;
pub mod reconcile;
pub mod serving;
pub mod validation;

mod envoy;

pub use envoy::{
    cluster, host_scopes, http_listener, load_assignment, route_configuration, scope_key,
};
pub use model::{Backend, Endpoint, Gateway, HeaderMatch, Route, RouteLayout, Split, VirtualHost};

use knarr_snapshot::{Snapshot, SnapshotBuilder};

/// Translates a whole config: gateways (each a listener with its own route configuration) and
/// the backends they route to.
pub fn snapshot(gateways: &[Gateway], backends: &[Backend]) -> Snapshot {
    let mut builder = SnapshotBuilder::default();
    add_to(&mut builder, gateways, backends);
    builder.build()
}

/// Adds (or replaces) one virtual host of a [`RouteLayout::ScopedByHost`] gateway: its route
/// configuration and its scopes. Nothing else in the snapshot changes.
pub fn add_virtual_host(builder: &mut SnapshotBuilder, gateway: &Gateway, vh: &VirtualHost) {
    let rc_name = gateway.host_route_config_name(vh);
    builder.insert(&route_configuration(
        &rc_name,
        std::slice::from_ref(&catch_all(vh)),
    ));
    for scope in host_scopes(gateway, vh) {
        builder.insert(&scope);
    }
}

/// Within a host's own route configuration the scope has already matched the host.
fn catch_all(vh: &VirtualHost) -> VirtualHost {
    VirtualHost {
        name: vh.name.clone(),
        domains: vec!["*".into()],
        routes: vh.routes.clone(),
    }
}

/// Adds the translation of `gateways` and `backends` to `builder`.
pub fn add_to(builder: &mut SnapshotBuilder, gateways: &[Gateway], backends: &[Backend]) {
    for gateway in gateways {
        builder.insert(&http_listener(gateway));
        match gateway.layout {
            RouteLayout::Single => {
                builder.insert(&route_configuration(
                    &gateway.route_config_name(),
                    &gateway.virtual_hosts,
                ));
            }
            RouteLayout::ScopedByHost => {
                for vh in &gateway.virtual_hosts {
                    add_virtual_host(builder, gateway, vh);
                }
            }
        }
    }
    for backend in backends {
        builder.insert(&cluster(backend));
        builder.insert(&load_assignment(&backend.name, &backend.endpoints));
    }
}
