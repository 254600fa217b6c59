//! A pod's log: both processes' stdout and stderr, line by line, prefixed with who wrote them,
//! appended to one file (and the last line of each kept for crash reports).

use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::task::JoinHandle;

/// Who wrote a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    App,
    Queue,
    /// The runtime's own notes (starts, exits, restarts).
    Knarr,
}

impl Source {
    fn prefix(self) -> &'static str {
        match self {
            Source::App => "[app]",
            Source::Queue => "[queue]",
            Source::Knarr => "[knarr]",
        }
    }
}

/// Longest line kept; longer ones are cut (a runaway line must not eat memory).
const MAX_LINE: usize = 64 * 1024;

pub(crate) struct PodLog {
    inner: Mutex<Inner>,
}

struct Inner {
    /// `None` when the file could not be opened: the pod still runs, its output is dropped.
    file: Option<File>,
    last_app: Option<String>,
    last_queue: Option<String>,
}

impl PodLog {
    /// Creates (or truncates) the log at `path`: a new pod starts a new log; its restarts append.
    pub(crate) fn create(path: &Path) -> Arc<PodLog> {
        let file = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| File::create(path));
        let file = match file {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the pod's log");
                None
            }
        };
        Arc::new(PodLog {
            inner: Mutex::new(Inner {
                file,
                last_app: None,
                last_queue: None,
            }),
        })
    }

    pub(crate) fn line(&self, source: Source, text: &str) {
        let text = text.trim_end_matches(['\r', '\n']);
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match source {
            Source::App => inner.last_app = Some(text.to_owned()),
            Source::Queue => inner.last_queue = Some(text.to_owned()),
            Source::Knarr => {}
        }
        if let Some(file) = inner.file.as_mut() {
            // One write per line: lines from the four pipes never interleave mid-line. Small
            // blocking writes to a local file, like a logger's.
            let _ = file.write_all(format!("{} {text}\n", source.prefix()).as_bytes());
        }
    }

    /// The last line `source` wrote, if any.
    pub(crate) fn last_line(&self, source: Source) -> Option<String> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match source {
            Source::App => inner.last_app.clone(),
            Source::Queue => inner.last_queue.clone(),
            Source::Knarr => None,
        }
    }

    /// Copies `output` into the log, line by line, until it ends.
    pub(crate) fn follow(
        self: &Arc<Self>,
        source: Source,
        output: impl AsyncRead + Unpin + Send + 'static,
    ) -> JoinHandle<()> {
        let log = Arc::clone(self);
        tokio::spawn(async move {
            let mut reader = BufReader::new(output);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match read_line(&mut reader, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => log.line(source, &String::from_utf8_lossy(&buf)),
                }
            }
        })
    }
}

/// Reads up to a newline (or [`MAX_LINE`] bytes), returning how many bytes were consumed.
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut consumed = 0;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(consumed);
        }
        let room = MAX_LINE.saturating_sub(buf.len());
        let (take, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) if i < room => (i + 1, true),
            _ if available.len() >= room => (room, true),
            _ => (available.len(), false),
        };
        buf.extend_from_slice(&available[..take]);
        reader.consume(take);
        consumed += take;
        if done {
            return Ok(consumed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_prefixed_and_the_last_one_kept() {
        let dir = std::env::temp_dir().join(format!("knarr-runtime-log-{}", std::process::id()));
        let path = dir.join("rev").join("pod.log");
        let log = PodLog::create(&path);
        log.line(Source::Knarr, "starting");
        let app: &[u8] = b"one\ntwo\r\nno newline";
        log.follow(Source::App, app).await.unwrap();
        let queue: &[u8] = b"listening\n";
        log.follow(Source::Queue, queue).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "[knarr] starting\n[app] one\n[app] two\n[app] no newline\n[queue] listening\n"
        );
        assert_eq!(log.last_line(Source::App).as_deref(), Some("no newline"));
        assert_eq!(log.last_line(Source::Queue).as_deref(), Some("listening"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn long_lines_are_cut() {
        let long = vec![b'x'; MAX_LINE + 10];
        let mut reader = BufReader::new(long.as_slice());
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut reader, &mut buf).await.unwrap(), MAX_LINE);
        buf.clear();
        assert_eq!(read_line(&mut reader, &mut buf).await.unwrap(), 10);
    }
}
