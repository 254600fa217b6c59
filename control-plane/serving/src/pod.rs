//! Pods as every runtime reports them, and revisions as every runtime is asked to run them.
//! The seam between the core and a runtime (local processes, or Kubernetes Deployments).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use knarr_model::serving::{
    Revision, RevisionSpec, ServingKey, ServingKind, CONFIGURATION_LABEL, SERVICE_LABEL,
};

/// A revision as a runtime needs it: who it is (for the environment Knative gives its
/// containers) and its spec.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionRef {
    pub namespace: String,
    pub name: String,
    /// The Configuration that stamped it.
    pub configuration: String,
    /// The Knative Service that owns it, if any.
    pub service: Option<String>,
    pub spec: RevisionSpec,
}

impl RevisionRef {
    /// The revision's `namespace/name`, the key runtimes list pods by.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The revision's key in the serving core.
    pub fn serving_key(&self) -> ServingKey {
        ServingKey::new(ServingKind::Revision, &self.namespace, &self.name)
    }

    /// From a stamped Revision: its name and namespace, and the labels naming its Configuration
    /// and Service.
    pub fn from_revision(revision: &Revision) -> RevisionRef {
        let labels = &revision.metadata.labels;
        RevisionRef {
            namespace: revision.metadata.namespace.clone(),
            name: revision.metadata.name.clone(),
            configuration: labels.get(CONFIGURATION_LABEL).cloned().unwrap_or_default(),
            service: labels.get(SERVICE_LABEL).cloned(),
            spec: revision.spec.clone(),
        }
    }
}

/// Where a pod is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Started (or restarted), or not ready again after having been: not serving.
    Starting,
    /// The queue-proxy says the app is ready: endpoints may point here.
    Ready,
    /// Stopping: the queue-proxy drains, then the app is stopped; the pod then disappears.
    Terminating,
    /// Crashed; waiting out the back-off before the next restart (see `last_error`).
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "Starting",
            Phase::Ready => "Ready",
            Phase::Terminating => "Terminating",
            Phase::Failed => "Failed",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One pod of a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodStatus {
    pub name: String,
    pub phase: Phase,
    /// The queue-proxy's serving address: what the revision's endpoints point at.
    pub address: SocketAddr,
    /// Where its queue-proxy serves the autoscaler's `Stat` (`:9090/metrics` on Kubernetes).
    pub metrics_address: Option<SocketAddr>,
    /// How many times the pod was restarted after a crash.
    pub restarts: u32,
    /// Why the pod last crashed (exit status and the last log line), kept after it recovers.
    pub last_error: Option<String>,
    /// What only a runtime on this machine knows (log file, process ids); `None` elsewhere.
    pub local: Option<LocalPod>,
}

/// The parts of a pod only the local runtime has.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalPod {
    /// Both processes' output, lines prefixed `[app]`, `[queue]` (and `[knarr]` for the
    /// runtime's own notes).
    pub log_path: PathBuf,
    /// The user's process, while it runs.
    pub app_pid: Option<u32>,
    /// The queue-proxy process, while it runs.
    pub queue_proxy_pid: Option<u32>,
}

#[cfg(test)]
mod tests {
    use knarr_model::ObjectMeta;

    use super::*;

    #[test]
    fn a_revision_ref_names_its_configuration_and_service_from_labels() {
        let revision = Revision {
            metadata: ObjectMeta {
                name: "hello-00002".into(),
                namespace: "default".into(),
                labels: [
                    (CONFIGURATION_LABEL.to_owned(), "hello".to_owned()),
                    (SERVICE_LABEL.to_owned(), "hello".to_owned()),
                ]
                .into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = RevisionRef::from_revision(&revision);
        assert_eq!(r.key(), "default/hello-00002");
        assert_eq!(
            (r.configuration.as_str(), r.service.as_deref()),
            ("hello", Some("hello"))
        );
    }
}
