//! `knarr apply` and `knarr delete`: hand manifests to a running `knarr up`, or take objects
//! away, and say what happened the way kubectl does (`service.serving.knative.dev/hello created`).

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::ValueEnum;
use http::{Method, StatusCode};
use knarr_control::api::ApplyAnswer;
use knarr_model::serving::{parse_serving_documents, ServingDocument, ServingKey, ServingKind};

use crate::api_client::{
    check_name, resource_name, serving_path, AlreadyReported, ApiArgs, ApiClient, DEFAULT_NAMESPACE,
};

#[derive(clap::Args)]
pub(crate) struct ApplyArgs {
    /// A manifest, a directory of them (its *.yaml, *.yml and *.json files), or `-` for stdin
    /// (relative working directories then start from the current one). Repeatable.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR",
        required = true
    )]
    files: Vec<PathBuf>,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DeleteWhat {
    /// A Knative Service (with its Configuration, Route and Revisions).
    #[value(alias = "service", alias = "services", alias = "kservice")]
    Ksvc,
    /// A Configuration (with its Revisions).
    #[value(alias = "configurations", alias = "config")]
    Configuration,
    /// A Route.
    #[value(alias = "routes")]
    Route,
}

impl DeleteWhat {
    fn kind(self) -> ServingKind {
        match self {
            DeleteWhat::Ksvc => ServingKind::Service,
            DeleteWhat::Configuration => ServingKind::Configuration,
            DeleteWhat::Route => ServingKind::Route,
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct DeleteArgs {
    /// What to delete.
    #[arg(
        value_enum,
        required_unless_present = "files",
        conflicts_with = "files"
    )]
    what: Option<DeleteWhat>,
    /// The names.
    #[arg(required_unless_present = "files")]
    names: Vec<String>,
    /// Delete the objects a manifest (or a directory of them) names instead. Repeatable.
    #[arg(short = 'f', long = "filename", value_name = "FILE|DIR")]
    files: Vec<PathBuf>,
    /// The namespace [default: default].
    #[arg(short = 'n', long, conflicts_with = "files")]
    namespace: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

/// A manifest read from disk (or stdin).
struct Manifest {
    /// As the user named it, for messages.
    name: String,
    /// Where relative `workingDir`s point: the manifest's directory.
    base_dir: PathBuf,
    text: String,
}

/// Reads every manifest `paths` name, all of them before anything is sent: a typo in the last
/// path should not leave the first ones applied.
fn read_manifests(paths: &[PathBuf]) -> anyhow::Result<Vec<Manifest>> {
    let mut manifests = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the manifest from stdin")?;
            manifests.push(Manifest {
                name: "stdin".into(),
                base_dir: std::env::current_dir()?,
                text,
            });
            continue;
        }
        let files = if path.is_dir() {
            let files = manifests_in(path)?;
            if files.is_empty() {
                bail!("{}: no *.yaml, *.yml or *.json files", path.display());
            }
            files
        } else {
            vec![path.clone()]
        };
        for file in files {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let absolute = std::path::absolute(&file)?;
            manifests.push(Manifest {
                name: file.display().to_string(),
                base_dir: absolute.parent().unwrap_or(Path::new("/")).to_owned(),
                text,
            });
        }
    }
    Ok(manifests)
}

/// The manifests directly in `dir`, sorted by name.
fn manifests_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        let is_manifest = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if is_manifest && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

pub(crate) fn apply(args: &ApplyArgs) -> anyhow::Result<()> {
    let manifests = read_manifests(&args.files)?;
    let client = args.api.client("`knarr up`")?;
    let mut failed = false;
    for manifest in manifests {
        let headers = [
            (
                knarr::api::SOURCE_HEADER,
                knarr::api::encode_header_text(&manifest.name),
            ),
            (
                knarr::api::BASE_DIR_HEADER,
                knarr::api::encode_header_text(&manifest.base_dir.to_string_lossy()),
            ),
        ];
        let reply = client.send(
            &Method::POST,
            "/api/v1/apply",
            &headers,
            Bytes::from(manifest.text),
        )?;
        match reply.status {
            StatusCode::OK => {
                let answer: ApplyAnswer = serde_json::from_value(reply.json()?)?;
                if answer.applied.is_empty() {
                    eprintln!("{}: no Knative objects in it", manifest.name);
                }
                for object in answer.applied {
                    println!(
                        "{}/{} {}",
                        resource_name(&object.kind),
                        object.name,
                        object.outcome
                    );
                }
            }
            StatusCode::UNPROCESSABLE_ENTITY => {
                failed = true;
                let answer: ApplyAnswer = serde_json::from_value(reply.json()?)?;
                for error in answer.errors {
                    eprintln!("error: {error}");
                }
            }
            // No apply endpoint (`knarr serve`): the other files would fare no better.
            StatusCode::NOT_FOUND => bail!("{}", reply.text()),
            _ => {
                failed = true;
                eprintln!("error: {}: {}", manifest.name, reply.text());
            }
        }
    }
    if failed {
        return Err(AlreadyReported.into());
    }
    Ok(())
}

pub(crate) fn delete(args: &DeleteArgs) -> anyhow::Result<()> {
    let keys = match args.what {
        Some(what) => {
            let namespace = args.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
            check_name("namespace", namespace)?;
            for name in &args.names {
                check_name("name", name)?;
            }
            args.names
                .iter()
                .map(|name| ServingKey::new(what.kind(), namespace, name))
                .collect()
        }
        None => {
            let manifests = read_manifests(&args.files)?;
            let keys = named_objects(&manifests);
            if keys.is_empty() {
                bail!("no Knative Services, Configurations or Routes in the given files");
            }
            keys
        }
    };
    let client = args.api.client("`knarr up`")?;
    let mut failed = false;
    for key in keys {
        if !delete_one(&client, &key)? {
            failed = true;
        }
    }
    if failed {
        return Err(AlreadyReported.into());
    }
    Ok(())
}

/// The serving objects the manifests name, in order, once each. Invalid objects count too:
/// deleting needs only the kind and name.
fn named_objects(manifests: &[Manifest]) -> Vec<ServingKey> {
    let mut keys: Vec<ServingKey> = Vec::new();
    for manifest in manifests {
        for document in parse_serving_documents(&manifest.name, &manifest.text) {
            let key = match document {
                ServingDocument::Object { object, .. } => Some(object.key()),
                ServingDocument::Error(e) => e.object.filter(|k| !k.name.is_empty()),
                ServingDocument::Other(_) => None,
            };
            if let Some(key) = key.filter(|k| !keys.contains(k)) {
                keys.push(key);
            }
        }
    }
    keys
}

/// Deletes one object; `false` when the API refused (already reported).
fn delete_one(client: &ApiClient, key: &ServingKey) -> anyhow::Result<bool> {
    let path = serving_path(key.kind, Some((&key.namespace, &key.name)));
    if check_name("name", &key.name).is_err() || check_name("namespace", &key.namespace).is_err() {
        eprintln!("error: {key}: not a name Knarr can delete by");
        return Ok(false);
    }
    let reply = client.send(&Method::DELETE, &path, &[], Bytes::new())?;
    if reply.status == StatusCode::OK {
        println!("{}/{} deleted", resource_name(key.kind.as_str()), key.name);
        Ok(true)
    } else {
        eprintln!("error: {}", reply.text());
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_by_file_takes_every_serving_object_once() {
        let manifest = Manifest {
            name: "app.yaml".into(),
            base_dir: PathBuf::from("/"),
            text: r#"
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: hello}
spec:
  template:
    spec:
      containers: [{command: [python3, app.py]}]
---
apiVersion: serving.knative.dev/v1
kind: Route
metadata: {name: broken, namespace: prod}
spec:
  traffic: [{revisionName: x, percent: 50}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: other}
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: hello}
"#
            .into(),
        };
        assert_eq!(
            named_objects(&[manifest]),
            vec![
                ServingKey::new(ServingKind::Service, "default", "hello"),
                ServingKey::new(ServingKind::Route, "prod", "broken"),
            ]
        );
    }

    #[test]
    fn directories_give_their_manifests_sorted() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.yaml", "a.yml", "c.json", "notes.txt", "d.yaml.bak"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        let names: Vec<String> = manifests_in(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.yml", "b.yaml", "c.json"]);
    }

    #[test]
    fn manifests_resolve_against_their_own_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("svc.yaml"), "kind: x\n").unwrap();
        let manifests = read_manifests(&[dir.path().to_owned()]).unwrap();
        assert_eq!(manifests.len(), 1);
        assert_eq!(manifests[0].base_dir, dir.path());
        assert!(read_manifests(&[dir.path().join("missing.yaml")]).is_err());
    }
}
