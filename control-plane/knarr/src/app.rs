//! `knarr serve`: builds the control plane from a typed config, binds its sockets, and runs
//! it until told to stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use knarr_xds::{Clients, NodeGrouping, SnapshotCache, XdsMetrics, XdsServerConfig, XdsService};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::routes_file::Routes;

/// Everything `knarr serve` needs, parsed and validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Routes files to serve to every Envoy (the default group).
    pub route_files: Vec<PathBuf>,
    pub grouping: NodeGrouping,
    pub xds: XdsServerConfig,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            xds_addr: ([127, 0, 0, 1], 18000).into(),
            admin_addr: ([127, 0, 0, 1], 18002).into(),
            route_files: vec![],
            grouping: NodeGrouping::NodeId,
            xds: XdsServerConfig::default(),
        }
    }
}

/// A running control plane, with the addresses it actually bound.
pub struct ControlPlane {
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub cache: Arc<SnapshotCache>,
    pub clients: Arc<Clients>,
    pub metrics: Arc<XdsMetrics>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl ControlPlane {
    /// Loads the config, binds both sockets and starts serving.
    pub async fn start(config: ServeConfig) -> anyhow::Result<ControlPlane> {
        let cache = Arc::new(SnapshotCache::new(config.grouping));
        let routes = Routes::load(&config.route_files)?;
        cache.set_default(knarr_translate::snapshot(
            &routes.gateways,
            &routes.backends,
        ));
        info!(
            gateways = routes.gateways.len(),
            backends = routes.backends.len(),
            "config loaded"
        );
        Self::start_with_cache(config, cache).await
    }

    /// Starts serving whatever `cache` holds (the caller publishes snapshots).
    pub async fn start_with_cache(
        config: ServeConfig,
        cache: Arc<SnapshotCache>,
    ) -> anyhow::Result<ControlPlane> {
        let mut registry = Registry::default();
        let metrics = Arc::new(XdsMetrics::new(&mut registry));
        let clients = Arc::new(Clients::default());
        let (shutdown, shutdown_rx) = watch::channel(false);

        let xds_listener = TcpListener::bind(config.xds_addr)
            .await
            .with_context(|| format!("cannot listen for xDS on {}", config.xds_addr))?;
        let admin_listener = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("cannot listen for admin on {}", config.admin_addr))?;
        let xds_addr = xds_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        if !admin_addr.ip().is_loopback() {
            warn!(%admin_addr, "admin endpoint is reachable beyond this machine");
        }

        let mut tasks = JoinSet::new();
        let service = XdsService::new(
            cache.clone(),
            metrics.clone(),
            clients.clone(),
            shutdown_rx.clone(),
        );
        let xds_config = config.xds.clone();
        tasks.spawn(async move {
            if let Err(e) = service.serve(xds_listener, &xds_config).await {
                warn!(error = %e, "xDS server stopped with an error");
            }
        });
        let state = Arc::new(AdminState {
            registry,
            cache: cache.clone(),
            clients: clients.clone(),
        });
        tasks.spawn(admin::serve(admin_listener, state, shutdown_rx));
        info!(%xds_addr, %admin_addr, "knarr control plane serving");
        Ok(ControlPlane {
            xds_addr,
            admin_addr,
            cache,
            clients,
            metrics,
            shutdown,
            tasks,
        })
    }

    /// Graceful stop: close every xDS stream (Envoys keep serving their last config and
    /// reconnect elsewhere or later), stop accepting, wait up to `grace` for tasks to finish.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!("shutdown grace period over; aborting remaining tasks");
            self.tasks.abort_all();
        }
    }

    /// Stops at once, dropping every connection mid-stream, as a crash would.
    pub async fn abort(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}
