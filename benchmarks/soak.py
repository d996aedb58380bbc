"""Soak test (not in CI): one `sluice serve` under mixed traffic for N minutes.

    python benchmarks/soak.py                     # 30 minutes against a server it starts
    python benchmarks/soak.py --minutes 2 --workers 4
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid 1234   # a server already running

Workers send good requests (chat and completions, streamed or not), bad requests (each must get
a 4xx), streams dropped after their first chunk, and hold idle and half-header connections (the
server must close them). Every minute it prints requests served, 5xx answers, lost requests (a
good request with no complete answer), and the resident memory of the server's processes; at
the end, whether a greedy completion still returns what it returned at the start, and whether
the engine is back to 0 running, 0 waiting and an empty KV cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlparse

import httpx
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.server.utils

from tests.server.utils import RemoteServer, parse_metrics  # noqa: E402

GREEDY = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}
PROMPTS = ["Tell me about rivers.", "Write a haiku about the sea.", "What is 12 times 7?", "List three colours."]
BAD_BODIES = [  # (path, raw body): each must be refused with a 4xx, never a 5xx
    ("/v1/completions", b'{"prompt": "Hi", "max_tokens": true}'),
    ("/v1/completions", b'{"prompt": "Hi", "seed": 1180591620717411303424}'),
    ("/v1/completions", b'{"prompt": "a \\ud800 b"}'),
    ("/v1/completions", b'{"prompt": '),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}'),
    ("/v1/completions", b'{"prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": []}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "Hi"}]}'),
    ("/v1/completions", b'{"prompt": ["Hi", "Hi", "Hi"], "n": 30}'),
    ("/v1/completions", b'{"prompt": "' + b"ab " * 40_000 + b'"}'),
    ("/v1/completions", b'{"prompt": "' + b"a" * 3_000_000 + b'"}'),
]
ACTIONS = {"good": 6, "bad": 2, "disconnect": 1, "idle": 1}


class Tally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def add(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1


def good_request(http: httpx.Client, rng: random.Random, tally: Tally) -> None:
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    body: dict = {"max_tokens": rng.randint(4, 32), "temperature": rng.choice([0, 0.8]), "stream": stream}
    prompt = rng.choice(PROMPTS)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    try:
        with http.stream("POST", path, json=body) as response:
            text = response.read().decode()
    except httpx.HTTPError:
        tally.add("lost")
        return
    if response.status_code >= 500:
        tally.add("5xx")
    elif response.status_code != 200 or (stream and not text.rstrip().endswith("data: [DONE]")):
        tally.add("lost")
    else:
        tally.add("served")


def bad_request(http: httpx.Client, rng: random.Random, tally: Tally) -> None:
    path, body = rng.choice(BAD_BODIES)
    try:
        status = http.post(path, content=body, headers={"content-type": "application/json"}).status_code
    except httpx.HTTPError:
        tally.add("bad lost")
        return
    tally.add("5xx" if status >= 500 else "bad refused" if 400 <= status < 500 else "bad accepted")


def dropped_stream(http: httpx.Client, rng: random.Random, tally: Tally) -> None:
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": 200, "ignore_eos": True, "stream": True}
    try:
        with http.stream("POST", "/v1/completions", json=body) as response:
            next(response.iter_raw())  # one chunk, then hang up: the server must abort the request
    except (httpx.HTTPError, StopIteration):
        pass
    tally.add("disconnects")


def idle_connection(address: tuple[str, int], rng: random.Random, tally: Tally, give_up_s: float,
                    slots: threading.BoundedSemaphore) -> None:
    """Nothing, or half a header: the server must close it within its read timeout."""
    with contextlib.ExitStack() as cleanup, socket.create_connection(address) as sock:
        cleanup.callback(slots.release)
        if rng.random() < 0.5:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Half: ")
        sock.settimeout(give_up_s)
        try:
            closed = sock.recv(1) == b""
        except socket.timeout:
            closed = False
        except OSError:
            closed = True
    tally.add("idle closed by server" if closed else "idle left open")


def worker(base_url: str, headers: dict, stop: threading.Event, seed: int, tally: Tally, idle_give_up_s: float,
           idle_slots: threading.BoundedSemaphore) -> None:
    rng = random.Random(seed)
    url = urlparse(base_url)
    address = (url.hostname, url.port)
    kinds, weights = zip(*ACTIONS.items())
    with httpx.Client(base_url=base_url, headers=headers, timeout=300) as http:
        while not stop.is_set():
            kind = rng.choices(kinds, weights)[0]
            if kind == "good":
                good_request(http, rng, tally)
            elif kind == "bad":
                bad_request(http, rng, tally)
            elif kind == "disconnect":
                dropped_stream(http, rng, tally)
            elif idle_slots.acquire(blocking=False):  # held in the background, up to --max-idle at once
                threading.Thread(target=idle_connection, args=(address, rng, tally, idle_give_up_s, idle_slots),
                                 daemon=True).start()


def rss_mib(pid: int) -> dict[str, float]:
    """Resident memory of the server (the API process) and each process it started."""
    root = psutil.Process(pid)
    return {"api" if p.pid == pid else f"{p.name()}[{p.pid}]": round(p.memory_info().rss / 2**20, 1)
            for p in [root, *root.children(recursive=True)]}


def greedy(http: httpx.Client) -> str:
    return http.post("/v1/completions", json=GREEDY).json()["choices"][0]["text"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=4, help="concurrent client loops")
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--pid", type=int, default=None, help="the running server's pid, for its memory")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--idle-give-up", type=float, default=90.0,
                        help="seconds after which an idle connection the server kept open counts as left open")
    parser.add_argument("--max-idle", type=int, default=64, help="idle connections held open at once")
    parser.add_argument("--server-args", default="--timeout-request-read 10",
                        help="flags for the server this script starts")
    parser.add_argument("--output", default=None, help="write the summary as JSON here")
    args = parser.parse_args()

    server = None
    if args.url is None:
        server = RemoteServer(*args.server_args.split())
        args.url, args.pid = server.url, server.process.pid
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    http = httpx.Client(base_url=args.url, headers=headers, timeout=300)
    tally, stop, idle_slots = Tally(), threading.Event(), threading.BoundedSemaphore(args.max_idle)
    try:
        before = greedy(http)
        threads = [threading.Thread(target=worker, args=(args.url, headers, stop, seed, tally, args.idle_give_up,
                                                         idle_slots))
                   for seed in range(args.workers)]
        for thread in threads:
            thread.start()
        minutes = []
        started = time.monotonic()
        for minute in range(1, int(args.minutes) + 1):
            time.sleep(max(0.0, started + 60 * minute - time.monotonic()))
            row = {"minute": minute, **tally.counts, "rss_mib": rss_mib(args.pid) if args.pid else None}
            minutes.append(row)
            print(json.dumps(row), flush=True)
        stop.set()
        for thread in threads:
            thread.join()
        time.sleep(5)  # aborted streams settle
        after = greedy(http)
        metrics = parse_metrics(http.get("/metrics").text)
        summary = {
            "minutes": args.minutes, "workers": args.workers, **tally.counts,
            "greedy_unchanged": before == after, "greedy": before,
            "running_after": metrics.get("vllm:num_requests_running"),
            "waiting_after": metrics.get("vllm:num_requests_waiting"),
            "kv_cache_usage_after": metrics.get("vllm:kv_cache_usage_perc"),
            "rss_mib_per_minute": [row["rss_mib"] for row in minutes],
        }
        print(json.dumps(summary, indent=2))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(summary, f, indent=2)
        healthy = summary["greedy_unchanged"] and not tally.counts["5xx"] and not tally.counts["lost"]
        return 0 if healthy else 1
    finally:
        stop.set()
        http.close()
        if server is not None:
            server.stop()
            if server.logs().count("Traceback"):
                print(f"server log has tracebacks: {server.log.name}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
