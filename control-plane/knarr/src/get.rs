//! `knarr get`: lists objects from the API of a running `knarr up` (Knative Services,
//! Configurations, Revisions, Routes) or `knarr serve` (ingresses and source errors).

use std::io::Write as _;

use anyhow::bail;
use clap::ValueEnum;
use knarr_model::serving::ServingKind;
use serde_json::Value;

use crate::api_client::{
    check_name, condition, render_table, serving_path, str_of, ApiArgs, ApiClient,
    DEFAULT_NAMESPACE,
};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum GetWhat {
    /// Knative Services.
    #[value(alias = "service", alias = "services", alias = "kservice")]
    Ksvc,
    /// Configurations.
    #[value(alias = "configuration", alias = "config", alias = "configs")]
    Configurations,
    /// Revisions.
    #[value(alias = "revision", alias = "rev", alias = "revs")]
    Revisions,
    /// Routes.
    #[value(alias = "route")]
    Routes,
    /// KIngresses with their status conditions.
    #[value(alias = "ingress", alias = "kingress", alias = "kingresses")]
    Ingresses,
    /// Every problem the sources reported.
    Errors,
}

impl GetWhat {
    fn serving_kind(self) -> Option<ServingKind> {
        match self {
            GetWhat::Ksvc => Some(ServingKind::Service),
            GetWhat::Configurations => Some(ServingKind::Configuration),
            GetWhat::Revisions => Some(ServingKind::Revision),
            GetWhat::Routes => Some(ServingKind::Route),
            GetWhat::Ingresses | GetWhat::Errors => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    Table,
    Yaml,
    Json,
}

#[derive(clap::Args)]
pub(crate) struct GetArgs {
    /// What to list.
    #[arg(value_enum)]
    what: GetWhat,
    /// Only this object.
    name: Option<String>,
    /// The namespace [default: default; for ingresses: all].
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// List every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    #[command(flatten)]
    api: ApiArgs,
}

pub(crate) fn run(args: &GetArgs) -> anyhow::Result<()> {
    if let Some(ns) = &args.namespace {
        check_name("namespace", ns)?;
    }
    if let Some(name) = &args.name {
        check_name("name", name)?;
    }
    let text = match args.what.serving_kind() {
        Some(kind) => get_serving(args, kind)?,
        None => get_ingresses_or_errors(args)?,
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (`knarr get ksvc | head`) is not an error worth a message.
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

fn get_serving(args: &GetArgs, kind: ServingKind) -> anyhow::Result<String> {
    let client = args.api.client("`knarr up`")?;
    let namespace = args.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    let items = match &args.name {
        Some(name) => {
            let path = serving_path(kind, Some((namespace, name)));
            vec![client.get_json(&path)?]
        }
        None => {
            let mut path = serving_path(kind, None);
            if !args.all_namespaces {
                path.push_str(&format!("?namespace={namespace}"));
            }
            match client.get_json(&path)?["items"].as_array() {
                Some(items) => items.clone(),
                None => bail!("{path}: the answer has no items"),
            }
        }
    };
    // One object prints as itself, several as kubectl's `List`, which `knarr apply` reads back.
    let document = match (&args.name, &items[..]) {
        (Some(_), [one]) => one.clone(),
        _ => serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items }),
    };
    Ok(match args.output {
        Output::Json => serde_json::to_string_pretty(&document)? + "\n",
        Output::Yaml => serde_yaml::to_string(&document)?,
        Output::Table if items.is_empty() => {
            if args.all_namespaces {
                eprintln!("No resources found");
            } else {
                eprintln!("No resources found in {namespace} namespace.");
            }
            String::new()
        }
        Output::Table => serving_table(kind, &items, args.all_namespaces),
    })
}

fn ready_and_reason(object: &Value) -> (String, String) {
    let ready = condition(object, "Ready");
    (
        ready
            .and_then(|c| c["status"].as_str())
            .unwrap_or("Unknown")
            .to_owned(),
        ready
            .map(|c| str_of(&c["reason"]))
            .unwrap_or_default()
            .to_owned(),
    )
}

fn number(value: &Value) -> String {
    value.as_i64().map(|n| n.to_string()).unwrap_or_default()
}

/// kubectl's columns for Knative's kinds (NAMESPACE first with `-A`).
fn serving_table(kind: ServingKind, items: &[Value], all_namespaces: bool) -> String {
    let header: &[&str] = match kind {
        ServingKind::Service => &[
            "NAME",
            "URL",
            "LATESTCREATED",
            "LATESTREADY",
            "READY",
            "REASON",
        ],
        ServingKind::Configuration => &["NAME", "LATESTCREATED", "LATESTREADY", "READY", "REASON"],
        ServingKind::Revision => &[
            "NAME",
            "CONFIG",
            "GENERATION",
            "READY",
            "REASON",
            "ACTUAL",
            "DESIRED",
            "MODE",
            "PANIC",
        ],
        ServingKind::Route => &["NAME", "URL", "READY", "REASON"],
    };
    let mut rows = vec![header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
    for item in items {
        let meta = &item["metadata"];
        let status = &item["status"];
        let name = str_of(&meta["name"]).to_owned();
        let (ready, reason) = ready_and_reason(item);
        let row = match kind {
            ServingKind::Service => vec![
                name,
                str_of(&status["url"]).into(),
                str_of(&status["latestCreatedRevisionName"]).into(),
                str_of(&status["latestReadyRevisionName"]).into(),
                ready,
                reason,
            ],
            ServingKind::Configuration => vec![
                name,
                str_of(&status["latestCreatedRevisionName"]).into(),
                str_of(&status["latestReadyRevisionName"]).into(),
                ready,
                reason,
            ],
            ServingKind::Revision => {
                let labels = &meta["labels"];
                vec![
                    name,
                    str_of(&labels[knarr_model::serving::CONFIGURATION_LABEL]).into(),
                    str_of(&labels[knarr_model::serving::CONFIGURATION_GENERATION_LABEL]).into(),
                    ready,
                    reason,
                    number(&status["actualReplicas"]),
                    number(&status["desiredReplicas"]),
                    str_of(&status["servingMode"]).into(),
                    match status["inPanic"].as_bool() {
                        Some(true) => "yes".into(),
                        Some(false) => "no".into(),
                        None => String::new(),
                    },
                ]
            }
            ServingKind::Route => vec![name, str_of(&status["url"]).into(), ready, reason],
        };
        rows.push(row);
    }
    if all_namespaces {
        rows[0].insert(0, "NAMESPACE".into());
        for (row, item) in rows[1..].iter_mut().zip(items) {
            row.insert(0, str_of(&item["metadata"]["namespace"]).into());
        }
    }
    render_table(&rows)
}

fn get_ingresses_or_errors(args: &GetArgs) -> anyhow::Result<String> {
    let client: ApiClient = args.api.client("`knarr up` or `knarr serve`")?;
    let (path, name) = match (args.what, &args.name) {
        (GetWhat::Errors, Some(_)) => bail!("`knarr get errors` takes no name"),
        (GetWhat::Errors, None) => ("/api/v1/errors".to_owned(), None),
        (_, name) => ("/api/v1/ingresses".to_owned(), name.as_deref()),
    };
    let mut value = client.get_json(&path)?;
    // Without -n, ingresses of every namespace, as `knarr get ingresses` always showed.
    let namespace = match (&args.namespace, name) {
        (Some(ns), _) => Some(ns.as_str()),
        (None, Some(_)) => Some(DEFAULT_NAMESPACE),
        (None, None) => None,
    };
    if let Some(items) = value["items"].as_array_mut() {
        items.retain(|item| {
            namespace.is_none_or(|ns| item["metadata"]["namespace"] == ns)
                && name.is_none_or(|name| item["metadata"]["name"] == name)
        });
        if name.is_some() && items.is_empty() {
            bail!(
                "no ingress {}/{}",
                namespace.unwrap_or(DEFAULT_NAMESPACE),
                name.unwrap_or_default()
            );
        }
    }
    Ok(match (args.output, args.what) {
        (Output::Json, _) => serde_json::to_string_pretty(&value)? + "\n",
        (Output::Yaml, _) => serde_yaml::to_string(&value)?,
        (Output::Table, GetWhat::Errors) => {
            let errors: Vec<&str> = value["errors"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if errors.is_empty() {
                "no errors\n".into()
            } else {
                errors.join("\n") + "\n"
            }
        }
        (Output::Table, _) => ingress_table(
            value["items"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default(),
        ),
    })
}

fn ingress_table(items: &[Value]) -> String {
    let mut rows = vec![vec![
        "NAMESPACE".to_string(),
        "NAME".into(),
        "READY".into(),
        "REASON".into(),
        "HOSTS".into(),
    ]];
    for item in items {
        let hosts: Vec<&str> = item["hosts"]
            .as_array()
            .map(|h| h.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let (ready, mut reason) = ready_and_reason(item);
        if item.get("error").is_some() {
            reason = if reason.is_empty() {
                "SourceError".into()
            } else {
                format!("{reason},SourceError")
            };
        }
        rows.push(vec![
            str_of(&item["metadata"]["namespace"]).into(),
            str_of(&item["metadata"]["name"]).into(),
            ready,
            reason,
            hosts.join(","),
        ]);
    }
    let mut out = render_table(&rows);
    for item in items {
        if let Some(e) = item.get("error").and_then(Value::as_str) {
            out.push_str(&format!("error: {e}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service() -> Value {
        json!({
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Service",
            "metadata": { "namespace": "default", "name": "hello" },
            "status": {
                "url": "http://hello.default.example.com",
                "latestCreatedRevisionName": "hello-00002",
                "latestReadyRevisionName": "hello-00001",
                "conditions": [
                    { "type": "ConfigurationsReady", "status": "False", "reason": "RevisionFailed" },
                    { "type": "Ready", "status": "False", "reason": "RevisionFailed" },
                ],
            },
        })
    }

    #[test]
    fn service_table() {
        assert_eq!(
            serving_table(ServingKind::Service, &[service()], false),
            "\
NAME    URL                                LATESTCREATED   LATESTREADY   READY   REASON
hello   http://hello.default.example.com   hello-00002     hello-00001   False   RevisionFailed
"
        );
        let all = serving_table(ServingKind::Service, &[service()], true);
        assert!(all.starts_with("NAMESPACE   NAME "), "{all}");
        assert!(all.contains("\ndefault     hello "), "{all}");
    }

    #[test]
    fn revision_table_shows_replicas() {
        let revision = json!({
            "metadata": {
                "namespace": "default",
                "name": "hello-00001",
                "labels": {
                    "serving.knative.dev/configuration": "hello",
                    "serving.knative.dev/configurationGeneration": "1",
                },
            },
            "status": {
                "actualReplicas": 1,
                "desiredReplicas": 2,
                "servingMode": "Proxy",
                "inPanic": true,
                "conditions": [{ "type": "Ready", "status": "Unknown", "reason": "Deploying" }],
            },
        });
        assert_eq!(
            serving_table(ServingKind::Revision, &[revision], false),
            "\
NAME          CONFIG   GENERATION   READY     REASON      ACTUAL   DESIRED   MODE    PANIC
hello-00001   hello    1            Unknown   Deploying   1        2         Proxy   yes
"
        );
    }

    #[test]
    fn ingress_table_marks_source_errors() {
        let ingress = json!({
            "metadata": { "namespace": "default", "name": "hello" },
            "hosts": ["hello.default.example.com", "hello.default"],
            "status": { "conditions": [{ "type": "Ready", "status": "True" }] },
            "error": "hello.yaml:3: bad",
        });
        assert_eq!(
            ingress_table(&[ingress]),
            "\
NAMESPACE   NAME    READY   REASON        HOSTS
default     hello   True    SourceError   hello.default.example.com,hello.default
error: hello.yaml:3: bad
"
        );
    }
}
