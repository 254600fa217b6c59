//! Backends and clients for Knative's ingress conformance cases
//! (knative.dev/networking `test/conformance/ingress`), run against Knarr's
//! real Envoy.
//!
//! - [`GrpcEcho`] / [`GrpcStreamClient`]: bidirectional gRPC-framed echo
//!   over h2c (`grpc`, `grpc/split`).
//! - [`WebSocketEcho`] / [`ws_connect`]: WebSocket echo (`websocket`,
//!   `websocket/split`).
//! - [`TestCa`] / [`https_get`]: certificates for TLS Secrets and an HTTPS
//!   client that reports the negotiated ALPN (`tls`).
//! - [`LoadGenerator`]: continuous traffic with a per-request log (`update`).
//!
//! The plain-HTTP backend for the other cases (probes, protocol and host
//! reporting, failures, slow writes) is [`Upstream`](crate::Upstream).
//! Everything binds `127.0.0.1:0` and bounds every wait.

mod grpc;
mod load;
mod server;
mod tls;
mod websocket;

pub use grpc::{grpc_frame, GrpcEcho, GrpcStreamClient};
pub use load::{LoadBuilder, LoadGenerator, LoadSummary, RequestRecord, DEFAULT_MAX_DURATION};
pub use server::TestServer;
pub use tls::{https_get, https_get_with_alpn, server_config, HttpsReply, LeafCert, TestCa};
pub use websocket::{ws_connect, ws_connect_with_headers, WebSocketEcho, WsClient};
