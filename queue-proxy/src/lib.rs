//! knarr-queue-proxy: the per-pod sidecar in front of the user container.
//!
//! Requests arrive on `QUEUE_SERVING_PORT` (8012, or 8013 for h2c revisions) from the gateway or
//! the activator, pass the [`breaker`] (Knative's `CONTAINER_CONCURRENCY` and queue depth), are
//! counted by [`stats`], and are proxied ([`proxy`]) to the app on `127.0.0.1:$USER_PORT` with
//! Knative's timeouts. Probes ([`probe`]) decide readiness; [`drain`] handles SIGTERM and
//! `/wait-for-drain`. The autoscaler reads `:9090/metrics` (the `Stat` protobuf); people read
//! Prometheus metrics on `:9091/metrics`. Configuration comes from Knative's environment
//! variables ([`config`]).

pub mod app;
pub mod breaker;
pub mod config;
pub mod drain;
pub mod probe;
pub mod proxy;
pub mod stats;
