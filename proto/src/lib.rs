//! Protobuf messages Knarr exchanges with Knative components.
//!
//! The `.proto` sources under `proto/knarr/` are the documentation of record; the Rust types here
//! are written with `prost` derives (no `protoc` at build time) and a unit test pins their wire
//! encoding to the field numbers in the `.proto` file.

/// The autoscaler's per-pod load report (`proto/knarr/stat.proto`), wire-compatible with
/// Knative's `autoscaler.Stat`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Stat {
    #[prost(string, tag = "1")]
    pub pod_name: String,
    #[prost(double, tag = "2")]
    pub average_concurrent_requests: f64,
    #[prost(double, tag = "3")]
    pub average_proxied_concurrent_requests: f64,
    #[prost(double, tag = "4")]
    pub request_count: f64,
    #[prost(double, tag = "5")]
    pub proxied_request_count: f64,
    #[prost(double, tag = "6")]
    pub process_uptime: f64,
    #[prost(int64, tag = "7")]
    pub timestamp: i64,
}

/// The activator's protocol with the control plane (`proto/knarr/activator.proto`).
pub mod activator {
    /// The ADS resource type of [`Revision`].
    pub const REVISION_TYPE_URL: &str = "type.googleapis.com/knarr.activator.v1.Revision";
    /// The node cluster activators announce.
    pub const ACTIVATOR_NODE_CLUSTER: &str = "knarr-activator";
    /// The gRPC path of `Autoscaler.ReportStats`.
    pub const REPORT_STATS_PATH: &str = "/knarr.activator.v1.Autoscaler/ReportStats";

    /// One revision as an activator sees it; resource name `namespace/name`.
    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct Revision {
        #[prost(string, tag = "1")]
        pub namespace: String,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(int64, tag = "3")]
        pub container_concurrency: i64,
        #[prost(int64, tag = "4")]
        pub timeout_seconds: i64,
        #[prost(int64, tag = "5")]
        pub response_start_timeout_seconds: i64,
        #[prost(int64, tag = "6")]
        pub idle_timeout_seconds: i64,
        #[prost(message, repeated, tag = "7")]
        pub endpoints: Vec<Endpoint>,
    }

    /// A ready pod's queue-proxy serving address.
    #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Message)]
    pub struct Endpoint {
        #[prost(string, tag = "1")]
        pub address: String,
        #[prost(uint32, tag = "2")]
        pub port: u32,
    }

    /// Per-revision load from one activator, every second (or at once, as a poke).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RevisionStats {
        #[prost(string, tag = "1")]
        pub activator: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(string, tag = "3")]
        pub revision: String,
        #[prost(double, tag = "4")]
        pub average_concurrency: f64,
        #[prost(double, tag = "5")]
        pub request_count: f64,
        #[prost(bool, tag = "6")]
        pub poke: bool,
        #[prost(int64, tag = "7")]
        pub timestamp_millis: i64,
    }

    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub struct ReportStatsResponse {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn stat_uses_knative_field_numbers() {
        let stat = Stat {
            pod_name: "p".into(),
            average_concurrent_requests: 1.0,
            timestamp: 5,
            ..Default::default()
        };
        let bytes = stat.encode_to_vec();
        // field 1, wire type 2 (len) = 0x0a; field 2, wire type 1 (64-bit) = 0x11; field 7 varint = 0x38
        assert_eq!(bytes[0], 0x0a);
        assert_eq!(bytes[3], 0x11);
        assert_eq!(&bytes[bytes.len() - 2..], &[0x38, 5]);
        assert_eq!(Stat::decode(bytes.as_slice()).unwrap(), stat);
    }

    #[test]
    fn activator_messages_use_the_proto_field_numbers() {
        use activator::{Endpoint, Revision, RevisionStats};
        let revision = Revision {
            namespace: "n".into(),
            container_concurrency: 3,
            endpoints: vec![Endpoint {
                address: "a".into(),
                port: 9,
            }],
            ..Default::default()
        };
        // field 1 len = 0x0a, field 3 varint = 0x18, field 7 len = 0x3a
        let bytes = revision.encode_to_vec();
        assert_eq!(&bytes[..5], &[0x0a, 1, b'n', 0x18, 3]);
        assert_eq!(bytes[5], 0x3a);
        assert_eq!(Revision::decode(bytes.as_slice()).unwrap(), revision);
        let stats = RevisionStats {
            poke: true,
            timestamp_millis: 2,
            ..Default::default()
        };
        // field 6 varint = 0x30, field 7 varint = 0x38
        assert_eq!(stats.encode_to_vec(), vec![0x30, 1, 0x38, 2]);
    }
}
