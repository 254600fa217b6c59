//! The revision table: what the control plane says exists, and each revision's throttler.
//!
//! The control-plane client calls [`Revisions::upsert`] for every `Revision` resource it receives
//! and [`Revisions::remove`] for every removed one. Requests look revisions up in an immutable
//! snapshot (`arc-swap` over a persistent map), so a lookup never waits for an update and an
//! update costs O(log n), not a copy of the table.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use knarr_proto::activator::{Revision, RevisionStats};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::metrics::Metrics;
use crate::proxy::PodClients;
use crate::stats::offer;
use crate::throttler::{RevisionState, Spec, Throttler};

/// Knative's default revision timeout, used when a revision says 0.
pub const DEFAULT_REVISION_TIMEOUT: Duration = Duration::from_secs(300);

/// What every revision's throttler shares.
pub(crate) struct Shared {
    pub node_id: String,
    pub queue_depth: usize,
    pub clients: PodClients,
    pub metrics: Metrics,
    pub stats: mpsc::Sender<RevisionStats>,
    /// Where probes run (upserts may come from any thread).
    pub runtime: tokio::runtime::Handle,
}

/// A `Revision` resource the activator cannot use; the previous version (if any) stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("revision {revision}: {reason}")]
pub struct RevisionError {
    /// `namespace/name`.
    pub revision: String,
    pub reason: String,
}

/// The revisions this activator knows. Cheap to clone; all clones are the same table.
#[derive(Clone)]
pub struct Revisions {
    inner: Arc<Table>,
}

struct Table {
    snapshot: ArcSwap<imbl::HashMap<String, Throttler>>,
    /// Serialises writers (read, modify, swap).
    writer: Mutex<()>,
    shared: Arc<Shared>,
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Checks a `Revision` resource the way [`Revisions::upsert`] will, without applying it: lets
/// the control-plane client NACK a bad response before changing anything.
pub fn validate(revision: &Revision) -> Result<(), RevisionError> {
    parse(revision).map(drop)
}

fn parse(r: &Revision) -> Result<(Spec, Vec<SocketAddr>), RevisionError> {
    let error = |reason: String| RevisionError {
        revision: key(&r.namespace, &r.name),
        reason,
    };
    if r.namespace.is_empty() || r.name.is_empty() || r.namespace.contains('/') {
        return Err(error("namespace and name must be non-empty".into()));
    }
    let non_negative = |what: &str, n: i64| {
        u64::try_from(n).map_err(|_| error(format!("{what} must not be negative (got {n})")))
    };
    let cc = non_negative("container_concurrency", r.container_concurrency)?;
    let seconds =
        |what: &str, n: i64| non_negative(what, n).map(|s| (s > 0).then(|| Duration::from_secs(s)));
    let timeout = seconds("timeout_seconds", r.timeout_seconds)?;
    let spec = Spec {
        container_concurrency: usize::try_from(cc).unwrap_or(usize::MAX),
        timeout: timeout.unwrap_or(DEFAULT_REVISION_TIMEOUT),
        response_start_timeout: seconds(
            "response_start_timeout_seconds",
            r.response_start_timeout_seconds,
        )?,
        idle_timeout: seconds("idle_timeout_seconds", r.idle_timeout_seconds)?,
    };
    let mut seen = HashSet::new();
    let mut endpoints = Vec::with_capacity(r.endpoints.len());
    for e in &r.endpoints {
        let ip: IpAddr = e
            .address
            .parse()
            .map_err(|_| error(format!("endpoint address {:?} is not an IP", e.address)))?;
        let port = u16::try_from(e.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| error(format!("endpoint port {} is not a port", e.port)))?;
        let addr = SocketAddr::new(ip, port);
        if seen.insert(addr) {
            endpoints.push(addr);
        }
    }
    Ok((spec, endpoints))
}

impl Revisions {
    /// An empty table. Per-revision stats and pokes go to `stats` (see
    /// [`stats_channel`](crate::stats::stats_channel)); `queue_depth` requests may wait per
    /// revision.
    ///
    /// # Panics
    /// Outside a tokio runtime (pods are probed on it).
    pub fn new(
        node_id: impl Into<String>,
        queue_depth: usize,
        stats: mpsc::Sender<RevisionStats>,
    ) -> Revisions {
        Revisions {
            inner: Arc::new(Table {
                snapshot: ArcSwap::from_pointee(imbl::HashMap::new()),
                writer: Mutex::new(()),
                shared: Arc::new(Shared {
                    node_id: node_id.into(),
                    queue_depth: queue_depth.max(1),
                    clients: PodClients::new(),
                    metrics: Metrics::default(),
                    stats,
                    runtime: tokio::runtime::Handle::current(),
                }),
            }),
        }
    }

    /// Adds a revision or replaces what is known of it. Its capacity follows at once: new pods
    /// are probed and used once they answer, removed pods get no new requests, waiting requests
    /// are served as soon as there is room. An invalid resource changes nothing.
    pub fn upsert(&self, revision: Revision) -> Result<(), RevisionError> {
        let (spec, endpoints) = parse(&revision)?;
        let k = key(&revision.namespace, &revision.name);
        let _writer = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self.inner.snapshot.load();
        if let Some(throttler) = current.get(k.as_str()) {
            debug!(revision = %k, ?spec, endpoints = endpoints.len(), "revision updated");
            throttler.update(spec, &endpoints);
            return Ok(());
        }
        info!(revision = %k, ?spec, endpoints = endpoints.len(), "revision added");
        let throttler = Throttler::new(
            revision.namespace,
            revision.name,
            spec,
            &endpoints,
            Arc::clone(&self.inner.shared),
        );
        let mut next = imbl::HashMap::clone(&current);
        next.insert(k, throttler);
        self.inner.snapshot.store(Arc::new(next));
        Ok(())
    }

    /// Forgets a revision: requests waiting for it are answered 503, requests for it from now on
    /// 404; requests already at a pod finish. Returns whether it was known.
    pub fn remove(&self, namespace: &str, name: &str) -> bool {
        let k = key(namespace, name);
        let _writer = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next = imbl::HashMap::clone(&self.inner.snapshot.load());
        let Some(throttler) = next.remove(k.as_str()) else {
            return false;
        };
        self.inner.snapshot.store(Arc::new(next));
        info!(revision = %k, "revision removed");
        throttler.close();
        true
    }

    /// The known revisions' resource names (`namespace/name`), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<_> = self.inner.snapshot.load().keys().cloned().collect();
        names.sort();
        names
    }

    pub fn len(&self) -> usize {
        self.inner.snapshot.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A revision's pods, capacity and load now; `None` if unknown.
    pub fn state(&self, namespace: &str, name: &str) -> Option<RevisionState> {
        self.lookup(namespace, name).map(|t| t.state())
    }

    /// Adds the activator's metrics to `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.inner.shared.metrics.register(registry);
    }

    pub(crate) fn lookup(&self, namespace: &str, name: &str) -> Option<Throttler> {
        self.inner
            .snapshot
            .load()
            .get(key(namespace, name).as_str())
            .cloned()
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Closes every revision's stats window and sends the non-idle ones.
    pub(crate) fn report(&self, now: Instant, timestamp_millis: i64) {
        let snapshot = self.inner.snapshot.load_full();
        let shared = &self.inner.shared;
        for throttler in snapshot.values() {
            if let Some(stat) = throttler.report(now, timestamp_millis) {
                offer(&shared.stats, stat, &shared.metrics.stats_dropped);
            }
        }
    }
}

impl std::fmt::Debug for Revisions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revisions")
            .field("names", &self.names())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use knarr_proto::activator::Endpoint;

    fn revision(endpoints: &[(&str, u32)]) -> Revision {
        Revision {
            namespace: "default".into(),
            name: "hello-00001".into(),
            container_concurrency: 1,
            timeout_seconds: 0,
            response_start_timeout_seconds: 0,
            idle_timeout_seconds: 0,
            endpoints: endpoints
                .iter()
                .map(|(a, p)| Endpoint {
                    address: (*a).into(),
                    port: *p,
                })
                .collect(),
        }
    }

    #[test]
    fn parse_defaults_and_dedups() {
        let (spec, endpoints) = parse(&revision(&[
            ("10.0.0.1", 8012),
            ("10.0.0.1", 8012),
            ("::1", 8013),
        ]))
        .unwrap();
        assert_eq!(spec.timeout, DEFAULT_REVISION_TIMEOUT);
        assert_eq!(spec.response_start_timeout, None);
        assert_eq!(spec.container_concurrency, 1);
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints[1], "[::1]:8013".parse().unwrap());
    }

    #[test]
    fn invalid_resources_say_why() {
        let mut r = revision(&[("pod-a.local", 8012)]);
        let e = validate(&r).unwrap_err();
        assert_eq!(e.revision, "default/hello-00001");
        assert!(e.reason.contains("not an IP"), "{e}");
        r = revision(&[("10.0.0.1", 70000)]);
        assert!(validate(&r).unwrap_err().reason.contains("not a port"));
        r = revision(&[]);
        r.container_concurrency = -1;
        assert!(validate(&r)
            .unwrap_err()
            .reason
            .contains("container_concurrency"));
        r = revision(&[]);
        r.name.clear();
        assert!(validate(&r).is_err());
    }

    #[tokio::test]
    async fn upsert_remove_and_bad_updates_keep_the_last_good_version() {
        let (tx, _rx) = crate::stats::stats_channel();
        let revisions = Revisions::new("a", 10, tx);
        assert!(revisions.is_empty());
        revisions.upsert(revision(&[("127.0.0.1", 1)])).unwrap();
        let mut other = revision(&[]);
        other.name = "hello-00002".into();
        revisions.upsert(other).unwrap();
        assert_eq!(
            revisions.names(),
            ["default/hello-00001", "default/hello-00002"]
        );

        let bad = revision(&[("nope", 1)]);
        assert!(revisions.upsert(bad).is_err());
        let state = revisions.state("default", "hello-00001").unwrap();
        assert_eq!((state.endpoints, state.ready_pods), (1, 0));
        assert_eq!(state.capacity, Some(0));

        assert!(revisions.remove("default", "hello-00001"));
        assert!(!revisions.remove("default", "hello-00001"));
        assert_eq!(revisions.names(), ["default/hello-00002"]);
        assert!(revisions.state("default", "hello-00001").is_none());
    }
}
