//! Where the gateway Envoys are in a cluster: the ready addresses of the EndpointSlices of the
//! gateway Service (`knarr-system/knarr-internal` by default), as Kourier finds its gateways.
//!
//! Envoys connect to any control-plane replica, so the leader cannot tell from its own xDS
//! connections whether every gateway serves an ingress; it hash-probes every gateway pod
//! instead (the probe proves the pod holds the ingress's current config, whichever replica
//! sent it).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use knarr_model::{EndpointSlice, ObjectKey, SERVICE_NAME_LABEL};
use tokio::sync::watch;

/// The gateway Service's ready pod addresses, from its EndpointSlices.
pub struct GatewayPods {
    namespace: String,
    service: String,
    slices: BTreeMap<String, Vec<IpAddr>>,
    tx: watch::Sender<Vec<IpAddr>>,
}

impl GatewayPods {
    /// Follows the slices of Service `namespace/service`.
    pub fn new(namespace: &str, service: &str) -> (GatewayPods, watch::Receiver<Vec<IpAddr>>) {
        let (tx, rx) = watch::channel(Vec::new());
        let pods = GatewayPods {
            namespace: namespace.into(),
            service: service.into(),
            slices: BTreeMap::new(),
            tx,
        };
        (pods, rx)
    }

    /// A slice was added or changed.
    pub fn slice_applied(&mut self, slice: &EndpointSlice) {
        let meta = &slice.metadata;
        if meta.namespace != self.namespace
            || meta.labels.get(SERVICE_NAME_LABEL) != Some(&self.service)
        {
            return;
        }
        let ready = slice
            .endpoints
            .iter()
            .filter(|e| e.conditions.ready != Some(false))
            .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse().ok()))
            .collect();
        self.slices.insert(meta.name.clone(), ready);
        self.publish();
    }

    /// A slice was deleted (any slice: those of other Services are ignored).
    pub fn slice_deleted(&mut self, key: &ObjectKey) {
        if key.namespace == self.namespace && self.slices.remove(&key.name).is_some() {
            self.publish();
        }
    }

    fn publish(&self) {
        let all: BTreeSet<IpAddr> = self.slices.values().flatten().copied().collect();
        let all: Vec<IpAddr> = all.into_iter().collect();
        self.tx.send_if_modified(|current| {
            if *current == all {
                return false;
            }
            *current = all;
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use knarr_model::{Kind, ObjectMeta, SliceConditions, SliceEndpoint};

    fn slice(ns: &str, name: &str, service: &str, ready: &[(&str, Option<bool>)]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: name.into(),
                namespace: ns.into(),
                labels: [(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into(),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: ready
                .iter()
                .map(|(ip, ready)| SliceEndpoint {
                    addresses: vec![ip.to_string()],
                    conditions: SliceConditions { ready: *ready },
                })
                .collect(),
            ports: vec![],
        }
    }

    #[test]
    fn ready_addresses_of_the_gateway_service_only() {
        let (mut pods, rx) = GatewayPods::new("knarr-system", "knarr-internal");
        pods.slice_applied(&slice(
            "knarr-system",
            "gw-1",
            "knarr-internal",
            &[("10.1.0.1", None), ("10.1.0.2", Some(false))],
        ));
        pods.slice_applied(&slice(
            "knarr-system",
            "other",
            "other",
            &[("10.9.0.9", None)],
        ));
        pods.slice_applied(&slice(
            "default",
            "gw-x",
            "knarr-internal",
            &[("10.9.0.8", None)],
        ));
        pods.slice_applied(&slice(
            "knarr-system",
            "gw-2",
            "knarr-internal",
            &[("10.1.0.3", Some(true))],
        ));
        let ips: Vec<String> = rx.borrow().iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["10.1.0.1", "10.1.0.3"]);
        pods.slice_deleted(&ObjectKey::new(Kind::EndpointSlice, "knarr-system", "gw-1"));
        let ips: Vec<String> = rx.borrow().iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["10.1.0.3"]);
    }
}
