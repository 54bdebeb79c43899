"""Device values on their way to the host: copied without waiting, read once the device has them.

Reading a CUDA tensor (``.item()``, ``.cpu()``) makes the host wait until the device has run everything queued
before it, which starves the queue the next step fills. Instead each step's loss starts a non-blocking copy into
pinned memory and records an event; the loop reads the copies whose events have completed (``ready``) and waits only
where it must have every value (before a checkpoint, a preview, the end). On the CPU a value is ready at once.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch


class HostValue:
    """One scalar tensor being copied to the host."""

    __slots__ = ("_host", "_event")

    def __init__(self, value: torch.Tensor):
        value = value.detach()
        if value.device.type == "cuda":
            self._host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:  # CPU (and devices without events): the value is readable as it is
            self._host, self._event = value, None

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def get(self) -> float:
        """The value; waits for the copy if it is not ready yet (only where the caller must have it)."""
        if self._event is not None:
            self._event.synchronize()
        return float(self._host)


class PendingValues:
    """A queue of (key, HostValue): ``take`` returns the finished ones in order, ``take(wait=True)`` all of them."""

    def __init__(self) -> None:
        self._items: deque[tuple[Any, HostValue]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: Any, value: torch.Tensor) -> None:
        self._items.append((key, HostValue(value)))

    def take(self, *, wait: bool = False) -> list[tuple[Any, float]]:
        out = []
        while self._items and (wait or self._items[0][1].ready()):
            key, value = self._items.popleft()
            out.append((key, value.get()))
        return out
