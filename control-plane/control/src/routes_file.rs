//! Knarr's static routes file: gateways, virtual hosts, weighted routes and backends with
//! their endpoints, in YAML. It maps one-to-one onto [`knarr_translate::model`], so a platform
//! team can drive an Envoy fleet from a file before (or without) Knative objects.
//!
//! ```yaml
//! gateways:
//!   - name: external
//!     port: 8080
//!     virtualHosts:
//!       - name: hello
//!         domains: [hello.default.example.com]
//!         routes:
//!           - splits:
//!               - { backend: hello-1, weight: 90 }
//!               - { backend: hello-2, weight: 10 }
//! backends:
//!   - name: hello-1
//!     endpoints: [127.0.0.1:9001]
//! ```

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use knarr_translate::model;
use serde::Deserialize;

/// A routes file failed to load; says which file, where, and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum RoutesFileError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {at}: {message}")]
    Invalid {
        path: PathBuf,
        at: String,
        message: String,
    },
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RoutesFile {
    #[serde(default)]
    pub gateways: Vec<GatewaySpec>,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySpec {
    pub name: String,
    #[serde(default = "loopback")]
    pub address: IpAddr,
    pub port: u16,
    #[serde(default)]
    pub virtual_hosts: Vec<VirtualHostSpec>,
    /// `single` (one route table) or `scopedByHost` (one routing scope per host).
    #[serde(default)]
    pub layout: LayoutSpec,
}

#[derive(Debug, Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
pub enum LayoutSpec {
    #[default]
    Single,
    ScopedByHost,
}

fn loopback() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VirtualHostSpec {
    pub name: String,
    pub domains: Vec<String>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteSpec {
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Exact header matches.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    pub splits: Vec<SplitSpec>,
    #[serde(default)]
    pub set_headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub host_rewrite: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SplitSpec {
    pub backend: String,
    #[serde(default = "hundred")]
    pub weight: u32,
    #[serde(default)]
    pub set_headers: std::collections::BTreeMap<String, String>,
}

fn hundred() -> u32 {
    100
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendSpec {
    pub name: String,
    #[serde(default)]
    pub http2: bool,
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
}

/// The translation model a routes file describes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routes {
    pub gateways: Vec<model::Gateway>,
    pub backends: Vec<model::Backend>,
}

impl Routes {
    /// Loads and merges several files; a name defined twice is an error.
    pub fn load(paths: &[PathBuf]) -> Result<Routes, RoutesFileError> {
        let mut all = Routes::default();
        for path in paths {
            let text = std::fs::read_to_string(path).map_err(|source| RoutesFileError::Read {
                path: path.clone(),
                source,
            })?;
            let file = parse(path, &text)?;
            all.gateways.extend(file.gateways);
            all.backends.extend(file.backends);
        }
        let first = paths
            .first()
            .map(PathBuf::as_path)
            .unwrap_or(Path::new("-"));
        validate(first, &all)?;
        Ok(all)
    }
}

/// Parses one file's text into the model (not yet cross-checked).
pub fn parse(path: &Path, text: &str) -> Result<Routes, RoutesFileError> {
    let file: RoutesFile = if text.trim().is_empty() {
        RoutesFile::default()
    } else {
        serde_yaml::from_str(text).map_err(|e| RoutesFileError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?
    };
    let gateways = file
        .gateways
        .into_iter()
        .map(|g| model::Gateway {
            name: g.name,
            address: g.address,
            port: g.port,
            layout: match g.layout {
                LayoutSpec::Single => model::RouteLayout::Single,
                LayoutSpec::ScopedByHost => model::RouteLayout::ScopedByHost,
            },
            virtual_hosts: g
                .virtual_hosts
                .into_iter()
                .map(|vh| model::VirtualHost {
                    name: vh.name,
                    domains: vh.domains,
                    routes: vh
                        .routes
                        .into_iter()
                        .map(|r| model::Route {
                            path_prefix: r.path_prefix.unwrap_or_else(|| "/".into()),
                            headers: r
                                .headers
                                .into_iter()
                                .map(|(name, exact)| model::HeaderMatch { name, exact })
                                .collect(),
                            splits: r
                                .splits
                                .into_iter()
                                .map(|s| model::Split {
                                    backend: s.backend,
                                    weight: s.weight,
                                    set_headers: s.set_headers.into_iter().collect(),
                                })
                                .collect(),
                            set_headers: r.set_headers.into_iter().collect(),
                            host_rewrite: r.host_rewrite,
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    let backends = file
        .backends
        .into_iter()
        .map(|b| model::Backend {
            name: b.name,
            http2: b.http2,
            endpoints: b
                .endpoints
                .into_iter()
                .map(|a| model::Endpoint {
                    address: a.ip(),
                    port: a.port(),
                })
                .collect(),
        })
        .collect();
    Ok(Routes { gateways, backends })
}

fn validate(path: &Path, routes: &Routes) -> Result<(), RoutesFileError> {
    let invalid = |at: String, message: String| RoutesFileError::Invalid {
        path: path.to_owned(),
        at,
        message,
    };
    let mut backends = BTreeSet::new();
    for b in &routes.backends {
        if !backends.insert(b.name.as_str()) {
            return Err(invalid(
                format!("backend {:?}", b.name),
                "defined twice".into(),
            ));
        }
    }
    let mut gateways = BTreeSet::new();
    for g in &routes.gateways {
        if !gateways.insert(g.name.as_str()) {
            return Err(invalid(
                format!("gateway {:?}", g.name),
                "defined twice".into(),
            ));
        }
        let mut domains = BTreeSet::new();
        for vh in &g.virtual_hosts {
            let at = format!("gateway {:?}, virtualHost {:?}", g.name, vh.name);
            if vh.domains.is_empty() {
                return Err(invalid(at, "domains: needs at least one domain".into()));
            }
            for d in &vh.domains {
                if g.layout == model::RouteLayout::ScopedByHost
                    && d.contains('*')
                    && !d.ends_with(":*")
                {
                    return Err(invalid(
                        at,
                        format!("domain {d:?}: layout scopedByHost needs exact host names"),
                    ));
                }
                if !domains.insert(d.as_str()) {
                    return Err(invalid(at, format!("domain {d:?} is already served by another virtual host of this gateway")));
                }
            }
            for (i, r) in vh.routes.iter().enumerate() {
                let at = format!("{at}, routes[{i}]");
                if !r.path_prefix.starts_with('/') {
                    return Err(invalid(
                        at,
                        format!("pathPrefix {:?} must start with '/'", r.path_prefix),
                    ));
                }
                if r.splits.iter().all(|s| s.weight == 0) {
                    return Err(invalid(
                        at,
                        "splits: needs at least one split with a weight above 0".into(),
                    ));
                }
                for s in &r.splits {
                    if !backends.contains(s.backend.as_str()) {
                        return Err(invalid(
                            at,
                            format!(
                                "split backend {:?} is not defined under backends",
                                s.backend
                            ),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Routes, RoutesFileError> {
        let routes = parse(Path::new("t.yaml"), text)?;
        validate(Path::new("t.yaml"), &routes)?;
        Ok(routes)
    }

    #[test]
    fn parses_the_documented_example() {
        let routes = load_text(
            "gateways:\n  - name: external\n    port: 8080\n    virtualHosts:\n      - name: hello\n        domains: [hello.default.example.com]\n        routes:\n          - splits:\n              - { backend: hello-1, weight: 90 }\n              - { backend: hello-2, weight: 10 }\nbackends:\n  - name: hello-1\n    endpoints: [127.0.0.1:9001]\n  - name: hello-2\n    http2: true\n",
        )
        .unwrap();
        assert_eq!(routes.gateways[0].port, 8080);
        assert_eq!(
            routes.gateways[0].virtual_hosts[0].routes[0].path_prefix,
            "/"
        );
        assert_eq!(routes.backends[0].endpoints[0].port, 9001);
        assert!(routes.backends[1].http2);
    }

    #[test]
    fn errors_say_where() {
        let err = load_text("gateways:\n  - name: g\n    port: 80\n    colour: red\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("t.yaml") && msg.contains("colour") && msg.contains("line 4"),
            "{msg}"
        );

        let err = load_text("gateways:\n  - name: g\n    port: 80\n    virtualHosts:\n      - name: v\n        domains: [a]\n        routes:\n          - splits: [{backend: nope}]\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("routes[0]") && msg.contains("\"nope\""),
            "{msg}"
        );

        let err =
            load_text("backends:\n  - name: b\n    endpoints: [not-an-address]\n").unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
    }
}
