"""Micro-batching for ``mocohub serve``: requests that arrive together share one model call.

One worker task takes the waiting requests and fills each model call (at most
``max_batch`` images) from all of them in turn, a share each, so a small
request that arrives while a large one is being embedded goes into the next
call instead of waiting for every image of the large one. A request larger than
``max_batch`` is spread over several calls; its rows come back in order.

Example:
    >>> batcher = Batcher(embedder.embed_images, max_batch=64, wait_s=0.005)
    >>> await batcher.start()
    >>> rows = await batcher.submit(pixels)  # (N, S, S, 3) uint8 -> (N, D)
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Batcher"]


@dataclass(eq=False)
class _Job:
    pixels: np.ndarray
    future: asyncio.Future[np.ndarray]
    taken: int = 0  # rows handed to model calls so far
    parts: list[np.ndarray] = field(default_factory=list)

    @property
    def left(self) -> int:
        return len(self.pixels) - self.taken


@dataclass
class Batcher:
    """Fair micro-batching: :meth:`submit` calls that wait together share ``run`` calls.

    Args:
        run: the model, ``(N, ...) -> (N, D)``; called in one worker thread.
        max_batch: the most rows in one ``run`` call.
        wait_s: how long a request arriving at an idle batcher waits for company.

    Example:
        >>> batcher = Batcher(lambda x: x.reshape(len(x), -1), max_batch=8)
    """

    run: Callable[[np.ndarray], np.ndarray]
    max_batch: int = 64
    wait_s: float = 0.005
    stats: dict[str, int] = field(
        default_factory=lambda: {"requests": 0, "batches": 0, "images": 0}
    )

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mocohub-model")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        """The rows of ``pixels`` (a batch) through ``run``, shared with whatever else waits."""
        if not len(pixels):
            raise ValueError("submit needs at least one row")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.stats["requests"] += 1
        await self._queue.put(_Job(pixels, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        waiting: deque[_Job] = deque()
        while True:
            if not waiting:  # idle: wait for a request, then briefly for company
                waiting.append(await self._queue.get())
                deadline = loop.time() + self.wait_s
                while sum(j.left for j in waiting) < self.max_batch:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        waiting.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except asyncio.TimeoutError:
                        break
            while not self._queue.empty():  # busy: whoever arrived meanwhile joins at once
                waiting.append(self._queue.get_nowait())
            for job in [j for j in waiting if j.future.done()]:  # the client has gone
                waiting.remove(job)
            if waiting:
                await self._run(loop, waiting)

    def _shares(self, waiting: deque[_Job]) -> list[tuple[_Job, int]]:
        """How many rows each waiting job puts in the next call: an equal share each."""
        shares = {id(j): 0 for j in waiting}
        room = self.max_batch
        active = [j for j in waiting if j.left > 0]
        while room and active:
            share = max(1, room // len(active))
            for job in list(active):
                n = min(share, job.left - shares[id(job)], room)
                shares[id(job)] += n
                room -= n
                if shares[id(job)] == job.left:
                    active.remove(job)
                if not room:
                    break
        return [(j, shares[id(j)]) for j in waiting if shares[id(j)]]

    async def _run(self, loop: asyncio.AbstractEventLoop, waiting: deque[_Job]) -> None:
        shares = self._shares(waiting)
        batch = np.concatenate([j.pixels[j.taken : j.taken + n] for j, n in shares])
        try:
            out = await loop.run_in_executor(self._executor, self.run, batch)
        except Exception as e:  # the model failed: every request in this call gets it
            for job, _ in shares:
                waiting.remove(job)
                if not job.future.done():
                    job.future.set_exception(e)
            return
        self.stats["batches"] += 1
        self.stats["images"] += len(batch)
        start = 0
        for job, n in shares:
            job.parts.append(out[start : start + n])
            job.taken += n
            start += n
            waiting.remove(job)
            if job.left == 0:
                if not job.future.done():  # the client may have gone
                    job.future.set_result(np.concatenate(job.parts))
            else:
                waiting.append(job)  # served this round: the others go first next time
