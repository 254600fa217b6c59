//! Ingress status as Knative reports it: `NetworkConfigured`, `LoadBalancerReady` and `Ready`
//! conditions, and the gateways' `domainInternal` names.
//!
//! `LoadBalancerReady` turns true only once every connected Envoy has ACKed every resource of
//! the ingress's current translation (per-resource versions, not a global "in sync" flag, so an
//! unrelated rejected config does not hold every ingress back).

use std::collections::BTreeMap;

use knarr_model::ObjectKey;
use knarr_translate::reconcile::IngressState;
use knarr_xds::{Clients, ResourceType, Snapshot};
use serde::Serialize;

/// The `domainInternal` names reported in status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalancerNames {
    pub external: String,
    pub internal: String,
}

impl Default for LoadBalancerNames {
    fn default() -> Self {
        LoadBalancerNames {
            external: "knarr-external.knarr-system.svc.cluster.local".into(),
            internal: "knarr-internal.knarr-system.svc.cluster.local".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Condition {
    fn new(
        type_: &'static str,
        status: &'static str,
        reason: Option<&str>,
        message: Option<String>,
    ) -> Self {
        Condition {
            type_,
            status,
            reason: reason.map(str::to_owned),
            message,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIngress {
    pub domain_internal: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerStatus {
    pub ingress: Vec<LoadBalancerIngress>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub conditions: Vec<Condition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_load_balancer: Option<LoadBalancerStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReportMeta {
    pub name: String,
    pub namespace: String,
}

/// One ingress as `knarr get ingresses` shows it: Knative's status, plus Knarr's own notes.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressReport {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub metadata: ReportMeta,
    pub status: IngressStatus,
    /// Hosts served, as `gateway/host`.
    pub hosts: Vec<String>,
    /// The last error from the source for this object (its last good version keeps serving).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl IngressReport {
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status.conditions.iter().find(|c| c.type_ == type_)
    }

    pub fn is_ready(&self) -> bool {
        self.condition("Ready").is_some_and(|c| c.status == "True")
    }
}

/// Whether every connected Envoy holds every resource of the ingress at its current version
/// (`None`: no Envoy connected).
pub fn all_acked(state: &IngressState, snapshot: &Snapshot, clients: &Clients) -> Option<bool> {
    let mut wanted: Vec<(ResourceType, &str, &str)> = Vec::new();
    for (ty, name) in &state.resources {
        if let Some(r) = snapshot.get(*ty, name) {
            wanted.push((*ty, name, &r.version));
        }
        if *ty == ResourceType::Cluster {
            if let Some(r) = snapshot.get(ResourceType::Endpoint, name) {
                wanted.push((ResourceType::Endpoint, name, &r.version));
            }
        }
    }
    clients.all_hold(&wanted)
}

/// Where the hash probe of an ingress stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Probing is off (gateway ports unknown): ACKs are the proof.
    Off,
    Confirmed,
    Pending,
}

/// What the gateways say about an ingress's current translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayAcks {
    /// Whether every gateway holds it (`None`: no gateway known).
    pub acked: Option<bool>,
    /// How many gateways there are.
    pub gateways: usize,
}

impl GatewayAcks {
    /// From the Envoys connected to this control plane.
    pub fn connected(state: &IngressState, snapshot: &Snapshot, clients: &Clients) -> Self {
        GatewayAcks {
            acked: all_acked(state, snapshot, clients),
            gateways: clients.count(),
        }
    }

    /// From a list of gateways found elsewhere (a cluster's gateway pods, some connected to
    /// other replicas): their ACKs cannot be seen, so only the hash probes can tell.
    pub fn probed_only(gateways: usize) -> Self {
        GatewayAcks {
            acked: (gateways > 0).then_some(true),
            gateways,
        }
    }
}

/// Builds the report of one ingress the translator knows.
pub fn report(
    state: &IngressState,
    acks: GatewayAcks,
    probe: Probe,
    error: Option<&str>,
    names: &LoadBalancerNames,
) -> IngressReport {
    let network = match &state.not_programmed {
        Some(np) => Condition::new(
            "NetworkConfigured",
            "False",
            Some(np.reason),
            Some(np.message.clone()),
        ),
        None => Condition::new("NetworkConfigured", "True", None, None),
    };
    let lb = if state.not_programmed.is_some() {
        Condition::new("LoadBalancerReady", "Unknown", Some("NotConfigured"), None)
    } else {
        match (acks.acked, probe) {
            (None, _) => Condition::new(
                "LoadBalancerReady",
                "Unknown",
                Some("NoGateway"),
                Some("no Envoy is connected to the control plane".into()),
            ),
            (Some(false), _) => Condition::new(
                "LoadBalancerReady",
                "Unknown",
                Some("Uninitialized"),
                Some(format!(
                    "waiting for {} connected Envoy(s) to accept the config",
                    acks.gateways
                )),
            ),
            (Some(true), Probe::Pending) => Condition::new(
                "LoadBalancerReady",
                "Unknown",
                Some("ProbePending"),
                Some("waiting for every gateway to answer the probe with the current hash".into()),
            ),
            (Some(true), Probe::Off | Probe::Confirmed) => {
                Condition::new("LoadBalancerReady", "True", None, None)
            }
        }
    };
    let ready = match (network.status, lb.status) {
        ("True", "True") => Condition::new("Ready", "True", None, None),
        ("False", _) => Condition::new(
            "Ready",
            "False",
            network.reason.as_deref(),
            network.message.clone(),
        ),
        _ => Condition::new("Ready", "Unknown", lb.reason.as_deref(), lb.message.clone()),
    };
    let programmed = state.not_programmed.is_none();
    IngressReport {
        api_version: "networking.internal.knative.dev/v1alpha1",
        kind: "Ingress",
        metadata: ReportMeta {
            name: state.key.name.clone(),
            namespace: state.key.namespace.clone(),
        },
        status: IngressStatus {
            observed_generation: state.generation,
            conditions: vec![lb, network, ready],
            public_load_balancer: programmed.then(|| LoadBalancerStatus {
                ingress: vec![LoadBalancerIngress {
                    domain_internal: names.external.clone(),
                }],
            }),
            private_load_balancer: programmed.then(|| LoadBalancerStatus {
                ingress: vec![LoadBalancerIngress {
                    domain_internal: names.internal.clone(),
                }],
            }),
        },
        hosts: state
            .claims
            .iter()
            .map(|(tag, host)| format!("{tag}/{host}"))
            .collect(),
        error: error.map(str::to_owned),
    }
}

/// The report of an ingress that never loaded (invalid from the start).
pub fn invalid_report(key: &ObjectKey, error: &str) -> IngressReport {
    let c = |t| Condition::new(t, "False", Some("InvalidObject"), Some(error.to_owned()));
    IngressReport {
        api_version: "networking.internal.knative.dev/v1alpha1",
        kind: "Ingress",
        metadata: ReportMeta {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
        },
        status: IngressStatus {
            observed_generation: None,
            conditions: vec![c("NetworkConfigured"), c("Ready")],
            public_load_balancer: None,
            private_load_balancer: None,
        },
        hosts: vec![],
        error: Some(error.to_owned()),
    }
}

/// Source errors by object (or by file when no object could be named).
pub type SourceErrors = BTreeMap<String, Vec<String>>;
