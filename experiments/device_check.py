"""Imported-model parity and a short training run on whatever device is present (a GPU if any).

    python experiments/device_check.py [OUT_DIR]

Writes a tiny random LLaVA checkpoint, imports it, compares fusionlm's logits and greedy tokens
with transformers' on the device in fp32 and bf16, then trains the tiny demo model a few steps there.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fusionlm.checkpoint import load_model  # noqa: E402
from fusionlm.config import load_recipe  # noqa: E402
from fusionlm.data.pixels.processing import ImageSpec  # noqa: E402
from fusionlm.device import resolve_device  # noqa: E402
from fusionlm.generate import generate_ids  # noqa: E402
from fusionlm.interop import import_checkpoint  # noqa: E402
from fusionlm.train.loop import train  # noqa: E402
from hf_tiny import llava_checkpoint  # noqa: E402
from test_interop_llava import hf_generate, our_logits, processor_inputs, requests  # noqa: E402
from transformers import LlavaForConditionalGeneration, LlavaProcessor  # noqa: E402


def _backends(src: Path) -> None:
    """How far transformers' torchvision image backend (used when torchvision is installed) is from
    the Pillow one fusionlm runs, on a few odd-sized images."""
    try:
        fast = LlavaProcessor.from_pretrained(src, backend="torchvision").image_processor
    except Exception as exc:  # noqa: BLE001 - torchvision absent: nothing to compare
        print(f"torchvision backend unavailable ({type(exc).__name__})")
        return
    slow = LlavaProcessor.from_pretrained(src, backend="pil").image_processor
    images = [img for _, n in [(0, 2)] for img in __import__("test_interop_llava").pictures()]
    a = slow(images=images, return_tensors="pt")["pixel_values"]
    b = fast(images=images, return_tensors="pt")["pixel_values"]
    print(f"{type(fast).__name__} vs {type(slow).__name__}: max |Δpixel| = {float((a - b).abs().max()):.3e} "
          f"(normalised units), mean {float((a - b).abs().mean()):.3e}")


def main(out: Path) -> None:
    device = resolve_device("auto")
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'})")
    src = llava_checkpoint(out / "src")
    import_checkpoint(str(src), out / "ours", log=lambda *_: None)
    for dtype in (torch.float32, torch.bfloat16):
        model, tok, config = load_model(out / "ours", device=str(device))
        model.to(dtype)
        hf = LlavaForConditionalGeneration.from_pretrained(src, dtype=dtype).to(device).eval()
        proc = LlavaProcessor.from_pretrained(src, backend="pil")
        inputs = {k: v.to(device) for k, v in processor_inputs(proc, tok).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            theirs = hf(**inputs).logits.float()
        ours = our_logits(model, inputs).float()
        real = inputs["attention_mask"].bool()
        same = generate_ids(model, tok, requests(), ImageSpec.for_model(model, config), max_new_tokens=8) == \
            hf_generate(hf, inputs, model)
        print(f"{dtype}: max|Δlogit| = {float((ours - theirs)[real].abs().max()):.2e}, greedy identical: {same}")
    _backends(src)
    config = load_recipe("demo", ["stages.0.steps=20", "stages.1.steps=20", "stages.2.steps=20", "stages.3.steps=20",
                                  "train.eval_per_task=2", "data.loader_workers=0"])
    started = time.perf_counter()
    progress = train(config, out / "run")
    print(f"trained {progress.step} steps on {device} in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
