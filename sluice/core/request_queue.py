"""The waiting queue, one class per scheduling policy.

fcfs is a deque (O(1) at both ends); priority is a heap on (priority, arrival time, arrival
order). Either way `add` is O(1) or O(log n), so admitting thousands of requests stays linear.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator

from sluice.core.request import Request


class FCFSQueue:
    """Served in the order added; a preempted request goes back to the front."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def add_preempted(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityQueue:
    """Lowest (priority, arrival time, arrival order) first, preempted requests included.
    Removal is lazy (the entry is skipped when it reaches the top), so aborting all is linear."""

    def __init__(self) -> None:
        self._heap: list[tuple[tuple, Request]] = []
        self._removed: set[Request] = set()

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.sort_key("priority"), request))

    add_preempted = add

    def peek(self) -> Request:
        self._drop_removed()
        return self._heap[0][1]

    def pop(self) -> Request:
        self._drop_removed()
        return heapq.heappop(self._heap)[1]

    def remove(self, request: Request) -> None:
        self._removed.add(request)

    def _drop_removed(self) -> None:
        while self._heap[0][1] in self._removed:
            self._removed.discard(heapq.heappop(self._heap)[1])

    def __len__(self) -> int:
        return len(self._heap) - len(self._removed)

    def __iter__(self) -> Iterator[Request]:
        return (request for _, request in self._heap if request not in self._removed)


RequestQueue = FCFSQueue | PriorityQueue


def create_request_queue(policy: str) -> RequestQueue:
    return PriorityQueue() if policy == "priority" else FCFSQueue()
