//! The ADS protocol rules, checked without sockets.

use super::*;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use envoy_types::pb::google::rpc::Status;
use std::collections::HashMap;

const CDS: ResourceType = ResourceType::Cluster;
const EDS: ResourceType = ResourceType::Endpoint;
const LDS: ResourceType = ResourceType::Listener;
const RDS: ResourceType = ResourceType::Route;

fn cluster(name: &str, timeout_ms: u32) -> Cluster {
    Cluster {
        name: name.into(),
        per_connection_buffer_limit_bytes: Some(envoy_types::pb::google::protobuf::UInt32Value {
            value: timeout_ms,
        }),
        ..Default::default()
    }
}

fn cla(name: &str) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.into(),
        ..Default::default()
    }
}

fn listener(name: &str) -> Listener {
    Listener {
        name: name.into(),
        ..Default::default()
    }
}

fn routes(name: &str, domain: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: name.into(),
        virtual_hosts: vec![VirtualHost {
            name: domain.into(),
            domains: vec![domain.into()],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn base() -> Snapshot {
    Snapshot::builder()
        .add(&cluster("a", 1))
        .add(&cla("a"))
        .add(&listener("l"))
        .add(&routes("r", "a.example"))
        .build()
}

fn node() -> Option<Node> {
    Some(Node {
        id: "envoy-1".into(),
        ..Default::default()
    })
}

fn sotw_req(ty: ResourceType, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.into(),
        node: node(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: ty.type_url().into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn nack(mut req: DiscoveryRequest, message: &str) -> DiscoveryRequest {
    req.error_detail = Some(Status {
        code: 3,
        message: message.into(),
        ..Default::default()
    });
    req
}

fn names_of(resp: &DiscoveryResponse) -> Vec<String> {
    use prost::Message as _;
    resp.resources
        .iter()
        .map(
            |any| match ResourceType::from_type_url(&any.type_url).unwrap() {
                CDS => Cluster::decode(any.value.as_slice()).unwrap().name,
                EDS => {
                    ClusterLoadAssignment::decode(any.value.as_slice())
                        .unwrap()
                        .cluster_name
                }
                LDS => Listener::decode(any.value.as_slice()).unwrap().name,
                RDS => {
                    RouteConfiguration::decode(any.value.as_slice())
                        .unwrap()
                        .name
                }
                ResourceType::ActivatorRevision => {
                    knarr_proto::activator::Revision::decode(any.value.as_slice())
                        .unwrap()
                        .name
                }
                ResourceType::Secret | ResourceType::ScopedRoute => unreachable!(),
            },
        )
        .collect()
}

fn one(out: Output<DiscoveryResponse>) -> DiscoveryResponse {
    assert_eq!(out.responses.len(), 1, "expected one response: {out:?}");
    out.responses.into_iter().next().unwrap()
}

fn types_of(out: &Output<DiscoveryResponse>) -> Vec<ResourceType> {
    out.responses
        .iter()
        .map(|r| ResourceType::from_type_url(&r.type_url).unwrap())
        .collect()
}

fn none<R: std::fmt::Debug>(out: &Output<R>) {
    assert!(out.responses.is_empty(), "expected no response: {out:?}");
}

/// Drives a SotW client through initial sync: CDS, EDS, LDS, RDS, each ACKed.
fn synced_sotw(snap: &Snapshot) -> (SotwStream, HashMap<ResourceType, DiscoveryResponse>) {
    let mut s = SotwStream::new();
    let mut last = HashMap::new();
    let cds = one(s.on_request(&sotw_req(CDS, &[], "", ""), Some(snap)));
    assert_eq!(names_of(&cds), ["a"]);
    none(&s.on_request(
        &sotw_req(CDS, &[], &cds.version_info, &cds.nonce),
        Some(snap),
    ));
    let eds = one(s.on_request(&sotw_req(EDS, &["a"], "", ""), Some(snap)));
    assert_eq!(names_of(&eds), ["a"]);
    none(&s.on_request(
        &sotw_req(EDS, &["a"], &eds.version_info, &eds.nonce),
        Some(snap),
    ));
    let lds = one(s.on_request(&sotw_req(LDS, &[], "", ""), Some(snap)));
    none(&s.on_request(
        &sotw_req(LDS, &[], &lds.version_info, &lds.nonce),
        Some(snap),
    ));
    let rds = one(s.on_request(&sotw_req(RDS, &["r"], "", ""), Some(snap)));
    assert_eq!(names_of(&rds), ["r"]);
    let out = s.on_request(
        &sotw_req(RDS, &["r"], &rds.version_info, &rds.nonce),
        Some(snap),
    );
    none(&out);
    assert!(s.is_synced(snap));
    last.insert(CDS, cds);
    last.insert(EDS, eds);
    last.insert(LDS, lds);
    last.insert(RDS, rds);
    (s, last)
}

#[test]
fn sotw_ack_then_no_resend_of_unchanged_config() {
    let snap = base();
    let (mut s, _) = synced_sotw(&snap);
    // Publishing an equal snapshot sends nothing.
    none(&s.on_snapshot(&base()));
}

#[test]
fn sotw_ack_event_carries_version() {
    let snap = base();
    let mut s = SotwStream::new();
    let cds = one(s.on_request(&sotw_req(CDS, &[], "", ""), Some(&snap)));
    let out = s.on_request(
        &sotw_req(CDS, &[], &cds.version_info, &cds.nonce),
        Some(&snap),
    );
    assert_eq!(
        out.events,
        vec![StreamEvent::Ack {
            ty: CDS,
            nonce: cds.nonce.clone(),
            version: cds.version_info,
            accepted: vec![("a".into(), snap.get(CDS, "a").unwrap().version.clone())],
            removed: vec![],
            complete: true,
        }]
    );
}

#[test]
fn sotw_waits_for_a_snapshot() {
    let mut s = SotwStream::new();
    none(&s.on_request(&sotw_req(CDS, &[], "", ""), None));
    let cds = one(s.on_snapshot(&base()));
    assert_eq!(names_of(&cds), ["a"]);
}

#[test]
fn sotw_changed_route_is_sent_alone() {
    let (mut s, last) = synced_sotw(&base());
    let next = base().to_builder().add(&routes("r", "b.example")).build();
    let rds = one(s.on_snapshot(&next));
    assert_eq!(rds.type_url, RDS.type_url());
    assert_ne!(rds.version_info, last[&RDS].version_info);
}

#[test]
fn sotw_nack_is_not_answered_with_the_same_config() {
    let (mut s, last) = synced_sotw(&base());
    let bad = base().to_builder().add(&routes("r", "bad.example")).build();
    let rds = one(s.on_snapshot(&bad));
    // Envoy rejects it, reporting the last version it accepted.
    let out = s.on_request(
        &nack(
            sotw_req(RDS, &["r"], &last[&RDS].version_info, &rds.nonce),
            "bad domain",
        ),
        Some(&bad),
    );
    none(&out);
    assert!(matches!(
        &out.events[..],
        [StreamEvent::Nack { ty: RDS, error, .. }] if error == "bad domain"
    ));
    assert!(!s.is_synced(&bad));
    // Unrelated republishing of the same bad snapshot: still nothing.
    none(&s.on_snapshot(&bad.to_builder().build()));
    // The next good snapshot goes out.
    let good = base()
        .to_builder()
        .add(&routes("r", "good.example"))
        .build();
    let rds2 = one(s.on_snapshot(&good));
    assert_ne!(rds2.version_info, rds.version_info);
    none(&s.on_request(
        &sotw_req(RDS, &["r"], &rds2.version_info, &rds2.nonce),
        Some(&good),
    ));
    assert!(s.is_synced(&good));
}

#[test]
fn sotw_stale_nonce_is_ignored() {
    let (mut s, last) = synced_sotw(&base());
    let next = base().to_builder().add(&routes("r", "b.example")).build();
    let rds = one(s.on_snapshot(&next));
    // A request carrying an older nonce (even with new names) changes nothing.
    let out = s.on_request(
        &sotw_req(
            RDS,
            &["r", "other"],
            &last[&RDS].version_info,
            &last[&RDS].nonce,
        ),
        Some(&next),
    );
    none(&out);
    assert!(matches!(
        &out.events[..],
        [StreamEvent::StaleNonce { ty: RDS, .. }]
    ));
    // The real ACK still works.
    let out = s.on_request(
        &sotw_req(RDS, &["r"], &rds.version_info, &rds.nonce),
        Some(&next),
    );
    assert!(matches!(
        &out.events[..],
        [StreamEvent::Ack { ty: RDS, .. }]
    ));
}

#[test]
fn sotw_named_subscription_gets_only_named_resources() {
    let snap = base()
        .to_builder()
        .add(&routes("r2", "c.example"))
        .add(&routes("r3", "d.example"))
        .build();
    let mut s = SotwStream::new();
    let rds = one(s.on_request(&sotw_req(RDS, &["r2", "missing"], "", ""), Some(&snap)));
    assert_eq!(names_of(&rds), ["r2"]);
    // Asking for one more name answers with both.
    let rds = one(s.on_request(
        &sotw_req(RDS, &["r2", "r3"], &rds.version_info, &rds.nonce),
        Some(&snap),
    ));
    assert_eq!(names_of(&rds), ["r2", "r3"]);
    // A change to a resource nobody asked for sends nothing.
    s.on_request(
        &sotw_req(RDS, &["r2", "r3"], &rds.version_info, &rds.nonce),
        Some(&snap),
    );
    let next = snap.to_builder().add(&routes("r", "zzz.example")).build();
    none(&s.on_snapshot(&next));
}

#[test]
fn sotw_explicit_wildcard() {
    let snap = base().to_builder().add(&cluster("b", 1)).build();
    let mut s = SotwStream::new();
    let cds = one(s.on_request(&sotw_req(CDS, &["*"], "", ""), Some(&snap)));
    assert_eq!(names_of(&cds), ["a", "b"]);
}

#[test]
fn listeners_and_routes_wait_for_clusters_and_endpoints() {
    let snap = base();
    let mut s = SotwStream::new();
    // Envoy asks for everything at once: clusters first; listeners and routes wait.
    let cds = one(s.on_request(&sotw_req(CDS, &[], "", ""), Some(&snap)));
    assert_eq!(cds.type_url, CDS.type_url());
    none(&s.on_request(&sotw_req(LDS, &[], "", ""), Some(&snap)));
    // Endpoints do not wait for the clusters' ACK (Envoy may hold it until they arrive).
    let eds = one(s.on_request(&sotw_req(EDS, &["a"], "", ""), Some(&snap)));
    assert_eq!(eds.type_url, EDS.type_url());
    none(&s.on_request(&sotw_req(RDS, &["r"], "", ""), Some(&snap)));
    none(&s.on_request(
        &sotw_req(CDS, &[], &cds.version_info, &cds.nonce),
        Some(&snap),
    ));
    // Once both are ACKed, listeners and routes go out, in that order.
    let out = s.on_request(
        &sotw_req(EDS, &["a"], &eds.version_info, &eds.nonce),
        Some(&snap),
    );
    assert_eq!(types_of(&out), [LDS, RDS]);
}

#[test]
fn routes_wait_until_a_new_cluster_has_endpoints() {
    let (mut s, last) = synced_sotw(&base());
    let next = base()
        .to_builder()
        .add(&cluster("b", 1))
        .add(&cla("b"))
        .add(&routes("r", "uses-b.example"))
        .build();
    let cds = one(s.on_snapshot(&next));
    assert_eq!(names_of(&cds), ["a", "b"]);
    // Envoy ACKs the clusters but has not asked for b's endpoints yet: routes wait.
    none(&s.on_request(
        &sotw_req(CDS, &[], &cds.version_info, &cds.nonce),
        Some(&next),
    ));
    // Envoy asks for b's endpoints on top of the last EDS response: not stale.
    let eds = one(s.on_request(
        &sotw_req(
            EDS,
            &["a", "b"],
            &last[&EDS].version_info,
            &last[&EDS].nonce,
        ),
        Some(&next),
    ));
    assert_eq!(names_of(&eds), ["a", "b"]);
    let out = s.on_request(
        &sotw_req(EDS, &["a", "b"], &eds.version_info, &eds.nonce),
        Some(&next),
    );
    assert_eq!(types_of(&out), [RDS]);
}

#[test]
fn removed_cluster_stays_until_routes_stop_using_it() {
    // Start with clusters a and b; routes point at b.
    let with_b = base()
        .to_builder()
        .add(&cluster("b", 1))
        .add(&cla("b"))
        .add(&routes("r", "uses-b.example"))
        .build();
    let mut s = SotwStream::new();
    let cds = one(s.on_request(&sotw_req(CDS, &[], "", ""), Some(&with_b)));
    s.on_request(
        &sotw_req(CDS, &[], &cds.version_info, &cds.nonce),
        Some(&with_b),
    );
    let eds = one(s.on_request(&sotw_req(EDS, &["a", "b"], "", ""), Some(&with_b)));
    s.on_request(
        &sotw_req(EDS, &["a", "b"], &eds.version_info, &eds.nonce),
        Some(&with_b),
    );
    let lds = one(s.on_request(&sotw_req(LDS, &[], "", ""), Some(&with_b)));
    s.on_request(
        &sotw_req(LDS, &[], &lds.version_info, &lds.nonce),
        Some(&with_b),
    );
    let rds = one(s.on_request(&sotw_req(RDS, &["r"], "", ""), Some(&with_b)));
    s.on_request(
        &sotw_req(RDS, &["r"], &rds.version_info, &rds.nonce),
        Some(&with_b),
    );
    assert!(s.is_synced(&with_b));

    // New snapshot: b is gone and the route moved away from it.
    let without_b = base();
    // Clusters go first, but b is kept (the old routes still use it): nothing to send for CDS
    // since the view is unchanged; the route change goes out.
    let rds2 = one(s.on_snapshot(&without_b));
    assert_eq!(rds2.type_url, RDS.type_url());
    // Once Envoy ACKs the routes, b and its endpoints are removed.
    let out = s.on_request(
        &sotw_req(RDS, &["r"], &rds2.version_info, &rds2.nonce),
        Some(&without_b),
    );
    assert_eq!(types_of(&out), [CDS, EDS]);
    assert_eq!(names_of(&out.responses[0]), ["a"]);
    assert_eq!(names_of(&out.responses[1]), ["a"]);
}

#[test]
fn changed_cluster_gets_its_endpoints_again() {
    let (mut s, last) = synced_sotw(&base());
    let next = base().to_builder().add(&cluster("a", 2)).build();
    let out = s.on_snapshot(&next);
    assert_eq!(types_of(&out), [CDS, EDS]);
    let (cds, eds) = (&out.responses[0], &out.responses[1]);
    assert_eq!(names_of(cds), ["a"]);
    // Endpoints are unchanged, but Envoy needs them to finish warming the new cluster.
    assert_eq!(names_of(eds), ["a"]);
    assert_eq!(eds.version_info, last[&EDS].version_info);
    // And only once.
    none(&s.on_request(
        &sotw_req(CDS, &[], &cds.version_info, &cds.nonce),
        Some(&next),
    ));
    none(&s.on_request(
        &sotw_req(EDS, &["a"], &eds.version_info, &eds.nonce),
        Some(&next),
    ));
    assert!(s.is_synced(&next));
}

// ---- delta ----

fn delta_req(
    ty: ResourceType,
    subscribe: &[&str],
    unsubscribe: &[&str],
    nonce: &str,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: node(),
        type_url: ty.type_url().into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn d_one(out: Output<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    assert_eq!(out.responses.len(), 1, "expected one response: {out:?}");
    out.responses.into_iter().next().unwrap()
}

fn d_names(resp: &DeltaDiscoveryResponse) -> Vec<&str> {
    resp.resources.iter().map(|r| r.name.as_str()).collect()
}

fn synced_delta(snap: &Snapshot) -> DeltaStream {
    let mut s = DeltaStream::new();
    let cds = d_one(s.on_request(&delta_req(CDS, &[], &[], ""), Some(snap)));
    assert_eq!(d_names(&cds).len(), snap.resources(CDS).len());
    none(&s.on_request(&delta_req(CDS, &[], &[], &cds.nonce), Some(snap)));
    let eds = d_one(s.on_request(&delta_req(EDS, &["a"], &[], ""), Some(snap)));
    none(&s.on_request(&delta_req(EDS, &[], &[], &eds.nonce), Some(snap)));
    let lds = d_one(s.on_request(&delta_req(LDS, &[], &[], ""), Some(snap)));
    none(&s.on_request(&delta_req(LDS, &[], &[], &lds.nonce), Some(snap)));
    let rds = d_one(s.on_request(&delta_req(RDS, &["r"], &[], ""), Some(snap)));
    none(&s.on_request(&delta_req(RDS, &[], &[], &rds.nonce), Some(snap)));
    assert!(s.is_synced(snap));
    s
}

#[test]
fn delta_sends_only_what_changed() {
    let snap = base()
        .to_builder()
        .add(&routes("r2", "two.example"))
        .build();
    let mut s = DeltaStream::new();
    let rds = d_one(s.on_request(&delta_req(RDS, &["r", "r2"], &[], ""), Some(&snap)));
    assert_eq!(d_names(&rds), ["r", "r2"]);
    none(&s.on_request(&delta_req(RDS, &[], &[], &rds.nonce), Some(&snap)));
    let next = snap
        .to_builder()
        .add(&routes("r2", "changed.example"))
        .build();
    let rds = d_one(s.on_snapshot(&next));
    assert_eq!(d_names(&rds), ["r2"]);
    assert!(rds.removed_resources.is_empty());
    assert_eq!(rds.system_version_info, next.version(RDS));
}

#[test]
fn delta_reports_removals() {
    let mut s = synced_delta(&base());
    let mut b = base().to_builder();
    b.remove(LDS, "l");
    let next = b.build();
    let lds = d_one(s.on_snapshot(&next));
    assert!(lds.resources.is_empty());
    assert_eq!(lds.removed_resources, ["l"]);
}

#[test]
fn delta_wildcard_then_explicit_unsubscribe_of_wildcard() {
    let snap = base().to_builder().add(&cluster("b", 1)).build();
    let mut s = DeltaStream::new();
    let cds = d_one(s.on_request(&delta_req(CDS, &["*"], &[], ""), Some(&snap)));
    assert_eq!(d_names(&cds), ["a", "b"]);
    none(&s.on_request(&delta_req(CDS, &[], &[], &cds.nonce), Some(&snap)));
    // Leave the wildcard, keep only "a".
    let out = s.on_request(&delta_req(CDS, &["a"], &["*"], ""), Some(&snap));
    none(&out);
    let next = snap.to_builder().add(&cluster("b", 9)).build();
    none(&s.on_snapshot(&next));
    let next = next.to_builder().add(&cluster("a", 9)).build();
    let cds = d_one(s.on_snapshot(&next));
    assert_eq!(d_names(&cds), ["a"]);
}

#[test]
fn delta_unsubscribe_stops_updates() {
    let snap = base()
        .to_builder()
        .add(&routes("r2", "two.example"))
        .build();
    let mut s = DeltaStream::new();
    let rds = d_one(s.on_request(&delta_req(RDS, &["r", "r2"], &[], ""), Some(&snap)));
    none(&s.on_request(&delta_req(RDS, &[], &["r2"], &rds.nonce), Some(&snap)));
    let next = snap
        .to_builder()
        .add(&routes("r2", "changed.example"))
        .build();
    none(&s.on_snapshot(&next));
    // Subscribing again sends it, even though its version did not change since.
    let rds = d_one(s.on_request(&delta_req(RDS, &["r2"], &[], ""), Some(&next)));
    assert_eq!(d_names(&rds), ["r2"]);
}

#[test]
fn delta_subscription_applies_on_stale_nonce() {
    let snap = base()
        .to_builder()
        .add(&routes("r2", "two.example"))
        .build();
    let mut s = DeltaStream::new();
    let first = d_one(s.on_request(&delta_req(RDS, &["r"], &[], ""), Some(&snap)));
    // Not yet ACKed; a request with an unknown nonce still subscribes to r2.
    let out = s.on_request(&delta_req(RDS, &["r2"], &[], "not-a-nonce"), Some(&snap));
    assert!(matches!(&out.events[..], [StreamEvent::StaleNonce { .. }]));
    none(&out);
    let rds = d_one(s.on_request(&delta_req(RDS, &[], &[], &first.nonce), Some(&snap)));
    assert_eq!(d_names(&rds), ["r2"]);
}

#[test]
fn delta_reconnect_with_initial_versions_sends_only_differences() {
    let snap = base()
        .to_builder()
        .add(&routes("r2", "two.example"))
        .build();
    let mut s = DeltaStream::new();
    let mut req = delta_req(RDS, &["r", "r2", "gone"], &[], "");
    req.initial_resource_versions = HashMap::from([
        ("r".to_string(), snap.get(RDS, "r").unwrap().version.clone()),
        ("r2".to_string(), "old".to_string()),
        ("gone".to_string(), "old".to_string()),
    ]);
    let rds = d_one(s.on_request(&req, Some(&snap)));
    assert_eq!(d_names(&rds), ["r2"]);
    assert_eq!(rds.removed_resources, ["gone"]);
}

#[test]
fn delta_first_request_is_answered_even_when_nothing_differs() {
    let snap = base();
    let mut s = DeltaStream::new();
    let mut req = delta_req(CDS, &[], &[], "");
    req.initial_resource_versions =
        HashMap::from([("a".to_string(), snap.get(CDS, "a").unwrap().version.clone())]);
    // Envoy waits for a first CDS answer before it initialises; an empty one will do.
    let cds = d_one(s.on_request(&req, Some(&snap)));
    assert!(cds.resources.is_empty() && cds.removed_resources.is_empty());
    none(&s.on_request(&delta_req(CDS, &[], &[], &cds.nonce), Some(&snap)));
    // An empty config is answered too.
    let mut s = DeltaStream::new();
    let lds = d_one(s.on_request(&delta_req(LDS, &[], &[], ""), Some(&Snapshot::default())));
    assert!(lds.resources.is_empty());
}

#[test]
fn delta_reports_missing_subscribed_resource_once() {
    let snap = base();
    let mut s = DeltaStream::new();
    let rds = d_one(s.on_request(&delta_req(RDS, &["nope"], &[], ""), Some(&snap)));
    assert!(rds.resources.is_empty());
    assert_eq!(rds.removed_resources, ["nope"]);
    none(&s.on_request(&delta_req(RDS, &[], &[], &rds.nonce), Some(&snap)));
    none(&s.on_snapshot(&snap.to_builder().add(&cluster("zz", 1)).build()));
    // When it appears, it is sent.
    let next = snap.to_builder().add(&routes("nope", "x.example")).build();
    let rds = d_one(s.on_snapshot(&next));
    assert_eq!(d_names(&rds), ["nope"]);
}

#[test]
fn delta_nack_is_not_resent_but_the_fix_is() {
    let snap = base().to_builder().add(&listener("l2")).build();
    let mut s = DeltaStream::new();
    let lds = d_one(s.on_request(&delta_req(LDS, &[], &[], ""), Some(&snap)));
    none(&s.on_request(&delta_req(LDS, &[], &[], &lds.nonce), Some(&snap)));
    // One response carries a good change (l2) and a bad one (l).
    let bad = snap
        .to_builder()
        .add(&Listener {
            name: "l".into(),
            stat_prefix: "bad".into(),
            ..Default::default()
        })
        .add(&Listener {
            name: "l2".into(),
            stat_prefix: "good".into(),
            ..Default::default()
        })
        .build();
    let lds = d_one(s.on_snapshot(&bad));
    assert_eq!(d_names(&lds), ["l", "l2"]);
    let mut req = delta_req(LDS, &[], &[], &lds.nonce);
    req.error_detail = Some(Status {
        code: 3,
        message: "listener l: bad".into(),
        ..Default::default()
    });
    let out = s.on_request(&req, Some(&bad));
    none(&out);
    assert!(matches!(
        &out.events[..],
        [StreamEvent::Nack { ty: LDS, .. }]
    ));
    // Republishing the same content sends nothing.
    none(&s.on_snapshot(&bad.to_builder().add(&cluster("other", 1)).build()));
    // Fixing l resends it, together with l2 from the rejected response.
    let fixed = bad
        .to_builder()
        .add(&Listener {
            name: "l".into(),
            stat_prefix: "fixed".into(),
            ..Default::default()
        })
        .build();
    let lds = d_one(s.on_snapshot(&fixed));
    assert_eq!(d_names(&lds), ["l", "l2"]);
    none(&s.on_request(&delta_req(LDS, &[], &[], &lds.nonce), Some(&fixed)));
    assert!(s.is_synced(&fixed));
}

#[test]
fn delta_removed_cluster_waits_for_routes() {
    let with_b = base()
        .to_builder()
        .add(&cluster("b", 1))
        .add(&routes("r", "uses-b.example"))
        .build();
    let mut s = synced_delta(&with_b);
    let rds = d_one(s.on_snapshot(&base()));
    assert_eq!(rds.type_url, RDS.type_url());
    let cds = d_one(s.on_request(&delta_req(RDS, &[], &[], &rds.nonce), Some(&base())));
    assert_eq!(cds.type_url, CDS.type_url());
    assert_eq!(cds.removed_resources, ["b"]);
}

#[test]
fn unknown_type_is_reported_and_ignored() {
    let mut s = DeltaStream::new();
    let mut req = delta_req(CDS, &[], &[], "");
    req.type_url = "type.googleapis.com/envoy.config.route.v3.VirtualHost".into();
    let out = s.on_request(&req, Some(&base()));
    none(&out);
    assert!(matches!(&out.events[..], [StreamEvent::UnknownType { .. }]));
}

#[test]
fn delta_sends_a_large_change_in_parts_before_routes() {
    let mut b = base().to_builder();
    for i in 0..(MAX_DELTA_RESOURCES + 10) {
        b.insert(&cluster(&format!("c{i:05}"), 1));
    }
    let snap = b.build();
    let mut s = DeltaStream::new();
    let cds = d_one(s.on_request(&delta_req(CDS, &[], &[], ""), Some(&snap)));
    assert_eq!(cds.resources.len(), MAX_DELTA_RESOURCES);
    // Listeners wait while clusters are still going out.
    none(&s.on_request(&delta_req(LDS, &[], &[], ""), Some(&snap)));
    let rest = d_one(s.on_request(&delta_req(CDS, &[], &[], &cds.nonce), Some(&snap)));
    assert_eq!(rest.type_url, CDS.type_url());
    assert_eq!(rest.resources.len(), 11);
    let eds = d_one(s.on_request(&delta_req(EDS, &["a"], &[], ""), Some(&snap)));
    none(&s.on_request(&delta_req(CDS, &[], &[], &rest.nonce), Some(&snap)));
    let lds = d_one(s.on_request(&delta_req(EDS, &[], &[], &eds.nonce), Some(&snap)));
    assert_eq!(lds.type_url, LDS.type_url());
}

// ---- activators: Knarr's own resource type on the same ADS stream ----

fn activator_revision(name: &str, port: u32) -> Arc<knarr_snapshot::Resource> {
    let revision = knarr_proto::activator::Revision {
        namespace: "default".into(),
        name: name.into(),
        endpoints: vec![knarr_proto::activator::Endpoint {
            address: "127.0.0.1".into(),
            port,
        }],
        ..Default::default()
    };
    knarr_snapshot::Resource::named(format!("default/{name}"), &revision)
}

fn with_activator_revisions(snap: &Snapshot, revisions: &[(&str, u32)]) -> Snapshot {
    let mut b = snap.to_builder();
    for (name, port) in revisions {
        b.insert_resource(
            ResourceType::ActivatorRevision,
            activator_revision(name, *port),
        );
    }
    b.build()
}

#[test]
fn activator_revisions_reach_activators_and_never_envoy() {
    let snap = with_activator_revisions(&base(), &[("a-00001", 9001)]);
    // An Envoy subscribes to its own types only: it is synced without ever hearing of them.
    let envoy = synced_delta(&snap);
    assert!(envoy.is_synced(&snap));

    let mut activator = DeltaStream::new();
    let ty = ResourceType::ActivatorRevision;
    let first = d_one(activator.on_request(&delta_req(ty, &["*"], &[], ""), Some(&snap)));
    assert_eq!(first.type_url, knarr_proto::activator::REVISION_TYPE_URL);
    assert_eq!(d_names(&first), ["default/a-00001"]);
    none(&activator.on_request(&delta_req(ty, &[], &[], &first.nonce), Some(&snap)));

    // A pod becomes ready: only that revision goes out again.
    let next = with_activator_revisions(&snap, &[("a-00001", 9002), ("b-00001", 9003)]);
    let update = d_one(activator.on_snapshot(&next));
    assert_eq!(d_names(&update), ["default/a-00001", "default/b-00001"]);
    none(&activator.on_request(&delta_req(ty, &[], &[], &update.nonce), Some(&next)));
    let mut b = next.to_builder();
    b.remove(ty, "default/b-00001");
    let removed = d_one(activator.on_snapshot(&b.build()));
    assert_eq!(removed.removed_resources, ["default/b-00001"]);
}

#[test]
fn a_reconnecting_activator_hears_only_of_changes_and_removals() {
    let snap = with_activator_revisions(&base(), &[("a-00001", 9001), ("c-00001", 9005)]);
    let ty = ResourceType::ActivatorRevision;
    let mut s = DeltaStream::new();
    let mut req = delta_req(ty, &["*"], &[], "");
    req.initial_resource_versions = HashMap::from([
        (
            "default/a-00001".to_string(),
            snap.get(ty, "default/a-00001").unwrap().version.clone(),
        ),
        ("default/gone-00001".to_string(), "old".to_string()),
    ]);
    let resp = d_one(s.on_request(&req, Some(&snap)));
    assert_eq!(d_names(&resp), ["default/c-00001"]);
    assert_eq!(resp.removed_resources, ["default/gone-00001"]);
}
