"""The `mp` executor: each worker (one per tensor-parallel rank and pipeline stage) in a process of
its own, one ZMQ PAIR socket to each. Every call goes to all ranks; a step's answer is the last
stage's first rank's (rank 0's without pipeline stages). Ranks are bound
to their share of the CPUs and meet in a torch.distributed group of their own (rank 0 listens
on a free loopback port).

Each step sends the SchedulerOutput (differences only) as msgpack and gets the RunnerOutput
back the same way; no tensor is pickled per step (the grammar bitmask goes as raw bytes). The
start-up arguments (configs, model source) are pickled once. The worker exits when told, or
when the process that started it is gone; a worker that dies (any rank) fails the call waiting
on it with WorkerDiedError (the engine core then fails every request with that reason) instead of hanging.

With pipeline stages the core keeps up to one step per stage in flight: a step is sent at once and
its replies are read when its future is asked for. Each PAIR socket is a FIFO, so replies are read
strictly in the order the steps went out (older steps first, then any other call's).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
import weakref
from collections import deque

import msgspec
import zmq

from sluice.config import EngineConfig
from sluice.core.sched_output import RunnerOutput, SchedulerOutput, decode_hook, encode_hook
from sluice.distributed.sharding import check_parallel
from sluice.executor.abstract import Executor, StepFuture, WorkerDiedError
from sluice.loader import ModelSource
from sluice.models.registry import get_model_class

logger = logging.getLogger("sluice")

POLL_MS = 1000  # how often a waiting side checks that the other one still lives
SHUTDOWN_WAIT_S = 5.0
# a killed rank's sockets close (its peers fail) a moment before the kernel reports its exit
PEER_DEATH_GRACE_S = 1.0

EXECUTE = b"execute_model"
SHUTDOWN = b"shutdown"
OK = b"ok"
ERROR = b"error"
REFUSED = b"refused"

_encode = msgspec.msgpack.Encoder(enc_hook=encode_hook).encode
_decode_any = msgspec.msgpack.Decoder().decode
_decode_step = msgspec.msgpack.Decoder(SchedulerOutput, dec_hook=decode_hook).decode
_decode_result = msgspec.msgpack.Decoder(RunnerOutput).decode


class WorkerProc:
    """One worker process and the PAIR socket to it."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.address = f"ipc://{tempfile.gettempdir()}/sluice-worker-{uuid.uuid4().hex[:12]}.sock"
        self.socket = zmq.Context.instance().socket(zmq.PAIR)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.address)
        self.process = subprocess.Popen([sys.executable, "-m", "sluice.executor.mp", self.address])
        self._finalizer = weakref.finalize(self, _stop, self.process, self.socket, self.address)

    def send(self, method: bytes, payload: bytes, check_alive) -> None:
        # A PAIR socket whose peer is gone blocks on send: wait in slices, checking the workers live.
        while not self.socket.poll(POLL_MS, zmq.POLLOUT):
            check_alive()
        self.socket.send_multipart([method, payload])

    def receive(self, check_alive) -> tuple[bytes, bytes]:
        while not self.socket.poll(POLL_MS):
            check_alive()
        status, payload = self.socket.recv_multipart()
        return status, payload

    def stop(self) -> None:
        self._finalizer()


class MultiprocExecutor(Executor):
    """tensor_parallel_size x pipeline_parallel_size worker processes (one, by default); every call
    goes to all of them."""

    def __init__(self, config: EngineConfig, hf_config, source: ModelSource) -> None:
        parallel = config.parallel
        world = parallel.world_size
        check_parallel(hf_config, get_model_class(hf_config), parallel.tensor_parallel_size,
                       parallel.pipeline_parallel_size)
        cpus = rank_cpus(world) if world > 1 and config.model.device == "cpu" else [None] * world
        init_method = f"tcp://127.0.0.1:{free_port()}" if world > 1 else None
        self.driver = parallel.driver_rank
        self.num_stages = parallel.pipeline_parallel_size
        self.pending: deque[StepFuture] = deque()  # steps sent whose replies are not read yet, oldest first
        self.workers = [WorkerProc(rank) for rank in range(world)]
        level = logging.getLogger("sluice").getEffectiveLevel()
        for worker in self.workers:  # every rank must start before any can join the process group
            init = (config, hf_config, source, worker.rank, init_method, cpus[worker.rank], level)
            worker.send(b"init", pickle.dumps(init), self._check_alive)
        self._gather()  # the model is loaded on every rank

    @property
    def process(self) -> subprocess.Popen:
        """Rank 0's worker process."""
        return self.workers[0].process

    @property
    def max_concurrent_batches(self) -> int:
        return self.num_stages

    def collective_rpc(self, method: str, *args) -> list:
        self._drain()  # the replies of steps in flight come first
        self._broadcast(method.encode(), _encode(list(args)))
        return [_decode_any(payload) for payload in self._gather()]

    def execute_model(self, scheduler_output: SchedulerOutput,
                      non_block: bool = False) -> RunnerOutput | StepFuture:
        self._broadcast(EXECUTE, _encode(scheduler_output))
        if not (non_block or self.pending):  # one step at a time: its replies are the next ones
            return _decode_result(self._gather()[self.driver])
        future = StepFuture(self._drain)
        self.pending.append(future)
        return future if non_block else future.result()

    def _drain(self, until: StepFuture | None = None) -> None:
        """Read the replies of the steps in flight, oldest first, up to `until` (all by default).
        A failed step fails every later one too: the ranks' replies are out of step from there."""
        while self.pending:
            future = self.pending.popleft()
            try:
                future.set_result(_decode_result(self._gather()[self.driver]))
            except BaseException as exc:
                for failed in (future, *self.pending):
                    failed.set_exception(exc)
                self.pending.clear()
                if not isinstance(exc, Exception):  # Ctrl-C: not the step's failure
                    raise
                return
            if future is until:
                return

    def _broadcast(self, method: bytes, payload: bytes) -> None:
        for worker in self.workers:
            worker.send(method, payload, self._check_alive)

    def _gather(self) -> list[bytes]:
        """Every rank's reply, in rank order. A failed step fails at once (its peers may be stuck in a
        collective); a refused control call is raised once every rank has answered."""
        replies, refused = [], None
        for worker in self.workers:
            status, payload = worker.receive(self._check_alive)
            if status == ERROR:
                # a rank that was killed makes its peers fail: name the dead one (a rank that reported
                # its own error, as at start, exits cleanly and is not taken for dead)
                self._name_a_dead_rank()
                raise RuntimeError(f"worker failed{self._which(worker)}: {payload.decode()}")
            if status == REFUSED:  # a control call's ValueError (a bad LoRA adapter): the caller's to answer
                refused = refused or payload.decode()
            replies.append(payload)
        if refused is not None:
            raise ValueError(refused)
        return replies

    def _which(self, worker: WorkerProc) -> str:
        return f" (rank {worker.rank} of {len(self.workers)})" if len(self.workers) > 1 else ""

    def _name_a_dead_rank(self) -> None:
        """Raise WorkerDiedError for a rank that died (not one that exited cleanly), waiting out the
        moment between its sockets closing and its exit being reported."""
        deadline = time.monotonic() + PEER_DEATH_GRACE_S
        while True:
            self._check_alive(failed_only=True)
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def _check_alive(self, failed_only: bool = False) -> None:
        for worker in self.workers:
            code = worker.process.poll()
            if code is not None and not (failed_only and code == 0):
                raise WorkerDiedError(f"the worker process (pid {worker.process.pid}) died with exit code "
                                      f"{code}{self._which(worker)}")

    def shutdown(self) -> None:
        for worker in self.workers:
            worker.stop()


def free_port() -> int:
    """A TCP port free on this machine now, for rank 0 of the process group to listen on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_cpus(world: int) -> list[list[int] | None]:
    """Each rank's CPUs: vLLM's VLLM_CPU_OMP_THREADS_BIND ("0-3|4-7", one list per rank; "all": no
    binding), else equal shares of this process's CPUs."""
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    if bind == "all":
        return [None] * world
    if bind == "auto":
        from sluice.engine.core_proc import split_cpus  # the data-parallel cores' split

        return split_cpus(world)
    lists = bind.split("|")
    if len(lists) != world:
        raise ValueError(f"VLLM_CPU_OMP_THREADS_BIND={bind!r} names {len(lists)} CPU lists; the engine runs "
                         f"{world} ranks and needs one per rank, separated by '|'")
    return [_cpu_list(part) for part in lists]


def _cpu_list(text: str) -> list[int]:
    """"0-3,8" -> [0, 1, 2, 3, 8]."""
    cpus = []
    for item in text.split(","):
        low, _, high = item.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def _stop(process: subprocess.Popen, socket: zmq.Socket, address: str) -> None:
    """Ask the worker to exit, then make sure it has."""
    try:
        socket.send_multipart([SHUTDOWN, b""], flags=zmq.NOBLOCK)
    except zmq.ZMQError:
        pass
    try:
        process.wait(SHUTDOWN_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    socket.close()
    try:
        os.unlink(address.removeprefix("ipc://"))
    except OSError:
        pass


# ---- the worker process -------------------------------------------------------------------------
def run_worker(address: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the core decides
    parent = os.getppid()
    pair = zmq.Context.instance().socket(zmq.PAIR)
    pair.setsockopt(zmq.LINGER, 1000)
    pair.connect(address)
    worker = None
    while True:
        if not pair.poll(POLL_MS):
            if os.getppid() != parent:
                logger.error("worker: the engine core is gone; exiting")
                return
            continue
        method, payload = pair.recv_multipart()
        if method == SHUTDOWN:
            return
        try:
            if method == EXECUTE:
                reply = _encode(worker.execute_model(_decode_step(payload)))
            elif method == b"init":
                worker = _start(*pickle.loads(payload))
                reply = b""
            else:
                reply = _encode(getattr(worker, method.decode())(*_decode_any(payload)))
        except Exception as exc:
            if isinstance(exc, ValueError) and worker is not None and method != EXECUTE:
                pair.send_multipart([REFUSED, str(exc).encode()])  # a refused control call (add_lora)
                continue
            logger.exception("worker: %s failed", method.decode())
            pair.send_multipart([ERROR, f"{type(exc).__name__}: {exc}".encode()])
            if worker is None:  # it never started: nothing more to do
                return
            continue
        pair.send_multipart([OK, reply])


def _start(config: EngineConfig, hf_config, source: ModelSource, rank: int, init_method: str | None,
           cpus: list[int] | None, log_level: int):
    from sluice.worker.worker import Worker, configure_logging

    configure_logging(log_level, rank, config.parallel.world_size)
    if cpus is not None:
        from sluice.engine.core_proc import bind_to_cpus

        bind_to_cpus(cpus)
    return Worker(config, hf_config, source, rank, init_method)


if __name__ == "__main__":
    try:
        run_worker(sys.argv[1])
    except Exception:
        traceback.print_exc()
        sys.exit(1)
