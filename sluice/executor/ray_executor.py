"""The `ray` executor: the workers as Ray actors, one per rank (tensor-parallel ranks x pipeline
stages), placed by a placement group (one bundle per rank: a CPU, or a GPU on CUDA), so ranks can
live on other machines of a Ray cluster. The engine core drives them as `mp` drives its
processes: every call goes to every rank, a step's answer is the last stage's first rank's, and
the ranks meet in one torch.distributed group (gloo on CPU, NCCL on CUDA) whose address rank 0's
actor chooses on its own node.

The core joins the cluster RAY_ADDRESS names, or one already started in its process
(`ray.init(...)`), or starts a local one.
"""

from __future__ import annotations

import logging
import socket

from sluice.config import EngineConfig
from sluice.core.sched_output import RunnerOutput, SchedulerOutput
from sluice.distributed.sharding import check_parallel
from sluice.executor.abstract import Executor, StepFuture, WorkerDiedError
from sluice.loader import ModelSource
from sluice.models.registry import get_model_class

logger = logging.getLogger("sluice")

PLACEMENT_TIMEOUT_S = 120.0


class RayWorker:
    """A Worker inside a Ray actor (ray.remote wraps this class when the executor starts)."""

    def __init__(self) -> None:
        self.worker = None

    def address(self) -> tuple[str, int]:
        """This node's address and a free port on it: rank 0's process-group rendezvous."""
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            return ray.util.get_node_ip_address(), probe.getsockname()[1]

    def start(self, config: EngineConfig, hf_config, source: ModelSource, rank: int, init_method: str,
              log_level: int) -> None:
        import ray
        import torch

        from sluice.worker.worker import Worker, configure_logging

        configure_logging(log_level, rank, config.parallel.world_size)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))  # the bundle's CPUs, as mp binds a rank's share
        self.worker = Worker(config, hf_config, source, rank, init_method)

    def call(self, method: str, *args):
        return getattr(self.worker, method)(*args)


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig, hf_config, source: ModelSource) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        parallel = config.parallel
        tp = parallel.world_size
        check_parallel(hf_config, get_model_class(hf_config), parallel.tensor_parallel_size,
                       parallel.pipeline_parallel_size)
        self.driver = parallel.driver_rank
        self.num_stages = parallel.pipeline_parallel_size
        if not ray.is_initialized():
            ray.init()
        bundle = {"GPU": 1, "CPU": 1} if config.model.device == "cuda" else {"CPU": 1}
        self.placement = placement_group([bundle] * tp, strategy="PACK")
        try:
            ray.get(self.placement.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.placement)
            raise ValueError(f"{parallel.describe_ranks()} with distributed_executor_backend='ray': the Ray cluster "
                             f"could not place {tp} bundles of {bundle} in {PLACEMENT_TIMEOUT_S:.0f} s; it has "
                             f"{ray.available_resources()} free") from None
        actor = ray.remote(RayWorker)
        self.actors = [actor.options(num_cpus=1, num_gpus=bundle.get("GPU", 0),
                                     scheduling_strategy=PlacementGroupSchedulingStrategy(
                                         self.placement, placement_group_bundle_index=rank)).remote()
                       for rank in range(tp)]
        host, port = ray.get(self.actors[0].address.remote())
        level = logging.getLogger("sluice").getEffectiveLevel()
        self._get([a.start.remote(config, hf_config, source, rank, f"tcp://{host}:{port}", level)
                   for rank, a in enumerate(self.actors)])
        logger.info("ray executor: %d worker actors in placement group %s", tp, self.placement.id.hex())

    def collective_rpc(self, method: str, *args) -> list:
        return self._get([a.call.remote(method, *args) for a in self.actors])

    @property
    def max_concurrent_batches(self) -> int:
        return self.num_stages

    def execute_model(self, scheduler_output: SchedulerOutput,
                      non_block: bool = False) -> RunnerOutput | StepFuture:
        # an actor runs its calls in the order they were sent: a later step queues behind this one
        refs = [a.call.remote("execute_model", scheduler_output) for a in self.actors]
        if not non_block:
            return self._get(refs)[self.driver]
        return StepFuture(lambda future: self._resolve(future, refs))

    def _resolve(self, future: StepFuture, refs: list) -> None:
        try:
            future.set_result(self._get(refs)[self.driver])
        except Exception as exc:
            future.set_exception(exc)

    def _get(self, refs: list) -> list:
        """The ranks' results; the first rank to fail fails the call at once (its peers may be
        waiting on it inside a collective)."""
        import ray

        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                ray.get(ready)
            return ray.get(refs)
        except ray.exceptions.RayActorError as e:
            rank = next((i for i, ref in enumerate(refs) if _failed(ref)), "?")
            raise WorkerDiedError(f"the Ray worker actor of rank {rank} of {len(refs)} died: "
                                  f"{e.error_msg if hasattr(e, 'error_msg') else e}") from None
        except ray.exceptions.RayTaskError as e:
            cause = e.cause
            if isinstance(cause, ValueError):  # a refused control call: the caller's to answer
                raise ValueError(str(cause)) from None
            raise RuntimeError(f"worker failed: {type(cause).__name__}: {cause}") from None

    def shutdown(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for a in self.actors:
            ray.kill(a)
        ray.util.remove_placement_group(self.placement)


def _failed(ref) -> bool:
    import ray

    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return False
    try:
        ray.get(ready[0])
    except ray.exceptions.RayError:
        return True
    return False
