"""Benchmarks a user runs: `sluice bench serve` (load on any OpenAI-compatible server),
`sluice bench throughput` and `sluice bench latency` (offline, in-process).

One file per role: datasets (what to send), client (one streamed request, timed), metrics
(records -> summary), serve (arrival schedules, sweeps, reports), plots, offline, cli.
"""
