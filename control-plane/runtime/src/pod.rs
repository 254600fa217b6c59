//! What runs in a pod, as pure functions of the revision: the user's process ([`app_command`])
//! and the queue-proxy's environment ([`queue_proxy_env`], with [`readiness_probe`]).
//!
//! Both follow what Knative's revision reconciler puts in a pod (`makeServingContainer`,
//! `makeQueueContainer`), with the ports picked per pod instead of Knative's fixed ones, since
//! every local pod shares the machine's loopback.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use knarr_model::serving::Container;
use serde_json::{json, Map, Value};

use crate::{RevisionRef, RuntimeError};

/// The field an image-only container is missing in local mode.
pub const COMMAND_FIELD: &str = "spec.containers[0].command";

/// The ports of one pod, all on the runtime's bind address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PodPorts {
    /// The app's `PORT`.
    pub user: u16,
    /// The queue-proxy's serving port (Knative's 8012): the pod's address.
    pub serving: u16,
    /// The queue-proxy's admin port (Knative's 8022).
    pub admin: u16,
    /// The autoscaler metrics port (Knative's 9090).
    pub metrics: u16,
    /// The Prometheus metrics port (Knative's 9091).
    pub user_metrics: u16,
}

impl PodPorts {
    pub fn all(&self) -> [u16; 5] {
        [
            self.user,
            self.serving,
            self.admin,
            self.metrics,
            self.user_metrics,
        ]
    }

    pub fn from_array([user, serving, admin, metrics, user_metrics]: [u16; 5]) -> PodPorts {
        PodPorts {
            user,
            serving,
            admin,
            metrics,
            user_metrics,
        }
    }
}

/// The user's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppCommand {
    pub program: String,
    pub args: Vec<String>,
    pub working_dir: Option<PathBuf>,
    /// The container's env, then Knative's (`PORT`, `K_SERVICE`, `K_CONFIGURATION`,
    /// `K_REVISION`). The local runtime adds these to its own environment (so `PATH` and
    /// `HOME` reach the app), where a container would start from its image's.
    pub env: Vec<(String, String)>,
}

/// The user's process for a pod of `revision` whose app listens on `user_port`, or why the
/// revision cannot run locally (no `command`; env from Secrets or ConfigMaps).
///
/// As Kubernetes does, `$(VAR)` in `command` and `args` expands to the container's env
/// (including `PORT`), and in an env value to the variables defined before it.
pub fn app_command(revision: &RevisionRef, user_port: u16) -> Result<AppCommand, RuntimeError> {
    let fail = |field: &str, reason: String| RuntimeError::CannotRun {
        revision: revision.key(),
        field: field.to_owned(),
        reason,
    };
    let Some(container) = revision.spec.containers.first() else {
        return Err(fail(
            "spec.containers",
            "a revision needs one container".into(),
        ));
    };
    if container.command.is_empty() {
        let mut reason = String::from("local mode runs commands; set command");
        if !container.image.is_empty() {
            reason += &format!(" (the image {:?} cannot run here)", container.image);
        }
        return Err(fail(COMMAND_FIELD, reason));
    }
    if !container.env_from.is_empty() {
        return Err(fail(
            "spec.containers[0].envFrom",
            "local mode cannot read Secrets or ConfigMaps; set env values instead".into(),
        ));
    }
    let mut env: Vec<(String, String)> = Vec::with_capacity(container.env.len() + 4);
    for (i, var) in container.env.iter().enumerate() {
        if var.value_from.is_some() {
            return Err(fail(
                &format!("spec.containers[0].env[{i}].valueFrom"),
                "local mode cannot resolve valueFrom; set value instead".into(),
            ));
        }
        let value = expand(var.value.as_deref().unwrap_or_default(), &env);
        env.push((var.name.clone(), value));
    }
    env.extend([
        ("PORT".to_owned(), user_port.to_string()),
        (
            "K_SERVICE".to_owned(),
            revision.service.clone().unwrap_or_default(),
        ),
        ("K_CONFIGURATION".to_owned(), revision.configuration.clone()),
        ("K_REVISION".to_owned(), revision.name.clone()),
    ]);
    let mut argv = container
        .command
        .iter()
        .chain(&container.args)
        .map(|arg| expand(arg, &env));
    let program = argv.next().unwrap_or_default();
    Ok(AppCommand {
        program,
        args: argv.collect(),
        working_dir: (!container.working_dir.is_empty())
            .then(|| PathBuf::from(&container.working_dir)),
        env,
    })
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced by its value, an undefined
/// one is left as written, `$$` is a literal `$`, and any other `$` stays.
pub fn expand(input: &str, env: &[(String, String)]) -> String {
    let lookup = |name: &str| {
        env.iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after
            .strip_prefix('(')
            .and_then(|inner| inner.split_once(')'))
        {
            match lookup(name) {
                Some(value) => out.push_str(value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The queue-proxy's environment for pod `pod` of `revision`: Knative's variables, then the
/// `KNARR_QUEUE_*` extras that let many queue-proxies share one machine.
pub fn queue_proxy_env(
    revision: &RevisionRef,
    pod: &str,
    bind: IpAddr,
    ports: &PodPorts,
    drain_quiet_period: Duration,
) -> Vec<(&'static str, String)> {
    let spec = &revision.spec;
    vec![
        ("SERVING_NAMESPACE", revision.namespace.clone()),
        (
            "SERVING_SERVICE",
            revision.service.clone().unwrap_or_default(),
        ),
        ("SERVING_CONFIGURATION", revision.configuration.clone()),
        ("SERVING_REVISION", revision.name.clone()),
        ("SERVING_POD", pod.to_owned()),
        ("SERVING_POD_IP", bind.to_string()),
        ("QUEUE_SERVING_PORT", ports.serving.to_string()),
        ("USER_PORT", ports.user.to_string()),
        (
            "CONTAINER_CONCURRENCY",
            spec.container_concurrency().max(0).to_string(),
        ),
        (
            "REVISION_TIMEOUT_SECONDS",
            spec.timeout_seconds().to_string(),
        ),
        (
            "REVISION_RESPONSE_START_TIMEOUT_SECONDS",
            spec.response_start_timeout_seconds.unwrap_or(0).to_string(),
        ),
        (
            "REVISION_IDLE_TIMEOUT_SECONDS",
            spec.idle_timeout_seconds.unwrap_or(0).to_string(),
        ),
        (
            "SERVING_READINESS_PROBE",
            readiness_probe(spec.container(), ports.user),
        ),
        ("KNARR_QUEUE_BIND", bind.to_string()),
        ("KNARR_QUEUE_ADMIN_PORT", ports.admin.to_string()),
        ("KNARR_QUEUE_METRICS_PORT", ports.metrics.to_string()),
        (
            "KNARR_QUEUE_USER_METRICS_PORT",
            ports.user_metrics.to_string(),
        ),
        (
            "KNARR_QUEUE_DRAIN_QUIET_SECONDS",
            drain_quiet_period.as_secs_f64().to_string(),
        ),
    ]
}

/// `SERVING_READINESS_PROBE`: the container's readiness probe after Knative's defaulting (a TCP
/// probe when it has none, `successThreshold` 1) and `applyReadinessProbeDefaults` (the probe
/// targets `127.0.0.1` on the user port; an `exec` probe becomes a TCP one, since the
/// queue-proxy cannot run commands in the app's container).
pub fn readiness_probe(container: Option<&Container>, user_port: u16) -> String {
    const HANDLERS: [&str; 4] = ["httpGet", "tcpSocket", "exec", "grpc"];
    const LOCAL_ADDRESS: &str = "127.0.0.1";
    let mut probe = match container.and_then(|c| c.readiness_probe.as_ref()) {
        Some(Value::Object(probe)) => probe.clone(),
        _ => Map::new(),
    };
    if !HANDLERS.iter().any(|h| probe.contains_key(*h)) {
        probe.insert("tcpSocket".into(), json!({}));
    }
    if probe
        .get("successThreshold")
        .and_then(Value::as_i64)
        .unwrap_or(0)
        == 0
    {
        probe.insert("successThreshold".into(), json!(1));
    }
    let target = |handler: Option<&mut Value>, with_host: bool| {
        if let Some(Value::Object(handler)) = handler {
            if with_host {
                handler.insert("host".into(), json!(LOCAL_ADDRESS));
            }
            handler.insert("port".into(), json!(user_port));
        }
    };
    if probe.contains_key("httpGet") {
        target(probe.get_mut("httpGet"), true);
        if let Some(Value::Object(get)) = probe.get_mut("httpGet") {
            if get
                .get("scheme")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
            {
                get.insert("scheme".into(), json!("HTTP"));
            }
        }
    } else if probe.contains_key("tcpSocket") {
        target(probe.get_mut("tcpSocket"), true);
    } else if probe.remove("exec").is_some() {
        probe.insert(
            "tcpSocket".into(),
            json!({ "host": LOCAL_ADDRESS, "port": user_port }),
        );
    } else {
        target(probe.get_mut("grpc"), false);
    }
    let seconds = |field: &str| probe.get(field).and_then(Value::as_i64).unwrap_or(0);
    if seconds("periodSeconds") > 0 && seconds("timeoutSeconds") < 1 {
        probe.insert("timeoutSeconds".into(), json!(1));
    }
    Value::Object(probe).to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use knarr_model::serving::{EnvVar, RevisionSpec};

    use super::*;

    fn revision(container: Container) -> RevisionRef {
        RevisionRef {
            namespace: "default".into(),
            name: "hello-00001".into(),
            configuration: "hello".into(),
            service: Some("hello".into()),
            spec: RevisionSpec {
                containers: vec![container],
                ..Default::default()
            },
        }
    }

    fn env_var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn app_gets_its_env_knatives_variables_and_expanded_args() {
        let rev = revision(Container {
            command: strings(&["/bin/app", "--greeting=$(GREETING)"]),
            args: strings(&["--listen", "127.0.0.1:$(PORT)", "$$(PORT)", "$(NOPE)", "$5"]),
            working_dir: "/srv".into(),
            env: vec![
                env_var("TARGET", "world"),
                env_var("GREETING", "hello $(TARGET)"),
            ],
            ..Default::default()
        });
        let app = app_command(&rev, 4321).unwrap();
        assert_eq!(app.program, "/bin/app");
        assert_eq!(
            app.args,
            strings(&[
                "--greeting=hello world",
                "--listen",
                "127.0.0.1:4321",
                "$(PORT)",
                "$(NOPE)",
                "$5"
            ])
        );
        assert_eq!(app.working_dir, Some(PathBuf::from("/srv")));
        let env: HashMap<&str, &str> = app
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            HashMap::from([
                ("TARGET", "world"),
                ("GREETING", "hello world"),
                ("PORT", "4321"),
                ("K_SERVICE", "hello"),
                ("K_CONFIGURATION", "hello"),
                ("K_REVISION", "hello-00001"),
            ])
        );
    }

    #[test]
    fn k_service_is_empty_without_a_service() {
        let mut rev = revision(Container {
            command: strings(&["app"]),
            ..Default::default()
        });
        rev.service = None;
        let app = app_command(&rev, 1).unwrap();
        assert!(app.env.contains(&("K_SERVICE".into(), String::new())));
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let env = vec![("A".to_owned(), "x".to_owned())];
        for (input, want) in [
            ("$(A)", "x"),
            ("$(A)$(A)", "xx"),
            ("$$(A)", "$(A)"),
            ("$$$(A)", "$x"),
            ("$(B)", "$(B)"),
            ("$(A", "$(A"),
            ("$A", "$A"),
            ("a$", "a$"),
            ("ünï$(A)cödé", "ünïxcödé"),
        ] {
            assert_eq!(expand(input, &env), want, "{input}");
        }
    }

    #[test]
    fn an_image_alone_is_an_error_naming_the_field() {
        let rev = revision(Container {
            image: "gcr.io/knative-samples/helloworld-go".into(),
            ..Default::default()
        });
        let err = app_command(&rev, 8080).unwrap_err().to_string();
        assert_eq!(
            err,
            "revision default/hello-00001: spec.containers[0].command: local mode runs \
             commands; set command (the image \"gcr.io/knative-samples/helloworld-go\" cannot \
             run here)"
        );
    }

    #[test]
    fn values_from_secrets_are_errors_naming_the_field() {
        let rev = revision(Container {
            command: strings(&["app"]),
            env: vec![
                env_var("A", "a"),
                EnvVar {
                    name: "B".into(),
                    value: None,
                    value_from: Some(json!({"secretKeyRef": {"name": "s", "key": "k"}})),
                },
            ],
            ..Default::default()
        });
        let err = app_command(&rev, 8080).unwrap_err().to_string();
        assert!(err.contains("spec.containers[0].env[1].valueFrom"), "{err}");
        let rev = revision(Container {
            command: strings(&["app"]),
            env_from: vec![json!({"secretRef": {"name": "s"}})],
            ..Default::default()
        });
        let err = app_command(&rev, 8080).unwrap_err().to_string();
        assert!(err.contains("spec.containers[0].envFrom"), "{err}");
        let mut rev = revision(Container::default());
        rev.spec.containers.clear();
        let err = app_command(&rev, 8080).unwrap_err().to_string();
        assert!(err.contains("spec.containers: a revision needs one container"));
    }

    #[test]
    fn queue_proxy_env_is_knatives_plus_local_extras() {
        let mut rev = revision(Container {
            command: strings(&["app"]),
            ..Default::default()
        });
        rev.spec.container_concurrency = Some(10);
        rev.spec.timeout_seconds = Some(60);
        rev.spec.response_start_timeout_seconds = Some(5);
        let ports = PodPorts::from_array([5000, 5001, 5002, 5003, 5004]);
        let env: HashMap<&str, String> = queue_proxy_env(
            &rev,
            "hello-00001-pod-1",
            IpAddr::from([127, 0, 0, 1]),
            &ports,
            Duration::from_millis(250),
        )
        .into_iter()
        .collect();
        let want = [
            ("SERVING_NAMESPACE", "default"),
            ("SERVING_SERVICE", "hello"),
            ("SERVING_CONFIGURATION", "hello"),
            ("SERVING_REVISION", "hello-00001"),
            ("SERVING_POD", "hello-00001-pod-1"),
            ("SERVING_POD_IP", "127.0.0.1"),
            ("QUEUE_SERVING_PORT", "5001"),
            ("USER_PORT", "5000"),
            ("CONTAINER_CONCURRENCY", "10"),
            ("REVISION_TIMEOUT_SECONDS", "60"),
            ("REVISION_RESPONSE_START_TIMEOUT_SECONDS", "5"),
            ("REVISION_IDLE_TIMEOUT_SECONDS", "0"),
            (
                "SERVING_READINESS_PROBE",
                r#"{"successThreshold":1,"tcpSocket":{"host":"127.0.0.1","port":5000}}"#,
            ),
            ("KNARR_QUEUE_BIND", "127.0.0.1"),
            ("KNARR_QUEUE_ADMIN_PORT", "5002"),
            ("KNARR_QUEUE_METRICS_PORT", "5003"),
            ("KNARR_QUEUE_USER_METRICS_PORT", "5004"),
            ("KNARR_QUEUE_DRAIN_QUIET_SECONDS", "0.25"),
        ];
        assert_eq!(env.len(), want.len());
        for (k, v) in want {
            assert_eq!(env[k], v, "{k}");
        }
    }

    #[test]
    fn readiness_probe_targets_the_user_port_on_loopback() {
        let probe = |json: Value| {
            let container = Container {
                readiness_probe: Some(json),
                ..Default::default()
            };
            serde_json::from_str::<Value>(&readiness_probe(Some(&container), 7000)).unwrap()
        };
        assert_eq!(
            probe(json!({"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 5})),
            json!({
                "httpGet": {"path": "/healthz", "host": "127.0.0.1", "port": 7000, "scheme": "HTTP"},
                "periodSeconds": 5, "timeoutSeconds": 1, "successThreshold": 1
            })
        );
        assert_eq!(
            probe(json!({"exec": {"command": ["true"]}, "successThreshold": 2})),
            json!({"tcpSocket": {"host": "127.0.0.1", "port": 7000}, "successThreshold": 2})
        );
        assert_eq!(
            probe(json!({"grpc": {"port": 9000}})),
            json!({"grpc": {"port": 7000}, "successThreshold": 1})
        );
        assert_eq!(
            readiness_probe(None, 7000),
            r#"{"successThreshold":1,"tcpSocket":{"host":"127.0.0.1","port":7000}}"#
        );
    }
}
