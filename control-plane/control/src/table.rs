//! kubectl's columns for Knative's kinds, computed where the objects are — as the Kubernetes API
//! server prints `Table`s — so that `knarr get` over thousands of objects moves a few short
//! strings per object instead of whole manifests. The status API answers them for `?as=table`;
//! the CLI renders them.

use knarr_model::serving::{
    Condition, ConditionStatus, ServingKind, ServingObject, CONDITION_READY,
    CONFIGURATION_GENERATION_LABEL, CONFIGURATION_LABEL,
};
use serde::{Deserialize, Serialize};

/// The answer to `GET /api/v1/{kind}?as=table`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
}

/// One object's cells, with its namespace (the CLI shows it with `-A`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub namespace: String,
    pub cells: Vec<String>,
}

/// The columns of `kind`, as `kubectl get` shows them with Knative's CRDs (plus the autoscaler's
/// view for revisions).
pub fn columns(kind: ServingKind) -> &'static [&'static str] {
    match kind {
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
    }
}

/// The table of `objects` (all of one kind).
pub fn table<'a>(kind: ServingKind, objects: impl IntoIterator<Item = &'a ServingObject>) -> Table {
    Table {
        columns: columns(kind).iter().map(|c| (*c).to_owned()).collect(),
        rows: objects.into_iter().map(row).collect(),
    }
}

fn ready_and_reason(conditions: &[Condition]) -> [String; 2] {
    match conditions.iter().find(|c| c.type_ == CONDITION_READY) {
        Some(c) => [status_word(c.status).to_owned(), c.reason.clone()],
        None => ["Unknown".to_owned(), String::new()],
    }
}

fn status_word(status: ConditionStatus) -> &'static str {
    match status {
        ConditionStatus::True => "True",
        ConditionStatus::False => "False",
        ConditionStatus::Unknown => "Unknown",
    }
}

fn number(n: Option<i64>) -> String {
    n.map(|n| n.to_string()).unwrap_or_default()
}

/// One object's cells, in [`columns`] order.
pub fn row(object: &ServingObject) -> Row {
    let meta = object.meta();
    let name = meta.name.clone();
    let cells = match object {
        ServingObject::Service(s) => {
            let status = s.status.clone().unwrap_or_default();
            let [ready, reason] = ready_and_reason(&status.conditions);
            vec![
                name,
                status.url,
                status.latest_created_revision_name,
                status.latest_ready_revision_name,
                ready,
                reason,
            ]
        }
        ServingObject::Configuration(c) => {
            let status = c.status.clone().unwrap_or_default();
            let [ready, reason] = ready_and_reason(&status.conditions);
            vec![
                name,
                status.latest_created_revision_name,
                status.latest_ready_revision_name,
                ready,
                reason,
            ]
        }
        ServingObject::Revision(r) => {
            let status = r.status.clone().unwrap_or_default();
            let [ready, reason] = ready_and_reason(&status.conditions);
            let label = |key: &str| meta.labels.get(key).cloned().unwrap_or_default();
            vec![
                name,
                label(CONFIGURATION_LABEL),
                label(CONFIGURATION_GENERATION_LABEL),
                ready,
                reason,
                number(status.actual_replicas),
                number(status.desired_replicas),
                status.serving_mode.unwrap_or_default(),
                match status.in_panic {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => String::new(),
                },
            ]
        }
        ServingObject::Route(r) => {
            let status = r.status.clone().unwrap_or_default();
            let [ready, reason] = ready_and_reason(&status.conditions);
            vec![name, status.url, ready, reason]
        }
    };
    Row {
        namespace: meta.namespace.clone(),
        cells,
    }
}

#[cfg(test)]
mod tests {
    use knarr_model::serving::{Revision, RevisionStatus, Service, ServiceStatus};
    use knarr_model::ObjectMeta;

    use super::*;

    #[test]
    fn rows_follow_the_columns() {
        let service = ServingObject::Service(Service {
            metadata: ObjectMeta {
                name: "hello".into(),
                namespace: "default".into(),
                ..Default::default()
            },
            status: Some(ServiceStatus {
                url: "http://hello.default.example.com".into(),
                latest_created_revision_name: "hello-00002".into(),
                latest_ready_revision_name: "hello-00001".into(),
                conditions: vec![Condition::new(
                    CONDITION_READY,
                    ConditionStatus::Unknown,
                    "RevisionMissing",
                    "",
                )],
                ..Default::default()
            }),
            ..Default::default()
        });
        let revision = ServingObject::Revision(Revision {
            metadata: ObjectMeta {
                name: "hello-00001".into(),
                namespace: "default".into(),
                labels: [
                    (CONFIGURATION_LABEL.to_owned(), "hello".to_owned()),
                    (CONFIGURATION_GENERATION_LABEL.to_owned(), "1".to_owned()),
                ]
                .into(),
                ..Default::default()
            },
            status: Some(RevisionStatus {
                actual_replicas: Some(2),
                desired_replicas: Some(3),
                serving_mode: Some("Proxy".into()),
                in_panic: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        });
        let t = table(ServingKind::Service, [&service]);
        assert_eq!(t.columns.len(), t.rows[0].cells.len());
        assert_eq!(
            t.rows[0].cells,
            [
                "hello",
                "http://hello.default.example.com",
                "hello-00002",
                "hello-00001",
                "Unknown",
                "RevisionMissing"
            ]
        );
        let t = table(ServingKind::Revision, [&revision]);
        assert_eq!(t.columns.len(), t.rows[0].cells.len());
        assert_eq!(
            t.rows[0].cells,
            [
                "hello-00001",
                "hello",
                "1",
                "Unknown",
                "",
                "2",
                "3",
                "Proxy",
                "yes"
            ]
        );
    }
}
