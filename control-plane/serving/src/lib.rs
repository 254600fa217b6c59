//! Knarr's serving core: Knative Serving's controllers as one pure state machine, shared by
//! every mode (`knarr up` on one machine, and the Kubernetes modes).
//!
//! # Inputs and outputs
//!
//! ```text
//!  source (files + knarr apply | API server) ─ upsert/delete ─┐
//!  runtime (processes | Deployments) ─────────── set_pods ────┤
//!  autoscaler inputs (scrapes, activators) ── record/poke ────┤   ServingCore
//!  gateways (ACKs, hash probes) ── gateway_checks/answers ────┤   (no I/O, locks or clock:
//!  `now` ─────────────────────────────────────── reconcile ───┘    every call is given `now`)
//!                                                                   │ Plan
//!        runtime.scale ◀── scale ──────────────────────────────────┤
//!        ingress translation ◀── publish (KIngress, Service, Endpoints)
//!        activators' table ◀── activator ───────────────────────────┤
//!        status sink ◀── statuses + view ───────────────────────────┘
//! ```
//!
//! The reconcilers are the pure functions of `knarr_translate::serving` (Service → its
//! Configuration and Route, Configuration → Revision, Route → KIngress, the statuses); the autoscaler is
//! `knarr_autoscaler`'s KPA. The core decides which of them to run: every input marks the
//! objects it touches, and a pass follows the marks along Knative's dependencies (Service →
//! its Configuration and Route; Configuration → its Revisions; a Revision's readiness → its
//! Configuration and the Routes naming it; a Route's KIngress → the Revisions it splits to)
//! until nothing changes. Work is proportional to what changed: an idle world costs one
//! autoscaler tick per revision every tick interval, and nothing else.
//!
//! What users applied is not kept here: the source holds it (for `knarr up`, the file world's
//! store gives generations and checks updates; on Kubernetes, the API server does).
//!
//! The shell (`knarr-control`) runs the loop: it feeds inputs in as they come, calls
//! [`ServingCore::reconcile`] when [`ServingCore::has_work`] says so or at
//! [`ServingCore::next_tick`], and carries the [`Plan`] out.

mod backend;
mod core;
pub mod pod;
mod revision_status;
mod view;

pub use crate::backend::REVISION_LABEL;
pub use crate::core::{CoreConfig, GatewayAnswer, GatewayCheck, ObjectError, Plan, ServingCore};
pub use crate::pod::{LocalPod, Phase, PodStatus, RevisionRef};
pub use crate::view::{PodInfo, ServiceSummary, StatusSink, View};

#[cfg(test)]
mod tests;
