//! Configuration from flags (each also readable from a `KNARR_ACTIVATOR_*` variable), read once,
//! typed and validated. Tests build a [`Config`] directly or parse an argument list; they never
//! touch the process environment.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use knarr_proto::activator::{Endpoint, Revision};

/// Knative's activator queue: requests that may wait per revision (`breakerQueueDepth`).
pub const DEFAULT_QUEUE_DEPTH: usize = 10_000;
/// Knative's drain quiet period (`drainSleepDuration`).
pub const DEFAULT_DRAIN_QUIET_PERIOD: Duration = Duration::from_secs(30);

/// Everything the activator needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where requests arrive (HTTP/1.1 and h2c on one port; Knative: 8012).
    pub listen: SocketAddr,
    /// `/healthz`, `/readyz` and Prometheus `/metrics`.
    pub admin: SocketAddr,
    /// The control plane's ADS server (revisions come from it, stats go to it); `None` runs
    /// without one (only static revisions are known).
    pub xds_addr: Option<http::Uri>,
    /// Who this activator is, to the control plane (xDS node id, `RevisionStats.activator`).
    pub node_id: String,
    /// Requests that may wait for capacity, per revision; beyond that: 503.
    pub queue_depth: usize,
    /// How long no request must arrive, once draining, before shutting down.
    pub drain_quiet_period: Duration,
    /// Revisions known from the start, without a control plane (tests, local experiments).
    pub static_revisions: Vec<Revision>,
    /// Once listening, the bound request address is written here (for a parent that started
    /// it on port 0, as `knarr up` does).
    pub address_file: Option<std::path::PathBuf>,
}

impl Default for Config {
    /// Knative's ports and limits; node id from the host name.
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8012)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9092)),
            xds_addr: None,
            node_id: default_node_id(),
            queue_depth: DEFAULT_QUEUE_DEPTH,
            drain_quiet_period: DEFAULT_DRAIN_QUIET_PERIOD,
            static_revisions: Vec::new(),
            address_file: None,
        }
    }
}

impl Config {
    /// Loopback, port 0 everywhere and a short drain: what tests start.
    pub fn local() -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            node_id: "activator-test".into(),
            drain_quiet_period: Duration::from_millis(200),
            ..Config::default()
        }
    }
}

/// Why the command line was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--help` or `--version`: print it and exit successfully.
    #[error("{0}")]
    Display(String),
    #[error("{0}")]
    Invalid(String),
}

/// `knarr-activator`: holds requests for revisions with no ready pods, pokes the autoscaler and
/// forwards once a pod is ready.
#[derive(Debug, Parser)]
#[command(name = "knarr-activator", version)]
struct Args {
    /// Where requests arrive (HTTP/1.1 and h2c).
    #[arg(long, env = "KNARR_ACTIVATOR_LISTEN", default_value = "0.0.0.0:8012")]
    listen: SocketAddr,
    /// Admin server: /healthz, /readyz, /metrics.
    #[arg(long, env = "KNARR_ACTIVATOR_ADMIN", default_value = "127.0.0.1:9092")]
    admin: SocketAddr,
    /// The control plane's ADS address (`host:port` or `http://host:port`).
    #[arg(long, env = "KNARR_ACTIVATOR_XDS_ADDR")]
    xds_addr: Option<String>,
    /// This activator's node id [default: the host name, else "activator"].
    #[arg(long, env = "KNARR_ACTIVATOR_NODE_ID")]
    node_id: Option<String>,
    /// Requests that may wait for capacity per revision; more are refused with 503.
    #[arg(long, env = "KNARR_ACTIVATOR_QUEUE_DEPTH", default_value_t = DEFAULT_QUEUE_DEPTH)]
    queue_depth: usize,
    /// Once draining (SIGTERM), shut down after this many seconds without a new request.
    #[arg(
        long,
        env = "KNARR_ACTIVATOR_DRAIN_QUIET_SECONDS",
        default_value = "30"
    )]
    drain_quiet_seconds: f64,
    /// A revision known without a control plane, repeatable:
    /// `NAMESPACE/NAME[,cc=N][,timeout=SECONDS][,endpoint=IP:PORT]...`
    #[arg(long = "static-revision", value_name = "SPEC")]
    static_revisions: Vec<String>,
    /// Write the bound request address (`IP:PORT`) to this file once listening.
    #[arg(long, env = "KNARR_ACTIVATOR_ADDRESS_FILE", value_name = "PATH")]
    address_file: Option<std::path::PathBuf>,
}

impl Config {
    /// Parses a command line (the first item is the program name).
    pub fn from_args<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args = Args::try_parse_from(args).map_err(|e| {
            use clap::error::ErrorKind;
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    ConfigError::Display(e.to_string())
                }
                _ => ConfigError::Invalid(e.to_string()),
            }
        })?;
        let invalid =
            |flag: &str, reason: String| ConfigError::Invalid(format!("{flag}: {reason}"));
        let xds_addr = args
            .xds_addr
            .filter(|a| !a.trim().is_empty())
            .map(|a| parse_xds_addr(&a).map_err(|r| invalid("--xds-addr", r)))
            .transpose()?;
        if args.queue_depth == 0 {
            return Err(invalid("--queue-depth", "must be at least 1".into()));
        }
        let quiet = args.drain_quiet_seconds;
        if !(0.0..=86_400.0).contains(&quiet) {
            return Err(invalid(
                "--drain-quiet-seconds",
                format!("{quiet} is not between 0 and 86400"),
            ));
        }
        let static_revisions = args
            .static_revisions
            .iter()
            .map(|s| parse_static_revision(s).map_err(|r| invalid("--static-revision", r)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            listen: args.listen,
            admin: args.admin,
            xds_addr,
            node_id: args
                .node_id
                .filter(|n| !n.trim().is_empty())
                .unwrap_or_else(default_node_id),
            queue_depth: args.queue_depth,
            drain_quiet_period: Duration::from_secs_f64(quiet),
            static_revisions,
            address_file: args.address_file,
        })
    }
}

fn parse_xds_addr(addr: &str) -> Result<http::Uri, String> {
    let addr = addr.trim();
    let with_scheme = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let uri: http::Uri = with_scheme
        .parse()
        .map_err(|e| format!("{addr:?} is not an address: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(a)) if a.port_u16().is_some() => Ok(uri),
        (Some("http" | "https"), Some(_)) => Err(format!("{addr:?} has no port")),
        _ => Err(format!("{addr:?} is not host:port or http(s)://host:port")),
    }
}

/// `NAMESPACE/NAME[,cc=N][,timeout=SECONDS][,endpoint=IP:PORT]...`
fn parse_static_revision(spec: &str) -> Result<Revision, String> {
    let mut parts = spec.split(',').map(str::trim);
    let id = parts.next().unwrap_or_default();
    let Some((namespace, name)) = id.split_once('/') else {
        return Err(format!("{spec:?} does not start with NAMESPACE/NAME"));
    };
    if namespace.is_empty() || name.is_empty() {
        return Err(format!("{spec:?} does not start with NAMESPACE/NAME"));
    }
    let mut revision = Revision {
        namespace: namespace.into(),
        name: name.into(),
        ..Revision::default()
    };
    for part in parts.filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!("{part:?} is not KEY=VALUE"));
        };
        let number = || {
            value
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| format!("{key}={value:?} is not a non-negative integer"))
        };
        match key {
            "cc" => revision.container_concurrency = number()?,
            "timeout" => revision.timeout_seconds = number()?,
            "endpoint" => {
                let addr: SocketAddr = value
                    .parse()
                    .map_err(|_| format!("endpoint={value:?} is not IP:PORT"))?;
                revision.endpoints.push(Endpoint {
                    address: addr.ip().to_string(),
                    port: u32::from(addr.port()),
                });
            }
            _ => return Err(format!("unknown key {key:?} (cc, timeout, endpoint)")),
        }
    }
    Ok(revision)
}

/// The host name (a pod's name on Kubernetes), else `activator`.
fn default_node_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "activator".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        Config::from_args(std::iter::once("knarr-activator").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_follow_knative() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8012".parse().unwrap());
        assert!(c.admin.ip().is_loopback());
        assert_eq!(c.queue_depth, 10_000);
        assert_eq!(c.drain_quiet_period, Duration::from_secs(30));
        assert_eq!(c.xds_addr, None);
        assert!(!c.node_id.is_empty());
    }

    #[test]
    fn flags() {
        let c = parse(&[
            "--listen=127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--xds-addr",
            "127.0.0.1:18000",
            "--node-id=act-1",
            "--queue-depth=5",
            "--drain-quiet-seconds=0.5",
            "--static-revision",
            "default/hello-00001,cc=1,timeout=30,endpoint=127.0.0.1:8080,endpoint=[::1]:81",
            "--static-revision=ns/empty",
        ])
        .unwrap();
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.xds_addr.unwrap().to_string(), "http://127.0.0.1:18000/");
        assert_eq!(c.node_id, "act-1");
        assert_eq!(c.queue_depth, 5);
        assert_eq!(c.drain_quiet_period, Duration::from_millis(500));
        let r = &c.static_revisions[0];
        assert_eq!(
            (r.namespace.as_str(), r.name.as_str()),
            ("default", "hello-00001")
        );
        assert_eq!((r.container_concurrency, r.timeout_seconds), (1, 30));
        assert_eq!(r.endpoints.len(), 2);
        assert_eq!(r.endpoints[1].address, "::1");
        assert_eq!(r.endpoints[1].port, 81);
        assert!(c.static_revisions[1].endpoints.is_empty());
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, needle) in [
            (&["--listen=nowhere"][..], "--listen"),
            (&["--queue-depth=0"], "--queue-depth"),
            (&["--drain-quiet-seconds=-1"], "--drain-quiet-seconds"),
            (&["--xds-addr=http://cp"], "--xds-addr"),
            (&["--static-revision=hello"], "NAMESPACE/NAME"),
            (&["--static-revision=a/b,cc=x"], "cc="),
            (&["--static-revision=a/b,endpoint=host:80"], "IP:PORT"),
            (&["--static-revision=a/b,colour=red"], "unknown key"),
        ] {
            match parse(args) {
                Err(ConfigError::Invalid(e)) => assert!(e.contains(needle), "{args:?}: {e}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
        assert!(matches!(parse(&["--help"]), Err(ConfigError::Display(_))));
    }
}
