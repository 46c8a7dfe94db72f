"""The synthetic world (determinism, disjoint splits, answers true to the pixels) and LLaVA JSON."""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from fusionlm.data.world import render
from fusionlm.data.sources.formats import read_llava_json, write_llava_json
from fusionlm.data.chat import check_placeholders
from fusionlm.data.sample import IMAGE_TOKEN, TASKS, VIDEO_TOKEN
from fusionlm.data.pixels.video import Video, frame_sources, placeholder
from fusionlm.data.world import COLORS, SHAPES, SPLITS, WORDS, World, table_markdown
from fusionlm.errors import SampleError

S = 32


@pytest.fixture(scope="module")
def world() -> World:
    return World(image_size=S, seed=0)


def _image_hash(img: Image.Image | Video) -> str:
    if isinstance(img, Video):  # a clip: all its frames
        return hashlib.sha256("".join(_image_hash(f) for f in img.source).encode()).hexdigest()
    return hashlib.sha256(img.mode.encode() + repr(img.size).encode() + img.tobytes()).hexdigest()


def _pictures(items) -> list[Image.Image]:
    """The pictures of a sample's items, a clip's frames in its place."""
    return [f for it in items for f in (it.source if isinstance(it, Video) else [it])]


def _coloured(px: tuple[int, int, int]) -> bool:
    return sum(px) < 600  # not (near) white background


# --- determinism and validity ----------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_same_arguments_give_the_same_sample(task):
    a, b = World(S, seed=3).sample(task, "val", 7), World(S, seed=3).sample(task, "val", 7)
    assert (a.id, a.kind, a.messages, a.text, a.answers) == (b.id, b.kind, b.messages, b.text, b.answers)
    assert [_image_hash(i) for i in a.images] == [_image_hash(i) for i in b.images]


def test_seed_and_index_change_the_sample():
    keys = {World(S, seed=s).spec("count", "train", i).content_key() for s in (0, 1) for i in range(5)}
    assert len(keys) == 10


@pytest.mark.parametrize("task", TASKS)
def test_every_task_gives_valid_samples(world, task):
    for split in SPLITS:
        for index in range(6):
            s = world.sample(task, split, index)
            assert s.id == f"{split}/{task}/{index:06d}" and s.task == task
            check_placeholders(s)
            assert all(isinstance(item, Video) == (task == "motion") for item in s.images)
            for img in _pictures(s.images):
                assert isinstance(img, Image.Image) and img.mode == "RGB"
                assert img.height >= S // 2 and img.width >= S
            if task in ("interleaved", "text_only"):
                assert s.kind == "document" and not s.messages and not s.answers and s.text
                assert (len(s.images) in (2, 3)) if task == "interleaved" else not s.images
                continue
            assert s.kind == "chat" and [m["role"] for m in s.messages] == ["user", "assistant"]
            if task == "draw":  # text to image: the prompt asks, the picture answers
                assert s.messages == [{"role": "user", "content": s.answers[0]},
                                      {"role": "assistant", "content": placeholder(s.images[0])}]
                assert len(s.images) == 1 and s.images[0].size == (S, S)
                continue
            assert s.messages[0]["content"].startswith("".join(placeholder(i) + "\n" for i in s.images))
            assert s.messages[1]["content"] == s.answers[0]
            assert len(s.images) == {"price": 2, "position_words": 0}.get(task, 1)
            if task in ("color", "shape", "count", "position", "caption", "motion"):
                assert all(f.size == (S, S) for f in _pictures(s.images))
            if task != "table":
                assert all(a == a.lower() and a for a in s.answers)


def test_unknown_task_or_split_lists_the_allowed_names(world):
    with pytest.raises(ValueError, match="colour.*allowed: caption, color"):
        world.sample("colour", "train", 0)
    with pytest.raises(ValueError, match="allowed: train, val, test"):
        world.sample("color", "dev", 0)


# --- disjoint splits --------------------------------------------------------------------------

def test_content_keys_never_shared_between_splits(world):
    """300 samples per task and split: no content key, image key or fact in two splits (but
    position_words', whose 16 cell words are a coarse view of a scene: scenes of two splits can read
    alike, which is why it is for training only)."""
    seen: dict[tuple, str] = {}
    for split in SPLITS:
        for task in (t for t in TASKS if t != "position_words"):
            for i in range(300):
                spec = world.spec(task, split, i)
                parts = [spec.content_key(), *spec.image_keys]
                parts += [("fact", f) for f in spec.meta.get("facts", [])]
                for key in parts:
                    assert seen.setdefault(key, split) == split, (key, seen[key], split)


def test_image_bytes_never_shared_between_splits(world):
    owner: dict[str, str] = {}
    for split in SPLITS:
        for task in TASKS:
            for i in range(25):
                for img in world.sample(task, split, i).images:
                    h = _image_hash(img)
                    assert owner.setdefault(h, split) == split, (task, i)
    assert len(owner) > 500


# --- answers agree with the pixels ------------------------------------------------------------

def test_color_answer_is_the_colour_at_the_shape_centre(world):
    for i in range(40):
        spec = world.spec("color", "test", i)
        img = render.render_image(spec.image_keys[0])
        assert img.getpixel(spec.meta["center"]) == COLORS[spec.answers[0]]


def test_shape_answer_matches_the_pixels():
    """The width of the row a quarter radius below the top tells square, circle and triangle apart."""
    world = World(64)
    for i in range(30):
        spec = world.spec("shape", "train", i)
        (shape, _, cx, cy, d), = spec.image_keys[0][3]
        img, r = np.asarray(render.render_image(spec.image_keys[0])), d / 2
        width = (img[round(cy - 0.75 * r)].sum(axis=1) < 600).sum() / r  # 1.76 / 1.32 / 0.25
        measured = "square" if width > 1.55 else "circle" if width > 0.8 else "triangle"
        assert spec.answers == [shape] == [measured], (i, width)


def test_count_answer_is_the_number_of_visible_shapes(world):
    counts = set()
    for i in range(60):
        spec = world.spec("count", "val", i)
        elems = spec.image_keys[0][3]
        assert spec.answers == [str(len(elems))]
        counts.add(len(elems))
        img = render.render_image(spec.image_keys[0])
        for shape, color, cx, cy, d in elems:  # every shape drawn, none covered
            assert img.getpixel((cx, cy)) == COLORS[color]
            assert d >= 0.12 * S
    assert counts == {1, 2, 3, 4, 5}


def test_position_answers_follow_the_coordinates(world):
    yes = total_yes_no = 0
    for i in range(150):
        spec = world.spec("position", "train", i)
        where = {c: (cx, cy) for _, c, cx, cy, _ in spec.image_keys[0][3]}
        (tx, ty), (rx, ry) = where[spec.meta["target"]], where[spec.meta["reference"]]
        dx, dy = tx - rx, ty - ry
        assert max(abs(dx), abs(dy)) >= 0.4 * S and min(abs(dx), abs(dy)) <= 0.15 * S
        truth = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        if spec.question.startswith("Where"):
            assert spec.answers == [truth]
        else:
            asked = re.match(r"Is the \w+ shape (left|right|above|below)", spec.question).group(1)
            assert spec.answers == ["yes" if asked == truth else "no"]
            yes += spec.answers[0] == "yes"
            total_yes_no += 1
    assert 0.3 < yes / total_yes_no < 0.7


def test_chart_answers_match_the_bars(world):
    for i in range(40):
        spec = world.spec("chart", "test", i)
        _, w, h, color, values = spec.image_keys[0]
        img = np.asarray(render.render_image(spec.image_keys[0]))
        tops = []
        for b in range(3):  # measured: first row of the bar's colour in its centre column
            column = img[:, int((b + 0.5) * w / 3)]
            tops.append(int(np.argmax((column == COLORS[color]).all(axis=1))))
        assert np.argsort(tops).tolist() == np.argsort([-v for v in values]).tolist()
        if spec.question == "Which bar is the tallest?":
            assert spec.answers == ["abc"[int(np.argmin(tops))]]
        else:
            label = spec.question.rstrip("?").split()[-1]
            assert spec.answers == [str(values["ABC".index(label)])]


def test_price_text_table_and_caption_answers(world):
    for i in range(30):
        price = world.spec("price", "train", i)
        prices, scene = dict(price.image_keys[0][3]), price.image_keys[1][3]
        shape = price.meta["shape"]
        assert price.question == f"How much do all the {shape}s cost?"
        assert price.answers == [str(prices[shape] * sum(e[0] == shape for e in scene))]

        text = world.spec("text", "train", i)
        assert text.answers == [text.image_keys[0][3]] and text.answers[0] in WORDS

        table = world.spec("table", "train", i)
        header, values = table.image_keys[0][3:]
        assert table.answers == [table_markdown(header, values)]
        assert re.fullmatch(r"(\| \w+ )+\|\n(\| --- )+\|\n(\| \d )+\|", table.answers[0])

        cap = world.spec("caption", "train", i)
        m = cap.meta
        assert cap.answers[0].startswith(f"a {m['size']} {m['color']} {m['shape']} ")
        assert 3 <= len(set(cap.answers)) == len(cap.answers) <= 4
    assert table_markdown(("a", "b"), (1, 2)) == "| a | b |\n| --- | --- |\n| 1 | 2 |"


def test_text_images_are_drawn_with_or_without_freetype(world, monkeypatch):
    spec = world.spec("text", "train", 0)
    dark = lambda img: (np.asarray(img).sum(axis=2) < 300).sum()  # noqa: E731
    assert dark(render.render_image(spec.image_keys[0])) > 20
    monkeypatch.setattr(render, "_font", lambda size: None)
    render.text_width.cache_clear(), render.fit_size.cache_clear()
    try:
        assert dark(render.render_image(spec.image_keys[0])) > 20
        assert world.sample("price", "train", 0).images[0].getbbox() is not None
    finally:
        render.text_width.cache_clear(), render.fit_size.cache_clear()


# --- corpus -----------------------------------------------------------------------------------

def test_corpus_covers_the_vocabulary_of_every_split(world):
    corpus = list(world.corpus(n_per_task=10))
    assert all(isinstance(t, str) and t for t in corpus)
    vocab = {w for t in corpus for w in re.findall(r"[a-z]+|\d+|[^\sa-z\d]", t.lower())}
    assert {"|", "---"} <= set(" ".join(corpus).split()) and IMAGE_TOKEN in " ".join(corpus)
    assert set(WORDS) | set(SHAPES) | set(COLORS) | {"yes", "no", "20"} <= vocab
    for task in TASKS:
        for split in ("val", "test"):
            for i in range(10):
                text = world.sample(task, split, i).all_text().replace(VIDEO_TOKEN, "").lower()  # never tokenized
                assert set(re.findall(r"[a-z]+|\d+", text)) <= vocab, (task, split, i)


# --- LLaVA JSON -------------------------------------------------------------------------------

def test_llava_json_round_trip(world, tmp_path):
    samples = [world.sample(task, "train", 1) for task in TASKS]
    path = write_llava_json(samples, tmp_path / "out")
    records = json.loads(path.read_text())
    assert records[TASKS.index("color")]["image"] == "images/train_color_000001_0.png"
    assert len(records[TASKS.index("price")]["images"]) == 2
    assert "image" not in records[TASKS.index("text_only")]
    back = read_llava_json(path)
    assert [s.id for s in back] == [s.id for s in samples]
    for a, b in zip(samples, back):
        assert (a.task, a.kind, a.messages, a.text, a.answers) == (b.task, b.kind, b.messages, b.text, b.answers)
        assert len(a.images) == len(b.images)
        for img, p in zip(a.images, b.images):
            if isinstance(img, Video):  # a clip comes back as an animated GIF with the same frames
                assert isinstance(p, Video) and p.source.endswith(".gif") and os.path.isfile(p.source)
                frames = frame_sources(p, len(img.source))
                assert all(np.array_equal(np.asarray(f), np.asarray(g)) for f, g in zip(frames, img.source))
                continue
            assert isinstance(p, str) and os.path.isfile(p)
            with Image.open(p) as loaded:
                assert np.array_equal(np.asarray(loaded.convert("RGB")), np.asarray(img))


def _write(tmp_path, records) -> str:
    (tmp_path / "x.png").write_bytes(b"not opened")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_plain_llava_file_reads_with_defaults(tmp_path):
    path = _write(tmp_path, [{"id": "q1", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"},
        {"from": "user", "value": "Sure?"}, {"from": "assistant", "value": "yes"}]}])
    (s,) = read_llava_json(path)
    assert (s.task, s.answers, s.images) == ("custom", ["yes"], [os.path.realpath(tmp_path / "x.png")])
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("value, images, counts", [
    ("What is it?", "x.png", "0 <image> marker(s) but 1 image(s)"),
    ("<image><image> What is it?", "x.png", "2 <image> marker(s) but 1 image(s)"),
    ("<image> What is it?", None, "1 <image> marker(s) but 0 image(s)"),
])
def test_placeholder_mismatch_names_the_sample(tmp_path, value, images, counts):
    rec = {"id": "bad7", "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "x"}]}
    if images:
        rec["image"] = images
    path = _write(tmp_path, [rec])
    with pytest.raises(SampleError, match=re.escape(f"{path}: sample bad7: text has {counts}")):
        read_llava_json(path)


def test_path_escapes_are_refused(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "link.png")
    for bad in ("../outside.png", str(outside), "link.png", "sub/../../outside.png"):
        path = _write(root, [{"id": "esc", "image": bad, "conversations": [
            {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]}])
        with pytest.raises(SampleError, match=re.escape(f"sample esc: image path '{bad}' escapes the data root")):
            read_llava_json(path)
    # a wider image_root allows the same link
    path = _write(root, [{"id": "in", "image": "root/link.png", "conversations": [
        {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]}])
    assert read_llava_json(path, image_root=tmp_path)[0].images == [os.path.realpath(outside)]


def test_malformed_files_name_the_file_and_sample(tmp_path):
    path = _write(tmp_path, [{"id": "ok", "conversations": []}, {"id": "n2", "image": "x.png"}])
    with pytest.raises(SampleError, match=r"data\.json: sample 1 \(id n2\): missing key 'conversations'"):
        read_llava_json(path)
    path = _write(tmp_path, [{"conversations": [{"value": "hi"}]}])
    with pytest.raises(SampleError, match=r"sample 0 .*missing key 'from'"):
        read_llava_json(path)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(SampleError, match="broken.json: cannot read LLaVA JSON"):
        read_llava_json(tmp_path / "broken.json")
    path = _write(tmp_path, {"not": "a list"})
    with pytest.raises(SampleError, match="expected a JSON list"):
        read_llava_json(path)


def test_glyphs_is_reading_practice_at_every_text_size_of_the_world(world):
    from fusionlm.data.world.vocabulary import HEADER_WORDS, vocabulary_strings
    from fusionlm.data.sources.files import WorldSource
    from fusionlm.evaluate.harness import scored_tasks

    S = world.image_size
    sizes, kinds = [], set()
    for i in range(200):
        spec = world.spec("glyphs", "train", i)
        kind, W, H, text, size = spec.image_keys[0][:5]
        assert (kind, W, H) == ("word", 2 * S, S) and spec.answers == [text]
        assert text in WORDS + HEADER_WORDS + SHAPES or (text.isdigit() and 0 <= int(text) <= 99)
        assert round(0.19 * S) <= size <= round(0.7 * S)
        sizes.append(size / S)
        kinds.add("number" if text.isdigit() else "word")
    assert kinds == {"word", "number"} and min(sizes) < 0.25 and max(sizes) > 0.6  # a chart's digits to big words
    # training only: not among the tasks `fusionlm eval` scores by default
    scored = scored_tasks(WorldSource(world.image_size, world.seed), draws=True)
    assert "glyphs" not in scored and {"text", "chart", "draw"} <= set(scored)
    # a recipe without it keeps its tokenizer's corpus
    assert "Read the text in the image." not in list(vocabulary_strings(["text"]))
    assert "Read the text in the image." in list(vocabulary_strings(["glyphs"]))


def test_lookup_names_one_shape_of_the_scene_and_asks_about_it(world):
    from fusionlm.data.world.vocabulary import PLURALS, vocabulary_strings
    from fusionlm.data.sources.files import WorldSource
    from fusionlm.evaluate.harness import scored_tasks

    kinds = set()
    for i in range(150):
        spec = world.spec("lookup", "train", i)
        elems = spec.image_keys[0][3]
        shapes, colors = [e[0] for e in elems], [e[1] for e in elems]
        q, (a,) = spec.question, spec.answers
        kinds.add(spec.meta["kind"])
        if spec.meta["kind"] == "shape":  # "what shape is the red one?": the colour picks one shape
            color = q.split()[4]
            assert colors.count(color) == 1 and a == shapes[colors.index(color)] and len(set(colors)) == len(elems)
        elif spec.meta["kind"] == "color":  # "what colour is the circle?": the shape picks one
            shape = q.rstrip("?").split()[-1]
            assert shapes.count(shape) == 1 and a == colors[shapes.index(shape)]
        else:  # "how many circles are there?"
            plural = q.split()[2]
            named = {v: k for k, v in PLURALS.items()}[plural]
            assert a == str(shapes.count(named)) and int(a) >= 1
    assert kinds == {"shape", "color", "count"}
    assert "lookup" not in scored_tasks(WorldSource(world.image_size, world.seed), draws=True)
    assert "What colour is the circle?" not in list(vocabulary_strings(["position"]))
    assert "What colour is the circle?" in list(vocabulary_strings(["lookup"]))


def test_position_words_writes_the_position_scene_as_one_word_a_cell(world):
    for i in range(40):
        scene, words = world.spec("position", "train", i), world.spec("position_words", "train", i)
        cells_text, question = words.question.split("\n")
        cells = cells_text.split(" ")[1:]  # each cell written " word", as the question writes a colour
        assert len(cells) == 16 and not words.image_keys and set(cells) - {"."} <= {*COLORS}
        target, ref = words.meta["target"], words.meta["reference"]
        assert target in question and ref in question and sorted(c for c in cells if c != ".") == sorted([target, ref])
        (ty, tx), (ry, rx) = (divmod(cells.index(c), 4) for c in (target, ref))
        relation = words.meta["relation"]
        assert {"left": tx < rx, "right": tx > rx, "above": ty < ry, "below": ty > ry}[relation]
        assert scene.meta.keys() == words.meta.keys()
    from fusionlm.data.sources.files import WorldSource
    from fusionlm.evaluate.harness import scored_tasks

    assert "position_words" not in scored_tasks(WorldSource(world.image_size, world.seed), draws=True)
