//! The shell around the serving core (`knarr_serving::ServingCore`) for `knarr up`: it feeds the
//! core what users applied (through the file world's [`Store`]), what the runtime reports, the
//! autoscalers' load and what the gateways hold, and carries out the plans the core returns —
//! scaling the runtime, handing KIngresses, Services and Endpoints to the ingress controller,
//! updating the activators' table and the status view.
//!
//! Event-driven: a pass runs when something changed (an apply, a pod, an ACK, a probe) or an
//! autoscaler tick is due, never on a poll. The lock guards only pure work (the store and the
//! core); the runtime, the ingress translation and the status readers are reached without it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use knarr_autoscaler::{AutoscalerConfig, Sample};
use knarr_model::serving::{ServingKey, ServingKind};
use knarr_proto::activator::RevisionStats;
use knarr_proto::Stat;
use knarr_runtime::{Runtime, RuntimeError};
use knarr_serving::{
    CoreConfig, GatewayAnswer, GatewayCheck, ObjectError, Plan, ServingCore, StatusSink, View,
};
use knarr_xds::Resource;
use prost::Message as _;
use tokio::sync::{mpsc, watch, Notify};
use tracing::debug;

use crate::ingress_controller::IngressController;
use crate::source::{Batch, Change};
use crate::store::{Store, Stored};

pub use crate::store::{resolve_working_dirs, Applied};
pub use knarr_serving::{PodInfo, ServiceSummary};

/// How late an autoscaler tick may run so that it shares a pass with others (Knative's tick
/// is every 2 s).
const TICK_SLACK: Duration = Duration::from_millis(50);

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

/// See the module docs.
pub struct ServingController {
    ingress: Arc<IngressController>,
    runtime: Arc<dyn Runtime>,
    inner: Mutex<Inner>,
    /// What `knarr get` reads: the view as of the last pass.
    local: Arc<LocalView>,
    /// Where statuses go: the local view, and any other sink (the API server's objects).
    sinks: Vec<Arc<dyn StatusSink>>,
    /// Wakes the loop after an apply, a delete or a poke.
    wake: Notify,
}

/// The status sink of `knarr up`: the view the status API reads, swapped in whole after each
/// pass that changed it, and a counter for those who wait on changes.
#[derive(Default)]
pub struct LocalView {
    view: ArcSwap<View>,
    changes: watch::Sender<u64>,
}

impl StatusSink for LocalView {
    fn publish(&self, view: &View, _changed: &[ServingKey]) {
        self.view.store(Arc::new(view.clone()));
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }
}

struct Inner {
    store: Store,
    core: ServingCore,
    /// The runtime's change number last read.
    pods_seen: u64,
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
        let local = Arc::new(LocalView::default());
        Arc::new(ServingController {
            ingress,
            runtime,
            sinks: vec![local.clone()],
            local,
            inner: Mutex::new(Inner {
                store: Store::new(autoscaling.clone()),
                core: ServingCore::new(CoreConfig {
                    domain,
                    autoscaling,
                }),
                pods_seen: 0,
            }),
            wake: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn feed(core: &mut ServingCore, stored: Vec<Stored>) {
        for change in stored {
            match change {
                Stored::Upsert(object) => core.upsert(object),
                Stored::Delete(key) => {
                    core.delete(&key);
                }
            }
        }
    }

    /// Changes read from watched files (only serving objects; others are ignored). Returns the
    /// objects refused, as messages (an update that Knative's webhook would refuse keeps the
    /// previous version).
    pub fn apply_changes(&self, changes: Vec<Change>) -> Vec<String> {
        let refused = {
            let mut inner = self.lock();
            let (stored, refused) = inner.store.apply_changes(changes);
            Self::feed(&mut inner.core, stored);
            refused
        };
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
        let applied = {
            let mut inner = self.lock();
            let (applied, stored) = inner.store.apply_manifest(file, text, base_dir)?;
            Self::feed(&mut inner.core, stored);
            applied
        };
        self.wake.notify_one();
        Ok(applied)
    }

    /// Deletes an object users applied. `Err` says why not (not found; owned by a Service).
    pub fn delete(&self, key: &ServingKey) -> Result<(), DeleteError> {
        let mut inner = self.lock();
        if inner.store.remove(key) {
            inner.core.delete(key);
            drop(inner);
            self.wake.notify_one();
            return Ok(());
        }
        match inner.core.owner_of(key) {
            Some(owner) => Err(DeleteError::Owned(key.clone(), owner)),
            None => Err(DeleteError::NotFound(key.clone())),
        }
    }

    /// The view as of the last pass (a cheap copy).
    pub fn view(&self) -> Arc<View> {
        self.local.view.load_full()
    }

    /// The pods of a Service (all its revisions), Configuration or Revision named `name`
    /// (tried in that order); `None` when there is no such object.
    pub fn pods(&self, namespace: &str, name: &str) -> Option<Vec<PodInfo>> {
        self.view().pods_of(namespace, name)
    }

    /// One summary per Knative Service, sorted.
    pub fn summaries(&self) -> Vec<ServiceSummary> {
        self.view().summaries()
    }

    /// Watched manifests refused by the update checks (the previous version is running), and
    /// applied objects a Service's own shadows.
    pub fn errors(&self) -> Vec<String> {
        let inner = self.lock();
        let mut errors = inner.store.errors();
        errors.extend(inner.core.conflicts().map(ToString::to_string));
        errors
    }

    /// Bumped whenever the view changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.local.changes.subscribe()
    }

    /// Where the activators listen: proxy-mode endpoints point there.
    pub fn set_activators(&self, activators: Vec<SocketAddr>) {
        self.lock().core.set_activators(activators);
        self.wake.notify_one();
    }

    /// One report from an activator: load for the revision's autoscaler; a poke ticks it at
    /// once (scale from zero starts now, not at the next tick).
    pub fn record_activator_stats(&self, stats: &RevisionStats) {
        let key = ServingKey::new(ServingKind::Revision, &stats.namespace, &stats.revision);
        let now = Instant::now();
        let mut inner = self.lock();
        if stats.poke {
            inner.core.poke(&key, now);
            drop(inner);
            self.wake.notify_one();
        } else {
            inner.core.record(
                &key,
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
            let targets = self.lock().core.scrape_targets();
            if targets.is_empty() {
                continue;
            }
            let reads = targets.into_iter().map(|(key, addr)| {
                let client = client.clone();
                async move { (key, scrape_one(&client, addr).await) }
            });
            let results = futures::future::join_all(reads).await;
            let now = Instant::now();
            let mut inner = self.lock();
            for (key, result) in results {
                match result {
                    Ok(stat) => inner.core.record(
                        &key,
                        now,
                        Sample::from_queue_proxy(
                            stat.average_concurrent_requests,
                            stat.average_proxied_concurrent_requests,
                            stat.request_count,
                            stat.proxied_request_count,
                        ),
                    ),
                    Err(e) => debug!(revision = %key, error = %e, "scrape failed"),
                }
            }
        }
    }

    /// Runs a pass whenever something changed (applies, pods, the gateways' ACKs and probes)
    /// or an autoscaler tick is due, until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut pods = self.runtime.subscribe();
        let mut gateways = self.ingress.gateway_changes();
        loop {
            self.step(Instant::now());
            let (busy, next_tick) = {
                let inner = self.lock();
                (inner.core.has_work(Instant::now()), inner.core.next_tick())
            };
            if busy {
                tokio::task::yield_now().await;
                continue;
            }
            // Ticks due within TICK_SLACK of each other run in one pass: each revision has
            // its own phase, and waking once per revision would cost more than the ticks.
            let tick = async {
                match next_tick {
                    Some(at) => tokio::time::sleep_until((at + TICK_SLACK).into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.wake.notified() => {}
                changed = pods.changed() => if changed.is_err() { return },
                alive = gateways.changed() => {
                    if !alive { return }
                    self.lock().core.gateway_moved();
                }
                () = tick => {}
                () = knarr_xds::server::stopped(&mut shutdown) => return,
            }
        }
    }

    /// One pass at `now`: read what changed, reconcile, carry the plan out. Returns the plan's
    /// size (for tests).
    pub fn step(&self, now: Instant) -> usize {
        // Pods: only the revisions whose pods changed.
        let since = self.lock().pods_seen;
        let (seen, changed) = self.runtime.changed_since(since);
        let pods: Vec<(ServingKey, Vec<knarr_serving::PodStatus>)> = changed
            .into_iter()
            .filter_map(|key| {
                let (namespace, name) = key.split_once('/')?;
                let revision = ServingKey::new(ServingKind::Revision, namespace, name);
                Some((revision, self.runtime.pods(&key)))
            })
            .collect();
        let checks = {
            let mut inner = self.lock();
            inner.pods_seen = seen;
            for (key, list) in pods {
                inner.core.set_pods(&key, list);
            }
            inner.core.gateway_checks()
        };
        // The gateways are asked without the lock.
        let answers: Vec<(GatewayCheck, GatewayAnswer)> = checks
            .into_iter()
            .map(|check| {
                let answer = match &check {
                    GatewayCheck::Ingress { ingress, .. } => {
                        GatewayAnswer::Ingress(self.ingress.ingress_ready(ingress))
                    }
                    GatewayCheck::Endpoints { revision, .. } => GatewayAnswer::Endpoints(
                        self.ingress
                            .endpoints_acked(&revision.namespace, &revision.name),
                    ),
                };
                (check, answer)
            })
            .collect();
        let (plan, view) = {
            let mut inner = self.lock();
            inner.core.gateway_answers(now, answers);
            let plan = inner.core.reconcile(now);
            let view = (!plan.statuses.is_empty()).then(|| inner.core.view().clone());
            (plan, view)
        };
        let size = plan.scale.len() + plan.publish.len() + plan.activator.len();
        if let Some(view) = &view {
            for sink in &self.sinks {
                sink.publish(view, &plan.statuses);
            }
        }
        self.carry_out(plan);
        size
    }

    fn carry_out(&self, plan: Plan) {
        let Plan {
            scale,
            publish,
            activator,
            ..
        } = plan;
        let mut refused = Vec::new();
        for (revision, replicas) in scale {
            if let Err(e) = self.runtime.scale(&revision, replicas) {
                let (field, reason) = match e {
                    RuntimeError::CannotRun { field, reason, .. } => (Some(field), reason),
                    other => (None, other.to_string()),
                };
                refused.push(ObjectError {
                    object: revision.serving_key(),
                    field,
                    reason,
                });
            }
        }
        if !refused.is_empty() {
            let mut inner = self.lock();
            for error in refused {
                let key = error.object.clone();
                inner.core.scale_failed(&key, error);
            }
        }
        if !publish.is_empty() {
            self.ingress.apply(Batch {
                changes: publish,
                ..Default::default()
            });
        }
        self.ingress.update_activator_revisions(
            activator
                .into_iter()
                .map(|(name, revision)| {
                    let resource = revision.map(|r| Resource::named(name.clone(), &r));
                    (name, resource)
                })
                .collect(),
        );
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
