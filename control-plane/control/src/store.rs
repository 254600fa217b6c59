//! The file world's store of what users applied — watched manifests and `knarr apply` — kept as
//! an API server would keep it: a generation per object, bumped when its spec changes; Knative's
//! update checks (a Service's or Configuration's immutable fields); `created`, `configured` or
//! `unchanged` for each applied object. On Kubernetes the API server and Knarr's admission webhook
//! do this instead; the serving core sees the same objects either way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use knarr_autoscaler::{AutoscalerConfig, RevisionScaling};
use knarr_model::serving::{parse_serving_documents, ServingDocument, ServingKey, ServingObject};
use knarr_model::{Document, Kind};
use serde::{Deserialize, Serialize};

use crate::source::Change;

/// What `knarr apply` did with one object, as kubectl says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// `Service`, `Configuration` or `Route`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// `created`, `configured` or `unchanged`.
    pub outcome: String,
}

/// A change the store accepted, for the serving core.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    Upsert(ServingObject),
    Delete(ServingKey),
}

/// See the module docs.
#[derive(Default)]
pub struct Store {
    /// With autoscaling on, the templates' `autoscaling.knative.dev/*` annotations are checked
    /// as the autoscaler will read them.
    autoscaling: Option<AutoscalerConfig>,
    applied: BTreeMap<ServingKey, ServingObject>,
    /// Watched manifests refused (an update Knative's webhook would refuse); the previous
    /// version stays. Cleared when the object is accepted or deleted.
    refused: BTreeMap<ServingKey, String>,
}

impl Store {
    pub fn new(autoscaling: Option<AutoscalerConfig>) -> Store {
        Store {
            autoscaling,
            ..Default::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.applied.is_empty()
    }

    /// Watched files' changes (only serving objects; others are ignored). Returns what was
    /// stored and the messages of what was refused (the previous version stays).
    pub fn apply_changes(&mut self, changes: Vec<Change>) -> (Vec<Stored>, Vec<String>) {
        let mut stored = Vec::new();
        let mut refused = Vec::new();
        for change in changes {
            match change {
                Change::Upsert(object) => {
                    let knarr_model::Object::Serving(object) = &*object else {
                        continue;
                    };
                    let key = object.key();
                    match self.upsert((**object).clone()) {
                        Ok(object) => {
                            self.refused.remove(&key);
                            stored.push(Stored::Upsert(object));
                        }
                        Err(e) => {
                            self.refused.insert(key, e.clone());
                            refused.push(e);
                        }
                    }
                }
                Change::Delete(key) => {
                    if let Kind::Serving(kind) = key.kind {
                        let key = ServingKey::new(kind, &key.namespace, &key.name);
                        self.refused.remove(&key);
                        if self.applied.remove(&key).is_some() {
                            stored.push(Stored::Delete(key));
                        }
                    }
                }
            }
        }
        (stored, refused)
    }

    /// `knarr apply`: every serving document of `text` (named `file` in errors), all or none.
    /// Relative or missing `workingDir`s are resolved against `base_dir`. Errors are complete
    /// messages (`file:line: Service default/hello: spec.template...: reason`).
    pub fn apply_manifest(
        &mut self,
        file: &str,
        text: &str,
        base_dir: Option<&Path>,
    ) -> Result<(Vec<Applied>, Vec<Stored>), Vec<String>> {
        let mut objects = Vec::new();
        let mut errors = Vec::new();
        for document in parse_serving_documents(file, text) {
            match document {
                ServingDocument::Object { mut object, line } => {
                    if let Some(base) = base_dir {
                        resolve_working_dirs(&mut object, base);
                    }
                    objects.push((object, line));
                }
                ServingDocument::Error(e) => errors.push(e.to_string()),
                ServingDocument::Other(Document::Object { object, line }) => errors.push(format!(
                    "{file}:{line}: {}: knarr apply takes Knative Services, Configurations and \
                     Routes (serving.knative.dev/v1); put other objects in a folder `knarr up` watches",
                    object.key()
                )),
                ServingDocument::Other(Document::Foreign {
                    api_version,
                    kind,
                    line,
                    ..
                }) => errors.push(format!(
                    "{file}:{line}: {kind} ({api_version}) is not something knarr apply knows; \
                     it takes serving.knative.dev/v1 Services, Configurations and Routes"
                )),
                ServingDocument::Other(Document::Error(e)) => errors.push(e.to_string()),
                ServingDocument::Other(Document::Untyped { line, .. }) => errors.push(format!(
                    "{file}:{line}: the document has no apiVersion and kind"
                )),
            }
        }
        if objects.is_empty() && errors.is_empty() {
            errors.push(format!("{file}: no objects in it"));
        }
        // Check everything first: all or none.
        let mut seen = BTreeSet::new();
        for (object, line) in &objects {
            let key = object.key();
            if !seen.insert(key.clone()) {
                errors.push(format!("{file}:{line}: {key}: defined twice"));
            }
            if let Err(e) = self.check(object) {
                errors.push(format!("{file}:{line}: {e}"));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut applied = Vec::new();
        let mut stored = Vec::new();
        for (object, _) in objects {
            let key = object.key();
            let outcome = match self.applied.get(&key) {
                None => "created",
                Some(old) if same_content(old, &object) => "unchanged",
                Some(_) => "configured",
            };
            self.refused.remove(&key);
            if let Ok(object) = self.upsert(object) {
                if outcome != "unchanged" {
                    stored.push(Stored::Upsert(object));
                }
            }
            applied.push(Applied {
                kind: key.kind.as_str().to_owned(),
                namespace: key.namespace,
                name: key.name,
                outcome: outcome.to_owned(),
            });
        }
        Ok((applied, stored))
    }

    /// Removes what users applied under `key`; whether there was anything.
    pub fn remove(&mut self, key: &ServingKey) -> bool {
        self.refused.remove(key);
        self.applied.remove(key).is_some()
    }

    /// Watched manifests refused by the update checks (the previous version is running).
    pub fn errors(&self) -> Vec<String> {
        self.refused.values().cloned().collect()
    }

    /// Whether `object` may replace what is stored under its key (Knative's update checks and
    /// the autoscaling annotations).
    fn check(&self, object: &ServingObject) -> Result<(), String> {
        let key = object.key();
        let errors = match (object, self.applied.get(&key)) {
            (ServingObject::Revision(_), _) => {
                return Err(format!(
                    "{key}: Revisions are stamped from a Configuration's template; apply a Service or a Configuration instead"
                ))
            }
            (ServingObject::Service(new), Some(ServingObject::Service(old))) => new.validate_update(old),
            (ServingObject::Configuration(new), Some(ServingObject::Configuration(old))) => {
                new.validate_update(old)
            }
            _ => Vec::new(),
        };
        if let Some(e) = errors.first() {
            return Err(format!("{key}: {}: {}", e.field, e.reason));
        }
        self.check_autoscaling(object)
    }

    /// The template's `autoscaling.knative.dev/*` annotations, checked as the autoscaler reads
    /// them: `Service default/x: spec.template.metadata.annotations[…]: …`.
    fn check_autoscaling(&self, object: &ServingObject) -> Result<(), String> {
        let Some(config) = &self.autoscaling else {
            return Ok(());
        };
        let template = match object {
            ServingObject::Service(s) => &s.spec.template,
            ServingObject::Configuration(c) => &c.spec.template,
            _ => return Ok(()),
        };
        RevisionScaling::from_annotations(
            &template.metadata.annotations,
            template.spec.container_concurrency(),
            config,
        )
        .map(|_| ())
        .map_err(|e| format!("{}: spec.template.{}: {}", object.key(), e.field, e.reason))
    }

    /// Stores `object` (after [`Store::check`]), bumping its generation when its spec changed.
    fn upsert(&mut self, mut object: ServingObject) -> Result<ServingObject, String> {
        self.check(&object)?;
        let key = object.key();
        let generation = match self.applied.get(&key) {
            Some(old) if spec_of(old) == spec_of(&object) => old.meta().generation.unwrap_or(1),
            Some(old) => old.meta().generation.unwrap_or(1) + 1,
            None => 1,
        };
        object.meta_mut().generation = Some(generation);
        self.applied.insert(key, object.clone());
        Ok(object)
    }
}

/// The spec of an object, for generation bumps.
fn spec_of(object: &ServingObject) -> serde_json::Value {
    object.manifest()["spec"].take()
}

/// The same object but for the generation the store gives it.
fn same_content(stored: &ServingObject, new: &ServingObject) -> bool {
    let mut stored = stored.clone();
    stored.meta_mut().generation = new.meta().generation;
    stored == *new
}

/// Makes every container's `workingDir` absolute: relative ones are joined to `base`, missing
/// ones become `base` (the manifest's directory, so `command: [python3, app.py]` finds the app
/// wherever `knarr up` was started).
pub fn resolve_working_dirs(object: &mut ServingObject, base: &Path) {
    let spec = match object {
        ServingObject::Service(s) => &mut s.spec.template.spec,
        ServingObject::Configuration(c) => &mut c.spec.template.spec,
        ServingObject::Revision(r) => &mut r.spec,
        ServingObject::Route(_) => return,
    };
    let base = std::path::absolute(base).unwrap_or_else(|_| base.to_owned());
    for container in &mut spec.containers {
        let dir = base.join(&container.working_dir);
        container.working_dir = dir.to_string_lossy().into_owned();
    }
}

#[cfg(test)]
mod tests {
    use knarr_model::serving::Service;

    use super::*;

    fn service(target: &str) -> String {
        format!(
            "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {{name: hello, namespace: default}}\n\
             spec:\n  template:\n    spec:\n      containers:\n      - image: x\n        command: [app]\n        \
             env: [{{name: TARGET, value: {target}}}]\n"
        )
    }

    fn generation(store: &Store) -> Option<i64> {
        store.applied.values().next()?.meta().generation
    }

    #[test]
    fn apply_says_created_configured_unchanged_and_bumps_the_generation_on_spec_changes_only() {
        let mut store = Store::default();
        let mut outcome = |text: &str| {
            store.apply_manifest("hello.yaml", text, None).unwrap().0[0]
                .outcome
                .clone()
        };
        assert_eq!(outcome(&service("a")), "created");
        assert_eq!(outcome(&service("a")), "unchanged");
        let labelled = service("a").replace(
            "metadata: {name: hello, namespace: default}",
            "metadata: {name: hello, namespace: default, labels: {team: x}}",
        );
        assert_eq!(outcome(&labelled), "configured");
        assert_eq!(generation(&store), Some(1));
        let mut store2 = Store::default();
        store2
            .apply_manifest("hello.yaml", &service("a"), None)
            .unwrap();
        let (applied, stored) = store2
            .apply_manifest("hello.yaml", &service("b"), None)
            .unwrap();
        assert_eq!(applied[0].outcome, "configured");
        assert_eq!(generation(&store2), Some(2));
        assert!(matches!(&stored[..], [Stored::Upsert(o)] if o.meta().generation == Some(2)));
    }

    #[test]
    fn apply_is_all_or_nothing_and_names_file_line_object_and_field() {
        let mut store = Store::default();
        let bad = service("a").replace(
            "      - image: x\n",
            "      - image: x\n        ports: [{containerPort: 8012}]\n",
        );
        let text = format!(
            "{}\n---\n{}",
            service("a").replace("name: hello", "name: other"),
            bad
        );
        let errors = store.apply_manifest("two.yaml", &text, None).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("two.yaml:"), "{}", errors[0]);
        assert!(
            errors[0].contains("Service default/hello")
                && errors[0].contains("spec.template.spec.containers[0].ports[0].containerPort"),
            "{}",
            errors[0]
        );
        assert!(store.is_empty(), "nothing applied");

        let revision =
            "apiVersion: serving.knative.dev/v1\nkind: Revision\nmetadata: {name: r-00001}\n\
                        spec: {containers: [{image: x}]}\n";
        let errors = store
            .apply_manifest("rev.yaml", revision, None)
            .unwrap_err();
        assert!(
            errors[0].contains("apply a Service or a Configuration"),
            "{errors:?}"
        );
        let other = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n";
        let errors = store.apply_manifest("cm.yaml", other, None).unwrap_err();
        assert!(errors[0].contains("ConfigMap"), "{errors:?}");
    }

    #[test]
    fn autoscaling_annotations_are_checked_with_their_field_path() {
        let mut store = Store::new(Some(AutoscalerConfig::default()));
        let text = service("a").replace(
            "  template:\n    spec:",
            "  template:\n    metadata:\n      annotations: {autoscaling.knative.dev/metric: memory}\n    spec:",
        );
        let errors = store.apply_manifest("h.yaml", &text, None).unwrap_err();
        assert!(
            errors[0].contains(
                "Service default/hello: spec.template.metadata.annotations[autoscaling.knative.dev/metric]"
            ),
            "{errors:?}"
        );
    }

    #[test]
    fn working_dirs_resolve_against_the_manifest_folder() {
        let mut object = ServingObject::Service(Service::default());
        if let ServingObject::Service(s) = &mut object {
            s.spec.template.spec.containers = vec![Default::default(), Default::default()];
            s.spec.template.spec.containers[1].working_dir = "sub".into();
        }
        resolve_working_dirs(&mut object, Path::new("/srv/app"));
        let ServingObject::Service(s) = object else {
            unreachable!()
        };
        let dirs: Vec<&str> = s
            .spec
            .template
            .spec
            .containers
            .iter()
            .map(|c| c.working_dir.as_str())
            .collect();
        assert_eq!(dirs, ["/srv/app/", "/srv/app/sub"]);
    }
}
