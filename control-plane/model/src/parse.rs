//! YAML documents → objects, with errors that say where.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::validate::{self, FieldError};
use crate::{Kind, Object, ObjectKey};

/// One YAML document of a file, understood as far as possible.
#[derive(Debug, Clone, PartialEq)]
pub enum Document {
    /// An object Knarr reads, parsed and validated.
    Object { object: Object, line: usize },
    /// A well-formed object of a kind Knarr does not read (yet); ignored.
    Foreign {
        api_version: String,
        kind: String,
        name: String,
        line: usize,
    },
    /// Well-formed YAML with no `apiVersion`/`kind` (for example a Knarr routes file).
    Untyped { value: Value, line: usize },
    /// Broken YAML or an invalid object.
    Error(ParseError),
}

/// Why a document could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub file: String,
    /// 1-based line in the file, where known.
    pub line: Option<usize>,
    /// The object, when its kind, namespace and name could be read.
    pub object: Option<ObjectKey>,
    /// The offending field (`spec.rules[0].hosts`), when known.
    pub field: Option<String>,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_error(
            f,
            &self.file,
            self.line,
            self.object.as_ref().map(|o| o as &dyn fmt::Display),
            self.field.as_deref(),
            &self.reason,
        )
    }
}

/// The one shape of every source error: `file:line: Kind ns/name: field: reason`.
pub(crate) fn write_error(
    f: &mut fmt::Formatter<'_>,
    file: &str,
    line: Option<usize>,
    object: Option<&dyn fmt::Display>,
    field: Option<&str>,
    reason: &str,
) -> fmt::Result {
    // Objects read from the API server have no file: the object is where the error is.
    let mut sep = "";
    if !file.is_empty() {
        write!(f, "{file}")?;
        if let Some(line) = line {
            write!(f, ":{line}")?;
        }
        sep = ": ";
    }
    if let Some(object) = object {
        write!(f, "{sep}{object}")?;
        sep = ": ";
    }
    if let Some(field) = field {
        write!(f, "{sep}{field}")?;
        sep = ": ";
    }
    write!(f, "{sep}{reason}")
}

impl std::error::Error for ParseError {}

/// Splits `text` into YAML documents (`---` lines), with the 1-based line each starts on.
pub(crate) fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let is_separator = line == "---" || line.starts_with("--- ") || line == "...";
        if is_separator {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs.into_iter()
        .filter(|(_, d)| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// serde_yaml's message without its trailing " at line L column C", and the line.
pub(crate) fn yaml_error(e: &serde_yaml::Error, first_line: usize) -> (Option<usize>, String) {
    let line = e.location().map(|l| first_line + l.line() - 1);
    // Drop every " at line L column C": the line is reported once, file-relative.
    let mut message = e.to_string();
    while let Some(at) = message.find(" at line ") {
        let rest = &message[at + " at line ".len()..];
        let after_numbers = rest
            .find(|c: char| !(c.is_ascii_digit() || c == ' ' || "column".contains(c)))
            .unwrap_or(rest.len());
        message.replace_range(at..at + " at line ".len() + after_numbers, "");
    }
    (line, message)
}

/// Parses every document of one file.
pub fn parse_documents(file: &str, text: &str) -> Vec<Document> {
    let mut out = Vec::new();
    for (line, doc) in split_documents(text) {
        parse_document(file, line, &doc, &mut out);
    }
    out
}

pub(crate) fn str_at<'v>(value: &'v Value, path: &[&str]) -> Option<&'v str> {
    let mut v = value;
    for key in path {
        v = v.get(key)?;
    }
    v.as_str()
}

fn parse_document(file: &str, chunk_start: usize, doc: &str, out: &mut Vec<Document>) {
    // `chunk_start` is where the document's text begins (for error offsets); `line` is its
    // first line with content (what a person would call "the object at line N").
    let line = chunk_start
        + doc
            .lines()
            .position(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .unwrap_or(0);
    let value: Value = match serde_yaml::from_str(doc) {
        Ok(v) => v,
        Err(e) => {
            let (at, reason) = yaml_error(&e, chunk_start);
            out.push(Document::Error(ParseError {
                file: file.to_owned(),
                line: at.or(Some(line)),
                object: None,
                field: None,
                reason: format!("not valid YAML: {reason}"),
            }));
            return;
        }
    };
    if value.is_null() {
        return;
    }
    parse_value(file, line, value, Some((doc, chunk_start)), out);
}

/// Parses one object read from the Kubernetes API server (already decoded). Errors name the
/// object and the field, with no file or line. `Ok(None)`: a kind Knarr does not read.
#[allow(clippy::result_large_err)] // once per watch event; the error is the message users read
pub fn parse_api_object(value: Value) -> Result<Option<Object>, ParseError> {
    let mut out = Vec::new();
    parse_value("", 0, value, None, &mut out);
    match out.pop() {
        Some(Document::Object { object, .. }) => Ok(Some(object)),
        Some(Document::Error(mut e)) => {
            e.line = None;
            Err(e)
        }
        _ => Ok(None),
    }
}

/// Turns a decoded document into an object (or an error). `text` is the document's source
/// and where it starts, when it came from a file, for line numbers.
fn parse_value(
    file: &str,
    line: usize,
    value: Value,
    text: Option<(&str, usize)>,
    out: &mut Vec<Document>,
) {
    let api_version = str_at(&value, &["apiVersion"]).map(str::to_owned);
    let kind_name = str_at(&value, &["kind"]).map(str::to_owned);
    let (Some(api_version), Some(kind_name)) = (api_version, kind_name) else {
        out.push(Document::Untyped { value, line });
        return;
    };
    let name = str_at(&value, &["metadata", "name"])
        .unwrap_or_default()
        .to_owned();
    let namespace = str_at(&value, &["metadata", "namespace"])
        .filter(|ns| !ns.is_empty())
        .unwrap_or("default")
        .to_owned();

    if kind_name == "List" && api_version == "v1" {
        // `kubectl get -o yaml` output: parse each item (lines are the list's).
        if let Some(items) = value.get("items").and_then(Value::as_sequence) {
            for item in items {
                match serde_yaml::to_string(item) {
                    Ok(text) => parse_document(file, line, &text, out),
                    Err(e) => out.push(Document::Error(ParseError {
                        file: file.to_owned(),
                        line: Some(line),
                        object: None,
                        field: Some("items".into()),
                        reason: e.to_string(),
                    })),
                }
            }
        }
        return;
    }

    let kind = match (api_version.as_str(), kind_name.as_str()) {
        ("networking.internal.knative.dev/v1alpha1", "Ingress") => Kind::Ingress,
        ("v1", "Service") => Kind::Service,
        ("v1", "Endpoints") => Kind::Endpoints,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("v1", "Secret") if str_at(&value, &["type"]) == Some("kubernetes.io/tls") => Kind::Secret,
        _ => {
            out.push(Document::Foreign {
                api_version,
                kind: kind_name,
                name,
                line,
            });
            return;
        }
    };
    let key = ObjectKey::new(kind, &namespace, &name);
    let fail = |line: Option<usize>, field: Option<String>, reason: String| {
        Document::Error(ParseError {
            file: file.to_owned(),
            line,
            object: Some(key.clone()),
            field,
            reason,
        })
    };
    if name.is_empty() {
        out.push(fail(
            Some(line),
            Some("metadata.name".into()),
            "is required".into(),
        ));
        return;
    }

    // The document is already parsed: convert the tree (fast); only if that fails, parse the
    // text again for an error with a line number.
    let tree = value;
    fn typed_from<T: DeserializeOwned>(
        tree: Value,
        text: Option<(&str, usize)>,
    ) -> Result<T, (Option<usize>, String)> {
        match serde_yaml::from_value(tree) {
            Ok(t) => Ok(t),
            Err(e) => match text {
                Some((doc, start)) => serde_yaml::from_str(doc).map_err(|e| yaml_error(&e, start)),
                None => Err((None, e.to_string())),
            },
        }
    }
    let parsed: Result<Object, (Option<usize>, String)> = match kind {
        Kind::Ingress => typed_from(tree, text).map(Object::Ingress),
        Kind::Service => typed_from(tree, text).map(Object::Service),
        Kind::Endpoints => typed_from(tree, text).map(Object::Endpoints),
        Kind::EndpointSlice => typed_from(tree, text).map(Object::EndpointSlice),
        Kind::Secret => {
            typed_from(tree, text).map(|sec| Object::TlsSecret(sec, Default::default()))
        }
        // Never chosen above: serving documents are read by `parse_serving_documents`.
        Kind::Serving(k) => Err((None, format!("{k} is read by the serving parser"))),
    };
    let mut object = match parsed {
        Ok(o) => o,
        Err((at, reason)) => {
            // serde_yaml's messages start with the field path ("spec.rules[0]: ...").
            let (field, reason) = match reason.split_once(": ") {
                Some((path, rest)) if !path.contains(' ') => {
                    (Some(path.to_owned()), rest.to_owned())
                }
                _ => (None, reason),
            };
            out.push(fail(at.or(Some(line)), field, reason));
            return;
        }
    };
    set_namespace(&mut object, &namespace);
    match validate::validate(&mut object) {
        Ok(()) => out.push(Document::Object { object, line }),
        Err(FieldError { field, reason }) => {
            let at = text
                .and_then(|(doc, start)| field_line(doc, &field).map(|l| start + l - 1))
                .unwrap_or(line);
            out.push(fail(Some(at), Some(field), reason));
        }
    }
}

fn set_namespace(object: &mut Object, namespace: &str) {
    let meta = match object {
        Object::Ingress(o) => &mut o.metadata,
        Object::Service(o) => &mut o.metadata,
        Object::Endpoints(o) => &mut o.metadata,
        Object::EndpointSlice(o) => &mut o.metadata,
        Object::TlsSecret(o, _) => &mut o.metadata,
        Object::Serving(o) => o.meta_mut(),
    };
    meta.namespace = namespace.to_owned();
}

/// Best effort: the line (1-based, within `doc`) where the last named key of `field` appears,
/// e.g. `percent` for `spec.rules[0].http.paths[0].splits[1].percent`.
fn field_line(doc: &str, field: &str) -> Option<usize> {
    let last = field
        .rsplit('.')
        .next()?
        .split('[')
        .next()
        .filter(|k| !k.is_empty())?;
    let needle = format!("{last}:");
    doc.lines()
        .position(|l| {
            let t = l.trim_start().trim_start_matches("- ");
            t.starts_with(&needle)
        })
        .map(|i| i + 1)
}
