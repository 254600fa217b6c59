//! Immutable config snapshots and the cache that publishes them to xDS streams.
//!
//! A writer builds the next [`Snapshot`] and publishes it with [`SnapshotCache::set`]; every
//! stream loads the current one through `arc-swap` and is woken through a `watch` channel. Nothing
//! is ever mutated in place, so a stream always sees one whole, consistent config.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::sync::watch;
use xxhash_rust::xxh3::Xxh3;

use crate::resource::{Resource, ResourceType, XdsResource, COUNT};

/// Resources of one type, by name: a persistent map, so a snapshot derived from another shares
/// its structure and costs work proportional to the change, not to the whole config.
pub type ResourceMap = imbl::OrdMap<String, Arc<Resource>>;

/// One complete config for a group of Envoys.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    resources: [ResourceMap; COUNT],
    versions: [String; COUNT],
    /// When the cache published it; used for push-latency metrics only.
    published_at: Option<Instant>,
    /// Set by the cache on publication: increases with every publish.
    generation: u64,
    /// Per type, the sum of the resources' (name, version) hashes: the set version, kept up to
    /// date on every insert and remove instead of rehashing everything.
    sums: [u64; COUNT],
}

impl Snapshot {
    pub fn builder() -> SnapshotBuilder {
        SnapshotBuilder::default()
    }

    /// A builder starting from this snapshot's resources, for small incremental changes.
    /// Cloning copies `Arc`s only; no resource is re-encoded or re-hashed.
    pub fn to_builder(&self) -> SnapshotBuilder {
        SnapshotBuilder {
            resources: self.resources.clone(),
            sums: self.sums,
        }
    }

    pub fn resources(&self, ty: ResourceType) -> &ResourceMap {
        &self.resources[ty.index()]
    }

    pub fn get(&self, ty: ResourceType, name: &str) -> Option<&Arc<Resource>> {
        self.resources[ty.index()].get(name)
    }

    /// The version of one type's whole set: a hash over names and resource versions.
    pub fn version(&self, ty: ResourceType) -> &str {
        &self.versions[ty.index()]
    }

    pub fn published_at(&self) -> Option<Instant> {
        self.published_at
    }

    /// The cache's publication counter at the time this snapshot was published (0 before).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.resources.iter().map(ResourceMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Builds a [`Snapshot`].
#[derive(Debug, Default, Clone)]
pub struct SnapshotBuilder {
    resources: [ResourceMap; COUNT],
    sums: [u64; COUNT],
}

/// One resource's share of its type's set version.
fn entry_hash(r: &Resource) -> u64 {
    let mut hasher = Xxh3::new();
    hasher.update(r.name.as_bytes());
    hasher.update(&[0]);
    hasher.update(r.version.as_bytes());
    hasher.digest()
}

impl SnapshotBuilder {
    /// Adds (or replaces, by name) a resource; chainable.
    #[allow(clippy::should_implement_trait)]
    pub fn add<M: XdsResource>(mut self, message: &M) -> Self {
        self.insert(message);
        self
    }

    pub fn insert<M: XdsResource>(&mut self, message: &M) -> &mut Self {
        self.insert_resource(M::TYPE, Resource::new(message))
    }

    /// Adds an already encoded resource.
    pub fn insert_resource(&mut self, ty: ResourceType, resource: Arc<Resource>) -> &mut Self {
        let i = ty.index();
        self.sums[i] = self.sums[i].wrapping_add(entry_hash(&resource));
        if let Some(old) = self.resources[i].insert(resource.name.clone(), resource) {
            self.sums[i] = self.sums[i].wrapping_sub(entry_hash(&old));
        }
        self
    }

    pub fn remove(&mut self, ty: ResourceType, name: &str) -> &mut Self {
        let i = ty.index();
        if let Some(old) = self.resources[i].remove(name) {
            self.sums[i] = self.sums[i].wrapping_sub(entry_hash(&old));
        }
        self
    }

    /// Makes this builder's resources of type `ty` those of `other` (O(1): the maps are
    /// shared, the set version carried over).
    pub fn set_type_from(&mut self, ty: ResourceType, other: &SnapshotBuilder) -> &mut Self {
        let i = ty.index();
        self.resources[i] = other.resources[i].clone();
        self.sums[i] = other.sums[i];
        self
    }

    /// The resources of type `ty` so far.
    pub fn resources(&self, ty: ResourceType) -> &ResourceMap {
        &self.resources[ty.index()]
    }

    /// O(1): the maps are shared, the set versions already known.
    pub fn build(self) -> Snapshot {
        Snapshot {
            versions: self.sums.map(|sum| format!("{sum:016x}")),
            resources: self.resources,
            sums: self.sums,
            published_at: None,
            generation: 0,
        }
    }
}

/// A version for a set of resources: a hash over their names and versions, in name order.
pub fn set_version<'a>(resources: impl Iterator<Item = &'a Arc<Resource>>) -> String {
    let mut hasher = Xxh3::new();
    for r in resources {
        hasher.update(r.name.as_bytes());
        hasher.update(&[0]);
        hasher.update(r.version.as_bytes());
        hasher.update(&[0]);
    }
    format!("{:016x}", hasher.digest())
}

/// How Envoys are grouped: all Envoys of a group get the same snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodeGrouping {
    /// By `node.id`.
    #[default]
    NodeId,
    /// By `node.cluster`, so a fleet of identical gateways shares one group.
    Cluster,
}

impl NodeGrouping {
    pub fn group_of(self, node: &Node) -> String {
        match self {
            NodeGrouping::NodeId => node.id.clone(),
            NodeGrouping::Cluster => node.cluster.clone(),
        }
    }
}

/// The group whose snapshot serves Envoys that have no group of their own.
pub const DEFAULT_GROUP: &str = "*";

/// Published snapshots per node group.
#[derive(Debug)]
pub struct SnapshotCache {
    grouping: NodeGrouping,
    groups: ArcSwap<HashMap<String, Arc<Snapshot>>>,
    /// Bumped on every publish; streams wait on it.
    generation: watch::Sender<u64>,
}

impl SnapshotCache {
    pub fn new(grouping: NodeGrouping) -> Self {
        SnapshotCache {
            grouping,
            groups: ArcSwap::from_pointee(HashMap::new()),
            generation: watch::Sender::new(0),
        }
    }

    pub fn grouping(&self) -> NodeGrouping {
        self.grouping
    }

    /// Publishes `snapshot` for `group` ([`DEFAULT_GROUP`] for every Envoy without its own).
    pub fn set(&self, group: &str, mut snapshot: Snapshot) -> Arc<Snapshot> {
        snapshot.published_at = Some(Instant::now());
        // Serialised by the watch channel's lock, so generations follow publication order.
        let mut published = None;
        self.generation.send_modify(|g| {
            *g += 1;
            snapshot.generation = *g;
            let snapshot = Arc::new(std::mem::take(&mut snapshot));
            self.groups.rcu(|groups| {
                let mut next = HashMap::clone(groups);
                next.insert(group.to_owned(), snapshot.clone());
                next
            });
            published = Some(snapshot);
        });
        published.expect("send_modify runs its closure")
    }

    pub fn set_default(&self, snapshot: Snapshot) -> Arc<Snapshot> {
        self.set(DEFAULT_GROUP, snapshot)
    }

    /// Forgets a group; its Envoys fall back to the default group's snapshot.
    pub fn remove(&self, group: &str) {
        self.groups.rcu(|groups| {
            let mut next = HashMap::clone(groups);
            next.remove(group);
            next
        });
        self.generation.send_modify(|g| *g += 1);
    }

    /// The snapshot serving `group`: its own, else the default group's, else none yet.
    pub fn get(&self, group: &str) -> Option<Arc<Snapshot>> {
        let groups = self.groups.load();
        groups
            .get(group)
            .or_else(|| groups.get(DEFAULT_GROUP))
            .cloned()
    }

    pub fn get_for_node(&self, node: &Node) -> Option<Arc<Snapshot>> {
        self.get(&self.grouping.group_of(node))
    }

    /// A receiver that changes whenever any group's snapshot is published.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    fn cluster(name: &str) -> Cluster {
        Cluster {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn set_version_depends_on_names_and_versions() {
        let a = Snapshot::builder().add(&cluster("a")).build();
        let a2 = Snapshot::builder().add(&cluster("a")).build();
        let b = Snapshot::builder()
            .add(&cluster("a"))
            .add(&cluster("b"))
            .build();
        assert_eq!(
            a.version(ResourceType::Cluster),
            a2.version(ResourceType::Cluster)
        );
        assert_ne!(
            a.version(ResourceType::Cluster),
            b.version(ResourceType::Cluster)
        );
        assert_eq!(
            a.version(ResourceType::Route),
            b.version(ResourceType::Route)
        );
    }

    #[test]
    fn groups_fall_back_to_default() {
        let cache = SnapshotCache::new(NodeGrouping::NodeId);
        assert!(cache.get("e1").is_none());
        cache.set_default(Snapshot::builder().add(&cluster("d")).build());
        cache.set("e1", Snapshot::builder().add(&cluster("own")).build());
        assert!(cache
            .get("e1")
            .unwrap()
            .get(ResourceType::Cluster, "own")
            .is_some());
        assert!(cache
            .get("e2")
            .unwrap()
            .get(ResourceType::Cluster, "d")
            .is_some());
        cache.remove("e1");
        assert!(cache
            .get("e1")
            .unwrap()
            .get(ResourceType::Cluster, "d")
            .is_some());
    }

    #[test]
    fn publishing_wakes_subscribers() {
        let cache = SnapshotCache::new(NodeGrouping::Cluster);
        let mut rx = cache.subscribe();
        assert!(!rx.has_changed().unwrap());
        cache.set_default(Snapshot::default());
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert!(!rx.has_changed().unwrap());
    }
}
