"""LLaVA-style JSON: write samples (images as PNG files) and read them back as ``Sample``.

The file is a JSON list of records, image paths relative to the JSON file's folder::

    {"id": "train/color/000001", "task": "color", "image": "images/train_color_000001_0.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the shape?"},
                       {"from": "gpt", "value": "red"}],
     "answers": ["red"]}

A chat sample with no image has neither ``"image"`` nor ``"images"``; one with several has
``"images": [...]``. Documents are ``{"id", "task", "kind": "document", "text", "images"}``.

Clips (``Video`` items, ``<video>`` in the text) are ``"video": path`` or ``"videos": [...]``
(LLaVA-Video style): a folder of frames or an animated GIF/WebP/PNG. Items are matched to the
text's ``<image>`` / ``<video>`` placeholders in order. A record with videos and no images whose
text has ``<image>`` markers but no ``<video>`` (LLaVA-Video's own files mark the clip with
``<image>``) has those markers read as ``<video>``. Writing saves in-memory clips as animated GIFs
(``videos/<id>_<k>.gif``; Pillow's GIF writer keeps at most 256 colours per frame and merges
identical consecutive frames), copies clip files, and copies a folder's frame files.
Plain LLaVA files (no ``task``/``answers``) read too: task ``"custom"``, answers = the last
assistant turn. Reading never opens an image: it resolves and checks paths only.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from ...errors import SampleError
from ..chat import PLACEHOLDERS
from ..pixels.paths import resolve_under
from ..sample import IMAGE_TOKEN, VIDEO_TOKEN, Sample
from ..pixels.video import Video, frame_files

_ROLES_OUT = {"user": "human", "assistant": "gpt"}
_ROLES_IN = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def write_llava_json(samples: Iterable[Sample], out_dir: str | Path, *,
                     json_name: str = "data.json") -> Path:
    """Write ``samples`` to ``out_dir/json_name`` and their images to ``out_dir/images/``.

    Image ``k`` of sample ``id`` goes to ``images/<id with '/' -> '_'>_<k>.png``; images given as
    paths are copied (PNG) or converted to PNG. Returns the JSON file's path.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for sample in samples:
        rel_paths, video_paths = [], []
        for k, image in enumerate(sample.images):
            stem = f"{sample.id.replace('/', '_')}_{k}"
            if isinstance(image, Video):
                video_paths.append(_save_video(image, out_dir, f"videos/{stem}"))
                continue
            rel = f"images/{stem}.png"
            _save_png(image, out_dir / rel)
            rel_paths.append(rel)
        record: dict[str, Any] = {"id": sample.id, "task": sample.task}
        if sample.kind == "document":
            record.update(kind="document", text=sample.text, images=rel_paths)
            if video_paths:
                record["videos"] = video_paths
        else:
            if len(rel_paths) == 1:
                record["image"] = rel_paths[0]
            elif rel_paths:
                record["images"] = rel_paths
            if len(video_paths) == 1:
                record["video"] = video_paths[0]
            elif video_paths:
                record["videos"] = video_paths
            record["conversations"] = [{"from": _ROLES_OUT.get(m["role"], m["role"]),
                                        "value": m["content"]} for m in sample.messages]
            record["answers"] = list(sample.answers)
        records.append(record)
    path = out_dir / json_name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)  # never leave a half-written JSON under the final name
    return path


def _save_png(image: Any, dest: Path) -> None:
    if isinstance(image, Image.Image):
        image.save(dest, format="PNG")
    elif Path(image).suffix.lower() == ".png":
        shutil.copyfile(image, dest)
    else:
        with Image.open(image) as im:
            im.save(dest, format="PNG")


def _save_video(video: Video, out_dir: Path, stem: str) -> str:
    """Write a clip under ``out_dir``; returns its path relative to ``out_dir``."""
    source = video.source
    if isinstance(source, list):
        rel = f"{stem}.gif"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        frames = [f.convert("RGB") for f in source]
        frames[0].save(out_dir / rel, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
        return rel
    if Path(source).is_dir():
        (out_dir / stem).mkdir(parents=True, exist_ok=True)
        for frame in frame_files(source):
            shutil.copyfile(frame, out_dir / stem / Path(frame).name)
        return stem
    rel = stem + Path(source).suffix.lower()
    (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out_dir / rel)
    return rel


def read_llava_json(path: str | Path, *, image_root: str | Path | None = None) -> list[Sample]:
    """Read a LLaVA-style JSON list into samples whose images are resolved path strings.

    Args:
        path: the JSON file.
        image_root: folder image paths are relative to (default: the JSON file's folder); a path
            whose real path (symlinks included) leaves it is refused (``paths.resolve_under``).

    Raises:
        SampleError: malformed JSON or record, a path escape, or an ``<image>`` marker count
            that differs from the number of images; the message names the file and sample.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError(f"{path}: cannot read LLaVA JSON: {e}") from None
    if not isinstance(data, list):
        raise SampleError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    root = os.path.realpath(image_root if image_root is not None else path.parent)
    return [_read_record(rec, i, path, root) for i, rec in enumerate(data)]


def _read_record(rec: Any, index: int, path: Path, root: str) -> Sample:
    where = f"{path}: sample {index}"
    if not isinstance(rec, dict):
        raise SampleError(f"{where}: expected an object, got {type(rec).__name__}")
    sid = str(rec.get("id", index))
    where = f"{path}: sample {index} (id {sid})"
    images = [resolve_under(p, root, where=f"{path}: sample {sid}") for p in _image_list(rec, where)]
    videos = [Video(resolve_under(p, root, where=f"{path}: sample {sid}")) for p in _image_list(rec, where, "video")]
    task = str(rec.get("task", "custom"))
    if rec.get("kind", "chat") == "document":
        text = rec.get("text")
        if not isinstance(text, str):
            raise SampleError(f"{where}: document is missing key 'text' (a string)")
        sample = Sample(id=sid, task=task, kind="document", text=text, images=images)
    else:
        sample = Sample(id=sid, task=task, messages=_messages(rec, where), images=images)
        answers = rec.get("answers")
        if answers is None:
            replies = [m["content"] for m in sample.messages if m["role"] == "assistant"]
            answers = replies[-1:]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise SampleError(f"{where}: 'answers' must be a list of strings")
        sample.answers = list(answers)
    if videos and not images and VIDEO_TOKEN not in sample.all_text():  # LLaVA-Video marks a clip with <image>
        sample.text = sample.text.replace(IMAGE_TOKEN, VIDEO_TOKEN)
        for m in sample.messages:
            m["content"] = m["content"].replace(IMAGE_TOKEN, VIDEO_TOKEN)
    marks = PLACEHOLDERS.findall(sample.all_text())
    n_video = marks.count(VIDEO_TOKEN)
    if (len(marks) - n_video, n_video) != (len(images), len(videos)):
        if not n_video and not videos:
            raise SampleError(f"{path}: sample {sid}: text has {len(marks)} {IMAGE_TOKEN} marker(s) "
                              f"but {len(images)} image(s)")
        raise SampleError(f"{path}: sample {sid}: text has {len(marks) - n_video} {IMAGE_TOKEN} and {n_video} "
                          f"{VIDEO_TOKEN} marker(s) but {len(images)} image(s) and {len(videos)} video(s)")
    queues = {IMAGE_TOKEN: iter(images), VIDEO_TOKEN: iter(videos)}
    sample.images = [next(queues[m]) for m in marks]  # items in the order of their placeholders
    return sample


def _image_list(rec: dict, where: str, key: str = "image") -> list[str]:
    images = rec.get(f"{key}s", rec.get(key, []))
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise SampleError(f"{where}: '{key}'/'{key}s' must be a path or a list of paths")
    return images


def _messages(rec: dict, where: str) -> list[dict[str, str]]:
    turns = rec.get("conversations")
    if not isinstance(turns, list):
        raise SampleError(f"{where}: missing key 'conversations' (a list of turns)")
    messages = []
    for t, turn in enumerate(turns):
        for key in ("from", "value"):
            if not isinstance(turn, dict) or key not in turn:
                raise SampleError(f"{where}: turn {t} is missing key {key!r}")
        role = _ROLES_IN.get(turn["from"])
        if role is None:
            raise SampleError(f"{where}: turn {t} has unknown 'from' {turn['from']!r}; "
                              f"allowed: {', '.join(_ROLES_IN)}")
        if not isinstance(turn["value"], str):
            raise SampleError(f"{where}: turn {t} 'value' must be a string")
        messages.append({"role": role, "content": turn["value"]})
    return messages


CHOICE_LETTERS = "ABCDEFGHIJ"


def read_qa_jsonl(path: str | Path, *, image_root: str | Path | None = None) -> list[Sample]:
    """Read an evaluation file in JSON lines: one question per line.

    Each line: ``{"id", "image" | "images", "question", "answers": [...] | "answer": "...",
    "choices": [...] (multiple choice, the answer being the right choice's text or letter),
    "task"}``. Images are placed where the question has ``<image>`` placeholders, else before it.
    A multiple-choice question lists its options as ``A. …`` lines, and its reference answers are
    ``[letter, *choices]`` (the encoding the ``choice_accuracy`` metric reads).

    Raises:
        SampleError: an unreadable line or record, naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SampleError(f"{path}: cannot read JSON lines: {e}") from None
    root = os.path.realpath(image_root if image_root is not None else path.parent)
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SampleError(f"{where}: not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise SampleError(f"{where}: expected an object, got {type(rec).__name__}")
        samples.append(_qa_record(rec, where, path, root, number))
    return samples


def _qa_record(rec: dict, where: str, path: Path, root: str, number: int) -> Sample:
    sid = str(rec.get("id", number))
    question = rec.get("question")
    if not isinstance(question, str):
        raise SampleError(f"{where} (id {sid}): missing key 'question' (a string)")
    answers = rec.get("answers", [rec["answer"]] if "answer" in rec else None)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise SampleError(f"{where} (id {sid}): 'answers' must be a non-empty list of strings (or give 'answer')")
    images = [resolve_under(p, root, where=f"{path}: sample {sid}") for p in _image_list(rec, where)]
    if images and IMAGE_TOKEN not in question:
        question = f"{IMAGE_TOKEN}\n" * len(images) + question
    choices = rec.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(CHOICE_LETTERS) or \
                not all(isinstance(c, str) for c in choices):
            raise SampleError(f"{where} (id {sid}): 'choices' must be a list of 2 to {len(CHOICE_LETTERS)} strings")
        letters = CHOICE_LETTERS[: len(choices)]
        right = answers[0].strip()
        if right in choices:
            right = letters[choices.index(right)]
        if right not in letters:
            raise SampleError(f"{where} (id {sid}): the answer {answers[0]!r} is neither a choice nor its letter")
        question += "\n" + "\n".join(f"{k}. {c}" for k, c in zip(letters, choices))
        question += "\nAnswer with the option's letter."
        answers = [right, *choices]
    sample = Sample(id=sid, task=str(rec.get("task", "custom")), images=images, answers=list(answers),
                    messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answers[0]}])
    found = sample.all_text().count(IMAGE_TOKEN)
    if found != len(images):
        raise SampleError(f"{where} (id {sid}): the question has {found} {IMAGE_TOKEN} marker(s) but "
                          f"{len(images)} image(s)")
    return sample
