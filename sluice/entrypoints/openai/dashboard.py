"""`/dashboard`: the live engine in a browser page, fed by a server-sent-events stream.

One poller per API process asks the engine core for a snapshot (sluice/metrics/dashboard.py)
POLL_S apart, only while at least one page is open, and fans each one out to every open page.
It keeps a bounded history (HISTORY_S of latency and prefix-cache points) so that a page opened
or reconnected later starts with the last minutes. Streams end when the server starts draining,
so an open page never holds up a shutdown. Both routes are behind the API key like any other;
`--disable-dashboard` leaves them out.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, StreamingResponse

from sluice.engine.core_client import EngineCoreClient, EngineDeadError

logger = logging.getLogger("sluice")

POLL_S = 0.25
HISTORY_S = 300
KEEPALIVE_S = 5.0
RETRY_MS = 2000  # how soon a browser's EventSource reconnects after the stream broke


class DashboardHub:
    def __init__(self, client: EngineCoreClient, draining: Callable[[], bool]) -> None:
        self.client = client
        self.draining = draining
        self.pages: set[asyncio.Queue] = set()
        self.history: collections.deque[dict] = collections.deque(maxlen=int(HISTORY_S / POLL_S))
        self.task: asyncio.Task | None = None
        self.last_step = 0
        self.last_totals: dict | None = None

    async def stream(self) -> AsyncIterator[str]:
        """One page's events: `history` once, then `state` every POLL_S, until it goes away."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        self.pages.add(queue)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._poll())
        try:
            yield f"retry: {RETRY_MS}\nevent: history\ndata: {json.dumps(list(self.history))}\n\n"
            while not self.draining():
                try:
                    data = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:  # no snapshot (the engine is gone): keep proxies from closing
                    yield ": keepalive\n\n"
                    continue
                yield f"event: state\ndata: {data}\n\n"
        finally:
            self.pages.discard(queue)

    async def _poll(self) -> None:
        while self.pages and self.client.alive:
            started = time.monotonic()
            try:
                snapshot = await self.client.dashboard_snapshot(self.last_step)
            except EngineDeadError:
                break
            except Exception:  # a bug here must show in the log, not as a page that silently stops
                logger.exception("dashboard: taking a snapshot failed")
                break
            if snapshot["steps"]:
                self.last_step = snapshot["steps"][-1][0]
            snapshot["point"] = self._point(snapshot)
            self.history.append(snapshot["point"])
            data = json.dumps(snapshot)
            for queue in self.pages:
                if queue.full():  # a slow page skips a frame rather than growing a backlog
                    queue.get_nowait()
                queue.put_nowait(data)
            await asyncio.sleep(max(POLL_S - (time.monotonic() - started), 0.0))
        self.last_totals = None  # the next poller starts a fresh baseline

    def _point(self, snapshot: dict) -> dict:
        """Means and rates over the interval since the previous snapshot (None: nothing happened)."""
        totals, last = snapshot.pop("totals"), self.last_totals
        self.last_totals = totals
        delta = {k: totals[k] - last[k] for k in totals} if last else dict.fromkeys(totals, 0)
        return {
            "t": snapshot["time"],
            "ttft": delta["ttft_sum"] / delta["ttft_count"] if delta["ttft_count"] else None,
            "itl": delta["itl_sum"] / delta["itl_count"] if delta["itl_count"] else None,
            "prefix_queries": delta["prefix_queries"],
            "prefix_hits": delta["prefix_hits"],
            "preemptions": delta["preemptions"],
            "generation_tokens": delta["generation_tokens"],
        }


def add_dashboard_routes(app: FastAPI, state) -> None:
    """`state` is the server's ServerState (engine, draining)."""
    hub = DashboardHub(state.engine.client, lambda: state.draining)
    page = resources.files("sluice.entrypoints.openai").joinpath("static/dashboard.html").read_text()

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/dashboard/events", include_in_schema=False)
    async def dashboard_events() -> StreamingResponse:
        return StreamingResponse(hub.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
