"""The worker boundary: the `mp` executor (worker in its own process) gives the tokens of `uni`
(in-process) exactly, dies with the engine, and a dead worker fails the step with a reason."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import openai
import pytest

from sluice import LLM, SamplingParams
from sluice.executor.abstract import WorkerDiedError
from sluice.sampling_params import StructuredOutputsParams

from tests.server.utils import RemoteServer

PROMPTS = [[5, 6, 7, 8, 9], list(range(100, 160)), [42] * 20]
COMMON = dict(dtype="float32", max_model_len=256, block_size=16, kv_cache_memory_bytes=16 << 20)


@pytest.fixture(scope="module")
def engines(tiny_model_dir) -> dict[str, LLM]:
    folder = tiny_model_dir("llama")
    return {backend: LLM(folder, **COMMON, distributed_executor_backend=backend) for backend in ("uni", "mp")}


def run(llm: LLM, params: SamplingParams):
    return llm.generate(PROMPTS, params, use_tqdm=False)


def test_greedy_mp_equals_uni_token_for_token(engines):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    uni, mp = (run(engines[b], params) for b in ("uni", "mp"))
    assert [o.outputs[0].token_ids for o in mp] == [o.outputs[0].token_ids for o in uni]
    assert [o.outputs[0].logprobs for o in mp] == [o.outputs[0].logprobs for o in uni]


def test_seeded_penalised_and_constrained_sampling_cross_the_boundary(engines):
    seeded = SamplingParams(temperature=1.0, seed=11, n=2, max_tokens=12, min_tokens=4, presence_penalty=0.5,
                            repetition_penalty=1.2, prompt_logprobs=1)
    choice = SamplingParams(temperature=1.0, seed=3, max_tokens=8,
                            structured_outputs=StructuredOutputsParams(choice=["yes please", "no thanks"]))
    for params in (seeded, choice):
        uni, mp = (run(engines[b], params) for b in ("uni", "mp"))
        assert [[c.token_ids for c in o.outputs] for o in mp] == [[c.token_ids for c in o.outputs] for o in uni]
        assert [o.prompt_logprobs for o in mp] == [o.prompt_logprobs for o in uni]
    assert {o.outputs[0].text for o in mp} <= {"yes please", "no thanks"}


def test_a_dead_worker_fails_the_step_with_a_reason(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), **COMMON, distributed_executor_backend="mp")
    worker = llm.engine_core.executor.process
    worker.kill()
    worker.wait()
    with pytest.raises(WorkerDiedError, match=f"pid {worker.pid}"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)


def test_the_worker_exits_with_its_engine(tiny_model_dir):
    script = (
        "import os, signal, sys\n"
        "from sluice import LLM\n"
        f"llm = LLM({tiny_model_dir('llama')!r}, dtype='float32', max_model_len=256, "
        "kv_cache_memory_bytes=16 << 20, distributed_executor_backend='mp')\n"
        "print(llm.engine_core.executor.process.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    core = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert core.returncode == -signal.SIGKILL, core.stderr
    worker_pid = int(core.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while _alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker_pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_prompt_that_fits_the_context_but_not_the_kv_cache_is_refused(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), dtype="float32", max_model_len=256, block_size=16,
              num_gpu_blocks_override=4)  # 3 usable blocks: 48 tokens
    with pytest.raises(ValueError, match="prompt has 60 tokens plus one generated: a request of 61 tokens needs 4 KV blocks; the whole cache holds 3 blocks of 16 tokens"):
        llm.generate([list(range(100, 160))], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine_core.has_unfinished_requests()


def test_a_served_mp_worker_answers_like_uni_and_its_death_fails_requests_with_the_reason(engines, tiny_model_dir):
    server = RemoteServer(tiny_model_dir("llama"), "--dtype", "float32", "--max-model-len", "256",
                          "--distributed-executor-backend", "mp")
    try:
        client = server.client()
        model = client.models.list().data[0].id
        served = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=8, temperature=0.0)
        offline = engines["uni"].generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
        assert served.choices[0].text == offline[0].outputs[0].text
        [worker] = [p for p in server.core_process().children() if "sluice.executor.mp" in p.cmdline()]
        worker.kill()
        with pytest.raises(openai.APIStatusError) as failure:
            client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8)
        assert failure.value.status_code == 503
        assert f"the worker process (pid {worker.pid}) died" in failure.value.message
    finally:
        server.stop()
