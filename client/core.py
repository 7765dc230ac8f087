"""What `IceClient` and `AsyncIceClient` share besides requests and results (client/messages.py): targets, the
channel configuration, one channel per service (plus one per learner replica that owns a job), and turning a
failed call into `ServiceError`. The two subclasses differ only in how a channel is opened and a call is made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
from google.longrunning import operations_pb2_grpc

from client import messages as M
from client import tracing
from client.channel import DEFAULT_TARGETS, ChannelConfig, display_target
from client.errors import ServiceError, from_rpc_error
from client.longcalls import Resume
from client.messages import EVALUATOR, LEARNER, LOCALIZER, OPERATIONS
from client.options import Schedule, few_class_images
from client.types import Job, JobPlan, JobProgress
from ice.evaluator.v1 import evaluator_pb2_grpc
from ice.learner.v1 import learner_pb2, learner_pb2_grpc
from ice.localizer.v1 import localizer_pb2_grpc

STUBS = {
    LOCALIZER: localizer_pb2_grpc.LocalizerServiceStub,
    LEARNER: learner_pb2_grpc.LearnerServiceStub,
    EVALUATOR: evaluator_pb2_grpc.EvaluatorServiceStub,
    OPERATIONS: operations_pb2_grpc.OperationsStub,
}


class ClientCore:
    """Channels to the localizer, learner and evaluator.

    `localizer`, `learner`, `evaluator`: targets such as "host:port" or "dns:///svc.namespace:50051" (None =
    localhost and the service's default port). `token`, `tls` and the rest of the channel set-up come from
    `config` (a `ChannelConfig`) or the keyword arguments that mirror it. `timeout` is the deadline of each
    unary call in seconds.
    """

    def __init__(
        self,
        localizer: str | None = None,
        learner: str | None = None,
        evaluator: str | None = None,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        tls: bool = False,
        root_certificates: str | Path | None = None,
        client_certificate: str | Path | None = None,
        client_key: str | Path | None = None,
        timeout: float = 600.0,
        config: ChannelConfig | None = None,
    ):
        # told the plan of each job `learn` creates, before it is created (the CLI prints it)
        self.on_plan: Callable[[JobPlan], None] | None = None
        self.config = config or ChannelConfig(
            tls=tls,
            root_certificates=Path(root_certificates) if root_certificates else None,
            client_certificate=Path(client_certificate) if client_certificate else None,
            client_key=Path(client_key) if client_key else None,
            token=token,
            token_file=Path(token_file) if token_file else None,
            timeout=timeout,
        )
        self.targets = {
            "localizer": localizer or DEFAULT_TARGETS["localizer"],
            "learner": learner or DEFAULT_TARGETS["learner"],
            "evaluator": evaluator or DEFAULT_TARGETS["evaluator"],
        }
        self._channels: dict = {}
        # operation name -> the learner replica that owns the job (from its metadata's replica_address)
        self._owners: dict[str, str] = {}
        tracing.configure_client_from_env()

    def _open(self, target: str):  # pragma: no cover - each subclass opens its kind of channel
        raise NotImplementedError

    def _channel(self, service: str):
        if service not in self._channels:
            self._channels[service] = self._open(self.targets[service])
        return self._channels[service]

    def _job_route(self, job: Job | str) -> tuple[Job, object, str]:
        """(job, channel, address) for calls about `job`: straight to the replica that owns it when known (a job
        lives on one learner replica; a load-balanced target could reach another), else the learner target."""
        job = Job.of(job)
        address = job.replica or self._owners.get(job.name)
        if not address:
            return job, self._channel("learner"), display_target(self.targets["learner"])
        key = f"learner@{address}"
        if key not in self._channels:
            self._channels[key] = self._open(address)
        return job, self._channels[key], address

    def _planning(self, options) -> bool:
        return bool(options.few_class_images or self.on_plan)

    def _remember(self, name: str, metadata: learner_pb2.LearningJobMetadata) -> None:
        if metadata.replica_address:
            self._owners[name] = metadata.replica_address

    def _route(self, service: str, channel=None, address: str | None = None) -> tuple[object, str]:
        if channel is None:
            return self._channel(service), display_target(self.targets[service])
        return channel, address or display_target(self.targets[service])

    @staticmethod
    def _method(channel, grpc_service: str, name: str):
        return getattr(STUBS[grpc_service](channel), name)

    def _error(self, error: grpc.RpcError, service: str, address: str | None = None) -> ServiceError:
        return from_rpc_error(error, service, address or display_target(self.targets[service]))

    def _deadline(self, timeout: float | None | str) -> float | None:
        return self.config.timeout if timeout == "default" else timeout


def scaled_schedule(schedule: Schedule, plan: JobPlan | None) -> Schedule:
    """`schedule` with its class images scaled to the job's steps (`few_class_images`): the steps of the learner's
    plan (its defaults may be the bundle's), or of the schedule and the published defaults from a learner that
    cannot plan (`plan` None)."""
    total = plan.total_steps if plan is not None else sum(
        v if v is not None else d for v, d in ((schedule.phase1_steps, 400), (schedule.phase2_steps, 400),
                                               (schedule.refinement_steps, 300)))
    return replace(schedule, num_class_images=few_class_images(total))


class JobWatch:
    """The decisions of one job watch, shared by `IceClient.watch` and `AsyncIceClient.watch` (which only differ in
    how they read a stream and sleep): the replica to open the stream on, which updates are new, and what to do
    when a stream ends or fails (`client.longcalls.Resume`)."""

    def __init__(self, core: ClientCore, job: Job | str, timeout: float | None):
        self._core = core
        self._job = Job.of(job)
        self._resume = Resume(core.config, timeout)
        self._finished = False

    def stream(self) -> tuple:
        """The arguments of the client's `_stream` for the next WatchLearningJob."""
        self._job, channel, address = self._core._job_route(self._job)
        request = learner_pb2.WatchLearningJobRequest(name=self._job.name)
        return "learner", LEARNER, "WatchLearningJob", request, self._resume.remaining(), channel, address

    def take(self, response) -> JobProgress | None:
        """The progress to yield for one streamed update, or None for one already seen."""
        self._core._remember(self._job.name, response.metadata)
        progress = M.watch_progress(response)
        # the caller reads the stream to its end: leaving it at the final update would cancel the call
        self._finished = self._finished or progress.done
        return progress if self._resume.fresh(progress) else None

    def after_error(self, error: ServiceError) -> float:
        """Seconds to wait before re-opening the stream; raises `error` when the watch gives up."""
        delay = self._resume.after_error(error)
        if delay is None:
            raise error
        return delay

    def after_end(self) -> float | None:
        """Seconds to wait before re-opening a stream that ended, or None when the watch is over."""
        return None if self._finished else self._resume.after_end()
