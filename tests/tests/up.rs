//! `knarr up` end to end, as a user meets it: the real `knarr` binary on a folder of Knative
//! manifests, its real Envoy, the example app as each revision's pods, the `knarr` CLI against
//! its API. Every address is on port 0; every wait polls a status or a request, bounded by
//! [`WAIT`].

use std::path::Path;
use std::time::Duration;

use knarr_tests::poll_until;
use knarr_tests::up::{hello_service, process_alive, processes_mentioning, KnarrUp};

const WAIT: Duration = Duration::from_secs(60);
const HOST: &str = "hello.default.example.com";
/// `config-autoscaler` with Knative's shortest stable window and a short grace period.
const FAST_AUTOSCALER: &str = "stable-window: 6s\nscale-to-zero-grace-period: 1s\n";

/// Waits until every request to `host` answers 200 with `expected` in the body.
async fn wait_answer(up: &KnarrUp, host: &str, expected: &str) {
    let result = poll_until(&format!("{host} answering {expected:?}"), WAIT, || async {
        up.get(host, "/")
            .await
            .is_ok_and(|r| r.status == 200 && r.body.contains(expected))
    })
    .await;
    if let Err(e) = result {
        panic!(
            "{e:#}\nknarr up printed:\n{}\nlog:\n{}",
            up.output(),
            up.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hello_example_is_served_through_envoy() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello");
    let scratch = tempfile::tempdir().unwrap();
    let up = KnarrUp::start_on(&[&example], scratch).await.unwrap();
    up.wait_service("hello", "hello-00001", WAIT).await;
    let reply = up.get(HOST, "/").await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.contains("Hello Knarr!"), "{}", reply.body);
    assert!(reply.body.contains("hello-00001"), "{}", reply.body);
    // What a user sees: the URL and how to reach it.
    let printed = up.output();
    assert!(
        printed.contains("default/hello  http://hello.default.example.com"),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("curl -H 'Host: {HOST}' http://{}/", up.gateway)),
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_change_makes_a_second_revision_and_moves_traffic_to_it() {
    // Short autoscaler windows: the revision nothing routes to any more goes to zero within
    // the test (Knative's defaults take 60 s + 30 s).
    let up = KnarrUp::start_with(
        &[("hello.yaml", &hello_service("hello", "one", "", ""))],
        Some(FAST_AUTOSCALER),
        &[],
    )
    .await
    .unwrap();
    up.wait_service("hello", "hello-00001", WAIT).await;
    wait_answer(&up, HOST, "Hello one! (revision hello-00001)").await;
    let first_pods = up.pod_pids("hello-00001").await.unwrap();
    assert_eq!(first_pods.len(), 2, "app and queue-proxy");

    // A traffic-only change stamps no revision; a template change does.
    up.write("hello.yaml", &hello_service("hello", "two", "", ""))
        .unwrap();
    up.wait_service("hello", "hello-00002", WAIT).await;
    wait_answer(&up, HOST, "Hello two! (revision hello-00002)").await;
    let service = up.service("hello").await.unwrap();
    assert_eq!(
        service["status"]["latestCreatedRevisionName"],
        "hello-00002"
    );
    assert_eq!(
        service["status"]["traffic"][0]["revisionName"],
        "hello-00002"
    );
    assert_eq!(service["status"]["traffic"][0]["percent"], 100);
    let revisions = up.api_json("/api/v1/revisions").await.unwrap();
    let names: Vec<&str> = revisions["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["hello-00001", "hello-00002"]);

    // Nothing routes to the first revision any more: its processes stop.
    poll_until("hello-00001's processes to exit", WAIT, || async {
        first_pods.iter().all(|pid| !process_alive(*pid))
    })
    .await
    .unwrap();
    for _ in 0..20 {
        let reply = up.get(HOST, "/").await.unwrap();
        assert!(reply.body.contains("hello-00002"), "{}", reply.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_with_a_tag_routes_by_percent_and_by_tag_host() {
    let blue = hello_service("rollout", "blue", "", "");
    let up = KnarrUp::start(&[("rollout.yaml", &blue)]).await.unwrap();
    up.wait_service("rollout", "rollout-00001", WAIT).await;

    let green = hello_service(
        "rollout",
        "green",
        "",
        "  traffic:\n  - revisionName: rollout-00001\n    percent: 90\n  \
         - latestRevision: true\n    percent: 10\n    tag: candidate\n",
    );
    let file = up.state.path().join("v2.yaml");
    std::fs::write(&file, green).unwrap();
    let (ok, stdout, stderr) = up
        .knarr(&["apply", "-f", file.to_str().unwrap()])
        .await
        .unwrap();
    assert!(ok, "knarr apply failed: {stdout}{stderr}");
    assert!(
        stdout.contains("service.serving.knative.dev/rollout configured"),
        "{stdout}"
    );
    up.wait_service("rollout", "rollout-00002", WAIT).await;
    poll_until("the split to be served", WAIT, || async {
        let Ok(service) = up.service("rollout").await else {
            return false;
        };
        let traffic = &service["status"]["traffic"];
        traffic[1]["revisionName"] == "rollout-00002"
            && traffic[1]["tag"] == "candidate"
            && service["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
    .await
    .unwrap();

    let (mut blue, mut green) = (0, 0);
    for _ in 0..1000 {
        let reply = up.get("rollout.default.example.com", "/").await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        if reply.body.contains("Hello blue! (revision rollout-00001)") {
            blue += 1;
        } else if reply.body.contains("Hello green! (revision rollout-00002)") {
            green += 1;
        } else {
            panic!("unexpected answer {:?}", reply.body);
        }
    }
    // 10 % of 1,000 has a standard deviation of 9.5: ±4 % is over four of them.
    assert!((60..=140).contains(&green), "blue {blue}, green {green}");

    for _ in 0..20 {
        let reply = up
            .get("candidate-rollout.default.example.com", "/")
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
        assert!(reply.body.contains("Hello green!"), "{}", reply.body);
    }
    let url = &up.service("rollout").await.unwrap()["status"]["traffic"][1]["url"];
    assert_eq!(url, "http://candidate-rollout.default.example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_local_service_answers_only_on_the_internal_gateway() {
    let labels = "  labels:\n    networking.knative.dev/visibility: cluster-local\n";
    let up = KnarrUp::start(&[(
        "internal.yaml",
        &hello_service("internal", "inside", labels, ""),
    )])
    .await
    .unwrap();
    up.wait_service("internal", "internal-00001", WAIT).await;
    let service = up.service("internal").await.unwrap();
    assert_eq!(
        service["status"]["url"],
        "http://internal.default.svc.cluster.local"
    );
    for host in [
        "internal.default.svc.cluster.local",
        "internal.default.svc",
        "internal.default",
    ] {
        let reply = up.get_internal(host, "/").await.unwrap();
        assert_eq!(reply.status, 200, "{host}: {}", reply.body);
        assert!(reply.body.contains("Hello inside!"), "{}", reply.body);
        assert_eq!(
            up.get(host, "/").await.unwrap().status,
            404,
            "{host} outside"
        );
    }
    let outside = up.get("internal.default.example.com", "/").await.unwrap();
    assert_eq!(outside.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_manifest_is_rejected_with_its_field_path_and_nothing_running_changes() {
    let good = hello_service("hello", "steady", "", "");
    let up = KnarrUp::start(&[("hello.yaml", &good)]).await.unwrap();
    up.wait_service("hello", "hello-00001", WAIT).await;
    let pods = up.pod_pids("hello").await.unwrap();

    // Through the CLI: refused as a whole, with the file, object and field.
    let bad = good.replace(
        "        env:",
        "        ports: [{containerPort: 8012}]\n        env:",
    );
    let file = up.state.path().join("bad.yaml");
    std::fs::write(&file, &bad).unwrap();
    let (ok, stdout, stderr) = up
        .knarr(&["apply", "-f", file.to_str().unwrap()])
        .await
        .unwrap();
    assert!(!ok, "a reserved port was accepted: {stdout}");
    assert!(
        stderr.contains("Service default/hello")
            && stderr.contains("spec.template.spec.containers[0].ports[0].containerPort"),
        "{stderr}"
    );

    // In the watched folder: reported where knarr up prints, the last good version serves.
    let too_long = good.replace(
        "    spec:\n      containers:",
        "    spec:\n      timeoutSeconds: 601\n      containers:",
    );
    assert_ne!(too_long, good);
    up.write("hello.yaml", &too_long).unwrap();
    poll_until("the error to be printed", WAIT, || async {
        up.output().contains("spec.template.spec.timeoutSeconds")
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", up.output()));
    let errors = up.api_json("/api/v1/errors").await.unwrap();
    assert!(
        errors
            .to_string()
            .contains("spec.template.spec.timeoutSeconds"),
        "{errors}"
    );

    let reply = up.get(HOST, "/").await.unwrap();
    assert_eq!(reply.status, 200);
    assert!(
        reply.body.contains("Hello steady! (revision hello-00001)"),
        "{}",
        reply.body
    );
    let service = up.service("hello").await.unwrap();
    assert_eq!(
        service["status"]["latestCreatedRevisionName"],
        "hello-00001"
    );
    assert_eq!(up.pod_pids("hello").await.unwrap(), pods);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_takes_the_host_away_and_stops_the_processes() {
    let up = KnarrUp::start(&[]).await.unwrap();
    let file = up.state.path().join("hello.yaml");
    std::fs::write(&file, hello_service("hello", "bye", "", "")).unwrap();
    let (ok, stdout, stderr) = up
        .knarr(&["apply", "-f", file.to_str().unwrap()])
        .await
        .unwrap();
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("service.serving.knative.dev/hello created"),
        "{stdout}"
    );
    up.wait_service("hello", "hello-00001", WAIT).await;
    wait_answer(&up, HOST, "Hello bye!").await;
    let pids = up.pod_pids("hello").await.unwrap();
    assert_eq!(pids.len(), 2);

    let (ok, stdout, stderr) = up.knarr(&["delete", "ksvc", "hello"]).await.unwrap();
    assert!(ok, "{stdout}{stderr}");
    poll_until("the host to 404", WAIT, || async {
        up.get(HOST, "/").await.is_ok_and(|r| r.status == 404)
    })
    .await
    .unwrap();
    poll_until("the pods' processes to exit", WAIT, || async {
        pids.iter().all(|pid| !process_alive(*pid))
    })
    .await
    .unwrap();
    let services = up.api_json("/api/v1/services").await.unwrap();
    assert_eq!(services["items"].as_array().map(Vec::len), Some(0));
    let (ok, _, stderr) = up.knarr(&["delete", "ksvc", "hello"]).await.unwrap();
    assert!(!ok);
    assert!(stderr.contains("not found"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_knarr_up_leaves_no_process_behind() {
    let up = KnarrUp::start(&[("hello.yaml", &hello_service("hello", "x", "", ""))])
        .await
        .unwrap();
    up.wait_service("hello", "hello-00001", WAIT).await;
    let pids = up.pod_pids("hello").await.unwrap();
    assert_eq!(pids.len(), 2);
    let state = up.state.path().to_string_lossy().into_owned();
    let envoy = processes_mentioning(&format!("{state}/envoy.yaml"));
    assert_eq!(envoy.len(), 1, "one Envoy on this state dir");

    let (status, printed) = up.stop().await.unwrap();
    assert!(status.success(), "{status}\n{printed}");
    assert!(printed.contains("knarr up: stopped"), "{printed}");
    for pid in pids.iter().chain(&envoy) {
        assert!(!process_alive(*pid), "pid {pid} survived knarr up");
    }
}
