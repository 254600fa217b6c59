//! `config-knarr`: the knobs `knarr serve` takes as flags, from a ConfigMap (the flags are the
//! defaults; a key set in the ConfigMap wins). Read before the first list, then watched:
//! the ingress classes and the gateway names in status apply live; keys that shape the
//! gateway's listeners or the xDS grouping take effect when the control plane restarts (a
//! change is logged saying so). An unknown key or a bad value is reported with the key, and
//! the rest of the ConfigMap still applies.

use std::collections::BTreeMap;

use knarr_control::status::LoadBalancerNames;
use knarr_control::ServeConfig;
use knarr_translate::reconcile::ClassFilter;

/// The ConfigMap's name.
pub const CONFIG_MAP: &str = "config-knarr";

/// What `config-knarr` can change while running.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveConfig {
    pub classes: ClassFilter,
    pub names: LoadBalancerNames,
}

/// Keys read only at start.
const RESTART_KEYS: &[&str] = &[
    "gateway-address",
    "external-port",
    "internal-port",
    "https-port",
    "internal-https-port",
    "group-by",
];

/// The result of reading `config-knarr` over the flags' values.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub live: LiveConfig,
    /// The flags' config with the start-only keys applied.
    pub serve: ServeConfig,
    /// What is wrong, one message per key.
    pub problems: Vec<String>,
}

fn names_in(namespace: &str, cluster_domain: &str) -> LoadBalancerNames {
    LoadBalancerNames {
        external: format!("knarr-external.{namespace}.svc.{cluster_domain}"),
        internal: format!("knarr-internal.{namespace}.svc.{cluster_domain}"),
    }
}

/// Applies `data` (a ConfigMap's `data`; `None`: there is none) over `flags`.
pub fn parse(flags: &ServeConfig, data: Option<&BTreeMap<String, String>>) -> Parsed {
    let mut serve = flags.clone();
    let mut live = LiveConfig {
        classes: flags.classes.clone(),
        names: flags.lb_names.clone(),
    };
    let mut problems = Vec::new();
    let Some(data) = data else {
        return Parsed {
            live,
            serve,
            problems,
        };
    };
    let mut bad = |key: &str, value: &str, why: &str| {
        problems.push(match why {
            "unknown key (ignored)" => format!("{CONFIG_MAP}: unknown key {key:?} (ignored)"),
            _ => format!("{CONFIG_MAP}: {key}: {value:?}: {why}"),
        });
    };
    let mut gateway_namespace = None;
    let mut cluster_domain = None;
    for (key, value) in data {
        let v = value.trim();
        match key.as_str() {
            "_example" => {}
            "ingress-class" => {
                let classes: Vec<String> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect();
                if classes.is_empty() {
                    bad(key, value, "names no ingress class");
                } else {
                    live.classes.classes = classes;
                }
            }
            "ignore-unannotated" => match v {
                "true" => live.classes.take_unannotated = false,
                "false" => live.classes.take_unannotated = true,
                _ => bad(key, value, "expected \"true\" or \"false\""),
            },
            "gateway-namespace" if !v.is_empty() => gateway_namespace = Some(v.to_owned()),
            "cluster-domain" if !v.is_empty() => cluster_domain = Some(v.to_owned()),
            "gateway-namespace" | "cluster-domain" => bad(key, value, "must not be empty"),
            "gateway-address" => match v.parse() {
                Ok(ip) => serve.gateway.address = ip,
                Err(_) => bad(key, value, "not an IP address"),
            },
            "external-port" | "internal-port" | "https-port" | "internal-https-port" => {
                match v.parse::<u16>() {
                    Ok(port) if port != 0 => {
                        let g = &mut serve.gateway;
                        *match key.as_str() {
                            "external-port" => &mut g.external_http_port,
                            "internal-port" => &mut g.internal_http_port,
                            "https-port" => &mut g.external_https_port,
                            _ => &mut g.internal_https_port,
                        } = port;
                    }
                    _ => bad(key, value, "not a port number (1-65535)"),
                }
            }
            "group-by" => match v {
                "node-id" => serve.grouping = knarr_xds::NodeGrouping::NodeId,
                "cluster" => serve.grouping = knarr_xds::NodeGrouping::Cluster,
                _ => bad(key, value, "expected \"node-id\" or \"cluster\""),
            },
            _ => bad(key, value, "unknown key (ignored)"),
        }
    }
    if gateway_namespace.is_some() || cluster_domain.is_some() {
        live.names = names_in(
            gateway_namespace.as_deref().unwrap_or("knarr-system"),
            cluster_domain.as_deref().unwrap_or("cluster.local"),
        );
    }
    serve.classes = live.classes.clone();
    serve.lb_names = live.names.clone();
    Parsed {
        live,
        serve,
        problems,
    }
}

/// The start-only keys whose values differ between two readings.
pub fn restart_keys_changed(
    before: Option<&BTreeMap<String, String>>,
    after: Option<&BTreeMap<String, String>>,
) -> Vec<&'static str> {
    RESTART_KEYS
        .iter()
        .filter(|k| before.and_then(|d| d.get(**k)) != after.and_then(|d| d.get(**k)))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys_override_the_flags_and_bad_ones_are_named() {
        let flags = ServeConfig::default();
        let d = data(&[
            ("_example", "docs"),
            (
                "ingress-class",
                "knarr.ingress.networking.knative.dev, kourier.ingress.networking.knative.dev",
            ),
            ("ignore-unannotated", "true"),
            ("gateway-namespace", "gw"),
            ("external-port", "9080"),
            ("internal-port", "http"),
            ("colour", "blue"),
        ]);
        let p = parse(&flags, Some(&d));
        assert_eq!(
            p.live.classes.classes,
            [
                "knarr.ingress.networking.knative.dev",
                "kourier.ingress.networking.knative.dev"
            ]
        );
        assert!(!p.live.classes.take_unannotated);
        assert_eq!(p.live.names.external, "knarr-external.gw.svc.cluster.local");
        assert_eq!(p.serve.gateway.external_http_port, 9080);
        // The bad port keeps the flag's value.
        assert_eq!(
            p.serve.gateway.internal_http_port,
            flags.gateway.internal_http_port
        );
        assert_eq!(
            p.problems,
            [
                "config-knarr: unknown key \"colour\" (ignored)",
                "config-knarr: internal-port: \"http\": not a port number (1-65535)",
            ]
        );
        // No ConfigMap: the flags.
        let p = parse(&flags, None);
        assert_eq!(p.live.classes.classes, flags.classes.classes);
        assert!(p.problems.is_empty());
    }

    #[test]
    fn start_only_keys_are_told_apart() {
        let a = data(&[("external-port", "8080"), ("ingress-class", "a")]);
        let b = data(&[("external-port", "9090"), ("ingress-class", "b")]);
        assert_eq!(restart_keys_changed(Some(&a), Some(&b)), ["external-port"]);
        assert!(restart_keys_changed(Some(&a), Some(&a)).is_empty());
    }
}
