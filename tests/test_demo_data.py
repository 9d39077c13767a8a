"""The demo model's procedural pictures are reproducible from their seed (training and the
held-out checks depend on it) and cover every kind."""

from __future__ import annotations

import numpy as np

from broadcast_filter.diffusion.demo_data import (
    HELD_OUT_SEED,
    KINDS,
    TRAIN_SEED,
    images_of_kind,
    procedural_images,
)


def test_the_same_seed_gives_the_same_pictures_and_another_seed_others():
    first = procedural_images(16, HELD_OUT_SEED, 64)
    again = procedural_images(16, HELD_OUT_SEED, 64)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (16, 64, 64, 3) and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert not np.array_equal(first, procedural_images(16, TRAIN_SEED, 64))


def test_every_kind_is_reproducible_and_not_flat():
    for kind in KINDS:
        a = np.stack(images_of_kind(kind, 2, np.random.default_rng(3), 64))
        b = np.stack(images_of_kind(kind, 2, np.random.default_rng(3), 64))
        np.testing.assert_array_equal(a, b, err_msg=kind)
        assert a.std() > 0.02, kind
