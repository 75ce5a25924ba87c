//! Serving: the caller binds the listener and passes a shutdown token (tests bind `127.0.0.1:0`).

use std::time::Duration;

use hcmoco_proto::pb::job_service_server::JobServiceServer;
use hcmoco_proto::pb::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::service::{JobApi, WorkerApi};
use crate::state::Coordinator;

/// How long shutdown waits for in-flight calls.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How often heartbeat leases are checked.
pub const REAP_EVERY: Duration = Duration::from_millis(250);

/// Every call to JobService and WorkerService is answered by the leader only: a standby refuses it
/// with `Unavailable` naming the leader (`Coordinator::serving`).
fn leader_only(
    coordinator: Coordinator,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req| coordinator.serving().map(|()| req)
}

/// Serves JobService, WorkerService, gRPC health and reflection on `listener` until `shutdown`.
pub async fn run(listener: TcpListener, coordinator: Coordinator, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobServiceServer<JobApi>>().await;
    health.set_serving::<WorkerServiceServer<WorkerApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hcmoco_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let reaper = {
        let coordinator = coordinator.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REAP_EVERY);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        if coordinator.serving().is_ok() {
                            let now = tokio::time::Instant::now();
                            coordinator.reap(now);
                            let targets = coordinator.probe_targets(now);
                            if !targets.is_empty() {
                                let coordinator = coordinator.clone();
                                tokio::spawn(async move { coordinator.probe(targets).await });
                            }
                            if let Err(e) = coordinator.persist().await {
                                tracing::warn!(error = %e.message(), "persisting after the lease check failed");
                            }
                        }
                    }
                }
            }
        })
    };

    tracing::info!(%addr, "coordinator serving");
    let serve = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(JobServiceServer::with_interceptor(
            JobApi { coordinator: coordinator.clone(), shutdown: shutdown.clone() },
            leader_only(coordinator.clone()),
        ))
        .add_service(WorkerServiceServer::with_interceptor(
            WorkerApi::new(coordinator.clone()),
            leader_only(coordinator),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.clone().cancelled_owned());
    // Shutdown drains in-flight calls (a rendezvous long poll, a status stream), bounded by a grace period.
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        r = serve => r,
        _ = grace => {
            tracing::warn!(%addr, "shutdown grace period over, dropping open calls");
            Ok(())
        }
    };
    shutdown.cancel();
    let _ = reaper.await;
    tracing::info!(%addr, "coordinator stopped");
    Ok(result?)
}
