//! Prometheus metrics of the xDS server.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use knarr_snapshot::ResourceType;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    r#type: &'static str,
    mode: &'static str,
}

/// Counters and histograms for connected Envoys, pushes, NACKs and push latency.
#[derive(Debug)]
pub struct XdsMetrics {
    connected: Family<ModeLabels, Gauge>,
    responses: Family<TypeLabels, Counter>,
    sent_bytes: Family<TypeLabels, Counter>,
    nacks: Family<TypeLabels, Counter>,
    push_latency: Family<TypeLabels, Histogram>,
}

impl Default for XdsMetrics {
    fn default() -> Self {
        XdsMetrics {
            connected: Family::default(),
            responses: Family::default(),
            sent_bytes: Family::default(),
            nacks: Family::default(),
            push_latency: Family::new_with_constructor(|| {
                // 0.5 ms .. ~16 s
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
        }
    }
}

impl XdsMetrics {
    /// Creates the metrics and registers them under `knarr_xds_*`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("knarr_xds");
        r.register(
            "connected_streams",
            "Envoy ADS streams currently connected",
            m.connected.clone(),
        );
        r.register(
            "responses",
            "Discovery responses pushed to Envoys",
            m.responses.clone(),
        );
        r.register(
            "sent_bytes",
            "Encoded bytes of discovery responses pushed to Envoys",
            m.sent_bytes.clone(),
        );
        r.register(
            "nacks",
            "Discovery responses Envoy rejected (NACK)",
            m.nacks.clone(),
        );
        r.register(
            "push_latency_seconds",
            "Time from config becoming due for an Envoy (snapshot published, or requested if later) to its ACK",
            m.push_latency.clone(),
        );
        m
    }

    pub(crate) fn connected(&self, mode: &'static str) -> Gauge {
        self.connected.get_or_create(&ModeLabels { mode }).clone()
    }

    pub(crate) fn responses(&self, ty: ResourceType, mode: &'static str) -> Counter {
        self.responses.get_or_create(&labels(ty, mode)).clone()
    }

    pub(crate) fn sent_bytes(&self, ty: ResourceType, mode: &'static str) -> Counter {
        self.sent_bytes.get_or_create(&labels(ty, mode)).clone()
    }

    pub(crate) fn nacks(&self, ty: ResourceType, mode: &'static str) -> Counter {
        self.nacks.get_or_create(&labels(ty, mode)).clone()
    }

    pub(crate) fn push_latency(&self, ty: ResourceType, mode: &'static str) -> Histogram {
        self.push_latency.get_or_create(&labels(ty, mode)).clone()
    }

    /// Total NACKs so far, all types and modes.
    pub fn nack_total(&self) -> u64 {
        ResourceType::ALL
            .iter()
            .flat_map(|ty| ["sotw", "delta"].map(|mode| self.nacks(*ty, mode).get()))
            .sum()
    }

    /// Responses pushed so far for `ty` (both modes).
    pub fn responses_total(&self, ty: ResourceType) -> u64 {
        ["sotw", "delta"]
            .iter()
            .map(|mode| self.responses(ty, mode).get())
            .sum()
    }

    /// Total bytes pushed so far for `ty` (both modes).
    pub fn sent_bytes_total(&self, ty: ResourceType) -> u64 {
        ["sotw", "delta"]
            .iter()
            .map(|mode| self.sent_bytes(ty, mode).get())
            .sum()
    }

    /// Total bytes pushed so far, all types.
    pub fn sent_bytes_all(&self) -> u64 {
        ResourceType::ALL
            .iter()
            .map(|ty| self.sent_bytes_total(*ty))
            .sum()
    }
}

fn labels(ty: ResourceType, mode: &'static str) -> TypeLabels {
    TypeLabels {
        r#type: ty.short_name(),
        mode,
    }
}
