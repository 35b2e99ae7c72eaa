"""Pieces of bench/fewstep.py: held-out toy accuracy of a
generate function, rows timed round by round, and the Pareto front of (seconds, accuracy)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..errors import InvalidArgument


def toy_accuracy(generate: Callable[[list[str], int], list], seeds: list[int],
                 combos: list[tuple[str, str, str]] | None = None,
                 reference: dict[int, list] | None = None, keep: dict[int, list] | None = None) -> dict[str, Any]:
    """Held-out toy accuracy: ``generate(prompts, seed) -> PIL images`` for the canonical caption of
    every toy combination (or ``combos``) with each seed; an image is right when
    ``toy.classify`` reads back both the prompted shape colour and the background.

    reference: seed -> the exact run's images of the same prompts: the row then also gets
    ``psnr_db``, the PSNR of all its images against those (one MSE over every pixel). keep: a
    dict that receives seed -> this run's images (to serve as the next rows' reference)."""
    import numpy as np

    from .. import toy
    from .parity import image_metrics

    combos = toy.combos() if combos is None else combos
    prompts = [toy.caption(*c) for c in combos]
    hits, wrong = 0, {}
    ours, theirs = [], []
    for seed in seeds:
        images = generate(prompts, seed)
        if len(images) != len(prompts):
            raise RuntimeError(f"generate returned {len(images)} images for {len(prompts)} prompts")
        if keep is not None:
            keep[seed] = images
        if reference is not None:
            ours += [np.asarray(im.convert("RGB")) for im in images]
            theirs += [np.asarray(im.convert("RGB")) for im in reference[seed]]
        for (_shape, colour, background), image in zip(combos, images, strict=True):
            got = toy.classify(image)
            if got == (colour, background):
                hits += 1
            else:
                key = f"{colour}/{background}->{got[0]}/{got[1]}"
                wrong[key] = wrong.get(key, 0) + 1
    n = len(prompts) * len(seeds)
    row = {"accuracy": hits / n, "images": n, "seeds": list(seeds),
           "wrong": dict(sorted(wrong.items(), key=lambda kv: -kv[1]))}
    if reference is not None:
        row["psnr_db"] = image_metrics(np.stack(theirs), np.stack(ours))["psnr_db"]
    return row


def interleaved(runners: dict[str, Callable[[], Any]], rounds: int,
                progress: Callable[[str], None] | None = None) -> dict[str, list[dict[str, float]]]:
    """Time every runner once per round, rows in the same order each round, so load drifting on a
    shared machine falls on every row alike. Each sample is one call's wall time (``perf_counter``)
    and this process's CPU time (``process_time``: all its threads), in seconds."""
    if rounds < 1:
        raise InvalidArgument(f"rounds: must be at least 1 but is {rounds}")
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for r in range(rounds):
        for name, run in runners.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            samples[name].append({"wall_s": wall, "cpu_s": cpu, "round": r})
            if progress is not None:
                progress(f"round {r + 1}/{rounds} {name}: {wall:.2f} s wall, {cpu:.2f} s CPU")
    return samples


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: ``(seconds, accuracy)``, fewer seconds and higher
    accuracy better; a point is dominated when another is at least as good on both and better on
    one. Sorted by seconds."""
    front = []
    for i, (s, a) in enumerate(points):
        if any((s2 <= s and a2 >= a) and (s2 < s or a2 > a) for j, (s2, a2) in enumerate(points) if j != i):
            continue
        front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))
