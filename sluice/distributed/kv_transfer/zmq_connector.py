"""SluiceZmqConnector: a finished prefill's KV blocks, pulled by the decode engine over ZMQ TCP.

The producer (kv_producer / kv_both) runs a prefill request (vLLM's proxy sends it with
max_tokens=1 and kv_transfer_params {"do_remote_decode": true}); when it finishes its blocks are
held, not freed, and its response's kv_transfer_params say where they are (remote_host,
remote_port, remote_request_id, remote_block_ids, as vLLM's NixlConnector names them). The
consumer (kv_consumer / kv_both) gets the same prompt with those kv_transfer_params: it allocates
blocks, its worker pulls the remote blocks straight into them (one ROUTER socket on the
producer's worker, one DEALER per load), and the request is scheduled with all but its last
prompt token computed (that one runs again so that sampling has logits, as in vLLM).

Nothing leaks: the producer frees held blocks once pulled, or `abort_request_timeout` seconds
after the request finished; a consumer whose pull fails or goes unanswered for
`transfer_timeout` seconds prefills locally (kv_load_failure_policy "recompute") or fails the
request with the reason ("fail"). Blocks travel as raw bytes, a frame per layer, after the two
ends checked that their cache layouts match.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec
import torch
import zmq

from sluice.config import KVTransferConfig
from sluice.distributed.kv_transfer.base import (KVConnectorMetadata, KVConnectorOutput, KVConnectorScheduler,
                                                 KVConnectorWorker, KVLoad)

logger = logging.getLogger("sluice")

POLL_MS = 100  # how often a waiting socket checks that it should stop
PENDING_RETRY_S = 0.005  # a hold the producer's worker has not heard of yet: ask again this soon
REMEMBERED_RELEASES = 4096  # released request ids the server still answers for (not "pending")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- the scheduler half -------------------------------------------------------------------
class ZmqConnectorScheduler(KVConnectorScheduler):
    def __init__(self, config: KVTransferConfig, block_size: int, port: int) -> None:
        self.config = config
        self.block_size = block_size
        self.port = port  # where the worker serves held blocks
        self.meta = KVConnectorMetadata()

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int:
        params = request.kv_transfer_params
        if not self.config.is_consumer or not params or not params.get("do_remote_prefill") or request.kv_loaded:
            return 0
        # the remote blocks hold the whole prompt; the last token is computed here for its logits
        num_remote = min(request.num_prompt_tokens - 1, len(params["remote_block_ids"]) * self.block_size)
        return max(num_remote - num_computed_tokens, 0)

    def update_state_after_alloc(self, request, block_ids: list[int], num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        first = request.num_computed_tokens // self.block_size  # blocks before it are local prefix hits
        last = cdiv(request.num_computed_tokens + num_external_tokens, self.block_size)
        self.meta.loads.append(KVLoad(request.request_id, block_ids[first:last], params["remote_block_ids"][first:last],
                                      params["remote_request_id"], params["remote_host"], params["remote_port"]))

    def build_connector_meta(self) -> KVConnectorMetadata:
        meta, self.meta = self.meta, KVConnectorMetadata()
        return meta

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        params = request.kv_transfer_params
        if not self.config.is_producer or not params or not params.get("do_remote_decode"):
            return False, None
        if request.status.finish_reason not in ("stop", "length"):  # aborted or failed: nothing to hand on
            return False, None
        held = block_ids[: cdiv(request.num_prompt_tokens, self.block_size)]
        self.meta.holds[request.request_id] = held
        return True, {
            "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.config.engine_id,
            "remote_block_ids": held, "remote_host": self.config.kv_ip, "remote_port": self.port,
            "remote_request_id": request.request_id, "tp_size": 1,
        }

    def release(self, request_id: str) -> None:
        self.meta.holds.pop(request_id, None)
        self.meta.releases.append(request_id)


# ---- the wire -----------------------------------------------------------------------------
@dataclass
class PullRequest:
    remote_request_id: str
    block_ids: list[int]
    layout: list  # the consumer's cache layout: must equal the producer's


@dataclass
class PullReply:
    status: str  # ok | pending (the hold has not reached the worker yet) | error
    reason: str = ""
    shapes: list | None = None  # per layer, the shape of its frame (ok)


_encode = msgspec.msgpack.Encoder().encode
_decode_pull = msgspec.msgpack.Decoder(PullRequest).decode
_decode_reply = msgspec.msgpack.Decoder(PullReply).decode


class TransferError(RuntimeError):
    """A load that cannot complete; the message says why."""


# ---- the worker half ----------------------------------------------------------------------
class ZmqConnectorWorker(KVConnectorWorker):
    def __init__(self, config: KVTransferConfig, port: int) -> None:
        self.config = config
        self.port = port
        self.kv_caches: list[torch.Tensor] = []
        self.layout: list = []
        self.lock = threading.Lock()  # held: request id -> block ids; guards them against reuse mid-copy
        self.held: dict[str, list[int]] = {}
        self.released: collections.deque[str] = collections.deque(maxlen=REMEMBERED_RELEASES)
        self.output = KVConnectorOutput()
        self.stop = threading.Event()
        self.server: threading.Thread | None = None
        self.loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-load") if config.is_consumer else None

    def register_kv_caches(self, kv_caches: list[torch.Tensor], layout: list) -> None:
        self.kv_caches, self.layout = kv_caches, layout
        if not self.config.is_producer:
            return
        address = f"tcp://{self.config.kv_ip}:{self.port}"
        socket = zmq.Context.instance().socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.bind(address)
        except zmq.ZMQError as exc:
            socket.close()
            raise ValueError(f"kv_transfer_config: cannot serve KV blocks on {address} ({exc}); choose another "
                             "kv_ip / kv_port") from None
        self.server = threading.Thread(target=self._serve, args=(socket,), name="kv-serve", daemon=True)
        self.server.start()
        logger.info("KV transfer: %s serving KV blocks on %s (engine_id %s)", self.config.kv_role, address,
                    self.config.engine_id)

    def start_step(self, metadata: KVConnectorMetadata | None) -> None:
        if not metadata:
            return
        with self.lock:
            self.held.update(metadata.holds)
            for request_id in metadata.releases:
                self.held.pop(request_id, None)
                self.released.append(request_id)
        for load in metadata.loads:
            self.loader.submit(self._load, load)

    def get_finished(self) -> KVConnectorOutput | None:
        with self.lock:
            if not self.output:
                return None
            output, self.output = self.output, KVConnectorOutput()
        return output

    def shutdown(self) -> None:
        self.stop.set()
        if self.server is not None:
            self.server.join(timeout=5)
        if self.loader is not None:
            self.loader.shutdown(wait=False, cancel_futures=True)

    # ---- producer: answer pulls ----
    def _serve(self, socket: zmq.Socket) -> None:
        try:
            while not self.stop.is_set():
                if not socket.poll(POLL_MS):
                    continue
                identity, payload = socket.recv_multipart()
                reply, frames = self._answer(payload)
                socket.send_multipart([identity, _encode(reply), *frames], copy=False)
        finally:
            socket.close()

    def _answer(self, payload: bytes) -> tuple[PullReply, list]:
        try:
            pull = _decode_pull(payload)
        except msgspec.DecodeError as exc:
            return PullReply("error", f"malformed pull request ({exc})"), []
        if pull.layout != self.layout:
            return PullReply("error", f"KV cache layouts differ (producer {self.layout}, consumer {pull.layout}): "
                                      "both engines need the same model, dtype, kv_cache_dtype and block_size"), []
        with self.lock:
            held = self.held.get(pull.remote_request_id)
            if held is None:
                if pull.remote_request_id in self.released:
                    return PullReply("error", f"request {pull.remote_request_id!r}: its blocks were released "
                                              "(pulled already, or abort_request_timeout passed)"), []
                return PullReply("pending"), []
            if not set(pull.block_ids) <= set(held):
                return PullReply("error", f"request {pull.remote_request_id!r} holds blocks {held}, "
                                          f"not {pull.block_ids}"), []
            index = _index(pull.block_ids)
            frames = [cache.index_select(1, index) for cache in self.kv_caches]
            del self.held[pull.remote_request_id]
            self.released.append(pull.remote_request_id)
            self.output.finished_sending.append(pull.remote_request_id)
        shapes = [list(frame.shape) for frame in frames]
        return PullReply("ok", shapes=shapes), [_bytes_view(frame) for frame in frames]

    # ---- consumer: pull ----
    def _load(self, load: KVLoad) -> None:
        try:
            self._pull_into(load)
        except Exception as exc:  # any failure is reported, never raised in a thread nobody joins
            reason = f"KV transfer from {load.remote_host}:{load.remote_port} failed: {exc}"
            with self.lock:
                self.output.failed_recving[load.req_id] = reason
            return
        with self.lock:
            self.output.finished_recving.append(load.req_id)

    def _pull_into(self, load: KVLoad) -> None:
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.connect(f"tcp://{load.remote_host}:{load.remote_port}")
            deadline = time.monotonic() + self.config.transfer_timeout
            request = _encode(PullRequest(load.remote_request_id, load.remote_block_ids, self.layout))
            while True:
                socket.send(request)
                frames = self._receive(socket, deadline)
                reply = _decode_reply(frames[0])
                if reply.status == "ok":
                    break
                if reply.status != "pending":
                    raise TransferError(reply.reason)
                if time.monotonic() + PENDING_RETRY_S > deadline:
                    raise TransferError(f"request {load.remote_request_id!r} was not ready within "
                                        f"transfer_timeout={self.config.transfer_timeout} s")
                time.sleep(PENDING_RETRY_S)
        finally:
            socket.close()
        index = _index(load.local_block_ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only buffer: only read here
            for cache, frame, shape in zip(self.kv_caches, frames[1:], reply.shapes):
                data = torch.frombuffer(frame.buffer, dtype=torch.uint8).view(cache.dtype).view(shape)
                cache.index_copy_(1, index, data)

    def _receive(self, socket: zmq.Socket, deadline: float) -> list:
        while not socket.poll(POLL_MS):
            if self.stop.is_set():
                raise TransferError("the engine is shutting down")
            if time.monotonic() > deadline:
                raise TransferError(f"no answer within transfer_timeout={self.config.transfer_timeout} s")
        return socket.recv_multipart(copy=False)


def _index(block_ids: list[int]) -> torch.Tensor:
    return torch.tensor(block_ids, dtype=torch.long)


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes, without a copy (any dtype, bfloat16 and fp8 included)."""
    return memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())
