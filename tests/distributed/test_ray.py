"""The `ray` executor on a local Ray cluster (2 CPUs): TP=2 worker actors in a placement group
give one rank's greedy tokens, and an actor that dies fails the step with its reason."""

from __future__ import annotations

import pytest

from sluice import LLM, SamplingParams
from sluice.executor.abstract import WorkerDiedError

ray = pytest.importorskip("ray")  # in the test extras

PROMPTS = [list(range(300, 340)) + [5, 6, 7], [42] * 9]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
COMMON = dict(dtype="float32", max_model_len=256, block_size=16, kv_cache_memory_bytes=16 << 20)


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_ray_tp2_equals_one_rank_and_a_dead_actor_fails_the_step(local_cluster, tiny_model_dir):
    one = tokens(LLM(tiny_model_dir("llama"), **COMMON))
    llm = LLM(tiny_model_dir("llama"), **COMMON, tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        executor = llm.engine_core.executor
        assert len(executor.actors) == 2
        assert ray.util.placement_group_table(executor.placement)["state"] == "CREATED"
        assert tokens(llm) == one
        ray.kill(executor.actors[1])
        with pytest.raises(WorkerDiedError, match="Ray worker actor of rank 1 of 2 died"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)
    finally:
        llm.engine_core.shutdown()
