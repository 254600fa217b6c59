//! The xDS server against the real Envoy, over state-of-the-world and delta ADS.
//!
//! Every test runs twice, once per ADS variant. Envoy, the control plane and the upstreams all
//! bind port 0; every wait is on a readiness signal (Envoy's admin API, the control plane's
//! record of ACKs, or the traffic itself), never a fixed sleep.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use knarr::bootstrap::{self, BootstrapOptions};
use knarr::{ControlPlane, ServeConfig};
use knarr_tests::{poll_until, Envoy, HttpClient, Upstream};
use knarr_translate::{Backend, Endpoint, Gateway, Route, RouteLayout, Split, VirtualHost};
use knarr_xds::{NodeGrouping, ResourceType, Snapshot, SnapshotCache, DEFAULT_GROUP};

const WAIT: Duration = Duration::from_secs(30);
const HOST: &str = "app.example";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ads {
    Sotw,
    Delta,
}

fn gateway(name: &str, layout: RouteLayout, hosts: Vec<VirtualHost>) -> Gateway {
    Gateway {
        name: name.into(),
        address: "127.0.0.1".parse().unwrap(),
        port: 0,
        virtual_hosts: hosts,
        layout,
    }
}

fn host(name: &str, splits: &[(&str, u32)]) -> VirtualHost {
    VirtualHost {
        name: name.replace('.', "-"),
        domains: vec![name.into(), format!("{name}:*")],
        routes: vec![Route {
            path_prefix: "/".into(),
            splits: splits
                .iter()
                .map(|(backend, weight)| Split {
                    backend: (*backend).into(),
                    weight: *weight,
                    set_headers: vec![("knative-serving-revision".into(), (*backend).into())],
                })
                .collect(),
            ..Default::default()
        }],
    }
}

fn backend(up: &Upstream) -> Backend {
    Backend {
        name: up.name().into(),
        http2: false,
        endpoints: vec![Endpoint {
            address: up.addr().ip(),
            port: up.port(),
        }],
    }
}

/// A snapshot with gateway `gw` routing `HOST` by `splits` over `upstreams`.
fn snapshot(layout: RouteLayout, splits: &[(&str, u32)], upstreams: &[&Upstream]) -> Snapshot {
    let backends: Vec<Backend> = upstreams.iter().map(|u| backend(u)).collect();
    knarr_translate::snapshot(
        &[gateway("gw", layout, vec![host(HOST, splits)])],
        &backends,
    )
}

struct Setup {
    cache: Arc<SnapshotCache>,
    cp: Option<ControlPlane>,
    ads: Ads,
}

impl Setup {
    async fn start(ads: Ads) -> Setup {
        knarr_tests::trace_init();
        let cache = Arc::new(SnapshotCache::new(NodeGrouping::NodeId));
        let cp = start_control_plane(cache.clone(), "127.0.0.1:0".parse().unwrap()).await;
        Setup {
            cache,
            cp: Some(cp),
            ads,
        }
    }

    fn cp(&self) -> &ControlPlane {
        self.cp.as_ref().expect("control plane running")
    }

    async fn envoy(&self, node_id: &str) -> Envoy {
        let yaml = bootstrap::render(&BootstrapOptions {
            xds_addr: self.cp().xds_addr.to_string(),
            delta: self.ads == Ads::Delta,
            node_id: node_id.into(),
            node_cluster: "test".into(),
            admin_port: 0,
            ..Default::default()
        })
        .unwrap();
        let envoy = Envoy::start(&yaml).await.expect("Envoy starts");
        envoy.wait_ready(WAIT).await.expect("Envoy becomes ready");
        envoy
    }

    /// Publishes for the default group and waits until `node_id` holds all of it, ACKed.
    async fn publish(&self, node_id: &str, snap: Snapshot) {
        let generation = self.cache.set(DEFAULT_GROUP, snap).generation();
        self.wait_synced(node_id, generation).await;
    }

    async fn wait_synced(&self, node_id: &str, generation: u64) {
        let clients = self.cp().clients.clone();
        tokio::time::timeout(
            WAIT,
            clients.wait_for(|cs| {
                cs.iter()
                    .any(|c| c.node_id == node_id && c.synced_generation >= Some(generation))
            }),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{node_id} did not ACK generation {generation}: {:?}",
                self.cp().clients.list()
            )
        });
    }
}

async fn start_control_plane(cache: Arc<SnapshotCache>, xds_addr: SocketAddr) -> ControlPlane {
    let config = ServeConfig {
        xds_addr,
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    ControlPlane::start_with_cache(config, cache)
        .await
        .expect("control plane starts")
}

async fn gateway_client(envoy: &Envoy, listener: &str) -> HttpClient {
    let port = envoy
        .wait_listener_port(listener, WAIT)
        .await
        .expect("listener is bound");
    HttpClient::new(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Polls until a request for `HOST` is answered by `upstream`.
async fn wait_served_by(client: &HttpClient, upstream: &str) {
    let client = client.clone();
    let want = upstream.to_owned();
    poll_until(&format!("{HOST} served by {upstream}"), WAIT, move || {
        let client = client.clone();
        let want = want.clone();
        async move {
            matches!(client.get(HOST, "/").await, Ok(r) if r.status == 200 && r.body == want)
        }
    })
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------------------

async fn first_config_is_served(ads: Ads) {
    let s = Setup::start(ads).await;
    let blue = Upstream::start("blue").await.unwrap();
    s.cache.set_default(snapshot(
        RouteLayout::ScopedByHost,
        &[("blue", 100)],
        &[&blue],
    ));
    let envoy = s.envoy("gw-1").await;
    let client = gateway_client(&envoy, "gw").await;

    let reply = client.get(HOST, "/").await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "blue");
    // The split's header reached the backend.
    assert_eq!(
        reply.header("x-echo-knative-serving-revision"),
        Some("blue")
    );
    // The host with a port is the same site; an unknown host is not.
    assert_eq!(
        client.get(&format!("{HOST}:8080"), "/").await.unwrap().body,
        "blue"
    );
    assert_eq!(
        client.get("unknown.example", "/").await.unwrap().status,
        404
    );
    assert!(blue.requests() >= 2);
}

#[tokio::test]
async fn sotw_first_config_is_served() {
    first_config_is_served(Ads::Sotw).await;
}

#[tokio::test]
async fn delta_first_config_is_served() {
    first_config_is_served(Ads::Delta).await;
}

async fn weight_changes_take_effect(ads: Ads, layout: RouteLayout) {
    let s = Setup::start(ads).await;
    let blue = Upstream::start("blue").await.unwrap();
    let green = Upstream::start("green").await.unwrap();
    let ups = [&blue, &green];
    s.cache
        .set_default(snapshot(layout, &[("blue", 100), ("green", 0)], &ups));
    let envoy = s.envoy("gw-1").await;
    let client = gateway_client(&envoy, "gw").await;
    assert_eq!(client.get(HOST, "/").await.unwrap().body, "blue");

    // All traffic to green.
    s.publish(
        "gw-1",
        snapshot(layout, &[("blue", 0), ("green", 100)], &ups),
    )
    .await;
    wait_served_by(&client, "green").await;
    for _ in 0..20 {
        assert_eq!(client.get(HOST, "/").await.unwrap().body, "green");
    }

    // An even split: both get a fair share of 400 requests.
    s.publish(
        "gw-1",
        snapshot(layout, &[("blue", 50), ("green", 50)], &ups),
    )
    .await;
    wait_served_by(&client, "blue").await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..400 {
        let r = client.get(HOST, "/").await.unwrap();
        assert_eq!(r.status, 200);
        *seen.entry(r.body).or_default() += 1;
    }
    assert!(seen["blue"] > 120 && seen["green"] > 120, "{seen:?}");
}

#[tokio::test]
async fn sotw_weight_changes_take_effect() {
    weight_changes_take_effect(Ads::Sotw, RouteLayout::ScopedByHost).await;
}

#[tokio::test]
async fn delta_weight_changes_take_effect() {
    weight_changes_take_effect(Ads::Delta, RouteLayout::ScopedByHost).await;
}

#[tokio::test]
async fn sotw_weight_changes_take_effect_single_route_table() {
    weight_changes_take_effect(Ads::Sotw, RouteLayout::Single).await;
}

#[tokio::test]
async fn delta_weight_changes_take_effect_single_route_table() {
    weight_changes_take_effect(Ads::Delta, RouteLayout::Single).await;
}

async fn removed_listener_and_cluster_disappear(ads: Ads) {
    let s = Setup::start(ads).await;
    let blue = Upstream::start("blue").await.unwrap();
    let extra = Upstream::start("extra").await.unwrap();
    let two_gateways = knarr_translate::snapshot(
        &[
            gateway(
                "gw",
                RouteLayout::ScopedByHost,
                vec![host(HOST, &[("blue", 100)])],
            ),
            gateway(
                "gw2",
                RouteLayout::Single,
                vec![host("extra.example", &[("extra", 100)])],
            ),
        ],
        &[backend(&blue), backend(&extra)],
    );
    s.cache.set_default(two_gateways);
    let envoy = s.envoy("gw-1").await;
    let client2 = gateway_client(&envoy, "gw2").await;
    assert_eq!(
        client2.get("extra.example", "/").await.unwrap().body,
        "extra"
    );
    assert!(envoy
        .cluster_names()
        .await
        .unwrap()
        .contains(&"extra".to_string()));

    s.publish(
        "gw-1",
        snapshot(RouteLayout::ScopedByHost, &[("blue", 100)], &[&blue]),
    )
    .await;
    envoy
        .wait_until("gw2 and extra removed", WAIT, || async {
            let listeners = envoy.listener_names().await.unwrap_or_default();
            let clusters = envoy.cluster_names().await.unwrap_or_default();
            !listeners.iter().any(|l| l == "gw2") && !clusters.iter().any(|c| c == "extra")
        })
        .await
        .unwrap();
    assert!(envoy
        .listener_names()
        .await
        .unwrap()
        .contains(&"gw".to_string()));
    assert!(envoy
        .cluster_names()
        .await
        .unwrap()
        .contains(&"blue".to_string()));
    let client = gateway_client(&envoy, "gw").await;
    assert_eq!(client.get(HOST, "/").await.unwrap().body, "blue");
}

#[tokio::test]
async fn sotw_removed_listener_and_cluster_disappear() {
    removed_listener_and_cluster_disappear(Ads::Sotw).await;
}

#[tokio::test]
async fn delta_removed_listener_and_cluster_disappear() {
    removed_listener_and_cluster_disappear(Ads::Delta).await;
}

/// A host whose route table Envoy rejects: two virtual hosts both claiming `*`.
fn rejected_snapshot(good: &Snapshot, green: &Upstream) -> Snapshot {
    let gw = gateway(
        "gw",
        RouteLayout::ScopedByHost,
        vec![host(HOST, &[("green", 100)])],
    );
    let mut vh = host(HOST, &[("green", 100)]);
    vh.domains = vec!["*".into()];
    let mut dup = vh.clone();
    dup.name = "duplicate".into();
    let bad = knarr_translate::route_configuration(
        &gw.host_route_config_name(&gw.virtual_hosts[0]),
        &[vh, dup],
    );
    let mut b = good.to_builder();
    b.insert(&knarr_translate::cluster(&backend(green)));
    b.insert(&knarr_translate::load_assignment(
        "green",
        &backend(green).endpoints,
    ));
    b.insert(&bad);
    b.build()
}

async fn rejected_config_keeps_traffic_and_is_sent_once(ads: Ads) {
    let s = Setup::start(ads).await;
    let blue = Upstream::start("blue").await.unwrap();
    let green = Upstream::start("green").await.unwrap();
    let good = snapshot(RouteLayout::ScopedByHost, &[("blue", 100)], &[&blue]);
    s.cache.set_default(good.clone());
    let envoy = s.envoy("gw-1").await;
    let client = gateway_client(&envoy, "gw").await;
    assert_eq!(client.get(HOST, "/").await.unwrap().body, "blue");

    let metrics = s.cp().metrics.clone();
    let rds_before = metrics.responses_total(ResourceType::Route);
    let bad = rejected_snapshot(&good, &green);
    s.cache.set_default(bad.clone());
    let clients = s.cp().clients.clone();
    tokio::time::timeout(
        WAIT,
        clients.wait_for(|cs| {
            cs.iter()
                .any(|c| c.rejected.contains_key(&ResourceType::Route))
        }),
    )
    .await
    .expect("Envoy rejects the bad route table");
    let status = &clients.list()[0];
    let error = &status.rejected[&ResourceType::Route];
    assert!(
        error.contains("wildcard") || error.contains("domain"),
        "{error}"
    );
    assert_eq!(metrics.nack_total(), 1);
    let rds_after_nack = metrics.responses_total(ResourceType::Route);
    assert_eq!(rds_after_nack, rds_before + 1);

    // Envoy keeps serving the last good config.
    for _ in 0..20 {
        let r = client.get(HOST, "/").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "blue"));
    }

    // An unrelated change goes out and is ACKed; the rejected table is not sent again.
    let third = Upstream::start("third").await.unwrap();
    let mut b = bad.to_builder();
    b.insert(&knarr_translate::cluster(&backend(&third)));
    let with_third = b.build();
    let cds_acked_before = clients.list()[0].acked.get(&ResourceType::Cluster).cloned();
    s.cache.set_default(with_third);
    tokio::time::timeout(
        WAIT,
        clients.wait_for(|cs| cs[0].acked.get(&ResourceType::Cluster) != cds_acked_before.as_ref()),
    )
    .await
    .expect("Envoy ACKs the cluster change");
    envoy
        .wait_until("cluster third arrives", WAIT, || async {
            envoy
                .cluster_names()
                .await
                .unwrap_or_default()
                .contains(&"third".to_string())
        })
        .await
        .unwrap();
    assert_eq!(metrics.responses_total(ResourceType::Route), rds_after_nack);
    assert_eq!(metrics.nack_total(), 1);
    assert_eq!(client.get(HOST, "/").await.unwrap().body, "blue");

    // The next good config goes out and is served.
    let fixed = snapshot(
        RouteLayout::ScopedByHost,
        &[("green", 100)],
        &[&blue, &green],
    );
    s.publish("gw-1", fixed).await;
    wait_served_by(&client, "green").await;
    assert_eq!(metrics.nack_total(), 1);
    assert!(s.cp().clients.list()[0].rejected.is_empty());
}

#[tokio::test]
async fn sotw_rejected_config_keeps_traffic_and_is_sent_once() {
    rejected_config_keeps_traffic_and_is_sent_once(Ads::Sotw).await;
}

#[tokio::test]
async fn delta_rejected_config_keeps_traffic_and_is_sent_once() {
    rejected_config_keeps_traffic_and_is_sent_once(Ads::Delta).await;
}

async fn control_plane_restart_under_traffic(ads: Ads) {
    let mut s = Setup::start(ads).await;
    let blue = Upstream::start("blue").await.unwrap();
    let green = Upstream::start("green").await.unwrap();
    s.cache.set_default(snapshot(
        RouteLayout::ScopedByHost,
        &[("blue", 100)],
        &[&blue, &green],
    ));
    let envoy = s.envoy("gw-1").await;
    let client = gateway_client(&envoy, "gw").await;
    envoy
        .wait_until("connected to the control plane", WAIT, || async {
            envoy.stat("control_plane.connected_state").await == Some(1)
        })
        .await
        .unwrap();

    // Continuous traffic, counting every answer.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let load = {
        let (client, stop, ok, failed) = (client.clone(), stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match client.get(HOST, "/").await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        failures.push(format!("{other:?}"));
                    }
                }
            }
            failures
        })
    };
    let ok_at = |n: u64| {
        let ok = ok.clone();
        move || {
            let ok = ok.clone();
            async move { ok.load(Ordering::Relaxed) >= n }
        }
    };
    poll_until("traffic flowing", WAIT, ok_at(50))
        .await
        .unwrap();

    // Kill the control plane: every connection drops mid-stream.
    let xds_addr = s.cp().xds_addr;
    s.cp.take().unwrap().abort().await;
    envoy
        .wait_until("Envoy notices the control plane is gone", WAIT, || async {
            envoy.stat("control_plane.connected_state").await == Some(0)
        })
        .await
        .unwrap();
    let served_before = ok.load(Ordering::Relaxed);
    poll_until(
        "traffic while the control plane is down",
        WAIT,
        ok_at(served_before + 100),
    )
    .await
    .unwrap();

    // Restart on the same address with a changed config.
    let cache = Arc::new(SnapshotCache::new(NodeGrouping::NodeId));
    cache.set_default(snapshot(
        RouteLayout::ScopedByHost,
        &[("green", 100)],
        &[&blue, &green],
    ));
    s.cp = Some(start_control_plane(cache.clone(), xds_addr).await);
    s.cache = cache;
    envoy
        .wait_until("Envoy reconnects", WAIT, || async {
            envoy.stat("control_plane.connected_state").await == Some(1)
        })
        .await
        .unwrap();
    wait_served_by(&client, "green").await;
    let served = ok.load(Ordering::Relaxed);
    poll_until("traffic after reconnecting", WAIT, ok_at(served + 50))
        .await
        .unwrap();

    stop.store(true, Ordering::Relaxed);
    let failures = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok.load(Ordering::Relaxed) > 200);
    if ads == Ads::Delta {
        // On reconnect Envoy reports what it holds; unchanged clusters are not resent.
        let metrics = &s.cp().metrics;
        assert_eq!(metrics.nack_total(), 0);
    }
}

#[tokio::test]
async fn sotw_control_plane_restart_under_traffic() {
    control_plane_restart_under_traffic(Ads::Sotw).await;
}

#[tokio::test]
async fn delta_control_plane_restart_under_traffic() {
    control_plane_restart_under_traffic(Ads::Delta).await;
}

async fn envoys_get_their_own_config(ads: Ads) {
    let s = Setup::start(ads).await;
    let blue = Upstream::start("blue").await.unwrap();
    let green = Upstream::start("green").await.unwrap();
    s.cache.set(
        "envoy-a",
        snapshot(RouteLayout::ScopedByHost, &[("blue", 100)], &[&blue]),
    );
    s.cache.set(
        "envoy-b",
        snapshot(RouteLayout::Single, &[("green", 100)], &[&green]),
    );
    let a = s.envoy("envoy-a").await;
    let b = s.envoy("envoy-b").await;
    let client_a = gateway_client(&a, "gw").await;
    let client_b = gateway_client(&b, "gw").await;
    assert_eq!(client_a.get(HOST, "/").await.unwrap().body, "blue");
    assert_eq!(client_b.get(HOST, "/").await.unwrap().body, "green");
    assert!(!a
        .cluster_names()
        .await
        .unwrap()
        .contains(&"green".to_string()));
    assert!(!b
        .cluster_names()
        .await
        .unwrap()
        .contains(&"blue".to_string()));

    // Changing one group leaves the other alone.
    let generation = s
        .cache
        .set(
            "envoy-b",
            snapshot(RouteLayout::Single, &[("blue", 100)], &[&blue]),
        )
        .generation();
    s.wait_synced("envoy-b", generation).await;
    wait_served_by(&client_b, "blue").await;
    assert_eq!(client_a.get(HOST, "/").await.unwrap().body, "blue");
    let names: Vec<String> = s
        .cp()
        .clients
        .list()
        .into_iter()
        .map(|c| c.node_id)
        .collect();
    assert_eq!(names, ["envoy-a", "envoy-b"]);
}

#[tokio::test]
async fn sotw_envoys_get_their_own_config() {
    envoys_get_their_own_config(Ads::Sotw).await;
}

#[tokio::test]
async fn delta_envoys_get_their_own_config() {
    envoys_get_their_own_config(Ads::Delta).await;
}
