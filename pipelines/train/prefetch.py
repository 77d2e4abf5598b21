"""Micro-batches made ahead on a thread while the device trains on the current one.

On a GPU a step is fast enough that packing the next rows and copying them to the
device shows as idle time between steps (the `wait` metric). A `BatchFeed` makes the
micro-batches on a background thread, `data.prefetch` of them ahead, in page-locked
host memory, so that their copy to the GPU does not block the host either. Items come
out in the order they were made, so the batches are the ones the loop would make
itself; an error of the maker (the data running out, say) comes out where its batch
would have.

The tail pads' generator runs ahead with the maker; each batch carries the generator's
state after it, and a checkpoint saves the state after the last batch *taken*
(`TrainState.pad_rng`), so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import torch


class Prefetcher:
    """`make()` called on a daemon thread, `depth` results kept ready; `next()` takes
    the oldest. An exception raised by `make` is raised by the `next()` that would
    have returned its item, and the thread stops there."""

    def __init__(self, make: Callable[[], Any], depth: int, name: str = "prefetch") -> None:
        if depth < 1:
            raise ValueError(f"a prefetcher needs depth >= 1, not {depth}")
        self._make = make
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failed = False
        while not (failed or self._stop.is_set()):
            try:
                item: tuple[Any, BaseException | None] = (self._make(), None)
            except BaseException as err:  # handed to the consumer, which raises it
                item, failed = (None, err), True
            while not self._stop.is_set():
                try:
                    self._ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def next(self) -> Any:
        value, err = self._ready.get()
        if err is not None:
            self.close()
            raise err
        return value

    def close(self) -> None:
        """Stops the thread after the item it is making; what was made is dropped."""
        self._stop.set()
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


def prefetch_depth(setting: int | None, device: torch.device) -> int:
    """`data.prefetch`: None means 2 on a GPU and 0 (made in the loop) on a CPU, where
    the thread would only take a core from the step."""
    if setting is None:
        return 2 if device.type == "cuda" else 0
    if setting < 0:
        raise ValueError(f"data.prefetch must be >= 0, not {setting}")
    return setting


class BatchFeed:
    """The loop's micro-batches: `make()` -> (a tuple of parts, samples consumed), the
    parts being tensors or objects with `.to(device)` (and `.pin_memory()` to be
    pinned). `next()` -> (the parts on the device, consumed, the tail pads' generator
    state after this batch), made `depth` ahead on a thread (0: made in the call)."""

    def __init__(self, make: Callable[[], tuple[tuple, int]], generator: torch.Generator,
                 device: torch.device, depth: int) -> None:
        self.device = device
        self.pin = device.type == "cuda"

        def made() -> tuple[tuple, int, torch.Tensor]:
            parts, consumed = make()
            if self.pin:
                parts = tuple(p.pin_memory() if hasattr(p, "pin_memory") else p for p in parts)
            return parts, consumed, generator.get_state()

        self._made = made
        self._prefetcher = Prefetcher(made, depth, "batch-prefetch") if depth else None

    def next(self) -> tuple[tuple, int, torch.Tensor]:
        parts, consumed, rng = self._prefetcher.next() if self._prefetcher else self._made()
        return tuple(self._to_device(p) for p in parts), consumed, rng

    def _to_device(self, part):
        if part is None:
            return None
        if self.pin and hasattr(part, "pin_memory"):  # pinned in made()
            return part.to(self.device, non_blocking=True)  # the stream orders it before its readers
        return part.to(self.device)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
