//! xDS resource types, and resources with content-hash versions.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, ScopedRouteConfiguration};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use xxhash_rust::xxh3::Xxh3;

/// How many resource types there are.
pub const COUNT: usize = 7;

/// The resource types Knarr serves, in the order updates are pushed (make before break):
/// clusters, then their endpoints, then the secrets listeners need, then listeners, then the
/// routing scopes listeners use, then the route configurations listeners and scopes name. Last,
/// Knarr's own type for activators (`knarr.activator.v1.Revision`), which Envoy never asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Cluster,
    Endpoint,
    Secret,
    Listener,
    ScopedRoute,
    Route,
    ActivatorRevision,
}

impl ResourceType {
    /// Every type, in push order.
    pub const ALL: [ResourceType; COUNT] = [
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Secret,
        ResourceType::Listener,
        ResourceType::ScopedRoute,
        ResourceType::Route,
        ResourceType::ActivatorRevision,
    ];

    pub const fn type_url(self) -> &'static str {
        match self {
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoint => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            ResourceType::Secret => {
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
            }
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::ScopedRoute => {
                "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"
            }
            ResourceType::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            ResourceType::ActivatorRevision => knarr_proto::activator::REVISION_TYPE_URL,
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// Short name as Envoy's docs use it (CDS, EDS, ...), for logs and metric labels.
    pub const fn short_name(self) -> &'static str {
        match self {
            ResourceType::Cluster => "CDS",
            ResourceType::Endpoint => "EDS",
            ResourceType::Secret => "SDS",
            ResourceType::Listener => "LDS",
            ResourceType::ScopedRoute => "SRDS",
            ResourceType::Route => "RDS",
            ResourceType::ActivatorRevision => "activator",
        }
    }

    /// Listeners and routing tables: what points at clusters.
    pub const fn is_routing(self) -> bool {
        matches!(
            self,
            ResourceType::Listener | ResourceType::ScopedRoute | ResourceType::Route
        )
    }

    /// Types whose clients subscribe to "everything" by default (legacy wildcard).
    pub const fn is_wildcard_by_default(self) -> bool {
        matches!(
            self,
            ResourceType::Cluster | ResourceType::Listener | ResourceType::ScopedRoute
        )
    }

    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

/// One named xDS resource, already encoded, with a version that is a hash of its canonical
/// encoding: equal content always gets an equal version, in any process.
#[derive(Clone, PartialEq)]
pub struct Resource {
    pub name: String,
    pub version: String,
    pub ty: ResourceType,
    /// The encoded message.
    pub value: Vec<u8>,
}

impl fmt::Debug for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resource")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("type", &self.ty)
            .field("bytes", &self.value.len())
            .finish()
    }
}

impl Resource {
    /// Encodes `message` and versions it by content.
    pub fn new<M: XdsResource>(message: &M) -> Arc<Resource> {
        let value = message.encode_to_vec();
        let version = message.content_version(&value);
        Arc::new(Resource {
            name: message.resource_name().to_owned(),
            version,
            ty: M::TYPE,
            value,
        })
    }

    /// [`Resource::new`] under another name than the message's own (activator revisions are
    /// named `namespace/name`).
    pub fn named<M: XdsResource>(name: String, message: &M) -> Arc<Resource> {
        let value = message.encode_to_vec();
        let version = message.content_version(&value);
        Arc::new(Resource {
            name,
            version,
            ty: M::TYPE,
            value,
        })
    }

    pub fn resource_type(&self) -> ResourceType {
        self.ty
    }

    /// The resource as a protobuf `Any`, for a response.
    pub fn to_any(&self) -> Any {
        Any {
            type_url: self.ty.type_url().to_owned(),
            value: self.value.clone(),
        }
    }
}

/// An Envoy message that can be served as an xDS resource.
pub trait XdsResource: Message + Sized {
    const TYPE: ResourceType;

    fn resource_name(&self) -> &str;

    /// The content version: a hash of a canonical encoding.
    ///
    /// envoy-types keeps proto `map` fields in `HashMap`s, whose iteration order (and so prost's
    /// encoding) differs between two maps with equal content. A map with at most one entry
    /// encodes deterministically; for messages holding larger maps, implementations hash a copy
    /// with those maps taken out, then the map entries in key order.
    fn content_version(&self, encoded: &[u8]) -> String {
        default_version(Self::TYPE, encoded)
    }
}

fn hash_map_sorted<V: Message>(hasher: &mut Xxh3, tag: &str, map: &HashMap<String, V>) {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    hasher.update(tag.as_bytes());
    for (key, value) in entries {
        hasher.update(&(key.len() as u64).to_le_bytes());
        hasher.update(key.as_bytes());
        let bytes = value.encode_to_vec();
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
}

fn metadata_is_large(m: &Option<Metadata>) -> bool {
    m.as_ref()
        .is_some_and(|m| m.filter_metadata.len() > 1 || m.typed_filter_metadata.len() > 1)
}

fn take_metadata(hasher: &mut Xxh3, tag: &str, m: &mut Option<Metadata>) {
    if let Some(m) = m.as_mut() {
        hash_map_sorted(hasher, tag, &std::mem::take(&mut m.filter_metadata));
        hash_map_sorted(hasher, tag, &std::mem::take(&mut m.typed_filter_metadata));
    }
}

fn finish(mut hasher: Xxh3, ty: ResourceType, rest: &impl Message) -> String {
    hasher.update(ty.type_url().as_bytes());
    hasher.update(&rest.encode_to_vec());
    format!("{:016x}", hasher.digest())
}

impl XdsResource for Cluster {
    const TYPE: ResourceType = ResourceType::Cluster;

    fn resource_name(&self) -> &str {
        &self.name
    }

    fn content_version(&self, encoded: &[u8]) -> String {
        if self.typed_extension_protocol_options.len() <= 1 && !metadata_is_large(&self.metadata) {
            return default_version(Self::TYPE, encoded);
        }
        let mut copy = self.clone();
        let mut hasher = Xxh3::new();
        hash_map_sorted(
            &mut hasher,
            "teo",
            &std::mem::take(&mut copy.typed_extension_protocol_options),
        );
        take_metadata(&mut hasher, "md", &mut copy.metadata);
        finish(hasher, Self::TYPE, &copy)
    }
}

/// What activators learn of a revision; named `namespace/name`.
impl XdsResource for knarr_proto::activator::Revision {
    const TYPE: ResourceType = ResourceType::ActivatorRevision;

    /// Only the revision's name: build these with [`Resource::named`] and `namespace/name`.
    fn resource_name(&self) -> &str {
        &self.name
    }
}

impl XdsResource for ClusterLoadAssignment {
    const TYPE: ResourceType = ResourceType::Endpoint;

    fn resource_name(&self) -> &str {
        &self.cluster_name
    }
}

impl XdsResource for Listener {
    const TYPE: ResourceType = ResourceType::Listener;

    fn resource_name(&self) -> &str {
        &self.name
    }

    fn content_version(&self, encoded: &[u8]) -> String {
        if !metadata_is_large(&self.metadata) {
            return default_version(Self::TYPE, encoded);
        }
        let mut copy = self.clone();
        let mut hasher = Xxh3::new();
        take_metadata(&mut hasher, "md", &mut copy.metadata);
        finish(hasher, Self::TYPE, &copy)
    }
}

impl XdsResource for RouteConfiguration {
    const TYPE: ResourceType = ResourceType::Route;

    fn resource_name(&self) -> &str {
        &self.name
    }

    fn content_version(&self, encoded: &[u8]) -> String {
        let large = self.typed_per_filter_config.len() > 1
            || self.virtual_hosts.iter().any(|vh| {
                vh.typed_per_filter_config.len() > 1
                    || vh.routes.iter().any(|r| {
                        r.typed_per_filter_config.len() > 1 || metadata_is_large(&r.metadata)
                    })
            });
        if !large {
            return default_version(Self::TYPE, encoded);
        }
        let mut copy = self.clone();
        let mut hasher = Xxh3::new();
        hash_map_sorted(
            &mut hasher,
            "rc",
            &std::mem::take(&mut copy.typed_per_filter_config),
        );
        for vh in &mut copy.virtual_hosts {
            hash_map_sorted(
                &mut hasher,
                "vh",
                &std::mem::take(&mut vh.typed_per_filter_config),
            );
            for route in &mut vh.routes {
                hash_map_sorted(
                    &mut hasher,
                    "r",
                    &std::mem::take(&mut route.typed_per_filter_config),
                );
                take_metadata(&mut hasher, "rmd", &mut route.metadata);
            }
        }
        finish(hasher, Self::TYPE, &copy)
    }
}

impl XdsResource for ScopedRouteConfiguration {
    const TYPE: ResourceType = ResourceType::ScopedRoute;

    fn resource_name(&self) -> &str {
        &self.name
    }
}

impl XdsResource for Secret {
    const TYPE: ResourceType = ResourceType::Secret;

    fn resource_name(&self) -> &str {
        &self.name
    }
}

fn default_version(ty: ResourceType, encoded: &[u8]) -> String {
    let mut hasher = Xxh3::new();
    hasher.update(ty.type_url().as_bytes());
    hasher.update(encoded);
    format!("{:016x}", hasher.digest())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Any;

    fn any(n: u8) -> Any {
        Any {
            type_url: format!("type.googleapis.com/test.T{n}"),
            value: vec![n; 4],
        }
    }

    fn cluster_with_options(order: &[u8]) -> Cluster {
        let mut options = HashMap::new();
        for &n in order {
            options.insert(format!("opt{n}"), any(n));
        }
        Cluster {
            name: "c".into(),
            typed_extension_protocol_options: options,
            ..Default::default()
        }
    }

    #[test]
    fn equal_content_gets_equal_version_even_with_maps() {
        // Many freshly built maps: with random hash seeds, at least some iterate differently.
        let first = Resource::new(&cluster_with_options(&[1, 2, 3, 4, 5, 6]));
        for _ in 0..32 {
            let again = Resource::new(&cluster_with_options(&[6, 5, 4, 3, 2, 1]));
            assert_eq!(first.version, again.version);
        }
    }

    #[test]
    fn changed_content_gets_a_new_version() {
        let a = Resource::new(&cluster_with_options(&[1, 2]));
        let b = Resource::new(&cluster_with_options(&[1, 3]));
        assert_ne!(a.version, b.version);
        let c = Resource::new(&Cluster {
            name: "c".into(),
            ..Default::default()
        });
        let d = Resource::new(&Cluster {
            name: "d".into(),
            ..Default::default()
        });
        assert_ne!(c.version, d.version);
    }

    #[test]
    fn type_urls_round_trip() {
        for t in ResourceType::ALL {
            assert_eq!(ResourceType::from_type_url(t.type_url()), Some(t));
        }
        assert_eq!(
            ResourceType::from_type_url("type.googleapis.com/nope"),
            None
        );
    }
}
