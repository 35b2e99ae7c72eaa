"""Coalesce compatible requests into one denoising loop, on one worker thread per pipeline.

Requests that can share a U-Net call (same height, width, steps, scheduler and guided-ness, see
``batch_key``) are gathered up to ``max_images`` images within ``max_wait_s`` of the oldest one
and run by ``Pipeline.run_batch``, which keeps each request's own seed (its own latents from its
own generator) and its own guidance scale. A request's image then depends on its batch-mates only
through the kernels' arithmetic: whether those are batch-invariant is measured at warm-up
(``probe_batch_invariance``) and batching is turned off where they are not, unless told otherwise.

Safety: the queue is bounded (``QueueFull`` → 429), a request whose deadline passes while queued
is dropped before it costs compute, and a batch that raises is re-run member by member so one bad
request never fails its batch-mates. ``close`` stops intake and lets the worker drain the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..request import Request

log = logging.getLogger(__name__)

#: run_batch(requests) -> one result per request, in order.
RunBatch = Callable[[list[Request]], list[Any]]


class QueueFull(Exception):
    """The bounded queue has no room; the client should retry after ``retry_after_s``."""

    def __init__(self, depth: int, retry_after_s: int):
        super().__init__(f"queue: {depth} requests are waiting, the limit; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Closed(Exception):
    """The batcher is draining for shutdown and takes no new requests."""


class Expired(TimeoutError):
    """The request's deadline passed before it reached the pipeline."""


def batch_key(req: Request) -> tuple:
    """Requests with equal keys run in one loop: one U-Net call per step over all their rows.
    img2img requests never share a loop (each has its own init image and start step)."""
    if req.image is not None:
        return ("img2img", id(req))
    try:
        from ..runtime import BATCH_KEYS
    except ImportError:  # a runtime without run_batch: nothing is batched anyway
        BATCH_KEYS = ("height", "width", "steps", "scheduler", "guided")  # noqa: N806
    return tuple(getattr(req, k) for k in BATCH_KEYS)


@dataclass
class Job:
    request: Request
    deadline: float  # time.monotonic() after which the result is no longer wanted
    key: tuple = ()  # batch key, computed once at submit
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def images(self) -> int:
        return self.request.batch


@dataclass
class Done:
    """A job's result and the loop it ran in (how many requests and images shared it)."""

    output: Any
    batch_requests: int  # requests that shared the loop
    batch_images: int


@dataclass
class BatchStats:
    """What the worker reports after each loop (the metrics module listens)."""

    requests: int
    images: int
    seconds: float
    split: bool  # the batch raised and was re-run member by member


class Batcher:
    """One worker thread in front of one pipeline.

    run_batch: runs a list of compatible requests in one loop (``Pipeline.run_batch``);
    run_one: runs a single request (``Pipeline.run``), used alone and to isolate failures.
    """

    def __init__(self, run_batch: RunBatch | None, run_one: Callable[[Request], Any], *, max_images: int,
                 max_wait_s: float, max_queue: int, on_batch: Callable[[BatchStats], None] | None = None,
                 on_depth: Callable[[int], None] | None = None, key: Callable[[Request], tuple] = batch_key):
        if max_images < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_images and max_queue must be >= 1 and max_wait_s >= 0")
        self.run_batch = run_batch
        self.run_one = run_one
        self.key = key
        self.max_images = max_images
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda stats: None)
        self.on_depth = on_depth or (lambda depth: None)
        self._queue: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._busy = 0  # jobs taken off the queue and not yet finished
        self._mean_job_s = 1.0  # running estimate for Retry-After
        self._thread = threading.Thread(target=self._loop, name="sdfast-batcher", daemon=True)
        self._thread.start()

    # -- intake (any thread) -------------------------------------------------------------------
    def submit(self, request: Request, timeout_s: float) -> Future:
        key = self.key(request)  # outside the lock: it may tokenize
        with self._cv:
            if self._closed:
                raise Closed("server: shutting down; retry on another replica")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(len(self._queue), self.retry_after_s())
            job = Job(request, deadline=time.monotonic() + timeout_s, key=key)
            self._queue.append(job)
            self.on_depth(len(self._queue))
            self._cv.notify()
        return job.future

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely moved on: one job's time per batch of queued work."""
        batches = max(1, len(self._queue) // self.max_images)
        return max(1, round(batches * self._mean_job_s))

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        with self._cv:
            return len(self._queue) + self._busy

    def close(self) -> None:
        """Refuse new requests; queued ones still run."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the queue to drain after ``close``. True when the worker finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the worker ----------------------------------------------------------------------------
    def _take(self) -> list[Job] | None:
        """Block for the next batch: the oldest job plus compatible ones, up to max_images or until
        max_wait_s after the oldest arrived. None once closed and empty."""
        with self._cv:
            while not self._queue:
                if self._closed:
                    return None
                self._cv.wait()
            head = self._queue[0]
            until = head.enqueued + self.max_wait_s
            while True:
                mates = [j for j in self._queue if j.key == head.key]
                batch, images = [], 0
                for j in mates:
                    if images + j.images <= self.max_images or not batch:
                        batch.append(j)
                        images += j.images
                full = images >= self.max_images or len(batch) < len(mates)
                left = until - time.monotonic()
                if full or left <= 0 or self._closed or self.run_batch is None:
                    break
                self._cv.wait(left)
            for j in batch:
                self._queue.remove(j)
            self._busy += len(batch)
            self.on_depth(len(self._queue))
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as e:  # a bug in here must not kill the worker and hang every client
                log.exception("batcher failed")
                for job in batch:
                    if job.future.running():
                        job.future.set_exception(e)
            finally:
                with self._cv:
                    self._busy -= len(batch)

    def _run(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            # From here a client's cancel (its timeout) no longer applies: the result is set once.
            if not job.future.set_running_or_notify_cancel():
                continue
            if now > job.deadline:
                job.future.set_exception(Expired("timeout: the request waited past its deadline in the queue"))
                continue
            live.append(job)
        if not live:
            return
        t0 = time.perf_counter()
        split = False
        images = sum(j.images for j in live)
        if len(live) == 1 or self.run_batch is None:
            for job in live:
                _settle(job, self.run_one)
        else:
            try:
                results = self.run_batch([j.request for j in live])
            except Exception:  # isolate the culprit: every member runs alone
                log.warning("a batch of %d failed; re-running its members one by one", len(live), exc_info=True)
                split = True
                for job in live:
                    _settle(job, self.run_one)
            else:
                for job, result in zip(live, results, strict=True):
                    job.future.set_result(Done(result, len(live), images))
        seconds = time.perf_counter() - t0
        self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * seconds
        if split or self.run_batch is None:
            for job in live:  # each ran its own loop
                self.on_batch(BatchStats(1, job.images, seconds / len(live), split))
        else:
            self.on_batch(BatchStats(len(live), images, seconds, split))


def _settle(job: Job, fn: Callable[[Request], Any]) -> None:
    try:
        job.future.set_result(Done(fn(job.request), 1, job.images))
    except Exception as e:  # the error belongs to this request's caller
        job.future.set_exception(e)
