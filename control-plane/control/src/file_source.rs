//! The file source of `knarr serve`: objects read from the YAML files of `--source file:DIR`
//! directories and of repeated `-f FILE`s, and kept up to date while the files change.
//!
//! What comes out is a stream of [`Batch`]es: the objects to upsert or delete, and the errors of
//! the files that were read. A bad edit never takes away what is serving (DESIGN.md, "Last good
//! config wins"): an object whose document is invalid keeps its last good version, and a file
//! whose YAML is broken loses nothing. Only a file that parses cleanly without an object, or a
//! deleted file, deletes objects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use knarr_model::serving::{parse_serving_documents, ServingDocument};
use knarr_model::{parse_documents, Document, Kind, Object, ObjectKey, ParseError};
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, warn};

/// How long the files must be quiet before they are read, so that a burst (a `cp` of several
/// files, an editor's write-then-rename) becomes one batch. It is most of the latency from a
/// write to its batch, so it is kept small.
const DEBOUNCE: Duration = Duration::from_millis(2);
/// The longest a change waits: for a writer that keeps a file open, or a never-ending burst.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// How long a vanished file keeps its objects, in case it is being replaced (an editor that
/// moves the old file away before writing the new one) rather than deleted.
const DELETE_GRACE: Duration = Duration::from_millis(50);

pub use crate::source::{Batch, Change, Origin, SourceError};

/// The objects of a set of directories and files, and how they last read.
#[derive(Debug)]
pub struct FileSource {
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
    /// Every file read so far that still exists or is named by `-f`.
    state: BTreeMap<PathBuf, FileState>,
    /// The files defining each object, the one whose definition is used last.
    owners: HashMap<ObjectKey, Vec<PathBuf>>,
    /// What the consumer has been told: the object behind every upsert not since deleted.
    applied: HashMap<ObjectKey, Arc<Object>>,
    /// Directories that could not be listed last time.
    dir_errors: BTreeSet<PathBuf>,
    /// Files found missing while they still had objects, and since when (see [`DELETE_GRACE`]).
    missing_since: BTreeMap<PathBuf, Instant>,
    /// Also read `serving.knative.dev/v1` objects (`knarr up`); otherwise they are ignored.
    serving: bool,
}

#[derive(Debug, Default)]
struct FileState {
    /// The objects this file last contributed successfully.
    objects: BTreeMap<ObjectKey, Arc<Object>>,
    /// The errors of its last read.
    read_errors: Vec<SourceError>,
    /// The errors last reported for it: `read_errors` and conflicts with other files.
    reported: Vec<SourceError>,
    /// A hash of the text last parsed: the same text again needs no parsing (the catch-up
    /// read when watching starts, editors that save without changes).
    text_hash: Option<u64>,
}

enum Contents {
    Text(String),
    Missing,
    Unreadable(io::Error),
}

impl FileSource {
    /// `dirs` are read for their `*.yaml`, `*.yml` and `*.json` files (not recursively; dot files
    /// are skipped); `files` are read whatever their names.
    pub fn new(dirs: Vec<PathBuf>, files: Vec<PathBuf>) -> Self {
        // Absolute, so that paths compare equal to the ones the watcher reports.
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        FileSource {
            dirs: dirs.into_iter().map(absolute).collect(),
            files: files.into_iter().map(absolute).collect(),
            state: BTreeMap::new(),
            owners: HashMap::new(),
            applied: HashMap::new(),
            dir_errors: BTreeSet::new(),
            missing_since: BTreeMap::new(),
            serving: false,
        }
    }

    /// Reads Knative Services, Configurations, Revisions and Routes too (validated as Knative's
    /// webhook does), as [`Object::Serving`]; a container's relative or missing `workingDir`
    /// becomes the manifest's directory (joined with it).
    pub fn with_serving(mut self) -> Self {
        self.serving = true;
        self
    }

    /// Reads every file now. A missing directory or file is reported as an error.
    pub fn load(&mut self) -> Batch {
        let mut batch = Batch::default();
        let mut paths: BTreeSet<PathBuf> = self.files.iter().cloned().collect();
        paths.extend(self.state.keys().cloned());
        for dir in self.dirs.clone() {
            paths.extend(self.paths_in(&dir, true, &mut batch));
        }
        self.reload(&paths, None, true, &mut batch);
        batch
    }

    /// Watches the directories and files, and sends a [`Batch`] for every change (bursts are
    /// coalesced). Returns when `tx` is closed or `shutdown` turns true (or its sender is gone).
    ///
    /// Everything is read once more when watching starts, so that nothing changed since
    /// [`load`](Self::load) is missed; only what differs from what was last sent is sent.
    pub async fn watch(mut self, tx: mpsc::Sender<Batch>, mut shutdown: watch::Receiver<bool>) {
        let (events_tx, mut events) = mpsc::unbounded_channel();
        // Dropping the watcher stops it, so it lives as long as this loop.
        let watcher = match self.start_watcher(events_tx) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                // Keep serving what was loaded; it just won't follow the files.
                error!(error = %e, "cannot watch the source files; changes will not be seen");
                None
            }
        };

        // The catch-up read goes through `pending` like any change, so that a file being
        // written right now is read once it is closed.
        let mut pending = Pending::default();
        let now = Instant::now();
        for path in self.files.iter().chain(self.state.keys()).chain(&self.dirs) {
            pending.note(path.clone(), None, now);
        }
        let mut catching_up = true;

        loop {
            let grace = self.missing_since.values().map(|t| *t + DELETE_GRACE).min();
            let deadline = match (pending.deadline(), grace) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                () = stopped(&mut shutdown) => return,
                () = tx.closed() => return,
                event = events.recv(), if watcher.is_some() => match event {
                    Some(Ok(event)) => self.note(&event, &mut pending, Instant::now()),
                    Some(Err(e)) => warn!(error = %e, "file watcher error"),
                    None => return,
                },
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                    if deadline.is_some() =>
                {
                    let batch = self.read_due(&mut pending, Instant::now(), !catching_up);
                    // Only what differs from `load` is sent, until the catch-up read is done.
                    catching_up &= !pending.paths.is_empty();
                    if !batch.is_empty() && !send(&tx, batch, &mut shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// Reads the pending changes if they are due, and the vanished files whose grace is over.
    fn read_due(&mut self, pending: &mut Pending, now: Instant, report_all: bool) -> Batch {
        let mut batch = Batch::default();
        let mut paths = pending.take_if_due(now);
        let graced = self.missing_since.iter();
        paths.extend(
            graced
                .filter(|(_, since)| **since + DELETE_GRACE <= now)
                .map(|(path, _)| path.clone()),
        );
        // A source directory itself changed (created, deleted, moved): list it again.
        for dir in self.dirs.clone() {
            if paths.remove(&dir) {
                paths.extend(self.paths_in(&dir, report_all, &mut batch));
            }
        }
        self.reload(&paths, Some(now), report_all, &mut batch);
        batch
    }

    fn start_watcher(
        &self,
        events: mpsc::UnboundedSender<notify::Result<notify::Event>>,
    ) -> notify::Result<RecommendedWatcher> {
        let mut watcher = notify::recommended_watcher(move |event| {
            // Only fails when the loop is gone, and then nobody cares.
            let _ = events.send(event);
        })?;
        // Directories, not files: new files appear, and an editor replacing a file by renaming
        // another over it does not lose the watch.
        let mut watched: BTreeSet<&Path> = self.dirs.iter().map(PathBuf::as_path).collect();
        watched.extend(self.files.iter().filter_map(|f| f.parent()));
        for dir in watched {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                warn!(dir = %dir.display(), error = %e, "cannot watch directory; its changes will not be seen");
            }
        }
        Ok(watcher)
    }

    /// Records which files an event concerns.
    fn note(&self, event: &notify::Event, pending: &mut Pending, now: Instant) {
        let writing = match event.kind {
            // Our own reads: never a reason to read again.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(false),
            EventKind::Access(_) => return,
            // Being written (or truncated): wait for the close rather than read half a file.
            EventKind::Modify(ModifyKind::Data(_)) => Some(true),
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => Some(false),
            _ => None,
        };
        if event.need_rescan() {
            // The kernel dropped events: anything may have changed.
            for path in self.state.keys().chain(&self.files).chain(&self.dirs) {
                pending.note(path.clone(), None, now);
            }
            return;
        }
        for path in &event.paths {
            if self.files.contains(path)
                || self.state.contains_key(path)
                || self.dirs.contains(path)
            {
                pending.note(path.clone(), writing, now);
                continue;
            }
            let Some(dir) = path.parent() else { continue };
            if path.file_name().is_some_and(|name| name == "..data") {
                // A Kubernetes ConfigMap or Secret volume swaps its `..data` symlink; the files
                // are symlinks through it, and get no events of their own.
                let affected = self.state.keys().chain(&self.files).chain(&self.dirs);
                for p in affected.filter(|p| p.parent() == Some(dir) || p.as_path() == dir) {
                    pending.note(p.clone(), None, now);
                }
            } else if self.dirs.iter().any(|d| d == dir) && is_source_file(path) {
                pending.note(path.clone(), writing, now);
            }
        }
    }

    /// The source files in `dir` now, and those read from it before. A directory that cannot be
    /// listed is an error (reported again only with `report_all`).
    fn paths_in(&mut self, dir: &Path, report_all: bool, batch: &mut Batch) -> BTreeSet<PathBuf> {
        let mut paths: BTreeSet<PathBuf> = self
            .state
            .keys()
            .chain(&self.files)
            .filter(|p| p.parent() == Some(dir))
            .cloned()
            .collect();
        match list_dir(dir) {
            Ok(listed) => {
                paths.extend(listed);
                if self.dir_errors.remove(dir) {
                    batch.cleared.push(Origin::File(dir.to_owned()));
                }
            }
            Err(e) => {
                if !self.dir_errors.insert(dir.to_owned()) && !report_all {
                    return paths;
                }
                let message = format!("{}: cannot read directory: {e}", dir.display());
                warn!("{message}");
                batch.errors.push(SourceError {
                    origin: Origin::File(dir.to_owned()),
                    object: None,
                    message,
                });
            }
        }
        paths
    }

    /// Reads `paths` again and adds the resulting changes and errors to `batch`.
    ///
    /// `now` is set when watching: a file that vanished is then given [`DELETE_GRACE`] before
    /// its objects are deleted. `report_all` reports the errors of every file read; otherwise
    /// only errors that differ from the ones last reported.
    fn reload(
        &mut self,
        paths: &BTreeSet<PathBuf>,
        now: Option<Instant>,
        report_all: bool,
        batch: &mut Batch,
    ) {
        let mut touched = BTreeSet::new();
        let mut read = BTreeSet::new();
        for path in paths {
            let explicit = self.files.contains(path);
            match read_file(path) {
                Contents::Missing => {
                    let has_objects = self.state.get(path).is_some_and(|s| !s.objects.is_empty());
                    if let (Some(now), true) = (now, has_objects) {
                        let since = *self.missing_since.entry(path.clone()).or_insert(now);
                        if now < since + DELETE_GRACE {
                            continue;
                        }
                    }
                    self.missing_since.remove(path);
                    self.replace(path, BTreeMap::new(), &mut touched);
                    if let Some(state) = self.state.get_mut(path) {
                        state.text_hash = None;
                    }
                    if explicit {
                        let error = SourceError {
                            origin: Origin::File(path.clone()),
                            object: None,
                            message: format!("{}: file not found", path.display()),
                        };
                        self.state_mut(path).read_errors = vec![error];
                        read.insert(path.clone());
                    } else if let Some(gone) = self.state.remove(path) {
                        debug!(file = %path.display(), "file removed");
                        if !gone.reported.is_empty() {
                            batch.cleared.push(Origin::File(path.clone()));
                        }
                    }
                }
                Contents::Unreadable(e) => {
                    self.missing_since.remove(path);
                    // We can't tell what it holds now, so it keeps what it had.
                    let error = SourceError {
                        origin: Origin::File(path.clone()),
                        object: None,
                        message: format!("{}: cannot read: {e}", path.display()),
                    };
                    let state = self.state_mut(path);
                    state.read_errors = vec![error];
                    state.text_hash = None;
                    read.insert(path.clone());
                }
                Contents::Text(text) => {
                    self.missing_since.remove(path);
                    let hash = xxhash_rust::xxh3::xxh3_64(text.as_bytes());
                    if self.state.get(path).and_then(|s| s.text_hash) == Some(hash) {
                        read.insert(path.clone());
                        continue;
                    }
                    let (objects, errors) = self.parse(path, &text);
                    self.replace(path, objects, &mut touched);
                    let state = self.state_mut(path);
                    state.read_errors = errors;
                    state.text_hash = Some(hash);
                    read.insert(path.clone());
                }
            }
        }
        self.report_errors(&read, &touched, report_all, batch);
        self.apply(touched, batch);
    }

    /// The objects `path` contributes after reading `text`, and its errors.
    fn parse(
        &self,
        path: &Path,
        text: &str,
    ) -> (BTreeMap<ObjectKey, Arc<Object>>, Vec<SourceError>) {
        let shown = path.display().to_string();
        let mut objects = BTreeMap::new();
        let mut lines = BTreeMap::new();
        let mut errors = Vec::new();
        let mut failed = BTreeSet::new();
        let mut broken = false;
        let documents: Vec<Document> = if self.serving {
            let base = path.parent().unwrap_or(Path::new("."));
            parse_serving_documents(&shown, text)
                .into_iter()
                .map(|d| match d {
                    ServingDocument::Object { mut object, line } => {
                        crate::serving_controller::resolve_working_dirs(&mut object, base);
                        Document::Object {
                            object: Object::Serving(Box::new(object)),
                            line,
                        }
                    }
                    ServingDocument::Error(e) => Document::Error(ParseError {
                        file: e.file,
                        line: e.line,
                        object: e
                            .object
                            .map(|k| ObjectKey::new(Kind::Serving(k.kind), &k.namespace, &k.name)),
                        field: e.field,
                        reason: e.reason,
                    }),
                    ServingDocument::Other(d) => d,
                })
                .collect()
        } else {
            parse_documents(&shown, text)
        };
        for document in documents {
            match document {
                Document::Object { object, line } => {
                    let key = object.key();
                    if let Some(first) = lines.insert(key.clone(), line) {
                        errors.push(SourceError {
                            origin: Origin::File(path.to_owned()),
                            object: Some(key.clone()),
                            message: format!(
                                "{shown}:{line}: {key}: also defined at line {first}; the later one is used"
                            ),
                        });
                    }
                    objects.insert(key, Arc::new(object));
                }
                Document::Foreign { .. } => {}
                Document::Untyped { line, .. } => {
                    debug!(file = %shown, line, "ignoring a document without apiVersion and kind");
                }
                Document::Error(e) => {
                    match &e.object {
                        Some(key) => {
                            failed.insert(key.clone());
                        }
                        None => broken = true,
                    }
                    errors.push(SourceError {
                        origin: Origin::File(path.to_owned()),
                        object: e.object.clone(),
                        message: e.to_string(),
                    });
                }
            }
        }
        // Last good config wins: an invalid object keeps its last good version, and when an
        // error can't be tied to an object, nothing the file had before is taken away.
        if let Some(before) = self.state.get(path) {
            for (key, object) in &before.objects {
                if !objects.contains_key(key) && (broken || failed.contains(key)) {
                    objects.insert(key.clone(), object.clone());
                }
            }
        }
        (objects, errors)
    }

    fn state_mut(&mut self, path: &Path) -> &mut FileState {
        self.state.entry(path.to_owned()).or_default()
    }

    /// Makes `objects` what `path` defines, keeping `owners` up to date, and notes the keys
    /// whose definitions changed.
    fn replace(
        &mut self,
        path: &Path,
        objects: BTreeMap<ObjectKey, Arc<Object>>,
        touched: &mut BTreeSet<ObjectKey>,
    ) {
        let state = self.state.entry(path.to_owned()).or_default();
        let before = std::mem::replace(&mut state.objects, objects);
        for key in before.keys() {
            if !state.objects.contains_key(key) {
                if let Some(owners) = self.owners.get_mut(key) {
                    owners.retain(|p| p != path);
                    if owners.is_empty() {
                        self.owners.remove(key);
                    }
                }
                touched.insert(key.clone());
            }
        }
        for (key, object) in &state.objects {
            if before.get(key) != Some(object) {
                // Last writer wins: a new or changed definition takes over from other files'.
                let owners = self.owners.entry(key.clone()).or_default();
                owners.retain(|p| p != path);
                owners.push(path.to_owned());
                touched.insert(key.clone());
            }
        }
    }

    /// Adds the current errors of the files read, and of the files whose conflicts with them may
    /// have changed, to `batch`.
    fn report_errors(
        &mut self,
        read: &BTreeSet<PathBuf>,
        touched: &BTreeSet<ObjectKey>,
        report_all: bool,
        batch: &mut Batch,
    ) {
        let mut affected = read.clone();
        for key in touched {
            affected.extend(self.owners.get(key).into_iter().flatten().cloned());
        }
        for path in affected {
            let Some(state) = self.state.get(&path) else {
                continue;
            };
            let mut current = state.read_errors.clone();
            current.extend(self.conflicts(&path, state));
            let Some(state) = self.state.get_mut(&path) else {
                continue;
            };
            let before = std::mem::replace(&mut state.reported, current.clone());
            if current.is_empty() {
                if !before.is_empty() {
                    debug!(file = %path.display(), "file errors cleared");
                    batch.cleared.push(Origin::File(path));
                }
            } else if current != before || (report_all && read.contains(&path)) {
                for error in &current {
                    warn!("{}", error.message);
                }
                batch.errors.extend(current);
            }
        }
    }

    /// Errors for the objects `path` defines that other files define too.
    fn conflicts(&self, path: &Path, state: &FileState) -> Vec<SourceError> {
        let mut errors = Vec::new();
        for key in state.objects.keys() {
            let Some(owners) = self.owners.get(key).filter(|o| o.len() > 1) else {
                continue;
            };
            let others: Vec<String> = owners
                .iter()
                .filter(|p| p.as_path() != path)
                .map(|p| p.display().to_string())
                .collect();
            let used = match owners.last() {
                Some(winner) if winner.as_path() == path => "this one".to_owned(),
                Some(winner) => format!("the one in {}", winner.display()),
                None => continue,
            };
            errors.push(SourceError {
                origin: Origin::File(path.to_owned()),
                object: Some(key.clone()),
                message: format!(
                    "{}: {key}: also defined in {}; {used} is used",
                    path.display(),
                    others.join(", ")
                ),
            });
        }
        errors
    }

    /// Adds to `batch` what changed for the `touched` objects since it was last sent.
    fn apply(&mut self, touched: BTreeSet<ObjectKey>, batch: &mut Batch) {
        for key in touched {
            let current = self
                .owners
                .get(&key)
                .and_then(|owners| owners.last())
                .and_then(|path| self.state.get(path))
                .and_then(|state| state.objects.get(&key));
            match current {
                Some(object)
                    if !self
                        .applied
                        .get(&key)
                        .is_some_and(|sent| Arc::ptr_eq(sent, object) || sent == object) =>
                {
                    debug!(object = %key, "upsert");
                    self.applied.insert(key, Arc::clone(object));
                    batch.changes.push(Change::Upsert(Arc::clone(object)));
                }
                Some(_) => {}
                None => {
                    if self.applied.remove(&key).is_some() {
                        debug!(object = %key, "delete");
                        batch.changes.push(Change::Delete(key));
                    }
                }
            }
        }
    }
}

/// Changes seen by the watcher and not yet read.
#[derive(Debug, Default)]
struct Pending {
    /// Each path, and whether it is being written (modified and not yet closed).
    paths: BTreeMap<PathBuf, bool>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Pending {
    fn note(&mut self, path: PathBuf, writing: Option<bool>, now: Instant) {
        let being_written = self.paths.entry(path).or_insert(false);
        if let Some(writing) = writing {
            *being_written = writing;
        }
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When to read: once things are quiet and no file is half written, but not later than
    /// [`MAX_WAIT`] after the first change.
    fn deadline(&self) -> Option<Instant> {
        let latest = self.first? + MAX_WAIT;
        if self.paths.values().any(|writing| *writing) {
            return Some(latest);
        }
        Some((self.last? + DEBOUNCE).min(latest))
    }

    fn take_if_due(&mut self, now: Instant) -> BTreeSet<PathBuf> {
        match self.deadline() {
            Some(deadline) if deadline <= now => {
                self.first = None;
                self.last = None;
                std::mem::take(&mut self.paths).into_keys().collect()
            }
            _ => BTreeSet::new(),
        }
    }
}

/// Whether a file in a source directory is read: YAML or JSON, and not a dot file (editors'
/// swap and lock files, Kubernetes volumes' `..data` machinery).
fn is_source_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let extension = path.extension().and_then(|e| e.to_str());
    !hidden && matches!(extension, Some("yaml" | "yml" | "json"))
}

fn list_dir(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        // `is_file` follows symlinks, as a ConfigMap volume's files are.
        if is_source_file(&path) && path.is_file() {
            files.push(path);
        }
    }
    Ok(files)
}

fn read_file(path: &Path) -> Contents {
    match std::fs::read_to_string(path) {
        Ok(text) => Contents::Text(text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Contents::Missing,
        Err(e) => Contents::Unreadable(e),
    }
}

/// Resolves once `shutdown` turns true, or its sender is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Sends `batch` unless shutdown comes first; false if the loop should end.
async fn send(
    tx: &mpsc::Sender<Batch>,
    batch: Batch,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        sent = tx.send(batch) => sent.is_ok(),
        () = stopped(shutdown) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use knarr_model::Kind;

    use super::*;

    fn service(name: &str, port: u16) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{name: http, port: {port}, targetPort: 8080}}]\n"
        )
    }

    fn endpoints(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}}}\nsubsets: [{{addresses: [{{ip: {ip}}}], ports: [{{name: http, port: 8080}}]}}]\n"
        )
    }

    fn docs(documents: &[String]) -> String {
        documents.join("---\n")
    }

    /// The keys a batch upserts and deletes, as text.
    fn upserts(batch: &Batch) -> Vec<String> {
        let keys = batch.changes.iter().filter_map(|c| match c {
            Change::Upsert(o) => Some(o.key().to_string()),
            Change::Delete(_) => None,
        });
        keys.collect()
    }

    fn deletes(batch: &Batch) -> Vec<String> {
        let keys = batch.changes.iter().filter_map(|c| match c {
            Change::Delete(k) => Some(k.to_string()),
            Change::Upsert(_) => None,
        });
        keys.collect()
    }

    fn port_of(batch: &Batch, name: &str) -> Option<i64> {
        batch.changes.iter().find_map(|c| match c {
            Change::Upsert(o) => match &**o {
                Object::Service(s) if s.metadata.name == name => Some(s.spec.ports[0].port),
                _ => None,
            },
            _ => None,
        })
    }

    fn source(dir: &Path) -> FileSource {
        FileSource::new(vec![dir.to_owned()], vec![])
    }

    #[test]
    fn load_reads_source_files_and_reports_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(
            d.join("a.yaml"),
            docs(&[service("a", 80), endpoints("a", "10.0.0.1")]),
        )
        .unwrap();
        fs::write(d.join("b.yml"), service("b", 80)).unwrap();
        fs::write(
            d.join("c.json"),
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c"}, "spec": {"ports": [{"port": 80}]}}"#,
        )
        .unwrap();
        // Not source files: dot files, other extensions, subdirectories.
        fs::write(d.join(".a.yaml.swp"), service("swap", 80)).unwrap();
        fs::write(d.join(".hidden.yaml"), service("hidden", 80)).unwrap();
        fs::write(d.join("a.yaml~"), service("backup", 80)).unwrap();
        fs::write(d.join("notes.txt"), service("notes", 80)).unwrap();
        fs::create_dir(d.join("sub.yaml")).unwrap();
        // An explicit file is read whatever its name; untyped documents are skipped.
        let explicit = other.path().join("routes");
        fs::write(&explicit, docs(&[service("f", 80), "routes: []\n".into()])).unwrap();

        let mut src = FileSource::new(
            vec![d.to_owned(), d.join("missing-dir")],
            vec![explicit, other.path().join("missing.yaml")],
        );
        let batch = src.load();
        assert_eq!(
            upserts(&batch),
            [
                "Service default/a",
                "Service default/b",
                "Service default/c",
                "Service default/f",
                "Endpoints default/a",
            ]
        );
        let errors: Vec<&str> = batch.errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].contains("missing-dir: cannot read directory"),
            "{errors:?}"
        );
        assert!(
            errors[1].ends_with("missing.yaml: file not found"),
            "{errors:?}"
        );

        // Reading again changes nothing.
        assert!(src.load().changes.is_empty());
    }

    #[test]
    fn edit_upserts_only_the_changed_object() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        fs::write(&file, docs(&[service("a", 80), service("b", 80)])).unwrap();
        let mut src = source(dir.path());
        src.load();

        fs::write(&file, docs(&[service("a", 80), service("b", 81)])).unwrap();
        let batch = src.load();
        assert_eq!(upserts(&batch), ["Service default/b"]);
        assert_eq!(port_of(&batch, "b"), Some(81));
        assert!(deletes(&batch).is_empty() && batch.errors.is_empty());
    }

    #[test]
    fn removed_document_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        fs::write(&file, docs(&[service("a", 80), endpoints("a", "10.0.0.1")])).unwrap();
        let mut src = source(dir.path());
        src.load();

        fs::write(&file, service("a", 80)).unwrap();
        let batch = src.load();
        assert_eq!(
            batch.changes,
            [Change::Delete(ObjectKey::new(
                Kind::Endpoints,
                "default",
                "a"
            ))]
        );
    }

    #[test]
    fn invalid_object_keeps_its_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        fs::write(
            &file,
            docs(&[service("a", 80), service("b", 80), service("c", 80)]),
        )
        .unwrap();
        let mut src = source(dir.path());
        src.load();

        // `a` turns invalid, `b` changes, `c` is removed.
        fs::write(&file, docs(&[service("a", 0), service("b", 81)])).unwrap();
        let batch = src.load();
        assert_eq!(upserts(&batch), ["Service default/b"]);
        assert_eq!(deletes(&batch), ["Service default/c"]);
        let [error] = batch.errors.as_slice() else {
            panic!("{batch:?}")
        };
        assert_eq!(error.origin, Origin::File(file.clone()));
        assert_eq!(
            error.object,
            Some(ObjectKey::new(Kind::Service, "default", "a"))
        );
        assert!(
            error
                .message
                .ends_with(": Service default/a: spec.ports[0].port: 0 is not a port number"),
            "{}",
            error.message
        );

        // Still invalid: `a` stays, the error is reported again.
        let batch = src.load();
        assert!(batch.changes.is_empty() && batch.cleared.is_empty());
        assert_eq!(batch.errors.len(), 1);

        // Fixed: the file's errors are cleared.
        fs::write(&file, docs(&[service("a", 82), service("b", 81)])).unwrap();
        let batch = src.load();
        assert_eq!(port_of(&batch, "a"), Some(82));
        assert_eq!(batch.cleared, [Origin::File(file)]);
        assert!(batch.errors.is_empty());
    }

    #[test]
    fn broken_yaml_deletes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        fs::write(&file, docs(&[service("a", 80), service("b", 80)])).unwrap();
        let mut src = source(dir.path());
        src.load();

        // `a` is broken beyond recognition, `b` is gone, `c` is new: only `c` changes.
        let broken = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n spec: [\n".to_owned();
        fs::write(&file, docs(&[broken, service("c", 80)])).unwrap();
        let batch = src.load();
        assert_eq!(upserts(&batch), ["Service default/c"]);
        assert!(deletes(&batch).is_empty());
        let [error] = batch.errors.as_slice() else {
            panic!("{batch:?}")
        };
        assert_eq!(error.object, None);
        assert!(
            error.message.contains("not valid YAML"),
            "{}",
            error.message
        );

        // Once the file is whole again, what it no longer defines goes.
        fs::write(&file, service("c", 80)).unwrap();
        let batch = src.load();
        assert_eq!(deletes(&batch), ["Service default/a", "Service default/b"]);
        assert!(upserts(&batch).is_empty());
        assert_eq!(batch.cleared, [Origin::File(file)]);
    }

    #[test]
    fn deleted_file_deletes_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        fs::write(&file, docs(&[service("a", 80), endpoints("a", "10.0.0.1")])).unwrap();
        fs::write(dir.path().join("b.yaml"), service("b", 80)).unwrap();
        let mut src = source(dir.path());
        src.load();

        fs::remove_file(&file).unwrap();
        let batch = src.load();
        assert_eq!(
            deletes(&batch),
            ["Service default/a", "Endpoints default/a"]
        );
        assert!(upserts(&batch).is_empty() && batch.errors.is_empty());
    }

    #[test]
    fn object_in_two_files_is_deleted_with_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        fs::write(&a, docs(&[service("x", 80), service("y", 80)])).unwrap();
        fs::write(&b, service("x", 81)).unwrap();
        let mut src = source(dir.path());

        let batch = src.load();
        assert_eq!(upserts(&batch), ["Service default/x", "Service default/y"]);
        assert_eq!(port_of(&batch, "x"), Some(81), "the last file read wins");
        assert_eq!(batch.errors.len(), 2, "{batch:?}");
        for error in &batch.errors {
            let m = &error.message;
            assert!(m.contains("a.yaml") && m.contains("b.yaml"), "{m}");
            assert_eq!(
                error.object,
                Some(ObjectKey::new(Kind::Service, "default", "x"))
            );
        }

        // The last writer wins.
        fs::write(&a, docs(&[service("x", 82), service("y", 80)])).unwrap();
        let batch = src.load();
        assert_eq!(batch.changes.len(), 1);
        assert_eq!(port_of(&batch, "x"), Some(82));

        // Deleting one file falls back to the other's definition, and ends the conflict.
        fs::remove_file(&a).unwrap();
        let batch = src.load();
        assert_eq!(deletes(&batch), ["Service default/y"]);
        assert_eq!(port_of(&batch, "x"), Some(81));
        assert_eq!(batch.cleared, [Origin::File(a), Origin::File(b.clone())]);

        fs::remove_file(&b).unwrap();
        assert_eq!(deletes(&src.load()), ["Service default/x"]);
    }

    /// The next batch the watcher sends, or a failure after a generous timeout.
    async fn next(rx: &mut mpsc::Receiver<Batch>) -> Batch {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no batch within 10s")
            .expect("watcher stopped")
    }

    #[tokio::test]
    async fn watch_sends_a_batch_per_change() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        let explicit = other.path().join("routes.yaml");
        fs::write(&file, service("a", 80)).unwrap();
        fs::write(&explicit, service("f", 80)).unwrap();
        fs::write(other.path().join("unrelated.yaml"), service("u", 80)).unwrap();
        let mut src = FileSource::new(vec![dir.path().to_owned()], vec![explicit.clone()]);
        assert_eq!(src.load().changes.len(), 2);

        let (tx, mut rx) = mpsc::channel(8);
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(src.watch(tx, shutdown));

        // A new file. (This may be seen by the read when watching starts rather than by the
        // watcher; once its batch is in, the watcher is running.)
        fs::write(dir.path().join("b.yaml"), service("b", 80)).unwrap();
        assert_eq!(upserts(&next(&mut rx).await), ["Service default/b"]);

        // Written in place.
        fs::write(&file, service("a", 81)).unwrap();
        let batch = next(&mut rx).await;
        assert_eq!(upserts(&batch), ["Service default/a"]);
        assert_eq!(port_of(&batch, "a"), Some(81));

        // Written beside and renamed over, as many editors do; the temp file is not read.
        let temp = dir.path().join(".a.yaml.tmp");
        fs::write(&temp, service("a", 82)).unwrap();
        fs::rename(&temp, &file).unwrap();
        assert_eq!(port_of(&next(&mut rx).await, "a"), Some(82));

        // Moved away and written anew (vim with `backupcopy=no`): never deleted in between.
        fs::rename(&file, dir.path().join("a.yaml~")).unwrap();
        fs::write(&file, service("a", 83)).unwrap();
        let batch = next(&mut rx).await;
        assert_eq!(batch.changes.len(), 1, "{batch:?}");
        assert_eq!(port_of(&batch, "a"), Some(83));

        // An explicit file is followed; its neighbours are not.
        fs::write(other.path().join("unrelated.yaml"), service("u", 81)).unwrap();
        fs::write(&explicit, service("f", 81)).unwrap();
        let batch = next(&mut rx).await;
        assert_eq!(upserts(&batch), ["Service default/f"]);

        // A deleted file.
        fs::remove_file(&file).unwrap();
        assert_eq!(deletes(&next(&mut rx).await), ["Service default/a"]);

        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("watch did not stop")
            .unwrap();
    }

    /// A Kubernetes ConfigMap volume: the files are symlinks through `..data`, which is swapped
    /// atomically to a new timestamped directory on update.
    #[cfg(unix)]
    #[tokio::test]
    async fn watch_follows_a_configmap_volume() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir(d.join("..v1")).unwrap();
        fs::write(d.join("..v1/a.yaml"), service("a", 80)).unwrap();
        symlink("..v1", d.join("..data")).unwrap();
        symlink("..data/a.yaml", d.join("a.yaml")).unwrap();
        let mut src = source(d);
        assert_eq!(upserts(&src.load()), ["Service default/a"]);

        let (tx, mut rx) = mpsc::channel(8);
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(src.watch(tx, shutdown));
        // Once a first change is in, the watcher is running.
        fs::write(d.join("b.yaml"), service("b", 80)).unwrap();
        assert_eq!(upserts(&next(&mut rx).await), ["Service default/b"]);

        fs::create_dir(d.join("..v2")).unwrap();
        fs::write(d.join("..v2/a.yaml"), service("a", 81)).unwrap();
        symlink("..v2", d.join("..data_tmp")).unwrap();
        fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        fs::remove_dir_all(d.join("..v1")).unwrap();
        let batch = next(&mut rx).await;
        assert_eq!(batch.changes.len(), 1, "{batch:?}");
        assert_eq!(port_of(&batch, "a"), Some(81));
    }

    #[tokio::test]
    async fn watch_stops_when_the_receiver_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel(1);
        let (_stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(source(dir.path()).watch(tx, shutdown));
        drop(rx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("watch did not stop")
            .unwrap();
    }
}
