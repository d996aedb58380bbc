"""Engine arguments as CLI flags, generated from the config dataclasses.

The dataclasses in sluice.config are the one source of every engine argument's name, default,
help text and choices; `LLM(**kwargs)`, `sluice serve`, `sluice chat` and `sluice bench
throughput|latency` all take them from here. Flags default to None ("not given"), so the
dataclass default applies unless the user set a value.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, Field, fields
from decimal import Decimal

import yaml

from sluice.config import DEFAULT_MODEL, EngineConfig, flag_name


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Every engine argument as a flag with vLLM's name, plus the model as a positional and
    vLLM's `--config file.yaml`."""
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help=f"HF folder, .gguf file or hub id (default: {DEFAULT_MODEL}); same as --model")
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file of flag names and values (vLLM's format); flags given here win")
    parser.set_defaults(engine_parser=parser)
    for part in EngineConfig.PARTS.values():
        group = parser.add_argument_group(f"engine: {part.__name__}")
        hints = typing.get_type_hints(part)
        for f in fields(part):
            group.add_argument(flag_name(f.name), *f.metadata.get("aliases", ()), **_flag_options(f, hints[f.name]))


def _flag_options(f: Field, hint) -> dict:
    """argparse options for one config field: the type from its annotation, the rest from metadata."""
    options: dict = {"default": None, "help": f.metadata["help"] + _default_text(f)}
    kinds = {t for t in typing.get_args(hint) or (hint,) if t is not type(None)}
    if kinds == {bool}:
        options["action"] = argparse.BooleanOptionalAction
    elif any(typing.get_origin(t) is list for t in kinds):
        options["nargs"] = "+"
    elif kinds == {dict}:
        options["type"] = json_object
        options["metavar"] = "JSON"
    elif kinds == {int} and f.metadata.get("human_readable"):
        options["type"] = human_int
    elif kinds in ({int}, {float}):
        options["type"] = kinds.pop()
    choices = [c for c in f.metadata.get("choices", ()) if c is not None]
    if choices:
        options["choices"] = choices
    if "metavar" in f.metadata:
        options["metavar"] = f.metadata["metavar"]
    return options


def _default_text(f: Field) -> str:
    if f.default is MISSING or f.default is None:
        return ""
    if isinstance(f.default, bool):
        return " (default: on)" if f.default else ""
    return f" (default: {f.default})"


_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_int(text: str) -> int:
    """vLLM's human-readable integers: 32k = 32,000, 32K = 32,768, 25.6k = 25,600, 4G = 4 GiB."""
    number, suffix = (text[:-1], text[-1]) if text[-1:] in {**_DECIMAL, **_BINARY} else (text, "")
    try:
        if suffix in _BINARY:
            return int(number) * _BINARY[suffix]
        value = Decimal(number) * _DECIMAL[suffix] if suffix else Decimal(int(number))
        if value == int(value):
            return int(value)
    except (ValueError, ArithmeticError):
        pass
    raise argparse.ArgumentTypeError(f"not a whole number (or 32k / 32K form): {text!r}")


def json_object(text: str) -> dict:
    """A flag value that is a JSON object, as vLLM's dict flags take."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine arguments the user gave (flags left out keep the config's default)."""
    names = EngineConfig.argument_names()
    return {name: value for name, value in vars(args).items() if name in names and value is not None}


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.from_kwargs(**engine_kwargs(args))


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, with a `--config` YAML file's values as defaults under the command line's flags;
    the positional MODEL wins over --model (as in vLLM)."""
    args = parser.parse_args(argv)
    engine_parser = vars(args).pop("engine_parser", None)
    if engine_parser is not None and args.config:
        engine_parser.set_defaults(**_config_file_values(engine_parser, args.config))
        args = parser.parse_args(argv)
        del args.engine_parser
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    return args


def _config_file_values(parser: argparse.ArgumentParser, path: str) -> dict:
    """The YAML file's keys (flag names, with - or _) parsed as flags, by destination."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"--config {path}: cannot read it as YAML ({e})")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: must be a mapping of flag names to values")
    argv, dests = [], []
    for key, value in data.items():
        flag = flag_name(str(key).replace("-", "_"))
        action = parser._option_string_actions.get(flag)  # argparse keeps no public lookup
        if action is None or flag == "--config":
            parser.error(f"--config {path}: unknown flag {key!r}")
        argv += _as_flags(flag, action, value)
        dests.append(action.dest)
    parsed = parser.parse_args(argv)
    return {dest: getattr(parsed, dest) for dest in dests}


def _as_flags(flag: str, action: argparse.Action, value) -> list[str]:
    if isinstance(value, bool) and action.nargs == 0:
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else "--no-" + flag[2:]]
        return [flag] if value else []
    if isinstance(value, list):
        return [flag, *map(str, value)]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    return [flag, str(value)]
