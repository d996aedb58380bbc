"""LoRA adapters on the server: `--lora-modules` at start, `POST /v1/load_lora_adapter` and
`/v1/unload_lora_adapter` at run time (only with `--enable-lora-runtime-update` or
VLLM_ALLOW_RUNTIME_LORA_UPDATING=true), each behind the API key like every route.

A runtime load reads files on the server's disk, so its path must lie under a directory of
`--lora-allowed-dirs` (default: none, so only the adapters given at start can be served). A
request whose `model` names an adapter runs under it; /v1/models lists each with `parent` =
the base model. The engine core owns the adapters: each API process mirrors its list, which
the core sends to every one of them on each change, so with --api-server-count > 1 a load or
unload through one process is served (and listed) by all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import Response

from sluice.entrypoints.openai.engine_routes import json_body, parse
from sluice.entrypoints.openai.protocol import APIError
from sluice.lora.request import LoRARequest

logger = logging.getLogger("sluice")

RUNTIME_UPDATE_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


@dataclass(frozen=True)
class LoRAModule:
    """One --lora-modules entry: `name=path` or vLLM's JSON form."""

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(value: str) -> LoRAModule:
    """argparse type for --lora-modules."""
    if value.lstrip().startswith("{"):
        try:
            entry = json.loads(value)
            return LoRAModule(str(entry["name"]), str(entry["path"]), entry.get("base_model_name"))
        except (ValueError, KeyError, TypeError) as exc:
            raise argparse.ArgumentTypeError(f'--lora-modules: {value!r} must be name=path or '
                                             f'{{"name": ..., "path": ..., "base_model_name": ...}} ({exc})')
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules: {value!r} must be name=path")
    return LoRAModule(name, path)


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server: LoRA adapters (with --enable-lora)")
    group.add_argument("--lora-modules", nargs="+", type=parse_lora_module, default=None,
                       metavar="NAME=PATH|JSON",
                       help='adapters to serve, as name=path or \'{"name": ..., "path": ..., '
                            '"base_model_name": ...}\'; a request whose model is the name uses it')
    group.add_argument("--enable-lora-runtime-update", action="store_true",
                       help="add POST /v1/load_lora_adapter and /v1/unload_lora_adapter (also on with "
                            f"{RUNTIME_UPDATE_ENV}=true)")
    group.add_argument("--lora-allowed-dirs", nargs="+", default=None, metavar="DIR",
                       help="directories runtime loads may read adapters from (default: none)")


def check_lora_args(args: argparse.Namespace) -> None:
    if (args.lora_modules or args.enable_lora_runtime_update) and not args.enable_lora:
        raise SystemExit("--lora-modules and --enable-lora-runtime-update need --enable-lora")
    names = [module.name for module in args.lora_modules or ()]
    if len(set(names)) != len(names):
        raise SystemExit(f"--lora-modules: adapter names must be unique, got {', '.join(names)}")


def runtime_update_enabled(args: argparse.Namespace) -> bool:
    return args.enable_lora_runtime_update or os.environ.get(RUNTIME_UPDATE_ENV, "").lower() in ("1", "true")


def _adapter_id(*parts: str) -> int:
    """A positive id every API process derives alike for the same adapter."""
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:7], "big") + 1


class LoRARegistry:
    """The adapters this API process serves, by name: a mirror of the engine core's list."""

    def __init__(self, engine, base_model: str, allowed_dirs: list[str] | None) -> None:
        self.engine = engine
        self.base_model = base_model
        self.allowed_dirs = [os.path.realpath(d) for d in allowed_dirs or ()]
        self.adapters: dict[str, LoRARequest] = {}
        self.parents: dict[str, str] = {}
        client = getattr(engine, "client", None)
        if client is not None:
            client.on_loras = self.sync

    def get(self, name: str | None) -> LoRARequest | None:
        return self.adapters.get(name) if name is not None else None

    def sync(self, adapters: list[list]) -> None:
        """Take the core's list of [name, id, path, parent] as this process's."""
        self.adapters = {name: LoRARequest(name, int(lora_id), path) for name, lora_id, path, _ in adapters}
        self.parents = {name: parent or self.base_model for name, _, _, parent in adapters}

    async def add_modules(self, modules: list[LoRAModule]) -> None:
        """The --lora-modules adapters (a bad one stops the server naming it), then whatever the
        core already serves (runtime loads through another API process)."""
        for module in modules:
            try:
                await self._add(module.name, LoRARequest(module.name, _adapter_id(module.name, module.path),
                                                         module.path), module.base_model_name)
            except ValueError as exc:
                raise SystemExit(f"--lora-modules {module.name}={module.path}: {exc}") from None
        self.sync(await self.engine.call_utility("lora_adapters"))

    async def load(self, name: str, path: str) -> None:
        """A runtime load: the path must lie under --lora-allowed-dirs."""
        if name in self.adapters:
            raise APIError(f"The lora adapter '{name}' has already been loaded.", 400, param="lora_name")
        real = os.path.realpath(path)
        if not any(os.path.commonpath([real, d]) == d for d in self.allowed_dirs):
            raise APIError(f"lora_path {path!r} is outside the directories --lora-allowed-dirs allows "
                           f"({', '.join(self.allowed_dirs) or 'none'})", 400, param="lora_path")
        try:
            await self._add(name, LoRARequest(name, _adapter_id(name, real, str(time.time_ns())), real))
        except ValueError as exc:
            raise APIError(str(exc), 400, param="lora_path") from None

    async def _add(self, name: str, request: LoRARequest, parent: str | None = None) -> None:
        await self.engine.call_utility("add_lora", request, parent)
        self.adapters[name] = request
        self.parents[name] = parent or self.base_model
        logger.info("LoRA adapter %s loaded from %s", name, request.lora_path)

    async def unload(self, name: str) -> None:
        request = self.adapters.pop(name, None)
        if request is None:
            raise APIError(f"The lora adapter '{name}' cannot be found.", 404, param="lora_name",
                           code="model_not_found")
        self.parents.pop(name)
        await self.engine.call_utility("remove_lora", request.lora_int_id)
        logger.info("LoRA adapter %s unloaded", name)


class LoadLoRAAdapterRequest(pydantic.BaseModel):
    lora_name: str = pydantic.Field(min_length=1)
    lora_path: str = pydantic.Field(min_length=1)


class UnloadLoRAAdapterRequest(pydantic.BaseModel):
    lora_name: str = pydantic.Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's field; the name decides


def add_lora_routes(app: FastAPI, registry: LoRARegistry) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        body = parse(LoadLoRAAdapterRequest, await json_body(request))
        await registry.load(body.lora_name, body.lora_path)
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        body = parse(UnloadLoRAAdapterRequest, await json_body(request))
        await registry.unload(body.lora_name)
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")
