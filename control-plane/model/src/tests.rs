use super::*;

const INGRESS: &str = r#"
apiVersion: networking.internal.knative.dev/v1alpha1
kind: Ingress
metadata:
  name: hello
  namespace: default
  annotations:
    networking.knative.dev/ingress.class: knarr.ingress.networking.knative.dev
  managedFields: [{manager: controller}]
spec:
  httpOption: Redirected
  rules:
  - hosts: [hello.default.example.com]
    visibility: ExternalIP
    http:
      paths:
      - path: /api
        headers:
          x-user: {exact: alice}
        rewriteHost: internal.example
        appendHeaders: {x-route: api}
        splits:
        - serviceName: hello-00001
          servicePort: 80
          percent: 90
          appendHeaders:
            Knative-Serving-Revision: hello-00001
        - serviceName: hello-00002
          serviceNamespace: other
          servicePort: http
          percent: 10
status:
  observedGeneration: 3
"#;

fn objects(text: &str) -> Vec<Document> {
    parse_documents("f.yaml", text)
}

#[test]
fn real_kingress_parses_with_defaults() {
    let docs = objects(INGRESS);
    let [Document::Object {
        object: Object::Ingress(ing),
        line: 2,
    }] = docs.as_slice()
    else {
        panic!("{docs:?}")
    };
    assert_eq!(ing.class(), Some(KNARR_INGRESS_CLASS));
    assert_eq!(ing.spec.http_option, Some(HttpOption::Redirected));
    let path = &ing.spec.rules[0].http.as_ref().unwrap().paths[0];
    assert_eq!(path.headers["x-user"].exact, "alice");
    assert_eq!(path.splits[0].service_namespace, "default");
    assert_eq!(path.splits[1].service_namespace, "other");
    assert_eq!(
        path.splits[1].service_port,
        IntOrString::String("http".into())
    );
}

#[test]
fn multi_document_files_and_lists() {
    let text = format!(
        "{INGRESS}---\n# a comment-only document\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: hello-00001}}\nspec:\n  ports: [{{name: http2, port: 80, targetPort: 8012}}]\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Endpoints\n  metadata: {{name: hello-00001, namespace: default}}\n  subsets: [{{addresses: [{{ip: 10.0.0.1}}], ports: [{{name: http2, port: 8012}}]}}]\n---\napiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {{name: later}}\n"
    );
    let docs = objects(&text);
    let kinds: Vec<String> = docs
        .iter()
        .map(|d| match d {
            Document::Object { object, .. } => object.key().to_string(),
            Document::Foreign { kind, .. } => format!("foreign {kind}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "Ingress default/hello",
            "Service default/hello-00001",
            "Endpoints default/hello-00001",
            "foreign Service"
        ]
    );
}

#[test]
fn broken_yaml_says_file_and_line() {
    let docs = objects("apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n spec: [\n");
    let [Document::Error(e)] = docs.as_slice() else {
        panic!("{docs:?}")
    };
    assert_eq!(e.file, "f.yaml");
    assert!(e.line.is_some());
    assert!(e.to_string().starts_with("f.yaml:"), "{e}");
}

#[test]
fn invalid_fields_are_named() {
    let bad_percent = INGRESS.replace("percent: 10", "percent: 20");
    let docs = objects(&bad_percent);
    let [Document::Error(e)] = docs.as_slice() else {
        panic!("{docs:?}")
    };
    assert_eq!(
        e.object.as_ref().unwrap().to_string(),
        "Ingress default/hello"
    );
    assert_eq!(
        e.field.as_deref(),
        Some("spec.rules[0].http.paths[0].splits")
    );
    assert!(e.reason.contains("110"), "{e}");

    let bad_visibility = INGRESS.replace("visibility: ExternalIP", "visibility: Public");
    let docs = objects(&bad_visibility);
    let [Document::Error(e)] = docs.as_slice() else {
        panic!("{docs:?}")
    };
    let text = e.to_string();
    assert!(
        text.contains("visibility") && text.contains("Public") && e.line == Some(14),
        "{text}"
    );

    let no_hosts = INGRESS.replace("hosts: [hello.default.example.com]", "hosts: []");
    let docs = objects(&no_hosts);
    let [Document::Error(e)] = docs.as_slice() else {
        panic!("{docs:?}")
    };
    assert_eq!(e.field.as_deref(), Some("spec.rules[0].hosts"));

    let bad_ip = "apiVersion: v1\nkind: Endpoints\nmetadata: {name: e}\nsubsets:\n- addresses:\n  - ip: 10.0.0.300\n";
    let docs = objects(bad_ip);
    let [Document::Error(e)] = docs.as_slice() else {
        panic!("{docs:?}")
    };
    assert_eq!(e.field.as_deref(), Some("subsets[0].addresses[0].ip"));
}

#[test]
fn tls_secret_is_decoded() {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let text = format!(
        "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {{name: cert, namespace: knative-serving}}\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
        b64("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n")
    );
    let docs = objects(&text);
    let [Document::Object {
        object: Object::TlsSecret(s, pair),
        ..
    }] = docs.as_slice()
    else {
        panic!("{docs:?}")
    };
    assert_eq!(s.metadata.namespace, "knative-serving");
    assert!(pair
        .cert_chain_pem
        .starts_with("-----BEGIN CERTIFICATE-----"));
    // Not base64:
    let docs = objects(&text.replace("tls.key: ", "tls.key: !!!"));
    let [Document::Error(e)] = docs.as_slice() else {
        panic!("{docs:?}")
    };
    assert_eq!(e.field.as_deref(), Some("data[tls.key]"));
}

#[test]
fn untyped_documents_are_passed_through() {
    let docs = objects("gateways: []\n");
    assert!(matches!(docs.as_slice(), [Document::Untyped { .. }]));
}

#[test]
fn api_objects_parse_and_their_errors_name_the_object_not_a_file() {
    let tree: serde_yaml::Value = serde_yaml::from_str(INGRESS).unwrap();
    let Ok(Some(Object::Ingress(ing))) = parse_api_object(tree) else {
        panic!("the KIngress should parse")
    };
    assert_eq!(ing.metadata.name, "hello");

    let bad: serde_yaml::Value =
        serde_yaml::from_str(&INGRESS.replace("percent: 10", "percent: 20")).unwrap();
    let e = parse_api_object(bad).unwrap_err();
    assert_eq!(e.line, None);
    assert_eq!(
        e.to_string(),
        "Ingress default/hello: spec.rules[0].http.paths[0].splits: percents add up to 110, not 100"
    );

    let wrong_type: serde_yaml::Value = serde_yaml::from_str(
        "apiVersion: v1\nkind: Endpoints\nmetadata: {name: e, namespace: x}\nsubsets: 3\n",
    )
    .unwrap();
    let e = parse_api_object(wrong_type).unwrap_err();
    assert!(e.to_string().starts_with("Endpoints x/e: "), "{e}");

    let foreign: serde_yaml::Value =
        serde_yaml::from_str("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n").unwrap();
    assert_eq!(parse_api_object(foreign), Ok(None));
}
