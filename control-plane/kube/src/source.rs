//! The API-server source: KIngresses of Knarr's classes, Services, Endpoints and EndpointSlices
//! from watches, and only the Secrets that an ingress's TLS names, turned into the same
//! [`Batch`]es the file source produces.
//!
//! No object is cached twice: a watch event is parsed straight into the model (the ingress
//! index keeps the parsed object); this module keeps only each object's resource version, to
//! tell a relist's unchanged objects from changed ones and to find the ones a relist no longer
//! has. The first complete list of every kind becomes one batch, so the first snapshot holds
//! everything; after that, events that arrive together go out together.
//!
//! A watch that breaks is retried with kube's default back-off, and listed again (not resumed
//! from its resource version, which a wiped or restored etcd does not know); objects missing
//! from the new list are deleted. While the API server is unreachable nothing changes: Envoy
//! keeps serving the last config.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use knarr_control::source::{Batch, Change, Origin, SourceError};
use knarr_model::{Kind, Object, ObjectKey, INGRESS_CLASS_ANNOTATION};
use knarr_translate::reconcile::ClassFilter;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

/// What the source saw of a KIngress besides its spec: the status writer compares against it
/// (so nothing is written that is already there) and keeps its transition times.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedIngress {
    pub generation: Option<i64>,
    pub status: serde_json::Value,
}

/// The KIngresses of our classes as last seen, shared with the status writer.
pub type Observed = Arc<Mutex<HashMap<ObjectKey, ObservedIngress>>>;

/// Ingresses whose status may need writing, once batch `seq` (counted as the ingress controller
/// counts applied batches) is applied.
#[derive(Debug)]
pub struct Touched {
    pub seq: u64,
    pub keys: Vec<ObjectKey>,
}

/// A running API-server source.
pub struct KubeSource {
    /// Everything the first complete lists held.
    pub initial: Batch,
    /// The batches after the first.
    pub batches: mpsc::Receiver<Batch>,
    pub observed: Observed,
    /// Ingresses to look at for status (the initial batch's included, as `seq` 1).
    pub touched: mpsc::UnboundedReceiver<Touched>,
    control: mpsc::UnboundedSender<Control>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The watched kinds (Secrets are watched one by one, by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Stream {
    Kind(Kind),
    Secret(u64),
}

fn api_resource(kind: Kind) -> ApiResource {
    let (group, version, kind_name, plural) = match kind {
        Kind::Ingress => (
            "networking.internal.knative.dev",
            "v1alpha1",
            "Ingress",
            "ingresses",
        ),
        Kind::Service => ("", "v1", "Service", "services"),
        Kind::Endpoints => ("", "v1", "Endpoints", "endpoints"),
        Kind::EndpointSlice => ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
        Kind::Secret => ("", "v1", "Secret", "secrets"),
        Kind::Serving(_) => unreachable!("serving kinds are not watched by the ingress source"),
    };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind_name), plural)
}

/// The KIngress resource (`networking.internal.knative.dev/v1alpha1`, `ingresses`).
pub fn ingress_api_resource() -> ApiResource {
    api_resource(Kind::Ingress)
}

const WATCHED: [Kind; 4] = [
    Kind::Ingress,
    Kind::Service,
    Kind::Endpoints,
    Kind::EndpointSlice,
];

/// One event of one watch, or the error it reported.
struct Delivery {
    stream: Stream,
    event: Result<Event<DynamicObject>, watcher::Error>,
}

impl KubeSource {
    /// Starts the watches and waits until each has listed once (retrying with back-off while the
    /// API server cannot be reached or refuses).
    ///
    /// With `gateway_pods`, the EndpointSlices of that gateway Service are followed too (see
    /// [`crate::gateways`]).
    pub async fn start(
        client: Client,
        namespace: Option<String>,
        classes: ClassFilter,
        gateway_pods: Option<crate::gateways::GatewayPods>,
    ) -> anyhow::Result<KubeSource> {
        let (events_tx, events_rx) = mpsc::channel(1024);
        let mut ingress_watch = None;
        for kind in WATCHED {
            let task = watch_kind(&client, namespace.as_deref(), kind, &events_tx);
            if kind == Kind::Ingress {
                ingress_watch = Some(task);
            }
        }
        let (control, control_rx) = mpsc::unbounded_channel();
        let observed: Observed = Arc::default();
        let (batches_tx, batches) = mpsc::channel(64);
        let (touched_tx, touched) = mpsc::unbounded_channel();
        let (initial_tx, initial_rx) = oneshot::channel();
        let state = State {
            client,
            namespace,
            ingress_watch: ingress_watch.expect("KIngresses are watched"),
            classes,
            events_tx,
            known: HashMap::new(),
            relisting: HashMap::new(),
            errored: HashSet::new(),
            secret_users: HashMap::new(),
            secrets_of: HashMap::new(),
            secret_watches: HashMap::new(),
            next_secret: 0,
            unsynced: WATCHED.iter().map(|k| Stream::Kind(*k)).collect(),
            observed: observed.clone(),
            gateway_pods,
            pending: Pending::default(),
            seq: 0,
        };
        let task =
            tokio::spawn(state.run(events_rx, control_rx, initial_tx, batches_tx, touched_tx));
        let initial = initial_rx
            .await
            .map_err(|_| anyhow::anyhow!("the API-server source stopped before its first list"))?;
        Ok(KubeSource {
            initial,
            batches,
            observed,
            touched,
            control,
            task,
        })
    }

    /// A handle that changes what the running source takes.
    pub fn control(&self) -> SourceControl {
        SourceControl(self.control.clone())
    }
}

/// Changes a running [`KubeSource`].
#[derive(Clone)]
pub struct SourceControl(mpsc::UnboundedSender<Control>);

impl SourceControl {
    /// Programs other ingress classes from now on: the KIngresses are listed again, those of
    /// classes no longer taken are deleted and those newly taken are added (in one batch).
    pub fn set_classes(&self, classes: ClassFilter) {
        let _ = self.0.send(Control::SetClasses(classes));
    }
}

/// What the source is told while it runs.
enum Control {
    SetClasses(ClassFilter),
}

/// Starts the watch of one kind, in one namespace or all.
fn watch_kind(
    client: &Client,
    namespace: Option<&str>,
    kind: Kind,
    events: &mpsc::Sender<Delivery>,
) -> AbortHandle {
    let ar = api_resource(kind);
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    tokio::spawn(pump(
        Stream::Kind(kind),
        api,
        watcher::Config::default(),
        events.clone(),
    ))
    .abort_handle()
}

/// The first pause before a watch that failed after its list lists again; it doubles up to
/// [`MAX_RELIST_DELAY`] while watches keep failing soon after their list.
const MIN_RELIST_DELAY: Duration = Duration::from_millis(250);
const MAX_RELIST_DELAY: Duration = Duration::from_secs(30);
/// A watch that lasted this long before failing starts the pauses over.
const HEALTHY_WATCH: Duration = Duration::from_secs(60);

/// Feeds one watch's events (with kube's default back-off between failures) into `tx`.
///
/// A watch that fails after its list (the connection to the API server broke, or the API
/// server refused to resume it) is started over with a new list rather than resumed from its
/// resource version: kube's watcher would resume, and after etcd is wiped or restored that
/// version belongs to another history — the API server then silently waits for it, so the
/// objects made since are never seen and the ones gone never deleted. The new list's
/// `Init`..`InitDone` is a relist, which deletes what is gone (as client-go's reflector, which
/// lists again after a failed watch).
async fn pump(
    stream: Stream,
    api: Api<DynamicObject>,
    config: watcher::Config,
    tx: mpsc::Sender<Delivery>,
) {
    let mut delay = Duration::ZERO;
    loop {
        let mut events = watcher::watcher(api.clone(), config.clone())
            .default_backoff()
            .boxed();
        // Since when the watch follows changes (after its list).
        let mut watching: Option<Instant> = None;
        while let Some(event) = events.next().await {
            let listed = matches!(event, Ok(Event::InitDone));
            let failed = event.is_err() && watching.is_some();
            if tx.send(Delivery { stream, event }).await.is_err() {
                return;
            }
            if listed {
                watching = Some(Instant::now());
            }
            if failed {
                break;
            }
        }
        if watching.is_some_and(|since| since.elapsed() >= HEALTHY_WATCH) {
            delay = Duration::ZERO;
        }
        debug!(watch = ?stream, ?delay, "the watch failed after its list: listing again");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).clamp(MIN_RELIST_DELAY, MAX_RELIST_DELAY);
    }
}

/// What the next batch holds.
#[derive(Default)]
struct Pending {
    changes: BTreeMap<ObjectKey, Change>,
    errors: BTreeMap<ObjectKey, SourceError>,
    cleared: BTreeSet<ObjectKey>,
    touched: BTreeSet<ObjectKey>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.errors.is_empty() && self.cleared.is_empty()
    }

    fn take(&mut self) -> (Batch, Vec<ObjectKey>) {
        let p = std::mem::take(self);
        let batch = Batch {
            changes: p.changes.into_values().collect(),
            errors: p.errors.into_values().collect(),
            cleared: p.cleared.into_iter().map(Origin::Object).collect(),
        };
        (batch, p.touched.into_iter().collect())
    }
}

struct State {
    client: Client,
    /// The one namespace watched (`None`: all).
    namespace: Option<String>,
    /// The KIngress watch (restarted when the classes change).
    ingress_watch: AbortHandle,
    classes: ClassFilter,
    events_tx: mpsc::Sender<Delivery>,
    /// Every object handed on (and not deleted since), with its resource version.
    known: HashMap<ObjectKey, String>,
    /// Per watch in the middle of a relist: the objects it listed so far.
    relisting: HashMap<Stream, HashSet<ObjectKey>>,
    /// Objects with a source error standing.
    errored: HashSet<ObjectKey>,
    /// Per Secret (a `Secret` key): the ingresses naming it.
    secret_users: HashMap<ObjectKey, HashSet<ObjectKey>>,
    /// Per ingress: the Secrets it names.
    secrets_of: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// Per named Secret: its watch.
    secret_watches: HashMap<ObjectKey, (Stream, AbortHandle)>,
    next_secret: u64,
    /// Watches that have not finished their first list; the first batch waits for them.
    unsynced: HashSet<Stream>,
    observed: Observed,
    /// The gateway pods, when a gateway Service is followed.
    gateway_pods: Option<crate::gateways::GatewayPods>,
    pending: Pending,
    /// Batches sent so far.
    seq: u64,
}

impl State {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Delivery>,
        mut control: mpsc::UnboundedReceiver<Control>,
        initial: oneshot::Sender<Batch>,
        batches: mpsc::Sender<Batch>,
        touched: mpsc::UnboundedSender<Touched>,
    ) {
        let started = std::time::Instant::now();
        // The first complete list of everything, as one batch.
        while !self.unsynced.is_empty() {
            let Some(delivery) = events.recv().await else {
                return;
            };
            self.handle(delivery);
        }
        let (batch, keys) = self.pending.take();
        info!(
            objects = batch.changes.len(),
            errors = batch.errors.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "API server listed"
        );
        self.seq = 1;
        let _ = touched.send(Touched { seq: 1, keys });
        if initial.send(batch).is_err() {
            return;
        }
        // Then: whatever arrived together, as one batch.
        loop {
            tokio::select! {
                delivery = events.recv() => match delivery {
                    Some(delivery) => self.handle(delivery),
                    None => return,
                },
                Some(Control::SetClasses(classes)) = control.recv() => {
                    info!(?classes, "ingress classes changed: listing KIngresses again");
                    self.classes = classes;
                    self.ingress_watch.abort();
                    self.relisting.remove(&Stream::Kind(Kind::Ingress));
                    self.ingress_watch = watch_kind(
                        &self.client,
                        self.namespace.as_deref(),
                        Kind::Ingress,
                        &self.events_tx,
                    );
                    continue;
                }
            }
            while let Ok(more) = events.try_recv() {
                self.handle(more);
            }
            if self.pending.is_empty() {
                // Only statuses changed (someone else's write, a restore): nothing to
                // translate, but the status writer looks at them once what is applied now
                // is (else they would wait for the next change to anything).
                let keys: Vec<ObjectKey> = std::mem::take(&mut self.pending.touched)
                    .into_iter()
                    .collect();
                if !keys.is_empty() {
                    let _ = touched.send(Touched {
                        seq: self.seq,
                        keys,
                    });
                }
                continue;
            }
            let (batch, keys) = self.pending.take();
            if batches.send(batch).await.is_err() {
                return;
            }
            self.seq += 1;
            if !keys.is_empty() {
                let _ = touched.send(Touched {
                    seq: self.seq,
                    keys,
                });
            }
        }
    }

    fn handle(&mut self, Delivery { stream, event }: Delivery) {
        match event {
            Err(e) => warn!(watch = ?stream, error = %e, "watch failed; retrying with back-off"),
            Ok(Event::Init) => {
                debug!(watch = ?stream, "listing");
                self.relisting.insert(stream, HashSet::new());
            }
            Ok(Event::InitApply(object)) => {
                if let Some(key) = self.apply(stream, object) {
                    if let Some(seen) = self.relisting.get_mut(&stream) {
                        seen.insert(key);
                    }
                }
            }
            Ok(Event::InitDone) => {
                let seen = self.relisting.remove(&stream).unwrap_or_default();
                let gone: Vec<ObjectKey> = self
                    .known
                    .keys()
                    .filter(|k| self.belongs(stream, k) && !seen.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    self.delete(key);
                }
                self.unsynced.remove(&stream);
            }
            Ok(Event::Apply(object)) => {
                self.apply(stream, object);
            }
            Ok(Event::Delete(object)) => {
                if let Some(key) = key_of(stream, &object) {
                    self.delete(key);
                }
            }
        }
    }

    /// Whether `key` comes from `stream`.
    fn belongs(&self, stream: Stream, key: &ObjectKey) -> bool {
        match stream {
            Stream::Kind(kind) => key.kind == kind,
            Stream::Secret(_) => self
                .secret_watches
                .get(key)
                .is_some_and(|(s, _)| *s == stream),
        }
    }

    /// Takes in an added or changed object; returns its key if it is one we keep.
    fn apply(&mut self, stream: Stream, object: DynamicObject) -> Option<ObjectKey> {
        let key = key_of(stream, &object)?;
        let class = object
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(INGRESS_CLASS_ANNOTATION));
        if key.kind == Kind::Ingress && !self.classes.wants_class(class.map(String::as_str)) {
            // Not ours (any more).
            self.delete(key);
            return None;
        }
        let version = match key.kind {
            // Our own status writes change the resource version but not what is translated:
            // the spec (its generation) and the annotations and labels are what matter.
            Kind::Ingress => ingress_version(&object.metadata),
            _ => object.metadata.resource_version.clone().unwrap_or_default(),
        };
        if key.kind == Kind::Ingress {
            let seen = ObservedIngress {
                generation: object.metadata.generation,
                status: object
                    .data
                    .get("status")
                    .cloned()
                    .unwrap_or(serde_json::Value::Null),
            };
            let mut observed = self.observed.lock().unwrap();
            if observed.get(&key) != Some(&seen) {
                observed.insert(key.clone(), seen);
                self.pending.touched.insert(key.clone());
            }
        }
        if !version.is_empty() && self.known.get(&key) == Some(&version) {
            return Some(key);
        }
        match parse(key.kind, object) {
            Ok(Some(parsed)) => {
                if let (Object::EndpointSlice(slice), Some(pods)) =
                    (&parsed, &mut self.gateway_pods)
                {
                    pods.slice_applied(slice);
                }
                if let Object::Ingress(ing) = &parsed {
                    let secrets = ing
                        .spec
                        .tls
                        .iter()
                        .map(|t| {
                            let ns = if t.secret_namespace.is_empty() {
                                &key.namespace
                            } else {
                                &t.secret_namespace
                            };
                            ObjectKey::new(Kind::Secret, ns, &t.secret_name)
                        })
                        .collect();
                    self.name_secrets(&key, secrets);
                }
                self.known.insert(key.clone(), version);
                if self.errored.remove(&key) {
                    self.pending.errors.remove(&key);
                    self.pending.cleared.insert(key.clone());
                }
                self.pending
                    .changes
                    .insert(key.clone(), Change::Upsert(Arc::new(parsed)));
            }
            Ok(None) => {
                // A kind (or Secret type) Knarr does not read.
                self.delete(key.clone());
            }
            Err(message) => {
                warn!("{message}");
                // The last good version (if any) keeps serving.
                self.errored.insert(key.clone());
                self.pending.cleared.remove(&key);
                self.pending.errors.insert(
                    key.clone(),
                    SourceError {
                        origin: Origin::Object(key.clone()),
                        object: Some(key.clone()),
                        message,
                    },
                );
            }
        }
        if key.kind == Kind::Ingress {
            self.pending.touched.insert(key.clone());
        }
        Some(key)
    }

    fn delete(&mut self, key: ObjectKey) {
        if let (Kind::EndpointSlice, Some(pods)) = (key.kind, &mut self.gateway_pods) {
            pods.slice_deleted(&key);
        }
        if key.kind == Kind::Ingress {
            self.name_secrets(&key, Vec::new());
            if self.observed.lock().unwrap().remove(&key).is_some() {
                self.pending.touched.insert(key.clone());
            }
        }
        if self.errored.remove(&key) {
            self.pending.errors.remove(&key);
            self.pending.cleared.insert(key.clone());
        }
        if self.known.remove(&key).is_some() {
            self.pending
                .changes
                .insert(key.clone(), Change::Delete(key));
        }
    }

    /// Records which Secrets `ingress` names, starting and stopping their watches.
    fn name_secrets(&mut self, ingress: &ObjectKey, secrets: Vec<ObjectKey>) {
        let before = self.secrets_of.remove(ingress).unwrap_or_default();
        for secret in &before {
            if secrets.contains(secret) {
                continue;
            }
            let users = self.secret_users.entry(secret.clone()).or_default();
            users.remove(ingress);
            if users.is_empty() {
                self.secret_users.remove(secret);
                if let Some((stream, watch)) = self.secret_watches.remove(secret) {
                    watch.abort();
                    self.unsynced.remove(&stream);
                    self.relisting.remove(&stream);
                }
                self.delete(secret.clone());
            }
        }
        for secret in &secrets {
            let users = self.secret_users.entry(secret.clone()).or_default();
            users.insert(ingress.clone());
            if !self.secret_watches.contains_key(secret) {
                self.watch_secret(secret.clone());
            }
        }
        if !secrets.is_empty() {
            self.secrets_of.insert(ingress.clone(), secrets);
        }
    }

    fn watch_secret(&mut self, secret: ObjectKey) {
        self.next_secret += 1;
        let stream = Stream::Secret(self.next_secret);
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &secret.namespace,
            &api_resource(Kind::Secret),
        );
        let config = watcher::Config::default().fields(&format!("metadata.name={}", secret.name));
        let task = tokio::spawn(pump(stream, api, config, self.events_tx.clone()));
        debug!(%secret, "watching a Secret an ingress names");
        self.unsynced.insert(stream);
        self.secret_watches
            .insert(secret, (stream, task.abort_handle()));
    }
}

/// What identifies the translated content of a KIngress: its generation (the spec's version),
/// annotations and labels — not its status.
fn ingress_version(meta: &kube::api::ObjectMeta) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.annotations.hash(&mut h);
    meta.labels.hash(&mut h);
    format!("g{}:{:x}", meta.generation.unwrap_or(0), h.finish())
}

/// The key of a watched object (`None` for an event of a Secret watch that was stopped since).
fn key_of(stream: Stream, object: &DynamicObject) -> Option<ObjectKey> {
    let kind = match stream {
        Stream::Kind(kind) => kind,
        Stream::Secret(_) => Kind::Secret,
    };
    let name = object.metadata.name.as_deref()?;
    let namespace = object.metadata.namespace.as_deref().unwrap_or("default");
    Some(ObjectKey::new(kind, namespace, name))
}

/// Parses an object as the model's parser does for files; the error names the object and
/// field.
fn parse(kind: Kind, mut object: DynamicObject) -> Result<Option<Object>, String> {
    // Large and never read.
    object.metadata.managed_fields = None;
    let ar = api_resource(kind);
    let mut tree = serde_json::to_value(&object).map_err(|e| format!("{kind}: {e}"))?;
    if let Some(map) = tree.as_object_mut() {
        map.insert("apiVersion".into(), ar.api_version.clone().into());
        map.insert("kind".into(), ar.kind.into());
    }
    let tree: serde_yaml::Value = serde_yaml::to_value(tree).map_err(|e| format!("{kind}: {e}"))?;
    knarr_model::parse_api_object(tree).map_err(|e| e.to_string())
}
