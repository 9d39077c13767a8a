"""The batcher: streams' engine threads hand in steps, rounds run them together.

Outputs are compared with each stream's own pipeline run alone; the rounds are counted. No
assertion depends on speed: the rendezvous window is long enough that a thread handing in
its next step always makes the next round on any machine."""

from __future__ import annotations

import threading

import torch

from broadcast_filter.diffusion.stream import StreamConfig, StreamPipeline
from broadcast_filter.runtime.batcher import Batcher

ATOL = 1e-5
STEPS = 6


def pipe(models, seed: int, prompt: str) -> StreamPipeline:
    p = StreamPipeline(models, StreamConfig(width=32, height=32, t_index_list=(25, 40), seed=seed))
    p.set_prompt(prompt)
    return p


def feed(seed: int, n: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((1, 3, 32, 32), generator=g) for _ in range(n)]


def run_threads(batcher: Batcher, jobs: list[tuple[StreamPipeline, list[torch.Tensor]]]):
    results: list[list] = [[] for _ in jobs]
    start = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        p, xs = jobs[i]
        start.wait()
        for x in xs:
            try:
                results[i].append(batcher.drive(p.step(x)))
            except Exception as exc:
                results[i].append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return results


def test_threads_share_rounds_and_get_their_own_outputs(tiny_models):
    prompts = ["a watercolor portrait", "neon city", "pencil sketch"]
    refs = [pipe(tiny_models, i, prompts[i]) for i in range(3)]
    feeds = [feed(20 + i) for i in range(3)]
    with torch.inference_mode():
        expected = [[r(x) for x in f] for r, f in zip(refs, feeds, strict=True)]
    batcher = Batcher(window_s=2.0)
    jobs = [(pipe(tiny_models, i, prompts[i]), feeds[i]) for i in range(3)]
    results = run_threads(batcher, jobs)
    for got, want in zip(results, expected, strict=True):
        assert len(got) == STEPS
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    stats = batcher.stats
    assert stats.steps == 3 * STEPS
    # The first round may start with whoever came first; after that each round waits for
    # every stream of the round before: at most two rounds more than the steps per stream.
    assert stats.rounds <= STEPS + 2, stats


def test_a_stream_that_stops_handing_in_steps_holds_the_others_one_window_at_most(tiny_models):
    batcher = Batcher(window_s=0.05)
    short, long = pipe(tiny_models, 1, "a"), pipe(tiny_models, 2, "b")
    ref = pipe(tiny_models, 2, "b")
    xs = feed(3)
    with torch.inference_mode():
        expected = [ref(x) for x in xs]
    results = run_threads(batcher, [(short, feed(4, n=1)), (long, xs)])
    assert len(results[0]) == 1 and len(results[1]) == STEPS
    for g, w in zip(results[1], expected, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def test_a_failing_step_raises_in_its_own_thread_only(tiny_models):
    batcher = Batcher(window_s=2.0)
    good, bad = pipe(tiny_models, 1, "a"), pipe(tiny_models, 2, "b")
    ref = pipe(tiny_models, 1, "a")
    xs = feed(5, n=3)
    wrong = [torch.rand((1, 3, 8, 8))] * 3  # not the stream's size: its step raises
    with torch.inference_mode():
        expected = [ref(x) for x in xs]
    results = run_threads(batcher, [(good, xs), (bad, wrong)])
    assert all(isinstance(r, ValueError) for r in results[1])
    for g, w in zip(results[0], expected, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
