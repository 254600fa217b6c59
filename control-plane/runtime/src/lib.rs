//! Where revisions run.
//!
//! The control plane decides how many pods a revision should have and calls
//! [`Runtime::scale`]; it reads the pods back through [`Runtime::pods`] (their queue-proxy
//! addresses become the revision's endpoints, their phases and errors its status) and learns of
//! changes through [`Runtime::subscribe`]. Two runtimes stand behind the trait: the
//! [`LocalRuntime`] here, whose pods are processes on one machine, and (later) one whose pods are
//! Kubernetes pods.
//!
//! A local pod is what a Knative pod is, minus the container: the user's `command` (with
//! `PORT`, `K_SERVICE`, `K_CONFIGURATION`, `K_REVISION` and the container's env) fronted by a
//! `knarr-queue-proxy` process given the environment Knative's revision reconciler gives its
//! queue-proxy sidecar ([`pod`]), each on free loopback ports. Ready means the queue-proxy
//! answers `K-Network-Probe: queue` with 200; scale-down sends it SIGTERM so it drains before
//! the app is stopped; a crash restarts the pod with back-off ([`backoff`]); both processes'
//! output goes to one log file per pod.

pub mod backoff;
mod local;
mod log;
pub mod pod;
mod process;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use knarr_model::serving::{Revision, RevisionSpec, CONFIGURATION_LABEL, SERVICE_LABEL};
use tokio::sync::watch;

pub use local::{LocalConfig, LocalRuntime};

/// Where revisions run. Implementations reconcile in the background: [`Runtime::scale`] only
/// records what is wanted and returns.
pub trait Runtime: Send + Sync {
    /// Makes `revision` have `replicas` pods (0 stops them all), starting and stopping pods as
    /// needed. Fails at once when the revision cannot run here at all.
    fn scale(&self, revision: &RevisionRef, replicas: usize) -> Result<(), RuntimeError>;

    /// The pods of a revision (`namespace/name`, see [`RevisionRef::key`]) and their state,
    /// oldest first; terminating pods are included until they are gone.
    fn pods(&self, revision: &str) -> Vec<PodStatus>;

    /// A counter that changes whenever any pod's state does.
    fn subscribe(&self) -> watch::Receiver<u64>;
}

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
    /// The revision's `namespace/name`, the key [`Runtime::pods`] takes.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
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
    /// Both processes' output, lines prefixed `[app]`, `[queue]` (and `[knarr]` for the
    /// runtime's own notes).
    pub log_path: PathBuf,
    /// The user's process, while it runs (local runtime only).
    pub app_pid: Option<u32>,
    /// The queue-proxy process, while it runs (local runtime only).
    pub queue_proxy_pid: Option<u32>,
}

/// Why a revision cannot be scaled.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The revision cannot run on this runtime; names the field and says why.
    #[error("revision {revision}: {field}: {reason}")]
    CannotRun {
        revision: String,
        field: String,
        reason: String,
    },
    #[error("cannot find free ports on {bind}: {source}")]
    Ports {
        bind: std::net::IpAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the runtime is shutting down")]
    ShuttingDown,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use knarr_model::ObjectMeta;

    use super::*;

    #[test]
    fn runtimes_can_be_shared_as_trait_objects() {
        fn _takes(_: Arc<dyn Runtime>) {}
    }

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
