"""The scheduler's side of disaggregated prefill without a model: what a consumer plans to pull
and when its request runs, what a producer holds and when it lets go; no block outlives its use."""

from __future__ import annotations

import time

from sluice.config import KVTransferConfig, SchedulerConfig
from sluice.core.kv_cache_manager import KVCacheManager
from sluice.core.request import Request, RequestStatus
from sluice.core.scheduler import Scheduler
from sluice.core.sched_output import RunnerOutput
from sluice.distributed.kv_transfer.base import KVConnectorOutput
from sluice.distributed.kv_transfer.zmq_connector import ZmqConnectorScheduler
from sluice.engine.messages import EngineCoreRequest
from sluice.sampling_params import SamplingParams
from tests.utils import fake_runner_output

BS = 4
PORT = 15000


def make_scheduler(role: str, **extra) -> Scheduler:
    config = KVTransferConfig({"kv_connector": "SluiceZmqConnector", "kv_role": role, "kv_port": PORT,
                               "kv_connector_extra_config": extra})
    return Scheduler(SchedulerConfig(), KVCacheManager(64, BS, True), 1024,
                     connector=ZmqConnectorScheduler(config, BS, PORT))


def add(sched: Scheduler, rid: str, num_prompt: int, max_tokens: int, params: dict, first: int = 1) -> Request:
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args={"kv_transfer_params": params})
    prompt = list(range(first, first + num_prompt))
    request = Request(EngineCoreRequest(rid, prompt, sampling, eos_token_ids=()), max_tokens)
    sched.add_request(request)
    return request


def remote(block_ids: list[int]) -> dict:
    return {"do_remote_prefill": True, "remote_block_ids": block_ids, "remote_host": "127.0.0.1",
            "remote_port": PORT, "remote_request_id": "p"}


def transfers(**kwargs) -> RunnerOutput:
    return RunnerOutput(kv_connector_output=KVConnectorOutput(**kwargs))


def free(sched: Scheduler) -> int:
    return sched.kv.pool.num_free_blocks()


def test_a_consumer_pulls_all_but_the_last_token_then_computes_that_one():
    sched = make_scheduler("kv_consumer")
    request = add(sched, "r", 10, 3, remote([7, 8, 9]))
    out = sched.schedule()
    assert out.total_num_scheduled_tokens == 0 and request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    [load] = out.kv_connector_metadata.loads
    assert (load.remote_block_ids, len(load.local_block_ids), load.remote_request_id) == ([7, 8, 9], 3, "p")
    sched.update_from_output(out, transfers(finished_recving=["r"]))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"r": 1} and out.new_requests[0].num_computed_tokens == 9
    sched.update_from_output(out, fake_runner_output(sched, out))
    assert request.num_cached_tokens == 9 and request.num_external_tokens == 9


def test_a_request_aborted_mid_pull_frees_its_blocks_when_the_pull_ends():
    sched = make_scheduler("kv_consumer")
    add(sched, "r", 10, 3, remote([7, 8, 9]))
    out = sched.schedule()
    sched.abort_requests(["r"])
    assert free(sched) == 63 - 3  # the worker may still be writing them
    sched.update_from_output(out, transfers(failed_recving={"r": "gone"}))
    assert free(sched) == 63 and not sched.has_unfinished()


def test_a_producer_holds_the_prompt_blocks_until_pulled_or_expired():
    sched = make_scheduler("kv_producer", abort_request_timeout=0.01)
    for first, rid in ((1, "pulled"), (100, "expired")):
        add(sched, rid, 10, 1, {"do_remote_decode": True}, first)
    out = sched.schedule()
    outputs = sched.update_from_output(out, fake_runner_output(sched, out))
    params = {o.request_id: o.kv_transfer_params for o in outputs}
    assert params["pulled"]["remote_block_ids"] == sched.kv.block_ids("pulled")[:3]
    assert params["pulled"]["remote_port"] == PORT and params["pulled"]["remote_request_id"] == "pulled"
    assert sched.kv_new_holds and free(sched) == 63 - 6 and sched.has_unfinished()
    assert set(sched.connector.build_connector_meta().holds) == {"pulled", "expired"}
    sched.update_from_output(sched.schedule(), transfers(finished_sending=["pulled"]))
    assert free(sched) == 63 - 3
    time.sleep(0.02)
    out = sched.schedule()
    assert out.kv_connector_metadata.releases == ["expired"]  # the worker stops serving them first
    assert free(sched) == 63 and not sched.has_unfinished()
