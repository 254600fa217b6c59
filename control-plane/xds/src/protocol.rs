//! The per-stream ADS protocol, as sans-I/O state machines.
//!
//! [`SotwStream`] and [`DeltaStream`] take requests from Envoy and snapshot updates, and return the
//! responses to send plus events to log and count. No sockets, clocks or locks: the tonic handler
//! in [`crate::server`] only moves messages between the wire, the cache and these machines.
//!
//! Rules both share:
//! - **Upstreams before routing.** Responses go out in [`ResourceType::ALL`] order (CDS, EDS,
//!   SDS, LDS, SRDS, RDS), at most one per type in flight (rapid changes coalesce). Listeners and
//!   routes wait until clusters, endpoints and secrets are ACKed and every cluster Envoy holds has
//!   had its endpoints, so no route points at a cluster that is missing or still warming.
//!   Endpoints do not wait for the clusters' ACK: Envoy may hold that ACK until the new clusters
//!   have their endpoints.
//! - **Clusters leave last.** A cluster (or its endpoints) that the new snapshot drops stays with
//!   the client until listeners and routes are in sync with the snapshot, so no route points at a
//!   cluster Envoy no longer has.
//! - **A changed cluster gets fresh endpoints**: Envoy keeps a changed EDS cluster warming until it
//!   sees an EDS answer for it, so its ClusterLoadAssignment is sent again even if unchanged.
//! - **A NACK is never answered by resending the rejected config.** The client is taken to hold
//!   what was sent; only a snapshot that changes a rejected resource sends anything again.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as DeltaResource,
};

use knarr_snapshot::resource::{Resource, ResourceType, COUNT};
use knarr_snapshot::snapshot::{set_version, Snapshot};

/// Identifies this control plane in responses (Envoy shows it in config dumps).
pub const CONTROL_PLANE_ID: &str = "knarr";

const WILDCARD: &str = "*";

/// The most resources one delta response carries.
pub const MAX_DELTA_RESOURCES: usize = 2500;

/// Something worth logging or counting that happened on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// Envoy accepted the response with this nonce.
    Ack {
        ty: ResourceType,
        nonce: String,
        version: String,
        /// What Envoy now holds because of it: (name, version) pairs, and names it dropped.
        /// With `complete`, `accepted` is everything Envoy holds of this type.
        accepted: Vec<(String, String)>,
        removed: Vec<String>,
        complete: bool,
    },
    /// Envoy rejected the response with this nonce; it keeps serving its previous config.
    Nack {
        ty: ResourceType,
        nonce: String,
        rejected_version: String,
        error: String,
    },
    /// A request answered a response that is no longer the latest; ignored (SotW) or only its
    /// subscription changes applied (delta).
    StaleNonce { ty: ResourceType, nonce: String },
    /// A type this server does not serve.
    UnknownType { type_url: String },
}

/// What a state machine wants done.
#[derive(Debug, Default)]
pub struct Output<R> {
    pub responses: Vec<R>,
    pub events: Vec<StreamEvent>,
}

/// What the client holds of one resource, as far as this stream knows.
#[derive(Debug, Clone)]
enum Held {
    /// Sent by this stream (SotW needs the body to keep a cluster while deferring its removal).
    Sent(Arc<Resource>),
    /// A version the client reported on a delta reconnect.
    Reported(String),
}

impl Held {
    fn version(&self) -> &str {
        match self {
            Held::Sent(r) => &r.version,
            Held::Reported(v) => v,
        }
    }

    fn resource(&self) -> Option<&Arc<Resource>> {
        match self {
            Held::Sent(r) => Some(r),
            Held::Reported(_) => None,
        }
    }
}

#[derive(Debug)]
struct Outstanding {
    nonce: String,
    version: String,
    /// Delta: the resources the response carried, for NACK bookkeeping.
    upserts: Vec<(String, String)>,
    /// SotW: the whole view it carried.
    view: Option<Vec<(String, String)>>,
    removed: Vec<String>,
}

#[derive(Debug, Default)]
struct TypeState {
    /// The client has asked for this type on this stream.
    requested: bool,
    wildcard: bool,
    /// SotW only: the first request named nothing ("legacy wildcard").
    legacy_wildcard: bool,
    names: BTreeSet<String>,
    held: BTreeMap<String, Held>,
    outstanding: Option<Outstanding>,
    /// Answer the next flush even if nothing changed (the first request of a type).
    must_respond: bool,
    /// Resend these even if unchanged.
    force: BTreeSet<String>,
    /// Delta: resources of a NACKed response, with the rejected versions.
    nacked: BTreeMap<String, String>,
    /// Delta: explicitly subscribed names already reported as not existing.
    reported_missing: BTreeSet<String>,
    /// The last response of this type was rejected, and nothing newer was accepted since.
    rejected: bool,
    /// The nonce of the latest response of this type; requests naming any other are stale.
    last_nonce: Option<String>,
    /// The snapshot generation for which this type was found to have nothing to send.
    clean_for: Cell<Option<u64>>,
}

impl TypeState {
    fn subscribes(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

/// What one type would send now.
#[derive(Debug)]
struct Plan {
    /// Everything the client should hold afterwards (the SotW response body).
    view: Vec<Arc<Resource>>,
    view_version: String,
    /// Delta: what to send.
    upserts: Vec<Arc<Resource>>,
    removes: Vec<String>,
    /// Delta: names to clear from the NACK record once sent.
    clears_nack: bool,
}

/// State shared by both protocol variants.
#[derive(Debug, Default)]
struct Streams {
    types: [TypeState; COUNT],
    nonce_counter: u64,
    delta: bool,
}

impl Streams {
    fn next_nonce(&mut self) -> String {
        self.nonce_counter += 1;
        self.nonce_counter.to_string()
    }

    fn state(&self, ty: ResourceType) -> &TypeState {
        &self.types[ty.index()]
    }

    fn state_mut(&mut self, ty: ResourceType) -> &mut TypeState {
        &mut self.types[ty.index()]
    }

    /// True when the client holds exactly what the snapshot says for `ty`, with nothing in flight.
    fn settled(&self, ty: ResourceType, snap: &Snapshot) -> bool {
        let st = self.state(ty);
        if !st.requested {
            return true;
        }
        st.outstanding.is_none() && self.plan(ty, snap).is_none()
    }

    /// True when every type the client asked for holds what `snap` says, accepted.
    fn is_synced(&self, snap: &Snapshot) -> bool {
        ResourceType::ALL
            .into_iter()
            .all(|ty| self.settled(ty, snap) && !self.state(ty).rejected)
    }

    /// Removals of clusters and endpoints wait until listeners and routes no longer need them.
    fn defers_removal(&self, ty: ResourceType, snap: &Snapshot) -> bool {
        matches!(ty, ResourceType::Cluster | ResourceType::Endpoint)
            && ![
                ResourceType::Listener,
                ResourceType::ScopedRoute,
                ResourceType::Route,
            ]
            .into_iter()
            .all(|routing| self.settled(routing, snap))
    }

    /// What `ty` would send now, if anything. Linear merges over name-sorted maps; no
    /// per-resource allocation unless something is sent. A "nothing to send" answer is
    /// remembered until the type's state (or a type it depends on) changes or a new snapshot
    /// arrives, since every ACK re-checks every type.
    fn plan(&self, ty: ResourceType, snap: &Snapshot) -> Option<Plan> {
        let st = self.state(ty);
        let generation = snap.generation();
        if generation != 0 && st.clean_for.get() == Some(generation) {
            return None;
        }
        let all = snap.resources(ty);

        // The subscribed resources that exist, in name order; and explicit names that don't.
        let mut missing: Vec<&String> = Vec::new();
        let desired: Vec<(&String, &Arc<Resource>)> = if st.wildcard {
            for name in &st.names {
                if !all.contains_key(name) {
                    missing.push(name);
                }
            }
            all.iter().collect()
        } else if st.names.len() * 8 < all.len() {
            let mut found = Vec::with_capacity(st.names.len());
            for name in &st.names {
                match all.get_key_value(name) {
                    Some(entry) => found.push(entry),
                    None => missing.push(name),
                }
            }
            found
        } else {
            let mut found = Vec::with_capacity(st.names.len());
            let mut resources = all.iter().peekable();
            for name in &st.names {
                while resources.next_if(|(k, _)| *k < name).is_some() {}
                match resources.next_if(|(k, _)| *k == name) {
                    Some(entry) => found.push(entry),
                    None => missing.push(name),
                }
            }
            found
        };
        let desired_version = |name: &str| {
            desired
                .binary_search_by(|(k, _)| k.as_str().cmp(name))
                .ok()
                .map(|i| &desired[i].1.version)
        };

        // After a NACK, resend the whole rejected set as soon as any of it changes.
        let nack_retry =
            !st.nacked.is_empty() && st.nacked.iter().any(|(n, v)| desired_version(n) != Some(v));

        let mut upserts: Vec<Arc<Resource>> = Vec::new();
        let mut removes: Vec<String> = Vec::new();
        let mut kept: Vec<Arc<Resource>> = Vec::new();
        let mut defer: Option<bool> = None;
        let mut held = st.held.iter().peekable();
        let mut handle_gone = |name: &String, h: &Held| {
            if !st.subscribes(name) {
                return;
            }
            if *defer.get_or_insert_with(|| self.defers_removal(ty, snap)) {
                // Keep it with the client for now (SotW must resend its body to keep it).
                if let Some(r) = h.resource() {
                    kept.push(Arc::clone(r));
                }
            } else {
                removes.push(name.clone());
            }
        };
        for (name, resource) in &desired {
            while let Some((gone, h)) = held.next_if(|(k, _)| *k < *name) {
                handle_gone(gone, h);
            }
            let unchanged = match held.next_if(|(k, _)| *k == *name) {
                Some((_, h)) => match h.resource() {
                    Some(r) if Arc::ptr_eq(r, resource) => true,
                    _ => h.version() == resource.version,
                },
                None => false,
            };
            if !unchanged
                || st.force.contains(name.as_str())
                || (nack_retry && st.nacked.contains_key(name.as_str()))
            {
                upserts.push(Arc::clone(resource));
            }
        }
        for (gone, h) in held {
            handle_gone(gone, h);
        }
        if self.delta {
            // Tell the client once that an explicitly requested resource does not exist, so it
            // does not wait for it until its initial fetch timeout.
            for name in missing {
                if !st.held.contains_key(name) && !st.reported_missing.contains(name) {
                    removes.push(name.clone());
                }
            }
        }

        // Delta: a big change (an initial sync of thousands of resources) goes out in parts, one
        // per ACK, which bounds the memory a response holds; the rest follows on the ACK.
        let mut truncated = false;
        if self.delta && upserts.len() > MAX_DELTA_RESOURCES {
            upserts.truncate(MAX_DELTA_RESOURCES);
            truncated = true;
        }
        if !(st.must_respond || !upserts.is_empty() || !removes.is_empty()) {
            if generation != 0 {
                st.clean_for.set(Some(generation));
            }
            return None;
        }
        // SotW sends the whole view: what is desired, plus what is kept for now.
        let (view, view_version) = if self.delta {
            (Vec::new(), String::new())
        } else {
            let mut view: Vec<Arc<Resource>> = desired.iter().map(|(_, r)| Arc::clone(r)).collect();
            if !kept.is_empty() {
                view.extend(kept);
                view.sort_by(|a, b| a.name.cmp(&b.name));
            }
            let version = set_version(view.iter());
            (view, version)
        };
        Some(Plan {
            view,
            view_version,
            upserts,
            removes,
            clears_nack: nack_retry && !truncated,
        })
    }

    /// Forgets remembered "nothing to send" answers that a change to `ty`'s state may affect.
    fn touch(&self, ty: ResourceType) {
        self.state(ty).clean_for.set(None);
        if ty.is_routing() || ty == ResourceType::Cluster {
            // Cluster and endpoint removals wait on routing; endpoints on cluster changes.
            self.state(ResourceType::Cluster).clean_for.set(None);
            self.state(ResourceType::Endpoint).clean_for.set(None);
        }
    }

    /// Everything that may be sent now, in push order, each recorded as sent.
    fn flush(&mut self, snap: &Snapshot) -> Vec<(ResourceType, Plan, String)> {
        let mut sent = Vec::new();
        let mut upstreams_ready = None;
        for ty in ResourceType::ALL {
            let st = self.state(ty);
            if !st.requested || st.outstanding.is_some() {
                continue;
            }
            // Sending routing types changes nothing upstream: decide once per flush.
            if ty.is_routing()
                && !*upstreams_ready.get_or_insert_with(|| self.upstreams_ready(snap))
            {
                continue;
            }
            let Some(plan) = self.plan(ty, snap) else {
                continue;
            };
            let nonce = self.next_nonce();
            self.record_sent(ty, &plan, &nonce, snap);
            sent.push((ty, plan, nonce));
        }
        sent
    }

    /// Listeners and routes may go out once clusters, endpoints and secrets are ACKed, and every
    /// cluster the client holds has had its endpoints delivered (so none is still warming).
    fn upstreams_ready(&self, snap: &Snapshot) -> bool {
        let upstream = [
            ResourceType::Cluster,
            ResourceType::Endpoint,
            ResourceType::Secret,
        ];
        if upstream
            .iter()
            .any(|t| self.state(*t).outstanding.is_some())
        {
            return false;
        }
        // Everything upstream must be out, not just the first part of a large change.
        if upstream
            .iter()
            .any(|t| self.state(*t).requested && self.plan(*t, snap).is_some())
        {
            return false;
        }
        // Every cluster the client holds that has endpoints must have had them delivered.
        let eds = &self.state(ResourceType::Endpoint).held;
        let mut delivered = eds.keys().peekable();
        for name in self.state(ResourceType::Cluster).held.keys() {
            while delivered.next_if(|k| *k < name).is_some() {}
            if delivered.next_if(|k| *k == name).is_none()
                && snap.get(ResourceType::Endpoint, name).is_some()
            {
                return false;
            }
        }
        true
    }

    fn record_sent(&mut self, ty: ResourceType, plan: &Plan, nonce: &str, snap: &Snapshot) {
        self.touch(ty);
        let delta = self.delta;
        let st = self.state_mut(ty);
        let mut changed_clusters = Vec::new();
        for r in &plan.upserts {
            let previous = st.held.insert(r.name.clone(), Held::Sent(Arc::clone(r)));
            if previous.as_ref().map(Held::version) != Some(r.version.as_str()) {
                changed_clusters.push(r.name.clone());
            }
            st.force.remove(&r.name);
            st.reported_missing.remove(&r.name);
        }
        if !delta {
            // SotW: the view is the client's whole set.
            let keep: BTreeSet<&str> = plan.view.iter().map(|r| r.name.as_str()).collect();
            st.held.retain(|name, _| keep.contains(name.as_str()));
            for r in &plan.view {
                st.force.remove(&r.name);
            }
        }
        for name in &plan.removes {
            if st.held.remove(name).is_none() {
                st.reported_missing.insert(name.clone());
            }
        }
        if plan.clears_nack {
            st.nacked.clear();
        }
        st.must_respond = false;
        st.last_nonce = Some(nonce.to_owned());
        st.outstanding = Some(Outstanding {
            nonce: nonce.to_owned(),
            version: if delta {
                snap.version(ty).to_owned()
            } else {
                plan.view_version.clone()
            },
            upserts: plan
                .upserts
                .iter()
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect(),
            view: (!delta).then(|| {
                plan.view
                    .iter()
                    .map(|r| (r.name.clone(), r.version.clone()))
                    .collect()
            }),
            removed: plan.removes.clone(),
        });
        if ty == ResourceType::Cluster && !changed_clusters.is_empty() {
            let eds = self.state_mut(ResourceType::Endpoint);
            eds.force.extend(changed_clusters);
        }
    }

    /// Handles the nonce of a request: ACK, NACK or stale. Returns false for a stale nonce.
    fn settle(
        &mut self,
        ty: ResourceType,
        nonce: &str,
        version_info: &str,
        error: Option<&str>,
        events: &mut Vec<StreamEvent>,
    ) -> bool {
        if nonce.is_empty() {
            return true;
        }
        self.touch(ty);
        let st = self.state_mut(ty);
        if st.last_nonce.as_deref() != Some(nonce) {
            events.push(StreamEvent::StaleNonce {
                ty,
                nonce: nonce.to_owned(),
            });
            return false;
        }
        let Some(outstanding) = st.outstanding.take() else {
            // The latest response was already answered: this is a new request on top of it
            // (Envoy asks again with new names, e.g. endpoints for a new cluster).
            return true;
        };
        match error {
            Some(message) => {
                st.rejected = true;
                st.nacked.extend(outstanding.upserts);
                events.push(StreamEvent::Nack {
                    ty,
                    nonce: outstanding.nonce,
                    rejected_version: outstanding.version,
                    error: message.to_owned(),
                });
            }
            None => {
                st.rejected = false;
                st.nacked.clear();
                let complete = outstanding.view.is_some();
                events.push(StreamEvent::Ack {
                    ty,
                    nonce: outstanding.nonce,
                    version: if version_info.is_empty() {
                        outstanding.version
                    } else {
                        version_info.to_owned()
                    },
                    accepted: outstanding.view.unwrap_or(outstanding.upserts),
                    removed: outstanding.removed,
                    complete,
                });
            }
        }
        true
    }
}

fn control_plane() -> Option<ControlPlane> {
    Some(ControlPlane {
        identifier: CONTROL_PLANE_ID.to_owned(),
    })
}

/// State-of-the-world ADS (`StreamAggregatedResources`) for one Envoy connection.
#[derive(Debug, Default)]
pub struct SotwStream {
    inner: Streams,
}

impl SotwStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles one request from Envoy. `snap` is the snapshot for the Envoy's group, if any
    /// has been published yet.
    pub fn on_request(
        &mut self,
        req: &DiscoveryRequest,
        snap: Option<&Snapshot>,
    ) -> Output<DiscoveryResponse> {
        let mut out = Output::default();
        let Some(ty) = ResourceType::from_type_url(&req.type_url) else {
            out.events.push(StreamEvent::UnknownType {
                type_url: req.type_url.clone(),
            });
            return out;
        };
        let error = req.error_detail.as_ref().map(|e| e.message.as_str());
        if !self.inner.settle(
            ty,
            &req.response_nonce,
            &req.version_info,
            error,
            &mut out.events,
        ) {
            // SotW: a request for a response that has been superseded says nothing new.
            return out;
        }
        self.inner.touch(ty);
        let st = self.inner.state_mut(ty);
        let explicit_wildcard = req.resource_names.iter().any(|n| n == WILDCARD);
        let listed = req.resource_names.len() - usize::from(explicit_wildcard);
        // Envoy repeats its whole subscription on every request; rebuild only on a change.
        let unchanged = listed == st.names.len()
            && req
                .resource_names
                .iter()
                .all(|n| n == WILDCARD || st.names.contains(n));
        if !st.requested {
            st.requested = true;
            st.legacy_wildcard = req.resource_names.is_empty();
            st.must_respond = true;
        }
        if req.response_nonce.is_empty() {
            // A first request for the type on this stream always gets an answer.
            st.must_respond = true;
        }
        st.wildcard = explicit_wildcard || (st.legacy_wildcard && listed == 0);
        if !req.resource_names.is_empty() {
            st.legacy_wildcard = false;
        }
        if !unchanged {
            st.names = req
                .resource_names
                .iter()
                .filter(|n| n.as_str() != WILDCARD)
                .cloned()
                .collect();
        }
        if let Some(snap) = snap {
            self.flush_into(snap, &mut out);
        }
        out
    }

    /// A new snapshot was published for this stream's group.
    pub fn on_snapshot(&mut self, snap: &Snapshot) -> Output<DiscoveryResponse> {
        let mut out = Output::default();
        self.flush_into(snap, &mut out);
        out
    }

    fn flush_into(&mut self, snap: &Snapshot, out: &mut Output<DiscoveryResponse>) {
        for (ty, plan, nonce) in self.inner.flush(snap) {
            out.responses.push(DiscoveryResponse {
                version_info: plan.view_version,
                resources: plan.view.iter().map(|r| r.to_any()).collect(),
                type_url: ty.type_url().to_owned(),
                nonce,
                control_plane: control_plane(),
                ..Default::default()
            });
        }
    }

    /// True when Envoy has accepted everything `snap` holds for what it subscribes to.
    pub fn is_synced(&self, snap: &Snapshot) -> bool {
        self.inner.is_synced(snap)
    }

    /// The names the client subscribes to for `ty` (`None` when it asks for everything).
    pub fn subscription(&self, ty: ResourceType) -> Option<&BTreeSet<String>> {
        let st = self.inner.state(ty);
        (!st.wildcard).then_some(&st.names)
    }
}

/// Incremental ADS (`DeltaAggregatedResources`) for one Envoy connection.
#[derive(Debug)]
pub struct DeltaStream {
    inner: Streams,
}

impl Default for DeltaStream {
    fn default() -> Self {
        DeltaStream {
            inner: Streams {
                delta: true,
                ..Default::default()
            },
        }
    }
}

impl DeltaStream {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        snap: Option<&Snapshot>,
    ) -> Output<DeltaDiscoveryResponse> {
        let mut out = Output::default();
        let Some(ty) = ResourceType::from_type_url(&req.type_url) else {
            out.events.push(StreamEvent::UnknownType {
                type_url: req.type_url.clone(),
            });
            return out;
        };
        // Subscription changes apply even when the nonce is stale.
        self.inner.touch(ty);
        let st = self.inner.state_mut(ty);
        if !st.requested {
            st.requested = true;
            // Envoy's initialisation waits for a first answer, even an empty one.
            st.must_respond = true;
            st.wildcard = req.resource_names_subscribe.is_empty() && ty.is_wildcard_by_default();
            // What the client already holds from an earlier stream: not resent if unchanged.
            for (name, version) in &req.initial_resource_versions {
                st.held
                    .insert(name.clone(), Held::Reported(version.clone()));
            }
        }
        for name in &req.resource_names_subscribe {
            if name == WILDCARD {
                st.wildcard = true;
            } else {
                st.names.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == WILDCARD {
                st.wildcard = false;
            } else {
                st.names.remove(name);
                st.reported_missing.remove(name);
            }
            if !st.subscribes(name) {
                // The client drops what it no longer subscribes to.
                st.held.remove(name);
                st.nacked.remove(name);
            }
        }
        if !req.resource_names_unsubscribe.is_empty() && !st.wildcard {
            let names = &st.names;
            st.held.retain(|n, _| names.contains(n));
        }
        let error = req.error_detail.as_ref().map(|e| e.message.as_str());
        self.inner
            .settle(ty, &req.response_nonce, "", error, &mut out.events);
        if let Some(snap) = snap {
            self.flush_into(snap, &mut out);
        }
        out
    }

    /// True when Envoy has accepted everything `snap` holds for what it subscribes to.
    pub fn is_synced(&self, snap: &Snapshot) -> bool {
        self.inner.is_synced(snap)
    }

    pub fn on_snapshot(&mut self, snap: &Snapshot) -> Output<DeltaDiscoveryResponse> {
        let mut out = Output::default();
        self.flush_into(snap, &mut out);
        out
    }

    fn flush_into(&mut self, snap: &Snapshot, out: &mut Output<DeltaDiscoveryResponse>) {
        for (ty, plan, nonce) in self.inner.flush(snap) {
            out.responses.push(DeltaDiscoveryResponse {
                system_version_info: snap.version(ty).to_owned(),
                resources: plan
                    .upserts
                    .iter()
                    .map(|r| DeltaResource {
                        name: r.name.clone(),
                        version: r.version.clone(),
                        resource: Some(r.to_any()),
                        ..Default::default()
                    })
                    .collect(),
                type_url: ty.type_url().to_owned(),
                removed_resources: plan.removes,
                nonce,
                control_plane: control_plane(),
                ..Default::default()
            });
        }
    }
}

#[cfg(test)]
mod tests;
