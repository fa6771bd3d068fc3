"""TrainingService: training jobs and model promotion (training.proto).

A thin layer over :mod:`reidal.training_jobs`: translate messages, call, translate back.
Domain errors (embedding failures of PromoteModel too) travel to the server's interceptor,
which answers with the status codes they name.
"""

from __future__ import annotations

import grpc

from reidal import errors
from reidal.grpc_server import ServiceBinding
from reidal.services._common import operation_pb, timestamp
from reidal.training_jobs import CLIENT_FIELDS, JobRecord, TrainingJobs, promote
from reidal.v1 import common_pb2, training_pb2, training_pb2_grpc

SERVICE_NAME: str = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name

_STATES = {name: getattr(training_pb2, f"JOB_STATE_{name}")
           for name in ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")}


def config_overrides(config: training_pb2.TrainingConfig) -> dict[str, object]:
    """The fields the client set (proto3 optional presence), by TrainConfig name."""
    return {name: getattr(config, name) for name in CLIENT_FIELDS if config.HasField(name)}


def config_pb(config: dict[str, object]) -> training_pb2.TrainingConfig:
    return training_pb2.TrainingConfig(**{k: config[k] for k in CLIENT_FIELDS if k in config})


def job_pb(job: JobRecord) -> training_pb2.TrainingJob:
    p = job.progress
    return training_pb2.TrainingJob(
        job_id=job.job_id, collection_id=job.collection_id, state=_STATES[job.state],
        config=config_pb(job.config), epoch=int(p.get("epoch", 0)),
        epochs=int(job.config.get("epochs", 0)), loss=float(p.get("loss", 0.0)),
        clusters=int(p.get("clusters", 0)), unclustered=int(p.get("unclustered", 0)),
        pairs_asked=int(p.get("pairs_asked", 0)), answers_used=int(p.get("answers_used", 0)),
        metrics=p.get("metrics", {}),
        base_model=common_pb2.ModelRef(name=job.base_model_name,
                                       version=job.base_model_version),
        model=common_pb2.ModelRef(name=job.model_name, version=job.model_version),
        error_code=job.error_code, error_message=job.error_message,
        created_at=timestamp(job.created_at), updated_at=timestamp(job.updated_at),
        cancel_requested=job.cancel_requested)


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, jobs: TrainingJobs) -> None:
        self.jobs = jobs

    def binding(self) -> ServiceBinding:
        return ServiceBinding(
            name=SERVICE_NAME, servicer=self,
            add_to_server=training_pb2_grpc.add_TrainingServiceServicer_to_server,
            readiness=self.jobs.store.ping, close=self.jobs.close)

    def StartTraining(self, request, context):  # noqa: N802 - gRPC method name
        if not request.collection_id:
            raise errors.InvalidArgument("collection_id is required")
        return job_pb(self.jobs.start(request.collection_id,
                                      config_overrides(request.config)))

    def GetJob(self, request, context):  # noqa: N802
        return job_pb(self.jobs.get(request.job_id))

    def WatchJob(self, request, context):  # noqa: N802
        last = None
        for job in self.jobs.watch(request.job_id, context.is_active):
            last = job
            yield job_pb(job)
        if last is not None and not last.final and self.jobs.runtime.notifier.closed:
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the server is shutting down; the job is interrupted")

    def CancelJob(self, request, context):  # noqa: N802
        return job_pb(self.jobs.cancel(request.job_id))

    def ListTrainingJobs(self, request, context):  # noqa: N802
        return training_pb2.ListTrainingJobsResponse(
            jobs=[job_pb(j) for j in self.jobs.list(request.collection_id)])

    def PromoteModel(self, request, context):  # noqa: N802
        return operation_pb(promote(self.jobs.runtime, request.collection_id,
                                    request.model.name, request.model.version))
