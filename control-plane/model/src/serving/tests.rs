use super::*;

const HELLO: &str = r#"
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: hello
spec:
  template:
    spec:
      containers:
        - image: ghcr.io/knative/helloworld-go:latest
          ports:
            - containerPort: 8080
          env:
            - name: TARGET
              value: "World"
"#;

fn parse(text: &str) -> Vec<ServingDocument> {
    parse_serving_documents("f.yaml", text)
}

fn one(text: &str) -> ServingObject {
    match parse(text).as_slice() {
        [ServingDocument::Object { object, .. }] => object.clone(),
        other => panic!("{other:#?}"),
    }
}

fn service(text: &str) -> Service {
    match one(text) {
        ServingObject::Service(s) => s,
        other => panic!("{other:?}"),
    }
}

/// `(line, field, reason)` of every error.
fn errors(text: &str) -> Vec<(usize, String, String)> {
    parse(text)
        .into_iter()
        .map(|d| match d {
            ServingDocument::Error(e) => {
                (e.line.unwrap_or(0), e.field.unwrap_or_default(), e.reason)
            }
            other => panic!("expected an error, got {other:#?}"),
        })
        .collect()
}

/// The hello service with `edit` applied to its text.
fn hello_with(find: &str, replace: &str) -> String {
    assert!(HELLO.contains(find), "{find}");
    HELLO.replacen(find, replace, 1)
}

#[test]
fn hello_service_parses_with_knative_defaults() {
    let docs = parse(HELLO);
    let [ServingDocument::Object { object, line: 2 }] = docs.as_slice() else {
        panic!("{docs:#?}")
    };
    assert_eq!(
        object.key(),
        ServingKey::new(ServingKind::Service, "default", "hello")
    );
    assert_eq!(object.key().to_string(), "Service default/hello");
    let ServingObject::Service(svc) = object else {
        panic!()
    };
    let spec = &svc.spec.template.spec;
    assert_eq!(spec.timeout_seconds, Some(300));
    assert_eq!(spec.container_concurrency, Some(0));
    let container = spec.container().unwrap();
    assert_eq!(container.name, DEFAULT_CONTAINER_NAME);
    assert_eq!(container.image, "ghcr.io/knative/helloworld-go:latest");
    assert_eq!(container.user_port(), 8080);
    assert_eq!(
        container.env,
        vec![EnvVar {
            name: "TARGET".into(),
            value: Some("World".into()),
            value_from: None,
        }]
    );
    // Omitted traffic: everything to the latest revision.
    assert_eq!(
        svc.spec.traffic,
        vec![TrafficTarget {
            latest_revision: Some(true),
            percent: Some(100),
            ..Default::default()
        }]
    );
    assert!(!svc.is_cluster_local());
    assert!(!spec.is_h2c());
}

#[test]
fn real_manifest_with_status_and_unknown_fields_parses() {
    let text = r#"
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: blue-green
  namespace: demo
  uid: 1234
  generation: 3
  labels:
    networking.knative.dev/visibility: cluster-local
  annotations:
    serving.knative.dev/creator: alice
spec:
  template:
    metadata:
      name: blue-green-v2
      annotations:
        autoscaling.knative.dev/min-scale: "1"
    spec:
      containerConcurrency: 10
      timeoutSeconds: 60
      responseStartTimeoutSeconds: 30
      idleTimeoutSeconds: 20
      serviceAccountName: runner
      enableServiceLinks: false
      someFutureField: {x: 1}
      containers:
        - name: app
          image: example/app
          command: [/bin/app]
          args: ["--port", "9000"]
          workingDir: /srv
          imagePullPolicy: IfNotPresent
          ports:
            - name: h2c
              containerPort: 9000
              protocol: TCP
          readinessProbe:
            httpGet: {path: /healthz}
            periodSeconds: 0
          resources:
            limits: {cpu: "1"}
          env:
            - name: SECRET
              valueFrom:
                secretKeyRef: {name: s, key: k}
  traffic:
    - revisionName: blue-green-v1
      percent: 90
    - latestRevision: true
      percent: 10
      tag: green
status:
  observedGeneration: 3
  url: http://blue-green.demo.svc.cluster.local
  latestReadyRevisionName: blue-green-v2
  conditions:
    - type: Ready
      status: "True"
      lastTransitionTime: "2024-01-01T00:00:00Z"
  somethingNew: true
"#;
    let svc = service(text);
    assert_eq!(svc.metadata.namespace, "demo");
    assert_eq!(svc.metadata.generation, Some(3));
    assert!(svc.is_cluster_local());
    let t = &svc.spec.template;
    assert_eq!(t.metadata.name, "blue-green-v2");
    assert_eq!(t.metadata.annotations[MIN_SCALE_ANNOTATION], "1");
    assert_eq!(t.spec.container_concurrency(), 10);
    assert_eq!(t.spec.timeout_seconds(), 60);
    assert_eq!(t.spec.response_start_timeout_seconds, Some(30));
    assert_eq!(t.spec.idle_timeout_seconds, Some(20));
    assert_eq!(t.spec.service_account_name, "runner");
    assert!(t.spec.other.contains_key("someFutureField"));
    assert!(t.spec.is_h2c());
    assert_eq!(t.spec.user_port(), 9000);
    let c = t.spec.container().unwrap();
    assert_eq!(c.command, ["/bin/app"]);
    assert_eq!(c.args, ["--port", "9000"]);
    assert_eq!(c.working_dir, "/srv");
    assert_eq!(c.other["imagePullPolicy"], "IfNotPresent");
    assert_eq!(
        c.readiness_probe.as_ref().unwrap()["httpGet"]["path"],
        "/healthz"
    );
    assert!(c.env[0].value_from.is_some());
    assert_eq!(svc.spec.traffic[0].latest_revision, Some(false));
    assert!(!svc.spec.traffic[0].follows_latest());
    assert!(svc.spec.traffic[1].follows_latest());
    assert_eq!(svc.spec.traffic[1].tag, "green");
    let status = svc.status.unwrap();
    assert_eq!(status.latest_ready_revision_name, "blue-green-v2");
    assert_eq!(
        condition_status(&status.conditions, CONDITION_READY),
        ConditionStatus::True
    );
    assert_eq!(
        condition_status(&status.conditions, CONDITION_ROUTES_READY),
        ConditionStatus::Unknown
    );
}

#[test]
fn configuration_revision_and_route_parse() {
    let text = r#"
apiVersion: serving.knative.dev/v1
kind: Configuration
metadata: {name: hello}
spec:
  template:
    spec:
      containers: [{command: [./hello]}]
---
apiVersion: serving.knative.dev/v1
kind: Revision
metadata:
  name: hello-00001
  labels:
    serving.knative.dev/configuration: hello
    serving.knative.dev/configurationGeneration: "1"
spec:
  containers: [{image: hello}]
---
apiVersion: serving.knative.dev/v1
kind: Route
metadata: {name: hello, namespace: web}
spec:
  traffic:
    - configurationName: hello
      percent: 100
"#;
    let docs = parse(text);
    let lines: Vec<usize> = docs
        .iter()
        .map(|d| match d {
            ServingDocument::Object { line, .. } => *line,
            other => panic!("{other:#?}"),
        })
        .collect();
    assert_eq!(lines, [2, 10, 20]);
    let [ServingDocument::Object {
        object: ServingObject::Configuration(config),
        ..
    }, ServingDocument::Object {
        object: ServingObject::Revision(rev),
        ..
    }, ServingDocument::Object {
        object: ServingObject::Route(route),
        ..
    }] = docs.as_slice()
    else {
        panic!("{docs:#?}")
    };
    assert_eq!(config.spec.template.spec.containers[0].command, ["./hello"]);
    assert_eq!(config.spec.template.spec.timeout_seconds, Some(300));
    assert_eq!(rev.configuration(), Some("hello"));
    assert_eq!(rev.configuration_generation(), Some(1));
    assert_eq!(rev.spec.timeout_seconds, Some(300));
    assert_eq!(route.metadata.namespace, "web");
    // A configurationName target floats to the latest revision.
    assert_eq!(route.spec.traffic[0].latest_revision, Some(true));
}

#[test]
fn other_kinds_go_through_parse_documents_with_file_lines() {
    let text = r#"# a comment
apiVersion: v1
kind: Service
metadata: {name: core}
spec:
  ports: [{port: 80}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: hello}
spec:
  template:
    spec:
      containers: [{image: x}]
---
apiVersion: networking.internal.knative.dev/v1alpha1
kind: Ingress
metadata: {name: bad}
spec:
  rules:
  - hosts: [a.example.com]
    http:
      paths:
      - splits:
        - serviceName: s
          servicePort: 0
---
key: [unclosed
"#;
    let docs = parse(text);
    assert_eq!(docs.len(), 5, "{docs:#?}");
    match &docs[0] {
        ServingDocument::Other(Document::Object { object, line: 2 }) => {
            assert_eq!(object.key().to_string(), "Service default/core")
        }
        other => panic!("{other:#?}"),
    }
    assert!(matches!(
        &docs[1],
        ServingDocument::Other(Document::Foreign { line: 8, kind, .. }) if kind == "Deployment"
    ));
    assert!(matches!(
        &docs[2],
        ServingDocument::Object {
            line: 12,
            object: ServingObject::Service(_)
        }
    ));
    match &docs[3] {
        ServingDocument::Other(Document::Error(e)) => {
            assert_eq!(e.line, Some(30), "{e}");
            assert_eq!(
                e.field.as_deref(),
                Some("spec.rules[0].http.paths[0].splits[0].servicePort")
            );
        }
        other => panic!("{other:#?}"),
    }
    match &docs[4] {
        ServingDocument::Other(Document::Error(e)) => {
            assert!(e.reason.starts_with("not valid YAML"), "{e}");
            assert!(e.line.unwrap() >= 31, "{e}");
        }
        other => panic!("{other:#?}"),
    }
}

#[test]
fn kubectl_list_items_are_parsed_one_by_one() {
    let text = r#"
apiVersion: v1
kind: List
items:
  - apiVersion: serving.knative.dev/v1
    kind: Route
    metadata: {name: r}
    spec:
      traffic: [{revisionName: r-00001, percent: 100}]
  - apiVersion: v1
    kind: Endpoints
    metadata: {name: e}
  - apiVersion: serving.knative.dev/v1
    kind: Route
    metadata: {name: bad}
    spec:
      traffic: [{revisionName: bad-00001, percent: 50}]
"#;
    let docs = parse(text);
    assert!(matches!(
        &docs[0],
        ServingDocument::Object {
            line: 2,
            object: ServingObject::Route(_)
        }
    ));
    assert!(matches!(
        &docs[1],
        ServingDocument::Other(Document::Object { line: 2, .. })
    ));
    match &docs[2] {
        ServingDocument::Error(e) => {
            assert_eq!(
                e.to_string(),
                "f.yaml:2: Route default/bad: spec.traffic: Traffic targets sum to 50, want 100"
            );
        }
        other => panic!("{other:#?}"),
    }
}

#[test]
fn manifest_round_trips() {
    let svc = service(HELLO);
    let manifest = ServingObject::Service(svc.clone()).manifest();
    assert_eq!(manifest["apiVersion"], API_VERSION);
    assert_eq!(manifest["kind"], "Service");
    assert_eq!(manifest["spec"]["traffic"][0]["latestRevision"], true);
    assert_eq!(
        manifest["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"],
        8080
    );
    let text = serde_yaml::to_string(&manifest).unwrap();
    assert_eq!(service(&text), svc, "{text}");
}

// ---- bad manifests: every error names its field, at its line --------------------------------

#[test]
fn container_port_out_of_range() {
    let text = hello_with("containerPort: 8080", "containerPort: 0");
    assert_eq!(
        errors(&text),
        [(
            12,
            "spec.template.spec.containers[0].ports[0].containerPort".into(),
            "expected 1 <= 0 <= 65535".into()
        )]
    );
    let text = hello_with("containerPort: 8080", "containerPort: 70000");
    assert_eq!(errors(&text)[0].2, "expected 1 <= 70000 <= 65535");
    let text = hello_with("containerPort: 8080", "containerPort: 8012");
    assert_eq!(
        errors(&text)[0].2,
        "8012 is a reserved port, please use a different value"
    );
}

#[test]
fn a_type_error_names_its_field_and_line() {
    let text = hello_with("containerPort: 8080", "containerPort: eighty");
    let [(line, field, reason)] = errors(&text).try_into().unwrap();
    assert_eq!(line, 12);
    assert_eq!(
        field,
        "spec.template.spec.containers[0].ports[0].containerPort"
    );
    assert!(reason.contains("invalid type"), "{reason}");
}

#[test]
fn display_says_file_line_object_field_reason() {
    let text = hello_with("containerPort: 8080", "containerPort: 0");
    let docs = parse(&text);
    let [ServingDocument::Error(e)] = docs.as_slice() else {
        panic!("{docs:#?}")
    };
    assert_eq!(
        e.to_string(),
        "f.yaml:12: Service default/hello: spec.template.spec.containers[0].ports[0].containerPort: \
         expected 1 <= 0 <= 65535"
    );
}

#[test]
fn more_than_one_port_or_container() {
    let text = hello_with(
        "            - containerPort: 8080\n",
        "            - containerPort: 8080\n            - containerPort: 8081\n",
    );
    assert_eq!(
        errors(&text),
        [(
            11,
            "spec.template.spec.containers[0].ports".into(),
            "more than one container port is set: only a single port is allowed".into()
        )]
    );
    let text = hello_with(
        "      containers:\n",
        "      containers:\n        - image: sidecar\n          name: side\n",
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].0, 9);
    assert_eq!(errs[0].1, "spec.template.spec.containers");
    assert!(errs[0]
        .2
        .starts_with("found 2 containers, want exactly one"));
    let text = hello_with(
        "      containers:\n        - image: ghcr.io/knative/helloworld-go:latest\n          ports:\n            - containerPort: 8080\n          env:\n            - name: TARGET\n              value: \"World\"\n",
        "      containers: []\n",
    );
    assert_eq!(
        errors(&text),
        [(
            9,
            "spec.template.spec.containers".into(),
            "missing field(s)".into()
        )]
    );
}

#[test]
fn port_name_and_protocol() {
    let text = hello_with(
        "- containerPort: 8080",
        "- containerPort: 8080\n              name: grpc\n              protocol: UDP",
    );
    assert_eq!(
        errors(&text),
        [
            (
                14,
                "spec.template.spec.containers[0].ports[0].protocol".into(),
                "invalid value \"UDP\": only TCP is supported".into()
            ),
            (
                13,
                "spec.template.spec.containers[0].ports[0].name".into(),
                "Port name grpc is not allowed: name must be empty, or one of: 'h2c', 'http1'"
                    .into()
            ),
        ]
    );
}

#[test]
fn timeout_seconds_bounds() {
    for (value, reason) in [
        ("601", "expected 0 < 601 <= 600"),
        ("0", "expected 0 < 0 <= 600"),
        ("-5", "expected 0 < -5 <= 600"),
    ] {
        let text = hello_with(
            "      containers:",
            &format!("      timeoutSeconds: {value}\n      containers:"),
        );
        assert_eq!(
            errors(&text),
            [(9, "spec.template.spec.timeoutSeconds".into(), reason.into())]
        );
    }
    let text = hello_with(
        "      containers:",
        "      timeoutSeconds: 600\n      responseStartTimeoutSeconds: 601\n      containers:",
    );
    assert_eq!(
        errors(&text),
        [(
            10,
            "spec.template.spec.responseStartTimeoutSeconds".into(),
            "expected 0 <= 601 <= 600 (timeoutSeconds)".into()
        )]
    );
    let text = hello_with(
        "      containers:",
        "      timeoutSeconds: 30\n      idleTimeoutSeconds: 31\n      containers:",
    );
    assert_eq!(
        errors(&text)[0].1,
        "spec.template.spec.idleTimeoutSeconds".to_owned()
    );
}

#[test]
fn container_concurrency_bounds() {
    for value in ["-1", "1001"] {
        let text = hello_with(
            "      containers:",
            &format!("      containerConcurrency: {value}\n      containers:"),
        );
        assert_eq!(
            errors(&text),
            [(
                9,
                "spec.template.spec.containerConcurrency".into(),
                format!("expected 0 <= {value} <= 1000")
            )]
        );
    }
}

#[test]
fn forbidden_pod_spec_fields_are_each_named() {
    let text = hello_with(
        "      containers:",
        "      nodeName: node-1\n      hostNetwork: true\n      initContainers:\n        - image: init\n      containers:",
    );
    let errs = errors(&text);
    let fields: Vec<(usize, &str)> = errs.iter().map(|(l, f, _)| (*l, f.as_str())).collect();
    // Sorted by field name (the order of the map they are collected in).
    assert_eq!(
        fields,
        [
            (10, "spec.template.spec.hostNetwork"),
            (11, "spec.template.spec.initContainers"),
            (9, "spec.template.spec.nodeName"),
        ]
    );
    assert!(errs
        .iter()
        .all(|(_, _, r)| r.starts_with("must not set the field(s)")));

    let text = hello_with(
        "          ports:",
        "          tty: true\n          lifecycle: {preStop: {exec: {command: [x]}}}\n          ports:",
    );
    let fields: Vec<String> = errors(&text).into_iter().map(|(_, f, _)| f).collect();
    assert_eq!(
        fields,
        [
            "spec.template.spec.containers[0].lifecycle",
            "spec.template.spec.containers[0].tty"
        ]
    );
}

#[test]
fn env_rules() {
    let text = hello_with("name: TARGET", "name: PORT");
    assert_eq!(
        errors(&text),
        [(
            14,
            "spec.template.spec.containers[0].env[0].name".into(),
            "\"PORT\" is a reserved environment variable".into()
        )]
    );
    let text = hello_with(
        "              value: \"World\"",
        "              value: \"World\"\n            - name: 1BAD",
    );
    assert_eq!(
        errors(&text)[0].1,
        "spec.template.spec.containers[0].env[1].name".to_owned()
    );
    assert_eq!(errors(&text)[0].0, 16);
}

#[test]
fn a_container_needs_an_image_or_a_command() {
    let text = hello_with(
        "        - image: ghcr.io/knative/helloworld-go:latest\n          ports:",
        "        - ports:",
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].1, "spec.template.spec.containers[0].image");
    // Knarr's local runtime runs a command; that is enough here.
    let text = hello_with(
        "        - image: ghcr.io/knative/helloworld-go:latest",
        "        - command: [./hello]",
    );
    service(&text);
}

#[test]
fn template_name_must_start_with_the_service_name() {
    let text = hello_with(
        "  template:\n",
        "  template:\n    metadata:\n      name: world-v1\n",
    );
    assert_eq!(
        errors(&text),
        [(
            9,
            "spec.template.metadata.name".into(),
            "\"world-v1\" must have prefix \"hello-\"".into()
        )]
    );
    let text = hello_with(
        "  template:\n",
        "  template:\n    metadata:\n      name: hello-v1\n",
    );
    assert_eq!(service(&text).spec.template.metadata.name, "hello-v1");
    let text = hello_with(
        "  template:\n",
        "  template:\n    metadata:\n      name: hello_V1\n",
    );
    assert!(errors(&text)[0].2.contains("not a DNS-1035 label"));
}

#[test]
fn object_names() {
    let text = hello_with("  name: hello", "  namespace: x");
    assert_eq!(
        errors(&text),
        [(2, "metadata.name".into(), "is required".into())]
    );
    let text = hello_with("  name: hello", "  name: Hello");
    assert_eq!(errors(&text)[0].0, 5);
    assert_eq!(errors(&text)[0].1, "metadata.name");
}

#[test]
fn visibility_label_value() {
    let text = hello_with(
        "  name: hello\n",
        "  name: hello\n  labels:\n    networking.knative.dev/visibility: internal\n",
    );
    assert_eq!(
        errors(&text),
        [(
            7,
            "metadata.labels[networking.knative.dev/visibility]".into(),
            "invalid value \"internal\": the only value is \"cluster-local\"".into()
        )]
    );
}

#[test]
fn scale_annotations() {
    let text = hello_with(
        "  template:\n",
        "  template:\n    metadata:\n      annotations:\n        autoscaling.knative.dev/min-scale: \"3\"\n        autoscaling.knative.dev/max-scale: \"2\"\n        autoscaling.knative.dev/initial-scale: many\n",
    );
    assert_eq!(
        errors(&text),
        [
            (
                12,
                "spec.template.metadata.annotations[autoscaling.knative.dev/initial-scale]".into(),
                "invalid value \"many\": expected a whole number >= 0".into()
            ),
            (
                11,
                "spec.template.metadata.annotations[autoscaling.knative.dev/max-scale]".into(),
                "max-scale=2 is less than min-scale=3".into()
            ),
        ]
    );
}

const TRAFFIC_SERVICE: &str = r#"
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: hello
spec:
  template:
    spec:
      containers:
        - image: hello
  traffic:
"#;

fn with_traffic(traffic: &str) -> String {
    format!("{TRAFFIC_SERVICE}{traffic}")
}

#[test]
fn traffic_percents_sum_to_100() {
    let text = with_traffic(
        "    - revisionName: hello-00001\n      percent: 90\n    - latestRevision: true\n      percent: 20\n",
    );
    assert_eq!(
        errors(&text),
        [(
            11,
            "spec.traffic".into(),
            "Traffic targets sum to 110, want 100".into()
        )]
    );
    // An unset percent counts as 0.
    let text = with_traffic("    - latestRevision: true\n");
    assert_eq!(errors(&text)[0].2, "Traffic targets sum to 0, want 100");
    let text = with_traffic("    - latestRevision: true\n      percent: 101\n");
    assert_eq!(errors(&text)[0].1, "spec.traffic[0].percent");
    assert_eq!(errors(&text)[0].0, 13);
}

#[test]
fn latest_revision_with_revision_name_is_an_error() {
    let text = with_traffic(
        "    - revisionName: hello-00001\n      latestRevision: true\n      percent: 100\n",
    );
    assert_eq!(
        errors(&text),
        [(
            13,
            "spec.traffic[0].latestRevision".into(),
            "may not set revisionName \"hello-00001\" when latestRevision is true".into()
        )]
    );
    let text = with_traffic("    - latestRevision: false\n      percent: 100\n");
    assert_eq!(
        errors(&text)[0].2,
        "may not set revisionName \"\" when latestRevision is false"
    );
}

#[test]
fn a_service_target_may_not_name_a_configuration() {
    let text = with_traffic("    - configurationName: hello\n      percent: 100\n");
    let errs = errors(&text);
    assert_eq!(errs[0].0, 12);
    assert_eq!(errs[0].1, "spec.traffic[0].configurationName");
    assert!(errs[0].2.starts_with("must not set the field(s)"));
}

#[test]
fn tags_are_unique_and_dns_safe() {
    let text = with_traffic(
        "    - latestRevision: true\n      percent: 100\n      tag: a\n    - revisionName: hello-00001\n      percent: 0\n      tag: a\n    - revisionName: hello-00002\n      percent: 0\n      tag: Not_OK\n",
    );
    let errs = errors(&text);
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert_eq!(
        errs[0],
        (
            17,
            "spec.traffic[1].tag".into(),
            "Multiple definitions for \"a\" (also spec.traffic[0].tag)".into()
        )
    );
    assert_eq!(errs[1].0, 20);
    assert_eq!(errs[1].1, "spec.traffic[2].tag");
    assert!(errs[1].2.contains("not a DNS-1123 label"));
    let long = "t".repeat(58);
    let text = with_traffic(&format!(
        "    - latestRevision: true\n      percent: 100\n      tag: {long}\n"
    ));
    assert!(errors(&text)[0].2.contains("longer than 63 characters"));
}

#[test]
fn route_targets_name_exactly_one_of_revision_or_configuration() {
    let route = |traffic: &str| {
        format!(
            "apiVersion: serving.knative.dev/v1\nkind: Route\nmetadata:\n  name: r\nspec:\n  traffic:\n{traffic}"
        )
    };
    let text = route("    - percent: 100\n");
    assert_eq!(
        errors(&text),
        [(
            7,
            "spec.traffic[0]".into(),
            "expected exactly one, got neither: revisionName, configurationName".into()
        )]
    );
    let text = route("    - percent: 100\n      revisionName: r-1\n      configurationName: r\n");
    assert_eq!(
        errors(&text)[0].2,
        "expected exactly one, got both: revisionName, configurationName"
    );
    let text =
        route("    - percent: 100\n      configurationName: r\n      latestRevision: false\n");
    assert_eq!(errors(&text)[0].1, "spec.traffic[0].latestRevision");
    // No traffic at all: sums to 0.
    let text = "apiVersion: serving.knative.dev/v1\nkind: Route\nmetadata:\n  name: r\n";
    assert_eq!(
        errors(text),
        [(
            1,
            "spec.traffic".into(),
            "Traffic targets sum to 0, want 100".into()
        )]
    );
}

#[test]
fn probes_need_one_handler() {
    let text = hello_with(
        "          ports:",
        "          readinessProbe:\n            httpGet: {path: /}\n            tcpSocket: {}\n          ports:",
    );
    assert_eq!(
        errors(&text),
        [(
            11,
            "spec.template.spec.containers[0].readinessProbe".into(),
            "expected exactly one, got both: httpGet, tcpSocket".into()
        )]
    );
}

#[test]
fn a_revision_spec_is_validated_at_its_own_paths() {
    let text = r#"
apiVersion: serving.knative.dev/v1
kind: Revision
metadata:
  name: r-1
  annotations:
    autoscaling.knative.dev/min-scale: "-1"
spec:
  hostPID: true
  containers:
    - image: x
      ports: [{containerPort: 0}]
"#;
    let fields: Vec<String> = errors(text).into_iter().map(|(_, f, _)| f).collect();
    assert_eq!(
        fields,
        [
            "metadata.annotations[autoscaling.knative.dev/min-scale]",
            "spec.hostPID",
            "spec.containers[0].ports[0].containerPort",
        ]
    );
}

#[test]
fn updates_keep_user_named_templates_immutable() {
    let named = hello_with(
        "  template:\n",
        "  template:\n    metadata:\n      name: hello-v1\n",
    );
    let old = service(&named);
    let mut new = old.clone();
    new.spec.template.spec.containers[0].image = "hello:v2".into();
    let errs = new.validate_update(&old);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].field, "spec.template.metadata.name");
    // Renaming with the change is fine, as is a traffic-only change.
    let mut renamed = new.clone();
    renamed.spec.template.metadata.name = "hello-v2".into();
    assert!(renamed.validate_update(&old).is_empty());
    let mut traffic_only = old.clone();
    traffic_only.spec.traffic[0].tag = "current".into();
    assert!(traffic_only.validate_update(&old).is_empty());
    // Unnamed templates change freely.
    let plain = service(HELLO);
    let mut changed = plain.clone();
    changed.spec.template.spec.containers[0].image = "hello:v2".into();
    assert!(changed.validate_update(&plain).is_empty());
}

#[test]
fn field_lines_follow_keys_and_indices() {
    let doc = "spec:\n  containers:\n  - name: a\n    ports:\n    - containerPort: 1\n  - name: b\n    ports:\n    - containerPort: 2\n    - containerPort: 3\n";
    assert_eq!(
        field_line(doc, "spec.containers[1].ports[1].containerPort"),
        Some(9)
    );
    assert_eq!(
        field_line(doc, "spec.containers[0].ports[0].containerPort"),
        Some(5)
    );
    assert_eq!(field_line(doc, "spec.containers[1].name"), Some(6));
    // Missing parts: the deepest line found.
    assert_eq!(field_line(doc, "spec.containers[1].env[0].name"), Some(6));
    assert_eq!(field_line(doc, "spec.containers[5]"), Some(2));
    assert_eq!(field_line(doc, "status"), None);
    assert_eq!(
        steps("metadata.labels[a.b/c]"),
        [
            Step::Key("metadata".into()),
            Step::Key("labels".into()),
            Step::Key("a.b/c".into())
        ]
    );
}
