//! Knative's ingress probing: an ingress is `LoadBalancerReady` only once every connected
//! gateway answers its hosts with the ingress's current hash.
//!
//! For each ingress whose resources every Envoy has ACKed, the prober sends, to each Envoy
//! (the address it connected from, on the gateway's plain HTTP ports), a request per host with
//! `K-Network-Probe: probe` and `K-Network-Hash: override`; the probe route sets the real hash and
//! the backend (queue-proxy or activator) echoes it. The outcome per probe:
//! - 200 with the current hash: confirmed;
//! - another hash, or 404 (the route is not there yet): not yet, try again;
//! - 502/503 (no backend to answer), or 200 without the header (a backend that does not speak
//!   Knative's probe): the ACK stands as the proof, as there is nothing more to learn;
//! - a connection error: try again.
//!
//! Probing needs the gateway's real ports; with port 0 (tests that let the OS pick) readiness
//! rests on the ACKs alone.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use knarr_model::ObjectKey;
use knarr_translate::kingress::{
    GatewayConfig, GatewayTag, HASH_OVERRIDE, NETWORK_HASH_HEADER, NETWORK_PROBE_HEADER,
};
use tokio::sync::watch;
use tracing::debug;

/// How often probing runs while something is unconfirmed.
const PERIOD: Duration = Duration::from_millis(200);
/// Per-probe timeout.
const TIMEOUT: Duration = Duration::from_millis(300);
/// Probes in flight at once.
const CONCURRENCY: usize = 32;

/// What a probe said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Confirmed,
    /// Nothing more than the ACK can be learnt (no backend, or one that does not echo).
    Unprobeable,
    NotYet,
}

/// Classifies a probe answer.
pub fn outcome(status: u16, echoed_hash: Option<&str>, expected: &str) -> Outcome {
    match (status, echoed_hash) {
        (200, Some(h)) if h == expected => Outcome::Confirmed,
        (200, Some(_)) => Outcome::NotYet,
        (200, None) | (502 | 503, _) => Outcome::Unprobeable,
        _ => Outcome::NotYet,
    }
}

/// The probe state of every ingress: which hash has been confirmed on every gateway.
#[derive(Debug)]
pub struct ProbeResults {
    confirmed: Mutex<HashMap<ObjectKey, String>>,
    changed: watch::Sender<u64>,
}

impl Default for ProbeResults {
    fn default() -> Self {
        ProbeResults {
            confirmed: Mutex::default(),
            changed: watch::Sender::new(0),
        }
    }
}

impl ProbeResults {
    /// True if `hash` is the version of `key` every gateway answered with.
    pub fn confirmed(&self, key: &ObjectKey, hash: &str) -> bool {
        self.confirmed.lock().unwrap().get(key).map(String::as_str) == Some(hash)
    }

    fn set(&self, key: ObjectKey, hash: String) {
        self.confirmed.lock().unwrap().insert(key, hash);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Changes whenever an ingress is confirmed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Forgets every confirmation (the gateways changed).
    pub fn clear(&self) {
        self.confirmed.lock().unwrap().clear();
    }
}

/// One ingress to confirm: its hash and the hosts to ask, per gateway.
#[derive(Debug, Clone)]
pub struct Target {
    pub key: ObjectKey,
    pub hash: String,
    pub hosts: Vec<(GatewayTag, String)>,
}

/// Which ports probes go to; `None` when probing is not possible.
pub fn probe_ports(gateway: &GatewayConfig) -> Option<BTreeMap<GatewayTag, u16>> {
    if gateway.external_http_port == 0 || gateway.internal_http_port == 0 {
        return None;
    }
    Some(BTreeMap::from([
        (GatewayTag::External, gateway.external_http_port),
        (GatewayTag::Internal, gateway.internal_http_port),
    ]))
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

async fn probe(client: &HttpClient, addr: SocketAddr, host: &str, hash: &str) -> Outcome {
    let Ok(req) = http::Request::get(format!("http://{addr}/"))
        .header(http::header::HOST, host)
        .header(NETWORK_PROBE_HEADER, "probe")
        .header(NETWORK_HASH_HEADER, HASH_OVERRIDE)
        .body(Empty::new())
    else {
        return Outcome::NotYet;
    };
    match tokio::time::timeout(TIMEOUT, client.request(req)).await {
        Ok(Ok(resp)) => {
            let echoed = resp
                .headers()
                .get(NETWORK_HASH_HEADER)
                .and_then(|v| v.to_str().ok());
            let result = outcome(resp.status().as_u16(), echoed, hash);
            debug!(%addr, host, status = resp.status().as_u16(), ?echoed, ?result, "probe");
            result
        }
        Ok(Err(e)) => {
            debug!(%addr, host, error = %e, "probe failed");
            Outcome::NotYet
        }
        Err(_) => Outcome::NotYet,
    }
}

/// Probes `target` on every gateway; true when all answered (confirmed or unprobeable).
async fn probe_target(
    client: &HttpClient,
    gateways: &[IpAddr],
    ports: &BTreeMap<GatewayTag, u16>,
    target: &Target,
) -> bool {
    for ip in gateways {
        for (tag, host) in &target.hosts {
            let Some(port) = ports.get(tag) else { continue };
            if probe(client, SocketAddr::new(*ip, *port), host, &target.hash).await
                == Outcome::NotYet
            {
                return false;
            }
        }
    }
    true
}

/// Where the prober gets its work.
pub trait ProbeSource: Send + Sync + 'static {
    /// Ingresses ACKed by every Envoy but not confirmed yet.
    fn targets(&self) -> Vec<Target>;
    /// Where the connected Envoys are.
    fn gateways(&self) -> Vec<IpAddr>;
    /// The gateways changed: every ingress must be confirmed again.
    fn reprobe_all(&self);
}

/// Runs until `shutdown`: every period, asks `source` for ingresses to confirm and the Envoys to
/// ask; confirmed hashes land in `results`.
pub async fn run(
    ports: BTreeMap<GatewayTag, u16>,
    results: Arc<ProbeResults>,
    source: Arc<dyn ProbeSource>,
    mut shutdown: watch::Receiver<bool>,
) {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut known_gateways = Vec::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(PERIOD) => {}
            () = knarr_xds::server::stopped(&mut shutdown) => return,
        }
        let gateways = source.gateways();
        if gateways != known_gateways {
            source.reprobe_all();
            known_gateways = gateways.clone();
        }
        if gateways.is_empty() {
            continue;
        }
        let todo = source.targets();
        if !todo.is_empty() {
            debug!(targets = todo.len(), gateways = gateways.len(), "probing");
        }
        for chunk in todo.chunks(CONCURRENCY) {
            let (client, gateways, ports) = (&client, &gateways, &ports);
            let probes = chunk
                .iter()
                .map(|t| async move { (t, probe_target(client, gateways, ports, t).await) });
            for (target, done) in futures::future::join_all(probes).await {
                if done {
                    results.set(target.key.clone(), target.hash.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes() {
        assert_eq!(outcome(200, Some("h1"), "h1"), Outcome::Confirmed);
        assert_eq!(outcome(200, Some("h0"), "h1"), Outcome::NotYet);
        assert_eq!(outcome(404, None, "h1"), Outcome::NotYet);
        assert_eq!(outcome(503, None, "h1"), Outcome::Unprobeable);
        assert_eq!(outcome(200, None, "h1"), Outcome::Unprobeable);
        assert_eq!(outcome(500, Some("h1"), "h1"), Outcome::NotYet);
    }

    #[test]
    fn port_zero_disables_probing() {
        assert!(probe_ports(&GatewayConfig {
            external_http_port: 0,
            ..Default::default()
        })
        .is_none());
        let ports = probe_ports(&GatewayConfig::default()).unwrap();
        assert_eq!(ports[&GatewayTag::External], 8080);
    }
}
