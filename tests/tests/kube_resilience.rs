//! Knarr on a real API server when things break: the leading replica dies, the API server
//! restarts, etcd is wiped. Traffic through Envoy must not notice, and Knarr must converge on
//! its own (no restart of Knarr).

use std::time::{Duration, Instant, SystemTime};

use knarr_tests::kube_fixture::{exposed_yaml, Backend, KubeWorld, Replica, WAIT};
use knarr_tests::{poll_until, LoadGenerator, LoadSummary};
use serde_json::Value;

/// The fixture's lease duration (`Replica::start`).
const LEASE: Duration = Duration::from_secs(3);
/// What a takeover may take beyond the lease: the survivor's forced release and random wait
/// (up to 1 s), its Envoy's ACK and the hash probe, the status write — on a loaded 2-core box.
const TAKEOVER_MARGIN: Duration = Duration::from_secs(10);

const LEASE_NAMESPACE: &str = "knarr-system";
const LEASE_NAME: &str = "knarr-controller.ingress";

/// The Lease the replicas compete for, as `kubectl get lease -o json` prints it.
async fn lease(world: &KubeWorld) -> Value {
    let out = world
        .api
        .kubectl(&[
            "get",
            "lease",
            "-n",
            LEASE_NAMESPACE,
            LEASE_NAME,
            "-o",
            "json",
        ])
        .await
        .unwrap();
    serde_json::from_str(&out).unwrap()
}

/// The Lease fetched straight from the API server (`None`: not found); quicker than kubectl,
/// for watching it change.
async fn lease_now(world: &KubeWorld) -> Option<Value> {
    let reply = world
        .api
        .get(&format!(
            "/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{LEASE_NAME}"
        ))
        .await
        .unwrap();
    match reply.status {
        200 => Some(serde_json::from_str(&reply.body).unwrap()),
        404 => None,
        s => panic!("GET lease: {s} {}", reply.body),
    }
}

fn holder(lease: &Value) -> Option<&str> {
    lease["spec"]["holderIdentity"].as_str()
}

/// When the Lease's holder stops owning it: `renewTime` + `leaseDurationSeconds`.
fn expiry(lease: &Value) -> SystemTime {
    let renew = parse_time(lease["spec"]["renewTime"].as_str().expect("renewTime"));
    let secs = lease["spec"]["leaseDurationSeconds"]
        .as_u64()
        .expect("leaseDurationSeconds");
    renew + Duration::from_secs(secs)
}

/// An RFC 3339 UTC time as Kubernetes writes it (`2026-01-02T03:04:05.123456Z`).
fn parse_time(s: &str) -> SystemTime {
    let bad = || -> ! { panic!("not a UTC timestamp: {s}") };
    let rest = s.strip_suffix('Z').unwrap_or_else(|| bad());
    let (date, time) = rest.split_once('T').unwrap_or_else(|| bad());
    let num = |x: &str| x.parse::<i64>().unwrap_or_else(|_| bad());
    let d: Vec<i64> = date.split('-').map(num).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let t: Vec<i64> = hms.split(':').map(num).collect();
    assert!(d.len() == 3 && t.len() == 3, "not a timestamp: {s}");
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let (y, m, day) = (d[0] - i64::from(d[1] <= 2), d[1], d[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2];
    let nanos = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}")[..9]
            .parse::<u64>()
            .unwrap_or_else(|_| bad())
    };
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_nanos(nanos)
}

/// Waits until `load` has completed `n` more requests than it had.
async fn more_requests(load: &LoadGenerator, n: u64) {
    let from = load.completed();
    poll_until("the load to make progress", WAIT, || async {
        load.completed() >= from + n
    })
    .await
    .unwrap();
}

/// Every request answered 200, and some were sent after `t`.
fn all_ok_through(summary: &LoadSummary, t: Instant, what: &str) {
    summary
        .ensure_all_ok()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let after = summary.started_after(t).count();
    assert!(
        after > 0,
        "{what}: no request was sent after the event ({} in all)",
        summary.total()
    );
}

/// Two replicas, each with its Envoy; the leader's control plane dies as in a crash. The Lease
/// stays the dead leader's until it expires, then the survivor takes it and writes the status of
/// a KIngress made after the crash; its Envoy serves it; the dead replica's Envoy keeps serving
/// its last config; no request through either Envoy fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_surviving_replica_takes_over_when_the_leader_dies() {
    const STEADY: &str = "steady.default.example.com";
    const FRESH: &str = "fresh.default.example.com";
    let world = KubeWorld::start().await.unwrap();
    let a = Replica::start(&world, "replica-a").await.unwrap();
    let b = Replica::start(&world, "replica-b").await.unwrap();
    let backend = Backend::start("steady").await.unwrap();
    world
        .apply(&exposed_yaml("steady", backend.addr(), STEADY))
        .await
        .unwrap();
    a.wait_200(STEADY).await.unwrap();
    b.wait_200(STEADY).await.unwrap();
    world.wait_ready_status("steady", "True").await.unwrap();

    // Exactly one leads, and the Lease names it.
    poll_until("exactly one replica to lead", WAIT, || async {
        a.leading() != b.leading()
    })
    .await
    .unwrap();
    let (mut dead, survivor) = if a.leading() { (a, b) } else { (b, a) };
    let before = lease(&world).await;
    assert_eq!(holder(&before), Some(dead.identity.as_str()), "{before}");
    assert!(!survivor.leading());

    let dead_load = LoadGenerator::start(dead.external.clone(), STEADY, "/", 2);
    let survivor_load = LoadGenerator::start(survivor.external.clone(), STEADY, "/", 2);
    more_requests(&dead_load, 20).await;
    more_requests(&survivor_load, 20).await;

    // A crash: no release, the Lease is left to expire; the dead replica's Envoy keeps its
    // last config.
    dead.cp.take().unwrap().abort().await;
    let killed = Instant::now();
    let killed_wall = SystemTime::now();
    world
        .apply(&exposed_yaml("fresh", backend.addr(), FRESH))
        .await
        .unwrap();

    // The Lease: still the dead replica's until it expires, then the survivor's.
    let mut last_dead: Option<Value> = None;
    let deadline = killed + LEASE + TAKEOVER_MARGIN;
    loop {
        let lease = lease_now(&world).await.expect("the Lease exists");
        let seen = SystemTime::now();
        if holder(&lease) == Some(dead.identity.as_str()) {
            assert!(
                parse_time(lease["spec"]["renewTime"].as_str().unwrap()) <= killed_wall,
                "the dead replica renewed its Lease after it was killed: {lease}"
            );
            last_dead = Some(lease.clone());
        } else {
            // Taken (or force-released by the survivor) only once it expired.
            let expired = expiry(last_dead.as_ref().unwrap_or(&before));
            assert!(
                seen >= expired,
                "the Lease changed hands {:?} before the dead leader's expired (a crash \
                 must not release it): {lease}",
                expired.duration_since(seen).unwrap_or_default()
            );
            if holder(&lease) == Some(survivor.identity.as_str()) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the survivor did not take the Lease within {:?}: {lease}",
            LEASE + TAKEOVER_MARGIN
        );
        tokio::time::sleep(knarr_tests::POLL_INTERVAL).await;
    }
    let took_lease = killed.elapsed();

    // The survivor writes the new KIngress's status, and its Envoy serves the new host.
    let object = world.wait_ready_status("fresh", "True").await.unwrap();
    let ready = killed.elapsed();
    assert!(
        ready < LEASE + TAKEOVER_MARGIN,
        "fresh was Ready only {ready:?} after the leader died: {object}"
    );
    assert_eq!(object["status"]["observedGeneration"], 1, "{object}");
    assert!(survivor.leading(), "the survivor says it leads");
    survivor.wait_200(FRESH).await.unwrap();
    let after = lease(&world).await;
    assert_eq!(holder(&after), Some(survivor.identity.as_str()), "{after}");

    // The dead replica's Envoy: the old config, nothing new.
    let r = dead.external.get(FRESH, "/").await.unwrap();
    assert_eq!(
        r.status, 404,
        "the dead replica's Envoy learnt of fresh: {r:?}"
    );
    more_requests(&dead_load, 20).await;
    more_requests(&survivor_load, 20).await;
    let dead_summary = dead_load.stop().await;
    let survivor_summary = survivor_load.stop().await;
    all_ok_through(&survivor_summary, killed, "the survivor's Envoy");
    all_ok_through(&dead_summary, killed, "the dead replica's Envoy");
    eprintln!(
        "takeover: Lease after {took_lease:?}, fresh Ready after {ready:?}; requests: \
         survivor {}, dead {}",
        survivor_summary.total(),
        dead_summary.total()
    );
}

/// kube-apiserver killed and started again on the same etcd, under load: no request fails, and
/// without restarting Knarr a KIngress made afterwards is served and Ready, one deleted
/// afterwards 404s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knarr_follows_the_api_server_through_a_restart() {
    const STEADY: &str = "steady.default.example.com";
    const DOOMED: &str = "doomed.default.example.com";
    const FRESH: &str = "fresh.default.example.com";
    let mut world = KubeWorld::start().await.unwrap();
    let replica = Replica::start(&world, "replica-a").await.unwrap();
    let backend = Backend::start("steady").await.unwrap();
    for (name, host) in [("steady", STEADY), ("doomed", DOOMED)] {
        world
            .apply(&exposed_yaml(name, backend.addr(), host))
            .await
            .unwrap();
        replica.wait_200(host).await.unwrap();
        world.wait_ready_status(name, "True").await.unwrap();
    }
    let load = LoadGenerator::start(replica.external.clone(), STEADY, "/", 2);
    more_requests(&load, 20).await;

    let down = Instant::now();
    world.api.restart_apiserver().await.unwrap();
    let up = Instant::now();
    more_requests(&load, 20).await;

    // Knarr's watches come back by themselves: a new KIngress is served and Ready, a deleted
    // one 404s.
    world
        .apply(&exposed_yaml("fresh", backend.addr(), FRESH))
        .await
        .unwrap();
    world
        .api
        .kubectl(&["delete", "kingress", "doomed", "-n", "default"])
        .await
        .unwrap();
    replica.wait_200(FRESH).await.unwrap();
    let object = world.wait_ready_status("fresh", "True").await.unwrap();
    assert_eq!(object["status"]["observedGeneration"], 1, "{object}");
    replica.wait_status(DOOMED, 404).await.unwrap();
    let converged = up.elapsed();

    let summary = load.stop().await;
    all_ok_through(&summary, down, "requests through the API server's restart");
    assert!(
        summary
            .requests
            .iter()
            .any(|r| r.started >= down && r.finished <= up),
        "no request ran while the API server was down"
    );
    assert!(replica.leading(), "the only replica still leads");
    let lease = lease(&world).await;
    assert_eq!(holder(&lease), Some(replica.identity.as_str()), "{lease}");
    eprintln!(
        "restart: API server down for {:?}, converged {converged:?} after; {} requests",
        up - down,
        summary.total()
    );
}

/// etcd wiped under a running Knarr, the platform installed again and only some objects made
/// again: Knarr serves exactly those (the one not recreated 404s), writes their statuses, makes
/// the Lease again and holds it, and rewrites a stale status left behind its back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knarr_converges_after_etcd_is_wiped_and_objects_recreated() {
    const A: &str = "a.default.example.com";
    const B: &str = "b.default.example.com";
    const C: &str = "c.default.example.com";
    let mut world = KubeWorld::start().await.unwrap();
    let replica = Replica::start(&world, "replica-a").await.unwrap();
    let backend = Backend::start("backend").await.unwrap();
    for (name, host) in [("a", A), ("b", B)] {
        world
            .apply(&exposed_yaml(name, backend.addr(), host))
            .await
            .unwrap();
        replica.wait_200(host).await.unwrap();
        world.wait_ready_status(name, "True").await.unwrap();
    }
    let before = lease(&world).await;
    assert_eq!(holder(&before), Some(replica.identity.as_str()), "{before}");

    // An empty cluster behind the same URL; the platform is installed again and only A (and a
    // new C) recreated.
    let wiped = Instant::now();
    world.api.wipe_etcd().await.unwrap();
    world.install().await.unwrap();
    for (name, host) in [("a", A), ("c", C)] {
        world
            .apply(&exposed_yaml(name, backend.addr(), host))
            .await
            .unwrap();
    }

    // Converged: A and C served with their statuses written, B (gone from the API server) 404.
    replica.wait_200(A).await.unwrap();
    replica.wait_200(C).await.unwrap();
    replica.wait_status(B, 404).await.unwrap();
    for name in ["a", "c"] {
        let object = world.wait_ready_status(name, "True").await.unwrap();
        assert_eq!(object["status"]["observedGeneration"], 1, "{object}");
    }
    assert!(world.kingress("b").await.unwrap().is_none());
    // The Lease went with etcd: it is made again and held by the replica.
    poll_until("the replica to hold a new Lease", WAIT, || async {
        lease_now(&world)
            .await
            .is_some_and(|l| holder(&l) == Some(replica.identity.as_str()))
    })
    .await
    .unwrap();
    let after = lease(&world).await;
    assert_eq!(holder(&after), Some(replica.identity.as_str()), "{after}");
    assert_ne!(
        after["metadata"]["uid"], before["metadata"]["uid"],
        "a new Lease object"
    );
    assert!(replica.leading());
    let converged = wiped.elapsed();

    // A status that does not say what Knarr knows (as a restore from an older backup leaves
    // it), with nothing else changing: written again.
    world
        .api
        .kubectl(&[
            "patch",
            "kingress",
            "a",
            "-n",
            "default",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"observedGeneration":1,"conditions":[{"type":"Ready","status":"Unknown","reason":"Restored"}]}}"#,
        ])
        .await
        .unwrap();
    let object = world.wait_ready_status("a", "True").await.unwrap();
    assert!(
        !object.to_string().contains("Restored"),
        "the stale status stayed: {object}"
    );
    eprintln!("wipe: converged {converged:?} after the wipe began");
}

#[test]
fn kubernetes_timestamps_parse() {
    let t = parse_time("2026-03-01T00:00:01.5Z");
    assert_eq!(
        t.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
        Duration::from_millis(1_772_323_201_500)
    );
    assert_eq!(parse_time("1970-01-01T00:00:00Z"), SystemTime::UNIX_EPOCH);
}
