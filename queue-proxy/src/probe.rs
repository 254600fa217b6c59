//! Readiness of the user container, and the answers to probes sent to the queue-proxy itself.
//!
//! Knative passes the user container's readiness probe to the queue-proxy as JSON in
//! `SERVING_READINESS_PROBE` ([`parse_probe`]); the queue-proxy runs it against `127.0.0.1`
//! ([`Readiness`]) and the kubelet, the activator and the ingress prober ask the queue-proxy
//! instead of the app ([`answer_probe`]).
//!
//! Unlike Knative, which runs the user's probe when the kubelet asks (polling for up to 10 s in
//! aggressive mode), the probe runs in one background task and probes are answered from its last
//! verdict: an answer never waits, and the user container is probed at one steady pace whoever
//! asks and however often.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// The environment variable holding the user container's readiness probe.
pub const ENV_VAR: &str = "SERVING_READINESS_PROBE";

/// Aggressive mode (`periodSeconds: 0`): time between probes until the first success.
pub const AGGRESSIVE_INTERVAL: Duration = Duration::from_millis(50);
/// Aggressive mode: timeout of each fast probe.
pub const AGGRESSIVE_TIMEOUT: Duration = Duration::from_millis(100);
/// Aggressive mode: how long the fast pace lasts before falling back to [`SETTLED_INTERVAL`]
/// (Knative's `PollTimeout`). It starts again whenever the container turns not ready.
pub const AGGRESSIVE_WINDOW: Duration = Duration::from_secs(10);
/// Aggressive mode: time between probes once ready, or once the fast window has passed.
pub const SETTLED_INTERVAL: Duration = Duration::from_secs(1);
/// `User-Agent` of HTTP probes sent to the user container (the kubelet sends `kube-probe/<ver>`).
pub const PROBE_USER_AGENT: &str = "kube-probe/knarr";

/// `K-Network-Probe`: marks a probe; its value says what is being probed.
pub const K_NETWORK_PROBE: HeaderName = HeaderName::from_static("k-network-probe");
/// `K-Network-Hash`: the ingress prober's hash, echoed back by `K-Network-Probe: probe` answers.
pub const K_NETWORK_HASH: HeaderName = HeaderName::from_static("k-network-hash");
/// `K-Kubelet-Probe`: Knative's marker for kubelet probes (besides the `kube-probe/` user agent).
pub const K_KUBELET_PROBE: HeaderName = HeaderName::from_static("k-kubelet-probe");

/// User-agent prefixes of health checks meant for the queue-proxy itself (Knative's
/// `IsKubeletProbe` plus the drainer's `HealthCheckUAPrefixes`).
const HEALTH_CHECK_USER_AGENTS: [&str; 3] = [
    "kube-probe/",
    "Knative-Activator-Probe",
    "Knative-Autoscaling-Probe",
];

/// `SERVING_READINESS_PROBE` could not be used; says which field and why.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("SERVING_READINESS_PROBE is not valid JSON: {source}")]
    Json {
        #[source]
        source: serde_json::Error,
    },
    #[error("SERVING_READINESS_PROBE: {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error(
        "SERVING_READINESS_PROBE: `{handler}` readiness probes are not supported by the \
         queue-proxy; use httpGet or tcpSocket"
    )]
    Unsupported { handler: &'static str },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ProbeError {
    ProbeError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// What a probe does to the user container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    /// `tcpSocket`: a TCP connect succeeds.
    TcpSocket { host: String, port: u16 },
    /// `httpGet`: a `GET` answers 2xx or 3xx.
    HttpGet(HttpGetAction),
}

/// An `httpGet` probe (plain HTTP/1.1 only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpGetAction {
    pub host: String,
    pub port: u16,
    /// Origin-form request target: path and query, always starting with `/`.
    pub path: String,
    /// `httpHeaders`, in order; a `Host` or `User-Agent` here replaces the default.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// A readiness probe, typed and defaulted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    pub action: ProbeAction,
    /// `periodSeconds`; zero selects aggressive probing (see [`Readiness::spawn`]).
    pub period: Duration,
    /// `timeoutSeconds` (default 1 s); aggressive mode uses [`AGGRESSIVE_TIMEOUT`] while fast.
    pub timeout: Duration,
    /// Consecutive successes to turn ready (default 1).
    pub success_threshold: u32,
    /// Consecutive failures to turn not ready once ready (default 3).
    pub failure_threshold: u32,
    /// `initialDelaySeconds` before the first probe.
    pub initial_delay: Duration,
}

const LOOPBACK: &str = "127.0.0.1";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_SUCCESS_THRESHOLD: u32 = 1;
const DEFAULT_FAILURE_THRESHOLD: u32 = 3;

impl ProbeConfig {
    /// Knative's default readiness: aggressive TCP connects to the user port.
    pub fn tcp_default(user_port: u16) -> Self {
        ProbeConfig {
            action: ProbeAction::TcpSocket {
                host: LOOPBACK.to_owned(),
                port: user_port,
            },
            period: Duration::ZERO,
            timeout: DEFAULT_TIMEOUT,
            success_threshold: DEFAULT_SUCCESS_THRESHOLD,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            initial_delay: Duration::ZERO,
        }
    }

    /// `periodSeconds: 0`: probe fast until ready (Knative's aggressive probing).
    pub fn is_aggressive(&self) -> bool {
        self.period.is_zero()
    }
}

/// Parses `SERVING_READINESS_PROBE` (a core/v1 `Probe` as JSON).
///
/// Absent, empty or `null` gives [`ProbeConfig::tcp_default`]. Zero or absent fields take the
/// Kubernetes defaults, except `periodSeconds`, where zero (which Knative's encoder omits) means
/// aggressive. A probe without a handler probes TCP on the user port with its own timings. A
/// port of 0, absent, or named (a Knative container has exactly one port, so a name can only
/// mean it) is the user port. A JSON array (Knative's multi-container probing) is accepted when
/// it holds one probe.
pub fn parse_probe(json: Option<&str>, user_port: u16) -> Result<ProbeConfig, ProbeError> {
    let text = json.map(str::trim).unwrap_or_default();
    if text.is_empty() {
        return Ok(ProbeConfig::tcp_default(user_port));
    }
    let value: Value = serde_json::from_str(text).map_err(|source| ProbeError::Json { source })?;
    let probe = match value {
        Value::Null => return Ok(ProbeConfig::tcp_default(user_port)),
        Value::Object(probe) => probe,
        Value::Array(mut probes) => match probes.len() {
            0 => return Ok(ProbeConfig::tcp_default(user_port)),
            1 => match probes.pop() {
                Some(Value::Object(probe)) => probe,
                Some(other) => return Err(invalid("[0]", expected("an object", &other))),
                None => unreachable!("length checked"),
            },
            n => {
                return Err(invalid(
                    "(top level)",
                    format!("{n} probes (multi-container probing) are not supported; expected one"),
                ))
            }
        },
        other => {
            return Err(invalid(
                "(top level)",
                expected("an object (a core/v1 Probe)", &other),
            ))
        }
    };
    parse_probe_object(&probe, user_port)
}

fn parse_probe_object(
    probe: &Map<String, Value>,
    user_port: u16,
) -> Result<ProbeConfig, ProbeError> {
    const HANDLERS: [&str; 4] = ["httpGet", "tcpSocket", "exec", "grpc"];
    let present: Vec<&'static str> = HANDLERS
        .into_iter()
        .filter(|h| probe.get(*h).is_some_and(|v| !v.is_null()))
        .collect();
    let action = match present.as_slice() {
        [] => ProbeAction::TcpSocket {
            host: LOOPBACK.to_owned(),
            port: user_port,
        },
        ["httpGet"] => ProbeAction::HttpGet(parse_http_get(&probe["httpGet"], user_port)?),
        ["tcpSocket"] => parse_tcp_socket(&probe["tcpSocket"], user_port)?,
        [handler] => return Err(ProbeError::Unsupported { handler }),
        several => {
            return Err(invalid(
                "(handler)",
                format!("only one handler may be set, found {}", several.join(", ")),
            ))
        }
    };
    let seconds = |field| -> Result<Duration, ProbeError> {
        Ok(Duration::from_secs(
            whole_number(probe, field)?.unwrap_or(0),
        ))
    };
    let threshold = |field, default| -> Result<u32, ProbeError> {
        match whole_number(probe, field)? {
            None | Some(0) => Ok(default),
            Some(n) => u32::try_from(n).map_err(|_| invalid(field, format!("{n} is too large"))),
        }
    };
    let timeout = seconds("timeoutSeconds")?;
    Ok(ProbeConfig {
        action,
        period: seconds("periodSeconds")?,
        timeout: if timeout.is_zero() {
            DEFAULT_TIMEOUT
        } else {
            timeout
        },
        success_threshold: threshold("successThreshold", DEFAULT_SUCCESS_THRESHOLD)?,
        failure_threshold: threshold("failureThreshold", DEFAULT_FAILURE_THRESHOLD)?,
        initial_delay: seconds("initialDelaySeconds")?,
    })
}

fn parse_tcp_socket(value: &Value, user_port: u16) -> Result<ProbeAction, ProbeError> {
    let tcp = object(value, "tcpSocket")?;
    Ok(ProbeAction::TcpSocket {
        host: host(tcp, "tcpSocket.host")?,
        port: port(tcp.get("port"), "tcpSocket.port", user_port)?,
    })
}

fn parse_http_get(value: &Value, user_port: u16) -> Result<HttpGetAction, ProbeError> {
    let get = object(value, "httpGet")?;
    match optional_str(get, "scheme", "httpGet.scheme")? {
        None => {}
        Some(s) if s.is_empty() || s.eq_ignore_ascii_case("HTTP") => {}
        Some(s) if s.eq_ignore_ascii_case("HTTPS") => {
            return Err(invalid(
                "httpGet.scheme",
                "HTTPS probes are not supported (the queue-proxy has no TLS client); use HTTP",
            ))
        }
        Some(other) => {
            return Err(invalid(
                "httpGet.scheme",
                format!("{other:?} is neither HTTP nor HTTPS"),
            ))
        }
    }

    let path = match optional_str(get, "path", "httpGet.path")? {
        None | Some("") => "/".to_owned(),
        Some(p) if p.starts_with('/') => p.to_owned(),
        Some(p) => format!("/{p}"),
    };
    if let Err(e) = path.parse::<http::uri::PathAndQuery>() {
        return Err(invalid("httpGet.path", format!("{path:?}: {e}")));
    }

    let mut headers = Vec::new();
    match get.get("httpHeaders") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let field = format!("httpGet.httpHeaders[{i}]");
                let item = object(item, &field)?;
                let name_field = format!("{field}.name");
                let name = optional_str(item, "name", &name_field)?
                    .ok_or_else(|| invalid(&name_field, "missing"))?;
                let name = HeaderName::try_from(name)
                    .map_err(|e| invalid(&name_field, format!("{name:?}: {e}")))?;
                let value_field = format!("{field}.value");
                let value = optional_str(item, "value", &value_field)?.unwrap_or_default();
                let value = HeaderValue::try_from(value)
                    .map_err(|e| invalid(&value_field, format!("{value:?}: {e}")))?;
                headers.push((name, value));
            }
        }
        Some(other) => return Err(invalid("httpGet.httpHeaders", expected("an array", other))),
    }

    Ok(HttpGetAction {
        host: host(get, "httpGet.host")?,
        port: port(get.get("port"), "httpGet.port", user_port)?,
        path,
        headers,
    })
}

fn object<'a>(value: &'a Value, field: &str) -> Result<&'a Map<String, Value>, ProbeError> {
    value
        .as_object()
        .ok_or_else(|| invalid(field, expected("an object", value)))
}

fn optional_str<'a>(
    map: &'a Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Option<&'a str>, ProbeError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(field, expected("a string", other))),
    }
}

fn host(map: &Map<String, Value>, field: &str) -> Result<String, ProbeError> {
    Ok(match optional_str(map, "host", field)? {
        None | Some("") => LOOPBACK.to_owned(),
        Some(h) => h.to_owned(),
    })
}

/// An IntOrString port; 0, absent and named ports mean the user port.
fn port(value: Option<&Value>, field: &str, user_port: u16) -> Result<u16, ProbeError> {
    let number = match value {
        None | Some(Value::Null) => return Ok(user_port),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| invalid(field, format!("{n} is not a whole number")))?,
        Some(Value::String(s)) => match s.trim() {
            "" => return Ok(user_port),
            s if s.bytes().all(|b| b.is_ascii_digit()) => s
                .parse::<i64>()
                .map_err(|_| invalid(field, format!("{s:?} is not a port")))?,
            // A named port: the serving container has only the user port.
            _ => return Ok(user_port),
        },
        Some(other) => return Err(invalid(field, expected("a number or a string", other))),
    };
    match number {
        0 => Ok(user_port),
        n => u16::try_from(n).map_err(|_| invalid(field, format!("{n} is not a port (1-65535)"))),
    }
}

fn whole_number(map: &Map<String, Value>, field: &str) -> Result<Option<u64>, ProbeError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) => Ok(Some(n)),
            None => Err(invalid(
                field,
                format!("{n} is not a non-negative whole number"),
            )),
        },
        Some(other) => Err(invalid(field, expected("a number", other))),
    }
}

fn expected(what: &str, found: &Value) -> String {
    let kind = match found {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("expected {what}, found {kind}")
}

/// The user container's readiness, kept current by a background probing task.
///
/// Starts not ready. Dropping it stops the probing.
pub struct Readiness {
    ready: Arc<watch::Sender<bool>>,
    probes_run: Arc<AtomicU64>,
    #[cfg(test)]
    probe_count: Arc<watch::Sender<u64>>,
    task: AbortHandle,
}

impl fmt::Debug for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Readiness")
            .field("ready", &self.is_ready())
            .field("probes_run", &self.probes_run())
            .finish()
    }
}

impl Readiness {
    /// Starts probing in a background task (call inside a Tokio runtime).
    ///
    /// Aggressive mode (`periodSeconds: 0`): every [`AGGRESSIVE_INTERVAL`] with
    /// [`AGGRESSIVE_TIMEOUT`] until ready, so a new pod is ready within ~50 ms of its app
    /// listening; after [`AGGRESSIVE_WINDOW`] without success, every [`SETTLED_INTERVAL`]. Once
    /// ready, every [`SETTLED_INTERVAL`] with `timeoutSeconds`; `failureThreshold` consecutive
    /// failures turn it not ready and restart the fast pace.
    ///
    /// Normal mode: after `initialDelaySeconds`, every `periodSeconds` with `timeoutSeconds`,
    /// turning ready after `successThreshold` consecutive successes and not ready after
    /// `failureThreshold` consecutive failures, as the kubelet does.
    pub fn spawn(config: ProbeConfig) -> Arc<Readiness> {
        let ready = Arc::new(watch::Sender::new(false));
        let probes_run = Arc::new(AtomicU64::new(0));
        #[cfg(test)]
        let probe_count = Arc::new(watch::Sender::new(0u64));
        let prober = Prober {
            ready: Arc::clone(&ready),
            probes_run: Arc::clone(&probes_run),
            #[cfg(test)]
            probe_count: Arc::clone(&probe_count),
        };
        tracing::info!(?config, "probing user container readiness");
        let task = tokio::spawn(prober.run(config)).abort_handle();
        Arc::new(Readiness {
            ready,
            probes_run,
            #[cfg(test)]
            probe_count,
            task,
        })
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Resolves once the user container is ready (at once if it is).
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        // The sender lives in `self`, so this cannot fail while we are borrowed.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// Follows readiness changes.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Probes run so far (for logs and metrics).
    pub fn probes_run(&self) -> u64 {
        self.probes_run.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    fn watch_probe_count(&self) -> watch::Receiver<u64> {
        self.probe_count.subscribe()
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The background half of [`Readiness`].
struct Prober {
    ready: Arc<watch::Sender<bool>>,
    probes_run: Arc<AtomicU64>,
    #[cfg(test)]
    probe_count: Arc<watch::Sender<u64>>,
}

impl Prober {
    async fn run(self, config: ProbeConfig) {
        if !config.initial_delay.is_zero() {
            tokio::time::sleep(config.initial_delay).await;
        }
        let mut verdict = Verdict::default();
        let mut fast_until = Instant::now() + AGGRESSIVE_WINDOW;
        let mut slowed_down = false;
        loop {
            let started = Instant::now();
            let fast = started < fast_until;
            let pace = Pace::of(&config, verdict.ready, fast);
            let outcome = probe_once(&config.action, pace.timeout).await;
            self.probes_run.fetch_add(1, Ordering::Relaxed);
            #[cfg(test)]
            self.probe_count.send_modify(|n| *n += 1);

            let was_ready = verdict.ready;
            let ready = verdict.record(outcome.is_ok(), &config);
            match &outcome {
                Ok(()) if !was_ready && ready => tracing::info!("user container is ready"),
                Ok(()) => {}
                Err(error) if was_ready && !ready => {
                    tracing::warn!(%error, "user container is not ready");
                    fast_until = Instant::now() + AGGRESSIVE_WINDOW;
                    slowed_down = false;
                }
                Err(error) if config.is_aggressive() && !ready && !fast && !slowed_down => {
                    tracing::warn!(
                        %error,
                        "user container still not ready after {AGGRESSIVE_WINDOW:?}; \
                         probing every {SETTLED_INTERVAL:?} from now on"
                    );
                    slowed_down = true;
                }
                Err(error) => tracing::debug!(%error, "readiness probe failed"),
            }
            if ready != was_ready {
                self.ready.send_replace(ready);
            }
            tokio::time::sleep_until(started + pace.interval).await;
        }
    }
}

/// Consecutive-result counting, as the kubelet does it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Verdict {
    ready: bool,
    successes: u32,
    failures: u32,
}

impl Verdict {
    /// Records one probe result; returns readiness after it.
    fn record(&mut self, ok: bool, config: &ProbeConfig) -> bool {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.successes >= config.success_threshold {
                self.ready = true;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= config.failure_threshold {
                self.ready = false;
            }
        }
        self.ready
    }
}

/// Timeout of the next probe and time from its start to the one after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pace {
    timeout: Duration,
    interval: Duration,
}

impl Pace {
    fn of(config: &ProbeConfig, ready: bool, in_fast_window: bool) -> Pace {
        match (config.is_aggressive(), ready, in_fast_window) {
            (false, _, _) => Pace {
                timeout: config.timeout,
                interval: config.period,
            },
            (true, false, true) => Pace {
                timeout: AGGRESSIVE_TIMEOUT,
                interval: AGGRESSIVE_INTERVAL,
            },
            (true, _, _) => Pace {
                timeout: config.timeout,
                interval: SETTLED_INTERVAL,
            },
        }
    }
}

/// Why one probe failed.
#[derive(Debug)]
enum ProbeFailure {
    Timeout(Duration),
    Connect(std::io::Error),
    Request(http::Error),
    Http(hyper::Error),
    Status(StatusCode),
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeFailure::Timeout(t) => write!(f, "no answer within {t:?}"),
            ProbeFailure::Connect(e) => write!(f, "connect: {e}"),
            ProbeFailure::Request(e) => write!(f, "cannot build the probe request: {e}"),
            ProbeFailure::Http(e) => write!(f, "HTTP: {e}"),
            ProbeFailure::Status(s) => write!(f, "HTTP probe answered {s}"),
        }
    }
}

async fn probe_once(action: &ProbeAction, timeout: Duration) -> Result<(), ProbeFailure> {
    let attempt = async {
        match action {
            ProbeAction::TcpSocket { host, port } => {
                TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(ProbeFailure::Connect)?;
                Ok(())
            }
            ProbeAction::HttpGet(get) => http_get(get).await,
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(ProbeFailure::Timeout(timeout)))
}

/// One `GET` on a fresh connection (the kubelet does not keep probe connections alive either).
async fn http_get(get: &HttpGetAction) -> Result<(), ProbeFailure> {
    let stream = TcpStream::connect((get.host.as_str(), get.port))
        .await
        .map_err(ProbeFailure::Connect)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ProbeFailure::Http)?;

    let mut request = Request::get(get.path.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(ProbeFailure::Request)?;
    let headers = request.headers_mut();
    for (name, value) in &get.headers {
        headers.append(name.clone(), value.clone());
    }
    if !headers.contains_key(header::HOST) {
        let authority = if get.host.contains(':') {
            format!("[{}]:{}", get.host, get.port)
        } else {
            format!("{}:{}", get.host, get.port)
        };
        if let Ok(value) = HeaderValue::try_from(authority) {
            headers.insert(header::HOST, value);
        }
    }
    if !headers.contains_key(header::USER_AGENT) {
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static(PROBE_USER_AGENT),
        );
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));

    // Drive the connection here rather than in a spawned task, so that a probe that times out
    // leaves nothing behind. The connection may finish (`Connection: close`, small body) in the
    // same poll that hands the response over; once it has, the response is there or never comes.
    let mut conn = std::pin::pin!(conn);
    let mut send = std::pin::pin!(sender.send_request(request));
    let response = tokio::select! {
        biased;
        response = &mut send => response,
        _ = &mut conn => send.await,
    }
    .map_err(ProbeFailure::Http)?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(ProbeFailure::Status(status))
    }
}

/// The answer to a probe sent to the queue-proxy, or `None` if the request is not a probe.
///
/// Probes are never proxied to the app and never counted in stats.
/// - Health checks (`K-Network-Probe: queue`; the kubelet, activator and autoscaler probes):
///   503 `shutting down` while draining; 400 unless the probe header says `queue`; 503 while the
///   user container is not ready; else 200 `queue`.
/// - `K-Network-Probe: probe` (the ingress prober): 503 while draining; 400 without
///   `K-Network-Hash`; else 200 echoing `K-Network-Hash`, whatever the container's readiness.
///
/// Deviation from Knative, on purpose: any other `K-Network-Probe` value is answered 400 rather
/// than proxied to the app.
pub fn answer_probe(headers: &HeaderMap, ready: bool, draining: bool) -> Option<Response<Bytes>> {
    let probe = headers.get(&K_NETWORK_PROBE).map(HeaderValue::as_bytes);
    let health_check = headers.contains_key(&K_KUBELET_PROBE)
        || headers
            .get(header::USER_AGENT)
            .map(HeaderValue::as_bytes)
            .is_some_and(|ua| {
                HEALTH_CHECK_USER_AGENTS
                    .iter()
                    .any(|p| ua.starts_with(p.as_bytes()))
            });

    if probe == Some(b"probe".as_slice()) && !health_check {
        if draining {
            return Some(text(StatusCode::SERVICE_UNAVAILABLE, "shutting down"));
        }
        return Some(match headers.get(&K_NETWORK_HASH) {
            Some(hash) if !hash.is_empty() => {
                let mut response = Response::new(Bytes::new());
                response.headers_mut().insert(K_NETWORK_HASH, hash.clone());
                response
            }
            _ => text(
                StatusCode::BAD_REQUEST,
                "a probe request must contain a non-empty K-Network-Hash header",
            ),
        });
    }
    if probe.is_none() && !health_check {
        return None;
    }
    Some(if draining {
        text(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else if probe != Some(b"queue".as_slice()) {
        let value = String::from_utf8_lossy(probe.unwrap_or_default());
        text(
            StatusCode::BAD_REQUEST,
            format!("unexpected probe header value: {value:?} (expected K-Network-Probe: queue)"),
        )
    } else if !ready {
        text(StatusCode::SERVICE_UNAVAILABLE, "user container not ready")
    } else {
        text(StatusCode::OK, "queue")
    })
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Bytes> {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use knarr_test_support::{local_listener, ReservedPort, Upstream};
    use tokio::time::timeout;

    use super::*;

    const USER_PORT: u16 = 8080;
    /// Upper bound for things that should take milliseconds; never a sleep.
    const PATIENCE: Duration = Duration::from_secs(10);

    fn parse(json: &str) -> ProbeConfig {
        parse_probe(Some(json), USER_PORT).unwrap()
    }

    fn parse_err(json: &str) -> String {
        parse_probe(Some(json), USER_PORT).unwrap_err().to_string()
    }

    #[test]
    fn absent_or_empty_probe_is_aggressive_tcp_to_the_user_port() {
        for json in [None, Some(""), Some("  \n"), Some("null"), Some("[]")] {
            let config = parse_probe(json, 9000).unwrap();
            assert_eq!(config, ProbeConfig::tcp_default(9000), "{json:?}");
            assert!(config.is_aggressive());
        }
    }

    #[test]
    fn knative_tcp_probe() {
        let config =
            parse(r#"{"tcpSocket":{"port":8080,"host":"127.0.0.1"},"successThreshold":1}"#);
        assert_eq!(
            config,
            ProbeConfig {
                action: ProbeAction::TcpSocket {
                    host: "127.0.0.1".into(),
                    port: 8080
                },
                period: Duration::ZERO,
                timeout: Duration::from_secs(1),
                success_threshold: 1,
                failure_threshold: 3,
                initial_delay: Duration::ZERO,
            }
        );
    }

    #[test]
    fn knative_http_probe() {
        let config = parse(
            r#"{"httpGet":{"path":"/healthz","port":8080,"httpHeaders":[{"name":"X","value":"y"}]},"periodSeconds":0}"#,
        );
        assert!(config.is_aggressive());
        assert_eq!(
            config.action,
            ProbeAction::HttpGet(HttpGetAction {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/healthz".into(),
                headers: vec![(HeaderName::from_static("x"), HeaderValue::from_static("y"))],
            })
        );
    }

    #[test]
    fn knative_http_probe_with_kubelet_header_and_scheme() {
        let config = parse(
            r#"{"httpGet":{"port":8090,"host":"127.0.0.1","scheme":"HTTP","httpHeaders":[{"name":"K-Kubelet-Probe","value":"queue"}]},"successThreshold":1}"#,
        );
        let ProbeAction::HttpGet(get) = config.action else {
            panic!("not httpGet: {config:?}")
        };
        assert_eq!(
            (get.host.as_str(), get.port, get.path.as_str()),
            ("127.0.0.1", 8090, "/")
        );
        assert_eq!(get.headers[0].0, K_KUBELET_PROBE);
    }

    #[test]
    fn normal_mode_timings_and_thresholds() {
        let config = parse(
            r#"{"httpGet":{"path":"ready?full=1"},"periodSeconds":5,"timeoutSeconds":2,
                "successThreshold":2,"failureThreshold":4,"initialDelaySeconds":3,
                "terminationGracePeriodSeconds":30}"#,
        );
        assert!(!config.is_aggressive());
        assert_eq!(config.period, Duration::from_secs(5));
        assert_eq!(config.timeout, Duration::from_secs(2));
        assert_eq!((config.success_threshold, config.failure_threshold), (2, 4));
        assert_eq!(config.initial_delay, Duration::from_secs(3));
        let ProbeAction::HttpGet(get) = config.action else {
            panic!()
        };
        assert_eq!((get.port, get.path.as_str()), (USER_PORT, "/ready?full=1"));
    }

    #[test]
    fn zero_fields_take_kubernetes_defaults() {
        let config = parse(
            r#"{"tcpSocket":{},"timeoutSeconds":0,"successThreshold":0,"failureThreshold":0}"#,
        );
        assert_eq!(config, ProbeConfig::tcp_default(USER_PORT));
        // No handler at all: TCP on the user port, with the probe's own timings.
        let config = parse(r#"{"periodSeconds":2}"#);
        assert_eq!(
            config.action,
            ProbeAction::TcpSocket {
                host: "127.0.0.1".into(),
                port: USER_PORT
            }
        );
        assert_eq!(config.period, Duration::from_secs(2));
    }

    #[test]
    fn ports_int_string_zero_named() {
        let port_of = |p: &str| match parse(&format!(r#"{{"tcpSocket":{{"port":{p}}}}}"#)).action {
            ProbeAction::TcpSocket { port, .. } => port,
            other => panic!("{other:?}"),
        };
        assert_eq!(port_of("9001"), 9001);
        assert_eq!(port_of(r#""9002""#), 9002);
        assert_eq!(port_of("0"), USER_PORT);
        assert_eq!(port_of(r#""""#), USER_PORT);
        assert_eq!(port_of(r#""http1""#), USER_PORT);
        assert_eq!(port_of("null"), USER_PORT);
        for bad in ["70000", "-1", r#""70000""#, "1.5", "true"] {
            let err = parse_err(&format!(r#"{{"tcpSocket":{{"port":{bad}}}}}"#));
            assert!(
                err.contains("SERVING_READINESS_PROBE: tcpSocket.port:"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn malformed_json_is_a_clear_error() {
        let err = parse_probe(Some(r#"{"tcpSocket":"#), USER_PORT).unwrap_err();
        assert!(matches!(err, ProbeError::Json { .. }));
        let message = err.to_string();
        assert!(
            message.starts_with("SERVING_READINESS_PROBE is not valid JSON: "),
            "{message}"
        );
        assert!(message.contains("line 1"), "{message}");

        let err = parse_err("42");
        assert!(
            err.contains("expected an object (a core/v1 Probe), found a number"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_handlers_are_named() {
        let err = parse_err(r#"{"exec":{"command":["cat","/tmp/ready"]}}"#);
        assert!(
            err.contains("`exec`") && err.contains("not supported"),
            "{err}"
        );
        let err = parse_err(r#"{"grpc":{"port":8080}}"#);
        assert!(
            err.contains("`grpc`") && err.contains("not supported"),
            "{err}"
        );
        let err = parse_err(r#"{"httpGet":{},"tcpSocket":{}}"#);
        assert!(
            err.contains("only one handler may be set, found httpGet, tcpSocket"),
            "{err}"
        );
    }

    #[test]
    fn invalid_fields_are_named() {
        let cases = [
            (
                r#"{"httpGet":{"scheme":"HTTPS"}}"#,
                "httpGet.scheme: HTTPS probes are not supported",
            ),
            (r#"{"httpGet":{"scheme":"FTP"}}"#, "httpGet.scheme:"),
            (
                r#"{"periodSeconds":-1}"#,
                "periodSeconds: -1 is not a non-negative whole number",
            ),
            (
                r#"{"timeoutSeconds":"1"}"#,
                "timeoutSeconds: expected a number, found a string",
            ),
            (
                r#"{"failureThreshold":99999999999}"#,
                "failureThreshold: 99999999999 is too large",
            ),
            (
                r#"{"httpGet":{"httpHeaders":[{"name":"bad name","value":"v"}]}}"#,
                "httpGet.httpHeaders[0].name:",
            ),
            (
                r#"{"httpGet":{"httpHeaders":[{"value":"v"}]}}"#,
                "httpGet.httpHeaders[0].name: missing",
            ),
            (
                r#"{"httpGet":{"httpHeaders":[{"name":"x","value":"a\nb"}]}}"#,
                "httpGet.httpHeaders[0].value:",
            ),
            (
                r#"{"httpGet":{"httpHeaders":{}}}"#,
                "httpGet.httpHeaders: expected an array",
            ),
            (r#"{"httpGet":{"path":"/a b"}}"#, "httpGet.path:"),
            (
                r#"{"tcpSocket":{"host":1}}"#,
                "tcpSocket.host: expected a string, found a number",
            ),
            (
                r#"{"tcpSocket":[]}"#,
                "tcpSocket: expected an object, found an array",
            ),
        ];
        for (json, want) in cases {
            let err = parse_err(json);
            assert!(
                err.starts_with("SERVING_READINESS_PROBE: "),
                "{json}: {err}"
            );
            assert!(err.contains(want), "{json}: {err} (want {want:?})");
        }
    }

    #[test]
    fn multi_container_array() {
        let config = parse(r#"[{"tcpSocket":{"port":8081}}]"#);
        assert!(matches!(
            config.action,
            ProbeAction::TcpSocket { port: 8081, .. }
        ));
        let err = parse_err(r#"[{"tcpSocket":{}},{"tcpSocket":{"port":9000}}]"#);
        assert!(
            err.contains("2 probes (multi-container probing) are not supported"),
            "{err}"
        );
    }

    #[test]
    fn thresholds_count_consecutive_results() {
        let config = ProbeConfig {
            success_threshold: 2,
            failure_threshold: 3,
            ..ProbeConfig::tcp_default(USER_PORT)
        };
        let mut v = Verdict::default();
        let ready: Vec<bool> = [
            true, false, true, true, false, false, true, false, false, false, true, true,
        ]
        .into_iter()
        .map(|ok| v.record(ok, &config))
        .collect();
        assert_eq!(
            ready,
            [false, false, false, true, true, true, true, true, true, false, false, true]
        );
    }

    #[test]
    fn pace_by_mode() {
        let aggressive = ProbeConfig::tcp_default(USER_PORT);
        let fast = Pace {
            timeout: AGGRESSIVE_TIMEOUT,
            interval: AGGRESSIVE_INTERVAL,
        };
        let settled = Pace {
            timeout: Duration::from_secs(1),
            interval: SETTLED_INTERVAL,
        };
        assert_eq!(Pace::of(&aggressive, false, true), fast);
        assert_eq!(Pace::of(&aggressive, false, false), settled);
        assert_eq!(Pace::of(&aggressive, true, true), settled);
        let normal = ProbeConfig {
            period: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            ..aggressive
        };
        let every_5s = Pace {
            timeout: Duration::from_secs(2),
            interval: Duration::from_secs(5),
        };
        assert_eq!(Pace::of(&normal, false, true), every_5s);
        assert_eq!(Pace::of(&normal, true, false), every_5s);
    }

    // --- Readiness against real sockets ---

    async fn probes_reach(readiness: &Readiness, n: u64) {
        let mut count = readiness.watch_probe_count();
        timeout(PATIENCE, count.wait_for(|c| *c >= n))
            .await
            .expect("probes keep running")
            .unwrap();
    }

    fn tcp_config(port: u16) -> ProbeConfig {
        ProbeConfig::tcp_default(port)
    }

    fn http_config(port: u16) -> ProbeConfig {
        parse_probe(
            Some(r#"{"httpGet":{"path":"/healthz?deep=1","httpHeaders":[{"name":"X","value":"y"}]}}"#),
            port,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn tcp_ready_soon_after_the_app_listens() {
        // Bound but not listening: connects are refused, and the port stays ours.
        let socket = ReservedPort::new().unwrap();
        let port = socket.port();

        let readiness = Readiness::spawn(tcp_config(port));
        probes_reach(&readiness, 3).await;
        assert!(!readiness.is_ready());

        let _listener = socket.listen().unwrap();
        let listening = std::time::Instant::now();
        timeout(PATIENCE, readiness.wait_ready())
            .await
            .expect("ready");
        assert!(readiness.is_ready());
        // The fast pace is 50 ms; the settled one would be 1 s.
        assert!(
            listening.elapsed() < Duration::from_millis(500),
            "ready {:?} after listening",
            listening.elapsed()
        );
        assert!(*readiness.subscribe().borrow());
    }

    /// An app answering every request with `status` (probe headers are not Knative's, so it
    /// does not answer them itself).
    async fn http_app(status: u16) -> Upstream {
        Upstream::builder("app")
            .status(status)
            .start()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn http_probe_ready_on_200_with_configured_headers() {
        let app = http_app(200).await;
        let readiness = Readiness::spawn(http_config(app.port()));
        timeout(PATIENCE, readiness.wait_ready())
            .await
            .expect("ready");

        let request = app.last_request().expect("the app was probed");
        assert_eq!(request.method, http::Method::GET);
        assert_eq!(request.uri, "/healthz?deep=1");
        assert_eq!(request.headers["user-agent"], PROBE_USER_AGENT);
        assert_eq!(request.headers["x"], "y");
        assert_eq!(
            request.headers["host"],
            format!("127.0.0.1:{}", app.port()).as_str()
        );
    }

    #[tokio::test]
    async fn http_probe_not_ready_on_500_or_when_the_app_hangs() {
        let app = http_app(500).await;
        let readiness = Readiness::spawn(http_config(app.port()));
        probes_reach(&readiness, 3).await;
        assert!(!readiness.is_ready());

        // Accepts (into the kernel's backlog) and never answers: each probe times out.
        let hang = local_listener().await.unwrap();
        let readiness = Readiness::spawn(http_config(hang.local_addr().unwrap().port()));
        probes_reach(&readiness, 2).await;
        assert!(!readiness.is_ready());
    }

    #[tokio::test]
    async fn http_probe_3xx_is_ready() {
        let app = http_app(302).await;
        let readiness = Readiness::spawn(http_config(app.port()));
        timeout(PATIENCE, readiness.wait_ready())
            .await
            .expect("ready");
    }

    #[tokio::test]
    async fn failures_flip_ready_back_and_success_restores_it() {
        let app = http_app(200).await;
        let config = ProbeConfig {
            period: Duration::from_millis(20),
            failure_threshold: 2,
            ..http_config(app.port())
        };
        let readiness = Readiness::spawn(config);
        let mut changes = readiness.subscribe();
        timeout(PATIENCE, changes.wait_for(|r| *r))
            .await
            .unwrap()
            .unwrap();

        app.set_status(503);
        timeout(PATIENCE, changes.wait_for(|r| !*r))
            .await
            .unwrap()
            .unwrap();
        assert!(!readiness.is_ready());

        app.set_status(200);
        timeout(PATIENCE, readiness.wait_ready())
            .await
            .expect("ready again");
    }

    #[tokio::test]
    async fn dropping_readiness_stops_probing() {
        let app = http_app(500).await;
        let readiness = Readiness::spawn(http_config(app.port()));
        probes_reach(&readiness, 1).await;
        let mut count = readiness.watch_probe_count();
        drop(readiness);
        // The counter's sender goes away only once the probing task has ended.
        timeout(PATIENCE, async { while count.changed().await.is_ok() {} })
            .await
            .expect("probing task stopped");
    }

    // --- answer_probe ---

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::try_from(*k).unwrap(),
                    HeaderValue::try_from(*v).unwrap(),
                )
            })
            .collect()
    }

    fn answer(pairs: &[(&str, &str)], ready: bool, draining: bool) -> Option<(u16, String)> {
        answer_probe(&headers(pairs), ready, draining).map(|r| {
            (
                r.status().as_u16(),
                String::from_utf8(r.body().to_vec()).unwrap(),
            )
        })
    }

    #[test]
    fn ordinary_requests_are_not_probes() {
        assert_eq!(answer(&[], true, false), None);
        assert_eq!(
            answer(
                &[("user-agent", "curl/8"), ("k-network-hash", "h")],
                true,
                true
            ),
            None
        );
    }

    #[test]
    fn queue_probe() {
        let q = [("k-network-probe", "queue")];
        assert_eq!(answer(&q, true, false), Some((200, "queue".into())));
        let (status, body) = answer(&q, false, false).unwrap();
        assert_eq!((status, body.as_str()), (503, "user container not ready"));
        let (status, body) = answer(&q, true, true).unwrap();
        assert_eq!((status, body.as_str()), (503, "shutting down"));
        // The kubelet's probe of the queue-proxy, and the activator's.
        let kubelet = [
            ("user-agent", "kube-probe/1.30"),
            ("k-network-probe", "queue"),
        ];
        assert_eq!(answer(&kubelet, true, false), Some((200, "queue".into())));
        let activator = [
            ("user-agent", "Knative-Activator-Probe"),
            ("k-network-probe", "queue"),
        ];
        assert_eq!(answer(&activator, true, false), Some((200, "queue".into())));
    }

    #[test]
    fn health_checks_without_the_queue_value_are_rejected() {
        for pairs in [
            &[("user-agent", "kube-probe/1.30")][..],
            &[("k-kubelet-probe", "queue")][..],
            &[("k-network-probe", "activator")][..],
        ] {
            let (status, body) = answer(pairs, true, false).unwrap();
            assert_eq!(status, 400, "{pairs:?}");
            assert!(body.starts_with("unexpected probe header value"), "{body}");
            assert_eq!(answer(pairs, true, true).unwrap().0, 503, "{pairs:?}");
        }
    }

    #[test]
    fn network_probe_echoes_the_hash() {
        let probe = headers(&[("k-network-probe", "probe"), ("k-network-hash", "abc123")]);
        for ready in [true, false] {
            let response = answer_probe(&probe, ready, false).unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()[&K_NETWORK_HASH], "abc123");
        }
        let response = answer_probe(&probe, true, true).unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!response.headers().contains_key(&K_NETWORK_HASH));

        let (status, body) = answer(&[("k-network-probe", "probe")], true, false).unwrap();
        assert_eq!(status, 400);
        assert!(body.contains("K-Network-Hash"), "{body}");
    }
}
