"""The engine core in a process of its own, serving API processes over one ZMQ ROUTER socket.

The loop is vLLM V1's: drain the socket (adds, aborts, stats), run one step, send each API
process the outputs of its own requests. It never tokenizes, never awaits the network, and
blocks on the socket only while it has nothing to run.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import uuid

import zmq

from sluice.config import EngineConfig
from sluice.engine import messages as msg
from sluice.engine.core import EngineCore
from sluice.engine.messages import EngineCoreOutput, QueueFullError
from sluice.loader import load_hf_config, model_source
from sluice.metrics.http import MULTIPROC_ENV

logger = logging.getLogger("sluice")

IDLE_POLL_MS = 1000  # how often an idle core wakes to check that its parent still lives


class EngineCoreProc:
    def __init__(self, config: EngineConfig, address: str) -> None:
        source = model_source(config)
        hf_config = load_hf_config(source, config.model.hf_overrides)
        self.core = EngineCore(config, hf_config, source)
        self.core.scheduler.structured_output.compiler.warm_up()  # a server lives long: get grammars ready
        self.info = {
            "max_model_len": self.core.max_model_len,
            "quantization": self.core.quantization,
            "vocab_size": hf_config.get_text_config().vocab_size,
            "num_blocks": self.core.kv.pool.num_usable_blocks,
            "block_size": config.cache.block_size,
            "kv_group_windows": list(self.core.kv.group_windows),
            "scheduling_policy": config.scheduler.scheduling_policy,
            "pid": os.getpid(),
            "pooler": dataclasses.asdict(self.core.pooler) if self.core.pooler else None,  # None: generates
            "id2label": getattr(hf_config, "id2label", None),
            "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),  # for /server_info
        }
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)  # only now, so a client's HELLO is answered by a loaded model
        self.owners: dict[str, bytes] = {}  # request id -> the API process that added it
        self.clients: set[bytes] = set()
        self.parent_pid = os.getppid()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while os.getppid() == self.parent_pid:  # never outlive the server that started us
            timeout = 0 if self.core.has_unfinished_requests() else IDLE_POLL_MS
            while poller.poll(timeout):
                self._handle(*self.socket.recv_multipart())
                timeout = 0
            if self.core.has_unfinished_requests():
                self._send_outputs(self.core.step())
            else:
                self.core.record_stats()  # keeps the gauges and the periodic log line current while idle
        logger.error("engine core: the server process is gone; exiting")

    def _handle(self, client: bytes, kind: bytes, payload: bytes) -> None:
        self.clients.add(client)
        body = msg.decode(kind, payload)
        if kind == msg.ADD:
            self._send(client, msg.ADDED, [body[0].request_id, *self._add(client, body)])
        elif kind == msg.ABORT:
            self.core.abort_requests(body)
        elif kind == msg.STATS:
            self._send(client, msg.STATS, self.core.metrics_text())
        elif kind == msg.DASHBOARD:
            self._send(client, msg.DASHBOARD, self.core.dashboard.snapshot(body))
        elif kind == msg.HELLO:
            self._send(client, msg.READY, self.info)
        elif kind == msg.UTILITY:
            reply = self._utility(*body)
            if body[0] in msg.LORA_CHANGES and reply[1] is None:
                adapters = self.core.lora_adapters()
                for other in self.clients:
                    self._send(other, msg.LORAS, adapters)
            self._send(client, msg.UTILITY, reply)
        else:
            logger.warning("engine core: unknown message kind %r", kind)

    def _utility(self, method: str, args: list) -> list:
        """[result, None], or [None, why] for a refused call (a ValueError of the core's)."""
        if method not in msg.UTILITY_METHODS:
            return [None, f"unknown engine core method {method!r}"]
        try:
            value = getattr(self.core, method)
            return [value(*args) if callable(value) else value, None]
        except ValueError as e:
            return [None, str(e)]

    def _add(self, client: bytes, requests: list) -> tuple[str | None, str | None]:
        """(None, None) when admitted, else (error kind, message)."""
        if self.core.is_sleeping:
            return "sleeping", "the engine is sleeping (POST /wake_up to wake it); retry later"
        try:
            self.core.add_requests(requests)
        except QueueFullError as e:
            return "queue_full", str(e)
        except ValueError as e:
            return "invalid", str(e)
        for request in requests:
            self.owners[request.request_id] = client
        return None, None

    def _send_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        by_client: dict[bytes, list[EngineCoreOutput]] = {}
        for out in outputs:
            client = self.owners.get(out.request_id)
            if out.finish_reason is not None:
                self.owners.pop(out.request_id, None)
            if client is not None:
                by_client.setdefault(client, []).append(out)
        for client, outs in by_client.items():
            self._send(client, msg.OUTPUTS, outs)

    def _send(self, client: bytes, kind: bytes, body) -> None:
        self.socket.send_multipart([client, kind, msg.encode(body)])

    def fail(self, reason: str) -> None:
        """Tell every API process that its requests are lost, before the process goes down."""
        for client in self.clients:
            try:
                self._send(client, msg.FATAL, reason)
            except zmq.ZMQError:
                pass


def run_engine_core(config: EngineConfig, address: str, log_level: int, cpus: list[int] | None = None) -> None:
    """Process entry point; `cpus`: the CPUs this core keeps to (one data-parallel replica of several)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_process_name(PROCESS_NAME)
    if cpus is not None:
        bind_to_cpus(cpus)
    # Ctrl-C reaches the whole process group; the API process decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    proc = None
    try:
        proc = EngineCoreProc(config, address)
        proc.run()
    except SystemExit:
        raise
    except BaseException as e:
        logger.exception("engine core failed")
        if proc is not None:
            proc.fail(f"engine core failed: {type(e).__name__}: {e}")
        sys.exit(1)


PROCESS_NAME = "sluice-core"


def set_process_name(name: str) -> None:
    """Shown by ps/top (and psutil's name()), so operators and tests can find the core process."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME, Linux only
    except (OSError, AttributeError):
        pass


def bind_to_cpus(cpus: list[int]) -> None:
    """Keep this process (and the threads and workers it starts) on these CPUs, one torch thread
    each, as vLLM's CPU backend binds each rank's OpenMP threads."""
    import torch

    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
    logger.info("engine core bound to CPUs %s", ",".join(map(str, cpus)))


def split_cpus(num_parts: int) -> list[list[int]]:
    """This process's CPUs in `num_parts` contiguous, equal shares (the remainder unused)."""
    cpus = sorted(os.sched_getaffinity(0))
    if num_parts > len(cpus):
        raise ValueError(f"data_parallel_size={num_parts} (--data-parallel-size) needs a CPU per engine core; "
                         f"this process may use {len(cpus)} ({','.join(map(str, cpus))})")
    share = len(cpus) // num_parts
    return [cpus[i * share:(i + 1) * share] for i in range(num_parts)]


def start_engine_cores(config: EngineConfig) -> list[tuple[multiprocessing.Process, str]]:
    """One core per data-parallel rank this server runs; several share the CPUs out between them."""
    ranks = config.parallel.local_ranks()
    if len(ranks) == 1:
        return [start_engine_core(config)]
    cpu_shares = split_cpus(len(ranks)) if config.model.device == "cpu" else [None] * len(ranks)
    return [start_engine_core(dataclasses.replace(config, parallel=dataclasses.replace(
                config.parallel, data_parallel_rank=rank)), cpus)
            for rank, cpus in zip(ranks, cpu_shares)]


def start_engine_core(config: EngineConfig, cpus: list[int] | None = None) -> tuple[multiprocessing.Process, str]:
    """Spawn the core process; returns it and the address API processes connect to."""
    address = f"ipc://{tempfile.gettempdir()}/sluice-core-{uuid.uuid4().hex[:12]}.sock"
    process = multiprocessing.get_context("spawn").Process(
        target=run_engine_core, args=(config, address, logging.getLogger("sluice").getEffectiveLevel(), cpus),
        name=f"sluice-engine-core-{config.parallel.engine_index}", daemon=True,
    )
    # The core's metrics live in a registry of its own; prometheus_client's multiprocess files
    # are for the API processes only, or a scrape would count the core's metrics twice.
    shared_metrics = os.environ.pop(MULTIPROC_ENV, None)
    try:
        process.start()
    finally:
        if shared_metrics is not None:
            os.environ[MULTIPROC_ENV] = shared_metrics
    return process, address


def remove_address(address: str) -> None:
    """Delete the socket file of an ipc:// address."""
    if address.startswith("ipc://"):
        try:
            os.unlink(address.removeprefix("ipc://"))
        except OSError:
            pass
