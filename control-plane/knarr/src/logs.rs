//! `knarr logs`: the output of a Service's (or Revision's) pods. The API says which pods there
//! are and where their log files are; the files are read directly, since `knarr up` runs the pods
//! on this machine.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use knarr_control::api::PodList;
use serde_json::Value;

use crate::api_client::{check_name, ApiArgs, ApiClient, DEFAULT_NAMESPACE};

/// How often a followed file is checked for new output.
const POLL: Duration = Duration::from_millis(200);
/// How often the API is asked for new pods while following.
const REFRESH: Duration = Duration::from_secs(1);
/// Once a followed object is deleted, how long its pods' logs must stay unchanged before
/// `knarr logs -f` ends (they drain and stop first).
const GONE_QUIET: Duration = Duration::from_secs(3);

#[derive(clap::Args)]
pub(crate) struct LogsArgs {
    /// A Knative Service, Configuration or Revision.
    name: String,
    /// The namespace [default: default].
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Lines to show from the end of each pod's log; -1 shows all.
    #[arg(long, default_value_t = 50, allow_negative_numbers = true)]
    tail: i64,
    /// Keep printing new output, and the output of new pods, until Ctrl-C.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Start every line with `[pod]` (the default when there are several pods).
    #[arg(long)]
    prefix: bool,
    #[command(flatten)]
    api: ApiArgs,
}

/// One pod's log file and how far it has been printed.
struct PodLog {
    path: PathBuf,
    offset: u64,
    /// The start of a line not finished yet.
    partial: Vec<u8>,
}

pub(crate) fn run(args: &LogsArgs) -> anyhow::Result<()> {
    let namespace = args.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    check_name("namespace", namespace)?;
    check_name("name", &args.name)?;
    let client = args.api.client("`knarr up`")?;
    let path = format!("/api/v1/pods/{namespace}/{}", args.name);
    let tail = usize::try_from(args.tail).ok();

    let pods = list_pods(&client, &path)?;
    if pods.is_empty() {
        eprintln!("{namespace}/{}: no pods yet", args.name);
    }
    let mut out = io::stdout().lock();
    let mut logs: BTreeMap<String, PodLog> = BTreeMap::new();
    let prefixed = args.prefix || pods.len() > 1;
    for (pod, log_path) in pods {
        let mut log = PodLog {
            path: log_path,
            offset: 0,
            partial: Vec::new(),
        };
        match read_tail(&log.path, tail) {
            Ok((text, end)) => {
                log.offset = end;
                write_lines(&mut out, prefixed.then_some(&pod), &text, &mut log.partial)?;
            }
            // No output yet: print it from the start when it comes.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("{pod}: cannot read {}: {e}", log.path.display()),
        }
        if !args.follow {
            finish_line(&mut out, prefixed.then_some(&pod), &mut log.partial)?;
        }
        logs.insert(pod, log);
    }
    out.flush()?;
    if !args.follow {
        return Ok(());
    }

    let mut asked = Instant::now();
    let mut quiet_since = Instant::now();
    // Set once the object is deleted: its pods' last words are still printed.
    let mut gone: Option<String> = None;
    loop {
        std::thread::sleep(POLL);
        if gone.is_none() && asked.elapsed() >= REFRESH {
            asked = Instant::now();
            match client.get_optional(&path) {
                Ok(Ok(answer)) => {
                    for (pod, log_path) in pods_in(answer).unwrap_or_default() {
                        // A pod started since: all of its output is new.
                        logs.entry(pod).or_insert(PodLog {
                            path: log_path,
                            offset: 0,
                            partial: Vec::new(),
                        });
                    }
                }
                Ok(Err(message)) => gone = Some(message),
                Err(e) => bail!("stopped following: {e:#}"),
            }
        }
        let prefixed = args.prefix || logs.len() > 1;
        for (pod, log) in &mut logs {
            if let Some(text) = read_new(log) {
                quiet_since = Instant::now();
                write_lines(&mut out, prefixed.then_some(pod), &text, &mut log.partial)?;
            }
        }
        out.flush()?;
        if let Some(message) = &gone {
            if quiet_since.elapsed() >= GONE_QUIET {
                for (pod, log) in &mut logs {
                    finish_line(&mut out, prefixed.then_some(pod), &mut log.partial)?;
                }
                out.flush()?;
                eprintln!("{message}: stopped following");
                return Ok(());
            }
        }
    }
}

/// The pods the API lists for a name: `(pod name, log path)`; an unknown name is an error.
fn list_pods(client: &ApiClient, path: &str) -> anyhow::Result<Vec<(String, PathBuf)>> {
    match client.get_optional(path)? {
        Ok(answer) => pods_in(answer),
        Err(message) => bail!("{message}"),
    }
}

fn pods_in(answer: Value) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let pods: PodList = serde_json::from_value(answer)?;
    pods.items
        .into_iter()
        .map(|pod| match pod.log_path {
            Some(path) => Ok((pod.name, PathBuf::from(path))),
            None => bail!(
                "pod {}: no log file (it does not run on this machine)",
                pod.name
            ),
        })
        .collect()
}

/// The last `lines` lines of a file (all of it for `None`) and the offset they end at.
fn read_tail(path: &std::path::Path, lines: Option<usize>) -> io::Result<(Vec<u8>, u64)> {
    const CHUNK: u64 = 64 * 1024;
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let Some(lines) = lines else {
        let mut text = Vec::new();
        (&mut file).take(len).read_to_end(&mut text)?;
        return Ok((text, len));
    };
    if lines == 0 {
        return Ok((Vec::new(), len));
    }
    // Read backwards until the text holds `lines` line ends before its last line.
    let mut start = len;
    let mut text: Vec<u8> = Vec::new();
    loop {
        let body = text.strip_suffix(b"\n").unwrap_or(&text);
        let line_start = body
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, b)| **b == b'\n')
            .nth(lines - 1)
            .map(|(i, _)| i + 1);
        if let Some(at) = line_start {
            return Ok((text[at..].to_vec(), len));
        }
        if start == 0 {
            return Ok((text, len));
        }
        let size = CHUNK.min(start);
        start -= size;
        file.seek(SeekFrom::Start(start))?;
        let mut chunk = Vec::with_capacity(size as usize);
        (&mut file).take(size).read_to_end(&mut chunk)?;
        chunk.extend_from_slice(&text);
        text = chunk;
    }
}

/// What was appended to a log since it was last read; from the start again when the file
/// shrank (replaced or truncated).
fn read_new(log: &mut PodLog) -> Option<Vec<u8>> {
    let mut file = File::open(&log.path).ok()?;
    let len = file.metadata().ok()?.len();
    if len < log.offset {
        log.offset = 0;
        log.partial.clear();
    }
    if len == log.offset {
        return None;
    }
    file.seek(SeekFrom::Start(log.offset)).ok()?;
    let mut text = Vec::new();
    file.take(len - log.offset).read_to_end(&mut text).ok()?;
    log.offset += text.len() as u64;
    Some(text)
}

/// Writes the complete lines of `partial` + `text`, each after `[pod] ` when there is a pod,
/// and keeps an unfinished last line in `partial`.
fn write_lines(
    out: &mut impl io::Write,
    pod: Option<&String>,
    text: &[u8],
    partial: &mut Vec<u8>,
) -> io::Result<()> {
    partial.extend_from_slice(text);
    let Some(end) = partial.iter().rposition(|b| *b == b'\n') else {
        return Ok(());
    };
    let rest = partial.split_off(end + 1);
    for line in partial.split_inclusive(|b| *b == b'\n') {
        if let Some(pod) = pod {
            write!(out, "[{pod}] ")?;
        }
        out.write_all(line)?;
    }
    *partial = rest;
    Ok(())
}

/// Ends an unfinished last line.
fn finish_line(
    out: &mut impl io::Write,
    pod: Option<&String>,
    partial: &mut Vec<u8>,
) -> io::Result<()> {
    if partial.is_empty() {
        return Ok(());
    }
    write_lines(out, pod, b"\n", partial)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail_of(text: &str, lines: Option<usize>) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pod.log");
        std::fs::write(&path, text).unwrap();
        let (tail, end) = read_tail(&path, lines).unwrap();
        assert_eq!(end, text.len() as u64);
        String::from_utf8(tail).unwrap()
    }

    #[test]
    fn tails() {
        assert_eq!(tail_of("a\nb\nc\n", Some(2)), "b\nc\n");
        assert_eq!(tail_of("a\nb\nc", Some(2)), "b\nc");
        assert_eq!(tail_of("a\nb\nc\n", Some(5)), "a\nb\nc\n");
        assert_eq!(tail_of("a\nb\nc\n", Some(0)), "");
        assert_eq!(tail_of("a\nb\nc\n", None), "a\nb\nc\n");
        assert_eq!(tail_of("", Some(3)), "");
        // Longer than one read-back chunk.
        let long: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(tail_of(&long, Some(2)), "line 19998\nline 19999\n");
    }

    #[test]
    fn lines_are_prefixed_whole() {
        let mut out = Vec::new();
        let mut partial = Vec::new();
        let pod = "hello-00001-1".to_string();
        write_lines(&mut out, Some(&pod), b"one\ntw", &mut partial).unwrap();
        write_lines(&mut out, Some(&pod), b"o\nthr", &mut partial).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "[hello-00001-1] one\n[hello-00001-1] two\n"
        );
        finish_line(&mut out, None, &mut partial).unwrap();
        assert!(String::from_utf8_lossy(&out).ends_with("two\nthr\n"));
    }

    #[test]
    fn followed_files_are_read_from_where_they_were_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pod.log");
        std::fs::write(&path, "old\n").unwrap();
        let mut log = PodLog {
            path: path.clone(),
            offset: 4,
            partial: Vec::new(),
        };
        assert_eq!(read_new(&mut log), None);
        std::fs::write(&path, "old\nnew\n").unwrap();
        assert_eq!(read_new(&mut log).as_deref(), Some(&b"new\n"[..]));
        // Replaced by a shorter file: from its start.
        std::fs::write(&path, "x\n").unwrap();
        assert_eq!(read_new(&mut log).as_deref(), Some(&b"x\n"[..]));
    }
}
