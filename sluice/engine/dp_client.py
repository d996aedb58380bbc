"""Data parallelism inside one server: several engine cores, each a full replica of the model on
its own CPUs, behind the API process (vLLM's internal load balancing).

`DPEngineCoreClient` speaks for all of them with EngineCoreClient's interface, so AsyncLLM and the
routes do not know how many cores there are: each user request goes whole (with its `n` children)
to the core with the fewest requests in flight from this API process, ties taken in turn; aborts
follow a request to its core; control calls go to every core; `/metrics` merges the cores' metrics,
told apart by vLLM's `engine` label. When any core dies the server goes down, as with one core.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sluice.engine.core_client import EngineCoreClient
from sluice.engine.messages import EngineCoreOutput, EngineCoreRequest


class DPEngineCoreClient:
    def __init__(self, cores: list[tuple[str, int]]) -> None:
        self.clients = [EngineCoreClient(address, pid) for address, pid in cores]
        self.in_flight: list[set[str]] = [set() for _ in self.clients]  # core request ids, per core
        self.owner: dict[str, int] = {}  # core request id -> the core that runs it
        self._turn = itertools.count()
        self.info: dict = {}
        self.on_outputs: Callable[[list[EngineCoreOutput]], None] = lambda outputs: None
        self.on_dead: Callable[[str], None] = lambda reason: None
        self.on_loras: Callable[[list], None] = lambda adapters: None
        # every core gets every adapter change (call_utility), so the first one's list speaks for all
        self.clients[0].on_loras = lambda adapters: self.on_loras(adapters)
        for index, client in enumerate(self.clients):
            client.on_outputs = lambda outputs, index=index: self._outputs(index, outputs)
            client.on_dead = self._dead

    async def start(self, timeout: float) -> dict:
        infos = await asyncio.gather(*(client.start(timeout) for client in self.clients))
        # identical replicas; a request must fit the smallest KV cache, whichever core takes it
        self.info = {**infos[0], "num_blocks": min(info["num_blocks"] for info in infos),
                     "data_parallel_size": len(self.clients)}
        return self.info

    @property
    def alive(self) -> bool:
        return all(client.alive for client in self.clients)

    @property
    def dead_reason(self) -> str | None:
        return next((client.dead_reason for client in self.clients if not client.alive), None)

    def least_loaded(self) -> int:
        """The core with the fewest requests in flight; among equals, the next in turn."""
        fewest = min(len(ids) for ids in self.in_flight)
        candidates = [i for i, ids in enumerate(self.in_flight) if len(ids) == fewest]
        return candidates[next(self._turn) % len(candidates)]

    async def add(self, requests: list[EngineCoreRequest]) -> None:
        index = self.least_loaded()
        ids = [request.request_id for request in requests]
        self.in_flight[index].update(ids)
        self.owner.update(dict.fromkeys(ids, index))
        try:
            await self.clients[index].add(requests)
        except BaseException:
            self._forget(ids)
            raise

    def abort(self, request_ids: list[str]) -> None:
        """To each request's core; from here on they no longer count as its load."""
        by_core: dict[int, list[str]] = {}
        for request_id in request_ids:
            if request_id in self.owner:
                by_core.setdefault(self.owner[request_id], []).append(request_id)
        for index, ids in by_core.items():
            self.clients[index].abort(ids)
        self._forget(request_ids)

    async def metrics_text(self) -> bytes:
        """Every core's metrics in one exposition: each family once, with every core's samples."""
        families: dict[str, object] = {}
        for text in await asyncio.gather(*(client.metrics_text() for client in self.clients)):
            for family in text_string_to_metric_families(text.decode()):
                if family.name.endswith("_created"):
                    continue
                samples = [s for s in family.samples if not s.name.endswith("_created")]
                if family.name in families:
                    families[family.name].samples += samples
                else:
                    family.samples = samples
                    families[family.name] = family
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(list(families.values())))
        return generate_latest(registry)

    async def dashboard_snapshot(self, since_step: int) -> dict:
        """/dashboard follows the first core (each replica's pool and batches are its own)."""
        return await self.clients[0].dashboard_snapshot(since_step)

    async def call_utility(self, method: str, *args):
        """Every core makes the call (reset the prefix cache, sleep, wake up); they answer alike."""
        results = await asyncio.gather(*(client.call_utility(method, *args) for client in self.clients))
        return results[0]

    def _outputs(self, index: int, outputs: list[EngineCoreOutput]) -> None:
        self._forget([out.request_id for out in outputs if out.finish_reason is not None])
        self.on_outputs(outputs)

    def _forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            index = self.owner.pop(request_id, None)
            if index is not None:
                self.in_flight[index].discard(request_id)

    def _dead(self, reason: str) -> None:
        if sum(not client.alive for client in self.clients) == 1:  # the first to go tells the server
            self.on_dead(reason)

    def close(self) -> None:
        for client in self.clients:
            client.close()


class _Families:
    """A collector that yields already-parsed metric families (prometheus_client renders them)."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return self.families
