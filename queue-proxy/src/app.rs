//! Wires the queue-proxy together: binds its four ports, starts probing and stats reporting,
//! and runs until drained.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use knarr_data_path::admin::{self, serve_simple};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::info;

use crate::config::Config;
use crate::drain::{admin_response, Drainer};
use crate::probe::{parse_probe, Readiness};
use crate::proxy::QueueProxy;
use crate::stats::{Reporter, Stats};

/// How often stats are closed and published (Knative: 1 s).
pub const REPORTING_PERIOD: Duration = Duration::from_secs(1);

/// A running queue-proxy, with the addresses it actually bound.
pub struct Running {
    pub serving_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub user_metrics_addr: SocketAddr,
    pub proxy: Arc<QueueProxy>,
    pub reporter: Arc<Reporter>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr}"))
}

impl Running {
    /// Binds every port, starts probing and reporting, and serves.
    pub async fn start(config: Config) -> anyhow::Result<Running> {
        let probe = parse_probe(config.readiness_probe.as_deref(), config.user_port)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let readiness = Readiness::spawn(probe);
        let stats = Arc::new(Stats::new(config.pod.clone(), tokio::time::Instant::now()));
        let reporter = Reporter::spawn(stats.clone(), REPORTING_PERIOD);
        let drainer = Drainer::new(config.drain_quiet_period);
        let proxy = Arc::new(QueueProxy::new(
            &config,
            stats.clone(),
            readiness,
            drainer.clone(),
        ));

        let serving = bind(
            SocketAddr::new(config.bind, config.serving_port),
            "requests",
        )
        .await?;
        let admin = bind(
            SocketAddr::from(([127, 0, 0, 1], config.admin_port)),
            "admin",
        )
        .await?;
        let metrics = bind(
            SocketAddr::new(config.bind, config.metrics_port),
            "autoscaler metrics",
        )
        .await?;
        let user_metrics = bind(
            SocketAddr::new(config.bind, config.user_metrics_port),
            "metrics",
        )
        .await?;
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let running = Running {
            serving_addr: serving.local_addr()?,
            admin_addr: admin.local_addr()?,
            metrics_addr: metrics.local_addr()?,
            user_metrics_addr: user_metrics.local_addr()?,
            proxy: proxy.clone(),
            reporter: reporter.clone(),
            stop,
            tasks: JoinSet::new(),
        };

        // Requests: HTTP/1.1 and h2c on one port; in-flight requests finish on shutdown.
        let handler = proxy.clone();
        tasks.spawn(knarr_data_path::serve_requests(
            serving,
            stop_rx.clone(),
            move |req, _peer| {
                let proxy = handler.clone();
                async move { proxy.handle(req).await }
            },
        ));
        let admin_drainer = drainer.clone();
        tasks.spawn(serve_simple(
            admin,
            stop_rx.clone(),
            move |req: Request<Incoming>| {
                let drainer = admin_drainer.clone();
                async move {
                    admin_response(req.uri().path(), &drainer)
                        .await
                        .map(Full::new)
                }
            },
        ));
        let stat_source = reporter.clone();
        tasks.spawn(serve_simple(
            metrics,
            stop_rx.clone(),
            move |_req: Request<Incoming>| {
                let body = stat_source.latest_encoded();
                async move { admin::text(StatusCode::OK, "application/protobuf", body) }
            },
        ));
        let mut registry = Registry::default();
        stats.register(&mut registry);
        let registry = Arc::new(registry);
        tasks.spawn(serve_simple(
            user_metrics,
            stop_rx,
            move |_req: Request<Incoming>| {
                let resp = admin::metrics(&registry);
                async move { resp }
            },
        ));
        info!(
            serving = %running.serving_addr,
            admin = %running.admin_addr,
            metrics = %running.metrics_addr,
            user_metrics = %running.user_metrics_addr,
            revision = %config.revision,
            "queue-proxy serving"
        );
        Ok(Running { tasks, ..running })
    }

    /// Drains (probes fail at once, requests keep being served until the quiet period passes),
    /// then stops accepting and lets in-flight requests finish.
    pub async fn drain_and_stop(mut self) {
        self.proxy.drainer.start();
        self.proxy.drainer.drained().await;
        info!("drained; shutting down");
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}
