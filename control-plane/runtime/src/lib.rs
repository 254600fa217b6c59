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

use std::collections::{BTreeMap, HashMap};

pub use knarr_serving::{LocalPod, Phase, PodStatus, RevisionRef};
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

    /// The revisions (`namespace/name`) whose pods changed after change number `since` (0:
    /// all that ever had pods), and the number to ask from next time.
    fn changed_since(&self, since: u64) -> (u64, Vec<String>);
}

/// Which revisions' pods changed, in order, so that a reader asks only for what changed since
/// it last looked (work proportional to the change, not to the number of revisions).
#[derive(Debug, Default)]
pub struct ChangeLog {
    last: u64,
    by_number: BTreeMap<u64, String>,
    by_revision: HashMap<String, u64>,
}

impl ChangeLog {
    /// Notes a change to `revision`'s pods.
    pub fn record(&mut self, revision: &str) {
        self.last += 1;
        if let Some(old) = self.by_revision.insert(revision.to_owned(), self.last) {
            self.by_number.remove(&old);
        }
        self.by_number.insert(self.last, revision.to_owned());
    }

    /// What changed after `since`, and the number to ask from next time.
    pub fn since(&self, since: u64) -> (u64, Vec<String>) {
        let changed = self
            .by_number
            .range(since.saturating_add(1)..)
            .map(|(_, r)| r.clone())
            .collect();
        (self.last, changed)
    }
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

    use super::*;

    #[test]
    fn runtimes_can_be_shared_as_trait_objects() {
        fn _takes(_: Arc<dyn Runtime>) {}
    }

    #[test]
    fn the_change_log_lists_each_revision_once_since_a_point() {
        let mut log = ChangeLog::default();
        log.record("default/a");
        log.record("default/b");
        let (at, all) = log.since(0);
        assert_eq!((at, all), (2, vec!["default/a".into(), "default/b".into()]));
        log.record("default/a");
        log.record("default/a");
        assert_eq!(log.since(at), (4, vec!["default/a".to_owned()]));
        assert_eq!(log.since(4), (4, vec![]));
    }
}
