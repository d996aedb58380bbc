"""The API process's end of the ZMQ link to the engine core process (asyncio).

One DEALER socket per API process: requests and aborts go out, the core's replies and the
outputs of this process's requests come back on it. A watcher notices when the core process
dies, so that no request waits forever.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Callable

import zmq
import zmq.asyncio

from sluice.engine import messages as msg
from sluice.engine.messages import EngineCoreOutput, EngineCoreRequest, QueueFullError

logger = logging.getLogger("sluice")

LIVENESS_POLL_S = 0.5


class EngineDeadError(RuntimeError):
    """The engine core process is gone; requests it held are lost."""


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as dead); works for processes we did not start."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


class EngineCoreClient:
    def __init__(self, address: str, core_pid: int) -> None:
        self.address = address
        self.core_pid = core_pid
        self.socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.info: dict = {}
        self.dead_reason: str | None = None
        self._pending_adds: dict[str, asyncio.Future] = {}
        self._pending_replies: dict[bytes, collections.deque[asyncio.Future]] = {
            msg.STATS: collections.deque(), msg.READY: collections.deque(), msg.UTILITY: collections.deque(),
            msg.DASHBOARD: collections.deque(),
        }
        self._tasks: list[asyncio.Task] = []
        # Set by the owner (AsyncLLM); called from the receive loop.
        self.on_outputs: Callable[[list[EngineCoreOutput]], None] = lambda outputs: None
        self.on_dead: Callable[[str], None] = lambda reason: None
        self.on_loras: Callable[[list], None] = lambda adapters: None  # the core's adapters changed

    async def start(self, timeout: float) -> dict:
        """Start listening, then wait (up to `timeout` s) for the core to answer HELLO."""
        self._tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._watch_core())]
        try:
            self.info = await asyncio.wait_for(self._request(msg.HELLO, msg.READY), timeout)
        except asyncio.TimeoutError:
            raise EngineDeadError(f"the engine core did not answer within {timeout:.0f} s") from None
        return self.info

    @property
    def alive(self) -> bool:
        return self.dead_reason is None

    async def add(self, requests: list[EngineCoreRequest]) -> None:
        """Hand the core one user request's children; raises QueueFullError when refused."""
        self._check_alive()
        key = requests[0].request_id
        future = asyncio.get_running_loop().create_future()
        self._pending_adds[key] = future
        await self.socket.send_multipart([msg.ADD, msg.encode(requests)])
        kind, message = await future
        if kind in ("queue_full", "sleeping"):
            raise QueueFullError(message)
        if kind is not None:
            raise ValueError(message)

    def abort(self, request_ids: list[str]) -> None:
        """Fire and forget: usable from `finally` blocks of cancelled tasks."""
        if request_ids and self.alive:
            self.socket.send_multipart([msg.ABORT, msg.encode(request_ids)])

    async def metrics_text(self) -> bytes:
        """The core's metrics in Prometheus text format."""
        return await self._request(msg.STATS, msg.STATS)

    async def dashboard_snapshot(self, since_step: int) -> dict:
        """The core's state for /dashboard, with the steps after `since_step` (metrics/dashboard.py)."""
        return await self._request(msg.DASHBOARD, msg.DASHBOARD, since_step)

    async def call_utility(self, method: str, *args):
        """Call a control method of the core (messages.UTILITY_METHODS); its refusal is a ValueError."""
        result, error = await self._request(msg.UTILITY, msg.UTILITY, [method, list(args)])
        if error is not None:
            raise ValueError(error)
        return result

    async def _request(self, kind: bytes, reply_kind: bytes, body=None):
        self._check_alive()
        future = asyncio.get_running_loop().create_future()
        self._pending_replies[reply_kind].append(future)
        await self.socket.send_multipart([kind, msg.encode(body)])
        return await future

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)

    async def _receive_loop(self) -> None:
        try:
            while True:
                kind, payload = await self.socket.recv_multipart()
                body = msg.decode(kind, payload)
                if kind == msg.OUTPUTS:
                    self.on_outputs(body)
                elif kind == msg.ADDED:
                    request_id, error_kind, message = body
                    future = self._pending_adds.pop(request_id, None)
                    if future is not None and not future.done():
                        future.set_result((error_kind, message))
                elif kind in self._pending_replies:
                    future = self._pending_replies[kind].popleft()
                    if not future.done():
                        future.set_result(body)
                elif kind == msg.LORAS:
                    self.on_loras(body)
                elif kind == msg.FATAL:
                    self._mark_dead(body)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not leave requests hanging
            logger.exception("engine core link failed")
            self._mark_dead(f"engine core link failed: {e}")

    async def _watch_core(self) -> None:
        while self.alive:
            if not process_alive(self.core_pid):
                self._mark_dead("the engine core process died")
                return
            await asyncio.sleep(LIVENESS_POLL_S)

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        logger.error("engine core is dead: %s", reason)
        self.dead_reason = reason
        error = EngineDeadError(reason)
        pending = list(self._pending_adds.values()) + [f for q in self._pending_replies.values() for f in q]
        for future in pending:
            if not future.done():
                future.set_exception(error)
        self._pending_adds.clear()
        self.on_dead(reason)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.socket.close()
