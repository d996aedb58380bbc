"""The configured KV connector's two halves (vLLM's KVConnectorFactory, for one connector)."""

from __future__ import annotations

from sluice.config import EngineConfig
from sluice.distributed.kv_transfer.base import KVConnectorScheduler, KVConnectorWorker


def kv_serve_port(config: EngineConfig) -> int:
    """Where this engine's worker serves its KV: kv_port, plus the data-parallel rank (each
    engine core of a data-parallel server serves its own blocks)."""
    return config.kv_transfer.kv_port + (config.parallel.data_parallel_rank or 0)


def create_scheduler_connector(config: EngineConfig) -> KVConnectorScheduler | None:
    """The scheduler half of the configured connector (None: no kv_transfer_config)."""
    if not config.kv_transfer.enabled:
        return None
    from sluice.distributed.kv_transfer.zmq_connector import ZmqConnectorScheduler

    return ZmqConnectorScheduler(config.kv_transfer, config.cache.block_size, kv_serve_port(config))


def create_worker_connector(config: EngineConfig) -> KVConnectorWorker | None:
    """The worker half of the configured connector (None: no kv_transfer_config)."""
    if not config.kv_transfer.enabled:
        return None
    from sluice.distributed.kv_transfer.zmq_connector import ZmqConnectorWorker

    return ZmqConnectorWorker(config.kv_transfer, kv_serve_port(config))
