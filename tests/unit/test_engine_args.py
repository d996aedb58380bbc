"""One source of engine arguments: every config field is a flag of every engine command, the
README's table agrees with the parser, and real vLLM launch lines parse (or are refused clearly)."""

from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sluice.config import DEFAULT_MODEL, EngineConfig, flag_name
from sluice.engine.arg_utils import add_engine_args, engine_config, parse_args
from sluice.entrypoints.cli import build_parser, main

README = Path(__file__).resolve().parents[2] / "README.md"
ENGINE_COMMANDS = (["serve"], ["chat"], ["bench", "throughput"], ["bench", "latency"])


def parse(*argv: str) -> argparse.Namespace:
    return parse_args(build_parser(), list(argv))


def option_strings(command: list[str]) -> set[str]:
    parser = build_parser()
    for name in command:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return {s for action in parser._actions for s in action.option_strings}


@pytest.mark.parametrize("command", ENGINE_COMMANDS, ids=" ".join)
def test_every_config_field_is_a_flag_of_every_engine_command(command):
    flags = option_strings(command)
    missing = sorted(flag_name(name) for name in EngineConfig.argument_names() if flag_name(name) not in flags)
    assert not missing, f"config fields without a flag on `sluice {' '.join(command)}`: {missing}"


def test_flags_left_out_give_the_dataclass_defaults():
    assert engine_config(parse("serve")) == EngineConfig()
    assert engine_config(parse("bench", "latency")) == EngineConfig()


def test_llm_takes_the_config_names_without_repeating_defaults():
    from sluice.entrypoints.llm import LLM, OFFLINE_DEFAULTS

    params = inspect.signature(LLM.__init__).parameters
    assert [p for p in params if p not in ("self", "kwargs")] == ["model"]
    assert params["model"].default is None  # None: the config's default model
    assert set(OFFLINE_DEFAULTS) <= EngineConfig.argument_names()


def readme_rows() -> list[tuple[list[str], str]]:
    """(argument names, default cell) of each row of the README's engine-argument table."""
    text = README.read_text()
    table = text[text.index("## Engine arguments"):]
    table = table[table.index("| argument |"):]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        names, default = [cell.strip() for cell in line.strip("|").split("|")][:2]
        rows.append((re.findall(r"`(\w+)`", names), default))
    return rows


def test_readme_engine_argument_table_agrees_with_the_parser():
    fields = EngineConfig.argument_fields()
    documented = [name for names, _ in readme_rows() for name in names]
    assert sorted(set(documented)) == sorted(documented), "an argument is listed twice"
    assert set(documented) == set(fields), (
        f"in the README but not the parser: {sorted(set(documented) - set(fields))}; "
        f"in the parser but not the README: {sorted(set(fields) - set(documented))}")
    flags = option_strings(["serve"])
    assert all(flag_name(name) in flags for name in documented)
    for names, cell in readme_rows():
        literal = re.match(r"`([^`]*)`", cell)
        for name in names:
            default = fields[name].default
            if literal:
                assert str(default) == literal.group(1), f"README says {name} defaults to {cell}, the config {default!r}"
            elif cell == "-":
                assert default in (None, False), f"README says {name} has no default; the config has {default!r}"


def test_no_import_circles_between_the_layers():
    code = ("import sys; import sluice.config; assert 'sluice.loader' not in sys.modules, 'config imports loader'; "
            "import sluice.bench.cli; assert 'sluice.entrypoints.cli' not in sys.modules, 'bench imports the CLI'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_model_name_lives_in_the_config():
    from sluice import loader

    assert loader.DEFAULT_MODEL is DEFAULT_MODEL
    assert EngineConfig().model.model == DEFAULT_MODEL
    assert loader.resolve_model(DEFAULT_MODEL).name == DEFAULT_MODEL


# ---- vLLM launch lines -------------------------------------------------------------------------
# Real lines from vLLM's docs, its Helm chart and common deployment manifests (KServe
# ServingRuntimes, docker-compose files, launch scripts), as `vllm serve ...` or
# `python -m vllm.entrypoints.openai.api_server ...`; only flags whose owner is this module.
LAUNCH_LINES = [
    ("vllm serve facebook/opt-125m", {"model": "facebook/opt-125m"}),
    ("vllm serve meta-llama/Llama-2-7b-hf --enable-prefix-caching", {"enable_prefix_caching": True}),
    ("vllm serve mistralai/Mistral-7B-v0.1 --gpu-memory-utilization 0.95 --max-model-len 8192",
     {"kv_cache_memory_fraction": 0.95, "max_model_len": 8192}),
    ("vllm serve facebook/opt-125m --host 0.0.0.0 --port 8080", {"model": "facebook/opt-125m"}),
    ("vllm serve meta-llama/Llama-3.2-1B-Instruct --dtype auto --max-model-len 4096 --trust-remote-code",
     {"dtype": "auto", "max_model_len": 4096, "trust_remote_code": True}),
    ("vllm serve /data/ --served-model-name opt-125m --dtype float32 --block-size 16 --host 0.0.0.0 --port 8000",
     {"model": "/data/", "served_model_name": "opt-125m", "block_size": 16}),
    ("python -m vllm.entrypoints.openai.api_server --model models/Qwen3-8B --max-model-len 8192 "
     "--gpu-memory-utilization 0.85 --max-num-seqs 64 --tensor-parallel-size 1 --port 8000",
     {"model": "models/Qwen3-8B", "max_num_seqs": 64, "kv_cache_memory_fraction": 0.85}),
    ("python -m vllm.entrypoints.openai.api_server --model google/gemma-2-9b-it --tensor-parallel-size 1 "
     "--host 0.0.0.0 --port 8000", {"tensor_parallel_size": 1}),
    ("python -m vllm.entrypoints.openai.api_server --model=/mnt/models/ --download-dir=/models-cache --port=8080 "
     "--distributed-executor-backend=mp --tensor-parallel-size=1 --max-model-len=2048 --enable-chunked-prefill "
     "--gpu-memory-utilization=0.95 --max-num-seqs=512",
     {"download_dir": "/models-cache", "distributed_executor_backend": "mp", "max_num_seqs": 512}),
    ("vllm serve amd/Llama-3.1-70B-Instruct --trust-remote-code --max-model-len=65536 "
     "--max-num-batched-token=65536 --max-num-seqs=1024 --gpu-memory-utilization=0.9 --enable-prefix-caching "
     "--disable-log-requests --kv-cache-dtype=auto -tp 1", {"max_num_batched_tokens": 65536, "max_num_seqs": 1024}),
    ("vllm serve Qwen/Qwen3-8B --max-model-len 32k --max-num-batched-tokens 8K --kv-cache-memory-bytes 4G",
     {"max_model_len": 32000, "max_num_batched_tokens": 8192, "kv_cache_memory_bytes": 4 << 30}),
    ("python -m vllm.entrypoints.openai.api_server --model Infermatic/Llama-3.3-70B-Instruct --host 0.0.0.0 "
     "--port 8000 --tensor-parallel-size 1 --pipeline-parallel-size 1 --max-model-len 8000 "
     "--gpu-memory-utilization 0.95 --trust-remote-code --max-num-seqs 128", {"pipeline_parallel_size": 1}),
    ("vllm serve mistralai/Mistral-7B-Instruct-v0.3 --host 0.0.0.0 --port 8000 --tensor-parallel-size 1 "
     "--dtype auto --max-model-len 8192 --max-num-seqs 256 --gpu-memory-utilization 0.95 --quantization none "
     "--load-format auto", {"quantization": "none", "load_format": "auto"}),
    ("python3 -m vllm.entrypoints.openai.api_server --model Qwen/Qwen2-7B --download-dir /models/ "
     "--trust-remote-code --enforce-eager", {"enforce_eager": True, "download_dir": "/models/"}),
    ("vllm serve Qwen/Qwen2.5-1.5B-Instruct --generation-config vllm", {"generation_config": "vllm"}),
    ("vllm serve meta-llama/Llama-3.1-8B -tp 2 -pp 2 --distributed-executor-backend ray",
     {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "distributed_executor_backend": "ray"}),
    ("vllm serve Qwen/Qwen2.5-1.5B-Instruct --override-generation-config '{\"temperature\": 0.5}'",
     {"override_generation_config": {"temperature": 0.5}}),
    ("vllm serve Qwen/Qwen3-8B --hf-overrides '{\"max_position_embeddings\": 65536}' --max-logprobs 50 "
     "--seed 42 --revision main --tokenizer-mode auto --tokenizer Qwen/Qwen3-8B",
     {"hf_overrides": {"max_position_embeddings": 65536}, "max_logprobs": 50, "seed": 42, "revision": "main"}),
    ("vllm serve meta-llama/Llama-3.1-8B-Instruct --no-enable-prefix-caching --max-num-batched-tokens 8192 "
     "--disable-log-stats --data-parallel-size 1",
     {"enable_prefix_caching": False, "disable_log_stats": True}),
    ("vllm serve meta-llama/Llama-3.1-8B-Instruct --speculative-config '{\"method\": \"ngram\", "
     "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4}'",
     {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}}),
    ("vllm serve meta-llama/Llama-3.2-1B-Instruct --data-parallel-size 4 --tensor-parallel-size 1",
     {"data_parallel_size": 4, "data_parallel_rank": None}),
    ("vllm serve meta-llama/Llama-3.1-8B-Instruct --speculative-config '{\"method\": \"eagle3\", "
     "\"model\": \"yuhuili/EAGLE3-LLaMA3.1-Instruct-8B\", \"num_speculative_tokens\": 3}'",
     {"speculative_config": {"method": "eagle3", "model": "yuhuili/EAGLE3-LLaMA3.1-Instruct-8B",
                             "num_speculative_tokens": 3}}),
]


def vllm_argv(line: str) -> list[str]:
    import shlex

    words = shlex.split(line)
    start = 2 if words[:2] == ["vllm", "serve"] else 3  # python -m vllm.entrypoints.openai.api_server
    return ["serve", *words[start:]]


@pytest.mark.parametrize("line, expected", LAUNCH_LINES, ids=lambda v: v[:60] if isinstance(v, str) else "")
def test_vllm_launch_lines_parse(line, expected):
    config = engine_config(parse(*vllm_argv(line)))
    values = {f: getattr(part, f) for part in vars(config).values() for f in vars(part)}
    for name, value in expected.items():
        assert values[name] == value, name


REFUSED = [
    ("vllm serve TheBloke/Llama-2-13B-AWQ --quantization awq", "--quantization"),
    ("vllm serve Qwen/Qwen2.5-14B-Instruct-AWQ -q awq --port 8012", "--quantization"),
    ("vllm serve amd/Llama-3.1-70B-Instruct-FP8-KV --kv-cache-dtype=fp8_e5m2", "--kv-cache-dtype"),
    ("vllm serve mistralai/Mistral-7B-Instruct-v0.3 --tokenizer-mode mistral", "--tokenizer-mode"),
]


@pytest.mark.parametrize("line, flag", REFUSED, ids=lambda v: v[:60])
def test_features_not_there_yet_are_refused_naming_the_flag(line, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(vllm_argv(line))
    message = str(exit_info.value.code)
    assert flag in message and "not available yet" in message


@pytest.mark.parametrize("flags, message", [
    (["--hf-overrides", "[1]"], "--hf-overrides: must be a JSON object"),
    (["--override-generation-config", "{temperature: 1}"], "--override-generation-config: not valid JSON"),
    (["--load-format", "pt"], "--load-format: invalid choice: 'pt'"),
    (["--max-logprobs", "many"], "--max-logprobs: invalid int value"),
    (["--max-model-len", "1.5K"], "--max-model-len: not a whole number (or 32k / 32K form): '1.5K'"),
    (["--kv-cache-dtype", "fp16x"], "--kv-cache-dtype: invalid choice: 'fp16x' (choose from 'auto', 'bfloat16', "
                                    "'fp8', 'fp8_e4m3', 'fp8_e5m2', 'int8')"),
])
def test_bad_flag_values_name_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit):
        main(["serve", *flags])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    ({"max_logprobs": -2}, "max_logprobs must be an int >= -1"),
    ({"gpu_memory_utilization": 0.99}, "kv_cache_memory_fraction (or gpu_memory_utilization) must be in (0, 0.95]"),
    ({"gpu_memory_utilization": 0.5, "kv_cache_memory_fraction": 0.3}, "disagree"),
    ({"hf_overrides": "x"}, "hf_overrides must be a JSON object"),
    ({"kv_cache_dtype": "fp16x"}, "kv_cache_dtype must be one of 'auto', 'bfloat16', 'fp8', 'fp8_e4m3', 'fp8_e5m2', "
                                  "'int8'; got 'fp16x'"),
])
def test_bad_engine_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as error:
        EngineConfig.from_kwargs(**kwargs)
    assert message in str(error.value)


def test_contradicting_request_log_flags_are_refused():
    with pytest.raises(SystemExit, match="--disable-log-requests and --enable-log-requests contradict"):
        main(["serve", "--disable-log-requests", "--enable-log-requests"])


def test_inert_vllm_flags_are_accepted_and_logged():
    config = engine_config(parse("serve", "--enforce-eager", "--trust-remote-code", "--no-enable-chunked-prefill",
                                 "--gpu-memory-utilization", "0.5"))
    notes = " | ".join(config.notes())
    for name in ("enforce_eager", "trust_remote_code", "enable_chunked_prefill", "gpu_memory_utilization=0.5"):
        assert name in notes
    assert config.cache.kv_cache_memory_fraction == 0.5


def test_model_flag_and_positional():
    assert parse("serve", "--model", "a/b").model == "a/b"
    assert engine_config(parse("serve", "--model", "a/b")).model.model == "a/b"
    assert parse("serve", "c/d", "--model", "a/b").model == "c/d"  # the positional wins, as in vLLM
    assert engine_config(parse("bench", "throughput", "--model", "a/b")).model.model == "a/b"


def test_config_yaml_gives_defaults_and_the_command_line_wins(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: some/model\nmax-num-seqs: 8\nmax_model_len: 512\nenable-prefix-caching: false\n"
                    "served-model-name: [a, b]\nhf-overrides: {rope_theta: 1000.0}\nport: 9001\n")
    args = parse("serve", "--config", str(path), "--max-num-seqs", "4")
    config = engine_config(args)
    assert (config.model.model, config.scheduler.max_num_seqs, config.model.max_model_len) == ("some/model", 4, 512)
    assert not config.cache.enable_prefix_caching and config.model.hf_overrides == {"rope_theta": 1000.0}
    assert args.served_model_name == ["a", "b"] and args.port == 9001
    assert not hasattr(args, "engine_parser")  # the namespace travels to spawned API processes


@pytest.mark.parametrize("text, message", [
    ("no-such-flag: 1\n", "unknown flag 'no-such-flag'"),
    ("- a\n- b\n", "must be a mapping of flag names to values"),
    ("max-num-seqs: many\n", "--max-num-seqs: invalid int value"),
])
def test_bad_config_yaml_is_refused_clearly(tmp_path, text, message, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit):
        parse("serve", "--config", str(path))
    assert message in capsys.readouterr().err


def test_version(capsys):
    import sluice

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == sluice.__version__


def test_flags_parse_on_any_parser():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--hf-overrides", json.dumps({"a": 1}), "-tp", "1"])
    assert args.hf_overrides == {"a": 1} and args.tensor_parallel_size == 1
