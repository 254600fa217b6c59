//! `knarr serve --source kube`: the control plane fed by the API server, with the leader
//! writing KIngress status back.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use knarr_control::{ControlPlane, ServeConfig};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use tracing::info;

use crate::leader::{Leadership, LeaseConfig};
use crate::source::KubeSource;
use knarr_translate::reconcile::ClassFilter;

/// What the API-server mode needs beyond [`ServeConfig`].
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// A kubeconfig file; `None`: `$KUBECONFIG`, `~/.kube/config` or the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// Watch one namespace only (`None`: all).
    pub namespace: Option<String>,
    pub classes: ClassFilter,
    pub lease: LeaseConfig,
    /// The gateway Service (`namespace`, `name`) whose ready pods are the gateways to probe
    /// (`None`: the Envoys connected to this replica, which is right only with one replica).
    pub gateway_service: Option<(String, String)>,
}

/// The API client: from a kubeconfig file, or kube's default search (`$KUBECONFIG`,
/// `~/.kube/config`, then the in-cluster service account).
pub async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("--kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| anyhow::anyhow!("--kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            anyhow::anyhow!("no Kubernetes API server configured (give --kubeconfig): {e}")
        })?,
    };
    Client::try_from(config).map_err(|e| anyhow::anyhow!("cannot make an API client: {e}"))
}

/// A running control plane on the API server.
pub struct KubeControlPlane {
    pub control_plane: ControlPlane,
    source: KubeSource,
    status: tokio::task::JoinHandle<()>,
    leadership: Leadership,
}

impl KubeControlPlane {
    /// Lists everything (waiting, with back-off, while the API server cannot be reached), then
    /// serves it as one snapshot and follows the watches; competes for the Lease and, while
    /// leading, writes status.
    pub async fn start(serve: ServeConfig, kube: KubeConfig) -> anyhow::Result<KubeControlPlane> {
        let client = client(kube.kubeconfig.as_ref()).await?;
        let (pods, gateways) = match &kube.gateway_service {
            Some((ns, name)) => {
                let (pods, rx) = crate::gateways::GatewayPods::new(ns, name);
                (Some(pods), Some(rx))
            }
            None => (None, None),
        };
        let mut source =
            KubeSource::start(client.clone(), kube.namespace.clone(), kube.classes, pods).await?;
        let initial = std::mem::take(&mut source.initial);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let batches = std::mem::replace(&mut source.batches, rx);
        let control_plane = ControlPlane::start_fed(serve, initial, batches).await?;
        let controller = control_plane
            .controller
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the control plane has no ingress controller"))?;
        drop(tx);
        if let Some(mut gateways) = gateways {
            let controller = Arc::clone(&controller);
            controller.set_gateways(Some(gateways.borrow_and_update().clone()));
            tokio::spawn(async move {
                while gateways.changed().await.is_ok() {
                    let now = gateways.borrow_and_update().clone();
                    controller.set_gateways(Some(now));
                }
            });
        }
        let leadership = Leadership::start(client.clone(), &kube.lease).await?;
        let touched = std::mem::replace(
            &mut source.touched,
            tokio::sync::mpsc::unbounded_channel().1,
        );
        let status = tokio::spawn(crate::status::run(
            client,
            Arc::clone(&controller),
            source.observed.clone(),
            touched,
            leadership.leading.clone(),
        ));
        info!(identity = %kube.lease.identity, lease = %kube.lease.name, "following the API server");
        Ok(KubeControlPlane {
            control_plane,
            source,
            status,
            leadership,
        })
    }

    /// Whether this replica leads (writes status) now.
    pub fn leading(&self) -> bool {
        *self.leadership.leading.borrow()
    }

    /// Graceful stop: stop writing, release the Lease, close the xDS streams.
    pub async fn shutdown(self, grace: Duration) {
        self.status.abort();
        let _ = self.status.await;
        drop(self.source);
        self.leadership.release(grace).await;
        self.control_plane.shutdown(grace).await;
    }

    /// Stops at once, as a crash would: the Lease is left to expire.
    pub async fn abort(self) {
        self.status.abort();
        drop(self.source);
        self.control_plane.abort().await;
    }
}
