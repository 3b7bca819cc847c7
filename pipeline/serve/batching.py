"""Requests that arrive together share one ``generate`` call.

The first waiting request opens a short window (``wait_s``); every request queued by its end, up to
``max_batch``, joins it. Requests with different generation settings or frame counts cannot share a
call, so the window's requests are grouped by that key and each group is one call, in arrival order.
Calls run one at a time in a single model thread, so the event loop keeps accepting requests (which
then form the next batch) while the model works. A batch that fails is retried one request at a time.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

logger = logging.getLogger(__name__)


@dataclass
class Job:
    item: Any
    options: dict
    key: Hashable
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    """Collects jobs into batches and runs ``run(items, options) -> results`` for each batch."""

    def __init__(self, run: Callable[[Sequence[Any], dict], list], max_batch: int, wait_s: float):
        self.run, self.max_batch, self.wait_s = run, max_batch, wait_s
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

    async def _collect(self) -> list[Job]:
        jobs = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(jobs) < self.max_batch:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 and self.queue.empty():
                break
            try:
                jobs.append(await asyncio.wait_for(self.queue.get(), max(left, 0)))
            except asyncio.TimeoutError:
                break
        return jobs

    async def _loop(self) -> None:
        while True:
            groups: dict[Hashable, list[Job]] = {}
            for job in await self._collect():
                groups.setdefault(job.key, []).append(job)
            for jobs in groups.values():
                jobs = [job for job in jobs if not job.future.done()]  # a client that went away
                if jobs and not await self._run(jobs) and len(jobs) > 1:
                    for job in jobs:  # one bad request (e.g. a prompt the model refuses) fails only itself
                        await self._run([job])

    async def _run(self, jobs: list[Job]) -> bool:
        """One generate call for ``jobs``; their futures get the results, or (one job) the error."""
        logger.info("generating a batch of %d", len(jobs))
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.run, [j.item for j in jobs], jobs[0].options)
        except Exception as exc:  # noqa: BLE001 - the request gets the error, the server stays up
            if len(jobs) > 1:
                logger.warning("a batch of %d failed (%s); trying its requests one by one", len(jobs), exc)
                return False
            logger.exception("generate failed")
            if not jobs[0].future.done():
                jobs[0].future.set_exception(exc)
            return False
        for job, result in zip(jobs, results):
            if not job.future.done():
                job.future.set_result(result)
        return True
