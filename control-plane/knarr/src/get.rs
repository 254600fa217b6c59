//! `knarr get`: lists objects from the API of a running `knarr up` (Knative Services,
//! Configurations, Revisions, Routes) or `knarr serve` (ingresses and source errors).

use std::io::Write as _;

use anyhow::bail;
use clap::ValueEnum;
use knarr_control::table::Table;
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
    let mut path = match &args.name {
        Some(name) => serving_path(kind, Some((namespace, name))),
        None if args.all_namespaces => serving_path(kind, None),
        None => format!("{}?namespace={namespace}", serving_path(kind, None)),
    };
    if args.output == Output::Table {
        // The rows are computed beside the objects: a few strings each, not whole manifests.
        path.push(if path.contains('?') { '&' } else { '?' });
        path.push_str("as=table");
        let table: Table = serde_json::from_value(client.get_json(&path)?)?;
        if table.rows.is_empty() {
            if args.all_namespaces {
                eprintln!("No resources found");
            } else {
                eprintln!("No resources found in {namespace} namespace.");
            }
            return Ok(String::new());
        }
        return Ok(render(&table, args.all_namespaces));
    }
    let items = match &args.name {
        Some(_) => vec![client.get_json(&path)?],
        None => match client.get_json(&path)?["items"].as_array() {
            Some(items) => items.clone(),
            None => bail!("{path}: the answer has no items"),
        },
    };
    // One object prints as itself, several as kubectl's `List`, which `knarr apply` reads back.
    let document = match (&args.name, &items[..]) {
        (Some(_), [one]) => one.clone(),
        _ => serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items }),
    };
    Ok(match args.output {
        Output::Json => serde_json::to_string_pretty(&document)? + "\n",
        Output::Yaml | Output::Table => serde_yaml::to_string(&document)?,
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

/// A table the API computed, with NAMESPACE first for `-A`.
fn render(table: &Table, all_namespaces: bool) -> String {
    let mut rows = Vec::with_capacity(table.rows.len() + 1);
    let mut header = table.columns.clone();
    if all_namespaces {
        header.insert(0, "NAMESPACE".into());
    }
    rows.push(header);
    for row in &table.rows {
        let mut cells = row.cells.clone();
        if all_namespaces {
            cells.insert(0, row.namespace.clone());
        }
        rows.push(cells);
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

    /// The table the API would compute for `manifest`, rendered.
    fn serving_table(kind: ServingKind, manifest: Value, all_namespaces: bool) -> String {
        use knarr_model::serving::{Revision, Service, ServingObject};
        let object = match kind {
            ServingKind::Service => {
                ServingObject::Service(serde_json::from_value::<Service>(manifest).unwrap())
            }
            ServingKind::Revision => {
                ServingObject::Revision(serde_json::from_value::<Revision>(manifest).unwrap())
            }
            _ => unreachable!(),
        };
        render(
            &knarr_control::table::table(kind, [&object]),
            all_namespaces,
        )
    }

    #[test]
    fn service_table() {
        assert_eq!(
            serving_table(ServingKind::Service, service(), false),
            "\
NAME    URL                                LATESTCREATED   LATESTREADY   READY   REASON
hello   http://hello.default.example.com   hello-00002     hello-00001   False   RevisionFailed
"
        );
        let all = serving_table(ServingKind::Service, service(), true);
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
            serving_table(ServingKind::Revision, revision, false),
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
