//! Continuous traffic for the "update under load" conformance cases: keep
//! requests flowing while an ingress changes, then check that none failed and
//! when the new answer started being served.
//!
//! Every request is logged with its start and end time, status (or error),
//! the backend that answered (`x-upstream`, else the body) and optionally one
//! chosen response header, so a test can compare them with the moment it saw
//! the ingress become Ready. The loop always ends by itself after
//! [`LoadBuilder::max_duration`] (default [`DEFAULT_MAX_DURATION`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request};
use tokio::task::JoinHandle;

use crate::HttpClient;

/// How long a load loop runs at most if nobody stops it.
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(300);

/// Longest body kept as a request's "upstream" when there is no `x-upstream`.
const MAX_BODY_AS_UPSTREAM: usize = 64;

/// Requests sent in a loop by `concurrency` workers until [`stop`](Self::stop)
/// (or the time limit). Dropping it without stopping aborts the workers.
#[derive(Debug)]
pub struct LoadGenerator {
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
    workers: Vec<JoinHandle<WorkerLog>>,
}

/// Options for a [`LoadGenerator`]; from [`LoadGenerator::builder`].
#[derive(Clone, Debug)]
pub struct LoadBuilder {
    client: HttpClient,
    host: String,
    path: String,
    concurrency: usize,
    headers: Vec<(HeaderName, HeaderValue)>,
    record_header: Option<HeaderName>,
    max_duration: Duration,
}

/// One request of a load run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// When it was sent.
    pub started: Instant,
    /// When its whole response (or its error) was in.
    pub finished: Instant,
    /// Response status; `None` if the request failed.
    pub status: Option<u16>,
    /// Why it failed, if it did (no response, timeout, reset).
    pub error: Option<String>,
    /// `x-upstream` of the response, else its body (first
    /// 64 bytes); `None` for a failed request.
    pub upstream: Option<String>,
    /// The value of the header chosen with [`LoadBuilder::record_header`],
    /// if chosen and present.
    pub header: Option<String>,
}

/// Everything a load run saw, in order of sending.
#[derive(Clone, Debug, Default)]
pub struct LoadSummary {
    /// Every request, sorted by [`RequestRecord::started`].
    pub requests: Vec<RequestRecord>,
    /// Whether the workers stopped at the time limit rather than on
    /// [`LoadGenerator::stop`].
    pub hit_time_limit: bool,
}

#[derive(Debug, Default)]
struct WorkerLog {
    requests: Vec<RequestRecord>,
    hit_time_limit: bool,
}

impl LoadGenerator {
    /// Starts `concurrency` workers, each sending `GET {path}` with
    /// `Host: {host}` back to back through `client`.
    pub fn start(client: HttpClient, host: &str, path: &str, concurrency: usize) -> LoadGenerator {
        Self::builder(client, host, path)
            .concurrency(concurrency)
            .start()
    }

    /// Options beyond the defaults (1 worker, no extra headers, nothing
    /// recorded beyond status and upstream, [`DEFAULT_MAX_DURATION`]).
    pub fn builder(client: HttpClient, host: &str, path: &str) -> LoadBuilder {
        LoadBuilder {
            client,
            host: host.to_owned(),
            path: path.to_owned(),
            concurrency: 1,
            headers: Vec::new(),
            record_header: None,
            max_duration: DEFAULT_MAX_DURATION,
        }
    }

    /// Requests completed (answered or failed) so far: for waiting until
    /// traffic is flowing.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }

    /// Whether every worker has ended (only at the time limit, before
    /// [`stop`](Self::stop)).
    pub fn finished(&self) -> bool {
        self.workers.iter().all(JoinHandle::is_finished)
    }

    /// Stops sending, waits for the requests in flight, and returns the log.
    pub async fn stop(mut self) -> LoadSummary {
        self.stop.store(true, Ordering::SeqCst);
        let mut summary = LoadSummary::default();
        for worker in self.workers.drain(..) {
            match worker.await {
                Ok(log) => {
                    summary.requests.extend(log.requests);
                    summary.hit_time_limit |= log.hit_time_limit;
                }
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        summary.requests.sort_by_key(|r| r.started);
        summary
    }
}

impl Drop for LoadGenerator {
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.abort();
        }
    }
}

impl LoadBuilder {
    /// Number of workers, each with one request in flight (at least 1).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Sends request header `name: value` on every request.
    ///
    /// # Panics
    /// If `name` or `value` is not valid in a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((
            HeaderName::from_bytes(name.as_bytes()).expect("valid header name"),
            HeaderValue::from_str(value).expect("valid header value"),
        ));
        self
    }

    /// Records the value of response header `name` per request (e.g.
    /// `x-echo-foo`, to see when a new header value started being served).
    ///
    /// # Panics
    /// If `name` is not a valid header name.
    pub fn record_header(mut self, name: &str) -> Self {
        self.record_header =
            Some(HeaderName::from_bytes(name.as_bytes()).expect("valid header name"));
        self
    }

    /// Workers end by themselves after `limit` (a safety net: tests stop
    /// them long before).
    pub fn max_duration(mut self, limit: Duration) -> Self {
        self.max_duration = limit;
        self
    }

    /// Starts the workers.
    pub fn start(self) -> LoadGenerator {
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + self.max_duration;
        let this = Arc::new(self);
        let workers = (0..this.concurrency)
            .map(|_| {
                let (this, stop, completed) = (this.clone(), stop.clone(), completed.clone());
                tokio::spawn(async move { this.work(&stop, &completed, deadline).await })
            })
            .collect();
        LoadGenerator {
            stop,
            completed,
            workers,
        }
    }

    async fn work(&self, stop: &AtomicBool, completed: &AtomicU64, deadline: Instant) -> WorkerLog {
        let mut log = WorkerLog::default();
        while !stop.load(Ordering::SeqCst) {
            if Instant::now() >= deadline {
                log.hit_time_limit = true;
                break;
            }
            let started = Instant::now();
            let result = self.client.send(self.request()).await;
            let finished = Instant::now();
            log.requests.push(match result {
                Ok(reply) => RequestRecord {
                    started,
                    finished,
                    status: Some(reply.status),
                    error: None,
                    upstream: Some(match reply.header("x-upstream") {
                        Some(name) => name.to_owned(),
                        None => truncate(&reply.body, MAX_BODY_AS_UPSTREAM).to_owned(),
                    }),
                    header: self
                        .record_header
                        .as_ref()
                        .and_then(|name| reply.header(name.as_str()))
                        .map(str::to_owned),
                },
                Err(e) => RequestRecord {
                    started,
                    finished,
                    status: None,
                    error: Some(format!("{e:#}")),
                    upstream: None,
                    header: None,
                },
            });
            completed.fetch_add(1, Ordering::SeqCst);
        }
        log
    }

    fn request(&self) -> Request<Bytes> {
        let mut req = Request::get(self.path.as_str())
            .header(header::HOST, self.host.as_str())
            .body(Bytes::new())
            .expect("host and path were valid when the load started");
        for (name, value) in &self.headers {
            req.headers_mut().append(name, value.clone());
        }
        req
    }
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl LoadSummary {
    /// Requests sent.
    pub fn total(&self) -> usize {
        self.requests.len()
    }

    /// Answered requests per status.
    pub fn by_status(&self) -> BTreeMap<u16, u64> {
        count(self.requests.iter().filter_map(|r| r.status))
    }

    /// Answered requests per backend (`x-upstream`, else body).
    pub fn by_upstream(&self) -> BTreeMap<String, u64> {
        count(self.requests.iter().filter_map(|r| r.upstream.clone()))
    }

    /// Answered requests per value of the recorded header (`""` when
    /// absent).
    pub fn by_header(&self) -> BTreeMap<String, u64> {
        count(
            self.requests
                .iter()
                .filter(|r| r.status.is_some())
                .map(|r| r.header.clone().unwrap_or_default()),
        )
    }

    /// The failed requests' errors, in order.
    pub fn errors(&self) -> Vec<&str> {
        self.requests
            .iter()
            .filter_map(|r| r.error.as_deref())
            .collect()
    }

    /// The start of the first request answered with recorded header value
    /// `value`.
    pub fn first_seen(&self, value: &str) -> Option<Instant> {
        self.requests
            .iter()
            .find(|r| r.header.as_deref() == Some(value))
            .map(|r| r.started)
    }

    /// Requests sent at or after `t` (e.g. the moment an update was seen
    /// Ready: all of these must see the new answer).
    pub fn started_after(&self, t: Instant) -> impl Iterator<Item = &RequestRecord> {
        self.requests.iter().filter(move |r| r.started >= t)
    }

    /// Ok if every request got a 200; else an error with the counts and the
    /// first few failures.
    pub fn ensure_all_ok(&self) -> anyhow::Result<()> {
        let bad: Vec<&RequestRecord> = self
            .requests
            .iter()
            .filter(|r| r.status != Some(200))
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "{} of {} requests were not 200 (statuses {:?}, {} errors)",
            bad.len(),
            self.total(),
            self.by_status(),
            self.errors().len()
        );
        for r in bad.iter().take(5) {
            let _ = write!(
                msg,
                "\n  {:?} upstream {:?}: {}",
                r.status,
                r.upstream,
                r.error.as_deref().unwrap_or("")
            );
        }
        anyhow::bail!(msg)
    }
}

fn count<K: Ord>(keys: impl Iterator<Item = K>) -> BTreeMap<K, u64> {
    let mut counts = BTreeMap::new();
    for key in keys {
        *counts.entry(key).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{poll_until, Upstream};
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use tokio::net::TcpListener;

    async fn wait_completed(load: &LoadGenerator, n: u64) {
        poll_until("load to make progress", Duration::from_secs(10), || async {
            load.completed() >= n
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn counts_statuses_and_upstreams() {
        let up = Upstream::start("steady").await.unwrap();
        let load = LoadGenerator::start(HttpClient::new(up.addr()), "svc.example.com", "/", 4);
        wait_completed(&load, 50).await;
        let summary = load.stop().await;
        let total = summary.total() as u64;
        assert!(total >= 50);
        assert_eq!(up.requests(), total, "stop waits for requests in flight");
        assert_eq!(summary.by_status(), BTreeMap::from([(200, total)]));
        assert_eq!(
            summary.by_upstream(),
            BTreeMap::from([("steady".to_owned(), total)])
        );
        assert!(summary.errors().is_empty());
        assert!(!summary.hit_time_limit);
        summary.ensure_all_ok().unwrap();
        assert!(summary
            .requests
            .windows(2)
            .all(|w| w[0].started <= w[1].started));
    }

    #[tokio::test]
    async fn reports_failures_and_errors() {
        let up = Upstream::builder("flaky")
            .fail_first(3, 503)
            .start()
            .await
            .unwrap();
        let load = LoadGenerator::start(HttpClient::new(up.addr()), "x", "/", 2);
        wait_completed(&load, 10).await;
        let summary = load.stop().await;
        assert_eq!(summary.by_status()[&503], 3);
        let err = summary.ensure_all_ok().unwrap_err().to_string();
        assert!(err.starts_with("3 of "), "{err}");

        // Nothing listening: every request is an error, and that is logged.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let load = LoadGenerator::start(HttpClient::new(addr), "x", "/", 1);
        wait_completed(&load, 3).await;
        let summary = load.stop().await;
        assert!(summary.by_status().is_empty());
        assert_eq!(summary.errors().len(), summary.total());
        assert!(summary.ensure_all_ok().is_err());
    }

    /// Answers with `x-version: v1` until `flip` is set, then `v2`.
    async fn versioned_server(flip: Arc<AtomicBool>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let flip = flip.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        let version = if flip.load(Ordering::SeqCst) {
                            "v2"
                        } else {
                            "v1"
                        };
                        async move {
                            let resp = http::Response::builder()
                                .header("x-version", version)
                                .body(http_body_util::Full::new(Bytes::from("versioned")))
                                .unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn records_when_a_new_header_value_started_being_served() {
        let flip = Arc::new(AtomicBool::new(false));
        let addr = versioned_server(flip.clone()).await;
        let load = LoadGenerator::builder(HttpClient::new(addr), "x", "/")
            .concurrency(2)
            .header("x-test", "1")
            .record_header("x-version")
            .start();
        wait_completed(&load, 20).await;
        flip.store(true, Ordering::SeqCst);
        let flipped = Instant::now();
        let before = load.completed();
        wait_completed(&load, before + 20).await;
        let summary = load.stop().await;

        let first_v2 = summary.first_seen("v2").unwrap();
        assert!(summary.first_seen("v1").unwrap() < first_v2);
        assert!(summary
            .started_after(flipped)
            .all(|r| r.header.as_deref() == Some("v2")));
        assert!(summary.started_after(flipped).count() >= 10);
        let by_header = summary.by_header();
        assert_eq!(by_header.values().sum::<u64>(), summary.total() as u64);
        assert_eq!(
            summary.by_upstream(),
            BTreeMap::from([("versioned".to_owned(), summary.total() as u64)])
        );
    }

    #[tokio::test]
    async fn stops_by_itself_at_the_time_limit() {
        let up = Upstream::start("bounded").await.unwrap();
        let load = LoadGenerator::builder(HttpClient::new(up.addr()), "x", "/")
            .max_duration(Duration::from_millis(100))
            .start();
        poll_until("workers to stop", Duration::from_secs(10), || async {
            load.finished()
        })
        .await
        .unwrap();
        let summary = load.stop().await;
        assert!(summary.hit_time_limit);
        summary.ensure_all_ok().unwrap();
    }
}
