//! Configuration from Knative's environment variables, read once, typed and validated.
//!
//! The variables are the ones Knative's revision reconciler gives its queue-proxy container, so
//! `knarr-queue-proxy` can stand in as `queue-sidecar-image`. A few `KNARR_QUEUE_*` extras let
//! it run beside other pods on one machine (ports, bind address) and shorten the drain in tests.
//! Tests pass a map ([`Env`]) instead of touching the process environment.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

/// Where variables come from.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl Env for HashMap<&str, &str> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).map(|v| (*v).to_owned())
    }
}

/// A variable that is missing or wrong; says which and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub reason: String,
}

/// Everything the queue-proxy needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub namespace: String,
    pub configuration: String,
    pub revision: String,
    pub pod: String,
    pub pod_ip: String,
    /// The Knative Service, when the revision belongs to one.
    pub service: Option<String>,
    /// Where requests arrive (8012, or 8013 for h2c revisions).
    pub serving_port: u16,
    /// Where the app listens, on 127.0.0.1.
    pub user_port: u16,
    /// Requests the app may have in flight; 0 = unlimited.
    pub container_concurrency: usize,
    /// Total time a request may take (→ 504).
    pub revision_timeout: Duration,
    /// Time until the app starts its response (→ 504); `None`: only the total applies.
    pub response_start_timeout: Option<Duration>,
    /// Longest pause between bytes of a response; `None`: no limit.
    pub idle_timeout: Option<Duration>,
    /// The app's readiness probe (JSON of a core/v1 Probe), as Knative passes it.
    pub readiness_probe: Option<String>,
    /// Admin port (`/wait-for-drain`), on loopback.
    pub admin_port: u16,
    /// Autoscaler metrics (`Stat` protobuf).
    pub metrics_port: u16,
    /// Prometheus metrics for people.
    pub user_metrics_port: u16,
    /// Where the serving and metrics ports listen.
    pub bind: IpAddr,
    /// How long no request must arrive, once draining, before shutting down.
    pub drain_quiet_period: Duration,
}

fn required(env: &impl Env, var: &'static str) -> Result<String, ConfigError> {
    match env.var(var) {
        Some(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(ConfigError {
            var,
            reason: "is required".into(),
        }),
    }
}

fn optional(env: &impl Env, var: &'static str) -> Option<String> {
    env.var(var).filter(|v| !v.trim().is_empty())
}

fn port(var: &'static str, value: &str) -> Result<u16, ConfigError> {
    value.trim().parse::<u16>().map_err(|_| ConfigError {
        var,
        reason: format!("{value:?} is not a port number"),
    })
}

fn seconds(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let secs: f64 = value.trim().parse().map_err(|_| ConfigError {
        var,
        reason: format!("{value:?} is not a number of seconds"),
    })?;
    if !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(ConfigError {
            var,
            reason: format!("{value:?} is out of range"),
        });
    }
    Ok(Duration::from_secs_f64(secs))
}

fn port_or(env: &impl Env, var: &'static str, default: u16) -> Result<u16, ConfigError> {
    optional(env, var).map_or(Ok(default), |v| port(var, &v))
}

/// `0` or absent means "no such timeout".
fn timeout_or_none(env: &impl Env, var: &'static str) -> Result<Option<Duration>, ConfigError> {
    match optional(env, var) {
        None => Ok(None),
        Some(v) => seconds(var, &v).map(|d| (!d.is_zero()).then_some(d)),
    }
}

impl Config {
    /// Reads and validates every variable.
    pub fn from_env(env: &impl Env) -> Result<Config, ConfigError> {
        let container_concurrency = {
            let v = required(env, "CONTAINER_CONCURRENCY")?;
            v.trim().parse::<usize>().map_err(|_| ConfigError {
                var: "CONTAINER_CONCURRENCY",
                reason: format!("{v:?} is not a non-negative integer"),
            })?
        };
        let revision_timeout = seconds(
            "REVISION_TIMEOUT_SECONDS",
            &required(env, "REVISION_TIMEOUT_SECONDS")?,
        )?;
        if revision_timeout.is_zero() {
            return Err(ConfigError {
                var: "REVISION_TIMEOUT_SECONDS",
                reason: "must be greater than 0".into(),
            });
        }
        let response_start_timeout =
            timeout_or_none(env, "REVISION_RESPONSE_START_TIMEOUT_SECONDS")?;
        if response_start_timeout.is_some_and(|t| t > revision_timeout) {
            return Err(ConfigError {
                var: "REVISION_RESPONSE_START_TIMEOUT_SECONDS",
                reason: "must not exceed REVISION_TIMEOUT_SECONDS".into(),
            });
        }
        let serving_port = port("QUEUE_SERVING_PORT", &required(env, "QUEUE_SERVING_PORT")?)?;
        let user_port = port("USER_PORT", &required(env, "USER_PORT")?)?;
        if user_port == 0 {
            return Err(ConfigError {
                var: "USER_PORT",
                reason: "must not be 0".into(),
            });
        }
        let bind = match optional(env, "KNARR_QUEUE_BIND") {
            None => IpAddr::from([0, 0, 0, 0]),
            Some(v) => v.trim().parse().map_err(|_| ConfigError {
                var: "KNARR_QUEUE_BIND",
                reason: format!("{v:?} is not an IP address"),
            })?,
        };
        let drain_quiet_period = match optional(env, "KNARR_QUEUE_DRAIN_QUIET_SECONDS") {
            None => Duration::from_secs(30),
            Some(v) => seconds("KNARR_QUEUE_DRAIN_QUIET_SECONDS", &v)?,
        };
        Ok(Config {
            namespace: required(env, "SERVING_NAMESPACE")?,
            configuration: required(env, "SERVING_CONFIGURATION")?,
            revision: required(env, "SERVING_REVISION")?,
            pod: required(env, "SERVING_POD")?,
            pod_ip: required(env, "SERVING_POD_IP")?,
            service: optional(env, "SERVING_SERVICE"),
            serving_port,
            user_port,
            container_concurrency,
            revision_timeout,
            response_start_timeout,
            idle_timeout: timeout_or_none(env, "REVISION_IDLE_TIMEOUT_SECONDS")?,
            readiness_probe: optional(env, "SERVING_READINESS_PROBE"),
            admin_port: port_or(env, "KNARR_QUEUE_ADMIN_PORT", 8022)?,
            metrics_port: port_or(env, "KNARR_QUEUE_METRICS_PORT", 9090)?,
            user_metrics_port: port_or(env, "KNARR_QUEUE_USER_METRICS_PORT", 9091)?,
            bind,
            drain_quiet_period,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knative_env() -> HashMap<&'static str, &'static str> {
        HashMap::from([
            ("SERVING_NAMESPACE", "default"),
            ("SERVING_CONFIGURATION", "hello"),
            ("SERVING_REVISION", "hello-00001"),
            ("SERVING_POD", "hello-00001-deployment-abc"),
            ("SERVING_POD_IP", "10.0.0.7"),
            ("SERVING_SERVICE", "hello"),
            ("QUEUE_SERVING_PORT", "8012"),
            ("USER_PORT", "8080"),
            ("CONTAINER_CONCURRENCY", "10"),
            ("REVISION_TIMEOUT_SECONDS", "300"),
            ("REVISION_RESPONSE_START_TIMEOUT_SECONDS", "0"),
            ("REVISION_IDLE_TIMEOUT_SECONDS", "0"),
            (
                "SERVING_READINESS_PROBE",
                r#"{"tcpSocket":{"port":8080,"host":"127.0.0.1"},"successThreshold":1}"#,
            ),
            // Knative sets more; unknown ones are ignored.
            ("SYSTEM_NAMESPACE", "knative-serving"),
            ("METRICS_DOMAIN", "knative.dev/internal/serving"),
        ])
    }

    #[test]
    fn reads_what_knative_sets() {
        let c = Config::from_env(&knative_env()).unwrap();
        assert_eq!(c.revision, "hello-00001");
        assert_eq!((c.serving_port, c.user_port), (8012, 8080));
        assert_eq!(c.container_concurrency, 10);
        assert_eq!(c.revision_timeout, Duration::from_secs(300));
        assert_eq!(c.response_start_timeout, None);
        assert_eq!(c.idle_timeout, None);
        assert_eq!(
            (c.admin_port, c.metrics_port, c.user_metrics_port),
            (8022, 9090, 9091)
        );
        assert_eq!(c.drain_quiet_period, Duration::from_secs(30));
        assert!(c.readiness_probe.unwrap().contains("tcpSocket"));
    }

    #[test]
    fn missing_or_bad_values_name_the_variable() {
        for (var, value, needle) in [
            ("USER_PORT", "", "USER_PORT: is required"),
            (
                "USER_PORT",
                "http",
                "USER_PORT: \"http\" is not a port number",
            ),
            ("CONTAINER_CONCURRENCY", "-1", "CONTAINER_CONCURRENCY"),
            (
                "REVISION_TIMEOUT_SECONDS",
                "soon",
                "REVISION_TIMEOUT_SECONDS",
            ),
            ("REVISION_TIMEOUT_SECONDS", "0", "must be greater than 0"),
            (
                "REVISION_RESPONSE_START_TIMEOUT_SECONDS",
                "301",
                "must not exceed",
            ),
            ("SERVING_POD", " ", "SERVING_POD: is required"),
        ] {
            let mut env = knative_env();
            env.insert(var, value);
            let err = Config::from_env(&env).unwrap_err().to_string();
            assert!(err.contains(needle), "{var}={value:?}: {err}");
        }
    }

    #[test]
    fn timeouts_and_extras() {
        let mut env = knative_env();
        env.insert("REVISION_RESPONSE_START_TIMEOUT_SECONDS", "2.5");
        env.insert("REVISION_IDLE_TIMEOUT_SECONDS", "10");
        env.insert("KNARR_QUEUE_METRICS_PORT", "0");
        env.insert("KNARR_QUEUE_BIND", "127.0.0.1");
        env.insert("KNARR_QUEUE_DRAIN_QUIET_SECONDS", "0.2");
        let c = Config::from_env(&env).unwrap();
        assert_eq!(c.response_start_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(10)));
        assert_eq!(c.metrics_port, 0);
        assert_eq!(c.bind, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(c.drain_quiet_period, Duration::from_millis(200));
    }
}
