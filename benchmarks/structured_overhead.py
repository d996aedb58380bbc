"""Per-token cost of constrained decoding: decode step time with a JSON-schema grammar vs free.

    python benchmarks/structured_overhead.py                  # default model, batches 1 and 16
    python benchmarks/structured_overhead.py --batch-sizes 1 4 16 64 --output-len 128

Both sides decode the same prompts greedily for exactly --output-len tokens: the grammar is a
JSON object whose one string must be longer than the output, so it never lets the request end
early. Only steps where every request of the batch decodes one token are timed (the whole
engine step: schedule with bitmask fill, forward, masked sampling, matcher update); free and
constrained runs alternate --repeats times and the median step of each is reported, so a
neighbour's load spike hits both sides alike. The grammar's own work (bitmask fill, masking the
logits, advancing the matcher) is also clocked directly, per generated token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sluice.worker.sampler
from sluice import LLM, SamplingParams, StructuredOutputsParams
from sluice.loader import load_tokenizer, resolve_model
from sluice.structured_output.manager import RequestGrammar, StructuredOutputManager

from throughput import random_prompts  # this folder is on sys.path when run as a script

LONG_STRING = {"type": "object", "required": ["story"],
               "properties": {"story": {"type": "string", "minLength": 4000}}}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="folder, .gguf file or hub id (default: the default model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class GrammarClock:
    """Seconds spent in the grammar's per-token work, by wrapping the three functions doing it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for owner, name in ((StructuredOutputManager, "fill_bitmask"), (sluice.worker.sampler, "apply_bitmask"),
                            (RequestGrammar, "accept")):
            setattr(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def decode_step_times(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[float]:
    """Seconds of each engine step in which all of `prompts` decode one token."""
    core = llm.engine_core
    schedule, step = core.scheduler.schedule, core.step
    times: list[float] = []
    last = {}

    def recording_schedule():
        last["out"] = schedule()
        return last["out"]

    def timed_step():
        start = time.perf_counter()
        outputs = step()
        elapsed = time.perf_counter() - start
        scheduled = last["out"].scheduled
        if len(scheduled) == len(prompts) and all(s.num_new_tokens == 1 for s in scheduled):
            times.append(elapsed)
        return outputs

    core.scheduler.schedule, core.step = recording_schedule, timed_step
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        del core.scheduler.schedule, core.step  # back to the class's methods
    assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in outs), "a request ended early"
    return times


def main() -> None:
    args = parse_args()
    llm = LLM(args.model, dtype=args.dtype, seed=args.seed, max_num_seqs=max(args.batch_sizes))
    tokenizer = load_tokenizer(resolve_model(args.model))
    free = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(json=LONG_STRING))
    warm = random_prompts(tokenizer, 1, 8, args.seed + 1)
    llm.generate([{"prompt_token_ids": warm[0]}], constrained.clone(), use_tqdm=False)  # compiles the grammar
    print(f"model={args.model or 'default'} dtype={llm.config.model.torch_dtype} threads={torch.get_num_threads()} "
          f"input_len={args.input_len} output_len={args.output_len}")
    clock = GrammarClock()
    print(f"{'batch':>5} {'free ms/step':>13} {'json ms/step':>13} {'step ratio':>11} {'grammar us/token':>17}")
    for batch in args.batch_sizes:
        prompts = random_prompts(tokenizer, batch, args.input_len, args.seed)
        times: dict[str, list[float]] = {"free": [], "json": []}
        clock.seconds = 0.0
        for _ in range(args.repeats):
            times["free"] += decode_step_times(llm, prompts, free)
            times["json"] += decode_step_times(llm, prompts, constrained)
        free_ms, json_ms = (1e3 * statistics.median(times[k]) for k in ("free", "json"))
        grammar_us = 1e6 * clock.seconds / (args.repeats * batch * args.output_len)
        print(f"{batch:>5} {free_ms:>13.2f} {json_ms:>13.2f} {json_ms / free_ms:>11.3f} {grammar_us:>17.1f}")


if __name__ == "__main__":
    main()
