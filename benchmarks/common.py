"""Shared by the benchmark scripts: a LLaVA-shaped checkpoint both fusionlm and transformers load,
timing with warm-up, and the machine's practical matmul limit."""

from __future__ import annotations

import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def llava_pair(hidden: int = 256, layers: int = 4, image_size: int = 64, patch: int = 8):
    """(transformers LLaVA, its processor, fusionlm's import of it, tokenizer, config, checkpoint dir)."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from fusionlm.checkpoint import load_model
    from fusionlm.interop import import_checkpoint
    from hf_tiny import llava_checkpoint

    root = Path(tempfile.mkdtemp())
    src = llava_checkpoint(root / "src", image_size=image_size)
    # widen the tiny test checkpoint to the benchmark's size
    from transformers import LlavaConfig

    config = LlavaConfig.from_pretrained(src)
    config.text_config.hidden_size, config.text_config.intermediate_size = hidden, 4 * hidden
    config.text_config.num_hidden_layers, config.text_config.num_attention_heads = layers, hidden // 32
    config.text_config.num_key_value_heads = hidden // 64
    config.vision_config.patch_size = patch
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(src)
    processor = LlavaProcessor.from_pretrained(src, backend="pil")
    processor.patch_size = patch
    processor.save_pretrained(src)
    ours = import_checkpoint(str(src), root / "ours", log=lambda *_: None)
    model, tokenizer, cfg = load_model(ours)
    hf = LlavaForConditionalGeneration.from_pretrained(src).eval()
    return hf, LlavaProcessor.from_pretrained(src, backend="pil"), model, tokenizer, cfg, src


def timed(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_flops(n: int = 1024, dtype=torch.float32) -> float:
    """FLOP/s of an n×n×n matrix product: the machine's practical limit for dense work."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = timed(lambda: a @ b, repeats=10)
    return 2 * n**3 / seconds
