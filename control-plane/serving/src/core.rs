//! [`ServingCore`]: the serving state machine. See the crate docs for its inputs and outputs.

use std::collections::{BTreeMap, BTreeSet};
use std::mem;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use knarr_autoscaler::{
    AutoscalerConfig, RevisionAutoscaler, RevisionScaling, Sample, ServeMode, Tick, TickInput,
};
use knarr_model::serving::{
    Configuration, Revision, Route, ServingKey, ServingKind, ServingObject,
};
use knarr_model::{Ingress, Object, ObjectKey, ObjectMeta};
use knarr_proto::activator::Revision as ActivatorRevision;
use knarr_translate::reconcile::Change;
use knarr_translate::serving::{
    configuration_revision, configuration_status, latest_created_revision, route_status,
    route_to_ingress, service_status, service_to_children,
};
use tracing::{debug, info, warn};

use crate::backend::{activator_revision, activator_subset, revision_backend, Targets};
use crate::pod::{Phase, PodStatus, RevisionRef};
use crate::revision_status::{initial_scale, revision_status};
use crate::view::View;

/// How many rounds of derived changes one [`ServingCore::reconcile`] follows before leaving the
/// rest to the next call (a cycle would be a bug; this keeps it from hanging the loop).
const MAX_ROUNDS: usize = 16;

/// How far into a metric second the autoscaler ticks (see [`Scaler::tick`]).
const TICK_PHASE: std::time::Duration = std::time::Duration::from_millis(750);

/// What the core was set up with.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// External hosts are `{route}.{namespace}.{domain}`.
    pub domain: String,
    /// With autoscaling, Knative's KPA decides each revision's pods and whether the gateway goes
    /// to them (serve mode) or through the activators (proxy mode). Without, a routed revision
    /// runs its initial scale and is always served directly.
    pub autoscaling: Option<AutoscalerConfig>,
}

/// What the shell must do after a [`ServingCore::reconcile`].
#[derive(Debug, Default)]
pub struct Plan {
    /// Revisions to scale (0 stops them); report refusals with [`ServingCore::scale_failed`].
    pub scale: Vec<(RevisionRef, usize)>,
    /// KIngresses, Services and Endpoints for the ingress translation.
    pub publish: Vec<Change>,
    /// What the activators follow, by `namespace/name`: `None` removes a revision.
    pub activator: Vec<(String, Option<ActivatorRevision>)>,
    /// Objects whose status changed (for a status sink that writes them back).
    pub statuses: Vec<ServingKey>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.scale.is_empty()
            && self.publish.is_empty()
            && self.activator.is_empty()
            && self.statuses.is_empty()
    }
}

/// A question for the gateways, asked by the shell between passes
/// ([`ServingCore::gateway_checks`]) and answered with [`ServingCore::gateway_answers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayCheck {
    /// Does every gateway serve this KIngress (as last published)?
    Ingress {
        route: ServingKey,
        ingress: ObjectKey,
        version: u64,
    },
    /// Does every gateway hold the revision's endpoints (as last published)? `None` for an
    /// answer means no gateway or no such cluster.
    Endpoints { revision: ServingKey, version: u64 },
}

/// The answer to a [`GatewayCheck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayAnswer {
    Ingress(bool),
    Endpoints(Option<bool>),
}

/// Why an applied object was not used (typed, so a sink can put it on the object).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {reason}")]
pub struct ObjectError {
    pub object: ServingKey,
    /// The field at fault, when one is (`spec.template.spec.containers[0].command`).
    pub field: Option<String>,
    pub reason: String,
}

impl ObjectError {
    /// The field and the reason, without the object.
    pub fn message(&self) -> String {
        match &self.field {
            Some(field) => format!("{field}: {}", self.reason),
            None => self.reason.clone(),
        }
    }
}

/// See the crate docs.
pub struct ServingCore {
    config: CoreConfig,
    activators: Vec<SocketAddr>,
    /// What the source holds: Services, Configurations and Routes, with their generations.
    applied: BTreeMap<ServingKey, ServingObject>,
    /// Each Service's Configuration and Route, as last derived.
    services: BTreeMap<ServingKey, Children>,
    configs: BTreeMap<ServingKey, ConfigState>,
    routes: BTreeMap<ServingKey, RouteState>,
    revisions: BTreeMap<ServingKey, RevisionState>,
    /// Routes by the Configurations and Revisions their traffic names.
    referenced_by: BTreeMap<ServingKey, BTreeSet<ServingKey>>,
    /// Revisions the current KIngresses split traffic to, with the Routes that do.
    routed_by: BTreeMap<ServingKey, BTreeSet<ServingKey>>,
    /// Applied Configurations and Routes shadowed by a Service's own.
    conflicts: BTreeMap<ServingKey, ObjectError>,
    dirty: Dirty,
    /// When each autoscaler ticks next.
    ticks: BTreeSet<(Instant, ServingKey)>,
    /// Routes whose KIngress the gateways may not serve yet.
    ingress_pending: BTreeSet<ServingKey>,
    /// Revisions in proxy mode not yet confirmed behind the activators.
    proxy_pending: BTreeSet<ServingKey>,
    /// The gateways may have moved (ACKs, probes, something published) since the last checks.
    gateway_moved: bool,
    view: View,
    versions: u64,
}

#[derive(Default)]
struct Dirty {
    services: BTreeSet<ServingKey>,
    configs: BTreeSet<ServingKey>,
    revisions: BTreeSet<ServingKey>,
    routes: BTreeSet<ServingKey>,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.configs.is_empty()
            && self.revisions.is_empty()
            && self.routes.is_empty()
    }
}

/// A Service's children (no status), with the generation each has.
struct Children {
    config: Configuration,
    route: Route,
}

struct ConfigState {
    /// With its status (shared with the view).
    config: Arc<Configuration>,
    /// The Revisions it stamped, by name.
    revisions: BTreeSet<String>,
    latest: Option<String>,
}

struct RouteState {
    /// With its status (shared with the view).
    route: Arc<Route>,
    /// The KIngress last made from it; kept while its traffic cannot be resolved.
    ingress: Option<Arc<Object>>,
    /// Bumped whenever `ingress` changes.
    ingress_version: u64,
    /// The gateways serve `ingress` (it stays so while only backends' endpoints change).
    ingress_ready: bool,
    /// The Configurations and Revisions its traffic names.
    refs: BTreeSet<ServingKey>,
    /// The revisions its KIngress splits to.
    targets: BTreeSet<ServingKey>,
}

struct RevisionState {
    /// With its status (shared with the view).
    revision: Arc<Revision>,
    pods: Arc<Vec<PodStatus>>,
    /// Knative's `ScaleTargetInitialized`: its initial scale was reached once (a pod was
    /// ready, or it starts at zero). Revisions stay `Ready` from then on.
    initialized: bool,
    /// Replicas last asked of the runtime.
    scaled: Option<usize>,
    cannot_run: Option<ObjectError>,
    scaler: Option<Scaler>,
    mode: ServeMode,
    /// The Service and Endpoints last published for it.
    backend: Option<[Arc<Object>; 2]>,
    /// Bumped whenever `backend` changes.
    backend_version: u64,
    /// What the activators were last given.
    activator: Option<ActivatorRevision>,
}

/// One revision's autoscaler and what it last decided.
struct Scaler {
    autoscaler: RevisionAutoscaler,
    last: Option<(Instant, Tick)>,
    /// An activator poked: tick now rather than at the next interval.
    poked: bool,
    /// Since when every gateway holds the endpoints that point at the activators.
    proxy_since: Option<Instant>,
    /// At zero with nothing to measure: no tick is scheduled until something arrives (a
    /// sample, a poke, any change to the revision). Thousands of idle revisions cost nothing.
    resting: bool,
}

impl ServingCore {
    pub fn new(config: CoreConfig) -> ServingCore {
        ServingCore {
            config,
            activators: Vec::new(),
            applied: BTreeMap::new(),
            services: BTreeMap::new(),
            configs: BTreeMap::new(),
            routes: BTreeMap::new(),
            revisions: BTreeMap::new(),
            referenced_by: BTreeMap::new(),
            routed_by: BTreeMap::new(),
            conflicts: BTreeMap::new(),
            dirty: Dirty::default(),
            ticks: BTreeSet::new(),
            ingress_pending: BTreeSet::new(),
            proxy_pending: BTreeSet::new(),
            gateway_moved: false,
            view: View::default(),
            versions: 0,
        }
    }

    pub fn autoscaling(&self) -> Option<&AutoscalerConfig> {
        self.config.autoscaling.as_ref()
    }

    // ---- inputs --------------------------------------------------------------------------

    /// A Service, Configuration or Route as the source holds it now (its generation set by the
    /// source). Revisions are stamped here, never applied: they are ignored.
    pub fn upsert(&mut self, object: ServingObject) {
        let key = object.key();
        match key.kind {
            ServingKind::Service => {
                self.dirty.services.insert(key.clone());
            }
            ServingKind::Configuration => {
                self.dirty.configs.insert(key.clone());
            }
            ServingKind::Route => {
                self.dirty.routes.insert(key.clone());
            }
            ServingKind::Revision => return,
        }
        self.applied.insert(key, object);
    }

    /// The source no longer holds `key`. Returns whether it did.
    pub fn delete(&mut self, key: &ServingKey) -> bool {
        if self.applied.remove(key).is_none() {
            return false;
        }
        match key.kind {
            ServingKind::Service => self.dirty.services.insert(key.clone()),
            ServingKind::Configuration => self.dirty.configs.insert(key.clone()),
            ServingKind::Route => self.dirty.routes.insert(key.clone()),
            ServingKind::Revision => false,
        };
        true
    }

    /// What the source holds under `key`.
    pub fn applied(&self, key: &ServingKey) -> Option<&ServingObject> {
        self.applied.get(key)
    }

    /// Why `key` cannot be deleted on its own: the Service (or Configuration) that owns it.
    pub fn owner_of(&self, key: &ServingKey) -> Option<String> {
        match key.kind {
            ServingKind::Configuration | ServingKind::Route => {
                let service = ServingKey::new(ServingKind::Service, &key.namespace, &key.name);
                self.services
                    .contains_key(&service)
                    .then(|| key.name.clone())
            }
            ServingKind::Revision => self.revisions.get(key).and_then(|r| {
                r.revision
                    .configuration()
                    .map(|c| format!("configuration {c}"))
            }),
            ServingKind::Service => None,
        }
    }

    /// The pods a runtime reports for `revision` now.
    pub fn set_pods(&mut self, revision: &ServingKey, pods: Vec<PodStatus>) {
        if let Some(state) = self.revisions.get_mut(revision) {
            if *state.pods != pods {
                state.pods = Arc::new(pods);
                self.dirty.revisions.insert(revision.clone());
            }
        }
    }

    /// Where the activators listen: proxy-mode endpoints point there.
    pub fn set_activators(&mut self, mut activators: Vec<SocketAddr>) {
        activators.sort_unstable();
        if activators != self.activators {
            self.activators = activators;
            self.dirty.revisions.extend(self.revisions.keys().cloned());
        }
    }

    /// The runtime refused to scale `revision`: it cannot run here.
    pub fn scale_failed(&mut self, revision: &ServingKey, error: ObjectError) {
        if let Some(state) = self.revisions.get_mut(revision) {
            if state.cannot_run.is_none() {
                warn!(error = %error, "revision cannot run");
            }
            state.cannot_run = Some(error);
            self.dirty.revisions.insert(revision.clone());
        }
    }

    /// Load for a revision's autoscaler (queue-proxy scrapes, activator reports).
    pub fn record(&mut self, revision: &ServingKey, now: Instant, sample: Sample) {
        if let Some(scaler) = self.scaler_mut(revision) {
            scaler.autoscaler.record(now, sample);
        }
        self.wake_scaler(revision, now);
    }

    /// A resting autoscaler ticks again from its next tick on.
    fn wake_scaler(&mut self, revision: &ServingKey, now: Instant) {
        let interval = self.tick_interval();
        let Some(scaler) = self.scaler_mut(revision) else {
            return;
        };
        if !mem::take(&mut scaler.resting) {
            return;
        }
        let next = scaler.last.map_or(now, |(at, _)| (at + interval).max(now));
        self.ticks.insert((next, revision.clone()));
    }

    /// An activator holds a request for `revision` and it has no ready pod: tick now.
    pub fn poke(&mut self, revision: &ServingKey, now: Instant) {
        if let Some(scaler) = self.scaler_mut(revision) {
            scaler.autoscaler.record(now, Sample::POKE);
            scaler.poked = true;
            debug!(revision = %revision, "poked by an activator");
            self.dirty.revisions.insert(revision.clone());
        }
    }

    fn scaler_mut(&mut self, revision: &ServingKey) -> Option<&mut Scaler> {
        self.revisions.get_mut(revision)?.scaler.as_mut()
    }

    /// The gateways moved (an ACK, a probe answered): ask [`ServingCore::gateway_checks`] again.
    pub fn gateway_moved(&mut self) {
        if !self.ingress_pending.is_empty() || !self.proxy_pending.is_empty() {
            self.gateway_moved = true;
        }
    }

    /// What to ask the gateways before the next pass; empty unless they moved since the last
    /// checks (or something was published).
    pub fn gateway_checks(&mut self) -> Vec<GatewayCheck> {
        if !mem::take(&mut self.gateway_moved) {
            return Vec::new();
        }
        let routes = self.ingress_pending.iter().filter_map(|key| {
            let state = self.routes.get(key)?;
            let ingress = state.ingress.as_ref()?;
            Some(GatewayCheck::Ingress {
                route: key.clone(),
                ingress: ingress.key(),
                version: state.ingress_version,
            })
        });
        let revisions = self.proxy_pending.iter().filter_map(|key| {
            let state = self.revisions.get(key)?;
            Some(GatewayCheck::Endpoints {
                revision: key.clone(),
                version: state.backend_version,
            })
        });
        routes.chain(revisions).collect()
    }

    /// The gateways' answers to [`ServingCore::gateway_checks`], as of `now`. Answers about
    /// something changed since the question are dropped.
    pub fn gateway_answers(
        &mut self,
        now: Instant,
        answers: impl IntoIterator<Item = (GatewayCheck, GatewayAnswer)>,
    ) {
        for (check, answer) in answers {
            match (check, answer) {
                (GatewayCheck::Ingress { route, version, .. }, GatewayAnswer::Ingress(ready)) => {
                    let Some(state) = self.routes.get_mut(&route) else {
                        continue;
                    };
                    if state.ingress_version == version && ready && !state.ingress_ready {
                        state.ingress_ready = true;
                        self.ingress_pending.remove(&route);
                        self.dirty.routes.insert(route);
                    }
                }
                (GatewayCheck::Endpoints { revision, version }, GatewayAnswer::Endpoints(held)) => {
                    let routed = self.is_wanted(&revision);
                    let Some(state) = self.revisions.get_mut(&revision) else {
                        continue;
                    };
                    // A revision nothing routes to has no endpoints to wait for.
                    let held = held.unwrap_or(!routed);
                    if state.backend_version != version || !held {
                        continue;
                    }
                    if let Some(scaler) = state.scaler.as_mut() {
                        if state.mode == ServeMode::Proxy && scaler.proxy_since.is_none() {
                            debug!(revision = %revision.name, "activators in the path");
                            scaler.proxy_since = Some(now);
                        }
                    }
                    self.proxy_pending.remove(&revision);
                }
                _ => {}
            }
        }
    }

    // ---- outputs -------------------------------------------------------------------------

    /// Every object with its status, and the pods; cheap to clone (persistent maps).
    pub fn view(&self) -> &View {
        &self.view
    }

    /// Applied Configurations and Routes a Service's own shadows.
    pub fn conflicts(&self) -> impl Iterator<Item = &ObjectError> {
        self.conflicts.values()
    }

    /// Whether a [`ServingCore::reconcile`] now would have anything to do.
    pub fn has_work(&self, now: Instant) -> bool {
        !self.dirty.is_empty()
            || self.gateway_moved
            || self.ticks.first().is_some_and(|(at, _)| *at <= now)
    }

    /// When the next autoscaler tick is due.
    pub fn next_tick(&self) -> Option<Instant> {
        self.ticks.first().map(|(at, _)| *at)
    }

    /// The ready pods' metrics addresses, for the autoscalers' scrapes.
    pub fn scrape_targets(&self) -> Vec<(ServingKey, SocketAddr)> {
        self.revisions
            .iter()
            .filter(|(_, r)| r.scaler.is_some())
            .flat_map(|(key, r)| {
                r.pods
                    .iter()
                    .filter(|p| p.phase == Phase::Ready)
                    .filter_map(|p| p.metrics_address.map(|a| (key.clone(), a)))
            })
            .collect()
    }

    // ---- the pass ------------------------------------------------------------------------

    /// Derives everything that changed since the last pass (and the autoscaler ticks due by
    /// `now`), and returns what the shell must do. Work is proportional to what changed.
    pub fn reconcile(&mut self, now: Instant) -> Plan {
        let mut plan = Plan::default();
        while let Some((at, key)) = self.ticks.first().cloned() {
            if at > now {
                break;
            }
            self.ticks.pop_first();
            if self.tick_due(&key, now) {
                self.dirty.revisions.insert(key);
            }
        }
        for _ in 0..MAX_ROUNDS {
            if self.dirty.is_empty() {
                break;
            }
            for key in mem::take(&mut self.dirty.services) {
                self.reconcile_service(&key, &mut plan);
            }
            for key in mem::take(&mut self.dirty.configs) {
                self.reconcile_config(&key, now, &mut plan);
            }
            for key in mem::take(&mut self.dirty.routes) {
                self.reconcile_route(&key, &mut plan);
            }
            for key in mem::take(&mut self.dirty.revisions) {
                self.reconcile_revision(&key, now, &mut plan);
            }
        }
        if !self.dirty.is_empty() {
            warn!("serving objects still changing after {MAX_ROUNDS} rounds; continuing next pass");
        }
        if !plan.publish.is_empty() {
            self.gateway_moved = true;
        }
        plan.statuses.sort();
        plan.statuses.dedup();
        plan
    }

    /// Ticks the autoscaler of `key` (its tick is due); whether its decision changed.
    fn tick_due(&mut self, key: &ServingKey, now: Instant) -> bool {
        let wanted = self.is_wanted(key);
        let interval = self.tick_interval();
        let Some(state) = self.revisions.get_mut(key) else {
            return false;
        };
        let ready_pods = state
            .pods
            .iter()
            .filter(|p| p.phase == Phase::Ready)
            .count();
        let Some(scaler) = state.scaler.as_mut() else {
            return false;
        };
        let before = scaler.last.map(|(_, t)| decision(&t));
        let no_pods = state.pods.is_empty();
        let (tick, ticked_at) = scaler.tick(now, interval, ready_pods, wanted, no_pods);
        if let Some(next) = ticked_at {
            self.ticks.insert((next, key.clone()));
        }
        before != Some(decision(&tick))
    }

    fn next_version(&mut self) -> u64 {
        self.versions += 1;
        self.versions
    }

    /// A Service: its children (generations bumped when their specs change) and its status.
    fn reconcile_service(&mut self, key: &ServingKey, plan: &mut Plan) {
        let config_key = ServingKey::new(ServingKind::Configuration, &key.namespace, &key.name);
        let route_key = ServingKey::new(ServingKind::Route, &key.namespace, &key.name);
        let Some(ServingObject::Service(service)) = self.applied.get(key) else {
            if self.services.remove(key).is_some() {
                self.conflicts.remove(&config_key);
                self.conflicts.remove(&route_key);
                self.dirty.configs.insert(config_key);
                self.dirty.routes.insert(route_key);
                self.view.services.remove(key);
                plan.statuses.push(key.clone());
            }
            return;
        };
        let (mut config, mut route) = service_to_children(service);
        let old = self.services.get(key);
        config.metadata.generation = Some(next_generation(
            old.map(|c| (&c.config.spec, c.config.metadata.generation)),
            &config.spec,
        ));
        route.metadata.generation = Some(next_generation(
            old.map(|c| (&c.route.spec, c.route.metadata.generation)),
            &route.spec,
        ));
        if old.is_none_or(|c| c.config != config) {
            self.dirty.configs.insert(config_key.clone());
        }
        if old.is_none_or(|c| c.route != route) {
            self.dirty.routes.insert(route_key.clone());
        }
        for child in [&config_key, &route_key] {
            if self.applied.contains_key(child) {
                self.conflicts.insert(
                    child.clone(),
                    ObjectError {
                        object: child.clone(),
                        field: None,
                        reason: format!(
                            "not owned by Service {}; the Service's own is used",
                            key.name
                        ),
                    },
                );
            } else {
                self.conflicts.remove(child);
            }
        }
        let config_status = self
            .configs
            .get(&config_key)
            .and_then(|c| c.config.status.clone())
            .unwrap_or_default();
        let route_status = self
            .routes
            .get(&route_key)
            .and_then(|r| r.route.status.clone())
            .unwrap_or_default();
        let mut service = service.clone();
        service.status = Some(service_status(&service, &config_status, &route_status));
        self.services
            .insert(key.clone(), Children { config, route });
        if self.view.services.get(key).map(|s| &**s) != Some(&service) {
            self.view.services.insert(key.clone(), Arc::new(service));
            plan.statuses.push(key.clone());
        }
    }

    /// The Configuration under `key` now: a Service's own, else the applied one.
    fn effective_config(&self, key: &ServingKey) -> Option<Configuration> {
        let service = ServingKey::new(ServingKind::Service, &key.namespace, &key.name);
        if let Some(children) = self.services.get(&service) {
            return Some(children.config.clone());
        }
        match self.applied.get(key) {
            Some(ServingObject::Configuration(c)) => Some(c.clone()),
            _ => None,
        }
    }

    fn effective_route(&self, key: &ServingKey) -> Option<Route> {
        let service = ServingKey::new(ServingKind::Service, &key.namespace, &key.name);
        if let Some(children) = self.services.get(&service) {
            return Some(children.route.clone());
        }
        match self.applied.get(key) {
            Some(ServingObject::Route(r)) => Some(r.clone()),
            _ => None,
        }
    }

    /// The Revisions a Configuration stamped, with their statuses.
    fn owned_revisions(&self, key: &ServingKey, names: &BTreeSet<String>) -> Vec<Revision> {
        names
            .iter()
            .filter_map(|name| {
                let rev = ServingKey::new(ServingKind::Revision, &key.namespace, name);
                self.revisions.get(&rev).map(|r| (*r.revision).clone())
            })
            .collect()
    }

    /// The revisions that count as ready for the reconcilers (of `names`).
    fn ready_names<'a>(
        &self,
        namespace: &str,
        names: impl IntoIterator<Item = &'a String>,
    ) -> BTreeSet<String> {
        names
            .into_iter()
            .filter(|name| {
                let key = ServingKey::new(ServingKind::Revision, namespace, name);
                self.revisions.get(&key).is_some_and(RevisionState::ready)
            })
            .cloned()
            .collect()
    }

    /// A Configuration: a new Revision when its template changed, its latest, its status.
    fn reconcile_config(&mut self, key: &ServingKey, now: Instant, plan: &mut Plan) {
        let Some(mut config) = self.effective_config(key) else {
            if let Some(state) = self.configs.remove(key) {
                for name in state.revisions {
                    let rev = ServingKey::new(ServingKind::Revision, &key.namespace, &name);
                    self.remove_revision(&rev, plan);
                }
                self.view.configurations.remove(key);
                plan.statuses.push(key.clone());
                self.dirty_referrers(key);
            }
            return;
        };
        let names = self
            .configs
            .get(key)
            .map(|c| c.revisions.clone())
            .unwrap_or_default();
        let mut owned = self.owned_revisions(key, &names);
        let mut names = names;
        if let Some(revision) =
            configuration_revision(&config, &self.namespace_revisions(&config, &owned))
        {
            info!(revision = %revision.metadata.name, namespace = %revision.metadata.namespace, "revision created");
            let rev_key = revision_key(&revision);
            names.insert(revision.metadata.name.clone());
            owned.push(revision.clone());
            self.add_revision(rev_key, revision, now);
        }
        let latest = latest_created_revision(&config, &owned).map(|r| r.metadata.name.clone());
        let ready = self.ready_names(&key.namespace, &names);
        config.status = Some(configuration_status(&config, &owned, &ready));
        let old = self.configs.get(key);
        let old_latest = old.and_then(|c| c.latest.clone());
        if old_latest != latest {
            for name in old_latest.iter().chain(&latest) {
                self.dirty.revisions.insert(ServingKey::new(
                    ServingKind::Revision,
                    &key.namespace,
                    name,
                ));
            }
        }
        let config = match old {
            Some(c) if *c.config == config => c.config.clone(),
            _ => {
                self.dirty_referrers(key);
                self.dirty_owning_service(key);
                let config = Arc::new(config);
                self.view.configurations.insert(key.clone(), config.clone());
                plan.statuses.push(key.clone());
                config
            }
        };
        self.configs.insert(
            key.clone(),
            ConfigState {
                config,
                revisions: names,
                latest,
            },
        );
    }

    /// What [`configuration_revision`] must see to pick a free name: the Configuration's own
    /// revisions, plus any revision of the namespace already holding the name it would pick.
    fn namespace_revisions(&self, config: &Configuration, owned: &[Revision]) -> Vec<Revision> {
        let mut all = owned.to_vec();
        let namespace = &config.metadata.namespace;
        // Names other configurations hold: only a user-chosen name or `<config>-NNNNN` can
        // collide, and both are looked up directly.
        let template_name = &config.spec.template.metadata.name;
        let after = owned
            .iter()
            .filter_map(Revision::configuration_generation)
            .max()
            .map_or(1, |g| g + 1);
        let generation = config.metadata.generation.unwrap_or(1).max(after);
        let generated = format!("{}-{generation:05}", config.metadata.name);
        for name in [template_name, &generated] {
            if name.is_empty() || all.iter().any(|r| r.metadata.name == *name) {
                continue;
            }
            let rev = ServingKey::new(ServingKind::Revision, namespace, name);
            if let Some(state) = self.revisions.get(&rev) {
                all.push((*state.revision).clone());
            }
        }
        all
    }

    fn add_revision(&mut self, key: ServingKey, revision: Revision, now: Instant) {
        let scaler = self
            .config
            .autoscaling
            .as_ref()
            .map(|config| Scaler::new(&revision, config, now));
        self.revisions.insert(
            key.clone(),
            RevisionState {
                revision: Arc::new(revision),
                pods: Arc::default(),
                initialized: false,
                scaled: None,
                cannot_run: None,
                scaler,
                mode: ServeMode::Serve,
                backend: None,
                backend_version: 0,
                activator: None,
            },
        );
        self.dirty.revisions.insert(key);
    }

    /// A Revision whose Configuration is gone: its pods stop, its endpoints go.
    fn remove_revision(&mut self, key: &ServingKey, plan: &mut Plan) {
        let Some(state) = self.revisions.remove(key) else {
            return;
        };
        info!(revision = %key.name, namespace = %key.namespace, "revision deleted");
        plan.scale
            .push((RevisionRef::from_revision(&state.revision), 0));
        if let Some(backend) = state.backend {
            plan.publish
                .extend(backend.iter().map(|o| Change::Delete(o.key())));
        }
        if state.activator.is_some() {
            plan.activator
                .push((format!("{}/{}", key.namespace, key.name), None));
        }
        // Its scheduled tick finds no revision and is dropped.
        self.proxy_pending.remove(key);
        self.view.revisions.remove(key);
        self.view.pods.remove(key);
        plan.statuses.push(key.clone());
        self.dirty_referrers(key);
    }

    fn tick_interval(&self) -> std::time::Duration {
        self.config
            .autoscaling
            .as_ref()
            .map(|c| c.tick_interval)
            .unwrap_or_default()
    }

    /// The Service that may own `key` (a Configuration or Route of the same name) must be redone.
    fn dirty_owning_service(&mut self, key: &ServingKey) {
        self.dirty.services.insert(ServingKey::new(
            ServingKind::Service,
            &key.namespace,
            &key.name,
        ));
    }

    /// Routes naming `key` (a Configuration or Revision) in their traffic must be redone.
    fn dirty_referrers(&mut self, key: &ServingKey) {
        if let Some(routes) = self.referenced_by.get(key) {
            self.dirty.routes.extend(routes.iter().cloned());
        }
        if key.kind == ServingKind::Revision {
            if let Some(routes) = self.routed_by.get(key) {
                self.dirty.routes.extend(routes.iter().cloned());
            }
        }
    }

    /// Whether the gateway routes to `revision` or it is its Configuration's latest.
    fn is_wanted(&self, revision: &ServingKey) -> bool {
        if self.routed_by.get(revision).is_some_and(|r| !r.is_empty()) {
            return true;
        }
        let Some(state) = self.revisions.get(revision) else {
            return false;
        };
        let Some(config) = state.revision.configuration() else {
            return false;
        };
        let config = ServingKey::new(ServingKind::Configuration, &revision.namespace, config);
        self.configs
            .get(&config)
            .is_some_and(|c| c.latest.as_deref() == Some(revision.name.as_str()))
    }

    /// A Route: its KIngress (the last good one stays while traffic cannot be resolved), what
    /// it routes to, and its status.
    fn reconcile_route(&mut self, key: &ServingKey, plan: &mut Plan) {
        let Some(mut route) = self.effective_route(key) else {
            if let Some(state) = self.routes.remove(key) {
                self.set_route_links(
                    key,
                    &BTreeSet::new(),
                    &state.refs,
                    &BTreeSet::new(),
                    &state.targets,
                );
                if let Some(ingress) = state.ingress {
                    plan.publish.push(Change::Delete(ingress.key()));
                }
                self.ingress_pending.remove(key);
                self.view.routes.remove(key);
                plan.statuses.push(key.clone());
            }
            return;
        };
        let namespace = key.namespace.clone();
        // What its traffic names, and everything the reconcilers need to resolve it.
        let mut refs = BTreeSet::new();
        let mut configs = Vec::new();
        let mut revisions: Vec<Revision> = Vec::new();
        for target in &route.spec.traffic {
            if !target.revision_name.is_empty() {
                let rev = ServingKey::new(ServingKind::Revision, &namespace, &target.revision_name);
                if let Some(state) = self.revisions.get(&rev) {
                    revisions.push((*state.revision).clone());
                }
                refs.insert(rev);
            } else {
                let config = ServingKey::new(
                    ServingKind::Configuration,
                    &namespace,
                    &target.configuration_name,
                );
                if let Some(state) = self.configs.get(&config) {
                    if !configs
                        .iter()
                        .any(|c: &Configuration| c.metadata.name == state.config.metadata.name)
                    {
                        configs.push((*state.config).clone());
                        revisions.extend(self.owned_revisions(&config, &state.revisions));
                    }
                }
                refs.insert(config);
            }
        }
        revisions.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        revisions.dedup_by(|a, b| a.metadata.name == b.metadata.name);
        let ready = self.ready_names(&namespace, revisions.iter().map(|r| &r.metadata.name));
        let old = self.routes.remove(key);
        let (mut ingress, mut ingress_version, mut ingress_ready) = match &old {
            Some(s) => (s.ingress.clone(), s.ingress_version, s.ingress_ready),
            None => (None, 0, false),
        };
        match route_to_ingress(&route, &revisions, &configs, &self.config.domain) {
            Ok(made) => {
                let made = Arc::new(Object::Ingress(made));
                if ingress.as_ref() != Some(&made) {
                    plan.publish.push(Change::Upsert(made.clone()));
                    ingress = Some(made);
                    ingress_version = self.next_version();
                    ingress_ready = false;
                }
            }
            Err(e) => debug!(route = %key, error = %e, "route traffic cannot be resolved"),
        }
        if ingress.is_some() && !ingress_ready {
            self.ingress_pending.insert(key.clone());
            self.gateway_moved = true;
        } else {
            self.ingress_pending.remove(key);
        }
        let targets = ingress.as_deref().map(ingress_targets).unwrap_or_default();
        let (old_refs, old_targets) = old
            .as_ref()
            .map(|s| (s.refs.clone(), s.targets.clone()))
            .unwrap_or_default();
        self.set_route_links(key, &refs, &old_refs, &targets, &old_targets);
        route.status = Some(route_status(
            &route,
            &revisions,
            &configs,
            &ready,
            ingress_ready,
            &self.config.domain,
        ));
        let route = match &old {
            Some(s) if *s.route == route => s.route.clone(),
            _ => {
                self.dirty_owning_service(key);
                let route = Arc::new(route);
                self.view.routes.insert(key.clone(), route.clone());
                plan.statuses.push(key.clone());
                route
            }
        };
        self.routes.insert(
            key.clone(),
            RouteState {
                route,
                ingress,
                ingress_version,
                ingress_ready,
                refs,
                targets,
            },
        );
    }

    /// Keeps `referenced_by` and `routed_by` in step with a Route's refs and targets; revisions
    /// it starts or stops routing to are redone (whether they run depends on it).
    fn set_route_links(
        &mut self,
        route: &ServingKey,
        refs: &BTreeSet<ServingKey>,
        old_refs: &BTreeSet<ServingKey>,
        targets: &BTreeSet<ServingKey>,
        old_targets: &BTreeSet<ServingKey>,
    ) {
        for gone in old_refs.difference(refs) {
            if let Some(set) = self.referenced_by.get_mut(gone) {
                set.remove(route);
                if set.is_empty() {
                    self.referenced_by.remove(gone);
                }
            }
        }
        for new in refs.difference(old_refs) {
            self.referenced_by
                .entry(new.clone())
                .or_default()
                .insert(route.clone());
        }
        for gone in old_targets.difference(targets) {
            if let Some(set) = self.routed_by.get_mut(gone) {
                set.remove(route);
                if set.is_empty() {
                    self.routed_by.remove(gone);
                }
            }
            self.dirty.revisions.insert(gone.clone());
        }
        for new in targets.difference(old_targets) {
            self.routed_by
                .entry(new.clone())
                .or_default()
                .insert(route.clone());
            self.dirty.revisions.insert(new.clone());
        }
    }

    /// A Revision: its autoscaler's decision, its scale, its endpoints, what the activators
    /// know of it, and its status.
    fn reconcile_revision(&mut self, key: &ServingKey, now: Instant, plan: &mut Plan) {
        let wanted = self.is_wanted(key);
        let activators = self.activators.clone();
        let tick_interval = self.tick_interval();
        let autoscaling = self.config.autoscaling.is_some();
        // Whatever brought the revision here may change what its autoscaler decides.
        self.wake_scaler(key, now);
        let Some(state) = self.revisions.get_mut(key) else {
            return;
        };
        let ready_pods = state
            .pods
            .iter()
            .filter(|p| p.phase == Phase::Ready)
            .count();
        let no_pods = state.pods.is_empty();
        let (replicas, mode, in_panic) = match state.scaler.as_mut() {
            None => (
                if wanted {
                    initial_scale(&state.revision)
                } else {
                    0
                },
                ServeMode::Serve,
                None,
            ),
            Some(scaler) => {
                let (tick, ticked_at) =
                    scaler.tick(now, tick_interval, ready_pods, wanted, no_pods);
                if let Some(next) = ticked_at {
                    self.ticks.insert((next, key.clone()));
                }
                (tick.desired_pods, tick.mode, Some(tick.in_panic))
            }
        };
        state.mode = mode;
        if state.scaled != Some(replicas) {
            info!(revision = %key.name, namespace = %key.namespace, replicas, "scaled");
            plan.scale
                .push((RevisionRef::from_revision(&state.revision), replicas));
            state.scaled = Some(replicas);
        }
        // Knative marks the scale target initialized once the initial scale is reached: a
        // ready pod, or at once for a revision that starts at zero.
        let starts_at_zero = match &state.scaler {
            Some(s) => {
                let scaling = s.autoscaler.scaling();
                scaling.initial_scale == 0 && scaling.min_scale == 0
            }
            None => initial_scale(&state.revision) == 0,
        };
        if ready_pods > 0 || (starts_at_zero && replicas == 0) {
            state.initialized = true;
        }

        if autoscaling {
            let table = activator_revision(&state.revision, &state.pods);
            if state.activator.as_ref() != Some(&table) {
                plan.activator.push((
                    format!("{}/{}", key.namespace, key.name),
                    Some(table.clone()),
                ));
                state.activator = Some(table);
            }
        }

        let targets = match mode {
            ServeMode::Proxy => Targets::Activators(activator_subset(key, &activators)),
            ServeMode::Serve => Targets::Pods(&state.pods),
        };
        let backend = revision_backend(&state.revision, targets).map(Arc::new);
        if state.backend.as_ref() != Some(&backend) {
            plan.publish
                .extend(backend.iter().map(|o| Change::Upsert(o.clone())));
            state.backend = Some(backend);
            self.versions += 1;
            state.backend_version = self.versions;
        }

        let confirm_proxy = mode == ServeMode::Proxy
            && !activators.is_empty()
            && state
                .scaler
                .as_ref()
                .is_some_and(|s| s.proxy_since.is_none());
        if !confirm_proxy {
            if let Some(scaler) = state.scaler.as_mut() {
                if mode != ServeMode::Proxy {
                    scaler.proxy_since = None;
                }
            }
        }

        let mut status = revision_status(
            &state.revision,
            &state.pods,
            state.initialized,
            state.scaled,
            state
                .cannot_run
                .as_ref()
                .map(ObjectError::message)
                .as_deref(),
        );
        status.in_panic = in_panic;
        status.desired_replicas = Some(replicas as i64);
        status.serving_mode = Some(format!("{mode:?}"));
        let was_ready = state.ready();
        let status_changed = state.revision.status.as_ref() != Some(&status);
        if status_changed {
            let mut revision = (*state.revision).clone();
            revision.status = Some(status);
            state.revision = Arc::new(revision);
        }
        let now_ready = state.ready();
        let pods_changed = self.view.pods.get(key) != Some(&state.pods);
        if pods_changed {
            // The pods are part of what readers see of the revision.
            self.view.pods.insert(key.clone(), state.pods.clone());
            plan.statuses.push(key.clone());
        }
        if status_changed {
            self.view
                .revisions
                .insert(key.clone(), state.revision.clone());
            plan.statuses.push(key.clone());
        }
        if status_changed || was_ready != now_ready {
            if let Some(config) = state.revision.configuration() {
                self.dirty.configs.insert(ServingKey::new(
                    ServingKind::Configuration,
                    &key.namespace,
                    config,
                ));
            }
            self.dirty_referrers(key);
        }
        if confirm_proxy {
            self.proxy_pending.insert(key.clone());
            self.gateway_moved = true;
        } else {
            self.proxy_pending.remove(key);
        }
    }
}

impl RevisionState {
    /// Ready for the reconcilers: initialized, and nothing says it cannot run.
    fn ready(&self) -> bool {
        self.initialized && self.cannot_run.is_none()
    }
}

impl Scaler {
    fn new(revision: &Revision, config: &AutoscalerConfig, now: Instant) -> Scaler {
        let cc = revision.spec.container_concurrency();
        let scaling = RevisionScaling::from_annotations(&revision.metadata.annotations, cc, config)
            .unwrap_or_else(|e| {
                warn!(revision = %revision.metadata.name, error = %e, "autoscaling annotations ignored");
                RevisionScaling::from_annotations(&BTreeMap::new(), cc, config)
                    .expect("the defaults are valid")
            });
        Scaler {
            autoscaler: RevisionAutoscaler::new(scaling, now),
            last: None,
            poked: false,
            proxy_since: None,
            resting: false,
        }
    }

    /// The autoscaler's decision: a new one every tick interval (or at once after a poke, or
    /// the first time), otherwise the last one. Returns when the next tick is due, if it ticked
    /// and is not at rest.
    fn tick(
        &mut self,
        now: Instant,
        interval: std::time::Duration,
        ready_pods: usize,
        reachable: bool,
        no_pods: bool,
    ) -> (Tick, Option<Instant>) {
        let first = match &self.last {
            Some((at, tick)) if !self.poked && now.duration_since(*at) < interval => {
                return (*tick, None);
            }
            last => last.is_none(),
        };
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
        // Inactive at zero with no load measured: nothing changes until something arrives.
        if no_pods && tick.desired_pods == 0 && tick.inactive && tick.observed.is_none() {
            self.resting = true;
            return (tick, None);
        }
        // The autoscaler's metric buckets are seconds from its first tick: later ticks land
        // late in a second, once that second's scrapes are in (a tick at the very start of a
        // second would see an empty panic window).
        let next = if first {
            now + interval + TICK_PHASE
        } else {
            now + interval
        };
        (tick, Some(next))
    }
}

/// What a tick decides that the rest of the revision depends on.
fn decision(tick: &Tick) -> (usize, ServeMode, bool) {
    (tick.desired_pods, tick.mode, tick.in_panic)
}

/// The generation of a Service's child: the old one, bumped when the spec changed.
fn next_generation<S: PartialEq>(old: Option<(&S, Option<i64>)>, spec: &S) -> i64 {
    match old {
        Some((old_spec, generation)) if old_spec == spec => generation.unwrap_or(1),
        Some((_, generation)) => generation.unwrap_or(0) + 1,
        None => 1,
    }
}

fn revision_key(revision: &Revision) -> ServingKey {
    key_of(ServingKind::Revision, &revision.metadata)
}

fn key_of(kind: ServingKind, meta: &ObjectMeta) -> ServingKey {
    ServingKey::new(kind, &meta.namespace, &meta.name)
}

/// The revisions a KIngress splits traffic to.
fn ingress_targets(object: &Object) -> BTreeSet<ServingKey> {
    let Object::Ingress(ingress) = object else {
        return BTreeSet::new();
    };
    splits(ingress)
}

fn splits(ingress: &Ingress) -> BTreeSet<ServingKey> {
    ingress
        .spec
        .rules
        .iter()
        .flat_map(|rule| rule.http.iter().flat_map(|h| &h.paths))
        .flat_map(|path| &path.splits)
        .map(|split| {
            ServingKey::new(
                ServingKind::Revision,
                &split.service_namespace,
                &split.service_name,
            )
        })
        .collect()
}
