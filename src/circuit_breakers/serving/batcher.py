"""One worker, one queue: requests wait at most `batch_wait_ms` to be batched with others.

Every request becomes a `Job` with a `key` (which model, and which generation path) and goes into an
asyncio queue. A single worker takes the oldest job, gathers up to `batch_size - 1` more jobs *with
the same key* that arrive within `batch_wait_ms`, and runs the batch in a thread
(`asyncio.to_thread`), so the event loop keeps answering /health, streaming chunks and new requests
while the model works. Jobs with another key wait, in order, for the next round. Each job's future
gets its own result or the exception its batch raised; the worker itself never dies of one.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence


@dataclass(eq=False)
class Job:
    key: Hashable
    payload: Any
    future: asyncio.Future | None = None
    cancelled: bool = False  # set by the app when a streaming client goes away


@dataclass
class BatchStats:
    batches: int = 0
    jobs: int = 0
    largest: int = 0
    sizes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))  # the latest


class Batcher:
    """`run_batch(jobs) -> results` runs in a worker thread; one result per job, in order."""

    def __init__(self, run_batch: Callable[[Sequence[Job]], Sequence[Any]], *, batch_size: int = 8,
                 batch_wait_ms: float = 10, max_batch: Callable[[Hashable], int] | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.run_batch = run_batch
        self.batch_size = batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.max_batch = max_batch or (lambda key: self.batch_size)
        self.stats = BatchStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._pending: collections.deque[Job] = collections.deque()
        self._task: asyncio.Task | None = None

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        # A new event loop (a test client per request, a server restarted in-process) gets a new worker.
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._queue = asyncio.Queue()
            self._pending.clear()
            self._task = loop.create_task(self._worker(), name="circuit-breakers-batcher")

    async def submit(self, job: Job) -> Any:
        """Queue a job and wait for its result."""
        self._ensure_worker()
        job.future = self._loop.create_future()
        self._queue.put_nowait(job)
        return await job.future

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._task = None

    async def _next_job(self, timeout: float | None) -> Job | None:
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait() if not self._queue.empty() else None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _gather(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        first = self._pending.popleft() if self._pending else await self._next_job(None)
        limit = max(1, min(self.batch_size, self.max_batch(first.key)))
        batch = [first]
        # Jobs already waiting with the same key join first, in arrival order.
        for job in list(self._pending):
            if len(batch) >= limit:
                break
            if job.key == first.key:
                self._pending.remove(job)
                batch.append(job)
        deadline = loop.time() + self.batch_wait
        while len(batch) < limit:
            job = await self._next_job(deadline - loop.time())
            if job is None:
                break
            if job.key == first.key:
                batch.append(job)
            else:
                self._pending.append(job)
        return batch

    async def _worker(self) -> None:
        while True:
            batch = await self._gather()
            live = [job for job in batch if not job.future.done()]  # a caller that gave up
            if not live:
                continue
            self.stats.batches += 1
            self.stats.jobs += len(live)
            self.stats.largest = max(self.stats.largest, len(live))
            self.stats.sizes.append(len(live))
            try:
                results = await asyncio.to_thread(self.run_batch, live)
            except asyncio.CancelledError:
                for job in live:
                    if not job.future.done():
                        job.future.cancel()
                raise
            except Exception as err:  # noqa: BLE001 - handed to every caller of the batch
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            for job, result in zip(live, results):
                if not job.future.done():
                    if isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
