//! What the gateway and the activators are given for a revision: its Kubernetes Service and
//! Endpoints (its ready pods in serve mode, the activators in proxy mode), and the activator's
//! view of it (limits and ready pods).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use knarr_model::serving::{Revision, ServingKey};
use knarr_model::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, IntOrString, Object, ObjectMeta,
    Service as K8sService, ServicePort, ServiceSpec,
};
use knarr_proto::activator::{Endpoint as ActivatorEndpoint, Revision as ActivatorRevision};
use knarr_translate::serving::{REVISION_H2C_PORT, REVISION_HTTP_PORT};

use crate::pod::{Phase, PodStatus};

/// The queue-proxy ports a revision's Kubernetes Service targets (HTTP/1 and h2c); locally every
/// pod serves both on its one serving port, which the Endpoints name.
const QUEUE_HTTP_PORT: i64 = 8012;
const QUEUE_H2C_PORT: i64 = 8013;

/// Labels the revision's Kubernetes Service and Endpoints with their Revision.
pub const REVISION_LABEL: &str = "serving.knative.dev/revision";

/// Where a revision's endpoints point.
pub(crate) enum Targets<'a> {
    /// Its ready pods (serve mode).
    Pods(&'a [PodStatus]),
    /// The activators (proxy mode).
    Activators(Vec<SocketAddr>),
}

/// The Kubernetes Service and Endpoints a revision's KIngress splits point at: ports 80 (HTTP)
/// and 81 (h2c), and one endpoint per ready pod — or per activator in proxy mode.
pub(crate) fn revision_backend(revision: &Revision, targets: Targets<'_>) -> [Object; 2] {
    let meta = ObjectMeta {
        name: revision.metadata.name.clone(),
        namespace: revision.metadata.namespace.clone(),
        labels: BTreeMap::from([(REVISION_LABEL.to_owned(), revision.metadata.name.clone())]),
        ..Default::default()
    };
    let port = |name: &str, port: i64, target: i64, app_protocol: &str| ServicePort {
        name: name.to_owned(),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: "TCP".to_owned(),
        app_protocol: app_protocol.to_owned(),
    };
    let service = K8sService {
        metadata: meta.clone(),
        spec: ServiceSpec {
            ports: vec![
                port("http", REVISION_HTTP_PORT, QUEUE_HTTP_PORT, ""),
                port(
                    "http2",
                    REVISION_H2C_PORT,
                    QUEUE_H2C_PORT,
                    "kubernetes.io/h2c",
                ),
            ],
            ..Default::default()
        },
    };
    let addresses: Vec<SocketAddr> = match targets {
        Targets::Pods(pods) => pods
            .iter()
            .filter(|p| p.phase == Phase::Ready)
            .map(|p| p.address)
            .collect(),
        Targets::Activators(activators) => activators,
    };
    let subsets = addresses
        .iter()
        .map(|address| EndpointSubset {
            addresses: vec![EndpointAddress {
                ip: address.ip().to_string(),
            }],
            not_ready_addresses: Vec::new(),
            ports: ["http", "http2"]
                .into_iter()
                .map(|name| EndpointPort {
                    name: name.to_owned(),
                    port: i64::from(address.port()),
                    protocol: "TCP".to_owned(),
                })
                .collect(),
        })
        .collect();
    [
        Object::Service(service),
        Object::Endpoints(Endpoints {
            metadata: meta,
            subsets,
        }),
    ]
}

/// How many activators one revision is spread over (Knative subsets activators per revision
/// so that each keeps a useful view of its pods).
const ACTIVATOR_SUBSET: usize = 3;

/// A stable subset of the activators for `revision`: the [`ACTIVATOR_SUBSET`] with the highest
/// rendezvous hash of (revision, activator), so adding or removing an activator moves only the
/// revisions that used it.
pub(crate) fn activator_subset(
    revision: &ServingKey,
    activators: &[SocketAddr],
) -> Vec<SocketAddr> {
    if activators.len() <= ACTIVATOR_SUBSET {
        return activators.to_vec();
    }
    let mut ranked: Vec<(u64, SocketAddr)> = activators
        .iter()
        .map(|a| {
            let seed = format!("{}/{}|{a}", revision.namespace, revision.name);
            (xxhash_rust::xxh3::xxh3_64(seed.as_bytes()), *a)
        })
        .collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    let mut subset: Vec<SocketAddr> = ranked
        .into_iter()
        .take(ACTIVATOR_SUBSET)
        .map(|(_, a)| a)
        .collect();
    subset.sort_unstable();
    subset
}

/// What an activator needs of a revision: its limits and its ready pods.
pub(crate) fn activator_revision(revision: &Revision, pods: &[PodStatus]) -> ActivatorRevision {
    let spec = &revision.spec;
    let mut endpoints: Vec<ActivatorEndpoint> = pods
        .iter()
        .filter(|p| p.phase == Phase::Ready)
        .map(|p| ActivatorEndpoint {
            address: p.address.ip().to_string(),
            port: u32::from(p.address.port()),
        })
        .collect();
    endpoints.sort();
    ActivatorRevision {
        namespace: revision.metadata.namespace.clone(),
        name: revision.metadata.name.clone(),
        container_concurrency: spec.container_concurrency(),
        timeout_seconds: spec.timeout_seconds(),
        response_start_timeout_seconds: spec.response_start_timeout_seconds.unwrap_or(0),
        idle_timeout_seconds: spec.idle_timeout_seconds.unwrap_or(0),
        endpoints,
    }
}
