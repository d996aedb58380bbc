"""Benchmarks a user runs: `sluice bench serve` (load on any OpenAI-compatible server),
`sluice bench throughput` and `sluice bench latency` (offline, in-process).

One file per role: datasets (what to send), client (one streamed request, timed), metrics
(records -> summary), serve (arrival schedules, sweeps, reports), plots, offline, cli.
"""

from __future__ import annotations

import json
import os


def save_json(path: str, data: dict) -> None:
    """Write a result file (creating its folder) and say where it went."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"saved {path}")
