//! The serving reconcilers, driven by hand-written Knative YAML: what each pass produces, and
//! that the KIngress it makes is valid and translates.

use std::fmt::Write as _;

use super::*;
use crate::kingress::{translate_ingress, BackendKey, GatewayTag};
use knarr_model::serving::{parse_serving_documents, ServingDocument, ServingObject};
use knarr_model::{parse_documents, Document, Object};

const DOMAIN: &str = "example.com";

const HELLO: &str = r#"
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: hello
  labels: {team: web}
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: "{}"
    note: kept
spec:
  template:
    spec:
      containers:
        - image: ghcr.io/knative/helloworld-go:latest
          env:
            - {name: TARGET, value: World}
"#;

fn objects(yaml: &str) -> Vec<ServingObject> {
    parse_serving_documents("t.yaml", yaml)
        .into_iter()
        .map(|d| match d {
            ServingDocument::Object { object, .. } => object,
            other => panic!("{other:#?}"),
        })
        .collect()
}

fn service(yaml: &str) -> Service {
    match objects(yaml).pop() {
        Some(ServingObject::Service(s)) => s,
        other => panic!("{other:?}"),
    }
}

fn route(yaml: &str) -> Route {
    match objects(yaml).pop() {
        Some(ServingObject::Route(r)) => r,
        other => panic!("{other:?}"),
    }
}

fn no_ready() -> BTreeSet<String> {
    BTreeSet::new()
}

fn ready(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// The hello Service with its first image replaced.
fn hello_with_image(image: &str) -> Service {
    let mut svc = service(HELLO);
    svc.spec.template.spec.containers[0].image = image.into();
    svc
}

/// Stamps revisions for `service` until its template has one, as a store would.
fn stamp(service: &Service, revisions: &mut Vec<Revision>) -> Option<String> {
    let (config, _) = service_to_children(service);
    let rev = configuration_revision(&config, revisions)?;
    let name = rev.metadata.name.clone();
    revisions.push(rev);
    Some(name)
}

/// Sends the KIngress through the model's parser and validator (as JSON, which is YAML) and
/// returns what comes out; it must be what went in.
fn checked(ingress: &Ingress) -> Ingress {
    let mut manifest = serde_json::to_value(ingress).unwrap();
    manifest["apiVersion"] = "networking.internal.knative.dev/v1alpha1".into();
    manifest["kind"] = "Ingress".into();
    let text = serde_json::to_string_pretty(&manifest).unwrap();
    let docs = parse_documents("ingress.json", &text);
    let [Document::Object {
        object: Object::Ingress(parsed),
        ..
    }] = docs.as_slice()
    else {
        panic!("{docs:#?}\n{text}")
    };
    assert_eq!(parsed, ingress, "validation changed the ingress");
    parsed.clone()
}

/// One line per rule and path: visibility and hosts; header matches → splits; headers set.
fn describe(ingress: &Ingress) -> String {
    let mut out = String::new();
    for rule in &ingress.spec.rules {
        writeln!(out, "{:?} {}", rule.visibility, rule.hosts.join(" ")).unwrap();
        for path in &rule.http.as_ref().unwrap().paths {
            let headers: Vec<String> = path
                .headers
                .iter()
                .map(|(k, v)| format!("{k}={}", v.exact))
                .collect();
            let splits: Vec<String> = path
                .splits
                .iter()
                .map(|s| {
                    assert_eq!(s.append_headers[REVISION_HEADER], s.service_name);
                    assert_eq!(s.append_headers[NAMESPACE_HEADER], s.service_namespace);
                    assert_eq!(s.append_headers.len(), 2);
                    format!(
                        "{}/{}:{} {}%",
                        s.service_namespace, s.service_name, s.service_port, s.percent
                    )
                })
                .collect();
            let set: Vec<String> = path
                .append_headers
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(
                out,
                "  [{}] -> {} set [{}]",
                headers.join(","),
                splits.join(", "),
                set.join(",")
            )
            .unwrap();
        }
    }
    out
}

fn claims(ingress: &Ingress) -> Vec<(GatewayTag, String)> {
    let mut claims = translate_ingress(ingress).claims;
    claims.sort();
    claims
}

#[test]
fn hello_service_becomes_configuration_route_revision_and_ingress() {
    let svc = service(HELLO);
    let (config, route) = service_to_children(&svc);

    assert_eq!(config.metadata.name, "hello");
    assert_eq!(config.metadata.namespace, "default");
    assert_eq!(
        config.metadata.labels,
        BTreeMap::from([
            ("team".to_owned(), "web".to_owned()),
            (SERVICE_LABEL.to_owned(), "hello".to_owned()),
        ])
    );
    assert_eq!(
        config.metadata.annotations,
        BTreeMap::from([
            ("note".to_owned(), "kept".to_owned()),
            (ROUTES_ANNOTATION.to_owned(), "hello".to_owned()),
        ])
    );
    assert_eq!(config.spec.template, svc.spec.template);
    assert_eq!(route.metadata.labels, config.metadata.labels);
    assert_eq!(
        route.spec.traffic,
        vec![TrafficTarget {
            configuration_name: "hello".into(),
            latest_revision: Some(true),
            percent: Some(100),
            ..Default::default()
        }]
    );
    // The children are valid objects in their own right.
    assert!(ServingObject::Configuration(config.clone())
        .validate()
        .is_empty());
    assert!(ServingObject::Route(route.clone()).validate().is_empty());

    let rev = configuration_revision(&config, &[]).expect("a first revision");
    assert_eq!(rev.metadata.name, "hello-00001");
    assert_eq!(rev.metadata.namespace, "default");
    assert_eq!(
        rev.metadata.labels,
        BTreeMap::from([
            (CONFIGURATION_LABEL.to_owned(), "hello".to_owned()),
            (CONFIGURATION_GENERATION_LABEL.to_owned(), "1".to_owned()),
            (SERVICE_LABEL.to_owned(), "hello".to_owned()),
        ])
    );
    assert_eq!(rev.spec, svc.spec.template.spec);
    assert_eq!(rev.spec.timeout_seconds, Some(300));
    assert!(ServingObject::Revision(rev.clone()).validate().is_empty());

    let ingress = route_to_ingress(&route, &[rev], &[config], DOMAIN).unwrap();
    let ingress = checked(&ingress);
    assert_eq!(ingress.metadata.name, "hello");
    assert_eq!(ingress.metadata.namespace, "default");
    assert_eq!(ingress.class(), Some(KNARR_INGRESS_CLASS));
    assert_eq!(ingress.metadata.annotations["note"], "kept");
    assert!(!ingress
        .metadata
        .annotations
        .contains_key(LAST_APPLIED_ANNOTATION));
    assert_eq!(ingress.metadata.labels[ROUTE_LABEL], "hello");
    assert_eq!(ingress.metadata.labels[ROUTE_NAMESPACE_LABEL], "default");
    assert_eq!(ingress.metadata.labels[SERVICE_LABEL], "hello");
    assert_eq!(ingress.spec.http_option, Some(HttpOption::Enabled));
    assert_eq!(
        describe(&ingress),
        "\
ClusterLocal hello.default hello.default.svc hello.default.svc.cluster.local
  [] -> default/hello-00001:80 100% set [Knative-Serving-Default-Route=true]
ExternalIP hello.default.example.com
  [] -> default/hello-00001:80 100% set [Knative-Serving-Default-Route=true]
"
    );

    let translation = translate_ingress(&ingress);
    assert_eq!(
        translation.backends.into_iter().collect::<Vec<_>>(),
        [BackendKey {
            namespace: "default".into(),
            service: "hello-00001".into(),
            port: IntOrString::Int(80),
        }]
    );
    let claims = claims(&ingress);
    assert!(claims.contains(&(GatewayTag::External, "hello.default.example.com".into())));
    assert!(claims.contains(&(GatewayTag::Internal, "hello.default.example.com".into())));
    assert!(claims.contains(&(
        GatewayTag::Internal,
        "hello.default.svc.cluster.local".into()
    )));
    assert!(claims.contains(&(GatewayTag::Internal, "hello.default".into())));
    assert!(!claims.contains(&(
        GatewayTag::External,
        "hello.default.svc.cluster.local".into()
    )));
}

#[test]
fn an_unchanged_template_stamps_nothing_and_a_changed_one_stamps_00002() {
    let mut revisions = Vec::new();
    assert_eq!(
        stamp(&service(HELLO), &mut revisions).as_deref(),
        Some("hello-00001")
    );
    // Level-triggered: the same Service again changes nothing.
    assert_eq!(stamp(&service(HELLO), &mut revisions), None);
    // Traffic-only and metadata-only changes to the Service do not touch the template.
    let mut tagged = service(HELLO);
    tagged.spec.traffic[0].tag = "current".into();
    tagged
        .metadata
        .annotations
        .insert("other".into(), "x".into());
    assert_eq!(stamp(&tagged, &mut revisions), None);

    assert_eq!(
        stamp(&hello_with_image("hello:v2"), &mut revisions).as_deref(),
        Some("hello-00002")
    );
    assert_eq!(stamp(&hello_with_image("hello:v2"), &mut revisions), None);
    let rev2 = &revisions[1];
    assert_eq!(rev2.configuration_generation(), Some(2));
    assert_eq!(rev2.spec.containers[0].image, "hello:v2");
    // The first revision is untouched.
    assert_eq!(
        revisions[0].spec.containers[0].image,
        "ghcr.io/knative/helloworld-go:latest"
    );
    // Going back to the first template is a change too: a new revision, as in Knative.
    assert_eq!(
        stamp(&service(HELLO), &mut revisions).as_deref(),
        Some("hello-00003")
    );
    // Template labels and annotations count as the template.
    let mut labelled = service(HELLO);
    labelled
        .spec
        .template
        .metadata
        .labels
        .insert("tier".into(), "gold".into());
    assert_eq!(
        stamp(&labelled, &mut revisions).as_deref(),
        Some("hello-00004")
    );
    assert_eq!(revisions[3].metadata.labels["tier"], "gold");
    assert_eq!(stamp(&labelled, &mut revisions), None);
}

#[test]
fn revision_names_follow_the_configuration_generation() {
    let (mut config, _) = service_to_children(&service(HELLO));
    config.metadata.generation = Some(5);
    let rev = configuration_revision(&config, &[]).unwrap();
    assert_eq!(rev.metadata.name, "hello-00005");
    assert_eq!(rev.configuration_generation(), Some(5));
    // A stale generation never reuses a number.
    let (mut changed, _) = service_to_children(&hello_with_image("hello:v2"));
    changed.metadata.generation = Some(5);
    let next = configuration_revision(&changed, &[rev]).unwrap();
    assert_eq!(next.metadata.name, "hello-00006");
}

#[test]
fn revisions_of_other_configurations_and_namespaces_do_not_count() {
    let (config, _) = service_to_children(&service(HELLO));
    let mut foreign = configuration_revision(&config, &[]).unwrap();
    foreign.metadata.namespace = "other".into();
    let mut unrelated = configuration_revision(&config, &[]).unwrap();
    unrelated.metadata.name = "bye-00001".into();
    unrelated
        .metadata
        .labels
        .insert(CONFIGURATION_LABEL.into(), "bye".into());
    let rev = configuration_revision(&config, &[foreign, unrelated]).unwrap();
    assert_eq!(rev.metadata.name, "hello-00001");
}

const BLUE_GREEN: &str = r#"
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: hello
  namespace: demo
spec:
  template:
    metadata:
      name: hello-green
    spec:
      containers:
        - image: hello:green
  traffic:
    - revisionName: hello-blue
      percent: 90
    - revisionName: hello-green
      percent: 10
      tag: green
    - latestRevision: true
      percent: 0
      tag: latest
"#;

/// The blue revision (stamped from the first template) and the green one, as the store holds
/// them after two applies.
fn blue_green() -> (Service, Vec<Revision>) {
    let mut blue = service(BLUE_GREEN);
    blue.spec.template.metadata.name = "hello-blue".into();
    blue.spec.template.spec.containers[0].image = "hello:blue".into();
    blue.spec.traffic.clear();
    let mut revisions = Vec::new();
    assert_eq!(stamp(&blue, &mut revisions).as_deref(), Some("hello-blue"));
    let green = service(BLUE_GREEN);
    assert_eq!(
        stamp(&green, &mut revisions).as_deref(),
        Some("hello-green")
    );
    (green, revisions)
}

#[test]
fn user_named_revisions_are_honoured() {
    let (green, revisions) = blue_green();
    let [blue_rev, green_rev] = revisions.as_slice() else {
        panic!()
    };
    assert_eq!(blue_rev.configuration_generation(), Some(1));
    assert_eq!(green_rev.configuration_generation(), Some(2));
    assert_eq!(green_rev.metadata.namespace, "demo");
    assert_eq!(green_rev.spec.containers[0].image, "hello:green");
    // Applying the same Service again stamps nothing; nor does a name that is taken.
    let (config, _) = service_to_children(&green);
    assert_eq!(configuration_revision(&config, &revisions), None);
    let mut reused = green;
    reused.spec.template.metadata.name = "hello-blue".into();
    let (config, _) = service_to_children(&reused);
    assert_eq!(configuration_revision(&config, &revisions), None);
}

#[test]
fn blue_green_split_with_tags() {
    let (green, revisions) = blue_green();
    let (config, route) = service_to_children(&green);
    let ingress = route_to_ingress(&route, &revisions, &[config], DOMAIN).unwrap();
    let ingress = checked(&ingress);
    assert_eq!(
        describe(&ingress),
        "\
ClusterLocal hello.demo hello.demo.svc hello.demo.svc.cluster.local
  [Knative-Serving-Tag=green] -> demo/hello-green:80 100% set []
  [Knative-Serving-Tag=latest] -> demo/hello-green:80 100% set []
  [] -> demo/hello-blue:80 90%, demo/hello-green:80 10% set [Knative-Serving-Default-Route=true]
ExternalIP hello.demo.example.com
  [Knative-Serving-Tag=green] -> demo/hello-green:80 100% set []
  [Knative-Serving-Tag=latest] -> demo/hello-green:80 100% set []
  [] -> demo/hello-blue:80 90%, demo/hello-green:80 10% set [Knative-Serving-Default-Route=true]
ClusterLocal green-hello.demo green-hello.demo.svc green-hello.demo.svc.cluster.local
  [] -> demo/hello-green:80 100% set [Knative-Serving-Tag=green]
ExternalIP green-hello.demo.example.com
  [] -> demo/hello-green:80 100% set [Knative-Serving-Tag=green]
ClusterLocal latest-hello.demo latest-hello.demo.svc latest-hello.demo.svc.cluster.local
  [] -> demo/hello-green:80 100% set [Knative-Serving-Tag=latest]
ExternalIP latest-hello.demo.example.com
  [] -> demo/hello-green:80 100% set [Knative-Serving-Tag=latest]
"
    );
    let claims = claims(&ingress);
    for host in [
        "hello.demo.example.com",
        "green-hello.demo.example.com",
        "latest-hello.demo.example.com",
    ] {
        assert!(
            claims.contains(&(GatewayTag::External, host.into())),
            "{host}"
        );
    }
    assert_eq!(
        translate_ingress(&ingress).backends.len(),
        2,
        "one cluster per revision"
    );
}

#[test]
fn blue_green_status_lists_resolved_traffic_and_tag_urls() {
    let (green, revisions) = blue_green();
    let out = reconcile_service(
        &green,
        &revisions,
        &ready(&["hello-blue", "hello-green"]),
        true,
        DOMAIN,
    );
    assert_eq!(out.new_revision, None);
    let status = &out.status;
    assert_eq!(status.latest_created_revision_name, "hello-green");
    assert_eq!(status.latest_ready_revision_name, "hello-green");
    assert_eq!(status.url, "http://hello.demo.example.com");
    assert_eq!(
        status.address.as_ref().unwrap().url,
        "http://hello.demo.svc.cluster.local"
    );
    type Row<'a> = (&'a str, &'a str, Option<bool>, Option<i64>, &'a str);
    let traffic: Vec<Row<'_>> = status
        .traffic
        .iter()
        .map(|t| {
            (
                t.tag.as_str(),
                t.revision_name.as_str(),
                t.latest_revision,
                t.percent,
                t.url.as_str(),
            )
        })
        .collect();
    assert_eq!(
        traffic,
        [
            ("", "hello-blue", Some(false), Some(90), ""),
            (
                "green",
                "hello-green",
                Some(false),
                Some(10),
                "http://green-hello.demo.example.com"
            ),
            (
                "latest",
                "hello-green",
                Some(true),
                Some(0),
                "http://latest-hello.demo.example.com"
            ),
        ]
    );
    assert!(status
        .traffic
        .iter()
        .all(|t| t.configuration_name.is_empty()));
    assert_eq!(
        condition_status(&status.conditions, CONDITION_READY),
        ConditionStatus::True
    );
}

#[test]
fn cluster_local_label_keeps_every_host_internal() {
    let text = HELLO.replace(
        "  labels: {team: web}",
        "  labels: {networking.knative.dev/visibility: cluster-local}",
    );
    let svc = service(&text);
    let (config, mut route) = service_to_children(&svc);
    assert!(route.is_cluster_local());
    route.spec.traffic[0].tag = "current".into();
    let rev = configuration_revision(&config, &[]).unwrap();
    let ingress = checked(&route_to_ingress(&route, &[rev], &[config], DOMAIN).unwrap());
    assert!(ingress
        .spec
        .rules
        .iter()
        .all(|r| r.visibility == Visibility::ClusterLocal));
    assert_eq!(
        ingress.spec.rules.len(),
        2,
        "default and tag, internal only"
    );
    assert!(claims(&ingress)
        .iter()
        .all(|(gateway, host)| *gateway == GatewayTag::Internal && !host.ends_with(DOMAIN)));
    assert_eq!(
        route_url(&route, DOMAIN),
        "http://hello.default.svc.cluster.local"
    );
    assert_eq!(
        tag_url(&route, "current", DOMAIN),
        "http://current-hello.default.svc.cluster.local"
    );
}

#[test]
fn route_urls() {
    let (_, route) = service_to_children(&service(HELLO));
    assert_eq!(
        route_url(&route, DOMAIN),
        "http://hello.default.example.com"
    );
    assert_eq!(
        route_url(&route, "local.dev"),
        "http://hello.default.local.dev"
    );
}

#[test]
fn an_unknown_revision_is_named() {
    let r = route(
        r#"
apiVersion: serving.knative.dev/v1
kind: Route
metadata: {name: web}
spec:
  traffic:
    - configurationName: hello
      percent: 50
    - revisionName: hello-00009
      percent: 50
"#,
    );
    let (config, _) = service_to_children(&service(HELLO));
    let rev = configuration_revision(&config, &[]).unwrap();
    let err = route_to_ingress(
        &r,
        std::slice::from_ref(&rev),
        std::slice::from_ref(&config),
        DOMAIN,
    )
    .unwrap_err();
    assert_eq!(
        err,
        RouteError::RevisionMissing {
            field: "spec.traffic[1].revisionName".into(),
            revision: "hello-00009".into(),
        }
    );
    assert_eq!(
        err.to_string(),
        "spec.traffic[1].revisionName: Revision \"hello-00009\" referenced in traffic not found."
    );
    assert_eq!(err.reason(), "RevisionMissing");

    let err = route_to_ingress(&r, &[rev], &[], DOMAIN).unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.traffic[0].configurationName: Configuration \"hello\" referenced in traffic not found."
    );
    assert_eq!(err.reason(), "ConfigurationMissing");

    let err = route_to_ingress(&r, &[], &[config], DOMAIN).unwrap_err();
    assert!(matches!(err, RouteError::NoRevisionYet { .. }), "{err}");

    // The Route's status says the same.
    let status = route_status(&r, &[], &[], &no_ready(), true, DOMAIN);
    let assigned = &status.conditions[0];
    assert_eq!(assigned.type_, CONDITION_ALL_TRAFFIC_ASSIGNED);
    assert_eq!(assigned.status, ConditionStatus::False);
    assert_eq!(assigned.reason, "ConfigurationMissing");
    assert_eq!(
        condition_status(&status.conditions, CONDITION_READY),
        ConditionStatus::False
    );
    assert!(status.traffic.is_empty());
}

#[test]
fn latest_revision_goes_to_the_latest_ready_one_when_known() {
    let mut revisions = Vec::new();
    stamp(&service(HELLO), &mut revisions);
    stamp(&hello_with_image("hello:v2"), &mut revisions);
    let (mut config, route) = service_to_children(&hello_with_image("hello:v2"));
    let split_to = |config: &Configuration| {
        let ingress =
            route_to_ingress(&route, &revisions, std::slice::from_ref(config), DOMAIN).unwrap();
        ingress.spec.rules[0].http.as_ref().unwrap().paths[0].splits[0]
            .service_name
            .clone()
    };
    // No status: the latest created.
    assert_eq!(split_to(&config), "hello-00002");
    // Only the first is ready: it keeps the traffic.
    config.status = Some(configuration_status(
        &config,
        &revisions,
        &ready(&["hello-00001"]),
    ));
    assert_eq!(split_to(&config), "hello-00001");
    // Both ready: the traffic moves.
    config.status = Some(configuration_status(
        &config,
        &revisions,
        &ready(&["hello-00001", "hello-00002"]),
    ));
    assert_eq!(split_to(&config), "hello-00002");
    // A status naming a revision that is gone.
    config.status.as_mut().unwrap().latest_ready_revision_name = "hello-00007".into();
    assert_eq!(
        route_to_ingress(&route, &revisions, &[config], DOMAIN).unwrap_err(),
        RouteError::RevisionMissing {
            field: "spec.traffic[0].configurationName".into(),
            revision: "hello-00007".into()
        }
    );
}

#[test]
fn targets_on_one_revision_are_merged_and_zero_percent_gets_no_split() {
    let r = route(
        r#"
apiVersion: serving.knative.dev/v1
kind: Route
metadata: {name: web}
spec:
  traffic:
    - {revisionName: hello-00001, percent: 30}
    - {revisionName: hello-00001, percent: 70}
    - {revisionName: hello-00002, percent: 0, tag: next}
"#,
    );
    let mut revisions = Vec::new();
    stamp(&service(HELLO), &mut revisions);
    stamp(&hello_with_image("hello:v2"), &mut revisions);
    let ingress = checked(&route_to_ingress(&r, &revisions, &[], DOMAIN).unwrap());
    let text = describe(&ingress);
    assert!(
        text.contains(
            "  [] -> default/hello-00001:80 100% set [Knative-Serving-Default-Route=true]"
        ),
        "{text}"
    );
    assert!(
        text.contains("  [] -> default/hello-00002:80 100% set [Knative-Serving-Tag=next]"),
        "{text}"
    );
    // No Service label on a bare Route, so none on its ingress.
    assert!(!ingress.metadata.labels.contains_key(SERVICE_LABEL));
}

#[test]
fn an_h2c_revision_is_reached_on_port_81() {
    let text = HELLO.replace(
        "          env:",
        "          ports: [{name: h2c, containerPort: 8080}]\n          env:",
    );
    let svc = service(&text);
    let (config, route) = service_to_children(&svc);
    let rev = configuration_revision(&config, &[]).unwrap();
    let ingress = checked(&route_to_ingress(&route, &[rev], &[config], DOMAIN).unwrap());
    let split = &ingress.spec.rules[0].http.as_ref().unwrap().paths[0].splits[0];
    assert_eq!(split.service_port, IntOrString::Int(REVISION_H2C_PORT));
}

#[test]
fn the_route_can_pick_another_ingress_class() {
    let (config, mut route) = service_to_children(&service(HELLO));
    route.metadata.annotations.insert(
        INGRESS_CLASS_ANNOTATION.into(),
        "kourier.ingress.networking.knative.dev".into(),
    );
    let rev = configuration_revision(&config, &[]).unwrap();
    let ingress = route_to_ingress(&route, &[rev], &[config], DOMAIN).unwrap();
    assert_eq!(
        ingress.class(),
        Some("kourier.ingress.networking.knative.dev")
    );
}

fn conditions(status: &ServiceStatus) -> Vec<(String, ConditionStatus, String)> {
    status
        .conditions
        .iter()
        .map(|c| (c.type_.clone(), c.status, c.reason.clone()))
        .collect()
}

fn cond(type_: &str, status: ConditionStatus, reason: &str) -> (String, ConditionStatus, String) {
    (type_.to_owned(), status, reason.to_owned())
}

#[test]
fn reconciling_a_service_converges_and_rolls_out() {
    use ConditionStatus::{True, Unknown};
    let v1 = service(HELLO);
    let mut revisions: Vec<Revision> = Vec::new();

    // First pass: a revision to create; the ingress already routes to it.
    let out = reconcile_service(&v1, &revisions, &no_ready(), false, DOMAIN);
    let rev = out.new_revision.clone().expect("hello-00001");
    assert_eq!(rev.metadata.name, "hello-00001");
    assert!(out.ingress.is_ok());
    assert_eq!(out.status.latest_created_revision_name, "hello-00001");
    assert_eq!(out.status.latest_ready_revision_name, "");
    assert_eq!(out.status.url, "http://hello.default.example.com");
    assert_eq!(
        conditions(&out.status),
        [
            cond(CONDITION_CONFIGURATIONS_READY, Unknown, ""),
            cond(CONDITION_READY, Unknown, ""),
            cond(CONDITION_ROUTES_READY, Unknown, "RevisionNotReady"),
        ]
    );
    revisions.push(rev);

    // The revision is stored and becomes ready; the gateway serves the ingress.
    let out = reconcile_service(&v1, &revisions, &ready(&["hello-00001"]), true, DOMAIN);
    assert_eq!(out.new_revision, None);
    assert_eq!(
        conditions(&out.status),
        [
            cond(CONDITION_CONFIGURATIONS_READY, True, ""),
            cond(CONDITION_READY, True, ""),
            cond(CONDITION_ROUTES_READY, True, ""),
        ]
    );
    assert_eq!(
        out.status.traffic,
        [TrafficTarget {
            revision_name: "hello-00001".into(),
            latest_revision: Some(true),
            percent: Some(100),
            ..Default::default()
        }]
    );
    assert_eq!(
        out.configuration
            .status
            .as_ref()
            .unwrap()
            .latest_ready_revision_name,
        "hello-00001"
    );
    assert_eq!(
        out.route.status.as_ref().unwrap().traffic,
        out.status.traffic
    );
    // Same inputs, same outputs.
    assert_eq!(
        reconcile_service(&v1, &revisions, &ready(&["hello-00001"]), true, DOMAIN),
        out
    );

    // A new template: hello-00002 is stamped; traffic stays on 00001 until 00002 is ready.
    let v2 = hello_with_image("hello:v2");
    let out = reconcile_service(&v2, &revisions, &ready(&["hello-00001"]), true, DOMAIN);
    let rev2 = out.new_revision.clone().expect("hello-00002");
    assert_eq!(rev2.metadata.name, "hello-00002");
    assert_eq!(out.status.latest_created_revision_name, "hello-00002");
    assert_eq!(out.status.latest_ready_revision_name, "hello-00001");
    assert_eq!(out.status.traffic[0].revision_name, "hello-00001");
    assert_eq!(
        conditions(&out.status),
        [
            cond(CONDITION_CONFIGURATIONS_READY, Unknown, ""),
            cond(CONDITION_READY, Unknown, ""),
            cond(CONDITION_ROUTES_READY, True, ""),
        ]
    );
    revisions.push(rev2);

    let both = ready(&["hello-00001", "hello-00002"]);
    let out = reconcile_service(&v2, &revisions, &both, true, DOMAIN);
    assert_eq!(out.new_revision, None);
    assert_eq!(out.status.traffic[0].revision_name, "hello-00002");
    let ingress = out.ingress.unwrap();
    assert_eq!(
        ingress.spec.rules[1].http.as_ref().unwrap().paths[0].splits[0].service_name,
        "hello-00002"
    );
    assert_eq!(
        condition_status(&out.status.conditions, CONDITION_READY),
        True
    );
}

#[test]
fn a_failed_revision_fails_the_service() {
    let svc = service(HELLO);
    let mut revisions = Vec::new();
    stamp(&svc, &mut revisions);
    revisions[0].status = Some(knarr_model::serving::RevisionStatus {
        conditions: vec![Condition::new(
            CONDITION_READY,
            ConditionStatus::False,
            "ExitCode1",
            "the app exited with status 1",
        )],
        ..Default::default()
    });
    let out = reconcile_service(&svc, &revisions, &no_ready(), true, DOMAIN);
    let ready_cond = out
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_READY)
        .unwrap();
    assert_eq!(ready_cond.status, ConditionStatus::False);
    assert_eq!(ready_cond.reason, "RevisionFailed");
    assert_eq!(
        ready_cond.message,
        "Revision \"hello-00001\" failed with message: the app exited with status 1."
    );
}

#[test]
fn routes_ready_waits_for_traffic_to_reach_the_latest_ready_revision() {
    let config = ConfigurationStatus {
        latest_created_revision_name: "hello-00002".into(),
        latest_ready_revision_name: "hello-00002".into(),
        conditions: vec![Condition::new(
            CONDITION_READY,
            ConditionStatus::True,
            "",
            "",
        )],
        ..Default::default()
    };
    let route = RouteStatus {
        conditions: vec![Condition::new(
            CONDITION_READY,
            ConditionStatus::True,
            "",
            "",
        )],
        traffic: vec![TrafficTarget {
            revision_name: "hello-00001".into(),
            latest_revision: Some(true),
            percent: Some(100),
            ..Default::default()
        }],
        ..Default::default()
    };
    let status = service_status(&service(HELLO), &config, &route);
    assert_eq!(
        conditions(&status),
        [
            cond(CONDITION_CONFIGURATIONS_READY, ConditionStatus::True, ""),
            cond(CONDITION_READY, ConditionStatus::Unknown, "OutOfDate"),
            cond(
                CONDITION_ROUTES_READY,
                ConditionStatus::Unknown,
                "OutOfDate"
            ),
        ]
    );
}

#[test]
fn statuses_serialize_with_knative_field_names() {
    let svc = service(HELLO);
    let mut revisions = Vec::new();
    stamp(&svc, &mut revisions);
    let out = reconcile_service(&svc, &revisions, &ready(&["hello-00001"]), true, DOMAIN);
    let mut with_status = svc.clone();
    with_status.status = Some(out.status);
    let manifest = ServingObject::Service(with_status.clone()).manifest();
    let status = &manifest["status"];
    assert_eq!(status["latestCreatedRevisionName"], "hello-00001");
    assert_eq!(status["latestReadyRevisionName"], "hello-00001");
    assert_eq!(status["url"], "http://hello.default.example.com");
    assert_eq!(status["traffic"][0]["latestRevision"], true);
    assert_eq!(status["conditions"][1]["type"], "Ready");
    assert_eq!(status["conditions"][1]["status"], "True");
    // And it parses back.
    let text = serde_json::to_string(&manifest).unwrap();
    assert_eq!(service(&text), with_status);
}
