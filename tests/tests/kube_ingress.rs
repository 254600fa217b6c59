//! Knarr as Knative's networking layer on a real API server: KIngresses, Services and
//! Endpoints written through kube-apiserver, served by the real Envoy, status written back.

use knarr_tests::kube_fixture::{exposed_yaml, ready_status, Backend, KubeWorld, Replica};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kingress_from_the_api_server_is_served_and_its_status_written_back() {
    let world = KubeWorld::start().await.unwrap();
    let replica = Replica::start(&world, "replica-a").await.unwrap();
    let hello = Backend::start("hello").await.unwrap();
    world
        .apply(&exposed_yaml(
            "hello",
            hello.addr(),
            "hello.default.example.com",
        ))
        .await
        .unwrap();

    let body = replica.wait_200("hello.default.example.com").await.unwrap();
    assert!(body.contains("hello"), "{body}");
    let object = world.wait_ready_status("hello", "True").await.unwrap();
    let status = &object["status"];
    assert_eq!(status["observedGeneration"], 1);
    for c in ["NetworkConfigured", "LoadBalancerReady", "Ready"] {
        let found = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["type"] == c)
            .unwrap_or_else(|| panic!("no {c} condition: {status}"));
        assert_eq!(found["status"], "True", "{status}");
        assert!(found["lastTransitionTime"].is_string(), "{status}");
    }
    assert_eq!(
        status["publicLoadBalancer"]["ingress"][0]["domainInternal"],
        "knarr-external.knarr-system.svc.cluster.local"
    );
    assert_eq!(
        status["privateLoadBalancer"]["ingress"][0]["domainInternal"],
        "knarr-internal.knarr-system.svc.cluster.local"
    );
    assert!(replica.leading(), "the only replica leads");

    // An update: the new host is served and observedGeneration follows.
    world
        .apply(&exposed_yaml(
            "hello",
            hello.addr(),
            "hi.default.example.com",
        ))
        .await
        .unwrap();
    replica.wait_200("hi.default.example.com").await.unwrap();
    let object = world.wait_ready_status("hello", "True").await.unwrap();
    assert_eq!(object["status"]["observedGeneration"], 2);
    replica
        .wait_status("hello.default.example.com", 404)
        .await
        .unwrap();

    // An invalid KIngress (the CRD's schema lets the split sum through) gets a failed
    // condition naming the field; the valid one is not disturbed.
    let bad = exposed_yaml("bad", hello.addr(), "bad.default.example.com")
        .replace("percent: 100", "percent: 60");
    world.apply(&bad).await.unwrap();
    let object = world.wait_ready_status("bad", "False").await.unwrap();
    let ready = object["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["reason"], "InvalidObject", "{ready}");
    assert!(
        ready["message"].as_str().unwrap().contains("splits"),
        "{ready}"
    );
    replica.wait_200("hi.default.example.com").await.unwrap();
    let hello_status = world.kingress("hello").await.unwrap().unwrap();
    assert_eq!(ready_status(&hello_status), Some("True"));

    // Delete: 404, and the cluster is gone from Envoy.
    let clusters = replica.envoy.config_dump().await.unwrap().cluster_names();
    assert!(
        clusters.iter().any(|c| c.contains("hello")),
        "the cluster was there before: {clusters:?}"
    );
    world
        .api
        .kubectl(&["delete", "kingress", "hello", "-n", "default"])
        .await
        .unwrap();
    replica
        .wait_status("hi.default.example.com", 404)
        .await
        .unwrap();
    knarr_tests::poll_until(
        "the hello cluster to go",
        knarr_tests::kube_fixture::WAIT,
        || async {
            match replica.envoy.config_dump().await {
                Ok(dump) => !dump.cluster_names().iter().any(|c| c.contains("hello")),
                Err(_) => false,
            }
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_are_accepted_by_the_api_server() {
    let world = KubeWorld::start().await.unwrap();
    let dir = knarr_tests::kube_fixture::deploy_dir();
    let out = world
        .api
        .kubectl(&[
            "apply",
            "--server-side",
            "--dry-run=server",
            "-f",
            dir.to_str().unwrap(),
        ])
        .await
        .unwrap();
    for object in [
        "deployment.apps/knarr-controller",
        "deployment.apps/knarr-gateway",
        "service/knarr-external",
        "service/knarr-internal",
        "clusterrole.rbac.authorization.k8s.io/knarr-controller",
    ] {
        assert!(out.contains(object), "{object} missing from:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_knarr_changes_the_ingress_class_live() {
    let world = KubeWorld::start().await.unwrap();
    let replica = Replica::start(&world, "replica-a").await.unwrap();
    let backend = Backend::start("backend").await.unwrap();
    let kourier = exposed_yaml("old", backend.addr(), "old.default.example.com").replace(
        knarr_model::KNARR_INGRESS_CLASS,
        "kourier.ingress.networking.knative.dev",
    );
    world.apply(&kourier).await.unwrap();
    world
        .apply(&exposed_yaml(
            "new",
            backend.addr(),
            "new.default.example.com",
        ))
        .await
        .unwrap();
    replica.wait_200("new.default.example.com").await.unwrap();
    assert_eq!(
        replica
            .external
            .get("old.default.example.com", "/")
            .await
            .unwrap()
            .status,
        404,
        "Kourier's KIngress is not Knarr's by default"
    );

    // Take Kourier's class only: its KIngress is served and Ready, Knarr's own is dropped.
    world
        .apply(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: config-knarr, namespace: knarr-system}\ndata:\n  ingress-class: kourier.ingress.networking.knative.dev\n  gateway-namespace: gateways\n",
        )
        .await
        .unwrap();
    replica.wait_200("old.default.example.com").await.unwrap();
    replica
        .wait_status("new.default.example.com", 404)
        .await
        .unwrap();
    let object = world.wait_ready_status("old", "True").await.unwrap();
    assert_eq!(
        object["status"]["publicLoadBalancer"]["ingress"][0]["domainInternal"],
        "knarr-external.gateways.svc.cluster.local",
        "the gateway names follow config-knarr"
    );
}
