"""One worker, a bounded waiting line, and several batches in flight: the least work left runs next.

Every request becomes a `Job` with a `key` (which model, and which class of prompt length: long prompts
are not padded onto short ones) and a `cost` (its tokens to prefill and generate), and joins the waiting
line; `submit` raises `QueueFull` when `max_queue` jobs are already waiting. A single worker (an asyncio
task) forms batches: the oldest job and up to `batch_size - 1` more jobs *with the same key*, waiting up
to `batch_wait_ms` for them when nothing else is in flight. `run_batch(jobs)` runs in a thread and returns
either the results, one per job, or a *run*: an object whose `step()` does one bounded slice of the work
(a slice of the prompts, one token) and returns {job index: result} for the jobs that finished in it,
with `done` and `remaining` (the work left per unfinished job, in units of `Job.cost`).

Up to `max_running` runs are in flight. Between steps the worker steps the run with the least work left,
and starts the batch the waiting line would form next when that needs less: a long request never holds
the short ones queued behind it, and gets the machine whenever nothing shorter waits. Each job gets its
result when its row finishes, not when its batch does; a job whose future is cancelled (its time limit,
its client gone) is dropped from the line, and its row stops at the next step (`Job.cancelled` and the
future are what the run checks). The event loop stays free while a step runs.

Failures are per job: a job's own exception is handed to it alone; when a whole batch fails, each of
its unfinished jobs is retried in a batch of its own (unless it already sent output, which a retry would
repeat), so one bad request cannot fail the others. The worker itself never dies of an exception.
"""

from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

EMA_WEIGHT = 0.2  # of the latest job in the running mean of seconds per job (Retry-After)


class QueueFull(Exception):
    """The waiting line is full; `retry_after` (seconds) is when a place is likely to be free."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting, self.retry_after = waiting, retry_after


@dataclass(eq=False)
class Job:
    key: Hashable
    payload: Any
    cost: float = 1.0  # the work it needs (tokens to prefill and to generate): the scheduler compares it
    future: asyncio.Future | None = None
    cancelled: bool = False  # set by the app when a streaming client goes away
    sent: bool = False  # output already reached its client: a retry would repeat it
    alone: bool = False  # retried after its batch failed: runs in a batch of its own
    submitted: float = 0.0


@dataclass
class BatchStats:
    batches: int = 0
    jobs: int = 0
    largest: int = 0
    sizes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))  # the latest
    rejected: int = 0  # QueueFull
    retried: int = 0  # jobs retried alone after their batch failed
    seconds_per_job: float | None = None  # running mean, submission to result


@dataclass(eq=False)
class _InFlight:
    jobs: list[Job]
    run: Any


class Batcher:
    """`run_batch(jobs)` runs in a worker thread and returns one result per job, or a run (see above)."""

    def __init__(self, run_batch: Callable[[Sequence[Job]], Any], *, batch_size: int = 8,
                 batch_wait_ms: float = 10, max_batch: Callable[[Hashable], int] | None = None,
                 max_queue: int | None = None, max_running: int = 4):
        if batch_size < 1 or max_running < 1 or (max_queue is not None and max_queue < 1):
            raise ValueError("batch_size, max_running and max_queue must be at least 1")
        self.run_batch = run_batch
        self.batch_size = batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.max_batch = max_batch or (lambda key: self.batch_size)
        self.max_queue = max_queue
        self.max_running = max_running
        self.stats = BatchStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[_InFlight] = []
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(1 for f in self._running for job in f.jobs if not job.future.done())

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        # A new event loop (a test client per request, a server restarted in-process) gets a new worker.
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._arrived = asyncio.Event()
            self._waiting.clear()
            self._running.clear()
            self._task = loop.create_task(self._worker(), name="circuit-breakers-batcher")

    def enqueue(self, job: Job) -> None:
        """Put a job in the waiting line, or raise `QueueFull`."""
        self._ensure_worker()
        self._drop_abandoned()
        if self.max_queue is not None and len(self._waiting) >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(len(self._waiting), math.ceil(self.stats.seconds_per_job or 1))
        job.future = self._loop.create_future()
        job.submitted = self._loop.time()
        self._waiting.append(job)
        self._arrived.set()

    async def wait(self, job: Job, timeout: float | None = None) -> Any:
        """The job's result; `asyncio.TimeoutError` after `timeout` seconds, and then its row stops."""
        return await asyncio.wait_for(job.future, timeout)  # cancels the future on a timeout or a cancel

    async def submit(self, job: Job, timeout: float | None = None) -> Any:
        """Queue a job and wait for its result."""
        self.enqueue(job)
        return await self.wait(job, timeout)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._task = None

    # ------------------------------------------------------------------ the worker

    async def _worker(self) -> None:
        try:
            while True:
                self._drop_abandoned()
                if not self._running and not self._waiting:
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                current = min(self._running, key=lambda f: f.run.remaining, default=None)
                if self._waiting and len(self._running) < self.max_running and (
                        current is None or self._next_cost() < current.run.remaining):
                    current = await self._start(await self._gather(wait=current is None))
                if current is not None:
                    await self._step(current)
        finally:  # cancelled (the server stops): nobody waits for ever
            for job in [*self._waiting, *(j for f in self._running for j in f.jobs)]:
                if job.future is not None and not job.future.done():
                    job.future.cancel()

    def _drop_abandoned(self) -> None:
        if any(job.future.done() for job in self._waiting):
            self._waiting = collections.deque(job for job in self._waiting if not job.future.done())

    def _limit(self, key: Hashable) -> int:
        return max(1, min(self.batch_size, self.max_batch(key)))

    def _joining(self, first: Job, limit: int) -> list[Job]:
        """The waiting jobs that would join a batch started by `first`, in arrival order."""
        if first.alone:
            return []
        joining = []
        for job in self._waiting:
            if len(joining) >= limit - 1:
                break
            if job is not first and job.key == first.key and not job.alone:
                joining.append(job)
        return joining

    def _next_cost(self) -> float:
        """The mean cost of the batch the waiting line would form next."""
        first = self._waiting[0]
        batch = [first, *self._joining(first, self._limit(first.key))]
        return sum(job.cost for job in batch) / len(batch)

    async def _gather(self, *, wait: bool) -> list[Job]:
        loop = asyncio.get_running_loop()
        first = self._waiting.popleft()
        limit = self._limit(first.key)
        batch = [first]
        deadline = loop.time() + (self.batch_wait if wait and not first.alone else 0)
        while True:
            for job in self._joining(first, limit - len(batch) + 1):
                self._waiting.remove(job)
                batch.append(job)
            left = deadline - loop.time()
            if len(batch) >= limit or left <= 0:
                return batch
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def _start(self, jobs: list[Job]) -> _InFlight | None:
        live = [job for job in jobs if not job.future.done()]  # a caller that gave up
        if not live:
            return None
        self.stats.batches += 1
        self.stats.jobs += len(live)
        self.stats.largest = max(self.stats.largest, len(live))
        self.stats.sizes.append(len(live))
        try:
            started = await asyncio.to_thread(self.run_batch, live)
        except Exception as err:  # noqa: BLE001 - handed to the callers, or retried alone
            self._failed(live, err)
            return None
        if isinstance(started, (list, tuple)):  # the whole batch at once
            for job, result in zip(live, started):
                self._resolve(job, result)
            return None
        flight = _InFlight(live, started)
        self._running.append(flight)
        return flight

    async def _step(self, flight: _InFlight) -> None:
        try:
            finished = await asyncio.to_thread(flight.run.step)
        except Exception as err:  # noqa: BLE001
            self._running.remove(flight)
            self._failed(flight.jobs, err)
            return
        for index, result in finished.items():
            self._resolve(flight.jobs[index], result)
        if flight.run.done:
            self._running.remove(flight)
            for job in flight.jobs:
                if not job.future.done():
                    job.future.set_exception(RuntimeError("the batch ended without a result for this request"))

    def _resolve(self, job: Job, result: Any) -> None:
        if job.future.done():
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
            return
        job.future.set_result(result)
        seconds = self._loop.time() - job.submitted
        mean = self.stats.seconds_per_job
        self.stats.seconds_per_job = seconds if mean is None else (1 - EMA_WEIGHT) * mean + EMA_WEIGHT * seconds

    def _failed(self, jobs: list[Job], err: Exception) -> None:
        """A batch failed as a whole: retry each of its unfinished jobs alone, unless it is alone already."""
        jobs = [job for job in jobs if not job.future.done()]
        retry = [job for job in jobs if not job.sent and not job.cancelled] if len(jobs) > 1 else []
        for job in reversed(retry):
            job.alone = True
            self._waiting.appendleft(job)  # first in line: they have waited already
        self.stats.retried += len(retry)
        for job in jobs:
            if job not in retry:
                job.future.set_exception(err)
