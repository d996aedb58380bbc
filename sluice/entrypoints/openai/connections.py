"""Connection-level defences of the HTTP server, below the ASGI app.

uvicorn's h11 protocol closes idle keep-alive connections, but a connection that never finishes
its request (nothing sent, half a header, a body trickling in) stays open for ever; enough of
them exhaust the file descriptors. When they are exhausted, asyncio reports every failed
accept() through the loop's exception handler, which would fill the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("sluice")


class ReadDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on reading each request: from the moment the
    connection opens (or the previous response ends) the client has `read_timeout` seconds to
    send the whole request, headers and body, or the connection is closed."""

    read_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.read_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_read_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_read():
            self._disarm_read_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._request_read():
            self._arm_read_deadline()  # the next request, or the rest of a body we answered early

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_deadline()
        super().connection_lost(exc)

    def _request_read(self) -> bool:
        return self.conn.their_state not in (h11.IDLE, h11.SEND_BODY)

    def _arm_read_deadline(self) -> None:
        self._disarm_read_deadline()
        self.read_deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm_read_deadline(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def _read_timed_out(self) -> None:
        self.read_deadline = None
        if not self.transport.is_closing():
            logger.debug("closing a connection that sent no complete request in %.0f s", self.read_timeout)
            self.transport.close()  # a request already running sees http.disconnect


def read_deadline_protocol(read_timeout: float) -> type[ReadDeadlineH11Protocol]:
    """The protocol class to hand uvicorn (it instantiates the class itself)."""
    return type("ReadDeadlineH11Protocol", (ReadDeadlineH11Protocol,), {"read_timeout": read_timeout})


class RateLimitedLoopErrors:
    """An asyncio exception handler that logs each kind of error at most once per `interval`
    seconds, then how many were left out. Out of file descriptors, asyncio reports every retried
    accept(); unlimited, that was hundreds of megabytes of log a minute."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.last_logged: dict[str, float] = {}
        self.left_out: Counter[str] = Counter()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        kind = str(context.get("message", ""))
        now = time.monotonic()
        if now - self.last_logged.get(kind, -self.interval) < self.interval:
            self.left_out[kind] += 1
            return
        self.last_logged[kind] = now
        count = self.left_out.pop(kind, 0)
        if count:
            left_out = f"{count} more like it in the last {self.interval:.0f} s not logged"
            context = {**context, "message": f"{kind} ({left_out})"}
        loop.default_exception_handler(context)
