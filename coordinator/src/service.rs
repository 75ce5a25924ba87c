//! gRPC handlers: convert each request once into its domain type, call [`Coordinator`], map errors.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use hcmoco_proto::domain;
use hcmoco_proto::pb;
use hcmoco_proto::pb::job_service_server::JobService;
use hcmoco_proto::pb::worker_service_server::WorkerService;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::state::{Coordinator, RENDEZVOUS_POLL};

/// JobService over a shared [`Coordinator`].
#[derive(Debug, Clone)]
pub struct JobApi {
    pub coordinator: Coordinator,
    /// Ends open status streams when the server shuts down.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// WorkerService over a shared [`Coordinator`].
#[derive(Debug, Clone)]
pub struct WorkerApi {
    pub coordinator: Coordinator,
    /// Long-poll window of Rendezvous.
    pub rendezvous_poll: Duration,
}

impl WorkerApi {
    pub fn new(coordinator: Coordinator) -> Self {
        WorkerApi { coordinator, rendezvous_poll: RENDEZVOUS_POLL }
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::JobStatus, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let req = domain::SubmitJob::try_from(req.into_inner())?;
        let id = match &req.resume {
            None => self.coordinator.submit(req.config)?,
            Some(dir) => self.coordinator.submit_resumed(req.config, dir)?,
        };
        self.coordinator.persist().await?;
        Ok(Response::new(pb::SubmitJobResponse { job_id: id.0 }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::JobStatus>, Status> {
        let req = domain::JobRef::try_from(req.into_inner())?;
        Ok(Response::new(self.coordinator.status(&req.job_id)?))
    }

    async fn list_jobs(&self, _req: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        Ok(Response::new(pb::ListJobsResponse { jobs: self.coordinator.list() }))
    }

    type WatchJobStream = StatusStream;

    async fn watch_job(&self, req: Request<pb::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let req = domain::JobRef::try_from(req.into_inner())?;
        let mut changed = self.coordinator.subscribe(&req.job_id)?;
        let coordinator = self.coordinator.clone();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                changed.borrow_and_update();
                let status = coordinator.status(&req.job_id).map_err(Status::from);
                let terminal = status.as_ref().map_or(true, |s| {
                    matches!(
                        pb::JobState::try_from(s.state),
                        Ok(pb::JobState::Completed | pb::JobState::Failed | pb::JobState::Cancelled)
                    )
                });
                if tx.send(status).await.is_err() || terminal {
                    return;
                }
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("the coordinator is shutting down"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Result<Response<pb::CancelJobResponse>, Status> {
        let req = domain::CancelJob::try_from(req.into_inner())?;
        let state = self.coordinator.cancel(&req.job_id, &req.reason)?;
        self.coordinator.persist().await?;
        Ok(Response::new(pb::CancelJobResponse { state: pb::JobState::from(state) as i32 }))
    }

    async fn scale_job(&self, req: Request<pb::ScaleJobRequest>) -> Result<Response<pb::ScaleJobResponse>, Status> {
        let req = domain::ScaleJob::try_from(req.into_inner())?;
        let (workers, generation) = self.coordinator.scale(req)?;
        self.coordinator.persist().await?;
        Ok(Response::new(pb::ScaleJobResponse { workers, generation }))
    }

    async fn checkpoint_job(
        &self,
        req: Request<pb::CheckpointJobRequest>,
    ) -> Result<Response<pb::CheckpointJobResponse>, Status> {
        let req = domain::JobRef::try_from(req.into_inner())?;
        let steps = self.coordinator.request_checkpoint(&req.job_id)?;
        self.coordinator.persist().await?;
        Ok(Response::new(pb::CheckpointJobResponse { steps }))
    }

    type GetLedgerStream = Pin<Box<dyn Stream<Item = Result<pb::LedgerChunk, Status>> + Send + 'static>>;

    async fn get_ledger(&self, req: Request<pb::GetLedgerRequest>) -> Result<Response<Self::GetLedgerStream>, Status> {
        let req = domain::LedgerRef::try_from(req.into_inner())?;
        let entries = self.coordinator.ledger(&req)?;
        // Chunks of a few thousand entries keep every message far below gRPC's 4 MiB default.
        let chunks: Vec<Result<pb::LedgerChunk, Status>> =
            entries.chunks(4096).map(|c| Ok(pb::LedgerChunk { entries: c.to_vec() })).collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        let req = domain::Join::try_from(req.into_inner())?;
        let resp = self.coordinator.join(req)?;
        self.coordinator.persist().await?;
        Ok(Response::new(resp))
    }

    async fn rendezvous(
        &self,
        req: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        let req = domain::Rendezvous::try_from(req.into_inner())?;
        let resp = match self.coordinator.rendezvous(req, self.rendezvous_poll).await? {
            None => pb::RendezvousResponse { ready: false, ..Default::default() },
            Some(a) => a.into(),
        };
        // A sealed generation is durable before any member hears of it.
        self.coordinator.persist().await?;
        Ok(Response::new(resp))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = domain::Heartbeat::try_from(req.into_inner())?;
        Ok(Response::new(self.coordinator.heartbeat(req)?))
    }

    async fn fetch_work(&self, req: Request<pb::FetchWorkRequest>) -> Result<Response<pb::FetchWorkResponse>, Status> {
        let req = domain::FetchWork::try_from(req.into_inner())?;
        let step = req.step;
        let mut resp: pb::FetchWorkResponse = self.coordinator.fetch_work(req)?.into();
        resp.step = step;
        Ok(Response::new(resp))
    }

    async fn report_step(
        &self,
        req: Request<pb::ReportStepRequest>,
    ) -> Result<Response<pb::ReportStepResponse>, Status> {
        let req = domain::ReportStep::try_from(req.into_inner())?;
        let resp = self.coordinator.report_step(req)?;
        // The step this report commits is durable before the rank goes on.
        self.coordinator.persist().await?;
        Ok(Response::new(resp))
    }

    async fn report_failure(
        &self,
        req: Request<pb::ReportFailureRequest>,
    ) -> Result<Response<pb::ReportFailureResponse>, Status> {
        let req = domain::ReportFailure::try_from(req.into_inner())?;
        self.coordinator.report_failure(req)?;
        self.coordinator.persist().await?;
        Ok(Response::new(pb::ReportFailureResponse {}))
    }

    async fn leave(&self, req: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveResponse>, Status> {
        let req = domain::Leave::try_from(req.into_inner())?;
        let resp = self.coordinator.leave(req)?;
        self.coordinator.persist().await?;
        Ok(Response::new(resp))
    }
}
