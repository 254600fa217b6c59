//! Knative `Ingress` (KIngress) → Envoy, with Kourier's behaviour.
//!
//! Layout, chosen so that one ingress change costs resources proportional to that ingress:
//! - Fixed listeners: external HTTP (8080), cluster-local HTTP (8081) and, when any ingress has
//!   TLS, external and cluster-local HTTPS (8443, 8444) with one SNI filter chain per `spec.tls`
//!   entry (certificates over SDS). Each listener stamps requests with its *gateway tag* (`x-knarr-gateway`, set before
//!   routing, never seen by backends) and routes through scoped routes keyed on
//!   `(tag, host without port)`.
//! - Per ingress: one route table with a virtual host per rule (plus a redirecting twin when
//!   `httpOption: Redirected`), and one routing scope per (tag, host) a rule is visible on. External rules
//!   are visible on the external and the cluster-local gateways; cluster-local rules only on the
//!   cluster-local one, so asking the external gateway for them finds no scope: 404.
//! - Backends: one EDS cluster per (namespace, service, port) as the splits name it, shared by
//!   every ingress that uses it; built by [`backend_cluster`] and [`backend_endpoints`] from the
//!   Service and its Endpoints/EndpointSlices.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, LbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::common::mutation_rules::v3::header_mutation::Action as MutationAction;
use envoy_types::pb::envoy::config::common::mutation_rules::v3::HeaderMutation as Mutation;
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier as DataSpecifier;
use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType as TransportConfigType;
use envoy_types::pb::envoy::config::core::v3::{DataSource, TransportSocket, TypedExtensionConfig};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType as FilterConfigType;
use envoy_types::pb::envoy::config::listener::v3::listener_filter::ConfigType as ListenerFilterConfigType;
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
};
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::config::route::v3::scoped_route_configuration::key::fragment::Type as KeyFragmentType;
use envoy_types::pb::envoy::config::route::v3::scoped_route_configuration::key::Fragment as KeyFragment;
use envoy_types::pb::envoy::config::route::v3::scoped_route_configuration::Key as ScopeKey;
use envoy_types::pb::envoy::config::route::v3::virtual_host::TlsRequirementType;
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, RouteConfiguration, ScopedRouteConfiguration, VirtualHost as EnvoyVirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::{
    CodecType, RouteSpecifier, StripPortMode, UpgradeConfig,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType as HttpFilterConfigType;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::scoped_routes::scope_key_builder::fragment_builder::header_value_extractor::ExtractType;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::scoped_routes::scope_key_builder::fragment_builder::{
    HeaderValueExtractor, Type as FragmentBuilderType,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::scoped_routes::scope_key_builder::FragmentBuilder;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::scoped_routes::{
    ConfigSpecifier, ScopeKeyBuilder,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, ScopedRds, ScopedRoutes,
};
use envoy_types::pb::envoy::extensions::http::early_header_mutation::header_mutation::v3::HeaderMutation as EarlyHeaderMutation;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type as SecretType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret as EnvoySecret, TlsCertificate,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher;
use knarr_model::{
    EndpointSlice, Endpoints, HttpOption, Ingress, IntOrString, Service, TlsKeyPair, Visibility,
};

use crate::envoy::{ads, any, duration, envoy_route, set_header};
use crate::model::{Endpoint, Route, Split};

/// Stamped on every request by the listener that accepted it; selects the routing scope.
pub const GATEWAY_TAG_HEADER: &str = "x-knarr-gateway";
/// Knative's probe headers.
pub const NETWORK_HASH_HEADER: &str = "K-Network-Hash";
pub const NETWORK_PROBE_HEADER: &str = "K-Network-Probe";
/// The value a prober sends in `K-Network-Hash` so the gateway fills in its current hash.
pub const HASH_OVERRIDE: &str = "override";

/// Which gateway (listener) a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GatewayTag {
    External,
    Internal,
    ExternalTls,
    InternalTls,
}

impl GatewayTag {
    pub fn as_str(self) -> &'static str {
        match self {
            GatewayTag::External => "ext",
            GatewayTag::Internal => "int",
            GatewayTag::ExternalTls => "ext-tls",
            GatewayTag::InternalTls => "int-tls",
        }
    }

    pub fn listener_name(self) -> &'static str {
        match self {
            GatewayTag::External => "knarr-external-http",
            GatewayTag::Internal => "knarr-internal-http",
            GatewayTag::ExternalTls => "knarr-external-https",
            GatewayTag::InternalTls => "knarr-internal-https",
        }
    }
}

impl fmt::Display for GatewayTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the gateway listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    pub address: IpAddr,
    pub external_http_port: u16,
    pub internal_http_port: u16,
    pub external_https_port: u16,
    pub internal_https_port: u16,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            address: IpAddr::from([0, 0, 0, 0]),
            external_http_port: 8080,
            internal_http_port: 8081,
            external_https_port: 8443,
            internal_https_port: 8444,
        }
    }
}

/// A backend as a split names it: the cluster `namespace/service:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub namespace: String,
    pub service: String,
    pub port: IntOrString,
}

impl BackendKey {
    pub fn cluster_name(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.service, self.port)
    }
}

/// One SNI filter chain of the HTTPS listener.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TlsBinding {
    pub hosts: Vec<String>,
    /// The SDS secret (`namespace/name`).
    pub secret: String,
}

/// Everything one ingress contributes, apart from the shared listeners and backends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngressTranslation {
    pub route_configs: Vec<RouteConfiguration>,
    pub scopes: Vec<ScopedRouteConfiguration>,
    /// The (gateway, host) pairs this ingress serves; two ingresses claiming one conflict.
    pub claims: Vec<(GatewayTag, String)>,
    pub backends: BTreeSet<BackendKey>,
    pub tls: Vec<TlsBinding>,
    /// The probe hash Envoy puts in `K-Network-Hash` for this version of the ingress.
    pub hash: String,
}

/// The probe hash of an ingress: hex sha256 over its spec (JSON), namespace and name.
pub fn ingress_hash(ingress: &Ingress) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(serde_json::to_vec(&ingress.spec).unwrap_or_default());
    h.update(ingress.metadata.namespace.as_bytes());
    h.update(ingress.metadata.name.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Strips a `:port` from a host.
fn bare_host(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit() || c == '*') => h,
        _ => host,
    }
}

fn exact_header(name: &str, value: &str) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_owned(),
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(MatchPattern::Exact(value.to_owned())),
            ignore_case: false,
        })),
        ..Default::default()
    }
}

fn scope_key(tag: GatewayTag, host: &str) -> ScopeKey {
    ScopeKey {
        fragments: vec![
            KeyFragment {
                r#type: Some(KeyFragmentType::StringKey(tag.as_str().to_owned())),
            },
            KeyFragment {
                r#type: Some(KeyFragmentType::StringKey(host.to_owned())),
            },
        ],
    }
}

/// The scope resource name for (tag, host): unique, since a (tag, host) has one owner.
pub fn scope_name(tag: GatewayTag, host: &str) -> String {
    format!("{tag}/{host}")
}

/// Translates one ingress (already validated). Pure: needs no other object.
pub fn translate_ingress(ingress: &Ingress) -> IngressTranslation {
    let ns = &ingress.metadata.namespace;
    let name = &ingress.metadata.name;
    let hash = ingress_hash(ingress);
    let redirected = ingress.spec.http_option == Some(HttpOption::Redirected);
    let tls_hosts: BTreeSet<&str> = ingress
        .spec
        .tls
        .iter()
        .flat_map(|t| t.hosts.iter().map(|h| bare_host(h)))
        .collect();
    let mut out = IngressTranslation {
        hash: hash.clone(),
        ..Default::default()
    };
    let mut claimed = BTreeSet::new();

    // One route table for the whole ingress (a virtual host per rule, matched by host), and a
    // redirecting twin for its external rules when `httpOption: Redirected`.
    let rc_name = format!("{ns}/{name}");
    let redirect_name = format!("{rc_name}/redirect");
    let mut vhosts = Vec::new();
    let mut redirect_vhosts = Vec::new();
    for (r, rule) in ingress.spec.rules.iter().enumerate() {
        let Some(http) = &rule.http else { continue };
        let external = rule.visibility == Visibility::ExternalIP;
        // A host named by two rules belongs to the first.
        let hosts: Vec<&str> = rule
            .hosts
            .iter()
            .map(|h| bare_host(h))
            .filter(|h| !claimed.iter().any(|(_, c): &(GatewayTag, String)| c == h))
            .collect();
        if hosts.is_empty() {
            continue;
        }
        let routes = rule_routes(http, &hash, &mut out.backends);
        let domains: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        if external && redirected {
            redirect_vhosts.push(virtual_host(
                &format!("rule-{r}"),
                domains.clone(),
                routes.clone(),
                true,
            ));
        }
        vhosts.push(virtual_host(&format!("rule-{r}"), domains, routes, false));
        for host in hosts {
            let mut bind = |tag: GatewayTag, rc: &str| {
                if claimed.insert((tag, host.to_owned())) {
                    out.claims.push((tag, host.to_owned()));
                    out.scopes.push(ScopedRouteConfiguration {
                        name: scope_name(tag, host),
                        route_configuration_name: rc.to_owned(),
                        key: Some(scope_key(tag, host)),
                        ..Default::default()
                    });
                }
            };
            // External rules are reachable from inside the cluster too.
            let tls = tls_hosts.contains(host);
            bind(GatewayTag::Internal, &rc_name);
            if tls {
                bind(GatewayTag::InternalTls, &rc_name);
            }
            if external {
                bind(
                    GatewayTag::External,
                    if redirected { &redirect_name } else { &rc_name },
                );
                if tls {
                    bind(GatewayTag::ExternalTls, &rc_name);
                }
            }
        }
    }
    out.route_configs.push(route_table(&rc_name, vhosts));
    if !redirect_vhosts.is_empty() {
        out.route_configs
            .push(route_table(&redirect_name, redirect_vhosts));
    }
    for tls in &ingress.spec.tls {
        out.tls.push(TlsBinding {
            hosts: tls.hosts.iter().map(|h| bare_host(h).to_owned()).collect(),
            secret: format!("{}/{}", tls.secret_namespace, tls.secret_name),
        });
    }
    out
}

/// The routes of one rule: longest path first; before each, its probe twin.
fn rule_routes(
    http: &knarr_model::HttpIngressRuleValue,
    hash: &str,
    backends: &mut BTreeSet<BackendKey>,
) -> Vec<envoy_types::pb::envoy::config::route::v3::Route> {
    let mut paths: Vec<_> = http.paths.iter().collect();
    // Longest prefix first; among equals, more header matches first. Stable otherwise.
    paths.sort_by(|a, b| {
        let len =
            |p: &knarr_model::HttpIngressPath| if p.path.is_empty() { 1 } else { p.path.len() };
        len(b)
            .cmp(&len(a))
            .then(b.headers.len().cmp(&a.headers.len()))
    });
    let mut routes = Vec::new();
    for path in paths {
        let splits: Vec<Split> = path
            .splits
            .iter()
            .map(|s| {
                let key = BackendKey {
                    namespace: s.service_namespace.clone(),
                    service: s.service_name.clone(),
                    port: s.service_port.clone(),
                };
                let split = Split {
                    backend: key.cluster_name(),
                    weight: u32::try_from(s.percent).unwrap_or(0),
                    set_headers: s.append_headers.clone().into_iter().collect(),
                };
                backends.insert(key);
                split
            })
            .collect();
        let route = Route {
            path_prefix: if path.path.is_empty() {
                "/".into()
            } else {
                path.path.clone()
            },
            headers: path
                .headers
                .iter()
                .map(|(name, m)| crate::model::HeaderMatch {
                    name: name.clone(),
                    exact: m.exact.clone(),
                })
                .collect(),
            splits,
            set_headers: path.append_headers.clone().into_iter().collect(),
            host_rewrite: (!path.rewrite_host.is_empty()).then(|| path.rewrite_host.clone()),
        };
        let normal = envoy_route(&route);
        let mut probe = normal.clone();
        if let Some(m) = probe.r#match.as_mut() {
            m.headers
                .push(exact_header(NETWORK_HASH_HEADER, HASH_OVERRIDE));
        }
        probe
            .request_headers_to_add
            .push(set_header(NETWORK_HASH_HEADER, hash));
        routes.push(probe);
        routes.push(normal);
    }
    routes
}

fn virtual_host(
    name: &str,
    domains: Vec<String>,
    routes: Vec<envoy_types::pb::envoy::config::route::v3::Route>,
    redirect_to_https: bool,
) -> EnvoyVirtualHost {
    EnvoyVirtualHost {
        name: name.to_owned(),
        domains,
        routes,
        require_tls: if redirect_to_https {
            TlsRequirementType::All as i32
        } else {
            TlsRequirementType::None as i32
        },
        ..Default::default()
    }
}

fn route_table(name: &str, virtual_hosts: Vec<EnvoyVirtualHost>) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_owned(),
        // The scope already matched (gateway, host); the virtual hosts pick the rule.
        virtual_hosts,
        request_headers_to_remove: vec![GATEWAY_TAG_HEADER.to_owned()],
        validate_clusters: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
        ..Default::default()
    }
}

fn scoped_hcm(tag: GatewayTag) -> HttpConnectionManager {
    let stamp = EarlyHeaderMutation {
        mutations: vec![Mutation {
            action: Some(MutationAction::Append(set_header(
                GATEWAY_TAG_HEADER,
                tag.as_str(),
            ))),
        }],
    };
    let extractor = |name: &str| FragmentBuilder {
        r#type: Some(FragmentBuilderType::HeaderValueExtractor(
            HeaderValueExtractor {
                name: name.to_owned(),
                element_separator: String::new(),
                extract_type: Some(ExtractType::Index(0)),
            },
        )),
    };
    HttpConnectionManager {
        codec_type: CodecType::Auto as i32,
        stat_prefix: tag.listener_name().to_owned(),
        route_specifier: Some(RouteSpecifier::ScopedRoutes(ScopedRoutes {
            name: format!("knarr-{tag}"),
            scope_key_builder: Some(ScopeKeyBuilder {
                fragments: vec![extractor(GATEWAY_TAG_HEADER), extractor(":authority")],
            }),
            rds_config_source: Some(ads()),
            config_specifier: Some(ConfigSpecifier::ScopedRds(ScopedRds {
                scoped_rds_config_source: Some(ads()),
                ..Default::default()
            })),
        })),
        early_header_mutation_extensions: vec![TypedExtensionConfig {
            name: "knarr.gateway_tag".into(),
            typed_config: Some(any(&stamp)),
        }],
        strip_port_mode: Some(StripPortMode::StripAnyHostPort(true)),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(HttpFilterConfigType::TypedConfig(any(&Router::default()))),
            ..Default::default()
        }],
        upgrade_configs: vec![UpgradeConfig {
            upgrade_type: "websocket".into(),
            ..Default::default()
        }],
        // Requests may stream as long as the revision allows: no idle cut at the gateway.
        stream_idle_timeout: Some(duration(std::time::Duration::ZERO)),
        ..Default::default()
    }
}

fn hcm_filter(tag: GatewayTag) -> Filter {
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(FilterConfigType::TypedConfig(any(&scoped_hcm(tag)))),
    }
}

/// The gateway's listeners. The HTTPS listeners (external and cluster-local, the same SNI
/// chains; scopes decide which hosts each serves) exist only when some ingress has TLS.
pub fn listeners(config: &GatewayConfig, tls: &[TlsBinding]) -> Vec<Listener> {
    let plain = |tag: GatewayTag, port: u16| Listener {
        name: tag.listener_name().into(),
        address: Some(crate::envoy::socket_address(config.address, port)),
        filter_chains: vec![FilterChain {
            filters: vec![hcm_filter(tag)],
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut out = vec![
        plain(GatewayTag::External, config.external_http_port),
        plain(GatewayTag::Internal, config.internal_http_port),
    ];
    if !tls.is_empty() {
        let mut bindings: Vec<&TlsBinding> = tls.iter().collect();
        bindings.sort();
        let mut seen_hosts = BTreeSet::new();
        let chains: Vec<(Vec<String>, &str)> = bindings
            .into_iter()
            .filter_map(|b| {
                // A host already bound to a certificate keeps it (first binding wins).
                let hosts: Vec<String> = b
                    .hosts
                    .iter()
                    .filter(|h| seen_hosts.insert((*h).clone()))
                    .cloned()
                    .collect();
                (!hosts.is_empty()).then_some((hosts, b.secret.as_str()))
            })
            .collect();
        for (tag, port) in [
            (GatewayTag::ExternalTls, config.external_https_port),
            (GatewayTag::InternalTls, config.internal_https_port),
        ] {
            out.push(Listener {
                name: tag.listener_name().into(),
                address: Some(crate::envoy::socket_address(config.address, port)),
                listener_filters: vec![ListenerFilter {
                    name: "envoy.filters.listener.tls_inspector".into(),
                    config_type: Some(ListenerFilterConfigType::TypedConfig(any(
                        &TlsInspector::default(),
                    ))),
                    ..Default::default()
                }],
                filter_chains: chains
                    .iter()
                    .map(|(hosts, secret)| tls_chain(tag, hosts.clone(), secret))
                    .collect(),
                ..Default::default()
            });
        }
    }
    out
}

fn tls_chain(tag: GatewayTag, hosts: Vec<String>, secret: &str) -> FilterChain {
    let context = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                name: secret.to_owned(),
                sds_config: Some(ads()),
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    FilterChain {
        filter_chain_match: Some(FilterChainMatch {
            server_names: hosts,
            ..Default::default()
        }),
        filters: vec![hcm_filter(tag)],
        transport_socket: Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(TransportConfigType::TypedConfig(any(&context))),
        }),
        ..Default::default()
    }
}

/// The SDS secret for a TLS key pair.
pub fn tls_secret(name: &str, pair: &TlsKeyPair) -> EnvoySecret {
    let inline = |s: &str| DataSource {
        specifier: Some(DataSpecifier::InlineString(s.to_owned())),
        ..Default::default()
    };
    EnvoySecret {
        name: name.to_owned(),
        r#type: Some(SecretType::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(&pair.cert_chain_pem)),
            private_key: Some(inline(&pair.private_key_pem)),
            ..Default::default()
        })),
    }
}

/// The Service port a backend key names, if the Service has it.
fn service_port<'s>(
    service: &'s Service,
    port: &IntOrString,
) -> Option<&'s knarr_model::ServicePort> {
    service.spec.ports.iter().find(|p| match port {
        IntOrString::Int(n) => p.port == *n,
        IntOrString::String(name) => p.name == *name,
    })
}

/// Speaks h2c to a port named `http2`/`h2c` (Knative's convention) or with an h2c appProtocol.
fn is_http2(port: &knarr_model::ServicePort) -> bool {
    matches!(port.name.as_str(), "http2" | "h2c")
        || matches!(port.app_protocol.as_str(), "kubernetes.io/h2c" | "h2c")
}

/// The cluster for a backend. EDS, except for ExternalName Services (resolved by DNS).
pub fn backend_cluster(key: &BackendKey, service: Option<&Service>) -> Cluster {
    let port = service.and_then(|s| service_port(s, &key.port));
    let http2 = port.is_some_and(is_http2);
    let name = key.cluster_name();
    let mut cluster = crate::envoy::cluster(&crate::model::Backend {
        name: name.clone(),
        http2,
        endpoints: vec![],
    });
    if let (Some(service), Some(port)) = (service, port) {
        if service.spec.type_ == "ExternalName" {
            cluster.cluster_discovery_type =
                Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32));
            cluster.eds_cluster_config = None;
            cluster.lb_policy = LbPolicy::RoundRobin as i32;
            cluster.load_assignment = Some(external_name_assignment(
                &name,
                &service.spec.external_name,
                port.port,
            ));
        }
    }
    cluster
}

fn external_name_assignment(name: &str, host: &str, port: i64) -> ClusterLoadAssignment {
    use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
    use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress};
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    use envoy_types::pb::envoy::config::endpoint::v3::{
        Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints,
    };
    ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(HostIdentifier::Endpoint(EnvoyEndpoint {
                    address: Some(Address {
                        address: Some(AddressKind::SocketAddress(SocketAddress {
                            address: host.to_owned(),
                            port_specifier: Some(PortSpecifier::PortValue(
                                u32::try_from(port).unwrap_or(0),
                            )),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The endpoints of a backend: the ready addresses of the Service's Endpoints and
/// EndpointSlices, on the target port that the Service port maps to.
pub fn backend_endpoints(
    key: &BackendKey,
    service: Option<&Service>,
    endpoints: Option<&Endpoints>,
    slices: &[&EndpointSlice],
) -> ClusterLoadAssignment {
    let name = key.cluster_name();
    let Some(service) = service else {
        return crate::envoy::load_assignment(&name, &[]);
    };
    let Some(port) = service_port(service, &key.port) else {
        return crate::envoy::load_assignment(&name, &[]);
    };
    let single_port = service.spec.ports.len() == 1;
    // Which endpoint port serves this Service port: same name; or, for a lone port, the only
    // one; or the numeric targetPort.
    let pick = |ports: &[knarr_model::EndpointPort]| -> Option<u16> {
        let by_name = ports
            .iter()
            .find(|p| !port.name.is_empty() && p.name == port.name);
        let chosen = by_name
            .or_else(|| (single_port && ports.len() == 1).then(|| &ports[0]))
            .map(|p| p.port)
            .or(match &port.target_port {
                Some(IntOrString::Int(n)) => Some(*n),
                None => Some(port.port),
                Some(IntOrString::String(_)) => None,
            })?;
        u16::try_from(chosen).ok()
    };
    let mut found: BTreeMap<(IpAddr, u16), ()> = BTreeMap::new();
    if let Some(endpoints) = endpoints {
        for subset in &endpoints.subsets {
            let Some(p) = pick(&subset.ports) else {
                continue;
            };
            for address in &subset.addresses {
                if let Ok(ip) = address.ip.parse() {
                    found.insert((ip, p), ());
                }
            }
        }
    }
    for slice in slices {
        let Some(p) = pick(&slice.ports) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            if endpoint.conditions.ready == Some(false) {
                continue;
            }
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse() {
                    found.insert((ip, p), ());
                }
            }
        }
    }
    let list: Vec<Endpoint> = found
        .into_keys()
        .map(|(address, port)| Endpoint { address, port })
        .collect();
    crate::envoy::load_assignment(&name, &list)
}

#[cfg(test)]
mod tests;
