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
}
