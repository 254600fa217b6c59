//! `knarr up`'s serving controller: Knative Services, Configurations and Routes as users apply
//! them (watched files and `knarr apply`), turned into Revisions, pods on a [`Runtime`], and the
//! KIngresses, Services and Endpoints the ingress controller programs Envoy with.
//!
//! Level-triggered, like Knative's controllers: every pass reads what users applied, what the
//! runtime reports and what the gateway has ACKed, and derives everything else with the pure
//! reconcilers of `knarr_translate::serving`. What users applied is the only input that is
//! stored; Revisions are the only derived objects that are kept (they are immutable, and their
//! names are history).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use knarr_autoscaler::{
    AutoscalerConfig, RevisionAutoscaler, RevisionScaling, Sample, ServeMode, Tick, TickInput,
};
use knarr_model::serving::{
    condition_status, parse_serving_documents, Condition, ConditionStatus, Configuration, Revision,
    RevisionStatus, Route, RouteStatus, Service, ServingDocument, ServingKey, ServingKind,
    ServingObject, CONDITION_READY, INITIAL_SCALE_ANNOTATION, MAX_SCALE_ANNOTATION,
    MIN_SCALE_ANNOTATION, SERVICE_LABEL,
};
use knarr_model::{
    Document, EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Ingress, IntOrString, Kind,
    Object, ObjectKey, ObjectMeta, Service as K8sService, ServicePort, ServiceSpec,
};
use knarr_proto::activator::{
    Endpoint as ActivatorEndpoint, Revision as ActivatorRevision, RevisionStats,
};
use knarr_proto::Stat;
use knarr_runtime::{Phase, PodStatus, RevisionRef, Runtime};
use knarr_translate::serving::{
    configuration_revision, configuration_status, latest_created_revision, route_status,
    route_to_ingress, service_status, service_to_children, REVISION_H2C_PORT, REVISION_HTTP_PORT,
};
use knarr_xds::Resource;
use prost::Message as _;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::file_source::{Batch, Change};
use crate::ingress_controller::IngressController;

/// Revision conditions besides `Ready` (Knative's names).
const CONDITION_ACTIVE: &str = "Active";
const CONDITION_CONTAINER_HEALTHY: &str = "ContainerHealthy";
const CONDITION_RESOURCES_AVAILABLE: &str = "ResourcesAvailable";

/// What `knarr apply` did with one object, as kubectl says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// `Service`, `Configuration` or `Route`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// `created`, `configured` or `unchanged`.
    pub outcome: &'static str,
}

/// One pod, as the status API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    pub namespace: String,
    pub revision: String,
    pub name: String,
    /// `Starting`, `Ready`, `Terminating` or `Failed`.
    pub phase: String,
    /// The queue-proxy's address (what the revision's endpoints point at).
    pub address: String,
    pub restarts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The pod's log file (app and queue-proxy output).
    pub log_path: String,
    /// The user's process and the queue-proxy, while they run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_proxy_pid: Option<u32>,
}

/// A line of `knarr up`'s live status: one Knative Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSummary {
    pub namespace: String,
    pub name: String,
    pub url: String,
    /// `Ready`, or the reason it is not.
    pub ready: String,
    /// `(revision, ready pods, pods)`, newest first.
    pub revisions: Vec<(String, usize, usize)>,
    /// `(revision, percent, tag)`.
    pub traffic: Vec<(String, i64, String)>,
}

/// How long the controller waits between passes while something is still settling (a revision
/// starting, Envoy not yet ACKing), and once everything is steady.
const SETTLING_POLL: Duration = Duration::from_millis(100);
const STEADY_POLL: Duration = Duration::from_secs(1);

/// The queue-proxy ports a revision's Kubernetes Service targets (HTTP/1 and h2c); locally every
/// pod serves both on its one serving port, which the Endpoints name.
const QUEUE_HTTP_PORT: i64 = 8012;
const QUEUE_H2C_PORT: i64 = 8013;
/// How often each ready pod's queue-proxy is read, and how long a read may take.
const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(500);

/// One pod's `Stat` from its queue-proxy's metrics port.
async fn scrape_one(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
) -> anyhow::Result<Stat> {
    let uri: http::Uri = format!("http://{addr}/metrics").parse()?;
    let response = tokio::time::timeout(SCRAPE_TIMEOUT, client.get(uri)).await??;
    anyhow::ensure!(response.status().is_success(), "{}", response.status());
    let body = tokio::time::timeout(SCRAPE_TIMEOUT, response.into_body().collect())
        .await??
        .to_bytes();
    Ok(Stat::decode(body)?)
}

/// Labels the revision's Kubernetes Service and Endpoints with their Revision.
const REVISION_LABEL: &str = "serving.knative.dev/revision";

/// See the module docs.
pub struct ServingController {
    domain: String,
    ingress: Arc<IngressController>,
    runtime: Arc<dyn Runtime>,
    /// With autoscaling (`knarr up`'s default): Knative's KPA decides each revision's pods and
    /// whether the gateway goes to them or through the activators. Without, a routed revision
    /// runs its initial scale and is always served directly.
    autoscaling: Option<AutoscalerConfig>,
    /// Where the activators listen (set once they are up).
    activators: Mutex<Vec<SocketAddr>>,
    state: Mutex<State>,
    /// Wakes the loop after an apply or delete.
    wake: Notify,
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    /// What users applied (files and `knarr apply`): Services, Configurations, Routes, with
    /// the generation the store gave them (bumped when the spec changes).
    applied: BTreeMap<ServingKey, ServingObject>,
    /// Generations of the Configurations and Routes that Services own, with the spec each was
    /// last given for.
    child_generations: BTreeMap<ServingKey, (i64, serde_json::Value)>,
    /// Every Revision stamped and not collected, by key. Immutable once stamped.
    revisions: BTreeMap<ServingKey, Revision>,
    /// Revisions that have had a ready pod: Knative keeps a Revision `Ready` once it has been.
    ever_ready: BTreeSet<ServingKey>,
    /// Replicas last asked of the runtime, per revision.
    scaled: BTreeMap<ServingKey, usize>,
    /// Why a revision cannot run here (the runtime refused it).
    cannot_run: BTreeMap<ServingKey, String>,
    /// The KIngress last made from each Route; kept while the Route's traffic cannot be
    /// resolved (last good config wins).
    ingresses: BTreeMap<ServingKey, Ingress>,
    /// The KIngress of each Route that the gateway has been seen serving: it stays ready while
    /// only its backends' endpoints change.
    ingress_ready: BTreeMap<ServingKey, Ingress>,
    /// What the ingress controller was given.
    published: BTreeMap<ObjectKey, Arc<Object>>,
    /// Applied objects the last pass could not use (a Configuration or Route that clashes with
    /// a Service's own), by key.
    conflicts: BTreeMap<ServingKey, String>,
    /// What the last pass computed: every object with its status.
    view: View,
    /// The autoscaler of each revision (with autoscaling on).
    scalers: BTreeMap<ServingKey, Scaler>,
    /// Watched manifests refused (an update Knative's webhook would refuse); the previous
    /// version stays. Cleared when the object is accepted or deleted.
    refused: BTreeMap<ServingKey, String>,
}

/// One revision's autoscaler and what it last decided.
struct Scaler {
    autoscaler: RevisionAutoscaler,
    last: Option<(Instant, Tick)>,
    /// An activator poked: tick now rather than at the next interval.
    poked: bool,
    /// Since when every gateway holds the endpoints that point at the activators.
    proxy_since: Option<Instant>,
}

#[derive(Default, Clone, PartialEq)]
struct View {
    services: Vec<Service>,
    configurations: Vec<Configuration>,
    revisions: Vec<Revision>,
    routes: Vec<Route>,
    /// Pods per revision key.
    pods: BTreeMap<ServingKey, Vec<PodStatus>>,
}

impl ServingController {
    pub fn new(
        domain: impl Into<String>,
        ingress: Arc<IngressController>,
        runtime: Arc<dyn Runtime>,
    ) -> Arc<Self> {
        Self::build(domain.into(), ingress, runtime, None)
    }

    /// With Knative's KPA autoscaler configured by `config` (and the activators, once they
    /// are known: [`ServingController::set_activators`]).
    pub fn with_autoscaling(
        domain: impl Into<String>,
        ingress: Arc<IngressController>,
        runtime: Arc<dyn Runtime>,
        config: AutoscalerConfig,
    ) -> Arc<Self> {
        Self::build(domain.into(), ingress, runtime, Some(config))
    }

    fn build(
        domain: String,
        ingress: Arc<IngressController>,
        runtime: Arc<dyn Runtime>,
        autoscaling: Option<AutoscalerConfig>,
    ) -> Arc<Self> {
        Arc::new(ServingController {
            domain,
            ingress,
            runtime,
            autoscaling,
            activators: Mutex::new(Vec::new()),
            state: Mutex::default(),
            wake: Notify::new(),
            changes: watch::Sender::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes read from watched files (only `Object::Serving` upserts and `Kind::Serving`
    /// deletes; others are ignored). Returns the objects refused, as messages (an update that
    /// Knative's webhook would refuse keeps the previous version).
    pub fn apply_changes(&self, changes: Vec<Change>) -> Vec<String> {
        let mut refused = Vec::new();
        {
            let mut state = self.lock();
            for change in changes {
                match change {
                    Change::Upsert(object) => {
                        if let Object::Serving(object) = &*object {
                            let checked = self
                                .check_autoscaling(object)
                                .and_then(|()| state.upsert((**object).clone()));
                            match checked {
                                Ok(()) => {
                                    state.refused.remove(&object.key());
                                }
                                Err(e) => {
                                    state.refused.insert(object.key(), e.clone());
                                    refused.push(e);
                                }
                            }
                        }
                    }
                    Change::Delete(key) => {
                        if let Kind::Serving(kind) = key.kind {
                            let key = ServingKey::new(kind, &key.namespace, &key.name);
                            state.applied.remove(&key);
                            state.refused.remove(&key);
                        }
                    }
                }
            }
        }
        self.wake.notify_one();
        refused
    }

    /// `knarr apply`: every serving document of `text` (named `file` in errors), all or none.
    /// Relative or missing `workingDir`s are resolved against `base_dir`. Errors are complete
    /// messages (`file:line: Service default/hello: spec.template...: reason`).
    pub fn apply_manifest(
        &self,
        file: &str,
        text: &str,
        base_dir: Option<&Path>,
    ) -> Result<Vec<Applied>, Vec<String>> {
        let mut objects = Vec::new();
        let mut errors = Vec::new();
        for document in parse_serving_documents(file, text) {
            match document {
                ServingDocument::Object { mut object, line } => {
                    if let Some(base) = base_dir {
                        resolve_working_dirs(&mut object, base);
                    }
                    objects.push((object, line));
                }
                ServingDocument::Error(e) => errors.push(e.to_string()),
                ServingDocument::Other(Document::Object { object, line }) => errors.push(format!(
                    "{file}:{line}: {}: knarr apply takes Knative Services, Configurations and \
                     Routes (serving.knative.dev/v1); put other objects in a folder `knarr up` watches",
                    object.key()
                )),
                ServingDocument::Other(Document::Foreign {
                    api_version,
                    kind,
                    line,
                    ..
                }) => errors.push(format!(
                    "{file}:{line}: {kind} ({api_version}) is not something knarr apply knows; \
                     it takes serving.knative.dev/v1 Services, Configurations and Routes"
                )),
                ServingDocument::Other(Document::Error(e)) => errors.push(e.to_string()),
                ServingDocument::Other(Document::Untyped { line, .. }) => errors.push(format!(
                    "{file}:{line}: the document has no apiVersion and kind"
                )),
            }
        }
        if objects.is_empty() && errors.is_empty() {
            errors.push(format!("{file}: no objects in it"));
        }
        let mut state = self.lock();
        // Check everything first: all or none.
        let mut seen = BTreeSet::new();
        for (object, line) in &objects {
            let key = object.key();
            if !seen.insert(key.clone()) {
                errors.push(format!("{file}:{line}: {key}: defined twice"));
            }
            if let Err(e) = state
                .check(object)
                .and_then(|()| self.check_autoscaling(object))
            {
                errors.push(format!("{file}:{line}: {e}"));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut applied = Vec::new();
        for (object, _) in objects {
            let key = object.key();
            let outcome = match state.applied.get(&key) {
                None => "created",
                Some(old) if same_content(old, &object) => "unchanged",
                Some(_) => "configured",
            };
            // Checked above, under the same lock.
            let _ = state.upsert(object);
            applied.push(Applied {
                kind: key.kind.as_str().to_owned(),
                namespace: key.namespace,
                name: key.name,
                outcome,
            });
        }
        drop(state);
        self.wake.notify_one();
        Ok(applied)
    }

    /// The template's `autoscaling.knative.dev/*` annotations, checked as the autoscaler reads
    /// them (with autoscaling on): `Service default/x: spec.template.metadata.annotations[…]: …`.
    fn check_autoscaling(&self, object: &ServingObject) -> Result<(), String> {
        let Some(config) = &self.autoscaling else {
            return Ok(());
        };
        let template = match object {
            ServingObject::Service(s) => &s.spec.template,
            ServingObject::Configuration(c) => &c.spec.template,
            _ => return Ok(()),
        };
        RevisionScaling::from_annotations(
            &template.metadata.annotations,
            template.spec.container_concurrency(),
            config,
        )
        .map(|_| ())
        .map_err(|e| format!("{}: spec.template.{}: {}", object.key(), e.field, e.reason))
    }

    /// Deletes an object users applied. `Err` says why not (not found; owned by a Service).
    pub fn delete(&self, key: &ServingKey) -> Result<(), DeleteError> {
        let mut state = self.lock();
        if state.applied.remove(key).is_some() {
            drop(state);
            self.wake.notify_one();
            return Ok(());
        }
        let owner = match key.kind {
            ServingKind::Configuration => state
                .view
                .configurations
                .iter()
                .find(|c| c.metadata.namespace == key.namespace && c.metadata.name == key.name)
                .and_then(|c| c.metadata.labels.get(SERVICE_LABEL).cloned()),
            ServingKind::Route => state
                .view
                .routes
                .iter()
                .find(|r| r.metadata.namespace == key.namespace && r.metadata.name == key.name)
                .and_then(|r| r.metadata.labels.get(SERVICE_LABEL).cloned()),
            ServingKind::Revision => state
                .revisions
                .get(key)
                .and_then(|r| r.configuration().map(|c| format!("configuration {c}"))),
            ServingKind::Service => None,
        };
        match owner {
            Some(owner) => Err(DeleteError::Owned(key.clone(), owner)),
            None => Err(DeleteError::NotFound(key.clone())),
        }
    }

    /// Every object of `kind` as a manifest with its status, sorted by namespace and name.
    pub fn list(&self, kind: ServingKind) -> Vec<serde_json::Value> {
        let state = self.lock();
        let view = &state.view;
        let objects: Vec<ServingObject> = match kind {
            ServingKind::Service => view
                .services
                .iter()
                .cloned()
                .map(ServingObject::Service)
                .collect(),
            ServingKind::Configuration => view
                .configurations
                .iter()
                .cloned()
                .map(ServingObject::Configuration)
                .collect(),
            ServingKind::Revision => view
                .revisions
                .iter()
                .cloned()
                .map(ServingObject::Revision)
                .collect(),
            ServingKind::Route => view
                .routes
                .iter()
                .cloned()
                .map(ServingObject::Route)
                .collect(),
        };
        objects.iter().map(ServingObject::manifest).collect()
    }

    /// The pods of a Service (all its revisions), Configuration or Revision named `name`
    /// (tried in that order); `None` when there is no such object.
    pub fn pods(&self, namespace: &str, name: &str) -> Option<Vec<PodInfo>> {
        let state = self.lock();
        let view = &state.view;
        let in_ns = |m: &ObjectMeta| m.namespace == namespace;
        let revisions: Vec<&Revision> = if view
            .services
            .iter()
            .any(|s| in_ns(&s.metadata) && s.metadata.name == name)
        {
            view.revisions
                .iter()
                .filter(|r| {
                    in_ns(&r.metadata)
                        && r.metadata.labels.get(SERVICE_LABEL).map(String::as_str) == Some(name)
                })
                .collect()
        } else if view
            .configurations
            .iter()
            .any(|c| in_ns(&c.metadata) && c.metadata.name == name)
        {
            view.revisions
                .iter()
                .filter(|r| in_ns(&r.metadata) && r.configuration() == Some(name))
                .collect()
        } else {
            let found: Vec<&Revision> = view
                .revisions
                .iter()
                .filter(|r| in_ns(&r.metadata) && r.metadata.name == name)
                .collect();
            if found.is_empty() {
                return None;
            }
            found
        };
        let mut out = Vec::new();
        for revision in revisions {
            let key = revision_key(revision);
            for pod in view.pods.get(&key).into_iter().flatten() {
                out.push(PodInfo {
                    namespace: key.namespace.clone(),
                    revision: key.name.clone(),
                    name: pod.name.clone(),
                    phase: pod.phase.to_string(),
                    address: pod.address.to_string(),
                    restarts: pod.restarts,
                    last_error: pod.last_error.clone(),
                    log_path: pod.log_path.display().to_string(),
                    app_pid: pod.app_pid,
                    queue_proxy_pid: pod.queue_proxy_pid,
                });
            }
        }
        Some(out)
    }

    /// One summary per Knative Service, sorted.
    pub fn summaries(&self) -> Vec<ServiceSummary> {
        let state = self.lock();
        let view = &state.view;
        view.services
            .iter()
            .map(|service| {
                let status = service.status.clone().unwrap_or_default();
                let ready = status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == CONDITION_READY);
                let ready = match ready {
                    Some(c) if c.status == ConditionStatus::True => "Ready".to_owned(),
                    Some(c) if !c.message.is_empty() => c.message.clone(),
                    Some(c) if !c.reason.is_empty() => c.reason.clone(),
                    _ => "NotReady".to_owned(),
                };
                let mut revisions: Vec<(String, usize, usize)> = view
                    .revisions
                    .iter()
                    .filter(|r| {
                        r.metadata.namespace == service.metadata.namespace
                            && r.metadata.labels.get(SERVICE_LABEL) == Some(&service.metadata.name)
                    })
                    .filter_map(|r| {
                        let pods = view.pods.get(&revision_key(r))?;
                        let live: Vec<&PodStatus> = pods
                            .iter()
                            .filter(|p| p.phase != Phase::Terminating)
                            .collect();
                        if live.is_empty() {
                            return None;
                        }
                        let ready = live.iter().filter(|p| p.phase == Phase::Ready).count();
                        Some((r.metadata.name.clone(), ready, live.len()))
                    })
                    .collect();
                revisions.reverse();
                ServiceSummary {
                    namespace: service.metadata.namespace.clone(),
                    name: service.metadata.name.clone(),
                    url: status.url.clone(),
                    ready,
                    revisions,
                    traffic: status
                        .traffic
                        .iter()
                        .map(|t| {
                            (
                                t.revision_name.clone(),
                                t.percent.unwrap_or(0),
                                t.tag.clone(),
                            )
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Watched manifests refused by the update checks (the previous version is running).
    pub fn errors(&self) -> Vec<String> {
        self.lock().refused.values().cloned().collect()
    }

    /// Bumped whenever any status changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Where the activators listen: proxy-mode endpoints point there.
    pub fn set_activators(&self, activators: Vec<SocketAddr>) {
        *self
            .activators
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = activators;
        self.wake.notify_one();
    }

    /// One report from an activator: load for the revision's autoscaler; a poke ticks it at
    /// once (scale from zero starts now, not at the next tick).
    pub fn record_activator_stats(&self, stats: &RevisionStats) {
        let key = ServingKey::new(ServingKind::Revision, &stats.namespace, &stats.revision);
        let mut state = self.lock();
        let Some(scaler) = state.scalers.get_mut(&key) else {
            return;
        };
        let now = Instant::now();
        if stats.poke {
            scaler.autoscaler.record(now, Sample::POKE);
            scaler.poked = true;
            drop(state);
            debug!(revision = %key, "poked by an activator");
            self.wake.notify_one();
        } else {
            scaler.autoscaler.record(
                now,
                Sample::from_activator(stats.average_concurrency, stats.request_count),
            );
        }
    }

    /// Feeds activators' reports to the autoscalers until the channel closes.
    pub async fn follow_activator_stats(self: Arc<Self>, mut stats: mpsc::Receiver<RevisionStats>) {
        while let Some(report) = stats.recv().await {
            self.record_activator_stats(&report);
        }
    }

    /// Every second, reads each ready pod's queue-proxy `Stat` and records it, until `shutdown`.
    pub async fn scrape(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let mut interval = tokio::time::interval(SCRAPE_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                () = knarr_xds::server::stopped(&mut shutdown) => return,
            }
            let targets: Vec<(ServingKey, SocketAddr)> = {
                let state = self.lock();
                state
                    .view
                    .pods
                    .iter()
                    .filter(|(key, _)| state.scalers.contains_key(*key))
                    .flat_map(|(key, pods)| {
                        pods.iter()
                            .filter(|p| p.phase == Phase::Ready)
                            .filter_map(|p| p.metrics_address.map(|a| (key.clone(), a)))
                    })
                    .collect()
            };
            let reads = targets.into_iter().map(|(key, addr)| {
                let client = client.clone();
                async move { (key, scrape_one(&client, addr).await) }
            });
            let results = futures::future::join_all(reads).await;
            let now = Instant::now();
            let mut state = self.lock();
            for (key, result) in results {
                match result {
                    Ok(stat) => {
                        if let Some(scaler) = state.scalers.get_mut(&key) {
                            scaler.autoscaler.record(
                                now,
                                Sample::from_queue_proxy(
                                    stat.average_concurrent_requests,
                                    stat.average_proxied_concurrent_requests,
                                    stat.request_count,
                                    stat.proxied_request_count,
                                ),
                            );
                        }
                    }
                    Err(e) => debug!(revision = %key, error = %e, "scrape failed"),
                }
            }
        }
    }

    /// Reconciles on every change (applies, pods, the gateway's ACKs) until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut pods = self.runtime.subscribe();
        loop {
            let settled = self.reconcile();
            let poll = if settled { STEADY_POLL } else { SETTLING_POLL };
            tokio::select! {
                () = self.wake.notified() => {}
                changed = pods.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(poll) => {}
                () = knarr_xds::server::stopped(&mut shutdown) => return,
            }
        }
    }

    /// One pass; returns whether everything is settled (every revision that should run is
    /// ready, every ingress is ready).
    pub fn reconcile(&self) -> bool {
        let mut state = self.lock();
        let state = &mut *state;

        // Configurations and Routes: the ones applied, and the ones Services own.
        let mut configs: BTreeMap<ServingKey, Configuration> = BTreeMap::new();
        let mut routes: BTreeMap<ServingKey, Route> = BTreeMap::new();
        let mut services: Vec<Service> = Vec::new();
        for object in state.applied.values() {
            match object {
                ServingObject::Configuration(c) => {
                    configs.insert(key_of(ServingKind::Configuration, &c.metadata), c.clone());
                }
                ServingObject::Route(r) => {
                    routes.insert(key_of(ServingKind::Route, &r.metadata), r.clone());
                }
                ServingObject::Service(s) => services.push(s.clone()),
                ServingObject::Revision(_) => {}
            }
        }
        state.conflicts.clear();
        let mut live_children = BTreeSet::new();
        for service in &services {
            let (mut config, mut route) = service_to_children(service);
            let config_key = key_of(ServingKind::Configuration, &config.metadata);
            let route_key = key_of(ServingKind::Route, &route.metadata);
            config.metadata.generation = Some(state.child_generation(&config_key, &config.spec));
            route.metadata.generation = Some(state.child_generation(&route_key, &route.spec));
            for key in [&config_key, &route_key] {
                if state.applied.contains_key(key) {
                    state.conflicts.insert(
                        key.clone(),
                        format!(
                            "{key} is not owned by Service {}; the Service's own is used",
                            service.metadata.name
                        ),
                    );
                }
            }
            live_children.insert(config_key.clone());
            live_children.insert(route_key.clone());
            configs.insert(config_key, config);
            routes.insert(route_key, route);
        }
        state
            .child_generations
            .retain(|k, _| live_children.contains(k));

        // Revisions: a new one for every changed template; the ones whose Configuration is
        // gone are collected (their pods stopped).
        let mut existing: Vec<Revision> = state.revisions.values().cloned().collect();
        for config in configs.values() {
            if let Some(revision) = configuration_revision(config, &existing) {
                info!(revision = %revision.metadata.name, namespace = %revision.metadata.namespace, "revision created");
                state
                    .revisions
                    .insert(revision_key(&revision), revision.clone());
                existing.push(revision);
            }
        }
        let orphaned: Vec<ServingKey> = state
            .revisions
            .iter()
            .filter(|(_, r)| {
                let config = r.configuration().unwrap_or_default();
                !configs.contains_key(&ServingKey::new(
                    ServingKind::Configuration,
                    &r.metadata.namespace,
                    config,
                ))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in orphaned {
            if let Some(revision) = state.revisions.remove(&key) {
                info!(revision = %key.name, namespace = %key.namespace, "revision deleted");
                let _ = self
                    .runtime
                    .scale(&RevisionRef::from_revision(&revision), 0);
            }
            state.scaled.remove(&key);
            state.cannot_run.remove(&key);
            state.ever_ready.remove(&key);
        }

        // Pods and readiness.
        let mut pods: BTreeMap<ServingKey, Vec<PodStatus>> = BTreeMap::new();
        for key in state.revisions.keys() {
            let list = self
                .runtime
                .pods(&format!("{}/{}", key.namespace, key.name));
            if list.iter().any(|p| p.phase == Phase::Ready) {
                state.ever_ready.insert(key.clone());
            }
            pods.insert(key.clone(), list);
        }
        let mut revisions: Vec<Revision> = state.revisions.values().cloned().collect();
        for revision in &mut revisions {
            let key = revision_key(revision);
            revision.status = Some(revision_status(
                revision,
                pods.get(&key).map(Vec::as_slice).unwrap_or_default(),
                state.ever_ready.contains(&key),
                state.scaled.get(&key).copied(),
                state.cannot_run.get(&key).map(String::as_str),
            ));
        }
        let ready = ready_by_namespace(&state.ever_ready, &state.cannot_run);
        let none = BTreeSet::new();
        let ready_in = |ns: &str| ready.get(ns).unwrap_or(&none);
        for config in configs.values_mut() {
            config.status = Some(configuration_status(
                config,
                &revisions,
                ready_in(&config.metadata.namespace),
            ));
        }
        let config_list: Vec<Configuration> = configs.values().cloned().collect();

        // Routes → KIngresses (the last good one stays while traffic cannot be resolved).
        state.ingresses.retain(|k, _| routes.contains_key(k));
        for (key, route) in &routes {
            match route_to_ingress(route, &revisions, &config_list, &self.domain) {
                Ok(ingress) => {
                    state.ingresses.insert(key.clone(), ingress);
                }
                Err(e) => debug!(route = %key, error = %e, "route traffic cannot be resolved"),
            }
        }

        // Scale: the revisions the gateway routes to, and each Configuration's latest (so it can
        // become ready); every other revision has no pods.
        let mut wanted: BTreeSet<ServingKey> = BTreeSet::new();
        for ingress in state.ingresses.values() {
            for rule in &ingress.spec.rules {
                for path in rule.http.iter().flat_map(|h| &h.paths) {
                    for split in &path.splits {
                        wanted.insert(ServingKey::new(
                            ServingKind::Revision,
                            &split.service_namespace,
                            &split.service_name,
                        ));
                    }
                }
            }
        }
        for config in configs.values() {
            if let Some(latest) = latest_created_revision(config, &revisions) {
                wanted.insert(revision_key(latest));
            }
        }
        let now = Instant::now();
        let activators = self
            .activators
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let ready_count = |key: &ServingKey| {
            pods.get(key)
                .map_or(0, |p| p.iter().filter(|p| p.phase == Phase::Ready).count())
        };
        state.scalers.retain(|k, _| state.revisions.contains_key(k));
        let mut modes: BTreeMap<ServingKey, ServeMode> = BTreeMap::new();
        for revision in &mut revisions {
            let key = revision_key(revision);
            let reachable = wanted.contains(&key);
            let (replicas, mode) = match &self.autoscaling {
                None => (
                    if reachable {
                        initial_scale(revision)
                    } else {
                        0
                    },
                    ServeMode::Serve,
                ),
                Some(config) => {
                    let scaler = state
                        .scalers
                        .entry(key.clone())
                        .or_insert_with(|| Scaler::new(revision, config, now));
                    let tick = scaler.tick(now, config, ready_count(&key), reachable);
                    if let Some(status) = &mut revision.status {
                        status.in_panic = Some(tick.in_panic);
                    }
                    (tick.desired_pods, tick.mode)
                }
            };
            modes.insert(key.clone(), mode);
            if let Some(status) = &mut revision.status {
                status.desired_replicas = Some(replicas as i64);
                status.serving_mode = Some(format!("{mode:?}"));
            }
            if state.scaled.get(&key) == Some(&replicas) {
                continue;
            }
            match self
                .runtime
                .scale(&RevisionRef::from_revision(revision), replicas)
            {
                Ok(()) => {
                    info!(revision = %key.name, namespace = %key.namespace, replicas, "scaled");
                    state.scaled.insert(key.clone(), replicas);
                    state.cannot_run.remove(&key);
                }
                Err(e) => {
                    if state
                        .cannot_run
                        .insert(key.clone(), e.to_string())
                        .is_none()
                    {
                        warn!(error = %e, "revision cannot run");
                    }
                }
            }
        }

        // What activators follow: every revision's settings and ready pods.
        if self.autoscaling.is_some() {
            let table = revisions
                .iter()
                .map(|r| {
                    let key = revision_key(r);
                    let list = pods.get(&key).map(Vec::as_slice).unwrap_or_default();
                    let name = format!("{}/{}", key.namespace, key.name);
                    (
                        name.clone(),
                        Resource::named(name, &activator_revision(r, list)),
                    )
                })
                .collect();
            self.ingress.set_activator_revisions(table);
        }

        // What the gateway needs: each revision's Service and Endpoints (its ready pods), and
        // each Route's KIngress.
        let mut desired: BTreeMap<ObjectKey, Arc<Object>> = BTreeMap::new();
        for revision in &revisions {
            let key = revision_key(revision);
            let list = pods.get(&key).map(Vec::as_slice).unwrap_or_default();
            let targets = match modes.get(&key) {
                Some(ServeMode::Proxy) => Targets::Activators(activator_subset(&key, &activators)),
                _ => Targets::Pods(list),
            };
            for object in revision_backend(revision, targets) {
                desired.insert(object.key(), Arc::new(object));
            }
        }
        for ingress in state.ingresses.values() {
            let object = Object::Ingress(ingress.clone());
            desired.insert(object.key(), Arc::new(object));
        }
        let mut changes = Vec::new();
        for key in state.published.keys() {
            if !desired.contains_key(key) {
                changes.push(Change::Delete(key.clone()));
            }
        }
        for (key, object) in &desired {
            if state.published.get(key) != Some(object) {
                changes.push(Change::Upsert(object.clone()));
            }
        }
        if !changes.is_empty() {
            self.ingress.apply(Batch {
                changes,
                ..Default::default()
            });
            state.published = desired;
        }

        // Proxy mode counts from when every gateway holds the endpoints that point at the
        // activators (a revision nothing routes to has no such endpoints to wait for).
        for (key, scaler) in &mut state.scalers {
            if modes.get(key) != Some(&ServeMode::Proxy) {
                scaler.proxy_since = None;
                continue;
            }
            if scaler.proxy_since.is_none() && !activators.is_empty() {
                let held = match self.ingress.endpoints_acked(&key.namespace, &key.name) {
                    Some(held) => held,
                    None => !wanted.contains(key),
                };
                if held {
                    debug!(revision = %key.name, "activators in the path");
                    scaler.proxy_since = Some(now);
                }
            }
        }

        // Statuses.
        let reports = self.ingress.reports();
        state
            .ingress_ready
            .retain(|k, ready| state.ingresses.get(k) == Some(ready));
        for (key, ingress) in &state.ingresses {
            let served = reports.iter().any(|r| {
                r.metadata.namespace == key.namespace && r.metadata.name == key.name && r.is_ready()
            });
            if served {
                state.ingress_ready.insert(key.clone(), ingress.clone());
            }
        }
        let ingress_ready = |key: &ServingKey| state.ingress_ready.contains_key(key);
        let mut route_statuses: BTreeMap<ServingKey, RouteStatus> = BTreeMap::new();
        for (key, route) in routes.iter_mut() {
            let status = route_status(
                route,
                &revisions,
                &config_list,
                ready_in(&route.metadata.namespace),
                ingress_ready(key),
                &self.domain,
            );
            route_statuses.insert(key.clone(), status.clone());
            route.status = Some(status);
        }
        for service in &mut services {
            let config_key = key_of(ServingKind::Configuration, &service.metadata);
            let route_key = key_of(ServingKind::Route, &service.metadata);
            let c_status = configs
                .get(&config_key)
                .and_then(|c| c.status.clone())
                .unwrap_or_default();
            let r_status = route_statuses.get(&route_key).cloned().unwrap_or_default();
            service.status = Some(service_status(service, &c_status, &r_status));
        }

        let settled = revisions.iter().all(|r| {
            let key = revision_key(r);
            state.scaled.get(&key).copied().unwrap_or(0) == 0
                || pods
                    .get(&key)
                    .is_some_and(|p| p.iter().any(|p| p.phase == Phase::Ready))
        }) && routes.values().all(|r| {
            r.status.as_ref().is_some_and(|s| {
                condition_status(&s.conditions, CONDITION_READY) == ConditionStatus::True
            })
        });

        let view = View {
            services,
            configurations: config_list,
            revisions,
            routes: routes.into_values().collect(),
            pods,
        };
        if view != state.view {
            state.view = view;
            self.changes.send_modify(|v| *v = v.wrapping_add(1));
        }
        settled
    }
}

impl State {
    /// Whether `object` may replace what is applied under its key (Knative's update checks).
    fn check(&self, object: &ServingObject) -> Result<(), String> {
        let key = object.key();
        let errors = match (object, self.applied.get(&key)) {
            (ServingObject::Revision(_), _) => {
                return Err(format!(
                    "{key}: Revisions are stamped from a Configuration's template; apply a Service or a Configuration instead"
                ))
            }
            (ServingObject::Service(new), Some(ServingObject::Service(old))) => new.validate_update(old),
            (ServingObject::Configuration(new), Some(ServingObject::Configuration(old))) => {
                new.validate_update(old)
            }
            _ => Vec::new(),
        };
        match errors.first() {
            Some(e) => Err(format!("{key}: {}: {}", e.field, e.reason)),
            None => Ok(()),
        }
    }

    /// Stores `object` (after [`State::check`]), bumping its generation when its spec changed.
    fn upsert(&mut self, mut object: ServingObject) -> Result<(), String> {
        self.check(&object)?;
        let key = object.key();
        let generation = match self.applied.get(&key) {
            Some(old) if spec_of(old) == spec_of(&object) => old.meta().generation.unwrap_or(1),
            Some(old) => old.meta().generation.unwrap_or(1) + 1,
            None => 1,
        };
        object.meta_mut().generation = Some(generation);
        self.applied.insert(key, object);
        Ok(())
    }

    /// The generation of a Service's child: bumped when its spec changes.
    fn child_generation<T: Serialize>(&mut self, key: &ServingKey, spec: &T) -> i64 {
        let spec = serde_json::to_value(spec).unwrap_or_default();
        let entry = self
            .child_generations
            .entry(key.clone())
            .or_insert((0, serde_json::Value::Null));
        if entry.1 != spec {
            entry.0 += 1;
            entry.1 = spec;
        }
        entry.0
    }
}

fn key_of(kind: ServingKind, meta: &ObjectMeta) -> ServingKey {
    ServingKey::new(kind, &meta.namespace, &meta.name)
}

fn revision_key(revision: &Revision) -> ServingKey {
    key_of(ServingKind::Revision, &revision.metadata)
}

/// The spec of an object, for generation bumps.
fn spec_of(object: &ServingObject) -> serde_json::Value {
    object.manifest()["spec"].take()
}

/// The same object but for the generation the store gives it.
fn same_content(stored: &ServingObject, new: &ServingObject) -> bool {
    let mut stored = stored.clone();
    stored.meta_mut().generation = new.meta().generation;
    stored == *new
}

/// Ready revision names per namespace (what the pure reconcilers take).
fn ready_by_namespace(
    ever_ready: &BTreeSet<ServingKey>,
    cannot_run: &BTreeMap<ServingKey, String>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for key in ever_ready.iter().filter(|k| !cannot_run.contains_key(*k)) {
        out.entry(key.namespace.clone())
            .or_default()
            .insert(key.name.clone());
    }
    out
}

/// How many pods a revision runs until autoscaling exists: `initial-scale` (default 1), at
/// least `min-scale`, at most `max-scale` (0 = unbounded).
fn initial_scale(revision: &Revision) -> usize {
    let annotation = |key: &str| {
        revision
            .metadata
            .annotations
            .get(key)
            .and_then(|v| v.parse::<usize>().ok())
    };
    let mut replicas = annotation(INITIAL_SCALE_ANNOTATION)
        .unwrap_or(1)
        .max(annotation(MIN_SCALE_ANNOTATION).unwrap_or(0));
    if let Some(max) = annotation(MAX_SCALE_ANNOTATION).filter(|m| *m > 0) {
        replicas = replicas.min(max);
    }
    replicas
}

/// A Revision's status from its pods: `Ready` once a pod has been ready (and while nothing says
/// it cannot run), `False` when it cannot run or its pods crash before ever being ready.
fn revision_status(
    revision: &Revision,
    pods: &[PodStatus],
    ever_ready: bool,
    desired: Option<usize>,
    cannot_run: Option<&str>,
) -> RevisionStatus {
    let live: Vec<&PodStatus> = pods
        .iter()
        .filter(|p| p.phase != Phase::Terminating)
        .collect();
    let ready_pods = live.iter().filter(|p| p.phase == Phase::Ready).count();
    let crashed = live.iter().find_map(|p| p.last_error.as_deref());
    let (resources, health) = if let Some(why) = cannot_run {
        (
            Condition::new(
                CONDITION_RESOURCES_AVAILABLE,
                ConditionStatus::False,
                "CannotRun",
                why,
            ),
            Condition::new(
                CONDITION_CONTAINER_HEALTHY,
                ConditionStatus::Unknown,
                "",
                "",
            ),
        )
    } else if ever_ready {
        (
            Condition::new(CONDITION_RESOURCES_AVAILABLE, ConditionStatus::True, "", ""),
            Condition::new(CONDITION_CONTAINER_HEALTHY, ConditionStatus::True, "", ""),
        )
    } else if let Some(why) = crashed {
        (
            Condition::new(
                CONDITION_RESOURCES_AVAILABLE,
                ConditionStatus::Unknown,
                "Deploying",
                "",
            ),
            Condition::new(
                CONDITION_CONTAINER_HEALTHY,
                ConditionStatus::False,
                "ExitCode",
                why,
            ),
        )
    } else {
        (
            Condition::new(
                CONDITION_RESOURCES_AVAILABLE,
                ConditionStatus::Unknown,
                "Deploying",
                "",
            ),
            Condition::new(
                CONDITION_CONTAINER_HEALTHY,
                ConditionStatus::Unknown,
                "Deploying",
                "",
            ),
        )
    };
    let active = match (ready_pods, desired.unwrap_or(0)) {
        (0, 0) => Condition::new(
            CONDITION_ACTIVE,
            ConditionStatus::False,
            "NoTraffic",
            "The revision has no pods: nothing routes to it.",
        ),
        (0, _) => Condition::new(
            CONDITION_ACTIVE,
            ConditionStatus::Unknown,
            "Activating",
            "Waiting for a pod to be ready.",
        ),
        _ => Condition::new(CONDITION_ACTIVE, ConditionStatus::True, "", ""),
    };
    let ready = [&resources, &health]
        .into_iter()
        .find(|c| c.status == ConditionStatus::False)
        .or_else(|| {
            [&resources, &health]
                .into_iter()
                .find(|c| c.status == ConditionStatus::Unknown)
        })
        .map_or_else(
            || Condition::new(CONDITION_READY, ConditionStatus::True, "", ""),
            |c| Condition::new(CONDITION_READY, c.status, &c.reason, &c.message),
        );
    RevisionStatus {
        observed_generation: revision.metadata.generation,
        conditions: vec![active, health, ready, resources],
        actual_replicas: Some(ready_pods as i64),
        desired_replicas: desired.map(|d| d as i64),
        serving_mode: None,
        in_panic: None,
    }
}

/// Where a revision's endpoints point.
enum Targets<'a> {
    /// Its ready pods (serve mode).
    Pods(&'a [PodStatus]),
    /// The activators (proxy mode).
    Activators(Vec<SocketAddr>),
}

/// The Kubernetes Service and Endpoints a revision's KIngress splits point at: ports 80 (HTTP)
/// and 81 (h2c), and one endpoint per ready pod — or per activator in proxy mode.
fn revision_backend(revision: &Revision, targets: Targets<'_>) -> [Object; 2] {
    let meta = ObjectMeta {
        name: revision.metadata.name.clone(),
        namespace: revision.metadata.namespace.clone(),
        labels: BTreeMap::from([(REVISION_LABEL.to_owned(), revision.metadata.name.clone())]),
        ..Default::default()
    };
    let port = |name: &str, port: i64, target: i64, app_protocol: &str| ServicePort {
        name: name.to_owned(),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: "TCP".to_owned(),
        app_protocol: app_protocol.to_owned(),
    };
    let service = K8sService {
        metadata: meta.clone(),
        spec: ServiceSpec {
            ports: vec![
                port("http", REVISION_HTTP_PORT, QUEUE_HTTP_PORT, ""),
                port(
                    "http2",
                    REVISION_H2C_PORT,
                    QUEUE_H2C_PORT,
                    "kubernetes.io/h2c",
                ),
            ],
            ..Default::default()
        },
    };
    let addresses: Vec<SocketAddr> = match targets {
        Targets::Pods(pods) => pods
            .iter()
            .filter(|p| p.phase == Phase::Ready)
            .map(|p| p.address)
            .collect(),
        Targets::Activators(activators) => activators,
    };
    let subsets = addresses
        .iter()
        .map(|address| EndpointSubset {
            addresses: vec![EndpointAddress {
                ip: address.ip().to_string(),
            }],
            not_ready_addresses: Vec::new(),
            ports: ["http", "http2"]
                .into_iter()
                .map(|name| EndpointPort {
                    name: name.to_owned(),
                    port: i64::from(address.port()),
                    protocol: "TCP".to_owned(),
                })
                .collect(),
        })
        .collect();
    [
        Object::Service(service),
        Object::Endpoints(Endpoints {
            metadata: meta,
            subsets,
        }),
    ]
}

/// How many activators one revision is spread over (Knative subsets activators per revision
/// so that each keeps a useful view of its pods).
const ACTIVATOR_SUBSET: usize = 3;

/// A stable subset of the activators for `revision`: the [`ACTIVATOR_SUBSET`] with the highest
/// rendezvous hash of (revision, activator), so adding or removing an activator moves only the
/// revisions that used it.
fn activator_subset(revision: &ServingKey, activators: &[SocketAddr]) -> Vec<SocketAddr> {
    if activators.len() <= ACTIVATOR_SUBSET {
        return activators.to_vec();
    }
    let mut ranked: Vec<(u64, SocketAddr)> = activators
        .iter()
        .map(|a| {
            let seed = format!("{}/{}|{a}", revision.namespace, revision.name);
            (xxhash_rust::xxh3::xxh3_64(seed.as_bytes()), *a)
        })
        .collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    let mut subset: Vec<SocketAddr> = ranked
        .into_iter()
        .take(ACTIVATOR_SUBSET)
        .map(|(_, a)| a)
        .collect();
    subset.sort_unstable();
    subset
}

/// What an activator needs of a revision: its limits and its ready pods.
fn activator_revision(revision: &Revision, pods: &[PodStatus]) -> ActivatorRevision {
    let spec = &revision.spec;
    let mut endpoints: Vec<ActivatorEndpoint> = pods
        .iter()
        .filter(|p| p.phase == Phase::Ready)
        .map(|p| ActivatorEndpoint {
            address: p.address.ip().to_string(),
            port: u32::from(p.address.port()),
        })
        .collect();
    endpoints.sort();
    ActivatorRevision {
        namespace: revision.metadata.namespace.clone(),
        name: revision.metadata.name.clone(),
        container_concurrency: spec.container_concurrency(),
        timeout_seconds: spec.timeout_seconds(),
        response_start_timeout_seconds: spec.response_start_timeout_seconds.unwrap_or(0),
        idle_timeout_seconds: spec.idle_timeout_seconds.unwrap_or(0),
        endpoints,
    }
}

impl Scaler {
    fn new(revision: &Revision, config: &AutoscalerConfig, now: Instant) -> Scaler {
        let scaling = RevisionScaling::from_annotations(
            &revision.metadata.annotations,
            revision.spec.container_concurrency(),
            config,
        )
        .unwrap_or_else(|e| {
            warn!(revision = %revision.metadata.name, error = %e, "autoscaling annotations ignored");
            RevisionScaling::from_annotations(&BTreeMap::new(), revision.spec.container_concurrency(), config)
                .expect("the defaults are valid")
        });
        Scaler {
            autoscaler: RevisionAutoscaler::new(scaling, now),
            last: None,
            poked: false,
            proxy_since: None,
        }
    }

    /// The autoscaler's decision: a new one every tick interval (or at once after a poke),
    /// otherwise the last one.
    fn tick(
        &mut self,
        now: Instant,
        config: &AutoscalerConfig,
        ready_pods: usize,
        reachable: bool,
    ) -> Tick {
        if let Some((at, tick)) = &self.last {
            if !self.poked && now.duration_since(*at) < config.tick_interval {
                return *tick;
            }
        }
        self.poked = false;
        let tick = self.autoscaler.tick(
            now,
            TickInput {
                ready_pods,
                reachable,
                proxy_since: self.proxy_since,
            },
        );
        self.last = Some((now, tick));
        tick
    }
}

/// Why `knarr delete` refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeleteError {
    #[error("{0} not found")]
    NotFound(ServingKey),
    #[error("{0} belongs to Service {1}; delete the Service instead")]
    Owned(ServingKey, String),
}

/// Makes every container's `workingDir` absolute: relative ones are joined to `base`, missing
/// ones become `base` (the manifest's directory, so `command: [python3, app.py]` finds the app
/// wherever `knarr up` was started).
pub fn resolve_working_dirs(object: &mut ServingObject, base: &Path) {
    let spec = match object {
        ServingObject::Service(s) => &mut s.spec.template.spec,
        ServingObject::Configuration(c) => &mut c.spec.template.spec,
        ServingObject::Revision(r) => &mut r.spec,
        ServingObject::Route(_) => return,
    };
    let base = std::path::absolute(base).unwrap_or_else(|_| base.to_owned());
    for container in &mut spec.containers {
        let dir = base.join(&container.working_dir);
        container.working_dir = dir.to_string_lossy().into_owned();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use knarr_runtime::RuntimeError;
    use knarr_translate::kingress::GatewayConfig;
    use knarr_translate::reconcile::{ClassFilter, IngressIndex};
    use knarr_xds::{Clients, NodeGrouping, ResourceType, SnapshotCache};

    use super::*;
    use crate::routes_file::Routes;
    use crate::status::LoadBalancerNames;

    /// A runtime whose pods the test decides: `scale` is recorded, `pods` answers what was set.
    #[derive(Default)]
    struct FakeRuntime {
        scaled: Mutex<BTreeMap<String, usize>>,
        pods: Mutex<BTreeMap<String, Vec<PodStatus>>>,
        refuse: Mutex<Option<String>>,
        changes: watch::Sender<u64>,
    }

    impl FakeRuntime {
        fn replicas(&self, revision: &str) -> Option<usize> {
            self.scaled.lock().unwrap().get(revision).copied()
        }

        /// Gives `revision` one pod in `phase` on `port`.
        fn set_pod(&self, revision: &str, phase: Phase, port: u16) {
            let pod = PodStatus {
                name: format!("{revision}-pod-1"),
                phase,
                address: SocketAddr::from(([127, 0, 0, 1], port)),
                metrics_address: None,
                restarts: 0,
                last_error: (phase == Phase::Failed).then(|| "exit status: 3".to_owned()),
                log_path: "/dev/null".into(),
                app_pid: None,
                queue_proxy_pid: None,
            };
            self.pods
                .lock()
                .unwrap()
                .insert(format!("default/{revision}"), vec![pod]);
        }
    }

    impl Runtime for FakeRuntime {
        fn scale(&self, revision: &RevisionRef, replicas: usize) -> Result<(), RuntimeError> {
            if let Some(reason) = self.refuse.lock().unwrap().clone() {
                return Err(RuntimeError::CannotRun {
                    revision: revision.key(),
                    field: "spec.containers[0].command".into(),
                    reason,
                });
            }
            self.scaled.lock().unwrap().insert(revision.key(), replicas);
            Ok(())
        }

        fn pods(&self, revision: &str) -> Vec<PodStatus> {
            self.pods
                .lock()
                .unwrap()
                .get(revision)
                .cloned()
                .unwrap_or_default()
        }

        fn subscribe(&self) -> watch::Receiver<u64> {
            self.changes.subscribe()
        }
    }

    /// An ingress controller publishing into `cache`.
    fn ingress_into(cache: Arc<SnapshotCache>) -> Arc<IngressController> {
        Arc::new(IngressController::new(
            IngressIndex::new(GatewayConfig::default(), ClassFilter::default()),
            cache,
            Arc::new(Clients::default()),
            Routes::default(),
            LoadBalancerNames::default(),
        ))
    }

    fn controller() -> (
        Arc<ServingController>,
        Arc<FakeRuntime>,
        Arc<IngressController>,
    ) {
        let ingress = ingress_into(Arc::new(SnapshotCache::new(NodeGrouping::NodeId)));
        let runtime = Arc::new(FakeRuntime::default());
        let serving = ServingController::new("example.com", ingress.clone(), runtime.clone());
        (serving, runtime, ingress)
    }

    fn service(target: &str, traffic: &str) -> String {
        format!(
            "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {{name: hello, namespace: default}}\n\
             spec:\n  template:\n    spec:\n      containers:\n      - image: x\n        command: [app]\n        \
             env: [{{name: TARGET, value: {target}}}]\n{traffic}"
        )
    }

    fn status_of(serving: &ServingController, kind: ServingKind, name: &str) -> serde_json::Value {
        serving
            .list(kind)
            .into_iter()
            .find(|o| o["metadata"]["name"] == name)
            .map(|o| o["status"].clone())
            .unwrap_or_default()
    }

    fn condition(status: &serde_json::Value, type_: &str) -> String {
        status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            .map(|c| {
                format!(
                    "{}/{}",
                    c["status"].as_str().unwrap_or(""),
                    c["reason"].as_str().unwrap_or("")
                )
            })
            .unwrap_or_default()
    }

    /// The generation of the (only) applied object.
    fn generation(serving: &ServingController) -> Option<i64> {
        serving.lock().applied.values().next()?.meta().generation
    }

    #[test]
    fn apply_says_created_configured_unchanged_and_bumps_the_generation_on_spec_changes_only() {
        let (serving, ..) = controller();
        let outcome =
            |text: &str| serving.apply_manifest("hello.yaml", text, None).unwrap()[0].outcome;
        assert_eq!(outcome(&service("a", "")), "created");
        assert_eq!(outcome(&service("a", "")), "unchanged");
        let labelled = service("a", "").replace(
            "metadata: {name: hello, namespace: default}",
            "metadata: {name: hello, namespace: default, labels: {team: x}}",
        );
        assert_eq!(outcome(&labelled), "configured");
        assert_eq!(generation(&serving), Some(1));
        assert_eq!(outcome(&service("b", "")), "configured");
        assert_eq!(generation(&serving), Some(2));
    }

    #[test]
    fn apply_is_all_or_nothing_and_names_file_line_object_and_field() {
        let (serving, ..) = controller();
        let bad = service("a", "").replace(
            "      - image: x\n",
            "      - image: x\n        ports: [{containerPort: 8012}]\n",
        );
        let text = format!(
            "{}\n---\n{}",
            service("a", "").replace("name: hello", "name: other"),
            bad
        );
        let errors = serving.apply_manifest("two.yaml", &text, None).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("two.yaml:"), "{}", errors[0]);
        assert!(
            errors[0].contains("Service default/hello")
                && errors[0].contains("spec.template.spec.containers[0].ports[0].containerPort"),
            "{}",
            errors[0]
        );
        assert!(serving.lock().applied.is_empty(), "nothing applied");

        let revision =
            "apiVersion: serving.knative.dev/v1\nkind: Revision\nmetadata: {name: r-00001}\n\
                        spec: {containers: [{image: x}]}\n";
        let errors = serving
            .apply_manifest("rev.yaml", revision, None)
            .unwrap_err();
        assert!(
            errors[0].contains("apply a Service or a Configuration"),
            "{errors:?}"
        );
        let other = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n";
        let errors = serving.apply_manifest("cm.yaml", other, None).unwrap_err();
        assert!(errors[0].contains("ConfigMap"), "{errors:?}");
    }

    #[test]
    fn a_service_runs_its_revision_and_routes_to_its_ready_pods() {
        let (serving, runtime, ingress) = controller();
        serving
            .apply_manifest("h.yaml", &service("a", ""), None)
            .unwrap();
        assert!(!serving.reconcile());
        assert_eq!(runtime.replicas("default/hello-00001"), Some(1));
        let revision = status_of(&serving, ServingKind::Revision, "hello-00001");
        assert_eq!(condition(&revision, "Ready"), "Unknown/Deploying");
        // The route points at the only revision (not ready yet), so the KIngress exists.
        assert_eq!(ingress.ingress_count(), 1);

        runtime.set_pod("hello-00001", Phase::Ready, 40001);
        serving.reconcile();
        let revision = status_of(&serving, ServingKind::Revision, "hello-00001");
        assert_eq!(condition(&revision, "Ready"), "True/");
        assert_eq!(revision["actualReplicas"], 1);
        let endpoints = serving
            .lock()
            .published
            .get(&ObjectKey::new(Kind::Endpoints, "default", "hello-00001"))
            .cloned()
            .expect("endpoints published");
        let Object::Endpoints(endpoints) = &*endpoints else {
            panic!("not endpoints")
        };
        assert_eq!(endpoints.subsets[0].ports[0].port, 40001);
        let service = status_of(&serving, ServingKind::Service, "hello");
        assert_eq!(service["latestReadyRevisionName"], "hello-00001");
        assert_eq!(service["url"], "http://hello.default.example.com");
    }

    #[test]
    fn a_new_template_moves_traffic_once_ready_and_stops_the_old_revision() {
        let (serving, runtime, _) = controller();
        serving
            .apply_manifest("h.yaml", &service("a", ""), None)
            .unwrap();
        runtime.set_pod("hello-00001", Phase::Ready, 40001);
        serving.reconcile();
        serving.reconcile();

        serving
            .apply_manifest("h.yaml", &service("b", ""), None)
            .unwrap();
        serving.reconcile();
        assert_eq!(runtime.replicas("default/hello-00002"), Some(1));
        // Not ready yet: traffic stays on hello-00001, which keeps running.
        let status = status_of(&serving, ServingKind::Service, "hello");
        assert_eq!(status["traffic"][0]["revisionName"], "hello-00001");
        assert_eq!(runtime.replicas("default/hello-00001"), Some(1));

        runtime.set_pod("hello-00002", Phase::Ready, 40002);
        serving.reconcile();
        serving.reconcile();
        let status = status_of(&serving, ServingKind::Service, "hello");
        assert_eq!(status["traffic"][0]["revisionName"], "hello-00002");
        assert_eq!(status["latestCreatedRevisionName"], "hello-00002");
        assert_eq!(
            runtime.replicas("default/hello-00001"),
            Some(0),
            "nothing routes to it"
        );

        // A traffic-only change stamps no revision.
        let pinned = service(
            "b",
            "  traffic:\n  - revisionName: hello-00001\n    percent: 100\n",
        );
        serving.apply_manifest("h.yaml", &pinned, None).unwrap();
        serving.reconcile();
        assert_eq!(serving.list(ServingKind::Revision).len(), 2);
        assert_eq!(
            runtime.replicas("default/hello-00001"),
            Some(1),
            "routed again"
        );
    }

    #[test]
    fn deleting_a_service_collects_its_revisions_and_everything_published() {
        let (serving, runtime, ingress) = controller();
        serving
            .apply_manifest("h.yaml", &service("a", ""), None)
            .unwrap();
        runtime.set_pod("hello-00001", Phase::Ready, 40001);
        serving.reconcile();
        let key = ServingKey::new(ServingKind::Service, "default", "hello");
        serving.delete(&key).unwrap();
        serving.reconcile();
        assert_eq!(runtime.replicas("default/hello-00001"), Some(0));
        assert!(serving.list(ServingKind::Revision).is_empty());
        assert!(serving.lock().published.is_empty());
        assert_eq!(ingress.ingress_count(), 0);
        assert_eq!(serving.delete(&key), Err(DeleteError::NotFound(key)));
    }

    #[test]
    fn children_of_a_service_cannot_be_deleted_alone() {
        let (serving, ..) = controller();
        serving
            .apply_manifest("h.yaml", &service("a", ""), None)
            .unwrap();
        serving.reconcile();
        let route = ServingKey::new(ServingKind::Route, "default", "hello");
        assert_eq!(
            serving.delete(&route),
            Err(DeleteError::Owned(route.clone(), "hello".into()))
        );
    }

    #[test]
    fn a_crashing_or_unrunnable_revision_is_not_ready_with_the_reason() {
        let (serving, runtime, _) = controller();
        serving
            .apply_manifest("h.yaml", &service("a", ""), None)
            .unwrap();
        serving.reconcile();
        runtime.set_pod("hello-00001", Phase::Failed, 40001);
        serving.reconcile();
        let revision = status_of(&serving, ServingKind::Revision, "hello-00001");
        assert_eq!(condition(&revision, "ContainerHealthy"), "False/ExitCode");
        assert_eq!(condition(&revision, "Ready"), "False/ExitCode");
        let ksvc = status_of(&serving, ServingKind::Service, "hello");
        assert_eq!(condition(&ksvc, "Ready"), "False/RevisionFailed");

        let (serving, runtime, _) = controller();
        *runtime.refuse.lock().unwrap() = Some("set command".into());
        serving
            .apply_manifest("h.yaml", &service("a", ""), None)
            .unwrap();
        // The runtime refuses during the first pass; its status shows from the next one.
        assert!(!serving.reconcile());
        serving.reconcile();
        let revision = status_of(&serving, ServingKind::Revision, "hello-00001");
        assert_eq!(condition(&revision, "Ready"), "False/CannotRun");
        assert!(revision.to_string().contains("set command"), "{revision}");
    }

    #[test]
    fn scale_annotations_set_how_many_pods_a_revision_runs() {
        let revision = |annotations: &[(&str, &str)]| Revision {
            metadata: ObjectMeta {
                annotations: annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(initial_scale(&revision(&[])), 1);
        assert_eq!(
            initial_scale(&revision(&[(INITIAL_SCALE_ANNOTATION, "3")])),
            3
        );
        assert_eq!(initial_scale(&revision(&[(MIN_SCALE_ANNOTATION, "2")])), 2);
        assert_eq!(
            initial_scale(&revision(&[
                (INITIAL_SCALE_ANNOTATION, "5"),
                (MAX_SCALE_ANNOTATION, "2")
            ])),
            2
        );
        assert_eq!(
            initial_scale(&revision(&[(INITIAL_SCALE_ANNOTATION, "0")])),
            0
        );
    }

    fn autoscaling_controller(
        activators: &[u16],
    ) -> (Arc<ServingController>, Arc<FakeRuntime>, Arc<SnapshotCache>) {
        let cache = Arc::new(SnapshotCache::new(NodeGrouping::NodeId));
        let ingress = ingress_into(cache.clone());
        let runtime = Arc::new(FakeRuntime::default());
        let serving = ServingController::with_autoscaling(
            "example.com",
            ingress,
            runtime.clone(),
            AutoscalerConfig::default(),
        );
        serving.set_activators(
            activators
                .iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 9], *p)))
                .collect(),
        );
        (serving, runtime, cache)
    }

    fn published_endpoint_ports(serving: &ServingController, revision: &str) -> Vec<i64> {
        let state = serving.lock();
        let Some(object) =
            state
                .published
                .get(&ObjectKey::new(Kind::Endpoints, "default", revision))
        else {
            return Vec::new();
        };
        let Object::Endpoints(endpoints) = &**object else {
            panic!("not endpoints")
        };
        endpoints.subsets.iter().map(|s| s.ports[0].port).collect()
    }

    #[test]
    fn with_autoscaling_the_activator_fronts_a_revision_without_burst_headroom() {
        let (serving, runtime, cache) = autoscaling_controller(&[8012]);
        serving
            .apply_manifest("h.yaml", &service("a", ""), None)
            .unwrap();
        serving.reconcile();
        // A new revision starts at its initial scale, behind the activator.
        assert_eq!(runtime.replicas("default/hello-00001"), Some(1));
        assert_eq!(published_endpoint_ports(&serving, "hello-00001"), [8012]);

        runtime.set_pod("hello-00001", Phase::Ready, 40001);
        serving.reconcile();
        // Knative's default target burst capacity (211) wants more than one idle pod can
        // give: the activator stays in the path, and learns the pod over ADS.
        let status = status_of(&serving, ServingKind::Revision, "hello-00001");
        assert_eq!(status["servingMode"], "Proxy", "{status}");
        assert_eq!(published_endpoint_ports(&serving, "hello-00001"), [8012]);
        let snapshot = cache.get(knarr_xds::DEFAULT_GROUP).unwrap();
        let resource = snapshot
            .get(ResourceType::ActivatorRevision, "default/hello-00001")
            .expect("activator revision published");
        let revision = ActivatorRevision::decode(resource.value.as_slice()).unwrap();
        assert_eq!(revision.endpoints.len(), 1);
        assert_eq!(revision.endpoints[0].port, 40001);
        assert_eq!(revision.timeout_seconds, 300);
    }

    #[test]
    fn without_burst_headroom_wanted_a_ready_revision_is_served_directly() {
        let (serving, runtime, _) = autoscaling_controller(&[8012]);
        let text = service("a", "").replace(
            "  template:\n    spec:",
            "  template:\n    metadata:\n      annotations: {autoscaling.knative.dev/target-burst-capacity: \"0\"}\n    spec:",
        );
        serving.apply_manifest("h.yaml", &text, None).unwrap();
        serving.reconcile();
        runtime.set_pod("hello-00001", Phase::Ready, 40001);
        // The decision is made on the next tick (2 s): poke to tick now.
        serving.record_activator_stats(&RevisionStats {
            namespace: "default".into(),
            revision: "hello-00001".into(),
            poke: true,
            ..Default::default()
        });
        serving.reconcile();
        let status = status_of(&serving, ServingKind::Revision, "hello-00001");
        assert_eq!(status["servingMode"], "Serve", "{status}");
        assert_eq!(published_endpoint_ports(&serving, "hello-00001"), [40001]);
    }

    #[test]
    fn autoscaling_annotations_are_checked_with_their_field_path() {
        let (serving, ..) = autoscaling_controller(&[8012]);
        let text = service("a", "").replace(
            "  template:\n    spec:",
            "  template:\n    metadata:\n      annotations: {autoscaling.knative.dev/metric: memory}\n    spec:",
        );
        let errors = serving.apply_manifest("h.yaml", &text, None).unwrap_err();
        assert!(
            errors[0].contains(
                "Service default/hello: spec.template.metadata.annotations[autoscaling.knative.dev/metric]"
            ),
            "{errors:?}"
        );
    }

    #[test]
    fn each_revision_gets_a_stable_subset_of_the_activators() {
        let activators: Vec<SocketAddr> = (1..=6)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8012)))
            .collect();
        let key = |n: &str| ServingKey::new(ServingKind::Revision, "default", n);
        assert_eq!(
            activator_subset(&key("a"), &activators[..3]),
            &activators[..3]
        );
        let subset = activator_subset(&key("a"), &activators);
        assert_eq!(subset.len(), ACTIVATOR_SUBSET);
        assert_eq!(activator_subset(&key("a"), &activators), subset, "stable");
        // Losing an activator outside the subset changes nothing for this revision.
        let outside = activators.iter().find(|a| !subset.contains(a)).unwrap();
        let fewer: Vec<SocketAddr> = activators
            .iter()
            .filter(|a| *a != outside)
            .copied()
            .collect();
        assert_eq!(activator_subset(&key("a"), &fewer), subset);
        // Revisions spread over the activators.
        let used: BTreeSet<SocketAddr> = (0..20)
            .flat_map(|i| activator_subset(&key(&format!("r{i}")), &activators))
            .collect();
        assert_eq!(used.len(), activators.len());
    }

    #[test]
    fn working_dirs_resolve_against_the_manifest_folder() {
        let mut object = ServingObject::Service(Service::default());
        if let ServingObject::Service(s) = &mut object {
            s.spec.template.spec.containers = vec![Default::default(), Default::default()];
            s.spec.template.spec.containers[1].working_dir = "sub".into();
        }
        resolve_working_dirs(&mut object, Path::new("/srv/app"));
        let ServingObject::Service(s) = object else {
            unreachable!()
        };
        let dirs: Vec<&str> = s
            .spec
            .template
            .spec
            .containers
            .iter()
            .map(|c| c.working_dir.as_str())
            .collect();
        assert_eq!(dirs, ["/srv/app/", "/srv/app/sub"]);
    }
}
