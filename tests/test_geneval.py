"""GenEval on the synthetic world: the prompts, their held-out combinations, and a checker that
passes every picture the world draws for a prompt and fails each way of getting it wrong."""

from __future__ import annotations

import random

import pytest
from PIL import Image, ImageDraw, ImageOps

from fusionlm.data.world import World
from fusionlm.data.world.render import COLORS, render_image
from fusionlm.data.world.scenes import (
    CATEGORIES, HELD_OUT, Scene, Wanted, draw_scene, geneval_scenes, scene, training_scene,
)
from fusionlm.data.world.vocabulary import SHAPES
from fusionlm.evaluate.geneval import check, find_objects, geneval


def _cases(size: int, per_category: int = 12):
    rng = random.Random(f"cases/{size}")
    for category in CATEGORIES:
        for i in range(per_category):
            s = scene(category, rng, held_out=bool(i % 2))
            yield s, draw_scene(s, rng, size)


def test_prompts_read_as_geneval_writes_them():
    assert Scene("color_attr", (Wanted("circle", color="red"), Wanted("square", color="blue"))).prompt == \
        "a red circle and a blue square"
    assert Scene("colors", (Wanted("square", color="orange"),)).prompt == "an orange square"
    assert Scene("counting", (Wanted("triangle", 3),)).prompt == "three triangles"
    assert Scene("position", (Wanted("circle"), Wanted("square")), "left of").prompt == "a circle left of a square"
    assert Scene("two_object", (Wanted("circle"), Wanted("triangle"))).prompt == "a circle and a triangle"


def test_training_prompts_never_hold_a_held_out_combination_and_evaluation_prompts_do():
    rng = random.Random(0)
    train = [training_scene(rng) for _ in range(2000)]
    assert not any(s.held_out() for s in train)
    assert {s.category for s in train} == set(CATEGORIES)
    evaluation = geneval_scenes(per_category=20)
    assert [s.category for s in evaluation] == [c for c in CATEGORIES for _ in range(20)]
    for s in evaluation:
        assert s.held_out() == (s.category not in ("single_object", "two_object")), s.prompt
    # every held-out combination is asked for at evaluation time
    asked = {(w.color, w.shape) for s in evaluation for w in s.objects if w.color}
    assert HELD_OUT["bindings"] <= asked
    train_prompts = {s.prompt for s in train}
    assert not train_prompts & {s.prompt for s in evaluation if s.held_out()}


def test_drawn_scenes_never_show_a_held_out_binding_unasked():
    for s, key in _cases(48, per_category=30):
        named = {(w.color, w.shape) for w in s.objects if w.color}
        shown = {(color, shape) for shape, color, *_ in key[3]}
        assert not (shown - named) & HELD_OUT["bindings"], (s.prompt, key)


@pytest.mark.parametrize("size", [32, 64])
def test_every_picture_the_world_draws_for_a_prompt_scores_1(size):
    scenes, images = zip(*[(s, render_image(key)) for s, key in _cases(size)])
    for s, image in zip(scenes, images):
        verdict = check(s, image)
        assert verdict.ok, (s.prompt, verdict.failed)
    assert geneval(scenes, images) == {**{c: 1.0 for c in CATEGORIES}, "overall": 1.0}


def _other(values, *avoid):
    return next(v for v in values if v not in avoid)


def _free_spot(elems: tuple, size: int, rng: random.Random) -> tuple:
    """A small square clear of ``elems``, of a shape and colour no one asked for."""
    d = round(0.16 * size)
    for _ in range(10_000):
        cx, cy = rng.randint(d // 2 + 1, size - d // 2 - 1), rng.randint(d // 2 + 1, size - d // 2 - 1)
        if all(max(abs(cx - e[2]), abs(cy - e[3])) >= (d + e[4]) / 2 + 1 for e in elems):
            return ("square", _other(COLORS, *{e[1] for e in elems}), cx, cy, d)
    raise AssertionError("no free spot")


def _perturbed(s: Scene, key: tuple, rng: random.Random) -> dict[str, Image.Image]:
    """Each way of getting ``s`` wrong that applies to it, as a picture."""
    _, w, h, elems = key
    out = {}
    out["missing"] = render_image(("shapes", w, h, elems[:-1]))
    out["extra"] = render_image(("shapes", w, h, elems + (_free_spot(elems, w, rng),)))
    first = elems[0]
    out["wrong shape"] = render_image(("shapes", w, h, ((_other(SHAPES, first[0]),) + first[1:],) + elems[1:]))
    if any(o.color for o in s.objects):
        used = {e[1] for e in elems}
        out["wrong colour"] = render_image(("shapes", w, h, ((first[0], _other(COLORS, *used)) + first[2:],) + elems[1:]))
    if s.relation:
        (sa, ca, xa, ya, da), (sb, cb, xb, yb, db) = elems
        out["relation reversed"] = render_image(("shapes", w, h, ((sa, ca, xb, yb, da), (sb, cb, xa, ya, db))))
        flip = ImageOps.mirror if s.relation == "left of" else ImageOps.flip
        out["mirrored"] = flip(render_image(key))
    smudged = render_image(key)
    ImageDraw.Draw(smudged).rectangle((0, 0, w // 6, h // 6), fill=(60, 60, 60))  # ink of no world colour
    out["unrecognised object"] = smudged
    return out


@pytest.mark.parametrize("size", [32, 64])
def test_each_way_of_getting_a_prompt_wrong_scores_0(size):
    rng = random.Random(1)
    seen = set()
    for s, key in _cases(size, per_category=6):
        for how, image in _perturbed(s, key, rng).items():
            verdict = check(s, image)
            assert not verdict.ok, (s.prompt, how, key)
            seen.add(how)
    assert seen == {"missing", "extra", "wrong shape", "wrong colour", "relation reversed", "mirrored",
                    "unrecognised object"}
    s, key = next(_cases(size))
    wrong = _perturbed(s, key, rng)["missing"]
    assert geneval([s, s], [render_image(key), wrong])[s.category] == 0.5


def test_the_checker_counts_the_worlds_own_count_task():
    """An independent picture source: the world's ``count`` task, drawn by other code, with its answer."""
    world = World(64)
    for i in range(40):
        sample = world.sample("count", "test", i)
        found = find_objects(sample.images[0])
        assert len(found) == int(sample.answers[0]) and all(b.shape and b.color for b in found), sample.id


def test_a_blank_or_mismatched_batch_is_refused_or_fails():
    s = Scene("single_object", (Wanted("circle"),))
    assert not check(s, Image.new("RGB", (32, 32), "white")).ok
    with pytest.raises(ValueError, match="2 scenes but 1 images"):
        geneval([s, s], [Image.new("RGB", (32, 32), "white")])


@pytest.mark.parametrize("name, draw", [
    ("a diamond", lambda d: d.polygon([(16, 4), (28, 16), (16, 28), (4, 16)], fill=COLORS["red"])),
    ("a 13x17 box", lambda d: d.rectangle((8, 8, 20, 24), fill=COLORS["red"])),
    ("a 2:1 ellipse", lambda d: d.ellipse((4, 10, 28, 22), fill=COLORS["red"])),
    ("a downward triangle", lambda d: d.polygon([(4, 4), (28, 4), (16, 28)], fill=COLORS["red"])),
])
def test_a_shape_the_world_never_draws_is_no_world_shape(name, draw):
    image = Image.new("RGB", (32, 32), "white")
    draw(ImageDraw.Draw(image))
    (blob,) = find_objects(image)
    assert blob.color == "red" and blob.shape is None, name
    assert not check(Scene("colors", (Wanted("square", color="red"),)), image).ok

