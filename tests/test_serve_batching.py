"""The batcher alone, on stand-in run functions: what shares a loop, failure isolation, deadlines,
the queue bound and draining. No model runs here."""

from __future__ import annotations

import threading

import pytest

from sdfast.model.info import resolve_model
from sdfast.request import Request
from sdfast.serve.batching import Batcher, Closed, Expired, QueueFull


@pytest.fixture(scope="module")
def info():
    return resolve_model("tiny")


def req(info, seed=0, **kw):
    return Request.build(info, prompt=kw.pop("prompt", f"p{seed}"), seed=seed, steps=kw.pop("steps", 2), **kw)


class Recorder:
    """run_batch / run_one stand-ins that record each loop and can be held at a gate."""

    def __init__(self, fail_seed: int | None = None, fail_batches: bool = False):
        self.loops: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_seed = fail_seed
        self.fail_batches = fail_batches

    def run_batch(self, requests):
        self.gate.wait(10)
        self.loops.append([r.seed for r in requests])
        if self.fail_batches and any(r.seed == self.fail_seed for r in requests):
            raise RuntimeError("one bad row broke the loop")
        return [f"image {r.seed}" for r in requests]

    def run_one(self, request):
        self.gate.wait(10)
        self.loops.append([request.seed])
        if request.seed == self.fail_seed:
            raise ValueError(f"seed {request.seed} fails")
        return f"image {request.seed}"


def batcher(rec: Recorder, **kw) -> Batcher:
    opts = dict(max_images=4, max_wait_s=0.5, max_queue=16)
    opts.update(kw)
    return Batcher(rec.run_batch, rec.run_one, **opts)


def submit_held(b: Batcher, rec: Recorder, requests, timeout_s: float = 30):
    """Queue every request while the worker is held on a first job, then release it, so what
    shares a loop is decided by the rules, not by timing."""
    rec.gate.clear()
    first = b.submit(requests[0], timeout_s)
    while b.depth:  # the worker took the first job and waits at the gate
        threading.Event().wait(0.005)
    futures = [first] + [b.submit(r, timeout_s) for r in requests[1:]]
    rec.gate.set()
    return [f.result(10) for f in futures]


def test_compatible_requests_share_a_loop_up_to_max_images(info):
    rec = Recorder()
    b = batcher(rec)
    done = submit_held(b, rec, [req(info, s) for s in range(7)])
    assert [d.output for d in done] == [f"image {s}" for s in range(7)]
    assert rec.loops == [[0], [1, 2, 3, 4], [5, 6]]  # 4 images at most per loop, arrival order kept
    assert [d.batch_requests for d in done] == [1, 4, 4, 4, 4, 2, 2]


def test_requests_that_cannot_share_a_u_net_call_never_do(info):
    rec = Recorder()
    b = batcher(rec)
    requests = [req(info, 0), req(info, 1, height=72), req(info, 2), req(info, 3, steps=3),
                req(info, 4, guidance_scale=1.0), req(info, 5, scheduler="euler"), req(info, 6, guidance_scale=9.0)]
    submit_held(b, rec, requests)
    # seeds 2 and 6 differ from each other only in guidance scale (per-row guidance): they share.
    assert sorted(rec.loops[1:]) == [[1], [2, 6], [3], [4], [5]]


def test_n_images_count_against_max_images(info):
    rec = Recorder()
    b = batcher(rec)
    two = Request.build(info, prompt=["a", "a"], seed=1, steps=2)
    three = Request.build(info, prompt=["b", "b", "b"], seed=2, steps=2)
    submit_held(b, rec, [req(info, 0), two, three, req(info, 3)])
    assert rec.loops == [[0], [1, 3], [2]]  # 2 + 1 images fit in 4; 3 more do not


def test_a_failing_batch_reruns_its_members_alone_so_only_the_culprit_fails(info):
    rec = Recorder(fail_seed=2, fail_batches=True)
    b = batcher(rec)
    rec.gate.clear()
    head = b.submit(req(info, 9), 30)
    while b.depth:
        threading.Event().wait(0.005)
    futures = [b.submit(req(info, s), 30) for s in range(4)]
    rec.gate.set()
    head.result(10)
    for s, f in enumerate(futures):
        if s == 2:
            with pytest.raises(ValueError, match="seed 2 fails"):
                f.result(10)
        else:
            assert f.result(10).output == f"image {s}" and f.result(10).batch_requests == 1
    assert [0, 1, 2, 3] in rec.loops and [[0], [1], [2], [3]] == rec.loops[-4:]


def test_full_queue_refuses_and_a_passed_deadline_is_dropped_unrun(info):
    rec = Recorder()
    b = batcher(rec, max_queue=2, max_images=1)
    rec.gate.clear()
    running = b.submit(req(info, 0), 30)
    while b.depth:
        threading.Event().wait(0.005)
    late = b.submit(req(info, 1), 0.01)  # its deadline passes while it waits
    b.submit(req(info, 2), 30)
    with pytest.raises(QueueFull) as e:
        b.submit(req(info, 3), 30)
    assert e.value.retry_after_s >= 1
    threading.Event().wait(0.05)
    rec.gate.set()
    running.result(10)
    with pytest.raises(Expired):
        late.result(10)
    assert [1] not in rec.loops


def test_close_refuses_new_work_and_drains_the_queue(info):
    rec = Recorder()
    b = batcher(rec, max_images=1)
    rec.gate.clear()
    futures = [b.submit(req(info, s), 30) for s in range(3)]
    b.close()
    with pytest.raises(Closed):
        b.submit(req(info, 9), 30)
    rec.gate.set()
    assert b.join(10)
    assert [f.result(0).output for f in futures] == ["image 0", "image 1", "image 2"]
