//! KIngress status written back to the API server, as Knative's networking expects it.
//!
//! Only the leader writes. It writes an ingress's status when the source touched the ingress
//! (once the ingress controller has applied that batch), when the gateways move (ACKs, hash
//! probes: only ingresses not Ready yet are looked at), and, on becoming leader, every ingress.
//! A status equal to what the API server already holds (conditions compared without their
//! transition times) is not written, so the echo of our own write ends the loop. Writes are
//! server-side applies of the status subresource, by field manager `knarr`.
//!
//! `observedGeneration` is the generation of the ingress the conditions describe; a condition
//! keeps its `lastTransitionTime` while its status stays the same.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use knarr_control::ingress_controller::IngressController;
use knarr_control::status::{Condition, IngressReport};
use knarr_model::ObjectKey;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::source::{Observed, Touched};

/// Field manager of Knarr's status writes.
pub const FIELD_MANAGER: &str = "knarr";
/// Status writes in flight at once.
const CONCURRENT_WRITES: usize = 16;
/// How long a failed write waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// The status Knarr wants an ingress to have, as the JSON written.
pub fn desired_status(
    report: &IngressReport,
    generation: Option<i64>,
    observed: &Value,
    now: &str,
) -> Value {
    let mut conditions: Vec<Condition> = report.status.conditions.clone();
    if let (Some(error), true) = (
        &report.error,
        report.condition("NetworkConfigured").is_some(),
    ) {
        // The object as it is now is invalid; its last valid version may still serve.
        for c in &mut conditions {
            if c.type_ == "NetworkConfigured" || c.type_ == "Ready" {
                c.status = "False";
                c.reason = Some("InvalidObject".into());
                c.message = Some(error.clone());
            }
        }
    }
    let old = observed.get("conditions").and_then(Value::as_array);
    let conditions: Vec<Value> = conditions
        .iter()
        .map(|c| {
            let kept = old
                .and_then(|old| {
                    old.iter().find(|o| {
                        o.get("type").and_then(Value::as_str) == Some(c.type_)
                            && o.get("status").and_then(Value::as_str) == Some(c.status)
                    })
                })
                .and_then(|o| o.get("lastTransitionTime").cloned());
            let mut v = json!({
                "type": c.type_,
                "status": c.status,
                "lastTransitionTime": kept.unwrap_or_else(|| now.into()),
            });
            if let Some(reason) = &c.reason {
                v["reason"] = reason.clone().into();
            }
            if let Some(message) = &c.message {
                v["message"] = message.clone().into();
            }
            v
        })
        .collect();
    let mut status = json!({ "conditions": conditions });
    // An invalid object is described as it is now; a valid one as the index holds it.
    let observed_generation = match report.error {
        Some(_) => generation.or(report.status.observed_generation),
        None => report.status.observed_generation.or(generation),
    };
    if let Some(g) = observed_generation {
        status["observedGeneration"] = g.into();
    }
    let lb = |l: &Option<knarr_control::status::LoadBalancerStatus>| {
        l.as_ref().map(|l| {
            json!({"ingress": l.ingress.iter().map(|i| json!({"domainInternal": i.domain_internal})).collect::<Vec<_>>()})
        })
    };
    if let Some(p) = lb(&report.status.public_load_balancer) {
        status["publicLoadBalancer"] = p;
    }
    if let Some(p) = lb(&report.status.private_load_balancer) {
        status["privateLoadBalancer"] = p;
    }
    status
}

/// Whether `observed` already says what `desired` does (transition times aside).
pub fn same_status(desired: &Value, observed: &Value) -> bool {
    fn strip(v: &Value) -> Value {
        let mut v = v.clone();
        if let Some(conditions) = v.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in conditions.iter_mut() {
                if let Some(c) = c.as_object_mut() {
                    c.remove("lastTransitionTime");
                    c.remove("severity");
                }
            }
            conditions.sort_by(|a, b| {
                a.get("type")
                    .and_then(Value::as_str)
                    .cmp(&b.get("type").and_then(Value::as_str))
            });
        }
        if let Some(m) = v.as_object_mut() {
            m.remove("annotations");
        }
        v
    }
    strip(desired) == strip(observed)
}

fn timestamp_now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Writes statuses while this replica leads; runs until `touched` closes. A change of
/// `rewrite` makes it look at every ingress again.
pub async fn run(
    client: Client,
    controller: Arc<IngressController>,
    observed: Observed,
    mut touched: mpsc::UnboundedReceiver<Touched>,
    mut leader: watch::Receiver<bool>,
    mut rewrite: watch::Receiver<u64>,
) {
    let ingresses = crate::source::ingress_api_resource();
    let mut applied = controller.applied();
    let mut gateways = controller.gateway_changes();
    // Touched ingresses whose batch is not applied yet, by batch.
    let mut waiting: Vec<Touched> = Vec::new();
    let mut dirty: BTreeSet<ObjectKey> = BTreeSet::new();
    // Ingresses last seen not Ready (looked at again when the gateways move).
    let mut not_ready: BTreeSet<ObjectKey> = BTreeSet::new();
    let mut retry: BTreeSet<ObjectKey> = BTreeSet::new();
    let mut rewrite_open = true;
    let mut was_leader = *leader.borrow();
    if was_leader {
        dirty.extend(observed.lock().unwrap().keys().cloned());
    }
    loop {
        let retry_wait = async {
            if retry.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(RETRY).await;
        };
        tokio::select! {
            t = touched.recv() => match t {
                Some(t) => waiting.push(t),
                None => return,
            },
            r = applied.changed() => if r.is_err() { return },
            more = gateways.changed() => {
                if !more { return }
                dirty.extend(not_ready.iter().cloned());
            }
            r = leader.changed() => {
                if r.is_err() { return }
                let now = *leader.borrow_and_update();
                if now && !was_leader {
                    info!("leading: writing ingress statuses");
                    dirty.extend(observed.lock().unwrap().keys().cloned());
                } else if !now && was_leader {
                    info!("no longer leading: not writing statuses");
                }
                was_leader = now;
            }
            () = retry_wait => dirty.append(&mut retry),
            r = rewrite.changed(), if rewrite_open => {
                if r.is_err() {
                    // Nothing will ask for a rewrite any more.
                    rewrite_open = false;
                    continue;
                }
                // What every status says changed (e.g. the gateway names).
                dirty.extend(observed.lock().unwrap().keys().cloned());
            }
        }
        while let Ok(t) = touched.try_recv() {
            waiting.push(t);
        }
        let done = *applied.borrow_and_update();
        waiting.retain_mut(|t| {
            if t.seq <= done {
                dirty.extend(t.keys.drain(..));
                false
            } else {
                true
            }
        });
        if !was_leader || dirty.is_empty() {
            continue;
        }
        // What to write, computed now; keys gone or not ours are dropped.
        let now = timestamp_now();
        let mut writes = Vec::new();
        for key in std::mem::take(&mut dirty) {
            let Some(seen) = observed.lock().unwrap().get(&key).cloned() else {
                not_ready.remove(&key);
                continue;
            };
            let Some(report) = controller.report(&key) else {
                not_ready.remove(&key);
                continue;
            };
            if report.is_ready() && report.error.is_none() {
                not_ready.remove(&key);
            } else {
                not_ready.insert(key.clone());
            }
            let status = desired_status(&report, seen.generation, &seen.status, &now);
            if same_status(&status, &seen.status) {
                continue;
            }
            writes.push((key, status));
        }
        if writes.is_empty() {
            continue;
        }
        let count = writes.len();
        let results: Vec<(ObjectKey, Result<(), kube::Error>)> = futures::stream::iter(writes)
            .map(|(key, status)| {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), &key.namespace, &ingresses);
                async move {
                    let result = write(&api, &key, status).await;
                    (key, result)
                }
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .collect()
            .await;
        let mut failed = 0;
        for (key, result) in results {
            match result {
                Ok(()) => {}
                // Deleted meanwhile: nothing to write.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    failed += 1;
                    warn!(ingress = %key, error = %e, "cannot write status; retrying");
                    retry.insert(key);
                }
            }
        }
        debug!(written = count - failed, failed, "ingress statuses written");
    }
}

async fn write(
    api: &Api<DynamicObject>,
    key: &ObjectKey,
    status: Value,
) -> Result<(), kube::Error> {
    let patch = json!({
        "apiVersion": "networking.internal.knative.dev/v1alpha1",
        "kind": "Ingress",
        "metadata": {"name": key.name, "namespace": key.namespace},
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&key.name, &params, &Patch::Apply(&patch))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use knarr_control::status::{
        IngressStatus, LoadBalancerIngress, LoadBalancerStatus, ReportMeta,
    };

    fn report(ready: bool, error: Option<&str>) -> IngressReport {
        let c = |t: &'static str, s: &'static str| Condition {
            type_: t,
            status: s,
            reason: None,
            message: None,
        };
        let s = if ready { "True" } else { "Unknown" };
        let lb = Some(LoadBalancerStatus {
            ingress: vec![LoadBalancerIngress {
                domain_internal: "knarr-internal.knarr-system.svc.cluster.local".into(),
            }],
        });
        IngressReport {
            api_version: "networking.internal.knative.dev/v1alpha1",
            kind: "Ingress",
            metadata: ReportMeta {
                name: "a".into(),
                namespace: "default".into(),
            },
            status: IngressStatus {
                observed_generation: Some(2),
                conditions: vec![
                    c("LoadBalancerReady", s),
                    c("NetworkConfigured", "True"),
                    c("Ready", s),
                ],
                public_load_balancer: lb.clone(),
                private_load_balancer: lb,
            },
            hosts: vec![],
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn transition_times_are_kept_while_a_condition_holds() {
        let first = desired_status(&report(false, None), Some(2), &Value::Null, "T1");
        assert_eq!(first["observedGeneration"], 2);
        assert_eq!(first["conditions"][2]["lastTransitionTime"], "T1");
        assert_eq!(
            first["privateLoadBalancer"]["ingress"][0]["domainInternal"],
            "knarr-internal.knarr-system.svc.cluster.local"
        );
        // Unchanged: written once, then equal to what the API server holds.
        let again = desired_status(&report(false, None), Some(2), &first, "T2");
        assert!(same_status(&again, &first));
        assert_eq!(again["conditions"][2]["lastTransitionTime"], "T1");
        // Ready: the changed conditions get the new time, the steady one keeps its own.
        let ready = desired_status(&report(true, None), Some(2), &first, "T3");
        assert!(!same_status(&ready, &first));
        assert_eq!(ready["conditions"][2]["lastTransitionTime"], "T3");
        assert_eq!(ready["conditions"][1]["lastTransitionTime"], "T1");
    }

    #[test]
    fn an_invalid_update_fails_network_configured_with_the_error() {
        let status = desired_status(
            &report(
                true,
                Some("Ingress default/a: spec.rules[0].hosts: is required"),
            ),
            Some(3),
            &Value::Null,
            "T",
        );
        let ready = &status["conditions"][2];
        assert_eq!(ready["type"], "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "InvalidObject");
        assert!(ready["message"]
            .as_str()
            .unwrap()
            .contains("spec.rules[0].hosts"));
        assert_eq!(status["conditions"][1]["status"], "False");
        assert_eq!(status["observedGeneration"], 3);
    }
}
