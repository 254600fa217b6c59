//! The serving core's decisions, driven as the shell drives it but with the clock, the runtime
//! and the gateways in the test's hands.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use knarr_autoscaler::{AutoscalerConfig, Sample};
use knarr_model::serving::{parse_serving_documents, ServingDocument, ServingKey, ServingKind};
use knarr_model::{Kind, Object, ObjectKey};
use knarr_proto::activator::Revision as ActivatorRevision;
use knarr_translate::reconcile::Change;

use crate::{CoreConfig, GatewayAnswer, GatewayCheck, ObjectError, Phase, PodStatus, ServingCore};

/// The core plus what the shell would have done with its plans.
struct World {
    core: ServingCore,
    now: Instant,
    /// Replicas asked of the runtime, by `namespace/name`.
    scaled: BTreeMap<String, usize>,
    /// What the ingress translation was given.
    published: BTreeMap<ObjectKey, Arc<Object>>,
    activators: BTreeMap<String, ActivatorRevision>,
    /// The runtime refuses every revision with this reason.
    refuse: Option<String>,
    /// How the gateways answer.
    gateway_ready: bool,
}

impl World {
    fn new(autoscaling: Option<AutoscalerConfig>) -> World {
        World {
            core: ServingCore::new(CoreConfig {
                domain: "example.com".into(),
                autoscaling,
            }),
            now: Instant::now(),
            scaled: BTreeMap::new(),
            published: BTreeMap::new(),
            activators: BTreeMap::new(),
            refuse: None,
            gateway_ready: true,
        }
    }

    fn apply(&mut self, text: &str) {
        for document in parse_serving_documents("test.yaml", text) {
            let ServingDocument::Object { mut object, .. } = document else {
                panic!("not a serving object: {text}");
            };
            let generation = self
                .core
                .applied(&object.key())
                .map_or(1, |old| old.meta().generation.unwrap_or(1) + 1);
            object.meta_mut().generation = Some(generation);
            self.core.upsert(object);
        }
    }

    /// Passes until the core has nothing left to do (as the shell's loop does); returns how
    /// many objects the plans touched.
    fn settle(&mut self) -> usize {
        let mut touched = 0;
        for _ in 0..20 {
            let checks = self.core.gateway_checks();
            let answers: Vec<_> = checks
                .into_iter()
                .map(|c| {
                    let answer = match c {
                        GatewayCheck::Ingress { .. } => GatewayAnswer::Ingress(self.gateway_ready),
                        GatewayCheck::Endpoints { .. } => {
                            GatewayAnswer::Endpoints(Some(self.gateway_ready))
                        }
                    };
                    (c, answer)
                })
                .collect();
            self.core.gateway_answers(self.now, answers);
            let plan = self.core.reconcile(self.now);
            touched += plan.scale.len() + plan.publish.len() + plan.activator.len();
            for (revision, replicas) in plan.scale {
                match &self.refuse {
                    Some(reason) if replicas > 0 => self.core.scale_failed(
                        &revision.serving_key(),
                        ObjectError {
                            object: revision.serving_key(),
                            field: Some("spec.containers[0].command".into()),
                            reason: reason.clone(),
                        },
                    ),
                    _ => {
                        self.scaled.insert(revision.key(), replicas);
                    }
                }
            }
            for change in plan.publish {
                match change {
                    Change::Upsert(object) => {
                        self.published.insert(object.key(), object);
                    }
                    Change::Delete(key) => {
                        self.published.remove(&key);
                    }
                }
            }
            for (name, revision) in plan.activator {
                match revision {
                    Some(r) => self.activators.insert(name, r),
                    None => self.activators.remove(&name),
                };
            }
            if !self.core.has_work(self.now) {
                return touched;
            }
        }
        panic!("the core did not settle");
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    /// `seconds` of scrapes that say `revision` has no load, a pass after each.
    fn idle(&mut self, revision: &str, seconds: u32) {
        for _ in 0..seconds {
            self.core.record(
                &rev(revision),
                self.now,
                Sample::from_queue_proxy(0.0, 0.0, 0.0, 0.0),
            );
            self.advance(Duration::from_secs(1));
            self.settle();
        }
    }

    fn set_pod(&mut self, revision: &str, phase: Phase, port: u16) {
        let pod = PodStatus {
            name: format!("{revision}-pod-1"),
            phase,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            metrics_address: None,
            restarts: 0,
            last_error: (phase == Phase::Failed).then(|| "exit status: 3".to_owned()),
            local: None,
        };
        self.core.set_pods(&rev(revision), vec![pod]);
    }

    fn replicas(&self, revision: &str) -> Option<usize> {
        self.scaled.get(&format!("default/{revision}")).copied()
    }

    fn status(&self, kind: ServingKind, name: &str) -> serde_json::Value {
        self.core
            .view()
            .get(&ServingKey::new(kind, "default", name))
            .map(|o| o.manifest()["status"].clone())
            .unwrap_or_default()
    }

    fn endpoint_ports(&self, revision: &str) -> Vec<i64> {
        match self
            .published
            .get(&ObjectKey::new(Kind::Endpoints, "default", revision))
            .map(|o| &**o)
        {
            Some(Object::Endpoints(e)) => e.subsets.iter().map(|s| s.ports[0].port).collect(),
            _ => Vec::new(),
        }
    }
}

fn rev(name: &str) -> ServingKey {
    ServingKey::new(ServingKind::Revision, "default", name)
}

fn service(name: &str, target: &str, extra: &str) -> String {
    format!(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  template:\n{extra}    spec:\n      containers:\n      - image: x\n        command: [app]\n        \
         env: [{{name: TARGET, value: {target}}}]\n"
    )
}

fn annotated(annotations: &str) -> String {
    format!("    metadata:\n      annotations: {{{annotations}}}\n")
}

fn condition(status: &serde_json::Value, type_: &str) -> String {
    status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .map(|c| {
            format!(
                "{}/{}",
                c["status"].as_str().unwrap_or(""),
                c["reason"].as_str().unwrap_or("")
            )
        })
        .unwrap_or_default()
}

#[test]
fn a_service_runs_its_revision_and_routes_to_its_ready_pods() {
    let mut w = World::new(None);
    w.apply(&service("hello", "a", ""));
    w.settle();
    assert_eq!(w.replicas("hello-00001"), Some(1));
    let revision = w.status(ServingKind::Revision, "hello-00001");
    assert_eq!(condition(&revision, "Ready"), "Unknown/Deploying");
    // The route points at the only revision (not ready yet), so the KIngress exists.
    assert!(w
        .published
        .contains_key(&ObjectKey::new(Kind::Ingress, "default", "hello")));

    w.set_pod("hello-00001", Phase::Ready, 40001);
    w.settle();
    let revision = w.status(ServingKind::Revision, "hello-00001");
    assert_eq!(condition(&revision, "Ready"), "True/");
    assert_eq!(revision["actualReplicas"], 1);
    assert_eq!(w.endpoint_ports("hello-00001"), [40001]);
    let service = w.status(ServingKind::Service, "hello");
    assert_eq!(service["latestReadyRevisionName"], "hello-00001");
    assert_eq!(service["url"], "http://hello.default.example.com");
    assert_eq!(condition(&service, "Ready"), "True/");
}

#[test]
fn a_route_is_ready_only_once_the_gateways_serve_its_current_ingress() {
    let mut w = World::new(None);
    w.gateway_ready = false;
    w.apply(&service("hello", "a", ""));
    w.settle();
    w.set_pod("hello-00001", Phase::Starting, 40001);
    w.settle();
    w.set_pod("hello-00001", Phase::Ready, 40001);
    w.settle();
    let route = w.status(ServingKind::Route, "hello");
    assert_eq!(condition(&route, "IngressReady"), "Unknown/Uninitialized");
    // Nothing moved at the gateways: no question is asked again.
    assert!(w.core.gateway_checks().is_empty());
    w.core.gateway_moved();
    let checks = w.core.gateway_checks();
    assert_eq!(checks.len(), 1, "{checks:?}");
    // An answer about an older version of the ingress is dropped.
    let stale = match checks[0].clone() {
        GatewayCheck::Ingress {
            route,
            ingress,
            version,
        } => GatewayCheck::Ingress {
            route,
            ingress,
            version: version - 1,
        },
        other => panic!("{other:?}"),
    };
    w.core
        .gateway_answers(w.now, [(stale, GatewayAnswer::Ingress(true))]);
    w.core.reconcile(w.now);
    let route = w.status(ServingKind::Route, "hello");
    assert_eq!(condition(&route, "IngressReady"), "Unknown/Uninitialized");
    w.core
        .gateway_answers(w.now, [(checks[0].clone(), GatewayAnswer::Ingress(true))]);
    w.settle();
    let route = w.status(ServingKind::Route, "hello");
    assert_eq!(condition(&route, "IngressReady"), "True/");
    assert_eq!(condition(&route, "Ready"), "True/");
}

#[test]
fn a_new_template_moves_traffic_once_ready_and_stops_the_old_revision() {
    let mut w = World::new(None);
    w.apply(&service("hello", "a", ""));
    w.settle();
    w.set_pod("hello-00001", Phase::Ready, 40001);
    w.settle();

    w.apply(&service("hello", "b", ""));
    w.settle();
    assert_eq!(w.replicas("hello-00002"), Some(1));
    // Not ready yet: traffic stays on hello-00001, which keeps running.
    let status = w.status(ServingKind::Service, "hello");
    assert_eq!(status["traffic"][0]["revisionName"], "hello-00001");
    assert_eq!(w.replicas("hello-00001"), Some(1));

    w.set_pod("hello-00002", Phase::Ready, 40002);
    w.settle();
    let status = w.status(ServingKind::Service, "hello");
    assert_eq!(status["traffic"][0]["revisionName"], "hello-00002");
    assert_eq!(status["latestCreatedRevisionName"], "hello-00002");
    assert_eq!(w.replicas("hello-00001"), Some(0), "nothing routes to it");

    // A traffic-only change stamps no revision.
    let pinned =
        service("hello", "b", "") + "  traffic:\n  - revisionName: hello-00001\n    percent: 100\n";
    w.apply(&pinned);
    w.settle();
    assert_eq!(w.core.view().revisions.len(), 2);
    assert_eq!(w.replicas("hello-00001"), Some(1), "routed again");
}

#[test]
fn deleting_a_service_collects_its_revisions_and_everything_published() {
    let mut w = World::new(None);
    w.apply(&service("hello", "a", ""));
    w.settle();
    w.set_pod("hello-00001", Phase::Ready, 40001);
    w.settle();
    assert_eq!(w.published.len(), 3, "ingress, service, endpoints");
    let key = ServingKey::new(ServingKind::Service, "default", "hello");
    assert!(w.core.delete(&key));
    w.settle();
    assert_eq!(w.replicas("hello-00001"), Some(0));
    assert!(w.core.view().revisions.is_empty());
    assert!(w.core.view().services.is_empty());
    assert!(w.published.is_empty(), "{:?}", w.published.keys());
    assert!(!w.core.delete(&key));
}

#[test]
fn children_of_a_service_are_owned_by_it() {
    let mut w = World::new(None);
    w.apply(&service("hello", "a", ""));
    w.settle();
    let route = ServingKey::new(ServingKind::Route, "default", "hello");
    assert_eq!(w.core.owner_of(&route).as_deref(), Some("hello"));
    assert_eq!(
        w.core.owner_of(&rev("hello-00001")).as_deref(),
        Some("configuration hello")
    );
    let other = ServingKey::new(ServingKind::Route, "default", "other");
    assert_eq!(w.core.owner_of(&other), None);
}

#[test]
fn a_crashing_or_unrunnable_revision_is_not_ready_with_the_reason() {
    let mut w = World::new(None);
    w.apply(&service("hello", "a", ""));
    w.settle();
    w.set_pod("hello-00001", Phase::Failed, 40001);
    w.settle();
    let revision = w.status(ServingKind::Revision, "hello-00001");
    assert_eq!(condition(&revision, "ContainerHealthy"), "False/ExitCode");
    assert_eq!(condition(&revision, "Ready"), "False/ExitCode");
    let ksvc = w.status(ServingKind::Service, "hello");
    assert_eq!(condition(&ksvc, "Ready"), "False/RevisionFailed");

    let mut w = World::new(None);
    w.refuse = Some("set command".into());
    w.apply(&service("hello", "a", ""));
    w.settle();
    let revision = w.status(ServingKind::Revision, "hello-00001");
    assert_eq!(condition(&revision, "Ready"), "False/CannotRun");
    assert!(
        revision
            .to_string()
            .contains("spec.containers[0].command: set command"),
        "{revision}"
    );
}

#[test]
fn a_revision_that_starts_at_zero_is_ready_without_pods() {
    for autoscaling in [None, Some(AutoscalerConfig::default())] {
        let mut w = World::new(autoscaling.map(|c| AutoscalerConfig {
            allow_zero_initial_scale: true,
            ..c
        }));
        w.apply(&service(
            "idle",
            "a",
            &annotated("autoscaling.knative.dev/initial-scale: \"0\""),
        ));
        w.settle();
        assert_eq!(w.replicas("idle-00001"), Some(0));
        let revision = w.status(ServingKind::Revision, "idle-00001");
        assert_eq!(condition(&revision, "Ready"), "True/", "{revision}");
        assert_eq!(condition(&revision, "Active"), "False/NoTraffic");
        let ksvc = w.status(ServingKind::Service, "idle");
        assert_eq!(condition(&ksvc, "Ready"), "True/", "{ksvc}");
    }
}

#[test]
fn work_is_proportional_to_the_change_and_an_idle_world_does_none() {
    let mut w = World::new(Some(AutoscalerConfig {
        allow_zero_initial_scale: true,
        ..AutoscalerConfig::default()
    }));
    let zero = annotated("autoscaling.knative.dev/initial-scale: \"0\"");
    for i in 0..300 {
        w.apply(&service(&format!("s{i}"), "a", &zero));
    }
    w.core
        .set_activators(vec![SocketAddr::from(([127, 0, 0, 9], 8012))]);
    let first = w.settle();
    assert!(first >= 300 * 3, "each service published: {first}");
    for i in 0..300 {
        let ksvc = w.status(ServingKind::Service, &format!("s{i}"));
        assert_eq!(condition(&ksvc, "Ready"), "True/", "s{i}: {ksvc}");
    }
    // Nothing changes: no plan has anything in it, and the autoscalers of revisions at rest
    // at zero do not even tick.
    for _ in 0..5 {
        w.advance(Duration::from_secs(2));
        assert_eq!(w.settle(), 0);
    }
    assert_eq!(w.core.next_tick(), None);
    // Load for one wakes its autoscaler (and only its).
    w.core
        .record(&rev("s3-00001"), w.now, Sample::from_activator(1.0, 1.0));
    assert_eq!(w.core.next_tick(), Some(w.now));
    w.settle();
    assert_eq!(w.replicas("s3-00001"), Some(1), "scaled up on load");
    // One Service changes: only its objects move.
    w.apply(&service("s7", "b", &zero));
    let touched = w.settle();
    assert!(touched > 0 && touched <= 8, "touched {touched}");
    // Deleting one touches only its own.
    assert!(w
        .core
        .delete(&ServingKey::new(ServingKind::Service, "default", "s8")));
    let touched = w.settle();
    assert!(touched > 0 && touched <= 8, "touched {touched}");
    assert_eq!(w.core.view().services.len(), 299);
}

#[test]
fn with_autoscaling_the_activator_fronts_a_revision_without_burst_headroom() {
    let mut w = World::new(Some(AutoscalerConfig::default()));
    w.core
        .set_activators(vec![SocketAddr::from(([127, 0, 0, 9], 8012))]);
    w.apply(&service("hello", "a", ""));
    w.settle();
    // A new revision starts at its initial scale, behind the activator.
    assert_eq!(w.replicas("hello-00001"), Some(1));
    assert_eq!(w.endpoint_ports("hello-00001"), [8012]);

    w.set_pod("hello-00001", Phase::Ready, 40001);
    w.settle();
    // Knative's default target burst capacity (211) wants more than one idle pod can give:
    // the activator stays in the path, and learns the pod.
    let status = w.status(ServingKind::Revision, "hello-00001");
    assert_eq!(status["servingMode"], "Proxy", "{status}");
    assert_eq!(w.endpoint_ports("hello-00001"), [8012]);
    let table = &w.activators["default/hello-00001"];
    assert_eq!(table.endpoints.len(), 1);
    assert_eq!(table.endpoints[0].port, 40001);
    assert_eq!(table.timeout_seconds, 300);
}

#[test]
fn without_burst_headroom_a_ready_revision_is_served_directly_from_the_next_tick() {
    let mut w = World::new(Some(AutoscalerConfig::default()));
    w.core
        .set_activators(vec![SocketAddr::from(([127, 0, 0, 9], 8012))]);
    w.apply(&service(
        "hello",
        "a",
        &annotated("autoscaling.knative.dev/target-burst-capacity: \"0\""),
    ));
    w.settle();
    w.set_pod("hello-00001", Phase::Ready, 40001);
    w.settle();
    assert_eq!(
        w.endpoint_ports("hello-00001"),
        [8012],
        "until the next tick"
    );
    assert!(w.core.next_tick().is_some_and(|at| at > w.now));
    w.advance(Duration::from_secs(3));
    w.settle();
    let status = w.status(ServingKind::Revision, "hello-00001");
    assert_eq!(status["servingMode"], "Serve", "{status}");
    assert_eq!(w.endpoint_ports("hello-00001"), [40001]);
}

#[test]
fn an_idle_revision_goes_to_zero_only_once_the_gateways_hold_the_activator_endpoints() {
    let config = AutoscalerConfig {
        stable_window: Duration::from_secs(6),
        scale_to_zero_grace_period: Duration::from_secs(4),
        ..AutoscalerConfig::default()
    };
    let mut w = World::new(Some(config));
    w.core
        .set_activators(vec![SocketAddr::from(([127, 0, 0, 9], 8012))]);
    w.gateway_ready = false;
    w.apply(&service("hello", "a", ""));
    w.settle();
    w.set_pod("hello-00001", Phase::Ready, 40001);
    w.settle();
    // Idle: every scrape says no load.
    w.idle("hello-00001", 20);
    assert_eq!(
        w.replicas("hello-00001"),
        Some(1),
        "the gateways never confirmed the activator in the path"
    );
    // The gateways catch up; the pod goes after the grace period.
    w.gateway_ready = true;
    w.core.gateway_moved();
    w.idle("hello-00001", 20);
    assert_eq!(w.replicas("hello-00001"), Some(0));
    let status = w.status(ServingKind::Revision, "hello-00001");
    assert_eq!(condition(&status, "Ready"), "True/", "stays ready at zero");
    // A poke brings it back at once, without waiting for a tick.
    w.core.poke(&rev("hello-00001"), w.now);
    w.settle();
    assert_eq!(w.replicas("hello-00001"), Some(1));
    let ksvc = w.status(ServingKind::Service, "hello");
    assert_eq!(condition(&ksvc, "Ready"), "True/");
}

#[test]
fn a_burst_enters_panic_mode_at_the_next_tick() {
    let config = AutoscalerConfig {
        stable_window: Duration::from_secs(6),
        ..AutoscalerConfig::default()
    };
    let mut w = World::new(Some(config));
    w.core
        .set_activators(vec![SocketAddr::from(([127, 0, 0, 9], 8012))]);
    w.apply(&service(
        "hello",
        "a",
        &annotated(
            "autoscaling.knative.dev/target: \"10\", \
             autoscaling.knative.dev/target-utilization-percentage: \"100\"",
        ),
    ));
    w.settle();
    w.set_pod("hello-00001", Phase::Ready, 40001);
    w.settle();
    // 30 in flight on one pod, scraped every second (at a phase of its own); the clock moves
    // in quarter seconds.
    w.advance(Duration::from_millis(300));
    let mut panicked = None;
    for quarter in 0..24 {
        if quarter % 4 == 0 {
            w.core.record(
                &rev("hello-00001"),
                w.now,
                Sample::from_queue_proxy(30.0, 0.0, 60.0, 0.0),
            );
        }
        w.advance(Duration::from_millis(250));
        w.settle();
        let status = w.status(ServingKind::Revision, "hello-00001");
        if status["inPanic"] == true {
            assert_eq!(status["desiredReplicas"], 3, "{status}");
            panicked = Some(quarter / 4);
            break;
        }
    }
    assert!(panicked.is_some_and(|s| s <= 3), "panicked at {panicked:?}");
}
