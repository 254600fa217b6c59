//! Wires the activator together: the revision table, the request listener, the admin server and
//! the stats reporter; runs until drained.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use knarr_data_path::admin;
use knarr_proto::activator::RevisionStats;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::info;

use crate::config::Config;
use crate::drain::Drainer;
use crate::proxy::Proxy;
use crate::revisions::Revisions;
use crate::stats::{spawn_reporter, REPORTING_PERIOD};

/// A running activator, with the addresses it actually bound.
pub struct Running {
    /// Where requests arrive.
    pub listen_addr: SocketAddr,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub admin_addr: SocketAddr,
    /// The revision table: the control-plane client upserts and removes revisions here.
    pub revisions: Revisions,
    pub drainer: Arc<Drainer>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    reporter: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Binds both ports, applies the static revisions, and serves. Per-revision stats and pokes
    /// go to `stats` (from [`stats_channel`](crate::stats::stats_channel)); the activator never
    /// waits on it.
    pub async fn start(
        config: Config,
        stats: mpsc::Sender<RevisionStats>,
    ) -> anyhow::Result<Running> {
        let revisions = Revisions::new(config.node_id.clone(), config.queue_depth, stats);
        for revision in config.static_revisions {
            revisions.upsert(revision)?;
        }
        let drainer = Drainer::new(config.drain_quiet_period);
        let listener = bind(config.listen, "requests").await?;
        let admin = bind(config.admin, "admin").await?;
        let listen_addr = listener.local_addr()?;
        let admin_addr = admin.local_addr()?;

        let mut registry = Registry::default();
        revisions.register_metrics(&mut registry);
        let registry = Arc::new(registry);

        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let proxy = Arc::new(Proxy::new(revisions.clone(), Arc::clone(&drainer)));
        tasks.spawn(knarr_data_path::serve_requests(
            listener,
            stop_rx.clone(),
            move |req, peer| {
                let proxy = Arc::clone(&proxy);
                async move { proxy.handle(req, peer).await }
            },
        ));
        let admin_drainer = Arc::clone(&drainer);
        tasks.spawn(admin::serve_simple(
            admin,
            stop_rx,
            move |req: Request<Incoming>| {
                let resp = admin_response(req.uri().path(), &admin_drainer, &registry);
                async move { resp }
            },
        ));
        let reporter = spawn_reporter(revisions.clone(), REPORTING_PERIOD);
        info!(
            listen = %listen_addr,
            admin = %admin_addr,
            node_id = %config.node_id,
            "activator serving"
        );
        Ok(Running {
            listen_addr,
            admin_addr,
            revisions,
            drainer,
            stop,
            tasks,
            reporter,
        })
    }

    /// Drains (readiness fails at once; requests, held ones too, are served until none has
    /// arrived for the quiet period), then stops accepting and lets requests in flight finish.
    pub async fn drain_and_stop(mut self) {
        self.drainer.start();
        self.drainer.drained().await;
        info!("drained; waiting for requests in flight");
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        // One last report, so the autoscaler sees the final period.
        self.revisions.report(
            tokio::time::Instant::now(),
            crate::stats::unix_millis(std::time::SystemTime::now()),
        );
        self.reporter.abort();
        info!("stopped");
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr}"))
}

fn admin_response(path: &str, drainer: &Drainer, registry: &Registry) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match path {
        "/healthz" => admin::text(StatusCode::OK, PLAIN, "ok\n"),
        "/readyz" if drainer.is_draining() => {
            admin::text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "draining\n")
        }
        "/readyz" => admin::text(StatusCode::OK, PLAIN, "ready\n"),
        "/metrics" => admin::metrics(registry),
        _ => admin::text(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    }
}
