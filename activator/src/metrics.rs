//! Prometheus metrics for people (`GET <admin>/metrics`). The autoscaler does not read these: it
//! gets [`RevisionStats`](knarr_proto::activator::RevisionStats) over gRPC.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RevisionLabels {
    pub namespace: String,
    pub revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub reason: &'static str,
}

/// Why the activator answered a request itself instead of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// 404: no such revision.
    UnknownRevision,
    /// 503: too many requests waiting for the revision.
    QueueFull,
    /// 503: the revision went away while the request waited.
    RevisionRemoved,
    /// 504: no capacity (or no response) within the revision timeout.
    Timeout,
    /// 502: the chosen pod could not be reached.
    PodUnreachable,
    /// 502: the pod's connection failed during the exchange.
    PodFailed,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::UnknownRevision => "unknown_revision",
            Refusal::QueueFull => "queue_full",
            Refusal::RevisionRemoved => "revision_removed",
            Refusal::Timeout => "timeout",
            Refusal::PodUnreachable => "pod_unreachable",
            Refusal::PodFailed => "pod_failed",
        }
    }
}

/// The activator's metrics; each is an `Arc`'d atomic, so copies handed out stay live.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Requests for a known revision (probes excluded).
    pub requests: Counter,
    /// Requests handed to a pod.
    pub proxied: Counter,
    /// Requests waiting for capacity now, all revisions.
    pub held: Gauge,
    refused: Family<ReasonLabels, Counter>,
    /// Per revision: held + proxied requests in flight.
    pub revision_in_flight: Family<RevisionLabels, Gauge>,
    /// Per revision: requests waiting for capacity.
    pub revision_held: Family<RevisionLabels, Gauge>,
    /// Stats the control-plane client did not take in time (channel full).
    pub stats_dropped: Counter,
}

impl Metrics {
    pub fn refused(&self, why: Refusal) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: why.label(),
            })
            .inc();
    }

    /// Forgets a removed revision's series.
    pub fn remove_revision(&self, labels: &RevisionLabels) {
        self.revision_in_flight.remove(labels);
        self.revision_held.remove(labels);
    }

    /// Registers everything; prometheus-client appends `_total` to counters.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "activator_requests",
            "Requests for known revisions (probes excluded)",
            self.requests.clone(),
        );
        registry.register(
            "activator_proxied_requests",
            "Requests forwarded to a pod",
            self.proxied.clone(),
        );
        registry.register(
            "activator_held_requests",
            "Requests waiting for capacity",
            self.held.clone(),
        );
        registry.register(
            "activator_refused_requests",
            "Requests the activator answered itself: 404 unknown_revision, 503 queue_full and \
             revision_removed, 504 timeout, 502 pod_unreachable and pod_failed",
            self.refused.clone(),
        );
        registry.register(
            "activator_revision_in_flight_requests",
            "Requests held or proxied, per revision",
            self.revision_in_flight.clone(),
        );
        registry.register(
            "activator_revision_held_requests",
            "Requests waiting for capacity, per revision",
            self.revision_held.clone(),
        );
        registry.register(
            "activator_stats_dropped",
            "Revision stats dropped because the control-plane client fell behind",
            self.stats_dropped.clone(),
        );
    }
}
