//! `scale-bench`: scale to zero with `knarr up` — the real binary, its Envoy, its activator and
//! local pods (`knarr-echo` behind `knarr-queue-proxy`) — measured in one run on one machine.
//!
//! 1. Cold start: every cold-start Service is created up front, idles to zero once (short
//!    windows: `stable-window: 6s`, `scale-to-zero-grace-period: 1s`), then each is woken in turn
//!    by one request to Envoy (checked at zero right before: no pod, activator in the path).
//!    Time to first response, minus the app's own start-to-listening time (the same command
//!    spawned directly, timed until its port accepts a TCP connection). A few more cold starts
//!    are traced (pods API, the app's port and the queue-proxy's probe polled every ~1–2 ms;
//!    timestamps from `knarr up`'s, the activator's and the pod's logs) to show where the time
//!    goes; they are not in the headline figures. The release test (4) and every cold start
//!    run within one stable window, so no other revision scales down meanwhile.
//! 2. The activator in the path: client → app, client → Envoy → queue-proxy → app (a Service
//!    with `target-burst-capacity: "0"`, in serve mode) and client → Envoy → activator →
//!    queue-proxy → app (`target-burst-capacity: "-1"`, `min-scale: "1"`, in proxy mode):
//!    p50/p99 at a fixed rate (open loop) and throughput at saturation (closed loop).
//! 3. Memory per held request: `--held` requests sent straight to the activator (Envoy's
//!    default circuit breakers stop at 1,024) for a revision whose app never listens; the
//!    activator's RSS before and with all held (counted by its `activator_revision_held_requests`
//!    gauge), over HTTP/1.1 (a connection each) and h2c (100 streams per connection).
//! 4. Release: `--release-held` requests held for a revision at zero whose app listens 2 s
//!    after it starts; from the instant its queue-proxy first answers `K-Network-Probe: queue`
//!    with 200 (polled every ~1 ms) to each response.
//!
//! Usage: `scale-bench [--cold-starts 20] [--traced 5] [--python 5] [--rate 500] [--seconds 5]
//! [--connections 32] [--held 10000] [--release-held 100] [--keep-logs DIR]`
//! (build first: `cargo build --release -p knarr -p knarr-queue-proxy -p knarr-activator
//! -p knarr-tests`). `--held` needs that many free file descriptors (`ulimit -n`).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use knarr_tests::bench::{fixed_rate, saturation};
use knarr_tests::up::{hello_app, KnarrUp};
use knarr_tests::{http_get, http_send, HttpClient};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::process::Command;

/// Knative's shortest stable window and a short grace period, so idle revisions reach zero in
/// about 8 s.
const FAST: &str = "stable-window: 6s\nscale-to-zero-grace-period: 1s\n";
/// Any wait for the system (services ready, revisions at zero).
const WAIT: Duration = Duration::from_secs(120);
/// Between cold starts: the woken revision's switch to its pod settles well within it.
const PAUSE: Duration = Duration::from_millis(100);
/// Streams per h2c connection when holding over h2c (hyper's server allows 200).
const H2_STREAMS: usize = 100;

struct Params {
    cold_starts: usize,
    traced: usize,
    python: usize,
    rate: u64,
    seconds: u64,
    connections: usize,
    held: usize,
    release_held: usize,
    /// Copy knarr up's state folder (its log, the activator's, pod logs) here before stopping.
    keep_logs: Option<PathBuf>,
}

impl Params {
    fn parse() -> anyhow::Result<Params> {
        let mut p = Params {
            cold_starts: 20,
            traced: 5,
            python: 5,
            rate: 500,
            seconds: 5,
            connections: 32,
            held: 10_000,
            release_held: 100,
            keep_logs: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut v = || args.next().with_context(|| format!("{a} needs a value"));
            match a.as_str() {
                "--cold-starts" => p.cold_starts = v()?.parse()?,
                "--traced" => p.traced = v()?.parse()?,
                "--python" => p.python = v()?.parse()?,
                "--rate" => p.rate = v()?.parse()?,
                "--seconds" => p.seconds = v()?.parse()?,
                "--connections" => p.connections = v()?.parse()?,
                "--held" => p.held = v()?.parse()?,
                "--release-held" => p.release_held = v()?.parse()?,
                "--keep-logs" => p.keep_logs = Some(v()?.into()),
                other => bail!(
                    "unknown argument {other:?}; usage: scale-bench [--cold-starts 20] \
                     [--traced 5] [--python 5] [--rate 500] [--seconds 5] [--connections 32] \
                     [--held 10000] [--release-held 100] [--keep-logs DIR]"
                ),
            }
        }
        ensure!(p.cold_starts > 0, "--cold-starts must be at least 1");
        ensure!(
            p.rate > 0 && p.seconds > 0,
            "--rate and --seconds must be positive"
        );
        // The held connections plus a few hundred more; the activator has the same limit.
        let limit = open_files_limit().unwrap_or(u64::MAX);
        ensure!(
            p.held as u64 + 300 <= limit,
            "--held {} needs more open files than `ulimit -n` ({limit}) allows",
            p.held
        );
        Ok(p)
    }
}

/// The soft limit on open files (`Max open files` in `/proc/self/limits`).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?
        .parent()
        .map(|d| d.join(name))
        .context("exe dir")?;
    if !p.exists() {
        bail!(
            "{} not found: cargo build --release -p knarr -p knarr-queue-proxy \
             -p knarr-activator -p knarr-tests",
            p.display()
        );
    }
    Ok(p)
}

/// A Knative Service: `annotations` (autoscaling.knative.dev/…) on the template, `spec` lines
/// (indented six spaces) in the revision spec, `command` and `env` for its container.
fn service(
    name: &str,
    annotations: &[(&str, &str)],
    spec: &str,
    command: &[String],
    env: &[(&str, &str)],
) -> String {
    let annotations: Vec<String> = annotations
        .iter()
        .map(|(k, v)| format!("autoscaling.knative.dev/{k}: {v:?}"))
        .collect();
    let env: Vec<String> = env
        .iter()
        .map(|(k, v)| format!("{{name: {k}, value: {v:?}}}"))
        .collect();
    // A JSON array of strings is a YAML flow sequence.
    let command = serde_json::to_string(command).unwrap_or_default();
    format!(
        "apiVersion: serving.knative.dev/v1\nkind: Service\n\
         metadata: {{name: {name}, namespace: default}}\n\
         spec:\n  template:\n    metadata:\n      annotations: {{{annotations}}}\n    spec:\n{spec}\
         \x20     containers:\n      - image: example.com/bench\n        command: {command}\n\
         \x20       env: [{env}]\n",
        annotations = annotations.join(", "),
        env = env.join(", "),
    )
}

fn echo_command(echo: &std::path::Path, name: &str) -> Vec<String> {
    vec![
        echo.display().to_string(),
        "--listen".into(),
        "127.0.0.1:$(PORT)".into(),
        "--name".into(),
        name.into(),
    ]
}

fn host(name: &str) -> String {
    format!("{name}.default.example.com")
}

fn revision_of(service: &str) -> String {
    format!("{service}-00001")
}

/// The revision's status (`servingMode`, `desiredReplicas`, `actualReplicas`, …).
async fn revision(up: &KnarrUp, name: &str) -> Value {
    up.api_json(&format!("/api/v1/revisions/default/{name}"))
        .await
        .map(|r| r["status"].clone())
        .unwrap_or_default()
}

async fn pods(up: &KnarrUp, name: &str) -> Vec<Value> {
    up.api_json(&format!("/api/v1/pods/default/{name}"))
        .await
        .ok()
        .and_then(|v| v["items"].as_array().cloned())
        .unwrap_or_default()
}

/// At zero: none wanted, none running, no pod listed, the activator in the path.
async fn at_zero(up: &KnarrUp, revision_name: &str) -> bool {
    let s = revision(up, revision_name).await;
    s["desiredReplicas"] == 0
        && s["actualReplicas"] == 0
        && s["servingMode"] == "Proxy"
        && pods(up, revision_name).await.is_empty()
}

async fn wait_at_zero(up: &KnarrUp, revisions: &[String]) -> anyhow::Result<()> {
    for r in revisions {
        if let Err(e) =
            knarr_tests::poll_until(&format!("{r} at zero"), WAIT, || at_zero(up, r)).await
        {
            bail!(
                "{e:#}; status: {}; pods: {:?}",
                revision(up, r).await,
                pods(up, r).await
            );
        }
    }
    Ok(())
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Spawns `program args` with `envs` and times it until `port` on loopback accepts a TCP
/// connection (polled every 100 µs on a blocking thread), then kills it.
async fn time_to_listen(
    program: OsString,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    port: u16,
) -> anyhow::Result<Duration> {
    tokio::task::spawn_blocking(move || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let t0 = Instant::now();
        let mut child = std::process::Command::new(&program)
            .args(&args)
            .envs(envs)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", program.to_string_lossy()))?;
        let outcome = loop {
            if std::net::TcpStream::connect(addr).is_ok() {
                break Ok(t0.elapsed());
            }
            if let Some(status) = child.try_wait()? {
                break Err(anyhow::anyhow!(
                    "{program:?} exited before listening: {status}"
                ));
            }
            if t0.elapsed() > Duration::from_secs(30) {
                break Err(anyhow::anyhow!("{program:?} did not listen within 30 s"));
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        let _ = child.kill();
        let _ = child.wait();
        outcome
    })
    .await?
}

/// One request to a revision at zero (checked right before) through the gateway: the time to
/// its response, which must come from the app.
async fn cold_start(up: &KnarrUp, service: &str) -> anyhow::Result<Duration> {
    let rev = revision_of(service);
    ensure!(
        at_zero(up, &rev).await,
        "{rev} is not at zero before its cold start"
    );
    let t0 = Instant::now();
    let reply = http_get(up.gateway, &host(service), "/").await?;
    let took = t0.elapsed();
    ensure!(
        reply.status == 200 && reply.body.contains(service),
        "{service}: {} {}",
        reply.status,
        reply.body
    );
    Ok(took)
}

/// What a traced cold start saw, as offsets from when its requests were sent. Polled ones are
/// late by up to ~1–2 ms; logged ones come from `knarr up`'s and the activator's logs.
#[derive(Default)]
struct Trace {
    /// The control plane started the pod (`starting pod=…` in knarr up's log).
    pod_started: Option<Duration>,
    /// Its queue-proxy listened (`queue-proxy serving` in the pod's log).
    queue_serving: Option<Duration>,
    /// Its queue-proxy's own probe found the app ready (`user container is ready`, pod log).
    queue_saw_app: Option<Duration>,
    /// The pod appeared in the pods API with its addresses (polled every ~2 ms).
    pod_listed: Option<Duration>,
    /// The app's port (its `PORT`, read from `/proc/<appPid>/environ`) accepted a connection.
    app_listening: Option<Duration>,
    /// The pod's queue-proxy answered `K-Network-Probe: queue` with 200.
    queue_ready: Option<Duration>,
    /// The control plane's runtime saw the pod ready (`readiness changed … ready=true`).
    runtime_ready: Option<Duration>,
    /// The activator probed the pod and took it into rotation (`pod ready`).
    activator_ready: Option<Duration>,
    /// Every response, sorted.
    responses: Vec<Duration>,
}

/// Sends `requests` requests at once to a revision at zero through the gateway and watches the
/// pod come up until every response is in.
async fn traced_cold_start(up: &KnarrUp, service: &str, requests: usize) -> anyhow::Result<Trace> {
    let rev = revision_of(service);
    let api = HttpClient::new(up.api);
    let pods_path = format!("/api/v1/pods/default/{rev}");
    let (gateway, host) = (up.gateway, host(service));
    let wall0 = SystemTime::now();
    let t0 = Instant::now();
    let mut sent = tokio::task::JoinSet::new();
    for _ in 0..requests {
        let host = host.clone();
        sent.spawn(async move {
            let reply = http_get(gateway, &host, "/").await;
            (t0.elapsed(), reply)
        });
    }
    let mut trace = Trace::default();
    let (mut app_addr, mut queue_addr) = (None, None);
    let mut next_api = Instant::now();
    let deadline = t0 + Duration::from_secs(60);
    while trace.app_listening.is_none() || trace.queue_ready.is_none() {
        if Instant::now() > deadline {
            bail!("{rev}: the pod did not come up within 60 s");
        }
        if (app_addr.is_none() || queue_addr.is_none()) && Instant::now() >= next_api {
            next_api = Instant::now() + Duration::from_millis(2);
            if let Ok(reply) = api.get("knarr", &pods_path).await {
                let doc: Value = serde_json::from_str(&reply.body).unwrap_or_default();
                if let Some(pod) = doc["items"].as_array().and_then(|p| p.first()) {
                    queue_addr = pod["address"].as_str().and_then(|a| a.parse().ok());
                    app_addr = pod["appPid"]
                        .as_u64()
                        .and_then(app_port)
                        .map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
                    if queue_addr.is_some() && app_addr.is_some() {
                        trace.pod_listed = Some(t0.elapsed());
                    }
                }
            }
        }
        if let (Some(addr), None) = (app_addr, trace.app_listening) {
            if TcpStream::connect(addr).await.is_ok() {
                trace.app_listening = Some(t0.elapsed());
            }
        }
        if let (Some(addr), None) = (queue_addr, trace.queue_ready) {
            if queue_probe(addr).await {
                trace.queue_ready = Some(t0.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while let Some(done) = sent.join_next().await {
        let (at, reply) = done?;
        let reply = reply?;
        ensure!(
            reply.status == 200 && reply.body.contains(service),
            "{service}: {} {}",
            reply.status,
            reply.body
        );
        trace.responses.push(at);
    }
    trace.responses.sort();
    let knarr_log = up.state.path().join("knarr.log");
    let activator_log = up.state.path().join("activator.log");
    let pod = format!("pod={rev}-pod-");
    trace.pod_started = logged_after(&knarr_log, &["starting", &pod], wall0);
    let pod_logs = up.state.path().join("pods/default").join(&rev);
    let in_pod_logs = |needle: &str| {
        std::fs::read_dir(&pod_logs)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|f| logged_after(&f.path(), &[needle], wall0))
            .min()
    };
    trace.queue_serving = in_pod_logs("queue-proxy serving");
    trace.queue_saw_app = in_pod_logs("user container is ready");
    trace.runtime_ready = logged_after(
        &knarr_log,
        &["readiness changed", &pod, "ready=true"],
        wall0,
    );
    trace.activator_ready = logged_after(
        &activator_log,
        &["pod ready", &format!("revision=default/{rev}")],
        wall0,
    );
    Ok(trace)
}

/// When the first line of the log at `path` that mentions every one of `needles` and was logged
/// at or after `since` was logged, as an offset from `since`. Lines start with tracing's UTC
/// RFC 3339 timestamp; only the time of day is read (a midnight in between is handled).
fn logged_after(path: &std::path::Path, needles: &[&str], since: SystemTime) -> Option<Duration> {
    let log = std::fs::read_to_string(path).ok()?;
    let since_day = since.duration_since(UNIX_EPOCH).ok()?.as_secs_f64() % 86_400.0;
    log.lines().find_map(|line| {
        let line = strip_ansi(line);
        // Pod logs prefix each line with its source: `[queue] 2026-…`.
        let line = match line.strip_prefix('[') {
            Some(rest) => rest.split_once("] ").map_or("", |(_, l)| l).to_owned(),
            None => line,
        };
        if !needles.iter().all(|n| line.contains(n)) {
            return None;
        }
        let mut delta = time_of_day(&line)? - since_day;
        if delta < -43_200.0 {
            delta += 86_400.0;
        } else if delta > 43_200.0 {
            delta -= 86_400.0;
        }
        (delta >= 0.0).then(|| Duration::from_secs_f64(delta))
    })
}

/// How many lines of the log at `path` mention `needle` and were logged within `span` of
/// `since`.
fn logged_between(
    path: &std::path::Path,
    needle: &str,
    since: SystemTime,
    span: Duration,
) -> usize {
    let Ok(log) = std::fs::read_to_string(path) else {
        return 0;
    };
    let Ok(since_epoch) = since.duration_since(UNIX_EPOCH) else {
        return 0;
    };
    let since_day = since_epoch.as_secs_f64() % 86_400.0;
    log.lines()
        .map(strip_ansi)
        .filter(|line| line.contains(needle))
        .filter_map(|line| time_of_day(&line))
        .map(|t| (t - since_day + 86_400.0) % 86_400.0)
        .filter(|delta| *delta <= span.as_secs_f64())
        .count()
}

/// Seconds since midnight of a line starting `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn time_of_day(line: &str) -> Option<f64> {
    let (h, rest) = line.get(11..)?.split_once(':')?;
    let (m, rest) = rest.split_once(':')?;
    let s: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// The text of a log line without its terminal colours (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `PORT` from a process's environment.
fn app_port(pid: u64) -> Option<u16> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"PORT="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

/// The queue-proxy's readiness, as the activator asks it.
async fn queue_probe(addr: SocketAddr) -> bool {
    let req = http::Request::get("/")
        .header("host", "probe")
        .header("k-network-probe", "queue")
        .body(Bytes::new());
    match req {
        Ok(req) => matches!(http_send(addr, req).await, Ok(r) if r.status == 200),
        Err(_) => false,
    }
}

/// The activator's `activator_revision_held_requests` for `default/revision` (0 if absent).
async fn held_for(admin: SocketAddr, revision: &str) -> anyhow::Result<f64> {
    let reply = http_get(admin, "activator", "/metrics").await?;
    let series = format!("revision=\"{revision}\"");
    Ok(reply
        .body
        .lines()
        .filter(|l| l.starts_with("activator_revision_held_requests{") && l.contains(&series))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0))
}

/// How the held requests reach the activator.
enum Held {
    /// One HTTP/1.1 connection per request, its request written and never read.
    Http1(Vec<TcpStream>),
    /// h2c connections with [`H2_STREAMS`] requests each, awaited by tasks.
    H2c(tokio::task::JoinSet<()>),
}

impl Held {
    /// Closes every connection: the client gives up on all of them at once.
    fn cancel(self) {
        match self {
            Held::Http1(streams) => drop(streams),
            Held::H2c(mut tasks) => tasks.abort_all(),
        }
    }
}

fn held_request(revision: &str) -> http::Request<http_body_util::Empty<Bytes>> {
    http::Request::get("http://hold.default.example.com/")
        .header("knative-serving-revision", revision)
        .header("knative-serving-namespace", "default")
        .body(http_body_util::Empty::new())
        .unwrap_or_default()
}

async fn hold_http1(addr: SocketAddr, n: usize, revision: &str) -> anyhow::Result<Held> {
    let request = format!(
        "GET / HTTP/1.1\r\nHost: hold.default.example.com\r\n\
         Knative-Serving-Revision: {revision}\r\nKnative-Serving-Namespace: default\r\n\r\n"
    );
    let streams: Vec<TcpStream> = futures::stream::iter(0..n)
        .map(|_| async {
            let mut s = TcpStream::connect(addr).await.context("connect")?;
            s.write_all(request.as_bytes()).await?;
            anyhow::Ok(s)
        })
        .buffer_unordered(128)
        .try_collect()
        .await?;
    Ok(Held::Http1(streams))
}

async fn hold_h2c(addr: SocketAddr, n: usize, revision: &str) -> anyhow::Result<Held> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let mut tasks = tokio::task::JoinSet::new();
    let mut left = n;
    while left > 0 {
        let streams = left.min(H2_STREAMS);
        left -= streams;
        let tcp = TcpStream::connect(addr).await.context("connect")?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .context("h2c handshake")?;
        tasks.spawn(async move {
            let _ = conn.await;
        });
        for _ in 0..streams {
            let mut sender = sender.clone();
            let req = held_request(revision);
            tasks.spawn(async move {
                let _ = sender.send_request(req).await;
            });
        }
    }
    Ok(Held::H2c(tasks))
}

/// One row of the memory table.
struct HeldRow {
    how: &'static str,
    revision: String,
    connections: usize,
    rss_before: f64,
    rss_held: f64,
    rss_after: f64,
    left_after_cancel: f64,
    cancel_time: Duration,
    cancelled_at: Instant,
}

async fn measure_held(
    admin: SocketAddr,
    pid: u32,
    how: &'static str,
    revision: &str,
    n: usize,
    hold: impl std::future::Future<Output = anyhow::Result<Held>>,
) -> anyhow::Result<HeldRow> {
    let base = held_for(admin, revision).await?;
    let (rss_before, _) = knarr_tests::proc_usage(pid)?;
    let held = hold.await?;
    let connections = match &held {
        Held::Http1(s) => s.len(),
        Held::H2c(_) => n.div_ceil(H2_STREAMS),
    };
    let target = base + n as f64;
    let t0 = Instant::now();
    loop {
        let now = held_for(admin, revision).await?;
        if now >= target {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("{how}: the activator holds {now} requests for {revision}, not {target}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let allocations settle (buffers grown while accepting).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_held, _) = knarr_tests::proc_usage(pid)?;
    let t1 = Instant::now();
    held.cancel();
    let mut left = held_for(admin, revision).await? - base;
    while left > 0.0 && t1.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = held_for(admin, revision).await? - base;
    }
    let cancel_time = t1.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_after, _) = knarr_tests::proc_usage(pid)?;
    Ok(HeldRow {
        how,
        revision: revision.to_owned(),
        connections,
        rss_before,
        rss_held,
        rss_after,
        left_after_cancel: left,
        cancel_time,
        cancelled_at: t1,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let p = Params::parse()?;
    let echo = sibling("knarr-echo")?;
    let python = hello_app();

    // Every Service of the run, created at once.
    let cold: Vec<String> = (1..=p.cold_starts)
        .map(|i| format!("cold-{i:02}"))
        .collect();
    let traced: Vec<String> = (1..=p.traced).map(|i| format!("traced-{i:02}")).collect();
    let py: Vec<String> = (1..=p.python).map(|i| format!("py-{i:02}")).collect();
    let mut files: Vec<(String, String)> = Vec::new();
    for name in cold.iter().chain(&traced) {
        files.push((
            format!("{name}.yaml"),
            service(name, &[], "", &echo_command(&echo, name), &[]),
        ));
    }
    for name in &py {
        let command = vec!["python3".to_string(), python.display().to_string()];
        // hello.py greets TARGET: the name in the body proves which Service answered.
        let yaml = service(name, &[], "", &command, &[("TARGET", name)]);
        files.push((format!("{name}.yaml"), yaml));
    }
    files.push((
        "serve.yaml".into(),
        service(
            "serve",
            &[("target-burst-capacity", "0"), ("min-scale", "1")],
            "",
            &echo_command(&echo, "serve"),
            &[],
        ),
    ));
    files.push((
        "proxy.yaml".into(),
        service(
            "proxy",
            &[("target-burst-capacity", "-1"), ("min-scale", "1")],
            "",
            &echo_command(&echo, "proxy"),
            &[],
        ),
    ));
    let release_cmd = format!(
        "sleep 2; exec {} --listen 127.0.0.1:$PORT --name release",
        echo.display()
    );
    files.push((
        "release.yaml".into(),
        service(
            "release",
            &[],
            "",
            &["sh".into(), "-c".into(), release_cmd],
            &[],
        ),
    ));
    // Never ready (never listens), at most one pod however many requests wait.
    for name in ["hold", "hold2"] {
        files.push((
            format!("{name}.yaml"),
            service(
                name,
                &[("max-scale", "1")],
                "      timeoutSeconds: 600\n",
                &["sleep".into(), "3600".into()],
                &[],
            ),
        ));
    }
    // Per revision; each hold revision gets `--held` requests.
    let depth = p.held.max(20_000).to_string();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let up = KnarrUp::start_with(&refs, Some(FAST), &["--activator-queue-depth", &depth]).await?;
    // From here: the binaries are built (the fixture may have rebuilt them) and knarr up runs.
    let launched = Instant::now();
    let mut ready: Vec<&String> = cold.iter().chain(&traced).chain(&py).collect();
    let (serve, proxy, release) = (
        "serve".to_string(),
        "proxy".to_string(),
        "release".to_string(),
    );
    ready.extend([&serve, &proxy, &release]);
    for name in &ready {
        up.wait_service(name, &revision_of(name), WAIT).await;
    }
    let all_up = launched.elapsed();

    // The app's own start, measured while the revisions idle toward zero.
    let mut echo_start = Vec::new();
    for _ in 0..p.cold_starts {
        let port = knarr_tests::free_port()?;
        let args = echo_command(&echo, "direct")
            .into_iter()
            .skip(1)
            .map(|a| a.replace("$(PORT)", &port.to_string()))
            .collect();
        echo_start.push(time_to_listen(echo.clone().into(), args, vec![], port).await?);
    }
    echo_start.sort();
    let mut py_start = Vec::new();
    for _ in 0..p.python.max(1) * 3 {
        let port = knarr_tests::free_port()?;
        py_start.push(
            time_to_listen(
                "python3".into(),
                vec![python.display().to_string()],
                vec![("PORT".into(), port.to_string())],
                port,
            )
            .await?,
        );
    }
    py_start.sort();

    let zero: Vec<String> = cold
        .iter()
        .chain(&traced)
        .chain(&py)
        .chain([&release])
        .map(|s| revision_of(s))
        .collect();
    wait_at_zero(&up, &zero).await?;
    let at_zero_after = launched.elapsed();

    // 4. Release of held requests. Everything from here to the last cold start takes less than
    // the stable window, so no revision scales down meanwhile (it would load the machine).
    let rev = revision_of(&release);
    ensure!(
        at_zero(&up, &rev).await,
        "{rev} is not at zero before the release test"
    );
    let cold_phase = Instant::now();
    let cold_phase_wall = SystemTime::now();
    let released = traced_cold_start(&up, &release, p.release_held).await?;

    // 1. Cold starts, one at a time.
    let mut cold_times = Vec::new();
    for name in &cold {
        cold_times.push(cold_start(&up, name).await?);
        tokio::time::sleep(PAUSE).await;
    }
    let mut py_times = Vec::new();
    for name in &py {
        py_times.push(cold_start(&up, name).await?);
        tokio::time::sleep(PAUSE).await;
    }
    let mut traces = Vec::new();
    for name in &traced {
        let rev = revision_of(name);
        ensure!(
            at_zero(&up, &rev).await,
            "{rev} is not at zero before its cold start"
        );
        traces.push(traced_cold_start(&up, name, 1).await?);
        tokio::time::sleep(PAUSE).await;
    }

    let cold_phase = cold_phase.elapsed();
    let scaled_down_meanwhile = logged_between(
        &up.state.path().join("knarr.log"),
        "scaling down",
        cold_phase_wall,
        cold_phase,
    );

    // 3. Memory per held request, straight to the activator.
    let activator = {
        let mut found = None;
        knarr_tests::poll_until("the activator's addresses", WAIT, || {
            found = up
                .activator()
                .zip(up.activator_admin())
                .zip(up.activator_pid());
            std::future::ready(found.is_some())
        })
        .await?;
        found.context("activator")?
    };
    let ((activator_addr, admin), activator_pid) = activator;
    let mut held_rows = Vec::new();
    if p.held > 0 {
        held_rows.push(
            measure_held(
                admin,
                activator_pid,
                "HTTP/1.1, a connection per request",
                "hold-00001",
                p.held,
                hold_http1(activator_addr, p.held, "hold-00001"),
            )
            .await?,
        );
        held_rows.push(
            measure_held(
                admin,
                activator_pid,
                "h2c, 100 streams per connection",
                "hold2-00001",
                p.held,
                hold_h2c(activator_addr, p.held, "hold2-00001"),
            )
            .await?,
        );
    }

    // 2. The activator in the path vs not. Cold-started revisions go back to zero first, so
    // no scale-down runs during the measurement.
    wait_at_zero(&up, &zero).await?;
    let direct_port = knarr_tests::free_port()?;
    let direct_args: Vec<String> = echo_command(&echo, "direct")
        .into_iter()
        .skip(1)
        .map(|a| a.replace("$(PORT)", &direct_port.to_string()))
        .collect();
    let _direct = Command::new(&echo)
        .args(&direct_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let direct = SocketAddr::from(([127, 0, 0, 1], direct_port));
    knarr_tests::poll_until("knarr-echo direct", WAIT, || async {
        matches!(http_get(direct, "direct", "/").await, Ok(r) if r.status == 200)
    })
    .await?;
    let duration = Duration::from_secs(p.seconds);
    let mut path_rows = Vec::new();
    for (label, addr, host_name, mode) in [
        ("client → app", direct, "direct".to_string(), None),
        (
            "client → Envoy → queue-proxy → app (TBC 0, serve)",
            up.gateway,
            host(&serve),
            Some(("serve-00001", "Serve")),
        ),
        (
            "client → Envoy → activator → queue-proxy → app (TBC -1, proxy)",
            up.gateway,
            host(&proxy),
            Some(("proxy-00001", "Proxy")),
        ),
    ] {
        let check_mode = || async {
            if let Some((rev, want)) = mode {
                let s = revision(&up, rev).await;
                ensure!(
                    s["servingMode"] == want,
                    "{rev}: servingMode {} (want {want}): {s}",
                    s["servingMode"]
                );
            }
            anyhow::Ok(())
        };
        check_mode().await?;
        let client = HttpClient::new(addr);
        fixed_rate(&client, &host_name, p.rate, Duration::from_millis(500)).await?;
        let lat = fixed_rate(&client, &host_name, p.rate, duration).await?;
        let sat = saturation(addr, &host_name, p.connections, duration).await?;
        check_mode().await?;
        path_rows.push((label, pct(&lat, 50.0), pct(&lat, 99.0), sat));
    }
    let total = launched.elapsed();
    // Held requests whose clients left but that the activator still counts.
    let mut stuck = Vec::new();
    for r in &held_rows {
        let left = held_for(admin, &r.revision).await?;
        if left > 0.0 {
            stuck.push((r.revision.clone(), left, r.cancelled_at.elapsed()));
        }
    }
    if let Some(dir) = &p.keep_logs {
        let status = std::process::Command::new("cp")
            .arg("-r")
            .arg(up.state.path())
            .arg(dir)
            .status()?;
        ensure!(status.success(), "copying the logs to {}", dir.display());
    }
    let (_status, _) = up.stop().await?;

    // Report.
    println!("# scale-bench: scale to zero with knarr up (one run, this machine)");
    println!();
    println!(
        "Parameters: --cold-starts {} --traced {} --python {} --rate {} --seconds {} \
         --connections {} --held {} --release-held {}; config-autoscaler: stable-window 6s, \
         scale-to-zero-grace-period 1s; activator queue depth {depth}; Envoy {}; {} CPUs. \
         From knarr up's start: all {} services ready after {:.1} s, at zero after {:.1} s, \
         done after {:.1} s; the release test and every cold start took {:.1} s together, with \
         {} pods scaled down meanwhile.",
        p.cold_starts,
        p.traced,
        p.python,
        p.rate,
        p.seconds,
        p.connections,
        p.held,
        p.release_held,
        knarr_tests::ENVOY_VERSION,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        ready.len(),
        all_up.as_secs_f64(),
        at_zero_after.as_secs_f64(),
        total.as_secs_f64(),
        cold_phase.as_secs_f64(),
        scaled_down_meanwhile,
    );
    println!();
    println!(
        "## 1. Cold start: revision at zero → first response \
         (client → Envoy → activator → new pod)"
    );
    println!();
    println!(
        "| app | cold starts | first response p50 ms | p99 ms | app start p50 ms | p99 ms | \
         overhead p50 ms | overhead p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    cold_times.sort();
    py_times.sort();
    for (app, times, start) in [
        ("knarr-echo", &cold_times, &echo_start),
        ("python3 hello.py", &py_times, &py_start),
    ] {
        if times.is_empty() {
            continue;
        }
        let (c50, c99) = (pct(times, 50.0), pct(times, 99.0));
        let (s50, s99) = (pct(start, 50.0), pct(start, 99.0));
        println!(
            "| {app} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            times.len(),
            ms(c50),
            ms(c99),
            ms(s50),
            ms(s99),
            ms(c50) - ms(s50),
            ms(c99) - ms(s99),
        );
    }
    println!();
    println!(
        "App start = the same command spawned directly until its port accepts a TCP connection \
         ({} runs of knarr-echo, {} of python3). With fewer than 100 samples p99 is the \
         maximum. Target: overhead p50 ≤ 30 ms. Anchors: Knative scale from zero 2–4 s; 3.4 s \
         average on OpenShift.",
        echo_start.len(),
        py_start.len()
    );
    if !traces.is_empty() {
        println!();
        println!(
            "Where the time goes ({} more knarr-echo cold starts, traced; ms after the request \
             was sent; polled every ~1–2 ms, so each is late by up to that):",
            traces.len()
        );
        println!();
        println!("| step | p50 ms | min ms | max ms |");
        println!("|---|---:|---:|---:|");
        type Step = fn(&Trace) -> Option<Duration>;
        let steps: [(&str, Step); 9] = [
            ("control plane starts the pod (log)", |t| t.pod_started),
            ("queue-proxy listening (pod log)", |t| t.queue_serving),
            ("pod listed in the pods API with its addresses", |t| {
                t.pod_listed
            }),
            ("app accepts connections on its port", |t| t.app_listening),
            ("queue-proxy's probe finds the app ready (pod log)", |t| {
                t.queue_saw_app
            }),
            ("queue-proxy answers K-Network-Probe: queue with 200", |t| {
                t.queue_ready
            }),
            ("control plane sees the pod ready (log)", |t| {
                t.runtime_ready
            }),
            ("activator probed it and takes it (log)", |t| {
                t.activator_ready
            }),
            ("first response", |t| t.responses.first().copied()),
        ];
        for (step, f) in steps {
            let mut v: Vec<Duration> = traces.iter().filter_map(f).collect();
            v.sort();
            println!(
                "| {step} | {:.1} | {:.1} | {:.1} |",
                ms(pct(&v, 50.0)),
                ms(v.first().copied().unwrap_or_default()),
                ms(v.last().copied().unwrap_or_default()),
            );
        }
    }
    println!();
    println!(
        "## 2. The activator in the path: {} rps for {} s (open loop), then saturation with {} \
         connections for {} s",
        p.rate, p.seconds, p.connections, p.seconds
    );
    println!();
    println!(
        "| path | p50 µs @ {} rps | p99 µs | added p50 µs | added p99 µs | saturation rps |",
        p.rate
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let (d50, d99) = (us(path_rows[0].1), us(path_rows[0].2));
    for (label, p50, p99, sat) in &path_rows {
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} | {:.0} | {sat:.0} |",
            us(*p50),
            us(*p99),
            us(*p50) - d50,
            us(*p99) - d99,
        );
    }
    println!();
    let act = (
        us(path_rows[2].1) - us(path_rows[1].1),
        us(path_rows[2].2) - us(path_rows[1].2),
    );
    println!(
        "The activator alone (proxy − serve): {:+.0} µs p50, {:+.0} µs p99. Anchor: Knative's \
         activator adds ~2 ms. servingMode checked before and after each path.",
        act.0, act.1
    );
    if !held_rows.is_empty() {
        println!();
        println!(
            "## 3. Memory per held request: {} requests held by the activator (revision never \
             ready), sent straight to it",
            p.held
        );
        println!();
        println!(
            "| client → activator | connections | RSS before MiB | RSS held MiB | added MiB | \
             KiB per held request | RSS after cancel MiB | still held after cancel | \
             cancel time ms |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &held_rows {
            let added = r.rss_held - r.rss_before;
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {} | {:.0} |",
                r.how,
                r.connections,
                r.rss_before,
                r.rss_held,
                added,
                added * 1024.0 / p.held as f64,
                r.rss_after,
                r.left_after_cancel,
                ms(r.cancel_time),
            );
        }
        println!();
        println!(
            "Held = the revision's activator_revision_held_requests gauge reached the count; RSS \
             from /proc/<pid>/status VmRSS, 0.5 s later. Cancel = the client closes every \
             connection; still held = that gauge once it reached 0, or after 10 s."
        );
        for (revision, left, after) in &stuck {
            println!(
                "{revision}: {left} requests still held {:.0} s after their clients closed their \
                 connections (at the end of the run).",
                after.as_secs_f64()
            );
        }
    }
    println!();
    println!(
        "## 4. Release: {} requests held for a revision at zero whose app listens 2 s after it \
         starts",
        p.release_held
    );
    println!();
    let ready_at = released
        .queue_ready
        .context("no queue-proxy ready instant")?;
    let lag: Vec<Duration> = released
        .responses
        .iter()
        .map(|r| r.saturating_sub(ready_at))
        .collect();
    println!("| from pod ready to response | p50 ms | p99 ms | max ms | first ms |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| {} held requests | {:.1} | {:.1} | {:.1} | {:.1} |",
        lag.len(),
        ms(pct(&lag, 50.0)),
        ms(pct(&lag, 99.0)),
        ms(lag.last().copied().unwrap_or_default()),
        ms(lag.first().copied().unwrap_or_default()),
    );
    println!();
    let offset = |d: Option<Duration>| d.map_or(f64::NAN, |d| ms(d) - ms(ready_at));
    println!(
        "Pod ready = the first 200 from its queue-proxy to K-Network-Probe: queue (polled every \
         ~1 ms), {:.0} ms after the requests were sent. Relative to it: the app began listening \
         at {:+.1} ms, the control plane saw the pod ready at {:+.1} ms, the activator took it at \
         {:+.1} ms (logs), first response {:+.1} ms, last {:+.1} ms.",
        ms(ready_at),
        offset(released.app_listening),
        offset(released.runtime_ready),
        offset(released.activator_ready),
        offset(released.responses.first().copied()),
        offset(released.responses.last().copied()),
    );
    Ok(())
}
