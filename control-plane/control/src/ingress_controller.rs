//! The loop between the source and the xDS cache: apply each batch of object changes to the
//! incremental ingress index, publish the next snapshot, and keep the source's errors for status.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use knarr_model::{Kind, ObjectKey};
use knarr_translate::reconcile::{IngressIndex, IngressState};
use knarr_xds::{Clients, Resource, ResourceType, SnapshotBuilder, SnapshotCache};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::prober::{ProbeResults, ProbeSource, Target};
use crate::routes_file::Routes;
use crate::source::{Batch, Origin, SourceError};
use crate::status::{self, GatewayAcks, IngressReport, LoadBalancerNames, Probe};
use knarr_translate::kingress::GatewayTag;

/// The controller's Prometheus metrics.
#[derive(Debug)]
struct ControllerMetrics {
    ingresses: Gauge,
    not_programmed: Gauge,
    source_errors: Gauge,
    publishes: Counter,
    publish_seconds: Histogram,
}

impl ControllerMetrics {
    fn new() -> Self {
        ControllerMetrics {
            ingresses: Gauge::default(),
            not_programmed: Gauge::default(),
            source_errors: Gauge::default(),
            publishes: Counter::default(),
            // 0.1 ms .. ~3 s
            publish_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        }
    }
}

/// Shared state of the ingress controller, read by the status API.
pub struct IngressController {
    metrics: ControllerMetrics,
    index: Mutex<IngressIndex>,
    /// Source errors, per origin (file or API object).
    errors: Mutex<BTreeMap<Origin, Vec<SourceError>>>,
    cache: Arc<SnapshotCache>,
    clients: Arc<Clients>,
    /// Static routes (`--routes` files) served alongside the ingresses.
    statics: Routes,
    names: Mutex<LoadBalancerNames>,
    /// Probe results, when probing is on.
    probes: Option<Arc<ProbeResults>>,
    /// Ingresses whose current version is not confirmed by probing yet.
    probe_pending: Mutex<std::collections::BTreeSet<ObjectKey>>,
    /// What activators follow (`knarr.activator.v1.Revision`), published with the ingresses;
    /// kept as a builder so that each publish takes the whole set in O(1).
    activator_revisions: Mutex<SnapshotBuilder>,
    /// How many batches have been applied (whoever fed a batch can wait for it).
    applied: watch::Sender<u64>,
    /// Gateways found by the source, when not the connected Envoys (see `set_gateways`).
    gateways: Mutex<Option<Vec<std::net::IpAddr>>>,
}

/// Wakes whoever waits on the gateways: an Envoy connected, left or ACKed, or a hash probe
/// confirmed an ingress.
pub struct GatewayChanges {
    clients: watch::Receiver<u64>,
    probes: Option<watch::Receiver<u64>>,
}

impl GatewayChanges {
    /// Waits for the next change; `false` once nothing can change any more.
    pub async fn changed(&mut self) -> bool {
        match &mut self.probes {
            Some(probes) => tokio::select! {
                r = self.clients.changed() => r.is_ok(),
                r = probes.changed() => r.is_ok(),
            },
            None => self.clients.changed().await.is_ok(),
        }
    }
}

impl IngressController {
    pub fn new(
        index: IngressIndex,
        cache: Arc<SnapshotCache>,
        clients: Arc<Clients>,
        statics: Routes,
        names: LoadBalancerNames,
    ) -> Self {
        IngressController {
            metrics: ControllerMetrics::new(),
            index: Mutex::new(index),
            errors: Mutex::new(BTreeMap::new()),
            cache,
            clients,
            statics,
            names: Mutex::new(names),
            probes: None,
            probe_pending: Mutex::new(Default::default()),
            activator_revisions: Mutex::new(SnapshotBuilder::default()),
            applied: watch::channel(0).0,
            gateways: Mutex::new(None),
        }
    }

    /// Registers `knarr_ingresses`, `knarr_ingresses_not_programmed`, `knarr_source_errors`,
    /// `knarr_config_publishes_total` and `knarr_config_publish_seconds`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.metrics;
        registry.register(
            "knarr_ingresses",
            "KIngresses of this class",
            m.ingresses.clone(),
        );
        registry.register(
            "knarr_ingresses_not_programmed",
            "KIngresses not programmed (e.g. a domain conflict)",
            m.not_programmed.clone(),
        );
        registry.register(
            "knarr_source_errors",
            "Problems the sources currently report (broken files, invalid objects)",
            m.source_errors.clone(),
        );
        registry.register(
            "knarr_config_publishes",
            "Snapshots published after source changes",
            m.publishes.clone(),
        );
        registry.register(
            "knarr_config_publish_seconds",
            "Time to apply a batch of source changes and publish the snapshot",
            m.publish_seconds.clone(),
        );
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let (total, not_programmed) = {
            let index = self.index.lock().unwrap();
            (index.len(), index.not_programmed_count())
        };
        self.metrics.ingresses.set(total as i64);
        self.metrics.not_programmed.set(not_programmed as i64);
        let errors: usize = self.errors.lock().unwrap().values().map(Vec::len).sum();
        self.metrics.source_errors.set(errors as i64);
    }

    /// Turns hash probing on: readiness then also waits for the probes.
    pub fn with_probes(mut self, probes: Arc<ProbeResults>) -> Self {
        self.probes = Some(probes);
        self
    }

    /// Ingresses every Envoy has ACKed whose current hash is not yet confirmed by probing.
    /// Only ingresses changed since their last confirmation are looked at (not all of them on
    /// every round).
    pub fn probe_targets(&self) -> Vec<Target> {
        let Some(probes) = &self.probes else {
            return Vec::new();
        };
        let index = self.index.lock().unwrap();
        let snapshot = self.cache.get(knarr_xds::DEFAULT_GROUP).unwrap_or_default();
        let mut pending = self.probe_pending.lock().unwrap();
        let mut targets = Vec::new();
        pending.retain(|key| {
            let Some(s) = index.state(key) else {
                return false;
            };
            if s.not_programmed.is_some() || probes.confirmed(&s.key, &s.hash) {
                return false;
            }
            if self.acks(&s, &snapshot).acked == Some(true) {
                targets.push(Target {
                    hosts: s
                        .claims
                        .iter()
                        .filter(|(tag, _)| {
                            matches!(tag, GatewayTag::External | GatewayTag::Internal)
                        })
                        .cloned()
                        .collect(),
                    key: s.key,
                    hash: s.hash,
                });
            }
            true
        });
        targets
    }

    /// Every ingress must be confirmed again (the set of gateways changed).
    pub fn reprobe_all(&self) {
        if let Some(probes) = &self.probes {
            probes.clear();
            let index = self.index.lock().unwrap();
            let mut pending = self.probe_pending.lock().unwrap();
            pending.extend(index.states().into_iter().map(|s| s.key));
        }
    }

    /// Where the connected Envoys are.
    fn gateway_ips(&self) -> Vec<std::net::IpAddr> {
        if let Some(gateways) = &*self.gateways.lock().unwrap() {
            return gateways.clone();
        }
        let mut ips: Vec<_> = self
            .clients
            .list()
            .into_iter()
            .filter(|c| c.gateway)
            .filter_map(|c| c.peer.map(|p| p.ip()))
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }

    /// Applies one batch and publishes the result.
    pub fn apply(&self, batch: Batch) {
        let started = Instant::now();
        {
            let mut errors = self.errors.lock().unwrap();
            for origin in &batch.cleared {
                errors.remove(origin);
            }
            let mut fresh: BTreeMap<Origin, Vec<SourceError>> = BTreeMap::new();
            for e in batch.errors {
                fresh.entry(e.origin.clone()).or_default().push(e);
            }
            errors.extend(fresh);
        }
        if batch.changes.is_empty() {
            self.update_gauges();
            self.applied.send_modify(|n| *n += 1);
            return;
        }
        let count = batch.changes.len();
        let snapshot = {
            let mut index = self.index.lock().unwrap();
            let changed = index.apply(batch.changes);
            if self.probes.is_some() {
                self.probe_pending
                    .lock()
                    .unwrap()
                    .extend(changed.iter().cloned());
            }
            debug!(
                objects = count,
                ingresses = changed.len(),
                "applied changes"
            );
            self.compose(&index)
        };
        let published = self.cache.set_default(snapshot);
        self.metrics.publishes.inc();
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        self.update_gauges();
        self.applied.send_modify(|n| *n += 1);
        info!(
            objects = count,
            generation = published.generation(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "config published"
        );
    }

    /// The index's snapshot plus any static routes and activator revisions.
    fn compose(&self, index: &IngressIndex) -> knarr_xds::Snapshot {
        let activator = self.activator_revisions.lock().unwrap();
        let activators = activator.resources(ResourceType::ActivatorRevision);
        if self.statics.gateways.is_empty()
            && self.statics.backends.is_empty()
            && activators.is_empty()
        {
            return index.snapshot();
        }
        let mut builder: SnapshotBuilder = index.snapshot().to_builder();
        knarr_translate::add_to(&mut builder, &self.statics.gateways, &self.statics.backends);
        builder.set_type_from(ResourceType::ActivatorRevision, &activator);
        builder.build()
    }

    /// Changes what activators follow (by `namespace/name`; `None` removes), publishing if
    /// anything changed.
    pub fn update_activator_revisions(&self, changes: Vec<(String, Option<Arc<Resource>>)>) {
        if changes.is_empty() {
            return;
        }
        {
            let mut current = self.activator_revisions.lock().unwrap();
            for (name, resource) in changes {
                match resource {
                    Some(resource) => {
                        current.insert_resource(ResourceType::ActivatorRevision, resource)
                    }
                    None => current.remove(ResourceType::ActivatorRevision, &name),
                };
            }
        }
        self.publish();
    }

    /// Whether every gateway serves the ingress `key` as last applied (ACKed and, with
    /// probing, confirmed).
    pub fn ingress_ready(&self, key: &ObjectKey) -> bool {
        self.report(key).is_some_and(|r| r.is_ready())
    }

    /// The number of batches applied so far, and every change of it: the n-th batch fed (the
    /// first load counts) is in the index and published once this reaches n.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Subscribes to what moves the gateways' readiness (ACKs, probes).
    pub fn gateway_changes(&self) -> GatewayChanges {
        GatewayChanges {
            clients: self.clients.subscribe(),
            probes: self.probes.as_ref().map(|p| p.subscribe()),
        }
    }

    /// Whether every connected gateway holds the current endpoints of every cluster of the
    /// Service `namespace/service`; `None` without a gateway or without such a cluster.
    pub fn endpoints_acked(&self, namespace: &str, service: &str) -> Option<bool> {
        let snapshot = self.cache.get(knarr_xds::DEFAULT_GROUP)?;
        let prefix = format!("{namespace}/{service}:");
        let wanted: Vec<(ResourceType, &str, &str)> = snapshot
            .resources(ResourceType::Endpoint)
            .range(prefix.clone()..)
            .take_while(|(name, _)| name.starts_with(&prefix))
            .map(|(name, r)| (ResourceType::Endpoint, name.as_str(), r.version.as_str()))
            .collect();
        if wanted.is_empty() {
            return None;
        }
        self.clients.all_hold(&wanted)
    }

    /// Publishes the current state (used at startup, even with nothing loaded).
    pub fn publish(&self) {
        let index = self.index.lock().unwrap();
        self.cache.set_default(self.compose(&index));
    }

    /// Runs until the source closes or `shutdown` turns true.
    pub async fn run(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Batch>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                batch = rx.recv() => match batch {
                    Some(batch) => self.apply(batch),
                    None => return,
                },
                () = knarr_xds::server::stopped(&mut shutdown) => return,
            }
        }
    }

    /// The report of one ingress: of our class and loaded, or rejected by the source (`None`:
    /// neither, e.g. deleted or of another class).
    pub fn report(&self, key: &ObjectKey) -> Option<IngressReport> {
        let error = self.error_of(key);
        let index = self.index.lock().unwrap();
        let Some(state) = index.state(key) else {
            return error.map(|e| status::invalid_report(key, &e));
        };
        let snapshot = self.cache.get(knarr_xds::DEFAULT_GROUP).unwrap_or_default();
        Some(status::report(
            &state,
            self.acks(&state, &snapshot),
            self.probe_of(&state),
            error.as_deref(),
            &self.names.lock().unwrap(),
        ))
    }

    /// The gateways' ACKs of an ingress: of the connected Envoys, or, with gateways found
    /// elsewhere ([`set_gateways`](Self::set_gateways)), left to the probes.
    fn acks(&self, state: &IngressState, snapshot: &knarr_xds::Snapshot) -> GatewayAcks {
        match &*self.gateways.lock().unwrap() {
            Some(gateways) => GatewayAcks::probed_only(gateways.len()),
            None => GatewayAcks::connected(state, snapshot, &self.clients),
        }
    }

    /// Where the gateways are, when something other than the xDS connections says so (in a
    /// cluster, the ready pods behind the gateway Service: Envoys connect to any replica, and
    /// the leader must probe them all). `None`: the Envoys connected here.
    pub fn set_gateways(&self, gateways: Option<Vec<std::net::IpAddr>>) {
        let mut current = self.gateways.lock().unwrap();
        if *current != gateways {
            info!(?gateways, "gateways");
            *current = gateways;
        }
    }

    /// Which ingress classes are programmed from now on (see [`IngressIndex::set_classes`]).
    pub fn set_classes(&self, classes: knarr_translate::reconcile::ClassFilter) {
        self.index.lock().unwrap().set_classes(classes);
    }

    /// The gateway names statuses report from now on.
    pub fn set_names(&self, names: LoadBalancerNames) {
        *self.names.lock().unwrap() = names;
    }

    fn probe_of(&self, state: &IngressState) -> Probe {
        match &self.probes {
            None => Probe::Off,
            Some(p) if p.confirmed(&state.key, &state.hash) => Probe::Confirmed,
            Some(_) => Probe::Pending,
        }
    }

    /// Every ingress: of our class and loaded, or rejected by the source.
    pub fn reports(&self) -> Vec<IngressReport> {
        let errors = self.object_errors();
        let index = self.index.lock().unwrap();
        let snapshot = self.cache.get(knarr_xds::DEFAULT_GROUP).unwrap_or_default();
        let mut out: Vec<IngressReport> = index
            .states()
            .iter()
            .map(|state| {
                status::report(
                    state,
                    self.acks(state, &snapshot),
                    self.probe_of(state),
                    errors.get(&state.key).map(String::as_str),
                    &self.names.lock().unwrap(),
                )
            })
            .collect();
        for (key, error) in &errors {
            if key.kind == Kind::Ingress && index.ingress(key).is_none() {
                out.push(status::invalid_report(key, error));
            }
        }
        out.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        out
    }

    /// Errors that name an object, by object.
    fn object_errors(&self) -> BTreeMap<ObjectKey, String> {
        let errors = self.errors.lock().unwrap();
        let mut out = BTreeMap::new();
        for e in errors.values().flatten() {
            if let Some(key) = &e.object {
                out.insert(key.clone(), e.message.clone());
            }
        }
        out
    }

    /// The source's error about one object: an API object's own, or one a file names.
    fn error_of(&self, key: &ObjectKey) -> Option<String> {
        let errors = self.errors.lock().unwrap();
        if let Some(e) = errors
            .get(&Origin::Object(key.clone()))
            .and_then(|e| e.last())
        {
            return Some(e.message.clone());
        }
        errors
            .values()
            .flatten()
            .rfind(|e| e.object.as_ref() == Some(key))
            .map(|e| e.message.clone())
    }

    /// Every source error, as messages.
    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap()
            .values()
            .flatten()
            .map(|e| e.message.clone())
            .collect()
    }

    /// Number of ingresses programmed or known.
    pub fn ingress_count(&self) -> usize {
        self.index.lock().unwrap().len()
    }
}

/// Logs a batch's errors (the file source already warns; this covers the first load summary).
pub fn log_load(batch: &Batch) {
    if !batch.errors.is_empty() {
        warn!(
            errors = batch.errors.len(),
            "some objects could not be loaded; see messages above"
        );
    }
}

impl ProbeSource for IngressController {
    fn targets(&self) -> Vec<Target> {
        self.probe_targets()
    }

    fn gateways(&self) -> Vec<std::net::IpAddr> {
        self.gateway_ips()
    }

    fn reprobe_all(&self) {
        IngressController::reprobe_all(self)
    }
}
