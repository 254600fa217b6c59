//! The objects Knarr reads, as Knative and Kubernetes define them, and how they are parsed from
//! YAML and validated.
//!
//! Data comes from a source (files today, the API server later) as YAML documents; it leaves as
//! typed, validated [`Object`]s keyed by [`ObjectKey`], for translation. Every error names the
//! file and line where it can, the object, the field and the reason. This crate knows nothing of
//! Envoy, gRPC or the Kubernetes client.

pub mod k8s;
mod parse;
pub mod serving;
mod validate;

use std::fmt;

pub use k8s::*;
pub use parse::{parse_api_object, parse_documents, Document, ParseError};
pub use validate::{FieldError, TlsKeyPair};

/// The annotation that says which ingress implementation owns a KIngress.
pub const INGRESS_CLASS_ANNOTATION: &str = "networking.knative.dev/ingress.class";
/// Knarr's own ingress class.
pub const KNARR_INGRESS_CLASS: &str = "knarr.ingress.networking.knative.dev";

/// The kinds Knarr understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Ingress,
    Service,
    Endpoints,
    EndpointSlice,
    Secret,
    /// A `serving.knative.dev/v1` kind (read only by `knarr up`).
    Serving(serving::ServingKind),
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Ingress => "Ingress",
            Kind::Service => "Service",
            Kind::Endpoints => "Endpoints",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Secret => "Secret",
            Kind::Serving(k) => k.as_str(),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies one object: kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        ObjectKey {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A parsed, validated object.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Ingress(Ingress),
    Service(Service),
    Endpoints(Endpoints),
    EndpointSlice(EndpointSlice),
    /// A `kubernetes.io/tls` Secret, with its certificate and key decoded.
    TlsSecret(Secret, TlsKeyPair),
    /// A Knative Service, Configuration, Revision or Route, defaulted and validated.
    Serving(Box<serving::ServingObject>),
}

impl Object {
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Ingress(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::Endpoints(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::TlsSecret(o, _) => &o.metadata,
            Object::Serving(o) => o.meta(),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Object::Ingress(_) => Kind::Ingress,
            Object::Service(_) => Kind::Service,
            Object::Endpoints(_) => Kind::Endpoints,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::TlsSecret(..) => Kind::Secret,
            Object::Serving(o) => Kind::Serving(o.kind()),
        }
    }

    pub fn key(&self) -> ObjectKey {
        let meta = self.meta();
        ObjectKey::new(self.kind(), &meta.namespace, &meta.name)
    }
}

impl Ingress {
    /// The ingress class this object asks for (`None` if unannotated: the default class).
    pub fn class(&self) -> Option<&str> {
        self.metadata
            .annotations
            .get(INGRESS_CLASS_ANNOTATION)
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests;
