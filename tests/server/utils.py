"""A real `sluice serve` subprocess on a free loopback port, for tests to drive over HTTP."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import openai
import psutil
from prometheus_client.parser import text_string_to_metric_families

STARTUP_TIMEOUT_S = 180
# Small limits keep each server's memory and start-up low; every test server shares them.
COMMON_FLAGS = ["--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    def __init__(self, *flags: str, env: dict | None = None, tls: tuple[str, str] | None = None,
                 entry: tuple[str, ...] = ("sluice.entrypoints.cli", "serve")) -> None:
        self.port = free_port()
        self.scheme = "https" if tls else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", *entry, *COMMON_FLAGS, "--port", str(self.port), *flags]
        if tls:
            args += ["--ssl-certfile", tls[0], "--ssl-keyfile", tls[1]]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sluice-server-", suffix=".log", delete=False)
        # Unbuffered, so tests that read the server's log see each line as soon as it is written.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/health", verify=False, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def client(self, api_key: str = "none", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=False, timeout=120, **kwargs)

    def core_process(self) -> psutil.Process:
        children = psutil.Process(self.process.pid).children(recursive=True)
        return next(p for p in children if p.name() == "sluice-core")

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", verify=False, timeout=30).text)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text -> [(sample name, labels, value)], parsed by prometheus_client."""
    return [(sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value}, summed over label sets other than `le`."""
    values: dict[str, float] = {}
    for name, labels, value in parse_samples(text):
        if "le" in labels or "quantile" in labels:
            name = f"{name}{{le={labels.get('le', labels.get('quantile'))}}}"
        values[name] = values.get(name, 0.0) + value
    return values


def start_vllm_router(*args: str) -> tuple[subprocess.Popen, str]:
    """vllm-router (the test extra) on a free loopback port with these arguments; its URL once it
    answers /v1/models."""
    binary = shutil.which("vllm-router", path=os.path.dirname(sys.executable)) or shutil.which("vllm-router")
    assert binary, "vllm-router (the test extra) is not installed"
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-router-", suffix=".log", delete=False)
    process = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", str(port),
                                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), *args],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.25)
    process.kill()
    raise TimeoutError(f"vllm-router not ready: {open(log.name).read()}")
