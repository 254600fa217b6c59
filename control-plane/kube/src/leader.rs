//! Leader election on a `coordination.k8s.io` Lease (kube-lease-manager: server-side applied,
//! so two replicas cannot both take it). Every replica watches and serves xDS; only the leader
//! writes status. A replica that stops releases the Lease, so the next one takes over at once;
//! one that dies (or whose [`Leadership`] is dropped without [`Leadership::release`], as
//! [`crate::KubeControlPlane::abort`] does) is replaced once the Lease expires. A Lease that
//! disappears (deleted, or etcd wiped or restored) is made again and competed for.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

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

/// The first wait after a failed round with the API server; it doubles up to the lease duration
/// (a replica must try at least once per lease duration to compete).
const MIN_BACKOFF: Duration = Duration::from_millis(500);

/// Whether this replica leads, kept up to date by a task. Dropped without
/// [`release`](Self::release), the task stops at once and the Lease is left to expire.
pub struct Leadership {
    pub leading: watch::Receiver<bool>,
    release: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Leadership {
    /// Starts competing for the Lease (creating it if missing).
    pub async fn start(client: Client, config: &LeaseConfig) -> anyhow::Result<Leadership> {
        let secs = |d: Duration| d.as_secs().max(1);
        let manager = LeaseManagerBuilder::new(client.clone(), &config.name)
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
        let (tx, leading) = watch::channel(false);
        let (release, release_rx) = oneshot::channel();
        let leases = Api::<Lease>::namespaced(client, &config.namespace);
        let task = tokio::spawn(compete(manager, leases, config.clone(), tx, release_rx));
        Ok(Leadership {
            leading,
            release: Some(release),
            task: Some(task),
        })
    }

    /// Releases the Lease (if held) so that another replica takes over now.
    pub async fn release(mut self, within: Duration) {
        if let Some(release) = self.release.take() {
            let _ = release.send(());
        }
        let Some(task) = self.task.take() else { return };
        match tokio::time::timeout(within, task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "the Lease task failed"),
            Err(_) => warn!("releasing the Lease took too long"),
        }
    }
}

/// Follows the Lease until told to release it: publishes whether this replica holds it, and
/// makes it again when it is gone (kube-lease-manager only creates it when it starts, and
/// otherwise fails forever on a missing Lease while still reporting the leadership it had).
async fn compete(
    manager: LeaseManager,
    leases: Api<Lease>,
    config: LeaseConfig,
    leading: watch::Sender<bool>,
    mut release: oneshot::Receiver<()>,
) {
    let publish = |now: bool| {
        leading.send_if_modified(|was| std::mem::replace(was, now) != now);
    };
    let max_backoff = config.duration.max(MIN_BACKOFF);
    let mut backoff = MIN_BACKOFF;
    loop {
        let error = tokio::select! {
            biased;
            _ = &mut release => break,
            changed = manager.changed() => match changed {
                Ok(now) => {
                    publish(now);
                    backoff = MIN_BACKOFF;
                    continue;
                }
                Err(e) => e,
            },
        };
        let gone = match &error {
            LeaseManagerError::NonexistentLease(_) => true,
            LeaseManagerError::KubeError(kube::Error::Api(e)) => e.code == 404,
            _ => false,
        };
        if gone {
            // Nobody holds a Lease that does not exist.
            publish(false);
            info!(lease = %config.name, namespace = %config.namespace, "the Lease is gone: making it again");
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    ..Default::default()
                },
                spec: None,
            };
            match leases.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    backoff = MIN_BACKOFF;
                    continue;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => warn!(error = %e, "cannot make the Lease again; retrying"),
            }
        } else {
            warn!(error = %error, "leader election failed; retrying");
        }
        tokio::select! {
            biased;
            _ = &mut release => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max_backoff);
    }
    publish(false);
    if let Err(e) = manager.release().await {
        warn!(error = %e, "cannot release the Lease");
    }
}
