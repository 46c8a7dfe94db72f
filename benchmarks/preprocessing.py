"""Image preprocessing throughput: fusionlm's path (the one loader, then the checkpoint's processor or
fusionlm's letterbox) vs transformers' image processor called directly, on the same PNG files;
the pixel values must agree where the pipelines are the same.

    python benchmarks/preprocessing.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from PIL import Image

from common import llava_pair, machine, timed_alternately
from fusionlm.data.pixels.processing import ImageSpec
from hf_tiny import noise_images

N = 64


def main() -> None:
    _, processor, model, _, config, _ = llava_pair()
    folder = Path(tempfile.mkdtemp())
    paths = []
    for i, img in enumerate(noise_images([(320 + 7 * i, 240 + 5 * i) for i in range(N)], seed=3)):
        paths.append(folder / f"{i}.png")
        img.save(paths[-1])
    spec = ImageSpec.for_model(model, config)
    letterbox = ImageSpec(size=spec.size, mean=model.encoder.mean, std=model.encoder.std, grid=model.encoder.grid)

    def theirs():
        return [processor.image_processor(images=[Image.open(p).convert("RGB")], return_tensors="pt")["pixel_values"][0]
                for p in paths]

    def ours():
        return [spec.process(p).pixels for p in paths]

    def ours_letterbox():
        return [letterbox.process(p).pixels for p in paths]

    same = all(torch.equal(a, b) for a, b in zip(ours(), theirs()))
    t_theirs, t_ours, t_box = timed_alternately(theirs, ours, ours_letterbox, repeats=5)
    print(f"machine: {machine()}; {N} PNG files of about 320x240 to {spec.size}x{spec.size}")
    print("| pipeline | images/s | vs transformers |")
    print("| --- | ---: | ---: |")
    print(f"| transformers' CLIPImageProcessor (Pillow backend), called directly | {N / t_theirs:,.0f} | 1.00x |")
    print(f"| fusionlm, the checkpoint's processor through the one loader (pixels identical: {same}) | "
          f"{N / t_ours:,.0f} | {t_theirs / t_ours:.2f}x |")
    print(f"| fusionlm letterbox (its own, for models it trains) | {N / t_box:,.0f} | {t_theirs / t_box:.2f}x |")


if __name__ == "__main__":
    main()
