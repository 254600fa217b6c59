//! KubeApi: a real kube-apiserver on etcd. The binaries come from `scripts/kube-bin.sh`
//! (built on first use, which takes long; `KNARR_KUBE_BIN` points at prebuilt ones).

use std::time::{Duration, Instant};

use knarr_test_support::{kube_binaries, poll_until, trace_init, KubeApi};

#[tokio::test]
async fn service_account_tokens_are_held_to_rbac() {
    trace_init();
    let started = Instant::now();
    let api = KubeApi::start().await.unwrap();
    eprintln!("KubeApi::start took {:?}", started.elapsed());
    assert!(api.url().starts_with("https://127.0.0.1:"), "{}", api.url());

    let ready = api.get("/readyz").await.unwrap();
    assert_eq!((ready.status, ready.body.as_str()), (200, "ok"));
    let unknown = api
        .get_as("/api/v1/namespaces", "not-a-token")
        .await
        .unwrap();
    assert_eq!(unknown.status, 401, "{}", unknown.body);

    let out = api
        .kubectl(&["create", "namespace", "knarr-test"])
        .await
        .unwrap();
    assert_eq!(out.trim(), "namespace/knarr-test created");
    let phase = api
        .kubectl(&[
            "get",
            "namespace",
            "knarr-test",
            "-o",
            "jsonpath={.status.phase}",
        ])
        .await
        .unwrap();
    assert_eq!(phase, "Active");
    let err = api
        .kubectl(&["get", "namespace", "missing"])
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("NotFound"), "{err:#}");

    // A ServiceAccount with no RoleBinding may not read Secrets; the admin may.
    let token = api
        .token_for_service_account("knarr-test", "reader")
        .await
        .unwrap();
    let secrets = "/api/v1/namespaces/knarr-test/secrets";
    let denied = api.get_as(secrets, &token).await.unwrap();
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert!(
        denied
            .body
            .contains("system:serviceaccount:knarr-test:reader"),
        "{}",
        denied.body
    );
    assert_eq!(api.get(secrets).await.unwrap().status, 200);

    // Granted by RBAC, it may (once the authorizer's cache has the binding).
    api.apply_yaml(
        "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: secret-reader, namespace: knarr-test}
rules: [{apiGroups: [''], resources: [secrets], verbs: [get, list]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader, namespace: knarr-test}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: secret-reader}
subjects: [{kind: ServiceAccount, name: reader, namespace: knarr-test}]
",
    )
    .await
    .unwrap();
    poll_until(
        "the RoleBinding to apply",
        Duration::from_secs(10),
        || async {
            api.get_as(secrets, &token)
                .await
                .is_ok_and(|r| r.status == 200)
        },
    )
    .await
    .unwrap();

    // The same token through a kubeconfig of its own, with plain kubectl: still only Secrets.
    let kubeconfig = api.dir().join("reader.kubeconfig");
    api.write_kubeconfig(&kubeconfig, &token).unwrap();
    let kubectl = |args: &[&str]| {
        std::process::Command::new(kube_binaries().unwrap().join("kubectl"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--cache-dir={}",
                api.dir().join("reader-cache").display()
            ))
            .args(args)
            .output()
            .unwrap()
    };
    let allowed = kubectl(&["get", "secrets", "-n", "knarr-test"]);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    let forbidden = kubectl(&["get", "configmaps", "-n", "knarr-test"]);
    assert!(!forbidden.status.success());
    assert!(
        String::from_utf8_lossy(&forbidden.stderr).contains("forbidden"),
        "{}",
        String::from_utf8_lossy(&forbidden.stderr)
    );
}

#[tokio::test]
async fn objects_survive_an_apiserver_restart_but_not_an_etcd_wipe() {
    trace_init();
    let mut api = KubeApi::start().await.unwrap();
    let url = api.url();
    let out = api
        .apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: kept, namespace: default}\ndata: {k: v}\n")
        .await
        .unwrap();
    assert_eq!(out.trim(), "configmap/kept serverside-applied");
    let get = [
        "get",
        "configmap",
        "kept",
        "-n",
        "default",
        "-o",
        "jsonpath={.data.k}",
    ];

    let started = Instant::now();
    api.restart_apiserver().await.unwrap();
    eprintln!("restart_apiserver took {:?}", started.elapsed());
    assert_eq!(api.url(), url);
    assert_eq!(api.kubectl(&get).await.unwrap(), "v");

    let started = Instant::now();
    api.wipe_etcd().await.unwrap();
    eprintln!("wipe_etcd took {:?}", started.elapsed());
    assert_eq!(api.url(), url);
    let err = api.kubectl(&get).await.unwrap_err();
    assert!(format!("{err:#}").contains("NotFound"), "{err:#}");
    // The API server recreates its bootstrap objects.
    poll_until(
        "namespace default to be back",
        Duration::from_secs(30),
        || async {
            api.kubectl(&["get", "namespace", "default", "-o", "name"])
                .await
                .is_ok_and(|out| out.trim() == "namespace/default")
        },
    )
    .await
    .unwrap();
}
