"""`sluice bench serve --save-trace FILE`: the server's engine over the run, from its /dashboard stream.

A thread reads the server-sent events of `/dashboard/events` while the benchmark runs and writes
one JSON line per snapshot: KV blocks in use and cached, the queues, and every step's batch as
[step, time, decode tokens, prefill tokens, requests]. `--plot` draws engine_timeline.png from
the file (sluice.bench.plots.engine_timeline), so a saved trace can be drawn again later.
"""

from __future__ import annotations

import json
import logging
import threading

import httpx

logger = logging.getLogger("sluice")


def trace_line(state: dict) -> dict:
    """One snapshot of the dashboard stream, reduced to what the timeline draws."""
    pool = state["pool"]
    cached = pool["cells"].count("1") * pool["stride"]  # sampled when the pool is large
    return {"t": state["time"], "num_blocks": pool["num_blocks"], "in_use": pool["in_use"], "cached": cached,
            "running": state["num_running"], "waiting": state["num_waiting"],
            "preemptions": state["point"]["preemptions"], "budget": state["budget"], "steps": state["steps"]}


class TraceRecorder:
    """Records while the benchmark runs: `with TraceRecorder(root, headers, path): ...`."""

    def __init__(self, root: str, headers: dict[str, str], path: str) -> None:
        self.url = root.rstrip("/") + "/dashboard/events"
        self.headers = headers
        self.path = path
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._record, name="sluice-bench-trace", daemon=True)
        self.error: str | None = None
        self.num_lines = 0

    def __enter__(self) -> "TraceRecorder":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        if self.error:
            logger.warning("--save-trace: %s", self.error)

    def _record(self) -> None:
        try:
            with open(self.path, "w") as out, httpx.stream("GET", self.url, headers=self.headers,
                                                           timeout=httpx.Timeout(30.0)) as response:
                if response.status_code != 200:
                    self.error = f"{self.url} answered {response.status_code} (dashboard disabled, or no API key?)"
                    return
                kind = None
                for line in response.iter_lines():
                    if self.stop.is_set():
                        return
                    if line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                    elif line.startswith("data: ") and kind == "state":
                        out.write(json.dumps(trace_line(json.loads(line.removeprefix("data: ")))) + "\n")
                        self.num_lines += 1
        except httpx.HTTPError as e:
            self.error = f"reading {self.url} failed: {e}"


def load_trace(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
