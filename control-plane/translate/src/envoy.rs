//! Model → Envoy protos.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HeaderValue, HeaderValueOption,
    Http2ProtocolOptions, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType as FilterConfigType;
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener};
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::{
    ClusterSpecifier, HostRewriteSpecifier,
};
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::weighted_cluster::ClusterWeight;
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, Route as EnvoyRoute, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost as EnvoyVirtualHost, WeightedCluster,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::config::route::v3::scoped_route_configuration::key::fragment::Type as KeyFragmentType;
use envoy_types::pb::envoy::config::route::v3::scoped_route_configuration::key::Fragment as KeyFragment;
use envoy_types::pb::envoy::config::route::v3::scoped_route_configuration::Key as ScopeKey;
use envoy_types::pb::envoy::config::route::v3::ScopedRouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::{
    CodecType, RouteSpecifier, StripPortMode, UpgradeConfig,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::scoped_routes::scope_key_builder::fragment_builder::header_value_extractor::ExtractType;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::scoped_routes::scope_key_builder::fragment_builder::{
    HeaderValueExtractor, Type as FragmentBuilderType,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::scoped_routes::scope_key_builder::FragmentBuilder;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::scoped_routes::{
    ConfigSpecifier, ScopeKeyBuilder,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    ScopedRds, ScopedRoutes,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType as HttpFilterConfigType;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::explicit_http_config::ProtocolConfig;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use prost::{Message, Name};

use crate::model::{Backend, Endpoint, Gateway, Route, RouteLayout, Split, VirtualHost};

const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

pub(crate) fn duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Config delivered over the ADS stream itself.
pub(crate) fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

pub(crate) fn socket_address(address: std::net::IpAddr, port: u16) -> Address {
    Address {
        address: Some(AddressKind::SocketAddress(SocketAddress {
            address: address.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(port.into())),
            ..Default::default()
        })),
    }
}

/// An HTTP listener for `gateway` (HTTP/1.1 and h2c on one port), routes over RDS.
pub fn http_listener(gateway: &Gateway) -> Listener {
    let route_specifier = match gateway.layout {
        RouteLayout::Single => RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: gateway.route_config_name(),
        }),
        RouteLayout::ScopedByHost => RouteSpecifier::ScopedRoutes(ScopedRoutes {
            name: gateway.scopes_name(),
            scope_key_builder: Some(ScopeKeyBuilder {
                fragments: vec![FragmentBuilder {
                    r#type: Some(FragmentBuilderType::HeaderValueExtractor(
                        HeaderValueExtractor {
                            name: ":authority".into(),
                            // No separator: the whole (port-stripped) authority is the key.
                            element_separator: String::new(),
                            extract_type: Some(ExtractType::Index(0)),
                        },
                    )),
                }],
            }),
            rds_config_source: Some(ads()),
            config_specifier: Some(ConfigSpecifier::ScopedRds(ScopedRds {
                scoped_rds_config_source: Some(ads()),
                ..Default::default()
            })),
        }),
    };
    let hcm = HttpConnectionManager {
        codec_type: CodecType::Auto as i32,
        stat_prefix: gateway.name.clone(),
        route_specifier: Some(route_specifier),
        // Hosts are matched without their port (`host` and `host:8080` are one site), as
        // Kourier's `[host, host:*]` domains do.
        strip_port_mode: (gateway.layout == RouteLayout::ScopedByHost)
            .then_some(StripPortMode::StripAnyHostPort(true)),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(HttpFilterConfigType::TypedConfig(any(&Router::default()))),
            ..Default::default()
        }],
        upgrade_configs: vec![UpgradeConfig {
            upgrade_type: "websocket".into(),
            ..Default::default()
        }],
        // Knative requests may stream for as long as the revision allows; no stream idle cut.
        stream_idle_timeout: Some(duration(Duration::ZERO)),
        ..Default::default()
    };
    Listener {
        name: gateway.name.clone(),
        address: Some(socket_address(gateway.address, gateway.port)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(FilterConfigType::TypedConfig(any(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub(crate) fn set_header(name: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_owned(),
            value: value.to_owned(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

pub(crate) fn set_headers(headers: &[(String, String)]) -> Vec<HeaderValueOption> {
    headers.iter().map(|(k, v)| set_header(k, v)).collect()
}

fn cluster_weight(split: &Split) -> ClusterWeight {
    ClusterWeight {
        name: split.backend.clone(),
        weight: Some(UInt32Value {
            value: split.weight,
        }),
        request_headers_to_add: set_headers(&split.set_headers),
        ..Default::default()
    }
}

fn route_action(route: &Route) -> RouteAction {
    let live: Vec<&Split> = route.splits.iter().filter(|s| s.weight > 0).collect();
    let cluster_specifier = match live.as_slice() {
        [only] if only.set_headers.is_empty() => ClusterSpecifier::Cluster(only.backend.clone()),
        _ => ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: live.iter().map(|s| cluster_weight(s)).collect(),
            ..Default::default()
        }),
    };
    RouteAction {
        cluster_specifier: Some(cluster_specifier),
        // No route timeout: a Knative request may take as long as its revision allows.
        timeout: Some(duration(Duration::ZERO)),
        host_rewrite_specifier: route
            .host_rewrite
            .as_ref()
            .map(|h| HostRewriteSpecifier::HostRewriteLiteral(h.clone())),
        ..Default::default()
    }
}

pub(crate) fn envoy_route(route: &Route) -> EnvoyRoute {
    EnvoyRoute {
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix(if route.path_prefix.is_empty() {
                "/".into()
            } else {
                route.path_prefix.clone()
            })),
            headers: route
                .headers
                .iter()
                .map(|h| HeaderMatcher {
                    name: h.name.clone(),
                    header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(
                        StringMatcher {
                            match_pattern: Some(MatchPattern::Exact(h.exact.clone())),
                            ignore_case: false,
                        },
                    )),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        action: Some(Action::Route(route_action(route))),
        request_headers_to_add: set_headers(&route.set_headers),
        ..Default::default()
    }
}

/// A route configuration holding `virtual_hosts`, in order.
pub fn route_configuration(name: &str, virtual_hosts: &[VirtualHost]) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_owned(),
        virtual_hosts: virtual_hosts
            .iter()
            .map(|vh| EnvoyVirtualHost {
                name: vh.name.clone(),
                domains: vh.domains.clone(),
                routes: vh.routes.iter().map(envoy_route).collect(),
                ..Default::default()
            })
            .collect(),
        // Envoy would otherwise wait for every referenced cluster; we order pushes instead.
        validate_clusters: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
        ..Default::default()
    }
}

/// The scope key of an exact host name.
pub fn scope_key(host: &str) -> ScopeKey {
    ScopeKey {
        fragments: vec![KeyFragment {
            r#type: Some(KeyFragmentType::StringKey(host.to_owned())),
        }],
    }
}

/// The routing scopes that send each of `vh`'s hosts to its own route configuration.
/// Domains with a port (`host:*`, `host:8080`) need no scope: the listener strips ports.
pub fn host_scopes(gateway: &Gateway, vh: &VirtualHost) -> Vec<ScopedRouteConfiguration> {
    let rc = gateway.host_route_config_name(vh);
    let mut hosts: Vec<&str> = vh
        .domains
        .iter()
        .map(|d| d.split_once(':').map_or(d.as_str(), |(host, _)| host))
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    hosts
        .into_iter()
        .map(|host| ScopedRouteConfiguration {
            name: format!("{}/{}", gateway.name, host),
            route_configuration_name: rc.clone(),
            key: Some(scope_key(host)),
            ..Default::default()
        })
        .collect()
}

/// An EDS cluster for `backend`, its endpoints in the ClusterLoadAssignment of the same name.
pub fn cluster(backend: &Backend) -> Cluster {
    let mut cluster = Cluster {
        name: backend.name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: backend.name.clone(),
        }),
        connect_timeout: Some(duration(CONNECT_TIMEOUT)),
        lb_policy: LbPolicy::RoundRobin as i32,
        ..Default::default()
    };
    if backend.http2 {
        let options = HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                        Http2ProtocolOptions::default(),
                    )),
                },
            )),
            ..Default::default()
        };
        cluster
            .typed_extension_protocol_options
            .insert(HTTP_PROTOCOL_OPTIONS.into(), any(&options));
    }
    cluster
}

/// The endpoints of cluster `name`.
pub fn load_assignment(name: &str, endpoints: &[Endpoint]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: endpoints
                .iter()
                .map(|e| LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(EnvoyEndpoint {
                        address: Some(socket_address(e.address, e.port)),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HeaderMatch;

    fn split(backend: &str, weight: u32) -> Split {
        Split {
            backend: backend.into(),
            weight,
            set_headers: vec![],
        }
    }

    #[test]
    fn single_split_routes_straight_to_the_cluster() {
        let route = Route {
            splits: vec![split("a", 100)],
            ..Default::default()
        };
        let action = route_action(&route);
        assert_eq!(
            action.cluster_specifier,
            Some(ClusterSpecifier::Cluster("a".into()))
        );
        assert_eq!(action.timeout, Some(duration(Duration::ZERO)));
        assert!(action.retry_policy.is_none());
    }

    #[test]
    fn zero_weight_splits_are_dropped_and_headers_are_set_not_appended() {
        let route = Route {
            path_prefix: "/foo".into(),
            headers: vec![HeaderMatch {
                name: "x-a".into(),
                exact: "1".into(),
            }],
            splits: vec![
                split("a", 30),
                split("b", 0),
                Split {
                    backend: "c".into(),
                    weight: 70,
                    set_headers: vec![("knative-serving-revision".into(), "c".into())],
                },
            ],
            set_headers: vec![("x-route".into(), "r".into())],
            host_rewrite: Some("internal.example".into()),
        };
        let r = envoy_route(&route);
        let Some(Action::Route(action)) = &r.action else {
            panic!("not a route action")
        };
        let Some(ClusterSpecifier::WeightedClusters(wc)) = &action.cluster_specifier else {
            panic!("not weighted")
        };
        let names: Vec<_> = wc
            .clusters
            .iter()
            .map(|c| (c.name.as_str(), c.weight.unwrap().value))
            .collect();
        assert_eq!(names, [("a", 30), ("c", 70)]);
        assert_eq!(
            wc.clusters[1].request_headers_to_add[0].append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        assert_eq!(
            r.request_headers_to_add[0].append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        assert_eq!(
            action.host_rewrite_specifier,
            Some(HostRewriteSpecifier::HostRewriteLiteral(
                "internal.example".into()
            ))
        );
        let m = r.r#match.unwrap();
        assert_eq!(m.path_specifier, Some(PathSpecifier::Prefix("/foo".into())));
        assert_eq!(m.headers.len(), 1);
    }

    #[test]
    fn http2_backends_get_h2c_protocol_options() {
        let plain = cluster(&Backend {
            name: "a".into(),
            http2: false,
            endpoints: vec![],
        });
        assert!(plain.typed_extension_protocol_options.is_empty());
        let h2 = cluster(&Backend {
            name: "a".into(),
            http2: true,
            endpoints: vec![],
        });
        let opts = &h2.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS];
        assert_eq!(opts.type_url, HttpProtocolOptions::type_url());
    }

    #[test]
    fn translation_is_deterministic() {
        let gw = Gateway {
            name: "gw".into(),
            address: "127.0.0.1".parse().unwrap(),
            port: 0,
            virtual_hosts: vec![VirtualHost {
                name: "vh".into(),
                domains: vec!["a.example".into()],
                routes: vec![Route {
                    splits: vec![split("a", 1), split("b", 2)],
                    ..Default::default()
                }],
            }],
            layout: RouteLayout::Single,
        };
        assert_eq!(
            http_listener(&gw).encode_to_vec(),
            http_listener(&gw.clone()).encode_to_vec()
        );
        assert_eq!(
            route_configuration("r", &gw.virtual_hosts).encode_to_vec(),
            route_configuration("r", &gw.virtual_hosts).encode_to_vec()
        );
    }
}
