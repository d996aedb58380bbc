"""The `mp` executor: the worker in a process of its own, one ZMQ PAIR socket between them.

Each step sends the SchedulerOutput (differences only) as msgpack and gets the RunnerOutput
back the same way; no tensor is pickled per step (the grammar bitmask goes as raw bytes). The
start-up arguments (configs, model source) are pickled once. The worker exits when told, or
when the process that started it is gone; a worker that dies fails the call waiting on it with
WorkerDiedError (the engine core then fails every request with that reason) instead of hanging.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
import uuid
import weakref

import msgspec
import zmq

from sluice.config import EngineConfig
from sluice.core.sched_output import RunnerOutput, SchedulerOutput, decode_hook, encode_hook
from sluice.executor.abstract import Executor, WorkerDiedError
from sluice.loader import ModelSource

logger = logging.getLogger("sluice")

POLL_MS = 1000  # how often a waiting side checks that the other one still lives
SHUTDOWN_WAIT_S = 5.0

EXECUTE = b"execute_model"
SHUTDOWN = b"shutdown"
OK = b"ok"
ERROR = b"error"
REFUSED = b"refused"

_encode = msgspec.msgpack.Encoder(enc_hook=encode_hook).encode
_decode_any = msgspec.msgpack.Decoder().decode
_decode_step = msgspec.msgpack.Decoder(SchedulerOutput, dec_hook=decode_hook).decode
_decode_result = msgspec.msgpack.Decoder(RunnerOutput).decode


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, hf_config, source: ModelSource, rank: int = 0) -> None:
        self.address = f"ipc://{tempfile.gettempdir()}/sluice-worker-{uuid.uuid4().hex[:12]}.sock"
        self.socket = zmq.Context.instance().socket(zmq.PAIR)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.address)
        self.process = subprocess.Popen([sys.executable, "-m", "sluice.executor.mp", self.address])
        self._finalizer = weakref.finalize(self, _stop, self.process, self.socket, self.address)
        init = (config, hf_config, source, rank, logging.getLogger("sluice").getEffectiveLevel())
        self._send(b"init", pickle.dumps(init))
        self._receive()  # the model is loaded

    def collective_rpc(self, method: str, *args) -> list:
        self._send(method.encode(), _encode(list(args)))
        return [_decode_any(self._receive())]

    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self._send(EXECUTE, _encode(scheduler_output))
        return _decode_result(self._receive())

    def _send(self, method: bytes, payload: bytes) -> None:
        # A PAIR socket whose peer is gone blocks on send: wait in slices, checking the worker lives.
        while not self.socket.poll(POLL_MS, zmq.POLLOUT):
            self._check_alive()
        self.socket.send_multipart([method, payload])

    def _receive(self) -> bytes:
        while not self.socket.poll(POLL_MS):
            self._check_alive()
        status, payload = self.socket.recv_multipart()
        if status == REFUSED:  # a control call's ValueError (a bad LoRA adapter): the caller's to answer
            raise ValueError(payload.decode())
        if status == ERROR:
            raise RuntimeError(f"worker failed: {payload.decode()}")
        return payload

    def _check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise WorkerDiedError(f"the worker process (pid {self.process.pid}) died with exit code {code}")

    def shutdown(self) -> None:
        self._finalizer()


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
    socket = zmq.Context.instance().socket(zmq.PAIR)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.connect(address)
    worker = None
    while True:
        if not socket.poll(POLL_MS):
            if os.getppid() != parent:
                logger.error("worker: the engine core is gone; exiting")
                return
            continue
        method, payload = socket.recv_multipart()
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
                socket.send_multipart([REFUSED, str(exc).encode()])  # a refused control call (add_lora)
                continue
            logger.exception("worker: %s failed", method.decode())
            socket.send_multipart([ERROR, f"{type(exc).__name__}: {exc}".encode()])
            if worker is None:  # it never started: nothing more to do
                return
            continue
        socket.send_multipart([OK, reply])


def _start(config: EngineConfig, hf_config, source: ModelSource, rank: int, log_level: int):
    from sluice.worker.worker import Worker

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return Worker(config, hf_config, source, rank)


if __name__ == "__main__":
    try:
        run_worker(sys.argv[1])
    except Exception:
        traceback.print_exc()
        sys.exit(1)
