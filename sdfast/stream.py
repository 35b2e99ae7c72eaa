"""Streamed partial images: the loop's clean-sample estimate, decoded a few times during a run.

``Pipeline.run(req, partial_images=K, on_partial=fn)`` calls ``fn(PartialImage)`` up to K times
(K from 0 to 3, the OpenAI Images API's range) at steps spread evenly over the run, never after
the last step (the final image is the result itself). Each partial image is the VAE decode of the
current estimate of the clean latents (``Scheduler.predicted_x0``, diffusers'
``pred_original_sample``), so it shows the picture forming, not the noisy latents. A run of N
steps has at most N - 1 partial images: fewer steps give fewer. The estimate is computed beside
the step and never feeds back, so the final image equals the run without partial images
(tested bit for bit). What it costs is one VAE decode per partial image (bench/studies/stream_cost.py:
7.2 s each at 256² on one CPU thread, +44 % for 3 on a 73 s run). A cheaper preview was tried
and not kept: a per-pixel linear latent-to-colour map fitted by least squares to the first
partial image's decode reached 20 dB on the toy model in-sample but 9-10 dB on the later steps
it would draw (the estimate's colours move as the picture forms), too far from the picture to
stand in for it; half-resolution decodes scored 9-17 dB.

``stream(pipe, req, K)`` is the same as an iterator: it yields the PartialImage objects as they
are made, then the GenerationOutput. Leaving the loop early stops the run at its next step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from . import rules
from .errors import InvalidArgument
from .output import GenerationOutput, PartialImage

if TYPE_CHECKING:
    from .request import Request
    from .runtime import Pipeline

#: the most partial images a run makes (the OpenAI Images API's limit)
MAX_PARTIAL_IMAGES = 3


def check_partial_images(k: object, arg: str = "partial_images") -> int:
    if not rules.is_int(k) or not 0 <= k <= MAX_PARTIAL_IMAGES:
        raise InvalidArgument(f"{arg}: must be an integer from 0 to {MAX_PARTIAL_IMAGES} but is {k!r}")
    return int(k)


def partial_steps(first: int, steps: int, k: int) -> list[int]:
    """The step indices after which the K partial images are made: evenly spread over the steps
    ``first .. steps - 1`` that run, never the last one; fewer than K when the run is short."""
    n = steps - first
    out = []
    for j in range(1, k + 1):
        i = first + (j * n) // (k + 1) - 1
        if first <= i < steps - 1 and i not in out:
            out.append(i)
    return out


class Cancelled(Exception):
    """The consumer of ``stream`` stopped reading: the run ends at its next step."""


def stream(pipe: Pipeline, req: Request, partial_images: int = 2) -> Iterator[PartialImage | GenerationOutput]:
    """Run ``req`` on a worker thread, yielding each PartialImage as it is made and then the
    GenerationOutput. Errors of the run are raised here; closing the iterator early cancels it."""
    check_partial_images(partial_images)
    items: queue.Queue = queue.Queue()
    stop = threading.Event()

    def check_stop(*_) -> None:
        if stop.is_set():
            raise Cancelled("the stream's consumer stopped reading")

    def on_partial(p: PartialImage) -> None:
        check_stop()
        items.put(p)

    def work() -> None:
        try:
            items.put(pipe.run(req, callback=check_stop, partial_images=partial_images, on_partial=on_partial))
        except BaseException as e:  # handed to the consumer, raised in its thread
            items.put(e)

    worker = threading.Thread(target=work, name="sdfast-stream", daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, GenerationOutput):
                return
    finally:
        stop.set()
        worker.join()  # returns within a step: the step callback sees the stop
