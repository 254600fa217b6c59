//! Knative's ingress conformance cases, through the real Envoy, over delta ADS (the mode Knarr
//! recommends); a few also run over state-of-the-world.
//!
//! Backends are the project's own servers; objects are the Knative/Kubernetes YAML a Knative
//! controller would produce.

use std::collections::HashMap;

use knarr_model::{Kind, ObjectKey};
use knarr_tests::kfixture::{ingress, service_yaml, simple_rule, KFixture};
use knarr_tests::Upstream;
use knarr_translate::reconcile::Change;

async fn basics(delta: bool) {
    let mut f = KFixture::start(delta).await.unwrap();
    let up = Upstream::start("basics").await.unwrap();
    f.expose("basics", "http", up.addr(), "basics.example.com")
        .await
        .unwrap();
    KFixture::wait_200(&f.external, "basics.example.com", "/")
        .await
        .unwrap();
    let r = f.external.get("basics.example.com", "/").await.unwrap();
    assert_eq!(r.body, "basics");
    assert_eq!(r.header("x-echo-knative-serving-revision"), Some("basics"));
    assert_eq!(
        r.header("x-echo-knative-serving-namespace"),
        Some("default")
    );
    // The gateway tag never reaches the backend.
    assert_eq!(r.header("x-echo-x-knarr-gateway"), None);
    // A port in the host changes nothing; the internal gateway serves external rules too.
    assert_eq!(
        f.external
            .get("basics.example.com:8080", "/")
            .await
            .unwrap()
            .body,
        "basics"
    );
    assert_eq!(
        f.internal
            .get("basics.example.com", "/")
            .await
            .unwrap()
            .body,
        "basics"
    );
    // Unknown hosts: 404.
    assert_eq!(
        f.external
            .get("nope.example.com", "/")
            .await
            .unwrap()
            .status,
        404
    );
}

#[tokio::test]
async fn basics_delta() {
    basics(true).await;
}

#[tokio::test]
async fn basics_sotw() {
    basics(false).await;
}

#[tokio::test]
async fn visibility_cluster_local_is_404_outside() {
    let mut f = KFixture::start(true).await.unwrap();
    let up = Upstream::start("private").await.unwrap();
    f.apply_yaml(&service_yaml("private", "http", up.addr()))
        .await
        .unwrap();
    f.apply_rules(
        "private",
        &simple_rule(
            "private.default.svc.cluster.local",
            "private",
            "ClusterLocal",
        ),
    )
    .await
    .unwrap();
    KFixture::wait_200(&f.internal, "private.default.svc.cluster.local", "/")
        .await
        .unwrap();
    let outside = f
        .external
        .get("private.default.svc.cluster.local", "/")
        .await
        .unwrap();
    assert_eq!(outside.status, 404);
    // A client cannot pick the internal scope by sending the gateway tag itself.
    let spoof = f
        .external
        .get_with(
            "private.default.svc.cluster.local",
            "/",
            &[("x-knarr-gateway", "int")],
        )
        .await
        .unwrap();
    assert_eq!(spoof.status, 404);
}

#[tokio::test]
async fn percentage_split_follows_weights() {
    let mut f = KFixture::start(true).await.unwrap();
    let weights = [1, 2, 4, 8, 16, 32, 37, 0, 0, 0];
    let mut ups = Vec::new();
    let mut splits = String::new();
    for (i, w) in weights.iter().enumerate() {
        let name = format!("pct{i}");
        let up = Upstream::start(&name).await.unwrap();
        f.apply_yaml(&service_yaml(&name, "http", up.addr()))
            .await
            .unwrap();
        splits.push_str(&format!(
            "        - serviceName: {name}\n          servicePort: 80\n          percent: {w}\n"
        ));
        ups.push(up);
    }
    f.apply_yaml(&ingress(
        "pct",
        &format!("  rules:\n  - hosts: [pct.example.com]\n    visibility: ExternalIP\n    http:\n      paths:\n      - splits:\n{splits}"),
    ))
    .await
    .unwrap();
    KFixture::wait_200(&f.external, "pct.example.com", "/")
        .await
        .unwrap();
    let mut seen: HashMap<String, u32> = HashMap::new();
    let total = 1000;
    for _ in 0..total {
        let r = f.external.get("pct.example.com", "/").await.unwrap();
        assert_eq!(r.status, 200);
        *seen.entry(r.body).or_default() += 1;
    }
    for (i, w) in weights.iter().enumerate() {
        let got = f64::from(*seen.get(&format!("pct{i}")).unwrap_or(&0)) * 100.0 / f64::from(total);
        if *w == 0 {
            assert_eq!(got, 0.0, "pct{i} has 0% but got {got}%");
        } else {
            assert!(
                (got - f64::from(*w)).abs() <= 10.0,
                "pct{i}: want {w}%, got {got}%"
            );
        }
    }
}

#[tokio::test]
async fn deleting_an_ingress_removes_its_hosts() {
    let mut f = KFixture::start(true).await.unwrap();
    let up = Upstream::start("gone").await.unwrap();
    f.expose("gone", "http", up.addr(), "gone.example.com")
        .await
        .unwrap();
    KFixture::wait_200(&f.external, "gone.example.com", "/")
        .await
        .unwrap();
    f.apply(vec![Change::Delete(ObjectKey::new(
        Kind::Ingress,
        "default",
        "gone",
    ))])
    .await
    .unwrap();
    assert_eq!(
        f.external
            .get("gone.example.com", "/")
            .await
            .unwrap()
            .status,
        404
    );
    assert!(!f
        .envoy
        .cluster_names()
        .await
        .unwrap()
        .contains(&"default/gone:80".to_string()));
}

/// A path entry with optional path, header match, path headers and splits.
fn path_entry(
    path: Option<&str>,
    headers: &str,
    append: &str,
    splits: &[(&str, u32, &str)],
) -> String {
    let mut s = String::from("      - ");
    let mut first = true;
    let mut field = |text: String| {
        if first {
            s.push_str(&text);
            first = false;
        } else {
            s.push_str(&format!("        {text}"));
        }
        s.push('\n');
    };
    if let Some(p) = path {
        field(format!("path: {p}"));
    }
    if !headers.is_empty() {
        field(format!("headers: {headers}"));
    }
    if !append.is_empty() {
        field(format!("appendHeaders: {append}"));
    }
    field("splits:".to_string());
    for (service, percent, append) in splits {
        s.push_str(&format!(
            "        - serviceName: {service}\n          servicePort: 80\n          percent: {percent}\n"
        ));
        if !append.is_empty() {
            s.push_str(&format!("          appendHeaders: {append}\n"));
        }
    }
    s
}

fn rule(hosts: &str, visibility: &str, paths: &[String]) -> String {
    format!(
        "  - hosts: {hosts}\n    visibility: {visibility}\n    http:\n      paths:\n{}",
        paths.concat()
    )
}

async fn backends(f: &mut KFixture, names: &[&str]) -> Vec<Upstream> {
    let mut ups = Vec::new();
    for name in names {
        let up = Upstream::start(name).await.unwrap();
        f.apply_yaml(&service_yaml(name, "http", up.addr()))
            .await
            .unwrap();
        ups.push(up);
    }
    ups
}

#[tokio::test]
async fn headers_pre_and_post_split_are_set_over_client_values() {
    let mut f = KFixture::start(true).await.unwrap();
    let _ups = backends(&mut f, &["hdr-a", "hdr-b"]).await;
    let paths = [path_entry(
        None,
        "",
        "{x-pre: pre-value}",
        &[
            ("hdr-a", 50, "{x-post: from-a}"),
            ("hdr-b", 50, "{x-post: from-b}"),
        ],
    )];
    f.apply_rules("hdr", &rule("[hdr.example.com]", "ExternalIP", &paths))
        .await
        .unwrap();
    KFixture::wait_200(&f.external, "hdr.example.com", "/")
        .await
        .unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        let r = f
            .external
            .get_with(
                "hdr.example.com",
                "/",
                &[("x-pre", "client"), ("x-post", "client")],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        // Set, not appended: the client's value is gone.
        assert_eq!(r.header("x-echo-x-pre"), Some("pre-value"));
        let post = r.header("x-echo-x-post").unwrap().to_owned();
        assert_eq!(
            post,
            format!("from-{}", &r.body[4..]),
            "split header follows the split"
        );
        seen.insert(r.body);
    }
    assert_eq!(seen.len(), 2, "both splits answered: {seen:?}");
}

#[tokio::test]
async fn probe_requests_get_the_ingress_hash() {
    let mut f = KFixture::start(true).await.unwrap();
    let _ups = backends(&mut f, &["probe"]).await;
    let yaml = ingress(
        "probe",
        &format!(
            "  rules:\n{}",
            simple_rule("probe.example.com", "probe", "ExternalIP")
        ),
    );
    f.apply_yaml(&yaml).await.unwrap();
    let key = ObjectKey::new(Kind::Ingress, "default", "probe");
    let hash = f.index.state(&key).unwrap().hash;
    assert_eq!(hash.len(), 64);
    for client in [&f.external, &f.internal] {
        let r = client
            .get_with(
                "probe.example.com",
                "/healthz",
                &[("K-Network-Probe", "probe"), ("K-Network-Hash", "override")],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("k-network-hash"), Some(hash.as_str()));
    }
    // A new version of the ingress carries a new hash.
    f.apply_yaml(&yaml.replace(
        "Knative-Serving-Namespace: default}",
        "Knative-Serving-Namespace: default, x-v: '2'}",
    ))
    .await
    .unwrap();
    let new_hash = f.index.state(&key).unwrap().hash;
    assert_ne!(new_hash, hash);
    let r = f
        .external
        .get_with(
            "probe.example.com",
            "/",
            &[("K-Network-Probe", "probe"), ("K-Network-Hash", "override")],
        )
        .await
        .unwrap();
    assert_eq!(r.header("k-network-hash"), Some(new_hash.as_str()));
}

#[tokio::test]
async fn multiple_hosts_and_rules() {
    let mut f = KFixture::start(true).await.unwrap();
    let _ups = backends(&mut f, &["rule-a", "rule-b"]).await;
    let body = format!(
        "  rules:\n{}{}",
        rule(
            "[a1.example.com, a2.example.com, a3.example.com]",
            "ExternalIP",
            &[path_entry(None, "", "", &[("rule-a", 100, "")])]
        ),
        rule(
            "[b.example.com]",
            "ExternalIP",
            &[path_entry(None, "", "", &[("rule-b", 100, "")])]
        ),
    );
    f.apply_yaml(&ingress("rules", &body)).await.unwrap();
    for host in ["a1.example.com", "a2.example.com", "a3.example.com"] {
        assert_eq!(
            f.external.get(host, "/").await.unwrap().body,
            "rule-a",
            "{host}"
        );
    }
    assert_eq!(
        f.external.get("b.example.com", "/").await.unwrap().body,
        "rule-b"
    );
}

#[tokio::test]
async fn dispatch_by_path_with_fallback_and_percentage() {
    let mut f = KFixture::start(true).await.unwrap();
    let _ups = backends(&mut f, &["foo", "bar", "baz", "fallback", "foo-canary"]).await;
    let paths = [
        path_entry(
            Some("/foo"),
            "",
            "",
            &[("foo", 80, ""), ("foo-canary", 20, "")],
        ),
        path_entry(Some("/bar"), "", "", &[("bar", 100, "")]),
        path_entry(None, "", "", &[("fallback", 100, "")]),
        path_entry(Some("/baz"), "", "", &[("baz", 100, "")]),
    ];
    f.apply_rules("paths", &rule("[path.example.com]", "ExternalIP", &paths))
        .await
        .unwrap();
    assert_eq!(
        f.external
            .get("path.example.com", "/bar")
            .await
            .unwrap()
            .body,
        "bar"
    );
    assert_eq!(
        f.external
            .get("path.example.com", "/baz/x")
            .await
            .unwrap()
            .body,
        "baz"
    );
    assert_eq!(
        f.external
            .get("path.example.com", "/other")
            .await
            .unwrap()
            .body,
        "fallback"
    );
    assert_eq!(
        f.external.get("path.example.com", "/").await.unwrap().body,
        "fallback"
    );
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..200 {
        let r = f.external.get("path.example.com", "/foo").await.unwrap();
        *seen.entry(r.body).or_default() += 1;
    }
    let canary = f64::from(*seen.get("foo-canary").unwrap_or(&0)) / 2.0;
    assert!(
        seen.keys().all(|k| k == "foo" || k == "foo-canary"),
        "{seen:?}"
    );
    assert!(
        (canary - 20.0).abs() <= 10.0,
        "foo-canary got {canary}% of /foo: {seen:?}"
    );
}

#[tokio::test]
async fn tags_route_by_header() {
    let mut f = KFixture::start(true).await.unwrap();
    let _ups = backends(&mut f, &["tag-main", "tag-blue"]).await;
    let paths = [
        path_entry(
            None,
            "{Knative-Serving-Tag: {exact: blue}}",
            "",
            &[("tag-blue", 100, "")],
        ),
        path_entry(None, "", "", &[("tag-main", 100, "")]),
    ];
    f.apply_rules("tags", &rule("[tags.example.com]", "ExternalIP", &paths))
        .await
        .unwrap();
    assert_eq!(
        f.external.get("tags.example.com", "/").await.unwrap().body,
        "tag-main"
    );
    let tagged = f
        .external
        .get_with("tags.example.com", "/", &[("Knative-Serving-Tag", "blue")])
        .await
        .unwrap();
    assert_eq!(tagged.body, "tag-blue");
}

#[tokio::test]
async fn host_rewrite() {
    let mut f = KFixture::start(true).await.unwrap();
    let _ups = backends(&mut f, &["rewrite"]).await;
    let body = "  rules:\n  - hosts: [rewrite.example.com]\n    visibility: ExternalIP\n    http:\n      paths:\n      - rewriteHost: rewritten.default.svc.cluster.local\n        splits:\n        - serviceName: rewrite\n          servicePort: 80\n          percent: 100\n".to_string();
    f.apply_yaml(&ingress("rewrite", &body)).await.unwrap();
    let r = f.external.get("rewrite.example.com", "/").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-upstream-host"),
        Some("rewritten.default.svc.cluster.local")
    );
}

#[tokio::test]
async fn visibility_split_and_path_variants() {
    let mut f = KFixture::start(true).await.unwrap();
    let _ups = backends(&mut f, &["vis-a", "vis-b", "vis-path"]).await;
    let local_paths = [
        path_entry(Some("/p"), "", "", &[("vis-path", 100, "")]),
        path_entry(None, "", "", &[("vis-a", 50, ""), ("vis-b", 50, "")]),
    ];
    let body = format!(
        "  rules:\n{}{}",
        rule(
            "[vis.default, vis.default.svc, vis.default.svc.cluster.local]",
            "ClusterLocal",
            &local_paths
        ),
        rule(
            "[vis.example.com]",
            "ExternalIP",
            &[path_entry(None, "", "", &[("vis-a", 100, "")])]
        ),
    );
    f.apply_yaml(&ingress("vis", &body)).await.unwrap();
    for host in [
        "vis.default",
        "vis.default.svc",
        "vis.default.svc.cluster.local",
    ] {
        assert_eq!(
            f.external.get(host, "/").await.unwrap().status,
            404,
            "{host} outside"
        );
        assert_eq!(
            f.external.get(host, "/p").await.unwrap().status,
            404,
            "{host}/p outside"
        );
        assert_eq!(f.internal.get(host, "/p").await.unwrap().body, "vis-path");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..30 {
            seen.insert(f.internal.get(host, "/").await.unwrap().body);
        }
        assert_eq!(seen.len(), 2, "{host}: split reached {seen:?}");
    }
    // The external rule is reachable from both sides.
    assert_eq!(
        f.external.get("vis.example.com", "/").await.unwrap().body,
        "vis-a"
    );
    assert_eq!(
        f.internal.get("vis.example.com", "/").await.unwrap().body,
        "vis-a"
    );
}

#[tokio::test]
async fn ingress_class_other_classes_untouched() {
    let mut f = KFixture::start(true).await.unwrap();
    let _ups = backends(&mut f, &["mine", "theirs"]).await;
    let mine = ingress(
        "mine",
        &format!(
            "  rules:\n{}",
            simple_rule("mine.example.com", "mine", "ExternalIP")
        ),
    );
    let theirs = ingress(
        "theirs",
        &format!(
            "  rules:\n{}",
            simple_rule("theirs.example.com", "theirs", "ExternalIP")
        ),
    )
    .replace(
        "knarr.ingress.networking.knative.dev",
        "istio.ingress.networking.knative.dev",
    );
    f.apply_yaml(&format!("{mine}\n---\n{theirs}"))
        .await
        .unwrap();
    assert_eq!(
        f.external
            .get("mine.example.com", "/")
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        f.external
            .get("theirs.example.com", "/")
            .await
            .unwrap()
            .status,
        404
    );
    assert!(f
        .index
        .state(&ObjectKey::new(Kind::Ingress, "default", "theirs"))
        .is_none());
    // Moving an ingress to another class removes it from this gateway.
    f.apply_yaml(&mine.replace("knarr.ingress", "istio.ingress"))
        .await
        .unwrap();
    assert_eq!(
        f.external
            .get("mine.example.com", "/")
            .await
            .unwrap()
            .status,
        404
    );
}
