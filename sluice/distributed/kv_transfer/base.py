"""The KV connector interface, shaped like vLLM's V1 one, and the plain data it passes.

A connector has two halves. The scheduler half lives beside the scheduler: it says how many of a
request's tokens can be loaded from elsewhere, learns which blocks were allocated for them,
describes each step's transfers as `KVConnectorMetadata`, and decides whether a finished
request's blocks must outlive it (a producer holds them until a consumer pulled them). The
worker half lives beside the KV cache: it runs the transfers the metadata asks for and reports
which ones ended (`KVConnectorOutput`). Only that plain data crosses between the two, inside
SchedulerOutput and RunnerOutput, so the worker may live in another process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from sluice.core.request import Request


@dataclass
class KVLoad:
    """Blocks a consumer fetches from a producer into its own blocks, in order."""

    req_id: str
    local_block_ids: list[int]
    remote_block_ids: list[int]
    remote_request_id: str
    remote_host: str
    remote_port: int


@dataclass
class KVConnectorMetadata:
    """One step's instructions from the scheduler half to the worker half."""

    loads: list[KVLoad] = field(default_factory=list)
    holds: dict[str, list[int]] = field(default_factory=dict)  # request id -> blocks kept for a pull
    releases: list[str] = field(default_factory=list)  # held requests no one may pull any more

    def __bool__(self) -> bool:
        return bool(self.loads or self.holds or self.releases)


@dataclass
class KVConnectorOutput:
    """What the worker half finished since it last reported."""

    finished_sending: list[str] = field(default_factory=list)  # held requests pulled: free their blocks
    finished_recving: list[str] = field(default_factory=list)  # loads written into the local blocks
    failed_recving: dict[str, str] = field(default_factory=dict)  # request id -> why its load failed

    def __bool__(self) -> bool:
        return bool(self.finished_sending or self.finished_recving or self.failed_recving)


class KVConnectorScheduler(ABC):
    """The scheduler half."""

    @abstractmethod
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        """Tokens after the locally computed ones that can be loaded from elsewhere (loaded
        asynchronously: the request waits for them outside the queue)."""

    @abstractmethod
    def update_state_after_alloc(self, request: Request, block_ids: list[int], num_external_tokens: int) -> None:
        """The request's blocks are allocated: plan the load of its external tokens into them."""

    @abstractmethod
    def build_connector_meta(self) -> KVConnectorMetadata:
        """This step's instructions for the worker half (taken: the next call starts afresh)."""

    @abstractmethod
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Whether the request's blocks must outlive it (freed when the worker reports them
        sent, or released), and the kv_transfer_params its response carries."""

    @abstractmethod
    def release(self, request_id: str) -> None:
        """A held request's blocks are about to be freed without a pull (timeout)."""


class KVConnectorWorker(ABC):
    """The worker half."""

    @abstractmethod
    def register_kv_caches(self, kv_caches: list[torch.Tensor], layout: list) -> None:
        """The KV cache tensors ([2, num_blocks, ...] per layer) and a description of their layout
        that both ends of a transfer must share."""

    @abstractmethod
    def start_step(self, metadata: KVConnectorMetadata | None) -> None:
        """Apply the step's holds and releases and start its loads (in the background)."""

    @abstractmethod
    def get_finished(self) -> KVConnectorOutput | None:
        """Transfers that ended since the last call; None when nothing did."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop serving and loading."""
