//! A KIngress test fixture: the control plane in-process with the incremental ingress index, a
//! real Envoy on port-0 gateways, and helpers to make Knative objects for test backends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use knarr::bootstrap::{self, BootstrapOptions};
use knarr::{ControlPlane, ServeConfig};
use knarr_model::{parse_documents, Document, Object};
use knarr_translate::kingress::{GatewayConfig, GatewayTag};
use knarr_translate::reconcile::{Change, ClassFilter, IngressIndex};
use knarr_xds::{NodeGrouping, SnapshotCache, DEFAULT_GROUP};

use crate::{Envoy, HttpClient};

/// How long fixture waits may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// Parses YAML that must hold only valid objects.
pub fn objects(yaml: &str) -> Vec<Object> {
    parse_documents("test.yaml", yaml)
        .into_iter()
        .filter_map(|d| match d {
            Document::Object { object, .. } => Some(object),
            Document::Error(e) => panic!("test object does not parse: {e}"),
            _ => None,
        })
        .collect()
}

/// A Service and Endpoints (namespace `default`) pointing at a local backend.
pub fn service_yaml(name: &str, port_name: &str, backend: SocketAddr) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  ports: [{{name: {port_name}, port: 80, targetPort: {port}}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: {name}, namespace: default}}
subsets:
- addresses: [{{ip: "{ip}"}}]
  ports: [{{name: {port_name}, port: {port}}}]
"#,
        ip = backend.ip(),
        port = backend.port(),
    )
}

/// A KIngress of Knarr's class in namespace `default`; `body` is the `spec` (indented by 2).
pub fn ingress(name: &str, body: &str) -> String {
    format!(
        "apiVersion: networking.internal.knative.dev/v1alpha1\nkind: Ingress\nmetadata:\n  name: {name}\n  namespace: default\n  annotations:\n    networking.knative.dev/ingress.class: {}\nspec:\n{body}",
        knarr_model::KNARR_INGRESS_CLASS
    )
}

/// A rule sending all of `host` to `service` (port 80) with Knative's revision headers.
pub fn simple_rule(host: &str, service: &str, visibility: &str) -> String {
    format!(
        "  - hosts: [{host}]\n    visibility: {visibility}\n    http:\n      paths:\n      - splits:\n        - serviceName: {service}\n          servicePort: 80\n          percent: 100\n          appendHeaders: {{Knative-Serving-Revision: {service}, Knative-Serving-Namespace: default}}\n"
    )
}

/// The control plane, the ingress index and a real Envoy.
pub struct KFixture {
    pub cache: Arc<SnapshotCache>,
    pub cp: ControlPlane,
    pub index: IngressIndex,
    pub envoy: Envoy,
    pub external: HttpClient,
    pub internal: HttpClient,
    pub external_addr: SocketAddr,
    pub internal_addr: SocketAddr,
    node: String,
}

impl KFixture {
    pub async fn start(delta: bool) -> anyhow::Result<KFixture> {
        Self::start_with(delta, ClassFilter::default()).await
    }

    pub async fn start_with(delta: bool, classes: ClassFilter) -> anyhow::Result<KFixture> {
        crate::trace_init();
        let cache = Arc::new(SnapshotCache::new(NodeGrouping::NodeId));
        let gateway = GatewayConfig {
            address: "127.0.0.1".parse()?,
            external_http_port: 0,
            internal_http_port: 0,
            external_https_port: 0,
            internal_https_port: 0,
        };
        let index = IngressIndex::new(gateway, classes);
        cache.set_default(index.snapshot());
        let cp = ControlPlane::start_with_cache(
            ServeConfig {
                xds_addr: "127.0.0.1:0".parse()?,
                admin_addr: "127.0.0.1:0".parse()?,
                ..Default::default()
            },
            cache.clone(),
        )
        .await?;
        let node = "kingress-gw".to_string();
        let yaml = bootstrap::render(&BootstrapOptions {
            xds_addr: cp.xds_addr.to_string(),
            delta,
            node_id: node.clone(),
            admin_port: 0,
            ..Default::default()
        })
        .map_err(anyhow::Error::msg)?;
        let envoy = Envoy::start(&yaml).await?;
        envoy.wait_ready(WAIT).await?;
        let ext = envoy
            .wait_listener_port(GatewayTag::External.listener_name(), WAIT)
            .await?;
        let int = envoy
            .wait_listener_port(GatewayTag::Internal.listener_name(), WAIT)
            .await?;
        let external_addr = SocketAddr::from(([127, 0, 0, 1], ext));
        let internal_addr = SocketAddr::from(([127, 0, 0, 1], int));
        Ok(KFixture {
            cache,
            cp,
            index,
            envoy,
            external: HttpClient::new(external_addr),
            internal: HttpClient::new(internal_addr),
            external_addr,
            internal_addr,
            node,
        })
    }

    /// Applies objects (upserts) and waits until Envoy has ACKed the result.
    pub async fn apply_yaml(&mut self, yaml: &str) -> anyhow::Result<()> {
        self.apply(
            objects(yaml)
                .into_iter()
                .map(|o| Change::Upsert(o.into()))
                .collect(),
        )
        .await
    }

    pub async fn apply(&mut self, changes: Vec<Change>) -> anyhow::Result<()> {
        self.index.apply(changes);
        let generation = self
            .cache
            .set(DEFAULT_GROUP, self.index.snapshot())
            .generation();
        let node = self.node.clone();
        let clients = self.cp.clients.clone();
        tokio::time::timeout(
            WAIT,
            clients.wait_for(|cs| {
                cs.iter()
                    .any(|c| c.node_id == node && c.synced_generation >= Some(generation))
            }),
        )
        .await
        .with_context(|| {
            format!(
                "Envoy did not ACK generation {generation}: {:?}",
                self.cp.clients.list()
            )
        })
    }

    /// Applies a KIngress `name` whose `spec.rules` are `rules` (already indented).
    pub async fn apply_rules(&mut self, name: &str, rules: &str) -> anyhow::Result<()> {
        self.apply_yaml(&ingress(name, &format!("  rules:\n{rules}")))
            .await
    }

    /// Exposes a local backend as Service `name` (port named `port_name`) and routes the
    /// external `host` to it with a one-rule ingress of the same name.
    pub async fn expose(
        &mut self,
        name: &str,
        port_name: &str,
        backend: SocketAddr,
        host: &str,
    ) -> anyhow::Result<()> {
        self.apply_yaml(&service_yaml(name, port_name, backend))
            .await?;
        self.apply_yaml(&ingress(
            name,
            &format!("  rules:\n{}", simple_rule(host, name, "ExternalIP")),
        ))
        .await
    }

    /// The HTTPS listener's address (it exists once an ingress has TLS).
    pub async fn https_addr(&self) -> anyhow::Result<SocketAddr> {
        let port = self
            .envoy
            .wait_listener_port(GatewayTag::ExternalTls.listener_name(), WAIT)
            .await?;
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// The cluster-local HTTPS listener's address (it exists once an ingress has TLS).
    pub async fn internal_https_addr(&self) -> anyhow::Result<SocketAddr> {
        let port = self
            .envoy
            .wait_listener_port(GatewayTag::InternalTls.listener_name(), WAIT)
            .await?;
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// Polls until `host` answers 200 on `client`.
    pub async fn wait_200(client: &HttpClient, host: &str, path: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let r = client.get(host, path).await?;
            if r.status == 200 {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{host}{path} still answers {} ({})", r.status, r.body);
            }
            tokio::time::sleep(crate::POLL_INTERVAL).await;
        }
    }
}
