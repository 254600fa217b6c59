//! Knative Serving's `serving.knative.dev/v1` objects — `Service`, `Configuration`, `Revision`
//! and `Route` — with Knative's field names, the defaults its webhook applies and the validation
//! it does.
//!
//! Data comes from YAML through [`parse_serving_documents`], which follows the conventions of
//! [`crate::parse_documents`] (file and line, object, field path, reason) and hands every other
//! kind of document to it unchanged. The reconcilers that turn these objects into Revisions and
//! KIngresses live in `knarr_translate::serving`.
//!
//! Where Knarr deviates from Knative it is on purpose and said where it happens: one container
//! only (the local runtime runs one process per pod), a container may name a `command` instead of
//! an `image`, `timeoutSeconds` must be positive, and the PodSpec fields Knative puts behind
//! feature flags are rejected like the ones it always forbids.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;
use serde_yaml::Value as YamlValue;

use crate::{parse_documents, Document, FieldError, ObjectMeta};

/// The API group and version of every object here.
pub const API_VERSION: &str = "serving.knative.dev/v1";

/// On a Configuration, Route and Revision: the Service that owns it.
pub const SERVICE_LABEL: &str = "serving.knative.dev/service";
/// On a Revision: the Configuration that stamped it.
pub const CONFIGURATION_LABEL: &str = "serving.knative.dev/configuration";
/// On a Revision: the Configuration generation it was stamped from.
pub const CONFIGURATION_GENERATION_LABEL: &str = "serving.knative.dev/configurationGeneration";
/// On a KIngress: the Route it was made from, and the Route's namespace.
pub const ROUTE_LABEL: &str = "serving.knative.dev/route";
pub const ROUTE_NAMESPACE_LABEL: &str = "serving.knative.dev/routeNamespace";
/// On a Configuration: the Routes that send it traffic (comma-separated).
pub const ROUTES_ANNOTATION: &str = "serving.knative.dev/routes";
/// On a Service or Route: `cluster-local` keeps its hosts off the external gateway.
pub const VISIBILITY_LABEL: &str = "networking.knative.dev/visibility";
pub const VISIBILITY_CLUSTER_LOCAL: &str = "cluster-local";
/// kubectl's copy of the applied manifest; never propagated to children.
pub const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Scale bounds on a revision template (checked here; acted on by the runtime).
pub const MIN_SCALE_ANNOTATION: &str = "autoscaling.knative.dev/min-scale";
pub const MAX_SCALE_ANNOTATION: &str = "autoscaling.knative.dev/max-scale";
pub const INITIAL_SCALE_ANNOTATION: &str = "autoscaling.knative.dev/initial-scale";

/// The name Knative gives an unnamed serving container.
pub const DEFAULT_CONTAINER_NAME: &str = "user-container";
/// The user port when the container declares none (`PORT`).
pub const DEFAULT_USER_PORT: u16 = 8080;
/// `timeoutSeconds` when unset, and its upper bound (Knative's `config-defaults`).
pub const DEFAULT_TIMEOUT_SECONDS: i64 = 300;
pub const MAX_TIMEOUT_SECONDS: i64 = 600;
/// The largest `containerConcurrency` Knative accepts (`container-concurrency-max-limit`).
pub const MAX_CONTAINER_CONCURRENCY: i64 = 1000;
/// Ports the queue-proxy (and its profiler) use inside a pod; the user's container may not.
pub const RESERVED_PORTS: [i64; 6] = [8012, 8013, 8022, 9090, 9091, 8008];
/// Environment variables Knative sets for the user's container.
pub const RESERVED_ENV_VARS: [&str; 4] = ["PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"];

/// PodSpec fields a Revision may not set. Knative's `PodSpecMask` always drops the second half
/// and puts the first half behind feature flags that are off by default; a local runtime can
/// honour none of them, so all are rejected.
pub const FORBIDDEN_POD_SPEC_FIELDS: &[&str] = &[
    // Behind Knative feature flags (off by default).
    "affinity",
    "dnsConfig",
    "dnsPolicy",
    "hostAliases",
    "initContainers",
    "nodeSelector",
    "priorityClassName",
    "runtimeClassName",
    "schedulerName",
    "securityContext",
    "shareProcessNamespace",
    "tolerations",
    "topologySpreadConstraints",
    // Always forbidden.
    "activeDeadlineSeconds",
    "ephemeralContainers",
    "hostIPC",
    "hostNetwork",
    "hostPID",
    "hostUsers",
    "hostname",
    "nodeName",
    "os",
    "overhead",
    "preemptionPolicy",
    "priority",
    "readinessGates",
    "resourceClaims",
    "restartPolicy",
    "schedulingGates",
    "serviceAccount",
    "setHostnameAsFQDN",
    "subdomain",
    "terminationGracePeriodSeconds",
];

/// Container fields Knative's `ContainerMask` drops.
pub const FORBIDDEN_CONTAINER_FIELDS: &[&str] =
    &["lifecycle", "stdin", "stdinOnce", "tty", "volumeDevices"];

// ---- objects -------------------------------------------------------------------------------

/// A Knative `Service`: a Configuration and a Route under one name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ServiceStatus>,
}

/// Knative inlines `ConfigurationSpec` and `RouteSpec` here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default)]
    pub template: RevisionTemplateSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
}

/// A `Configuration`: the template every Revision is stamped from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Configuration {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ConfigurationSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ConfigurationStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationSpec {
    #[serde(default)]
    pub template: RevisionTemplateSpec,
}

/// An immutable snapshot of a Configuration's template.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RevisionSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<RevisionStatus>,
}

/// A `Route`: named traffic targets with percents and tags.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: RouteSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<RouteStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionTemplateSpec {
    #[serde(default)]
    pub metadata: TemplateMeta,
    #[serde(default)]
    pub spec: RevisionSpec,
}

/// The parts of a template's `metadata` a Revision inherits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMeta {
    /// The Revision's name, when the user chooses it (must start with `<parent>-`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A Revision's spec: a PodSpec plus Knative's serving fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionSpec {
    #[serde(default)]
    pub containers: Vec<Container>,
    /// In-flight requests per pod; 0 = unlimited. Defaulted to 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_concurrency: Option<i64>,
    /// Defaulted to [`DEFAULT_TIMEOUT_SECONDS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_start_timeout_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<JsonValue>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account_name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<JsonValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_service_links: Option<bool>,
    /// Every other PodSpec field. Those in [`FORBIDDEN_POD_SPEC_FIELDS`] fail validation; the
    /// rest (fields this version does not know) are kept and ignored.
    #[serde(flatten)]
    pub other: BTreeMap<String, JsonValue>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<JsonValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    /// A core/v1 Probe, as given (the queue-proxy reads it as JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<JsonValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<JsonValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<JsonValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<JsonValue>,
    /// Every other Container field. Those in [`FORBIDDEN_CONTAINER_FIELDS`] fail validation.
    #[serde(flatten)]
    pub other: BTreeMap<String, JsonValue>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// `secretKeyRef`, `configMapKeyRef`, … as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<JsonValue>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    /// Empty, `http1` or `h2c` (the protocol the app speaks).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_port: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    /// `hostPort`, `hostIP`: forbidden by Knative.
    #[serde(flatten)]
    pub other: BTreeMap<String, JsonValue>,
}

/// One entry of `spec.traffic` (and of `status.traffic`, where `revisionName` is resolved).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficTarget {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tag: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub configuration_name: String,
    /// Defaulted to `revisionName` being empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_revision: Option<bool>,
    /// Unset counts as 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i64>,
    /// Status only: the tag's URL.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
}

impl TrafficTarget {
    /// Whether this target floats to the latest revision (after defaulting).
    pub fn follows_latest(&self) -> bool {
        self.latest_revision
            .unwrap_or(self.revision_name.is_empty())
    }
}

// ---- status --------------------------------------------------------------------------------

/// Condition types Knarr reports.
pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_CONFIGURATIONS_READY: &str = "ConfigurationsReady";
pub const CONDITION_ROUTES_READY: &str = "RoutesReady";
pub const CONDITION_ALL_TRAFFIC_ASSIGNED: &str = "AllTrafficAssigned";
pub const CONDITION_INGRESS_READY: &str = "IngressReady";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConditionStatus {
    True,
    False,
    #[default]
    Unknown,
}

/// A Knative condition. No `lastTransitionTime` is produced: status is a pure function of its
/// inputs; whoever stores it may stamp one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub status: ConditionStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub severity: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

impl Condition {
    pub fn new(type_: &str, status: ConditionStatus, reason: &str, message: &str) -> Self {
        Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message: message.to_owned(),
            ..Default::default()
        }
    }
}

/// The status of the condition of type `type_`, Unknown when absent.
pub fn condition_status(conditions: &[Condition], type_: &str) -> ConditionStatus {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status)
        .unwrap_or_default()
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Addressable {
    #[serde(default)]
    pub url: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub latest_created_revision_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub latest_ready_revision_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Addressable>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigurationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub latest_created_revision_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub latest_ready_revision_name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Addressable>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<TrafficTarget>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_replicas: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i64>,
    /// Knarr: where the gateway sends the revision's requests, `Serve` (its pods) or `Proxy`
    /// (the activator) — Knative's ServerlessService mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_mode: Option<String>,
    /// Knarr: whether the autoscaler is in panic mode (Knative's PodAutoscaler status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_panic: Option<bool>,
}

// ---- accessors -----------------------------------------------------------------------------

fn is_cluster_local(meta: &ObjectMeta) -> bool {
    meta.labels.get(VISIBILITY_LABEL).map(String::as_str) == Some(VISIBILITY_CLUSTER_LOCAL)
}

impl Service {
    /// Labelled `networking.knative.dev/visibility: cluster-local`.
    pub fn is_cluster_local(&self) -> bool {
        is_cluster_local(&self.metadata)
    }
}

impl Route {
    /// Labelled `networking.knative.dev/visibility: cluster-local`.
    pub fn is_cluster_local(&self) -> bool {
        is_cluster_local(&self.metadata)
    }
}

impl Revision {
    /// The Configuration that stamped this Revision (its label).
    pub fn configuration(&self) -> Option<&str> {
        self.metadata
            .labels
            .get(CONFIGURATION_LABEL)
            .map(String::as_str)
    }

    /// The Configuration generation this Revision was stamped from (its label).
    pub fn configuration_generation(&self) -> Option<i64> {
        self.metadata
            .labels
            .get(CONFIGURATION_GENERATION_LABEL)
            .and_then(|g| g.parse().ok())
    }
}

impl RevisionSpec {
    /// The serving container.
    pub fn container(&self) -> Option<&Container> {
        self.containers.first()
    }

    /// `timeoutSeconds`, defaulted.
    pub fn timeout_seconds(&self) -> i64 {
        self.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS)
    }

    /// `containerConcurrency`, defaulted (0 = unlimited).
    pub fn container_concurrency(&self) -> i64 {
        self.container_concurrency.unwrap_or(0)
    }

    /// The port the user's app listens on (`PORT`).
    pub fn user_port(&self) -> u16 {
        self.container()
            .map(Container::user_port)
            .unwrap_or(DEFAULT_USER_PORT)
    }

    /// Whether the app speaks HTTP/2 without TLS (its port is named `h2c`).
    pub fn is_h2c(&self) -> bool {
        self.container()
            .and_then(|c| c.ports.first())
            .is_some_and(|p| p.name == "h2c")
    }
}

impl Container {
    /// `ports[0].containerPort`, or [`DEFAULT_USER_PORT`].
    pub fn user_port(&self) -> u16 {
        self.ports
            .first()
            .and_then(|p| p.container_port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .unwrap_or(DEFAULT_USER_PORT)
    }
}

// ---- kinds and keys ------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServingKind {
    Service,
    Configuration,
    Revision,
    Route,
}

impl ServingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ServingKind::Service => "Service",
            ServingKind::Configuration => "Configuration",
            ServingKind::Revision => "Revision",
            ServingKind::Route => "Route",
        }
    }

    /// The kind named by a manifest's `apiVersion` and `kind`, if it is one of these.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Self> {
        if api_version != API_VERSION {
            return None;
        }
        match kind {
            "Service" => Some(ServingKind::Service),
            "Configuration" => Some(ServingKind::Configuration),
            "Revision" => Some(ServingKind::Revision),
            "Route" => Some(ServingKind::Route),
            _ => None,
        }
    }
}

impl fmt::Display for ServingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies one serving object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServingKey {
    pub kind: ServingKind,
    pub namespace: String,
    pub name: String,
}

impl ServingKey {
    pub fn new(kind: ServingKind, namespace: &str, name: &str) -> Self {
        ServingKey {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ServingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A parsed serving object.
#[derive(Debug, Clone, PartialEq)]
pub enum ServingObject {
    Service(Service),
    Configuration(Configuration),
    Revision(Revision),
    Route(Route),
}

impl ServingObject {
    pub fn kind(&self) -> ServingKind {
        match self {
            ServingObject::Service(_) => ServingKind::Service,
            ServingObject::Configuration(_) => ServingKind::Configuration,
            ServingObject::Revision(_) => ServingKind::Revision,
            ServingObject::Route(_) => ServingKind::Route,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            ServingObject::Service(o) => &o.metadata,
            ServingObject::Configuration(o) => &o.metadata,
            ServingObject::Revision(o) => &o.metadata,
            ServingObject::Route(o) => &o.metadata,
        }
    }

    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            ServingObject::Service(o) => &mut o.metadata,
            ServingObject::Configuration(o) => &mut o.metadata,
            ServingObject::Revision(o) => &mut o.metadata,
            ServingObject::Route(o) => &mut o.metadata,
        }
    }

    pub fn key(&self) -> ServingKey {
        let meta = self.meta();
        ServingKey::new(self.kind(), &meta.namespace, &meta.name)
    }

    /// Applies Knative's defaults (the defaulting webhook).
    pub fn set_defaults(&mut self) {
        match self {
            ServingObject::Service(o) => o.set_defaults(),
            ServingObject::Configuration(o) => o.set_defaults(),
            ServingObject::Revision(o) => o.set_defaults(),
            ServingObject::Route(o) => o.set_defaults(),
        }
    }

    /// Every invalid field (the validating webhook); empty when valid. Run after
    /// [`set_defaults`](Self::set_defaults).
    pub fn validate(&self) -> Vec<FieldError> {
        match self {
            ServingObject::Service(o) => o.validate(),
            ServingObject::Configuration(o) => o.validate(),
            ServingObject::Revision(o) => o.validate(),
            ServingObject::Route(o) => o.validate(),
        }
    }

    /// The object as a manifest (`apiVersion`, `kind`, `metadata`, `spec`, `status`), for
    /// `-o yaml|json`.
    pub fn manifest(&self) -> JsonValue {
        let value = match self {
            ServingObject::Service(o) => serde_json::to_value(o),
            ServingObject::Configuration(o) => serde_json::to_value(o),
            ServingObject::Revision(o) => serde_json::to_value(o),
            ServingObject::Route(o) => serde_json::to_value(o),
        };
        // Plain data with string keys: serialization cannot fail.
        let mut value = value.unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert("apiVersion".into(), API_VERSION.into());
            map.insert("kind".into(), self.kind().as_str().into());
        }
        value
    }
}

// ---- defaults ------------------------------------------------------------------------------

impl RevisionSpec {
    /// Knative's revision defaults: timeout, concurrency, the serving container's name.
    pub fn set_defaults(&mut self) {
        self.timeout_seconds.get_or_insert(DEFAULT_TIMEOUT_SECONDS);
        self.container_concurrency.get_or_insert(0);
        if let [only] = self.containers.as_mut_slice() {
            if only.name.is_empty() {
                only.name = DEFAULT_CONTAINER_NAME.into();
            }
        }
    }
}

fn default_traffic(traffic: &mut [TrafficTarget]) {
    for target in traffic {
        target
            .latest_revision
            .get_or_insert(target.revision_name.is_empty());
    }
}

impl Service {
    pub fn set_defaults(&mut self) {
        self.spec.template.spec.set_defaults();
        if self.spec.traffic.is_empty() {
            // An omitted traffic block sends everything to the latest revision.
            self.spec.traffic.push(TrafficTarget {
                latest_revision: Some(true),
                percent: Some(100),
                ..Default::default()
            });
        }
        default_traffic(&mut self.spec.traffic);
    }
}

impl Configuration {
    pub fn set_defaults(&mut self) {
        self.spec.template.spec.set_defaults();
    }
}

impl Revision {
    pub fn set_defaults(&mut self) {
        self.spec.set_defaults();
    }
}

impl Route {
    pub fn set_defaults(&mut self) {
        default_traffic(&mut self.spec.traffic);
    }
}

// ---- validation ----------------------------------------------------------------------------

/// Collects every invalid field, in the order found.
#[derive(Default)]
struct Check(Vec<FieldError>);

impl Check {
    fn fail(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            reason: reason.into(),
        });
    }
}

fn is_dns1035_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[bytes.len() - 1] != b'-'
}

fn is_dns1123_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Kubernetes' rule for environment variable names.
fn is_env_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || matches!(c, '-' | '.' | '_'))
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

const DNS1035_RULE: &str = "lower-case letters, digits and '-', starting with a letter, \
    ending with a letter or digit, at most 63 characters";
const DNS1123_RULE: &str = "lower-case letters, digits and '-', starting and ending with a \
    letter or digit, at most 63 characters";

fn check_name(meta: &ObjectMeta, c: &mut Check) {
    if meta.name.is_empty() {
        c.fail("metadata.name", "is required");
    } else if !is_dns1035_label(&meta.name) {
        c.fail(
            "metadata.name",
            format!("{:?} is not a DNS-1035 label ({DNS1035_RULE})", meta.name),
        );
    }
}

fn check_visibility_label(meta: &ObjectMeta, c: &mut Check) {
    if let Some(value) = meta.labels.get(VISIBILITY_LABEL) {
        if value != VISIBILITY_CLUSTER_LOCAL {
            c.fail(
                format!("metadata.labels[{VISIBILITY_LABEL}]"),
                format!("invalid value {value:?}: the only value is {VISIBILITY_CLUSTER_LOCAL:?}"),
            );
        }
    }
}

fn check_template(template: &RevisionTemplateSpec, parent: &str, at: &str, c: &mut Check) {
    let name = &template.metadata.name;
    if !name.is_empty() {
        let prefix = format!("{parent}-");
        if !is_dns1035_label(name) {
            c.fail(
                format!("{at}.metadata.name"),
                format!("{name:?} is not a DNS-1035 label ({DNS1035_RULE})"),
            );
        } else if !name.starts_with(&prefix) {
            c.fail(
                format!("{at}.metadata.name"),
                format!("{name:?} must have prefix {prefix:?}"),
            );
        }
    }
    check_scale_annotations(&template.metadata.annotations, at, c);
    check_revision_spec(&template.spec, &format!("{at}.spec"), c);
}

fn check_scale_annotations(annotations: &BTreeMap<String, String>, at: &str, c: &mut Check) {
    let mut bound = |key: &str| -> Option<i64> {
        let value = annotations.get(key)?;
        match value.parse::<i64>() {
            Ok(n) if n >= 0 => Some(n),
            _ => {
                c.fail(
                    format!("{at}.metadata.annotations[{key}]"),
                    format!("invalid value {value:?}: expected a whole number >= 0"),
                );
                None
            }
        }
    };
    let min = bound(MIN_SCALE_ANNOTATION);
    let max = bound(MAX_SCALE_ANNOTATION);
    bound(INITIAL_SCALE_ANNOTATION);
    if let (Some(min), Some(max)) = (min, max) {
        // max-scale 0 means unbounded.
        if max != 0 && min > max {
            c.fail(
                format!("{at}.metadata.annotations[{MAX_SCALE_ANNOTATION}]"),
                format!("max-scale={max} is less than min-scale={min}"),
            );
        }
    }
}

fn check_revision_spec(spec: &RevisionSpec, at: &str, c: &mut Check) {
    for field in spec.other.keys() {
        if FORBIDDEN_POD_SPEC_FIELDS.contains(&field.as_str()) {
            c.fail(
                format!("{at}.{field}"),
                "must not set the field(s): Knative does not allow it in a Revision",
            );
        }
    }
    match spec.containers.len() {
        0 => c.fail(format!("{at}.containers"), "missing field(s)"),
        1 => {}
        n => c.fail(
            format!("{at}.containers"),
            format!(
                "found {n} containers, want exactly one: Knarr runs a single serving container \
                 per revision (Knative's multi-container sidecars are not supported)"
            ),
        ),
    }
    for (i, container) in spec.containers.iter().enumerate() {
        check_container(container, &format!("{at}.containers[{i}]"), c);
    }
    if let Some(cc) = spec.container_concurrency {
        if !(0..=MAX_CONTAINER_CONCURRENCY).contains(&cc) {
            c.fail(
                format!("{at}.containerConcurrency"),
                format!("expected 0 <= {cc} <= {MAX_CONTAINER_CONCURRENCY}"),
            );
        }
    }
    let timeout = spec.timeout_seconds();
    if let Some(t) = spec.timeout_seconds {
        // Knative accepts an explicit 0; Knarr's queue-proxy needs a positive timeout.
        if !(1..=MAX_TIMEOUT_SECONDS).contains(&t) {
            c.fail(
                format!("{at}.timeoutSeconds"),
                format!("expected 0 < {t} <= {MAX_TIMEOUT_SECONDS}"),
            );
        }
    }
    let limit = if (1..=MAX_TIMEOUT_SECONDS).contains(&timeout) {
        timeout
    } else {
        MAX_TIMEOUT_SECONDS
    };
    for (field, value) in [
        (
            "responseStartTimeoutSeconds",
            spec.response_start_timeout_seconds,
        ),
        ("idleTimeoutSeconds", spec.idle_timeout_seconds),
    ] {
        if let Some(v) = value {
            if !(0..=limit).contains(&v) {
                c.fail(
                    format!("{at}.{field}"),
                    format!("expected 0 <= {v} <= {limit} (timeoutSeconds)"),
                );
            }
        }
    }
}

fn check_container(container: &Container, at: &str, c: &mut Check) {
    for field in container.other.keys() {
        if FORBIDDEN_CONTAINER_FIELDS.contains(&field.as_str()) {
            c.fail(
                format!("{at}.{field}"),
                "must not set the field(s): Knative does not allow it in a container",
            );
        }
    }
    if container.name == "queue-proxy" {
        c.fail(
            format!("{at}.name"),
            "\"queue-proxy\" is a reserved container name",
        );
    } else if !container.name.is_empty() && !is_dns1123_label(&container.name) {
        c.fail(
            format!("{at}.name"),
            format!(
                "{:?} is not a DNS-1123 label ({DNS1123_RULE})",
                container.name
            ),
        );
    }
    // Knative requires an image; Knarr's local runtime runs `command` instead, so either will do
    // here and the runtime says which it needs.
    if container.image.is_empty() && container.command.is_empty() {
        c.fail(
            format!("{at}.image"),
            "missing field(s): an image, or a command for Knarr's local runtime",
        );
    }
    let mut names = BTreeSet::new();
    for (i, env) in container.env.iter().enumerate() {
        let at = format!("{at}.env[{i}]");
        if env.name.is_empty() {
            c.fail(format!("{at}.name"), "missing field(s)");
        } else if RESERVED_ENV_VARS.contains(&env.name.as_str()) {
            c.fail(
                format!("{at}.name"),
                format!("{:?} is a reserved environment variable", env.name),
            );
        } else if !is_env_var_name(&env.name) {
            c.fail(
                format!("{at}.name"),
                format!(
                    "{:?} is not a valid environment variable name (letters, digits, '_', '-', \
                     '.', not starting with a digit)",
                    env.name
                ),
            );
        } else if !names.insert(env.name.as_str()) {
            c.fail(format!("{at}.name"), format!("{:?} is set twice", env.name));
        }
        if env.value.as_deref().is_some_and(|v| !v.is_empty()) && env.value_from.is_some() {
            c.fail(
                format!("{at}.valueFrom"),
                "may not be specified when `value` is not empty",
            );
        }
    }
    if container.ports.len() > 1 {
        c.fail(
            format!("{at}.ports"),
            "more than one container port is set: only a single port is allowed",
        );
    }
    if let Some(port) = container.ports.first() {
        let at = format!("{at}.ports[0]");
        for field in port.other.keys() {
            if matches!(field.as_str(), "hostPort" | "hostIP") {
                c.fail(
                    format!("{at}.{field}"),
                    "must not set the field(s): Knative does not allow it",
                );
            }
        }
        match port.container_port {
            None => c.fail(format!("{at}.containerPort"), "missing field(s)"),
            Some(p) if !(1..=65535).contains(&p) => c.fail(
                format!("{at}.containerPort"),
                format!("expected 1 <= {p} <= 65535"),
            ),
            Some(p) if RESERVED_PORTS.contains(&p) => c.fail(
                format!("{at}.containerPort"),
                format!("{p} is a reserved port, please use a different value"),
            ),
            Some(_) => {}
        }
        if !port.protocol.is_empty() && port.protocol != "TCP" {
            c.fail(
                format!("{at}.protocol"),
                format!("invalid value {:?}: only TCP is supported", port.protocol),
            );
        }
        if !matches!(port.name.as_str(), "" | "h2c" | "http1") {
            c.fail(
                format!("{at}.name"),
                format!(
                    "Port name {} is not allowed: name must be empty, or one of: 'h2c', 'http1'",
                    port.name
                ),
            );
        }
    }
    for (field, probe) in [
        ("readinessProbe", &container.readiness_probe),
        ("livenessProbe", &container.liveness_probe),
    ] {
        if let Some(probe) = probe {
            check_probe(probe, &format!("{at}.{field}"), c);
        }
    }
}

fn check_probe(probe: &JsonValue, at: &str, c: &mut Check) {
    let Some(probe) = probe.as_object() else {
        c.fail(at, "must be an object (a core/v1 Probe)");
        return;
    };
    let handlers: Vec<&str> = ["httpGet", "tcpSocket", "exec", "grpc"]
        .into_iter()
        .filter(|h| probe.contains_key(*h))
        .collect();
    match handlers.as_slice() {
        [] => c.fail(
            at,
            "expected exactly one, got neither: httpGet, tcpSocket, exec, grpc",
        ),
        [_] => {}
        many => c.fail(
            at,
            format!("expected exactly one, got both: {}", many.join(", ")),
        ),
    }
    if let Some(period) = probe.get("periodSeconds").and_then(JsonValue::as_i64) {
        if period < 0 {
            c.fail(
                format!("{at}.periodSeconds"),
                format!("expected 0 <= {period}"),
            );
        }
    }
}

/// Where a traffic block lives: in a Service (the configuration is implied: targets name a
/// revision or float with `latestRevision`) or in a Route (targets name a revision or a
/// configuration).
#[derive(Clone, Copy, PartialEq, Eq)]
enum TrafficOwner {
    Service,
    Route,
}

fn check_traffic(traffic: &[TrafficTarget], owner: TrafficOwner, route: &str, c: &mut Check) {
    let mut tags: BTreeMap<&str, usize> = BTreeMap::new();
    let mut sum = 0;
    for (i, target) in traffic.iter().enumerate() {
        let at = format!("spec.traffic[{i}]");
        let pinned = !target.revision_name.is_empty();
        if let Some(latest) = target.latest_revision {
            if latest == pinned {
                c.fail(
                    format!("{at}.latestRevision"),
                    format!(
                        "may not set revisionName {:?} when latestRevision is {latest}",
                        target.revision_name
                    ),
                );
            }
        }
        let has_config = !target.configuration_name.is_empty();
        match owner {
            TrafficOwner::Service if has_config => c.fail(
                format!("{at}.configurationName"),
                "must not set the field(s): a Service's traffic goes to its own configuration \
                 (use revisionName or latestRevision)",
            ),
            TrafficOwner::Route if pinned && has_config => c.fail(
                at.clone(),
                "expected exactly one, got both: revisionName, configurationName",
            ),
            TrafficOwner::Route if !pinned && !has_config => c.fail(
                at.clone(),
                "expected exactly one, got neither: revisionName, configurationName",
            ),
            _ => {}
        }
        if pinned && !is_dns1035_label(&target.revision_name) {
            c.fail(
                format!("{at}.revisionName"),
                format!(
                    "{:?} is not a DNS-1035 label ({DNS1035_RULE})",
                    target.revision_name
                ),
            );
        }
        if has_config && !is_dns1035_label(&target.configuration_name) {
            c.fail(
                format!("{at}.configurationName"),
                format!(
                    "{:?} is not a DNS-1035 label ({DNS1035_RULE})",
                    target.configuration_name
                ),
            );
        }
        let percent = target.percent.unwrap_or(0);
        if !(0..=100).contains(&percent) {
            c.fail(
                format!("{at}.percent"),
                format!("expected 0 <= {percent} <= 100"),
            );
        }
        sum += percent;
        if !target.url.is_empty() {
            c.fail(
                format!("{at}.url"),
                "must not set the field(s): url is set in status only",
            );
        }
        if target.tag.is_empty() {
            continue;
        }
        if !is_dns1123_label(&target.tag) {
            c.fail(
                format!("{at}.tag"),
                format!(
                    "{:?} is not a DNS-1123 label ({DNS1123_RULE}); it becomes part of a host name",
                    target.tag
                ),
            );
        } else if target.tag.len() + 1 + route.len() > 63 {
            c.fail(
                format!("{at}.tag"),
                format!(
                    "the tag's host label \"{}-{route}\" is longer than 63 characters",
                    target.tag
                ),
            );
        }
        if let Some(first) = tags.insert(&target.tag, i) {
            c.fail(
                format!("{at}.tag"),
                format!(
                    "Multiple definitions for {:?} (also spec.traffic[{first}].tag)",
                    target.tag
                ),
            );
        }
    }
    if sum != 100 {
        c.fail(
            "spec.traffic",
            format!("Traffic targets sum to {sum}, want 100"),
        );
    }
}

impl Service {
    /// Every invalid field, as Knative's webhook reports them (run after `set_defaults`).
    pub fn validate(&self) -> Vec<FieldError> {
        let mut c = Check::default();
        check_name(&self.metadata, &mut c);
        check_visibility_label(&self.metadata, &mut c);
        check_template(
            &self.spec.template,
            &self.metadata.name,
            "spec.template",
            &mut c,
        );
        check_traffic(
            &self.spec.traffic,
            TrafficOwner::Service,
            &self.metadata.name,
            &mut c,
        );
        c.0
    }

    /// Knative's update check: a template that keeps its user-chosen name may not change (the
    /// name would then stand for two different Revisions).
    pub fn validate_update(&self, old: &Service) -> Vec<FieldError> {
        check_template_update(&old.spec.template, &self.spec.template)
    }
}

impl Configuration {
    pub fn validate(&self) -> Vec<FieldError> {
        let mut c = Check::default();
        check_name(&self.metadata, &mut c);
        check_template(
            &self.spec.template,
            &self.metadata.name,
            "spec.template",
            &mut c,
        );
        c.0
    }

    /// See [`Service::validate_update`].
    pub fn validate_update(&self, old: &Configuration) -> Vec<FieldError> {
        check_template_update(&old.spec.template, &self.spec.template)
    }
}

impl Revision {
    pub fn validate(&self) -> Vec<FieldError> {
        let mut c = Check::default();
        check_name(&self.metadata, &mut c);
        check_scale_annotations(&self.metadata.annotations, "", &mut c);
        check_revision_spec(&self.spec, "spec", &mut c);
        // `check_scale_annotations` prefixes with `{at}.`; a Revision's own metadata has none.
        for e in &mut c.0 {
            if let Some(rest) = e.field.strip_prefix('.') {
                e.field = rest.to_owned();
            }
        }
        c.0
    }

    /// Knative's update check: a Revision's spec is immutable.
    pub fn validate_update(&self, old: &Revision) -> Vec<FieldError> {
        if self.spec == old.spec {
            return Vec::new();
        }
        vec![FieldError {
            field: "spec".into(),
            reason: "Immutable fields changed: a Revision's spec cannot change".into(),
        }]
    }
}

impl Route {
    pub fn validate(&self) -> Vec<FieldError> {
        let mut c = Check::default();
        check_name(&self.metadata, &mut c);
        check_visibility_label(&self.metadata, &mut c);
        check_traffic(
            &self.spec.traffic,
            TrafficOwner::Route,
            &self.metadata.name,
            &mut c,
        );
        c.0
    }
}

fn check_template_update(
    old: &RevisionTemplateSpec,
    new: &RevisionTemplateSpec,
) -> Vec<FieldError> {
    if new.metadata.name.is_empty() || new.metadata.name != old.metadata.name || new == old {
        return Vec::new();
    }
    vec![FieldError {
        field: "spec.template.metadata.name".into(),
        reason: format!(
            "the template changed but its name {:?} did not: a Revision name stands for one \
             template; choose a new name (or remove it to have one generated)",
            new.metadata.name
        ),
    }]
}

// ---- parsing -------------------------------------------------------------------------------

/// One YAML document, as far as it could be understood.
#[derive(Debug, Clone, PartialEq)]
pub enum ServingDocument {
    /// A `serving.knative.dev/v1` object, defaulted and valid.
    Object { object: ServingObject, line: usize },
    /// One problem with a serving document (a document can have several).
    Error(ServingError),
    /// Any other document, exactly as [`crate::parse_documents`] reads it (line numbers are
    /// the file's).
    Other(Document),
}

/// Why a serving document could not be used. Displayed like [`crate::ParseError`]:
/// `file:line: Service default/hello: spec.traffic: Traffic targets sum to 90, want 100`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingError {
    pub file: String,
    /// 1-based line in the file, where known.
    pub line: Option<usize>,
    pub object: Option<ServingKey>,
    /// The offending field (`spec.template.spec.containers[0].ports[0].containerPort`).
    pub field: Option<String>,
    pub reason: String,
}

impl fmt::Display for ServingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::parse::write_error(
            f,
            &self.file,
            self.line,
            self.object.as_ref().map(|o| o as &dyn fmt::Display),
            self.field.as_deref(),
            &self.reason,
        )
    }
}

impl std::error::Error for ServingError {}

/// Parses every document of one file: serving objects here, everything else through
/// [`crate::parse_documents`] (wrapped in [`ServingDocument::Other`]), so one call reads a
/// whole manifest directory's file.
pub fn parse_serving_documents(file: &str, text: &str) -> Vec<ServingDocument> {
    let mut out = Vec::new();
    for (chunk_start, doc) in split_documents(text) {
        parse_chunk(file, chunk_start, &doc, &mut out);
    }
    out
}

// Documents are split, and YAML errors located, exactly as `parse.rs` does it.
use crate::parse::{split_documents, str_at, yaml_error};

fn is_blank(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

fn serving_kind_of(value: &YamlValue) -> Option<ServingKind> {
    ServingKind::from_type(str_at(value, &["apiVersion"])?, str_at(value, &["kind"])?)
}

/// A document's lines, shifted or pinned to where it sits in the file.
fn relocate(doc: Document, to: impl Fn(usize) -> usize) -> Document {
    match doc {
        Document::Object { object, line } => Document::Object {
            object,
            line: to(line),
        },
        Document::Foreign {
            api_version,
            kind,
            name,
            line,
        } => Document::Foreign {
            api_version,
            kind,
            name,
            line: to(line),
        },
        Document::Untyped { value, line } => Document::Untyped {
            value,
            line: to(line),
        },
        Document::Error(mut e) => {
            e.line = e.line.map(&to);
            Document::Error(e)
        }
    }
}

fn parse_chunk(file: &str, chunk_start: usize, doc: &str, out: &mut Vec<ServingDocument>) {
    let others = |out: &mut Vec<ServingDocument>, text: &str, to: &dyn Fn(usize) -> usize| {
        for d in parse_documents(file, text) {
            out.push(ServingDocument::Other(relocate(d, to)));
        }
    };
    let shift = |l: usize| l + chunk_start - 1;
    // Broken YAML and foreign kinds are for `parse_documents` to report.
    let Ok(value) = serde_yaml::from_str::<YamlValue>(doc) else {
        return others(out, doc, &shift);
    };
    if let Some(kind) = serving_kind_of(&value) {
        return parse_object(file, kind, value, doc, chunk_start, None, out);
    }
    let is_list =
        str_at(&value, &["apiVersion"]) == Some("v1") && str_at(&value, &["kind"]) == Some("List");
    let items = value.get("items").and_then(YamlValue::as_sequence);
    let Some(items) =
        items.filter(|items| is_list && items.iter().any(|i| serving_kind_of(i).is_some()))
    else {
        return others(out, doc, &shift);
    };
    // `kubectl get -o yaml` output: each item on its own, reported at the list's line.
    let line = first_content_line(doc, chunk_start);
    for item in items {
        let Ok(text) = serde_yaml::to_string(item) else {
            continue;
        };
        match serving_kind_of(item) {
            Some(kind) => parse_object(file, kind, item.clone(), &text, line, Some(line), out),
            None => others(out, &text, &|_| line),
        }
    }
}

fn first_content_line(doc: &str, chunk_start: usize) -> usize {
    chunk_start + doc.lines().position(|l| !is_blank(l)).unwrap_or(0)
}

fn parse_object(
    file: &str,
    kind: ServingKind,
    tree: YamlValue,
    doc: &str,
    chunk_start: usize,
    pinned_line: Option<usize>,
    out: &mut Vec<ServingDocument>,
) {
    let line = pinned_line.unwrap_or_else(|| first_content_line(doc, chunk_start));
    let name = str_at(&tree, &["metadata", "name"])
        .unwrap_or_default()
        .to_owned();
    let namespace = str_at(&tree, &["metadata", "namespace"])
        .filter(|ns| !ns.is_empty())
        .unwrap_or("default")
        .to_owned();
    let key = ServingKey::new(kind, &namespace, &name);
    let fail = |line: usize, field: Option<String>, reason: String| {
        ServingDocument::Error(ServingError {
            file: file.to_owned(),
            line: Some(line),
            object: Some(key.clone()),
            field,
            reason,
        })
    };
    if name.is_empty() {
        out.push(fail(
            line,
            Some("metadata.name".into()),
            "is required".into(),
        ));
        return;
    }

    // Convert the parsed tree (fast); only on failure parse the text again for a line number.
    fn typed<T: DeserializeOwned>(
        tree: YamlValue,
        doc: &str,
        start: usize,
    ) -> Result<T, (Option<usize>, String)> {
        serde_yaml::from_value(tree)
            .or_else(|_| serde_yaml::from_str(doc).map_err(|e| yaml_error(&e, start)))
    }
    let parsed = match kind {
        ServingKind::Service => typed(tree, doc, chunk_start).map(ServingObject::Service),
        ServingKind::Configuration => {
            typed(tree, doc, chunk_start).map(ServingObject::Configuration)
        }
        ServingKind::Revision => typed(tree, doc, chunk_start).map(ServingObject::Revision),
        ServingKind::Route => typed(tree, doc, chunk_start).map(ServingObject::Route),
    };
    let mut object = match parsed {
        Ok(object) => object,
        Err((at, reason)) => {
            // serde_yaml's messages start with the field path ("spec.traffic[0].percent: ...").
            let (field, reason) = match reason.split_once(": ") {
                Some((path, rest)) if !path.contains(' ') => {
                    (Some(path.to_owned()), rest.to_owned())
                }
                _ => (None, reason),
            };
            let at = pinned_line.or(at).unwrap_or(line);
            out.push(fail(at, field, reason));
            return;
        }
    };
    object.meta_mut().namespace = namespace;
    object.set_defaults();
    let errors = object.validate();
    if errors.is_empty() {
        out.push(ServingDocument::Object { object, line });
        return;
    }
    for FieldError { field, reason } in errors {
        let at = match pinned_line {
            Some(l) => l,
            None => field_line(doc, &field)
                .map(|l| chunk_start + l - 1)
                .unwrap_or(line),
        };
        out.push(fail(at, Some(field), reason));
    }
}

/// One step of a field path.
#[derive(Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// `spec.containers[0].ports[1].name` → spec, containers, 0, ports, 1, name;
/// `metadata.labels[a.b/c]` → metadata, labels, a.b/c.
fn steps(field: &str) -> Vec<Step> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = field.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '.' => {
                if !current.is_empty() {
                    out.push(Step::Key(std::mem::take(&mut current)));
                }
            }
            '[' => {
                if !current.is_empty() {
                    out.push(Step::Key(std::mem::take(&mut current)));
                }
                let inner: String = chars.by_ref().take_while(|c| *c != ']').collect();
                out.push(match inner.parse() {
                    Ok(i) => Step::Index(i),
                    Err(_) => Step::Key(inner),
                });
            }
            _ => current.push(ch),
        }
    }
    if !current.is_empty() {
        out.push(Step::Key(current));
    }
    out
}

/// The indentation of a line, and the column and text of its first key once list dashes
/// (`- `, `- - `) are stripped.
fn key_of(line: &str) -> (usize, usize, &str) {
    let indent = line.len() - line.trim_start().len();
    let mut col = indent;
    let mut rest = &line[indent..];
    while let Some(after) = rest.strip_prefix('-') {
        if !(after.is_empty() || after.starts_with(' ')) {
            break;
        }
        let trimmed = after.trim_start();
        col += 1 + after.len() - trimmed.len();
        rest = trimmed;
    }
    (indent, col, rest)
}

fn starts_with_key(text: &str, key: &str) -> bool {
    [key.to_owned(), format!("\"{key}\""), format!("'{key}'")]
        .iter()
        .any(|k| {
            text.strip_prefix(k.as_str())
                .is_some_and(|r| r.starts_with(':'))
        })
}

/// Best effort: the line (1-based, within `doc`) of the deepest part of `field` found in a block
/// YAML document, following keys and list indices
/// (`spec.template.spec.containers[0].ports[0].containerPort`).
fn field_line(doc: &str, field: &str) -> Option<usize> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut found = None;
    let mut from = 0;
    // Keys of the current block are indented deeper than this column.
    let mut parent: isize = -1;
    // The line of the list item just entered: its first key sits after the dash.
    let mut item_line = None;
    for step in steps(field) {
        match step {
            Step::Key(key) => {
                let mut hit = None;
                for (i, line) in lines.iter().enumerate().skip(from) {
                    if is_blank(line) {
                        continue;
                    }
                    let (indent, col, text) = key_of(line);
                    if Some(i) != item_line && indent as isize <= parent {
                        break;
                    }
                    if col as isize > parent && starts_with_key(text, &key) {
                        hit = Some((i, col));
                        break;
                    }
                }
                let Some((i, col)) = hit else {
                    return found.map(|l| l + 1);
                };
                found = Some(i);
                from = i + 1;
                parent = col as isize;
                item_line = None;
            }
            Step::Index(n) => {
                let mut dash = None;
                let mut count = 0;
                let mut hit = None;
                for (i, line) in lines.iter().enumerate().skip(from) {
                    if is_blank(line) {
                        continue;
                    }
                    let (indent, col, _) = key_of(line);
                    let is_item = col > indent;
                    if !is_item {
                        if indent as isize <= parent {
                            break;
                        }
                        continue;
                    }
                    if (indent as isize) < parent {
                        break;
                    }
                    match dash {
                        None => dash = Some(indent),
                        Some(d) if indent < d => break,
                        Some(d) if indent > d => continue,
                        Some(_) => {}
                    }
                    if count == n {
                        hit = Some((i, indent));
                        break;
                    }
                    count += 1;
                }
                let Some((i, indent)) = hit else {
                    return found.map(|l| l + 1);
                };
                found = Some(i);
                from = i;
                parent = indent as isize;
                item_line = Some(i);
            }
        }
    }
    found.map(|l| l + 1)
}

#[cfg(test)]
mod tests;
