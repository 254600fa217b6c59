//! The `knarr.activator.v1.Autoscaler` gRPC service (`proto/knarr/activator.proto`): activators
//! stream per-revision load (and pokes) to the control plane on the xDS port, where
//! [`crate::app`] adds it to the xDS server's [`knarr_xds::XdsServerConfig::services`]. Written
//! against tonic's server primitives, as generated code would be, since the messages are
//! hand-derived (no `protoc` at build time).

use std::convert::Infallible;
use std::task::{Context, Poll};

use knarr_proto::activator::{ReportStatsResponse, RevisionStats, REPORT_STATS_PATH};
use tokio::sync::mpsc;
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::server::{ClientStreamingService, Grpc, NamedService};
use tonic::{Request, Response, Status, Streaming};

/// Where the stats activators report go.
pub type StatsSink = mpsc::Sender<RevisionStats>;

/// The server side of `Autoscaler`.
#[derive(Clone)]
pub struct AutoscalerServer {
    sink: StatsSink,
}

impl AutoscalerServer {
    pub fn new(sink: StatsSink) -> Self {
        AutoscalerServer { sink }
    }
}

impl NamedService for AutoscalerServer {
    const NAME: &'static str = "knarr.activator.v1.Autoscaler";
}

impl<B> Service<http::Request<B>> for AutoscalerServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != REPORT_STATS_PATH {
            let path = req.uri().path().to_owned();
            return Box::pin(async move {
                Ok(Status::unimplemented(format!("{path}: not a Knarr method")).into_http())
            });
        }
        let method = ReportStats(self.sink.clone());
        Box::pin(async move {
            let mut grpc = Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.client_streaming(method, req).await)
        })
    }
}

/// One `ReportStats` call: every message goes to the sink until the activator closes the stream.
struct ReportStats(StatsSink);

impl ClientStreamingService<RevisionStats> for ReportStats {
    type Response = ReportStatsResponse;
    type Future = BoxFuture<Response<ReportStatsResponse>, Status>;

    fn call(&mut self, request: Request<Streaming<RevisionStats>>) -> Self::Future {
        let sink = self.0.clone();
        Box::pin(async move {
            let mut stream = request.into_inner();
            while let Some(stats) = stream.message().await? {
                if sink.send(stats).await.is_err() {
                    return Err(Status::unavailable("the control plane is stopping"));
                }
            }
            Ok(Response::new(ReportStatsResponse {}))
        })
    }
}
