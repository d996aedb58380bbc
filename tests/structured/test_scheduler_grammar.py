"""The scheduler with grammars, no model: compiling requests wait without blocking others, fail
on error or timeout, and their matchers follow the sampled tokens. Compilation is a future the
test completes by hand, so every ordering is deterministic."""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest

from sluice.config import SchedulerConfig, StructuredOutputsConfig
from sluice.core.kv_cache_manager import KVCacheManager
from sluice.core.request import Request, RequestStatus
from sluice.core.scheduler import Scheduler
from sluice.engine.messages import EngineCoreRequest
from sluice.sampling_params import SamplingParams, StructuredOutputsParams
from sluice.structured_output.manager import StructuredOutputManager

from tests.utils import fake_runner_output, smollm2_tokenizer

VOCAB = 49152
EOS = 2


@pytest.fixture
def futures(monkeypatch) -> dict[tuple, Future]:
    """Compilation futures the test completes itself, by spec."""
    made: dict[tuple, Future] = {}
    monkeypatch.setattr("sluice.structured_output.backend.GrammarCompiler.submit",
                        lambda self, spec: made.setdefault(spec, Future()))
    return made


def make_scheduler(timeout: float = 30.0) -> Scheduler:
    manager = StructuredOutputManager(StructuredOutputsConfig(structured_outputs_compile_timeout=timeout),
                                      smollm2_tokenizer, VOCAB)
    return Scheduler(SchedulerConfig(), KVCacheManager(64, 16, True), 1024, manager)


def compiled(sched: Scheduler, kind: str, text: str, finished_at: float | None = None):
    """A real compilation result, as the worker thread would return it."""
    grammar, done = sched.structured_output.compiler._compile(kind, text)
    return grammar, done if finished_at is None else finished_at


def finish_compiling(futures: dict[tuple, Future], sched: Scheduler, spec: StructuredOutputsParams) -> None:
    futures.setdefault(spec.spec(), Future()).set_result(compiled(sched, *spec.spec()))


def add(sched: Scheduler, rid: str, spec: StructuredOutputsParams | None = None, ignore_eos: bool = False,
        max_tokens: int = 8) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, structured_outputs=spec)
    request = Request(EngineCoreRequest(rid, [5, 6, 7], params, eos_token_ids=(EOS,)), max_tokens)
    sched.add_request(request)
    return request


def step(sched: Scheduler, tokens: dict[str, int] | None = None):
    out = sched.schedule()
    sampled = fake_runner_output(sched, out, 9, tokens)
    return out, {o.request_id: o for o in sched.update_from_output(out, sampled)}


def token(text: str) -> int:
    [token_id] = smollm2_tokenizer().encode(text)
    return token_id


def test_a_compiling_request_waits_while_others_run(futures):
    sched = make_scheduler()
    spec = StructuredOutputsParams(regex="ab")
    constrained = add(sched, "c", spec)
    free = add(sched, "f")
    assert constrained.status is RequestStatus.WAITING_FOR_GRAMMAR and sched.num_waiting == 2
    waiting = sched.scheduler_stats()  # vllm:num_requests_waiting_by_reason
    assert (waiting.num_waiting_capacity, waiting.num_waiting_deferred) == (1, 1)
    out, _ = step(sched)
    assert list(out.num_scheduled_tokens) == ["f"] and out.grammar_bitmask is None
    finish_compiling(futures, sched, spec)
    out, _ = step(sched, {"c": token("a")})
    assert list(out.num_scheduled_tokens) == ["f", "c"]
    assert constrained.status is RequestStatus.RUNNING and free.num_output_tokens == 2
    assert out.grammar_bitmask.req_ids == ["c"] and out.grammar_bitmask.bitmask.shape == (1, VOCAB // 32)


def test_identical_specs_share_one_compilation(futures):
    sched = make_scheduler()
    add(sched, "a", StructuredOutputsParams(choice=["x", "y"]))
    add(sched, "b", StructuredOutputsParams(choice=["x", "y"]))
    assert len(futures) == 1


def test_the_matcher_follows_tokens_and_its_end_stops_the_request(futures):
    sched = make_scheduler()
    spec = StructuredOutputsParams(regex="ab")
    finish_compiling(futures, sched, spec)
    request = add(sched, "r", spec, ignore_eos=True)  # the grammar still ends on EOS
    out, _ = step(sched, {"r": token("a")})
    allowed = out.grammar_bitmask.bitmask[0]
    assert allowed[token("a") // 32] >> (token("a") % 32) & 1 and not allowed[token("b") // 32] >> (token("b") % 32) & 1
    step(sched, {"r": token("b")})
    _, outputs = step(sched, {"r": EOS})
    assert outputs["r"].finish_reason == "stop" and request.output_token_ids == [token("a"), token("b"), EOS]
    assert sched.structured_output.num_active == 0 and not sched.has_unfinished()


def test_a_token_outside_the_grammar_fails_the_request(futures):
    sched = make_scheduler()
    spec = StructuredOutputsParams(regex="ab")
    finish_compiling(futures, sched, spec)
    add(sched, "r", spec)
    _, outputs = step(sched, {"r": token("b")})
    assert outputs["r"].finish_reason == "error"
    assert outputs["r"].error == f"structured_outputs.regex: sampled token {token('b')} does not fit the grammar"


def test_a_failed_compilation_fails_the_request_with_its_reason(futures):
    sched = make_scheduler()
    spec = StructuredOutputsParams(regex="ab")
    add(sched, "r", spec)
    futures[spec.spec()].set_exception(RuntimeError("[12:00:00] /src/compiler.cc:12: out of memory"))
    _, outputs = step(sched)
    assert outputs["r"].finish_reason == "error"
    assert outputs["r"].error == "structured_outputs.regex: the grammar failed to compile: out of memory"
    assert not sched.has_unfinished() and sched.structured_output.num_active == 0


def test_compile_timeout_fails_the_request(futures):
    sched = make_scheduler(timeout=0.05)
    spec = StructuredOutputsParams(json={"type": "object"})
    add(sched, "late", spec)  # never finishes compiling
    _, outputs = step(sched)
    assert outputs == {}
    time.sleep(0.06)
    _, outputs = step(sched)
    assert outputs["late"].finish_reason == "error"
    assert outputs["late"].error == ("structured_outputs.json: the grammar did not compile within 0.05 s "
                                     "(--structured-outputs-compile-timeout)")


def test_a_compilation_that_finished_too_late_fails_however_late_we_look(futures):
    sched = make_scheduler(timeout=1.0)
    spec = StructuredOutputsParams(regex="a")
    request = add(sched, "slow", spec)
    futures[spec.spec()].set_result(compiled(sched, *spec.spec(), finished_at=request.grammar.started + 1.5))
    _, outputs = step(sched)
    assert "did not compile within 1 s" in outputs["slow"].error


def test_aborting_a_compiling_request(futures):
    sched = make_scheduler()
    add(sched, "r", StructuredOutputsParams(regex="a"))
    sched.abort_requests(["r"])
    assert not sched.waiting_for_grammar and sched.structured_output.num_active == 0
    _, outputs = step(sched)
    assert outputs["r"].finish_reason == "abort" and not sched.has_unfinished()


def test_an_idle_engine_waits_briefly_for_a_grammar_instead_of_spinning(futures):
    sched = make_scheduler()
    add(sched, "r", StructuredOutputsParams(regex="a"))
    started = time.monotonic()
    step(sched)
    assert time.monotonic() - started >= 0.009
