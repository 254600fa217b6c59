//! `knarr describe`: one Knative object for people — its URL, traffic, revisions and their
//! pods, and every condition — from a running `knarr up`.

use std::fmt::Write as _;

use clap::ValueEnum;
use knarr_model::serving::{
    ServingKind, CONFIGURATION_GENERATION_LABEL, CONFIGURATION_LABEL, SERVICE_LABEL,
    VISIBILITY_LABEL,
};
use serde_json::Value;

use crate::api_client::{
    check_name, render_table, serving_path, str_of, ApiArgs, ApiClient, DEFAULT_NAMESPACE,
};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DescribeWhat {
    /// A Knative Service.
    #[value(alias = "service", alias = "services", alias = "kservice")]
    Ksvc,
    #[value(alias = "configurations", alias = "config")]
    Configuration,
    #[value(alias = "revisions", alias = "rev")]
    Revision,
    #[value(alias = "routes")]
    Route,
}

#[derive(clap::Args)]
pub(crate) struct DescribeArgs {
    /// What to describe.
    #[arg(value_enum)]
    what: DescribeWhat,
    name: String,
    /// The namespace [default: default].
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

pub(crate) fn run(args: &DescribeArgs) -> anyhow::Result<()> {
    let namespace = args.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    check_name("namespace", namespace)?;
    check_name("name", &args.name)?;
    let kind = match args.what {
        DescribeWhat::Ksvc => ServingKind::Service,
        DescribeWhat::Configuration => ServingKind::Configuration,
        DescribeWhat::Revision => ServingKind::Revision,
        DescribeWhat::Route => ServingKind::Route,
    };
    let client = args.api.client("`knarr up`")?;
    let object = match client.get_optional(&serving_path(kind, Some((namespace, &args.name))))? {
        Ok(object) => object,
        Err(message) => anyhow::bail!("{message}"),
    };
    // Routes have no pods; everything else lists its revisions' pods.
    let (revisions, pods) = match kind {
        ServingKind::Route => (Vec::new(), Vec::new()),
        _ => {
            let revisions = revisions_of(&client, kind, namespace, &args.name)?;
            let pods =
                match client.get_optional(&format!("/api/v1/pods/{namespace}/{}", args.name))? {
                    Ok(pods) => pods["items"].as_array().cloned().unwrap_or_default(),
                    Err(_) => Vec::new(),
                };
            (revisions, pods)
        }
    };
    print!("{}", describe(kind, &object, &revisions, &pods));
    Ok(())
}

/// The revisions of a Service or Configuration (by label), or the Revision itself; newest first.
fn revisions_of(
    client: &ApiClient,
    kind: ServingKind,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Vec<Value>> {
    let label = match kind {
        ServingKind::Service => SERVICE_LABEL,
        ServingKind::Configuration => CONFIGURATION_LABEL,
        _ => return Ok(Vec::new()),
    };
    let path = format!(
        "{}?namespace={namespace}",
        serving_path(ServingKind::Revision, None)
    );
    let mut revisions: Vec<Value> = client.get_json(&path)?["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["metadata"]["labels"][label] == name)
        .cloned()
        .collect();
    revisions.sort_by_key(|r| std::cmp::Reverse(generation(r)));
    Ok(revisions)
}

fn generation(revision: &Value) -> i64 {
    str_of(&revision["metadata"]["labels"][CONFIGURATION_GENERATION_LABEL])
        .parse()
        .unwrap_or(0)
}

/// The text `knarr describe` prints.
fn describe(kind: ServingKind, object: &Value, revisions: &[Value], pods: &[Value]) -> String {
    let meta = &object["metadata"];
    let status = &object["status"];
    let mut fields: Vec<(&str, String)> = vec![
        ("Name", str_of(&meta["name"]).into()),
        ("Namespace", str_of(&meta["namespace"]).into()),
    ];
    if meta["labels"][VISIBILITY_LABEL].is_string() {
        fields.push((
            "Visibility",
            str_of(&meta["labels"][VISIBILITY_LABEL]).into(),
        ));
    }
    if let Some(url) = status["url"].as_str() {
        fields.push(("URL", url.into()));
    }
    match kind {
        ServingKind::Service | ServingKind::Configuration => {
            for (label, field) in [
                ("Latest created", "latestCreatedRevisionName"),
                ("Latest ready", "latestReadyRevisionName"),
            ] {
                if let Some(name) = status[field].as_str() {
                    fields.push((label, name.into()));
                }
            }
        }
        ServingKind::Revision => {
            let labels = &meta["labels"];
            for (label, key) in [
                ("Service", SERVICE_LABEL),
                ("Configuration", CONFIGURATION_LABEL),
                ("Generation", CONFIGURATION_GENERATION_LABEL),
            ] {
                if let Some(value) = labels[key].as_str() {
                    fields.push((label, value.into()));
                }
            }
            let container = &object["spec"]["containers"][0];
            for (label, key) in [("Image", "image"), ("Working dir", "workingDir")] {
                if let Some(value) = container[key].as_str().filter(|v| !v.is_empty()) {
                    fields.push((label, value.into()));
                }
            }
            let command: Vec<&str> = ["command", "args"]
                .iter()
                .flat_map(|key| container[*key].as_array().into_iter().flatten())
                .filter_map(Value::as_str)
                .collect();
            if !command.is_empty() {
                fields.push(("Command", command.join(" ")));
            }
            fields.push((
                "Replicas",
                format!(
                    "{} actual, {} desired",
                    count(&status["actualReplicas"]),
                    count(&status["desiredReplicas"])
                ),
            ));
        }
        ServingKind::Route => {}
    }
    // "Label:" and two spaces.
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 3;
    let mut out = String::new();
    for (label, value) in &fields {
        let _ = writeln!(out, "{:<width$}{value}", format!("{label}:"));
    }

    let traffic = status["traffic"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if matches!(kind, ServingKind::Service | ServingKind::Route) {
        out.push_str("\nTraffic:\n");
        if traffic.is_empty() {
            out.push_str("  (none routed yet)\n");
        } else {
            out.push_str(&indent(&traffic_table(traffic)));
        }
    }
    if !revisions.is_empty() {
        out.push_str("\nRevisions:\n");
        out.push_str(&indent(&revision_table(revisions, traffic, pods)));
    }
    if kind != ServingKind::Route {
        out.push_str("\nPods:\n");
        if pods.is_empty() {
            out.push_str("  (none)\n");
        } else {
            out.push_str(&indent(&pod_table(pods)));
        }
    }
    out.push_str("\nConditions:\n");
    out.push_str(&indent(&condition_table(status)));
    out
}

fn count(value: &Value) -> String {
    value.as_i64().map_or_else(|| "?".into(), |n| n.to_string())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn traffic_table(traffic: &[Value]) -> String {
    let mut rows = vec![vec![
        "PERCENT".to_string(),
        "REVISION".into(),
        "TAG".into(),
        "URL".into(),
    ]];
    for target in traffic {
        let revision = str_of(&target["revisionName"]);
        let revision = if target["latestRevision"] == true {
            format!("@latest ({revision})")
        } else {
            revision.to_owned()
        };
        rows.push(vec![
            format!("{}%", target["percent"].as_i64().unwrap_or(0)),
            revision,
            str_of(&target["tag"]).into(),
            str_of(&target["url"]).into(),
        ]);
    }
    render_table(&rows)
}

fn revision_table(revisions: &[Value], traffic: &[Value], pods: &[Value]) -> String {
    let mut rows = vec![vec![
        "NAME".to_string(),
        "GENERATION".into(),
        "READY".into(),
        "PODS".into(),
        "DESIRED".into(),
        "TRAFFIC".into(),
        "REASON".into(),
    ]];
    for revision in revisions {
        let name = str_of(&revision["metadata"]["name"]);
        let status = &revision["status"];
        let ready = crate::api_client::condition(revision, "Ready");
        let ready_pods = pods
            .iter()
            .filter(|p| p["revision"] == name && p["phase"] == "Ready")
            .count();
        let percent: i64 = traffic
            .iter()
            .filter(|t| t["revisionName"] == name)
            .filter_map(|t| t["percent"].as_i64())
            .sum();
        rows.push(vec![
            name.into(),
            generation(revision).to_string(),
            ready.map_or("Unknown", |c| str_of(&c["status"])).into(),
            // Ready pods of those running (Knative's actualReplicas).
            format!("{ready_pods}/{}", count(&status["actualReplicas"])),
            count(&status["desiredReplicas"]),
            if percent > 0 {
                format!("{percent}%")
            } else {
                String::new()
            },
            ready
                .map(|c| str_of(&c["reason"]))
                .unwrap_or_default()
                .into(),
        ]);
    }
    render_table(&rows)
}

fn pod_table(pods: &[Value]) -> String {
    let mut rows = vec![vec![
        "NAME".to_string(),
        "REVISION".into(),
        "PHASE".into(),
        "ADDRESS".into(),
        "RESTARTS".into(),
        "LOG".into(),
    ]];
    for pod in pods {
        rows.push(vec![
            str_of(&pod["name"]).into(),
            str_of(&pod["revision"]).into(),
            str_of(&pod["phase"]).into(),
            str_of(&pod["address"]).into(),
            count(&pod["restarts"]),
            str_of(&pod["logPath"]).into(),
        ]);
    }
    let mut out = render_table(&rows);
    for pod in pods {
        if let Some(error) = pod["lastError"].as_str() {
            let _ = writeln!(out, "{}: last error: {error}", str_of(&pod["name"]));
        }
    }
    out
}

fn condition_table(status: &Value) -> String {
    let conditions = status["conditions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if conditions.is_empty() {
        return "(none yet)\n".into();
    }
    let mut rows = vec![vec![
        "TYPE".to_string(),
        "STATUS".into(),
        "REASON".into(),
        "MESSAGE".into(),
    ]];
    for c in conditions {
        rows.push(vec![
            str_of(&c["type"]).into(),
            str_of(&c["status"]).into(),
            str_of(&c["reason"]).into(),
            str_of(&c["message"]).into(),
        ]);
    }
    render_table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn revision(name: &str, generation: &str, actual: i64) -> Value {
        json!({
            "metadata": {
                "namespace": "default",
                "name": name,
                "labels": {
                    "serving.knative.dev/service": "hello",
                    "serving.knative.dev/configuration": "hello",
                    "serving.knative.dev/configurationGeneration": generation,
                },
            },
            "spec": { "containers": [{ "command": ["python3", "app.py"], "workingDir": "/srv" }] },
            "status": {
                "actualReplicas": actual,
                "desiredReplicas": 1,
                "conditions": [{ "type": "Ready", "status": "True" }],
            },
        })
    }

    #[test]
    fn a_service_with_a_tagged_candidate() {
        let service = json!({
            "metadata": { "namespace": "default", "name": "hello" },
            "status": {
                "url": "http://hello.default.example.com",
                "latestCreatedRevisionName": "hello-00002",
                "latestReadyRevisionName": "hello-00002",
                "traffic": [
                    { "revisionName": "hello-00001", "percent": 90 },
                    {
                        "revisionName": "hello-00002", "percent": 10, "latestRevision": true,
                        "tag": "candidate", "url": "http://candidate-hello.default.example.com",
                    },
                ],
                "conditions": [
                    { "type": "Ready", "status": "False", "reason": "RevisionMissing",
                      "message": "Revision \"hello-00002\" failed" },
                ],
            },
        });
        let pods = vec![json!({
            "namespace": "default", "revision": "hello-00001", "name": "hello-00001-1",
            "phase": "Ready", "address": "127.0.0.1:40001", "restarts": 2,
            "lastError": "exited with status 1", "logPath": "/tmp/knarr/hello-00001-1.log",
        })];
        let revisions = vec![
            revision("hello-00002", "2", 0),
            revision("hello-00001", "1", 1),
        ];
        assert_eq!(
            describe(ServingKind::Service, &service, &revisions, &pods),
            r#"Name:            hello
Namespace:       default
URL:             http://hello.default.example.com
Latest created:  hello-00002
Latest ready:    hello-00002

Traffic:
  PERCENT   REVISION                TAG         URL
  90%       hello-00001
  10%       @latest (hello-00002)   candidate   http://candidate-hello.default.example.com

Revisions:
  NAME          GENERATION   READY   PODS   DESIRED   TRAFFIC   REASON
  hello-00002   2            True    0/0    1         10%
  hello-00001   1            True    1/1    1         90%

Pods:
  NAME            REVISION      PHASE   ADDRESS           RESTARTS   LOG
  hello-00001-1   hello-00001   Ready   127.0.0.1:40001   2          /tmp/knarr/hello-00001-1.log
  hello-00001-1: last error: exited with status 1

Conditions:
  TYPE    STATUS   REASON            MESSAGE
  Ready   False    RevisionMissing   Revision "hello-00002" failed
"#
        );
    }

    #[test]
    fn a_revision_shows_what_it_runs() {
        let text = describe(
            ServingKind::Revision,
            &revision("hello-00001", "1", 1),
            &[],
            &[],
        );
        assert!(text.contains("Configuration:  hello\n"), "{text}");
        assert!(text.contains("Command:        python3 app.py\n"), "{text}");
        assert!(text.contains("Working dir:    /srv\n"), "{text}");
        assert!(
            text.contains("Replicas:       1 actual, 1 desired\n"),
            "{text}"
        );
        assert!(!text.contains("Traffic:"), "{text}");
    }
}
