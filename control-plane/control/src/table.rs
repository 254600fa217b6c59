//! kubectl's columns for Knative's kinds, computed where the objects are — as the Kubernetes API
//! server prints `Table`s — so that `knarr get` over thousands of objects moves a few short
//! strings per object instead of whole manifests. The status API answers them for `?as=table`;
//! the CLI renders them.

use std::sync::Arc;

use knarr_model::serving::{
    Condition, ConditionStatus, Configuration, Revision, Route, Service, ServingKey, ServingKind,
    ServingObject, CONDITION_READY, CONFIGURATION_GENERATION_LABEL, CONFIGURATION_LABEL,
};
use knarr_model::ObjectMeta;
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

/// The table of `kind`'s objects in `view` (of one namespace, or all), read in place.
pub fn view_table(view: &knarr_serving::View, kind: ServingKind, namespace: Option<&str>) -> Table {
    fn rows<T>(
        map: &imbl::OrdMap<ServingKey, Arc<T>>,
        kind: ServingKind,
        namespace: Option<&str>,
        row: fn(&T) -> Row,
    ) -> Vec<Row> {
        match namespace {
            None => map.values().map(|o| row(o)).collect(),
            Some(ns) => map
                .range(ServingKey::new(kind, ns, "")..)
                .take_while(|(k, _)| k.namespace == ns)
                .map(|(_, o)| row(o))
                .collect(),
        }
    }
    let rows = match kind {
        ServingKind::Service => rows(&view.services, kind, namespace, service_row),
        ServingKind::Configuration => {
            rows(&view.configurations, kind, namespace, configuration_row)
        }
        ServingKind::Revision => rows(&view.revisions, kind, namespace, revision_row),
        ServingKind::Route => rows(&view.routes, kind, namespace, route_row),
    };
    Table {
        columns: columns(kind).iter().map(|c| (*c).to_owned()).collect(),
        rows,
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
    match object {
        ServingObject::Service(s) => service_row(s),
        ServingObject::Configuration(c) => configuration_row(c),
        ServingObject::Revision(r) => revision_row(r),
        ServingObject::Route(r) => route_row(r),
    }
}

fn row_of(meta: &ObjectMeta, cells: Vec<String>) -> Row {
    Row {
        namespace: meta.namespace.clone(),
        cells,
    }
}

pub fn service_row(s: &Service) -> Row {
    let Some(status) = &s.status else {
        return row_of(&s.metadata, empty_row(&s.metadata, ServingKind::Service));
    };
    let [ready, reason] = ready_and_reason(&status.conditions);
    let cells = vec![
        s.metadata.name.clone(),
        status.url.clone(),
        status.latest_created_revision_name.clone(),
        status.latest_ready_revision_name.clone(),
        ready,
        reason,
    ];
    row_of(&s.metadata, cells)
}

pub fn configuration_row(c: &Configuration) -> Row {
    let Some(status) = &c.status else {
        return row_of(
            &c.metadata,
            empty_row(&c.metadata, ServingKind::Configuration),
        );
    };
    let [ready, reason] = ready_and_reason(&status.conditions);
    let cells = vec![
        c.metadata.name.clone(),
        status.latest_created_revision_name.clone(),
        status.latest_ready_revision_name.clone(),
        ready,
        reason,
    ];
    row_of(&c.metadata, cells)
}

pub fn revision_row(r: &Revision) -> Row {
    let meta = &r.metadata;
    let label = |key: &str| meta.labels.get(key).cloned().unwrap_or_default();
    let (conditions, actual, desired, mode, panic) = match &r.status {
        Some(s) => (
            s.conditions.as_slice(),
            s.actual_replicas,
            s.desired_replicas,
            s.serving_mode.clone().unwrap_or_default(),
            s.in_panic,
        ),
        None => (&[][..], None, None, String::new(), None),
    };
    let [ready, reason] = ready_and_reason(conditions);
    let cells = vec![
        meta.name.clone(),
        label(CONFIGURATION_LABEL),
        label(CONFIGURATION_GENERATION_LABEL),
        ready,
        reason,
        number(actual),
        number(desired),
        mode,
        match panic {
            Some(true) => "yes".into(),
            Some(false) => "no".into(),
            None => String::new(),
        },
    ];
    row_of(meta, cells)
}

pub fn route_row(r: &Route) -> Row {
    let Some(status) = &r.status else {
        return row_of(&r.metadata, empty_row(&r.metadata, ServingKind::Route));
    };
    let [ready, reason] = ready_and_reason(&status.conditions);
    row_of(
        &r.metadata,
        vec![r.metadata.name.clone(), status.url.clone(), ready, reason],
    )
}

/// The cells of an object with no status yet.
fn empty_row(meta: &ObjectMeta, kind: ServingKind) -> Vec<String> {
    let mut cells = vec![String::new(); columns(kind).len()];
    cells[0] = meta.name.clone();
    let ready = columns(kind).iter().position(|c| *c == "READY");
    if let Some(i) = ready {
        cells[i] = "Unknown".into();
    }
    cells
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
