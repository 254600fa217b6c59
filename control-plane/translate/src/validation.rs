//! A whole snapshot as one static Envoy bootstrap, for `envoy --mode validate`.
//!
//! Envoy validates dynamic resources only when they arrive; to check a translation offline, the
//! snapshot's listeners get their routing scopes and route tables inlined, and its clusters and
//! secrets become static resources. Envoy reads the result as a binary bootstrap (`.pb`).

use envoy_types::pb::envoy::config::bootstrap::v3::bootstrap::{DynamicResources, StaticResources};
use envoy_types::pb::envoy::config::bootstrap::v3::{Admin, Bootstrap};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::api_config_source::ApiType;
use envoy_types::pb::envoy::config::core::v3::grpc_service::{EnvoyGrpc, TargetSpecifier};
use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType as TransportConfigType;
use envoy_types::pb::envoy::config::core::v3::{ApiConfigSource, ApiVersion, GrpcService, Node};
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType as FilterConfigType;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, ScopedRouteConfiguration};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::scoped_routes::ConfigSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, ScopedRouteConfigurationsList,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{DownstreamTlsContext, Secret};
use knarr_snapshot::{ResourceType, Snapshot};
use prost::Message;

use crate::envoy::any;

fn decode_all<M: Message + Default>(snap: &Snapshot, ty: ResourceType) -> Vec<M> {
    snap.resources(ty)
        .values()
        .map(|r| M::decode(r.value.as_slice()).expect("the snapshot holds what it encoded"))
        .collect()
}

/// The snapshot as a static bootstrap.
pub fn static_bootstrap(snap: &Snapshot) -> Bootstrap {
    let routes: Vec<RouteConfiguration> = decode_all(snap, ResourceType::Route);
    let scopes: Vec<ScopedRouteConfiguration> = decode_all(snap, ResourceType::ScopedRoute)
        .into_iter()
        .map(|mut s: ScopedRouteConfiguration| {
            s.route_configuration = routes
                .iter()
                .find(|r| r.name == s.route_configuration_name)
                .cloned();
            s.route_configuration_name.clear();
            s
        })
        .collect();
    let listeners: Vec<Listener> = decode_all(snap, ResourceType::Listener)
        .into_iter()
        .map(|mut l: Listener| {
            for chain in &mut l.filter_chains {
                for filter in &mut chain.filters {
                    let Some(FilterConfigType::TypedConfig(typed)) = &mut filter.config_type else {
                        continue;
                    };
                    let Ok(mut hcm) = HttpConnectionManager::decode(typed.value.as_slice()) else {
                        continue;
                    };
                    if let Some(RouteSpecifier::ScopedRoutes(scoped)) = &mut hcm.route_specifier {
                        scoped.config_specifier =
                            Some(ConfigSpecifier::ScopedRouteConfigurationsList(
                                ScopedRouteConfigurationsList {
                                    scoped_route_configurations: scopes.clone(),
                                },
                            ));
                    }
                    *typed = any(&hcm);
                }
                if let Some(socket) = &mut chain.transport_socket {
                    if let Some(TransportConfigType::TypedConfig(typed)) = &mut socket.config_type {
                        if let Ok(mut tls) = DownstreamTlsContext::decode(typed.value.as_slice()) {
                            // Point at the static secrets below instead of SDS.
                            if let Some(common) = &mut tls.common_tls_context {
                                for sds in &mut common.tls_certificate_sds_secret_configs {
                                    sds.sds_config = None;
                                }
                            }
                            *typed = any(&tls);
                        }
                    }
                }
            }
            l
        })
        .collect();
    let mut clusters: Vec<Cluster> = decode_all(snap, ResourceType::Cluster);
    clusters.push(Cluster {
        name: "knarr-xds".into(),
        ..Default::default()
    });
    let secrets: Vec<Secret> = decode_all(snap, ResourceType::Secret);
    Bootstrap {
        node: Some(Node {
            id: "knarr-validate".into(),
            cluster: "knarr-validate".into(),
            ..Default::default()
        }),
        admin: Some(Admin::default()),
        static_resources: Some(StaticResources {
            listeners,
            clusters,
            secrets,
        }),
        // EDS clusters name ADS as their source.
        dynamic_resources: Some(DynamicResources {
            ads_config: Some(ApiConfigSource {
                api_type: ApiType::Grpc as i32,
                transport_api_version: ApiVersion::V3 as i32,
                grpc_services: vec![GrpcService {
                    target_specifier: Some(TargetSpecifier::EnvoyGrpc(EnvoyGrpc {
                        cluster_name: "knarr-xds".into(),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
