//! The local runtime with real processes: `knarr-echo` as the user's app, the built
//! `knarr-queue-proxy` in front of it. Every wait is on the runtime's change signal or a probe,
//! bounded by [`WAIT`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use knarr_model::serving::{Container, EnvVar, RevisionSpec};
use knarr_runtime::{LocalConfig, LocalRuntime, Phase, PodStatus, RevisionRef, Runtime};
use knarr_tests::{http_get, poll_until, queue_proxy_binary, HttpClient};

const WAIT: Duration = Duration::from_secs(30);
const ECHO: &str = env!("CARGO_BIN_EXE_knarr-echo");

fn runtime(log_dir: &Path) -> Arc<LocalRuntime> {
    knarr_tests::trace_init();
    LocalRuntime::new(LocalConfig {
        queue_proxy_bin: queue_proxy_binary().unwrap(),
        log_dir: log_dir.to_path_buf(),
        bind: [127, 0, 0, 1].into(),
        drain_quiet_period: Duration::from_millis(200),
    })
}

fn revision(name: &str, container: Container) -> RevisionRef {
    RevisionRef {
        namespace: "default".into(),
        name: name.into(),
        configuration: "hello".into(),
        service: Some("hello".into()),
        spec: RevisionSpec {
            containers: vec![container],
            ..Default::default()
        },
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// `knarr-echo` answering `hello` on `$PORT`, started the Kubernetes way (`$(PORT)` in args).
fn echo() -> Container {
    Container {
        command: strings(&[ECHO]),
        args: strings(&["--listen", "127.0.0.1:$(PORT)", "--name", "hello"]),
        ..Default::default()
    }
}

/// `knarr-echo` behind a shell that first starts a background `sleep` (in the app's process
/// group, so it must die with the pod) and appends its pid to `pids`.
fn echo_with_a_child(pids: &Path) -> Container {
    Container {
        command: strings(&[
            "sh",
            "-c",
            r#"sleep 1000 & echo $! >> "$PIDS"; exec "$ECHO" --listen "127.0.0.1:$PORT" --name hello"#,
        ]),
        env: vec![
            EnvVar {
                name: "PIDS".into(),
                value: Some(pids.display().to_string()),
                value_from: None,
            },
            EnvVar {
                name: "ECHO".into(),
                value: Some(ECHO.into()),
                value_from: None,
            },
        ],
        ..Default::default()
    }
}

/// The revision's pods once `done` holds for them; waits on the runtime's change signal.
async fn wait_for(
    rt: &LocalRuntime,
    key: &str,
    what: &str,
    done: impl Fn(&[PodStatus]) -> bool,
) -> Vec<PodStatus> {
    let mut changes = rt.subscribe();
    let waited = tokio::time::timeout(WAIT, async {
        loop {
            let pods = rt.pods(key);
            if done(&pods) {
                return pods;
            }
            changes.changed().await.unwrap();
        }
    })
    .await;
    waited.unwrap_or_else(|_| panic!("timed out waiting for {what}: {:#?}", rt.pods(key)))
}

fn all_ready(n: usize) -> impl Fn(&[PodStatus]) -> bool {
    move |pods| pods.len() == n && pods.iter().all(|p| p.phase == Phase::Ready)
}

/// Whether `pid` is a live process (a zombie, awaiting a reaper that may never come in a
/// container, counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        !matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X') | None)
    })
}

fn pids(pods: &[PodStatus]) -> Vec<u32> {
    pods.iter()
        .flat_map(|p| {
            let local = p.local.clone().unwrap_or_default();
            [local.app_pid, local.queue_proxy_pid]
        })
        .map(|pid| pid.expect("a ready pod has both processes"))
        .collect()
}

async fn wait_gone(pids: &[u32]) {
    poll_until("the processes to be gone", WAIT, || async {
        pids.iter().all(|pid| !alive(*pid))
    })
    .await
    .unwrap_or_else(|e| {
        let left: Vec<_> = pids.iter().filter(|p| alive(**p)).collect();
        panic!("{e}: still alive: {left:?}")
    });
}

#[tokio::test]
async fn scale_up_then_down_drains_one_pod_while_the_other_serves() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let rev = revision("hello-00001", echo());
    let key = rev.key();

    rt.scale(&rev, 2).unwrap();
    let pods = wait_for(&rt, &key, "two ready pods", all_ready(2)).await;
    assert_ne!(pods[0].address, pods[1].address);
    for pod in &pods {
        // Through the queue-proxy: it strips Knative's routing headers before the app.
        let reply = HttpClient::new(pod.address)
            .get_with(
                "hello.default.example.com",
                "/",
                &[("Knative-Serving-Revision", "hello-00001")],
            )
            .await
            .unwrap();
        assert_eq!((reply.status, reply.body.as_str()), (200, "hello"));
        assert_eq!(reply.header("x-echo-knative-serving-revision"), None);
        assert_eq!((pod.restarts, &pod.last_error), (0, &None));
    }

    // The newest pod goes; it is Terminating as soon as scale returns.
    rt.scale(&rev, 1).unwrap();
    let now = rt.pods(&key);
    let (kept, leaving) = (&pods[0], &pods[1]);
    assert_eq!(
        now.iter().map(|p| (&p.name, p.phase)).collect::<Vec<_>>(),
        [
            (&kept.name, Phase::Ready),
            (&leaving.name, Phase::Terminating)
        ]
    );
    let reply = http_get(kept.address, "hello.default.example.com", "/")
        .await
        .unwrap();
    assert_eq!(reply.status, 200);

    let left = wait_for(&rt, &key, "the stopped pod to go", |pods| pods.len() == 1).await;
    assert_eq!(left[0].name, kept.name);
    assert_eq!(left[0].phase, Phase::Ready);
    wait_gone(&pids(std::slice::from_ref(leaving))).await;
    let reply = http_get(kept.address, "hello.default.example.com", "/")
        .await
        .unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "hello"));

    // The stopped pod's log: both processes, and the runtime's notes on the drain.
    assert_eq!(
        leaving.local.as_ref().unwrap().log_path,
        dir.path()
            .join("default/hello-00001")
            .join(format!("{}.log", leaving.name))
    );
    let log = std::fs::read_to_string(&leaving.local.as_ref().unwrap().log_path).unwrap();
    for needle in [
        "[app] knarr-echo hello listening on 127.0.0.1:",
        "[queue] ",
        "[knarr] terminating: SIGTERM to the queue-proxy",
        "[knarr] pod stopped",
    ] {
        assert!(log.contains(needle), "{needle:?} not in the log:\n{log}");
    }

    rt.shutdown().await;
    assert!(rt.pods(&key).is_empty());
}

#[tokio::test]
async fn a_crashing_command_restarts_with_back_off_and_reports_why() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let rev = revision(
        "crash-00001",
        Container {
            command: strings(&["sh", "-c", "echo boom >&2; exit 3"]),
            ..Default::default()
        },
    );
    let key = rev.key();
    let started = Instant::now();
    rt.scale(&rev, 1).unwrap();
    let pods = wait_for(&rt, &key, "three restarts", |pods| {
        pods.first().is_some_and(|p| p.restarts >= 3)
    })
    .await;
    // Three back-offs came first: 100 + 200 + 400 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
    let pod = &pods[0];
    assert_ne!(pod.phase, Phase::Ready);
    let error = pod.last_error.as_deref().unwrap();
    assert!(
        error.starts_with("app exited unexpectedly (exit status: 3)") && error.ends_with("boom"),
        "{error}"
    );
    let log = std::fs::read_to_string(&pod.local.as_ref().unwrap().log_path).unwrap();
    assert!(log.contains("[app] boom"), "{log}");

    rt.scale(&rev, 0).unwrap();
    wait_for(&rt, &key, "no pods", <[_]>::is_empty).await;
}

#[tokio::test]
async fn an_image_alone_cannot_run_locally() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path());
    let rev = revision(
        "image-00001",
        Container {
            image: "gcr.io/knative-samples/helloworld-go".into(),
            ..Default::default()
        },
    );
    let err = rt.scale(&rev, 1).unwrap_err().to_string();
    assert!(
        err.contains("spec.containers[0].command: local mode runs commands; set command"),
        "{err}"
    );
    assert!(rt.pods(&rev.key()).is_empty());
    // Scaling it to zero asks nothing of it.
    rt.scale(&rev, 0).unwrap();
}

#[tokio::test]
async fn shutdown_drains_every_pod_and_leaves_no_process() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("sleep.pids");
    let rt = runtime(dir.path());
    let rev = revision("hello-00002", echo_with_a_child(&pid_file));
    let key = rev.key();
    rt.scale(&rev, 2).unwrap();
    let pods = wait_for(&rt, &key, "two ready pods", all_ready(2)).await;
    let mut pids = pids(&pods);
    let sleeps: Vec<u32> = std::fs::read_to_string(&pid_file)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(sleeps.len(), 2);
    pids.extend(sleeps);
    assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");

    tokio::time::timeout(WAIT, rt.shutdown())
        .await
        .expect("shutdown finishes");
    assert!(rt.pods(&key).is_empty());
    wait_gone(&pids).await;
    let err = rt.scale(&rev, 1).unwrap_err().to_string();
    assert_eq!(err, "the runtime is shutting down");
}

#[tokio::test]
async fn dropping_the_runtime_kills_every_process() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("sleep.pids");
    let rt = runtime(dir.path());
    let rev = revision("hello-00003", echo_with_a_child(&pid_file));
    rt.scale(&rev, 1).unwrap();
    let pods = wait_for(&rt, &rev.key(), "a ready pod", all_ready(1)).await;
    let mut pids = pids(&pods);
    pids.push(
        std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap(),
    );
    drop(rt);
    wait_gone(&pids).await;
}
