"""Requests that arrive together share one ``generate`` call.

The first waiting request opens a short window (``wait_s``); every request queued by its end, up to
``max_batch``, joins it. Requests with different generation settings or frame counts cannot share a
call, so the window's requests are grouped by that key and each group is one call, in arrival order.
Calls run one at a time in a single model thread, so the event loop keeps accepting requests (which
then form the next batch) while the model works.

A request whose client has gone (``wanted`` says so) is dropped as its batch is formed and again just
before its call, so nobody waits behind work that no one will read. A batch that fails is retried one
request at a time, so one bad request fails only itself.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

logger = logging.getLogger(__name__)


class ClientGone(ConnectionResetError):
    """The request's client disconnected, so its reply was not (or no longer) generated."""


@dataclass
class Job:
    item: Any
    options: dict
    key: Hashable
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    """Collects jobs into batches and runs ``run(items, options) -> results`` for each batch; ``wanted(item)``
    is False once the item's client has gone."""

    def __init__(self, run: Callable[[Sequence[Any], dict], list], max_batch: int, wait_s: float,
                 wanted: Callable[[Any], bool] = lambda item: True):
        self.run, self.max_batch, self.wait_s, self.wanted = run, max_batch, wait_s, wanted
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: Any, options: dict, key: Hashable) -> Any:
        job = Job(item, options, key)
        await self.queue.put(job)
        return await job.future

    def _keep(self, jobs: list[Job]) -> tuple[list[Job], int]:
        """The jobs still wanted, and how many were dropped (their futures get ``ClientGone``)."""
        kept, dropped = [], 0
        for job in jobs:
            if job.future.done():  # its handler stopped waiting (a stream whose client left)
                dropped += 1
            elif not self.wanted(job.item):
                job.future.set_exception(ClientGone("the client disconnected before its reply was generated"))
                dropped += 1
            else:
                kept.append(job)
        return kept, dropped

    async def _collect(self) -> list[Job]:
        """The next batch: jobs of clients that left are skipped, so they take no place in it."""
        jobs, dropped = self._keep([await self.queue.get()])
        while not jobs:
            jobs, more = self._keep([await self.queue.get()])
            dropped += more
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(jobs) < self.max_batch:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 and self.queue.empty():
                break
            try:
                kept, more = self._keep([await asyncio.wait_for(self.queue.get(), max(left, 0))])
            except asyncio.TimeoutError:
                break
            jobs += kept
            dropped += more
        if dropped:
            logger.info("dropped %d queued requests whose clients left", dropped)
        return jobs

    async def _loop(self) -> None:
        while True:
            groups: dict[Hashable, list[Job]] = {}
            for job in await self._collect():
                groups.setdefault(job.key, []).append(job)
            for jobs in groups.values():
                await self._run_group(jobs)

    async def _run_group(self, jobs: list[Job]) -> None:
        """One call for the jobs still wanted; if it fails, each job alone, so a failure stays with its job."""
        jobs, dropped = self._keep(jobs)
        if dropped:
            logger.info("dropped %d requests whose clients left while they waited for the model", dropped)
        if not jobs:
            return
        logger.info("generating a batch of %d", len(jobs))
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.run, [j.item for j in jobs], jobs[0].options)
        except ClientGone as exc:  # every client of the batch left while it was generated (the handlers log it)
            logger.debug("stopped a batch of %d: %s", len(jobs), exc)
            self._fail(jobs, exc)
        except Exception as exc:  # noqa: BLE001 - the request gets the error, the server stays up
            if len(jobs) == 1:
                logger.warning("a request failed: %s", _summary(exc))
                self._fail(jobs, exc)
                return
            logger.warning("a batch of %d failed (%s); trying its requests one by one", len(jobs), _summary(exc))
            for job in jobs:
                await self._run_group([job])
        else:
            for job, result in zip(jobs, results):
                if not job.future.done():
                    job.future.set_result(result)

    @staticmethod
    def _fail(jobs: list[Job], exc: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)


def _summary(exc: BaseException) -> str:
    """The error's type and first line (MindSpore's messages go on with a C++ call stack)."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
