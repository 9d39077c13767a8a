"""Stochastic Similarity Filter: the skip rule, the cap, scene cuts, counters."""

from __future__ import annotations

import math

import pytest
import torch

from broadcast_filter.diffusion.similarity import SimilarityFilter, skip_probability


def image(seed: int, size: int = 64) -> torch.Tensor:
    return torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(seed))


def test_skip_probability_is_the_published_rule():
    assert skip_probability(1.0, 0.98) == 1.0
    assert skip_probability(0.99, 0.98) == pytest.approx(0.5)
    assert skip_probability(0.98, 0.98) == pytest.approx(0.0)
    assert skip_probability(0.5, 0.98) == 0.0


def test_identical_frames_skip_up_to_the_cap_and_never_more():
    ssf = SimilarityFilter(threshold=0.98, max_skip=3, seed=0)
    frame = image(0)
    decisions = [ssf(frame) for _ in range(40)]
    # p = 1 for identical frames: exactly the cap, then one processed frame, repeatedly.
    assert decisions[:9] == [False, True, True, True, False, True, True, True, False]
    longest = max(len(run) for run in "".join("s" if d else "p" for d in decisions).split("p"))
    assert longest == 3
    assert ssf.processed == decisions.count(False) and ssf.skipped == decisions.count(True)
    assert ssf.skip_ratio == pytest.approx(decisions.count(True) / 40)


def test_skip_rate_matches_the_rule_for_a_given_similarity():
    base = image(1)
    near = base + 0.22 * (image(2) - 0.5)  # a slightly different frame
    trials, skips, similarity = 3000, 0, None
    for seed in range(trials):
        ssf = SimilarityFilter(threshold=0.95, max_skip=10, seed=seed)
        ssf(base)
        skips += ssf(near)
        similarity = ssf.last_similarity
    p = skip_probability(similarity, 0.95)
    assert 0.2 < p < 0.8, f"test frame pair should give a middling p, got {p}"
    sigma = math.sqrt(trials * p * (1 - p))
    assert abs(skips - trials * p) < 4 * sigma


def test_a_scene_cut_is_never_skipped():
    for seed in range(500):
        ssf = SimilarityFilter(threshold=0.98, max_skip=10, seed=seed)
        ssf(image(10))
        assert ssf(image(11)) is False  # an unrelated picture
        assert ssf(1 - image(11)) is False  # and its negative


def test_similarity_is_measured_against_the_last_processed_frame():
    ssf = SimilarityFilter(threshold=0.9, max_skip=100, seed=0)
    a = image(3)
    ssf(a)
    drift = [a + 0.01 * k * (image(4) - 0.5) for k in range(1, 30)]
    for frame in drift:
        ssf(frame)
    # Slow drift accumulates against the stored reference, so it is eventually processed.
    assert ssf.processed >= 2


def test_seeded_filters_repeat_their_decisions():
    frames = [image(1) + 0.05 * (image(k) - 0.5) for k in range(50)]
    runs = []
    for _ in range(2):
        ssf = SimilarityFilter(threshold=0.97, seed=42)
        runs.append([ssf(f) for f in frames])
    assert runs[0] == runs[1]


def test_reset_forgets_the_reference_and_bad_settings_are_rejected():
    ssf = SimilarityFilter(seed=0)
    frame = image(0)
    ssf(frame)
    ssf.reset()
    assert ssf(frame) is False
    with pytest.raises(ValueError, match="threshold"):
        SimilarityFilter(threshold=1.0)
    with pytest.raises(ValueError, match="max_skip"):
        SimilarityFilter(max_skip=-1)
