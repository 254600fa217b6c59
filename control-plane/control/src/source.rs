//! The source seam: what every source of objects (watched files, the Kubernetes API server)
//! hands the controllers. A [`Batch`] is a set of object changes plus the source's errors, each
//! located where the user can find it: a file (and line), or an API object.

use std::fmt;
use std::path::PathBuf;

use knarr_model::ObjectKey;

/// One change to the set of objects a source defines (the translator's own type).
pub use knarr_translate::reconcile::Change;

/// Where a source found a problem: the unit whose errors are replaced as a whole.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// A file (or a directory that cannot be listed).
    File(PathBuf),
    /// An object read from the API server.
    Object(ObjectKey),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Object(key) => write!(f, "{key}"),
        }
    }
}

/// Something wrong with a file, with one object in it, or with one API object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    pub origin: Origin,
    /// The object the error is about, when it could be told.
    pub object: Option<ObjectKey>,
    /// The full message, starting with the file (and line) or the object.
    pub message: String,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// What one read of a source produced.
///
/// For every origin the batch names (in `errors` or `cleared`), the errors listed are all that
/// origin has now: a consumer keeping errors per origin replaces that origin's errors with these.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// At most one change per object, sorted by key.
    pub changes: Vec<Change>,
    pub errors: Vec<SourceError>,
    /// Origins that had errors before and have none now, or are gone.
    pub cleared: Vec<Origin>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.errors.is_empty() && self.cleared.is_empty()
    }
}
