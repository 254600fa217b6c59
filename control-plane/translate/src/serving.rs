//! Knative Serving's reconcilers, as pure functions: Service → Configuration + Route,
//! Configuration → a new Revision when its template changes, Route → KIngress, and the statuses
//! of all three.
//!
//! Level-triggered: each function reads the current objects and returns what should exist; none
//! is told why it runs, none does I/O or reads a clock, and running one again on its own output
//! changes nothing. The caller (the local runtime, later a Kubernetes controller) stores what
//! comes out and feeds it back in. Revision readiness comes in from outside, as the set of ready
//! revision names.
//!
//! The KIngress is shaped as Knative's route reconciler shapes it, with tag-header routing on:
//! per target (the default one, then each tag) a cluster-local rule and, unless the Route is
//! cluster-local, an external one; splits to the revision's Service on port 80 (81 for h2c) that
//! set `Knative-Serving-Revision` and `Knative-Serving-Namespace`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use knarr_model::serving::{
    condition_status, Addressable, Condition, ConditionStatus, Configuration, ConfigurationSpec,
    ConfigurationStatus, Revision, RevisionTemplateSpec, Route, RouteSpec, RouteStatus, Service,
    ServiceStatus, TrafficTarget, CONDITION_ALL_TRAFFIC_ASSIGNED, CONDITION_CONFIGURATIONS_READY,
    CONDITION_INGRESS_READY, CONDITION_READY, CONDITION_ROUTES_READY,
    CONFIGURATION_GENERATION_LABEL, CONFIGURATION_LABEL, LAST_APPLIED_ANNOTATION,
    ROUTES_ANNOTATION, ROUTE_LABEL, ROUTE_NAMESPACE_LABEL, SERVICE_LABEL,
};
use knarr_model::{
    HeaderMatch, HttpIngressPath, HttpIngressRuleValue, HttpOption, Ingress, IngressBackendSplit,
    IngressRule, IngressSpec, IntOrString, ObjectMeta, Visibility, INGRESS_CLASS_ANNOTATION,
    KNARR_INGRESS_CLASS,
};

/// Set on each split: which revision and namespace the request is for (the activator and
/// queue-proxy read them).
pub const REVISION_HEADER: &str = "Knative-Serving-Revision";
pub const NAMESPACE_HEADER: &str = "Knative-Serving-Namespace";
/// Tag-header routing: a request carrying this header goes to the tag's target; tag hosts set it.
pub const TAG_HEADER: &str = "Knative-Serving-Tag";
/// Set on the default target's main path (Knative's tag-header routing does the same).
pub const DEFAULT_ROUTE_HEADER: &str = "Knative-Serving-Default-Route";
/// The cluster domain of cluster-local hosts.
pub const CLUSTER_DOMAIN: &str = "svc.cluster.local";
/// The port of a revision's Service: HTTP/1 on 80, h2c on 81 (named `http2`, so the gateway
/// speaks HTTP/2 upstream).
pub const REVISION_HTTP_PORT: i64 = 80;
pub const REVISION_H2C_PORT: i64 = 81;

// ---- Service → Configuration + Route --------------------------------------------------------

fn without(annotations: &BTreeMap<String, String>, drop: &[&str]) -> BTreeMap<String, String> {
    annotations
        .iter()
        .filter(|(k, _)| !drop.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn child_meta(service: &Service) -> ObjectMeta {
    let mut labels = service.metadata.labels.clone();
    labels.insert(SERVICE_LABEL.into(), service.metadata.name.clone());
    ObjectMeta {
        name: service.metadata.name.clone(),
        namespace: service.metadata.namespace.clone(),
        labels,
        annotations: without(&service.metadata.annotations, &[LAST_APPLIED_ANNOTATION]),
        // The store keeps generations; see `configuration_revision` for how numbering copes
        // without one.
        generation: None,
    }
}

/// The Configuration and Route a Service owns: same name and namespace, the Service's labels
/// (so `networking.knative.dev/visibility` reaches the Route) plus `serving.knative.dev/service`,
/// its annotations but kubectl's. Route targets without a revision name get the Configuration's
/// name; omitted traffic is 100 % to the latest revision.
pub fn service_to_children(service: &Service) -> (Configuration, Route) {
    let name = &service.metadata.name;
    let mut config_meta = child_meta(service);
    config_meta.annotations = without(
        &service.metadata.annotations,
        &[LAST_APPLIED_ANNOTATION, ROUTES_ANNOTATION],
    );
    config_meta
        .annotations
        .insert(ROUTES_ANNOTATION.into(), name.clone());
    let configuration = Configuration {
        metadata: config_meta,
        spec: ConfigurationSpec {
            template: service.spec.template.clone(),
        },
        status: None,
    };

    let mut traffic = service.spec.traffic.clone();
    if traffic.is_empty() {
        traffic.push(TrafficTarget {
            latest_revision: Some(true),
            percent: Some(100),
            ..Default::default()
        });
    }
    for target in &mut traffic {
        target.latest_revision = Some(target.follows_latest());
        if target.revision_name.is_empty() {
            target.configuration_name = name.clone();
        }
    }
    let route = Route {
        metadata: child_meta(service),
        spec: RouteSpec { traffic },
        status: None,
    };
    (configuration, route)
}

// ---- Configuration → Revision ---------------------------------------------------------------

/// Labels Knative (or Knarr) puts on a Revision; not part of the user's template.
const REVISION_SYSTEM_LABELS: &[&str] = &[
    CONFIGURATION_LABEL,
    CONFIGURATION_GENERATION_LABEL,
    SERVICE_LABEL,
    "serving.knative.dev/configurationUID",
    "serving.knative.dev/serviceUID",
    "serving.knative.dev/routingState",
];

/// The Revisions `config` stamped (same namespace, its configuration label), oldest first: by
/// the generation they were stamped from, then by name.
pub fn owned_revisions<'a>(config: &Configuration, revisions: &'a [Revision]) -> Vec<&'a Revision> {
    let mut owned: Vec<&Revision> = revisions
        .iter()
        .filter(|r| {
            r.metadata.namespace == config.metadata.namespace
                && r.configuration() == Some(config.metadata.name.as_str())
        })
        .collect();
    owned.sort_by(|a, b| {
        a.configuration_generation()
            .cmp(&b.configuration_generation())
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    owned
}

/// The newest Revision `config` stamped.
pub fn latest_created_revision<'a>(
    config: &Configuration,
    revisions: &'a [Revision],
) -> Option<&'a Revision> {
    owned_revisions(config, revisions).pop()
}

/// Whether `revision` was stamped from `template` (its name aside, unless the template names
/// one).
fn stamped_from(revision: &Revision, template: &RevisionTemplateSpec) -> bool {
    let user_labels = without(&revision.metadata.labels, REVISION_SYSTEM_LABELS);
    revision.spec == template.spec
        && user_labels == template.metadata.labels
        && revision.metadata.annotations == template.metadata.annotations
        && (template.metadata.name.is_empty() || template.metadata.name == revision.metadata.name)
}

/// The Revision `config` should stamp now, if any: `None` when its latest Revision already has
/// the current template, or when the template's user-chosen name is taken (Revisions are
/// immutable; the webhook rejects reusing a name for a new template).
///
/// Generated names are `<config>-00001`, `-00002`, … by the Configuration's
/// `metadata.generation`. A caller that keeps no generation (or a stale one) still gets a fresh
/// number: never lower than one past the latest Revision's.
pub fn configuration_revision(config: &Configuration, existing: &[Revision]) -> Option<Revision> {
    let template = &config.spec.template;
    let namespace = &config.metadata.namespace;
    let latest = latest_created_revision(config, existing);
    if latest.is_some_and(|r| stamped_from(r, template)) {
        return None;
    }
    let after_latest = latest
        .and_then(Revision::configuration_generation)
        .map_or(1, |g| g + 1);
    let generation = config.metadata.generation.unwrap_or(1).max(after_latest);
    let name = if template.metadata.name.is_empty() {
        format!("{}-{generation:05}", config.metadata.name)
    } else {
        template.metadata.name.clone()
    };
    if existing
        .iter()
        .any(|r| r.metadata.namespace == *namespace && r.metadata.name == name)
    {
        return None;
    }

    let mut labels = template.metadata.labels.clone();
    labels.insert(CONFIGURATION_LABEL.into(), config.metadata.name.clone());
    labels.insert(
        CONFIGURATION_GENERATION_LABEL.into(),
        generation.to_string(),
    );
    if let Some(service) = config.metadata.labels.get(SERVICE_LABEL) {
        labels.insert(SERVICE_LABEL.into(), service.clone());
    }
    Some(Revision {
        metadata: ObjectMeta {
            name,
            namespace: namespace.clone(),
            labels,
            annotations: template.metadata.annotations.clone(),
            generation: None,
        },
        spec: template.spec.clone(),
        status: None,
    })
}

/// Whether a revision is ready, by the caller's set; `False` when its own status says it failed.
fn readiness(revision: &Revision, ready: &BTreeSet<String>) -> (ConditionStatus, String) {
    if ready.contains(&revision.metadata.name) {
        return (ConditionStatus::True, String::new());
    }
    let failed = revision.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == CONDITION_READY && c.status == ConditionStatus::False)
    });
    match failed {
        Some(c) => (ConditionStatus::False, c.message.clone()),
        None => (ConditionStatus::Unknown, String::new()),
    }
}

/// A Configuration's status: its latest created Revision, its latest ready one (the newest in
/// `ready`), and `Ready` once the latest created one is ready.
pub fn configuration_status(
    config: &Configuration,
    revisions: &[Revision],
    ready: &BTreeSet<String>,
) -> ConfigurationStatus {
    let owned = owned_revisions(config, revisions);
    let latest = owned.last();
    let latest_ready = owned
        .iter()
        .rev()
        .find(|r| ready.contains(&r.metadata.name));
    let condition = match latest {
        None => Condition::new(
            CONDITION_READY,
            ConditionStatus::Unknown,
            "RevisionMissing",
            "No Revision has been created yet.",
        ),
        Some(rev) => {
            let name = &rev.metadata.name;
            match readiness(rev, ready) {
                (ConditionStatus::True, _) => {
                    Condition::new(CONDITION_READY, ConditionStatus::True, "", "")
                }
                (ConditionStatus::False, why) => Condition::new(
                    CONDITION_READY,
                    ConditionStatus::False,
                    "RevisionFailed",
                    &format!("Revision {name:?} failed with message: {why}."),
                ),
                (ConditionStatus::Unknown, _) => Condition::new(
                    CONDITION_READY,
                    ConditionStatus::Unknown,
                    "",
                    &format!("Waiting for Revision {name:?} to be ready."),
                ),
            }
        }
    };
    ConfigurationStatus {
        observed_generation: config.metadata.generation,
        conditions: vec![condition],
        latest_created_revision_name: latest.map(|r| r.metadata.name.clone()).unwrap_or_default(),
        latest_ready_revision_name: latest_ready
            .map(|r| r.metadata.name.clone())
            .unwrap_or_default(),
    }
}

// ---- Route → KIngress -----------------------------------------------------------------------

/// Why a Route's traffic cannot be resolved (Knative's `AllTrafficAssigned=False` reasons).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// A target names a revision that does not exist.
    RevisionMissing { field: String, revision: String },
    /// A target names a configuration that does not exist.
    ConfigurationMissing {
        field: String,
        configuration: String,
    },
    /// A target follows a configuration that has stamped no revision yet.
    NoRevisionYet {
        field: String,
        configuration: String,
    },
}

impl RouteError {
    /// The offending field of the Route (`spec.traffic[1].revisionName`).
    pub fn field(&self) -> &str {
        match self {
            RouteError::RevisionMissing { field, .. }
            | RouteError::ConfigurationMissing { field, .. }
            | RouteError::NoRevisionYet { field, .. } => field,
        }
    }

    /// The condition reason Knative reports.
    pub fn reason(&self) -> &'static str {
        match self {
            RouteError::RevisionMissing { .. } | RouteError::NoRevisionYet { .. } => {
                "RevisionMissing"
            }
            RouteError::ConfigurationMissing { .. } => "ConfigurationMissing",
        }
    }

    fn message(&self) -> String {
        match self {
            RouteError::RevisionMissing { revision, .. } => {
                format!("Revision {revision:?} referenced in traffic not found.")
            }
            RouteError::ConfigurationMissing { configuration, .. } => {
                format!("Configuration {configuration:?} referenced in traffic not found.")
            }
            RouteError::NoRevisionYet { configuration, .. } => {
                format!("Configuration {configuration:?} does not have any Revision yet.")
            }
        }
    }
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field(), self.message())
    }
}

impl std::error::Error for RouteError {}

/// One traffic target with its revision resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTarget {
    pub tag: String,
    pub revision: String,
    /// Set when the target follows a configuration's latest revision.
    pub configuration: Option<String>,
    pub percent: i64,
    /// Whether the revision's app speaks h2c (its Service port is then 81).
    pub h2c: bool,
}

/// Resolves every target of `route`, in order: a `revisionName` must exist; a configuration
/// target goes to the configuration's latest ready revision (its status), else its latest
/// created one (its status, else the newest revision it stamped).
pub fn resolve_traffic(
    route: &Route,
    revisions: &[Revision],
    configs: &[Configuration],
) -> Result<Vec<ResolvedTarget>, RouteError> {
    let namespace = &route.metadata.namespace;
    let find_revision = |name: &str| {
        revisions
            .iter()
            .find(|r| r.metadata.namespace == *namespace && r.metadata.name == name)
    };
    let mut resolved = Vec::with_capacity(route.spec.traffic.len());
    for (i, target) in route.spec.traffic.iter().enumerate() {
        let at = format!("spec.traffic[{i}]");
        let (revision, configuration) = if !target.revision_name.is_empty() {
            let Some(rev) = find_revision(&target.revision_name) else {
                return Err(RouteError::RevisionMissing {
                    field: format!("{at}.revisionName"),
                    revision: target.revision_name.clone(),
                });
            };
            (rev, None)
        } else {
            let config_name = &target.configuration_name;
            let field = format!("{at}.configurationName");
            let Some(config) = configs
                .iter()
                .find(|c| c.metadata.namespace == *namespace && c.metadata.name == *config_name)
            else {
                return Err(RouteError::ConfigurationMissing {
                    field,
                    configuration: config_name.clone(),
                });
            };
            let status = config.status.as_ref();
            let named = status
                .map(|s| s.latest_ready_revision_name.as_str())
                .filter(|n| !n.is_empty())
                .or_else(|| {
                    status
                        .map(|s| s.latest_created_revision_name.as_str())
                        .filter(|n| !n.is_empty())
                });
            let rev = match named {
                Some(name) => find_revision(name).ok_or_else(|| RouteError::RevisionMissing {
                    field: field.clone(),
                    revision: name.to_owned(),
                })?,
                None => latest_created_revision(config, revisions).ok_or_else(|| {
                    RouteError::NoRevisionYet {
                        field: field.clone(),
                        configuration: config_name.clone(),
                    }
                })?,
            };
            (rev, Some(config_name.clone()))
        };
        resolved.push(ResolvedTarget {
            tag: target.tag.clone(),
            revision: revision.metadata.name.clone(),
            configuration,
            percent: target.percent.unwrap_or(0),
            h2c: revision.spec.is_h2c(),
        });
    }
    Ok(resolved)
}

/// The Route's main host (the Route's URL host), before any tag.
fn external_host(label: &str, namespace: &str, domain: &str) -> String {
    format!("{label}.{namespace}.{domain}")
}

/// The three names a host label has inside the cluster, sorted.
fn cluster_local_hosts(label: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{label}.{namespace}"),
        format!("{label}.{namespace}.svc"),
        format!("{label}.{namespace}.{CLUSTER_DOMAIN}"),
    ]
}

/// The Route's URL: `http://{name}.{namespace}.{domain}`, or its cluster-local name
/// (`http://{name}.{namespace}.svc.cluster.local`) when the Route is cluster-local, as Knative
/// reports it.
pub fn route_url(route: &Route, domain: &str) -> String {
    tag_url(route, "", domain)
}

/// The URL of one of the Route's tags (`http://{tag}-{name}.{namespace}.{domain}`); the Route's
/// own URL for the empty tag.
pub fn tag_url(route: &Route, tag: &str, domain: &str) -> String {
    let label = host_label(&route.metadata.name, tag);
    let ns = &route.metadata.namespace;
    if route.is_cluster_local() {
        format!("http://{label}.{ns}.{CLUSTER_DOMAIN}")
    } else {
        format!("http://{}", external_host(&label, ns, domain))
    }
}

fn host_label(route: &str, tag: &str) -> String {
    if tag.is_empty() {
        route.to_owned()
    } else {
        format!("{tag}-{route}")
    }
}

/// Knative merges targets that land on the same revision; a lone target takes everything.
fn consolidate(targets: &[&ResolvedTarget]) -> Vec<(String, i64, bool)> {
    let mut merged: Vec<(String, i64, bool)> = Vec::new();
    for t in targets {
        match merged.iter_mut().find(|(rev, ..)| *rev == t.revision) {
            Some(entry) => entry.1 += t.percent,
            None => merged.push((t.revision.clone(), t.percent, t.h2c)),
        }
    }
    if let [only] = merged.as_mut_slice() {
        only.1 = 100;
    }
    merged
}

fn splits(namespace: &str, targets: &[(String, i64, bool)]) -> Vec<IngressBackendSplit> {
    targets
        .iter()
        // A 0 % target gets no split (it may still have a tag host).
        .filter(|(_, percent, _)| *percent > 0)
        .map(|(revision, percent, h2c)| IngressBackendSplit {
            service_namespace: namespace.to_owned(),
            service_name: revision.clone(),
            service_port: IntOrString::Int(if *h2c {
                REVISION_H2C_PORT
            } else {
                REVISION_HTTP_PORT
            }),
            percent: *percent,
            append_headers: BTreeMap::from([
                (REVISION_HEADER.to_owned(), revision.clone()),
                (NAMESPACE_HEADER.to_owned(), namespace.to_owned()),
            ]),
        })
        .collect()
}

/// The KIngress for `route`: named after it, in its namespace, of Knarr's ingress class (unless
/// the Route's own annotation picks another).
///
/// Rules, in Knative's order — the default target, then each tag alphabetically; for each a
/// `ClusterLocal` rule (`{label}.{ns}`, `{label}.{ns}.svc`, `{label}.{ns}.svc.cluster.local`)
/// and, unless the Route is labelled cluster-local, an `ExternalIP` rule
/// (`{label}.{ns}.{domain}`), where the label is the route name or `{tag}-{route}`. The default
/// rules also route requests carrying `Knative-Serving-Tag: <tag>` to that tag's target; a tag
/// rule sends 100 % to its target and sets `Knative-Serving-Tag`.
pub fn route_to_ingress(
    route: &Route,
    revisions: &[Revision],
    configs: &[Configuration],
    domain: &str,
) -> Result<Ingress, RouteError> {
    let resolved = resolve_traffic(route, revisions, configs)?;
    let name = &route.metadata.name;
    let ns = &route.metadata.namespace;

    let all: Vec<&ResolvedTarget> = resolved.iter().collect();
    let main = consolidate(&all);
    let mut tags: BTreeMap<&str, Vec<(String, i64, bool)>> = BTreeMap::new();
    for t in resolved.iter().filter(|t| !t.tag.is_empty()) {
        tags.insert(&t.tag, consolidate(&[t]));
    }

    let mut groups: Vec<(&str, Vec<HttpIngressPath>)> = Vec::new();
    let mut default_paths: Vec<HttpIngressPath> = tags
        .iter()
        .map(|(tag, targets)| HttpIngressPath {
            headers: BTreeMap::from([(
                TAG_HEADER.to_owned(),
                HeaderMatch {
                    exact: (*tag).to_owned(),
                },
            )]),
            splits: splits(ns, targets),
            ..Default::default()
        })
        .collect();
    default_paths.push(HttpIngressPath {
        splits: splits(ns, &main),
        append_headers: BTreeMap::from([(DEFAULT_ROUTE_HEADER.to_owned(), "true".to_owned())]),
        ..Default::default()
    });
    groups.push(("", default_paths));
    for (tag, targets) in &tags {
        groups.push((
            tag,
            vec![HttpIngressPath {
                splits: splits(ns, targets),
                append_headers: BTreeMap::from([(TAG_HEADER.to_owned(), (*tag).to_owned())]),
                ..Default::default()
            }],
        ));
    }

    let cluster_local = route.is_cluster_local();
    let mut rules = Vec::new();
    for (tag, paths) in groups {
        let label = host_label(name, tag);
        let http = HttpIngressRuleValue { paths };
        rules.push(IngressRule {
            hosts: cluster_local_hosts(&label, ns),
            visibility: Visibility::ClusterLocal,
            http: Some(http.clone()),
        });
        if !cluster_local {
            rules.push(IngressRule {
                hosts: vec![external_host(&label, ns, domain)],
                visibility: Visibility::ExternalIP,
                http: Some(http),
            });
        }
    }

    let mut labels = route.metadata.labels.clone();
    labels.insert(ROUTE_LABEL.into(), name.clone());
    labels.insert(ROUTE_NAMESPACE_LABEL.into(), ns.clone());
    let mut annotations = BTreeMap::from([(
        INGRESS_CLASS_ANNOTATION.to_owned(),
        KNARR_INGRESS_CLASS.to_owned(),
    )]);
    annotations.extend(without(
        &route.metadata.annotations,
        &[LAST_APPLIED_ANNOTATION],
    ));
    Ok(Ingress {
        metadata: ObjectMeta {
            name: name.clone(),
            namespace: ns.clone(),
            labels,
            annotations,
            generation: None,
        },
        spec: IngressSpec {
            tls: Vec::new(),
            rules,
            http_option: Some(HttpOption::Enabled),
        },
    })
}

// ---- statuses -------------------------------------------------------------------------------

/// A Route's status: URL and cluster-local address, traffic with each revision resolved
/// (`latestRevision` targets show the revision they float to), and conditions:
/// `AllTrafficAssigned` (False naming the missing revision or configuration; Unknown while a
/// target revision is not ready), `IngressReady` (from `ingress_ready`), and `Ready`.
pub fn route_status(
    route: &Route,
    revisions: &[Revision],
    configs: &[Configuration],
    ready: &BTreeSet<String>,
    ingress_ready: bool,
    domain: &str,
) -> RouteStatus {
    let name = &route.metadata.name;
    let ns = &route.metadata.namespace;
    let mut status = RouteStatus {
        observed_generation: route.metadata.generation,
        conditions: Vec::new(),
        url: route_url(route, domain),
        address: Some(Addressable {
            url: format!("http://{name}.{ns}.{CLUSTER_DOMAIN}"),
        }),
        traffic: Vec::new(),
    };
    let assigned = match resolve_traffic(route, revisions, configs) {
        Err(e) => Condition::new(
            CONDITION_ALL_TRAFFIC_ASSIGNED,
            ConditionStatus::False,
            e.reason(),
            &e.message(),
        ),
        Ok(resolved) => {
            status.traffic = resolved
                .iter()
                .map(|t| TrafficTarget {
                    tag: t.tag.clone(),
                    revision_name: t.revision.clone(),
                    configuration_name: String::new(),
                    latest_revision: Some(t.configuration.is_some()),
                    percent: Some(t.percent),
                    url: if t.tag.is_empty() {
                        String::new()
                    } else {
                        tag_url(route, &t.tag, domain)
                    },
                })
                .collect();
            let not_ready: BTreeSet<&str> = resolved
                .iter()
                .map(|t| t.revision.as_str())
                .filter(|r| !ready.contains(*r))
                .collect();
            if not_ready.is_empty() {
                Condition::new(
                    CONDITION_ALL_TRAFFIC_ASSIGNED,
                    ConditionStatus::True,
                    "",
                    "",
                )
            } else {
                let names: Vec<String> = not_ready.iter().map(|r| format!("{r:?}")).collect();
                Condition::new(
                    CONDITION_ALL_TRAFFIC_ASSIGNED,
                    ConditionStatus::Unknown,
                    "RevisionNotReady",
                    &format!("Waiting for Revision(s) {} to be ready.", names.join(", ")),
                )
            }
        }
    };
    let ingress = if ingress_ready {
        Condition::new(CONDITION_INGRESS_READY, ConditionStatus::True, "", "")
    } else {
        Condition::new(
            CONDITION_INGRESS_READY,
            ConditionStatus::Unknown,
            "Uninitialized",
            "Waiting for the Ingress to be ready.",
        )
    };
    let ready = summarize(&[&assigned, &ingress]);
    status.conditions = vec![assigned, ingress, ready];
    status
}

/// `Ready` from its dependents: False if any is False (its reason and message), True if all
/// are True, else Unknown (the first not-True one's reason and message).
fn summarize(dependents: &[&Condition]) -> Condition {
    let first = |status: ConditionStatus| dependents.iter().find(|c| c.status == status);
    if let Some(c) = first(ConditionStatus::False) {
        return Condition::new(
            CONDITION_READY,
            ConditionStatus::False,
            &c.reason,
            &c.message,
        );
    }
    match first(ConditionStatus::Unknown) {
        Some(c) => Condition::new(
            CONDITION_READY,
            ConditionStatus::Unknown,
            &c.reason,
            &c.message,
        ),
        None => Condition::new(CONDITION_READY, ConditionStatus::True, "", ""),
    }
}

/// A Service's status from its Configuration's and Route's: revision names, URL, address and
/// traffic copied; `ConfigurationsReady` and `RoutesReady` from their `Ready`, and `Ready`
/// from both. `RoutesReady` stays Unknown (`OutOfDate`) while a `latestRevision` target does
/// not yet point at the latest ready revision.
pub fn service_status(
    service: &Service,
    config: &ConfigurationStatus,
    route: &RouteStatus,
) -> ServiceStatus {
    let copy = |from: &[Condition], type_: &str| {
        let source = from.iter().find(|c| c.type_ == CONDITION_READY);
        Condition {
            type_: type_.to_owned(),
            status: condition_status(from, CONDITION_READY),
            reason: source.map(|c| c.reason.clone()).unwrap_or_default(),
            message: source.map(|c| c.message.clone()).unwrap_or_default(),
            ..Default::default()
        }
    };
    let configs_ready = copy(&config.conditions, CONDITION_CONFIGURATIONS_READY);
    let mut routes_ready = copy(&route.conditions, CONDITION_ROUTES_READY);
    let latest_ready = &config.latest_ready_revision_name;
    let stale = route
        .traffic
        .iter()
        .find(|t| t.latest_revision == Some(true) && t.revision_name != *latest_ready);
    if let (Some(stale), false, ConditionStatus::True) =
        (stale, latest_ready.is_empty(), routes_ready.status)
    {
        routes_ready = Condition::new(
            CONDITION_ROUTES_READY,
            ConditionStatus::Unknown,
            "OutOfDate",
            &format!(
                "The Route still sends latestRevision traffic to {:?}, not {latest_ready:?}.",
                stale.revision_name
            ),
        );
    }
    let ready = summarize(&[&configs_ready, &routes_ready]);
    ServiceStatus {
        observed_generation: service.metadata.generation,
        conditions: vec![configs_ready, ready, routes_ready],
        latest_created_revision_name: config.latest_created_revision_name.clone(),
        latest_ready_revision_name: config.latest_ready_revision_name.clone(),
        url: route.url.clone(),
        address: route.address.clone(),
        traffic: route.traffic.clone(),
    }
}

// ---- one Service, end to end ----------------------------------------------------------------

/// Everything one Service implies, from one pass over the current state.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceReconcile {
    /// The Service's Configuration, with its status.
    pub configuration: Configuration,
    /// The Service's Route, with its status.
    pub route: Route,
    /// A Revision to create, when the template changed.
    pub new_revision: Option<Revision>,
    /// The KIngress to program, or why the Route's traffic cannot be resolved.
    pub ingress: Result<Ingress, RouteError>,
    pub status: ServiceStatus,
}

/// Reconciles one Service against the existing Revisions: children, a new Revision if its
/// template changed, the KIngress, and all statuses. `ready` names the ready revisions;
/// `ingress_ready` says whether the gateway serves the current KIngress.
pub fn reconcile_service(
    service: &Service,
    revisions: &[Revision],
    ready: &BTreeSet<String>,
    ingress_ready: bool,
    domain: &str,
) -> ServiceReconcile {
    let (mut configuration, mut route) = service_to_children(service);
    let new_revision = configuration_revision(&configuration, revisions);
    let mut all = revisions.to_vec();
    all.extend(new_revision.iter().cloned());
    let c_status = configuration_status(&configuration, &all, ready);
    configuration.status = Some(c_status.clone());
    let configs = std::slice::from_ref(&configuration);
    let ingress = route_to_ingress(&route, &all, configs, domain);
    let r_status = route_status(&route, &all, configs, ready, ingress_ready, domain);
    let status = service_status(service, &c_status, &r_status);
    route.status = Some(r_status);
    ServiceReconcile {
        configuration,
        route,
        new_revision,
        ingress,
        status,
    }
}

#[cfg(test)]
mod tests;
