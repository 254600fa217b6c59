//! `knarr serve --source kube`: the control plane fed by the API server, with the leader
//! writing KIngress status back.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use knarr_control::{ControlPlane, ServeConfig};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::Api;
use kube::Client;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config;

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
    /// Where `config-knarr` is read from and watched (`None`: flags only).
    pub config_namespace: Option<String>,
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
    pub async fn start(
        flags: ServeConfig,
        mut kube: KubeConfig,
    ) -> anyhow::Result<KubeControlPlane> {
        let client = client(kube.kubeconfig.as_ref()).await?;
        // config-knarr over the flags, before the first list.
        let config_maps = kube
            .config_namespace
            .as_ref()
            .map(|ns| Api::<ConfigMap>::namespaced(client.clone(), ns));
        let mut config_data = match &config_maps {
            Some(api) => api
                .get_opt(config::CONFIG_MAP)
                .await
                .map_err(|e| anyhow::anyhow!("cannot read ConfigMap {}: {e}", config::CONFIG_MAP))?
                .and_then(|cm| cm.data),
            None => None,
        };
        let parsed = config::parse(&flags, config_data.as_ref());
        for problem in &parsed.problems {
            warn!("{problem}");
        }
        let serve = parsed.serve;
        let mut live = parsed.live;
        kube.classes = live.classes.clone();
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
        let (rewrite, rewrite_rx) = watch::channel(0u64);
        let status = tokio::spawn(crate::status::run(
            client,
            Arc::clone(&controller),
            source.observed.clone(),
            touched,
            leadership.leading.clone(),
            rewrite_rx,
        ));
        if let Some(api) = config_maps {
            let controller = Arc::clone(&controller);
            let source = source.control();
            let config =
                watcher::Config::default().fields(&format!("metadata.name={}", config::CONFIG_MAP));
            let mut events = watcher::watcher(api, config).default_backoff().boxed();
            tokio::spawn(async move {
                while let Some(event) = events.next().await {
                    let data = match event {
                        Ok(Event::Apply(cm) | Event::InitApply(cm)) => cm.data,
                        Ok(Event::Delete(_)) => None,
                        Ok(Event::Init | Event::InitDone) => continue,
                        Err(e) => {
                            warn!(error = %e, "watch of config-knarr failed; retrying");
                            continue;
                        }
                    };
                    let parsed = config::parse(&flags, data.as_ref());
                    for problem in &parsed.problems {
                        warn!("{problem}");
                    }
                    let restart = config::restart_keys_changed(config_data.as_ref(), data.as_ref());
                    if !restart.is_empty() {
                        warn!(keys = ?restart, "config-knarr: these keys take effect when the control plane restarts");
                    }
                    config_data = data;
                    if parsed.live == live {
                        continue;
                    }
                    info!(config = ?parsed.live, "config-knarr changed");
                    if parsed.live.classes != live.classes {
                        controller.set_classes(parsed.live.classes.clone());
                        source.set_classes(parsed.live.classes.clone());
                    }
                    if parsed.live.names != live.names {
                        controller.set_names(parsed.live.names.clone());
                        rewrite.send_modify(|n| *n += 1);
                    }
                    live = parsed.live;
                }
            });
        }
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
