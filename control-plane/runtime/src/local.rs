//! [`LocalRuntime`]: pods as processes on this machine.
//!
//! [`Runtime::scale`] only updates the table of pods and starts or signals one task per pod;
//! each task supervises its pod through its life: start both processes, probe the queue-proxy
//! until it reports the app ready, restart both with back-off when either exits, drain on stop,
//! and remove the pod from the table when its processes are gone. Every change bumps the
//! [`Runtime::subscribe`] counter.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustix::process::{kill_process_group, Pid, Signal};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::log::{PodLog, Source};
use crate::pod::{self, PodPorts};
use crate::process::GroupChild;
use crate::{ChangeLog, LocalPod, Phase, PodStatus, RevisionRef, Runtime, RuntimeError};

/// Time between readiness probes of a pod that is not ready: the first right after the spawn,
/// then every 2 ms, growing by a quarter per failed probe up to 10 ms. A cold start is waiting
/// on this: a pod that is ready quickly is seen within a couple of milliseconds, and one that
/// takes long is not probed hundreds of times a second.
const STARTING_PROBE_FIRST: Duration = Duration::from_millis(2);
const STARTING_PROBE_MAX: Duration = Duration::from_millis(10);
/// Time between readiness probes of a ready pod (to notice it turning not ready).
const READY_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe not answered by then counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the app has between SIGTERM and SIGKILL, once its queue-proxy has drained.
const APP_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for the last output of processes that exited.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// How the local runtime runs pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalConfig {
    /// The `knarr-queue-proxy` binary.
    pub queue_proxy_bin: PathBuf,
    /// Pod logs go to `<log_dir>/<namespace>/<revision>/<pod>.log`.
    pub log_dir: PathBuf,
    /// The address every pod's ports are on (a loopback address).
    pub bind: IpAddr,
    /// `KNARR_QUEUE_DRAIN_QUIET_SECONDS`: once told to stop, how long a queue-proxy waits for
    /// requests to stop arriving before it shuts down.
    pub drain_quiet_period: Duration,
}

impl LocalConfig {
    /// Pods on `127.0.0.1`, draining for Knative's 30 s.
    pub fn new(queue_proxy_bin: impl Into<PathBuf>, log_dir: impl Into<PathBuf>) -> LocalConfig {
        LocalConfig {
            queue_proxy_bin: queue_proxy_bin.into(),
            log_dir: log_dir.into(),
            bind: IpAddr::from([127, 0, 0, 1]),
            drain_quiet_period: Duration::from_secs(30),
        }
    }
}

/// Revisions as processes: each pod is the user's command plus a `knarr-queue-proxy`.
///
/// Dropping it kills every process at once; [`LocalRuntime::shutdown`] stops them gracefully.
pub struct LocalRuntime {
    shared: Arc<Shared>,
}

struct Shared {
    config: LocalConfig,
    /// Where pod tasks run: `scale` is called from synchronous code.
    handle: Handle,
    state: Mutex<State>,
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    /// By `namespace/name`. Kept when a revision has no pods left, so pod names stay unique.
    revisions: HashMap<String, RevisionPods>,
    /// Ports held by live pods, never handed to another.
    ports: HashSet<u16>,
    shutting_down: bool,
    changes: ChangeLog,
}

#[derive(Default)]
struct RevisionPods {
    /// Numbers pods (`<revision>-pod-<n>`), never reused.
    last_ordinal: u64,
    pods: BTreeMap<u64, PodEntry>,
}

struct PodEntry {
    status: PodStatus,
    ports: PodPorts,
    /// Told to stop: no longer counts toward the replicas, stays `Terminating`.
    stopping: bool,
    stop: watch::Sender<bool>,
    task: Option<AbortHandle>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Changes a pod's status (a stopping pod stays `Terminating`), and tells subscribers.
    fn update(&self, key: &str, ordinal: u64, f: impl FnOnce(&mut PodStatus)) {
        {
            let mut state = self.lock();
            let Some(entry) = state
                .revisions
                .get_mut(key)
                .and_then(|r| r.pods.get_mut(&ordinal))
            else {
                return;
            };
            f(&mut entry.status);
            if entry.stopping {
                entry.status.phase = Phase::Terminating;
            }
            state.changes.record(key);
        }
        self.bump();
    }
}

impl LocalRuntime {
    /// # Panics
    /// Outside a Tokio runtime: pods are supervised by tasks on the current one.
    pub fn new(config: LocalConfig) -> Arc<LocalRuntime> {
        Arc::new(LocalRuntime {
            shared: Arc::new(Shared {
                config,
                handle: Handle::current(),
                state: Mutex::default(),
                changes: watch::Sender::new(0),
            }),
        })
    }

    pub fn config(&self) -> &LocalConfig {
        &self.shared.config
    }

    /// Stops every pod as a scale-down would (the queue-proxy drains, then the app gets
    /// SIGTERM, stragglers SIGKILL) and returns once no process is left. Later `scale` calls
    /// fail with [`RuntimeError::ShuttingDown`].
    pub async fn shutdown(&self) {
        let mut changes = self.shared.changes.subscribe();
        {
            let mut state = self.shared.lock();
            state.shutting_down = true;
            let State {
                revisions, changes, ..
            } = &mut *state;
            for (key, pods) in revisions.iter_mut() {
                for entry in pods.pods.values_mut() {
                    entry.stopping = true;
                    entry.status.phase = Phase::Terminating;
                    entry.stop.send_replace(true);
                }
                if !pods.pods.is_empty() {
                    changes.record(key);
                }
            }
        }
        self.shared.bump();
        loop {
            if self
                .shared
                .lock()
                .revisions
                .values()
                .all(|r| r.pods.is_empty())
            {
                return;
            }
            // The sender lives as long as `self`.
            let _ = changes.changed().await;
        }
    }
}

impl Drop for LocalRuntime {
    fn drop(&mut self) {
        let tasks: Vec<AbortHandle> = {
            let mut state = self.shared.lock();
            state.shutting_down = true;
            state
                .revisions
                .values_mut()
                .flat_map(|r| r.pods.values_mut())
                .filter_map(|entry| {
                    // The pod's task kills its processes when aborted, but only once the
                    // (possibly ending) Tokio runtime gets to it: kill them now.
                    let local = entry.status.local.clone().unwrap_or_default();
                    for pid in [local.app_pid, local.queue_proxy_pid].into_iter().flatten() {
                        if let Some(pgid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
                            let _ = kill_process_group(pgid, Signal::KILL);
                        }
                    }
                    entry.task.take()
                })
                .collect()
        };
        for task in tasks {
            task.abort();
        }
    }
}

impl Runtime for LocalRuntime {
    fn scale(&self, revision: &RevisionRef, replicas: usize) -> Result<(), RuntimeError> {
        let shared = &self.shared;
        if replicas > 0 {
            // A revision that cannot run fails here, not in a crash loop.
            pod::app_command(revision, 0)?;
        }
        let key = revision.key();
        let revision = Arc::new(revision.clone());
        let mut new_pods = Vec::new();
        let mut touched = false;
        let result = (|| {
            let mut state = shared.lock();
            if state.shutting_down {
                return Err(RuntimeError::ShuttingDown);
            }
            let State {
                revisions, ports, ..
            } = &mut *state;
            let pods = revisions.entry(key.clone()).or_default();
            let active: Vec<(u64, Phase)> = pods
                .pods
                .iter()
                .filter(|(_, e)| !e.stopping)
                .map(|(ordinal, e)| (*ordinal, e.status.phase))
                .collect();
            for ordinal in pods_to_stop(&active, active.len().saturating_sub(replicas)) {
                if let Some(entry) = pods.pods.get_mut(&ordinal) {
                    info!(pod = %entry.status.name, "scaling down: stopping");
                    touched = true;
                    entry.stopping = true;
                    entry.status.phase = Phase::Terminating;
                    entry.stop.send_replace(true);
                }
            }
            let bind = shared.config.bind;
            for _ in active.len()..replicas {
                let picked = pick_ports(bind, ports)
                    .map_err(|source| RuntimeError::Ports { bind, source })?;
                ports.extend(picked.all());
                touched = true;
                pods.last_ordinal += 1;
                let ordinal = pods.last_ordinal;
                let name = format!("{}-pod-{ordinal}", revision.name);
                let log_path = shared
                    .config
                    .log_dir
                    .join(&revision.namespace)
                    .join(&revision.name)
                    .join(format!("{name}.log"));
                let (stop, stop_rx) = watch::channel(false);
                pods.pods.insert(
                    ordinal,
                    PodEntry {
                        status: PodStatus {
                            name: name.clone(),
                            phase: Phase::Starting,
                            address: SocketAddr::new(bind, picked.serving),
                            metrics_address: Some(SocketAddr::new(bind, picked.metrics)),
                            restarts: 0,
                            last_error: None,
                            local: Some(LocalPod {
                                log_path: log_path.clone(),
                                app_pid: None,
                                queue_proxy_pid: None,
                            }),
                        },
                        ports: picked,
                        stopping: false,
                        stop,
                        task: None,
                    },
                );
                new_pods.push(Pod {
                    shared: Arc::clone(shared),
                    key: key.clone(),
                    ordinal,
                    name,
                    revision: Arc::clone(&revision),
                    ports: picked,
                    log_path,
                    stop: stop_rx,
                });
            }
            Ok(())
        })();
        // Spawned with the lock released: a task that cannot start is dropped right away, and
        // its pod removes itself from the table.
        for pod in new_pods {
            let (key, ordinal) = (pod.key.clone(), pod.ordinal);
            info!(pod = %pod.name, "starting");
            let task = shared.handle.spawn(pod.run()).abort_handle();
            if let Some(entry) = shared
                .lock()
                .revisions
                .get_mut(&key)
                .and_then(|r| r.pods.get_mut(&ordinal))
            {
                entry.task = Some(task);
            }
        }
        if touched {
            shared.lock().changes.record(&key);
        }
        shared.bump();
        result
    }

    fn pods(&self, revision: &str) -> Vec<PodStatus> {
        self.shared
            .lock()
            .revisions
            .get(revision)
            .map(|r| r.pods.values().map(|e| e.status.clone()).collect())
            .unwrap_or_default()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    fn changed_since(&self, since: u64) -> (u64, Vec<String>) {
        self.shared.lock().changes.since(since)
    }
}

/// Which pods go when scaling down by `n`: those not serving first (crashed, then starting),
/// newest first among equals — as a ReplicaSet chooses.
fn pods_to_stop(active: &[(u64, Phase)], n: usize) -> Vec<u64> {
    let rank = |phase: Phase| match phase {
        Phase::Failed => 0,
        Phase::Starting => 1,
        Phase::Ready | Phase::Terminating => 2,
    };
    let mut pods = active.to_vec();
    pods.sort_by_key(|(ordinal, phase)| (rank(*phase), Reverse(*ordinal)));
    pods.into_iter()
        .take(n)
        .map(|(ordinal, _)| ordinal)
        .collect()
}

/// Five ports free on `bind` that no other pod holds. All are held while picking, so they are
/// distinct; another process may still take one before the pod binds it, in which case the pod
/// crashes and its restart picks again.
fn pick_ports(bind: IpAddr, taken: &HashSet<u16>) -> io::Result<PodPorts> {
    let mut held = Vec::new();
    let mut picked = [0u16; 5];
    let mut n = 0;
    while n < picked.len() {
        if held.len() >= 64 {
            return Err(io::Error::other(
                "every port offered is held by another pod",
            ));
        }
        let listener = std::net::TcpListener::bind((bind, 0))?;
        let port = listener.local_addr()?.port();
        if !taken.contains(&port) {
            picked[n] = port;
            n += 1;
        }
        held.push(listener);
    }
    Ok(PodPorts::from_array(picked))
}

fn port_free(bind: IpAddr, port: u16) -> bool {
    std::net::TcpListener::bind((bind, port)).is_ok()
}

/// Asks the queue-proxy what the kubelet asks it: `K-Network-Probe: queue`, 200 `queue` when
/// the app is ready.
async fn probe_queue(address: SocketAddr) -> bool {
    let exchange = async {
        let mut stream = TcpStream::connect(address).await?;
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {address}\r\nK-Network-Probe: queue\r\n\
             User-Agent: kube-probe/knarr\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.take(4096).read_to_end(&mut response).await?;
        io::Result::Ok(response)
    };
    match tokio::time::timeout(PROBE_TIMEOUT, exchange).await {
        Ok(Ok(response)) => probe_passed(&response),
        _ => false,
    }
}

/// A 200 whose body says `queue` (chunked or not).
fn probe_passed(response: &[u8]) -> bool {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let status = head.lines().next().unwrap_or_default();
    let mut parts = status.split_whitespace();
    parts.next().is_some_and(|v| v.starts_with("HTTP/1."))
        && parts.next() == Some("200")
        && body.contains("queue")
}

/// Waits until the pod is told to stop. (The watch's borrow is released before returning: the
/// sender must never wait on it.)
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    // Err: the entry is gone, which only happens once this pod is done anyway.
    let _ = stop.wait_for(|s| *s).await;
}

fn describe(status: &io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("cannot wait for it: {e}"),
    }
}

/// Waits (briefly) for the last output of exited processes.
async fn drain_output(readers: Vec<JoinHandle<()>>) {
    let deadline = Instant::now() + OUTPUT_GRACE;
    for reader in readers {
        let abort = reader.abort_handle();
        if tokio::time::timeout_at(deadline, reader).await.is_err() {
            abort.abort();
        }
    }
}

/// One pod's supervisor.
struct Pod {
    shared: Arc<Shared>,
    key: String,
    ordinal: u64,
    name: String,
    revision: Arc<RevisionRef>,
    ports: PodPorts,
    log_path: PathBuf,
    stop: watch::Receiver<bool>,
}

/// How one run of a pod ended.
enum Exit {
    Stopped,
    Crashed(String),
}

/// Removes the pod from the table when its task ends, however it ends.
struct Gone {
    shared: Arc<Shared>,
    key: String,
    ordinal: u64,
}

impl Drop for Gone {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            let State {
                revisions, ports, ..
            } = &mut *state;
            let entry = revisions
                .get_mut(&self.key)
                .and_then(|r| r.pods.remove(&self.ordinal));
            if let Some(entry) = entry {
                for port in entry.ports.all() {
                    ports.remove(&port);
                }
            }
            state.changes.record(&self.key);
        }
        self.shared.bump();
    }
}

impl Pod {
    async fn run(mut self) {
        let _gone = Gone {
            shared: Arc::clone(&self.shared),
            key: self.key.clone(),
            ordinal: self.ordinal,
        };
        let log = PodLog::create(&self.log_path);
        let mut backoff = Backoff::default();
        while !*self.stop.borrow() {
            let started = Instant::now();
            let error = match self.run_once(&log).await {
                Exit::Stopped => break,
                Exit::Crashed(error) => error,
            };
            let delay = backoff.next_delay(started.elapsed());
            warn!(pod = %self.name, %error, ?delay, "pod crashed; restarting after a back-off");
            log.line(Source::Knarr, &format!("{error}; restarting in {delay:?}"));
            self.update(|s| {
                s.phase = Phase::Failed;
                s.last_error = Some(error);
                if let Some(local) = s.local.as_mut() {
                    local.app_pid = None;
                    local.queue_proxy_pid = None;
                }
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop_requested(&mut self.stop) => break,
            }
            self.repick_ports_if_taken();
            let address = SocketAddr::new(self.shared.config.bind, self.ports.serving);
            self.update(|s| {
                s.restarts += 1;
                s.phase = Phase::Starting;
                s.address = address;
            });
        }
        log.line(Source::Knarr, "pod stopped");
        info!(pod = %self.name, "stopped");
    }

    fn update(&self, f: impl FnOnce(&mut PodStatus)) {
        self.shared.update(&self.key, self.ordinal, f);
    }

    /// Starts both processes and watches them until told to stop or until one exits.
    async fn run_once(&mut self, log: &Arc<PodLog>) -> Exit {
        let config = &self.shared.config;
        let app = match pod::app_command(&self.revision, self.ports.user) {
            Ok(app) => app,
            Err(e) => return Exit::Crashed(e.to_string()),
        };
        log.line(
            Source::Knarr,
            &format!(
                "starting {:?} {:?} with PORT={}; queue-proxy on {}:{}",
                app.program, app.args, self.ports.user, config.bind, self.ports.serving
            ),
        );
        let mut cmd = Command::new(&app.program);
        cmd.args(&app.args)
            .envs(app.env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = &app.working_dir {
            cmd.current_dir(dir);
        }
        let mut app_process = match GroupChild::spawn(&mut cmd) {
            Ok(child) => child,
            Err(e) => return Exit::Crashed(format!("cannot start the app {:?}: {e}", app.program)),
        };
        let mut readers = follow(log, &mut app_process, Source::App);

        let mut cmd = Command::new(&config.queue_proxy_bin);
        cmd.env_clear()
            .envs(pod::queue_proxy_env(
                &self.revision,
                &self.name,
                config.bind,
                &self.ports,
                config.drain_quiet_period,
            ))
            .env("NO_COLOR", "1");
        if let Some(level) = std::env::var_os("KNARR_LOG") {
            cmd.env("KNARR_LOG", level);
        }
        let mut queue = match GroupChild::spawn(&mut cmd) {
            Ok(child) => child,
            Err(e) => {
                let _ = app_process.kill().await;
                drain_output(readers).await;
                return Exit::Crashed(format!(
                    "cannot start the queue-proxy {}: {e}",
                    config.queue_proxy_bin.display()
                ));
            }
        };
        readers.extend(follow(log, &mut queue, Source::Queue));
        let (app_pid, queue_pid) = (app_process.id(), queue.id());
        self.update(|s| {
            if let Some(local) = s.local.as_mut() {
                local.app_pid = app_pid;
                local.queue_proxy_pid = queue_pid;
            }
        });

        let address = SocketAddr::new(config.bind, self.ports.serving);
        let mut ready = false;
        let mut starting_interval = STARTING_PROBE_FIRST;
        let mut next_probe = Instant::now();
        let exited = loop {
            tokio::select! {
                () = stop_requested(&mut self.stop) => break None,
                status = app_process.wait() => break Some((Source::App, status)),
                status = queue.wait() => break Some((Source::Queue, status)),
                () = tokio::time::sleep_until(next_probe) => {
                    let passed = probe_queue(address).await;
                    if passed != ready {
                        ready = passed;
                        info!(pod = %self.name, ready, "readiness changed");
                        log.line(Source::Knarr, if ready { "ready" } else { "not ready" });
                        self.update(|s| {
                            s.phase = if ready { Phase::Ready } else { Phase::Starting };
                        });
                    }
                    let interval = if ready {
                        starting_interval = STARTING_PROBE_FIRST;
                        READY_PROBE_INTERVAL
                    } else {
                        let this = starting_interval;
                        starting_interval = (starting_interval * 5 / 4).min(STARTING_PROBE_MAX);
                        this
                    };
                    next_probe = Instant::now() + interval;
                }
            }
        };

        let Some((who, status)) = exited else {
            // Told to stop: the queue-proxy fails its probes, drains, and exits; its grace is
            // Knative's (the quiet period, then requests may take the revision timeout). Then
            // the app, which kept serving the drain, is stopped.
            log.line(Source::Knarr, "terminating: SIGTERM to the queue-proxy");
            let timeout = u64::try_from(self.revision.spec.timeout_seconds()).unwrap_or(0);
            let grace = config.drain_quiet_period + Duration::from_secs(timeout);
            let status = queue.terminate(grace).await;
            log.line(
                Source::Knarr,
                &format!(
                    "queue-proxy exited ({}); SIGTERM to the app",
                    describe(&status)
                ),
            );
            let status = app_process.terminate(APP_GRACE).await;
            drain_output(readers).await;
            log.line(
                Source::Knarr,
                &format!("app exited ({})", describe(&status)),
            );
            return Exit::Stopped;
        };
        // The pod restarts as a whole: the other process goes too.
        let (crashed, other, what) = match who {
            Source::App => (&mut app_process, &mut queue, "app"),
            _ => (&mut queue, &mut app_process, "queue-proxy"),
        };
        crashed.finish();
        let _ = other.kill().await;
        drain_output(readers).await;
        let mut error = format!("{what} exited unexpectedly ({})", describe(&status));
        if let Some(line) = log.last_line(who).filter(|l| !l.trim().is_empty()) {
            error += &format!("; last log line: {line}");
        }
        Exit::Crashed(error)
    }

    /// Keeps the pod's ports (and so its address) across a restart, unless one was taken.
    fn repick_ports_if_taken(&mut self) {
        let bind = self.shared.config.bind;
        if self.ports.all().iter().all(|p| port_free(bind, *p)) {
            return;
        }
        let mut state = self.shared.lock();
        let State {
            revisions, ports, ..
        } = &mut *state;
        match pick_ports(bind, ports) {
            Ok(picked) => {
                for port in self.ports.all() {
                    ports.remove(&port);
                }
                ports.extend(picked.all());
                self.ports = picked;
                if let Some(entry) = revisions
                    .get_mut(&self.key)
                    .and_then(|r| r.pods.get_mut(&self.ordinal))
                {
                    entry.ports = picked;
                }
            }
            Err(e) => warn!(pod = %self.name, error = %e, "cannot pick new ports; keeping the old"),
        }
    }
}

/// Copies a process's stdout and stderr into the pod's log.
fn follow(log: &Arc<PodLog>, child: &mut GroupChild, source: Source) -> Vec<JoinHandle<()>> {
    let (stdout, stderr) = child.take_output();
    let mut readers = Vec::with_capacity(2);
    if let Some(out) = stdout {
        readers.push(log.follow(source, out));
    }
    if let Some(err) = stderr {
        readers.push(log.follow(source, err));
    }
    readers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_down_stops_pods_not_serving_first_then_the_newest() {
        let pods = [
            (1, Phase::Ready),
            (2, Phase::Ready),
            (3, Phase::Starting),
            (4, Phase::Failed),
            (5, Phase::Ready),
        ];
        assert_eq!(pods_to_stop(&pods, 0), Vec::<u64>::new());
        assert_eq!(pods_to_stop(&pods, 1), [4]);
        assert_eq!(pods_to_stop(&pods, 3), [4, 3, 5]);
        assert_eq!(pods_to_stop(&pods, 9), [4, 3, 5, 2, 1]);
    }

    #[test]
    fn probe_passes_only_on_200_queue() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nqueue";
        assert!(probe_passed(ok));
        let chunked =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nqueue\r\n0\r\n\r\n";
        assert!(probe_passed(chunked));
        assert!(!probe_passed(
            b"HTTP/1.1 503 Service Unavailable\r\n\r\nuser container not ready"
        ));
        assert!(!probe_passed(b"HTTP/1.1 200 OK\r\n\r\nhello"));
        assert!(!probe_passed(b"HTTP/1.1 200 OK\r\ncontent-le"));
        assert!(!probe_passed(b""));
    }

    #[test]
    fn picked_ports_are_distinct_and_avoid_taken_ones() {
        let bind = IpAddr::from([127, 0, 0, 1]);
        let first = pick_ports(bind, &HashSet::new()).unwrap();
        let taken: HashSet<u16> = first.all().into_iter().collect();
        assert_eq!(taken.len(), 5);
        let second = pick_ports(bind, &taken).unwrap();
        let all: HashSet<u16> = first.all().into_iter().chain(second.all()).collect();
        assert_eq!(all.len(), 10);
    }
}
