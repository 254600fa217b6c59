//! The tonic `AggregatedDiscoveryService`: a `select!` loop per stream that moves messages between
//! Envoy, the [`SnapshotCache`] and the sans-I/O machines in [`crate::protocol`]. Other gRPC
//! services the caller hands over in [`XdsServerConfig::services`] are served on the same port.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::metrics::XdsMetrics;
use crate::protocol::{DeltaStream, Output, SotwStream, StreamEvent};
use knarr_snapshot::ResourceType;
use knarr_snapshot::{Snapshot, SnapshotCache};

/// Transport settings for the xDS gRPC server.
#[derive(Debug, Clone)]
pub struct XdsServerConfig {
    /// HTTP/2 PING interval; dead Envoys are noticed, and idle NATs keep the stream open.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Large route tables go out as one message; gRPC's 4 MiB default is too small.
    pub max_message_bytes: usize,
    /// Further gRPC services served beside ADS on the same port (Knarr's control plane adds the
    /// activators' `knarr.activator.v1.Autoscaler` here). Empty by default.
    pub services: Routes,
    /// Node clusters (`node.cluster`) whose clients are not gateways (Knarr's activators): they
    /// are listed in [`Clients`], but do not count in [`Clients::all_hold`] and are not
    /// [`ClientStatus::gateway`]s. Empty by default: every client is a gateway.
    pub non_gateway_clusters: Vec<String>,
}

impl Default for XdsServerConfig {
    fn default() -> Self {
        XdsServerConfig {
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_message_bytes: 256 * 1024 * 1024,
            services: Routes::default(),
            non_gateway_clusters: Vec::new(),
        }
    }
}

/// Which ADS variant a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Sotw,
    Delta,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sotw => "sotw",
            Mode::Delta => "delta",
        }
    }
}

/// What the server knows about one connected Envoy.
#[derive(Debug, Clone)]
pub struct ClientStatus {
    pub node_id: String,
    pub node_cluster: String,
    pub group: String,
    pub mode: Mode,
    /// Where the Envoy connected from (its gateway listeners are on the same host).
    pub peer: Option<SocketAddr>,
    /// Per type: the version Envoy last accepted.
    pub acked: BTreeMap<ResourceType, String>,
    /// Per type: the last rejection (`error_detail` message), until the next ACK of that type.
    pub rejected: BTreeMap<ResourceType, String>,
    /// The generation of the newest snapshot this Envoy holds in full (everything sent and ACKed).
    pub synced_generation: Option<u64>,
    /// A gateway: its node cluster is not one of [`XdsServerConfig::non_gateway_clusters`].
    pub gateway: bool,
}

/// What one Envoy holds, per type: resource name → version it ACKed.
/// Kept as hashes (name → version), not strings: this is per Envoy and per resource, and only
/// ever compared.
type Holdings = [HashMap<u64, u64>; knarr_snapshot::resource::COUNT];

fn key_hash(s: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(s.as_bytes())
}

/// Connected Envoys, for status pages, readiness and tests.
#[derive(Debug)]
pub struct Clients {
    by_stream: Mutex<HashMap<u64, ClientStatus>>,
    holdings: Mutex<HashMap<u64, Holdings>>,
    changed: watch::Sender<u64>,
    next_id: AtomicU64,
}

impl Default for Clients {
    fn default() -> Self {
        Clients {
            by_stream: Mutex::new(HashMap::new()),
            holdings: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
            next_id: AtomicU64::new(1),
        }
    }
}

impl Clients {
    pub fn list(&self) -> Vec<ClientStatus> {
        let mut list: Vec<_> = self.by_stream.lock().unwrap().values().cloned().collect();
        list.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        list
    }

    /// Changes whenever a client connects, leaves, or ACKs or NACKs something.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Waits until `ready` holds for the connected clients.
    pub async fn wait_for(&self, mut ready: impl FnMut(&[ClientStatus]) -> bool) {
        let mut rx = self.changed.subscribe();
        loop {
            if ready(&self.list()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Applies `f` to a client; `f` says whether it changed anything worth announcing.
    fn update(&self, id: u64, f: impl FnOnce(&mut ClientStatus) -> bool) {
        let changed = self.by_stream.lock().unwrap().get_mut(&id).is_some_and(f);
        if changed {
            self.changed.send_modify(|g| *g += 1);
        }
    }

    fn insert(&self, id: u64, status: ClientStatus) {
        self.by_stream.lock().unwrap().insert(id, status);
        self.changed.send_modify(|g| *g += 1);
    }

    fn record_ack(
        &self,
        id: u64,
        ty: ResourceType,
        accepted: &[(String, String)],
        removed: &[String],
        complete: bool,
    ) {
        let mut holdings = self.holdings.lock().unwrap();
        let held = &mut holdings.entry(id).or_default()[ty.index()];
        if complete {
            held.clear();
        }
        held.extend(
            accepted
                .iter()
                .map(|(name, version)| (key_hash(name), key_hash(version))),
        );
        for name in removed {
            held.remove(&key_hash(name));
        }
        drop(holdings);
        self.changed.send_modify(|g| *g += 1);
    }

    /// Whether every connected Envoy has ACKed each of `wanted` (type, name, version).
    /// `None` when no gateway is connected. Clients that are not gateways (Knarr's activators,
    /// which follow only their own type; see [`XdsServerConfig::non_gateway_clusters`]) do not
    /// count.
    pub fn all_hold(&self, wanted: &[(ResourceType, &str, &str)]) -> Option<bool> {
        let holdings = self.holdings.lock().unwrap();
        let connected: Vec<u64> = self
            .by_stream
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, c)| c.gateway)
            .map(|(id, _)| *id)
            .collect();
        if connected.is_empty() {
            return None;
        }
        Some(connected.iter().all(|id| {
            holdings.get(id).is_some_and(|h| {
                wanted.iter().all(|(ty, name, version)| {
                    h[ty.index()].get(&key_hash(name)) == Some(&key_hash(version))
                })
            })
        }))
    }

    /// How many Envoys are connected.
    pub fn count(&self) -> usize {
        self.by_stream.lock().unwrap().len()
    }

    fn remove(&self, id: u64) {
        self.holdings.lock().unwrap().remove(&id);
        self.by_stream.lock().unwrap().remove(&id);
        self.changed.send_modify(|g| *g += 1);
    }
}

/// The ADS service.
#[derive(Debug, Clone)]
pub struct XdsService {
    cache: Arc<SnapshotCache>,
    metrics: Arc<XdsMetrics>,
    clients: Arc<Clients>,
    shutdown: watch::Receiver<bool>,
    /// From [`XdsServerConfig::non_gateway_clusters`], set by [`serve`](Self::serve).
    non_gateway_clusters: Arc<[String]>,
}

impl XdsService {
    pub fn new(
        cache: Arc<SnapshotCache>,
        metrics: Arc<XdsMetrics>,
        clients: Arc<Clients>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        XdsService {
            cache,
            metrics,
            clients,
            shutdown,
            non_gateway_clusters: Arc::new([]),
        }
    }

    /// Serves ADS (and `config.services`) on `listener` until `shutdown` turns true; then every
    /// stream is closed and the server drains.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        config: &XdsServerConfig,
    ) -> Result<(), tonic::transport::Error> {
        let mut shutdown = self.shutdown.clone();
        self.non_gateway_clusters = config.non_gateway_clusters.iter().cloned().collect();
        let service = AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes);
        let routes = config.services.clone().add_service(service);
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(config.keepalive_interval))
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .tcp_keepalive(Some(config.keepalive_interval))
            .tcp_nodelay(true)
            .add_routes(routes)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                stopped(&mut shutdown).await;
            })
            .await
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

type ResponseStream<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsService {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.start(
            SotwStream::new(),
            request.remote_addr(),
            request.into_inner(),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.start(
            DeltaStream::new(),
            request.remote_addr(),
            request.into_inner(),
        )))
    }
}

impl XdsService {
    fn start<P: Protocol>(
        &self,
        protocol: P,
        peer: Option<SocketAddr>,
        inbound: Streaming<P::Request>,
    ) -> ResponseStream<P::Response> {
        let (tx, rx) = mpsc::channel(4);
        let conn = Connection {
            id: self.clients.next_id.fetch_add(1, Ordering::Relaxed),
            protocol,
            peer,
            cache: self.cache.clone(),
            metrics: self.metrics.clone(),
            clients: self.clients.clone(),
            non_gateway_clusters: self.non_gateway_clusters.clone(),
            group: None,
            node_id: String::new(),
            current: None,
            in_flight: HashMap::new(),
            last_request_at: Instant::now(),
        };
        tokio::spawn(conn.run(inbound, tx, self.shutdown.clone()));
        Box::pin(ReceiverStream::new(rx))
    }
}

/// The two ADS variants, as the stream loop sees them.
trait Protocol: Send + 'static {
    type Request: Message + Default + Send + 'static;
    type Response: Message + Send + 'static;
    const MODE: Mode;

    fn node(req: &Self::Request) -> Option<&Node>;
    fn response_meta(resp: &Self::Response) -> (&str, &str);
    fn on_request(
        &mut self,
        req: &Self::Request,
        snap: Option<&Snapshot>,
    ) -> Output<Self::Response>;
    fn on_snapshot(&mut self, snap: &Snapshot) -> Output<Self::Response>;
    fn is_synced(&self, snap: &Snapshot) -> bool;
}

impl Protocol for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const MODE: Mode = Mode::Sotw;

    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn response_meta(resp: &DiscoveryResponse) -> (&str, &str) {
        (&resp.type_url, &resp.nonce)
    }
    fn on_request(
        &mut self,
        req: &DiscoveryRequest,
        snap: Option<&Snapshot>,
    ) -> Output<DiscoveryResponse> {
        SotwStream::on_request(self, req, snap)
    }
    fn on_snapshot(&mut self, snap: &Snapshot) -> Output<DiscoveryResponse> {
        SotwStream::on_snapshot(self, snap)
    }
    fn is_synced(&self, snap: &Snapshot) -> bool {
        SotwStream::is_synced(self, snap)
    }
}

impl Protocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const MODE: Mode = Mode::Delta;

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn response_meta(resp: &DeltaDiscoveryResponse) -> (&str, &str) {
        (&resp.type_url, &resp.nonce)
    }
    fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        snap: Option<&Snapshot>,
    ) -> Output<DeltaDiscoveryResponse> {
        DeltaStream::on_request(self, req, snap)
    }
    fn on_snapshot(&mut self, snap: &Snapshot) -> Output<DeltaDiscoveryResponse> {
        DeltaStream::on_snapshot(self, snap)
    }
    fn is_synced(&self, snap: &Snapshot) -> bool {
        DeltaStream::is_synced(self, snap)
    }
}

/// One Envoy's stream.
struct Connection<P> {
    id: u64,
    protocol: P,
    peer: Option<SocketAddr>,
    cache: Arc<SnapshotCache>,
    metrics: Arc<XdsMetrics>,
    clients: Arc<Clients>,
    non_gateway_clusters: Arc<[String]>,
    group: Option<String>,
    node_id: String,
    current: Option<Arc<Snapshot>>,
    /// Nonce → when the config it carries became due for this Envoy, for push latency.
    in_flight: HashMap<String, Instant>,
    /// When the last request arrived: config is due no earlier than the Envoy asks for it.
    last_request_at: Instant,
}

impl<P: Protocol> Connection<P> {
    async fn run(
        mut self,
        mut inbound: Streaming<P::Request>,
        tx: mpsc::Sender<Result<P::Response, Status>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mode = P::MODE.as_str();
        let mut changes = self.cache.subscribe();
        changes.mark_unchanged();
        self.metrics.connected(mode).inc();
        loop {
            let output = tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => match self.on_request(&req) {
                        Ok(output) => output,
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    },
                    Ok(None) => {
                        debug!(node = %self.node_id, "Envoy closed the xDS stream");
                        break;
                    }
                    Err(status) => {
                        debug!(node = %self.node_id, %status, "xDS stream ended");
                        break;
                    }
                },
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    match self.refresh_snapshot() {
                        Some(snap) => self.protocol.on_snapshot(&snap),
                        None => continue,
                    }
                }
                () = stopped(&mut shutdown) => {
                    debug!(node = %self.node_id, "closing xDS stream for shutdown");
                    break;
                }
            };
            if !self.handle(output, &tx).await {
                break;
            }
        }
        self.metrics.connected(mode).dec();
        self.clients.remove(self.id);
        info!(node = %self.node_id, mode, "Envoy disconnected");
    }

    fn on_request(&mut self, req: &P::Request) -> Result<Output<P::Response>, Status> {
        self.last_request_at = Instant::now();
        if self.group.is_none() {
            let Some(node) = P::node(req) else {
                return Err(Status::invalid_argument(
                    "the first request on an xDS stream must carry `node`",
                ));
            };
            let group = self.cache.grouping().group_of(node);
            self.node_id = node.id.clone();
            info!(
                node = %node.id,
                cluster = %node.cluster,
                group = %group,
                mode = P::MODE.as_str(),
                peer = ?self.peer,
                "Envoy connected"
            );
            self.clients.insert(
                self.id,
                ClientStatus {
                    node_id: node.id.clone(),
                    peer: self.peer,
                    node_cluster: node.cluster.clone(),
                    group: group.clone(),
                    mode: P::MODE,
                    acked: BTreeMap::new(),
                    rejected: BTreeMap::new(),
                    synced_generation: None,
                    gateway: !self.non_gateway_clusters.contains(&node.cluster),
                },
            );
            self.group = Some(group);
            self.current = self.cache.get(self.group.as_deref().unwrap_or_default());
        }
        Ok(self.protocol.on_request(req, self.current.as_deref()))
    }

    /// Loads the group's snapshot; returns it if it differs from the one in use.
    fn refresh_snapshot(&mut self) -> Option<Arc<Snapshot>> {
        let group = self.group.as_deref()?;
        let latest = self.cache.get(group)?;
        if self
            .current
            .as_ref()
            .is_some_and(|cur| Arc::ptr_eq(cur, &latest))
        {
            return None;
        }
        self.current = Some(latest.clone());
        Some(latest)
    }

    /// Logs and counts events, sends responses. False when the client is gone.
    async fn handle(
        &mut self,
        output: Output<P::Response>,
        tx: &mpsc::Sender<Result<P::Response, Status>>,
    ) -> bool {
        let mode = P::MODE.as_str();
        for event in output.events {
            match event {
                StreamEvent::Ack {
                    ty,
                    nonce,
                    version,
                    accepted,
                    removed,
                    complete,
                } => {
                    self.clients
                        .record_ack(self.id, ty, &accepted, &removed, complete);
                    debug!(node = %self.node_id, %ty, %version, "ACK");
                    if let Some(due) = self.in_flight.remove(&nonce) {
                        self.metrics
                            .push_latency(ty, mode)
                            .observe(due.elapsed().as_secs_f64());
                    }
                    self.clients.update(self.id, |c| {
                        c.acked.insert(ty, version);
                        c.rejected.remove(&ty);
                        true
                    });
                }
                StreamEvent::Nack {
                    ty,
                    nonce,
                    rejected_version,
                    error,
                } => {
                    self.in_flight.remove(&nonce);
                    warn!(
                        node = %self.node_id,
                        %ty,
                        version = %rejected_version,
                        error = %error,
                        "Envoy rejected config (NACK); it keeps its last good config, and this \
                         version will not be resent"
                    );
                    self.metrics.nacks(ty, mode).inc();
                    self.clients.update(self.id, |c| {
                        c.rejected.insert(ty, error);
                        true
                    });
                }
                StreamEvent::StaleNonce { ty, nonce } => {
                    debug!(node = %self.node_id, %ty, %nonce, "request with a stale nonce");
                }
                StreamEvent::UnknownType { type_url } => {
                    debug!(node = %self.node_id, %type_url, "request for a type Knarr does not serve");
                }
            }
        }
        for response in output.responses {
            let (type_url, nonce) = P::response_meta(&response);
            if let Some(ty) = ResourceType::from_type_url(type_url) {
                self.metrics.responses(ty, mode).inc();
                self.metrics
                    .sent_bytes(ty, mode)
                    .inc_by(response.encoded_len() as u64);
            }
            let published = self.current.as_ref().and_then(|s| s.published_at());
            let due = published.map_or(self.last_request_at, |p| p.max(self.last_request_at));
            self.in_flight.insert(nonce.to_owned(), due);
            if tx.send(Ok(response)).await.is_err() {
                return false;
            }
        }
        if let Some(snap) = &self.current {
            if self.protocol.is_synced(snap) {
                let generation = snap.generation();
                self.clients.update(self.id, |c| {
                    let changed = c.synced_generation != Some(generation);
                    c.synced_generation = Some(generation);
                    changed
                });
            }
        }
        true
    }
}
