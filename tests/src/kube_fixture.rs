//! A Kubernetes test fixture: a real kube-apiserver on etcd ([`KubeApi`]) with the KIngress
//! CRD and Knarr's RBAC from `deploy/kubernetes/`, control planes running `--source kube` in
//! this process as the `knarr-controller` ServiceAccount (not admin), each with its own real
//! Envoy on fixed gateway ports (so Knative's hash probes run), and backends at real addresses
//! inside network namespaces ([`NetHost`]) — the API server refuses loopback endpoints.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use knarr::bootstrap::{self, BootstrapOptions};
use knarr::ServeConfig;
use knarr_kube::{ClassFilter, KubeConfig, KubeControlPlane, LeaseConfig};
use knarr_translate::kingress::{GatewayConfig, GatewayTag};
use serde_json::Value;

use crate::{free_port, Envoy, HttpClient, KubeApi, NetHost, Upstream};

/// How long fixture waits may take.
pub const WAIT: Duration = Duration::from_secs(60);

/// The folder of manifests a platform team applies.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy/kubernetes")
}

/// The ServiceAccount (namespace, name) control planes run as (`deploy/kubernetes/200-rbac.yaml`).
pub const CONTROLLER: (&str, &str) = ("knarr-system", "knarr-controller");

/// The API server with the CRD and Knarr's namespace, ServiceAccount and RBAC installed.
pub struct KubeWorld {
    pub api: KubeApi,
    /// A kubeconfig for the `knarr-controller` ServiceAccount, with a static token that stays
    /// valid across API server restarts and etcd wipes (see
    /// [`KubeApi::start_with_static_service_accounts`]).
    pub controller_kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

impl KubeWorld {
    pub async fn start() -> anyhow::Result<KubeWorld> {
        crate::trace_init();
        let api = KubeApi::start_with_static_service_accounts(&[CONTROLLER]).await?;
        let dir = tempfile::tempdir()?;
        let world = KubeWorld {
            controller_kubeconfig: dir.path().join("controller.kubeconfig"),
            api,
            _dir: dir,
        };
        let token = world
            .api
            .static_service_account_token(CONTROLLER.0, CONTROLLER.1)
            .context("the controller's static token")?;
        world
            .api
            .write_kubeconfig(&world.controller_kubeconfig, token)?;
        world.install().await?;
        Ok(world)
    }

    /// Installs the CRD, the namespace, the ServiceAccount and the RBAC (again, after an etcd
    /// wipe: the controller's kubeconfig stays valid).
    pub async fn install(&self) -> anyhow::Result<()> {
        let deploy = deploy_dir();
        for file in [
            "500-kingress-crd.yaml",
            "100-namespace.yaml",
            "200-rbac.yaml",
        ] {
            let path = deploy.join(file);
            self.api
                .kubectl(&["apply", "--server-side", "-f", path.to_str().unwrap()])
                .await
                .with_context(|| format!("applying {}", path.display()))?;
        }
        self.api
            .kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/ingresses.networking.internal.knative.dev",
            ])
            .await?;
        Ok(())
    }

    /// `kubectl apply --server-side` of `yaml`, as admin (what Knative's controller would write).
    pub async fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        self.api.apply_yaml(yaml).await.map(|_| ())
    }

    /// A KIngress as JSON (`None`: not found).
    pub async fn kingress(&self, name: &str) -> anyhow::Result<Option<Value>> {
        let reply = self
            .api
            .get(&format!(
                "/apis/networking.internal.knative.dev/v1alpha1/namespaces/default/ingresses/{name}"
            ))
            .await?;
        match reply.status {
            200 => Ok(Some(serde_json::from_str(&reply.body)?)),
            404 => Ok(None),
            s => bail!("GET kingress {name}: {s} {}", reply.body),
        }
    }

    /// Waits until the KIngress's status says `Ready=<status>` for its current generation;
    /// returns the object.
    pub async fn wait_ready_status(&self, name: &str, status: &str) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let object = self.kingress(name).await?;
            if let Some(o) = &object {
                if ready_status(o) == Some(status)
                    && o["status"]["observedGeneration"] == o["metadata"]["generation"]
                {
                    return Ok(object.unwrap());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "KIngress {name} never had Ready={status} for its generation: {}",
                    object
                        .map(|o| o.to_string())
                        .unwrap_or_else(|| "not found".into())
                );
            }
            tokio::time::sleep(crate::POLL_INTERVAL).await;
        }
    }
}

/// The `Ready` condition's status of a KIngress.
pub fn ready_status(object: &Value) -> Option<&str> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?["status"]
        .as_str()
}

/// A Service and its Endpoints (namespace `default`) for a backend at `addr`, and a KIngress
/// `name` sending `host` to it, as Knative writes them.
pub fn exposed_yaml(name: &str, addr: SocketAddr, host: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  ports: [{{name: http, port: 80, targetPort: {port}}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: {name}, namespace: default}}
subsets:
- addresses: [{{ip: "{ip}"}}]
  ports: [{{name: http, port: {port}}}]
---
{ingress}"#,
        port = addr.port(),
        ip = addr.ip(),
        ingress = crate::kfixture::ingress(
            name,
            &format!(
                "  rules:\n{}",
                // The CRD requires the split's namespace.
                crate::kfixture::simple_rule(host, name, "ExternalIP").replace(
                    "- serviceName:",
                    "- serviceNamespace: default\n          serviceName:"
                )
            )
        ),
    )
}

/// A backend in a network namespace of its own, at `10.244.N.2:8080`.
pub struct Backend {
    pub upstream: Upstream,
    pub host: NetHost,
}

impl Backend {
    pub async fn start(name: &str) -> anyhow::Result<Backend> {
        let host = NetHost::create()?;
        let listener = host.bind(8080)?;
        let upstream = Upstream::builder(name).start_on_std(listener)?;
        Ok(Backend { upstream, host })
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.host.ip(), 8080)
    }
}

/// One control-plane replica (`knarr serve --source kube`, in-process) and its Envoy.
pub struct Replica {
    pub cp: Option<KubeControlPlane>,
    pub envoy: Envoy,
    pub external: HttpClient,
    pub external_addr: SocketAddr,
    pub identity: String,
}

impl Replica {
    /// Starts a replica named `identity` as the controller's ServiceAccount.
    pub async fn start(world: &KubeWorld, identity: &str) -> anyhow::Result<Replica> {
        let (ext, int) = (free_port()?, free_port()?);
        let gateway = GatewayConfig {
            address: "127.0.0.1".parse()?,
            external_http_port: ext,
            internal_http_port: int,
            external_https_port: free_port()?,
            internal_https_port: free_port()?,
        };
        let serve = ServeConfig {
            xds_addr: "127.0.0.1:0".parse()?,
            admin_addr: "127.0.0.1:0".parse()?,
            api_addr: "127.0.0.1:0".parse()?,
            gateway,
            ..Default::default()
        };
        let kube = KubeConfig {
            kubeconfig: Some(world.controller_kubeconfig.clone()),
            namespace: None,
            classes: ClassFilter::default(),
            lease: LeaseConfig {
                namespace: "knarr-system".into(),
                name: LeaseConfig::DEFAULT_NAME.into(),
                identity: identity.into(),
                duration: Duration::from_secs(3),
                grace: Duration::from_secs(1),
            },
            // Each replica's own Envoy, connected to it, is the gateway it probes.
            gateway_service: None,
            config_namespace: Some("knarr-system".into()),
        };
        let cp = KubeControlPlane::start(serve, kube).await?;
        let yaml = bootstrap::render(&BootstrapOptions {
            xds_addr: cp.control_plane.xds_addr.to_string(),
            delta: true,
            node_id: format!("gateway-{identity}"),
            admin_port: 0,
            ..Default::default()
        })
        .map_err(anyhow::Error::msg)?;
        let envoy = Envoy::start(&yaml).await?;
        envoy.wait_ready(WAIT).await?;
        envoy
            .wait_listener_port(GatewayTag::External.listener_name(), WAIT)
            .await?;
        let external_addr = SocketAddr::from(([127, 0, 0, 1], ext));
        Ok(Replica {
            cp: Some(cp),
            envoy,
            external: HttpClient::new(external_addr),
            external_addr,
            identity: identity.into(),
        })
    }

    pub fn leading(&self) -> bool {
        self.cp.as_ref().is_some_and(|cp| cp.leading())
    }

    /// Polls until `host` answers 200 through this replica's Envoy; returns the body.
    pub async fn wait_200(&self, host: &str) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let r = self.external.get(host, "/").await;
            match r {
                Ok(r) if r.status == 200 => return Ok(r.body),
                _ if tokio::time::Instant::now() > deadline => {
                    bail!("{host} never answered 200 through Envoy: {r:?}")
                }
                _ => tokio::time::sleep(crate::POLL_INTERVAL).await,
            }
        }
    }

    /// Polls until `host` answers `status` through this replica's Envoy.
    pub async fn wait_status(&self, host: &str, status: u16) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let r = self.external.get(host, "/").await;
            match r {
                Ok(r) if r.status == status => return Ok(()),
                _ if tokio::time::Instant::now() > deadline => {
                    bail!("{host} never answered {status} through Envoy: {r:?}")
                }
                _ => tokio::time::sleep(crate::POLL_INTERVAL).await,
            }
        }
    }
}
