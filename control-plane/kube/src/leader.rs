//! Leader election on a `coordination.k8s.io` Lease (kube-lease-manager: server-side applied,
//! so two replicas cannot both take it). Every replica watches and serves xDS; only the leader
//! writes status. A replica that stops releases the Lease, so the next one takes over at once;
//! one that dies is replaced once the Lease expires.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tracing::warn;

/// Which Lease, and for how long a holder keeps it without renewing.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's name (its pod name in a cluster).
    pub identity: String,
    /// A holder that stops renewing loses the Lease after this long.
    pub duration: Duration,
    /// How long before expiry the holder renews.
    pub grace: Duration,
}

impl LeaseConfig {
    /// The Lease Knarr's ingress controllers share.
    pub const DEFAULT_NAME: &'static str = "knarr-controller.ingress";
}

/// Whether this replica leads, kept up to date by a task.
pub struct Leadership {
    pub leading: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
}

impl Leadership {
    /// Starts competing for the Lease (creating it if missing).
    pub async fn start(client: Client, config: &LeaseConfig) -> anyhow::Result<Leadership> {
        let secs = |d: Duration| d.as_secs().max(1);
        let manager = LeaseManagerBuilder::new(client, &config.name)
            .with_namespace(&config.namespace)
            .with_identity(&config.identity)
            .with_duration(secs(config.duration))
            .with_grace(
                secs(config.grace)
                    .min(secs(config.duration).saturating_sub(1))
                    .max(1),
            )
            .with_field_manager(format!("knarr-lease-{}", config.identity))
            .build()
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot use Lease {}/{}: {e}", config.namespace, config.name)
            })?;
        // Every receiver must be gone for the Lease to be released: hand out clones of
        // `leading` only to tasks that end on shutdown.
        let (leading, task) = manager.watch().await;
        Ok(Leadership { leading, task })
    }

    /// Releases the Lease (if held) so that another replica takes over now.
    pub async fn release(self, within: Duration) {
        let Leadership { leading, task } = self;
        drop(leading);
        match tokio::time::timeout(within, task).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => warn!(error = %e, "cannot release the Lease"),
            Ok(Err(e)) => warn!(error = %e, "the Lease task failed"),
            Err(_) => warn!("releasing the Lease took too long"),
        }
    }
}
