//! The activator's side of `proto/knarr/activator.proto`: revisions arrive over delta ADS (node
//! cluster `knarr-activator`, a wildcard subscription to `knarr.activator.v1.Revision`) and go
//! into the [`Revisions`] table; load goes back on the `Autoscaler.ReportStats` client stream.
//!
//! Both reconnect on their own with a capped back-off. While the control plane is away the
//! activator keeps the revisions it last knew (last good config wins) and drops the stats it
//! cannot send; on reconnect it tells the server which versions it holds
//! (`initial_resource_versions`), so it hears only of what changed, deletions included.

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use knarr_proto::activator::{
    ReportStatsResponse, Revision, RevisionStats, ACTIVATOR_NODE_CLUSTER, REPORT_STATS_PATH,
    REVISION_TYPE_URL,
};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::revisions::{validate, Revisions};

/// The first and the longest wait between connection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// gRPC's INVALID_ARGUMENT, for NACKs.
const INVALID_ARGUMENT: i32 = 3;

/// Who the activator is to the control plane, and where that is.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub xds_addr: http::Uri,
    pub node_id: String,
}

/// Runs both streams until the process ends.
pub async fn run(config: ClientConfig, revisions: Revisions, stats: mpsc::Receiver<RevisionStats>) {
    tokio::join!(
        follow_revisions(&config, &revisions),
        report_stats(&config, stats)
    );
}

async fn connect(addr: &http::Uri) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from(addr.clone())
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect()
        .await
}

fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(BACKOFF_MAX)
}

/// The revisions stream, reconnecting forever.
async fn follow_revisions(config: &ClientConfig, revisions: &Revisions) {
    // What this activator holds: resource name → version.
    let mut held: BTreeMap<String, String> = BTreeMap::new();
    let mut backoff = BACKOFF_MIN;
    loop {
        match revisions_stream(config, revisions, &mut held, &mut backoff).await {
            Ok(()) => info!(addr = %config.xds_addr, "control plane closed the revisions stream"),
            Err(e) => {
                warn!(addr = %config.xds_addr, error = %e, "revisions stream failed; keeping the last revisions")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = next_backoff(backoff);
    }
}

async fn revisions_stream(
    config: &ClientConfig,
    revisions: &Revisions,
    held: &mut BTreeMap<String, String>,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    let channel = connect(&config.xds_addr).await?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(16);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: config.node_id.clone(),
            cluster: ACTIVATOR_NODE_CLUSTER.to_owned(),
            ..Default::default()
        }),
        type_url: REVISION_TYPE_URL.to_owned(),
        resource_names_subscribe: vec!["*".to_owned()],
        initial_resource_versions: held.clone().into_iter().collect(),
        ..Default::default()
    })
    .await?;
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    info!(addr = %config.xds_addr, "following revisions from the control plane");
    while let Some(response) = responses.message().await? {
        *backoff = BACKOFF_MIN;
        let reply = apply(&response, revisions, held);
        tx.send(reply).await?;
    }
    Ok(())
}

/// Applies one response, all or nothing, and returns its ACK (or NACK).
fn apply(
    response: &DeltaDiscoveryResponse,
    revisions: &Revisions,
    held: &mut BTreeMap<String, String>,
) -> DeltaDiscoveryRequest {
    let reply = |error: Option<String>| DeltaDiscoveryRequest {
        type_url: REVISION_TYPE_URL.to_owned(),
        response_nonce: response.nonce.clone(),
        error_detail: error.map(|message| RpcStatus {
            code: INVALID_ARGUMENT,
            message,
            details: Vec::new(),
        }),
        ..Default::default()
    };
    if response.type_url != REVISION_TYPE_URL {
        return reply(Some(format!("unexpected type {}", response.type_url)));
    }
    let mut decoded = Vec::with_capacity(response.resources.len());
    for resource in &response.resources {
        let revision = match &resource.resource {
            Some(any) => match Revision::decode(any.value.as_slice()) {
                Ok(r) => r,
                Err(e) => return reply(Some(format!("{}: cannot decode: {e}", resource.name))),
            },
            None => return reply(Some(format!("{}: no resource body", resource.name))),
        };
        if let Err(e) = validate(&revision) {
            warn!(name = %resource.name, error = %e, "rejecting revisions from the control plane");
            return reply(Some(format!("{}: {e}", resource.name)));
        }
        decoded.push((resource.name.clone(), resource.version.clone(), revision));
    }
    for (name, version, revision) in decoded {
        debug!(%name, %version, endpoints = revision.endpoints.len(), "revision");
        // Validated above, so this applies.
        if let Err(e) = revisions.upsert(revision) {
            warn!(%name, error = %e, "revision refused");
            continue;
        }
        held.insert(name, version);
    }
    for name in &response.removed_resources {
        if let Some((namespace, revision)) = name.split_once('/') {
            revisions.remove(namespace, revision);
        }
        held.remove(name);
    }
    reply(None)
}

/// The stats stream, reconnecting forever; stats that cannot be sent are dropped.
async fn report_stats(config: &ClientConfig, mut stats: mpsc::Receiver<RevisionStats>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let channel = match connect(&config.xds_addr).await {
            Ok(channel) => channel,
            Err(e) => {
                debug!(error = %e, "cannot reach the control plane for stats");
                drain_for(&mut stats, backoff).await;
                backoff = next_backoff(backoff);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        let mut grpc = tonic::client::Grpc::new(channel);
        if let Err(e) = grpc.ready().await {
            debug!(error = %e, "stats channel not ready");
            continue;
        }
        let (tx, rx) = mpsc::channel::<RevisionStats>(1024);
        let call = grpc.client_streaming::<_, RevisionStats, ReportStatsResponse, _>(
            tonic::Request::new(ReceiverStream::new(rx)),
            http::uri::PathAndQuery::from_static(REPORT_STATS_PATH),
            tonic_prost::ProstCodec::default(),
        );
        let forward = async {
            while let Some(s) = stats.recv().await {
                if tx.send(s).await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            ended = call => match ended {
                Ok(_) => info!("control plane closed the stats stream"),
                Err(e) => warn!(error = %e, "stats stream failed"),
            },
            () = forward => return,
        }
    }
}

/// Drops stats for `wait` (nobody to send them to), returning early if the channel closes.
async fn drain_for(stats: &mut mpsc::Receiver<RevisionStats>, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, stats.recv()).await {}
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::Resource as XdsResource;
    use envoy_types::pb::google::protobuf::Any;
    use knarr_proto::activator::Endpoint;

    use super::*;

    fn resource(name: &str, revision: &Revision) -> XdsResource {
        XdsResource {
            name: name.to_owned(),
            version: format!("v-{}", revision.endpoints.len()),
            resource: Some(Any {
                type_url: REVISION_TYPE_URL.to_owned(),
                value: revision.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    fn revision(name: &str, ports: &[u32]) -> Revision {
        Revision {
            namespace: "default".into(),
            name: name.into(),
            container_concurrency: 1,
            endpoints: ports
                .iter()
                .map(|port| Endpoint {
                    address: "127.0.0.1".into(),
                    port: *port,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn response(
        nonce: &str,
        resources: Vec<XdsResource>,
        removed: &[&str],
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: REVISION_TYPE_URL.to_owned(),
            nonce: nonce.to_owned(),
            resources,
            removed_resources: removed.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn responses_are_applied_and_acked_and_removals_remove() {
        let (tx, _rx) = crate::stats_channel();
        let revisions = Revisions::new("test", 10, tx);
        let mut held = BTreeMap::new();
        let a = response(
            "1",
            vec![
                resource("default/a", &revision("a", &[9001])),
                resource("default/b", &revision("b", &[])),
            ],
            &[],
        );
        let ack = apply(&a, &revisions, &mut held);
        assert_eq!(ack.response_nonce, "1");
        assert!(ack.error_detail.is_none());
        assert_eq!(revisions.names(), ["default/a", "default/b"]);
        assert_eq!(held.get("default/a").map(String::as_str), Some("v-1"));

        let ack = apply(
            &response("2", vec![], &["default/a"]),
            &revisions,
            &mut held,
        );
        assert!(ack.error_detail.is_none());
        assert_eq!(revisions.names(), ["default/b"]);
        assert!(!held.contains_key("default/a"));
    }

    #[tokio::test]
    async fn a_bad_response_is_nacked_and_changes_nothing() {
        let (tx, _rx) = crate::stats_channel();
        let revisions = Revisions::new("test", 10, tx);
        let mut held = BTreeMap::new();
        let bad = revision("c", &[70000]);
        let mixed = response(
            "7",
            vec![
                resource("default/ok", &revision("ok", &[9001])),
                resource("default/c", &bad),
            ],
            &[],
        );
        let nack = apply(&mixed, &revisions, &mut held);
        assert_eq!(nack.response_nonce, "7");
        let detail = nack.error_detail.expect("a NACK");
        assert!(detail.message.contains("default/c"), "{}", detail.message);
        assert!(revisions.names().is_empty(), "all or nothing");
        assert!(held.is_empty());

        let mut garbage = resource("default/g", &revision("g", &[]));
        if let Some(any) = &mut garbage.resource {
            any.value = vec![0xff, 0xff, 0xff];
        }
        let nack = apply(&response("8", vec![garbage], &[]), &revisions, &mut held);
        assert!(nack.error_detail.is_some());
    }
}
