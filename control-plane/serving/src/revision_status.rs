//! A Revision's status from its pods, with Knative's conditions.

use knarr_model::serving::{
    Condition, ConditionStatus, Revision, RevisionStatus, CONDITION_READY,
    INITIAL_SCALE_ANNOTATION, MAX_SCALE_ANNOTATION, MIN_SCALE_ANNOTATION,
};

use crate::pod::{Phase, PodStatus};

/// Revision conditions besides `Ready` (Knative's names).
const CONDITION_ACTIVE: &str = "Active";
const CONDITION_CONTAINER_HEALTHY: &str = "ContainerHealthy";
const CONDITION_RESOURCES_AVAILABLE: &str = "ResourcesAvailable";

/// How many pods a revision runs until autoscaling exists: `initial-scale` (default 1), at
/// least `min-scale`, at most `max-scale` (0 = unbounded).
pub(crate) fn initial_scale(revision: &Revision) -> usize {
    let annotation = |key: &str| {
        revision
            .metadata
            .annotations
            .get(key)
            .and_then(|v| v.parse::<usize>().ok())
    };
    let mut replicas = annotation(INITIAL_SCALE_ANNOTATION)
        .unwrap_or(1)
        .max(annotation(MIN_SCALE_ANNOTATION).unwrap_or(0));
    if let Some(max) = annotation(MAX_SCALE_ANNOTATION).filter(|m| *m > 0) {
        replicas = replicas.min(max);
    }
    replicas
}

/// A Revision's status from its pods: `Ready` once `initialized` (its initial scale was reached:
/// a pod was ready, or it starts at zero) and while nothing says it cannot run; `False` when it
/// cannot run or its pods crash before it was ever initialized.
pub(crate) fn revision_status(
    revision: &Revision,
    pods: &[PodStatus],
    initialized: bool,
    desired: Option<usize>,
    cannot_run: Option<&str>,
) -> RevisionStatus {
    let live: Vec<&PodStatus> = pods
        .iter()
        .filter(|p| p.phase != Phase::Terminating)
        .collect();
    let ready_pods = live.iter().filter(|p| p.phase == Phase::Ready).count();
    let crashed = live.iter().find_map(|p| p.last_error.as_deref());
    let (resources, health) = if let Some(why) = cannot_run {
        (
            Condition::new(
                CONDITION_RESOURCES_AVAILABLE,
                ConditionStatus::False,
                "CannotRun",
                why,
            ),
            Condition::new(
                CONDITION_CONTAINER_HEALTHY,
                ConditionStatus::Unknown,
                "",
                "",
            ),
        )
    } else if initialized {
        (
            Condition::new(CONDITION_RESOURCES_AVAILABLE, ConditionStatus::True, "", ""),
            Condition::new(CONDITION_CONTAINER_HEALTHY, ConditionStatus::True, "", ""),
        )
    } else {
        let deploying = Condition::new(
            CONDITION_RESOURCES_AVAILABLE,
            ConditionStatus::Unknown,
            "Deploying",
            "",
        );
        let health = match crashed {
            Some(why) => Condition::new(
                CONDITION_CONTAINER_HEALTHY,
                ConditionStatus::False,
                "ExitCode",
                why,
            ),
            None => Condition::new(
                CONDITION_CONTAINER_HEALTHY,
                ConditionStatus::Unknown,
                "Deploying",
                "",
            ),
        };
        (deploying, health)
    };
    let active = match (ready_pods, desired.unwrap_or(0)) {
        (0, 0) => Condition::new(
            CONDITION_ACTIVE,
            ConditionStatus::False,
            "NoTraffic",
            "The revision has no pods: nothing routes to it.",
        ),
        (0, _) => Condition::new(
            CONDITION_ACTIVE,
            ConditionStatus::Unknown,
            "Activating",
            "Waiting for a pod to be ready.",
        ),
        _ => Condition::new(CONDITION_ACTIVE, ConditionStatus::True, "", ""),
    };
    let ready = [&resources, &health]
        .into_iter()
        .find(|c| c.status == ConditionStatus::False)
        .or_else(|| {
            [&resources, &health]
                .into_iter()
                .find(|c| c.status == ConditionStatus::Unknown)
        })
        .map_or_else(
            || Condition::new(CONDITION_READY, ConditionStatus::True, "", ""),
            |c| Condition::new(CONDITION_READY, c.status, &c.reason, &c.message),
        );
    RevisionStatus {
        observed_generation: revision.metadata.generation,
        conditions: vec![active, health, ready, resources],
        actual_replicas: Some(ready_pods as i64),
        desired_replicas: desired.map(|d| d as i64),
        serving_mode: None,
        in_panic: None,
    }
}
