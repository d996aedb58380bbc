"""/dashboard in a real headless Chromium against a live server under load.

The page must follow the engine: its grid and batch bar change while requests run, and what it
shows agrees with /metrics (KV blocks in use, running requests). A screenshot goes to
tests/artifacts/. Needs the system's chromium and chromedriver (Debian: `apt-get install chromium
chromium-driver`, which `make browser` does); the browser test is skipped only when they are absent.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.utils import RemoteServer, parse_metrics

KEY = "dashboard-test-key"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CONCURRENCY = 4


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    # A small pool and step budget, so that a few requests fill a visible part of both.
    srv = RemoteServer(tiny_model_dir("llama"), "--max-model-len", "512", "--kv-cache-memory-bytes", str(6 << 20),
                       "--max-num-batched-tokens", "64", "--api-key", KEY)
    yield srv
    srv.stop()


def in_use_and_running(server: RemoteServer) -> tuple[int, int]:
    """KV blocks in use and running requests, as /metrics reports them."""
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    m = parse_metrics(text)
    return int(m["sluice:num_total_blocks"] - m["sluice:num_free_blocks"]), int(m["vllm:num_requests_running"])


def test_dashboard_needs_the_key(server):
    for path in ("/dashboard", "/dashboard/events"):
        response = httpx.get(server.url + path, timeout=30)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"
    page = httpx.get(server.url + "/dashboard", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="grid"' in page.text and 'id="batch"' in page.text


def test_event_stream_is_a_bounded_snapshot(server):
    """The SSE stream starts with the history, then sends state snapshots a few times a second."""
    events = []
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("GET", server.url + "/dashboard/events", headers=headers, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        started = time.monotonic()
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
                if len(events) == 5:
                    break
        elapsed = time.monotonic() - started
    assert events[0][0] == "history" and isinstance(events[0][1], list)
    states = [body for kind, body in events[1:]]
    assert all(kind == "state" for kind, _ in events[1:])
    assert 0.4 < elapsed < 5, "four snapshots come about 0.25 s apart"
    pool = states[-1]["pool"]
    assert len(pool["cells"]) == -(-pool["num_blocks"] // pool["stride"]) <= 2048
    assert set(pool["cells"]) <= set("0123")
    assert states[-1]["budget"] == 64


class Load:
    """CONCURRENCY streams of long completions with a common prefix, each replaced when it ends,
    until stopped."""

    def __init__(self, server: RemoteServer) -> None:
        self.client = server.client(api_key=KEY)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(CONCURRENCY)]
        for t in self.threads:
            t.start()

    def run(self, i: int) -> None:
        while not self.stop.is_set():
            stream = self.client.completions.create(
                model=self.client.models.list().data[0].id, prompt="tell me a story " * 40 + f"number {i}",
                max_tokens=300, temperature=0, stream=True, extra_body={"ignore_eos": True})
            for _ in stream:
                if self.stop.is_set():
                    stream.close()
                    break

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium + chromedriver on this machine (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1100"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for its errors
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {KEY}"}})
    yield driver
    driver.quit()


def page_state(driver) -> dict:
    return driver.execute_script("""
        const grid = document.getElementById('grid'), bar = document.getElementById('batch');
        return {updates: +document.body.dataset.updates || 0,
                cells: Array.from(grid.children, c => c.className.slice(-1)).join(''),
                in_use: +grid.dataset.inUse, running: +document.getElementById('num-running').textContent,
                step: +bar.dataset.step, segments: bar.children.length, tokens: +bar.dataset.tokens,
                decodes: bar.querySelectorAll('.decode').length,
                status: document.getElementById('status').textContent};""")


def wait_for(driver, check, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = page_state(driver)
        if check(state):
            return state
        time.sleep(0.1)
    raise AssertionError(f"page never reached the expected state; last: {page_state(driver)}")


def test_dashboard_follows_the_engine(server, browser):
    browser.get(server.url + "/dashboard")
    idle = wait_for(browser, lambda s: s["updates"] >= 2 and s["status"] == "live")
    assert idle["running"] == 0 and idle["in_use"] == 0 and set(idle["cells"]) <= {"0", "1"}
    load = Load(server)
    try:
        busy = wait_for(browser, lambda s: s["running"] >= 2 and s["segments"] >= 2 and "2" in s["cells"])
        later = wait_for(browser, lambda s: s["step"] > busy["step"] and s["cells"] != busy["cells"] and s["decodes"])
        assert 0 < later["tokens"] <= 64
        # The page and /metrics look at the same engine: they agree once both are read while
        # nothing finishes between them (blocks grow by one per 16 tokens in between).
        agreed = None
        for _ in range(40):
            page = page_state(browser)
            in_use, running = in_use_and_running(server)
            if page["running"] == running and abs(page["in_use"] - in_use) <= 4 * running:
                agreed = (page, in_use, running)
                break
            time.sleep(0.2)
        assert agreed is not None, "the page never agreed with /metrics under load"
        assert agreed[0]["cells"].count("2") + agreed[0]["cells"].count("3") == agreed[0]["in_use"]
        owner = browser.execute_script("return document.querySelector('#grid .s2, #grid .s3').title")
        assert re.fullmatch(r"block \d+: \S+.*", owner), f"hovering a held block names its owner: {owner!r}"
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    finally:
        load.close()
    done = wait_for(browser, lambda s: s["running"] == 0 and s["in_use"] == 0)
    assert in_use_and_running(server) == (0, 0)
    assert "1" in done["cells"], "finished requests' full blocks stay in the prefix cache"
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == [], "no script errors"


def test_bench_serve_saves_and_plots_an_engine_trace(server, tiny_model_dir, tmp_path, capsys):
    """`sluice bench serve --save-trace` records the dashboard stream over the run; --plot draws it."""
    from sluice.bench.trace import load_trace
    from sluice.entrypoints.cli import main

    trace_path, plots = tmp_path / "trace.jsonl", ARTIFACTS / "bench"  # the timeline is an artifact too
    code = main(["bench", "serve", "--base-url", server.url, "--api-key", KEY, "--tokenizer", tiny_model_dir("llama"),
                 "--dataset-name", "random", "--num-prompts", "8", "--random-input-len", "96",
                 "--random-output-len", "64", "--ignore-eos", "--max-concurrency", "2", "--disable-tqdm",
                 "--save-trace", str(trace_path), "--plot", str(plots)])
    assert code == 0
    trace = load_trace(str(trace_path))
    assert len(trace) >= 2 and all(s["budget"] == 64 for s in trace)
    assert max(s["running"] for s in trace) >= 2 and max(s["in_use"] for s in trace) > 0
    steps = [step for s in trace for step in s["steps"]]
    assert [step[0] for step in steps] == sorted({step[0] for step in steps}), "each step once, in order"
    assert all(step[4] <= 2 for step in steps), "at most --max-concurrency requests in a step"
    assert any(step[3] for step in steps) and any(step[2] for step in steps), "prefill and decode steps seen"
    assert all(0 < step[2] + step[3] <= 64 for step in steps)
    with open(plots / "engine_timeline.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "engine_timeline.png" in capsys.readouterr().out


def test_an_open_stream_ends_when_the_server_drains(server):
    """Last in the module: it stops the server. An open page must not hold up a shutdown."""
    with httpx.stream("GET", server.url + "/dashboard/events", headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("event: state"):
            pass
        server.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        for _ in lines:  # ends when the server closes the stream
            pass
        assert time.monotonic() - started < 4, "the stream ended within a poll or two of the drain"
    assert server.process.wait(60) == 0
