//! The routing model translation starts from: what a gateway serves, independent of where it
//! came from (a KIngress, a test, a benchmark).

use std::net::IpAddr;

/// One listening address of the gateway Envoy, with the virtual hosts it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    /// Listener name, e.g. `knarr-external-http`.
    pub name: String,
    pub address: IpAddr,
    /// 0 lets the OS pick (tests); Envoy reports the bound port on its admin `/listeners`.
    pub port: u16,
    pub virtual_hosts: Vec<VirtualHost>,
    pub layout: RouteLayout,
}

/// How a gateway's virtual hosts are cut into xDS resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteLayout {
    /// One RouteConfiguration holding every virtual host (what Kourier does). Simple, but any
    /// change resends the whole table.
    #[default]
    Single,
    /// One routing scope (SRDS) and one RouteConfiguration per virtual host, selected by the
    /// exact `Host` (port stripped). A change to one host costs one small resource on the wire,
    /// whatever the size of the table. Hosts must be exact names (no `*` wildcards).
    ScopedByHost,
}

impl Gateway {
    /// The RDS route configuration this gateway's listener asks for ([`RouteLayout::Single`]).
    pub fn route_config_name(&self) -> String {
        format!("{}-routes", self.name)
    }

    /// The scoped-routes name of this gateway's listener ([`RouteLayout::ScopedByHost`]).
    pub fn scopes_name(&self) -> String {
        format!("{}-scopes", self.name)
    }

    /// The route configuration of one virtual host ([`RouteLayout::ScopedByHost`]).
    pub fn host_route_config_name(&self, virtual_host: &VirtualHost) -> String {
        format!("{}/{}", self.name, virtual_host.name)
    }
}

/// Requests for any of `domains` (the `Host`/`:authority`).
#[derive(Debug, Clone, PartialEq)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    /// In match order: the first matching route wins.
    pub routes: Vec<Route>,
}

/// One route: a path prefix plus exact header matches, split over backends by weight.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Route {
    pub path_prefix: String,
    pub headers: Vec<HeaderMatch>,
    pub splits: Vec<Split>,
    /// Headers set (overwriting client values) on every request of this route.
    pub set_headers: Vec<(String, String)>,
    pub host_rewrite: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HeaderMatch {
    pub name: String,
    pub exact: String,
}

/// A share of a route's traffic going to one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// The backend's cluster name.
    pub backend: String,
    /// Relative weight; a split with weight 0 gets no traffic.
    pub weight: u32,
    /// Headers set on requests of this split only.
    pub set_headers: Vec<(String, String)>,
}

/// An upstream: an EDS cluster and its endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub name: String,
    /// Speak HTTP/2 cleartext (h2c) to the endpoints.
    pub http2: bool,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: u16,
}
