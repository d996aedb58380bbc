"""kv_transfer_params: how a request says where its KV comes from or goes to (vLLM's keys).

Torch-free: the API side checks a request's params where it enters.
"""

from __future__ import annotations


def check_kv_transfer_params(params: object) -> None:
    """A request's kv_transfer_params, checked where it enters (ValueError names the key)."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise ValueError(f"kv_transfer_params must be a JSON object, got {params!r}")
    if not params.get("do_remote_prefill"):
        return
    blocks = params.get("remote_block_ids")
    if not isinstance(blocks, list) or not blocks or not all(_is_int(b) and b >= 0 for b in blocks):
        raise ValueError(f"kv_transfer_params.remote_block_ids must be a non-empty list of block ids with "
                         f"do_remote_prefill; got {blocks!r}")
    host, port = params.get("remote_host"), params.get("remote_port")
    if not isinstance(host, str) or not host:
        raise ValueError(f"kv_transfer_params.remote_host must be a host name or address; got {host!r}")
    if not _is_int(port) or not 1 <= port <= 65535:
        raise ValueError(f"kv_transfer_params.remote_port must be an int in [1, 65535]; got {port!r}")
    if not isinstance(params.get("remote_request_id"), str):
        raise ValueError(f"kv_transfer_params.remote_request_id must be the producer's request id (a string); "
                         f"got {params.get('remote_request_id')!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
