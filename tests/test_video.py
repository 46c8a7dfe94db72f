"""Video input: clips (a folder of frames, a GIF, frames in memory) -> N uniformly sampled frames
through the one image loader, temporal pooling in the model, the ``<video>`` placeholder, the
synthetic ``motion`` task, LLaVA JSON with videos, and a tiny model that learns from clips."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from conftest import make_batch, spec_for, tiny_config
from fusionlm.checkpoint import build_model
from fusionlm.cli import main
from fusionlm.config import RecipeConfig, from_dict, validate
from fusionlm.data.pixels import images
from fusionlm.data.batching.batches import MixtureBatches
from fusionlm.data.chat import check_placeholders
from fusionlm.data.sources.formats import read_llava_json, write_llava_json
from fusionlm.data.layout import ImageLayout
from fusionlm.designs import DESIGNS
from fusionlm.data.pixels.processing import ImageBatch
from fusionlm.data.prompt import PromptEncoder
from fusionlm.data.world.render import COLORS
from fusionlm.data.sample import VIDEO_TOKEN, Sample
from fusionlm.data.sources import WorldSource
from fusionlm.data.world import MOTION_FRAMES, SPLITS, World
from fusionlm.data.pixels.video import DEFAULT_MAX_VIDEO_PIXELS, Video, frame_sources, sample_indices
from fusionlm.errors import ConfigError, ImageError, SampleError
from fusionlm.evaluate.harness import EVAL_TASKS
from fusionlm.evaluate.metrics import metric_for
from fusionlm.generate import Request, generate

S = 32  # the world's scene side in these tests


# ----------------------------------------------------------------------------- helpers


def clip_frames(n: int = 12, size: int = 20) -> list[Image.Image]:
    """``n`` RGB frames of a red block moving right (flat colours: GIF keeps them exactly)."""
    frames = []
    for k in range(n):
        img = Image.new("RGB", (size, size), (255, 255, 255))
        img.paste((220, 30, 30), (k, 5, k + 6, 11))
        img.paste((40, 70, 220), (0, 15, 3 + k % 4, 18))  # differs frame to frame (no frame merging)
        frames.append(img)
    return frames


def save_folder(folder: Path, frames: list[Image.Image]) -> Path:
    folder.mkdir(parents=True)
    for k, f in enumerate(frames):
        f.save(folder / f"frame_{k}.png")  # unpadded: frame_10 must come after frame_9
    (folder / "notes.txt").write_text("not a frame")
    (folder / ".hidden.png").write_bytes(b"not a frame either")
    return folder


def save_gif(path: Path, frames: list[Image.Image]) -> Path:
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)
    return path


def arrays(images) -> list[np.ndarray]:
    return [np.asarray(Image.open(i).convert("RGB") if isinstance(i, str) else i) for i in images]


def with_video(fusion: str, frames: int, pool: int, max_length: int = 256):
    config = tiny_config(fusion)
    config.model.video.frames, config.model.video.temporal_pool = frames, pool
    config.model.llm.max_length = max_length
    return validate(config)


def motion_sample(world: World, index: int = 0, split: str = "train") -> Sample:
    return world.sample("motion", split, index)


# ----------------------------------------------------------------------------- loading and sampling


def test_folder_and_gif_give_the_same_frames(tmp_path, tokenizer):
    frames = clip_frames(12)
    folder = save_folder(tmp_path / "clip", frames)
    gif = save_gif(tmp_path / "clip.gif", frames)
    from_folder = frame_sources(Video(folder), 12)
    assert [Path(p).name for p in from_folder] == [f"frame_{k}.png" for k in range(12)]  # natural order
    from_gif = frame_sources(Video(gif), 12)
    from_memory = frame_sources(Video(frames), 12)
    want = arrays(frames)
    for got in (arrays(from_folder), arrays(from_gif), arrays(from_memory)):
        assert len(got) == 12 and all(np.array_equal(a, b) for a, b in zip(got, want))
    # The image path gives identical encoder inputs whatever the clip's form.
    model_spec = spec_for(build_model(with_video("unified", 4, 1), tokenizer))
    pix = [torch.stack([i.pixels for i in model_spec.process_all(Video(src))]) for src in (folder, gif, frames)]
    assert pix[0].shape == (4, 3, 16, 16) and torch.equal(pix[0], pix[1]) and torch.equal(pix[0], pix[2])


def test_uniform_sampling_picks_segment_middles(tmp_path):
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(8, 4) == [1, 3, 5, 7]
    assert sample_indices(10, 3) == [1, 5, 8]
    assert sample_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # a short clip repeats frames
    assert sample_indices(100, 1) == [50]
    folder = save_folder(tmp_path / "clip", clip_frames(12))
    assert [Path(p).name for p in frame_sources(Video(folder), 4)] == [f"frame_{k}.png" for k in (1, 4, 7, 10)]
    picked = frame_sources(Video(save_gif(tmp_path / "c.gif", clip_frames(12))), 4)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(picked), arrays([clip_frames(12)[k] for k in (1, 4, 7, 10)])))


def test_bad_clips_name_the_file(tmp_path, tokenizer):
    spec = spec_for(build_model(with_video("unified", 4, 1), tokenizer))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match=f"{tmp_path / 'empty'}: a folder with no frame files"):
        spec.process_all(Video(tmp_path / "empty"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("x")
    with pytest.raises(ImageError, match="junk: a folder with no frame files"):
        spec.process_all(Video(junk))

    gif = save_gif(tmp_path / "clip.gif", clip_frames(12))
    data = gif.read_bytes()
    truncated = tmp_path / "cut.gif"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageError, match=f"{truncated}: truncated or corrupt"):
        spec.process_all(Video(truncated))

    still = tmp_path / "still.gif"
    clip_frames(1)[0].save(still)
    png = tmp_path / "still.png"
    clip_frames(1)[0].save(png)
    for path in (still, png):
        with pytest.raises(ImageError, match=f"{path}: not an animated image"):
            spec.process_all(Video(path))

    folder = save_folder(tmp_path / "clip", clip_frames(8))
    (folder / "frame_3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # frame 3 is sampled (8 -> 4: 1, 3, 5, 7)
    with pytest.raises(ImageError, match=f"{folder / 'frame_3.png'}: "):
        spec.process_all(Video(folder))

    mp4 = tmp_path / "clip.mp4"
    mp4.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    with pytest.raises(ImageError, match=f"{mp4}: video files are not decoded"):
        spec.process_all(Video(mp4))
    with pytest.raises(ImageError, match="nowhere.gif: file not found"):
        spec.process_all(Video(tmp_path / "nowhere.gif"))
    with pytest.raises(ImageError, match="<video>: a list of no frames"):
        spec.process_all(Video([]))
    with pytest.raises(TypeError, match="PIL images"):
        Video(["a.png"])


def test_frames_stay_inside_the_data_root(tmp_path, tokenizer):
    root = tmp_path / "root"
    save_folder(root / "clip", clip_frames(4))
    outside = tmp_path / "secret.png"
    clip_frames(1)[0].save(outside)
    os.symlink(outside, root / "clip" / "frame_9.png")
    spec = replace(spec_for(build_model(with_video("unified", 5, 1), tokenizer)), root=str(root))
    with pytest.raises(SampleError, match="escapes the data root"):
        spec.process_all(Video("clip"))
    os.remove(root / "clip" / "frame_9.png")
    assert len(spec.process_all(Video("clip"))) == 5
    with pytest.raises(SampleError, match="escapes the data root"):
        spec.process_all(Video("../secret.png"))


def test_video_config_is_validated():
    config = tiny_config("unified")
    config.model.video.frames, config.model.video.temporal_pool = 8, 3
    with pytest.raises(ConfigError, match="model.video.temporal_pool: 3 does not divide model.video.frames 8"):
        validate(config)
    config.model.video.frames = 0
    with pytest.raises(ConfigError, match="model.video: frames"):
        validate(config)


def save_webp(path: Path, frames: list[Image.Image]) -> Path:
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0, lossless=True)
    return path


@pytest.mark.parametrize("kind", ["gif", "webp"])
def test_a_clip_over_the_video_pixel_cap_is_refused_from_its_header(kind, tmp_path, monkeypatch):
    """An animated file decodes every frame: its frames x width x height is capped as a whole
    (12 frames of 20x20 = 4800 pixels, each far under the per-image cap), before any decoding."""
    if kind == "webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = (save_gif if kind == "gif" else save_webp)(tmp_path / f"long.{kind}", clip_frames(12))
    with Image.open(path) as im:
        assert im.n_frames == 12 and im.size == (20, 20)
    decoded = []
    real = images._decode
    monkeypatch.setattr(images, "_decode", lambda *a, **kw: decoded.append(1) or real(*a, **kw))
    with pytest.raises(ImageError, match=rf"{path}: clip of 12 frames of 20×20 = 4800 pixels, over the limit "
                                         rf"of 4799 decoded pixels per clip \(data\.max_video_pixels\)"):
        frame_sources(Video(path), 4, max_video_pixels=4799)
    assert not decoded  # refused from the header
    assert len(frame_sources(Video(path), 4, max_video_pixels=4800)) == 4  # at the cap: read
    assert len(frame_sources(Video(path), 4, max_video_pixels=None)) == 4  # null: no cap
    assert len(frame_sources(Video(path), 4)) == 4  # the default cap (400 M pixels)


def test_max_video_pixels_is_a_positive_int_or_null():
    assert RecipeConfig().data.max_video_pixels == DEFAULT_MAX_VIDEO_PIXELS
    assert validate(from_dict({"data": {"max_video_pixels": None}})).data.max_video_pixels is None
    assert validate(from_dict({"data": {"max_video_pixels": 10**6}})).data.max_video_pixels == 10**6
    for bad in (0, -5):
        with pytest.raises(ConfigError, match=rf"data\.max_video_pixels: {bad} must be a positive number of pixels"):
            validate(from_dict({"data": {"max_video_pixels": bad}}))
    for bad in ("lots", True, 1.5):
        with pytest.raises(ConfigError, match=r"data\.max_video_pixels: expected int"):
            from_dict({"data": {"max_video_pixels": bad}})


# ----------------------------------------------------------------------------- placeholders and token counts


def test_placeholders_match_items_in_order(world):
    video, image = motion_sample(world).images[0], world.sample("color", "train", 0).images[0]

    def chat(text, items):
        return Sample(id="s9", task="t", messages=[{"role": "user", "content": text},
                                                    {"role": "assistant", "content": "x"}], images=items)

    check_placeholders(chat(f"<image> then {VIDEO_TOKEN}?", [image, video]))
    with pytest.raises(SampleError, match="sample s9: placeholder 1 is <video> but item 1 is an image"):
        check_placeholders(chat("<video> then <image>?", [image, video]))
    with pytest.raises(SampleError, match=r"sample s9: 1 <image> and 0 <video> placeholder\(s\) in the text but "
                                          r"0 image\(s\) and 1 video\(s\)"):
        check_placeholders(chat("<image>?", [video]))
    with pytest.raises(SampleError, match=r"sample s9: 2 <image> placeholder\(s\) in the text but 1 image\(s\)"):
        check_placeholders(chat("<image><image>?", [image]))


@pytest.mark.parametrize("fusion", ["unified", "cross_attention", "fuyu"])
@pytest.mark.parametrize("frames, pool", [(8, 1), (8, 2), (8, 4), (4, 4)])
def test_a_video_takes_frames_over_pool_image_slots(fusion, frames, pool, tokenizer, world):
    model = build_model(with_video(fusion, frames, pool), tokenizer)
    per_image = len(model.image_layout())  # unified 16 (4x4), fuyu 20 (4 rows + newlines), cross-attention 1
    assert per_image == {"unified": 16, "cross_attention": 1, "fuyu": 20}[fusion]
    batch = make_batch(model, tokenizer, [motion_sample(world)])
    slots = frames // pool
    assert len(batch.pixels) == frames and batch.pixels.groups() == [pool] * slots
    n_image = int((batch.input_ids == model.ids.image).sum())
    n_newline = int((batch.input_ids == model.ids.newline).sum()) if fusion == "fuyu" else 0
    assert n_image + n_newline == slots * per_image
    with torch.no_grad():
        out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                    labels=batch.labels)
    assert torch.isfinite(out.loss)


def test_hybrid_fusion_refuses_video(tokenizer, world):
    spec = spec_for(build_model(with_video("unified", 4, 2), tokenizer))
    frames = spec.process_all(motion_sample(world).images[0])
    with pytest.raises(SampleError, match="hybrid fusion takes no video"):
        ImageLayout(DESIGNS.get("hybrid").sequence, 1, 2).image_tokens(frames)
    assert ImageLayout(DESIGNS.get("unified").sequence, 1, 2).image_tokens(frames) == [1] * 32  # 2 slots x 16


def test_pooled_features_are_the_mean_of_the_frames(tokenizer, world):
    model = build_model(with_video("unified", 8, 4), tokenizer).eval()
    spec = spec_for(model)
    image = spec.process_all(world.sample("color", "train", 0).images[0])
    frames = spec.process_all(motion_sample(world).images[0])
    assert [f.pool for f in frames] == [4] * 8 and {f.role for f in frames} == {"frame"}
    batch = ImageBatch.collate(image + frames + image)
    assert batch.groups() == [1, 4, 4, 1] and batch.heads() == [0, 1, 5, 9]
    unpooled = ImageBatch.collate([replace(i, pool=1) for i in image + frames + image])
    with torch.no_grad():
        pooled, each = model.image_features(batch), model.image_features(unpooled)  # (4, N, D), (10, N, D)
    assert pooled.shape == (4, *each.shape[1:]) and each.shape[0] == 10
    torch.testing.assert_close(pooled[0], each[0])
    torch.testing.assert_close(pooled[1], each[1:5].mean(0))
    torch.testing.assert_close(pooled[2], each[5:9].mean(0))
    torch.testing.assert_close(pooled[3], each[9])
    assert not torch.allclose(pooled[1], each[1], atol=1e-4)  # the frames do differ


@pytest.mark.parametrize("fusion", ["unified", "cross_attention"])
def test_a_batch_mixing_images_and_videos_runs_forward_and_backward(fusion, tokenizer, world):
    model = build_model(with_video(fusion, 4, 2), tokenizer)
    if fusion == "cross_attention":
        with torch.no_grad():  # open the gates so the image path gets gradients
            for block in model.cross_blocks.values():
                block.attn_gate.fill_(0.5)
                block.ffn_gate.fill_(0.5)
    both = Sample(id="mix", task="custom", messages=[
        {"role": "user", "content": f"<image>\n{VIDEO_TOKEN}\nWhich way does the circle move?"},
        {"role": "assistant", "content": "left"}],
        images=[world.sample("color", "train", 1).images[0], motion_sample(world, 1).images[0]])
    samples = [world.sample("color", "train", 0), motion_sample(world), both, world.sample("text_only", "train", 0)]
    batch = make_batch(model, tokenizer, samples)
    assert len(batch.pixels) == 1 + 4 + 1 + 4 and batch.pixels.groups() == [1, 2, 2, 1, 2, 2]
    per_image = len(model.image_layout())
    assert int((batch.input_ids == model.ids.image).sum()) == 6 * per_image
    model.train()
    out = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels, labels=batch.labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part in ("encoder.", "connector."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part) and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), part


def test_cross_attention_sees_a_frame_group_only_after_its_marker(tokenizer, world):
    model = build_model(with_video("cross_attention", 4, 2), tokenizer).eval()
    with torch.no_grad():
        for block in model.cross_blocks.values():
            block.attn_gate.fill_(0.5)
            block.ffn_gate.fill_(0.5)
    batch = make_batch(model, tokenizer, [motion_sample(world)])
    first, second = (batch.input_ids[0] == model.ids.image).nonzero().flatten().tolist()
    other = replace(batch.pixels, pixel_values=batch.pixels.pixel_values.clone())
    other.pixel_values[2:4] = torch.randn(other.pixel_values[2:4].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(batch.input_ids, pixel_values=batch.pixels).logits[0]
        b = model(batch.input_ids, pixel_values=other).logits[0]
    changed = (a - b).abs().amax(-1) > 0  # (T,)
    assert second == first + 1
    assert not changed[:second].any() and changed[second:].all()


def test_generate_answers_a_video_request(tokenizer, world):
    model = build_model(with_video("unified", 4, 2), tokenizer).eval()
    video = motion_sample(world).images[0]
    request = Request("Which way does the circle move?", [video])
    assert request.sample().messages[0]["content"].startswith(f"{VIDEO_TOKEN}\n")
    (answer,) = generate(model, tokenizer, [request], spec_for(model), max_new_tokens=3)
    assert isinstance(answer, str)


# ----------------------------------------------------------------------------- the motion task


def test_motion_is_deterministic_and_split_disjoint():
    def digest(sample):
        return hashlib.sha256(b"".join(f.tobytes() for f in sample.images[0].source)).hexdigest()

    a, b = World(S, seed=5).sample("motion", "val", 3), World(S, seed=5).sample("motion", "val", 3)
    assert (a.messages, a.answers, digest(a)) == (b.messages, b.answers, digest(b))
    assert digest(World(S, seed=6).sample("motion", "val", 3)) != digest(a)
    world, owner = World(S, seed=0), {}
    for split in SPLITS:
        for i in range(60):
            spec = world.spec("motion", split, i)
            assert owner.setdefault(spec.image_keys[0], split) == split
            if i < 15:
                assert owner.setdefault(digest(world.sample("motion", split, i)), split) == split


def _centre(frame: Image.Image, color: str) -> tuple[float, float]:
    ys, xs = np.nonzero(np.all(np.asarray(frame) == COLORS[color], axis=-1))
    assert len(xs) > 0
    return float(xs.mean()), float(ys.mean())


def test_motion_answers_agree_with_the_pixels(world):
    seen = set()
    for i in range(40):
        spec = world.spec("motion", "test", i)
        sample = world.sample("motion", "test", i)
        (video,) = sample.images
        assert isinstance(video, Video) and len(video.source) == MOTION_FRAMES
        assert all(f.size == (S, S) and f.mode == "RGB" for f in video.source)
        assert sample.messages[0]["content"].startswith(f"{VIDEO_TOKEN}\n") and sample.answers[0] in (
            "left", "right", "up", "down")
        xs, ys = zip(*(_centre(f, spec.meta["color"]) for f in video.source))  # the circle's colour is its own
        axis, cross = (xs, ys) if sample.answers[0] in ("left", "right") else (ys, xs)
        sign = 1 if sample.answers[0] in ("right", "down") else -1
        steps = np.diff(axis) * sign
        assert (steps > 0).all() and sign * (axis[-1] - axis[0]) >= 0.35 * S, (i, sample.answers, axis)
        assert max(cross) - min(cross) < 1.0  # straight along one axis
        seen.add(sample.answers[0])
    assert seen == {"left", "right", "up", "down"}
    assert "motion" in EVAL_TASKS and metric_for("motion") == "exact_match"


# ----------------------------------------------------------------------------- LLaVA JSON and the CLI


def test_llava_json_round_trip_with_videos(world, tmp_path):
    folder = save_folder(tmp_path / "src" / "clip", clip_frames(6))
    gif = save_gif(tmp_path / "src" / "c.gif", clip_frames(5))
    image = world.sample("color", "train", 0).images[0]
    mixed = Sample(id="own/1", task="custom", messages=[
        {"role": "user", "content": f"{VIDEO_TOKEN} <image> {VIDEO_TOKEN} compare"},
        {"role": "assistant", "content": "same"}], images=[Video(folder), image, Video(gif)], answers=["same"])
    samples = [motion_sample(world, 2), mixed]
    path = write_llava_json(samples, tmp_path / "out")
    records = json.loads(path.read_text())
    assert records[0]["video"] == "videos/train_motion_000002_0.gif" and "image" not in records[0]
    assert records[1]["videos"] == ["videos/own_1_0", "videos/own_1_2.gif"]
    assert records[1]["image"] == "images/own_1_1.png"
    back = read_llava_json(path)
    assert [(s.id, s.messages, s.answers) for s in back] == [(s.id, s.messages, s.answers) for s in samples]
    kinds = [[type(i).__name__ for i in s.images] for s in back]
    assert kinds == [["Video"], ["Video", "str", "Video"]]
    for a, b in zip(samples[0].images + samples[1].images, back[0].images + back[1].images):
        if isinstance(a, Video):
            n = len(a.source) if isinstance(a.source, list) else len(frame_sources(a, 1000))
            got, want = arrays(frame_sources(b, n)), arrays(frame_sources(a, n))
        else:
            got, want = arrays([b]), arrays([a])
        assert len(got) == len(want) and all(np.array_equal(x, y) for x, y in zip(got, want))


def test_llava_video_records_read_their_image_marker_as_the_clip(tmp_path):
    save_gif(tmp_path / "v.gif", clip_frames(4))
    rec = {"id": "lv1", "video": "v.gif", "conversations": [
        {"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "it moves"}]}
    bad = {"id": "lv2", "video": "v.gif", "image": "v.gif", "conversations": [
        {"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "x"}]}
    (tmp_path / "d.json").write_text(json.dumps([rec]))
    (s,) = read_llava_json(tmp_path / "d.json")
    assert s.messages[0]["content"] == f"{VIDEO_TOKEN}\nWhat happens?"
    assert isinstance(s.images[0], Video) and s.images[0].source == os.path.realpath(tmp_path / "v.gif")
    (tmp_path / "e.json").write_text(json.dumps([bad]))
    with pytest.raises(SampleError, match=r"sample lv2: text has 1 <image> and 0 <video> marker\(s\) but 1 image\(s\) "
                                          r"and 1 video\(s\)"):
        read_llava_json(tmp_path / "e.json")


def test_cli_data_writes_motion_clips_as_gifs(tmp_path, capsys):
    rc = main(["data", "--out", str(tmp_path), "--n", "2", "--tasks", "motion", "--image-size", "32"])
    assert rc == 0
    samples = read_llava_json(tmp_path / "data.json")
    assert [s.task for s in samples] == ["motion", "motion"]
    for s in samples:
        (video,) = s.images
        assert isinstance(video, Video) and video.source.endswith(".gif")
        with Image.open(video.source) as im:
            assert im.n_frames == MOTION_FRAMES and im.size == (32, 32)
        assert len(frame_sources(video, 8)) == 8


# ----------------------------------------------------------------------------- training


def test_a_tiny_model_learns_from_motion_clips(tokenizer):
    torch.manual_seed(0)
    config = with_video("unified", 8, 2, max_length=128)  # 4 slots x 16 tokens per clip
    model = build_model(config, tokenizer)
    spec = spec_for(model)
    data = MixtureBatches(WorldSource(S, 0), {"motion": 1.0}, seed=0, stage=0, batch_size=8,
                          prompts=PromptEncoder.of(model, tokenizer, spec, max_length=128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for k in range(40):
        batch = data[k]
        assert not batch.skipped and batch.pixels.groups() == [2] * 32
        loss = model(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixels,
                     labels=batch.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.5 * first, losses
