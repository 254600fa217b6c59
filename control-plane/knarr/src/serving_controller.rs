//! `knarr up`'s serving controller: Knative Services, Configurations and Routes as users apply
//! them (watched files and `knarr apply`), turned into Revisions, pods on a [`Runtime`], and the
//! KIngresses, Services and Endpoints the ingress controller programs Envoy with.
//!
//! Level-triggered, like Knative's controllers: every pass reads what users applied, what the
//! runtime reports and what the gateway has ACKed, and derives everything else with the pure
//! reconcilers of `knarr_translate::serving`. What users applied is the only input that is
//! stored; Revisions are the only derived objects that are kept (they are immutable, and their
//! names are history).

use std::path::Path;
use std::sync::Arc;

use knarr_model::serving::{ServingKey, ServingKind, ServingObject};
use knarr_runtime::Runtime;
use serde::Serialize;
use tokio::sync::watch;

use crate::file_source::Change;
use crate::ingress_controller::IngressController;

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

/// See the module docs.
pub struct ServingController {
    domain: String,
    ingress: Arc<IngressController>,
    runtime: Arc<dyn Runtime>,
    changes: watch::Sender<u64>,
}

impl ServingController {
    pub fn new(
        domain: impl Into<String>,
        ingress: Arc<IngressController>,
        runtime: Arc<dyn Runtime>,
    ) -> Arc<Self> {
        Arc::new(ServingController {
            domain: domain.into(),
            ingress,
            runtime,
            changes: watch::Sender::new(0),
        })
    }

    /// Changes read from watched files (only `Object::Serving` upserts and `Kind::Serving`
    /// deletes; others are ignored).
    pub fn apply_changes(&self, _changes: Vec<Change>) {}

    /// `knarr apply`: every serving document of `text` (named `file` in errors), all or none.
    /// Relative or missing `workingDir`s are resolved against `base_dir`. Errors are complete
    /// messages (`file:line: Service default/hello: spec.template...: reason`).
    pub fn apply_manifest(
        &self,
        _file: &str,
        _text: &str,
        _base_dir: Option<&Path>,
    ) -> Result<Vec<Applied>, Vec<String>> {
        Ok(Vec::new())
    }

    /// Deletes an object users applied. `Err` says why not (not found; owned by a Service).
    pub fn delete(&self, key: &ServingKey) -> Result<(), DeleteError> {
        Err(DeleteError::NotFound(key.clone()))
    }

    /// Every object of `kind` as a manifest with its status, sorted by namespace and name.
    pub fn list(&self, _kind: ServingKind) -> Vec<serde_json::Value> {
        Vec::new()
    }

    /// The pods of a Service (all its revisions), Configuration or Revision named `name`
    /// (tried in that order); `None` when there is no such object.
    pub fn pods(&self, _namespace: &str, _name: &str) -> Option<Vec<PodInfo>> {
        None
    }

    /// One summary per Knative Service, sorted.
    pub fn summaries(&self) -> Vec<ServiceSummary> {
        Vec::new()
    }

    /// Bumped whenever any status changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
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
