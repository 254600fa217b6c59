//! The incremental translator: applies object changes (a KIngress, a Service's endpoints, a
//! Secret) and produces the next snapshot, re-translating only what depends on the change.
//!
//! Level-triggered at the object level: the index holds the latest version of every object;
//! an ingress is re-translated when it changes or when a host it wanted frees up; a backend's
//! cluster and endpoints are rebuilt when its Service, Endpoints or EndpointSlices change.
//! Nothing here does I/O; the caller publishes the snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use knarr_model::{
    EndpointSlice, Endpoints, Ingress, Kind, Object, ObjectKey, Service, TlsKeyPair,
    KNARR_INGRESS_CLASS, SERVICE_NAME_LABEL,
};
use knarr_snapshot::{ResourceType, Snapshot, SnapshotBuilder};

use crate::kingress::{
    backend_cluster, backend_endpoints, listeners, tls_secret, translate_ingress, BackendKey,
    GatewayConfig, GatewayTag, IngressTranslation, TlsBinding,
};

/// A change from a source.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The object is new or its content changed. Shared: the source keeps the same copy.
    Upsert(Arc<Object>),
    /// The object is gone.
    Delete(ObjectKey),
}

impl Change {
    pub fn key(&self) -> ObjectKey {
        match self {
            Change::Upsert(object) => object.key(),
            Change::Delete(key) => key.clone(),
        }
    }
}

/// What the translator knows about one ingress, for status.
#[derive(Debug, Clone, PartialEq)]
pub struct IngressState {
    pub key: ObjectKey,
    pub generation: Option<i64>,
    /// The probe hash of the programmed version.
    pub hash: String,
    /// Why it is not programmed (e.g. a domain conflict), if it is not.
    pub not_programmed: Option<NotProgrammed>,
    /// The resources it contributes, for readiness checks.
    pub resources: Vec<(ResourceType, String)>,
    /// The hosts it serves, per gateway.
    pub claims: Vec<(GatewayTag, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotProgrammed {
    pub reason: &'static str,
    pub message: String,
}

/// Which ingresses this translator programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassFilter {
    /// The values of `networking.knative.dev/ingress.class` programmed (Knarr's own, and for a
    /// drop-in switch, Kourier's).
    pub classes: Vec<String>,
    /// Program ingresses with no class annotation (Knative's default class is ours).
    pub take_unannotated: bool,
}

impl Default for ClassFilter {
    fn default() -> Self {
        ClassFilter {
            classes: vec![KNARR_INGRESS_CLASS.into()],
            take_unannotated: true,
        }
    }
}

impl ClassFilter {
    pub fn wants(&self, ingress: &Ingress) -> bool {
        self.wants_class(ingress.class())
    }

    /// Whether an ingress annotated with `class` (`None`: unannotated) is ours.
    pub fn wants_class(&self, class: Option<&str>) -> bool {
        match class {
            Some(class) => self.classes.iter().any(|c| c == class),
            None => self.take_unannotated,
        }
    }
}

type NsName = (String, String);

/// What an ingress contributed: names only (the resources themselves live in the builder).
#[derive(Debug, Default)]
struct Programmed {
    route_configs: Vec<String>,
    scopes: Vec<String>,
    claims: Vec<(GatewayTag, String)>,
    /// Sorted, no duplicates (a `Vec`: most ingresses have one or two).
    backends: Vec<BackendKey>,
    tls: Vec<TlsBinding>,
    hash: String,
}

impl Programmed {
    fn of(t: IngressTranslation) -> Self {
        Programmed {
            // Not `into_iter()`: an in-place collect would keep the protos' large buffers alive.
            route_configs: t.route_configs.iter().map(|r| r.name.clone()).collect(),
            scopes: t.scopes.iter().map(|s| s.name.clone()).collect(),
            claims: t.claims,
            backends: t.backends.into_iter().collect(),
            tls: t.tls,
            hash: t.hash,
        }
    }
}

/// The incremental KIngress translator.
#[derive(Debug)]
pub struct IngressIndex {
    gateway: GatewayConfig,
    classes: ClassFilter,
    // Objects are kept as the source's shared copies (`Arc<Object>`), one per kind of map.
    ingresses: BTreeMap<ObjectKey, Arc<Object>>,
    services: HashMap<NsName, Arc<Object>>,
    endpoints: HashMap<NsName, Arc<Object>>,
    /// Per Service: its slices by slice name.
    slices: HashMap<NsName, BTreeMap<String, Arc<Object>>>,
    /// Slice key → the Service it belongs to (labels can change).
    slice_owner: HashMap<NsName, NsName>,
    secrets: HashMap<NsName, TlsKeyPair>,

    programmed: HashMap<ObjectKey, Programmed>,
    not_programmed: BTreeMap<ObjectKey, NotProgrammed>,
    owners: HashMap<(GatewayTag, String), ObjectKey>,
    /// Which ingresses use each backend (small `Vec`s: usually one).
    backend_users: BTreeMap<BackendKey, Vec<ObjectKey>>,
    secret_users: BTreeMap<String, BTreeSet<ObjectKey>>,
    tls_bindings: BTreeMap<ObjectKey, Vec<TlsBinding>>,
    /// The TLS bindings the listeners were last built with (`None`: never built).
    listeners_tls: Option<Vec<TlsBinding>>,
    builder: SnapshotBuilder,
}

// Each map holds one kind; these read it back.
fn ingress_of(o: &Object) -> &Ingress {
    match o {
        Object::Ingress(i) => i,
        other => unreachable!("the ingress map holds {}", other.key()),
    }
}

fn service_of(o: &Object) -> &Service {
    match o {
        Object::Service(s) => s,
        other => unreachable!("the service map holds {}", other.key()),
    }
}

fn endpoints_of(o: &Object) -> &Endpoints {
    match o {
        Object::Endpoints(e) => e,
        other => unreachable!("the endpoints map holds {}", other.key()),
    }
}

fn slice_of(o: &Object) -> &EndpointSlice {
    match o {
        Object::EndpointSlice(s) => s,
        other => unreachable!("the slice map holds {}", other.key()),
    }
}

fn ns_name(key: &ObjectKey) -> NsName {
    (key.namespace.clone(), key.name.clone())
}

impl IngressIndex {
    /// Which classes later upserts are taken for (the source sends its ingresses again when it
    /// changes them, so that the index follows).
    pub fn set_classes(&mut self, classes: ClassFilter) {
        self.classes = classes;
    }

    pub fn new(gateway: GatewayConfig, classes: ClassFilter) -> Self {
        let mut index = IngressIndex {
            gateway,
            classes,
            ingresses: BTreeMap::new(),
            services: HashMap::new(),
            endpoints: HashMap::new(),
            slices: HashMap::new(),
            slice_owner: HashMap::new(),
            secrets: HashMap::new(),
            programmed: HashMap::new(),
            not_programmed: BTreeMap::new(),
            owners: HashMap::new(),
            backend_users: BTreeMap::new(),
            secret_users: BTreeMap::new(),
            tls_bindings: BTreeMap::new(),
            listeners_tls: None,
            builder: SnapshotBuilder::default(),
        };
        index.rebuild_listeners();
        index
    }

    /// The current config.
    pub fn snapshot(&self) -> Snapshot {
        self.builder.clone().build()
    }

    /// Applies a batch of changes; returns the ingresses whose translation changed.
    pub fn apply(&mut self, changes: impl IntoIterator<Item = Change>) -> BTreeSet<ObjectKey> {
        let mut dirty_ingresses = BTreeSet::new();
        let mut dirty_services: BTreeSet<NsName> = BTreeSet::new();
        let mut dirty_secrets: BTreeSet<NsName> = BTreeSet::new();
        for change in changes {
            match change {
                Change::Upsert(object) => {
                    let key = object.key();
                    match &*object {
                        Object::Ingress(ingress) => {
                            if self.classes.wants(ingress) {
                                self.ingresses.insert(key.clone(), Arc::clone(&object));
                            } else {
                                // Another class's (or no longer ours): leave it alone.
                                self.ingresses.remove(&key);
                            }
                            dirty_ingresses.insert(key);
                        }
                        Object::Service(_) => {
                            self.services.insert(ns_name(&key), Arc::clone(&object));
                            dirty_services.insert(ns_name(&key));
                        }
                        Object::Endpoints(_) => {
                            self.endpoints.insert(ns_name(&key), Arc::clone(&object));
                            dirty_services.insert(ns_name(&key));
                        }
                        Object::EndpointSlice(slice) => {
                            let service = (
                                key.namespace.clone(),
                                slice
                                    .metadata
                                    .labels
                                    .get(SERVICE_NAME_LABEL)
                                    .cloned()
                                    .unwrap_or_default(),
                            );
                            if let Some(old) =
                                self.slice_owner.insert(ns_name(&key), service.clone())
                            {
                                if old != service {
                                    if let Some(m) = self.slices.get_mut(&old) {
                                        m.remove(&key.name);
                                    }
                                    dirty_services.insert(old);
                                }
                            }
                            self.slices
                                .entry(service.clone())
                                .or_default()
                                .insert(key.name.clone(), Arc::clone(&object));
                            dirty_services.insert(service);
                        }
                        Object::TlsSecret(_, pair) => {
                            self.secrets.insert(ns_name(&key), pair.clone());
                            dirty_secrets.insert(ns_name(&key));
                        }
                        // Knative Services and friends become KIngresses, Services and
                        // Endpoints before they get here (`knarr up`'s serving controller).
                        Object::Serving(_) => {}
                    }
                }
                Change::Delete(key) => match key.kind {
                    Kind::Ingress => {
                        self.ingresses.remove(&key);
                        dirty_ingresses.insert(key);
                    }
                    Kind::Service => {
                        self.services.remove(&ns_name(&key));
                        dirty_services.insert(ns_name(&key));
                    }
                    Kind::Endpoints => {
                        self.endpoints.remove(&ns_name(&key));
                        dirty_services.insert(ns_name(&key));
                    }
                    Kind::EndpointSlice => {
                        if let Some(service) = self.slice_owner.remove(&ns_name(&key)) {
                            if let Some(m) = self.slices.get_mut(&service) {
                                m.remove(&key.name);
                            }
                            dirty_services.insert(service);
                        }
                    }
                    Kind::Secret => {
                        self.secrets.remove(&ns_name(&key));
                        dirty_secrets.insert(ns_name(&key));
                    }
                    Kind::Serving(_) => {}
                },
            }
        }

        let mut changed = BTreeSet::new();
        for key in &dirty_ingresses {
            if self.unprogram(key) {
                changed.insert(key.clone());
            }
        }
        let mut todo: Vec<ObjectKey> = dirty_ingresses
            .iter()
            .filter(|k| self.ingresses.contains_key(*k))
            .cloned()
            .collect();
        // Hosts may have freed up: ingresses waiting on a conflict get another chance.
        todo.extend(
            self.not_programmed
                .keys()
                .filter(|k| !dirty_ingresses.contains(*k))
                .cloned(),
        );
        for key in todo {
            self.not_programmed.remove(&key);
            if self.program(&key) {
                changed.insert(key);
            }
        }

        for service in dirty_services {
            // The backends of one Service are contiguous in key order (Int ports sort first).
            let first = BackendKey {
                namespace: service.0.clone(),
                service: service.1.clone(),
                port: knarr_model::IntOrString::Int(i64::MIN),
            };
            let keys: Vec<BackendKey> = self
                .backend_users
                .range(first..)
                .map(|(k, _)| k)
                .take_while(|b| b.namespace == service.0 && b.service == service.1)
                .cloned()
                .collect();
            for key in keys {
                self.put_backend(&key);
            }
        }
        for secret in dirty_secrets {
            self.put_secret(&format!("{}/{}", secret.0, secret.1));
        }
        self.rebuild_listeners();
        changed
    }

    /// Removes an ingress's resources. True if it had any.
    fn unprogram(&mut self, key: &ObjectKey) -> bool {
        self.not_programmed.remove(key);
        let Some(old) = self.programmed.remove(key) else {
            return false;
        };
        let t = old;
        for rc in &t.route_configs {
            self.builder.remove(ResourceType::Route, rc);
        }
        for scope in &t.scopes {
            self.builder.remove(ResourceType::ScopedRoute, scope);
        }
        for claim in &t.claims {
            if self.owners.get(claim) == Some(key) {
                self.owners.remove(claim);
            }
        }
        for backend in &t.backends {
            if let Some(users) = self.backend_users.get_mut(backend) {
                users.retain(|u| u != key);
                if users.is_empty() {
                    self.backend_users.remove(backend);
                    let name = backend.cluster_name();
                    self.builder.remove(ResourceType::Cluster, &name);
                    self.builder.remove(ResourceType::Endpoint, &name);
                }
            }
        }
        self.tls_bindings.remove(key);
        for binding in &t.tls {
            if let Some(users) = self.secret_users.get_mut(&binding.secret) {
                users.remove(key);
                if users.is_empty() {
                    self.secret_users.remove(&binding.secret);
                    self.builder.remove(ResourceType::Secret, &binding.secret);
                }
            }
        }
        true
    }

    /// Translates and adds an ingress, unless one of its hosts belongs to another. True if
    /// programmed.
    fn program(&mut self, key: &ObjectKey) -> bool {
        let Some(ingress) = self.ingresses.get(key).map(|o| ingress_of(o)) else {
            return false;
        };
        let t = translate_ingress(ingress);
        if let Some((tag, host, owner)) = t.claims.iter().find_map(|c| {
            self.owners
                .get(c)
                .filter(|o| *o != key)
                .map(|o| (c.0, c.1.clone(), o.clone()))
        }) {
            self.not_programmed.insert(
                key.clone(),
                NotProgrammed {
                    reason: "DomainConflict",
                    message: format!(
                        "host {host:?} on the {tag} gateway is already served by {owner}"
                    ),
                },
            );
            return false;
        }
        for claim in &t.claims {
            self.owners.insert(claim.clone(), key.clone());
        }
        for rc in &t.route_configs {
            self.builder.insert(rc);
        }
        for scope in &t.scopes {
            self.builder.insert(scope);
        }
        for backend in &t.backends {
            let users = self.backend_users.entry(backend.clone()).or_default();
            let new = users.is_empty();
            if !users.contains(key) {
                users.push(key.clone());
            }
            if new {
                self.put_backend(backend);
            }
        }
        if !t.tls.is_empty() {
            self.tls_bindings.insert(key.clone(), t.tls.clone());
            for binding in &t.tls {
                let users = self.secret_users.entry(binding.secret.clone()).or_default();
                let new = users.is_empty();
                users.insert(key.clone());
                if new {
                    self.put_secret(&binding.secret);
                }
            }
        }
        self.programmed.insert(key.clone(), Programmed::of(t));
        true
    }

    fn put_backend(&mut self, key: &BackendKey) {
        let sn = (key.namespace.clone(), key.service.clone());
        let service = self.services.get(&sn).map(|o| service_of(o));
        let slices: Vec<&EndpointSlice> = self
            .slices
            .get(&sn)
            .map(|m| m.values().map(|o| slice_of(o)).collect())
            .unwrap_or_default();
        let cluster = backend_cluster(key, service);
        let endpoints = self.endpoints.get(&sn).map(|o| endpoints_of(o));
        let cla = backend_endpoints(key, service, endpoints, &slices);
        let eds = cluster.load_assignment.is_none();
        self.builder.insert(&cluster);
        if eds {
            self.builder.insert(&cla);
        } else {
            self.builder
                .remove(ResourceType::Endpoint, &key.cluster_name());
        }
    }

    fn put_secret(&mut self, name: &str) {
        if !self.secret_users.contains_key(name) {
            return;
        }
        let (ns, n) = name.split_once('/').unwrap_or(("", name));
        match self.secrets.get(&(ns.to_owned(), n.to_owned())) {
            Some(pair) => {
                self.builder.insert(&tls_secret(name, pair));
            }
            None => {
                self.builder.remove(ResourceType::Secret, name);
            }
        }
    }

    fn rebuild_listeners(&mut self) {
        let tls: Vec<TlsBinding> = self
            .tls_bindings
            .values()
            .flatten()
            .filter(|b| {
                let (ns, n) = b.secret.split_once('/').unwrap_or(("", &b.secret));
                self.secrets.contains_key(&(ns.to_owned(), n.to_owned()))
            })
            .cloned()
            .collect();
        if self.listeners_tls.as_ref() == Some(&tls) {
            return;
        }
        let wanted = listeners(&self.gateway, &tls);
        self.listeners_tls = Some(tls);
        let names: BTreeSet<&str> = wanted.iter().map(|l| l.name.as_str()).collect();
        for tag in [
            GatewayTag::External,
            GatewayTag::Internal,
            GatewayTag::ExternalTls,
            GatewayTag::InternalTls,
        ] {
            if !names.contains(tag.listener_name()) {
                self.builder
                    .remove(ResourceType::Listener, tag.listener_name());
            }
        }
        for listener in &wanted {
            self.builder.insert(listener);
        }
    }

    /// The state of every ingress of our class, for status.
    pub fn states(&self) -> Vec<IngressState> {
        self.ingresses
            .iter()
            .map(|(key, ingress)| self.state_of(key, ingress_of(ingress)))
            .collect()
    }

    pub fn state(&self, key: &ObjectKey) -> Option<IngressState> {
        self.ingresses
            .get(key)
            .map(|i| self.state_of(key, ingress_of(i)))
    }

    fn state_of(&self, key: &ObjectKey, ingress: &Ingress) -> IngressState {
        let programmed = self.programmed.get(key);
        let mut resources = Vec::new();
        let mut claims = Vec::new();
        let mut hash = String::new();
        if let Some(p) = programmed {
            let t = p;
            hash = t.hash.clone();
            claims = t.claims.clone();
            resources.extend(
                t.route_configs
                    .iter()
                    .map(|r| (ResourceType::Route, r.clone())),
            );
            resources.extend(
                t.scopes
                    .iter()
                    .map(|s| (ResourceType::ScopedRoute, s.clone())),
            );
            for b in &t.backends {
                resources.push((ResourceType::Cluster, b.cluster_name()));
            }
        }
        IngressState {
            key: key.clone(),
            generation: ingress.metadata.generation,
            hash,
            not_programmed: self.not_programmed.get(key).cloned(),
            resources,
            claims,
        }
    }

    /// Ingresses of our class that are not programmed (domain conflicts).
    pub fn not_programmed_count(&self) -> usize {
        self.not_programmed.len()
    }

    /// Number of ingresses of our class.
    pub fn len(&self) -> usize {
        self.ingresses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ingresses.is_empty()
    }

    /// The ingress objects of our class, as last applied.
    pub fn ingress(&self, key: &ObjectKey) -> Option<&Ingress> {
        self.ingresses.get(key).map(|o| ingress_of(o))
    }
}

/// Convenience: everything at once, for tests and one-shot tools.
pub fn translate_all(
    gateway: GatewayConfig,
    objects: Vec<Object>,
) -> (Snapshot, Vec<IngressState>) {
    let mut index = IngressIndex::new(gateway, ClassFilter::default());
    index.apply(objects.into_iter().map(|o| Change::Upsert(Arc::new(o))));
    (index.snapshot(), index.states())
}
