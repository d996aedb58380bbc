"""The configured KV connector's two halves (vLLM's KVConnectorFactory, for one connector)."""

from __future__ import annotations

from sluice.config import KVTransferConfig
from sluice.distributed.kv_transfer.base import KVConnectorScheduler, KVConnectorWorker


def create_scheduler_connector(config: KVTransferConfig, block_size: int) -> KVConnectorScheduler | None:
    """The scheduler half of the configured connector (None: no kv_transfer_config)."""
    if not config.enabled:
        return None
    from sluice.distributed.kv_transfer.zmq_connector import ZmqConnectorScheduler

    return ZmqConnectorScheduler(config, block_size)


def create_worker_connector(config: KVTransferConfig) -> KVConnectorWorker | None:
    """The worker half of the configured connector (None: no kv_transfer_config)."""
    if not config.enabled:
        return None
    from sluice.distributed.kv_transfer.zmq_connector import ZmqConnectorWorker

    return ZmqConnectorWorker(config)
