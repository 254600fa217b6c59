//! Reading Envoy's admin API responses: `/config_dump`, `/listeners` and
//! `/stats`. Pure functions over the JSON/text, unit-tested on captured
//! Envoy 1.40 output; [`crate::Envoy`] does the fetching.

use serde_json::Value;

/// The kinds of xDS resources as they appear in `/config_dump`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// LDS `Listener`.
    Listener,
    /// CDS `Cluster`.
    Cluster,
    /// RDS `RouteConfiguration`.
    RouteConfiguration,
    /// EDS `ClusterLoadAssignment`, keyed by cluster name.
    ClusterLoadAssignment,
    /// SDS `Secret`.
    Secret,
}

impl ResourceKind {
    /// The `@type` of the config dump section that holds this kind.
    pub fn dump_type(self) -> &'static str {
        match self {
            Self::Listener => "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            Self::Cluster => "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            Self::RouteConfiguration => "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
            Self::ClusterLoadAssignment => "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
            Self::Secret => "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
        }
    }
}

/// A parsed `GET /config_dump?include_eds` answer.
///
/// The helpers look only at *dynamic* (xDS-delivered) resources that Envoy
/// has accepted and activated; `static_*` entries from the bootstrap and
/// warming listeners are left out, because tests ask "has the control plane's
/// config landed". Use [`ConfigDump::section`] for anything else.
#[derive(Clone, Debug)]
pub struct ConfigDump(pub Value);

impl ConfigDump {
    /// The whole dump as returned by Envoy.
    pub fn json(&self) -> &Value {
        &self.0
    }

    /// The `configs[]` entry with the given `@type`, if present.
    pub fn section(&self, dump_type: &str) -> Option<&Value> {
        self.0["configs"]
            .as_array()?
            .iter()
            .find(|c| c["@type"] == dump_type)
    }

    /// `(name, version_info, resource)` of every active dynamic resource of
    /// `kind`.
    pub fn dynamic(&self, kind: ResourceKind) -> Vec<(String, Option<String>, &Value)> {
        let Some(section) = self.section(kind.dump_type()) else {
            return Vec::new();
        };
        // (array field, where the entry's version/resource live, resource field, name field)
        let (list, state, resource, name_field) = match kind {
            ResourceKind::Listener => (
                "dynamic_listeners",
                Some("active_state"),
                "listener",
                "name",
            ),
            ResourceKind::Cluster => ("dynamic_active_clusters", None, "cluster", "name"),
            ResourceKind::RouteConfiguration => {
                ("dynamic_route_configs", None, "route_config", "name")
            }
            ResourceKind::ClusterLoadAssignment => (
                "dynamic_endpoint_configs",
                None,
                "endpoint_config",
                "cluster_name",
            ),
            ResourceKind::Secret => ("dynamic_active_secrets", None, "secret", "name"),
        };
        let Some(entries) = section[list].as_array() else {
            return Vec::new();
        };
        entries
            .iter()
            .filter_map(|entry| {
                let state = match state {
                    Some(field) => entry.get(field)?,
                    None => entry,
                };
                let res = state.get(resource)?;
                let name = res[name_field]
                    .as_str()
                    .or_else(|| entry["name"].as_str())?;
                let version = state["version_info"].as_str().map(str::to_owned);
                Some((name.to_owned(), version, res))
            })
            .collect()
    }

    /// Names of the active dynamic resources of `kind`.
    pub fn names(&self, kind: ResourceKind) -> Vec<String> {
        self.dynamic(kind)
            .into_iter()
            .map(|(name, _, _)| name)
            .collect()
    }

    /// Names of active dynamic listeners (those with an `active_state`).
    pub fn listener_names(&self) -> Vec<String> {
        self.names(ResourceKind::Listener)
    }

    /// Names of `dynamic_active_clusters[].cluster`.
    pub fn cluster_names(&self) -> Vec<String> {
        self.names(ResourceKind::Cluster)
    }

    /// Names of `dynamic_route_configs[].route_config`.
    pub fn route_config_names(&self) -> Vec<String> {
        self.names(ResourceKind::RouteConfiguration)
    }

    /// The active dynamic resource `name` of `kind`, as Envoy holds it.
    pub fn resource(&self, kind: ResourceKind, name: &str) -> Option<&Value> {
        self.dynamic(kind)
            .into_iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, r)| r)
    }

    /// `version_info` of the active dynamic resource `name` of `kind`
    /// (`None` if absent, or if its source sent no version).
    pub fn version_of(&self, kind: ResourceKind, name: &str) -> Option<String> {
        self.dynamic(kind)
            .into_iter()
            .find(|(n, _, _)| n == name)
            .and_then(|(_, v, _)| v)
    }
}

/// `(name, port)` of each listener in a `GET /listeners?format=json` answer,
/// i.e. the ports actually bound, which is how tests find listeners that were
/// configured on port 0.
pub(crate) fn listener_ports(listeners: &Value) -> Vec<(String, u16)> {
    let Some(statuses) = listeners["listener_statuses"].as_array() else {
        return Vec::new();
    };
    statuses
        .iter()
        .filter_map(|s| {
            let name = s["name"].as_str()?;
            let port = s["local_address"]["socket_address"]["port_value"].as_u64()?;
            Some((name.to_owned(), u16::try_from(port).ok()?))
        })
        .collect()
}

/// The value of counter or gauge `name` in `/stats` text output
/// (`name: value` lines). Histograms and text stats read as `None`.
pub(crate) fn stat_value(stats_text: &str, name: &str) -> Option<u64> {
    stats_text.lines().find_map(|line| {
        let (n, v) = line.split_once(": ")?;
        if n == name {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// `/stats?filter=` query value matching exactly `name`: the name regex-escaped,
/// anchored, and percent-encoded.
pub(crate) fn exact_stat_filter(name: &str) -> String {
    let mut regex = String::from("^");
    for c in name.chars() {
        if r"\.^$|?*+()[]{}".contains(c) {
            regex.push('\\');
        }
        regex.push(c);
    }
    regex.push('$');
    percent_encode(&regex)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump() -> ConfigDump {
        // Captured from Envoy 1.40 with file-based LDS/CDS/RDS/EDS plus a
        // static listener, route and cluster; a warming listener added by hand.
        ConfigDump(serde_json::from_str(include_str!("testdata/config_dump.json")).unwrap())
    }

    #[test]
    fn names_are_dynamic_and_active_only() {
        let d = dump();
        assert_eq!(d.listener_names(), ["dyn"]);
        assert_eq!(d.cluster_names(), ["c1"]);
        assert_eq!(d.route_config_names(), ["rc1"]);
        assert_eq!(d.names(ResourceKind::ClusterLoadAssignment), ["c1"]);
        assert!(d.names(ResourceKind::Secret).is_empty());
    }

    #[test]
    fn versions_per_resource() {
        let d = dump();
        assert_eq!(
            d.version_of(ResourceKind::Listener, "dyn").as_deref(),
            Some("v1")
        );
        assert_eq!(
            d.version_of(ResourceKind::Cluster, "c1").as_deref(),
            Some("c1v")
        );
        assert_eq!(
            d.version_of(ResourceKind::RouteConfiguration, "rc1")
                .as_deref(),
            Some("r1")
        );
        // File-based EDS carries no version_info in the dump.
        assert_eq!(
            d.version_of(ResourceKind::ClusterLoadAssignment, "c1"),
            None
        );
        assert_eq!(d.version_of(ResourceKind::Listener, "warming"), None);
        assert_eq!(d.version_of(ResourceKind::Cluster, "missing"), None);
    }

    #[test]
    fn resource_returns_the_config() {
        let d = dump();
        let cla = d
            .resource(ResourceKind::ClusterLoadAssignment, "c1")
            .unwrap();
        let port = &cla["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
            ["port_value"];
        assert_eq!(port, 9);
        assert!(d.section(ResourceKind::Secret.dump_type()).is_some());
    }

    #[test]
    fn listener_ports_from_captured_sample() {
        let v: Value = serde_json::from_str(include_str!("testdata/listeners.json")).unwrap();
        assert_eq!(
            listener_ports(&v),
            [("main".to_owned(), 42315), ("dyn".to_owned(), 42405)]
        );
        assert!(listener_ports(&serde_json::json!({})).is_empty());
    }

    #[test]
    fn stat_parsing() {
        let text = "cluster.c1.upstream_rq_total: 7\ncluster.c1.upstream_rq_total_x: 9\n\
                    cluster.c1.version_text: \"e1\"\nhist: P0(nan,nan) P25(nan,nan)\n";
        assert_eq!(stat_value(text, "cluster.c1.upstream_rq_total"), Some(7));
        assert_eq!(stat_value(text, "cluster.c1.version_text"), None);
        assert_eq!(stat_value(text, "hist"), None);
        assert_eq!(stat_value(text, "absent"), None);
    }

    #[test]
    fn stat_filter_is_escaped_and_encoded() {
        assert_eq!(exact_stat_filter("a.b_c"), "%5Ea%5C.b_c%24");
    }
}
