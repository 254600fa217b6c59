//! The serving objects with their statuses and the pods, as the last pass left them: what the
//! status API lists and what a status sink writes back. Persistent maps, so a copy for readers
//! costs nothing and readers never hold the core.

use std::collections::BTreeMap;
use std::sync::Arc;

use imbl::OrdMap;
use knarr_model::serving::{
    ConditionStatus, Configuration, Revision, Route, Service, ServingKey, ServingKind,
    ServingObject, CONDITION_READY, SERVICE_LABEL,
};
use serde::{Deserialize, Serialize};

use crate::pod::{Phase, PodStatus};

/// See the module docs.
#[derive(Clone, Default, PartialEq)]
pub struct View {
    pub services: OrdMap<ServingKey, Arc<Service>>,
    pub configurations: OrdMap<ServingKey, Arc<Configuration>>,
    pub revisions: OrdMap<ServingKey, Arc<Revision>>,
    pub routes: OrdMap<ServingKey, Arc<Route>>,
    /// Pods per revision key.
    pub pods: OrdMap<ServingKey, Arc<Vec<PodStatus>>>,
}

/// Where statuses go after a pass: the local view that `knarr get` reads (`knarr up`), or the
/// objects' `status` on the API server (Kubernetes). Implementations must not block: they copy
/// what they need and write in the background.
pub trait StatusSink: Send + Sync {
    /// The view after a pass, and the objects whose status (or pods) changed in it.
    fn publish(&self, view: &View, changed: &[ServingKey]);
}

/// One pod, as the status API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The pod's log file (app and queue-proxy output), on a local runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// The user's process and the queue-proxy, while they run (local runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_proxy_pid: Option<u32>,
}

/// `(revision, ready pods, pods)`.
type PodCount = (String, usize, usize);

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

impl View {
    /// The objects of `kind` with their statuses, of one namespace or all, sorted.
    pub fn objects(&self, kind: ServingKind, namespace: Option<&str>) -> Vec<ServingObject> {
        fn of<'a, T: Clone + 'a>(
            map: &'a OrdMap<ServingKey, Arc<T>>,
            kind: ServingKind,
            namespace: Option<&'a str>,
            wrap: fn(T) -> ServingObject,
        ) -> Vec<ServingObject> {
            match namespace {
                None => map.values().map(|o| wrap((**o).clone())).collect(),
                Some(ns) => map
                    .range(ServingKey::new(kind, ns, "")..)
                    .take_while(|(k, _)| k.namespace == ns)
                    .map(|(_, o)| wrap((**o).clone()))
                    .collect(),
            }
        }
        match kind {
            ServingKind::Service => of(&self.services, kind, namespace, ServingObject::Service),
            ServingKind::Configuration => of(
                &self.configurations,
                kind,
                namespace,
                ServingObject::Configuration,
            ),
            ServingKind::Revision => of(&self.revisions, kind, namespace, ServingObject::Revision),
            ServingKind::Route => of(&self.routes, kind, namespace, ServingObject::Route),
        }
    }

    /// One object with its status.
    pub fn get(&self, key: &ServingKey) -> Option<ServingObject> {
        match key.kind {
            ServingKind::Service => self
                .services
                .get(key)
                .map(|s| ServingObject::Service((**s).clone())),
            ServingKind::Configuration => self
                .configurations
                .get(key)
                .map(|c| ServingObject::Configuration((**c).clone())),
            ServingKind::Revision => self
                .revisions
                .get(key)
                .map(|r| ServingObject::Revision((**r).clone())),
            ServingKind::Route => self
                .routes
                .get(key)
                .map(|r| ServingObject::Route((**r).clone())),
        }
    }

    /// The revisions of `namespace`, in key order.
    fn revisions_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Arc<Revision>> {
        let from = ServingKey::new(ServingKind::Revision, namespace, "");
        self.revisions
            .range(from..)
            .take_while(move |(k, _)| k.namespace == namespace)
            .map(|(_, r)| r)
    }

    /// The pods of a Service (all its revisions), Configuration or Revision named `name`
    /// (tried in that order); `None` when there is no such object.
    pub fn pods_of(&self, namespace: &str, name: &str) -> Option<Vec<PodInfo>> {
        let has = |kind| ServingKey::new(kind, namespace, name);
        let revisions: Vec<&Arc<Revision>> = if self
            .services
            .contains_key(&has(ServingKind::Service))
        {
            self.revisions_in(namespace)
                .filter(|r| r.metadata.labels.get(SERVICE_LABEL).map(String::as_str) == Some(name))
                .collect()
        } else if self
            .configurations
            .contains_key(&has(ServingKind::Configuration))
        {
            self.revisions_in(namespace)
                .filter(|r| r.configuration() == Some(name))
                .collect()
        } else {
            vec![self.revisions.get(&has(ServingKind::Revision))?]
        };
        let mut out = Vec::new();
        for revision in revisions {
            let key = ServingKey::new(ServingKind::Revision, namespace, &revision.metadata.name);
            for pod in self.pods.get(&key).into_iter().flat_map(|p| p.iter()) {
                let local = pod.local.as_ref();
                out.push(PodInfo {
                    namespace: key.namespace.clone(),
                    revision: key.name.clone(),
                    name: pod.name.clone(),
                    phase: pod.phase.to_string(),
                    address: pod.address.to_string(),
                    restarts: pod.restarts,
                    last_error: pod.last_error.clone(),
                    log_path: local.map(|l| l.log_path.display().to_string()),
                    app_pid: local.and_then(|l| l.app_pid),
                    queue_proxy_pid: local.and_then(|l| l.queue_proxy_pid),
                });
            }
        }
        Some(out)
    }

    /// One summary per Knative Service, sorted.
    pub fn summaries(&self) -> Vec<ServiceSummary> {
        // Live pods per (namespace, service), newest revision first.
        let mut by_service: BTreeMap<(&str, &str), Vec<PodCount>> = BTreeMap::new();
        for (key, revision) in &self.revisions {
            let Some(service) = revision.metadata.labels.get(SERVICE_LABEL) else {
                continue;
            };
            let Some(pods) = self.pods.get(key) else {
                continue;
            };
            let live = pods
                .iter()
                .filter(|p| p.phase != Phase::Terminating)
                .count();
            if live == 0 {
                continue;
            }
            let ready = pods.iter().filter(|p| p.phase == Phase::Ready).count();
            by_service
                .entry((key.namespace.as_str(), service.as_str()))
                .or_default()
                .push((key.name.clone(), ready, live));
        }
        self.services
            .values()
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
                let mut revisions = by_service
                    .remove(&(
                        service.metadata.namespace.as_str(),
                        service.metadata.name.as_str(),
                    ))
                    .unwrap_or_default();
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
}
