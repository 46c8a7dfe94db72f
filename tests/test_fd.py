"""FD: zero for the same pictures, small for two draws of the same prompts, larger for each way a
generator goes wrong (blur, wrong colours)."""

from __future__ import annotations

import random

import pytest
from PIL import Image, ImageFilter

from fusionlm.data.world.render import render_image
from fusionlm.data.world.scenes import draw_scene, geneval_scenes
from fusionlm.evaluate.fd import WorldFeatures, frechet_distance


def _draw(seed: str, n_per_category: int = 20, size: int = 32):
    rng = random.Random(seed)
    return [render_image(draw_scene(s, rng, size)) for s in geneval_scenes(n_per_category)]


def test_fd_is_near_zero_for_the_same_pictures_and_orders_the_failures():
    real, again = _draw("a"), _draw("b")
    same = frechet_distance(real, real)
    fresh = frechet_distance(real, again)
    blurred = frechet_distance(real, [im.filter(ImageFilter.GaussianBlur(1.5)) for im in again])
    swapped = frechet_distance(real, [Image.merge("RGB", im.split()[::-1]) for im in again])  # red <-> blue
    assert abs(same) < 1e-6
    assert fresh < blurred and fresh < swapped, (fresh, blurred, swapped)
    assert frechet_distance(real, again) == fresh  # a fixed extractor: the same figure every time


def test_the_extractor_is_fixed_and_named():
    a, b = WorldFeatures(), WorldFeatures()
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters()))
    assert WorldFeatures.name == "world-random-conv-v1 (seed 0)" and WorldFeatures.num_features == 64


def test_fd_refuses_what_it_cannot_compare():
    real = _draw("a", 1)
    with pytest.raises(ValueError, match="one size"):
        frechet_distance(real, _draw("b", 1, size=48))
    with pytest.raises(ValueError, match="at least 2 pictures"):
        frechet_distance(real[:1], real)
