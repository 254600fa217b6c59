//! `knarr serve`: builds the control plane from a typed config, binds its sockets, and runs
//! it until told to stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use knarr_translate::kingress::GatewayConfig;
use knarr_translate::reconcile::{ClassFilter, IngressIndex};
use knarr_xds::{Clients, NodeGrouping, SnapshotCache, XdsMetrics, XdsServerConfig, XdsService};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::file_source::FileSource;
use crate::ingress_controller::IngressController;
use crate::routes_file::Routes;
use crate::serving_controller::ServingController;
use crate::source::{Batch, Change};
use crate::status::LoadBalancerNames;
use knarr_autoscaler::AutoscalerConfig;
use knarr_model::Kind;
use knarr_proto::activator::ACTIVATOR_NODE_CLUSTER;
use knarr_runtime::Runtime;

/// Everything `knarr serve` needs, parsed and validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The read-only status API (`knarr get`).
    pub api_addr: SocketAddr,
    /// Directories of Knative/Kubernetes YAML, watched (`--source file:DIR`).
    pub source_dirs: Vec<PathBuf>,
    /// Single YAML files, watched (`-f FILE`).
    pub files: Vec<PathBuf>,
    /// Knarr routes files served as they are (`--routes FILE`), loaded once.
    pub route_files: Vec<PathBuf>,
    pub grouping: NodeGrouping,
    pub xds: XdsServerConfig,
    pub gateway: GatewayConfig,
    pub classes: ClassFilter,
    pub lb_names: LoadBalancerNames,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            xds_addr: ([127, 0, 0, 1], 18000).into(),
            admin_addr: ([127, 0, 0, 1], 18002).into(),
            api_addr: ([127, 0, 0, 1], 18001).into(),
            source_dirs: vec![],
            files: vec![],
            route_files: vec![],
            grouping: NodeGrouping::NodeId,
            xds: XdsServerConfig {
                // Activators connect to the xDS port too; they are not gateways.
                non_gateway_clusters: vec![ACTIVATOR_NODE_CLUSTER.to_owned()],
                ..XdsServerConfig::default()
            },
            gateway: GatewayConfig {
                address: [127, 0, 0, 1].into(),
                ..Default::default()
            },
            classes: ClassFilter::default(),
            lb_names: LoadBalancerNames::default(),
        }
    }
}

/// A running control plane, with the addresses it actually bound.
pub struct ControlPlane {
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Where the status API listens (`None` when started without the ingress controller).
    pub api_addr: Option<SocketAddr>,
    pub cache: Arc<SnapshotCache>,
    pub clients: Arc<Clients>,
    pub metrics: Arc<XdsMetrics>,
    pub controller: Option<Arc<IngressController>>,
    /// Knative Services (`knarr up`).
    pub serving: Option<Arc<ServingController>>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl ControlPlane {
    /// Loads the sources, binds every socket and starts serving and watching.
    pub async fn start(config: ServeConfig) -> anyhow::Result<ControlPlane> {
        Self::start_sources(config, Feed::Files, None).await
    }

    /// [`start`](Self::start) on objects from a source of the caller's (the API server):
    /// `initial` is everything it read first (published as one snapshot before any Envoy is
    /// served), `batches` what changes after.
    pub async fn start_fed(
        config: ServeConfig,
        initial: Batch,
        batches: mpsc::Receiver<Batch>,
    ) -> anyhow::Result<ControlPlane> {
        Self::start_sources(config, Feed::External(initial, batches), None).await
    }

    /// [`start`](Self::start), plus Knative Services: serving objects in the sources (and
    /// applied through the API) run as revisions on `runtime`, routed under `domain`.
    ///
    /// With `autoscaling`, Knative's KPA scales each revision and activators (which connect to
    /// the xDS port; see [`ServingController::set_activators`]) stand in for revisions without
    /// capacity; without, routed revisions run their initial scale.
    pub async fn start_with_services(
        mut config: ServeConfig,
        domain: &str,
        runtime: Arc<dyn Runtime>,
        autoscaling: Option<AutoscalerConfig>,
    ) -> anyhow::Result<ControlPlane> {
        let stats = autoscaling.as_ref().map(|_| {
            let (tx, rx) = tokio::sync::mpsc::channel(4096);
            config.xds.services = std::mem::take(&mut config.xds.services)
                .add_service(crate::activator_stats::AutoscalerServer::new(tx));
            rx
        });
        let mut cp =
            Self::start_sources(config, Feed::Files, Some((domain, runtime, autoscaling))).await?;
        if let (Some(rx), Some(serving)) = (stats, cp.serving.clone()) {
            cp.tasks.spawn(serving.clone().follow_activator_stats(rx));
            cp.tasks.spawn(serving.scrape(cp.shutdown.subscribe()));
        }
        Ok(cp)
    }

    async fn start_sources(
        config: ServeConfig,
        feed: Feed,
        services: Option<(&str, Arc<dyn Runtime>, Option<AutoscalerConfig>)>,
    ) -> anyhow::Result<ControlPlane> {
        for dir in &config.source_dirs {
            if !dir.is_dir() {
                anyhow::bail!("--source file:{}: no such directory", dir.display());
            }
        }
        for file in config.files.iter().chain(&config.route_files) {
            if !file.is_file() {
                anyhow::bail!("{}: no such file", file.display());
            }
        }
        let statics = Routes::load(&config.route_files)?;
        let cache = Arc::new(SnapshotCache::new(config.grouping));
        let clients = Arc::new(Clients::default());
        let index = IngressIndex::new(config.gateway.clone(), config.classes.clone());
        let probe_ports = crate::prober::probe_ports(&config.gateway);
        let probes = Arc::new(crate::prober::ProbeResults::default());
        let mut controller = IngressController::new(
            index,
            cache.clone(),
            clients.clone(),
            statics,
            config.lb_names.clone(),
        );
        if probe_ports.is_some() {
            controller = controller.with_probes(probes.clone());
        }
        let controller = Arc::new(controller);
        // Load everything before serving, so the first Envoy gets the whole config at once.
        let started = std::time::Instant::now();
        let (initial, watch) = match feed {
            Feed::Files => {
                let mut source = FileSource::new(config.source_dirs.clone(), config.files.clone());
                if services.is_some() {
                    source = source.with_serving();
                }
                (source.load(), Watch::Files(source))
            }
            Feed::External(initial, batches) => (initial, Watch::External(batches)),
        };
        let serving = services.map(|(domain, runtime, autoscaling)| match autoscaling {
            Some(config) => {
                ServingController::with_autoscaling(domain, controller.clone(), runtime, config)
            }
            None => ServingController::new(domain, controller.clone(), runtime),
        });
        crate::ingress_controller::log_load(&initial);
        match &serving {
            Some(serving) => apply_split(&controller, serving, initial),
            None => controller.apply(initial),
        }
        controller.publish();
        info!(
            ingresses = controller.ingress_count(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "sources loaded"
        );
        let api_listener = TcpListener::bind(config.api_addr)
            .await
            .with_context(|| format!("cannot listen for the status API on {}", config.api_addr))?;
        let api_addr = api_listener.local_addr()?;
        let mut cp = Self::start_inner(config, cache, clients, Some(controller.clone())).await?;
        let shutdown_rx = cp.shutdown.subscribe();
        let rx = match watch {
            Watch::Files(source) => {
                let (tx, rx) = mpsc::channel(64);
                cp.tasks.spawn(source.watch(tx, shutdown_rx.clone()));
                rx
            }
            Watch::External(rx) => rx,
        };
        match &serving {
            Some(serving) => {
                cp.tasks.spawn(split_batches(
                    rx,
                    controller.clone(),
                    serving.clone(),
                    shutdown_rx.clone(),
                ));
                cp.tasks.spawn(serving.clone().run(shutdown_rx.clone()));
            }
            None => {
                cp.tasks
                    .spawn(controller.clone().run(rx, shutdown_rx.clone()));
            }
        }
        if let Some(ports) = probe_ports {
            cp.tasks.spawn(crate::prober::run(
                ports,
                probes,
                controller.clone(),
                shutdown_rx.clone(),
            ));
        }
        let api = crate::api::ApiState {
            ingress: controller,
            serving: serving.clone(),
        };
        cp.serving = serving;
        cp.tasks
            .spawn(crate::api::serve(api_listener, api, shutdown_rx));
        cp.api_addr = Some(api_addr);
        info!(%api_addr, "status API serving");
        Ok(cp)
    }

    /// Starts serving whatever `cache` holds (the caller publishes snapshots).
    pub async fn start_with_cache(
        config: ServeConfig,
        cache: Arc<SnapshotCache>,
    ) -> anyhow::Result<ControlPlane> {
        Self::start_inner(config, cache, Arc::new(Clients::default()), None).await
    }

    async fn start_inner(
        config: ServeConfig,
        cache: Arc<SnapshotCache>,
        clients: Arc<Clients>,
        controller: Option<Arc<IngressController>>,
    ) -> anyhow::Result<ControlPlane> {
        let mut registry = Registry::default();
        let metrics = Arc::new(XdsMetrics::new(&mut registry));
        if let Some(controller) = &controller {
            controller.register_metrics(&mut registry);
        }
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
            api_addr: None,
            cache,
            clients,
            metrics,
            controller,
            serving: None,
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

/// Where the control plane's objects come from.
enum Feed {
    /// `config.source_dirs` and `config.files`, read and watched here.
    Files,
    /// A source of the caller's: its first batch and the ones after.
    External(Batch, mpsc::Receiver<Batch>),
}

enum Watch {
    Files(FileSource),
    External(mpsc::Receiver<Batch>),
}

/// Hands a batch's serving objects to the serving controller and the rest (with every file
/// error) to the ingress controller.
fn apply_split(ingress: &IngressController, serving: &ServingController, mut batch: Batch) {
    let (serving_changes, rest): (Vec<Change>, Vec<Change>) =
        batch.changes.drain(..).partition(|change| {
            let kind = match change {
                Change::Upsert(object) => object.kind(),
                Change::Delete(key) => key.kind,
            };
            matches!(kind, Kind::Serving(_))
        });
    batch.changes = rest;
    ingress.apply(batch);
    for refused in serving.apply_changes(serving_changes) {
        warn!("{refused}");
    }
}

/// The watch loop's consumer under `knarr up`: [`apply_split`] for every batch.
async fn split_batches(
    mut rx: tokio::sync::mpsc::Receiver<Batch>,
    ingress: Arc<IngressController>,
    serving: Arc<ServingController>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(batch) => apply_split(&ingress, &serving, batch),
                None => return,
            },
            () = knarr_xds::server::stopped(&mut shutdown) => return,
        }
    }
}
