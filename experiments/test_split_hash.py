"""A fingerprint of the synthetic world's test split, as the demo evaluates it: recorded before any
experiment on the demo recipe (issue 17) and checked after, so that a better score cannot come from
an easier test set.

    python experiments/test_split_hash.py [--per-task 500] [--image-size 64]

For each task of the evaluation, samples ``test/<task>/0 … per_task-1`` (the ones ``fusionlm eval
--per-task N`` reads): their ids, messages, reference answers and every image's pixels (frames of
a clip included) go into one SHA-256 per task, and the tasks' digests into one for the split. The
world is rendered as the demo's recipe renders it (``data.world_image_size``, ``data.world_seed``).
"""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
from PIL import Image, ImageSequence

from fusionlm.config import load_recipe
from fusionlm.data.world import World
from fusionlm.evaluate.harness import EVAL_TASKS


def pictures(item) -> list[np.ndarray]:
    """Every frame of ``item`` (a picture, or a clip whose frames are pictures) as RGB pixels."""
    frames = getattr(item, "source", None)  # a Video of the world: its PIL frames
    if isinstance(frames, list):
        return [f for frame in frames for f in pictures(frame)]
    if isinstance(item, Image.Image):
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(item)]
    raise TypeError(f"cannot fingerprint an image of type {type(item).__name__}")


def task_digest(world: World, task: str, per_task: int) -> str:
    h = hashlib.sha256()
    for index in range(per_task):
        sample = world.sample(task, "test", index)
        h.update(json.dumps([sample.id, sample.kind, sample.messages, sample.text, sample.answers]).encode())
        for item in sample.images:
            for pixels in pictures(item):
                h.update(str(pixels.shape).encode())
                h.update(pixels.tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-task", type=int, default=500)
    parser.add_argument("--image-size", type=int, help="default: the demo recipe's data.world_image_size")
    args = parser.parse_args()
    data = load_recipe("demo").data
    world = World(image_size=args.image_size or data.world_image_size, seed=data.world_seed)
    whole = hashlib.sha256()
    for task in EVAL_TASKS:
        digest = task_digest(world, task, args.per_task)
        whole.update(f"{task}:{digest}\n".encode())
        print(f"{task:12s} {digest[:16]}")
    print(f"test split, {args.per_task} per task, {len(EVAL_TASKS)} tasks: {whole.hexdigest()}")


if __name__ == "__main__":
    main()
